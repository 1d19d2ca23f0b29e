"""Issue 9 on the CPU: a vLLM-like TP=2 tree (tests/fakes/tp_tree.py, a real torch.distributed
gloo group) under three faults; vsup's cleanup removes every process and /dev/shm object of the
tree, and a foreign TP=2 job running beside it keeps running with its objects intact.

The fake needs an interpreter with torch: the real-vLLM venv's python (torch CPU). Without it
these tests fail, they do not skip (`make vllm` installs it).

Cleanup runs through a `ScopedHost` that sees only this module's two sessions and their names:
other engineers' vLLM servers and their leftovers on this shared machine stay out of the sweep.
One dry run per module is made with the unscoped host to show the real view picks the same
processes.

Measured here (gloo): a SIGKILLed peer does not hang gloo's all-reduce: the survivor's read
fails ("Connection reset by peer" / "Connection closed by peer") within milliseconds, and (like a vLLM worker after a failed RPC) stays
alive waiting for work that never comes. A SIGSTOPped peer does hang it: the survivor waits in
the collective. The NCCL versions of both are in tests/gpu/test_multi_gpu.py.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fakes.tp_tree import (
    PHASE_BETWEEN,
    PHASE_FAILED,
    PHASE_IN_COLLECTIVE,
    TpJob,
    alive,
    proc_ppid,
    proc_state,
    read_progress,
    session_pids,
    start_job,
    wait_until,
)
from fakes.trees import ScopedHost
from support import VLLM_PY
from vsup import cleanup, proctree
from vsup.host import Host
from vsup.proctree import TreeRecord

GRACE_S = 1.0  # SIGTERM -> SIGKILL; only the SIGSTOPped worker needs the SIGKILL
FAULT_TIMEOUT_S = 30.0
# Rounds a healthy job completes while a blocked rank must not complete one (see assert_blocked).
WITNESS_ROUNDS = 25

HOST = Host()

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def torch_python() -> str:
    """The interpreter with torch that runs the fake (fail, not skip, when it is missing)."""
    if not VLLM_PY.exists():
        pytest.fail(f"{VLLM_PY} is missing: the TP fake needs an interpreter with torch; run `make vllm`")
    return str(VLLM_PY)


@pytest.fixture(scope="module")
def foreign(torch_python: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TpJob]:
    """A TP=2 job vsup did not start (own session, no ledger), shared by the module's tests."""
    job = start_job(torch_python, tmp_path_factory.mktemp("foreign"), name="foreign")
    try:
        yield job
    finally:
        job.teardown()


@pytest.fixture
def tree(torch_python: str, tmp_path: Path) -> Iterator[Callable[[], TpJob]]:
    """Factory: a TP=2 tree started through proctree.spawn; whatever survives the test is removed."""
    jobs: list[TpJob] = []

    def make() -> TpJob:
        job = start_job(torch_python, tmp_path, spawn=proctree.spawn, name="tree")
        jobs.append(job)
        return job

    try:
        yield make
    finally:
        for job in jobs:
            job.teardown()


def scoped(*jobs: TpJob) -> ScopedHost:
    """The real host, seeing only these jobs' sessions and the names they made or hold."""
    sids = {j.sid for j in jobs}

    def shm_ok(name: str) -> bool:
        return any(
            name in (*j.ready["psm"], *j.ready["sem"])
            or (j.record is not None and name in {i.name for i in j.record.ipc})
            for j in jobs
        )

    def tmp_ok(name: str) -> bool:
        return any(name == os.path.basename(j.ready["dist"]) for j in jobs)

    return ScopedHost(sids, shm_allow=shm_ok, tmp_allow=tmp_ok)


def recorded(job: TpJob, host: ScopedHost) -> TreeRecord:
    """Refresh the tree's record and check it names every process and segment of the tree."""
    rec = proctree.refresh(job.record, host=host)
    pids = {p.pid for p in rec.procs}
    assert {job.popen.pid, *job.workers, job.ready["tracker"]} <= pids, rec.procs
    names = {i.name for i in rec.ipc}
    assert set(job.ready["psm"]) | set(job.ready["sem"]) <= names, rec.ipc
    return rec


def assert_blocked(job: TpJob, rank: int, witness: TpJob, phase: int) -> None:
    """Rank ``rank`` of ``job`` completes no all-reduce while the healthy ``witness`` job completes
    WITNESS_ROUNDS of them (an event to wait for, not a fixed sleep), and sits in ``phase``."""
    psm = job.ready["psm"][rank]
    before = read_progress(psm)
    witness.wait_progress(
        list(range(witness.ready["world"])),
        WITNESS_ROUNDS,
        FAULT_TIMEOUT_S,
        "the foreign job to keep all-reducing",
    )
    after = read_progress(psm)
    assert after == before, f"rank {rank} moved: {before} -> {after}"
    assert after is not None and after.phase == phase, after
    assert alive(job.workers[rank]), f"rank {rank} should still be alive"


def clean_and_check(
    job: TpJob, rec: TreeRecord, foreign: TpJob, record_timing: Callable[[str, float], None], fault: str
) -> cleanup.Report:
    """Run vsup's cleanup on the tree's record; everything of the tree is gone, the foreign job is not."""
    foreign_rounds = foreign.rounds()
    t0 = time.monotonic()
    rep = cleanup.cleanup([rec], grace_s=GRACE_S, host=scoped(job, foreign))
    record_timing(fault, time.monotonic() - t0)
    job.popen.wait(timeout=10)

    assert rep.clean, rep.remaining
    assert not session_pids(job.sid), f"tree processes left: {session_pids(job.sid)}"
    assert not [p for p in rec.procs if running(p)], rec.procs
    shm_left = [
        n
        for n in {*job.ready["psm"], *job.ready["sem"], *(i.name for i in rec.ipc)}
        if os.path.exists(f"/dev/shm/{n}")
    ]
    assert not shm_left, f"tree objects left in /dev/shm: {shm_left}"

    assert all(alive(p) for p in (foreign.popen.pid, *foreign.workers, foreign.ready["tracker"])), (
        "a foreign process died"
    )
    assert all(foreign.objects().values()), f"foreign objects lost: {foreign.objects()}"
    foreign.wait_progress([0, 1], 3, FAULT_TIMEOUT_S, "the foreign job to keep all-reducing after cleanup")
    assert min(foreign.rounds()) > min(foreign_rounds)
    return rep


def running(ref: proctree.ProcRef) -> bool:
    """Is the recorded process (same pid and create time) still alive and no zombie?"""
    info = HOST.process(ref.pid, cmdline=False)
    return info is not None and ref.matches(info) and not info.zombie


TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def record_timing() -> Iterator[Callable[[str, float], None]]:
    """Cleanup call durations, printed at module end (pytest -s) for the issue note."""
    yield TIMINGS.__setitem__
    if TIMINGS:
        print("\ncleanup call s: " + ", ".join(f"{k} {v:.3f}" for k, v in TIMINGS.items()))


# -------------------------------------------------------------------------------------------


def test_sigkill_parent_orphans_are_cleaned(tree, foreign, record_timing):
    """Parent SIGKILLed: the workers and the tracker live on and keep all-reducing; cleanup ends them."""
    job = tree()
    rec = recorded(job, scoped(job, foreign))
    job.popen.send_signal(signal.SIGKILL)
    job.popen.wait(timeout=10)
    for pid in (*job.workers, job.ready["tracker"]):
        wait_until(
            lambda p=pid: proc_ppid(p) not in (None, job.popen.pid),
            FAULT_TIMEOUT_S,
            f"pid {pid} to be reparented",
        )
    job.wait_progress([0, 1], 5, FAULT_TIMEOUT_S, "the orphaned workers to keep all-reducing")
    assert all(os.path.exists(f"/dev/shm/{n}") for n in job.ready["psm"] + job.ready["sem"])

    # The unscoped host (this whole shared machine) picks the same processes, none foreign.
    dry = cleanup.cleanup([rec], dry_run=True)
    would = {k["pid"] for k in dry.killed}
    assert {*job.workers, job.ready["tracker"]} <= would
    assert not would & {foreign.popen.pid, *foreign.workers, foreign.ready["tracker"]}

    rep = clean_and_check(job, rec, foreign, record_timing, "sigkill-parent")
    assert set(job.workers) <= {k["pid"] for k in rep.killed if k["how"] == "SIGTERM"}, rep.killed


def test_sigkill_worker_survivor_is_wedged_and_cleaned(tree, foreign, record_timing):
    """Worker 1 SIGKILLed: gloo fails worker 0's all-reduce at once, it stays alive and stuck; cleanup ends the tree."""
    job = tree()
    rec = recorded(job, scoped(job, foreign))
    victim, survivor = job.workers[1], job.workers[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: "Worker proc VllmWorker-1 died unexpectedly (exit code: -9)" in job.log_text(),
        FAULT_TIMEOUT_S,
        "the parent to log the worker's death",
    )
    wait_until(
        lambda: (p := read_progress(job.ready["psm"][0])) is not None and p.phase == PHASE_FAILED,
        FAULT_TIMEOUT_S,
        "the survivor's all-reduce to fail",
    )
    assert f"(Worker_TP0 pid={survivor}) ERROR" in job.log_text() and "all_reduce failed" in job.log_text()
    assert_blocked(job, 0, foreign, PHASE_FAILED)
    assert alive(job.popen.pid) and alive(survivor)

    rep = clean_and_check(job, rec, foreign, record_timing, "sigkill-worker")
    assert survivor in {k["pid"] for k in rep.killed}


def test_sigstop_worker_hangs_peer_in_all_reduce_and_is_cleaned(tree, foreign, record_timing):
    """Worker 1 SIGSTOPped: worker 0 hangs inside the all-reduce; cleanup SIGKILLs the stopped one too."""
    job = tree()
    rec = recorded(job, scoped(job, foreign))
    victim = job.workers[1]
    os.kill(victim, signal.SIGSTOP)
    wait_until(lambda: proc_state(victim) == "T", FAULT_TIMEOUT_S, "the worker to stop")
    wait_until(
        lambda: (p := read_progress(job.ready["psm"][0])) is not None and p.phase == PHASE_IN_COLLECTIVE,
        FAULT_TIMEOUT_S,
        "the peer to enter the next all-reduce",
    )
    assert_blocked(job, 0, foreign, PHASE_IN_COLLECTIVE)
    assert proc_state(victim) == "T"
    stopped_at = read_progress(job.ready["psm"][1])
    assert stopped_at is not None and stopped_at.phase in (PHASE_BETWEEN, PHASE_IN_COLLECTIVE)

    rep = clean_and_check(job, rec, foreign, record_timing, "sigstop-worker")
    how = {k["pid"]: k["how"] for k in rep.killed}
    assert how.get(victim) == "SIGKILL", rep.killed
    assert how.get(job.workers[0]) == "SIGTERM", rep.killed


def test_dist_store_of_a_lone_tree_is_attributed_and_removed(tree, foreign, record_timing):
    """Seen alone (the foreign job out of view), the tree's unheld vllm_dist_* store is recorded and removed."""
    job = tree()
    alone = scoped(job)
    rec = recorded(job, alone)
    assert job.ready["dist"] in rec.files, rec.files
    job.popen.send_signal(signal.SIGKILL)
    job.popen.wait(timeout=10)
    t0 = time.monotonic()
    rep = cleanup.cleanup([rec], grace_s=GRACE_S, host=alone)
    record_timing("dist-alone", time.monotonic() - t0)
    assert rep.clean, rep.remaining
    assert job.ready["dist"] in rep.removed_files
    assert not os.path.exists(job.ready["dist"])
    assert os.path.exists(foreign.ready["dist"])


@pytest.mark.xfail(
    strict=True,
    reason=(
        "proctree attributes an unheld vllm_dist_* only when no other vLLM-looking process started in "
        "the DIST_ATTRIBUTION_WINDOW_S (600 s) before it; a foreign TP job started just before makes "
        "the tree's own store ambiguous, so cleanup leaves it (issue 9 report)"
    ),
)
def test_dist_store_is_removed_beside_a_foreign_job(tree, foreign, record_timing):
    """With the foreign TP job in view, the tree's vllm_dist_* store is still recorded and removed."""
    job = tree()
    host = scoped(job, foreign)
    rec = recorded(job, host)
    job.popen.send_signal(signal.SIGKILL)
    job.popen.wait(timeout=10)
    rep = clean_and_check(job, rec, foreign, record_timing, "dist-beside-foreign")
    assert rep.clean
    assert not os.path.exists(job.ready["dist"]), f"{job.ready['dist']} left; recorded files: {rec.files}"
