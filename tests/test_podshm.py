"""vsup.podshm: when /dev/shm is provably a container's own, and clearing a dead container's leftovers."""

from __future__ import annotations

import json
import mmap
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from vsup import podshm
from vsup.host import Host
from vsup.podshm import Facts, Mount, Ownership

ROOT = Path(__file__).resolve().parents[1]

TMPFS = Mount(
    mount_id=30, parent_id=24, dev=(0, 27), root="/", mount_point="/dev/shm", fstype="tmpfs", source="shm"
)
OWN = Facts(declared=True, pid_ns_ino=4026532100, ipc_ns_ino=4026532101, proc_is_ours=True, shm_mount=TMPFS)


def test_mountinfo_parsing_unescapes_and_finds_the_top_mount() -> None:
    """Fields come back unescaped; of two mounts stacked on /dev/shm the upper one is visible."""
    text = (
        "24 27 0:6 / /dev rw - devtmpfs devtmpfs rw\n"
        "25 24 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=100k\n"
        "30 25 0:27 / /dev/shm rw,relatime shared:4 - tmpfs shm rw,size=65536k\n"
        "31 27 8:1 /data\\040dir /mnt/my\\040models ro - ext4 /dev/sda1 rw\n"
    )
    mounts = podshm.parse_mountinfo(text)
    assert [m.mount_id for m in mounts] == [24, 25, 30, 31]
    assert mounts[3].root == "/data dir" and mounts[3].mount_point == "/mnt/my models"
    top = podshm.mount_at(mounts, "/dev/shm")
    assert top is not None and top.dev == (0, 27) and top.source == "shm"
    assert podshm.mount_at(mounts, "/nowhere") is None


def test_all_conditions_hold_means_own() -> None:
    """Declared, a container's PID and IPC namespaces, /proc ours, /dev/shm a tmpfs of its own."""
    verdict = podshm.decide(OWN)
    assert verdict.own and "0:27" in verdict.reason


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"declared": False}, "not declared private"),
        ({"pid_ns_ino": podshm.INIT_PID_NS_INO}, "host's PID namespace"),
        ({"proc_is_ours": False}, "/proc is not this PID namespace's"),
        ({"ipc_ns_ino": podshm.INIT_IPC_NS_INO}, "hostIPC"),
        ({"shm_mount": None}, "not a mount point of its own"),
        ({"shm_mount": replace(TMPFS, fstype="ext4")}, "ext4, not tmpfs"),
        ({"other_mounts_same_dev": ("/data",)}, "also mounted at /data"),
        ({"sharers": ("pid 7 (python3)",)}, "mounted by pid 7 (python3)"),
    ],
)
def test_each_failed_condition_refuses_and_says_why(change: dict, why: str) -> None:
    """Any one condition failing means not own, with that condition as the reason."""
    verdict = podshm.decide(replace(OWN, **change))
    assert not verdict.own and why in verdict.reason


def test_on_the_host_nothing_is_cleared(tmp_path: Path) -> None:
    """On this machine (host namespaces) /dev/shm is never the container's own, even if declared."""
    verdict = podshm.decide(podshm.gather(True))
    assert not verdict.own and "host's PID namespace" in verdict.reason
    (tmp_path / "psm_left").write_bytes(b"x")
    rep = podshm.clear_leftovers(verdict, host=Host(shm_root=tmp_path))
    assert rep.unlinked == [] and (tmp_path / "psm_left").exists()


def _aged(path: Path, data: bytes = b"x" * 8192) -> Path:
    path.write_bytes(data)
    old = time.time() - 3600
    os.utime(path, (old, old))
    return path


def test_clear_unlinks_unheld_keeps_held_new_and_directories(tmp_path: Path) -> None:
    """With ownership proven: old unheld objects go (any name), a mapped one, a just-created
    one and a directory stay, each with its reason."""
    left = [_aged(tmp_path / n) for n in ("psm_0a1b2c3d", "sem.mp-xyz", "PostgreSQL.1234", "torch_99")]
    held = _aged(tmp_path / "psm_held")
    (tmp_path / "subdir").mkdir()
    with open(held, "r+b") as f, mmap.mmap(f.fileno(), 4096) as _m:
        (tmp_path / "psm_new").write_bytes(b"y")
        rep = podshm.clear_leftovers(Ownership(True, "test"), host=Host(shm_root=tmp_path))
    assert sorted(u["name"] for u in rep.unlinked) == sorted(p.name for p in left)
    assert rep.bytes_freed >= 4 * 8192
    assert not any(p.exists() for p in left)
    kept = {k["name"]: k["reason"] for k in rep.kept}
    assert kept.keys() == {"psm_held", "psm_new", "subdir"}
    assert kept["psm_held"].startswith(f"in use by pid {os.getpid()}")
    assert "created during the scan" in kept["psm_new"]
    assert held.exists() and (tmp_path / "psm_new").exists()


def test_not_own_touches_nothing(tmp_path: Path) -> None:
    """Without proven ownership clear_leftovers does not even look."""
    p = _aged(tmp_path / "psm_left")
    rep = podshm.clear_leftovers(Ownership(False, "no"), host=Host(shm_root=tmp_path))
    assert p.exists() and rep.unlinked == [] and rep.kept == []


# ---- in namespaces of its own: a private tmpfs on /dev/shm --------------------------------------

_IN_NS = r"""
import json, mmap, os, subprocess, sys, time
from vsup import podshm
old = time.time() - 3600
for n in ("psm_deadbeef", "sem.mp-abc123", "nccl-shm-1", "leftover.bin"):
    with open("/dev/shm/" + n, "wb") as f:
        f.write(b"z" * 65536)
    os.utime("/dev/shm/" + n, (old, old))
with open("/dev/shm/psm_live", "wb") as f:
    f.write(b"l" * 4096)
os.utime("/dev/shm/psm_live", (old, old))
holder = subprocess.Popen([sys.executable, "-c",
    "import mmap,sys; f=open('/dev/shm/psm_live','r+b'); m=mmap.mmap(f.fileno(),4096); "
    "print('ok', flush=True); sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
assert holder.stdout.readline() == b"ok\n"
rep = podshm.prepare(bool(int(sys.argv[1])))
holder.stdin.close(); holder.wait()
print(json.dumps({"pid": os.getpid(), "report": rep.to_json(), "left": sorted(os.listdir("/dev/shm"))}))
"""


def _in_namespaces(declared: bool, *, own_tmpfs: bool = True) -> dict:
    """Run _IN_NS as PID 1 of new PID, mount and IPC namespaces (a container's shape)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("needs root and util-linux unshare (this machine has both)")
    mount = "mount -t tmpfs -o size=16m vsup-test-shm /dev/shm && " if own_tmpfs else ""
    script = f'{mount}exec {sys.executable} -c "$VSUP_TEST_SCRIPT" {int(declared)}'
    proc = subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--ipc", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT / "supervisor"), "VSUP_TEST_SCRIPT": _IN_NS},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_dead_containers_leftovers_cleared_in_a_container_shaped_namespace() -> None:
    """PID 1 of its own namespaces, a private tmpfs on /dev/shm holding a dead container's
    segments and one a live process maps: the leftovers go, the mapped one stays."""
    out = _in_namespaces(True)
    assert out["pid"] == 1
    rep = out["report"]
    assert rep["own"], rep["why"]
    assert sorted(u["name"] for u in rep["unlinked"]) == [
        "leftover.bin",
        "nccl-shm-1",
        "psm_deadbeef",
        "sem.mp-abc123",
    ]
    assert out["left"] == ["psm_live"]
    assert [k["name"] for k in rep["kept"]] == ["psm_live"] and "in use by pid" in rep["kept"][0]["reason"]


def test_undeclared_container_shm_is_left_alone() -> None:
    """The same namespace without `shm_private`: everything stays."""
    out = _in_namespaces(False)
    assert not out["report"]["own"] and "not declared" in out["report"]["why"]
    assert len(out["left"]) == 5


def test_cleanup_in_a_pid_namespace_never_takes_what_it_cannot_see_held(tmp_path: Path) -> None:
    """A vsup in a PID namespace of its own, on the host's /dev/shm: a vLLM-named segment that a
    process outside the namespace maps looks unheld from inside. The cleanup (a dry run, so
    nothing of anyone's is at stake) must skip it as not provably unheld, not plan its unlink."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("needs root and util-linux unshare (this machine has both)")
    name = f"psm_vsupblind{os.getpid():x}"
    path = Path("/dev/shm") / name
    path.write_bytes(b"b" * 4096)
    old = time.time() - 3600
    os.utime(path, (old, old))
    code = (
        "import json; from vsup import cleanup; "
        "r = cleanup.cleanup([], dry_run=True).to_json(); "
        "print(json.dumps({'skipped': r['skipped'], 'unlinked': [u['name'] for u in r['unlinked']]}))"
    )
    try:
        with open(path, "r+b") as f, mmap.mmap(f.fileno(), 4096):
            proc = subprocess.run(
                ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "PYTHONPATH": str(ROOT / "supervisor")},
            )
            # The same dry run on the host sees the holder (this test process) itself.
            here = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "PYTHONPATH": str(ROOT / "supervisor")},
            )
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert name not in out["unlinked"]
        (why,) = [s["reason"] for s in out["skipped"] if s["name"] == name]
        assert "PID namespace of its own" in why
        out_here = json.loads(here.stdout.strip().splitlines()[-1])
        assert name not in out_here["unlinked"]
        (why_here,) = [s["reason"] for s in out_here["skipped"] if s["name"] == name]
        assert why_here.startswith("in use by")
    finally:
        path.unlink(missing_ok=True)
