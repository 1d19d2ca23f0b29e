"""Incident bundles: everything an operator needs to understand one failure, in one folder.

``state_dir/incidents/<UTC time>-<kind>/`` holds the last log lines of the failed tree
(redacted: the seed log carries a user's whole prompt), the parsed findings, the tree record,
a ``/dev/shm`` listing, recent events, the config and the vLLM version; for a hang, the stacks of
every process recorded before the teardown (stacks.json, stacks.txt). Writing a bundle is
best effort: a full disk must not stop the recovery it documents.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import time
from pathlib import Path
from typing import Any

LOG_TAIL = 2000
KEEP = 50


def vllm_version(python: str) -> str | None:
    """vLLM's version from the interpreter's site-packages metadata, without running it
    (the daemon starts no subprocess besides vLLM and its stack dumper: it reaps every child)."""
    # A venv's bin/python is a symlink to the base interpreter: the venv's own site-packages
    # is beside the link, not beside its target (which is looked at second, for a plain install).
    for root in dict.fromkeys((Path(python).absolute().parent.parent, Path(python).resolve().parent.parent)):
        for meta in sorted(root.glob("lib/python3*/site-packages/vllm*.dist-info/METADATA")):
            with contextlib.suppress(OSError):
                for line in meta.read_text(errors="replace").splitlines()[:20]:
                    if line.startswith("Version:"):
                        return line.split(":", 1)[1].strip()
    return None


def _redact_lines(lines: list[str]) -> list[str]:
    try:
        from .redact import redact
    except ImportError:  # pragma: no cover - redact ships with the package
        return ["<redaction unavailable: log text withheld>"]
    return [redact(line) for line in lines]


def write_bundle(
    cfg: Any,
    *,
    reason: str,
    kind: str,
    lines: list[str],
    tree: Any,
    events: list[dict[str, Any]],
    cleanup: dict[str, Any] | None,
    vllm_version: str | None,
    stacks: dict[str, Any] | None = None,
) -> Path | None:
    """`stacks`: a stacks.StacksReport.to_json() recorded before the teardown (hangs), written as
    stacks.json (for `vsup diagnose <bundle>`) and stacks.txt, with the stuck-rank verdict in
    incident.json. Stacks hold function and file names only (py-spy never runs with --locals)."""
    base = Path(cfg.state_dir) / "incidents"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    safe_kind = re.sub(r"[^A-Za-z0-9_.-]", "_", kind)[:40]
    if not _own_dir(base):
        return None
    path = base / f"{stamp}-{safe_kind}"
    n = 1
    while os.path.lexists(path):
        n += 1
        path = base / f"{stamp}-{safe_kind}-{n}"
    try:
        path.mkdir(mode=0o750)  # fails on anything planted there since: never reused
        tail = _redact_lines(lines[-LOG_TAIL:])
        _write(path / "log_tail.txt", "\n".join(tail) + "\n")
        findings: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            from . import diagnose

            findings = diagnose.analyze(lines).to_json()
        summary = {
            "reason": reason,
            "kind": kind,
            "time": stamp,
            "vllm_version": vllm_version,
            "config": str(cfg.path),
            "findings": findings,
            "cleanup": cleanup,
        }
        if stacks is not None:
            with contextlib.suppress(Exception):
                from . import diagnose

                summary["stacks"] = diagnose.analyze_stacks(stacks).to_json()
            _dump(path / "stacks.json", stacks)
            with contextlib.suppress(Exception):
                from . import stacks as stacks_mod

                _write(path / "stacks.txt", stacks_mod.render_text(stacks) + "\n")
        _dump(path / "incident.json", summary)
        _dump(path / "tree.json", tree.to_json() if tree is not None else None)
        _dump(path / "shm.json", _shm_listing())
        _write(path / "events.jsonl", "".join(json.dumps(ev, default=str) + "\n" for ev in events[-200:]))
        with contextlib.suppress(OSError):
            _write(path / "config.toml", Path(cfg.path).read_text(errors="replace"))
        _scrub(path, _secrets(cfg))
        _prune(base)
        return path
    except OSError:
        return None


def _secrets(cfg: Any) -> set[str]:
    """vLLM's API keys as configured: every value after `--api-key` in [vllm] and [models.*]
    args, and VLLM_API_KEY from their env or vsup's own environment (issue 15)."""
    from .launch import SECRET_ENV, SECRET_FLAGS

    out: set[str] = set()
    specs = [getattr(cfg, "vllm", None), *getattr(cfg, "models", {}).values()]
    for spec in specs:
        args = list(getattr(spec, "args", ()))
        for i, a in enumerate(args):
            flag, eq, val = a.partition("=")
            if flag.replace("_", "-") not in SECRET_FLAGS:
                continue
            if eq:
                out.add(val)
                continue
            for v in args[i + 1 :]:
                if v.startswith("-"):
                    break
                out.add(v)
        out |= {v for k, v in getattr(spec, "env", {}).items() if k in SECRET_ENV}
    out |= {v for k, v in os.environ.items() if k in SECRET_ENV}
    return {s for s in out if len(s) >= 4}  # a 1-3 character "key" would blank out ordinary text


def _scrub(path: Path, secrets: set[str]) -> None:
    """Replace every secret in every file of the fresh bundle: the config, the tree's command
    lines, and vLLM's own log lines (it prints its arguments, the key among them)."""
    if not secrets:
        return
    for f in path.iterdir():
        text = f.read_text(errors="replace")
        clean = text
        for sec in secrets:
            clean = clean.replace(sec, "<redacted>")
        if clean != text:
            fd = os.open(f, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "w", errors="replace") as fh:
                fh.write(clean)


def _own_dir(base: Path) -> bool:
    """`state_dir/incidents` as a real directory of ours (made if missing), never through a
    symlink: a link planted there once made the pruning below delete root's directories
    elsewhere. Anything else there: no bundle (best effort, as documented), nothing touched."""
    try:
        base.mkdir(parents=True, exist_ok=True, mode=0o750)
        st = os.lstat(base)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid in (0, os.geteuid()) and not st.st_mode & 0o022


def _dump(p: Path, obj: Any) -> None:
    _write(p, json.dumps(obj, indent=2, default=str) + "\n")


def _write(p: Path, text: str) -> None:
    # A fresh file in the fresh bundle directory: O_EXCL|O_NOFOLLOW, so nothing is followed.
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    with os.fdopen(fd, "w", errors="replace") as f:
        f.write(text)


def _shm_listing(root: str = "/dev/shm") -> list[dict[str, Any]]:  # noqa: S108 - listed, not written
    out = []
    with contextlib.suppress(OSError):
        for e in os.scandir(root):
            with contextlib.suppress(OSError):
                st = e.stat(follow_symlinks=False)
                out.append({"name": e.name, "bytes": st.st_size, "uid": st.st_uid, "mtime": int(st.st_mtime)})
    return sorted(out, key=lambda d: d["name"])


# What write_bundle names a bundle; nothing else under incidents/ is ever removed.
_BUNDLE = re.compile(r"^\d{8}T\d{6}Z-[A-Za-z0-9_.-]{1,40}(-\d+)?$")


def _prune(base: Path) -> None:
    """Keep the newest KEEP bundles. Only real directories with a bundle's name are removed
    (a symlink is never followed, at the top or inside: shutil.rmtree's fd-based walk)."""
    with os.scandir(base) as it:
        bundles = sorted(e.name for e in it if _BUNDLE.match(e.name) and e.is_dir(follow_symlinks=False))
    for old in bundles[:-KEEP]:
        shutil.rmtree(base / old, ignore_errors=True)
