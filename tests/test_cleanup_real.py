"""`cleanup(foreign=True)` against a real vLLM 0.32 TP=2 server that vsup did not start.

One real start (~45 s): the server is started by hand on port 8201, its API server SIGKILLed
(vllm-facts.md: the engine core, workers and resource_tracker live on with their psm_*,
sem.mp-* and cpushm segments), then the foreign cleanup must remove the orphans and what they
hold, count the bytes, find nothing on a second run, and leave every decoy alone.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from fakes.trees import (
    OTHER_USER,
    Decoy,
    FakeTree,
    OtherUserOrphan,
    ScopedHost,
    alive,
    kill_session,
    other_user_fixture,
    rand_name,
    session_pids,
    unlink_quiet,
    wait_for,
)
from vsup.cleanup import cleanup, port_holder
from vsup.host import Host
from vsup.proctree import DIST_FILE, ZMQ_SOCKET, ProcRef, TreeRecord, refresh

pytestmark = pytest.mark.vllm
other_user = other_user_fixture()

VLLM_PY = Path.home() / ".cache/vsup/vllm-0.32.0/bin/python"
MODEL = Path.home() / ".cache/vsup/models/tiny-a"
PORT = 8201
READY_TIMEOUT_S = 240.0  # ~45 s on 2 idle cores; other engineers' servers share the cores


def healthy() -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def tree_holdings(host: Host, pids: list[int]) -> tuple[set[str], set[str]]:
    """Names in /dev/shm and in /tmp that these processes map, hold open or listen on."""
    keys, socks = set(), set()
    for pid in pids:
        h = host.holdings(pid)
        if h:
            keys |= set(h.files)
            socks |= h.sockets
    shm = set()
    for name in os.listdir("/dev/shm"):
        st = host.stat(f"/dev/shm/{name}")
        if st and (st.dev, st.ino) in keys:
            shm.add(name)
    tmp = {Path(p).name for ino, p in host.unix_sockets().items() if ino in socks}
    return shm, tmp


@pytest.fixture
def real_server(tmp_path):
    if not VLLM_PY.exists() or not (MODEL / "config.json").exists():
        pytest.fail(f"real vLLM test needs {VLLM_PY} and {MODEL} (scripts/setup_vllm.sh)")
    if port_holder(PORT) is not None:
        pytest.fail(f"port {PORT} is taken: {port_holder(PORT)}")
    tmp_before = set(os.listdir("/tmp"))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0|1")
    argv = [
        str(VLLM_PY),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(MODEL),
        "--host",
        "127.0.0.1",
        "--port",
        str(PORT),
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "256",
        "-tp",
        "2",
        "--enforce-eager",
    ]
    log = tmp_path / "vllm.log"
    started_at = time.time()
    with open(log, "ab") as f:
        popen = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    shm: set[str] = set()
    tmp: set[str] = set()
    try:

        def up():
            if popen.poll() is not None:
                raise AssertionError(f"vLLM exited {popen.returncode}:\n{log.read_text()[-3000:]}")
            return healthy()

        wait_for(up, READY_TIMEOUT_S, "vLLM /health", interval=1.0)
        pids = session_pids(popen.pid)
        shm, tmp = tree_holdings(Host(), pids)
        tmp |= {n for n in set(os.listdir("/tmp")) - tmp_before if DIST_FILE.match(n) or ZMQ_SOCKET.match(n)}
        yield {
            "popen": popen,
            "sid": popen.pid,
            "pids": pids,
            "shm": shm,
            "tmp": tmp,
            "log": log,
            "started_at": started_at,
        }
    finally:
        kill_session(popen.pid)
        try:
            popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        wait_for(lambda: not any(alive(p) for p in session_pids(popen.pid)), 30, "server session gone")
        for n in shm:
            unlink_quiet(f"/dev/shm/{n}")
        for n in tmp:
            unlink_quiet(f"/tmp/{n}")


def test_foreign_cleanup_of_a_real_tp2_server(real_server, tmp_path, other_user):
    """API server SIGKILLed → foreign cleanup removes the orphans and their segments and
    semaphores, reports bytes freed, a second run finds nothing, and the decoys survive."""
    srv = real_server
    assert any(n.startswith("psm_") for n in srv["shm"]) and any(
        n.startswith("sem.mp-") for n in srv["shm"]
    ), srv["shm"]

    # refresh() on the real tree: what the daemon would record every few seconds, and its cost.
    api = Host().process(srv["sid"])
    leader = ProcRef(api.pid, api.create_time, api.title, list(api.cmdline))
    rec = TreeRecord("real", "tiny-a", PORT, srv["started_at"], leader, srv["sid"], srv["sid"], [leader])
    refresh(rec)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        refresh(rec)
        times.append(time.perf_counter() - t0)
    print(
        f"\nrefresh on real TP=2 tree: median {statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms"
    )
    assert {p.pid for p in rec.procs} == set(srv["pids"])
    assert {i.name for i in rec.ipc} == srv["shm"]
    assert statistics.median(times) < 0.1

    # Decoys, started after the server so that their start does not shelter its objects.
    live = FakeTree(tmp_path / "live", "--tp", "1", "--segments", "1", via_vsup=False)
    holder = Decoy(tmp_path / "holder", "holder", shm=rand_name("psm_vsupdecoy"))
    other = OtherUserOrphan(OTHER_USER)
    pg = f"/dev/shm/{rand_name('PostgreSQL.')}"
    Path(pg).write_bytes(b"\0" * 4096)
    try:
        live.wait_ready()
        os.kill(srv["sid"], signal.SIGKILL)
        srv["popen"].wait(timeout=30)
        orphans = [p for p in srv["pids"] if p != srv["sid"] and alive(p)]
        assert len(orphans) == 4, "engine core, 2 workers and the tracker should outlive the API server"
        wait_for(lambda: port_holder(PORT) is None, 10, "port free after API server death")

        # The unscoped view of the whole host sees the same orphans (and changes nothing).
        dry = cleanup([], foreign=True, dry_run=True)
        assert set(orphans) <= {k["pid"] for k in dry.killed}
        assert not {*live.pids, holder.pid, other.pid} & {k["pid"] for k in dry.killed}

        decoy_shm = {*live.shm_names, holder.shm, other.shm, Path(pg).name}
        host = ScopedHost(
            {srv["sid"], live.sid, holder.sid, other.sid},
            shm_allow=(srv["shm"] | decoy_shm).__contains__,
            tmp_allow=(srv["tmp"] | set(live.tmp_names)).__contains__,
        )
        msgs: list[str] = []
        t0 = time.monotonic()
        rep = cleanup([], foreign=True, host=host, progress=msgs.append)
        took = time.monotonic() - t0
        print("\n".join(msgs))
        print(
            f"cleanup took {took:.2f} s; freed {rep.bytes_freed} bytes allocated, {rep.apparent_bytes_freed} apparent"
        )
        assert rep.clean, rep.remaining
        assert set(orphans) == {k["pid"] for k in rep.killed}
        assert not any(alive(p) for p in orphans)
        left = {n for n in srv["shm"] if os.path.exists(f"/dev/shm/{n}")}
        assert not left, left
        assert rep.bytes_freed > 0
        assert not {n for n in srv["tmp"] if os.path.exists(f"/tmp/{n}")} - set(live.tmp_names)

        again = cleanup([], foreign=True, host=host)
        assert (again.killed, again.unlinked, again.removed_files, again.remaining) == ([], [], [], [])

        assert all(alive(p) for p in live.pids)
        assert all(os.path.exists(f"/dev/shm/{n}") for n in decoy_shm)
        assert alive(holder.pid) and alive(other.pid)
    finally:
        live.stop()
        holder.stop()
        other.stop()
        unlink_quiet(pg)
