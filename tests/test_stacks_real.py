"""Hang forensics against the real vLLM 0.32 CPU server, -tp 2 (issue 17 acceptance).

One daemon serves the module (a real start costs ~40 s here), with the shipped probe and canary
settings and the proxy in front. First `vsup stacks` on the healthy server: every process's
stacks in under 5 s, the server serving during and after. Then 5 minutes of saturation (long
streamed generations back to back): no teardown, no `unhealthy` that lasts. Then a SIGSTOP of
worker TP1 at idle: torn down on the stack check's proof, the incident bundle holds stacks with
named frames for the API server, the engine core and TP0, state T for TP1, and `vsup diagnose
<bundle>` names TP1. Then the same under streams through the proxy.
Run under `flock /tmp/vsup-real.lock` like every real-vLLM test.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import Daemon, alive, free_port, real_sections, require_real_vllm, wait_for
from vsup import proctree
from vsup.host import Host

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1200)]
READY_S = 240
SATURATION_S = 300.0
# Issue 17's goals (teardown <= 15 s after the fault idle, <= 10 s under streams) are speed goals:
# bench/bench_hang.py measures them against these numbers. The tests assert the mechanism (the
# teardown's reason is the stack check's proof) and a ceiling against a confirmation that never comes.
IDLE_GOAL_S, STREAMS_GOAL_S, CEILING_S = 15.0, 10.0, 30.0


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory):
    require_real_vllm()
    s = real_sections(free_port(8000, 8049))
    del s["probes"]  # issue 17's bounds hold with the shipped probe and canary settings
    del s["timeouts"]["canary_s"]
    s["proxy"] = {"listen": f"127.0.0.1:{free_port(8150, 8199)}"}
    d = Daemon(tmp_path_factory.mktemp("stacks-real"), s)
    try:
        d.start()
        yield d
    finally:
        d.close()


def chat(d: Daemon, max_tokens: int = 4, timeout: float = 60) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{d.port}/v1/chat/completions",
        trust_env=False,
        timeout=timeout,
        json={
            "model": "tiny-a",
            "messages": [{"role": "user", "content": "Say hi"}],
            "max_tokens": max_tokens,
        },
    )


def title(pid: int) -> str:
    """The live command line: the ledger keeps the first-seen one, and titles come later."""
    return " ".join(Host().cmdline(pid) or ())


def live_tree(d: Daemon) -> proctree.TreeRecord:
    """The live tree's record once it lists the engine core and both workers."""

    def ok() -> proctree.TreeRecord | None:
        tree_id = (d.status().get("tree") or {}).get("id")
        for r in proctree.Ledger(d.state_dir).load():
            titles = " ".join(title(p.pid) for p in r.procs)
            if r.id == tree_id and "VLLM::EngineCore" in titles and "Worker_TP1" in titles:
                return r
        return None

    return wait_for(ok, 60, "the tree record with engine core and both workers", 0.5)


def _funcs(p: dict[str, Any]) -> set[str]:
    return {f[0] for t in p["threads"] for f in t["frames"]}


def test_vsup_stacks_on_a_healthy_server_is_fast_and_the_server_keeps_serving(real: Daemon) -> None:
    """`vsup stacks`: every process's stacks in under 5 s (py-spy, nothing stopped or killed); completions during and after."""
    real.wait_state("ready", timeout=READY_S)
    during: list[int] = []
    t = threading.Thread(target=lambda: during.append(chat(real, max_tokens=16).status_code))
    t0 = time.monotonic()
    t.start()
    out = real.cli("stacks", "--json", timeout=60)
    took = time.monotonic() - t0
    t.join(60)
    assert out.returncode == 0, out.stderr
    assert took < 5.0, f"vsup stacks took {took:.2f}s"
    r = json.loads(out.stdout)
    assert r["mechanism"] == "py-spy" and r["complete"], r["reason"]
    by = {p["label"]: p for p in r["processes"]}
    assert {"API server", "engine core", "TP0", "TP1"} <= set(by), list(by)
    assert "EngineCoreProc.run_busy_loop" in _funcs(by["engine core"])
    assert "WorkerProc.worker_busy_loop" in _funcs(by["TP0"]) and "WorkerProc.worker_busy_loop" in _funcs(
        by["TP1"]
    )
    assert all(p["state"] in ("R", "S") for p in r["processes"]), [
        (p["label"], p["state"]) for p in r["processes"]
    ]
    assert during == [200]
    assert chat(real).status_code == 200
    assert real.status()["state"] == "ready"
    text = real.cli("stacks", timeout=60)
    assert text.returncode == 0 and "== TP1" in text.stdout and "stacks: " in text.stdout


def test_a_saturated_progressing_server_is_never_torn_down(real: Daemon) -> None:
    """5 minutes of long streamed generations through the proxy, more at once than the engine runs: no teardown, no lasting unhealthy."""
    real.wait_state("ready", timeout=READY_S)
    n = len(real.events())
    before = real.status()["restarts"]
    with Streams(proxy_url(real), 12, 160) as load:
        load.start()
        time.sleep(SATURATION_S)
    evs = real.events()[n:]
    assert not [e for e in evs if e["event"] in ("teardown", "incident")], [
        (e["event"], e.get("reason")) for e in evs if e["event"] in ("state", "teardown")
    ]
    assert real.status()["restarts"] == before and real.status()["state"] == "ready"
    assert load.done >= 12 and load.failed == 0, (load.done, load.failed)
    spans = unhealthy_spans(evs)
    assert all(d <= 10.0 for d in spans), spans  # a strike's check lasts ~2-3 s, then ready again


def test_worker_sigstop_idle_is_proven_by_stacks_and_diagnose_names_tp1(real: Daemon) -> None:
    """SIGSTOP TP1 at idle: torn down on the stack check's proof (the time printed; the 15 s goal is
    bench_hang's); the bundle has every process's stacks (TP1 in T), diagnose names TP1."""
    real.wait_state("ready", timeout=READY_S)
    rec = live_tree(real)
    tp1 = next(p.pid for p in rec.procs if "Worker_TP1" in title(p.pid))
    incidents = real.state_dir / "incidents"
    before = set(incidents.iterdir()) if incidents.exists() else set()
    n = len(real.events())
    t0 = time.time()
    os.kill(tp1, signal.SIGSTOP)
    try:
        teardown = real.wait_event(lambda e: e["event"] == "teardown", 90, "the hang's teardown", after=n)
        took = _ts(teardown) - t0
        stop = next(e for e in real.events()[n:] if e["event"] == "state" and e["state"] == "stopping")
        print(f"idle SIGSTOP: teardown {took:.1f} s after the fault (goal {IDLE_GOAL_S:g} s)")
        assert took <= CEILING_S, f"teardown {took:.1f}s after the SIGSTOP ({stop['reason']})"
        assert "stacks: TP1 (state T)" in stop["reason"], stop["reason"]
        bundle: Path = wait_for(
            lambda: next(
                (
                    b
                    for b in (incidents.iterdir() if incidents.exists() else ())
                    if b not in before and (b / "incident.json").exists()
                ),
                None,
            ),
            30,
            "the hang's incident bundle",
        )
        stacks = json.loads((bundle / "stacks.json").read_text())
        by = {p["label"]: p for p in stacks["processes"]}
        assert by["TP1"]["state"] == "T"
        assert "MultiprocExecutor.collective_rpc.<locals>.get_response" in _funcs(by["engine core"]) or (
            "get_response" in _funcs(by["engine core"])
        ), by["engine core"]
        assert _funcs(by["TP0"]) & {
            "_CPUSHMDistributed.all_reduce",
            "all_reduce",
            "WorkerProc.worker_busy_loop",
            "worker_busy_loop",
        }
        assert _funcs(by["API server"]), by["API server"]
        summary = json.loads((bundle / "incident.json").read_text())
        assert summary["kind"] == "hang" and [s["label"] for s in summary["stacks"]["stuck"]] == ["TP1"]
        out = real.cli("diagnose", str(bundle), timeout=60)
        assert out.returncode == 0 and "STUCK   TP1" in out.stdout, out.stdout + out.stderr
        real.wait_state("ready", timeout=READY_S)
        assert chat(real).status_code == 200
    finally:
        for p in rec.procs:  # never leave a stopped process behind, whatever happened
            if alive(p.pid):
                os.kill(p.pid, signal.SIGCONT)


def test_worker_sigstop_under_streams_is_proven_by_stacks(real: Daemon) -> None:
    """Streams flowing through the proxy: SIGSTOP TP1; the stream stall or the frozen counter
    strikes, the check proves it (the time printed; the 10 s goal is bench_hang's)."""
    real.wait_state("ready", timeout=READY_S)
    rec = live_tree(real)
    tp1 = next(p.pid for p in rec.procs if "Worker_TP1" in title(p.pid))
    n = len(real.events())
    try:
        with Streams(proxy_url(real), 2, 160) as load:
            load.start()
            # tokens flowing (a server just restarted can take seconds to its first token; a
            # stream with no byte yet is the canary's to see, not the stream watch's)
            load.flowing()
            t0 = time.time()
            os.kill(tp1, signal.SIGSTOP)
            teardown = real.wait_event(lambda e: e["event"] == "teardown", 90, "the hang's teardown", after=n)
        took = _ts(teardown) - t0
        stop = next(e for e in real.events()[n:] if e["event"] == "state" and e["state"] == "stopping")
        print(f"SIGSTOP under streams: teardown {took:.1f} s after the fault (goal {STREAMS_GOAL_S:g} s)")
        assert took <= CEILING_S, f"teardown {took:.1f}s after the SIGSTOP ({stop['reason']})"
        assert "stacks: TP1 (state T)" in stop["reason"], stop["reason"]
        real.wait_state("ready", timeout=READY_S)
        assert chat(real).status_code == 200
    finally:
        for p in rec.procs:
            if alive(p.pid):
                os.kill(p.pid, signal.SIGCONT)


def proxy_url(d: Daemon) -> str:
    with open(d.config, "rb") as f:
        return "http://" + tomllib.load(f)["proxy"]["listen"]


def _ts(e: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(e["ts"]).replace("Z", "+00:00")).timestamp()


def unhealthy_spans(evs: list[dict[str, Any]]) -> list[float]:
    """How long each stay in `unhealthy` lasted (the last one, if open, until now)."""
    spans, since = [], None
    for e in evs:
        if e["event"] != "state":
            continue
        if e["state"] == "unhealthy" and since is None:
            since = _ts(e)
        elif e["state"] != "unhealthy" and since is not None:
            spans.append(_ts(e) - since)
            since = None
    if since is not None:
        spans.append(time.time() - since)
    return spans


class Streams:
    """`n` clients streaming `max_tokens`-token completions (ignore_eos) back to back until the block ends."""

    def __init__(self, base: str, n: int, max_tokens: int) -> None:
        self.url = base + "/v1/chat/completions"
        self.body = {
            "model": "tiny-a",
            "messages": [{"role": "user", "content": "Count from one to one hundred."}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
        }
        self.stop = threading.Event()
        self.done = self.failed = self.chunks = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(n)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def flowing(self, timeout: float = 60.0) -> None:
        """Wait until chunks keep arriving: some, then more within 3 s (one stream ending and the
        next one's prefill on a busy 2-core machine left a gap over 0.5 s in a CI run)."""
        wait_for(lambda: self.chunks >= 20, timeout, "tokens streaming", 0.1)
        seen = self.chunks
        wait_for(lambda: self.chunks > seen, 3.0, "tokens still streaming", 0.05)

    def __enter__(self) -> Streams:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(70)

    def _loop(self) -> None:
        while not self.stop.is_set():
            ok = False
            try:
                with (
                    httpx.Client(trust_env=False, timeout=httpx.Timeout(10.0, read=60.0)) as c,
                    c.stream("POST", self.url, json=self.body) as r,
                ):
                    lines = []
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            lines.append(line)
                            with self.lock:
                                self.chunks += 1
                    ok = (
                        r.status_code == 200
                        and lines[-1:] == ["data: [DONE]"]
                        and '"error"' not in "".join(lines)
                    )
            except httpx.HTTPError:
                pass
            if self.stop.is_set():
                return  # cut by the end of the block: not counted
            with self.lock:
                self.done += ok
                self.failed += not ok
