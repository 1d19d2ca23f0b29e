#!/usr/bin/env python3
"""Benchmark the log side of vsup on a generated 1,000,000-line vLLM 0.32 log.

Measures, on one core (the work is single-threaded):
  parse        vsup.logparse.parse_line on every line
  parse+match  parse_line + Catalog.match (what the daemon does per tailed line)
  diagnose     vsup.diagnose.diagnose_file (read + decode + parse + match + analysis + redaction)
and, with --idle-seconds, the CPU a LogTailer uses while its log is idle (one stat per poll interval,
no events). Prints a Markdown table; wall and CPU seconds both (the machine may be shared: CPU
seconds are the honest number, lines/s are computed from them).

The log mixes what a busy 0.32 server at --log-level DEBUG with --enable-log-requests writes:
55 % DEBUG noise from the engine and workers (matches nothing), 20 % uvicorn access lines, 12 %
"Received request"/"Added request" lines, 3 % stats lines, 4 % "Generated response" lines, 6 %
warnings and other output, a real start-up block (tests/data/logs/clean_start_stop.log when present), and a
few signature lines (stalls, then a worker death with tracebacks and the shutdown).

Usage: python bench/bench_parse.py [--lines 1000000] [--keep PATH] [--idle-seconds 10]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "supervisor"))

from vsup.diagnose import diagnose_file  # noqa: E402 - after the sys.path insert
from vsup.logparse import parse_line  # noqa: E402 - after the sys.path insert
from vsup.logtail import LogTailer  # noqa: E402 - after the sys.path insert
from vsup.signatures import Catalog  # noqa: E402 - after the sys.path insert

API, CORE, W0, W1 = 7868, 8362, 8422, 8423
PARAMS = (
    "SamplingParams(n=1, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, "
    "temperature=0.7, top_p=1.0, top_k=0, min_p=0.0, seed=None, stop=[], stop_token_ids=[], "
    "max_tokens=128, min_tokens=0, logprobs=None, prompt_logprobs=None, skip_special_tokens=True)"
)


def _ts(sec: int) -> str:
    h, rem = divmod(sec % 86400, 3600)
    m, s = divmod(rem, 60)
    return f"11-25 {h:02d}:{m:02d}:{s:02d}"


def _startup_block() -> list[str]:
    real = REPO / "tests" / "data" / "logs" / "clean_start_stop.log"
    if real.exists():
        lines = real.read_text(encoding="utf-8", errors="replace").splitlines()
        end = next((i for i, x in enumerate(lines) if "Application startup complete" in x), len(lines) - 1)
        return lines[: end + 1]
    return [
        f"(APIServer pid={API}) INFO 11-25 12:42:20 [api_utils.py:286] non-default args: {{'tensor_parallel_size': 2}}",
        "INFO:     Application startup complete.",
    ]


def _body_line(rng: random.Random, i: int, t: int) -> str:
    r = rng.random()
    rid = f"chatcmpl-{i:016x}"
    if r < 0.20:
        path, status = rng.choice(
            [
                ("/v1/chat/completions", "200 OK"),
                ("/v1/completions", "200 OK"),
                ("/health", "200 OK"),
                ("/metrics", "200 OK"),
            ]
        )
        return f'INFO:     127.0.0.1:{rng.randint(30000, 65000)} - "{"GET" if path in ("/health", "/metrics") else "POST"} {path} HTTP/1.1" {status}'
    if r < 0.26:
        return f"(APIServer pid={API}) INFO {_ts(t)} [request_logger.py:65] Received request {rid}: params: {PARAMS}, lora_request: None."
    if r < 0.32:
        return f"(APIServer pid={API}) INFO {_ts(t)} [async_llm.py:578] Added request {rid}-a07ba2c2."
    if r < 0.35:
        run = rng.randint(0, 32)
        return (
            f"(APIServer pid={API}) INFO {_ts(t)} [loggers.py:335] Engine 000: Avg prompt throughput: "
            f"{rng.uniform(0, 900):.1f} tokens/s, Avg generation throughput: {rng.uniform(0, 3000):.1f} tokens/s, "
            f"Running: {run} reqs, Waiting: {rng.randint(0, 4)} reqs, CPU KV cache usage: {rng.uniform(0, 90):.1f}%, "
            f"Prefix cache hit rate: {rng.uniform(0, 80):.1f}%"
        )
    if r < 0.90:  # 55 %: DEBUG noise of engine core and workers
        pid, name = rng.choice([(CORE, "EngineCore"), (W0, "Worker_TP0"), (W1, "Worker_TP1")])
        msg = rng.choice(
            [
                "[distributed/device_communicators/shm_broadcast.py:220] Poller timed out",
                "[v1/engine/core.py:1596] EngineCore loop active.",
                "[v1/engine/core.py:1601] EngineCore waiting for work.",
                f"[v1/worker/cpu_model_runner.py:412] Scheduled {rng.randint(1, 64)} tokens for {rng.randint(1, 8)} requests",
                f"[v1/core/sched/scheduler.py:{rng.randint(300, 900)}] num_computed_tokens={rng.randint(0, 4096)} for request {rid}",
            ]
        )
        return f"({name} pid={pid}) DEBUG {_ts(t)} {msg}"
    if r < 0.94:
        return f"(APIServer pid={API}) INFO {_ts(t)} [serving.py:{rng.randint(100, 999)}] Generated response {rid}: output: 'lorem ipsum dolor {i}', finish_reason: stop"
    return rng.choice(
        [
            "Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:00<00:00, 459.00it/s]",
            f"(Worker pid={W0}) WARNING {_ts(t)} [cpu_worker.py:114] libtcmalloc is not found in LD_PRELOAD. For best performance, please set LD_PRELOAD.",
            "[W1125 12:42:41.019357592 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy for memory allocation on the NUMA nodes (0).",
        ]
    )


_STALL = (
    f"(EngineCore pid={CORE}) INFO {{ts}} [shm_broadcast.py:802] No available shared memory broadcast block found "
    "in 60 seconds. This typically happens when some processes are hanging or doing some time-consuming work "
    "(e.g. compilation, weight/kv cache quantization)."
)
_DEATH = [
    f"(EngineCore pid={CORE}) ERROR {{ts}} [multiproc_executor.py:315] Worker proc VllmWorker-1 died unexpectedly (exit code: -9), shutting down executor.",
    f"(EngineCore pid={CORE}) ERROR {{ts}} [core.py:1512] EngineCore encountered a fatal error.",
    f"(EngineCore pid={CORE}) ERROR {{ts}} [core.py:1512] Traceback (most recent call last):",
    f'(EngineCore pid={CORE}) ERROR {{ts}} [core.py:1512]   File "/venv/lib/python3.11/site-packages/vllm/v1/engine/core.py", line 1702, in _handle_client_request',
    f'(EngineCore pid={CORE}) ERROR {{ts}} [core.py:1512]     raise RuntimeError("Executor failed.")',
    f"(EngineCore pid={CORE}) ERROR {{ts}} [core.py:1512] RuntimeError: Executor failed.",
    f"(APIServer pid={API}) ERROR {{ts}} [async_llm.py:906] AsyncLLM output_handler failed.",
    f"(APIServer pid={API}) ERROR {{ts}} [async_llm.py:906] vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. See stack trace (above) for the root cause.",
    'INFO:     127.0.0.1:45134 - "POST /v1/completions HTTP/1.1" 500 Internal Server Error',
    "INFO:     Shutting down",
    "INFO:     Application shutdown complete.",
    "/usr/lib/python3.11/multiprocessing/resource_tracker.py:254: UserWarning: resource_tracker: There appear to be 4 leaked shared_memory objects to clean up at shutdown",
]


def generate(path: Path, n: int, seed: int = 1) -> int:
    rng = random.Random(seed)  # noqa: S311 - reproducible filler for a log, not a secret
    start = _startup_block()
    tail_len = len(_DEATH) + 3
    body = n - len(start) - tail_len
    t0 = 12 * 3600 + 43 * 60
    with open(path, "w", encoding="utf-8") as f:
        for line in start:
            f.write(line + "\n")
        for i in range(body):
            f.write(_body_line(rng, i, t0 + i // 50) + "\n")
        t = t0 + body // 50
        for k in range(3):
            f.write(_STALL.format(ts=_ts(t + 60 * (k + 1))) + "\n")
        for line in _DEATH:
            f.write(line.format(ts=_ts(t + 200)) + "\n")
    return n


def _measure(fn) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def idle_tail_cpu(seconds: float) -> tuple[float, float]:
    """CPU seconds used by this process while one LogTailer follows an idle log for `seconds`."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "idle.log"
        p.write_text("x\n")
        t = LogTailer(p, lambda lines: None)
        t.start()
        try:
            done = threading.Event()
            c0, w0 = time.process_time(), time.perf_counter()
            done.wait(seconds)  # idle on purpose: this is the measurement window
            return time.process_time() - c0, time.perf_counter() - w0
        finally:
            t.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--keep", type=Path, help="write the generated log here and keep it")
    ap.add_argument("--idle-seconds", type=float, default=0.0, help="also measure idle tailing CPU")
    args = ap.parse_args(argv)

    tmpdir = None
    if args.keep:
        path = args.keep
    else:
        tmpdir = tempfile.TemporaryDirectory()
        path = Path(tmpdir.name) / "bench.log"
    try:
        n = generate(path, args.lines)
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            lines = [b.decode("utf-8", "replace") for b in f]
        catalog = Catalog.load()

        def parse_only() -> None:
            for x in lines:
                parse_line(x)

        matched = [0]

        def parse_match() -> None:
            m = catalog.match
            c = 0
            for x in lines:
                if m(parse_line(x)) is not None:
                    c += 1
            matched[0] = c

        verdict = [""]

        def diag() -> None:
            verdict[0] = diagnose_file(path, catalog).verdict

        rows = []
        for name, fn in (("parse", parse_only), ("parse+match", parse_match), ("diagnose (file)", diag)):
            wall, cpu = _measure(fn)
            rows.append((name, wall, cpu))

        print(
            f"vsup log benchmark: {n:,} lines, {size / 1e6:.0f} MB, Python {sys.version.split()[0]}, "
            f"{len(catalog)} signatures; {matched[0]:,} lines matched a signature; verdict {verdict[0]}\n"
        )
        print("| stage | wall s | CPU s | lines/s (CPU) | µs/line (CPU) |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, wall, cpu in rows:
            print(f"| {name} | {wall:.2f} | {cpu:.2f} | {n / cpu:,.0f} | {cpu / n * 1e6:.2f} |")
        if args.idle_seconds > 0:
            cpu, wall = idle_tail_cpu(args.idle_seconds)
            print(
                f"| idle tailing ({wall:.0f} s) | {wall:.2f} | {cpu:.4f} | - | {cpu / wall * 100:.3f} % of a core |"
            )
        return 0
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
