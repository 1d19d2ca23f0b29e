"""The daemon's state machine against a fake OpenAI server: fast, exhaustive, real processes.

Each test starts `vsup run` as a real process supervising tests/fakes/fake_api_server.py with
a misbehaviour flag, then asserts on status, the event stream and the processes left behind.
The state table in vsup.states is the oracle for every transition the events show.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import pytest

from support import alive, session_pids, wait_for
from vsup.states import TRANSITIONS, State


def transitions(events: list[dict]) -> list[tuple[str, str]]:
    return [(e["old"], e["state"]) for e in events if e["event"] == "state"]


def assert_legal(events: list[dict]) -> None:
    for old, new in transitions(events):
        if old != new:
            assert State(new) in TRANSITIONS[State(old)], f"illegal {old} -> {new}"


def test_ready_only_after_canary(fake_daemon) -> None:
    """`ready` is declared only after health, the model list and a canary completion succeeded."""
    d = fake_daemon()
    s = d.wait_state("ready", timeout=30)
    assert s["model"] == "fake-model" and s["pid"]
    evs = d.events()
    order = [(e["event"], e.get("probe")) for e in evs if e["event"] in ("probe", "ready")]
    assert order.index(("probe", "canary")) < order.index(("ready", None))
    assert [p for p in order if p[0] == "probe"][:3] == [
        ("probe", "health"),
        ("probe", "models"),
        ("probe", "canary"),
    ]
    assert_legal(evs)


def test_exit_status_zero_is_still_a_failure_and_restarts(fake_daemon) -> None:
    """A server that exits 0 on its own (as vLLM does after a worker dies) is restarted."""
    d = fake_daemon()
    s = d.wait_state("ready", timeout=30)
    os.kill(s["pid"], signal.SIGTERM)  # the fake exits 0 on SIGTERM
    wait_for(
        lambda: (x := d.status())["restarts"] == 1 and x["state"] == "ready" and x["pid"] != s["pid"],
        30,
        "an automatic restart",
    )
    assert any(e["event"] == "incident" for e in d.events())
    assert_legal(d.events())


def test_crash_loop_ends_in_failed_with_reason(fake_daemon) -> None:
    """A server that exits at once every time ends in `failed` after max_failures, with the reason."""
    d = fake_daemon("exit_at_start")
    s = d.wait_state("failed", timeout=60)
    assert "3 failures" in s["reason"]
    assert "Engine core initialization failed" in s["reason"] or "EngineCore failed to start" in s["reason"]
    spawns = [e for e in d.events() if e["event"] == "spawned"]
    assert len(spawns) == 3
    assert_legal(d.events())
    # an operator start leaves failed (and fails again: the fake still exits)
    r = d.cli("start")
    assert r.returncode == 1 and "EngineCore failed to start" in r.stderr


def test_engine_death_at_first_request_climbs_the_remedy_ladder(fake_daemon) -> None:
    """TP>1 and the engine dies at the canary: --disable-custom-all-reduce, then NCCL_P2P_DISABLE, then failed."""
    d = fake_daemon("die_on_request", extra={"restart": {"max_failures": 3}})
    s = d.wait_state("failed", timeout=60)
    spawns = [e for e in d.events() if e["event"] == "spawned"]
    assert len(spawns) == 3
    assert "--disable-custom-all-reduce" not in spawns[0]["argv"]
    assert "--disable-custom-all-reduce" in spawns[1]["argv"]
    assert spawns[2]["remedies"] == ["disable-custom-all-reduce", "nccl-p2p-disable"]
    assert s["remedies"] == ["disable-custom-all-reduce", "nccl-p2p-disable"]
    assert "head_dim=16" in s["reason"]
    applied = [e["remedy"] for e in d.events() if e["event"] == "remedy_applied"]
    assert applied == ["disable-custom-all-reduce", "nccl-p2p-disable"]


def test_hang_after_ready_is_confirmed_and_recovered(fake_daemon) -> None:
    """Completions hang while /health is 200: unhealthy, confirmed by a second probe, restarted."""
    d = fake_daemon("hang_after_ready")
    first = d.wait_state("ready", timeout=30)
    wait_for(lambda: d.status()["restarts"] >= 1, 40, "recovery from the hang")
    evs = d.events()
    states = [e["state"] for e in evs if e["event"] == "state"]
    assert "unhealthy" in states
    rec = next(e for e in evs if e["event"] == "state" and e["state"] == "stopping")
    assert rec["reason"].startswith("hang confirmed")
    assert not alive(first["pid"])
    assert_legal(evs)


def test_hang_after_healthy_traffic_is_still_confirmed(fake_daemon) -> None:
    """Tokens generated before the hang (our own canaries') do not stop canary failures confirming it."""
    d = fake_daemon("hang_after_ready", env={"FAKE_VLLM_HANG_AFTER": "4"})
    d.wait_state("ready", timeout=30)
    wait_for(lambda: d.status()["restarts"] >= 1, 40, "recovery from a hang after 3 good canaries")
    stop = next(e for e in d.events() if e["event"] == "state" and e["state"] == "stopping")
    assert stop["reason"].startswith("hang confirmed")


@pytest.mark.parametrize("running", [0, 1])
def test_idle_engine_is_read_once_per_canary_a_busy_one_every_interval(fake_daemon, running) -> None:
    """While nothing runs, /metrics is read just before each canary (the canary is what proves an
    idle engine serves); while requests run, every interval_s (0.2 s here, canary every 1 s), to
    see their tokens move. The canary's own tokens do not count as the engine being busy."""
    d = fake_daemon(env={"FAKE_VLLM_RUNNING": str(running)}, extra={"probes": {"stall_s": 600.0}})
    d.wait_state("ready", timeout=30)

    def after_six_canaries() -> list[str] | None:
        lines = d.log_file.read_text().splitlines()
        at = [i for i, line in enumerate(lines) if "POST /v1/chat/completions" in line]
        return lines[at[1] : at[5]] if len(at) >= 6 else None  # the first is the readiness canary

    window = wait_for(after_six_canaries, 30, "six canaries")
    per_canary = sum("GET /metrics" in line for line in window) / 4
    if running:
        assert per_canary >= 3, window
    else:
        assert per_canary == 1, window


def test_stall_line_before_ready_is_not_a_failure(fake_daemon) -> None:
    """The shm stall line during start-up (compilation) is a warning; the start succeeds."""
    d = fake_daemon(env={"FAKE_VLLM_STALL_BEFORE_READY": "1", "FAKE_VLLM_DELAY_S": "1.5"})
    d.wait_state("ready", timeout=30)
    evs = d.events()
    assert any(e["event"] == "stall_during_startup" for e in evs)
    assert d.status()["restarts"] == 0
    assert not any(e["event"] == "incident" for e in evs)


def test_stop_kills_the_whole_session_and_daemon_stays(fake_daemon) -> None:
    """`vsup stop` leaves no process of the tree (children included); the daemon stays in `stopped`."""
    d = fake_daemon(env={"FAKE_VLLM_CHILDREN": "2"})
    s = d.wait_state("ready", timeout=30)
    sid = s["pid"]
    wait_for(lambda: len(d.status()["tree"]["pids"]) >= 3, 10, "children in the tree record")
    pids = d.status()["tree"]["pids"]
    r = d.cli("stop")
    assert r.returncode == 0, r.stderr
    assert d.status()["state"] == "stopped"
    assert not [p for p in pids if alive(p)]
    assert session_pids(sid) == []


def test_teardown_sigkills_what_outlives_the_grace_without_a_second_one(fake_daemon) -> None:
    """A server and child that ignore SIGTERM (as vLLM 0.32 waiting on a hung client): after
    stop_grace_s what is left is SIGKILLed at once; cleanup_grace_s (the grace for orphans of
    earlier runs, 60 s here) is not spent on top of it."""
    d = fake_daemon(
        env={"FAKE_VLLM_IGNORE_TERM": "1", "FAKE_VLLM_CHILDREN": "1"},
        extra={"timeouts": {"stop_grace_s": 1.0, "cleanup_grace_s": 60.0}},
    )
    d.wait_state("ready", timeout=30)
    wait_for(lambda: len(d.status()["tree"]["pids"]) >= 2, 10, "the child in the tree record")
    pids = d.status()["tree"]["pids"]
    r = d.cli("stop", timeout=40)
    assert r.returncode == 0, r.stderr
    ev = [e for e in d.events() if e["event"] == "cleanup" and e.get("why") == "teardown"][-1]
    assert ev["seconds"] < 30, ev
    assert {k["pid"] for k in ev["killed"] if k["how"] == "SIGKILL"} >= set(pids), ev
    assert not [p for p in pids if alive(p)]


def test_recovery_of_a_dead_engine_does_not_wait_stop_grace(fake_daemon) -> None:
    """An engine death leaves an API server that will never answer its clients (and, as vLLM 0.32
    with a request open, ignores SIGTERM): the recovery's teardown takes the short failed-server
    grace, not the operator's stop_grace_s (60 s here), then restarts."""
    d = fake_daemon(
        "worker_dies_after_ready",
        env={"FAKE_VLLM_IGNORE_TERM": "1"},
        extra={"timeouts": {"stop_grace_s": 60.0}},
    )
    first = d.wait_state("ready", timeout=30)
    wait_for(lambda: d.status()["restarts"] >= 1, 40, "recovery from the engine death")
    ev = next(e for e in d.events() if e["event"] == "teardown")
    assert ev["grace_s"] == 3 and ev["reason"].startswith("Worker proc VllmWorker-1 died"), ev
    assert not alive(first["pid"])
    d.proc.kill()  # the fixture's ledger cleanup then ends the tree, without the 60 s stop grace
    d.proc.wait(10)


def test_two_reloads_at_once_one_is_busy(fake_daemon) -> None:
    """While a reload runs, a second lifecycle command gets `busy` naming it; status still answers."""
    d = fake_daemon(env={"FAKE_VLLM_DELAY_S": "2"})
    d.wait_state("ready", timeout=30)
    results: list[subprocess.CompletedProcess[str]] = []
    t = threading.Thread(target=lambda: results.append(d.cli("reload", "other")))
    t.start()
    wait_for(lambda: d.status()["state"] == "reloading", 10, "reloading")
    r2 = d.call("reload", {"model": "third"})
    assert r2["ok"] is False and r2["error"]["code"] == "busy" and "reload" in r2["error"]["message"]
    for cmd in ("restart", "start", "cleanup"):
        r3 = d.call(cmd)
        assert r3["error"]["code"] == "busy", (cmd, r3)
    t.join(60)
    assert results[0].returncode == 0, results[0].stderr
    assert d.status()["model"] == "other"


def test_stop_during_reload_cancels_it(fake_daemon) -> None:
    """`stop` while reloading cancels the reload (its reply: failed, cancelled by stop), tears the
    tree down and ends in `stopped` with nothing of either tree left."""
    d = fake_daemon(env={"FAKE_VLLM_DELAY_S": "3"})
    first = d.wait_state("ready", timeout=30)
    results: list[subprocess.CompletedProcess[str]] = []
    t = threading.Thread(target=lambda: results.append(d.cli("reload", "other")))
    t.start()
    wait_for(lambda: (s := d.status())["state"] == "reloading" and s["phase"] == "ready", 20, "the new start")
    second = d.status()["pid"]
    r = d.call("stop")
    assert r["ok"], r
    t.join(60)
    assert results[0].returncode == 1 and "cancelled by stop" in results[0].stderr, results[0]
    s = d.status()
    assert s["state"] == "stopped" and s["tree"] is None
    assert not alive(first["pid"]) and not alive(second)
    assert_legal(d.events())


def test_reload_survives_client_disconnect(fake_daemon) -> None:
    """A client that goes away mid-reload does not stop the reload; the result is in the events."""
    d = fake_daemon(env={"FAKE_VLLM_DELAY_S": "1"})
    d.wait_state("ready", timeout=30)
    p = subprocess.Popen(
        [*__import__("support").VSUP, "reload", "next", "--config", str(d.config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(__import__("support").ROOT / "supervisor")},
    )
    wait_for(lambda: d.status()["state"] == "reloading", 10, "reloading")
    p.kill()
    p.wait()
    s = d.wait_state("ready", timeout=30)
    assert s["model"] == "next"


def test_failed_reload_rolls_back(fake_daemon, tmp_path) -> None:
    """A reload whose model cannot serve exits 1 with the root cause, and the old model serves again."""
    d = fake_daemon(extra={"models.broken": {"model": "broken", "env": {"FAKE_VLLM_MODE": "die_on_request"}}})
    d.wait_state("ready", timeout=30)
    r = d.cli("reload", "broken")
    assert r.returncode == 1
    assert "head_dim=16" in r.stderr and "rolled back" in r.stderr
    s = d.status()
    assert s["state"] == "ready" and s["model"] == "fake-model"


def test_sigkill_of_vsup_then_restart_removes_old_tree(fake_daemon) -> None:
    """vsup SIGKILLed while serving: the next vsup kills the old tree (by the ledger) before starting."""
    d = fake_daemon(env={"FAKE_VLLM_CHILDREN": "1"})
    s = d.wait_state("ready", timeout=30)
    wait_for(lambda: len(d.status()["tree"]["pids"]) >= 2, 10, "child recorded")
    old = d.status()["tree"]["pids"]
    d.proc.kill()
    d.proc.wait()
    assert alive(s["pid"])  # vLLM keeps running when vsup dies
    d.start()
    s2 = d.wait_state("ready", timeout=30)
    assert s2["pid"] != s["pid"]
    assert not [p for p in old if alive(p)]
    assert any(e["event"] == "leftovers_found" for e in d.events())


def test_unknown_model_args_are_bad_request(fake_daemon) -> None:
    """reload without a model is a bad_request; the daemon and the model are unaffected."""
    d = fake_daemon()
    d.wait_state("ready", timeout=30)
    r = d.call("reload", {})
    assert r["error"]["code"] == "bad_request"
    r = d.call("reload", {"model": 5})
    assert r["error"]["code"] == "bad_request"
    assert d.status()["state"] == "ready"


def test_cli_unreachable_daemon_exit_3(fake_daemon) -> None:
    """With no daemon running, the CLI says so and exits 3."""
    d = fake_daemon(start=False)
    r = d.cli("status")
    assert r.returncode == 3 and "daemon" in r.stderr


def test_stable_serving_forgets_old_failures(fake_daemon) -> None:
    """Failures separated by stable serving are not a crash loop: max_failures counts only recent ones."""
    d = fake_daemon(extra={"restart": {"max_failures": 2, "stable_s": 0.5}})
    mark = 0
    for n in range(3):
        s = d.wait_state("ready", timeout=30)
        if n:  # after a failure, wait until the daemon has forgotten it
            d.wait_event(lambda e: e["event"] == "stable", 10, "stable serving", after=mark)
        mark = len(d.events())
        os.kill(s["pid"], signal.SIGKILL)
        wait_for(
            lambda: (x := d.status())["restarts"] == n + 1 and x["state"] == "ready",  # noqa: B023 - polled in this iteration only
            30,
            f"restart {n + 1}",
        )
    assert d.status()["state"] == "ready"


def test_crash_loop_counts_unstable_failures(fake_daemon) -> None:
    """Failures while never stable do add up to `failed`."""
    d = fake_daemon(extra={"restart": {"max_failures": 2, "stable_s": 60.0}})
    for _ in range(2):
        s = d.wait_state("ready", timeout=30)
        os.kill(s["pid"], signal.SIGKILL)
        d.wait_state("starting", "failed", timeout=30)
    assert d.wait_state("failed", timeout=30)["reason"].startswith("2 failures")
