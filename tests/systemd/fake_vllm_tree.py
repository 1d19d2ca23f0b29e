"""tests/fakes/fake_api_server.py plus an engine-like child that holds vLLM's debris.

For the systemd harness: the API server answers vsup's probes; its child, started in the same
session like VLLM::EngineCore, creates and maps a /dev/shm/psm_* segment, creates a
/tmp/vllm_dist_<hex> store file and listens on a UUID-named unix socket in /tmp, then lives
until killed. Like vLLM 0.32 the child does not watch its parent: after a SIGKILL of the API
server (or of vsup) it stays, holding everything, until someone removes the tree, and a
SIGTERM to the API server leaves it running until vsup's stop grace ends.
FAKE_TREE_DEBRIS=0: the child only lives (for tests outside the harness's private /tmp).
"""

import mmap
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

SEGMENT_BYTES = 4 << 20


def engine() -> None:
    if os.environ.get("FAKE_TREE_DEBRIS", "1") == "0":
        while True:
            time.sleep(3600)
    name = f"psm_{uuid.uuid4().hex[:8]}"
    fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(fd, SEGMENT_BYTES)
    seg = mmap.mmap(fd, SEGMENT_BYTES)
    seg[:: mmap.PAGESIZE] = b"\1" * (SEGMENT_BYTES // mmap.PAGESIZE)  # pages really allocated
    with open(f"/tmp/vllm_dist_{uuid.uuid4().hex}", "w") as f:
        f.write("gloo store\n")
    ipc = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ipc.bind(f"/tmp/{uuid.uuid4()}")
    ipc.listen()
    print(f"(EngineCore pid={os.getpid()}) INFO fake engine holds /dev/shm/{name}", flush=True)
    while True:
        time.sleep(3600)


def main() -> None:
    subprocess.Popen([sys.executable, __file__, "--engine"])
    import fake_api_server  # type: ignore[import-not-found]  # tests/fakes, on PYTHONPATH at run time

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fake_api_server.main()


if __name__ == "__main__":
    engine() if sys.argv[1:2] == ["--engine"] else main()
