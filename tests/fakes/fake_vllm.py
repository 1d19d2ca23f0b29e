#!/usr/bin/env python3
"""A vLLM-like process tree on the real OS, for the proctree and cleanup tests.

Shape (vLLM 0.32, TP=2, multiprocessing spawn, as in vllm-facts.md):

    api        python -m vllm.entrypoints.openai.api_server ...   (setproctitle; own session)
    ├─ resource_tracker   started by the API server's first multiprocessing lock
    └─ VLLM::EngineCore   creates --segments psm_* (pages touched), a /tmp/vllm_dist_<hex> store,
       │                  listens on a UUID unix socket in --tmp-root
       ├─ VLLM::Worker_TP0   attaches the segments, opens the 2 sem.mp-* locks, own UUID socket
       └─ VLLM::Worker_TP1

Like vLLM: SIGKILL the API server and the engine core and workers live on (workers exit only
when the engine core is gone); every segment and semaphore is registered with the
resource_tracker, which unlinks them once every other process of the tree has exited. A SIGTERM
is a graceful stop (the engine core unlinks its segments) unless --ignore-sigterm says otherwise.
Log lines use the 0.32 format: `(EngineCore pid=N) INFO 11-24 03:50:13 [core.py:1] ...`.

Readiness is a JSON file written atomically once every process is up:
{"api", "engine", "workers", "tracker", "segments", "semaphores", "sockets", "dist", "zombie"}.

Other modes, for decoys:
  holder  --shm NAME        a plain (untitled) process that creates and holds a segment
  titled  --title T         a process with title T; --orphan leaves it reparented (its parent
                            exits); --shm NAME also leaves an unheld segment behind
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing as mp
import os
import signal
import socket
import time
import uuid

try:
    from setproctitle import setproctitle
except ImportError:  # pragma: no cover - the test extra installs it
    setproctitle = None  # type: ignore[assignment]  # checked before each use

PAGE = 4096


def title(t: str) -> None:
    if setproctitle is None:
        raise SystemExit("fake_vllm needs setproctitle (pip install setproctitle)")
    setproctitle(t)


def log(proc: str, src: str, msg: str, level: str = "INFO") -> None:
    t = time.strftime("%m-%d %H:%M:%S")
    print(f"({proc} pid={os.getpid()}) {level} {t} [{src}] {msg}", flush=True)


def write_json(path: str, data: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def wait_json(path: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            time.sleep(0.02)
    raise SystemExit(f"timed out waiting for {path}")


def listen_uuid_socket(tmp_root: str) -> tuple[socket.socket, str]:
    path = os.path.join(tmp_root, str(uuid.uuid4()))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(4)
    return s, path


def install_term(ignore: bool, on_term=None) -> None:
    if ignore:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return

    def handler(_sig, _frm):
        if on_term is not None:
            on_term()
        os._exit(0)

    signal.signal(signal.SIGTERM, handler)


# ---- tree processes --------------------------------------------------------------------------
def worker_main(rank: int, opts: dict, seg_names: list[str], locks: list) -> None:
    from multiprocessing import shared_memory

    name = f"Worker_TP{rank}"
    title(f"VLLM::{name}")
    install_term(opts["ignore_sigterm"] in ("all", "workers"))
    segs = [shared_memory.SharedMemory(name=n) for n in seg_names]
    for lk in locks:
        with lk:
            pass
    sock, path = listen_uuid_socket(opts["tmp_root"])
    log(name, "gpu_worker.py:1", f"attached {len(segs)} segments; listening on {path}")
    write_json(os.path.join(opts["work"], f"worker{rank}.json"), {"pid": os.getpid(), "socket": path})
    keep = (sock, segs)  # noqa: F841 - alive until the process ends
    parent = os.getppid()
    while os.getppid() == parent:  # vLLM workers watch the engine core through a death pipe
        time.sleep(0.2)
    log(name, "multiproc_executor.py:1", "Parent process exited, terminating worker")
    os._exit(0)


def engine_main(opts: dict, locks: list) -> None:
    from multiprocessing import shared_memory

    title("VLLM::EngineCore")
    segs = []
    for _ in range(opts["segments"]):
        s = shared_memory.SharedMemory(create=True, size=opts["segment_bytes"])
        assert s.buf is not None  # open: just created
        for off in range(0, opts["segment_bytes"], PAGE):  # touch pages: st_blocks > 0
            s.buf[off] = 1
        segs.append(s)

    def graceful() -> None:
        for s in segs:
            try:
                s.close()
                s.unlink()
            except (FileNotFoundError, BufferError):
                pass

    install_term(opts["ignore_sigterm"] in ("all", "engine"), graceful)
    dist = os.path.join(opts["tmp_root"], f"vllm_dist_{uuid.uuid4().hex}")
    with open(dist, "wb") as f:
        f.write(b"\0" * 64)
    held_dist = open(dist, "rb") if opts["hold_dist"] else None  # noqa: SIM115 - held until the process ends
    sock, path = listen_uuid_socket(opts["tmp_root"])
    zombie = None
    if opts["zombie"]:
        zombie = os.fork()
        if zombie == 0:
            os._exit(0)  # never waited for: a zombie child of the engine core
    ctx = mp.get_context("spawn")
    workers = [
        ctx.Process(target=worker_main, args=(r, opts, [s.name for s in segs], locks), name=f"VllmWorker-{r}")
        for r in range(opts["tp"])
    ]
    for w in workers:
        w.start()
    infos = [wait_json(os.path.join(opts["work"], f"worker{r}.json")) for r in range(opts["tp"])]
    log("EngineCore", "core.py:1", f"{len(segs)} shm segments, dist store {dist}")
    write_json(
        os.path.join(opts["work"], "engine.json"),
        {
            "pid": os.getpid(),
            "segments": [s.name for s in segs],
            "socket": path,
            "dist": dist,
            "workers": [i["pid"] for i in infos],
            "worker_sockets": [i["socket"] for i in infos],
            "zombie": zombie,
        },
    )
    keep = (held_dist, sock, segs)  # noqa: F841 - alive until the process ends
    while True:
        signal.pause()


def api_main(a: argparse.Namespace) -> None:
    if os.getsid(0) != os.getpid():
        os.setsid()
    if a.api_title:
        title(a.api_title)
    os.makedirs(a.work, exist_ok=True)
    ctx = mp.get_context("spawn")
    locks = [ctx.Lock(), ctx.Lock()]  # two sem.mp-* like vLLM 0.32
    from multiprocessing import resource_tracker

    opts = {
        "tp": a.tp,
        "segments": a.segments,
        "segment_bytes": a.segment_bytes,
        "tmp_root": a.tmp_root,
        "work": a.work,
        "ignore_sigterm": a.ignore_sigterm,
        "hold_dist": a.hold_dist,
        "zombie": a.zombie,
    }
    lsock = None
    if a.port:
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", a.port))
        lsock.listen(8)
    log("APIServer", "api_server.py:1", f"vLLM API server version 0.32.0 (fake) port={a.port}")
    engine = ctx.Process(target=engine_main, args=(opts, locks), name="EngineCore")
    engine.start()

    def graceful() -> None:
        if engine.pid:
            try:
                os.kill(engine.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    install_term(a.ignore_sigterm in ("all", "api"), graceful)
    info = wait_json(os.path.join(a.work, "engine.json"))
    ready = {
        "api": os.getpid(),
        "engine": info["pid"],
        "workers": info["workers"],
        "tracker": resource_tracker._resource_tracker._pid,  # type: ignore[attr-defined]  # private, as vLLM's tracker pid is found
        "segments": info["segments"],
        "semaphores": ["sem." + lk._semlock.name.lstrip("/") for lk in locks],  # type: ignore[attr-defined]  # the private handle holds the name
        "sockets": [info["socket"], *info["worker_sockets"]],
        "dist": info["dist"],
        "zombie": info["zombie"],
    }
    log("APIServer", "launcher.py:1", "Application startup complete.")
    if a.ready:
        write_json(a.ready, ready)
    keep = (lsock, engine)  # noqa: F841 - alive until the process ends
    while True:
        signal.pause()


# ---- decoys ----------------------------------------------------------------------------------
def make_segment(name: str, size: int, hold: bool):
    import posix_ipc

    shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, size=size)
    m = mmap.mmap(shm.fd, size)
    m[0:1] = b"x"
    if hold:
        return shm, m
    m.close()
    shm.close_fd()
    return None


def holder_main(a: argparse.Namespace) -> None:
    keep = make_segment(a.shm, a.segment_bytes, hold=True)
    if a.ready:
        write_json(a.ready, {"pid": os.getpid(), "shm": a.shm})
    while keep:
        signal.pause()


def titled_main(a: argparse.Namespace) -> None:
    if a.orphan:
        # Fork a child that takes the title; this process exits once the child is ready, so
        # the child is reparented to the nearest subreaper or PID 1 (an orphan).
        r, w = os.pipe()
        pid = os.fork()
        if pid:
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        os.close(r)
        os.setsid()
    title(a.title)
    install_term(a.ignore_sigterm != "none")
    if a.shm:
        make_segment(a.shm, a.segment_bytes, hold=False)
    if a.ready:
        write_json(a.ready, {"pid": os.getpid(), "shm": a.shm})
    if a.orphan:
        os.write(w, b"x")
        os.close(w)
    while True:
        signal.pause()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", nargs="?", default="tree", choices=["tree", "holder", "titled"])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--segments", type=int, default=4)
    p.add_argument("--segment-bytes", type=int, default=256 * 1024)
    p.add_argument("--tmp-root", default="/tmp")
    p.add_argument("--work", default=None, help="scratch dir for readiness hand-offs")
    p.add_argument("--ready", default=None)
    p.add_argument("--ignore-sigterm", default="none", choices=["none", "all", "engine", "workers", "api"])
    p.add_argument("--hold-dist", action="store_true")
    p.add_argument("--zombie", action="store_true")
    p.add_argument("--api-title", default="python -m vllm.entrypoints.openai.api_server --model fake")
    p.add_argument("--title", default="VLLM::Worker_TP0")
    p.add_argument("--orphan", action="store_true")
    p.add_argument("--shm", default=None)
    a = p.parse_args(argv)
    if a.mode == "tree":
        a.work = a.work or os.path.join(a.tmp_root, f"fakevllm-{os.getpid()}")
        api_main(a)
    elif a.mode == "holder":
        holder_main(a)
    else:
        titled_main(a)


if __name__ == "__main__":
    main()
