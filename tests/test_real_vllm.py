"""Acceptance against the real vLLM 0.32 CPU server with -tp 2 (API server, engine core, 2 workers).

One daemon serves the module; the tests run in file order and each injects a real fault,
then asserts on what is left on the machine: processes, /dev/shm segments and semaphores,
/tmp/vllm_dist_* and ZMQ socket files of the tree the fault hit. A real start costs ~40 s on
two cores, so the faults share the server and each test begins by waiting for `ready`.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest

from support import Daemon, alive, free_port, real_sections, require_real_vllm, wait_for
from vsup import proctree

pytestmark = pytest.mark.vllm

READY_S = 240


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory):
    require_real_vllm()
    tmp = tmp_path_factory.mktemp("real")
    port = free_port(8000, 8049)
    from support import MODELS

    sections = real_sections(port)
    # room for long generations, so a reload really has requests in flight to drain
    sections["vllm"]["args"] = [a if a != "256" else "1024" for a in sections["vllm"]["args"]]
    sections["models.tiny-b"] = {"model": str(MODELS / "tiny-b"), "served_model_name": "tiny-b"}
    sections["models.tiny-a"] = {"model": str(MODELS / "tiny-a"), "served_model_name": "tiny-a"}
    sections["models.broken"] = {"model": str(MODELS / "tiny-broken"), "served_model_name": "broken"}
    d = Daemon(tmp, sections)
    try:
        d.start()
        yield d
    finally:
        d.close()


def chat(d: Daemon, model: str, max_tokens: int = 4, timeout: float = 60) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{d.port}/v1/chat/completions",
        trust_env=False,
        timeout=timeout,
        json={"model": model, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": max_tokens},
    )


class Supervised(Protocol):
    """What these helpers read of a vsup under test (support.Daemon, test_pid1.Pid1)."""

    state_dir: Path

    def status(self) -> dict[str, Any]: ...


def current_tree(d: Supervised) -> proctree.TreeRecord:
    """The live tree's record as the daemon wrote it (members, held IPC, files)."""
    s = d.status()
    recs = [r for r in proctree.Ledger(d.state_dir).load() if r.id == s["tree"]["id"]]
    assert recs, "the live tree is in the ledger"
    return recs[0]


def wait_tree_complete(d: Supervised) -> proctree.TreeRecord:
    """Wait until the record shows the engine core, both workers and their shm segments."""

    def ok() -> proctree.TreeRecord | None:
        rec = current_tree(d)
        titles = " ".join(_cmdline(p.pid) for p in rec.procs)
        shm = [i for i in rec.ipc if i.name.startswith("psm_")]
        return rec if ("VLLM::EngineCore" in titles and "Worker_TP1" in titles and shm) else None

    return wait_for(ok, 30, "the tree record to list engine core, workers and segments", 0.5)


def pid_titled(rec: proctree.TreeRecord, title: str) -> int:
    for p in rec.procs:  # the record keeps the first-seen command line; titles come later
        if alive(p.pid) and title in _cmdline(p.pid):
            return p.pid
    raise AssertionError(f"no live {title} in {[(p.pid, p.cmdline[:1]) for p in rec.procs]}")


def assert_tree_gone(rec: proctree.TreeRecord) -> None:
    """Nothing of this tree remains: processes, /dev/shm objects (by inode), /tmp files."""
    live = [(p.pid, p.cmdline[:1]) for p in rec.procs if alive(p.pid)]
    assert not live, f"processes of the old tree still alive: {live}"
    left = []
    for i in rec.ipc:
        try:
            st = os.stat(f"/dev/shm/{i.name}")
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) == (i.dev, i.ino):
            left.append(i.name)
    assert not left, f"IPC objects of the old tree remain: {left}"
    files = [f for f in rec.files if os.path.lexists(f)]
    assert not files, f"files of the old tree remain: {files}"


def restarted(d: Daemon, before: dict[str, Any], timeout: float = READY_S) -> dict[str, Any]:
    return wait_for(
        lambda: (s := d.status())["restarts"] > before["restarts"] and s["state"] == "ready" and s,
        timeout,
        "an automatic restart to ready",
        0.5,
    )


def test_ready_only_after_canary_and_serves(real: Daemon) -> None:
    """The real TP=2 server becomes `ready` only after the canary; a completion then works."""
    s = real.wait_state("ready", timeout=READY_S)
    evs = real.events()
    canary = next(
        i for i, e in enumerate(evs) if e["event"] == "probe" and e.get("probe") == "canary" and e["ok"]
    )
    ready = next(i for i, e in enumerate(evs) if e["event"] == "state" and e["state"] == "ready")
    assert canary < ready
    r = chat(real, s["model"])
    assert r.status_code == 200 and r.json()["choices"]
    rec = wait_tree_complete(real)
    assert any(i.name.startswith("sem.mp-") for i in rec.ipc), (
        "semaphores recorded via the (deleted) inode match"
    )


def test_sigkill_engine_core_restarts(real: Daemon) -> None:
    """SIGKILL of VLLM::EngineCore: the server exits, vsup restarts it, `restarts` goes up, nothing old remains."""
    before = real.wait_state("ready", timeout=READY_S)
    rec = wait_tree_complete(real)
    os.kill(pid_titled(rec, "VLLM::EngineCore"), signal.SIGKILL)
    s = restarted(real, before)
    assert s["restarts"] == before["restarts"] + 1
    assert_tree_gone(rec)
    assert chat(real, s["model"]).status_code == 200


def test_sigkill_api_server_cleans_orphans_and_restarts(real: Daemon) -> None:
    """SIGKILL of the API server: the orphaned engine core and workers, their segments, semaphores,
    dist store and ZMQ sockets are all gone after vsup's restart."""
    before = real.wait_state("ready", timeout=READY_S)
    rec = wait_tree_complete(real)
    # vsup gives each tree a private TMPDIR: the dist store and the ZMQ sockets land in it, so
    # they are attributed exactly, even beside other vLLM servers.
    tree_tmp = [f for f in rec.files if Path(f).name.startswith("vsup-tree-")]
    assert len(tree_tmp) == 1, rec.files
    inside = os.listdir(tree_tmp[0])
    assert any(n.startswith("vllm_dist_") for n in inside), inside
    # torch's compile cache and precompiled headers stay shared (a link to where a bare vLLM
    # keeps them): rebuilding them under every fresh TMPDIR cost seconds on each start.
    links = [n for n in inside if n.startswith("torchinductor_")]
    assert len(links) == 1 and os.path.islink(os.path.join(tree_tmp[0], links[0])), inside
    shared = os.readlink(os.path.join(tree_tmp[0], links[0]))
    assert Path(shared, "precompiled_headers").is_dir()
    os.kill(rec.leader.pid, signal.SIGKILL)
    s = restarted(real, before)
    assert_tree_gone(rec)
    assert not os.path.exists(tree_tmp[0]) and Path(shared, "precompiled_headers").is_dir()
    cleanups = [e for e in real.events() if e["event"] == "cleanup" and e.get("why") == "teardown"]
    assert cleanups[-1]["remaining"] == []
    assert chat(real, s["model"]).status_code == 200


def test_sigkill_worker_detected_from_log_within_5s(real: Daemon) -> None:
    """SIGKILL of a worker: engine death is detected from the log within 5 s, then recovered."""
    before = real.wait_state("ready", timeout=READY_S)
    rec = wait_tree_complete(real)
    n = len(real.events())
    t_kill = time.time()
    os.kill(pid_titled(rec, "Worker_TP1"), signal.SIGKILL)
    det = real.wait_event(
        lambda e: e["event"] == "detection" and e.get("source") == "log", 30, "a log detection", after=n
    )
    assert det["kind"] in ("worker_died", "engine_dead"), det
    t_det = _ts(det["ts"])
    assert t_det - t_kill < 5.0, f"detected {t_det - t_kill:.1f}s after the kill"
    restarted(real, before)
    assert_tree_gone(rec)


def test_sigstop_worker_idle_recovers_within_30s(real: Daemon) -> None:
    """SIGSTOP of an idle worker (/health stays 200): unhealthy and recovery start within 30 s."""
    before = real.wait_state("ready", timeout=READY_S)
    rec = wait_tree_complete(real)
    n = len(real.events())
    t_stop = time.time()
    os.kill(pid_titled(rec, "Worker_TP1"), signal.SIGSTOP)
    try:
        ev = real.wait_event(
            lambda e: e["event"] == "state" and e["state"] == "stopping", 60, "teardown", after=n
        )
        assert _ts(ev["ts"]) - t_stop < 30.0, f"recovery began {_ts(ev['ts']) - t_stop:.1f}s after SIGSTOP"
        assert "hang confirmed" in ev["reason"]
        states = [e["state"] for e in real.events()[n:] if e["event"] == "state"]
        assert states.index("unhealthy") < states.index("stopping")
        s = restarted(real, before)
        assert chat(real, s["model"]).status_code == 200
        assert_tree_gone(rec)
    finally:
        for p in rec.procs:  # never leave a stopped process behind, whatever happened
            if alive(p.pid):
                os.kill(p.pid, signal.SIGCONT)


def test_sigstop_worker_with_request_in_flight_bounded_teardown(real: Daemon) -> None:
    """SIGSTOP with a request in flight: detected, and the teardown does not wait for the hung client."""
    before = real.wait_state("ready", timeout=READY_S)
    rec = wait_tree_complete(real)
    n = len(real.events())
    outcome: list[Any] = []

    def client() -> None:
        try:
            outcome.append(chat(real, before["model"], max_tokens=200, timeout=150).status_code)
        except httpx.HTTPError as e:
            outcome.append(type(e).__name__)

    t = threading.Thread(target=client)
    os.kill(pid_titled(rec, "Worker_TP1"), signal.SIGSTOP)
    t.start()
    try:
        teardown = real.wait_event(
            lambda e: e["event"] == "cleanup" and e.get("why") == "teardown",
            90,
            "the teardown's cleanup",
            after=n,
        )
        # bounded: the unhealthy grace (3 s) plus the cleanup engine's grace, not the client's 150 s
        assert teardown["seconds"] < 20, teardown
        restarted(real, before)
        t.join(160)
        assert outcome and outcome[0] != 200  # the hung request failed rather than hung forever
        assert_tree_gone(rec)
    finally:
        for p in rec.procs:
            if alive(p.pid):
                os.kill(p.pid, signal.SIGCONT)


def test_reload_to_b_serves_b_and_leaves_nothing_of_a(real: Daemon) -> None:
    """`vsup reload tiny-b`: /v1/models lists tiny-b, a completion works, nothing of a's tree remains."""
    real.wait_state("ready", timeout=READY_S)
    rec = wait_tree_complete(real)
    r = real.cli("reload", "tiny-b", timeout=READY_S + 60)
    assert r.returncode == 0, r.stderr
    assert "reload: tiny-b serves" in r.stdout
    models = httpx.get(f"http://127.0.0.1:{real.port}/v1/models", trust_env=False).json()
    assert [m["id"] for m in models["data"]] == ["tiny-b"]
    assert chat(real, "tiny-b").status_code == 200
    assert_tree_gone(rec)
    phases = [e["phase"] for e in real.events() if e["event"] == "reload_phase"]
    assert phases[-4:] == ["drain", "stop", "cleanup", "start"]


def test_reload_waits_for_the_request_in_flight(real: Daemon) -> None:
    """Reload with requests in flight: they complete (drain) before the old model stops."""
    s = real.wait_state("ready", timeout=READY_S)
    n = len(real.events())
    outcome: list[int] = []
    done_at: list[float] = []

    def client() -> None:
        # two requests back to back: the reload is asked for when the first round is done, so
        # the second round (~3 s of generation on this tiny model) is in flight
        for _ in range(2):
            r = httpx.post(
                f"http://127.0.0.1:{real.port}/v1/completions",
                trust_env=False,
                timeout=120,
                json={"model": s["model"], "prompt": "Once", "max_tokens": 1000, "ignore_eos": True},
            )
            done_at.append(time.time())
            outcome.append(r.status_code)

    clients = [threading.Thread(target=client) for _ in range(3)]
    for t in clients:
        t.start()
    wait_for(lambda: len(outcome) >= 3, 60, "the first round done", interval=0.02)
    target = "tiny-b" if s["model"] == "tiny-a" else "tiny-a"
    r = real.call("reload", {"model": target}, timeout=None)
    for t in clients:
        t.join(120)
    assert r["ok"], r
    assert outcome == [200] * 6, outcome  # none was cut off by the stop
    teardown = next(e for e in real.events()[n:] if e["event"] == "teardown")
    drained = next(e for e in real.events()[n:] if e["event"] == "drained")
    # the second round was still generating when the reload was asked for: only a drain that
    # waited for it lets every request finish before the teardown begins
    assert max(done_at) <= _ts(teardown["ts"]) + 0.5, (
        "the requests finished before the stop began",
        drained,
        max(done_at),
    )
    assert drained["ok"], drained


def test_reload_broken_rolls_back(real: Daemon) -> None:
    """`vsup reload broken` (dies at the canary): exit 1 with the root cause; the old model serves again;
    nothing of broken remains."""
    before = real.wait_state("ready", timeout=READY_S)
    n = len(real.events())
    r = real.cli("reload", "broken", timeout=2 * READY_S + 60)
    assert r.returncode == 1
    assert "head_dim=16" in r.stderr, r.stderr  # the worker's own exception, not the generic 500
    assert "rolled back" in r.stderr
    s = real.status()
    assert s["state"] == "ready" and s["model"] == before["model"]
    assert chat(real, before["model"]).status_code == 200
    broken_spawn = next(
        e for e in real.events()[n:] if e["event"] == "spawned" and "broken" in " ".join(e["argv"])
    )
    assert not alive(broken_spawn["pid"])
    for rec in proctree.Ledger(real.state_dir).load():
        assert rec.id == s["tree"]["id"], "only the live tree is left in the ledger"


def test_sigkill_vsup_then_restart_leaves_one_server(real: Daemon) -> None:
    """SIGKILL of vsup while serving, vsup started again: the old tree is removed first; one server runs."""
    real.wait_state("ready", timeout=READY_S)
    rec = wait_tree_complete(real)
    assert real.proc is not None
    real.proc.kill()
    real.proc.wait()
    assert alive(rec.leader.pid)
    real.start()
    s = real.wait_state("ready", timeout=READY_S)
    assert s["pid"] != rec.leader.pid
    assert_tree_gone(rec)
    servers = [p for p in _vllm_api_servers() if str(real.port) in p[1]]
    assert len(servers) == 1, servers


def test_stop_leaves_nothing(real: Daemon) -> None:
    """`vsup stop`: within the grace plus a few seconds, no process, segment or semaphore of the tree remains."""
    real.wait_state("ready", timeout=READY_S)
    rec = wait_tree_complete(real)
    t0 = time.monotonic()
    r = real.cli("stop", timeout=120)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 20 + 10
    assert real.status()["state"] == "stopped"
    assert_tree_gone(rec)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ts(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _running(d: Daemon) -> float:
    try:
        txt = httpx.get(f"http://127.0.0.1:{d.port}/metrics", trust_env=False, timeout=5).text
    except httpx.HTTPError:
        return 0
    from vsup.probes import parse_metrics

    p = parse_metrics(txt)
    return p.running if p else 0


def _vllm_api_servers() -> list[tuple[int, str]]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "vllm.entrypoints.openai.api_server" in cmd and alive(int(d.name)):
                out.append((int(d.name), cmd))
    return out


def test_dies_at_first_request_ladder_then_failed(tmp_path: Path) -> None:
    """head_dim 16 model: found by the canary before ready; the ladder is tried, then `failed` with the root cause."""
    require_real_vllm()

    port = free_port(8000, 8049)
    sections = real_sections(port, "tiny-broken", restart={"max_failures": 3})
    # log requests with their prompts (DEBUG), so the redaction of the incident bundle is tested
    sections["vllm"]["args"] = [*sections["vllm"]["args"], "--enable-log-requests"]
    sections["vllm"]["env"] = {**sections["vllm"]["env"], "VLLM_LOGGING_LEVEL": "DEBUG"}
    d = Daemon(tmp_path / "broken", sections)
    try:
        d.start()
        s = d.wait_state("failed", timeout=3 * READY_S)
        assert s["remedies"] == ["disable-custom-all-reduce", "nccl-p2p-disable"]
        assert "head_dim" in s["reason"], s["reason"]
        spawns = [e for e in d.events() if e["event"] == "spawned"]
        assert "--disable-custom-all-reduce" in spawns[1]["argv"]
        assert not any(e["event"] == "state" and e["state"] == "ready" for e in d.events())
        incidents = sorted((d.state_dir / "incidents").iterdir())
        assert len(incidents) == 3
        summary = json.loads((incidents[-1] / "incident.json").read_text())
        assert summary["findings"]["verdict"] in ("engine_dead", "startup_failed")
        assert "Say OK" in d.log_file.read_text(errors="replace"), "vLLM logged the canary prompt"
        for inc in incidents:
            assert "Say OK" not in (inc / "log_tail.txt").read_text(), "the prompt is redacted in the bundle"

    finally:
        d.close()
