"""overlap.py: whether a reload's new server fits beside the serving one (fake NVML, fake meminfo),
and the launch support an overlapped tree needs (its own port, its own TMPDIR)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from fakes.fake_host import FakeHost
from test_gpu import GIB, FakeDevice, open_fake
from test_proxy import Fake, ready, run, running, sse_events
from toml_writer import write_config
from vsup import config as config_mod
from vsup import launch, overlap
from vsup.gate import Route
from vsup.host import Host
from vsup.proctree import Ledger, ProcRef, TreeRecord


def _model_dir(tmp: Path, name: str, size: int) -> Path:
    d = tmp / name
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "model.safetensors", "wb") as f:
        f.truncate(size)  # sparse: the size is what counts
    (d / "config.json").write_text("{}")
    return d


def _config(tmp: Path, *, overlap_mode: str = "auto", b_args=(), b_env=None, vllm_env=None):
    b = _model_dir(tmp, "model-b", 300 << 20)
    sections: dict[str, dict[str, Any]] = {
        "vllm": {
            "python": sys.executable,
            "model": str(_model_dir(tmp, "model-a", 300 << 20)),
            "port": 8999,
            "log_file": str(tmp / "vllm.log"),
            "args": ["-tp", "2"],
            "env": vllm_env if vllm_env is not None else {"VLLM_CPU_KVCACHE_SPACE": "1"},
        },
        "daemon": {"state_dir": str(tmp / "state"), "socket": str(tmp / "vsup.sock")},
        "models.b": {"model": str(b), "args": list(b_args), "env": b_env or {}},
        "proxy": {"listen": "127.0.0.1:18999", "overlap": overlap_mode},
    }
    return config_mod.load(write_config(tmp / "vsup.toml", sections))


# ---- the pure fit -----------------------------------------------------------------------------


def test_gpu_fit_when_every_used_gpu_has_the_asked_share_free():
    """Two 80 GiB GPUs, the old server holding 40 GiB of each: a new one at 0.45 fits, at 0.9 not."""
    g, _nvml, _ = open_fake([FakeDevice(used=40 * GIB, uuid="G0"), FakeDevice(used=40 * GIB, uuid="G1")], {})
    snap = g.snapshot()
    assert overlap.gpu_fit(snap, None, 0.45).ok
    no = overlap.gpu_fit(snap, None, 0.9)
    assert not no.ok
    assert "GPU 0: 40960 MiB free < 73728 MiB asked" in no.reason


def test_gpu_fit_looks_only_at_the_new_servers_visible_devices():
    """GPUs 0 and 1 full of the old model, 2 and 3 empty: CUDA_VISIBLE_DEVICES=2,3 fits at 0.9."""
    devs = [FakeDevice(used=75 * GIB, uuid=f"G{i}") if i < 2 else FakeDevice(uuid=f"G{i}") for i in range(4)]
    g, _nvml, _ = open_fake(devs, {})
    snap = g.snapshot()
    assert overlap.gpu_fit(snap, {2, 3}, 0.9).ok
    assert not overlap.gpu_fit(snap, None, 0.9).ok
    assert not overlap.gpu_fit(snap, {7}, 0.5).ok  # names no GPU here: cannot show it fits


def test_cpu_fit_counts_kv_per_worker_weights_and_a_margin_per_process():
    """TP=2, 1 GiB KV each, 1 GiB weights: 2 + 1 + 4 (margin, 4 processes) = 7 GiB needed."""
    kw = {"total": 64 * GIB, "kv_per_worker": GIB, "weights": GIB, "tp": 2}
    ok = overlap.cpu_fit(available=7 * GIB, **kw)
    assert ok.ok and ok.detail["need_mib"] == 7 * 1024
    no = overlap.cpu_fit(available=7 * GIB - 1, **kw)
    assert not no.ok and "available < 7168 MiB" in no.reason


def test_cpu_fit_refuses_what_it_cannot_measure():
    """KV cache left to vLLM (0.92 of memory) never fits twice; unknown weights cannot be shown to fit."""
    no_kv = overlap.cpu_fit(available=60 * GIB, total=64 * GIB, kv_per_worker=None, weights=GIB, tp=1)
    assert not no_kv.ok and "VLLM_CPU_KVCACHE_SPACE unset" in no_kv.reason
    no_w = overlap.cpu_fit(available=60 * GIB, total=64 * GIB, kv_per_worker=GIB, weights=None, tp=1)
    assert not no_w.ok and "model size unknown" in no_w.reason


def test_argument_readers_follow_vllms_rules():
    """The last flag wins, `--flag=value` counts, VLLM_CPU_KVCACHE_SPACE overrides the bytes flag."""
    assert overlap.tp_size(["-tp", "2"]) == 2
    assert overlap.tp_size(["--tensor-parallel-size=4", "-tp", "2"]) == 2
    assert overlap.gpu_util([]) == overlap.DEFAULT_GPU_UTIL
    assert overlap.gpu_util(["--gpu-memory-utilization=0.4"]) == 0.4
    assert overlap.cpu_kv_bytes(["--kv-cache-memory-bytes", "2G"], {}) == 2_000_000_000
    assert overlap.cpu_kv_bytes(["--kv-cache-memory-bytes", "2G"], {"VLLM_CPU_KVCACHE_SPACE": "3"}) == 3 * GIB
    assert overlap.cpu_kv_bytes([], {"VLLM_CPU_KVCACHE_SPACE": ""}) is None


# ---- decide: the numbers gathered from the config, NVML and meminfo ------------------------------


def test_decide_on_cpu_uses_meminfo_and_the_model_dirs_safetensors(tmp_path):
    """The new model's own env and args count (b's KV space, its TP) with the host's MemAvailable."""
    cfg = _config(tmp_path)
    host = FakeHost()
    spec = cfg.model_spec("b")
    host.add_file(f"{spec.model}/model-00001.safetensors", 200 << 20)
    host.add_file(f"{spec.model}/model-00002.safetensors", 100 << 20)
    host.add_file(f"{spec.model}/tokenizer.json", 5 << 20)
    fit = overlap.decide(cfg, spec, [], None, host)
    assert fit.ok, fit.reason
    assert fit.detail["weights_mib"] == 300 and fit.detail["kv_mib"] == 2048 and fit.detail["tp"] == 2
    host.mem["MemAvailable"] = 3 * GIB
    small = overlap.decide(cfg, spec, [], None, host)
    assert not small.ok and "does not fit" in small.reason
    host.mem = {}
    assert not overlap.decide(cfg, spec, [], None, host).ok  # unreadable meminfo
    assert overlap.weights_bytes(str(tmp_path / "model-b"), Host()) == 300 << 20  # the real seam
    assert overlap.weights_bytes("org/hub-name", Host()) is None


def test_decide_with_nvml_uses_the_new_servers_cuda_visible_devices(tmp_path):
    """[models.b] on GPUs 2,3 at 0.9 beside [vllm] filling 0 and 1: fits; on all GPUs it does not."""
    cfg = _config(tmp_path, b_args=["--gpu-memory-utilization", "0.9"], b_env={"CUDA_VISIBLE_DEVICES": "2,3"})
    devs = [FakeDevice(used=75 * GIB, uuid=f"G{i}") if i < 2 else FakeDevice(uuid=f"G{i}") for i in range(4)]
    g, nvml, _ = open_fake(devs, {})
    fit = overlap.decide(cfg, cfg.model_spec("b"), [], g, FakeHost())
    assert fit.ok, fit.reason
    assert set(fit.detail["gpus"]) == {"2", "3"}
    cfg2 = _config(tmp_path / "all", b_args=["--gpu-memory-utilization", "0.9"])
    assert not overlap.decide(cfg2, cfg2.model_spec("b"), [], g, FakeHost()).ok
    nvml.fail_reads = 5
    broken = overlap.decide(cfg, cfg.model_spec("b"), [], g, FakeHost())
    assert not broken.ok and "not readable" in broken.reason


def test_decide_says_never_unless_auto(tmp_path):
    cfg = _config(tmp_path, overlap_mode="never")
    assert cfg.proxy is not None and cfg.proxy.overlap == "never"
    assert overlap.decide(cfg, cfg.model_spec("b"), [], None, FakeHost()).reason == (
        "[proxy] overlap is not auto"
    )


def test_overlap_defaults_to_never_and_rejects_other_values(tmp_path):
    sections = {
        "vllm": {"python": sys.executable, "model": "m", "log_file": str(tmp_path / "l")},
        "daemon": {"state_dir": str(tmp_path / "s")},
        "proxy": {"listen": "127.0.0.1:18998"},
    }
    cfg = config_mod.load(write_config(tmp_path / "a.toml", sections))
    assert cfg.proxy is not None and cfg.proxy.overlap == "never"
    sections["proxy"]["overlap"] = "always"
    try:
        config_mod.load(write_config(tmp_path / "b.toml", sections))
    except config_mod.ConfigError as e:
        assert "overlap" in str(e)
    else:
        raise AssertionError("overlap = 'always' was accepted")
    assert "overlap = 'never'" in config_mod.explain()


# ---- launch support: own port, own TMPDIR ---------------------------------------------------------


def test_free_port_is_bindable_on_loopback():
    port = overlap.free_port("127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_command_takes_the_trees_own_port(tmp_path):
    cfg = _config(tmp_path)
    argv, _ = launch.command(cfg, cfg.model_spec("b"), [], port=41234)
    assert argv[argv.index("--port") + 1] == "41234"
    argv, _ = launch.command(cfg, cfg.model_spec("b"), [])
    assert argv[argv.index("--port") + 1] == "8999"


def test_private_tmp_gets_its_own_tmpdir_even_under_a_configured_one(tmp_path):
    """A configured TMPDIR is shared by sequential trees; an overlapped one gets a directory of
    its own inside it (recorded in the tree, so its cleanup removes it and nothing of the other)."""
    base = tmp_path / "cfgtmp"
    base.mkdir()
    argv = [sys.executable, "-c", "import os; print(os.environ['TMPDIR'])"]
    env = {"PATH": "/usr/bin:/bin", "TMPDIR": str(base)}
    sp = launch.RealSpawner()
    shared = sp.spawn(argv, env, tmp_path / "a.log", model="m", port=1)
    own = sp.spawn(argv, env, tmp_path / "b.log", model="m", port=2, private_tmp=True)
    for s in (shared, own):
        assert s.handle is not None
        s.handle.wait(10)
    assert (tmp_path / "a.log").read_text().strip() == str(base)
    tree_tmp = (tmp_path / "b.log").read_text().strip()
    assert Path(tree_tmp).parent == base and tree_tmp in own.tree.files
    assert shared.tree.files == []
    subprocess.run(["rm", "-rf", tree_tmp], check=True)


def test_ledger_keeps_both_trees_of_an_overlap(tmp_path):
    """Old and new trees are two records; removing the old leaves the new."""

    def rec(tid: str, pid: int) -> TreeRecord:
        return TreeRecord(tid, "m", 8000 + pid, 1.0, ProcRef(pid, 1.0, "python", []), pid, pid)

    led = Ledger(tmp_path)
    a, b = rec("old", 100), rec("new", 200)
    led.upsert(a)
    led.upsert(b)
    assert [r.id for r in led.load()] == ["old", "new"]
    led.remove("old")
    assert [r.id for r in led.load()] == ["new"]


# ---- the proxy's route switch ---------------------------------------------------------------------


def test_route_switch_sends_new_requests_to_the_new_server_while_the_old_finishes() -> None:
    """The owner's switch (issue 23): a route naming the new server's port and generation. A stream
    in flight on the old server runs to its end; requests from then on go to the new one; the
    old one's in-flight count (what the drain waits for) reaches 0."""
    old, new = Fake(token_s="0.05"), Fake()  # noqa: S106 - seconds per token, not a secret

    async def main() -> None:
        # the overlap: `reloading`, the old server still routed: /health stays 200 (a balancer
        # keeps sending this replica traffic); without a routed server, 503 as before
        overlap = Route(
            state="reloading", reason="reload", upstream=old.upstream, gen=1, hold=True, model="tiny"
        )
        async with running(overlap) as h:
            async with h.session.get(h.base + "/health") as r:
                assert r.status == 200 and (await r.json())["state"] == "reloading"
            h.gate.publish(Route(state="reloading", reason="old one down", hold=True, model="tiny"))
            async with h.session.get(h.base + "/health") as r:
                assert r.status == 503
            h.gate.publish(ready(old, gen=1))
            body = {"model": "tiny", "messages": [], "max_tokens": 30, "stream": True}
            r = await h.session.post(h.base + "/v1/chat/completions", json=body)
            await r.content.readuntil(b"\n\n")
            assert h.proxy.in_flight(1) == 1
            h.gate.publish(ready(new, gen=2))  # the canary proved the new server
            for _ in range(3):
                async with await h.chat() as n:
                    assert n.status == 200
            assert new.stats()["completed"] == 3
            assert h.proxy.in_flight(1) == 1  # the old one's stream still runs
            events = await sse_events(r)
            assert events[-1] == "[DONE]" and len(events) == 30
            await h.until(lambda: h.proxy.in_flight(1) == 0, "the old server's stream to finish")
            assert old.stats()["completed"] == 1 and old.stats()["requests"] == 1
            assert "proxy_cut" not in h.names() and "proxy_replay" not in h.names()

    try:
        run(main())
    finally:
        old.kill()
        new.kill()


def test_autogroup_nice_reads_and_sets_a_sessions_share() -> None:
    """Host.autogroup_nice on a child in its own session: the value before, then the new one."""
    p = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        h = Host()
        before = h.autogroup_nice(p.pid)
        if before is None:  # a kernel without CONFIG_SCHED_AUTOGROUP: nothing to set
            return
        assert h.autogroup_nice(p.pid, 10) == before
        assert h.autogroup_nice(p.pid) == 10
    finally:
        p.kill()
        p.wait()
    assert Host().autogroup_nice(p.pid) is None  # gone


def test_the_cli_line_of_a_reload_names_its_phases_or_the_switch() -> None:
    """`vsup reload`'s last line: a sequential reload lists its phases; an overlapped one has
    none (the old server served until the switch) and says when it switched, with no empty
    list after a semicolon."""
    from vsup.cli import _summary

    seq = {"model": "b", "seconds": 40.04, "phases": {"drain": 0.1, "ready": 39.0}}
    assert _summary("reload", seq) == "reload: b serves (40.0s; drain at 0.1s, ready at 39.0s)"
    ovl = {"model": "b", "seconds": 83.137, "overlapped": True, "switched_at_s": 81.844}
    assert _summary("reload", ovl) == "reload: b serves (83.1s; overlapped, switched at 81.8s)"
    assert _summary("reload", {"model": "b", "seconds": 1.0}) == "reload: b serves (1.0s)"
