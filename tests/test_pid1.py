"""vsup as PID 1 of a PID namespace of its own (`unshare --pid --fork --mount-proc`), the shape
of a container whose entrypoint it is: it reaps every zombie, SIGTERM ends it with exit 0 and
nothing left, a server that ends `failed` ends it non-zero with the termination message, and
its probes tell the truth. Fast tests use the fake API server; the `vllm` ones the real vLLM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import psutil
import pytest

from support import Daemon, fake_sections, free_port, wait_for


def _require_unshare() -> None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("needs root and util-linux unshare (this machine has both)")


class Pid1(Daemon):
    """`vsup run` as PID 1 of new PID, mount and IPC namespaces (a private /proc, and a private
    tmpfs on /dev/shm), seen from outside.

    The private /dev/shm is not optional: a vsup in a PID namespace of its own cannot see the
    processes that hold the host's segments, so its cleanup would take live segments of every
    vLLM outside for dead ones (it did, to a real server beside these tests). `shm_setup` runs
    in the namespace after the mount, before vsup (e.g. to plant a dead container's leftovers).
    """

    def __init__(
        self,
        tmp: Path,
        sections: dict[str, dict[str, Any]],
        entry: list[str] | None = None,
        shm_setup: str = "true",
    ) -> None:
        super().__init__(tmp, sections)
        self.entry = entry or [sys.executable, "-m", "vsup"]
        self.shm_setup = shm_setup
        self.kill_now = False  # a wedged vsup never acts on SIGTERM: close() kills the namespace

    def command(self) -> list[str]:
        return [
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child",
            "--mount",
            "--ipc",
            "sh",
            "-c",
            f'mount -t tmpfs -o size=2g vsup-pid1-shm /dev/shm && {{ {self.shm_setup}; }} && exec "$@"',
            "sh",
            *self.entry,
        ]

    def start(self, *extra: str) -> Self:
        _require_unshare()
        super().start(*extra)
        assert self.vsup_pid() is not None, "vsup is not unshare's child"
        return self

    def vsup_pid(self) -> int | None:
        """vsup's pid as this (outer) namespace sees it: unshare's only child."""
        assert self.proc is not None, "start() first"
        try:
            kids = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return None
        return kids[0].pid if kids else None

    def nspid(self, pid: int) -> list[int]:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
        return []

    def namespace_procs(self) -> list[psutil.Process]:
        """Every process of the namespace (vsup and its descendants), zombies included."""
        pid = self.vsup_pid()
        if pid is None:
            return []
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]

    def sigterm(self) -> None:
        pid = self.vsup_pid()
        assert pid is not None
        os.kill(pid, signal.SIGTERM)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with_pid = self.vsup_pid()
            if self.kill_now:
                os.killpg(self.proc.pid, signal.SIGKILL)  # --kill-child ends the namespace
            elif with_pid is not None:
                os.kill(with_pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # --kill-child ends the namespace
                self.proc.wait(10)
        from vsup import cleanup, proctree

        recs = proctree.Ledger(self.state_dir).load()
        if recs:
            cleanup.cleanup(recs, grace_s=2.0)
        if hasattr(self, "_stderr"):
            self._stderr.close()


def port(lo: int, hi: int) -> int:
    """A free port from a random point of [lo, hi): consecutive tests do not race for the one a
    namespace that is still ending holds."""
    import random

    start = random.randrange(lo, hi)  # noqa: S311 - not cryptography
    try:
        return free_port(start, hi)
    except RuntimeError:
        return free_port(lo, hi)


def pid1_sections(port: int, *, python: str = sys.executable, mode: str = "ok") -> dict[str, Any]:
    """support.fake_sections without TP workers, with a shorter shutdown drain and crash loop."""
    return fake_sections(
        port,
        mode,
        vllm={"python": python, "args": []},
        timeouts={"shutdown_drain_s": 5.0},
        restart={"max_failures": 2},
    )


@pytest.fixture
def pid1(tmp_path: Path) -> Iterator[list[Pid1]]:
    made: list[Pid1] = []
    yield made
    for d in made:
        d.close()


def _orphan_maker(tmp: Path, python: str = sys.executable) -> Path:
    """A 'python' for vLLM that first leaves an orphan behind (a child whose parent exits at
    once, so it is reparented to PID 1), which exits once `tmp/release` exists, then becomes the
    server."""
    script = tmp / "python-with-orphan"
    script.write_text(
        "#!/bin/sh\n"
        f"( sh -c 'echo $$ > {tmp}/orphan.pid; while [ ! -e {tmp}/release ]; do sleep 0.1; done; exit 3' & )\n"
        f'exec {python} "$@"\n'
    )
    script.chmod(0o755)
    return script


def test_pid1_reaps_an_orphaned_grandchild_and_sigterm_exits_0(tmp_path: Path, pid1: list[Pid1]) -> None:
    """As PID 1 vsup gets the orphan of a process it never started (its parent exited) and reaps
    it when it exits: no zombie stays. SIGTERM then ends vsup with 0 and nothing of the tree."""
    d = Pid1(tmp_path, pid1_sections(port(8050, 8099), python=str(_orphan_maker(tmp_path))))
    pid1.append(d)
    d.start()
    vsup = d.vsup_pid()
    assert vsup is not None and d.nspid(vsup)[-1] == 1
    orphan_file = tmp_path / "orphan.pid"
    orphan_ns = int(
        wait_for(lambda: orphan_file.exists() and orphan_file.read_text().strip(), 10, "the orphan")
    )

    def orphan() -> psutil.Process | None:
        for p in d.namespace_procs():
            if _alive_in(p) and d.nspid(p.pid)[-1:] == [orphan_ns]:
                return p
        return None

    # Its parent (the subshell) exited at once: the orphan's parent is now vsup, PID 1.
    host = wait_for(
        lambda: (o := orphan()) is not None and o.ppid() == vsup and o, 5, "the orphan under PID 1"
    )
    # Let it exit; reaped means no process entry at all, not even a zombie.
    (tmp_path / "release").touch()
    wait_for(lambda: not psutil.pid_exists(host.pid), 10, "the orphan's zombie reaped")
    assert not any(p.status() == psutil.STATUS_ZOMBIE for p in d.namespace_procs() if _alive_in(p))
    d.wait_state("ready")
    tree = [p.pid for p in d.namespace_procs() if p.pid != vsup]
    assert tree, "the fake server's tree runs below vsup"
    d.sigterm()
    assert d.proc is not None
    assert d.proc.wait(30) == 0, d.stderr_path.read_text()[-2000:]
    assert not [p for p in tree if psutil.pid_exists(p) and _alive_in(psutil.Process(p))]
    assert [e["event"] for e in d.events()][-1] == "daemon_stopped"


def _alive_in(p: psutil.Process) -> bool:
    try:
        p.status()
        return True
    except psutil.NoSuchProcess:
        return False


def test_failed_server_ends_pid1_nonzero_with_the_termination_message(
    tmp_path: Path, pid1: list[Pid1]
) -> None:
    """exit_on_failed: a server that keeps failing at start ends `failed`; vsup, PID 1, exits 1
    after its teardown, with the reason in the termination log (an existing file, as the kubelet
    mounts it)."""
    term = tmp_path / "termination-log"
    term.touch()
    sections = pid1_sections(port(8050, 8099), mode="exit_at_start")
    sections["daemon"] = {"exit_on_failed": True, "termination_log": str(term)}
    d = Pid1(tmp_path, sections)
    pid1.append(d)
    d.start()
    assert d.proc is not None
    code = d.proc.wait(60)
    assert code == 1, d.stderr_path.read_text()[-2000:]
    msg = term.read_text()
    assert msg.startswith("vsup: the vLLM server ended failed: 2 failures within 60s"), msg
    assert json.loads(msg.split("\n", 1)[1])["state"] == "failed"
    events = [e["event"] for e in d.events()]
    assert "exit_on_failed" in events and events[-1] == "daemon_stopped"


# ---- probes in a running daemon ---------------------------------------------------------------


def probe(base: str, path: str, timeout: float = 5.0) -> int:
    """The status the kubelet would see (0: no answer within `timeout`)."""
    import httpx

    try:
        return httpx.get(base + path, timeout=timeout, trust_env=False).status_code
    except httpx.HTTPError:
        return 0


def with_proxy(sections: dict[str, Any]) -> tuple[dict[str, Any], str]:
    listen = port(18600, 18699)
    sections["proxy"] = {"listen": f"127.0.0.1:{listen}", "hold_timeout_s": 30.0}
    return sections, f"http://127.0.0.1:{listen}"


def test_probes_while_loading_ready_and_hung(tmp_path: Path, pid1: list[Pid1]) -> None:
    """Loading: /readyz and /startupz 503, /livez 200. Ready: all 200. A hung server (canaries
    time out, /health still 200): /readyz 503 while vsup confirms the hang, /livez 200 throughout,
    /startupz stays 200."""
    sections = pid1_sections(port(8050, 8099), mode="hang_after_ready")
    sections["vllm"]["env"]["FAKE_VLLM_DELAY_S"] = "3"
    sections, base = with_proxy(sections)
    d = Pid1(tmp_path, sections)
    pid1.append(d)
    d.start()
    loading: dict[str, set[int]] = {"/livez": set(), "/readyz": set(), "/startupz": set()}

    def loaded() -> bool:
        state = d.status()["state"]
        answers = {path: probe(base, path) for path in loading}
        if state == "starting" and d.status()["state"] == "starting":  # the answers were taken while loading
            for path, code in answers.items():
                loading[path].add(code)
        return state == "ready" and answers["/startupz"] == 200

    wait_for(loaded, 30, "the first model ready", 0.1)
    assert loading == {"/livez": {200}, "/readyz": {503}, "/startupz": {503}}, loading
    seen: dict[str, set[int]] = {"/livez": set(), "/readyz": set(), "/startupz": set()}

    def unhealthy_and_not_ready() -> bool:
        for path in seen:
            seen[path].add(probe(base, path))
        return d.status()["state"] == "unhealthy" and 503 in seen["/readyz"]

    wait_for(unhealthy_and_not_ready, 30, "readiness 503 while the hang is being confirmed", 0.2)
    assert seen["/livez"] == {200} and seen["/startupz"] == {200}


WEDGE_DRIVER = """
import asyncio, sys, time
from vsup import daemon, pod

pod.LIVENESS_STALE_S = 2.0
serve = daemon.Supervisor._do_serve

async def wedging(self, intent):
    try:
        return await asyncio.wait_for(serve(self, intent), 1.0)
    except TimeoutError:
        self.events.emit("wedged")
    %s

daemon.Supervisor._do_serve = wedging
from vsup.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    ("wedge", "expect"),
    [("await asyncio.Event().wait()", 503), ("time.sleep(600)", 0)],
    ids=["owner-wedged", "loop-blocked"],
)
def test_liveness_fails_when_vsups_loop_is_wedged(
    tmp_path: Path, pid1: list[Pid1], wedge: str, expect: int
) -> None:
    """The owner stops waking (its loop still answers): /livez 503 once the heartbeat is older
    than the limit. The whole loop blocked: no answer at all, which the kubelet counts as a
    failure too. /livez was 200 before the wedge."""
    driver = tmp_path / "driver.py"
    driver.write_text(WEDGE_DRIVER % wedge)
    sections, base = with_proxy(pid1_sections(port(8050, 8099)))
    d = Pid1(tmp_path, sections, entry=[sys.executable, str(driver)])
    pid1.append(d)
    d.start()
    assert probe(base, "/livez") == 200
    wait_for(lambda: any(e["event"] == "wedged" for e in d.events()), 30, "the wedge")
    wait_for(lambda: probe(base, "/livez", timeout=2.0) == expect, 15, f"/livez {expect or 'no answer'}")
    assert d.proc is not None and d.proc.poll() is None  # wedged, not dead
    d.kill_now = True


def test_sigterm_drains_in_flight_refuses_the_rest_exits_0(tmp_path: Path, pid1: list[Pid1]) -> None:
    """SIGTERM while a slow stream runs through the proxy: a new request gets 503 with
    Connection: close at once, the stream finishes whole, vsup (PID 1) exits 0, tree gone."""
    import httpx

    sections = pid1_sections(port(8050, 8099))
    sections["vllm"]["env"]["FAKE_VLLM_TOKEN_S"] = "0.1"  # noqa: S105 - seconds per token
    sections, base = with_proxy(sections)
    d = Pid1(tmp_path, sections)
    pid1.append(d)
    d.start()
    d.wait_state("ready")
    tree = [p.pid for p in d.namespace_procs() if p.pid != d.vsup_pid()]
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30}
    with httpx.Client(trust_env=False, timeout=30) as c:
        with c.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}) as r:
            it = r.iter_lines()
            first = next(line for line in it if line.startswith("data: "))
            d.sigterm()
            wait_for(lambda: d.status()["phase"] == "drain", 10, "the shutdown drain")
            with httpx.Client(trust_env=False, timeout=10) as c2:
                refused = c2.post(base + "/v1/chat/completions", json=body)
            rest = [line for line in it if line.startswith("data: ")]
        assert r.status_code == 200 and first and rest[-1] == "data: [DONE]"
    assert refused.status_code == 503 and refused.headers["connection"] == "close"
    assert refused.headers["retry-after"]
    assert d.proc is not None and d.proc.wait(30) == 0, d.stderr_path.read_text()[-2000:]
    assert not [p for p in tree if psutil.pid_exists(p) and _alive_in(psutil.Process(p))]
    drain = [e for e in d.events() if e["event"] == "shutdown_drain"]
    assert drain and drain[-1]["drained"] is True


# ---- the real vLLM ------------------------------------------------------------------------------


def _real_pid1(tmp_path: Path, model: str = "tiny-a", **over: dict[str, Any]) -> tuple[Pid1, str]:
    from support import VLLM_PY, real_sections, require_real_vllm

    require_real_vllm()
    sections = real_sections(port(8000, 8049), model, **over)
    sections["vllm"]["python"] = str(_orphan_maker(tmp_path, str(VLLM_PY)))
    sections, base = with_proxy(sections)
    sections["proxy"]["hold_timeout_s"] = 120.0
    return Pid1(tmp_path, sections), base


def titled(d: Pid1, title: str) -> int | None:
    """The outer pid of the namespace's process whose command line starts with `title` (vLLM
    sets VLLM::EngineCore, VLLM::Worker_TP0, ...); the ledger's pids are the namespace's own."""
    for p in d.namespace_procs():
        try:
            if " ".join(p.cmdline()).startswith(title):
                return p.pid
        except psutil.Error:
            continue
    return None


class Poller(threading.Thread):
    """Asks one probe every 0.5 s and keeps every answer, until stopped."""

    def __init__(self, base: str, path: str) -> None:
        super().__init__(daemon=True)
        self.base, self.path = base, path
        self.answers: list[int] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.answers.append(probe(self.base, self.path))
            self.halt.wait(0.5)


STREAMS = 2


@pytest.mark.vllm
def test_real_vllm_pid1_probes_orphan_and_sigterm_with_requests_in_flight(
    tmp_path: Path, pid1: list[Pid1]
) -> None:
    """The real TP=2 vLLM under vsup as PID 1. Loading: /readyz 503. A SIGSTOPped worker:
    /readyz 503 before any teardown. /livez 200 throughout. An orphaned grandchild is reaped.
    SIGTERM while streams run: all finish, a new request gets 503, exit 0 within
    shutdown_drain_s + the teardown, nothing of the tree left."""
    import httpx

    d, base = _real_pid1(tmp_path, timeouts={"shutdown_drain_s": 30.0})
    pid1.append(d)
    d.start()
    live = Poller(base, "/livez")
    live.start()
    try:
        wait_for(lambda: probe(base, "/livez") == 200, 30, "the probes to answer")
        assert d.status()["state"] == "starting" and probe(base, "/readyz") == 503
        # The orphan the interpreter wrapper left is PID 1's, and reaped when it exits.
        orphan_ns = int(
            wait_for(
                lambda: (tmp_path / "orphan.pid").exists() and (tmp_path / "orphan.pid").read_text(),
                30,
                "orphan",
            )
        )
        vsup = d.vsup_pid()
        host = wait_for(
            lambda: next(
                (p for p in d.namespace_procs() if _alive_in(p) and d.nspid(p.pid)[-1:] == [orphan_ns]), None
            ),
            10,
            "the orphan",
        )
        assert host.ppid() == vsup
        (tmp_path / "release").touch()
        wait_for(lambda: not psutil.pid_exists(host.pid), 10, "the orphan reaped")
        d.wait_state("ready", timeout=300)
        assert probe(base, "/readyz") == 200 and probe(base, "/startupz") == 200
        # A stopped worker: vsup's canary sees it, and /readyz says 503 before any teardown.
        worker = wait_for(lambda: titled(d, "VLLM::Worker_TP1"), 60, "worker TP1 in the namespace", 0.5)
        os.kill(worker, signal.SIGSTOP)
        try:
            wait_for(
                lambda: probe(base, "/readyz") == 503 and d.status()["state"] == "unhealthy",
                60,
                "readiness 503 while the worker is stopped",
                0.5,
            )
            assert not any(e["event"] == "teardown" for e in d.events())
        finally:
            os.kill(worker, signal.SIGCONT)
        d.wait_state("ready", timeout=300)  # a good canary, or a restart after a confirmed hang
        tree = wait_for(
            lambda: titled(d, "VLLM::Worker_TP1") and [p.pid for p in d.namespace_procs()[1:]], 60, "the tree"
        )
        # SIGTERM with streams in flight. The tiny model writes ~500 tokens/s, so a stream is over
        # before a SIGTERM can follow it (in a CI run both had ended and the drain with them; a
        # one-sequence server and client reads held back did not help: the proxy's socket
        # buffers took whole streams). So "in flight" is made certain: the first chunk stops a
        # worker (SIGSTOP), the next stream is sent into the stopped engine, the SIGTERM's drain
        # is checked (new requests refused, the drain not over), and SIGCONT lets the streams
        # finish inside the drain.
        body = {
            "model": "tiny-a",
            "messages": [{"role": "user", "content": "Count to one hundred."}],
            "max_tokens": 200,
            "stream": True,
            "ignore_eos": True,
        }
        worker = wait_for(lambda: titled(d, "VLLM::Worker_TP1"), 60, "worker TP1 in the namespace", 0.5)
        results: list[tuple[int, list[str]]] = []
        paused = threading.Event()
        pausing = threading.Lock()

        def stream() -> None:
            with (
                httpx.Client(trust_env=False, timeout=120) as c,
                c.stream("POST", base + "/v1/chat/completions", json=body) as r,
            ):
                got = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        got.append(line)
                        with pausing:
                            if not paused.is_set():
                                os.kill(worker, signal.SIGSTOP)
                                paused.set()
                results.append((r.status_code, got))

        threads = [threading.Thread(target=stream) for _ in range(STREAMS)]
        threads[0].start()
        try:
            assert paused.wait(60), "no stream began"
            # the first stream's first chunk stopped the worker (it may have been written whole
            # by then); the others, sent now, wait in the stopped engine: in flight for certain
            for t in threads[1:]:
                t.start()
            wait_for(
                lambda: d.status()["traffic"]["in_flight"] + len(results) == STREAMS,
                10,
                "every stream forwarded",
                0.05,
            )
            live.halt.set()
            t0 = time.monotonic()
            d.sigterm()
            draining = d.wait_event(
                lambda e: e["event"] == "state" and e.get("phase") == "drain", 10, "the drain"
            )
            refused = httpx.post(
                base + "/v1/chat/completions", json={**body, "stream": False}, timeout=10, trust_env=False
            )
            assert refused.status_code == 503 and refused.headers["connection"] == "close"
            assert not [e for e in d.events() if e["event"] == "shutdown_drain"], "the drain ended early"
            assert draining["state"] == "stopping"
        finally:
            os.kill(worker, signal.SIGCONT)
        for t in threads:
            t.join(120)
        assert d.proc is not None and d.proc.wait(120) == 0, d.stderr_path.read_text()[-3000:]
        took = time.monotonic() - t0
        assert [s for s, _ in results] == [200] * STREAMS
        assert all(lines[-1] == "data: [DONE]" and len(lines) > 60 for _, lines in results)
        # shutdown_drain_s + stop_grace_s + kill_wait_s + cleanup_grace_s + gpu_release_s
        limit = 30.0 + 20.0 + 10.0 + 3.0 + 30.0
        assert took < limit, took
        # vsup itself removed the tree before exiting (the namespace's end would kill what it
        # left, but not unlink segments on a shared /dev/shm): its last cleanup left nothing.
        cleanups = [e for e in d.events() if e["event"] == "cleanup" and e.get("why") == "teardown"]
        assert cleanups and cleanups[-1]["remaining"] == [], cleanups[-1:]
        assert not [p for p in tree if psutil.pid_exists(p) and _alive_in(psutil.Process(p))]
        assert 0 not in live.answers and set(live.answers) == {200}, live.answers
        drain = [e for e in d.events() if e["event"] == "shutdown_drain"]
        assert drain[-1]["drained"] is True
    finally:
        live.halt.set()


@pytest.mark.vllm
def test_real_engine_death_ending_failed_exits_nonzero_with_the_message(
    tmp_path: Path, pid1: list[Pid1]
) -> None:
    """tiny-broken loads, then its first request (the readiness canary) kills the engine. With
    one failure allowed and no remedies, the server ends `failed`: vsup, PID 1, exits 1, the
    termination log says why, and nothing of the tree is left."""
    term = tmp_path / "termination-log"
    term.touch()
    d, _base = _real_pid1(
        tmp_path,
        "tiny-broken",
        restart={"max_failures": 1},
        remedies={"enabled": False},
        daemon={"exit_on_failed": True, "termination_log": str(term)},
    )
    pid1.append(d)
    (tmp_path / "release").touch()  # the orphan need not wait
    d.start()
    assert d.proc is not None
    code = d.proc.wait(400)
    assert code == 1, d.stderr_path.read_text()[-3000:]
    msg = term.read_text()
    assert msg.startswith("vsup: the vLLM server ended failed:"), msg
    assert "1 failures within" in msg and "root cause:" in msg, msg
    assert not [p for p in d.namespace_procs()]
    from support import debris

    assert not [p for p in debris()["procs"] if "tiny-broken" in p[1]]


PLANT = """
import os, sys, time
old = time.time() - 3600
for name in sys.argv[1:]:
    with open("/dev/shm/" + name, "wb") as f:
        f.write(b"x" * 1048576)
    os.utime("/dev/shm/" + name, (old, old))
"""


def test_dead_containers_shm_leftovers_gone_before_the_first_start(tmp_path: Path, pid1: list[Pid1]) -> None:
    """A container's own /dev/shm (a private tmpfs in new mount and IPC namespaces) holding a
    dead container's segments: vsup (shm_private) unlinks them before it starts the server,
    then serves; an object of the new tree is not touched."""
    leftovers = ["psm_0badc0de", "sem.mp-deadbeef", "nccl-shm-old", "torch_1234_old"]
    sections = pid1_sections(port(8050, 8099))
    sections["daemon"] = {"shm_private": True}
    d = Pid1(tmp_path, sections, shm_setup=f'{sys.executable} -c "$VSUP_PLANT" {" ".join(leftovers)}')
    pid1.append(d)
    os.environ["VSUP_PLANT"] = PLANT
    try:
        d.start()
    finally:
        del os.environ["VSUP_PLANT"]
    d.wait_state("ready")
    vsup = d.vsup_pid()
    assert vsup is not None and d.nspid(vsup)[-1] == 1
    shm = Path(f"/proc/{vsup}/root/dev/shm")
    assert not set(leftovers) & set(os.listdir(shm)), os.listdir(shm)
    (ev,) = [e for e in d.events() if e["event"] == "pod_shm"]
    assert ev["own"] is True, ev["why"]
    assert sorted(u["name"] for u in ev["unlinked"]) == sorted(leftovers)
    assert ev["bytes_freed"] >= 4 << 20
    starts = [i for i, e in enumerate(d.events()) if e["event"] == "spawned"]
    pod_shm_at = [i for i, e in enumerate(d.events()) if e["event"] == "pod_shm"][0]
    assert not starts or pod_shm_at < starts[0]
