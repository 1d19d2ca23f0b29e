"""Fixtures for the tests that need a real GPU: skipped, with the reason, wherever there is none."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Iterator

import pytest

from vsup import gpu


@pytest.fixture(scope="session")
def gpus() -> Iterator[gpu.Gpus]:
    """An open NVML session, or a skip saying why there is none (CI has no GPU)."""
    if importlib.util.find_spec("pynvml") is None:
        pytest.skip("nvidia-ml-py (pynvml) is not installed")
    g = gpu.Gpus.open()
    if g is None:
        pytest.skip(f"no GPU: {gpu.unavailable_reason()}")
    if importlib.util.find_spec("torch") is None:
        g.close()
        pytest.skip("torch is not installed: the fake vLLM tree cannot allocate CUDA memory")
    try:
        yield g
    finally:
        g.close()


@pytest.fixture(scope="session")
def record() -> Iterator[dict]:
    """Measurements to keep: written as JSON to $VSUP_GPU_RESULTS (if set) at session end."""
    results: dict = {"started": time.time()}
    yield results
    path = os.environ.get("VSUP_GPU_RESULTS")
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=str)
