"""A stand-in for `python -m vllm.entrypoints.openai.api_server`, for fast daemon tests.

Speaks the endpoints vsup probes (/health, /v1/models, /v1/chat/completions, /metrics) and
prints vLLM 0.32-format log lines. Misbehaviour comes from FAKE_VLLM_MODE:
  ok                 serve normally
  exit_at_start      log a start-up failure and exit 1 at once
  die_on_request     first completion: log an engine death (as 0.32 does) and exit 0
  hang_after_ready   completions after the first FAKE_VLLM_HANG_AFTER (default 1: the readiness
                     canary) never answer; /health stays 200
  worker_dies_after_ready  completions after the readiness canary log a worker death and
                     answer 500; the server stays up
FAKE_VLLM_DELAY_S delays readiness; FAKE_VLLM_STALL_BEFORE_READY=1 logs the shm stall line
while "loading"; FAKE_VLLM_CHILDREN=N starts N child processes (an engine-like subtree) that
live until killed. FAKE_VLLM_RUNNING=N adds N to `vllm:num_requests_running` (as a long request
would that streams without generating). FAKE_VLLM_IGNORE_TERM=1: the server and its children
ignore SIGTERM (as vLLM 0.32 waiting without limit on an open connection).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODE = os.environ.get("FAKE_VLLM_MODE", "ok")
IGNORE_TERM = bool(os.environ.get("FAKE_VLLM_IGNORE_TERM"))
PID = os.getpid()
lock = threading.Lock()
state = {"requests": 0, "running": 0, "tokens": 0}


def log(level: str, src: str, msg: str, proc: str = "APIServer", pid: int = PID) -> None:
    t = time.strftime("%m-%d %H:%M:%S")
    print(f"({proc} pid={pid}) {level} {t} [{src}] {msg}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--served-model-name", default=None)
    a, _rest = ap.parse_known_args()
    name = a.served_model_name or a.model
    log("INFO", "api_server.py:1", f"vLLM API server version 0.32.0-fake, model {a.model}")
    if MODE == "exit_at_start":
        log("ERROR", "core.py:1", "EngineCore failed to start.", proc="EngineCore", pid=PID)
        print("RuntimeError: Engine core initialization failed. See root cause above.", flush=True)
        sys.exit(1)
    ignore = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if IGNORE_TERM else ""
    if IGNORE_TERM:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    children = [
        subprocess.Popen([sys.executable, "-c", ignore + "import time\nwhile True: time.sleep(60)"])
        for _ in range(int(os.environ.get("FAKE_VLLM_CHILDREN", "0")))
    ]
    delay = float(os.environ.get("FAKE_VLLM_DELAY_S", "0"))
    if os.environ.get("FAKE_VLLM_STALL_BEFORE_READY"):
        log(
            "INFO",
            "shm_broadcast.py:542",
            "No available shared memory broadcast block found in 60 seconds. "
            "This typically happens when some processes are hanging or doing some time-consuming work "
            "(e.g. compilation, weight/kv cache quantization).",
            proc="EngineCore",
        )
    time.sleep(delay)

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # uvicorn-style access log
            print(
                f'INFO:     127.0.0.1:0 - "{self.requestline}" {args[1] if len(args) > 1 else ""}', flush=True
            )

        def send(self, code, obj, ctype="application/json"):
            body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                return self.send(200, b"", "text/plain")
            if self.path == "/v1/models":
                return self.send(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
            if self.path == "/metrics":
                with lock:
                    running = state["running"] + int(os.environ.get("FAKE_VLLM_RUNNING", "0"))
                    txt = (
                        f'vllm:num_requests_running{{engine="0",model_name="{name}"}} {running}\n'
                        f'vllm:num_requests_waiting{{engine="0",model_name="{name}"}} 0.0\n'
                        f'vllm:generation_tokens_total{{engine="0",model_name="{name}"}} {state["tokens"]}\n'
                    )
                return self.send(200, txt.encode(), "text/plain")
            self.send(404, {"error": "not found"})

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n) or b"{}")
            if not self.path.startswith("/v1/"):
                return self.send(404, {"error": "not found"})
            with lock:
                state["requests"] += 1
                k = state["requests"]
                state["running"] += 1
            try:
                if MODE == "die_on_request":
                    log("ERROR", "core.py:1", "EngineCore encountered a fatal error.", proc="EngineCore")
                    log(
                        "ERROR",
                        "core.py:1",
                        "RuntimeError: Unsupported CPU attention configuration: head_dim=16",
                        proc="EngineCore",
                    )
                    self.send(500, {"error": "EngineDeadError"})
                    os._exit(0)
                if MODE == "worker_dies_after_ready" and k > 1:
                    # as vLLM 0.32 after a worker's SIGKILL: the API server lives on, errors
                    log(
                        "ERROR",
                        "multiproc_executor.py:316",
                        "Worker proc VllmWorker-1 died unexpectedly (exit code: -9), shutting down executor.",
                        proc="EngineCore",
                    )
                    return self.send(500, {"error": "EngineDeadError"})
                if MODE == "hang_after_ready" and k > int(os.environ.get("FAKE_VLLM_HANG_AFTER", "1")):
                    # as vLLM 0.32 with a stopped worker: the engine's stats freeze, so the hung
                    # request never shows in num_requests_running
                    with lock:
                        state["running"] -= 1
                    while True:
                        time.sleep(3600)
                toks = int(body.get("max_tokens") or 4)
                with lock:
                    state["tokens"] += toks
                self.send(
                    200,
                    {
                        "id": f"chatcmpl-{k}",
                        "object": "chat.completion",
                        "model": name,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": "ok"},
                                "finish_reason": "length",
                            }
                        ],
                    },
                )
            finally:
                with lock:
                    state["running"] -= 1

    srv = ThreadingHTTPServer((a.host, a.port), H)
    srv.daemon_threads = True
    print(f"INFO:     Started server process [{PID}]", flush=True)
    print("INFO:     Waiting for application startup.", flush=True)
    print("INFO:     Application startup complete.", flush=True)
    try:
        srv.serve_forever()
    finally:
        for c in children:
            c.kill()


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    main()
