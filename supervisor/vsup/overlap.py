"""Overlapped reload (issue 23): whether the new server fits beside the old one.

`[proxy] overlap = "auto"` starts the new model beside the serving one, proves it, switches the
proxy's route and only then drains and stops the old tree; clients wait for nothing. That is
safe only when both fit at once, so vsup overlaps only when it can *show* they fit from what it
measures now (the old server's memory is already in use, so it is counted by the measurement):

- **GPUs** (NVML present): on every GPU the new server will use (its CUDA_VISIBLE_DEVICES, else
  all), NVML's free memory must reach `--gpu-memory-utilization` x total. That is vLLM's own
  start-up rule ("Free memory on device ... is less than desired GPU memory utilization"): a
  server that would fail it is not started beside the old one.
- **CPU** (no NVML): /proc/meminfo's MemAvailable must reach the new server's KV cache
  (VLLM_CPU_KVCACHE_SPACE GiB per TP worker, or `--kv-cache-memory-bytes`) plus its weights (the
  model directory's *.safetensors) plus a runtime margin per process. Without an explicit KV size
  vLLM 0.32 claims `--gpu-memory-utilization` (0.92) of the node's memory: never fits twice.

Anything vsup cannot measure (a model that is not a local directory on CPU, NVML failing) is
"cannot show it fits": the reload falls back to the sequential one and the reload's events say
why. The functions named *_fit are pure (the tests feed them numbers); `decide` gathers the
numbers through the host seam and NVML.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Config, ModelConfig, Remedy
    from .gpu import GpuInfo, Gpus
    from .host import Host

GIB = 1 << 30
MIB = 1 << 20
# vLLM 0.32's CacheConfig.gpu_memory_utilization default (0.9 before 0.11): the larger, so a
# server whose flag is absent is never assumed to take less than it will.
DEFAULT_GPU_UTIL = 0.92
# CPU: what a vLLM process holds beyond its weights and KV cache (torch, the interpreter, the
# shm broadcast rings: ~700 MB in all for a TP=2 tree, vllm-facts.md). One GiB per process
# (API server, engine core, one per TP worker) is the margin, generous on purpose: running out
# of memory with two trees up would take the serving one down too.
CPU_MARGIN_PER_PROC = 1 * GIB


@dataclass(frozen=True)
class Fit:
    """The answer: overlap or not, why in one line (for the reload's events), and the numbers."""

    ok: bool
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "reason": self.reason, **self.detail}


# ---- reading a server's arguments and environment ------------------------------------------------


def flag(args: Sequence[str], *names: str) -> str | None:
    """The last value of `--name V` or `--name=V` in `args` (vLLM's argparse: the last wins)."""
    out = None
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                out = args[i + 1]
            elif a.startswith(n + "="):
                out = a[len(n) + 1 :]
    return out


def tp_size(args: Sequence[str]) -> int:
    v = flag(args, "--tensor-parallel-size", "-tp")
    try:
        return max(1, int(v)) if v is not None else 1
    except ValueError:
        return 1


def gpu_util(args: Sequence[str]) -> float:
    v = flag(args, "--gpu-memory-utilization")
    try:
        return float(v) if v is not None else DEFAULT_GPU_UTIL
    except ValueError:
        return DEFAULT_GPU_UTIL


def cpu_kv_bytes(args: Sequence[str], env: Mapping[str, str]) -> int | None:
    """Bytes of KV cache one worker of a CPU server allocates, or None when vLLM sizes it itself
    (then from --gpu-memory-utilization of the node's memory). VLLM_CPU_KVCACHE_SPACE (GiB)
    overrides --kv-cache-memory-bytes (platforms/cpu.py, "Legacy setting")."""
    raw = env.get("VLLM_CPU_KVCACHE_SPACE", "")
    if raw.strip():
        try:
            return int(raw) * GIB
        except ValueError:
            return None
    v = flag(args, "--kv-cache-memory-bytes")
    if v is None:
        return None
    try:
        return int(_si(v))
    except ValueError:
        return None


def _si(v: str) -> float:
    """vLLM's human-readable byte counts: '4G', '512M', '1073741824'."""
    units = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 1024, "mi": MIB, "gi": GIB, "ti": 1 << 40}
    s = v.strip().lower().removesuffix("b")
    for u in sorted(units, key=len, reverse=True):
        if s.endswith(u):
            return float(s[: -len(u)]) * units[u]
    return float(s)


def weights_bytes(model: str, host: Host) -> int | None:
    """Size of the model directory's *.safetensors (the weights a server reads into memory);
    None when `model` is not a local directory with any (a hub name, .bin weights: unknown)."""
    try:
        names = [n for n in host.list_names(Path(model)) if n.endswith(".safetensors")]
        stats = [host.stat(os.path.join(model, n)) for n in names]
    except OSError:
        return None
    sizes = [st.size for st in stats if st is not None]
    return sum(sizes) if sizes else None


# ---- the pure decisions ---------------------------------------------------------------------------


def gpu_fit(gpus: Iterable[GpuInfo], indices: set[int] | None, util: float) -> Fit:
    """Does a server that asks for `util` of each GPU in `indices` (None: all) fit now?"""
    rows = [g for g in gpus if indices is None or g.index in indices]
    if not rows:
        return Fit(False, f"no GPU to check: CUDA_VISIBLE_DEVICES names {sorted(indices or ())}, none found")
    per: dict[str, dict[str, int]] = {}
    short = []
    for g in rows:
        free, need = g.total_bytes - g.used_bytes, int(util * g.total_bytes)
        per[str(g.index)] = {"free_mib": free // MIB, "need_mib": need // MIB}
        if free < need:
            short.append(f"GPU {g.index}: {free // MIB} MiB free < {need // MIB} MiB asked")
    detail = {"where": "gpu", "util": util, "gpus": per}
    if short:
        return Fit(False, f"does not fit beside the serving model: {'; '.join(short)}", detail)
    return Fit(True, f"fits: {len(rows)} GPU(s) each with {util:g} x total free", detail)


def cpu_fit(
    *,
    available: int,
    total: int,
    kv_per_worker: int | None,
    weights: int | None,
    tp: int,
    util: float = DEFAULT_GPU_UTIL,
) -> Fit:
    """Does a CPU server (TP `tp`) fit in `available` bytes now, with the margin?"""
    detail: dict[str, Any] = {"where": "cpu", "available_mib": available // MIB, "tp": tp}
    if kv_per_worker is None:
        ask = int(util * total)
        detail["kv_mib"] = ask // MIB
        return Fit(
            False,
            f"KV cache not sized (VLLM_CPU_KVCACHE_SPACE unset): vLLM would claim {util:g} of "
            f"{total // GIB} GiB, which cannot fit twice",
            detail,
        )
    if weights is None:
        return Fit(False, "model size unknown (not a local directory with *.safetensors)", detail)
    kv, margin = kv_per_worker * tp, CPU_MARGIN_PER_PROC * (tp + 2)
    need = kv + weights + margin
    detail.update(
        kv_mib=kv // MIB, weights_mib=weights // MIB, margin_mib=margin // MIB, need_mib=need // MIB
    )
    if available < need:
        return Fit(
            False,
            f"does not fit beside the serving model: {available // MIB} MiB available < {need // MIB} MiB "
            f"(KV {kv // MIB} + weights {weights // MIB} + margin {margin // MIB})",
            detail,
        )
    return Fit(True, f"fits: {available // MIB} MiB available >= {need // MIB} MiB needed", detail)


# ---- gathering the numbers -------------------------------------------------------------------------


def decide(cfg: Config, spec: ModelConfig, remedies: Sequence[Remedy], gpus: Gpus | None, host: Host) -> Fit:
    """Can the server of `spec` start beside the serving one? `gpus`: the open NVML session,
    None on a machine without GPUs; `host`: /proc/meminfo and the model directory."""
    from . import gpu as gpu_mod
    from . import launch

    argv, env = launch.command(cfg, spec, list(remedies))
    if cfg.proxy is None or cfg.proxy.overlap != "auto":
        return Fit(False, "[proxy] overlap is not auto")
    if gpus is not None:
        try:
            snap = gpus.snapshot()
        except Exception as e:  # noqa: BLE001 - cannot measure: cannot show it fits
            return Fit(False, f"GPU memory not readable: {type(e).__name__}: {e}")
        indices = gpu_mod.visible_indices(gpus, env.get("CUDA_VISIBLE_DEVICES"))
        return gpu_fit(snap, indices, gpu_util(argv))
    meminfo = host.meminfo()
    if "MemAvailable" not in meminfo or "MemTotal" not in meminfo:
        return Fit(False, "memory not readable (/proc/meminfo has no MemAvailable)")
    return cpu_fit(
        available=meminfo["MemAvailable"],
        total=meminfo["MemTotal"],
        kv_per_worker=cpu_kv_bytes(argv, env),
        weights=weights_bytes(spec.model, host),
        tp=tp_size(argv),
        util=gpu_util(argv),
    )


def free_port(host: str) -> int:
    """A TCP port free on `host` now (the kernel's choice): the new tree's, while the old one
    keeps its port. Another process could take it before vLLM binds it; the new server then
    fails to start and the reload rolls back with the old one still serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
