"""Cleanup engine: unit tests on a fake Host (attribution rules, kill order, races, permission
errors), then on the real OS with fake vLLM-like trees and planted decoys."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fakes.fake_host import API_CMD, TRACKER_CMD, FakeHost, add_vllm_tree
from fakes.trees import (
    Decoy,
    FakeTree,
    OtherUserOrphan,
    ScopedHost,
    alive,
    other_user_fixture,
    rand_name,
    unlink_quiet,
    wait_for,
)
from vsup.cleanup import Report, cleanup, find_orphans, port_holder, render_table
from vsup.host import Host
from vsup.proctree import IpcRef, cap_cgroup, refresh

FAST = dict(grace_s=2.0, tracker_grace_s=3.0, kill_wait_s=2.0, poll_s=0.05)


def run(host, dead=(), **kw):
    msgs: list[str] = []
    rep = cleanup(list(dead), host=host, progress=msgs.append, **{**FAST, **kw})
    rep.messages = msgs
    return rep


# ---- a dead tree -----------------------------------------------------------------------------
def test_dead_tree_is_killed_and_its_debris_removed():
    """A dead tree's processes are stopped, its segments, semaphores, store and sockets removed."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, api_alive=False)
    rep = run(h, [rec])
    assert not h.procs
    assert not h.shm_names()
    assert not any(n.startswith("/faketmp/") for n in h.files)
    assert {k["pid"] for k in rep.killed} == {501, 502, 503, 504}
    assert sorted(rep.removed_files) == sorted(rec.files)
    assert rep.clean and not rep.remaining


def test_a_dead_trees_cpu_cap_is_removed_and_a_dry_run_leaves_it():
    """A vsup that ended during an overlapped reload leaves the loading tree's CPU cap (a cpu
    cgroup): the cleanup of that tree's record removes it; a dry run does not; a cgroup that
    cannot be removed is remaining, with why."""
    h = FakeHost()
    _, rec = add_vllm_tree(h, 500, api_alive=False)
    name = cap_cgroup(rec.id)
    h.caps[name] = (500, 1.0)
    h.caps["vsup-cap-someone-elses"] = (900, 1.0)
    assert name not in run(h, [rec], dry_run=True).removed_files and name in h.caps
    rep = run(h, [rec])
    assert f"/fake/cgroup/cpu/{name}" in rep.removed_files and rep.clean
    assert h.caps == {"vsup-cap-someone-elses": (900, 1.0)}  # only the record's own

    h2 = FakeHost()
    _, rec2 = add_vllm_tree(h2, 600, api_alive=False)

    def refused(name: str) -> str | None:
        raise OSError(f"[Errno 16] Device or resource busy: {name}")

    h2.cpu_uncap = refused  # the one case this test is about
    rep2 = run(h2, [rec2])
    assert rep2.remaining == [
        {
            "name": f"cpu cgroup {cap_cgroup(rec2.id)}",
            "reason": f"remove refused: [Errno 16] Device or resource busy: {cap_cgroup(rec2.id)}",
        }
    ]


def test_resource_tracker_is_left_alone_until_the_others_are_gone():
    """The tracker is never signalled before the engine and workers are gone, and not at all
    when it exits by itself after unlinking what is registered with it."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, api_alive=False)
    rep = run(h, [rec])
    assert all(pid != pids["tracker"] for pid, _ in h.signals)
    assert {pid for pid, _ in h.signals} == {pids["engine"], pids["w0"], pids["w1"]}
    assert {u["name"] for u in rep.unlinked if u["by"] == "holder exit"} == {i.name for i in rec.ipc}
    assert rep.bytes_freed == 6 * (1 << 16)
    assert rep.apparent_bytes_freed == 6 * (1 << 20)


def test_tracker_that_does_not_exit_is_killed_after_its_grace():
    """A resource tracker still there after tracker_grace_s gets SIGKILL (it ignores SIGTERM)."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, api_alive=False)
    h.procs[pids["tracker"]].tracker_names = []
    h.procs[pids["tracker"]].comm = "python"
    rep = run(h, [rec])
    assert (pids["tracker"], signal.SIGKILL) in h.signals
    assert h.mono >= FAST["tracker_grace_s"]
    # The segments it would have freed are unlinked by cleanup itself.
    assert not h.shm_names()
    assert rep.clean


def test_sigterm_ignored_escalates_to_sigkill_after_grace():
    """A process that ignores SIGTERM is SIGKILLed once the grace has passed, not before."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, api_alive=False)
    h.procs[pids["engine"]].on_term = "ignore"
    rep = run(h, [rec])
    kills = [i for i, s in enumerate(h.signals) if s == (pids["engine"], signal.SIGKILL)]
    assert kills, h.signals
    assert h.mono >= FAST["grace_s"]
    assert {"pid": pids["engine"], "name": "VLLM::EngineCore", "sid": 500, "how": "SIGKILL"} in rep.killed
    assert rep.clean


def test_process_stuck_after_sigkill_is_remaining():
    """A process that survives SIGKILL (D state) is reported remaining, and the report is not clean."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, api_alive=False)
    h.procs[pids["w0"]].on_term = "ignore"
    h.procs[pids["w0"]].on_kill = "stuck"
    rep = run(h, [rec])
    assert [r["pid"] for r in rep.remaining if "pid" in r] == [pids["w0"]]
    assert not rep.clean
    # What the stuck worker still maps is not unlinked under it: it is remaining, not freed.
    assert any(r.get("name", "").startswith("psm_") and "in use" in r["reason"] for r in rep.remaining)
    assert {i.name for i in rec.ipc if i.kind == "shm"} <= h.shm_names()


def test_sigkilled_worker_still_exiting_is_waited_for_while_it_progresses():
    """Issue 18: a SIGKILLed worker pinned to a core full of another server's threads spends
    40 s tearing its memory down (state R, CPU time growing). That is progress, not a process
    that survived SIGKILL: the cleanup waits (kill_wait_s is 2 s) and then frees what it
    mapped; the report is clean and says how long the exit took."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, api_alive=False)
    h.procs[pids["w0"]].on_term = "ignore"
    h.procs[pids["w0"]].kill_exit_s = 40.0
    t0 = h.mono
    rep = run(h, [rec])
    assert rep.clean, rep.remaining
    (row,) = [r for r in rep.killed if r["pid"] == pids["w0"]]
    assert row["how"] == "SIGKILL" and 40.0 <= row["exit_s"] < 41.0
    assert 40.0 <= h.mono - t0 < 40.0 + FAST["grace_s"] + FAST["tracker_grace_s"] + 5
    assert not ({i.name for i in rec.ipc if i.kind == "shm"} & h.shm_names())


def test_sigkilled_processes_are_hastened_and_only_they():
    """Each SIGKILLed process's exit goes first in the CPU queue (Host.hasten_exit), its
    session's autogroup too when the session is a dead tree's (vsup's setsid); a process that
    left after SIGTERM is not touched, and a foreign orphan's session (someone's shell, say)
    keeps its autogroup: only the dying threads are raised."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, api_alive=False)
    h.procs[pids["w0"]].on_term = "ignore"
    h.procs[pids["w0"]].kill_exit_s = 5.0
    rep = run(h, [rec])
    assert rep.clean, rep.remaining
    assert h.hastened == [(pids["w0"], True)]
    assert h.autogroups == {rec.sid: -20}

    h = FakeHost()
    h.add_proc(50, 1, 50, ("containerd-shim",))
    pids, _ = add_vllm_tree(h, 500, api_alive=False)
    h.procs[pids["engine"]].on_term = "ignore"
    h.procs[pids["engine"]].kill_exit_s = 5.0
    run(h, [], foreign=True)
    assert h.hastened == [(pids["engine"], False)] and not h.autogroups
    assert pids["engine"] not in h.procs


def test_an_exit_that_outlasts_the_cap_is_remaining_with_its_reason():
    """Progress has a cap (exit_wait_s): past it the still-exiting worker is remaining, and
    the reason says it is exiting, in which state, and for how long."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, api_alive=False)
    h.procs[pids["w0"]].on_term = "ignore"
    h.procs[pids["w0"]].kill_exit_s = 1000.0
    t0 = h.mono
    rep = run(h, [rec], exit_wait_s=30.0)
    (left,) = [r for r in rep.remaining if r.get("pid") == pids["w0"]]
    assert left["reason"].startswith("still exiting 30") and "state R" in left["reason"]
    assert 30.0 <= h.mono - t0 < 30.0 + FAST["grace_s"] + FAST["tracker_grace_s"] + 5


def test_no_progress_after_sigkill_is_not_waited_for():
    """D state with no CPU time moving ends the wait after kill_wait_s, whatever the cap; a
    process that is not even dying (SIGKILL had no effect) likewise; each reason says which."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, api_alive=False)
    for w, how in (("w0", "stuck"), ("w1", "ignore")):
        h.procs[pids[w]].on_term = "ignore"
        h.procs[pids[w]].on_kill = how
    t0 = h.mono
    rep = run(h, [rec], exit_wait_s=600.0)
    why = {r["pid"]: r["reason"] for r in rep.remaining if "pid" in r}
    assert "no progress for 2 s" in why[pids["w0"]] and "state D in fake_wait" in why[pids["w0"]]
    assert "not exiting" in why[pids["w1"]]
    assert h.mono - t0 < 60


def test_pid_reuse_is_never_signalled():
    """A recorded pid now owned by a different process (other create time) is left alone."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, api_alive=False)
    # Everything of the tree is gone; pid 502 was reused by an unrelated process in its own session.
    for pid in list(h.procs):
        del h.procs[pid]
    h.add_proc(502, 1, 502, ("bash",), ct=h.t - 1)
    rep = run(h, [rec])
    assert h.signals == []
    assert 502 in h.procs
    assert rep.killed == []


def test_session_leader_pid_reused_disables_session_rule():
    """When the tree's session id now names another process, only recorded pids count."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, api_alive=False)
    h.add_proc(500, 1, 500, ("sshd",), ct=h.t - 1)  # a new session leader got pid 500
    h.add_proc(777, 500, 500, ("bash",), ct=h.t - 1)  # and its child is in "our" session
    run(h, [rec])
    assert 500 in h.procs and 777 in h.procs
    assert all(pid not in (500, 777) for pid, _ in h.signals)


def test_process_exiting_between_find_and_kill_is_no_error():
    """A process gone by the time it is signalled is neither an error nor remaining."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, api_alive=False)
    h.procs[pids["w1"]].vanish_on_signal = True
    rep = run(h, [rec])
    assert rep.clean
    assert all(pid != pids["w1"] for pid, _ in h.signals)


def test_permission_denied_signal_is_remaining_not_a_crash():
    """EPERM on a signal is reported as remaining with the reason; the rest is still cleaned."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, api_alive=False)
    h.procs[pids["w1"]].deny = True
    rep = run(h, [rec])
    assert {
        "pid": pids["w1"],
        "name": "VLLM::Worker_TP1",
        "reason": "permission denied sending SIGTERM",
    } in rep.remaining
    assert pids["engine"] not in h.procs


def test_permission_denied_unlink_is_remaining():
    """An object of the tree that cannot be unlinked is listed as remaining."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, api_alive=False)
    h.procs[pids["tracker"]].tracker_names = []
    h.deny_unlink.add("/fakeshm/psm_1f40")
    rep = run(h, [rec])
    assert any(r["name"] == "psm_1f40" and "refused" in r["reason"] for r in rep.remaining)


def test_zombies_are_reported_never_remaining():
    """A zombie of the tree is reported as such, never signalled and never remaining."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, api_alive=False)
    h.add_proc(510, pids["engine"], 500, ("python",), state="Z")
    rep = run(h, [rec])
    assert [z["pid"] for z in rep.zombies] == [510]
    assert all(pid != 510 for pid, _ in h.signals)
    assert rep.clean


def test_members_found_by_session_and_descent_not_only_records():
    """Unrecorded processes of the tree's session and descendants that left it are found."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, api_alive=False, record=False)
    h.add_proc(520, pids["w0"], 520, ("python", "helper.py"))  # setsid'd child of a worker
    run(h, [rec])
    assert not h.procs


# ---- what is never touched -------------------------------------------------------------------
def test_live_tree_is_never_touched():
    """A live tree's processes and recorded objects survive, even an object it does not hold now."""
    h = FakeHost()
    _, dead = add_vllm_tree(h, 500, api_alive=False)
    lp, live = add_vllm_tree(h, 600, ppid=h.me)
    h.procs[lp["w0"]].maps.clear()
    h.procs[lp["w1"]].maps.clear()
    h.procs[lp["engine"]].maps.clear()  # its segments are momentarily unheld
    rep = run(h, [dead], live=[live], foreign=True)
    assert set(lp.values()) <= set(h.procs)
    assert {i.name for i in live.ipc} <= h.shm_names()
    assert any("live tree t600" in s["reason"] for s in rep.skipped)


def test_segment_held_by_unrelated_process_survives():
    """A vLLM-named segment mapped by a live unrelated process is skipped, with the holder named."""
    h = FakeHost()
    _, rec = add_vllm_tree(h, 500, api_alive=False)
    h.add_proc(900, 1, 900, ("python", "app.py"), comm="python")
    h.add_shm("psm_decoy", born=h.t - 10_000)
    h.hold(900, "psm_decoy")
    rep = run(h, [rec], foreign=True)
    assert "psm_decoy" in h.shm_names() and 900 in h.procs
    assert {"name": "psm_decoy", "reason": "in use by pid 900 (python)"} in rep.skipped


def test_semaphore_held_under_glibc_temporary_name_survives():
    """A sem.mp-* mapped only as `sem.XXXXXX (deleted)` counts as held (device + inode match)."""
    h = FakeHost()
    h.add_proc(900, 1, 900, ("python", "app.py"))
    h.add_shm("sem.mp-abc", born=h.t - 10_000)
    h.hold(900, "sem.mp-abc", deleted_as="sem.Qw3rTy")
    run(h, [], foreign=True)
    assert "sem.mp-abc" in h.shm_names()


def test_foreign_names_are_never_touched_or_reported():
    """PostgreSQL.* and other non-vLLM names in /dev/shm are left alone, unheld or not."""
    h = FakeHost()
    _, rec = add_vllm_tree(h, 500, api_alive=False)
    h.add_shm("PostgreSQL.1234", born=h.t - 10_000)
    h.add_shm("loky-sem", born=h.t - 10_000)
    rep = run(h, [rec], foreign=True)
    assert {"PostgreSQL.1234", "loky-sem"} <= h.shm_names()
    assert not any("PostgreSQL" in json.dumps(x) for x in (rep.skipped, rep.unlinked))


def test_recorded_non_vllm_name_is_removed_only_with_its_recorded_inode():
    """A name outside the patterns is removed when the ledger recorded it with this device and
    inode; recreated (another inode), it is someone else's and is kept."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, api_alive=False)
    key = h.add_shm("custom_ring", born=h.t - 100)
    rec.ipc.append(IpcRef("custom_ring", "shm", *key, 4096))
    h.add_shm("custom_other", born=h.t - 100)
    rec.ipc.append(IpcRef("custom_other", "shm", 27, 1, 4096))  # recorded inode 1: not this one
    rep = run(h, [rec])
    assert "custom_ring" not in h.shm_names()
    assert "custom_other" in h.shm_names()
    assert any(s["name"] == "custom_other" and "another inode" in s["reason"] for s in rep.skipped)


def test_unheld_object_newer_than_a_live_tree_is_presumed_its():
    """An unheld vLLM-named object no dead tree held, born after a live tree started, is kept;
    one born before is debris and removed."""
    h = FakeHost()
    _, live = add_vllm_tree(h, 600, ppid=h.me, started_at=h.t - 30)
    h.add_shm("psm_new", born=h.t - 10)
    h.add_shm("psm_old", born=h.t - 1000)
    rep = run(h, [], live=[live])
    assert "psm_new" in h.shm_names()
    assert "psm_old" not in h.shm_names()
    assert any(s["name"] == "psm_new" and "presumed its" in s["reason"] for s in rep.skipped)


def test_unheld_object_newer_than_an_unrecorded_live_server_is_presumed_its():
    """The presumption also covers live vLLM servers vsup did not start (not in `live`)."""
    h = FakeHost()
    h.add_proc(700, 1, 700, API_CMD, ct=h.t - 30)
    h.add_shm("psm_new", born=h.t - 10)
    run(h, [], foreign=True)
    assert "psm_new" in h.shm_names() and 700 in h.procs


def test_objects_held_by_orphans_are_theirs_even_when_newer_than_a_live_tree():
    """What an orphan held before the kill is attributed to it and unlinked after it is gone."""
    h = FakeHost()
    _, live = add_vllm_tree(h, 600, ppid=h.me, started_at=h.t - 300)
    h.add_proc(800, 1, 800, ("VLLM::EngineCore",), ct=h.t - 20)
    h.add_shm("psm_orphan", born=h.t - 10)
    h.hold(800, "psm_orphan")
    rep = run(h, [], live=[live], foreign=True)
    assert 800 not in h.procs
    assert "psm_orphan" not in h.shm_names()
    assert {u["name"] for u in rep.unlinked} == {"psm_orphan"}


def test_other_users_processes_and_objects_are_skipped_unless_all_users_as_root():
    """Another user's orphan and segment are skipped; root with all_users removes them."""
    h = FakeHost()
    h.users[1000] = "vsuptest"
    h.add_proc(800, 1, 800, ("VLLM::Worker_TP0",), uid=1000)
    h.add_shm("psm_theirs", uid=1000, born=h.t - 1000)
    rep = run(h, [], foreign=True)
    assert 800 in h.procs and "psm_theirs" in h.shm_names()
    assert {s["name"] for s in rep.skipped} >= {"pid 800 (VLLM::Worker_TP0)", "psm_theirs"}
    rep = run(h, [], foreign=True, all_users=True)
    assert 800 not in h.procs and "psm_theirs" not in h.shm_names()


def test_all_users_needs_root():
    """all_users without root changes nothing: other users' things stay skipped."""
    h = FakeHost(euid=1001)
    h.add_proc(800, 1, 800, ("VLLM::Worker_TP0",), uid=1000)
    h.add_shm("psm_theirs", uid=1000, born=h.t - 1000)
    run(h, [], foreign=True, all_users=True)
    assert 800 in h.procs and "psm_theirs" in h.shm_names()


# ---- foreign orphans -------------------------------------------------------------------------
def test_foreign_orphans_found_by_title_and_session_not_by_ppid_1():
    """Orphans reparented to a subreaper are found; titled children of a live API server are not;
    the tracker in the orphans' session and their untitled descendants go too."""
    h = FakeHost()
    h.add_proc(50, 1, 50, ("containerd-shim",))  # a subreaper
    pids, _ = add_vllm_tree(h, 500, api_alive=False)
    for k in ("tracker", "engine"):
        h.procs[pids[k]].ppid = 50
    h.add_proc(530, pids["w0"], 500, ("python", "-c", "compile-helper"))
    lp, _ = add_vllm_tree(h, 600)  # a live server started by hand: its children are not orphans
    h.add_proc(900, 1, 900, TRACKER_CMD)  # an unrelated program's tracker, alone in its session
    found = {p.pid for p in find_orphans(h.processes(cmdline=True))}
    assert found == {501, 502, 503, 504, 530}
    run(h, [], foreign=True)
    assert set(lp.values()) <= set(h.procs) and 900 in h.procs and 50 in h.procs
    assert not {501, 502, 503, 504, 530} & set(h.procs)


def test_title_is_read_from_cmdline_not_comm():
    """VllmWorkerProcess (0.6.x) in the cmdline marks an orphan; a 15-character comm alone does not."""
    h = FakeHost()
    h.add_proc(800, 1, 800, ("python", "-m", "VllmWorkerProcess"))
    h.add_proc(801, 1, 801, ("python", "worker.py"), comm="VLLM::EngineCor")
    assert {p.pid for p in find_orphans(h.processes(cmdline=True))} == {800}


def test_self_and_ancestors_are_never_targets():
    """vsup never kills itself or its ancestors, even if they sit in a dead tree's session."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, api_alive=False)
    h.add_proc(h.me, pids["engine"], 500, ("vsup", "run"))
    rep = run(h, [rec])
    assert h.me in h.procs and pids["engine"] in h.procs
    assert any(s["name"].startswith(f"pid {h.me}") for s in rep.skipped)


# ---- files -----------------------------------------------------------------------------------
def test_files_in_use_are_not_removed():
    """A recorded store held open by a live process, or a socket path someone listens on, stays."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, api_alive=False)
    h.add_proc(900, 1, 900, ("python", "app.py"))
    dist = rec.files[0].rsplit("/", 1)[1]
    h.hold_tmp(900, dist)
    sock = rec.files[1].rsplit("/", 1)[1]
    h.listen(900, sock)
    rep = run(h, [rec])
    assert f"/faketmp/{dist}" in h.files and f"/faketmp/{sock}" in h.files
    assert {r["name"] for r in rep.remaining} == {f"/faketmp/{dist}", f"/faketmp/{sock}"}


def test_recorded_paths_outside_the_patterns_are_never_removed():
    """A ledger entry naming an arbitrary file (damaged or forged) removes nothing."""
    h = FakeHost()
    _, rec = add_vllm_tree(h, 500, api_alive=False)
    h.add_tmp("important.db")
    rec.files += ["/faketmp/important.db", "/etc/passwd"]
    run(h, [rec])
    assert "/faketmp/important.db" in h.files


def test_dist_store_newer_than_a_live_tree_is_kept_in_foreign_sweep():
    """The foreign sweep of unheld stores and stale sockets spares ones born after a live start."""
    h = FakeHost()
    _, live = add_vllm_tree(h, 600, ppid=h.me, started_at=h.t - 30)
    h.add_tmp("vllm_dist_" + "a" * 32, born=h.t - 10)
    h.add_tmp("vllm_dist_" + "b" * 32, born=h.t - 1000)
    h.add_tmp("12345678-0000-4000-8000-000000000000", socket=True, born=h.t - 1000)
    h.add_tmp("12345678-0000-4000-8000-000000000001", born=h.t - 1000)  # a regular file: not a socket
    run(h, [], live=[live], foreign=True)
    assert "/faketmp/vllm_dist_" + "a" * 32 in h.files
    assert "/faketmp/vllm_dist_" + "b" * 32 not in h.files
    assert "/faketmp/12345678-0000-4000-8000-000000000000" not in h.files
    assert "/faketmp/12345678-0000-4000-8000-000000000001" in h.files


# ---- dry run, report, progress -----------------------------------------------------------------
def test_dry_run_touches_nothing_and_says_what_it_would_do():
    """dry_run signals and removes nothing, and reports the processes, objects and files."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, api_alive=False)
    before = (dict(h.procs), set(h.files))
    rep = run(h, [rec], dry_run=True)
    assert h.signals == [] and h.unlinked == []
    assert (dict(h.procs), set(h.files)) == before
    assert {k["pid"] for k in rep.killed} == {501, 502, 503, 504}
    assert {u["name"] for u in rep.unlinked} == {i.name for i in rec.ipc}
    assert sorted(rep.removed_files) == sorted(rec.files)
    assert rep.dry_run and "would free" in render_table(rep)


def test_every_step_reports_progress():
    """Progress messages cover finding, signalling, unlinking, removing and the summary."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, api_alive=False)
    h.procs[pids["tracker"]].tracker_names = []
    rep = run(h, [rec])
    text = "\n".join(rep.messages)
    for needle in (
        "found 4 process",
        "SIGTERM pid 502",
        "resource tracker",
        "unlinked psm_",
        "removed /faketmp/vllm_dist_",
        "cleanup done",
    ):
        assert needle in text, needle


def test_report_json_has_the_documented_keys():
    """to_json gives the CLI's --json object; clean means nothing remaining."""
    h = FakeHost()
    _, rec = add_vllm_tree(h, 500, api_alive=False)
    rep = run(h, [rec])
    d = json.loads(json.dumps(rep.to_json()))
    assert {"killed", "unlinked", "removed_files", "skipped", "bytes_freed", "remaining", "zombies"} <= set(d)
    assert set(d["killed"][0]) >= {"pid", "name", "sid"}
    assert set(d["unlinked"][0]) >= {"name", "kind", "bytes"}
    assert Report().clean and not Report(remaining=[{"pid": 1, "reason": "x"}]).clean


def test_render_table_lists_remaining_and_totals():
    """The human table names what remains and the bytes freed."""
    rep = Report(
        killed=[{"pid": 5, "name": "VLLM::EngineCore", "sid": 5, "how": "SIGTERM"}],
        unlinked=[{"name": "psm_a", "kind": "shm", "bytes": 2 << 20, "size": 4 << 20, "by": "vsup"}],
        remaining=[{"pid": 6, "name": "VLLM::Worker_TP0", "reason": "still alive 5 s after SIGKILL"}],
        bytes_freed=2 << 20,
        apparent_bytes_freed=4 << 20,
    )
    out = render_table(rep)
    assert "VLLM::EngineCore" in out and "psm_a" in out and "REMAINING" in out
    assert "2.0 MiB allocated (4.0 MiB apparent)" in out and "1 item(s) remaining" in out
    assert render_table(Report()).startswith("nothing to clean")


def test_thousands_of_shm_entries():
    """A /dev/shm with 5000 entries: only the dead tree's and unheld vLLM debris go."""
    h = FakeHost()
    _, rec = add_vllm_tree(h, 500, api_alive=False)
    h.procs[501].tracker_names = []
    for i in range(3000):
        h.add_shm(f"other.{i}", born=h.t - 1000)
    for i in range(2000):
        h.add_shm(f"psm_debris{i}", born=h.t - 1000)
    rep = run(h, [rec])
    assert len(h.shm_names()) == 3000
    assert len(rep.unlinked) == 2000 + 6


# ---- port ------------------------------------------------------------------------------------
def test_port_holder_names_the_listener():
    """port_holder says who listens on a port, or None when nobody does."""
    h = FakeHost()
    h.add_proc(700, 1, 700, API_CMD, comm="python")
    h.listeners[8201] = [700]
    assert port_holder(8201, host=h) == {
        "pid": 700,
        "name": "python",
        "cmdline": list(API_CMD),
        "user": "root",
    }
    assert port_holder(8202, host=h) is None
    h.listeners[8203] = [None]
    assert port_holder(8203, host=h)["pid"] is None


# =============================================================================================
# Real OS: fake vLLM-like trees (tests/fakes/fake_vllm.py), real signals and unlinks.
# =============================================================================================

other_user = other_user_fixture()


@pytest.fixture(scope="module")
def decoys(tmp_path_factory, other_user):
    """What must survive every cleanup: a live tree vsup started (refreshed record), a segment
    held by an unrelated process, a PostgreSQL segment, another user's orphan and segment."""
    base = tmp_path_factory.mktemp("decoys")
    started = []
    try:
        live = FakeTree(base / "live", "--tp", "1", "--segments", "2")
        started.append(live)
        holder = Decoy(base / "holder", "holder", shm=rand_name("psm_vsupdecoy"))
        started.append(holder)
        pg = f"/dev/shm/{rand_name('PostgreSQL.')}"
        Path(pg).write_bytes(b"\0" * 4096)
        other = OtherUserOrphan(other_user)
        started.append(other)
        live.wait_ready()
        refresh(live.rec)
        yield {"live": live, "holder": holder, "pg": pg, "other": other}
    finally:
        for s in started:
            s.stop()
        if "pg" in locals():
            unlink_quiet(pg)


def assert_decoys_intact(d) -> None:
    live, holder, other = d["live"], d["holder"], d["other"]
    assert all(alive(p) for p in live.pids), "live tree lost a process"
    assert all(os.path.exists(f"/dev/shm/{n}") for n in live.shm_names), "live tree lost a segment"
    assert all(os.path.exists(f"/tmp/{n}") for n in live.tmp_names), "live tree lost a file"
    assert alive(holder.pid) and os.path.exists(f"/dev/shm/{holder.shm}")
    assert os.path.exists(d["pg"])
    assert alive(other.pid) and os.path.exists(f"/dev/shm/{other.shm}")


def scoped(d, *trees: FakeTree, extra_sids=()) -> ScopedHost:
    shm = {d["holder"].shm, Path(d["pg"]).name, d["other"].shm, *d["live"].shm_names}
    tmp = set(d["live"].tmp_names)
    for t in trees:
        shm |= set(t.shm_names)
        tmp |= set(t.tmp_names)
    sids = {d["live"].sid, d["holder"].sid, d["other"].sid, *(t.sid for t in trees), *extra_sids}
    return ScopedHost(sids, shm_allow=shm.__contains__, tmp_allow=tmp.__contains__)


@pytest.fixture
def tree_factory(tmp_path):
    trees: list[FakeTree] = []

    def make(*args: str, via_vsup: bool = True) -> FakeTree:
        t = FakeTree(tmp_path / f"tree{len(trees)}", *args, via_vsup=via_vsup)
        trees.append(t)
        t.wait_ready()
        return t

    try:
        yield make
    finally:
        for t in trees:
            t.stop()


def test_real_dead_tree_is_removed_and_decoys_survive(decoys, tree_factory):
    """A vsup-started tree whose API server was SIGKILLed (engine ignoring SIGTERM) is removed:
    processes, segments, semaphores, store and sockets; every decoy survives."""
    t = tree_factory("--ignore-sigterm", "engine", "--hold-dist")
    refresh(t.rec)
    t.kill_api()
    rep = cleanup([t.rec], live=[decoys["live"].rec], host=scoped(decoys, t), grace_s=1.0)
    assert rep.clean, rep.remaining
    assert not any(alive(p) for p in t.pids)
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in t.shm_names)
    assert not any(os.path.exists(f"/tmp/{n}") for n in t.tmp_names)
    assert {"pid": t.info["engine"], "name": "VLLM::EngineCore", "sid": t.sid, "how": "SIGKILL"} in rep.killed
    assert rep.bytes_freed > 0
    assert_decoys_intact(decoys)


def test_real_foreign_orphans_removed_second_run_finds_nothing(decoys, tree_factory):
    """Orphans of a server vsup never started are found by title and session, killed in order,
    their segments and semaphores gone (bytes counted), a zombie reported; a second run finds
    nothing; the decoys, including a live unrecorded server, survive."""
    t = tree_factory("--zombie", via_vsup=False)
    t.kill_api()
    host = scoped(decoys, t)
    rep = cleanup([], foreign=True, host=host, grace_s=2.0)
    assert rep.clean, rep.remaining
    assert {k["pid"] for k in rep.killed} == {t.info["tracker"], t.info["engine"], *t.info["workers"]}
    assert [z["pid"] for z in rep.zombies] == [t.info["zombie"]]
    assert not any(alive(p) for p in t.pids)
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in t.shm_names)
    assert rep.bytes_freed > 0
    assert {u["name"] for u in rep.unlinked} == set(t.shm_names)
    again = cleanup([], foreign=True, host=host, grace_s=2.0)
    assert (again.killed, again.unlinked, again.removed_files, again.remaining) == ([], [], [], [])
    assert_decoys_intact(decoys)


def test_real_other_users_orphan_needs_all_users(other_user, tmp_path):
    """Another user's orphan and segment are skipped; as root with all_users they are removed."""
    o = OtherUserOrphan(other_user)
    try:
        host = ScopedHost({o.sid}, shm_allow={o.shm}.__contains__)
        rep = cleanup([], foreign=True, host=host, grace_s=1.0)
        assert alive(o.pid) and os.path.exists(f"/dev/shm/{o.shm}")
        assert {s["name"] for s in rep.skipped} >= {f"pid {o.pid} (VLLM::Worker_TP0)", o.shm}
        rep = cleanup([], foreign=True, all_users=True, host=host, grace_s=1.0)
        assert rep.clean
        wait_for(lambda: not alive(o.pid), 5, "other user's orphan gone")
        assert not os.path.exists(f"/dev/shm/{o.shm}")
    finally:
        o.stop()


def test_real_pid_reuse_is_not_killed(tmp_path):
    """A recorded pid whose create time differs (the pid was reused) is never signalled."""
    from vsup.proctree import ProcRef, TreeRecord

    p = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        ct = Host().process(p.pid).create_time
        leader = ProcRef(p.pid, ct - 30, "python", ["python"])
        rec = TreeRecord("reuse", "m", 8200, ct - 31, leader, p.pid, p.pid, [leader])
        rep = cleanup([rec], host=ScopedHost({p.pid}), grace_s=0.5)
        assert p.poll() is None and rep.killed == []
    finally:
        p.kill()
        p.wait()


def test_real_thousands_of_entries_in_a_shm_root(tmp_path):
    """3000 entries in a (tmp) shm root: 1000 unheld vLLM debris go, foreign names and a held
    segment stay, and it takes seconds, not minutes."""
    shm = tmp_path / "shm"
    shm.mkdir()
    for i in range(2000):
        (shm / f"other.{i}").write_bytes(b"")
    for i in range(1000):
        (shm / f"psm_{i:06x}").write_bytes(b"x" * 16)
    held = open(shm / "psm_000001", "rb")  # noqa: SIM115 - held by this very process
    try:
        host = ScopedHost(set(), shm_allow=lambda n: True, shm_root=shm, tmp_root=tmp_path / "tmp")
        t0 = time.monotonic()
        rep = cleanup([], host=host)
        took = time.monotonic() - t0
        left = set(os.listdir(shm))
        assert len(left) == 2001 and "psm_000001" in left
        assert len(rep.unlinked) == 999
        assert {
            "name": "psm_000001",
            "reason": f"in use by pid {os.getpid()} ({Host().process(os.getpid()).title})",
        } in rep.skipped
        assert took < 20, took
    finally:
        held.close()


def test_real_unscoped_dry_run_spares_live_trees(decoys):
    """On the whole real host, a foreign dry run targets nothing of a live tree or of the
    decoys, and changes nothing."""
    shm_before = set(os.listdir("/dev/shm"))
    rep = cleanup([], foreign=True, dry_run=True, live=[decoys["live"].rec])
    ours = set(decoys["live"].pids) | {decoys["holder"].pid, decoys["other"].pid}
    assert not ours & {k["pid"] for k in rep.killed}
    protected = {
        *decoys["live"].shm_names,
        decoys["holder"].shm,
        Path(decoys["pg"]).name,
        decoys["other"].shm,
    }
    assert not protected & {u["name"] for u in rep.unlinked}
    assert set(os.listdir("/dev/shm")) >= shm_before & protected
    assert_decoys_intact(decoys)


def test_every_vllm_shm_pattern_is_swept_when_unheld_and_old():
    """Unheld old objects of each known vLLM name (CPU-build cpushm included) are debris; near
    misses are not."""
    h = FakeHost()
    debris = [
        "psm_1a2b",
        "sem.mp-x1y2",
        "nccl-abc",
        "torch_123_456",
        "vllm_mm_x",
        "VLLM_OBJECT_STORAGE_SHM_BUFFER",
        "vllm_offload_a.mmap",
        "vllm_ec_b.mmap",
        "vllm_dist_" + "f" * 32 + "-tp:0-[0-1]-cpushm_0",
    ]
    keep = ["psm", "sem.loky-1", "vllm_offload_a", "my_psm_1", "PostgreSQL.1"]
    for n in debris + keep:
        h.add_shm(n, born=h.t - 1000)
    rep = run(h, [])
    assert h.shm_names() == set(keep)
    assert {u["kind"] for u in rep.unlinked} == {"shm", "sem", "file"}


def test_real_tree_tmpdir_removed_only_when_recorded_and_unused(tmp_path):
    """The private TMPDIR vsup gave a tree goes with the tree, contents and all; an unrecorded
    look-alike stays, and so does a recorded one while a live process holds a file inside."""
    from vsup.proctree import ProcRef, TreeRecord, make_tree_tmpdir

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    ours, busy, stranger = (make_tree_tmpdir(str(tmp)) for _ in range(3))
    for d in (ours, busy, stranger):
        Path(d, "vllm_dist_" + "0" * 32).write_text("x")
        Path(d, "sub").mkdir()
        Path(d, "sub", "f").write_text("y")
    dead = subprocess.Popen(["true"], start_new_session=True)
    dead.wait()
    leader = ProcRef(dead.pid, time.time() - 5, "python", ["python"])
    holder = open(Path(busy, "sub", "f"))  # noqa: SIM115 - a live process (us) holds a file inside
    try:
        rec = TreeRecord(
            "t", "m", 8200, time.time() - 10, leader, dead.pid, dead.pid, [leader], files=[ours, busy]
        )
        host = ScopedHost(set(), shm_root=tmp_path / "shm", tmp_root=tmp)
        (tmp_path / "shm").mkdir()
        rep = cleanup([rec], host=host, grace_s=0.1)
        assert ours in rep.removed_files and not os.path.exists(ours)
        assert os.path.exists(stranger)  # never recorded: not ours
        assert os.path.exists(busy) and [r["name"] for r in rep.remaining] == [busy]
    finally:
        holder.close()
