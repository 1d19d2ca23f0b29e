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
FAKE_VLLM_TP=1 runs every generated token as one step of a vLLM-shaped TP=2 tree (engine core
and two workers with vLLM's titles and frame names, fake_tp/multiproc_executor.py): SIGUSR1 to a
worker hangs it asleep (state S) outside the all-reduce its peer then waits in.
FAKE_VLLM_DELAY_S delays readiness; FAKE_VLLM_STALL_BEFORE_READY=1 logs the shm stall line
while "loading"; FAKE_VLLM_CHILDREN=N starts N child processes (an engine-like subtree) that
live until killed. FAKE_VLLM_RUNNING=N adds N to `vllm:num_requests_running` (as a long request
would that streams without generating). FAKE_VLLM_IGNORE_TERM=1: the server and its children
ignore SIGTERM (as vLLM 0.32 waiting without limit on an open connection).

For the proxy's tests (the server alone, no daemon):
  "stream": true     answers as vLLM does: 200 + text/event-stream headers at once, then one SSE
                     chunk per token (FAKE_VLLM_TOKEN_S apart, default 0.01), then `data: [DONE]`
  FAKE_VLLM_FIRST_BYTE_S  delay before the first body byte (a stream's headers go out at once)
  die_mid_stream     a stream sends FAKE_VLLM_DIE_AFTER_CHUNKS (default 2) chunks, then the
                     process exits; a non-streaming completion exits before answering
  error_then_die     completions answer 500 (as vLLM's API server when its engine died), then
                     the process exits FAKE_VLLM_DIE_AFTER_S (default 0.2) later
  sse_error_then_die  a stream gets 200, an error event as its first bytes and its end (as
                     vLLM 0.32 when the engine dies under it), then the process exits as above
  hang               completions never answer (a stream's 200 headers are sent first, as vLLM)
  --api-key K / VLLM_API_KEY   /v1/* need `Authorization: Bearer K`, else 401 (as vLLM)
A request for another model than the served one gets vLLM's 404. `/_echo*` (any method) answers
the method, path, headers and body it got. Header `X-Fake-Pause: PATH`:
a stream waits after its first chunk until PATH exists. `GET /_stats`: requests, completed,
aborted requests (the client went away: a stream's write failed, or with FAKE_VLLM_TP=1 a request waiting for a step saw its client gone), connections accepted, and the `X-Req` header of each completion in arrival order.
"""

import argparse
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODE = os.environ.get("FAKE_VLLM_MODE", "ok")
IGNORE_TERM = bool(os.environ.get("FAKE_VLLM_IGNORE_TERM"))
PID = os.getpid()
lock = threading.Lock()
state: dict[str, Any] = {
    "requests": 0,
    "running": 0,
    "tokens": 0,
    "completed": 0,
    "aborted": 0,
    "order": [],
    "connections": 0,
}
TOKEN_S = float(os.environ.get("FAKE_VLLM_TOKEN_S", "0.01"))
step_lock = threading.Lock()
engine: Any = None  # (process, fd steps go to, fd replies come from) with FAKE_VLLM_TP=1


def step(gone: Any = None) -> bool:
    """One engine step (one token), as the TP tree's API server waits for it; nothing without one.
    False, with no step taken, when `gone()` says the client went away while it waited for its
    turn (vLLM aborts a request whose client disconnected: it takes no more steps)."""
    if engine is None:
        return True
    while not step_lock.acquire(timeout=0.1):
        if gone is not None and gone():
            return False
    try:
        os.write(engine[1], b"s")
        os.read(engine[2], 1)
    finally:
        step_lock.release()
    return True


FIRST_BYTE_S = float(os.environ.get("FAKE_VLLM_FIRST_BYTE_S", "0"))


def log(level: str, src: str, msg: str, proc: str = "APIServer", pid: int = PID) -> None:
    t = time.strftime("%m-%d %H:%M:%S")
    print(f"({proc} pid={pid}) {level} {t} [{src}] {msg}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"))
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
    if os.environ.get("FAKE_VLLM_TP"):
        global engine
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_tp"))
        import multiproc_executor  # type: ignore[import-not-found]  # fake_tp/, put on sys.path above

        engine = multiproc_executor.start_engine()
        children.append(engine[0])
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

        def handle(self):
            with lock:
                state["connections"] += 1
            super().handle()

        def echo(self):
            n = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(n)
            return self.send(
                200,
                {
                    "method": self.command,
                    "path": self.path,
                    "headers": [[k, v] for k, v in self.headers.items()],
                    "body": data.decode("latin-1"),
                },
            )

        do_PUT = do_DELETE = do_PATCH = echo

        def chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def client_gone(self) -> bool:
            """The client closed its end (the request's body is read: EOF is all it can send)."""
            try:
                r, _, _ = select.select([self.connection], [], [], 0)
                return bool(r) and self.connection.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True

        def authorized(self) -> bool:
            if not a.api_key or not self.path.startswith("/v1"):
                return True
            if self.headers.get("Authorization") == f"Bearer {a.api_key}":
                return True
            self.send(401, {"error": "Unauthorized"})
            return False

        def stream(self, k: int, toks: int) -> None:
            """As vLLM: the 200 and its headers first, tokens as they come."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            if MODE == "hang":
                while True:
                    time.sleep(3600)
            if MODE == "sse_error_then_die":
                err = {
                    "error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError"}
                }
                self.chunk(b"data: " + json.dumps(err).encode() + b"\n\n")
                self.chunk(b"data: [DONE]\n\n")
                self.chunk(b"")
                threading.Timer(float(os.environ.get("FAKE_VLLM_DIE_AFTER_S", "0.2")), os._exit, (0,)).start()
                return
            time.sleep(FIRST_BYTE_S)
            pause = self.headers.get("X-Fake-Pause")
            try:
                for i in range(toks):
                    if MODE == "die_mid_stream" and i == int(
                        os.environ.get("FAKE_VLLM_DIE_AFTER_CHUNKS", "2")
                    ):
                        os._exit(1)
                    ev = {
                        "id": f"chatcmpl-{k}",
                        "object": "chat.completion.chunk",
                        "model": name,
                        "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}],
                    }
                    if not step(self.client_gone):
                        raise BrokenPipeError("the client went away while the request waited for a step")
                    self.chunk(b"data: " + json.dumps(ev).encode() + b"\n\n")
                    with lock:
                        state["tokens"] += 1
                    if i == 0 and pause:
                        while not os.path.exists(pause):
                            time.sleep(0.01)
                    elif i:
                        time.sleep(TOKEN_S)
                self.chunk(b"data: [DONE]\n\n")
                self.chunk(b"")
            except (BrokenPipeError, ConnectionResetError):
                with lock:
                    state["aborted"] += 1
                self.close_connection = True
                return
            with lock:
                state["completed"] += 1

        def do_GET(self):
            if not self.authorized():
                return
            if self.path.startswith("/_echo"):
                return self.echo()
            if self.path == "/_stats":
                with lock:
                    return self.send(
                        200,
                        {k: state[k] for k in ("requests", "completed", "aborted", "order", "connections")},
                    )
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
            if self.path.startswith("/_echo"):
                return self.echo()
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n) or b"{}")
            if not self.authorized():
                return
            if not self.path.startswith("/v1/"):
                return self.send(404, {"error": "not found"})
            if body.get("model", name) != name:
                return self.send(
                    404,
                    {
                        "error": {
                            "message": f"The model `{body.get('model')}` does not exist.",
                            "type": "NotFoundError",
                            "param": "model",
                            "code": 404,
                        }
                    },
                )
            with lock:
                state["requests"] += 1
                k = state["requests"]
                state["running"] += 1
                if self.headers.get("X-Req"):
                    state["order"].append(self.headers["X-Req"])
            try:
                if MODE == "error_then_die":
                    threading.Timer(
                        float(os.environ.get("FAKE_VLLM_DIE_AFTER_S", "0.2")), os._exit, (0,)
                    ).start()
                    return self.send(
                        500, {"error": {"message": "EngineDeadError", "type": "InternalServerError"}}
                    )
                if MODE == "die_mid_stream" and not body.get("stream"):
                    os._exit(1)
                if MODE == "hang" and not body.get("stream"):
                    while True:
                        time.sleep(3600)
                if body.get("stream"):
                    return self.stream(k, int(body.get("max_tokens") or 4))
                time.sleep(FIRST_BYTE_S)
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
                for _ in range(toks):
                    if not step(self.client_gone):
                        with lock:
                            state["aborted"] += 1
                        self.close_connection = True
                        return
                    with lock:
                        state["tokens"] += 1  # as vLLM's counter: a token per step, not at the end
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
                with lock:
                    state["completed"] += 1
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
