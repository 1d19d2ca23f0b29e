"""Config validation: every bad config is one clear line naming file and key, and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vsup import config

GOOD = f"""
[vllm]
python = "{sys.executable}"
model = "/models/tiny-a"
args = ["-tp", "2"]
env = {{ VLLM_CPU_KVCACHE_SPACE = "1" }}
port = 8000

[daemon]
state_dir = "/tmp/x"

[models.b]
model = "/models/tiny-b"
args = ["--max-model-len", "128"]
"""


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vsup", "check-config", str(path)], capture_output=True, text=True
    )


def test_good_config_loads_with_defaults(tmp_path: Path) -> None:
    """A minimal valid config loads, and unset keys take their documented defaults."""
    p = tmp_path / "c.toml"
    p.write_text(GOOD)
    cfg = config.load(p)
    assert cfg.vllm.host == "127.0.0.1"
    assert cfg.timeouts.stop_grace_s == 20.0
    assert cfg.models["b"].args == ["--max-model-len", "128"]
    assert cfg.remedies.ladder[0].args == ["--disable-custom-all-reduce"]
    assert run_check(p).returncode == 0


@pytest.mark.parametrize(
    "body, key, words",
    [
        ("[vllm\npython=1", None, "TOML syntax error"),
        (GOOD + "\n[vllm2]\nx=1\n", "vllm2", "unknown section"),
        (GOOD.replace("port = 8000", "port = 8000\ncolour = 1"), "vllm.colour", "unknown key"),
        (GOOD.replace("port = 8000", 'port = "8000"'), "vllm.port", "expected integer"),
        (GOOD.replace("port = 8000", "port = 70000"), "vllm.port", "out of range"),
        (GOOD.replace("port = 8000", "port = 0"), "vllm.port", "out of range"),
        (
            GOOD.replace(f'python = "{sys.executable}"', 'python = "/nonexistent/python"'),
            "vllm.python",
            "does not exist",
        ),
        (GOOD.replace(f'python = "{sys.executable}"', 'python = "python3"'), "vllm.python", "absolute path"),
        (GOOD.replace('model = "/models/tiny-a"', ""), "vllm.model", "required"),
        (GOOD.replace('args = ["-tp", "2"]', 'args = "-tp 2"'), "vllm.args", "array of strings"),
        (GOOD.replace('args = ["-tp", "2"]', 'args = ["--port", "9"]'), "vllm.args", "--port is set by vsup"),
        (GOOD + "\n[timeouts]\nstop_grace_s = true\n", "timeouts.stop_grace_s", "expected number"),
        (GOOD + "\n[models.c]\nargs = []\n", "models.c.model", "required"),
        (
            GOOD.replace('state_dir = "/tmp/x"', 'state_dir = "/tmp/x"\nsocket_group = "no-such-group-x"'),
            "daemon.socket_group",
            "no such group",
        ),
        (
            GOOD + '\n[remedies]\nladder = [{ name = "x", flags = [] }]\n',
            "remedies.ladder[0].flags",
            "unknown key",
        ),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path: Path, body: str, key: str | None, words: str) -> None:
    """Each kind of bad config exits 2 with one line naming the file, the key and the problem."""
    p = tmp_path / "c.toml"
    p.write_text(body)
    r = run_check(p)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(p) in lines[0] and words in lines[0]
    if key:
        assert key in lines[0]
    assert "Traceback" not in r.stderr


def test_missing_file_is_exit_2(tmp_path: Path) -> None:
    """A config path that does not exist is a one-line error, exit 2."""
    r = run_check(tmp_path / "nope.toml")
    assert r.returncode == 2 and "file not found" in r.stderr


def test_lookup_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--config wins over $VSUP_CONFIG, which wins over /etc/vsup/vsup.toml."""
    monkeypatch.setenv("VSUP_CONFIG", "/env.toml")
    assert config.resolve_path("/cli.toml") == Path("/cli.toml")
    assert config.resolve_path(None) == Path("/env.toml")
    monkeypatch.delenv("VSUP_CONFIG")
    assert config.resolve_path(None) == config.DEFAULT_PATH


def test_model_spec_named_and_path(tmp_path: Path) -> None:
    """reload NAME takes [models.NAME]; anything else is a model path with the [vllm] args."""
    p = tmp_path / "c.toml"
    p.write_text(GOOD)
    cfg = config.load(p)
    assert cfg.model_spec("b").model == "/models/tiny-b"
    assert cfg.model_spec("/other").model == "/other"
    assert cfg.model_spec().model == "/models/tiny-a"


def test_tensor_parallel_size_parsing() -> None:
    """-tp N, --tensor-parallel-size=N, last one wins, default 1."""
    assert config.tensor_parallel_size(["-tp", "2"]) == 2
    assert config.tensor_parallel_size(["--tensor-parallel-size=4", "-tp", "2"]) == 2
    assert config.tensor_parallel_size([]) == 1


def test_explain_lists_every_key() -> None:
    """--explain documents every field of every section."""
    text = config.explain()
    for key in ("stop_grace_s", "canary_interval_s", "max_failures", "socket_group", "module"):
        assert key in text
