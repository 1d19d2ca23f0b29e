"""The daemon process around the owner (runtime.py): signals, the forced exit, stdlib logging,
check-config without a config. Real `vsup run` processes supervising the fake servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from support import FAKES, ROOT, VSUP, alive, session_pids, wait_for
from vsup import proctree

FAKE_TREE = {
    "module": "fake_vllm_tree",
    "env": {"PYTHONPATH": f"{FAKES}:{ROOT / 'tests' / 'systemd'}"},
}


def _recorded(d) -> proctree.TreeRecord:
    """The live tree's ledger record once it lists the engine child and the segment it maps."""

    def full() -> proctree.TreeRecord | None:
        recs = proctree.Ledger(d.state_dir).load()
        return next((r for r in recs if len(r.procs) >= 2 and r.ipc), None)

    return wait_for(full, 20, "the tree's child and segment in the ledger")


def test_second_signal_kills_the_tree_and_cleans_at_once(fake_daemon) -> None:
    """Issue 22: SIGTERM, then SIGTERM 0.2 s later while the teardown waits out a 30 s stop
    grace (the engine-like child ignores its parent's stop): the tree is SIGKILLed, its segment
    and files removed, the ledger emptied, and vsup gone, within 5 s of the second signal; the
    last event says what was skipped."""
    d = fake_daemon(
        env=FAKE_TREE["env"], extra={"vllm": {"module": "fake_vllm_tree"}, "timeouts": {"stop_grace_s": 30.0}}
    )
    s = d.wait_state("ready", timeout=30)
    rec = _recorded(d)
    shm = [i.name for i in rec.ipc]
    d.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # "0.2 s apart" is the scenario itself
    d.proc.send_signal(signal.SIGTERM)
    second = time.monotonic()
    assert d.proc.wait(10) == 1
    wait_for(lambda: not session_pids(s["pid"]), 5 - (time.monotonic() - second), "the tree's processes gone")
    assert [n for n in shm if os.path.exists(f"/dev/shm/{n}")] == []
    assert [f for f in rec.files if os.path.lexists(f)] == []
    assert proctree.Ledger(d.state_dir).load() == []
    assert not d.socket.exists()  # no stale control socket either
    last = d.events()[-1]
    assert last["event"] == "forced_exit" and "GPU release wait" in last["skipped"], last
    assert "not_done" not in last, last


def test_finding8_sigusr1_does_not_end_the_daemon(fake_daemon) -> None:
    """Issue 20, finding 8: logrotate scripts send SIGUSR1, whose default action ended vsup with
    no teardown (the tree orphaned, the socket stale). SIGUSR1, SIGUSR2 and SIGALRM are logged
    and ignored; the model keeps serving under the same pid."""
    d = fake_daemon()
    s = d.wait_state("ready", timeout=30)
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM):
        d.proc.send_signal(sig)
    d.wait_event(lambda e: e["event"] == "signal_ignored" and e["signal"] == "SIGALRM", 10, "SIGALRM logged")
    assert d.proc.poll() is None
    after = d.status()
    assert after["state"] == "ready" and after["pid"] == s["pid"] and alive(s["pid"])
    assert {e["signal"] for e in d.events() if e["event"] == "signal_ignored"} >= {
        "SIGUSR1",
        "SIGUSR2",
        "SIGALRM",
    }


def test_stdlib_log_calls_reach_the_event_log(fake_daemon) -> None:
    """A corrupt ledger is reported through the stdlib logger of proctree: it must reach the
    event log (it reached no handler before)."""
    d = fake_daemon(start=False)
    d.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (d.state_dir / "ledger.json").write_text("{not json")
    d.start()
    d.wait_state("ready", timeout=30)
    logs = [e for e in d.events() if e["event"] == "log"]
    assert any("corrupt" in e["message"] and e["logger"] == "vsup.proctree" for e in logs), logs


def test_check_config_explain_needs_no_config(tmp_path: Path) -> None:
    """`vsup check-config --explain` is the first thing a new operator runs: with no config file
    anywhere (no VSUP_CONFIG, no /etc/vsup) it exits 0 and lists every key."""
    env = {k: v for k, v in os.environ.items() if k != "VSUP_CONFIG"}
    env["PYTHONPATH"] = str(ROOT / "supervisor")
    r = subprocess.run(
        [*VSUP, "check-config", "--explain"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    for key in ("[vllm]", "python =", "[timeouts]", "kill_wait_s", "[restart]", "[probes]"):
        assert key in r.stdout, key
    assert sys.executable  # the interpreter the suite runs under ran it
