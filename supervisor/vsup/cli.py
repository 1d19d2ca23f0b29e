"""The `vsup` command line.

Exit codes (every subcommand): 0 ok, 1 the operation ran and failed (or debris remains),
2 usage or config error, 3 the daemon cannot be reached or refused us.
Every subcommand finds its config the same way: ``--config PATH`` > ``$VSUP_CONFIG`` >
``/etc/vsup/vsup.toml``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

from . import __version__
from . import config as config_mod

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

DESCRIPTION = """\
vsup keeps a vLLM OpenAI server alive and its machine clean: it starts the server in its own
session, proves it serves a real completion, detects hangs and engine death (log signatures,
canary completions, token progress), tears the whole process tree down within bounds, removes
leaked /dev/shm segments and semaphores, restarts with backoff, and swaps models with rollback.
With [proxy], clients connect to vsup: it holds their requests while no server is proven ready,
replays those that got nothing when a server dies, and can off-load an idle model.
"""

EPILOG = """\
exit codes: 0 ok, 1 operation failed, 2 usage or config error, 3 daemon unreachable or forbidden
config: --config PATH, else $VSUP_CONFIG, else /etc/vsup/vsup.toml
examples:
  vsup run --config deploy/vsup.toml      run the daemon in the foreground
  vsup status                             state, model, pid, restarts
  vsup reload tiny-b                      swap models (drain, stop, cleanup, start, ready)
  vsup unload                             off-load now; with [proxy] the next request loads it again
  vsup cleanup --foreign --dry-run        show orphaned vLLM debris on this machine
  vsup diagnose /var/log/vsup/vllm.log    explain a vLLM log offline
  vsup diagnose /var/lib/vsup/incidents/X  name the stuck rank of a hang from its incident bundle
  vsup stacks                             where every process of the live server is, right now
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # usage errors exit 2 with one line, as argparse does
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"vsup: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--config", metavar="PATH", help="config file (default: $VSUP_CONFIG, else /etc/vsup/vsup.toml)"
    )
    p = _Parser(
        prog="vsup",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"vsup {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name: str, help: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common], **kw)

    r = add("run", "run the daemon in the foreground (systemd's ExecStart)")
    r.add_argument(
        "--no-autostart", action="store_true", help="do not start the model at launch; wait for `vsup start`"
    )
    c = add("check-config", "validate a config file and exit (2 on the first problem)")
    c.add_argument("path", nargs="?", help="config file (default: as for --config)")
    c.add_argument("--explain", action="store_true", help="also print every key with default and meaning")
    s = add("status", "show the daemon's state, model, API server pid and restarts")
    s.add_argument("--json", action="store_true", help="one JSON object")
    for name, help in (
        ("start", "start the configured model (after stop or failed)"),
        ("stop", "stop the model and clean up; the daemon stays up in `stopped`"),
        ("restart", "stop and start the current model (drain first)"),
        (
            "unload",
            "off-load the model now: drain, stop, clean, GPU memory freed; with [proxy] the next "
            "request loads it again",
        ),
    ):
        x = add(name, help)
        x.add_argument("--json", action="store_true", help="print the final reply as JSON")
    rl = add("reload", "swap to another model: drain, stop, cleanup, start, ready; roll back on failure")
    rl.add_argument("model", nargs="?", help="a [models.NAME] from the config, or a model path")
    rl.add_argument(
        "--current",
        action="store_true",
        help="re-read the config file and reload the current model (systemctl reload)",
    )
    rl.add_argument("--json", action="store_true", help="progress and result as JSON lines")
    cl = add("cleanup", "remove orphaned vLLM processes, /dev/shm segments, semaphores and /tmp files")
    cl.add_argument("--dry-run", action="store_true", help="report what would be removed, touch nothing")
    cl.add_argument("--foreign", action="store_true", help="also orphans of vLLM servers vsup did not start")
    cl.add_argument("--all-users", action="store_true", help="(root only) also other users' orphans")
    cl.add_argument("--json", action="store_true", help="one JSON object")
    e = add("events", "show recent events; --follow streams new ones")
    e.add_argument("-n", type=int, default=20, help="how many recent events (default 20)")
    e.add_argument("--follow", "-f", action="store_true", help="keep streaming")
    d = add("diagnose", "explain a vLLM log: verdict, findings, root cause, advice (prompts redacted)")
    d.add_argument(
        "logfile",
        nargs="?",
        help="a vLLM log file, or an incident bundle directory (names the stuck rank from its stacks); "
        "default: ask the daemon about its log",
    )
    d.add_argument("--json", action="store_true", help="one JSON object")
    st = add("stacks", "Python stacks and process facts of every process of the live server (read-only)")
    st.add_argument("--json", action="store_true", help="one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.cmd](args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


# ---- config ------------------------------------------------------------------------------------


def _load(
    args: argparse.Namespace, path: str | None = None, *, check_python: bool = True
) -> config_mod.Config:
    try:
        return config_mod.load(path or args.config, check_python=check_python)
    except config_mod.ConfigError as e:
        print(f"vsup: config error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    if args.explain and not (args.path or args.config):
        # The first thing a new operator runs, before any config exists: explain needs none.
        print(config_mod.explain())
        return EXIT_OK
    cfg = _load(args, args.path)
    print(f"{cfg.path}: ok (model {cfg.vllm.model}, port {cfg.vllm.port}, {len(cfg.models)} named models)")
    for w in config_mod.warnings(cfg):
        print(f"vsup: warning: {w}", file=sys.stderr)
    if args.explain:
        print(config_mod.explain())
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    import faulthandler

    faulthandler.enable()  # systemd's watchdog SIGABRT then leaves the Python stacks in the journal
    from . import daemon

    try:
        return daemon.main(cfg, autostart=not args.no_autostart)
    except Exception as e:  # the daemon's own failures at start-up: one line, not a traceback
        from .control import ControlSocketError as SocketInUse

        if isinstance(e, (SocketInUse, PermissionError, FileNotFoundError)):
            print(f"vsup: cannot start: {e}", file=sys.stderr)
            return EXIT_FAILED
        raise


# ---- talking to the daemon ---------------------------------------------------------------------


def _call(
    cfg: config_mod.Config,
    cmd: str,
    cmd_args: dict[str, Any] | None = None,
    *,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    timeout_s: float | None = 30.0,
) -> dict[str, Any]:
    from .control import ControlClient, DaemonUnreachable

    try:
        return ControlClient(cfg.socket, timeout_s=timeout_s).call(
            cmd, cmd_args or {}, on_progress=on_progress, on_event=on_event
        )
    except DaemonUnreachable as e:
        print(f"vsup: {e}", file=sys.stderr)
        raise SystemExit(EXIT_UNREACHABLE) from None


def _finish(reply: dict[str, Any], as_json: bool, ok_text: Callable[[Any], str]) -> int:
    if as_json:
        print(json.dumps(reply))
    if reply.get("ok"):
        if not as_json:
            print(ok_text(reply.get("result")))
        return EXIT_OK
    err = reply.get("error") or {}
    if not as_json:
        print(f"vsup: {err.get('code')}: {err.get('message')}", file=sys.stderr)
    return EXIT_UNREACHABLE if err.get("code") == "forbidden" else EXIT_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _load(args, check_python=False)
    reply = _call(cfg, "status")
    if args.json:
        print(json.dumps(reply.get("result") if reply.get("ok") else reply))
        return EXIT_OK if reply.get("ok") else _finish(reply, False, str)
    if not reply.get("ok"):
        return _finish(reply, False, str)
    print(render_status(reply["result"]))
    return EXIT_OK


def render_status(s: dict[str, Any]) -> str:
    lines = [
        f"state:     {s['state']}" + (f" ({s['phase']})" if s.get("phase") else ""),
        f"model:     {s.get('model') or '-'}",
        f"pid:       {s.get('pid') or '-'}" + (f"  ({s.get('workers')} workers)" if s.get("workers") else ""),
        f"restarts:  {s.get('restarts', 0)}",
        f"since:     {s.get('since')}",
    ]
    if s.get("reason"):
        lines.append(f"reason:    {s['reason']}")
    if s.get("operation"):
        lines.append(f"operation: {s['operation']}")
    if s.get("remedies"):
        lines.append(f"remedies:  {', '.join(s['remedies'])}")
    if s.get("last_detection"):
        d = s["last_detection"]
        lines.append(f"detected:  {d.get('kind')} via {d.get('source')} at {d.get('at')}: {d.get('message')}")
    t = s.get("traffic")
    if t:  # the proxy's view (issue 15)
        oldest = f" (oldest {t['oldest_held_s']:.1f}s)" if t.get("oldest_held_s") is not None else ""
        lines.append(
            f"requests:  {t.get('in_flight', 0)} in flight, {t.get('held', 0)} held{oldest}; "
            f"{t.get('replays', 0)} replayed, {t.get('failed', 0)} failed, "
            f"{t.get('rejected', 0)} refused (proxy on {t.get('listen')})"
        )
    for g in s.get("gpus") or []:
        # Other vsup instances on this host holding memory there (issue 18).
        held = ", ".join(f"{h['instance']!r} ({h['used_mib']} MiB)" for h in g.get("held_by") or [])
        lines.append(
            f"gpu {g.get('index')}:     {g.get('used_mib')}/{g.get('total_mib')} MiB used, "
            f"{g.get('model_mib', 0)} MiB by the model"
            + (", not this instance's (CUDA_VISIBLE_DEVICES)" if g.get("wanted") is False else "")
            + (f"; held by vsup instance {held}" if held else "")
        )
    od = s.get("on_demand") or {}
    if od.get("unloaded_for"):
        lines.append(f"off-load:  off-loaded ({od['unloaded_for']}); the next request loads it")
    if od.get("pending"):
        p = od["pending"]
        lines.append(f"on demand: {p.get('kind')} {p.get('to')} ({p.get('cause')}) since {p.get('since')}")
    if od.get("last"):
        last = od["last"]
        lines.append(
            f"on demand: last {last.get('kind')} ({last.get('cause')}) {last.get('seconds')}s"
            f" at {last.get('at')}; {od.get('unloaded', 0)} off-loads, {od.get('loaded', 0)} loads,"
            f" {od.get('swapped', 0)} swaps"
        )
    if s.get("vllm_version"):
        lines.append(f"vllm:      {s['vllm_version']}")
    return "\n".join(lines)


class _Progress:
    """Live phase + elapsed on a terminal (redrawn twice a second), plain lines otherwise."""

    def __init__(self, label: str, as_json: bool) -> None:
        self.label, self.as_json = label, as_json
        self.tty = sys.stderr.isatty() and not as_json
        self.t0 = time.monotonic()
        self.phase = "waiting"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.tty:
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            self._draw()

    def _draw(self) -> None:
        sys.stderr.write(f"\r\x1b[K{self.label}: {self.phase} ({time.monotonic() - self.t0:5.1f}s)")
        sys.stderr.flush()

    def __call__(self, prog: dict[str, Any]) -> None:
        self.phase = str(prog.get("phase", "?"))
        if self.as_json:
            print(json.dumps({"progress": prog}), flush=True)
        elif self.tty:
            self._draw()
        else:
            print(
                f"{self.label}: {self.phase} (elapsed {prog.get('elapsed_s', 0):.1f}s)",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        self._stop.set()
        if self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _lifecycle(
    args: argparse.Namespace, cmd: str, cmd_args: dict[str, Any] | None = None, label: str | None = None
) -> int:
    cfg = _load(args, check_python=False)
    prog = _Progress(label or cmd, args.json)
    try:
        reply = _call(cfg, cmd, cmd_args, on_progress=prog, timeout_s=None)
    finally:
        prog.close()
    return _finish(reply, args.json, lambda r: _summary(cmd, r))


def _summary(cmd: str, r: Any) -> str:
    if not isinstance(r, dict):
        return f"{cmd}: ok"
    if cmd == "reload" and "model" in r:
        phases = ", ".join(f"{k} at {v:.1f}s" for k, v in (r.get("phases") or {}).items())
        if r.get("overlapped"):  # no phases: the old server served until the switch
            phases = f"overlapped, switched at {r.get('switched_at_s', 0):.1f}s"
        took = f"{r.get('seconds', 0):.1f}s" + (f"; {phases}" if phases else "")
        return f"reload: {r['model']} serves ({took})"
    if cmd == "unload" and r.get("unloaded"):
        return f"unload: {r.get('model')} off-loaded, machine clean ({r.get('seconds', 0):.1f}s)"
    if r.get("note"):
        return f"{cmd}: {r['note']}"
    if "state" in r:
        return f"{cmd}: {r['state']} ({r.get('model')})"
    return f"{cmd}: ok"


def cmd_start(args: argparse.Namespace) -> int:
    return _lifecycle(args, "start")


def cmd_stop(args: argparse.Namespace) -> int:
    return _lifecycle(args, "stop")


def cmd_restart(args: argparse.Namespace) -> int:
    return _lifecycle(args, "restart")


def cmd_unload(args: argparse.Namespace) -> int:
    return _lifecycle(args, "unload")


def cmd_reload(args: argparse.Namespace) -> int:
    if bool(args.model) == bool(args.current):
        print(
            "vsup: error: reload needs a MODEL (configured name or path) or --current, not both",
            file=sys.stderr,
        )
        return EXIT_USAGE
    a: dict[str, Any] = {"current": True} if args.current else {"model": args.model}
    return _lifecycle(args, "reload", a, label=f"reload {args.model or '(current)'}")


def cmd_cleanup(args: argparse.Namespace) -> int:
    if args.all_users and os.geteuid() != 0:
        print("vsup: error: --all-users needs root", file=sys.stderr)
        return EXIT_USAGE
    cfg = _load(args, check_python=False)
    from . import cleanup as cleanup_mod
    from .control import ControlClient, DaemonUnreachable

    a = {"dry_run": args.dry_run, "foreign": args.foreign, "all_users": args.all_users}
    try:
        reply = ControlClient(cfg.socket, timeout_s=None).call("cleanup", a)
    except DaemonUnreachable:
        # No daemon: read the ledger a dead (or stopped) daemon left and act on it directly.
        from . import gpu, proctree

        ledger = proctree.Ledger(cfg.state_dir)
        recs = ledger.load()
        gpus = gpu.Gpus.open()
        before = gpus.snapshot() if gpus is not None else None
        report = cleanup_mod.cleanup(
            recs,
            foreign=args.foreign,
            all_users=args.all_users,
            dry_run=args.dry_run,
            grace_s=cfg.timeouts.cleanup_grace_s,
            progress=None if args.json else (lambda m: print(m, file=sys.stderr)),
        )
        if report.clean and not args.dry_run:
            for r in recs:
                ledger.remove(r.id)
        result = report.to_json()
        freed = (
            None
            if args.dry_run
            else gpu.cleanup_summary(
                gpus, {k["pid"] for k in report.killed}, before, timeout_s=cfg.timeouts.gpu_release_s
            )
        )
        if freed:
            result["gpu"] = freed
    else:
        if not reply.get("ok"):
            return _finish(reply, args.json, str)
        result = reply["result"]
    if args.json:
        print(json.dumps(result))
    else:
        print(render_cleanup(result, args.dry_run))
    return EXIT_OK if not result.get("remaining") else EXIT_FAILED


def render_cleanup(r: dict[str, Any], dry_run: bool) -> str:
    verb = "would " if dry_run else ""
    out = []
    for k in r.get("killed", []):
        out.append(f"{verb}kill     pid {k.get('pid'):>7}  {k.get('name')}")
    for u in r.get("unlinked", []):
        out.append(f"{verb}unlink   {u.get('kind'):<5} {u.get('name')}  ({_mb(u.get('bytes', 0))})")
    for f in r.get("removed_files", []):
        out.append(f"{verb}remove   {f}")
    for s in r.get("skipped", []):
        out.append(f"skip     {s.get('name')}: {s.get('reason')}")
    for x in r.get("remaining", []):
        out.append(f"REMAINS  {x.get('name') or x.get('pid')}: {x.get('reason')}")
    g = r.get("gpu")
    if g:
        out.append(
            f"gpu: freed {sum(g['freed_mib'].values())} MiB"
            + ("" if g["released"] else f"; still held: {g['remaining']}")
        )
    out.append(
        f"{'would free' if dry_run else 'freed'} {_mb(r.get('bytes_freed', 0))}; "
        f"{len(r.get('killed', []))} processes, {len(r.get('unlinked', []))} IPC objects, "
        f"{len(r.get('removed_files', []))} files; {len(r.get('remaining', []))} remaining"
    )
    return "\n".join(out)


def _mb(n: int) -> str:
    return f"{n / 1048576:.1f} MB"


def cmd_events(args: argparse.Namespace) -> int:
    cfg = _load(args, check_python=False)
    if args.n < 0:
        print("vsup: error: -n must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    if not args.follow:
        from .control import ControlClient, DaemonUnreachable

        try:
            reply = ControlClient(cfg.socket).call("events", {"n": args.n})
            evs = reply["result"]["events"] if reply.get("ok") else None
            if evs is None:
                return _finish(reply, False, str)
        except DaemonUnreachable:
            from .events import read_events

            evs = read_events(cfg.state_dir, args.n)
        for ev in evs:
            print(json.dumps(ev))
        return EXIT_OK
    reply = _call(
        cfg,
        "events",
        {"n": args.n, "follow": True},
        on_event=lambda ev: print(json.dumps(ev), flush=True),
        timeout_s=None,
    )
    return _finish(reply, False, str) if not reply.get("ok") else EXIT_OK


def cmd_diagnose(args: argparse.Namespace) -> int:
    from . import diagnose

    if args.logfile and os.path.isdir(args.logfile):
        try:
            b = diagnose.diagnose_bundle(args.logfile)
        except (OSError, ValueError) as e:
            print(f"vsup: cannot read {args.logfile}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
            return EXIT_USAGE
        print(json.dumps(b, ensure_ascii=False) if args.json else diagnose.render_bundle(b))
        return EXIT_OK
    if args.logfile:
        try:
            d = diagnose.diagnose_file(args.logfile)
        except OSError as e:
            print(f"vsup: cannot read {args.logfile}: {e.strerror or e}", file=sys.stderr)
            return EXIT_USAGE
        result = d.to_json()
    else:
        cfg = _load(args, check_python=False)
        reply = _call(cfg, "diagnose")
        if not reply.get("ok"):
            return _finish(reply, False, str)
        result = reply["result"]
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(diagnose.render_text(result))
    return EXIT_OK


def cmd_stacks(args: argparse.Namespace) -> int:
    """Ask the daemon (it knows the tree, and reaps the dumper): `vsup stacks` never signals."""
    from . import diagnose, stacks

    cfg = _load(args, check_python=False)
    reply = _call(cfg, "stacks", timeout_s=cfg.timeouts.stacks_s + 30.0)
    if not reply.get("ok"):
        return _finish(reply, args.json, str)
    result = reply["result"]
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(stacks.render_text(result))
        print()
        print(diagnose.render_stacks(diagnose.analyze_stacks(result).to_json()))
    return EXIT_OK if result.get("mechanism") else EXIT_FAILED


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "check-config": cmd_check_config,
    "status": cmd_status,
    "start": cmd_start,
    "stop": cmd_stop,
    "restart": cmd_restart,
    "reload": cmd_reload,
    "unload": cmd_unload,
    "cleanup": cmd_cleanup,
    "events": cmd_events,
    "diagnose": cmd_diagnose,
    "stacks": cmd_stacks,
}

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
