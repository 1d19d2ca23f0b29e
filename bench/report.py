"""The Markdown report: fault matrix, targets, idle cost, reload, and the teammates' tables."""

from __future__ import annotations

import statistics
from typing import Any

from episode import FAULTS

# The targets; the report states each next to vsup's number, met or not.
HANG_ACT_S = 30.0
SERVE_MARGIN_S = 5.0
IDLE_CPU_PCT = 0.1
RELOAD_RATIO = 1.05
PARSE_LINES_S = 200_000


def _f(v: float | None, unit: str = "") -> str:
    return "never" if v is None else f"{v:.1f}{unit}"


def median_spread(xs: list[float]) -> str:
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.1f} (n=1)"
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}–{max(xs):.1f}, n={len(xs)})"


def cold_start(res: dict[str, Any]) -> float | None:
    """vLLM's own cold start here: the bare server's start times (else the supervisors' first starts)."""
    xs = res.get("reload", {}).get("bare", {}).get("cold_start_s") or [
        e["cold_start_s"] for e in res["episodes"] if e.get("cold_start_s")
    ]
    return statistics.median(xs) if xs else None


def _debris_cells(d: dict[str, Any] | None) -> tuple[str, str, str, str, str]:
    if d is None:
        return ("—",) * 5
    shm = f"{d['shm']} / {d['shm_mb']:.0f} MB" if d["shm"] else "0"
    dist = str(d["dist_files"]) + (f" + {d['tmpdirs']} dir" if d.get("tmpdirs") else "")
    return str(d["procs"]), shm, str(d["sems"]), dist, str(d["sockets"])


def _clean(d: dict[str, Any] | None) -> bool:
    return d is not None and not any(
        d.get(k) for k in ("procs", "shm", "sems", "dist_files", "sockets", "tmpdirs")
    )


def markdown(res: dict[str, Any], chart: str | None = "latest.png") -> str:
    m, v = res["machine"], res["versions"]
    cold = cold_start(res)
    out = [f"# vsup benchmark ({res['mode']})", ""]
    out.append(
        f"- Date: {res['started']} (UTC), {res.get('minutes', '?')} min; "
        f"machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}"
    )
    out.append("- Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()))
    ld = res["load"]
    out.append(
        f"- Load average at start {ld['start']}, at end {ld.get('end', '?')}; other people's vLLM "
        f"processes running beside the benchmark: {ld['foreign_vllm_start']} at start, up to "
        f"{ld['foreign_vllm_max']} (non-zero skews every time below)"
    )
    c = res["config"]
    out.append(
        f"- Method: a fresh supervisor per episode serving the real TP=2 tiny model "
        f"(`-tp 2 --enforce-eager --max-model-len 256`, bf16, CPU); a client sends one 4-token "
        f"completion every {c['client_interval_s']:g} s with a {c['client_timeout_s']:g} s timeout; "
        f"debris is counted {c['debris_after_s']:g} s after the supervisor acted on the old tree; the hang is "
        f"watched {c['hang_watch_s']:g} s. See docs/benchmarks.md."
    )
    if res.get("interrupted"):
        out.append("- **Interrupted**: the tables hold what was measured before the interrupt.")
    if cold is not None:
        out.append(f"- vLLM cold start here (bare server, command to first completion): {cold:.1f} s")
    out.append("")

    out += targets(res, cold)
    out += [
        "## Faults",
        "",
        "| supervisor | fault | its cold start (s) | acted after (s) | new server after (s) | serves again after (s) | "
        "requests failed / hung | orphan procs | shm segments | semaphores | dist files (+ private TMPDIRs) | ZMQ sockets | next start |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in res["episodes"]:
        fault = f"{e['fault']}. {FAULTS[e['fault']]}"
        if e.get("error"):
            out.append(f"| {e['supervisor']} | {fault} | | error: {e['error']} | | | | | | | | | |")
            continue
        acted = _f(e["acted_s"])
        serve = _f(e["serve_s"])
        if e["serve_s"] is not None and e.get("served_by", "").startswith("old"):
            serve += " (orphan kept serving)"
        d = e.get("debris")
        cells = _debris_cells(d)
        if e["supervisor"] == "vsup" and e["acted_s"] is not None and e.get("acted_how"):
            acted += f" ({e['acted_how'].replace('event ', '')})"
            if e.get("teardown_s") is not None and e["teardown_s"] != e["acted_s"]:
                acted += f"; teardown {e['teardown_s']:.1f}"
        if e["supervisor"] == "vsup":
            if e["fault"] == 3:  # "acts" = starts recovery: the teardown of the hung tree
                t = e.get("teardown_s")
                acted += _mark(t is not None and t <= HANG_ACT_S, f"target: recovery within {HANG_ACT_S:g} s")
            if cold is not None and e["fault"] != 5:
                serve += _mark(
                    e["serve_s"] is not None and e["serve_s"] <= cold + SERVE_MARGIN_S,
                    f"target ≤ {cold + SERVE_MARGIN_S:.0f} s",
                )
            if d is not None or e["acted_s"] is not None:
                cells = (cells[0] + _mark(_clean(d), "target 0"),) + cells[1:]
        req = e.get("requests") or {}
        reqs = f"{req.get('failed', 0)} / {req.get('hung', 0)}"
        if req.get("pending"):
            reqs += f" (+{req['pending']} still waiting)"
        if e.get("inflight"):
            reqs += f"; in-flight: {e['inflight']}"
        nxt = e.get("next_start") or "—"
        nxt = "— (no restart)" if nxt == "none" else nxt
        out.append(
            f"| {e['supervisor']} | {fault} | {_f(e.get('cold_start_s'))} | {acted} | {_f(e.get('respawn_s'))} | {serve} | {reqs} | "
            + " | ".join(cells)
            + f" | {nxt} |"
        )
    out.append("")
    out.append(
        "*its cold start*: this episode's supervisor start to its first completion (the noise "
        "of the machine at that moment). *acted*: vsup's first `detection`/`state`/`teardown`/`cleanup` event after the fault "
        "(events.jsonl), and its teardown of the old tree where that came later; for the peers, and for every model swap, a new API-server pid on the port "
        "(process table sampled every 0.25 s; the peers show no earlier sign). *Debris* counts what is "
        "left, 30 s after the supervisor acted on the old tree, of the trees that existed before the fault, attributed by pid/start time, by who mapped "
        "each /dev/shm object (device+inode) and by the dist id in the workers' own log line; `—` when "
        "the supervisor never acted. *serves again*: the first successful completion among requests sent after the supervisor acted "
        "on the old tree. *next start*: whether a server started after the fault got the "
        "port and served, and whether debris of the old tree still existed when it did."
    )
    notes = [
        (e["supervisor"], e["fault"], n)
        for e in res["episodes"]
        for n in e.get("notes", []) + e.get("harness_cleanup", [])
    ]
    if notes:
        out += ["", "Harness notes (what it had to clean after each episode, anything odd):", ""]
        out += [f"- {s}, fault {f}: {n}" for s, f, n in notes]
    out.append("")

    if res.get("idle"):
        vs = res["idle"].get("vsup")
        sd = res["idle"].get("supervisord")
        out += [
            "## Idle cost of the supervisor itself",
            "",
            "| supervisor | RSS mean (MB) | RSS max (MB) | CPU (% of a core) | processes | window (s) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, i in res["idle"].items():
            rss, cpu = f"{i['rss_mb']:.1f}", f"{i['cpu_pct']:.3f}"
            if name == "vsup":
                if sd:
                    rss += _mark(i["rss_mb"] <= sd["rss_mb"], "target ≤ supervisord's")
                cpu += _mark(i["cpu_pct"] < IDLE_CPU_PCT, f"target < {IDLE_CPU_PCT:g} %")
            out.append(
                f"| {name} | {rss} | {i['rss_max_mb']:.1f} | {cpu} | {i['procs']} | {i['seconds']:.0f} |"
            )
        out += [
            "",
            "Measured over the window while each supervisor supervises a ready server and no client "
            "sends requests: the supervisor's own process(es) only, not vLLM (vsup's own health, metrics "
            "and canary probes included).",
            "",
        ]
        del vs

    rl = res.get("reload") or {}
    if rl:
        out += ["## Reload vs bare stop + start", ""]
        bare = [c["total"] for c in rl.get("bare", {}).get("cycles", [])]
        vr = [c["total"] for c in rl.get("vsup", {}).get("cycles", [])]
        out += [
            "| operation | total, command to first completion on the new model (s): median (min–max, n) |",
            "| --- | --- |",
        ]
        out.append(f"| bare vLLM: SIGTERM, wait for the tree to exit, start | {median_spread(bare)} |")
        ratio = ""
        if bare and vr:
            r = statistics.median(vr) / statistics.median(bare)
            ratio = f" — {r:.2f}× bare" + _mark(r <= RELOAD_RATIO, f"target ≤ {RELOAD_RATIO:g}×")
        out.append(f"| `vsup reload` (drain, stop, cleanup, start, ready) | {median_spread(vr)}{ratio} |")
        phases: dict[str, list[float]] = {}
        for c in rl.get("vsup", {}).get("cycles", []):
            for k, x in c.get("phases", {}).items():
                phases.setdefault(k, []).append(x)
        for k, xs in phases.items():
            out.append(f"| — vsup phase `{k}` | {median_spread(xs)} |")
        bstop = [c["stop"] for c in rl.get("bare", {}).get("cycles", [])]
        bstart = [c["start"] for c in rl.get("bare", {}).get("cycles", [])]
        if bstop:
            out.append(f"| — bare stop (SIGTERM until every process is gone) | {median_spread(bstop)} |")
            out.append(f"| — bare start (to first completion) | {median_spread(bstart)} |")
        left = rl.get("bare", {}).get("left_by_stop", [])
        if left:
            out.append("")
            out.append(f"A bare SIGTERM stop left behind, each time: {left[0]} (the harness removed it).")
        for k in ("bare", "vsup"):
            if rl.get(k, {}).get("error"):
                out.append(f"\n{k}: error: {rl[k]['error']}")
        out.append("")

    aux = res.get("aux") or {}
    for key, title in (
        ("parse", "Log parsing (bench/bench_parse.py)"),
        ("cleanup", "`vsup cleanup` time (bench/bench_cleanup.py)"),
    ):
        a = aux.get(key)
        if a is None:
            continue
        out += [f"## {title}", ""]
        if not a.get("present"):
            out += ["(not present in this checkout)", ""]
            continue
        out.append(a.get("stdout") or "(no output)")
        if key == "parse":
            rate = _parse_rate(a.get("stdout", ""))
            if rate is not None:
                out.append("")
                out.append(
                    f"Best rate found in the output: {rate:,.0f} lines/s"
                    + _mark(rate >= PARSE_LINES_S, f"target ≥ {PARSE_LINES_S:,} lines/s")
                )
        if a.get("rc"):
            out.append(f"\n(exit {a['rc']}: {a.get('stderr', '')[-500:]})")
        out.append("")

    if chart:
        out += ["## Time to serve again", "", f"![time to serve again per fault and supervisor]({chart})", ""]
    return "\n".join(out)


def targets(res: dict[str, Any], cold: float | None) -> list[str]:
    """One line per target of issue 10: what vsup measured and whether it met it."""
    rows: list[tuple[str, str, str]] = []
    vs = [e for e in res["episodes"] if e["supervisor"] == "vsup" and not e.get("error")]
    hang = [e for e in vs if e["fault"] == 3]
    if hang:
        t = [e.get("teardown_s") for e in hang]
        ok = all(x is not None and x <= HANG_ACT_S for x in t)
        det = ", ".join(_f(e["acted_s"]) for e in hang)
        rows.append(
            (
                f"hang: recovery starts within {HANG_ACT_S:g} s",
                f"teardown after {', '.join(_f(x) for x in t)} s (first detection after {det} s)",
                _yes(ok),
            )
        )
    acted = [e for e in vs if e.get("debris") is not None]
    if acted:
        dirty = [f"fault {e['fault']}" for e in acted if not _clean(e["debris"])]
        rows.append(
            (
                "every fault: 0 orphans, segments, semaphores, dist files (and ZMQ sockets)",
                "clean after "
                + ", ".join(f"fault {e['fault']}" for e in acted if _clean(e["debris"]))
                + (f"; debris after {', '.join(dirty)}" if dirty else ""),
                _yes(not dirty),
            )
        )
    stops = [(e["fault"], _left_by_stop(e)) for e in vs]
    stops = [(f, d) for f, d in stops if d is not None]
    if stops:
        left = [(f, d) for f, d in stops if d]
        rows.append(
            (
                "vsup's own stop (SIGTERM to the daemon) leaves nothing",
                "clean in every episode"
                if not left
                else "; ".join(f"after the fault-{f} episode it left {d}" for f, d in left)
                + f" ({len(left)} of {len(stops)} episodes)",
                _yes(not left),
            )
        )
    serve = [e for e in vs if e["fault"] != 5]
    if serve and cold is not None:
        lim = cold + SERVE_MARGIN_S
        ok = all(e["serve_s"] is not None and e["serve_s"] <= lim for e in serve)
        rows.append(
            (
                f"serves again within vLLM's cold start + {SERVE_MARGIN_S:g} s = {lim:.0f} s",
                ", ".join(f"fault {e['fault']}: {_f(e['serve_s'])} s" for e in serve),
                _yes(ok),
            )
        )
    idle = res.get("idle", {})
    if "vsup" in idle:
        v = idle["vsup"]
        if "supervisord" in idle:
            rows.append(
                (
                    "idle RSS ≤ supervisord's",
                    f"{v['rss_mb']:.1f} MB vs {idle['supervisord']['rss_mb']:.1f} MB",
                    _yes(v["rss_mb"] <= idle["supervisord"]["rss_mb"]),
                )
            )
        rows.append(
            (
                f"idle CPU < {IDLE_CPU_PCT:g} % of a core",
                f"{v['cpu_pct']:.3f} %",
                _yes(v["cpu_pct"] < IDLE_CPU_PCT),
            )
        )
    rl = res.get("reload") or {}
    bare = [c["total"] for c in rl.get("bare", {}).get("cycles", [])]
    vr = [c["total"] for c in rl.get("vsup", {}).get("cycles", [])]
    if bare and vr:
        r = statistics.median(vr) / statistics.median(bare)
        rows.append(
            (
                f"reload ≤ {RELOAD_RATIO:g}× bare stop + start",
                f"{statistics.median(vr):.1f} s vs {statistics.median(bare):.1f} s = {r:.2f}× (n={len(vr)})",
                _yes(r <= RELOAD_RATIO),
            )
        )
    rate = _parse_rate((res.get("aux", {}).get("parse") or {}).get("stdout", ""))
    if rate is not None:
        rows.append(
            (f"log parsing ≥ {PARSE_LINES_S:,} lines/s", f"{rate:,.0f} lines/s", _yes(rate >= PARSE_LINES_S))
        )
    if not rows:
        return []
    out = ["## Targets (vsup)", "", "| target | measured | met |", "| --- | --- | --- |"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return out + [""]


def _left_by_stop(e: dict[str, Any]) -> str | None:
    """What the supervisor's own final stop left, as text ("" when nothing), None if unknown."""
    d = e.get("left_by_stop")
    if d is None:  # results written before the field existed: read the harness note
        import re

        for n in e.get("harness_cleanup", []):
            mo = re.search(r"removed \d+ object\(s\) left after the supervisor's own stop \((.*)\)", n)
            if mo:
                return (
                    mo.group(1).replace("0 shm 0 MB, ", "").replace("0 sem, ", "").replace(", 0 sockets", "")
                )
        return "" if e.get("harness_cleanup") is not None else None
    parts = [
        f"{d[k]} {k.replace('_', ' ')}"
        for k in ("procs", "shm", "sems", "dist_files", "sockets", "tmpdirs")
        if d.get(k)
    ]
    return ", ".join(parts)


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _mark(ok: bool, target: str) -> str:
    return " ✓" if ok else f" ✗ (misses {target})"


def _parse_rate(text: str) -> float | None:
    """lines/s of the `parse` row in bench_parse.py's Markdown table (the column named lines/s)."""
    col = None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if col is None:
            col = next((i for i, c in enumerate(cells) if "lines/s" in c), None)
            continue
        if cells and cells[0] == "parse" and len(cells) > col:
            try:
                return float(cells[col].replace(",", ""))
            except ValueError:
                return None
    return None
