"""The Markdown report (bench/results/latest.md) and README.md's Performance section, from a run's results."""

from __future__ import annotations

import statistics
from typing import Any

from episode import FAULTS

# The targets; the report states each next to vsup's number, met or not.
HANG_ACT_S = 30.0
HANG_BUSY_S = 10.0  # issue 17: first teardown signal while requests flow
SWAP_RATIO = 1.05
OFFLOAD_RATIO = 1.05
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
    """bench/results/latest.md: every table of the run, raw, with the targets first."""
    out = [f"# vsup benchmark ({res['mode']}{', round 2' if res.get('round') == 2 else ''})", ""]
    out += header(res)
    out += targets_block(res)
    out += setups_block(res)
    out += clients_block(res)
    out += supervisors_block(res)
    out += idle_block(res)
    out += proxy_block(res)
    out += reload_block(res)
    out += swap_block(res)
    out += ondemand_block(res)
    out += hooks_block(res)
    out += aux_block(res)
    if chart:
        out += [
            "## Chart",
            "",
            f"![time to the first success and failed requests per fault and supervisor]({chart})",
            "",
        ]
    return "\n".join(out)


def header(res: dict[str, Any]) -> list[str]:
    m, v = res["machine"], res["versions"]
    cold = cold_start(res)
    lw = sum(w["waited_s"] for w in (res.get("shared") or {}).get("waits", [])) / 60
    mins = res.get("minutes", "?")
    if lw >= 0.1 and isinstance(mins, int | float):
        mins = f"{mins} ({mins - lw:.1f} without the waits for the real-vLLM lock)"
    out = [
        f"- Date: {res['started']} (UTC), {mins} min"
        + (
            ""
            if res.get("complete", True)
            else f"; **an incomplete run**: {res['stopped']}"
            if res.get("stopped")
            else " so far (the run is still going: sections done: "
            + ", ".join(res.get("sections_done", []))
            + ")"
        )
        + f"; machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}",
        "- Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()),
    ]
    for r in res.get("resumed") or []:
        out.append(
            f"- **Run again later**: {', '.join(r['sections'])} at {r['at']}"
            + (f", vsup at commit {r['commit']}" if r.get("commit") else "")
            + (f": {r['note']}" if r.get("note") else "")
            + "; the other sections are the run above's."
        )
    ld = res["load"]
    out.append(
        f"- Load average at start {ld['start']}, at end {ld.get('end', '?')}; other people's vLLM "
        f"processes running beside the benchmark: {ld['foreign_vllm_start']} at start, up to "
        f"{ld['foreign_vllm_max']} (non-zero skews every time below)"
    )
    sh = res.get("shared")
    if sh:
        waits = [w["waited_s"] for w in sh.get("waits", [])]
        busy = [s for s in sh.get("sections", []) if s.get("foreign_vllm")]
        quiet = not sum(waits) and not busy and not ld.get("foreign_vllm_max")
        head = (
            "- **A quiet machine**: no other session's real-vLLM work ran during this run (no wait for "
            "the lock, no other vLLM process seen); the load below is the benchmark's own servers. "
            if quiet
            else "- **A shared machine**: other sessions ran their own tests on the same 2 cores during this run. "
        )
        out.append(
            head + "Each section that runs a real vLLM server (the fault matrix: each fault) took "
            f"`{sh.get('lock') or '(no lock)'}` for its own duration only; it waited {sum(waits):.0f} s in all for it ({len(waits)} "
            f"take{'s' if len(waits) != 1 else ''}, "
            f"longest {max(waits, default=0):.0f} s). Load average per section: "
            + ", ".join(f"{s['section']} {s['load_start']}→{s['load_end']}" for s in sh.get("sections", []))
            + (f"; other vLLM processes seen during {', '.join(s['section'] for s in busy)}" if busy else "")
            + "."
        )
    c = res["config"]
    if res.get("round") == 2:
        out.append(
            f"- Method: a fresh supervisor per episode serving the real TP=2 tiny model "
            f"(`-tp 2 --enforce-eager --max-model-len 256`, bf16, CPU). Four clients each send one "
            f"4-token chat completion every {c['client_interval_s']:g} s to the address clients use "
            f"(vsup's proxy; HAProxy in front of a peer): the official `openai` package at its defaults "
            f"(`max_retries=2`) with its timeout cut from 600 s to {c['client_timeout_s']:g} s, and a "
            f"plain httpx client (no retries, {c['client_timeout_s']:g} s), each non-streaming and "
            f"streaming. *hung* = no answer within {c['hung_s']:g} s. Debris is counted "
            f"{c['debris_after_s']:g} s after the supervisor acted on the old tree; the hang is watched "
            f"{c['hang_watch_s']:g} s. See docs/benchmarks.md."
        )
        out.append(
            "- **Not comparable with earlier tables**: round 1 (2026-11-25) sent one plain request per "
            "second straight to vLLM's port with a 10 s timeout and counted requests from the fault to "
            "the first success; this round's clients use a 60 s timeout, go through each supervisor's "
            "front, and are counted over the whole episode. Round 1's last full run stays in "
            "`bench/results/2026-11-25-1701-full.md`."
        )
    else:
        out.append(
            f"- Method: a client sends one 4-token completion every {c['client_interval_s']:g} s with a "
            f"{c['client_timeout_s']:g} s timeout; the hang is watched {c['hang_watch_s']:g} s."
        )
    if res.get("interrupted"):
        out.append("- **Interrupted**: the tables hold what was measured before the interrupt.")
    if cold is not None:
        src = (
            "bare server, command to first completion"
            if res.get("reload", {}).get("bare", {}).get("cold_start_s")
            else "median of this run's supervisor starts to their first completion"
        )
        out.append(f"- vLLM cold start here ({src}): {cold:.1f} s")
    return out + [""]


def setups_block(res: dict[str, Any]) -> list[str]:
    st = res.get("setups")
    if not st:
        return []
    out = ["## What each supervisor had", ""]
    out += [f"- **{k}**: {v}" for k, v in st.items() if k != "front"]
    if "front" in st:
        out.append(f"- **In front of each peer**: {st['front']}.")
    out.append(
        "- Every supervisor runs the same vLLM command line (`VLLM_CPU_KVCACHE_SPACE=1 "
        "VLLM_CPU_OMP_THREADS_BIND='0|1'`, `--dtype bfloat16 --max-model-len 256 -tp 2 --enforce-eager`), "
        "started by the harness in its own session; peers in their own venvs."
    )
    return out + [""]


def _cell(d: dict[str, Any] | None) -> str:
    if not d:
        return "—"
    slow = "—" if d.get("slowest_ok_s") is None else f"{d['slowest_ok_s']:.1f}"
    cell = f"{d['failed']} / {d['hung']} / {slow}"
    if d.get("waiting"):
        cell += f" (+{d['waiting']} open)"
    return cell


def clients_block(res: dict[str, Any]) -> list[str]:
    eps = [e for e in res.get("episodes", []) if e.get("clients") is not None or e.get("error")]
    if not eps:
        return []
    kinds = list(next((e["clients"] for e in eps if e.get("clients")), {}).keys())
    out = [
        "## Faults: what clients see",
        "",
        "Per client: failed / hung (no answer within 60 s) / slowest successful request (s), over every "
        "request of the episode (from 3 s before the fault to the end of the watch); *+N open*: still "
        "unanswered when the watch ended, sent less than 60 s before.",
        "",
        "| supervisor (clients' front) | fault | first success after the fault (s) | "
        + " | ".join(kinds)
        + " | sent | vsup: longest held request (s) |",
        "| --- | --- | --- | " + " | ".join("---" for _ in kinds) + " | --- | --- |",
    ]
    for e in eps:
        fault = f"{e['fault']}. {FAULTS[e['fault']]}"
        who = f"{e['supervisor']} ({e.get('front') or '?'})"
        if e.get("error"):
            out.append(f"| {who} | {fault} | error: {e['error']} |" + " |" * (len(kinds) + 2))
            continue
        first = _f(e.get("first_ok_s"))
        if e.get("first_ok_s") is not None and e.get("served_by", "").startswith("old"):
            first += " (orphan kept serving)"
        cells = [_cell(e["clients"].get(k)) for k in kinds]
        sent = sum(d["sent"] for d in e["clients"].values())
        held = (
            "—"
            if e["supervisor"] != "vsup"
            else _f(e.get("held_max_s"))
            if e.get("held_max_s")
            else "none held"
        )
        out.append(f"| {who} | {fault} | {first} | " + " | ".join(cells) + f" | {sent} | {held} |")
    fails: dict[str, dict[str, int]] = {}
    for e in eps:
        for k, d in (e.get("clients") or {}).items():
            for why, n in (d.get("failures") or {}).items():
                key = f"{e['supervisor']}, fault {e['fault']}, {k}"
                fails.setdefault(key, {})[why] = fails.setdefault(key, {}).get(why, 0) + n
    if fails:
        out += ["", "What the failed requests got:", ""]
        out += [f"- {k}: " + ", ".join(f"{n}x {w}" for w, n in v.items()) for k, v in fails.items()]
    out.append("")
    out.append(
        "*first success*: from the fault to the answer of the first request sent after it that "
        "succeeded (any client). *longest held*: the longest a request waited in vsup's proxy for a "
        "ready server (its `proxy_release` events), so the wait a client saw instead of an error."
    )
    return out + [""]


def supervisors_block(res: dict[str, Any]) -> list[str]:
    cold = cold_start(res)
    eps = res.get("episodes", [])
    if not eps:
        return []
    r2 = res.get("round") == 2
    out = [
        "## Faults: what each supervisor did and left",
        "",
        "| supervisor | fault | its cold start (s) | acted after (s) | new server after (s) | serves again after (s) | "
        + ("" if r2 else "requests failed / hung | ")
        + "orphan procs | shm segments | semaphores | dist files (+ private TMPDIRs) | ZMQ sockets | next start |",
        "| --- | --- | --- | --- | --- | --- | "
        + ("" if r2 else "--- | ")
        + "--- | --- | --- | --- | --- | --- |",
    ]
    for e in eps:
        fault = f"{e['fault']}. {FAULTS[e['fault']]}"
        if e.get("error"):
            out.append(f"| {e['supervisor']} | {fault} | | error: {e['error']} |" + " |" * (8 if r2 else 9))
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
            if e["fault"] == 3:
                t = e.get("teardown_s")
                acted += _mark(
                    t is not None and t <= HANG_BUSY_S, f"target: teardown within {HANG_BUSY_S:g} s"
                )
            if cold is not None and e["fault"] != 5:
                serve += _mark(
                    e["serve_s"] is not None and e["serve_s"] <= cold + SERVE_MARGIN_S,
                    f"target ≤ {cold + SERVE_MARGIN_S:.0f} s",
                )
            if d is not None or e["acted_s"] is not None:
                cells = (cells[0] + _mark(_clean(d), "target 0"),) + cells[1:]
        reqs = ""
        if not r2:
            req = e.get("requests") or {}
            reqs = f"{req.get('failed', 0)} / {req.get('hung', 0)}"
            if req.get("pending"):
                reqs += f" (+{req['pending']} still waiting)"
            if e.get("inflight"):
                reqs += f"; in-flight: {e['inflight']}"
            reqs += " | "
        elif e.get("inflight"):
            inflight = e["inflight"]
            if inflight == "still hung at the end of the watch" and e.get("serve_s") is not None:
                # runs before 2026-12-02 ended the watch as soon as the server served again,
                # without waiting for this request (released from the hold with ~190 others)
                inflight = (
                    "not answered yet when the watch ended, which this run's harness did as soon as "
                    "the server served again (it now waits for this request's outcome)"
                )
            serve += f"; the request in flight at the hang: {inflight}"
        nxt = e.get("next_start") or "—"
        nxt = "— (no restart)" if nxt == "none" else nxt
        out.append(
            f"| {e['supervisor']} | {fault} | {_f(e.get('cold_start_s'))} | {acted} | {_f(e.get('respawn_s'))} | {serve} | {reqs}"
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
        for e in eps
        for n in e.get("notes", []) + e.get("harness_cleanup", [])
    ]
    if notes:
        out += ["", "Harness notes (what it had to clean after each episode, anything odd):", ""]
        out += [f"- {s}, fault {f}: {n}" for s, f, n in notes]
    return out + [""]


def idle_block(res: dict[str, Any]) -> list[str]:
    idle = res.get("idle") or {}
    if not idle:
        return []
    sd = idle.get("supervisord")
    fr = res.get("idle_front") or {}
    out = [
        "## Idle cost of the supervisor itself",
        "",
        "| supervisor | RSS mean (MB) | RSS max (MB) | CPU (% of a core) | processes | window (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, i in idle.items():
        rss, cpu = f"{i['rss_mb']:.1f}", f"{i['cpu_pct']:.3f}"
        label = name + (" (proxy on)" if name == "vsup" and res.get("round") == 2 else "")
        if name == "vsup":
            if sd:
                rss += _mark(i["rss_mb"] <= sd["rss_mb"], "target ≤ supervisord's")
            cpu += _mark(i["cpu_pct"] < IDLE_CPU_PCT, f"target < {IDLE_CPU_PCT:g} %")
        out.append(f"| {label} | {rss} | {i['rss_max_mb']:.1f} | {cpu} | {i['procs']} | {i['seconds']:.0f} |")
        if name in fr:
            f = fr[name]
            out.append(
                f"| — its HAProxy in front | {f['rss_mb']:.1f} | {f['rss_max_mb']:.1f} | {f['cpu_pct']:.3f} | "
                f"{f['procs']} | {f['seconds']:.0f} |"
            )
            out.append(
                f"| {name} + HAProxy | {i['rss_mb'] + f['rss_mb']:.1f} | | {i['cpu_pct'] + f['cpu_pct']:.3f} | "
                f"{i['procs'] + f['procs']} | |"
            )
    out += [
        "",
        "Measured over the window while each supervisor supervises a ready server and no client "
        "sends requests: the supervisor's own process(es) only, not vLLM (vsup's health, metrics and "
        "canary probes, and its proxy, included; HAProxy's health check every 2 s in its own row).",
        "",
        WHAT_IDLE_BUYS,
        "",
    ]
    return out


WHAT_IDLE_BUYS = (
    "What vsup's bytes and cycles buy, where supervisord and HAProxy together have none of it: "
    "the hang caught at all (a canary completion and `/metrics` reads: HAProxy's `/health` check "
    "and supervisord see a hung server as healthy for ever, see fault 3), requests held and "
    "replayed instead of failed, a truthful `/health`, the tree's ledger and a proven-clean "
    "machine after every stop, off-load and swap on request. The RSS is mostly the Python stack "
    "(interpreter, asyncio, aiohttp, httpx, ssl's libcrypto, structlog, psutil); supervisord is "
    "one small Python process that sleeps in `select` while nothing happens."
)


def proxy_block(res: dict[str, Any]) -> list[str]:
    a = (res.get("aux") or {}).get("proxy")
    if a is None:
        return []
    out = ["## Proxy overhead on one core (bench/bench_proxy.py)", ""]
    if not a.get("present"):
        return out + ["(bench_proxy.py not present in this checkout)", ""]
    out.append(a.get("stdout") or "(no output)")
    if a.get("rc"):
        out.append(f"\n(exit {a['rc']}: {a.get('stderr', '')[-500:]})")
    return out + [""]


def reload_block(res: dict[str, Any]) -> list[str]:
    rl = res.get("reload") or {}
    if not rl:
        return []
    out = ["## Reload vs bare stop + start", ""]
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
    return out + [""]


def swap_block(res: dict[str, Any]) -> list[str]:
    sw = res.get("swap") or {}
    if not sw:
        return []
    out = [
        "## Swap on request vs `vsup reload`",
        "",
        "One vsup with its proxy and `swap_on_request = true` serving tiny-a; each repetition: "
        "`vsup reload tiny-b`, then a streaming request for tiny-b (command to its first token); then "
        "a streaming request for tiny-a, which swaps back (request to its first token).",
        "",
        "| time to the first token on the other model (s) | median (min–max, n) |",
        "| --- | --- |",
        f"| `vsup reload`, then a request | {median_spread(sw.get('reload_s', []))} |",
    ]
    ratio = _ratio(sw.get("swap_s"), sw.get("reload_s"))
    mark = (
        ""
        if ratio is None
        else f" — {ratio:.2f}× reload" + _mark(ratio <= SWAP_RATIO, f"target ≤ {SWAP_RATIO:g}×")
    )
    out.append(
        f"| a request for the other model (swap on request) | {median_spread(sw.get('swap_s', []))}{mark} |"
    )
    sl = [x for x in sw.get("swap_load_s", []) if x == x]
    if sl:
        out.append(f"| — of which vsup's swap (its `swapped` event) | {median_spread(sl)} |")
    return out + [""]


def ondemand_block(res: dict[str, Any]) -> list[str]:
    od = res.get("ondemand") or {}
    if not od:
        return []
    out = [
        "## A request at an off-loaded server vs a bare cold start",
        "",
        "Time to the first streamed token: bare = from the launch, the same request every 0.25 s until "
        "one streams; vsup = from the request sent to the proxy after `idle_unload_s` (5 s) off-loaded "
        "the server (held through the pre-start cleanup, the load and the canary).",
        "",
        "| time to the first token (s) | median (min–max, n) |",
        "| --- | --- |",
        f"| bare vLLM cold start | {median_spread(od.get('bare_s', []))} |",
    ]
    ratio = _ratio(od.get("offloaded_s"), od.get("bare_s"))
    mark = (
        ""
        if ratio is None
        else f" — {ratio:.2f}× bare" + _mark(ratio <= OFFLOAD_RATIO, f"target ≤ {OFFLOAD_RATIO:g}×")
    )
    out.append(f"| request arriving at vsup off-loaded | {median_spread(od.get('offloaded_s', []))}{mark} |")
    ls = [x for x in od.get("load_s", []) if x == x]
    if ls:
        out.append(f"| — of which vsup's load on demand (request to ready) | {median_spread(ls)} |")
    return out + [""]


HOOK_TITLES = {
    "hang": "Hang: teardown and serving again with the new confirmation; false teardowns under saturation",
    "overlap": "Overlapped vs sequential reload",
}


def hooks_block(res: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, h in (res.get("hooks") or {}).items():
        out += [f"## {HOOK_TITLES.get(name, name)} ({h.get('module')})", ""]
        if not h.get("available"):
            out += [f"{h.get('note')}: no row for it in this run.", ""]
            continue
        rows = h.get("rows") or []
        if h.get("doc"):
            out += [h["doc"].split("\n\n")[0].replace("\n", " "), ""]
        if h.get("quick") and res.get("mode") == "full":
            out += [
                "Run with `run(quick=True)` in this full run (its smaller counts), to fit the run's time.",
                "",
            ]
        if not rows:
            out += ["(no rows)", ""]
            continue
        groups: list[tuple[list[str], list[dict[str, Any]]]] = []  # rows with the same keys share a table
        for r in rows:
            keys = list(r)
            if groups and groups[-1][0] == keys:
                groups[-1][1].append(r)
            else:
                groups.append((keys, [r]))
        for keys, rs in groups:
            out.append("| " + " | ".join(keys) + " |")
            out.append("| " + " | ".join("---" for _ in keys) + " |")
            for r in rs:
                out.append("| " + " | ".join(_hook_cell(r.get(k)) for k in keys) + " |")
            out.append("")
    return out


def _hook_cell(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v).replace("|", "/").replace("\n", " ")


def aux_block(res: dict[str, Any]) -> list[str]:
    out: list[str] = []
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
    return out


def _ratio(a: list[float] | None, b: list[float] | None) -> float | None:
    a = [x for x in a or [] if x == x]
    b = [x for x in b or [] if x == x]
    if not a or not b:
        return None
    return statistics.median(a) / statistics.median(b)


def target_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of issues 10, 15, 16, 17 and 19 that this run measured: what, measured, met, why."""
    cold = cold_start(res)
    rows: list[dict[str, Any]] = []

    def add(key: str, target: str, measured: str, met: bool, why: str = "") -> None:
        rows.append({"key": key, "target": target, "measured": measured, "met": met, "why": why})

    vs = [e for e in res.get("episodes", []) if e["supervisor"] == "vsup" and not e.get("error")]
    for e in [e for e in vs if e["fault"] == 3]:
        t = e.get("teardown_s")
        add(
            "hang",
            f"hang while requests flow: teardown within {HANG_BUSY_S:g} s of the fault (issue 17)",
            f"teardown after {_f(t)} s (first detection after {_f(e['acted_s'])} s: {e.get('acted_how', '')})",
            t is not None and t <= HANG_BUSY_S,
            WHY["hang"].format(teardown=_f(t), acted=_f(e["acted_s"]), how=e.get("acted_how", "")),
        )
    acted = [e for e in vs if e.get("debris") is not None]
    if acted:
        dirty = [f"fault {e['fault']}" for e in acted if not _clean(e["debris"])]
        add(
            "debris",
            "every fault: 0 orphans, segments, semaphores, dist files (and ZMQ sockets)",
            "clean after "
            + ", ".join(f"fault {e['fault']}" for e in acted if _clean(e["debris"]))
            + (f"; debris after {', '.join(dirty)}" if dirty else ""),
            not dirty,
            "see the harness notes under the fault table",
        )
    stops = [(e["fault"], _left_by_stop(e)) for e in vs]
    stops = [(f, d) for f, d in stops if d is not None]
    if stops:
        left = [(f, d) for f, d in stops if d]
        add(
            "stop",
            "vsup's own stop (SIGTERM to the daemon) leaves nothing",
            "clean in every episode"
            if not left
            else "; ".join(f"after the fault-{f} episode it left {d}" for f, d in left),
            not left,
            "see the harness notes under the fault table",
        )
    serve = [e for e in vs if e["fault"] != 5]
    if serve and cold is not None:
        lim = cold + SERVE_MARGIN_S
        late = [e for e in serve if e["serve_s"] is None or e["serve_s"] > lim]
        add(
            "serve",
            f"serves again within vLLM's cold start + {SERVE_MARGIN_S:g} s = {lim:.0f} s",
            ", ".join(f"fault {e['fault']}: {_f(e['serve_s'])} s" for e in serve),
            not late,
            " ".join(
                WHY.get(f"serve{e['fault']}", WHY["serve"]).format(
                    fault=e["fault"],
                    serve=_f(e["serve_s"]),
                    own=_f(e.get("cold_start_s")),
                    cold=f"{cold:.1f}",
                    teardown=_f(e.get("teardown_s")),
                )
                for e in late
            ),
        )
    proxied = [e for e in vs if e.get("clients") and e["fault"] != 4]
    if proxied:
        bad = []
        for e in proxied:
            f = sum(d["failed"] for d in e["clients"].values())
            h = sum(d["hung"] for d in e["clients"].values())
            if f or h:
                why = "; ".join(
                    f"{k}: " + ", ".join(f"{n}x {w}" for w, n in (d.get("failures") or {}).items())
                    for k, d in e["clients"].items()
                    if d.get("failures")
                )
                if h:
                    why += ("; " if why else "") + WHY["clients_hung"].format(
                        first=_f(e.get("first_ok_s")),
                        held=_f(e.get("held_max_s")),
                        teardown=_f(e.get("teardown_s")),
                        own=_f(e.get("cold_start_s")),
                    )
                kinds = [w for d in e["clients"].values() for w in (d.get("failures") or {})]
                # fault 5: every failure a 404 = a request for the new model, sent too early
                early = e["fault"] == 5 and bool(kinds) and all("404" in w for w in kinds)
                bad.append((e["fault"], f, h, why, early))
        add(
            "clients",
            "clients at vsup's proxy: 0 failed, 0 hung requests (faults 1, 2, 3, 5; fault 4 kills the proxy with vsup)",
            "; ".join(
                f"fault {e['fault']}: {sum(d['failed'] for d in e['clients'].values())} failed, "
                f"{sum(d['hung'] for d in e['clients'].values())} hung of {sum(d['sent'] for d in e['clients'].values())}"
                for e in proxied
            ),
            not bad,
            " ".join(f"Fault {f}: {n} failed, {h} hung ({why})." for f, n, h, why, _ in bad)
            + (" " + WHY["clients"] if any(n for _, n, _, _, early in bad if not early) else "")
            + (" " + WHY["clients_404"] if any(early for *_, early in bad) else ""),
        )
    idle = res.get("idle", {})
    po = " (proxy on)" if res.get("round") == 2 else ""
    if "vsup" in idle:
        v = idle["vsup"]
        if "supervisord" in idle:
            sd = idle["supervisord"]
            add(
                "idle_rss",
                f"idle RSS{po} ≤ supervisord's",
                f"{v['rss_mb']:.1f} MB vs {sd['rss_mb']:.1f} MB",
                v["rss_mb"] <= sd["rss_mb"],
                WHY["idle_rss"],
            )
        add(
            "idle_cpu",
            f"idle CPU{po} < {IDLE_CPU_PCT:g} % of a core",
            f"{v['cpu_pct']:.3f} %"
            + (f" (supervisord {idle['supervisord']['cpu_pct']:.3f} %)" if "supervisord" in idle else ""),
            v["cpu_pct"] < IDLE_CPU_PCT,
            WHY["idle_cpu"].format(canary=_canary_interval())
            + ("" if "idle_settle_s" in res.get("config", {}) else " " + WHY["idle_cpu_early"]),
        )
    px = _proxy_rows((res.get("aux", {}).get("proxy") or {}).get("stdout", ""))
    why_px = WHY["proxy"]
    noisy = [
        s
        for s in (res.get("shared") or {}).get("sections", [])
        if s["section"] == "proxy" and (s.get("foreign_vllm") or float(s.get("load_start") or 0) > 1.5)
    ]
    if noisy:
        why_px = WHY["proxy_noisy"].format(load=noisy[-1]["load_start"], n=noisy[-1].get("foreign_vllm", 0))
    if px:
        d, p, n = px.get("direct"), px.get("vsup proxy"), px.get("nginx")
        if p and d:
            added = p["p50"] - d["p50"]
            add(
                "proxy_p50",
                "proxy: added p50 latency ≤ 1 ms (one core)",
                f"+{added:.3f} ms (nginx +{n['p50'] - d['p50']:.3f} ms)" if n else f"+{added:.3f} ms",
                added <= 1.0,
                why_px,
            )
            add(
                "proxy_rps",
                "proxy: ≥ 2,000 requests/s on one core",
                f"{p['rps']:,.0f}/s" + (f" (nginx {n['rps']:,.0f}/s)" if n else ""),
                p["rps"] >= 2000,
                why_px,
            )
            add(
                "proxy_sse",
                "proxy: ≥ 50,000 SSE chunks/s on one core",
                f"{p['sse']:,.0f}/s" + (f" (nginx {n['sse']:,.0f}/s)" if n else ""),
                p["sse"] >= 50000,
                why_px,
            )
        idle_px = _proxy_idle((res.get("aux", {}).get("proxy") or {}).get("stdout", ""))
        if idle_px is not None:
            add(
                "proxy_idle",
                "proxy alone idle ≤ 0.05 % of a core",
                f"{idle_px:.3f} %",
                idle_px <= 0.05,
                WHY["proxy"],
            )
    rl = res.get("reload") or {}
    bare = [c["total"] for c in rl.get("bare", {}).get("cycles", [])]
    vr = [c["total"] for c in rl.get("vsup", {}).get("cycles", [])]
    if bare and vr:
        r = statistics.median(vr) / statistics.median(bare)
        add(
            "reload",
            f"reload ≤ {RELOAD_RATIO:g}× bare stop + start",
            f"{statistics.median(vr):.1f} s vs {statistics.median(bare):.1f} s = {r:.2f}× (n={len(vr)})",
            r <= RELOAD_RATIO,
            WHY["reload"],
        )
    sw = res.get("swap") or {}
    r = _ratio(sw.get("swap_s"), sw.get("reload_s"))
    if r is not None:
        add(
            "swap",
            f"swap on request ≤ {SWAP_RATIO:g}× `vsup reload` (first token on the other model)",
            f"{statistics.median(sw['swap_s']):.1f} s vs {statistics.median(sw['reload_s']):.1f} s = {r:.2f}× "
            f"(n={len(sw['swap_s'])})",
            r <= SWAP_RATIO,
            WHY["swap"],
        )
    od = res.get("ondemand") or {}
    r = _ratio(od.get("offloaded_s"), od.get("bare_s"))
    if r is not None:
        add(
            "offload",
            f"first token after an idle off-load ≤ {OFFLOAD_RATIO:g}× a bare cold start",
            f"{statistics.median(od['offloaded_s']):.1f} s vs {statistics.median(od['bare_s']):.1f} s = {r:.2f}× "
            f"(n={len(od['offloaded_s'])})",
            r <= OFFLOAD_RATIO,
            WHY["offload"],
        )
    hang = (res.get("hooks") or {}).get("hang") or {}
    for row in hang.get("rows") or []:
        if row.get("goal_s") is not None and "teardown_s" in row:
            t, g = row.get("teardown_s"), row["goal_s"]
            add(
                "hang_bench",
                f"{row.get('scenario')}: teardown within {g:g} s (issue 17)",
                f"teardown after {_f(t)} s (detected after {_f(row.get('detected_s'))} s by "
                f"{row.get('detected_by')}), serving again after {_f(row.get('serves_again_s'))} s",
                t is not None and t <= g,
                WHY["hang_bench"].format(reason=row.get("reason")),
            )
        elif "false_teardowns" in row:
            add(
                "saturation",
                f"no teardown of a saturated, progressing server ({row.get('seconds')} s; issue 17)",
                f"{row['false_teardowns']} teardowns; unhealthy {row.get('unhealthy_s')} s in all "
                f"(longest {row.get('longest_unhealthy_s')} s); {row.get('completions')} completions, "
                f"{row.get('failed')} failed",
                row["false_teardowns"] == 0,
                WHY["saturation"],
            )
        elif row.get("goal_pct") is not None and "cpu_pct" in row:
            add(
                "hang_idle",
                f"vsup idle CPU < {row['goal_pct']:g} % of a core, proxy on (bench_hang.py, its own window)",
                f"{row['cpu_pct']:.3f} % over {row.get('seconds')} s",
                row["cpu_pct"] < row["goal_pct"],
                WHY["idle_cpu"].format(canary=_canary_interval()),
            )
    ov = (res.get("hooks") or {}).get("overlap") or {}
    seq = [r for r in ov.get("rows") or [] if r.get("mode") == "sequential"]
    for row in [r for r in ov.get("rows") or [] if r.get("mode") == "overlapped"]:
        w = row.get("worst_wait_s")
        add(
            "overlap",
            "overlapped reload: 0 failed requests, the slowest under 5 s (issue 23)",
            f"{row.get('failed')} failed of {row.get('requests')}, slowest {_f(w)} s, reload {_f(row.get('reload_s'))} s"
            + ("" if row.get("overlapped") else f"; did not overlap: {row.get('fallback')}")
            + (
                f" (sequential: {seq[0].get('failed')} failed, slowest {_f(seq[0].get('worst_wait_s'))} s)"
                if seq
                else ""
            ),
            bool(row.get("overlapped")) and row.get("failed") == 0 and w is not None and w < 5,
            WHY["overlap"],
        )
    for name, h in (res.get("hooks") or {}).items():
        for row in h.get("rows") or []:
            if "target" in row and "met" in row:
                add(
                    name,
                    str(row["target"]),
                    str(row.get("measured", "")),
                    bool(row["met"]),
                    str(row.get("why") or f"see the {name} table"),
                )
    rate = _parse_rate((res.get("aux", {}).get("parse") or {}).get("stdout", ""))
    if rate is not None:
        add(
            "parse",
            f"log parsing ≥ {PARSE_LINES_S:,} lines/s",
            f"{rate:,.0f} lines/s",
            rate >= PARSE_LINES_S,
            "",
        )
    return rows


def targets_block(res: dict[str, Any]) -> list[str]:
    rows = target_rows(res)
    if not rows:
        return []
    out = ["## Targets (vsup)", "", "| target | measured | met |", "| --- | --- | --- |"]
    out += [f"| {r['target']} | {r['measured']} | {_yes(r['met'])} |" for r in rows]
    missed = [r for r in rows if not r["met"]]
    if missed:
        out += ["", "Where vsup misses a target, why:", ""]
        whys: dict[str, list[str]] = {}  # targets missed for the same reason share a line
        for r in missed:
            whys.setdefault(r["why"] or "not analysed in this run", []).append(r["target"])
        out += [f"- **{'; '.join(ts)}**: {why}" for why, ts in whys.items()]
    return out + [""]


def readme_section(res: dict[str, Any]) -> str:
    """README.md's Performance section, from one run's results (bench/run.py --readme)."""
    out = [
        "## Performance",
        "",
        "`make bench` runs every section below in one run (~45-60 min on 2 cores) and writes each "
        "section's results as it completes; `make bench-quick` (tiny counts) is for trying the "
        "harness. Method and caveats: `docs/benchmarks.md`. Raw tables of the last run, with the "
        "harness's notes: `bench/results/latest.md`; this section is generated from it "
        "(`.venv/bin/python bench/run.py --readme`).",
        "",
    ]
    out += header(res)
    body = targets_block(res) + setups_block(res) + clients_block(res)
    sb = supervisors_block(res)
    cut = next((i for i, line in enumerate(sb) if line.startswith("Harness notes")), len(sb))
    body += sb[:cut] + ([""] if cut < len(sb) else [])  # the harness notes stay in latest.md
    for block in (idle_block, proxy_block, reload_block, swap_block, ondemand_block, hooks_block):
        body += block(res)
    out += ["#" + line if line.startswith("## ") else line for line in body]
    if (res.get("aux") or {}).get("parse") or (res.get("aux") or {}).get("cleanup"):
        out += [
            "Log parsing (bench_parse.py) and `vsup cleanup` times (bench_cleanup.py): their tables are in "
            "`bench/results/latest.md`.",
            "",
        ]
    out += [
        "![time to the first success and failed requests per fault and supervisor](bench/results/latest.png)",
        "",
    ]
    return "\n".join(_wrap(out))


def _wrap(lines: list[str], width: int = 100) -> list[str]:
    """Prose and bullets wrapped as the rest of the README is; tables, headings, images as they are."""
    import textwrap

    out = []
    for line in lines:
        if not line or line.startswith(("|", "#", "!")) or len(line) <= width:
            out.append(line)
        elif line.startswith("- "):
            out += textwrap.wrap(
                line, width, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False
            )
        else:
            out += textwrap.wrap(line, width, break_on_hyphens=False, break_long_words=False)
    return out


def _canary_interval() -> str:
    """vsup's default canary interval (the report runs where vsup is installed)."""
    try:
        from vsup.config import ProbesConfig

        return f"{ProbesConfig().canary_interval_s:g}"
    except Exception:  # noqa: BLE001 - an older or missing vsup: say so rather than fail the report
        return "?"


def _proxy_rows(text: str) -> dict[str, dict[str, float]]:
    """bench_proxy.py's table: path -> p50 (ms), requests/s, SSE chunks/s."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 7 or cells[0] in ("path", "---"):
            continue
        name = cells[0].replace(" (errors)", "")
        try:
            out[name] = {
                "p50": float(cells[1]),
                "rps": float(cells[4].replace(",", "")),
                "sse": float(cells[5].replace(",", "")),
            }
        except ValueError:
            continue
    return out


def _proxy_idle(text: str) -> float | None:
    import re

    m = re.search(r"vsup proxy idle: ([\d.]+) %", text)
    return float(m.group(1)) if m else None


# Why a target was missed, for the causes known from this project's measurements; the report
# fills in the run's own numbers. Re-read them against each run's tables before publishing.
WHY = {
    "hang": (
        "first detection after {acted} s ({how}), teardown after {teardown} s: in between vsup proves "
        "the hang (issue 17: stack samples of the tree showing a rank stuck at the same frame, or a "
        "second strike where stacks cannot be read) and records every process's stacks for the "
        "incident; on the shared 2 cores each of these steps runs slower than on a quiet machine"
    ),
    "serve": (
        "fault {fault}: {serve} s, with this episode's own cold start at {own} s against the bare "
        "reference {cold} s: a restart is a full vLLM cold start, and on the shared 2 cores its time varies by more than the 5 s margin."
    ),
    "serve3": (
        "fault 3 (hang): {serve} s = the hang's confirmation and teardown ({teardown} s) plus a full cold start "
        "(this episode's own: {own} s); the peers never serve again at all."
    ),
    "serve4": (
        "fault 4 (vsup SIGKILLed): {serve} s: the restarted vsup removes the unsupervised old tree "
        "before it starts its own (two servers must never share the port or the GPUs), so clients see a "
        "full cold start; the peers' orphan keeps serving, unsupervised, beside its leaked segments, "
        "while their own new server cannot bind the port."
    ),
    "clients": (
        "The proxy holds what arrives while no server is proven and replays a request whose client got "
        "nothing; what it cannot save is a request that had already received bytes when its server died "
        "(a stream cut mid-way ends with an error event) and a non-streaming request whose replay also failed."
    ),
    "clients_404": (
        "Fault 5's 404s are vLLM's own answer for a model its server does not serve: the clients ask "
        "for tiny-b from the moment the swap is ordered, and the request each sent before vsup's "
        "reload began (the `vsup reload` CLI starting and reaching the socket) went to the server "
        "still serving tiny-a. The proxy routes by vsup's state, not by the request's model, unless "
        "`swap_on_request` is on (then such a request is held and causes the swap); supervisord's "
        "clients got the same 404 besides their 503s."
    ),
    "clients_hung": (
        "the hung requests were not lost: those sent before vsup saw the fault sat on the dead or hung "
        "server until its teardown (after {teardown} s) and were replayed, later ones were held; all "
        "waited for the new server's cold start ({own} s for this episode's first one): first success "
        "after {first} s, longest hold in the proxy {held} s, so the earliest waited more than the "
        "clients' 60 s"
    ),
    "idle_rss": (
        "the Python stack the job needs (interpreter, asyncio, aiohttp for the proxy, httpx, ssl's "
        "libcrypto, structlog, watchdog, psutil, vsup's modules); supervisord is one small Python "
        "process, and its setup adds HAProxy's own RSS (in the idle table). Round 1 measured vsup at "
        "39.9 MB without the proxy; the proxy's aiohttp server comes on top. Not solved."
    ),
    "idle_cpu": (
        "the price of the probe that catches a silent hang at idle: a canary completion every "
        "`probes.canary_interval_s` ({canary} s by default, so that a hang is torn down within 15 s, "
        "issue 17), skipped while real requests prove the engine; supervisord does nothing while idle "
        "and therefore never notices a hang (fault 3), and HAProxy's own `/health` check, which "
        "costs cycles too, still answers 200 for a hung server. A longer interval trades CPU for "
        "detection time."
    ),
    "idle_cpu_early": (
        "This run began the window 3 s after ready, inside the 20 s in which vsup's refresher looks "
        "at the forming tree every 2 s (about 6 ms a look); bench_hang.py, which waits them out, "
        "measured 0.067 % of a core. The harness now begins it 25 s after ready, for every "
        "supervisor (episode.IDLE_SETTLE_S)."
    ),
    "proxy": (
        "vsup's proxy is Python (aiohttp, one event loop shared with the supervisor), nginx is C; "
        "the overhead stays far below one 4-token completion here (tens of ms)."
    ),
    "proxy_noisy": (
        "measured while other people's real vLLM servers ran on the same 2 cores (load average {load} "
        "at the section's start, {n} other vLLM processes): the direct path itself fell far below its "
        "quiet-machine numbers, so these rows say nothing about the proxy; run the section again on a "
        "quiet machine (`bench/run.py --resume bench/results/latest.json --sections proxy`)"
    ),
    "reload": (
        "a reload drains the requests in flight and proves the machine clean (tree gone, segments and "
        "port free) before the start; the bare cycle's SIGTERM-and-start skips both and leaves debris"
    ),
    "swap": (
        "a swap is a reload started by a held request: the same drain, proven-clean stop and start; "
        "with n=2 on a shared machine the difference is within the noise of two cold starts"
    ),
    "hang_bench": (
        "the teardown waits for the hang's proof ({reason}); see the hang table for each signal's time"
    ),
    "saturation": (
        "a saturated engine answers the canary late; see the hang table for what vsup saw and when"
    ),
    "overlap": (
        "see the overlap table: the second tree loads beside the first on the same 2 cores, and the "
        "first one's answers slow down while it does"
    ),
    "offload": (
        "the held request waits for the pre-start cleanup's proof and the canary before it goes "
        "out; with n=2 on a shared machine the difference is within the noise of two cold starts"
    ),
}


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
