"""Foreign cleanup of vLLM V0 trees (MQLLMEngine + VllmWorkerProcess, vLLM <= 0.10), with fakes.

A V0 tree sets no process title: the API server spawns the resource_tracker and the MQLLMEngine,
the engine spawns one VllmWorkerProcess per extra TP rank, and the last two are plain
`python -B -c "from multiprocessing.spawn import spawn_main; ..." --multiprocessing-fork`
(recorded from vLLM 0.8.5 in tests/data/logs/README.md). What marks them is the native extension
they map, `.../site-packages/vllm/_C.abi3.so`; an unrelated program's multiprocessing children
look the same except for that. The real counterpart is test_real_vllm_v0.py.
"""

from __future__ import annotations

from fakes.fake_host import API_CMD, TRACKER_CMD, FakeHost
from vsup.cleanup import cleanup, find_orphans

SPAWN_CMD = (
    "/opt/vllm/bin/python",
    "-B",
    "-c",
    "from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=18, pipe_handle=20)",
    "--multiprocessing-fork",
)
EXT = "/opt/vllm/lib/python3.11/site-packages/vllm/_C.abi3.so"
TORCH = "/opt/vllm/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so"


def add_v0_tree(h: FakeHost, sid: int, *, api_alive: bool) -> dict[str, int]:
    """API server (or its absence), tracker, MQLLMEngine and one worker, the last two mapping vLLM's
    extension, with a psm_ segment and a semaphore held by engine and worker."""
    pids = {"api": sid, "tracker": sid + 1, "engine": sid + 2, "worker": sid + 3}
    top = sid if api_alive else 1
    if api_alive:
        h.add_proc(sid, 1, sid, API_CMD)
    h.add_proc(pids["tracker"], top, sid, TRACKER_CMD)
    for k, parent in (("engine", top), ("worker", pids["engine"])):
        p = h.add_proc(pids[k], parent, sid, SPAWN_CMD)
        p.maps[(1, 10_000 + pids[k])] = EXT
        p.maps[(1, 20_000 + pids[k])] = TORCH
    for n in (f"psm_{sid:x}", f"sem.mp-{sid:x}"):
        h.add_shm(n, born=h.t - 50)
        h.hold(pids["engine"], n)
        h.hold(pids["worker"], n)
    h.procs[pids["tracker"]].tracker_names = [f"psm_{sid:x}", f"sem.mp-{sid:x}"]
    return pids


def test_v0_orphans_found_by_the_extension_they_map():
    """After an API-server SIGKILL the untitled MQLLMEngine, its worker and their tracker are
    orphans; a live V0 server's engine and worker are not; an unrelated program's
    multiprocessing children (no vLLM extension mapped) are never touched."""
    h = FakeHost()
    dead = add_v0_tree(h, 500, api_alive=False)
    live = add_v0_tree(h, 600, api_alive=True)
    h.add_proc(700, 1, 700, ("python", "train.py"))  # someone's program with a spawn pool
    h.add_proc(701, 700, 700, TRACKER_CMD)
    h.add_proc(702, 700, 700, SPAWN_CMD).maps[(1, 30_702)] = TORCH
    h.add_proc(710, 1, 710, SPAWN_CMD).maps[(1, 30_710)] = TORCH  # its child, orphaned
    h.add_proc(711, 1, 710, TRACKER_CMD)

    found = {p.pid for p in find_orphans(h.processes(cmdline=True), h)}
    assert found == {dead["tracker"], dead["engine"], dead["worker"]}

    rep = cleanup([], foreign=True, host=h)
    assert rep.clean, rep.remaining
    assert {k["pid"] for k in rep.killed} == {dead["tracker"], dead["engine"], dead["worker"]}
    assert not {f"psm_{500:x}", f"sem.mp-{500:x}"} & set(h.shm_names())
    assert {*live.values(), 700, 701, 702, 710, 711} <= set(h.procs)
    assert {f"psm_{600:x}", f"sem.mp-{600:x}"} <= set(h.shm_names())


def test_without_the_host_only_titles_count():
    """find_orphans without a host (no /proc reads) sees only titled processes: a V0 tree is
    invisible to it, which is why cleanup passes its host."""
    h = FakeHost()
    add_v0_tree(h, 500, api_alive=False)
    assert find_orphans(h.processes(cmdline=True)) == []
