"""The owner's command answers and the forced exit against the real vLLM 0.32 (TP=2, CPU):
issue 14's acceptance (reload/restart while starting, busy while reloading, stop cancelling a
reload) and issue 22's (SIGTERM twice while serving). One daemon, scenarios in order; a real
start costs ~40 s here, so each scenario starts from where the previous one left the server."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import pytest

from support import (
    MODELS,
    Daemon,
    LedgerWatch,
    free_port,
    real_sections,
    require_real_vllm,
    session_pids,
    wait_for,
)

pytestmark = pytest.mark.vllm

READY_S = 240


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory):
    require_real_vllm()
    sections = real_sections(free_port(8000, 8049))
    sections["models.tiny-a"] = {"model": str(MODELS / "tiny-a"), "served_model_name": "tiny-a"}
    sections["models.tiny-b"] = {"model": str(MODELS / "tiny-b"), "served_model_name": "tiny-b"}
    d = Daemon(tmp_path_factory.mktemp("owner-real"), sections)
    watch = LedgerWatch(d.state_dir)
    watch.start()
    d.watch = watch  # type: ignore[attr-defined]  # rides along with the fixture
    try:
        d.start()
        yield d
    finally:
        watch.close()
        d.close()


def in_background(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


def starting_tree(d: Daemon) -> int:
    """Wait until a server was spawned and is loading; its session id."""
    s = wait_for(
        lambda: (x := d.status())["state"] == "starting" and x["phase"] == "readiness" and x["pid"] and x,
        60,
        "a spawned server loading",
        0.2,
    )
    time.sleep(3)  # let it form: engine core and workers exist (they must be torn down too)
    return int(s["pid"])


def no_traceback(d: Daemon) -> None:
    assert d.proc is not None and d.proc.poll() is None, "the daemon exited"
    assert "Traceback" not in d.stderr_path.read_text()
    assert not [e for e in d.events() if e["event"] == "internal_error"]


def test_reload_b_while_starting_serves_b(real: Daemon) -> None:
    """`reload tiny-b` while tiny-a loads: the start is cancelled, its tree torn down and
    cleaned, tiny-b serves; no traceback, the daemon keeps running."""
    sid = starting_tree(real)
    r = real.cli("reload", "tiny-b")
    assert r.returncode == 0, r.stderr
    s = real.status()
    assert s["state"] == "ready" and s["model"] == "tiny-b"
    assert session_pids(sid) == []
    no_traceback(real)


def test_restart_while_starting_serves_again(real: Daemon) -> None:
    """An operator start that is loading, then `restart`: the start's reply says it was
    interrupted, its tree is gone, the model serves."""
    assert real.cli("stop").returncode == 0
    t, out = in_background(lambda: real.call("start", timeout=READY_S))
    sid = starting_tree(real)
    r = real.cli("restart")
    assert r.returncode == 0, r.stderr
    t.join(30)
    assert out and out[0]["ok"] is False and "interrupted by restart" in out[0]["error"]["message"], out
    assert real.status()["state"] == "ready"
    assert session_pids(sid) == []
    no_traceback(real)


def test_reloading_answers_busy_and_stop_cancels_it(real: Daemon) -> None:
    """While a reload runs, reload and restart are busy; stop cancels it (reply: failed,
    cancelled by stop), the trees are torn down and cleaned, the state is stopped."""
    old = real.status()["pid"]
    t, out = in_background(lambda: real.call("reload", {"model": "tiny-a"}, timeout=READY_S))
    wait_for(
        lambda: (x := real.status())["state"] == "reloading" and x["phase"] == "ready",
        60,
        "the new start",
        0.2,
    )
    new = real.status()["pid"]
    for cmd, args in (("reload", {"model": "tiny-b"}), ("restart", {})):
        r = real.call(cmd, args)
        assert r["ok"] is False and r["error"]["code"] == "busy", (cmd, r)
    r = real.call("stop", timeout=120)
    assert r["ok"], r
    t.join(30)
    assert out and out[0]["ok"] is False and "cancelled by stop" in out[0]["error"]["message"], out
    assert real.status()["state"] == "stopped"
    assert session_pids(old) == [] and session_pids(new) == []
    watch: LedgerWatch = real.watch  # type: ignore[attr-defined]  # set by the fixture
    watch.poll()
    assert not any(watch.left().values()), watch.left()  # both trees cleaned, not only killed
    no_traceback(real)


def test_sigterm_twice_while_serving_leaves_nothing(real: Daemon) -> None:
    """`vsup run` given SIGTERM twice 0.2 s apart while serving: the tree is killed and its
    segments, semaphores and files removed; nothing of any tree this daemon ran is left."""
    r = real.cli("start", timeout=READY_S)
    assert r.returncode == 0, r.stderr
    real.wait_state("ready", timeout=READY_S)  # run alone, the fixture's own start may still load
    wait_for(lambda: len(real.status()["tree"]["pids"]) >= 4, 30, "the tree recorded", 0.5)
    time.sleep(2.5)  # one more refresh: the segments the workers map are in the ledger
    assert real.proc is not None
    real.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)  # "0.2 s apart" is the scenario itself
    real.proc.send_signal(signal.SIGTERM)
    assert real.proc.wait(15) == 1
    watch: LedgerWatch = real.watch  # type: ignore[attr-defined]  # set by the fixture
    watch.close()
    last = real.events()[-1]
    print(f"forced exit: {last}")
    assert last["event"] == "forced_exit" and "not_done" not in last, last
    wait_for(lambda: not any(watch.left().values()), 5, "nothing of the tree left", 0.2, watch.left)
    assert watch.shm, "the ledger recorded the tree's segments"
