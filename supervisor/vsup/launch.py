"""Launching a tree: the command line, the log's rotation, the private TMPDIR, the spawn.

The owner decides *when*; this module knows *how*. `Spawner` is the seam the in-process tests
replace (a fake that adds processes to a FakeHost), so the owner never calls subprocess itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import proctree
from .config import Config, ModelConfig, Remedy
from .host import Host
from .redact import hide_flag_values

LOG_ROTATE_BYTES = 256 << 20
LOG_KEEP = 3
# systemd's contract is with vsup, not with vLLM: these never reach the server's environment.
SYSTEMD_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
# Flags whose next argument is a secret: events, status and incident bundles show it redacted.
SECRET_FLAGS = frozenset({"--api-key"})
SECRET_ENV = frozenset({"VLLM_API_KEY"})
REDACTED = "<redacted>"


def command(
    cfg: Config, spec: ModelConfig, remedies: list[Remedy], *, port: int | None = None
) -> tuple[list[str], dict[str, str]]:
    """argv and environment for `spec`, with the applied remedies' flags and variables. `port`:
    the tree's own port instead of [vllm].port (an overlapped reload's new tree, issue 23)."""
    v = cfg.vllm
    args = [*v.args, *spec.args]
    env = {**os.environ, **v.env, **spec.env}
    for r in remedies:
        args += [a for a in r.args if a not in args]
        env.update(r.env)
    for k in SYSTEMD_KEYS:
        env.pop(k, None)
    if faulthandler_env(cfg):
        # Issue 17: SIGABRT then writes every thread's stack to the log (the fallback stack
        # dump of a hung tree where py-spy may not attach). An operator's own value wins.
        env.setdefault("PYTHONFAULTHANDLER", "1")
    argv = [v.python, "-m", v.module, "--model", spec.model, "--host", v.host, "--port", str(port or v.port)]
    if spec.served_model_name and "--served-model-name" not in args:
        argv += ["--served-model-name", spec.served_model_name]
    return argv + args, env


def faulthandler_env(cfg: Config) -> bool:
    """Are vLLM's processes started with PYTHONFAULTHANDLER (stacks.py's fallback)?"""
    return cfg.daemon.stacks in ("auto", "faulthandler")


def redact_argv(argv: list[str]) -> list[str]:
    """argv as events may show it: the value of `--api-key X` and `--api-key=X` replaced."""
    return hide_flag_values(argv, SECRET_FLAGS.__contains__, REDACTED)


def redact_env(env: dict[str, str]) -> dict[str, str]:
    return {k: (REDACTED if k in SECRET_ENV else v) for k, v in env.items()}


def rotate_log(path: Path) -> bool:
    """Rotate between starts only (never under a running writer): vLLM appends, vsup tails.
    Returns whether the file was rotated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if path.stat().st_size < LOG_ROTATE_BYTES:
            return False
    except FileNotFoundError:
        return False
    for i in range(LOG_KEEP - 1, 0, -1):
        src = path.with_name(f"{path.name}.{i}")
        if src.exists():
            src.replace(path.with_name(f"{path.name}.{i + 1}"))
    path.replace(path.with_name(f"{path.name}.1"))
    return True


@dataclass
class Spawned:
    """A tree just started: its leader's pid and the first record of it."""

    pid: int
    tree: proctree.TreeRecord
    handle: subprocess.Popen[bytes] | None = None  # the real spawner's (the reaper sets its returncode)

    def reaped(self, code: int) -> None:
        if self.handle is not None:
            self.handle.returncode = code


class Spawner(Protocol):
    def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        *,
        model: str,
        port: int,
        private_tmp: bool = False,
    ) -> Spawned: ...


class RealSpawner:
    """vLLM in its own session, with its own TMPDIR (unless the config sets one), its output
    appended to the log file. `private_tmp` (an overlapped reload's second tree, issue 23): its
    own TMPDIR even where the config sets one (then inside that one), since the cleanup of either
    tree removes its TMPDIR's vLLM files and must never reach the other's."""

    def __init__(self, host: Host | None = None) -> None:
        self.host = host

    def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        *,
        model: str,
        port: int,
        private_tmp: bool = False,
    ) -> Spawned:
        env = dict(env)
        tree_tmp = None
        own = "TMPDIR" in env and env.get("TMPDIR") != os.environ.get("TMPDIR")
        if not own or private_tmp:
            tree_tmp = proctree.make_tree_tmpdir(env["TMPDIR"] if own else None)
            proctree.share_torch_caches(tree_tmp, env)
            env["TMPDIR"] = tree_tmp
        try:
            popen, tree = proctree.spawn(argv, env, log_path, model=model, port=port, host=self.host)
        except OSError:
            if tree_tmp:
                shutil.rmtree(tree_tmp, ignore_errors=True)  # never follows the cache link
            raise
        if tree_tmp:
            tree.files.append(tree_tmp)
        return Spawned(popen.pid, tree, popen)
