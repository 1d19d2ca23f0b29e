"""Acceptance against the real vLLM V0 engine: vLLM 0.8.5 CPU build, `VLLM_USE_V1=0`, `-tp 2`.

The seed incident's own architecture (vLLM 0.6.3): the API server spawns the resource_tracker and
the MQLLMEngine process (ZMQ RPC), which spawns a VllmWorkerProcess per extra TP rank (rank 0
runs inside the engine). Nothing of it sets a process title: engine and worker are both
`python -B -c "from multiprocessing.spawn import spawn_main; ..." --multiprocessing-fork`, told
apart by their parent; the names exist only in the log ("Started engine process with PID N",
`(VllmWorkerProcess pid=N)`). Set up by scripts/setup_vllm_v0.sh (README, "Operators on an old
vLLM").

One daemon serves the module, as in test_real_vllm.py: each test injects a real fault into the
tree the daemon runs and asserts on what is left (processes, /dev/shm, /tmp), then the next
waits for `ready`. The last test starts a V0 server without vsup, kills its API server and
asks the foreign cleanup to find the untitled orphans.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from fakes.trees import ScopedHost, kill_session, session_pids, unlink_quiet
from support import CACHE, REAL_ARGS, REAL_ENV, Daemon, alive, free_port, real_sections, wait_for
from test_real_vllm import assert_tree_gone
from vsup import proctree
from vsup.cleanup import cleanup, port_holder
from vsup.host import Host

pytestmark = pytest.mark.vllm

V0_VERSION = "0.8.5.post2"
V0_PY = CACHE / f"vllm-{V0_VERSION}" / "bin" / "python"
V0_MODELS = CACHE / "models-v0"
V0_ENV = {**REAL_ENV, "VLLM_USE_V1": "0"}
READY_S = 300


def require_v0() -> None:
    missing = [str(p) for p in (V0_PY, V0_MODELS / "tiny-a" / "config.json") if not p.exists()]
    if missing:
        pytest.fail(
            f"vLLM V0 not set up ({', '.join(missing)} missing): run scripts/setup_vllm_v0.sh --models"
        )


def v0_sections(port: int) -> dict[str, dict[str, Any]]:
    s = real_sections(port)
    s["vllm"].update(python=str(V0_PY), model=str(V0_MODELS / "tiny-a"), env=dict(V0_ENV))
    # the first request of a fresh V0 tree compiles CPU kernels (28 s here on a quiet machine)
    s["timeouts"].update(start_s=float(READY_S), first_canary_s=120.0)
    s["models.tiny-b"] = {"model": str(V0_MODELS / "tiny-b"), "served_model_name": "tiny-b"}
    return s


@pytest.fixture(scope="module")
def v0(tmp_path_factory: pytest.TempPathFactory):
    require_v0()
    d = Daemon(tmp_path_factory.mktemp("v0"), v0_sections(free_port(8000, 8049)))
    try:
        d.start()
        yield d
    finally:
        d.close()


# ---- the V0 tree, told apart without titles ---------------------------------------------------
def _cmd(p: proctree.ProcRef) -> str:
    return " ".join(p.cmdline)


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def current_tree(d: Daemon) -> proctree.TreeRecord:
    s = d.status()
    recs = [r for r in proctree.Ledger(d.state_dir).load() if r.id == s["tree"]["id"]]
    assert recs, "the live tree is in the ledger"
    return recs[0]


def v0_roles(rec: proctree.TreeRecord) -> dict[str, int]:
    """api (the leader), tracker and engine (its children), worker (the engine's spawn child)."""
    live = [p for p in rec.procs if alive(p.pid)]
    spawned = [p.pid for p in live if "multiprocessing.spawn" in _cmd(p)]
    roles = {"api": rec.leader.pid}
    for p in live:
        if "multiprocessing.resource_tracker" in _cmd(p) and _ppid(p.pid) == rec.leader.pid:
            roles["tracker"] = p.pid
    engines = [pid for pid in spawned if _ppid(pid) == rec.leader.pid]
    if len(engines) == 1:
        roles["engine"] = engines[0]
        workers = [pid for pid in spawned if _ppid(pid) == engines[0]]
        if len(workers) == 1:
            roles["worker"] = workers[0]
    return roles


def wait_tree_complete(d: Daemon) -> tuple[proctree.TreeRecord, dict[str, int]]:
    """Until the record lists tracker, engine and worker, and segments and semaphores they hold."""

    def ok() -> tuple[proctree.TreeRecord, dict[str, int]] | None:
        rec = current_tree(d)
        roles = v0_roles(rec)
        names = [i.name for i in rec.ipc]
        complete = {"tracker", "engine", "worker"} <= set(roles)
        shm = any(n.startswith("psm_") for n in names) and any(n.startswith("sem.mp-") for n in names)
        return (rec, roles) if complete and shm else None

    return wait_for(ok, 30, "the record to list tracker, MQLLMEngine, worker, segments, semaphores", 0.5)


def restarted(d: Daemon, before: dict[str, Any], timeout: float = READY_S) -> dict[str, Any]:
    return wait_for(
        lambda: (s := d.status())["restarts"] > before["restarts"] and s["state"] == "ready" and s,
        timeout,
        "an automatic restart to ready",
        0.5,
    )


def chat(port: int | str, model: str, timeout: float = 60) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        trust_env=False,
        timeout=timeout,
        json={"model": model, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4},
    )


def _ts(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# ---- under vsup -------------------------------------------------------------------------------
def test_v0_ready_by_canary_and_the_tree_is_the_v0_one(v0: Daemon) -> None:
    """Ready only after the canary; the tree is API server -> tracker + MQLLMEngine -> worker,
    the log names the same pids, and the record holds their segments and semaphores."""
    s = v0.wait_state("ready", timeout=READY_S)
    evs = v0.events()
    canary = next(
        i for i, e in enumerate(evs) if e["event"] == "probe" and e.get("probe") == "canary" and e["ok"]
    )
    ready = next(i for i, e in enumerate(evs) if e["event"] == "state" and e["state"] == "ready")
    assert canary < ready
    r = chat(v0.port, s["model"])
    assert r.status_code == 200 and r.json()["choices"]
    rec, roles = wait_tree_complete(v0)
    log = v0.log_file.read_text(errors="replace")
    assert "Initializing a V0 LLM engine" in log
    assert f"Started engine process with PID {roles['engine']}" in log
    assert f"(VllmWorkerProcess pid={roles['worker']})" in log
    titles = [_cmd(p) for p in rec.procs if alive(p.pid)]
    assert not any("VLLM::" in t or "VllmWorkerProcess" in t for t in titles), titles


def test_v0_sigkill_worker_detected_from_log_and_recovered(v0: Daemon) -> None:
    """SIGKILL of the VllmWorkerProcess: the engine's 'Worker VllmWorkerProcess pid N died' line
    is a detection within 5 s; the tree is torn down and a new one serves."""
    before = v0.wait_state("ready", timeout=READY_S)
    rec, roles = wait_tree_complete(v0)
    n = len(v0.events())
    t_kill = time.time()
    os.kill(roles["worker"], signal.SIGKILL)
    det = v0.wait_event(
        lambda e: e["event"] == "detection" and e.get("source") == "log", 30, "a log detection", after=n
    )
    assert det["kind"] == "worker_died", det
    assert _ts(det["ts"]) - t_kill < 5.0, f"detected {_ts(det['ts']) - t_kill:.1f}s after the kill"
    s = restarted(v0, before)
    assert_tree_gone(rec)
    assert chat(v0.port, s["model"]).status_code == 200


def test_v0_sigkill_engine_orphaned_worker_killed_and_restart(v0: Daemon) -> None:
    """SIGKILL of the MQLLMEngine: the API server's heartbeat logs 'Engine process (pid N) died'
    and the server exits 0, but the VllmWorkerProcess has no parent-death watch and lives on
    (ppid 1, beside the tracker; V1 workers exit by themselves). vsup detects the death from
    the log, kills the orphan and restarts."""
    before = v0.wait_state("ready", timeout=READY_S)
    rec, roles = wait_tree_complete(v0)
    n = len(v0.events())
    os.kill(roles["engine"], signal.SIGKILL)
    det = v0.wait_event(
        lambda e: e["event"] == "detection" and e.get("source") == "log", 30, "a log detection", after=n
    )
    assert det["kind"] == "engine_dead" and f"pid {roles['engine']}" in det["message"], det
    s = restarted(v0, before)
    assert_tree_gone(rec)
    teardown = next(e for e in v0.events()[n:] if e["event"] == "cleanup" and e.get("why") == "teardown")
    how = {k["pid"]: k["how"] for k in teardown["killed"]}
    assert how.get(roles["worker"]) in ("SIGTERM", "SIGKILL"), (roles, teardown["killed"])
    assert chat(v0.port, s["model"]).status_code == 200


def test_v0_sigstop_worker_hang_detected_and_recovered(v0: Daemon) -> None:
    """SIGSTOP of the VllmWorkerProcess: /health stays 200 and 0.8.5 logs its stall line only at
    DEBUG (and here not even then, in 75 s: the engine seems to wait in the all-reduce, not on the ring), so
    the canary finds it: unhealthy, confirmed, torn down, serving again. How soon is printed, not
    asserted (speed is the bench's hang section): with these tests' probes (canary every 8 s, an
    8 s deadline) and no stack proof on V0, strikes confirm by count once they have lasted
    policy.UNPROVEN_CONFIRM_S, 36-53 s after the SIGSTOP depending on where in the canary's cycle it
    fell (52.8 s in one CI run, which a fixed 40 s bound here failed)."""
    before = v0.wait_state("ready", timeout=READY_S)
    rec, roles = wait_tree_complete(v0)
    n = len(v0.events())
    t_stop = time.time()
    os.kill(roles["worker"], signal.SIGSTOP)
    try:
        ev = v0.wait_event(
            lambda e: e["event"] == "state" and e["state"] == "stopping", 120, "teardown", after=n
        )
        print(f"V0 worker SIGSTOP: teardown began {_ts(ev['ts']) - t_stop:.1f} s after the fault")
        assert "hang confirmed" in ev["reason"], ev
        states = [e["state"] for e in v0.events()[n:] if e["event"] == "state"]
        assert states.index("unhealthy") < states.index("stopping")
        s = restarted(v0, before)
        assert chat(v0.port, s["model"]).status_code == 200
        assert_tree_gone(rec)
    finally:
        for p in rec.procs:  # never leave a stopped process behind
            if alive(p.pid):
                os.kill(p.pid, signal.SIGCONT)


def test_v0_sigkill_api_server_orphans_killed_and_restart(v0: Daemon) -> None:
    """SIGKILL of the API server: the orphaned MQLLMEngine and VllmWorkerProcess (and the
    resource_tracker) are gone, with their segments and semaphores, and a new tree serves."""
    before = v0.wait_state("ready", timeout=READY_S)
    rec, roles = wait_tree_complete(v0)
    held = {i.name for i in rec.ipc}
    os.kill(roles["api"], signal.SIGKILL)
    s = restarted(v0, before)
    assert_tree_gone(rec)
    teardown = [e for e in v0.events() if e["event"] == "cleanup" and e.get("why") == "teardown"][-1]
    assert teardown["remaining"] == [], teardown
    killed = {k["pid"] for k in teardown["killed"]}
    assert {roles["engine"], roles["worker"]} <= killed, (roles, teardown["killed"])
    assert any(n.startswith("psm_") for n in held) and any(n.startswith("sem.mp-") for n in held), held
    assert chat(v0.port, s["model"]).status_code == 200


def test_v0_reload_to_b(v0: Daemon) -> None:
    """`vsup reload tiny-b` on V0: tiny-b serves, nothing of tiny-a's tree remains."""
    v0.wait_state("ready", timeout=READY_S)
    rec, _ = wait_tree_complete(v0)
    r = v0.cli("reload", "tiny-b", timeout=READY_S + 60)
    assert r.returncode == 0, r.stderr
    models = httpx.get(f"http://127.0.0.1:{v0.port}/v1/models", trust_env=False).json()
    assert [m["id"] for m in models["data"]] == ["tiny-b"]
    assert chat(v0.port, "tiny-b").status_code == 200
    assert_tree_gone(rec)


def test_v0_stop_leaves_nothing(v0: Daemon) -> None:
    """`vsup stop`: no process, segment, semaphore or file of the V0 tree remains."""
    v0.wait_state("ready", timeout=READY_S)
    rec, _ = wait_tree_complete(v0)
    r = v0.cli("stop", timeout=120)
    assert r.returncode == 0, r.stderr
    assert v0.status()["state"] == "stopped"
    assert_tree_gone(rec)


# ---- without vsup: the foreign cleanup must recognise untitled V0 orphans -----------------------
def test_v0_foreign_cleanup_finds_untitled_orphans(tmp_path: Path) -> None:
    """A V0 server vsup never started loses its API server (SIGKILL): MQLLMEngine, worker and
    tracker live on with ppid 1 and no title. `cleanup(foreign=True)` finds them by the vLLM
    extension they map, kills them and leaves none of their segments or semaphores."""
    require_v0()
    port = free_port(8200, 8249)
    # Its own short TMPDIR: vLLM puts its ZMQ ipc sockets there, and a Unix socket path has 107
    # bytes at most (pytest's default tmp_path made V0 fail at start with "File name too long").
    tmpdir = tempfile.mkdtemp(prefix="v0f-", dir="/tmp")
    env = {**os.environ, **V0_ENV, "TMPDIR": tmpdir}
    argv = [str(V0_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(V0_MODELS / "tiny-a")]
    argv += [*REAL_ARGS, "--host", "127.0.0.1", "--port", str(port)]
    log = tmp_path / "vllm.log"
    with open(log, "ab") as f:
        popen = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    sid = popen.pid
    shm: set[str] = set()
    try:

        def up() -> bool:
            if popen.poll() is not None:
                raise AssertionError(f"vLLM exited {popen.returncode}:\n{log.read_text()[-3000:]}")
            try:
                return (
                    httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False, timeout=2).status_code
                    == 200
                )
            except httpx.HTTPError:
                return False

        wait_for(up, READY_S, "the V0 server's /health", interval=1.0)
        m = re.search(r"Started engine process with PID (\d+)", log.read_text(errors="replace"))
        assert m, "the V0 API server names its engine process"
        engine = int(m.group(1))
        pids = session_pids(sid)
        host = Host()
        held = set()
        for pid in pids:
            h = host.holdings(pid)
            held |= {p.rsplit("/", 1)[-1] for p in (h.files.values() if h else ()) if "(deleted)" not in p}
        shm = {n for n in held if n.startswith(("psm_", "sem.mp-"))}
        assert any(n.startswith("psm_") for n in shm), held

        os.kill(sid, signal.SIGKILL)
        popen.wait(30)
        orphans = [p for p in session_pids(sid) if alive(p)]
        assert engine in orphans and len(orphans) == 3, (orphans, engine)  # engine, worker, tracker
        wait_for(lambda: port_holder(port) is None, 10, "the port free after the API server's death")

        dry = cleanup([], foreign=True, dry_run=True)  # the whole host, changing nothing
        assert set(orphans) <= {k["pid"] for k in dry.killed}, (orphans, dry.killed)

        scoped = ScopedHost({sid}, shm_allow=shm.__contains__)
        rep = cleanup([], foreign=True, host=scoped)
        assert rep.clean, rep.remaining
        assert {k["pid"] for k in rep.killed} == set(orphans)
        assert not any(alive(p) for p in orphans)
        left = {n for n in shm if os.path.exists(f"/dev/shm/{n}")}
        assert not left, left
    finally:
        kill_session(sid)
        try:
            popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        wait_for(lambda: not any(alive(p) for p in session_pids(sid)), 30, "the server's session gone")
        for n in shm:  # what the test's own server made, if the cleanup under test left it
            unlink_quiet(f"/dev/shm/{n}")
        shutil.rmtree(tmpdir, ignore_errors=True)
