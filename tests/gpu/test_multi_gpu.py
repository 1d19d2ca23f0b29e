"""Issue 9 on GPUs: a vLLM-like TP=2 tree on 2 GPUs (tests/fakes/tp_tree.py, a real NCCL group,
rank r on GPU r) under three faults; vsup's cleanup kills the tree, both GPUs come back free
(NVML, ``Gpus.wait_released``), no ``nccl-*``/``psm_*``/``sem.mp-*`` object of the tree is left,
and a foreign NCCL job on the same two GPUs keeps running with its memory and objects.

Skipped, with the reason, without NVML or a GPU (conftest ``gpus``); the 2-GPU tests also where
NVML sees fewer than 2 GPUs. ``test_nccl_world_of_one_...`` needs one GPU and proves the NCCL
path of the fake (group, memory, all-reduce, cleanup, release) on the single-GPU kind.

Unlike tests/test_tp_debris.py this module uses the unscoped host: it runs on a lent machine
where nothing else runs. Every process gets NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1
and NVSHMEM_DISABLE_NVLS=1 (the fake forces them too; the test checks each worker saw them).
How to run it: docs/multi-gpu.md.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fakes.tp_tree import (
    NVLS_OFF,
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
from vsup import cleanup, proctree
from vsup.gpu import Gpus
from vsup.host import Host

pytestmark = pytest.mark.gpu

WORKER_MIB = 2048
FOREIGN_MIB = 1024
# torch import + CUDA context + NCCL communicator: ~10-20 s on a cold machine (issue 8 notes).
READY_TIMEOUT_S = 240.0
FAULT_TIMEOUT_S = 60.0
WITNESS_ROUNDS = 25
GRACE_S = 2.0
HOST = Host()


def child_env() -> dict[str, str]:
    return {**os.environ, **NVLS_OFF}


@pytest.fixture(scope="module")
def two_gpus(gpus: Gpus) -> Gpus:
    if gpus.count < 2:
        pytest.skip(
            f"needs 2 GPUs for a TP=2 NCCL group; NVML sees {gpus.count} "
            "(run on a 2-GPU kind: docs/multi-gpu.md)"
        )
    return gpus


@pytest.fixture(scope="module")
def foreign(two_gpus: Gpus, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TpJob]:
    """A TP=2 NCCL job on the same 2 GPUs that vsup did not start (own session, no ledger)."""
    job = start_job(
        sys.executable,
        tmp_path_factory.mktemp("foreign"),
        device="cuda",
        mib=FOREIGN_MIB,
        env=child_env(),
        ready_timeout_s=READY_TIMEOUT_S,
        name="foreign",
    )
    try:
        yield job
    finally:
        job.teardown()


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Callable[..., TpJob]]:
    """Factory: a tree started through proctree.spawn; whatever survives the test is removed."""
    jobs: list[TpJob] = []

    def make(world: int = 2, mib: int = WORKER_MIB) -> TpJob:
        job = start_job(
            sys.executable,
            tmp_path,
            device="cuda",
            world=world,
            mib=mib,
            env=child_env(),
            spawn=proctree.spawn,
            ready_timeout_s=READY_TIMEOUT_S,
            name="tree",
        )
        jobs.append(job)
        return job

    try:
        yield make
    finally:
        for job in jobs:
            job.teardown()


def nccl_names() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("nccl-")}


def held_shm(pids: list[int]) -> set[str]:
    """/dev/shm names (as listed now) that these processes map or hold open."""
    keys = set()
    for pid in pids:
        h = HOST.holdings(pid)
        if h is not None:
            keys |= set(h.files)
    out = set()
    for name in os.listdir("/dev/shm"):
        st = HOST.stat(f"/dev/shm/{name}")
        if st is not None and (st.dev, st.ino) in keys:
            out.add(name)
    return out


def all_pids(job: TpJob) -> list[int]:
    return [job.popen.pid, *job.workers, job.ready["tracker"]]


def check_started(job: TpJob, gpus: Gpus) -> tuple[proctree.TreeRecord, set[str], set[int]]:
    """Refresh the record; each worker holds memory on its own GPU and saw the NVLS switches.

    Returns the record, every /dev/shm name the tree holds now (nccl-* included), its GPUs."""
    rec = proctree.refresh(job.record)
    assert set(all_pids(job)) <= {p.pid for p in rec.procs}, rec.procs
    assert set(job.ready["psm"]) | set(job.ready["sem"]) <= {i.name for i in rec.ipc}, rec.ipc
    for env in job.ready["worker_env"]:
        assert env == NVLS_OFF, env
    held = {h["pid"]: h for h in gpus.holders({p.pid for p in rec.procs}) if h["in_tree"]}
    for pid in job.workers:
        assert pid in held and held[pid]["used_mib"] >= WORKER_MIB, (pid, held)
    tree_gpus = {held[p]["gpu"] for p in job.workers}
    assert len(tree_gpus) == len(job.workers), "two ranks share a GPU"
    return rec, held_shm(all_pids(job)) | {i.name for i in rec.ipc}, tree_gpus


def assert_blocked(job: TpJob, rank: int, witness: TpJob, phase: int) -> None:
    """``rank`` completes no all-reduce while ``witness`` completes WITNESS_ROUNDS, and sits in ``phase``."""
    psm = job.ready["psm"][rank]
    before = read_progress(psm)
    witness.wait_progress([0, 1], WITNESS_ROUNDS, FAULT_TIMEOUT_S, "the foreign job to keep all-reducing")
    after = read_progress(psm)
    assert after == before and after is not None and after.phase == phase, (before, after)
    assert alive(job.workers[rank])


def clean_and_prove(
    job: TpJob,
    rec: proctree.TreeRecord,
    tree_shm: set[str],
    tree_gpus: set[int],
    gpus: Gpus,
    baseline: dict[int, int],
    before: list,
    foreign: TpJob | None,
    record: dict,
    fault: str,
) -> cleanup.Report:
    """vsup cleanup on the record, then: no tree process, GPUs back to the baseline, no tree object."""
    pids = {p.pid for p in rec.procs}
    t0 = time.monotonic()
    rep = cleanup.cleanup([rec], grace_s=GRACE_S)
    t_cleaned = time.monotonic()
    released = gpus.wait_released(pids, baseline, before=before, poll_s=0.01)
    t_free = time.monotonic()
    job.popen.wait(timeout=10)

    assert rep.clean, rep.remaining
    assert not session_pids(job.sid), session_pids(job.sid)
    assert released.released, released.reason
    for g in tree_gpus:
        assert released.freed_mib[g] >= WORKER_MIB, released
    left = {n for n in tree_shm if os.path.exists(f"/dev/shm/{n}")}
    assert not left, f"tree objects left in /dev/shm: {left}"
    if foreign is not None:
        assert all(alive(p) for p in all_pids(foreign)), "a foreign process died"
        assert all(foreign.objects().values()), foreign.objects()
        foreign.wait_progress([0, 1], 3, FAULT_TIMEOUT_S, "the foreign job to keep all-reducing")
        fheld = {h["pid"] for h in gpus.holders() if h["used_mib"] and h["used_mib"] >= FOREIGN_MIB}
        assert set(foreign.workers) <= fheld, "the foreign job lost its GPU memory"
    record.setdefault("multi_gpu", []).append(
        {
            "fault": fault,
            "cleanup_s": round(t_cleaned - t0, 4),
            "wait_released_s": round(released.elapsed_s, 4),
            "kill_to_free_s": round(t_free - t0, 4),
            "freed_mib": released.freed_mib,
            "used_after_mib": released.used_mib,
            "baseline_mib": released.baseline_mib,
            "killed": rep.killed,
            "unlinked": rep.unlinked,
            "tree_shm": sorted(tree_shm),
            "nccl_now": sorted(nccl_names()),
        }
    )
    return rep


# -------------------------------------------------------------------------------------------


def test_nccl_world_of_one_forms_and_is_cleaned(gpus: Gpus, tree, record):
    """One GPU: a world of 1 forms its NCCL group and all-reduces; parent SIGKILLed, cleanup frees the GPU."""
    baseline = gpus.baseline()
    nccl_before = nccl_names()
    job = tree(world=1, mib=WORKER_MIB)
    rec, tree_shm, tree_gpus = check_started(job, gpus)
    assert "backend=nccl" in job.log_text() and "vLLM is using nccl==" in job.log_text()
    job.wait_progress([0], 5, FAULT_TIMEOUT_S, "the NCCL all-reduce loop")
    before = gpus.snapshot()
    job.popen.send_signal(signal.SIGKILL)
    job.popen.wait(timeout=10)
    wait_until(lambda: proc_ppid(job.workers[0]) not in (None, job.popen.pid), FAULT_TIMEOUT_S, "reparenting")
    job.wait_progress([0], 5, FAULT_TIMEOUT_S, "the orphan to keep all-reducing")
    clean_and_prove(
        job,
        rec,
        tree_shm | (nccl_names() - nccl_before),
        tree_gpus,
        gpus,
        baseline,
        before,
        None,
        record,
        "world1-sigkill-parent",
    )


def test_sigkill_parent_orphans_release_both_gpus(two_gpus: Gpus, foreign, tree, record):
    """Parent SIGKILLed: the ranks live on all-reducing on both GPUs; cleanup kills them, both GPUs free."""
    baseline = two_gpus.baseline()
    nccl_before = nccl_names()
    job = tree()
    rec, tree_shm, tree_gpus = check_started(job, two_gpus)
    before = two_gpus.snapshot()
    job.popen.send_signal(signal.SIGKILL)
    job.popen.wait(timeout=10)
    for pid in job.workers:
        wait_until(lambda: proc_ppid(pid) not in (None, job.popen.pid), FAULT_TIMEOUT_S, "reparenting")  # noqa: B023 - polled in this iteration only
    job.wait_progress([0, 1], 5, FAULT_TIMEOUT_S, "the orphaned ranks to keep all-reducing")
    tree_shm |= nccl_names() - nccl_before - held_shm(all_pids(foreign))
    clean_and_prove(
        job, rec, tree_shm, tree_gpus, two_gpus, baseline, before, foreign, record, "sigkill-parent"
    )


def test_sigkill_rank_hangs_peer_in_nccl_and_both_gpus_are_freed(two_gpus: Gpus, foreign, tree, record):
    """Rank 1 SIGKILLed: rank 0 hangs inside the NCCL all-reduce; cleanup kills it, both GPUs free."""
    baseline = two_gpus.baseline()
    nccl_before = nccl_names()
    job = tree()
    rec, tree_shm, tree_gpus = check_started(job, two_gpus)
    before = two_gpus.snapshot()
    os.kill(job.workers[1], signal.SIGKILL)
    wait_until(
        lambda: "Worker proc VllmWorker-1 died unexpectedly (exit code: -9)" in job.log_text(),
        FAULT_TIMEOUT_S,
        "the parent to log the rank's death",
    )
    wait_until(
        lambda: (p := read_progress(job.ready["psm"][0])) is not None and p.phase != PHASE_BETWEEN,
        FAULT_TIMEOUT_S,
        "rank 0 to enter the next all-reduce",
    )
    p0 = read_progress(job.ready["psm"][0])
    assert p0 is not None and p0.phase != PHASE_FAILED, (
        f"NCCL reported the dead peer instead of hanging: {p0}"
    )
    assert_blocked(job, 0, foreign, PHASE_IN_COLLECTIVE)
    tree_shm |= nccl_names() - nccl_before - held_shm(all_pids(foreign))
    rep = clean_and_prove(
        job, rec, tree_shm, tree_gpus, two_gpus, baseline, before, foreign, record, "sigkill-rank"
    )
    assert job.workers[0] in {k["pid"] for k in rep.killed}


def test_sigstop_rank_hangs_peer_and_both_gpus_are_freed(two_gpus: Gpus, foreign, tree, record):
    """Rank 1 SIGSTOPped: rank 0 hangs in NCCL; cleanup SIGKILLs the stopped rank too, both GPUs free."""
    baseline = two_gpus.baseline()
    nccl_before = nccl_names()
    job = tree()
    rec, tree_shm, tree_gpus = check_started(job, two_gpus)
    before = two_gpus.snapshot()
    victim = job.workers[1]
    os.kill(victim, signal.SIGSTOP)
    wait_until(lambda: proc_state(victim) == "T", FAULT_TIMEOUT_S, "the rank to stop")
    wait_until(
        lambda: (p := read_progress(job.ready["psm"][0])) is not None and p.phase == PHASE_IN_COLLECTIVE,
        FAULT_TIMEOUT_S,
        "rank 0 to enter the next all-reduce",
    )
    assert_blocked(job, 0, foreign, PHASE_IN_COLLECTIVE)
    tree_shm |= nccl_names() - nccl_before - held_shm(all_pids(foreign))
    rep = clean_and_prove(
        job, rec, tree_shm, tree_gpus, two_gpus, baseline, before, foreign, record, "sigstop-rank"
    )
    how = {k["pid"]: k["how"] for k in rep.killed}
    assert how.get(victim) == "SIGKILL", rep.killed


def test_precheck_names_the_foreign_nccl_job(two_gpus: Gpus, foreign, record):
    """After our trees are gone, the pre-start check still refuses, naming the foreign ranks on both GPUs."""
    pre = two_gpus.precheck()
    assert not pre.ok
    named = {h["pid"] for h in pre.foreign}
    assert set(foreign.workers) <= named, pre.reason
    assert {h["gpu"] for h in pre.foreign if h["pid"] in foreign.workers} == {0, 1}
    assert two_gpus.precheck(set(foreign.workers)).ok
    record["multi_gpu_precheck"] = pre.reason
