"""Two real vLLM servers under two vsup instances on this machine (two ports, two state dirs,
as vsup@a and vsup@b would run them): SIGKILL of one's API server leaves none of its debris,
and the other serves a client throughout. Starts are staggered: both share the 2 cores (the
second load took 126-158 s here beside a ready first)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import Daemon, alive, free_port, real_sections, require_real_vllm, wait_for
from test_real_vllm import assert_tree_gone, wait_tree_complete

pytestmark = [pytest.mark.vllm, pytest.mark.two_servers]

READY_S = 300
# b's client runs from before the kill until this many requests after it: through a's teardown
# (seconds) and into a's restart, whose load beside b is the heaviest moment for b's service.
AFTER_KILL = 30


class Client(threading.Thread):
    """One completion a second against one server, each with a 60 s timeout, until stopped."""

    def __init__(self, d: Daemon, model: str) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{d.port}/v1/chat/completions"
        self.model = model
        self.results: list[tuple[float, float, int | str]] = []  # (sent at, seconds, status or error)
        self.halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(trust_env=False, timeout=60) as c:
            while not self.halt.is_set():
                t0 = time.monotonic()
                try:
                    r = c.post(
                        self.url,
                        json={
                            "model": self.model,
                            "messages": [{"role": "user", "content": "Hi"}],
                            "max_tokens": 4,
                        },
                    )
                    outcome: int | str = r.status_code
                except httpx.HTTPError as e:
                    outcome = f"{type(e).__name__}: {e}"
                took = time.monotonic() - t0
                self.results.append((t0, took, outcome))
                self.halt.wait(max(0.0, 1.0 - took))

    def p99(self) -> float:
        lat = sorted(t for _, t, _ in self.results)
        return lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]


def test_sigkill_one_instances_api_server_other_serves_throughout(
    tmp_path: Path, record_property: Any
) -> None:
    """a and b serve tiny-a and tiny-b. SIGKILL of a's API server: a's whole old tree (orphaned
    engine core and workers, segments, semaphores, its TMPDIR) is gone when a's teardown says it
    cleaned, b's tree is untouched, and b's client (1 request/s, 60 s timeout) never failed,
    from before the kill through a's teardown and into a's restart."""
    require_real_vllm()
    ports = free_port(8000, 8024), free_port(8025, 8049)
    a = Daemon(tmp_path / "a", real_sections(ports[0], "tiny-a"))
    b = Daemon(tmp_path / "b", real_sections(ports[1], "tiny-b"))
    client: Client | None = None
    try:
        a.start()
        a.wait_state("ready", timeout=READY_S)
        b.start()  # staggered: b loads beside a ready a
        b.wait_state("ready", timeout=READY_S)
        rec_a = wait_tree_complete(a)
        rec_b = wait_tree_complete(b)
        b_pids = {p.pid for p in rec_b.procs if alive(p.pid)}
        client = Client(b, "tiny-b")
        client.start()
        wait_for(lambda: len(client.results) >= 5, 60, "b's client under way")
        before = a.status()
        killed_at = time.monotonic()
        os.kill(rec_a.leader.pid, signal.SIGKILL)
        # Each SIGKILLed process of a's tree is gone only once the kernel has torn its memory
        # down, which takes CPU time it gets in turn with b's threads pinned to the same cores:
        # 2.4-5.4 s here on a quiet machine, over a minute on a busy one (issue 18). a's
        # teardown waits for those exits while they progress (cleanup.EXIT_WAIT_S), so what it
        # reports is final: nothing remaining, the whole old tree gone when it says so.
        cleaned = a.wait_event(
            lambda e: e["event"] == "cleanup" and e.get("why") == "teardown", 300, "a's teardown cleanup"
        )
        assert cleaned["remaining"] == [], cleaned["remaining"]
        assert_tree_gone(rec_a)
        slowest_exit = max((k.get("exit_s", 0.0) for k in cleaned["killed"]), default=0.0)
        # a restarts beside b: b keeps serving while a's new tree loads (the worst moment for b,
        # on 2 shared cores: weights and KV cache). Whether a is ready again by then is
        # reported, not required.
        wait_for(
            lambda: len([r for r in client.results if r[0] > killed_at]) >= AFTER_KILL,
            180,
            f"{AFTER_KILL} requests to b after the kill",
            1.0,
        )
        a_state = a.status()
        serving_again = a_state["state"] == "ready" and a_state["restarts"] > before["restarts"]
        client.halt.set()
        client.join(70)
        failed = [r for r in client.results if r[2] != 200]
        assert not failed, failed[:5]
        assert {p for p in b_pids if alive(p)} == b_pids, "b's tree lost a process"
        assert b.status()["restarts"] == 0 and b.status()["state"] == "ready"
        p99 = client.p99()
        record_property("b_requests", len(client.results))
        record_property("b_p99_s", round(p99, 3))
        record_property("a_after_kill", a_state["state"])
        record_property("a_slowest_exit_s", slowest_exit)
        print(
            f"\nb: {len(client.results)} requests, 0 failed, p99 {p99:.2f} s, max "
            f"{max(t for _, t, _ in client.results):.2f} s; a {'serving again' if serving_again else a_state['state']}"
            f" {time.monotonic() - killed_at:.0f} s after the kill; a's teardown cleanup took "
            f"{cleaned['seconds']:.1f} s, its slowest SIGKILLed process {slowest_exit:.1f} s to exit"
        )
        assert p99 < 60
    except BaseException:
        for d in (a, b):  # what each instance did, for the failure report
            print(f"\n{d.tmp.name}: " + "\n".join(json.dumps(e) for e in d.events()[-25:]))
        raise
    finally:
        if client is not None:
            client.halt.set()
        try:
            b.close()
        finally:
            a.close()  # even if b's close failed: a run once outlived its test this way
