"""Hang forensics against the real vLLM 0.32 CPU server, -tp 2 (issue 17 acceptance).

One daemon serves the module (a real start costs ~40 s here). First `vsup stacks` on the healthy
server: every process's stacks in under 5 s, the server serving during and after. Then a
SIGSTOP of worker TP1: the hang's incident bundle holds stacks with named frames for the API
server, the engine core and TP0, state T for TP1, and `vsup diagnose <bundle>` names TP1.
Run under `flock /tmp/vsup-real.lock` like every real-vLLM test.
"""

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
from vsup import proctree
from vsup.host import Host

pytestmark = pytest.mark.vllm
READY_S = 240


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory):
    require_real_vllm()
    d = Daemon(tmp_path_factory.mktemp("stacks-real"), real_sections(free_port(8000, 8049)))
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


def test_worker_sigstop_incident_holds_stacks_and_diagnose_names_tp1(real: Daemon) -> None:
    """SIGSTOP TP1 with a request in flight: the hang's bundle has every process's stacks (TP1 in T), diagnose names TP1."""
    real.wait_state("ready", timeout=READY_S)
    rec = live_tree(real)
    tp1 = next(p.pid for p in rec.procs if "Worker_TP1" in title(p.pid))
    incidents = real.state_dir / "incidents"
    before = set(incidents.iterdir()) if incidents.exists() else set()
    n = len(real.events())
    client = threading.Thread(target=lambda: _quiet_chat(real), daemon=True)
    os.kill(tp1, signal.SIGSTOP)
    client.start()
    try:
        real.wait_event(
            lambda e: (
                e["event"] == "state" and e["state"] == "stopping" and "hang" in (e.get("reason") or "")
            ),
            90,
            "the hang's teardown",
            after=n,
        )
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


def _quiet_chat(d: Daemon) -> None:
    try:
        chat(d, max_tokens=64, timeout=120)
    except httpx.HTTPError:
        pass
