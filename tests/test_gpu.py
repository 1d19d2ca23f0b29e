"""vsup.gpu without a GPU: the no-NVML paths, and the logic against a fake NVML and a fake /proc."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from vsup import gpu
from vsup.gpu import Gpus, LinuxProcs

MIB = 1 << 20
GIB = 1 << 30


# ---------------------------------------------------------------------------------------------
# Fakes


class FakeNVMLError(Exception):
    def __init__(self, value: int = 999, text: str = "Unknown Error") -> None:
        super().__init__(text)
        self.value = value


@dataclass
class FakeDevice:
    total: int = 80 * GIB
    used: int = 500 * MIB
    procs: list[tuple[int, int | None]] = field(default_factory=list)  # (NVML pid, bytes)
    uuid: str = "GPU-0000"
    name: str | bytes = "Fake H100"
    minor: int = 0
    procs_error: bool = False


class FakeNvml:
    """The slice of pynvml that vsup.gpu calls, over a list of FakeDevice."""

    NVMLError = FakeNVMLError

    def __init__(self, devices: list[FakeDevice], init_error: str | None = None) -> None:
        self.devices = devices
        self.init_error = init_error
        self.inits = 0
        self.shutdowns = 0
        self.fail_reads = 0  # the next N memory reads raise

    def nvmlInit(self) -> None:
        if self.init_error:
            raise FakeNVMLError(12, self.init_error)
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self.devices[h].uuid

    def nvmlDeviceGetName(self, h: int) -> str | bytes:
        return self.devices[h].name

    def nvmlDeviceGetMinorNumber(self, h: int) -> int:
        return self.devices[h].minor

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        if self.fail_reads:
            self.fail_reads -= 1
            raise FakeNVMLError(15, "GPU is lost")
        d = self.devices[h]
        return SimpleNamespace(total=d.total, used=d.used, free=d.total - d.used)

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[SimpleNamespace]:
        d = self.devices[h]
        if d.procs_error:
            raise FakeNVMLError(3, "Not Supported")
        return [SimpleNamespace(pid=p, usedGpuMemory=u) for p, u in d.procs]


@dataclass
class FakeProc:
    user: str = "vllm"
    cmdline: str = "python -m vllm"
    devices: frozenset[str] | None = frozenset({"nvidiactl", "nvidia0", "nvidia-uvm"})
    alive: bool = True
    nspid: list[int] = field(default_factory=list)  # pids in inner namespaces


class FakeProcs:
    """A ProcView over a dict of FakeProc."""

    def __init__(self, procs: dict[int, FakeProc]) -> None:
        self.procs = procs

    def exists(self, pid: int) -> bool:
        return pid in self.procs

    def alive(self, pid: int) -> bool:
        return pid in self.procs and self.procs[pid].alive

    def describe(self, pid: int) -> tuple[str, str] | None:
        p = self.procs.get(pid)
        return None if p is None else (p.user, p.cmdline)

    def nvidia_devices(self, pid: int) -> frozenset[str] | None:
        p = self.procs.get(pid)
        return frozenset() if p is None or not p.alive else p.devices

    def nspid_map(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for pid, p in self.procs.items():
            for inner in p.nspid:
                out.setdefault(inner, []).append(pid)
        return out

    def pids(self) -> list[int]:
        return list(self.procs)


class FakeClock:
    """A monotonic clock that only moves when the code under test sleeps; hooks run per sleep."""

    def __init__(self) -> None:
        self.t = 100.0
        self.hooks: list = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s
        for hook in self.hooks:
            hook(self.t)


@pytest.fixture(autouse=True)
def _fresh_log_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "_said", set())


def open_fake(devices: list[FakeDevice], procs: dict[int, FakeProc]) -> tuple[Gpus, FakeNvml, FakeProcs]:
    nvml = FakeNvml(devices)
    view = FakeProcs(procs)
    g = Gpus.open(nvml, procs=view)
    assert g is not None
    return g, nvml, view


# ---------------------------------------------------------------------------------------------
# Opening, and running without NVML


def test_open_without_module_returns_none_and_logs_once(monkeypatch, caplog):
    """Without nvidia-ml-py, open returns None and says so once however often it is called."""
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with caplog.at_level(logging.WARNING, logger="vsup.gpu"):
        assert Gpus.open() is None
        assert Gpus.open() is None
    said = [r for r in caplog.records if "nvidia-ml-py is not installed" in r.getMessage()]
    assert len(said) == 1
    assert "not installed" in gpu.unavailable_reason()


def test_open_when_library_missing_returns_none_with_reason(caplog):
    """A failing nvmlInit (libnvidia-ml.so absent) gives None and a reason naming the error."""
    nvml = FakeNvml([FakeDevice()], init_error="NVML Shared Library Not Found")
    with caplog.at_level(logging.WARNING, logger="vsup.gpu"):
        assert Gpus.open(nvml) is None
    assert "NVML Shared Library Not Found" in gpu.unavailable_reason()
    assert any("GPU checks are skipped" in r.getMessage() for r in caplog.records)


def test_open_without_devices_shuts_nvml_down():
    """NVML with zero devices counts as unavailable and its session is closed again."""
    nvml = FakeNvml([])
    assert Gpus.open(nvml) is None
    assert (nvml.inits, nvml.shutdowns) == (1, 1)
    assert gpu.unavailable_reason() == "NVML sees no GPU"


def test_no_nvml_paths_skip_with_reason(monkeypatch):
    """With no Gpus, the release wait, the precheck and the status run and report skipped."""
    monkeypatch.setitem(sys.modules, "pynvml", None)
    g = Gpus.open()
    rep = gpu.wait_released_or_skip(g, {1, 2}, {0: 0}, timeout_s=5)
    pre = gpu.precheck_or_skip(g, set())
    assert rep.skipped and rep.released and "not installed" in rep.reason
    assert pre.skipped and pre.ok and "not installed" in pre.reason
    assert gpu.status_summary(g, {1}) is None


def test_close_shuts_nvml_down():
    """Leaving the context manager ends the NVML session once."""
    nvml = FakeNvml([FakeDevice()])
    with Gpus.open(nvml, procs=FakeProcs({})) as g:
        assert g.count == 1
    assert nvml.shutdowns == 1


# ---------------------------------------------------------------------------------------------
# Snapshots and holders


def test_snapshot_reads_memory_procs_and_decodes_names():
    """A snapshot carries total/used bytes, the bytes-or-str name as text, and each process."""
    dev = FakeDevice(used=3 * GIB, procs=[(10, 2 * GIB)], name=b"NVIDIA H100 80GB HBM3")
    g, _n, _v = open_fake([dev], {10: FakeProc()})
    (info,) = g.snapshot()
    assert info.name == "NVIDIA H100 80GB HBM3"
    assert (info.total_bytes, info.used_bytes) == (80 * GIB, 3 * GIB)
    assert info.procs == (gpu.GpuProc(gpu=0, pid=10, used_bytes=2 * GIB, nvml_pid=10, pid_source="nvml"),)


def test_holders_name_tree_and_foreign_processes():
    """Holders carry pid, user, cmdline and MiB, with in_tree only for the given pids."""
    dev = FakeDevice(procs=[(10, 2 * GIB), (20, GIB)])
    g, _n, _v = open_fake(
        [dev],
        {10: FakeProc(cmdline="VLLM::Worker_TP0"), 20: FakeProc(user="alice", cmdline="python train.py")},
    )
    got = {h["pid"]: h for h in g.holders({10})}
    assert got[10]["in_tree"] and got[10]["used_mib"] == 2048 and got[10]["cmdline"] == "VLLM::Worker_TP0"
    assert not got[20]["in_tree"] and got[20]["user"] == "alice" and got[20]["used_mib"] == 1024


def test_unknown_used_memory_is_none_not_zero():
    """NVML's 'not available' per-process memory stays None rather than a false 0 MiB."""
    g, _n, _v = open_fake([FakeDevice(procs=[(10, None)])], {10: FakeProc()})
    (h,) = g.holders()
    assert h["used_mib"] is None


def test_process_listing_not_supported_keeps_memory_totals():
    """Where NVML cannot list processes, the GPU is still read and marked procs_listed=False."""
    g, _n, _v = open_fake([FakeDevice(used=5 * GIB, procs_error=True)], {})
    (info,) = g.snapshot()
    assert not info.procs_listed and info.used_bytes == 5 * GIB and info.procs == ()


# ---------------------------------------------------------------------------------------------
# Pid namespaces


def test_local_pid_without_nvidia_files_is_not_blamed():
    """An NVML pid that names an unrelated local process (no /dev/nvidia* open) stays unresolved."""
    g, _n, _v = open_fake(
        [FakeDevice(procs=[(4242, GIB)])], {4242: FakeProc(cmdline="sshd", devices=frozenset())}
    )
    (p,) = g.snapshot()[0].procs
    assert (p.pid, p.nvml_pid, p.pid_source) == (None, 4242, "unresolved")


def test_inner_namespace_pid_is_mapped_through_nspid():
    """An NVML pid from an inner pid namespace maps to the local pid whose NSpid lists it."""
    g, _n, _v = open_fake(
        [FakeDevice(procs=[(7, GIB)])],
        {900: FakeProc(nspid=[7]), 901: FakeProc(nspid=[7], devices=frozenset())},
    )
    (p,) = g.snapshot()[0].procs
    assert (p.pid, p.pid_source) == (900, "nspid")


def test_inner_pid_found_in_two_containers_stays_unresolved():
    """The same inner pid in two containers, both on the GPU, is ambiguous: nothing is blamed."""
    g, _n, _v = open_fake(
        [FakeDevice(procs=[(7, GIB)])], {900: FakeProc(nspid=[7]), 901: FakeProc(nspid=[7])}
    )
    (p,) = g.snapshot()[0].procs
    assert (p.pid, p.pid_source) == (None, "unresolved")


def test_host_pid_is_paired_by_device_file():
    """A host pid invisible here pairs with the one local process holding /dev/nvidiaN open."""
    devs = [FakeDevice(procs=[(555001, GIB)], minor=0), FakeDevice(procs=[], minor=1, uuid="GPU-1")]
    procs = {
        33: FakeProc(devices=frozenset({"nvidiactl", "nvidia0"})),
        34: FakeProc(devices=frozenset({"nvidiactl", "nvidia1"})),
    }
    g, _n, _v = open_fake(devs, procs)
    (p,) = g.snapshot()[0].procs
    assert (p.pid, p.nvml_pid, p.pid_source) == (33, 555001, "devfd")


def test_ambiguous_device_file_pairing_stays_unresolved():
    """Two local processes on the same device file cannot be told apart: no attribution."""
    procs = {33: FakeProc(), 34: FakeProc()}
    g, _n, _v = open_fake([FakeDevice(procs=[(555001, GIB)])], procs)
    (p,) = g.snapshot()[0].procs
    assert p.pid is None
    (h,) = g.holders({33, 34})
    assert not h["in_tree"]


# ---------------------------------------------------------------------------------------------
# wait_released


def test_release_seen_when_tree_dies_and_memory_returns():
    """Once the tree's processes vanish and used memory is back, the wait returns released."""
    dev = FakeDevice(used=4 * GIB + 500 * MIB, procs=[(10, 2 * GIB), (11, 2 * GIB)])
    g, _n, view = open_fake([dev], {10: FakeProc(), 11: FakeProc()})
    before = g.snapshot()
    clock = FakeClock()

    def free_at_100_2(t: float) -> None:
        if t >= 100.2:
            dev.procs.clear()
            dev.used = 510 * MIB
            view.procs.clear()

    clock.hooks.append(free_at_100_2)
    rep = g.wait_released({10, 11}, {0: 500 * MIB}, before=before, clock=clock, sleep=clock.sleep)
    assert rep.released and rep.reason is None
    assert rep.freed_mib == {0: 4096 + 500 - 510}
    assert rep.elapsed_s == pytest.approx(0.2, abs=0.06)


def test_release_timeout_names_the_tree_holder():
    """A tree pid still holding memory at the deadline is named, marked in_tree, in the reason."""
    dev = FakeDevice(used=3 * GIB, procs=[(10, 2 * GIB), (20, 512 * MIB)])
    g, _n, _v = open_fake(
        [dev], {10: FakeProc(cmdline="VLLM::Worker_TP0"), 20: FakeProc(user="bob", cmdline="other")}
    )
    clock = FakeClock()
    rep = g.wait_released({10}, None, timeout_s=2.0, clock=clock, sleep=clock.sleep)
    assert not rep.released
    assert rep.elapsed_s >= 2.0
    assert "pid 10" in rep.reason and "VLLM::Worker_TP0" in rep.reason and "old tree" in rep.reason
    assert {(h["pid"], h["in_tree"]) for h in rep.remaining} == {(10, True), (20, False)}


def test_live_tree_pid_with_nvidia_device_is_not_released():
    """A tree pid alive with /dev/nvidia* open blocks release even if NVML lists no such pid."""
    dev = FakeDevice(used=500 * MIB, procs=[])  # NVML lists nothing we can map
    g, _n, view = open_fake([dev], {10: FakeProc()})
    clock = FakeClock()
    rep = g.wait_released({10}, {0: 500 * MIB}, timeout_s=1.0, clock=clock, sleep=clock.sleep)
    assert not rep.released and rep.stragglers == (10,)
    view.procs[10].alive = False  # a zombie holds nothing
    assert g.wait_released({10}, {0: 500 * MIB}, timeout_s=1.0, clock=clock, sleep=clock.sleep).released


def test_memory_above_baseline_blocks_release_and_is_explained():
    """Used memory over baseline+tolerance (an unmapped holder) keeps the wait from passing."""
    dev = FakeDevice(used=2 * GIB, procs=[(777777, 1536 * MIB)])
    g, _n, _v = open_fake([dev], {})
    clock = FakeClock()
    rep = g.wait_released({10}, {0: 500 * MIB}, timeout_s=1.0, clock=clock, sleep=clock.sleep)
    assert not rep.released
    assert "GPU 0 uses 2048 MiB, baseline 500 MiB" in rep.reason
    assert "777777 (NVML pid, not visible here)" in rep.reason


def test_memory_within_tolerance_counts_as_released():
    """Used memory a little above the baseline (within tolerance) is released."""
    g, _n, _v = open_fake([FakeDevice(used=600 * MIB)], {})
    clock = FakeClock()
    rep = g.wait_released({10}, {0: 500 * MIB}, clock=clock, sleep=clock.sleep)
    assert rep.released and rep.elapsed_s == 0


def test_release_wait_survives_a_failed_nvml_read():
    """One NVML error during the wait is retried, not raised."""
    g, nvml, _v = open_fake([FakeDevice()], {})
    nvml.fail_reads = 1
    clock = FakeClock()
    rep = g.wait_released({10}, None, clock=clock, sleep=clock.sleep)
    assert rep.released and rep.elapsed_s == pytest.approx(gpu.RELEASE_POLL_S)


def test_release_wait_reports_unreadable_gpu_at_timeout():
    """If NVML never answers, the wait ends at its timeout, not released, saying why."""
    g, nvml, _v = open_fake([FakeDevice()], {})
    nvml.fail_reads = 10**6
    clock = FakeClock()
    rep = g.wait_released({10}, None, timeout_s=0.5, clock=clock, sleep=clock.sleep)
    assert not rep.released and "GPU is lost" in rep.reason


# ---------------------------------------------------------------------------------------------
# precheck and status


def test_precheck_refuses_foreign_holder_with_its_name():
    """A foreign process holding memory makes precheck refuse, naming pid, user, cmdline, MiB."""
    g, _n, _v = open_fake(
        [FakeDevice(procs=[(20, GIB)])], {20: FakeProc(user="alice", cmdline="python train.py --epochs 3")}
    )
    res = g.precheck()
    assert not res.ok
    assert "pid 20 user alice cmdline 'python train.py --epochs 3' holds 1024 MiB on GPU 0" in res.reason
    assert [h["pid"] for h in res.foreign] == [20]


def test_precheck_allows_listed_pids_and_other_gpus():
    """Allowed pids and holders on GPUs outside ``indices`` do not block a start."""
    devs = [FakeDevice(procs=[(10, GIB)]), FakeDevice(procs=[(20, GIB)], uuid="GPU-1", minor=1)]
    procs = {10: FakeProc(), 20: FakeProc(devices=frozenset({"nvidia1"}))}
    g, _n, _v = open_fake(devs, procs)
    assert g.precheck({10}, indices=[0]).ok
    assert not g.precheck({10}).ok


def test_precheck_min_free_fraction():
    """Too little free memory refuses even with no process listed."""
    g, _n, _v = open_fake([FakeDevice(total=80 * GIB, used=20 * GIB)], {})
    assert g.precheck().ok
    res = g.precheck(min_free_fraction=0.9)
    assert not res.ok and "below the 90% required" in res.reason and res.free_mib == {0: 60 * 1024}


def test_precheck_refuses_when_gpu_unreadable():
    """A GPU NVML cannot read is not a GPU to start a model on."""
    g, nvml, _v = open_fake([FakeDevice()], {})
    nvml.fail_reads = 1
    res = g.precheck()
    assert not res.ok and "GPU is lost" in res.reason


def test_status_summary_counts_model_memory():
    """Status reports used/total MiB per GPU and the share held by the model's pids."""
    dev = FakeDevice(used=5 * GIB, procs=[(10, 2 * GIB), (11, 2 * GIB), (20, 512 * MIB)])
    g, _n, _v = open_fake([dev], {10: FakeProc(), 11: FakeProc(), 20: FakeProc()})
    (row,) = gpu.status_summary(g, {10, 11})
    assert (row["used_mib"], row["total_mib"], row["model_mib"], row["procs"]) == (5120, 81920, 4096, 3)


def test_redact_cmdline_hides_secret_flag_values():
    """API keys on a vLLM command line never reach holders or reasons."""
    text = gpu.redact_cmdline(["vllm", "serve", "--api-key", "sk-123", "--hf-token=hf_abc", "--port", "8000"])
    assert "sk-123" not in text and "hf_abc" not in text
    assert text == "vllm serve --api-key *** --hf-token=*** --port 8000"


# ---------------------------------------------------------------------------------------------
# The real /proc reader


def test_linux_procs_describes_this_process():
    """LinuxProcs names our own user and cmdline and sees no NVIDIA device here."""
    procs = LinuxProcs()
    user, cmdline = procs.describe(os.getpid())
    assert user
    assert "python" in cmdline.lower() or "pytest" in cmdline
    assert procs.alive(os.getpid())
    devs = procs.nvidia_devices(os.getpid())
    assert devs is not None and all(d.startswith("nvidia") for d in devs)


def test_linux_procs_counts_a_zombie_as_not_alive():
    """An exited, unreaped child (a zombie) exists but is not alive: it holds no GPU memory."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        procs = LinuxProcs()
        deadline = time.monotonic() + 10
        while procs.alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert procs.exists(child.pid) and not procs.alive(child.pid)
    finally:
        child.wait()
    assert not procs.exists(child.pid)


def test_linux_procs_reads_nspid_and_device_links(tmp_path):
    """NSpid chains map inner pids to local ones, and fd links to /dev/nvidia* are named."""
    for pid, nspid, links in [
        (100, "100\t7", ["/dev/nvidiactl", "/dev/nvidia0", "/tmp/x"]),
        (101, "101", ["/dev/null"]),
    ]:
        d = tmp_path / str(pid)
        (d / "fd").mkdir(parents=True)
        (d / "status").write_text(f"Name:\tpython\nNSpid:\t{nspid}\n")
        for n, target in enumerate(links):
            os.symlink(target, d / "fd" / str(n))
    procs = LinuxProcs(str(tmp_path))
    assert procs.nspid_map() == {7: [100]}
    assert procs.nvidia_devices(100) == frozenset({"nvidiactl", "nvidia0"})
    assert procs.nvidia_devices(101) == frozenset()
    assert procs.nvidia_devices(102) is None


def test_cleanup_summary_reports_freed_mib_or_nothing() -> None:
    """cleanup_summary waits for the killed pids' memory and reports MiB freed; None without NVML or kills."""
    from vsup import gpu as g

    class Stub:
        def __init__(self) -> None:
            self.calls: list = []

        def wait_released(self, pids, baseline, *, timeout_s, before):
            self.calls.append(set(pids))
            return g.ReleaseReport(released=True, elapsed_s=0.2, freed_mib={0: 2658, 1: 2658})

    stub = Stub()
    assert g.cleanup_summary(None, {1}, None) is None
    assert g.cleanup_summary(stub, set(), None) is None  # type: ignore[arg-type]  # a duck-typed Gpus stub
    out = g.cleanup_summary(stub, {11, 12}, None)  # type: ignore[arg-type]  # the same stub
    assert out == {
        "released": True,
        "freed_mib": {0: 2658, 1: 2658},
        "elapsed_s": 0.2,
        "remaining": [],
        "reason": None,
    }
    assert stub.calls == [{11, 12}]


# ---------------------------------------------------------------------------------------------
# Several instances on one host: the holder is named by its vsup instance (issue 18)


def _instance(etc: Path, lib: Path, name: str, pids: dict[int, float]) -> Path:
    """/etc/vsup/NAME.toml with state_dir /var/lib/vsup/NAME, whose ledger records `pids`
    (pid -> create time) as one tree."""
    from vsup import proctree

    state = lib / name
    cfg = etc / f"{name}.toml"
    cfg.write_text(f'[vllm]\npython = "/x"\nmodel = "m"\n[daemon]\nstate_dir = "{state}"\n')
    procs = [proctree.ProcRef(pid, ct, "VLLM::Worker", ["python"]) for pid, ct in pids.items()]
    rec = proctree.TreeRecord(
        id=f"t-{name}", model="m", port=8000, started_at=0.0, leader=procs[0], sid=1, pgid=1, procs=procs
    )
    proctree.Ledger(state).save([rec])
    return cfg


@pytest.fixture
def two_instances(tmp_path: Path) -> tuple[Path, Path, dict[int, float]]:
    """Instances a (ours, nothing running) and b (pids 700 and 701 on GPU 1) as the template unit
    lays them out; `live` maps the pids alive now to their create times."""
    etc, lib = tmp_path / "etc", tmp_path / "lib"
    etc.mkdir()
    own = _instance(etc, lib, "a", {500: 1.0})
    _instance(etc, lib, "b", {700: 7.0, 701: 7.1})
    live = {700: 7.0, 701: 7.1, 500: 99.0}  # 500 was a's, and has been reused since
    return own, lib / "a", live


def test_instances_found_through_configs_and_ledgers(two_instances) -> None:
    """From a's config and state dir: instance b, named by its config, with its live pids; a's
    own ledger and a reused pid are not counted."""
    own, state, live = two_instances
    found = gpu.find_instances(own, state, create_time=live.get)
    assert [(i.name, i.pids) for i in found] == [("b", frozenset({700, 701}))]
    assert found[0].config is not None
    assert found[0].config.endswith("etc/b.toml") and found[0].state_dir.endswith("lib/b")


def test_instance_without_config_found_beside_our_state_dir(two_instances) -> None:
    """A ledger in a sibling of our state dir is an instance too, named by its directory."""
    own, state, live = two_instances
    (own.parent / "b.toml").unlink()
    found = gpu.find_instances(own, state, create_time=live.get)
    assert [(i.name, i.config, i.pids) for i in found] == [("b", None, frozenset({700, 701}))]


def test_precheck_names_the_instance_holding_a_wanted_gpu(two_instances) -> None:
    """Instance a wants GPU 1, where b's worker holds memory: refused, and the reason names b
    and its config, not just a pid; GPU 0 alone would be free."""
    own, state, live = two_instances
    devices = [
        FakeDevice(uuid="GPU-aaa", minor=0),
        FakeDevice(uuid="GPU-bbb", minor=1, procs=[(700, 30 * GIB)]),
    ]
    g, _, _ = open_fake(devices, {700: FakeProc(cmdline="VLLM::Worker_TP0", devices=frozenset({"nvidia1"}))})
    instances = gpu.find_instances(own, state, create_time=live.get)
    pre = g.precheck(set(), indices=gpu.visible_indices(g, "GPU-bbb"), instances=instances)
    assert not pre.ok and pre.reason is not None
    assert f"vsup instance 'b' ({own.parent / 'b.toml'}): pid 700" in pre.reason
    assert pre.foreign[0]["instance"] == "b"
    assert g.precheck(set(), indices=gpu.visible_indices(g, "0"), instances=instances).ok


def test_status_says_which_instance_holds_each_gpu(two_instances) -> None:
    """`vsup status` GPUs: held_by names b with its MiB on GPU 1; wanted marks our GPUs."""
    own, state, live = two_instances
    devices = [
        FakeDevice(minor=0, procs=[(900, GIB)]),
        FakeDevice(minor=1, procs=[(700, 2 * GIB), (701, GIB)]),
    ]
    g, _, _ = open_fake(devices, {900: FakeProc(), 700: FakeProc(), 701: FakeProc()})
    instances = gpu.find_instances(own, state, create_time=live.get)
    rows = gpu.status_summary(g, {900}, instances=instances, wanted={0})
    assert rows is not None
    assert [(r["index"], r["held_by"], r["wanted"]) for r in rows] == [
        (0, [], True),
        (1, [{"instance": "b", "used_mib": 3072}], False),
    ]


def test_visible_indices_from_cuda_visible_devices() -> None:
    """Indices and UUIDs name GPUs; unset means all; an unknown entry means all (never miss one)."""
    g, _, _ = open_fake([FakeDevice(uuid="GPU-aaa"), FakeDevice(uuid="GPU-bbb", minor=1)], {})
    assert gpu.visible_indices(g, None) is None
    assert gpu.visible_indices(g, "1, 0") == {0, 1}
    assert gpu.visible_indices(g, "GPU-bbb") == {1}
    assert gpu.visible_indices(g, "") == set()
    assert gpu.visible_indices(g, "MIG-123") is None


def test_neighbours_of_a_config(two_instances, monkeypatch) -> None:
    """From a loaded config: the other instances and the GPUs its [vllm].env asks for."""
    own, state, live = two_instances
    from types import SimpleNamespace

    monkeypatch.setattr(gpu, "_create_time", live.get)
    monkeypatch.setattr(gpu.find_instances, "__kwdefaults__", {"create_time": live.get})
    g, _, _ = open_fake([FakeDevice(uuid="GPU-aaa"), FakeDevice(uuid="GPU-bbb", minor=1)], {})
    cfg = SimpleNamespace(
        path=own, state_dir=state, vllm=SimpleNamespace(env={"CUDA_VISIBLE_DEVICES": "GPU-bbb"})
    )
    found, wanted = gpu.neighbours(g, cfg)
    assert [i.name for i in found] == ["b"] and wanted == {1}


def test_daemon_status_and_precheck_name_the_other_instance(tmp_path: Path, monkeypatch) -> None:
    """The owner's status and GPU pre-start check, with the fake NVML: instance a (this daemon,
    CUDA_VISIBLE_DEVICES=1) sees b's worker on GPU 1, named by b's config."""
    from support import write_config
    from vsup import config
    from vsup.daemon import Supervisor

    etc, lib = tmp_path / "etc", tmp_path / "lib"
    etc.mkdir()
    _instance(etc, lib, "b", {700: 7.0})
    cfg_path = write_config(
        etc / "a.toml",
        {
            "vllm": {
                "python": sys.executable,
                "model": "m",
                "env": {"CUDA_VISIBLE_DEVICES": "1"},
                "log_file": str(tmp_path / "a.log"),
            },
            "daemon": {"state_dir": str(lib / "a"), "socket": str(tmp_path / "a.sock")},
        },
    )
    cfg = config.load(cfg_path)
    monkeypatch.setattr(gpu.find_instances, "__kwdefaults__", {"create_time": {700: 7.0}.get})
    devices = [FakeDevice(minor=0), FakeDevice(minor=1, procs=[(700, 2 * GIB)])]
    g, _, _ = open_fake(devices, {700: FakeProc(cmdline="VLLM::Worker_TP0", devices=frozenset({"nvidia1"}))})
    sup = Supervisor(cfg)
    sup.gpus = g
    rows = sup.status()["gpus"]
    assert [(r["index"], r["held_by"], r["wanted"]) for r in rows] == [
        (0, [], False),
        (1, [{"instance": "b", "used_mib": 2048}], True),
    ]
    instances, wanted = gpu.neighbours(g, cfg)
    pre = g.precheck(set(), indices=wanted, instances=instances)
    assert not pre.ok and pre.reason is not None and "vsup instance 'b'" in pre.reason
    sup.events.close()
