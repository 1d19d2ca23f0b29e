"""vLLM's version, read from the configured interpreter's site-packages without running it."""

from __future__ import annotations

import sys
from pathlib import Path

from vsup.incidents import vllm_version


def _dist(root: Path, version: str) -> None:
    meta = root / "lib" / "python3.11" / "site-packages" / f"vllm-{version}.dist-info" / "METADATA"
    meta.parent.mkdir(parents=True)
    meta.write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")


def test_version_found_in_the_venv_whose_python_is_a_symlink(tmp_path: Path) -> None:
    """A venv's bin/python links to the base interpreter: the venv's site-packages counts."""
    base, venv = tmp_path / "base", tmp_path / "venv"
    (base / "bin").mkdir(parents=True)
    (base / "bin" / "python3.11").write_text("")
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(base / "bin" / "python3.11")
    _dist(venv, "0.32.0")
    assert vllm_version(str(venv / "bin" / "python")) == "0.32.0"


def test_version_of_a_plain_install_and_none_without_vllm(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python3").write_text("")
    assert vllm_version(str(tmp_path / "bin" / "python3")) is None
    _dist(tmp_path, "0.6.3.post1")
    assert vllm_version(str(tmp_path / "bin" / "python3")) == "0.6.3.post1"
    assert vllm_version(sys.executable) is None  # the test venv has no vLLM
