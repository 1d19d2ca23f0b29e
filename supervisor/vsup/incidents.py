"""Incident bundles: everything an operator needs to understand one failure, in one folder.

``state_dir/incidents/<UTC time>-<kind>/`` holds the last log lines of the failed tree
(redacted: the seed log carries a user's whole prompt), the parsed findings, the tree record,
a ``/dev/shm`` listing, recent events, the config and the vLLM version. Writing a bundle is
best effort: a full disk must not stop the recovery it documents.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

LOG_TAIL = 2000
KEEP = 50


def vllm_version(python: str) -> str | None:
    """vLLM's version from the interpreter's site-packages metadata, without running it
    (the daemon starts no subprocess besides vLLM: it reaps every child it has)."""
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
    events: list[dict],
    cleanup: dict | None,
    vllm_version: str | None,
) -> Path | None:
    base = Path(cfg.state_dir) / "incidents"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    safe_kind = re.sub(r"[^A-Za-z0-9_.-]", "_", kind)[:40]
    path = base / f"{stamp}-{safe_kind}"
    n = 1
    while path.exists():
        n += 1
        path = base / f"{stamp}-{safe_kind}-{n}"
    try:
        path.mkdir(parents=True, mode=0o750)
        tail = _redact_lines(lines[-LOG_TAIL:])
        (path / "log_tail.txt").write_text("\n".join(tail) + "\n", errors="replace")
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
        _dump(path / "incident.json", summary)
        _dump(path / "tree.json", tree.to_json() if tree is not None else None)
        _dump(path / "shm.json", _shm_listing())
        with open(path / "events.jsonl", "w") as f:
            for ev in events[-200:]:
                f.write(json.dumps(ev, default=str) + "\n")
        with contextlib.suppress(OSError):
            shutil.copyfile(cfg.path, path / "config.toml")
        _prune(base)
        return path
    except OSError:
        return None


def _dump(p: Path, obj: Any) -> None:
    p.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def _shm_listing(root: str = "/dev/shm") -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(OSError):
        for e in os.scandir(root):
            with contextlib.suppress(OSError):
                st = e.stat(follow_symlinks=False)
                out.append({"name": e.name, "bytes": st.st_size, "uid": st.st_uid, "mtime": int(st.st_mtime)})
    return sorted(out, key=lambda d: d["name"])


def _prune(base: Path) -> None:
    bundles = sorted(p for p in base.iterdir() if p.is_dir())
    for old in bundles[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
