"""proctree: spawning a tree, recording what it is made of, and the ledger."""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fakes.fake_host import API_CMD, FakeHost, add_vllm_tree
from fakes.trees import FakeTree, alive, kill_session, wait_for
from vsup.host import Host
from vsup.proctree import (
    DIST_ATTRIBUTION_WINDOW_S,
    IpcRef,
    Ledger,
    ProcRef,
    TreeRecord,
    live_members,
    make_tree_tmpdir,
    refresh,
    share_torch_caches,
    spawn,
    tree_members,
)


# ---- spawn -----------------------------------------------------------------------------------
def test_spawn_new_session_log_appended_and_no_fd_kept(tmp_path):
    """The child leads its own session, reads /dev/null, writes stdout and stderr to the log
    opened for append, does not inherit our other fds, and we keep no fd on the log."""
    log = tmp_path / "vllm.log"
    log.write_text("earlier line\n")
    leak_r, leak_w = os.pipe()
    os.set_inheritable(leak_w, True)
    code = "import os,sys,time; print('out', flush=True); print('err', file=sys.stderr, flush=True); time.sleep(30)"
    popen, rec = spawn([sys.executable, "-c", code], dict(os.environ), log, model="m", port=8200)
    try:
        wait_for(lambda: "err" in log.read_text(), 10, "child output")
        assert log.read_text().startswith("earlier line\nout\n")
        assert os.getsid(popen.pid) == popen.pid == os.getpgid(popen.pid)
        assert (rec.sid, rec.pgid, rec.leader.pid) == (popen.pid,) * 3
        fds = {fd: os.readlink(f"/proc/{popen.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{popen.pid}/fd")}
        assert fds["0"] == "/dev/null" and fds["1"] == str(log) and fds["2"] == str(log)
        assert len(fds) == 3, fds  # close_fds: the inheritable pipe end did not leak
        assert str(log) not in {
            os.readlink(f"/proc/self/fd/{fd}")
            for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")
        }
        # btime in /proc/stat is whole seconds, so create times run up to 1 s early.
        assert rec.started_at <= rec.leader.create_time + 1.0
        assert rec.leader.create_time == pytest.approx(Host().process(popen.pid).create_time)
    finally:
        os.close(leak_r)
        os.close(leak_w)
        popen.kill()
        popen.wait()


# ---- refresh on a real fake tree -------------------------------------------------------------
@pytest.fixture
def tree(tmp_path):
    t = FakeTree(tmp_path / "t", "--hold-dist")
    try:
        t.wait_ready()
        yield t
    finally:
        t.stop()


def test_refresh_records_processes_objects_and_files(tree):
    """refresh records all five processes, the 4 psm_* and 2 sem.mp-* by device and inode (the
    semaphores under their real names, not glibc's temporary ones), the store and the 3 sockets."""
    rec = refresh(tree.rec)
    assert {p.pid for p in rec.procs} == set(tree.pids)
    assert {p.name for p in rec.procs} >= {
        "VLLM::EngineCore",
        "VLLM::Worker_TP0",
        "VLLM::Worker_TP1",
        "resource_tracker",
    }
    assert {i.name for i in rec.ipc} == set(tree.shm_names)
    for i in rec.ipc:
        st = os.stat(f"/dev/shm/{i.name}")
        assert (i.dev, i.ino) == (st.st_dev, st.st_ino)
        assert i.kind == ("sem" if i.name.startswith("sem.") else "shm")
    assert set(rec.files) == {tree.info["dist"], *tree.info["sockets"]}
    n = (len(rec.procs), len(rec.ipc), len(rec.files))
    refresh(rec)
    assert (len(rec.procs), len(rec.ipc), len(rec.files)) == n  # idempotent


def test_refresh_is_cheap(tree):
    """refresh of a 5-process tree takes well under the 20 ms aim (median of 10, on a busy box
    allowing 50 ms)."""
    refresh(tree.rec)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        refresh(tree.rec)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"refresh median {med * 1000:.1f} ms, max {max(times) * 1000:.1f} ms")
    assert med < 0.05


def test_members_survive_api_server_death_and_vanish_with_the_session(tree):
    """After the API server is SIGKILLed the reparented members are still the tree's; once the
    session is killed no live member remains (zombies do not count)."""
    refresh(tree.rec)
    tree.kill_api()
    members = {p.pid for p in live_members(tree.rec)}
    assert members == {tree.info["tracker"], tree.info["engine"], *tree.info["workers"]}
    kill_session(tree.sid)
    wait_for(lambda: not any(alive(p) for p in members), 10, "session gone")
    assert live_members(tree.rec) == []


# ---- membership rules on a fake host ---------------------------------------------------------
def test_unrecorded_members_found_by_session_and_by_descent():
    """A member never recorded is found by the session id; a child that left the session by its
    parent; a stranger in another session is not."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, record=False)
    h.add_proc(520, pids["w0"], 520, ("python", "helper"))
    h.add_proc(900, 1, 900, ("python", "x"))
    found = {p.pid for p in tree_members(rec, h.processes())}
    assert found == {*pids.values(), 520}


def test_live_members_exclude_zombies():
    """live_members leaves out zombies of the tree."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500)
    h.procs[pids["w1"]].state = "Z"
    assert pids["w1"] not in {p.pid for p in live_members(rec, host=h)}
    assert pids["w0"] in {p.pid for p in live_members(rec, host=h)}


def test_session_id_reused_by_another_leader_is_not_ours():
    """If the tree's session-id pid is now a different process, its session is not the tree."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, record=False)
    h.procs[500].create_time += 10  # pid 500 is now someone else (and so is its session)
    assert tree_members(rec, h.processes()) == []


def test_unheld_dist_store_attributed_by_time_unless_ambiguous():
    """An unheld vllm_dist_* born after the tree started is recorded; not when another vLLM
    process started shortly before it appeared, nor when it appeared long after the start."""
    h = FakeHost()
    pids, rec = add_vllm_tree(h, 500, record=False, started_at=h.t - 60)
    h.add_tmp("vllm_dist_" + "1" * 32, born=h.t - 50)
    refresh(rec, host=h)
    assert "/faketmp/vllm_dist_" + "1" * 32 in rec.files

    h2 = FakeHost()
    _, rec2 = add_vllm_tree(h2, 500, record=False, started_at=h2.t - 60)
    h2.add_proc(700, 1, 700, API_CMD, ct=h2.t - 58)  # another server starting beside ours
    h2.add_tmp("vllm_dist_" + "2" * 32, born=h2.t - 50)
    h2.add_tmp("vllm_dist_" + "3" * 32, born=h2.t - 60 + DIST_ATTRIBUTION_WINDOW_S + 10)
    refresh(rec2, host=h2)
    assert not any("vllm_dist_" in f for f in rec2.files if "2222" in f or "3333" in f)


# ---- records and ledger ----------------------------------------------------------------------
procrefs = st.builds(
    ProcRef,
    pid=st.integers(1, 4_000_000),
    create_time=st.floats(0, 2e9, allow_nan=False),
    name=st.text(max_size=20),
    cmdline=st.lists(st.text(max_size=30), max_size=5),
)
records = st.builds(
    TreeRecord,
    id=st.text(min_size=1, max_size=12),
    model=st.text(max_size=40),
    port=st.integers(1, 65535),
    started_at=st.floats(0, 2e9, allow_nan=False),
    leader=procrefs,
    sid=st.integers(1, 4_000_000),
    pgid=st.integers(1, 4_000_000),
    procs=st.lists(procrefs, max_size=5),
    ipc=st.lists(
        st.builds(
            IpcRef,
            name=st.text(min_size=1, max_size=20),
            kind=st.sampled_from(["shm", "sem", "file"]),
            dev=st.integers(0, 2**32),
            ino=st.integers(0, 2**63),
            size=st.integers(0, 2**40),
        ),
        max_size=5,
    ),
    files=st.lists(st.text(max_size=40), max_size=5),
    ended=st.booleans(),
)


@given(records)
def test_tree_record_json_round_trip(rec):
    """to_json/from_json round-trips any record, through real JSON text."""
    assert TreeRecord.from_json(json.loads(json.dumps(rec.to_json()))) == rec


def test_ledger_save_load_upsert_remove(tmp_path):
    """The ledger keeps records across instances, replaces by id, removes by id, leaves no temp files."""
    h = FakeHost()
    _, a = add_vllm_tree(h, 500)
    _, b = add_vllm_tree(h, 600)
    led = Ledger(tmp_path / "state")
    assert led.load() == []
    led.save([a])
    led.upsert(b)
    a.ended = True
    led.upsert(a)
    loaded = Ledger(tmp_path / "state").load()
    assert [r.id for r in loaded] == [b.id, a.id] and loaded[1].ended
    led.remove(b.id)
    assert [r.id for r in led.load()] == [a.id]
    assert sorted(os.listdir(tmp_path / "state")) == ["ledger.json"]


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"trees": [{"id": 1}]}', b"\x00\xff"])
def test_corrupt_ledger_is_moved_aside_and_empty(tmp_path, caplog, body):
    """A ledger that cannot be read is renamed to ledger.json.corrupt-<ts>, logged, and read as empty."""
    (tmp_path / "ledger.json").write_bytes(body)
    with caplog.at_level(logging.ERROR, logger="vsup.proctree"):
        assert Ledger(tmp_path).load() == []
    aside = [n for n in os.listdir(tmp_path) if n.startswith("ledger.json.corrupt-")]
    assert len(aside) == 1 and (tmp_path / aside[0]).read_bytes() == body
    assert not (tmp_path / "ledger.json").exists()
    assert "corrupt" in caplog.text


# ---- private TMPDIR and torch's caches --------------------------------------------------------


def test_torch_cache_is_shared_through_a_link_that_cleanup_does_not_follow(tmp_path):
    """torch resolves its cache (and always its precompiled headers) under
    `<TMPDIR>/torchinductor_<user>`: the tree's private TMPDIR links that name to the shared
    directory a bare vLLM would use, so compiled kernels survive restarts; removing the tree's
    TMPDIR removes the link and nothing behind it."""
    import shutil

    tree = make_tree_tmpdir(str(tmp_path))
    shared = share_torch_caches(tree, {"USER": "alice"})
    assert shared == str(tmp_path / "torchinductor_alice")
    assert os.readlink(os.path.join(tree, "torchinductor_alice")) == shared
    assert os.stat(shared).st_mode & 0o777 == 0o755
    # What the child does: makedirs through the link, then writes a header there.
    os.makedirs(os.path.join(tree, "torchinductor_alice", "precompiled_headers"), exist_ok=True)
    Path(tree, "torchinductor_alice", "precompiled_headers", "h.gch").write_text("pch")
    shutil.rmtree(tree)  # what host.remove_dir does
    assert Path(shared, "precompiled_headers", "h.gch").read_text() == "pch"
    # A second tree reuses the same directory.
    tree2 = make_tree_tmpdir(str(tmp_path))
    assert share_torch_caches(tree2, {"USER": "alice"}) == shared
    assert Path(tree2, "torchinductor_alice", "precompiled_headers", "h.gch").exists()


@pytest.mark.parametrize(
    "env, want",
    [({"LOGNAME": "a", "USER": "b"}, "torchinductor_a"), ({"USER": "x/y"}, "torchinductor_x_y"), ({}, None)],
)
def test_torch_cache_name_follows_the_childs_environment_as_getpass_does(tmp_path, env, want):
    import pwd

    tree = make_tree_tmpdir(str(tmp_path))
    shared = share_torch_caches(tree, env)
    assert os.path.basename(shared) == (want or f"torchinductor_{pwd.getpwuid(os.getuid()).pw_name}")


def test_torch_cache_not_shared_when_the_shared_name_is_a_link_a_file_or_someone_elses(tmp_path, caplog):
    """A planted cache would be code the server loads: vsup shares only a real directory owned
    by its own uid, and otherwise leaves the tree to compile into its private TMPDIR."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "torchinductor_link").symlink_to(elsewhere)
    (tmp_path / "torchinductor_file").write_text("")
    (tmp_path / "torchinductor_other").mkdir()
    if os.getuid() == 0:
        os.chown(tmp_path / "torchinductor_other", 65534, 65534)
    users = ["link", "file"] + (["other"] if os.getuid() == 0 else [])
    with caplog.at_level(logging.WARNING, logger="vsup.proctree"):
        for user in users:
            tree = make_tree_tmpdir(str(tmp_path))
            assert share_torch_caches(tree, {"USER": user}) is None
            assert os.listdir(tree) == []
    assert caplog.text.count("not sharing torch cache") == len(users)
