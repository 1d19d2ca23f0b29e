"""[vllm] nice: the tree's CPU priority, set at spawn (starting.tree_nice, Host.set_nice).

Measured here (config.py has the numbers): vLLM's CPU workers spin on their cores while they
serve, and beside a tree at nice 0 a client on this 2-core host waited seconds for a 4-token
completion; at nice 10, 0.08 s. These tests pin the mechanism: which value, on which process,
through which seam, and what a value vLLM cannot get looks like.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fakes.owner_world import Owner
from support import write_config
from vsup import config as config_mod
from vsup import starting
from vsup.config import ConfigError
from vsup.host import Host

pytestmark = pytest.mark.timeout(60)


def test_default_is_10_without_gpus_and_untouched_with_them() -> None:
    def o(nice: int | None, gpus: Any) -> Any:
        return SimpleNamespace(cfg=SimpleNamespace(vllm=SimpleNamespace(nice=nice)), gpus=gpus)

    assert starting.tree_nice(o(None, None)) == 10
    assert starting.tree_nice(o(None, object())) == 0
    assert starting.tree_nice(o(3, object())) == 3 and starting.tree_nice(o(0, None)) == 0


def test_config_range(tmp_path: Path) -> None:
    def load(nice: Any) -> Any:
        p = write_config(
            tmp_path / "c.toml", {"vllm": {"python": sys.executable, "model": "m", "nice": nice}}
        )
        return config_mod.load(p)

    assert load(5).vllm.nice == 5
    for bad in (20, -21, "low"):
        with pytest.raises(ConfigError, match="vllm.nice"):
            load(bad)


def test_host_set_nice_on_a_child_and_what_it_starts_later() -> None:
    """Host.set_nice: the value before, the new one; a process it forks afterwards inherits it;
    a pid that is gone answers None."""
    code = (
        "import os, sys, time\n"
        "sys.stdin.readline()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    print(os.getpriority(os.PRIO_PROCESS, 0), flush=True)\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "time.sleep(30)\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        h = Host()
        assert h.set_nice(p.pid, 7) == os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, p.pid) == 7
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write("go\n")
        p.stdin.flush()
        assert int(p.stdout.readline()) == 7  # printed by the child it forked after the change
    finally:
        subprocess.run(["pkill", "-KILL", "-P", str(p.pid)], check=False)
        p.kill()
        p.wait(10)
    assert Host().set_nice(p.pid, 5) is None


@pytest.mark.parametrize(("nice", "want"), [(None, 10), (4, 4), (0, None)])
def test_the_owner_sets_the_trees_nice_at_spawn(tmp_path: Path, nice: int | None, want: int | None) -> None:
    """Through the one OS seam: the leader's nice and its session's autogroup, before vLLM
    forks; the `spawned` event says which (0: nothing is touched)."""

    async def scenario() -> None:
        over: dict[str, Any] = {} if nice is None else {"vllm": {"nice": nice}}
        async with Owner(tmp_path, **over) as o:
            await o.state("ready")
            srv = o.world.current()
            assert srv is not None
            (ev,) = o.evs("spawned")
            if want is None:
                assert ev["nice"] == 0 and not o.world.host.nices and not o.world.host.autogroups
            else:
                assert ev["nice"] == want
                assert o.world.host.nices == {srv.pid: want} and o.world.host.autogroups == {srv.pid: want}

    asyncio.run(scenario())
