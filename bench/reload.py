"""Reload time: `vsup reload` split by phase, next to a bare stop + start of the same server.

Both are timed the same way: from the command to the first successful completion on the new
model. The bare cycle is SIGTERM to the API server, wait until every process of its tree is
gone (as `systemctl stop` waits for the cgroup to empty), start the new command. Its start times
also give vLLM's own cold start, the reference of the "time to serve again" target.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import procs
from episode import _wait_vsup_ready, port_in_use, port_owner, wait_serving
from supervisors import VLLM_ENV, Vsup, vllm_argv

STOP_WAIT_S = 30.0


def _other(model: str) -> str:
    return "tiny-b" if model == "tiny-a" else "tiny-a"


def bare(workdir: Path, port: int, reps: int, log: Callable[[str], None]) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    logf = workdir / "vllm.log"
    reg = procs.Registry(port, [logf]).start()
    out: dict[str, Any] = {"cold_start_s": [], "cycles": [], "left_by_stop": [], "harness_cleanup": []}
    env = {**os.environ, **VLLM_ENV}

    def launch(model: str) -> subprocess.Popen:
        with open(logf, "ab") as f:
            return subprocess.Popen(
                vllm_argv(model, port),
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    popens: list[subprocess.Popen] = []
    try:
        if port_in_use(port):
            raise RuntimeError(f"port {port} is in use by pid {port_owner(port)}")
        model = "tiny-a"
        t0 = time.time()
        popens.append(launch(model))
        up = wait_serving(port, model, 300)
        if up is None:
            raise RuntimeError("bare vLLM did not serve within 300s")
        out["cold_start_s"].append(round(up - t0, 1))
        log(f"  bare cold start {up - t0:.1f}s")
        for _ in range(reps):
            time.sleep(3)
            reg.scan_holdings()
            tree = reg.tree_of(popens[-1].pid)
            nxt = _other(model)
            t0 = time.time()
            popens[-1].send_signal(signal.SIGTERM)
            end = time.time() + STOP_WAIT_S
            while time.time() < end and tree is not None and tree.live_members():
                time.sleep(0.05)
            t_stopped = time.time()
            popens[-1].wait(10)
            if tree is not None:
                left = procs.debris([tree])
                out["left_by_stop"].append(left.to_json())
                procs.kill_members(tree.live_members())
                procs.remove_objects(left)
            popens.append(launch(nxt))
            up = wait_serving(port, nxt, 300)
            if up is None:
                raise RuntimeError(f"bare vLLM ({nxt}) did not serve within 300s")
            cyc = {
                "total": round(up - t0, 2),
                "stop": round(t_stopped - t0, 2),
                "start": round(up - t_stopped, 2),
            }
            out["cycles"].append(cyc)
            out["cold_start_s"].append(round(up - t_stopped, 1))
            log(f"  bare stop+start {model} -> {nxt}: {cyc}")
            model = nxt
    except Exception as e:  # noqa: BLE001 - recorded in the results, not raised
        out["error"] = f"{type(e).__name__}: {e}"
        log(f"  ERROR: {out['error']}")
    finally:
        for p in popens:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(STOP_WAIT_S)
                except subprocess.TimeoutExpired:
                    pass
        reg.scan()
        members = [m for t in reg.trees for m in t.live_members()]
        if members:
            out["harness_cleanup"].append(f"killed {len(members)} leftover process(es)")
            procs.kill_members(members)
        left = procs.debris(reg.trees)
        if not left.empty:
            out["harness_cleanup"].append(f"removed {left.total()} object(s) left by the bare server's stop")
            failed = procs.remove_objects(left)
            if failed:
                out["harness_cleanup"].append(f"COULD NOT REMOVE: {failed}")
        reg.stop()
    return out


def vsup(workdir: Path, port: int, reps: int, log: Callable[[str], None]) -> dict[str, Any]:
    sup = Vsup(workdir, port)
    reg = procs.Registry(port, sup.logs()).start()
    out: dict[str, Any] = {"cycles": [], "harness_cleanup": []}
    try:
        if port_in_use(port):
            raise RuntimeError(f"port {port} is in use by pid {port_owner(port)}")
        sup.start()
        if wait_serving(port, "tiny-a", 300, stop=lambda: not sup.pids()) is None:
            raise RuntimeError("vsup did not serve within 300s")
        _wait_vsup_ready(sup)
        model = "tiny-a"
        for _ in range(reps):
            time.sleep(3)
            nxt = _other(model)
            n = len(sup.events())
            t0 = time.time()
            sup.swap(nxt)
            t_cli = time.time()
            up = wait_serving(port, nxt, 60)
            if up is None:
                raise RuntimeError(f"vsup reload to {nxt} returned but {nxt} does not serve")
            phases = {e["phase"]: e["seconds"] for e in sup.events()[n:] if e.get("event") == "reload_phase"}
            cyc = {"total": round(up - t0, 2), "cli": round(t_cli - t0, 2), "phases": phases}
            out["cycles"].append(cyc)
            log(f"  vsup reload {model} -> {nxt}: {cyc}")
            model = nxt
    except Exception as e:  # noqa: BLE001 - recorded in the results, not raised
        out["error"] = f"{type(e).__name__}: {e}"
        log(f"  ERROR: {out['error']}")
    finally:
        out["harness_cleanup"] += sup.shutdown()
        reg.scan()
        members = [m for t in reg.trees for m in t.live_members()]
        if members:
            out["harness_cleanup"].append(f"killed {len(members)} leftover process(es)")
            procs.kill_members(members)
        left = procs.debris(reg.trees)
        if not left.empty:
            out["harness_cleanup"].append(
                f"removed {left.total()} object(s) left after vsup's stop: {left.to_json()}"
            )
            procs.remove_objects(left)
        reg.stop()
    return out
