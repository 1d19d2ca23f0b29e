"""Boot a real systemd as PID 1 of private namespaces, for tests of deploy/vsup.service.

The machines here run cgroup v1 (hybrid: v1 controllers plus a v2 tree at
/sys/fs/cgroup/unified) and PID 1 is not systemd, so `systemctl` has nothing to talk to. We
boot our own: ``unshare --pid --mount --uts --ipc --net`` runs ``ns-init.sh`` as PID 1 of the
new namespaces, which builds a private world and execs ``/lib/systemd/systemd``.

What keeps the shared machine safe (an earlier attempt booted systemd on the shared root: it
ran tmpfiles, wiped /tmp and started host services):
- Mounts: all private to the namespace; /etc is an overlay whose writes land in the staging
  directory; /run, /tmp, /var, /opt, /dev and /dev/shm are fresh; /sys and /proc/sys read-only.
- Units: SYSTEMD_UNIT_PATH names only our staging units/ (journald, the basic targets, the
  units under test); generators are disabled. No host unit exists for this systemd.
- Processes: a PID namespace; killing its PID 1 kills everything in it. ``unshare
  --kill-child`` ties PID 1's life to the unshare process the test owns.
- Cgroups: everything runs below one cgroup per boot (``vsup-systemd-test-<pid>``) in the
  hierarchies systemd writes to; removed at teardown. systemd's container mode
  (``container=``) keeps it from installing a release agent or touching the root cgroup.
- Network: its own namespace, loopback only; ports there cannot collide with anyone's.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
HOST_UNIT_DIR = Path("/lib/systemd/system")
# The host units the harness needs; everything else does not exist for its systemd.
HOST_UNITS = (
    "sysinit.target",
    "basic.target",
    "sockets.target",
    "paths.target",
    "timers.target",
    "slices.target",
    "local-fs.target",
    "local-fs-pre.target",
    "swap.target",
    "network.target",
    "network-pre.target",
    "network-online.target",
    "multi-user.target",
    "shutdown.target",
    "systemd-journald.service",
    "systemd-journald.socket",
    "systemd-journald-dev-log.socket",
)
# Hierarchies systemd writes to for our units (name=systemd and the v2 tree for tracking,
# devices for DeviceAllow=, pids for TasksMax=). Other controllers stay as the harness found
# them: accounting for them is off (system.conf drop-in below), so the memory limit of the
# session keeps applying to everything started inside.
CGROUP_HIERARCHIES = ("systemd", "unified", "devices", "pids")
CGROUP_ROOT = Path("/sys/fs/cgroup")
SERVICE_UID = 61900  # the vsup user inside the namespace only
# Where the repository and the test venv's site-packages appear inside the namespace.
REPO_IN_NS = "/opt/vsup-src"
DEPS_IN_NS = "/opt/vsup-deps"

# Named timeouts (seconds), measured on these 2-core machines: systemd reaches "running" in
# about 1 s; allow for a loaded machine.
BOOT_TIMEOUT_S = 60.0
TEARDOWN_TIMEOUT_S = 30.0


class HarnessError(RuntimeError):
    pass


@dataclass
class Systemd:
    """A booted systemd; ``run`` executes a command inside its namespaces."""

    init_pid: int  # PID 1 of the namespace, as seen from the host
    staging: Path  # seen as /run/harness inside

    def run(
        self, command: str, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [
                "nsenter",
                "-t",
                str(self.init_pid),
                "-m",
                "-u",
                "-i",
                "-n",
                "-p",
                "--",
                "/bin/sh",
                "-c",
                command,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
            env=_clean_env(),
        )
        if check and proc.returncode != 0:
            raise HarnessError(f"`{command}` exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def show(self, unit: str, prop: str) -> str:
        return self.run(f"systemctl show -P {prop} {unit}").stdout.strip()

    def logs(self) -> str:
        """Everything useful after a failure: boot log and the journal."""
        parts = []
        for name in ("ns-init.log", "systemd.log", "console.log"):
            p = self.staging / name
            if p.exists():
                parts.append(f"--- {name}\n{p.read_text(errors='replace')[-6000:]}")
        try:
            parts.append("--- journal\n" + self.run("journalctl --no-pager -n 200", check=False).stdout)
        except (subprocess.SubprocessError, OSError) as e:
            parts.append(f"--- journal unavailable: {e}")
        return "\n".join(parts)


def _clean_env() -> dict[str, str]:
    # Nothing of the test's environment (NOTIFY_SOCKET of an outer manager, VSUP_CONFIG...)
    # may leak into commands run inside.
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "SYSTEMD_PAGER": "",
        "SYSTEMD_COLORS": "0",
    }


def preflight() -> None:
    """Fail (never skip) with the reason when this machine cannot run the harness."""
    if os.geteuid() != 0:
        raise HarnessError("the systemd harness needs root (namespaces, mounts, cgroups)")
    for tool in ("unshare", "nsenter"):
        if not shutil.which(tool):
            raise HarnessError(f"{tool} missing: apt-get install -y util-linux")
    if not Path("/lib/systemd/systemd").exists():
        raise HarnessError("/lib/systemd/systemd missing: apt-get install -y systemd")
    for h in CGROUP_HIERARCHIES:
        if not (CGROUP_ROOT / h / "cgroup.procs").exists():
            raise HarnessError(
                f"cgroup hierarchy {CGROUP_ROOT / h} not mounted (layout: {os.listdir(CGROUP_ROOT)})"
            )


def _system_python() -> Path:
    """Debian's interpreter of the same X.Y as the venv running the tests.

    The repo's .venv interpreter may live under /root (pyenv), which the unit's ProtectHome=yes
    and User=vsup make unreachable; a production /opt/vsup venv is built from /usr/bin/python3.
    """
    py = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not py.exists():
        raise HarnessError(f"{py} missing: the harness needs the system Python of the venv's version")
    return py


def _stage(staging: Path, units: dict[str, str], etc: dict[str, str]) -> None:
    for name in ("units", "empty", "etc-upper", "etc-work"):
        (staging / name).mkdir()
    for name in HOST_UNITS:
        shutil.copy(HOST_UNIT_DIR / name, staging / "units" / name)
    for src in (HERE / "units").iterdir():
        shutil.copy(src, staging / "units" / src.name)
    for name, text in units.items():  # unit files and drop-ins ("x.service.d/y.conf")
        dest = staging / "units" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
    shutil.copy(HERE / "notify_smoke.py", staging / "notify_smoke.py")
    for name, text in etc.items():  # files seen under /etc inside (the overlay's upper layer)
        dest = staging / "etc-upper" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)

    # Accounting off for controllers we do not own a cgroup in (see CGROUP_HIERARCHIES).
    conf = staging / "etc-upper" / "systemd" / "system.conf.d"
    conf.mkdir(parents=True)
    (conf / "harness.conf").write_text(
        "[Manager]\nDefaultCPUAccounting=no\nDefaultMemoryAccounting=no\n"
        "DefaultIOAccounting=no\nDefaultBlockIOAccounting=no\nDefaultIPAccounting=no\n"
    )
    (staging / "passwd.add").write_text(
        f"vsup:x:{SERVICE_UID}:{SERVICE_UID}:vsup service:/var/lib/vsup:/usr/sbin/nologin\n"
    )
    (staging / "group.add").write_text(f"vsup:x:{SERVICE_UID}:\n")

    # /opt/vsup: a venv of the system Python that sees the repo's code and the test venv's
    # packages through read-only binds at fixed paths (REPO_IN_NS, DEPS_IN_NS): the checkout
    # may sit under a directory user vsup cannot traverse (a CI clone under /root, say).
    venv = staging / "opt-vsup"
    subprocess.run([str(_system_python()), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (site / "vsup-harness.pth").write_text(
        f"{REPO_IN_NS}/supervisor\nimport site; site.addsitedir({DEPS_IN_NS!r})\n"
    )
    script = venv / "bin" / "vsup"
    script.write_text("#!/opt/vsup/bin/python\nimport sys\nfrom vsup.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    # The stack dumper, where `pip install 'vsup[stacks]'` puts it: beside vsup's interpreter.
    spy = Path(sys.executable).parent / "py-spy"
    if spy.exists():
        shutil.copy2(spy, venv / "bin" / "py-spy")
    # Everything the vsup user reads must be readable by it.
    for p in [staging, *staging.rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode | 0o055 if p.is_dir() else p.stat().st_mode | 0o044)


def host_fingerprint() -> dict[str, object]:
    """Global state a namespaced systemd could still change; must not move while we run."""
    mounts = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        f, r = left.split(), right.split()
        mounts[f[4]] = (f[5], r[0], r[2] if len(r) > 2 else "")  # mount opts, fstype, superblock opts
    cg = sorted((p.name, p.is_symlink()) for p in CGROUP_ROOT.iterdir())
    return {
        "mounts": mounts,
        "cgroup_root": cg,
        "v2_controllers": (CGROUP_ROOT / "unified" / "cgroup.controllers").read_text()
        if (CGROUP_ROOT / "unified").exists()
        else "",
        "sysctl": {
            k: Path("/proc/sys", k).read_text() for k in ("fs/nr_open", "fs/file-max", "kernel/hostname")
        },
    }


def host_changes(before: dict[str, object], after: dict[str, object]) -> list[str]:
    """What differs; mounts that appeared or vanished elsewhere (other users) are ignored."""
    out = []
    for key in ("cgroup_root", "v2_controllers", "sysctl"):
        if before[key] != after[key]:
            out.append(f"{key}: {before[key]!r} -> {after[key]!r}")
    b, a = before["mounts"], after["mounts"]
    assert isinstance(b, dict) and isinstance(a, dict)
    for mp, opts in b.items():
        if mp in a and a[mp] != opts:
            out.append(f"mount {mp}: {opts} -> {a[mp]}")
    out += [f"new mount {mp}" for mp in a if mp not in b and mp.startswith(str(CGROUP_ROOT))]
    return out


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _remove_cgroups(name: str) -> list[str]:
    """rmdir our cgroup trees bottom-up; returns what could not be removed."""
    left = []
    for h in CGROUP_HIERARCHIES:
        top = CGROUP_ROOT / h / name
        if not top.exists():
            continue
        kill = top / "cgroup.kill"
        if kill.exists():  # v2: kills every process still below, ours only
            try:
                kill.write_text("1")
            except OSError:
                pass
        deadline = time.monotonic() + TEARDOWN_TIMEOUT_S
        while True:
            dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
            try:
                for d in [*dirs, top]:
                    d.rmdir()
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    left.append(f"{e.filename}: {e.strerror}")
                    break
                time.sleep(0.2)
    return left


@contextmanager
def booted(units: dict[str, str] | None = None, etc: dict[str, str] | None = None) -> Iterator[Systemd]:
    """Boot systemd with the harness units plus ``units`` (and ``etc`` files, relative to
    /etc); tear everything down on exit."""
    preflight()
    before = host_fingerprint()
    staging = Path(tempfile.mkdtemp(prefix="vsup-systemd-"))
    cgroup = f"vsup-systemd-test-{os.getpid()}-{staging.name[-6:]}"
    unshare: subprocess.Popen[bytes] | None = None
    try:
        _stage(staging, units or {}, etc or {})
        for h in CGROUP_HIERARCHIES:
            (CGROUP_ROOT / h / cgroup).mkdir()
        unshare = subprocess.Popen(
            [
                "unshare",
                "--pid",
                "--mount",
                "--uts",
                "--ipc",
                "--net",
                "--mount-proc",
                "--propagation",
                "private",
                "--kill-child=SIGKILL",
                "--",
                "/bin/sh",
                str(HERE / "ns-init.sh"),
                str(staging),
                cgroup,
                " ".join(CGROUP_HIERARCHIES),
                str(REPO),
                sysconfig.get_paths()["purelib"],
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=_clean_env(),
        )
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while not (kids := _children(unshare.pid)):
            if unshare.poll() is not None or time.monotonic() > deadline:
                raise HarnessError(f"namespace init did not start (unshare exit {unshare.returncode})")
            time.sleep(0.05)
        sd = Systemd(init_pid=kids[0], staging=staging)
        state = ""
        while True:
            if unshare.poll() is not None:
                raise HarnessError(f"systemd exited during boot\n{sd.logs()}")
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"systemd not running after {BOOT_TIMEOUT_S} s (state {state!r})\n{sd.logs()}"
                )
            state = sd.run("systemctl is-system-running", check=False, timeout=10).stdout.strip()
            if state in ("running", "degraded"):
                break
            time.sleep(0.2)
        changed = host_changes(before, host_fingerprint())
        if changed:
            raise HarnessError(f"booting systemd changed the host: {changed}")
        yield sd
    finally:
        if unshare is not None and unshare.poll() is None:
            unshare.send_signal(signal.SIGKILL)  # --kill-child: PID 1 and the namespace follow
            unshare.wait(timeout=TEARDOWN_TIMEOUT_S)
        left = _remove_cgroups(cgroup)
        # The namespace's mounts died with it; none was made in the host's namespace.
        shutil.rmtree(staging, ignore_errors=True)
        if left:
            raise HarnessError(f"cgroups left behind: {left}")
        changed = host_changes(before, host_fingerprint())
        if changed:
            raise HarnessError(f"the harness changed the host: {changed}")
