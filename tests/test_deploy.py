"""Tests for deploy/: the systemd unit passes systemd-analyze and agrees with the example config."""

from __future__ import annotations

import grp
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vsup import config

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "deploy" / "vsup.service"
TOML = REPO / "deploy" / "vsup.toml"
INSTALLED_VSUP = "/opt/vsup/bin/vsup"
INSTALLED_CONFIG = "/etc/vsup/vsup.toml"
# The console script of the environment running the tests (the repo's .venv).
VENV_VSUP = Path(sys.executable).parent / "vsup"


def unit_entries(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) lists: keys such as DeviceAllow= repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"key outside a section: {raw!r}"
        sections[current].append((key.strip(), value.strip()))
    return sections


def one(section: list[tuple[str, str]], key: str) -> str:
    values = [v for k, v in section if k == key]
    assert len(values) == 1, f"{key}= appears {len(values)} times"
    return values[0]


def seconds(span: str) -> float:
    """A systemd time span such as '120s', '15min' or '30' in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span):
        total += float(number) * units[unit]
    return total


@pytest.fixture(scope="module")
def service() -> list[tuple[str, str]]:
    return unit_entries(UNIT.read_text())["Service"]


def localized_example(dest: Path) -> Path:
    """deploy/vsup.toml with what exists only on an installed GPU box replaced by what exists
    here: the vLLM interpreter (this one) and the service group vsup (our own group)."""
    here_group = grp.getgrgid(os.getgid()).gr_name
    text = TOML.read_text().replace("/opt/vllm/venv/bin/python", sys.executable)
    text = text.replace('admin_groups = ["vsup"]', f'admin_groups = ["{here_group}"]')
    assert text.count(sys.executable) == 1 and here_group in text
    dest.write_text(text)
    return dest


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> config.Config:
    return config.load(localized_example(tmp_path_factory.mktemp("example") / "vsup.toml"))


def test_systemd_analyze_verify_accepts_unit(tmp_path: Path) -> None:
    """systemd-analyze verify reports nothing about the unit with its paths pointed at this venv."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing: apt-get install -y systemd (Debian package 'systemd')"
    assert VENV_VSUP.exists(), f"{VENV_VSUP} missing: pip install -e . in this venv"
    copy = tmp_path / "vsup.service"
    copy.write_text(UNIT.read_text().replace(INSTALLED_VSUP, str(VENV_VSUP)))
    proc = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    about_us = [line for line in (proc.stdout + proc.stderr).splitlines() if "vsup" in line]
    assert proc.returncode == 0 and not about_us, proc.stdout + proc.stderr


def test_verify_would_catch_a_bad_key(tmp_path: Path) -> None:
    """The verify check above is not vacuous: a misspelt value in the same unit is reported."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing: apt-get install -y systemd (Debian package 'systemd')"
    copy = tmp_path / "vsup.service"
    text = UNIT.read_text().replace(INSTALLED_VSUP, str(VENV_VSUP))
    copy.write_text(text.replace("KillMode=mixed", "KillMode=mixd"))
    proc = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert "mixd" in proc.stderr


def test_every_command_uses_installed_binary_and_config(service: list[tuple[str, str]]) -> None:
    """ExecStart, ExecReload and ExecStopPost run /opt/vsup/bin/vsup on /etc/vsup/vsup.toml."""
    expected = {
        "ExecStart": f"{INSTALLED_VSUP} run --config {INSTALLED_CONFIG}",
        "ExecReload": f"{INSTALLED_VSUP} reload --current --config {INSTALLED_CONFIG}",
        "ExecStopPost": f"{INSTALLED_VSUP} cleanup --config {INSTALLED_CONFIG}",
    }
    for key, command in expected.items():
        assert one(service, key) == command


def test_notify_type_watchdog_and_kill_mode(service: list[tuple[str, str]]) -> None:
    """The unit is Type=notify for vsup's pid only, with a watchdog and KillMode=mixed."""
    assert one(service, "Type") == "notify"
    assert one(service, "NotifyAccess") == "main"
    assert seconds(one(service, "WatchdogSec")) > 0
    assert one(service, "KillMode") == "mixed"
    assert one(service, "Restart") == "on-failure"


def test_example_config_paths_live_in_unit_directories(
    service: list[tuple[str, str]], example: config.Config
) -> None:
    """state_dir, socket and log_file sit in the State-, Runtime- and LogsDirectory the unit creates."""
    assert Path(example.daemon.state_dir) == Path("/var/lib") / one(service, "StateDirectory")
    assert Path(example.daemon.socket).parent == Path("/run") / one(service, "RuntimeDirectory")
    assert Path(example.vllm.log_file).parent == Path("/var/log") / one(service, "LogsDirectory")


def test_stop_timeout_outlasts_vsups_own_stop(service: list[tuple[str, str]], example: config.Config) -> None:
    """TimeoutStopSec exceeds vsup's worst-case stop, so systemd never SIGKILLs a stop in progress."""
    t = example.timeouts
    vsup_stop = t.shutdown_drain_s + t.stop_grace_s + t.kill_wait_s + t.cleanup_grace_s + t.gpu_release_s
    assert seconds(one(service, "TimeoutStopSec")) > vsup_stop


def test_start_timeout_outlasts_vsups_start(service: list[tuple[str, str]], example: config.Config) -> None:
    """TimeoutStartSec (also ExecReload's limit) exceeds a reload: drain, stop, release, start."""
    t = example.timeouts
    reload_s = t.drain_s + t.stop_grace_s + t.kill_wait_s + t.cleanup_grace_s + t.gpu_release_s + t.start_s
    assert seconds(one(service, "TimeoutStartSec")) > reload_s


def test_nvidia_devices_are_allowed(service: list[tuple[str, str]]) -> None:
    """The device allow-list names the NVIDIA device groups (GPU, control, UVM) read-write."""
    allowed = {v for k, v in service if k == "DeviceAllow"}
    assert {"char-nvidia-frontend rw", "char-nvidia-uvm rw"} <= allowed


def test_example_config_is_valid_once_interpreter_and_group_exist(tmp_path: Path) -> None:
    """deploy/vsup.toml passes full validation with a real interpreter and an existing group."""
    cfg = config.load(localized_example(tmp_path / "vsup.toml"))
    assert cfg.vllm.python == sys.executable
    assert config.tensor_parallel_size(cfg.vllm.args) == 2


def test_unit_commands_parse_with_the_cli(service: list[tuple[str, str]]) -> None:
    """Every Exec*= line of the unit is a command line `vsup` accepts (subcommand and options)."""
    from vsup.cli import build_parser

    for key in ("ExecStart", "ExecReload", "ExecStopPost"):
        argv = one(service, key).split()
        assert argv[0] == INSTALLED_VSUP
        args = build_parser().parse_args(argv[1:])
        assert args.config == INSTALLED_CONFIG


def test_check_config_accepts_example_except_what_install_creates(tmp_path: Path) -> None:
    """`vsup check-config` rejects the example here only for the GPU box's interpreter, and accepts it localized."""
    as_shipped = subprocess.run(
        [str(VENV_VSUP), "check-config", str(TOML)], capture_output=True, text=True, timeout=60
    )
    assert as_shipped.returncode == 2
    assert as_shipped.stderr.strip() == (
        f"vsup: config error: {TOML}: vllm.python: interpreter /opt/vllm/venv/bin/python does not exist"
    )
    copy = localized_example(tmp_path / "vsup.toml")
    here = subprocess.run(
        [str(VENV_VSUP), "check-config", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert here.returncode == 0, here.stderr


# ---- the template unit for several instances on one host (issue 18) ---------------------------

TEMPLATE = REPO / "deploy" / "vsup@.service"
INSTANCE_CONFIG = "/etc/vsup/%i.toml"
# The lines that differ between vsup@.service and vsup.service, and how.
PER_INSTANCE = {
    "Description": "vsup supervisor for a vLLM OpenAI server (instance %i)",
    "ExecStart": f"{INSTALLED_VSUP} run --config {INSTANCE_CONFIG}",
    "ExecReload": f"{INSTALLED_VSUP} reload --current --config {INSTANCE_CONFIG}",
    "ExecStopPost": f"{INSTALLED_VSUP} cleanup --config {INSTANCE_CONFIG}",
    "StateDirectory": "vsup/%i",
    "RuntimeDirectory": "vsup/%i",
    "LogsDirectory": "vsup/%i",
}


def verify_instance(tmp_path: Path, text: str, instance: str = "a") -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify on instance `instance` of a copy of the template in `tmp_path`."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing: apt-get install -y systemd (Debian package 'systemd')"
    (tmp_path / "vsup@.service").write_text(text.replace(INSTALLED_VSUP, str(VENV_VSUP)))
    return subprocess.run(
        [analyze, "verify", str(tmp_path / f"vsup@{instance}.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_template_unit_verifies_for_an_instance(tmp_path: Path) -> None:
    """systemd-analyze verify reports nothing about instance vsup@a of the template unit."""
    proc = verify_instance(tmp_path, TEMPLATE.read_text())
    about_us = [line for line in (proc.stdout + proc.stderr).splitlines() if "vsup" in line]
    assert proc.returncode == 0 and not about_us, proc.stdout + proc.stderr


def test_template_verify_would_catch_a_bad_key(tmp_path: Path) -> None:
    """Verifying an instance does load the template: a misspelt value in it is reported."""
    proc = verify_instance(tmp_path, TEMPLATE.read_text().replace("KillMode=mixed", "KillMode=mixd"))
    assert "mixd" in proc.stderr


def test_template_differs_from_the_single_unit_only_per_instance() -> None:
    """Every setting of vsup@.service equals vsup.service's except config, directories and name,
    so the hardening and timing explained in vsup.service hold for every instance."""
    single = unit_entries(UNIT.read_text())
    template = unit_entries(TEMPLATE.read_text())
    assert single.keys() == template.keys()
    for section, entries in single.items():
        expected = [(k, PER_INSTANCE.get(k, v)) for k, v in entries]
        assert template[section] == expected, section


def test_template_directories_are_per_instance_and_shared_parents_survive() -> None:
    """Runtime, state and logs directories are vsup/%i: systemd removes only the innermost
    directory of a stopping instance, never /run/vsup with another instance's socket in it."""
    svc = unit_entries(TEMPLATE.read_text())["Service"]
    for key in ("RuntimeDirectory", "StateDirectory", "LogsDirectory"):
        assert one(svc, key) == "vsup/%i"
    assert "RuntimeDirectoryPreserve" not in {k for k, _ in svc}


def test_instance_config_paths_live_in_the_instance_directories(tmp_path: Path) -> None:
    """An instance config written as deploy/README.md says (state, socket and log under the
    instance's directories, its own port and GPUs) loads, and its paths are the unit's for %i."""
    svc = unit_entries(TEMPLATE.read_text())["Service"]
    for name, port, gpus in (("a", 8001, "0"), ("b", 8002, "1")):
        text = localized_example(tmp_path / f"{name}.toml").read_text()
        text = text.replace('state_dir = "/var/lib/vsup"', f'state_dir = "/var/lib/vsup/{name}"')
        text = text.replace('socket = "/run/vsup/vsup.sock"', f'socket = "/run/vsup/{name}/vsup.sock"')
        text = text.replace(
            'log_file = "/var/log/vsup/vllm.log"', f'log_file = "/var/log/vsup/{name}/vllm.log"'
        )
        text = text.replace("port = 8000", f"port = {port}")
        text = text.replace('CUDA_VISIBLE_DEVICES = "0,1"', f'CUDA_VISIBLE_DEVICES = "{gpus}"')
        text = text.replace("metrics_port = 9464", f"metrics_port = {9464 + port - 8000}")
        (tmp_path / f"{name}.toml").write_text(text)
        cfg = config.load(tmp_path / f"{name}.toml")
        dirs = {k: one(svc, f"{k}Directory").replace("%i", name) for k in ("State", "Runtime", "Logs")}
        assert Path(cfg.daemon.state_dir) == Path("/var/lib") / dirs["State"]
        assert Path(cfg.daemon.socket).parent == Path("/run") / dirs["Runtime"]
        assert Path(cfg.vllm.log_file).parent == Path("/var/log") / dirs["Logs"]
        assert cfg.vllm.port == port and cfg.vllm.env["CUDA_VISIBLE_DEVICES"] == gpus
