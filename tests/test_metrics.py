"""Tests for vsup.metrics: every metric as a scraper sees it over HTTP."""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import vsup.metrics
from support import Daemon
from vsup.metrics import Metrics

# This engineer's port range is 8400-8499; metrics tests use the top ten.
PORTS = range(8490, 8500)


def serve(m: Metrics) -> int:
    for port in PORTS:
        try:
            m.start("127.0.0.1", port)
            return port
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
    raise RuntimeError(f"no free port in {PORTS}")


@pytest.fixture
def served() -> Iterator[Metrics]:
    m = Metrics()
    serve(m)
    try:
        yield m
    finally:
        m.stop()


def scrape(m: Metrics) -> dict[str, float]:
    """GET m's /metrics and map 'name{labels}' to its value."""
    assert m.address is not None
    host, port = m.address
    return scrape_url(port, host)


def test_state_is_one_hot(served: Metrics) -> None:
    """After two state changes only the current state reads 1."""
    served.set_state("starting")
    served.set_state("ready")
    got = scrape(served)
    assert got['vsup_state{state="ready"}'] == 1
    assert got['vsup_state{state="starting"}'] == 0
    assert sum(v for k, v in got.items() if k.startswith("vsup_state{")) == 1


def test_restarts_are_counted_by_reason(served: Metrics) -> None:
    """Each restart increments the counter of its reason only."""
    served.restart("exit")
    served.restart("exit")
    served.restart("stall")
    got = scrape(served)
    assert got['vsup_restarts_total{reason="exit"}'] == 2
    assert got['vsup_restarts_total{reason="stall"}'] == 1


def test_detection_counts_kind_and_keeps_last_latency(served: Metrics) -> None:
    """Detections count by kind; the latency gauge holds the most recent one."""
    served.detection("engine_dead", 1.5)
    served.detection("stall", 21.25)
    got = scrape(served)
    assert got['vsup_detections_total{kind="engine_dead"}'] == 1
    assert got['vsup_detections_total{kind="stall"}'] == 1
    assert got["vsup_last_detection_latency_seconds"] == 21.25


def test_cleanup_counters_accumulate(served: Metrics) -> None:
    """Cleanup adds killed processes, unlinked objects and freed bytes across calls."""
    served.cleanup(killed=3, unlinked=6, bytes_freed=700_000_000)
    served.cleanup(killed=1, unlinked=0, bytes_freed=4096)
    got = scrape(served)
    assert got["vsup_cleanup_processes_killed_total"] == 4
    assert got["vsup_cleanup_objects_unlinked_total"] == 6
    assert got["vsup_cleanup_bytes_freed_total"] == 700_004_096


def test_scrape_during_reload_shows_current_phase_and_past_durations(served: Metrics) -> None:
    """Mid-reload, the current phase reads 1 and finished phases show their duration."""
    served.reload_phase("drain")
    served.reload_phase_done("drain", 2.5)
    served.reload_phase("stop")
    got = scrape(served)
    assert got['vsup_reload_phase{phase="stop"}'] == 1
    assert got['vsup_reload_phase{phase="drain"}'] == 0
    assert got['vsup_reload_phase_seconds{phase="drain"}'] == 2.5
    served.reload_phase_done("stop", 4.0)
    got = scrape(served)
    assert got['vsup_reload_phase{phase="stop"}'] == 0
    assert got['vsup_reload_phase_seconds{phase="stop"}'] == 4.0


def test_gpu_memory_per_gpu(served: Metrics) -> None:
    """GPU used, total and model bytes are labelled by GPU index."""
    served.gpu(0, used_bytes=10, total_bytes=80, model_bytes=8)
    served.gpu(1, used_bytes=20, total_bytes=80, model_bytes=None)
    got = scrape(served)
    assert got['vsup_gpu_memory_used_bytes{gpu="0"}'] == 10
    assert got['vsup_gpu_memory_total_bytes{gpu="1"}'] == 80
    assert got['vsup_gpu_memory_model_bytes{gpu="0"}'] == 8
    assert 'vsup_gpu_memory_model_bytes{gpu="1"}' not in got


def test_two_instances_do_not_share_series() -> None:
    """Each Metrics has its own registry, so one daemon's counts never leak into another's."""
    a, b = Metrics(), Metrics()
    serve(a)
    try:
        serve(b)
        try:
            a.restart("exit")
            assert scrape(a)['vsup_restarts_total{reason="exit"}'] == 1
            assert 'vsup_restarts_total{reason="exit"}' not in scrape(b)
        finally:
            b.stop()
    finally:
        a.stop()


def test_stop_frees_the_port() -> None:
    """After stop the same port can be bound again."""
    m = Metrics()
    port = serve(m)
    m.stop()
    again = Metrics()
    try:
        again.start("127.0.0.1", port)
        assert again.address == ("127.0.0.1", port)
    finally:
        again.stop()


def test_without_prometheus_client_everything_is_a_noop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Missing prometheus_client: start logs one line and returns False, other calls do nothing."""
    monkeypatch.setattr(vsup.metrics, "_prom", None)
    m = Metrics()
    with caplog.at_level(logging.WARNING, logger="vsup.metrics"):
        assert m.start("127.0.0.1", PORTS[0]) is False
    assert len(caplog.records) == 1
    assert "prometheus_client" in caplog.records[0].getMessage()
    assert m.address is None
    m.set_state("ready")
    m.restart("exit")
    m.detection("stall", 1.0)
    m.cleanup(1, 1, 1)
    m.reload_phase("drain")
    m.reload_phase_done("drain", 1.0)
    m.gpu(0, 1, 2, 1)
    m.stop()


# ---- through a running daemon ---------------------------------------------------------------


def scrape_url(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """GET /metrics at host:port and map 'name{labels}' to its value."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


@pytest.fixture
def metered(tmp_path: Path) -> Iterator[Daemon]:
    """`vsup run` on a fake tree whose engine-like child outlives SIGTERM (so a stop takes the
    whole stop grace), with the metrics endpoint on."""
    from support import FAKES, ROOT, free_port

    port = free_port(PORTS.start, PORTS.stop)
    d = Daemon(
        tmp_path / "d",
        {
            "vllm": {
                "python": sys.executable,
                "module": "fake_vllm_tree",
                "model": "fake-model",
                "port": free_port(8400, 8489),
                "args": ["-tp", "2"],
                "env": {"PYTHONPATH": f"{FAKES}:{ROOT / 'tests' / 'systemd'}", "FAKE_TREE_DEBRIS": "0"},
            },
            "daemon": {"metrics_port": port},
            "timeouts": {
                "start_s": 30.0,
                "stop_grace_s": RELOAD_STOP_S,
                "canary_s": 2.0,
                "probe_s": 2.0,
                "cleanup_grace_s": 1.0,
                "drain_s": 2.0,
            },
            "restart": {"backoff_initial_s": 0.1, "backoff_max_s": 0.5},
            "probes": {"interval_s": 0.2, "canary_interval_s": 1.0},
        },
    )
    d.metrics_port = port  # type: ignore[attr-defined]  # for the test below
    try:
        d.start()
        yield d
    finally:
        d.close()


RELOAD_STOP_S = 3.0  # the reload's stop phase lasts the stop grace: long enough to scrape in


def test_scrape_during_a_reload_shows_its_phase(metered) -> None:
    """Mid-reload the endpoint shows vsup_state reloading, the current phase at 1 and the drain's duration."""
    from support import wait_for

    metered.wait_state("ready", timeout=30)
    port = metered.metrics_port
    assert scrape_url(port)['vsup_state{state="ready"}'] == 1
    reload = threading.Thread(target=metered.cli, args=("reload", "--current"))
    reload.start()
    try:
        mid = wait_for(
            lambda: (m := scrape_url(port)).get('vsup_reload_phase{phase="stop"}') == 1 and m,
            10,
            "the stop phase on the endpoint",
            interval=0.1,
        )
        assert mid['vsup_state{state="reloading"}'] == 1
        assert mid['vsup_state{state="ready"}'] == 0
        assert 'vsup_reload_phase_seconds{phase="drain"}' in mid
    finally:
        reload.join(60)
    after = wait_for(
        lambda: (m := scrape_url(port)).get('vsup_state{state="ready"}') == 1 and m, 30, "ready again"
    )
    assert after['vsup_reload_phase_seconds{phase="stop"}'] >= RELOAD_STOP_S - 0.5
    assert {after[f'vsup_reload_phase{{phase="{p}"}}'] for p in ("drain", "stop", "cleanup", "start")} == {0}
    assert after["vsup_cleanup_processes_killed_total"] >= 1  # the child that outlived SIGTERM


def test_restart_after_server_exit_is_counted(metered) -> None:
    """A server killed behind vsup's back shows up as one restart, labelled with its reason."""
    from support import wait_for

    first = metered.wait_state("ready", timeout=30)
    os.kill(first["pid"], signal.SIGKILL)
    wait_for(lambda: (s := metered.status())["restarts"] == 1 and s["state"] == "ready", 30, "the restart")
    m = scrape_url(metered.metrics_port)
    restarts = {k: v for k, v in m.items() if k.startswith("vsup_restarts_total{")}
    assert restarts == {'vsup_restarts_total{reason="exited"}': 1}, restarts
