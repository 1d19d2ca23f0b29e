"""Hang forensics (issue 17): stacks and process facts of a tree, the stuck rank, `vsup stacks`.

Parsing and the stuck-rank analysis run on real captures of vLLM 0.32 (tests/data/stacks/); the
collection runs on real fake trees (tests/fakes/fake_vllm.py: API server, engine core and two
VLLM::Worker_TP* processes, all sleeping in S) with the real py-spy and the real faulthandler.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
import types
from pathlib import Path

import pytest

from fakes.trees import FakeTree
from vsup import diagnose, stacks
from vsup.host import Host
from vsup.signatures import Catalog, CatalogError

DATA = Path(__file__).parent / "data" / "stacks"

needs_py_spy = pytest.mark.skipif(
    stacks.find_py_spy() is None, reason="py-spy is not installed (vsup[stacks])"
)


def _real_report() -> dict:
    """The py-spy capture of a real TP=2 tree with TP1 SIGSTOPped, as a StacksReport."""
    text = (DATA / "vllm-0.32-tp1-stopped.py-spy.txt").read_text()
    parts = re.split(r"^=== (\d+) (.*?) state=(\S+) wchan=(\S+)\n", text, flags=re.M)
    procs = []
    for i in range(1, len(parts), 5):
        pid, title, state, wchan, body = (
            int(parts[i]),
            parts[i + 1].strip(),
            parts[i + 2],
            parts[i + 3],
            parts[i + 4],
        )
        info = types.SimpleNamespace(pid=pid, cmdline=tuple(title.split()), comm=title[:15])
        role, rank = stacks.role_of(info, leader_pid=9983)  # type: ignore[arg-type]  # a ProcInfo-like namespace
        procs.append(
            stacks.ProcessStacks(
                pid=pid,
                create_time=0.0,
                title=title,
                role=role,
                rank=rank,
                state=state,
                wchan=wchan,
                threads=stacks.parse_py_spy(body, pid),
            )
        )
    return stacks.StacksReport("py-spy", "test", 0.0, 3.0, processes=procs, complete=True).to_json()


# ---- parsing and the analysis (real captures) ---------------------------------------------------
def test_py_spy_capture_of_real_vllm_parses_every_process_with_named_frames():
    """Every process of the real capture has a main thread whose frames carry vLLM's names."""
    r = _real_report()
    by_label = {p["label"]: p for p in r["processes"]}
    assert set(by_label) >= {"API server", "engine core", "TP0", "TP1"}
    main = {k: next(t for t in p["threads"] if t["main"]) for k, p in by_label.items()}
    assert main["TP0"]["frames"][1][0] == "_CPUSHMDistributed.all_reduce"
    assert any(
        f[0] == "MultiprocExecutor.collective_rpc.<locals>.get_response"
        for f in main["engine core"]["frames"]
    )
    assert main["TP1"]["frames"][-1][0] == "<module>"
    assert main["API server"]["frames"][0][0] == "Runner.run"


def test_diagnose_names_the_stopped_worker_and_what_the_others_wait_in():
    """TP1 SIGSTOPped: TP1 is the stuck rank; TP0 waits in the all-reduce, the engine core for the workers."""
    v = diagnose.analyze_stacks(_real_report()).to_json()
    assert [s["label"] for s in v["stuck"]] == ["TP1"]
    assert v["stuck"][0]["state"] == "T" and "stopped" in v["stuck"][0]["why"]
    waits = {w["label"]: w for w in v["waiting"]}
    assert waits["TP0"]["signature"] == "cpu_shm_all_reduce"
    assert waits["engine core"]["signature"] == "engine_waits_workers"
    assert waits["API server"]["signature"] == "api_event_loop"
    text = diagnose.render_stacks(v)
    assert "STUCK   TP1" in text and "stopped (state T)" in text


def _proc(label_rank: int | None, role: str, state: str, frames: list[list], pid: int) -> dict:
    p = stacks.ProcessStacks(pid=pid, create_time=0, title=role, role=role, rank=label_rank, state=state)
    p.threads = [
        stacks.ThreadStack(str(pid), "MainThread", None, True, [stacks.Frame.from_json(f) for f in frames])
    ]
    return p.to_json()


COLL = [
    ["__call__", "/v/torch/_ops.py", 1279],
    ["all_reduce", "/v/vllm/distributed/device_communicators/cpu_communicator.py", 275],
]
BLOCKED = [["wait", "/p/threading.py", 327], ["load_weights", "/v/vllm/model_loader.py", 10]]


def test_diagnose_names_a_worker_blocked_in_s_outside_the_collective_its_peer_waits_in():
    """No process stopped: the worker that is not in the collective is the stuck one (state S)."""
    r = {"processes": [_proc(0, "worker", "R", COLL, 10), _proc(1, "worker", "S", BLOCKED, 11)]}
    v = diagnose.analyze_stacks(r).to_json()
    assert [(s["label"], s["state"]) for s in v["stuck"]] == [("TP1", "S")]
    assert "load_weights" in v["stuck"][0]["why"] and "all_reduce" in v["stuck"][0]["why"]


def test_diagnose_every_rank_inside_the_collective_is_the_collective_hanging():
    """All ranks in the all-reduce and none missing: every rank is named, with the custom all-reduce advice."""
    r = {"processes": [_proc(0, "worker", "R", COLL, 10), _proc(1, "worker", "R", COLL, 11)]}
    v = diagnose.analyze_stacks(r).to_json()
    assert {s["label"] for s in v["stuck"]} == {"TP0", "TP1"}
    assert "--disable-custom-all-reduce" in v["stuck"][0]["why"]


def test_faulthandler_dumps_of_real_vllm_parse_and_find_the_main_thread():
    """faulthandler names no thread and its 'Current thread' is any thread: the main one is found by its frames."""
    text = (DATA / "vllm-0.32-faulthandler.log").read_text()
    dumps = ["Fatal Python error:" + c for c in text.split("Fatal Python error:")[1:]]
    mains = []
    for d in dumps:
        threads = stacks.parse_faulthandler(d)
        assert threads and sum(t.main for t in threads) == 1
        mains.append(next(t for t in threads if t.main).frames)
    assert any(f.func == "all_reduce" and f.file.endswith("cpu_communicator.py") for fr in mains for f in fr)
    assert any(f.func == "get_response" for fr in mains for f in fr)


def test_the_catalog_checks_its_stack_signatures_at_load():
    """A stack example matched by an earlier entry, or an unknown category, fails the load with the entry named."""
    base = 'schema = 1\n[[signature]]\nid = "x"\nkind = "ready"\nkeys = ["ok"]\npattern = "ok"\nversions = "all"\nmeaning = ""\naction = ""\nexamples = ["INFO 01-01 00:00:00 [a.py:1] ok"]\n'
    entry = '[[stack]]\nid = "{id}"\ncategory = "{cat}"\npattern = "all_reduce"\nversions = "all"\nmeaning = "m"\nexamples = ["all_reduce (x.py:1)"]\n'
    with pytest.raises(CatalogError, match="unknown category"):
        Catalog.from_toml(base + entry.format(id="a", cat="spinning"))
    with pytest.raises(CatalogError, match="'b': example is matched by stack signature 'a'"):
        Catalog.from_toml(base + entry.format(id="a", cat="collective") + entry.format(id="b", cat="idle"))
    assert len(Catalog.from_toml(base + entry.format(id="a", cat="collective")).stacks) == 1


def test_the_dump_marker_line_makes_the_sigabrt_exits_part_of_a_requested_stop():
    """After vsup's marker, the aborts' generic death lines do not turn a stall into an engine death."""
    lines = [
        "(APIServer pid=1) INFO 12-01 15:00:00 [launcher.py:1] Application startup complete.",
        "(EngineCore pid=2) WARNING 12-01 15:01:00 [shm_broadcast.py:466] No available shared memory broadcast block found in 60 seconds. This typically happens when some processes are hanging or doing some time-consuming work (e.g. compilation, weight/kv cache quantization).",
        f"{stacks.MARKER}: pids 1 2 3 4",
        "Fatal Python error: Aborted",
        "(APIServer pid=1) ERROR 12-01 15:01:01 [async_llm.py:1] AsyncLLM output_handler failed.",
    ]
    assert diagnose.analyze(lines).verdict == "stalled"


# ---- the host seam: the dumper's exit status is never lost ------------------------------------
def test_a_helper_reaped_by_waitpid_minus_one_keeps_its_exit_status():
    """The daemon reaps with waitpid(-1): a helper's status reaches poll_helper through deliver_child, not as 0."""
    host = Host()
    h = host.spawn_helper(["/bin/sh", "-c", "exit 3"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(f"/proc/{h.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.01)
        assert host.reap_children() == []  # the reaper took it, and filed it as the helper's
        assert host.poll_helper(h) == 3
    finally:
        host.close_helper(h)


def test_a_dumper_that_overruns_is_killed_and_collect_returns_within_budget(tmp_path: Path):
    """A stuck dumper never holds the teardown: the report comes by the budget, the dumper is SIGKILLed and reaped."""
    fake_spy = tmp_path / "py-spy"
    fake_spy.write_text("#!/bin/sh\nexec sleep 30\n")
    fake_spy.chmod(0o755)
    me = Host().process(os.getpid())
    assert me is not None
    t0 = time.monotonic()
    report = asyncio.run(
        stacks.collect_pids(
            [me],
            Host(),
            leader_pid=me.pid,
            budget_s=1.0,
            mechanism=stacks.Choice(stacks.PY_SPY, "test", str(fake_spy)),
        )
    )
    took = time.monotonic() - t0
    assert took < 1.5, took
    assert report.processes[0].error == "py-spy did not finish within the budget (killed)"
    assert not report.complete


# ---- choosing the mechanism -----------------------------------------------------------------------
class _Yama(Host):
    def __init__(self, scope: int | None, cap: bool = False) -> None:
        super().__init__()
        self._scope, self._cap = scope, cap

    def ptrace_scope(self) -> int | None:
        return self._scope

    def has_cap_sys_ptrace(self) -> bool:
        return self._cap


@needs_py_spy
def test_yama_scope_1_rules_out_py_spy_and_only_a_teardown_may_fall_back_to_faulthandler():
    """Under ptrace_scope=1 the dumper is the tree's sibling: no py-spy; `vsup stacks` gets the reason, a teardown faulthandler."""
    live = stacks.choose(_Yama(1), may_kill=False)
    assert live.mechanism is None and "not its ancestor" in live.reason and "never on demand" in live.reason
    dying = stacks.choose(_Yama(1), may_kill=True, faulthandler_env=True)
    assert dying.mechanism == stacks.FAULTHANDLER
    assert stacks.choose(_Yama(None)).mechanism == stacks.PY_SPY
    assert stacks.choose(_Yama(0)).mechanism == stacks.PY_SPY
    assert stacks.choose(_Yama(2, cap=True)).mechanism == stacks.PY_SPY
    assert stacks.choose(_Yama(3, cap=True)).mechanism is None


# ---- collection on a real (fake) tree -----------------------------------------------------------
@pytest.fixture
def fake_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")
    t = FakeTree(tmp_path / "tree", "--tmp-root", str(tmp_path))
    try:
        t.wait_ready()
        yield t
    finally:
        for pid in t.pids if t.info else []:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        t.stop()


def _by_label(report: stacks.StacksReport) -> dict[str, stacks.ProcessStacks]:
    return {p.label: p for p in report.processes}


@needs_py_spy
def test_py_spy_collects_every_process_of_a_tree_with_a_stopped_worker(fake_tree: FakeTree):
    """TP=2 fake: all processes' stacks with named frames, facts before anything else (TP1 in T), within budget; nothing dies."""
    tp1 = fake_tree.info["workers"][1]
    os.kill(tp1, signal.SIGSTOP)
    t0 = time.monotonic()
    report = asyncio.run(stacks.collect(fake_tree.rec, Host(), budget_s=3.0, mechanism="py-spy"))
    assert time.monotonic() - t0 < 3.5
    assert report.mechanism == "py-spy" and report.complete, report.render_text()
    procs = _by_label(report)
    assert procs["TP1"].state == "T" and procs["TP1"].wchan == "do_signal_stop"
    assert procs["TP0"].state == "S" and procs["TP0"].cpu_pct is not None and procs["TP0"].threads_total
    funcs = {label: {f.func for t in p.threads for f in t.frames} for label, p in procs.items()}
    assert "worker_main" in funcs["TP0"] and "worker_main" in funcs["TP1"]
    assert "engine_main" in funcs["engine core"] and "api_main" in funcs["API server"]
    assert all(os.path.exists(f"/proc/{pid}") for pid in fake_tree.pids)
    v = diagnose.analyze_stacks(report.to_json()).to_json()
    assert [s["label"] for s in v["stuck"]] == ["TP1"]
    json.dumps(report.to_json())  # the bundle's stacks.json
    # A confirmation sample (the hang check's): a short CPU window, complete within the same budget.
    # How fast it is belongs to the bench (bench_hang), not to a timed assertion on a loaded machine.
    t1 = time.monotonic()
    quick = asyncio.run(
        stacks.collect(fake_tree.rec, Host(), budget_s=3.0, mechanism="py-spy", cpu_window_s=0.1)
    )
    assert quick.complete and time.monotonic() - t1 < 3.5, quick.elapsed_s
    assert set(_by_label(quick)) == set(procs), quick.render_text()


def test_faulthandler_dumps_one_process_at_a_time_and_keeps_the_stopped_state(fake_tree: FakeTree):
    """SIGABRT after SIGCONT, the others frozen: every stack from the log, TP1 reported T, the tracker left alone."""
    tp1 = fake_tree.info["workers"][1]
    os.kill(tp1, signal.SIGSTOP)
    report = asyncio.run(
        stacks.collect(
            fake_tree.rec,
            Host(),
            budget_s=3.0,
            mechanism="faulthandler",
            may_kill=True,
            faulthandler_env=True,
            log_path=fake_tree.log,
        )
    )
    procs = _by_label(report)
    assert report.mechanism == "faulthandler"
    assert procs["TP1"].state == "T"
    for label, fn in (
        ("TP0", "worker_main"),
        ("TP1", "worker_main"),
        ("engine core", "engine_main"),
        ("API server", "api_main"),
    ):
        assert any(f.func == fn for t in procs[label].threads for f in t.frames), (
            label,
            report.render_text(),
        )
    tracker = next(p for p in report.processes if p.role == "resource_tracker")
    assert not tracker.threads and os.path.exists(f"/proc/{tracker.pid}")
    log = fake_tree.log.read_text()
    assert log.count("Fatal Python error: Aborted") == 4 and stacks.MARKER in log
    assert not list(Path(fake_tree.dir / "work").glob("core*"))
    v = diagnose.analyze_stacks(report.to_json()).to_json()
    assert [s["label"] for s in v["stuck"]] == ["TP1"]


@needs_py_spy
def test_the_stacks_socket_handler_never_kills_and_answers_without_a_tree(fake_tree: FakeTree):
    """`stacks` over the socket: py-spy or a reason; faulthandler is never used on demand."""
    from vsup.control import CommandError

    handler = stacks.make_handler(lambda: fake_tree.rec, preference="faulthandler", budget_s=3.0)
    result = asyncio.run(handler(None))
    assert result["mechanism"] == "py-spy"
    assert all(os.path.exists(f"/proc/{pid}") for pid in fake_tree.pids)
    with pytest.raises(CommandError, match="no vLLM server"):
        asyncio.run(stacks.make_handler(lambda: None)(None))
    refused = stacks.make_handler(lambda: fake_tree.rec, host_factory=lambda: _Yama(1))
    r = asyncio.run(refused(None))
    assert r["mechanism"] is None and "ancestor" in r["reason"]
    assert all(p["state"] for p in r["processes"])  # the facts need no ptrace


def test_vsup_diagnose_on_an_incident_bundle_names_the_stuck_rank(tmp_path: Path):
    """`vsup diagnose <bundle dir>` reads stacks.json and prints TP1 as stuck."""
    import subprocess

    b = tmp_path / "20261201T150000Z-hang"
    b.mkdir()
    (b / "stacks.json").write_text(json.dumps(_real_report()))
    (b / "incident.json").write_text(json.dumps({"reason": "hang confirmed", "kind": "hang", "findings": {}}))
    out = subprocess.run(
        [sys.executable, "-m", "vsup", "diagnose", str(b)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "STUCK   TP1" in out.stdout
    js = subprocess.run(
        [sys.executable, "-m", "vsup", "diagnose", str(b), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(js.stdout)["stacks"]["stuck"][0]["label"] == "TP1"


def test_an_incident_bundle_with_stacks_holds_them_and_the_verdict(tmp_path: Path):
    """write_bundle(stacks=...): stacks.json, stacks.txt and the stuck rank in incident.json; diagnose reads it back."""
    from vsup import incidents

    cfg = types.SimpleNamespace(
        state_dir=str(tmp_path / "state"),
        path=str(tmp_path / "vsup.toml"),
        vllm=types.SimpleNamespace(args=[], env={}),
        models={},
    )
    b = incidents.write_bundle(
        cfg,
        reason="hang confirmed",
        kind="hang",
        lines=["(APIServer pid=1) INFO 12-01 15:00:00 [launcher.py:1] Application startup complete."],
        tree=None,
        events=[],
        cleanup=None,
        vllm_version="0.32.0",
        stacks=_real_report(),
    )
    assert b is not None
    summary = json.loads((b / "incident.json").read_text())
    assert summary["stacks"]["stuck"][0]["label"] == "TP1"
    assert "== TP1" in (b / "stacks.txt").read_text()
    assert diagnose.diagnose_bundle(b)["stacks"]["stuck"][0]["label"] == "TP1"


def test_both_mechanisms_work_as_a_non_root_user_without_capabilities(tmp_path: Path):
    """As the unit runs it (another user, empty bounding set): py-spy reads a same-user process, faulthandler dumps one."""
    import shutil
    import subprocess
    import textwrap

    import posix_ipc
    import psutil

    import vsup
    from fakes.trees import OTHER_USER
    from support import readable_copy

    if os.geteuid() != 0:
        pytest.skip("needs root to run a second user")
    spy = stacks.find_py_spy()
    if spy is None:
        pytest.skip("py-spy is not installed")
    import pwd

    try:
        pwd.getpwnam(OTHER_USER)
        created = False
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", OTHER_USER], check=True)
        created = True
    try:
        with readable_copy(vsup, psutil, posix_ipc) as path:
            shutil.copy2(spy, Path(path, "py-spy"))
            code = textwrap.dedent(f"""
                import asyncio, json, os, subprocess, sys, tempfile, time
                sys.path[:0] = [{path!r}]
                from vsup import stacks
                from vsup.host import Host
                log = tempfile.mktemp(prefix="vsup-stacks-log-")
                child_code = "import time\\ndef waits_here():\\n    time.sleep(60)\\nprint('up', flush=True)\\nwaits_here()\\n"
                out = {{}}
                for mech in ("py-spy", "faulthandler"):
                    with open(log, "ab") as f:
                        p = subprocess.Popen([sys.executable, "-c", child_code], stdout=subprocess.PIPE,
                                             stderr=f, env={{**os.environ, "PYTHONFAULTHANDLER": "1"}})
                    p.stdout.readline()
                    info = Host().process(p.pid)
                    r = asyncio.run(stacks.collect_pids([info], Host(), leader_pid=p.pid, budget_s=3.0,
                        mechanism=mech, may_kill=True, faulthandler_env=True, log_path=log,
                        py_spy={str(Path(path, "py-spy"))!r}))
                    out[mech] = r.to_json()
                    p.kill(); p.wait()
                os.unlink(log)
                print(json.dumps(out))
            """)
            res = subprocess.run(
                [
                    "setpriv",
                    f"--reuid={OTHER_USER}",
                    f"--regid={OTHER_USER}",
                    "--clear-groups",
                    "--inh-caps=-all",
                    "--bounding-set=-all",
                    "/usr/bin/python3",
                    "-c",
                    code,
                ],
                capture_output=True,
                text=True,
                timeout=60,
                cwd="/",
            )
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        for mech in ("py-spy", "faulthandler"):
            p = out[mech]["processes"][0]
            assert out[mech]["mechanism"] == mech and p["error"] is None, (mech, p)
            assert any(f[0] == "waits_here" for t in p["threads"] for f in t["frames"]), (mech, p)
    finally:
        if created:
            subprocess.run(["userdel", OTHER_USER], check=False)


def test_persistent_stuck_needs_the_same_frame_twice_and_the_engine_waiting():
    """Confirmation evidence: the stuck rank at the same frame in two samples, the engine core waiting in both."""
    engine = _proc(
        None, "engine_core", "S", [["get_response", "/v/vllm/v1/executor/multiproc_executor.py", 440]], 9
    )
    idle_engine = _proc(
        None, "engine_core", "S", [["_process_input_queue", "/v/vllm/v1/engine/core.py", 1588]], 9
    )
    hung = {"processes": [engine, _proc(0, "worker", "R", COLL, 10), _proc(1, "worker", "S", BLOCKED, 11)]}
    assert [s["label"] for s in diagnose.persistent_stuck(hung, hung)] == ["TP1"]
    moved = {"processes": [engine, _proc(0, "worker", "R", COLL, 10), _proc(1, "worker", "S", COLL[1:], 11)]}
    assert diagnose.persistent_stuck(hung, moved) == []
    idle = {
        "processes": [idle_engine, _proc(0, "worker", "R", COLL, 10), _proc(1, "worker", "S", BLOCKED, 11)]
    }
    assert diagnose.persistent_stuck(hung, idle) == []


# ---- through the daemon (fake OpenAI server) ----------------------------------------------------
@needs_py_spy
def test_a_confirmed_hang_records_stacks_into_its_incident_before_the_teardown(fake_daemon) -> None:
    """The owner dumps the hung tree (py-spy) before tearing it down; the bundle holds the API server's frames."""
    from support import wait_for

    d = fake_daemon("hang_after_ready")
    first = d.wait_state("ready", timeout=30)
    ev = d.wait_event(
        lambda e: e["event"] == "incident" and e.get("kind") == "hang", 60, "the hang's incident"
    )
    dumped = next(e for e in d.events() if e["event"] == "stacks")
    assert dumped["mechanism"] == "py-spy" and dumped["complete"], dumped
    assert dumped["seconds"] < 3.0
    evs = d.events()
    hung = next(
        i for i, e in enumerate(evs) if e["event"] == "state" and "hang confirmed" in (e["reason"] or "")
    )
    after = [e["event"] for e in evs[hung:]]
    assert after.index("stacks") < after.index("teardown"), after  # before the kill, not after
    report = json.loads((Path(ev["path"]) / "stacks.json").read_text())
    api = next(p for p in report["processes"] if p["pid"] == first["pid"])
    assert api["role"] == "api_server" and api["threads"] and api["state"] in ("R", "S")
    wait_for(lambda: d.status()["restarts"] >= 1, 40, "the restart after the hang")


@needs_py_spy
def test_vsup_stacks_over_the_socket_leaves_the_server_serving(fake_daemon) -> None:
    """`vsup stacks` (read permission) prints every process's stacks; the server stays ready; no tree: a clear error."""
    d = fake_daemon()
    s = d.wait_state("ready", timeout=30)
    out = d.cli("stacks", "--json", timeout=60)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["mechanism"] == "py-spy" and r["complete"]
    assert any(p["pid"] == s["pid"] and p["threads"] for p in r["processes"])
    text = d.cli("stacks", timeout=60)
    assert text.returncode == 0 and f"pid {s['pid']}" in text.stdout
    assert d.status()["state"] == "ready" and d.status()["pid"] == s["pid"]
    d.call("stop", timeout=60)
    d.wait_state("stopped", timeout=30)
    gone = d.cli("stacks", timeout=60)
    assert gone.returncode == 1 and "no vLLM server is running" in gone.stderr


def test_faulthandler_before_a_hang_teardown_changes_neither_kind_nor_ladder_nor_root_cause(
    fake_daemon,
) -> None:
    """daemon.stacks = faulthandler: the SIGABRT exit and 'Fatal Python error' lines stay part of the hang's teardown."""
    from support import wait_for

    d = fake_daemon("hang_after_ready", extra={"daemon": {"stacks": "faulthandler"}})
    first = d.wait_state("ready", timeout=30)
    ev = d.wait_event(
        lambda e: e["event"] == "incident" and e.get("kind") == "hang", 60, "the hang's incident"
    )
    wait_for(lambda: d.status()["restarts"] >= 1, 40, "the restart after the hang")
    evs = d.events()
    dumped = next(e for e in evs if e["event"] == "stacks")
    assert dumped["mechanism"] == "faulthandler" and dumped["complete"], dumped
    report = json.loads((Path(ev["path"]) / "stacks.json").read_text())
    api = next(p for p in report["processes"] if p["pid"] == first["pid"])
    assert any(t["frames"] for t in api["threads"]), api
    assert "Fatal Python error: Aborted" in d.log_file.read_text()  # the dump really went through the log
    stops = [e for e in evs if e["event"] == "state" and e["state"] == "stopping"]
    assert len(stops) == 1 and stops[0]["reason"].startswith("hang confirmed"), stops
    remedies = [e for e in evs if e["event"] == "remedy_applied"]
    assert [r["failure_kind"] for r in remedies] == ["hang"], remedies
    summary = json.loads((Path(ev["path"]) / "incident.json").read_text())
    assert summary["kind"] == "hang" and summary["findings"].get("verdict") != "engine_dead", summary[
        "findings"
    ]
    assert "Aborted" not in (summary["findings"].get("root_cause") or "")


def test_a_running_rank_outside_the_collective_is_computing_not_stuck():
    """One sample of a busy server: TP0 in the all-reduce, TP1 in R still computing: nobody is named."""
    busy = _proc(1, "worker", "R", [["forward", "/v/vllm/model_executor/models/llama.py", 418]], 11)
    v = diagnose.analyze_stacks({"processes": [_proc(0, "worker", "R", COLL, 10), busy]}).to_json()
    assert v["stuck"] == [] and "no rank stands out" in v["summary"]


def test_stacks_is_a_read_permission_command():
    """`stacks` is answered to read_users/read_groups, like status, events and diagnose."""
    from vsup import control

    assert "stacks" in control.DEFAULT_READ_ONLY_COMMANDS


# ---- a real torch.distributed group (tests/fakes/tp_tree.py: gloo all-reduce loop) -------------
def test_a_rank_stopped_mid_loop_leaves_its_peer_asleep_in_the_collective(tmp_path: Path) -> None:
    """TP=2 gloo fake, TP1 SIGSTOPped: TP0 blocks inside torch's all_reduce (S, not R); diagnose names TP1."""
    from fakes.tp_tree import start_job
    from support import VLLM_PY, wait_for
    from vsup import proctree

    if not VLLM_PY.exists():
        pytest.fail(f"{VLLM_PY} is missing: the TP fake needs an interpreter with torch; run `make vllm`")
    if stacks.find_py_spy() is None:
        pytest.skip("py-spy is not installed")
    job = start_job(str(VLLM_PY), tmp_path, spawn=proctree.spawn, name="stacks")
    tp0, tp1 = job.workers
    try:
        os.kill(tp1, signal.SIGSTOP)
        before = job.rounds()[0]

        def tp0_blocked() -> bool:
            p = job.progress()[0]
            return p is not None and p.rounds == before and p.phase == 1  # PHASE_IN_COLLECTIVE

        wait_for(tp0_blocked, 30, "TP0 blocked in a round")
        assert job.record is not None
        report = asyncio.run(stacks.collect(job.record, Host(), budget_s=3.0, mechanism="py-spy"))
        by = {p.label: p for p in report.processes}
        assert by["TP1"].state == "T" and by["TP0"].state == "S", report.render_text()
        v = diagnose.analyze_stacks(report.to_json()).to_json()
        assert [s["label"] for s in v["stuck"]] == ["TP1"]
        tp0_row = next(w for w in v["waiting"] if w["label"] == "TP0")
        assert tp0_row["signature"] == "torch_collective", tp0_row
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(tp1, signal.SIGCONT)
        job.teardown()
