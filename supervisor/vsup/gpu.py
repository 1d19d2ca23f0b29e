"""GPU memory through NVML: who holds it, whether a killed tree released it, whether a start may go.

On a GPU box the costliest debris is an orphan holding device memory: the next model then fails
with out-of-memory or loads slowly. This module answers three questions for cleanup, reload and
status, and does nothing destructive itself (killing stays behind cleanup's seam):

- ``holders``: every compute process on every GPU, named (pid, user, cmdline, MiB) and marked
  ``in_tree`` when it belongs to the supervised tree;
- ``wait_released``: after the tree was killed, has every byte come back (no tree pid holds
  memory, used memory back within a tolerance of the level before the model loaded)?
- ``precheck``: before a start, does anyone else hold memory on the GPUs we will use?

Invariants:
- NVML is optional (``nvidia-ml-py``, extra ``vsup[gpu]``). Without the module, the library or a
  device, ``Gpus.open`` returns None after logging why, once per process, and every caller takes
  the same path with the GPU step skipped (``*_or_skip`` below). A GPU check must never be the
  reason a CPU-only host cannot clean up.
- NVML's pids are only trusted after they are mapped onto this pid namespace. Inside a container
  the driver can report host pids; such a pid may not exist here, or (worse) be some unrelated
  local process that cleanup would then blame. So a pid is taken as ours only if that process has
  an ``/dev/nvidia*`` file open (where we may read its fds). Otherwise we look for it in
  ``/proc/*/status`` ``NSpid`` lines (vsup in an outer namespace, NVML reporting inner pids), and
  last pair it by device file (the one unclaimed local process with ``/dev/nvidiaN`` open, when
  exactly one NVML pid on GPU N is unresolved). What stays unresolved has ``pid=None``: it is
  reported, never attributed, never killed. On the lent Firecracker H100 the pids matched
  (docs/gpu.md).
- ``wait_released`` does not trust NVML's pid list alone: a tree pid that is still alive with an
  NVIDIA device open counts as holding, whatever namespace NVML speaks, and used memory must be
  back near the baseline, which also catches a holder whose pid we could not map.
- Timeouts and the poll interval are named and injectable (clock, sleep) so tests run in
  microseconds with a fake clock.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .host import Host
from .redact import hide_flag_values

log = logging.getLogger(__name__)

MIB = 1 << 20

# After SIGKILL of a CUDA process, NVML showed its memory free ~0.1 s later on the lent H100
# (issue 8); 30 s leaves room for a driver that tears down large contexts slowly without letting
# a stuck holder delay a reload for minutes.
RELEASE_TIMEOUT_S = 30.0
# NVML's "used" moves by a few MiB between reads (driver reservations, other contexts starting):
# back within 256 MiB of the baseline counts as released.
RELEASE_TOLERANCE_BYTES = 256 << 20
# Poll at 50 ms: the release itself takes ~100 ms, so this resolves it without busy-looping NVML.
RELEASE_POLL_S = 0.05

_DEV_NVIDIA = re.compile(r"^/dev/nvidia(\d+)$")
# vLLM takes --api-key on the command line; holders and reasons end up in logs and status.
_SECRET_FLAG = re.compile(r"^--?[\w-]*(key|token|secret|password)[\w-]*$", re.IGNORECASE)
_CMDLINE_MAX = 300

_said: set[str] = set()


def _say_once(key: str, msg: str, *args: object) -> None:
    """Log a warning only the first time ``key`` is seen in this process."""
    if key not in _said:
        _said.add(key)
        log.warning(msg, *args)


_unavailable_reason: str | None = None


def unavailable_reason() -> str | None:
    """Why the last ``Gpus.open`` returned None (None if it did not)."""
    return _unavailable_reason


def redact_cmdline(argv: Sequence[str]) -> str:
    """Join argv for display, hiding values of flags that look like secrets, capped in length."""
    out = hide_flag_values(argv, lambda flag: bool(_SECRET_FLAG.match(flag)), "***")
    text = " ".join(out)
    return text if len(text) <= _CMDLINE_MAX else text[: _CMDLINE_MAX - 3] + "..."


# ---------------------------------------------------------------------------------------------
# The /proc seam: everything this module reads about processes. Tests replace it.


class ProcView(Protocol):
    def exists(self, pid: int) -> bool: ...
    def alive(self, pid: int) -> bool: ...  # exists and is not a zombie
    def describe(self, pid: int) -> tuple[str, str] | None: ...  # (user, cmdline)
    def nvidia_devices(self, pid: int) -> frozenset[str] | None: ...  # None: fds unreadable
    def nspid_map(self) -> dict[int, list[int]]: ...  # inner-namespace pid -> local pids
    def pids(self) -> Iterable[int]: ...


class LinuxProcs:
    """ProcView over the OS seam (host.Host): /proc is read in one place."""

    def __init__(self, root: str = "/proc", host: Host | None = None) -> None:
        self.root = root
        self.host = host or Host(proc_root=root)

    def exists(self, pid: int) -> bool:
        return self.host.exists(pid)

    def alive(self, pid: int) -> bool:
        info = self.host.process(pid, cmdline=False)
        return info is not None and not info.zombie

    def describe(self, pid: int) -> tuple[str, str] | None:
        info = self.host.process(pid)
        if info is None:
            return None
        argv = [a for a in (info.cmdline or ()) if a]
        if not argv:
            # Kernel threads and zombies have no cmdline; comm is better than nothing.
            argv = [f"[{self.host.comm(pid) or info.comm}]"]
        return self.host.username(info.uid), redact_cmdline(argv)

    def nvidia_devices(self, pid: int) -> frozenset[str] | None:
        targets = self.host.fd_targets(pid)
        if targets is None:
            return None
        return frozenset(t[len("/dev/") :] for t in targets if t.startswith("/dev/nvidia"))

    def nspid_map(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for pid in self.pids():
            chain = self.host.ns_pids(pid)
            if chain:
                for inner in chain[1:]:
                    out.setdefault(inner, []).append(chain[0])
        return out

    def pids(self) -> Iterable[int]:
        return self.host.pids()


# ---------------------------------------------------------------------------------------------
# Snapshots


@dataclass(frozen=True)
class GpuProc:
    """One compute process on one GPU. ``pid`` is local (this namespace), None if unmapped."""

    gpu: int
    pid: int | None
    used_bytes: int | None  # None where NVML cannot say (NVML_VALUE_NOT_AVAILABLE)
    nvml_pid: int = 0
    pid_source: str = "nvml"  # "nvml" (same pid), "nspid", "devfd", or "unresolved"


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    name: str
    total_bytes: int
    used_bytes: int
    procs: tuple[GpuProc, ...]
    procs_listed: bool = True  # False where NVML would not list processes (e.g. not supported)


@dataclass(frozen=True)
class ReleaseReport:
    """What ``wait_released`` saw. MiB values are per GPU index."""

    released: bool
    elapsed_s: float
    freed_mib: dict[int, int] = field(default_factory=dict)
    used_mib: dict[int, int] = field(default_factory=dict)
    baseline_mib: dict[int, int] | None = None
    remaining: tuple[dict[str, Any], ...] = ()  # holders present at timeout, each with in_tree
    stragglers: tuple[int, ...] = ()  # tree pids alive at timeout with an NVIDIA device open
    reason: str | None = None
    skipped: bool = False

    @classmethod
    def skip(cls, reason: str) -> ReleaseReport:
        return cls(released=True, elapsed_s=0.0, reason=reason, skipped=True)


@dataclass(frozen=True)
class PrecheckResult:
    ok: bool
    reason: str | None = None
    foreign: tuple[dict[str, Any], ...] = ()
    free_mib: dict[int, int] = field(default_factory=dict)
    skipped: bool = False

    @classmethod
    def skip(cls, reason: str) -> PrecheckResult:
        return cls(ok=True, reason=reason, skipped=True)


class GpuError(RuntimeError):
    """NVML failed while reading a device (GPU lost, driver gone, ...)."""


def _mib(n: int | None) -> int:
    return 0 if n is None else n // MIB


def _describe_holder(h: Mapping[str, Any]) -> str:
    pid = h["pid"] if h["pid"] is not None else f"{h['nvml_pid']} (NVML pid, not visible here)"
    mib = "?" if h["used_mib"] is None else h["used_mib"]
    who = f"pid {pid} user {h['user']} cmdline {h['cmdline']!r}"
    if h.get("instance"):
        who = f"vsup instance {h['instance']!r} ({h['instance_config'] or h['instance_state_dir']}): {who}"
    return f"{who} holds {mib} MiB on GPU {h['gpu']}"


class Gpus:
    """An open NVML session over every visible GPU; ``close`` (or ``with``) ends it."""

    def __init__(self, nvml: Any, handles: Sequence[Any], procs: ProcView) -> None:
        self._nvml = nvml
        self._handles = list(handles)
        self._procs = procs
        self._err: type[BaseException] = getattr(nvml, "NVMLError", Exception)
        self._static: list[tuple[str, str, int | None]] = []
        for i, h in enumerate(self._handles):
            self._static.append(
                (_text(nvml.nvmlDeviceGetUUID(h)), _text(nvml.nvmlDeviceGetName(h)), self._minor(i, h))
            )

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def open(cls, nvml: Any = None, *, procs: ProcView | None = None) -> Gpus | None:
        """Start NVML; None (logged once per process, with the reason) where there is no GPU."""
        global _unavailable_reason
        _unavailable_reason = None
        if nvml is None:
            try:
                import pynvml as nvml  # type: ignore[no-redef]  # binds the `nvml` parameter
            except ImportError:
                return cls._unavailable(
                    "no-module", "nvidia-ml-py is not installed (pip install 'vsup[gpu]')"
                )
        err = getattr(nvml, "NVMLError", Exception)
        try:
            nvml.nvmlInit()
        except err as e:  # libnvidia-ml.so missing, driver not loaded, ...
            return cls._unavailable("no-init", f"NVML did not start: {e}")
        try:
            count = nvml.nvmlDeviceGetCount()
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            if not handles:
                nvml.nvmlShutdown()
                return cls._unavailable("no-device", "NVML sees no GPU")
            return cls(nvml, handles, procs or LinuxProcs())
        except err as e:
            try:
                nvml.nvmlShutdown()
            except err:
                pass
            return cls._unavailable("no-device", f"NVML could not enumerate GPUs: {e}")

    @staticmethod
    def _unavailable(key: str, why: str) -> None:
        global _unavailable_reason
        _unavailable_reason = why
        _say_once(key, "gpu: %s; GPU checks are skipped", why)
        return None

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._err as e:
            log.debug("gpu: nvmlShutdown failed: %s", e)

    def __enter__(self) -> Gpus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def count(self) -> int:
        return len(self._handles)

    # -- reading -----------------------------------------------------------------------------

    def _minor(self, index: int, handle: Any) -> int | None:
        fn = getattr(self._nvml, "nvmlDeviceGetMinorNumber", None)
        if fn is None:
            return None
        try:
            return int(fn(handle))
        except self._err:
            return None

    def _raw_procs(self, index: int, handle: Any) -> tuple[list[tuple[int, int | None]], bool]:
        try:
            raw = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except self._err as e:
            _say_once(
                f"procs-{index}",
                "gpu: NVML cannot list processes on GPU %d (%s); only memory totals are checked there",
                index,
                e,
            )
            return [], False
        out: list[tuple[int, int | None]] = []
        seen: set[int] = set()
        for p in raw:
            # Older drivers list a process once per context; keep the first.
            if p.pid in seen:
                continue
            seen.add(p.pid)
            out.append((int(p.pid), None if p.usedGpuMemory is None else int(p.usedGpuMemory)))
        return out, True

    def snapshot(self) -> list[GpuInfo]:
        """Memory and compute processes of every GPU, pids mapped onto this namespace."""
        rows: list[tuple[int, Any, list[tuple[int, int | None]], bool]] = []
        try:
            for i, h in enumerate(self._handles):
                mem = self._nvml.nvmlDeviceGetMemoryInfo(h)
                raw, listed = self._raw_procs(i, h)
                rows.append((i, mem, raw, listed))
        except self._err as e:
            raise GpuError(f"NVML: {e}") from e
        resolved = self._resolve([(i, pid) for i, _m, raw, _l in rows for pid, _u in raw])
        out = []
        for i, mem, raw, listed in rows:
            uuid, name, _minor = self._static[i]
            procs = tuple(
                GpuProc(
                    gpu=i, pid=resolved[(i, p)][0], used_bytes=u, nvml_pid=p, pid_source=resolved[(i, p)][1]
                )
                for p, u in raw
            )
            out.append(
                GpuInfo(
                    index=i,
                    uuid=uuid,
                    name=name,
                    total_bytes=int(mem.total),
                    used_bytes=int(mem.used),
                    procs=procs,
                    procs_listed=listed,
                )
            )
        return out

    def _resolve(self, keys: list[tuple[int, int]]) -> dict[tuple[int, int], tuple[int | None, str]]:
        """Map (gpu, NVML pid) to (local pid or None, how); see the module docstring."""
        out: dict[tuple[int, int], tuple[int | None, str]] = {}
        pending: list[tuple[int, int]] = []
        for gpu, p in keys:
            if self._procs.exists(p) and self._procs.nvidia_devices(p) != frozenset():
                out[(gpu, p)] = (p, "nvml")  # same pid, and it does use a GPU (or we can't tell)
            else:
                pending.append((gpu, p))
        if not pending:
            return out
        claimed = {pid for pid, _how in out.values()}
        nsmap = self._procs.nspid_map()
        still: list[tuple[int, int]] = []
        for gpu, p in pending:
            cands = [c for c in nsmap.get(p, []) if self._procs.nvidia_devices(c)]
            if len(cands) == 1 and cands[0] not in claimed:
                out[(gpu, p)] = (cands[0], "nspid")
                claimed.add(cands[0])
            else:
                still.append((gpu, p))
        by_gpu: dict[int, list[int]] = {}
        for gpu, p in still:
            by_gpu.setdefault(gpu, []).append(p)
        for gpu, ps in by_gpu.items():
            minor = self._static[gpu][2]
            local: list[int] = []
            if len(ps) == 1 and minor is not None:
                dev = f"nvidia{minor}"
                local = [
                    q
                    for q in self._procs.pids()
                    if q not in claimed and dev in (self._procs.nvidia_devices(q) or ())
                ]
            if len(local) == 1:
                out[(gpu, ps[0])] = (local[0], "devfd")
                claimed.add(local[0])
            else:
                for p in ps:
                    out[(gpu, p)] = (None, "unresolved")
        return out

    def baseline(self) -> dict[int, int]:
        """Used bytes per GPU now: take it before a model loads, pass it to ``wait_released``."""
        return {g.index: g.used_bytes for g in self.snapshot()}

    def holders(
        self,
        pids: Collection[int] | None = None,
        snapshot: Sequence[GpuInfo] | None = None,
        instances: Sequence[Instance] = (),
    ) -> list[dict[str, Any]]:
        """Every compute process, named; ``in_tree`` when its local pid is in ``pids``; with
        ``instance`` (and its config and state dir) when it belongs to another vsup instance's tree."""
        tree = set(pids or ())
        snap = self.snapshot() if snapshot is None else snapshot
        owner = {pid: inst for inst in instances for pid in inst.pids}
        out = []
        for g in snap:
            for p in g.procs:
                if p.pid is not None:
                    user, cmdline = self._procs.describe(p.pid) or ("?", "?")
                else:
                    user, cmdline = "?", "?"
                out.append(
                    {
                        "gpu": g.index,
                        "pid": p.pid,
                        "user": user,
                        "cmdline": cmdline,
                        "used_mib": None if p.used_bytes is None else _mib(p.used_bytes),
                        "in_tree": p.pid is not None and p.pid in tree,
                        "nvml_pid": p.nvml_pid,
                        "pid_source": p.pid_source,
                        **_instance_fields(owner.get(p.pid) if p.pid is not None else None),
                    }
                )
        return out

    def holder_pids(self) -> set[int]:
        """Local pids holding memory on any GPU (for ``cleanup --foreign``'s orphan scan)."""
        return {p.pid for g in self.snapshot() for p in g.procs if p.pid is not None}

    # -- after a kill ------------------------------------------------------------------------

    def wait_released(
        self,
        tree_pids: Collection[int],
        baseline_used: Mapping[int, int] | None,
        *,
        timeout_s: float = RELEASE_TIMEOUT_S,
        tolerance_bytes: int = RELEASE_TOLERANCE_BYTES,
        poll_s: float = RELEASE_POLL_S,
        before: Sequence[GpuInfo] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> ReleaseReport:
        """Wait until no tree pid holds GPU memory and used memory is back near the baseline.

        ``before`` is a snapshot taken before the kill, to count MiB freed from; without it
        they are counted from this call's first read (too low if memory was already freed).
        """
        tree = set(tree_pids)
        start = clock()
        first = list(before) if before is not None else None
        last: list[GpuInfo] | None = None
        last_err: str | None = None
        while True:
            try:
                snap = self.snapshot()
            except GpuError as e:
                snap, last_err = None, str(e)
            if snap is not None:
                last = snap
                if first is None:
                    first = snap
                in_tree = [p for g in snap for p in g.procs if p.pid is not None and p.pid in tree]
                stragglers = [
                    p for p in sorted(tree) if self._procs.alive(p) and self._procs.nvidia_devices(p)
                ]
                over = self._over_baseline(snap, baseline_used, tolerance_bytes)
                if not in_tree and not stragglers and not over:
                    return self._report(True, clock() - start, first, snap, baseline_used)
            if clock() - start >= timeout_s:
                break
            sleep(poll_s)
        if last is None:
            return ReleaseReport(
                released=False, elapsed_s=clock() - start, reason=f"GPU state unreadable: {last_err}"
            )
        holders = self.holders(tree, snapshot=last)
        stragglers = [p for p in sorted(tree) if self._procs.alive(p) and self._procs.nvidia_devices(p)]
        over = self._over_baseline(last, baseline_used, tolerance_bytes)
        why = [_describe_holder(h) + " (old tree)" for h in holders if h["in_tree"]]
        why += [
            f"tree pid {p} is alive with an NVIDIA device open"
            for p in stragglers
            if not any(h["pid"] == p for h in holders)
        ]
        why += [
            f"GPU {i} uses {u} MiB, baseline {b} MiB + {tolerance_bytes // MIB} MiB tolerance"
            for i, u, b in over
        ]
        why += [_describe_holder(h) for h in holders if not h["in_tree"] and over]
        return self._report(
            False,
            clock() - start,
            first or last,
            last,
            baseline_used,
            remaining=tuple(holders),
            stragglers=tuple(stragglers),
            reason=f"not released after {timeout_s:g} s: " + "; ".join(why),
        )

    @staticmethod
    def _over_baseline(
        snap: Sequence[GpuInfo], baseline: Mapping[int, int] | None, tolerance: int
    ) -> list[tuple[int, int, int]]:
        if not baseline:
            return []
        return [
            (g.index, _mib(g.used_bytes), _mib(baseline[g.index]))
            for g in snap
            if g.index in baseline and g.used_bytes > baseline[g.index] + tolerance
        ]

    @staticmethod
    def _report(
        released: bool,
        elapsed: float,
        first: Sequence[GpuInfo],
        last: Sequence[GpuInfo],
        baseline: Mapping[int, int] | None,
        **kw: Any,
    ) -> ReleaseReport:
        used0 = {g.index: g.used_bytes for g in first}
        return ReleaseReport(
            released=released,
            elapsed_s=elapsed,
            freed_mib={g.index: max(0, _mib(used0.get(g.index, g.used_bytes) - g.used_bytes)) for g in last},
            used_mib={g.index: _mib(g.used_bytes) for g in last},
            baseline_mib=None if baseline is None else {i: _mib(b) for i, b in baseline.items()},
            **kw,
        )

    # -- before a start ----------------------------------------------------------------------

    def precheck(
        self,
        allowed_pids: Collection[int] = frozenset(),
        *,
        min_free_fraction: float | None = None,
        indices: Collection[int] | None = None,
        instances: Sequence[Instance] = (),
    ) -> PrecheckResult:
        """May a model start on GPUs ``indices`` (default all)? Refuses on foreign holders.

        A holder is foreign unless its local pid is in ``allowed_pids``; one whose NVML pid we
        could not map is foreign too (we cannot prove it is ours). ``min_free_fraction`` also
        refuses when free/total is below it on a GPU (memory held outside any listed process).
        A holder in another vsup instance's tree (``instances``, see ``find_instances``) is
        named by that instance, so the operator knows which service to stop or move.
        """
        try:
            snap = self.snapshot()
        except GpuError as e:
            return PrecheckResult(ok=False, reason=f"GPU state unreadable: {e}")
        chosen = [g for g in snap if indices is None or g.index in indices]
        allowed = set(allowed_pids)
        holders = self.holders(allowed, snapshot=chosen, instances=instances)
        foreign = tuple(h for h in holders if not h["in_tree"])
        free = {g.index: _mib(g.total_bytes - g.used_bytes) for g in chosen}
        why = [_describe_holder(h) for h in foreign]
        if min_free_fraction is not None:
            for g in chosen:
                if g.total_bytes and (g.total_bytes - g.used_bytes) / g.total_bytes < min_free_fraction:
                    why.append(
                        f"GPU {g.index} has {free[g.index]} of {_mib(g.total_bytes)} MiB free, "
                        f"below the {min_free_fraction:.0%} required"
                    )
        if why:
            return PrecheckResult(
                ok=False, reason="GPU not free: " + "; ".join(why), foreign=foreign, free_mib=free
            )
        return PrecheckResult(ok=True, free_mib=free)


def _text(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


# ---------------------------------------------------------------------------------------------
# Several vsup instances on one host (vsup@.service): who holds the GPU this one wants.


@dataclass(frozen=True)
class Instance:
    """Another vsup instance, found through its ledger. ``pids``: the processes of its recorded
    trees that are still the same processes (pid and create time)."""

    name: str
    state_dir: str
    config: str | None
    pids: frozenset[int]


def _instance_fields(inst: Instance | None) -> dict[str, Any]:
    if inst is None:
        return {}
    return {"instance": inst.name, "instance_config": inst.config, "instance_state_dir": inst.state_dir}


def _create_time(pid: int) -> float | None:
    from .host import Host

    info = Host().process(pid, cmdline=False)
    return None if info is None or info.zombie else info.create_time


def find_instances(
    own_config: str | os.PathLike[str],
    own_state_dir: str | os.PathLike[str],
    *,
    create_time: Callable[[int], float | None] = _create_time,
) -> list[Instance]:
    """The other vsup instances of this host, through their ledgers. Two places are looked at,
    both read-only: every ``*.toml`` beside our own config (``/etc/vsup/%i.toml`` of the template
    unit; the instance is named by the file's stem, its ledger is in its ``[daemon].state_dir``),
    and every directory beside our own state dir that holds a ``ledger.json`` (named by the
    directory). A pid counts only while its create time is the recorded one (pids are reused)."""
    import tomllib

    from . import proctree
    from .host import same_process

    own_state = os.path.realpath(own_state_dir)
    found: dict[str, tuple[str, str | None]] = {}  # real state dir -> (name, config)
    cfg_dir = Path(own_config).parent
    own_cfg = os.path.realpath(own_config)
    for path in sorted(cfg_dir.glob("*.toml")) if cfg_dir.is_dir() else []:
        if os.path.realpath(path) == own_cfg:
            continue
        try:
            data = tomllib.loads(path.read_text())
            state = data.get("daemon", {}).get("state_dir", "/var/lib/vsup")
        except (OSError, ValueError, AttributeError):
            continue  # not a vsup config, or unreadable: not an instance we can name
        if isinstance(state, str):
            found.setdefault(os.path.realpath(state), (path.stem, str(path)))
    parent = Path(own_state).parent
    try:
        siblings = sorted(d for d in parent.iterdir() if (d / "ledger.json").is_file())
    except OSError:
        siblings = []
    for d in siblings:
        found.setdefault(os.path.realpath(d), (d.name, None))
    out = []
    for state, (name, cfg) in sorted(found.items(), key=lambda kv: kv[1][0]):
        if state == own_state:
            continue
        pids = set()
        for rec in proctree.Ledger(Path(state)).load():
            for p in rec.procs:
                ct = create_time(p.pid)
                if ct is not None and same_process(ct, p.create_time):
                    pids.add(p.pid)
        out.append(Instance(name=name, state_dir=state, config=cfg, pids=frozenset(pids)))
    return out


def neighbours(gpus: Gpus | None, cfg: Any) -> tuple[list[Instance], set[int] | None]:
    """For a pre-start check or a status of the instance configured by `cfg` (a config.Config):
    the other instances on this host, and the GPUs this one wants (its vLLM's
    CUDA_VISIBLE_DEVICES: [vllm].env first, else vsup's own environment, which vLLM inherits)."""
    visible = cfg.vllm.env.get("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES"))
    try:
        found = find_instances(cfg.path, cfg.state_dir)
    except OSError as e:  # an unreadable neighbour must never stop a start
        _say_once("instances", "gpu: other vsup instances could not be read: %s", e)
        found = []
    return found, visible_indices(gpus, visible)


def visible_indices(gpus: Gpus | None, visible: str | None) -> set[int] | None:
    """The GPU indices a CUDA_VISIBLE_DEVICES value names (None: all, when unset). Entries are
    NVML indices or GPU UUIDs; NVML numbers GPUs in PCI bus order, which is CUDA's only with
    CUDA_DEVICE_ORDER=PCI_BUS_ID, so UUIDs are the unambiguous choice. An entry that names no
    GPU here (a MIG UUID, a typo) makes the answer "all": a check must not miss a holder."""
    if visible is None:
        return None
    out: set[int] = set()
    uuids = {uuid: i for i, (uuid, _n, _m) in enumerate(gpus._static)} if gpus is not None else {}
    for item in (x.strip() for x in visible.split(",")):
        if not item:
            continue
        if item.isdigit():
            out.add(int(item))
        elif item in uuids:
            out.add(uuids[item])
        else:
            return None
    return out


# ---------------------------------------------------------------------------------------------
# The same call sites with or without NVML.


def wait_released_or_skip(
    gpus: Gpus | None, tree_pids: Collection[int], baseline_used: Mapping[int, int] | None, **kw: Any
) -> ReleaseReport:
    """``Gpus.wait_released``, or a skipped report saying why when there is no NVML."""
    if gpus is None:
        return ReleaseReport.skip(f"GPU check skipped: {unavailable_reason() or 'no NVML'}")
    return gpus.wait_released(tree_pids, baseline_used, **kw)


def precheck_or_skip(
    gpus: Gpus | None, allowed_pids: Collection[int] = frozenset(), **kw: Any
) -> PrecheckResult:
    """``Gpus.precheck``, or ok with ``skipped`` when there is no NVML."""
    if gpus is None:
        return PrecheckResult.skip(f"GPU check skipped: {unavailable_reason() or 'no NVML'}")
    return gpus.precheck(allowed_pids, **kw)


def status_summary(
    gpus: Gpus | None,
    model_pids: Collection[int],
    *,
    instances: Sequence[Instance] = (),
    wanted: Collection[int] | None = None,
) -> list[dict[str, Any]] | None:
    """Per GPU: used/total MiB and the MiB the served model's pids hold; None without NVML.

    With ``instances``, ``held_by`` lists the other vsup instances holding memory there; with
    ``wanted`` (this instance's GPUs, ``visible_indices``), ``wanted`` says whether it is one."""
    if gpus is None:
        return None
    try:
        snap = gpus.snapshot()
    except GpuError as e:
        _say_once("status-error", "gpu: status could not read NVML: %s", e)
        return None
    mine = set(model_pids)
    owner = {pid: inst for inst in instances for pid in inst.pids}
    out = []
    for g in snap:
        row: dict[str, Any] = {
            "index": g.index,
            "name": g.name,
            "uuid": g.uuid,
            "used_mib": _mib(g.used_bytes),
            "total_mib": _mib(g.total_bytes),
            "model_mib": sum(_mib(p.used_bytes) for p in g.procs if p.pid in mine),
            "procs": len(g.procs),
        }
        if instances:
            held: dict[str, int] = {}
            for p in g.procs:
                inst = owner.get(p.pid) if p.pid is not None and p.pid not in mine else None
                if inst is not None:
                    held[inst.name] = held.get(inst.name, 0) + _mib(p.used_bytes)
            row["held_by"] = [{"instance": n, "used_mib": m} for n, m in sorted(held.items())]
        if wanted is not None:
            row["wanted"] = g.index in wanted
        out.append(row)
    return out


def cleanup_summary(
    gpus: Gpus | None,
    killed_pids: Collection[int],
    before: Sequence[GpuInfo] | None,
    *,
    timeout_s: float = 30.0,
) -> dict[str, Any] | None:
    """After `vsup cleanup` killed `killed_pids`: wait for their GPU memory, say what was freed.

    None without NVML or when nothing was killed (the report then has no `gpu` entry)."""
    if gpus is None or not killed_pids:
        return None
    rel = gpus.wait_released(killed_pids, None, timeout_s=timeout_s, before=before)
    return {
        "released": rel.released,
        "freed_mib": rel.freed_mib,
        "elapsed_s": round(rel.elapsed_s, 3),
        "remaining": list(rel.remaining),
        "reason": rel.reason,
    }
