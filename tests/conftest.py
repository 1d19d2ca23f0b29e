"""Fixtures shared by the test modules; the helpers themselves live in support.py.

(Helpers are imported as `from support import ...`: a module named `conftest` would be shadowed
by the conftest.py of tests/systemd/.)
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vsup
from support import (
    OTHER_USER,
    Daemon,
    Gates,
    OtherUser,
    ensure_other_user,
    fake_sections,
    free_port,
    other_user_python,
    readable_copy,
)


@pytest.fixture
def fake_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Factory for a daemon supervising the fake OpenAI server (fast, no vLLM)."""
    made: list[Daemon] = []

    def make(
        mode: str = "ok",
        *,
        env: dict[str, str] | None = None,
        start: bool = True,
        extra: dict[str, dict[str, Any]] | None = None,
        args: tuple[str, ...] = (),
    ) -> Daemon:
        d = Daemon(
            tmp_path / f"d{len(made)}", fake_sections(free_port(8050, 8099), mode, env, **(extra or {}))
        )
        d.tmp.mkdir(parents=True, exist_ok=True)
        made.append(d)
        if start:
            d.start(*args)
        return d

    yield make
    for d in made:
        d.close()


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A fresh directory every user may traverse (tmp_path is 0700 for root only); removed after."""
    path = Path(tempfile.mkdtemp(prefix="vsup-public-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def gates() -> Gates:
    return Gates()


@pytest.fixture(scope="session")
def other_user() -> Iterator[OtherUser]:
    """The user `vsuptest` in group `vsuptestgrp`, created if missing (left in place: shared)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second user and run a client as it")
    ensure_other_user()
    python = other_user_python()
    if python is None:
        pytest.skip(f"no Python >= 3.11 that {OTHER_USER} may execute")
    with readable_copy(vsup) as vsup_path:
        yield OtherUser(python, vsup_path)
