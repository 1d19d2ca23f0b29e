"""The supervisors under test, behind one small interface, each supervising the same vLLM command.

vsup (the daemon from this repository), supervisord (`supervisor==4.3.0`: `autorestart=true`,
`stopasgroup=true`, `killasgroup=true`), circus (`circus==0.19.0`: `respawn = true`) and a bash
`while true; do python -m vllm...; done` loop. The peers live in their own venvs under
`$VSUP_CACHE/bench-peers/`, installed idempotently (a `.ok` marker per venv names the pinned
version). Every supervisor is started in its own session by the harness, so the harness can
tell its processes from everyone else's and kill exactly them.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import procs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from toml_writer import toml_value as _toml

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("VSUP_CACHE", Path.home() / ".cache" / "vsup"))
PEERS = CACHE / "bench-peers"
VLLM_PY = CACHE / "vllm-0.32.0" / "bin" / "python"
MODELS = CACHE / "models"
VSUP_PY = Path(sys.executable)  # run.py runs under the repo's .venv, where vsup is installed
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
VLLM_ARGS = ["--dtype", "bfloat16", "--max-model-len", "256", "-tp", "2", "--enforce-eager"]
VLLM_MODULE = "vllm.entrypoints.openai.api_server"

PINS = {"supervisord": ["supervisor==4.3.0"], "circus": ["circus==0.19.0"], "tools": ["matplotlib"]}
# How long a graceful stop may take before the harness kills what is left by pid.
STOP_S = 45.0


def ensure_venv(name: str, log: Any = print) -> Path:
    """Create `$VSUP_CACHE/bench-peers/<name>` with its pinned packages, once."""
    venv = PEERS / name
    marker = venv / ".ok"
    want = " ".join(PINS[name])
    if marker.exists() and marker.read_text().strip() == want:
        return venv
    log(f"installing {want} into {venv} ...")
    PEERS.mkdir(parents=True, exist_ok=True)
    py = os.environ.get("PY", "python3.11")
    subprocess.run([py, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", *PINS[name]],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    marker.write_text(want + "\n")
    return venv


def vllm_argv(model: str, port: int) -> list[str]:
    """The one command line every supervisor runs (vsup builds the same from its config)."""
    return [
        str(VLLM_PY),
        "-m",
        VLLM_MODULE,
        "--model",
        str(MODELS / model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        model,
        *VLLM_ARGS,
    ]


def pkg_version(venv_python: Path, dist: str) -> str:
    r = subprocess.run(
        [str(venv_python), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
        capture_output=True,
        text=True,
    )
    return r.stdout.strip() or "?"


@dataclass
class Started:
    proc: subprocess.Popen
    member: procs.Member


class Supervisor:
    """One supervisor under test in its own work dir; `port` is the vLLM port it supervises."""

    name = "?"

    def __init__(self, workdir: Path, port: int, model: str = "tiny-a") -> None:
        self.dir = workdir
        self.port = port
        self.model = model
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "vllm.log"
        self.started: list[Started] = []  # every supervisor process the harness launched
        self._out = None

    # what each kind defines
    def write_config(self) -> None:
        raise NotImplementedError

    def argv(self) -> list[str]:
        raise NotImplementedError

    def graceful_stop(self) -> None:
        """Ask the supervisor to stop the server and itself, as an operator would."""
        raise NotImplementedError

    def swap(self, model: str) -> None:
        """Serve `model` instead: vsup reload, or the peer's stop + edit config + start."""
        raise NotImplementedError

    def logs(self) -> list[Path]:
        return [self.log]

    # common
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(k, None)
        return env

    def start(self) -> None:
        if not self.started:
            self.write_config()
        with open(self.dir / f"{self.name}.out", "ab") as out:
            p = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env(),
                cwd=self.dir,
                start_new_session=True,
            )
        st = None
        for _ in range(50):
            st = procs.read_stat(p.pid)
            if st is not None:
                break
            time.sleep(0.01)
        self.started.append(
            Started(p, procs.Member(p.pid, st.start if st else 0, " ".join(self.argv()), time.time()))
        )

    def pids(self) -> list[procs.Member]:
        """The live supervisor process(es): what idle RSS/CPU measures and fault 4 kills."""
        return [s.member for s in self.started if s.proc.poll() is None]

    def sigkill(self) -> float:
        t = time.time()
        for m in self.pids():
            os.kill(m.pid, signal.SIGKILL)
        for s in self.started:
            try:
                s.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        return t

    def shutdown(self) -> list[str]:
        """Graceful stop, then SIGKILL of whatever the harness started that still runs."""
        problems = []
        if self.pids():
            try:
                self.graceful_stop()
            except (subprocess.SubprocessError, OSError) as e:
                problems.append(f"{self.name} graceful stop: {e}")
        for s in self.started:
            try:
                s.proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                problems.append(f"{self.name} pid {s.proc.pid} did not exit within {STOP_S:g}s; killed")
                try:
                    os.killpg(s.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                s.proc.wait(10)
        return problems

    def versions(self) -> str:
        return ""


class Vsup(Supervisor):
    name = "vsup"

    def write_config(self) -> None:
        # The shipped defaults (deploy/vsup.toml, config.py) except paths, port and models. The
        # remedy ladder is off so that vsup runs exactly the peers' command line after a fault.
        cfg: dict[str, dict[str, Any]] = {
            "vllm": {
                "python": str(VLLM_PY),
                "model": str(MODELS / self.model),
                "served_model_name": self.model,
                "port": self.port,
                "args": VLLM_ARGS,
                "env": VLLM_ENV,
                "log_file": str(self.log),
            },
            "daemon": {"state_dir": str(self.dir / "state"), "socket": str(self.dir / "run" / "vsup.sock")},
            "remedies": {"enabled": False},
        }
        lines = []
        for sec, table in cfg.items():
            lines.append(f"[{sec}]")
            lines += [f"{k} = {_toml(v)}" for k, v in table.items()]
        for m in ("tiny-a", "tiny-b"):
            lines += [f"[models.{m}]", f"model = {_toml(str(MODELS / m))}", f'served_model_name = "{m}"']
        (self.dir / "vsup.toml").write_text("\n".join(lines) + "\n")

    def argv(self) -> list[str]:
        return [str(VSUP_PY), "-m", "vsup", "run", "--config", str(self.dir / "vsup.toml")]

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VSUP_PY), "-m", "vsup", *args, "--config", str(self.dir / "vsup.toml")],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
        )

    def status(self) -> dict[str, Any] | None:
        try:
            r = self.cli("status", "--json", timeout=15)
        except subprocess.TimeoutExpired:
            return None
        try:
            return json.loads(r.stdout) if r.returncode == 0 else None
        except ValueError:
            return None

    def events(self) -> list[dict[str, Any]]:
        path = self.dir / "state" / "events.jsonl"
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def graceful_stop(self) -> None:
        for m in self.pids():
            os.kill(m.pid, signal.SIGTERM)

    def swap(self, model: str) -> None:
        r = self.cli("reload", model, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"vsup reload {model} exited {r.returncode}: {r.stderr.strip()[-300:]}")

    def versions(self) -> str:
        return pkg_version(VSUP_PY, "vsup")


class VsupProxy(Vsup):
    """vsup with its proxy on (`[proxy]`): clients connect to `listen`, vLLM stays on `port`.

    `proxy` adds keys to the section (idle_unload_s, swap_on_request, ...); the rest are the
    shipped defaults."""

    def __init__(
        self,
        workdir: Path,
        port: int,
        model: str = "tiny-a",
        listen: int | None = None,
        proxy: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(workdir, port, model)
        self.listen = listen if listen is not None else port + 1
        self.proxy = dict(proxy or {})

    def write_config(self) -> None:
        super().write_config()
        cfg = {"listen": f"127.0.0.1:{self.listen}", **self.proxy}
        with open(self.dir / "vsup.toml", "a") as f:
            f.write("\n[proxy]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in cfg.items()))


class Supervisord(Supervisor):
    name = "supervisord"

    def conf(self, model: str) -> str:
        run = self.dir
        env = ",".join(f'{k}="{v}"' for k, v in VLLM_ENV.items())
        return f"""[unix_http_server]
file={run}/supervisor.sock
[supervisord]
nodaemon=true
logfile={run}/supervisord.log
pidfile={run}/supervisord.pid
childlogdir={run}
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[supervisorctl]
serverurl=unix://{run}/supervisor.sock
[program:vllm]
command={shlex.join(vllm_argv(model, self.port)).replace("%", "%%")}
environment={env}
autostart=true
autorestart=true
startsecs=1
startretries=3
stopasgroup=true
killasgroup=true
stopwaitsecs=20
redirect_stderr=true
stdout_logfile={self.log}
stdout_logfile_maxbytes=0
"""

    def write_config(self) -> None:
        (self.dir / "supervisord.conf").write_text(self.conf(self.model))

    def bin(self, tool: str) -> str:
        return str(PEERS / "supervisord" / "bin" / tool)

    def argv(self) -> list[str]:
        return [self.bin("supervisord"), "-c", str(self.dir / "supervisord.conf")]

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.bin("supervisorctl"), "-c", str(self.dir / "supervisord.conf"), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def graceful_stop(self) -> None:
        self.ctl("shutdown")

    def swap(self, model: str) -> None:
        self.ctl("stop", "vllm")
        self.model = model
        self.write_config()
        self.ctl("update")  # rereads the file, replaces the changed program; autostart starts it

    def versions(self) -> str:
        return pkg_version(PEERS / "supervisord" / "bin" / "python", "supervisor")


class Circus(Supervisor):
    name = "circus"

    def ini(self, model: str) -> str:
        run = self.dir
        argv = vllm_argv(model, self.port)
        env = "\n".join(f"{k} = {v}" for k, v in VLLM_ENV.items())
        return f"""[circus]
endpoint = ipc://{run}/circus-ctl.sock
pubsub_endpoint = ipc://{run}/circus-pub.sock
stats_endpoint = ipc://{run}/circus-stats.sock
statsd = false
check_delay = 5
loglevel = info
logoutput = {run}/circusd.log

[watcher:vllm]
cmd = {argv[0]}
args = {shlex.join(argv[1:])}
numprocesses = 1
respawn = true
copy_env = true
stop_signal = TERM
stop_children = true
graceful_timeout = 20
stdout_stream.class = FileStream
stdout_stream.filename = {self.log}
stderr_stream.class = FileStream
stderr_stream.filename = {self.dir}/vllm.err.log

[env:vllm]
{env}
"""

    def write_config(self) -> None:
        (self.dir / "circus.ini").write_text(self.ini(self.model))

    def logs(self) -> list[Path]:
        return [self.log, self.dir / "vllm.err.log"]

    def bin(self, tool: str) -> str:
        return str(PEERS / "circus" / "bin" / tool)

    def argv(self) -> list[str]:
        return [self.bin("circusd"), str(self.dir / "circus.ini")]

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                self.bin("circusctl"),
                "--endpoint",
                f"ipc://{self.dir}/circus-ctl.sock",
                "--timeout",
                str(int(timeout)),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout + 10,
        )

    def graceful_stop(self) -> None:
        self.ctl("quit", "--waiting")

    def swap(self, model: str) -> None:
        self.ctl("stop", "vllm", "--waiting")
        self.model = model
        self.write_config()
        self.ctl("reloadconfig", "--waiting")
        self.ctl("start", "vllm", "--waiting")

    def versions(self) -> str:
        return pkg_version(PEERS / "circus" / "bin" / "python", "circus")


class BashLoop(Supervisor):
    name = "bash-loop"

    def script(self, model: str) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in VLLM_ENV.items())
        return f"""#!/bin/bash
# the simplest supervisor there is
while true; do
  {env} {shlex.join(vllm_argv(model, self.port))} >> {shlex.quote(str(self.log))} 2>&1
done
"""

    def write_config(self) -> None:
        path = self.dir / "loop.sh"
        path.write_text(self.script(self.model))
        path.chmod(0o755)

    def argv(self) -> list[str]:
        return ["/bin/bash", str(self.dir / "loop.sh")]

    def graceful_stop(self) -> None:
        # An operator kills the loop, then the server (SIGTERM to the loop's process group, which
        # vLLM's children share: bash without job control does not give them their own). Ctrl-C
        # would not do: vLLM catches SIGINT and exits normally, so bash runs the next iteration.
        groups = [m.pid for m in self.pids()]
        for pgid in groups:
            try:
                os.kill(pgid, signal.SIGTERM)
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        end = time.monotonic() + 20
        while time.monotonic() < end and any(_group_alive(g) for g in groups):
            time.sleep(0.2)
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def swap(self, model: str) -> None:
        self.graceful_stop()
        for s in self.started:
            s.proc.wait(10)
        self.model = model
        self.write_config()
        self.start()

    def versions(self) -> str:
        return subprocess.run(
            ["bash", "-c", "echo $BASH_VERSION"], capture_output=True, text=True
        ).stdout.strip()


KINDS: dict[str, type[Supervisor]] = {k.name: k for k in (Vsup, Supervisord, Circus, BashLoop)}
# The fault matrix (issue 19): vsup with its proxy on, clients at the proxy; the peers behind HAProxy.
MATRIX: dict[str, type[Supervisor]] = {**KINDS, "vsup": VsupProxy}
NEEDS_VENV = {"supervisord": "supervisord", "circus": "circus"}


def _group_alive(pgid: int) -> bool:
    return any(st.pgid == pgid and st.state != "Z" for st in procs.all_stats().values())
