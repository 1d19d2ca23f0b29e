"""Chart per fault and supervisor (run in the bench tools venv: matplotlib).

    python bench/chart.py bench/results/latest.json bench/results/latest.png

Top: seconds from the fault to the first successful request (round 2: the first success among
requests sent after the fault, at the clients' front; round 1: "serves again"); "never" is a
hatched bar up to the watch window; the dashed line is vLLM's cold start + 5 s. Bottom (round 2):
the requests that failed or hung, all four clients together.
"""

from __future__ import annotations

import json
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SHORT = {
    1: "1 SIGKILL\nAPI server",
    2: "2 SIGKILL\nworker",
    3: "3 SIGSTOP worker\n(hang)",
    4: "4 SIGKILL\nsupervisor",
    5: "5 model\nswap",
}
COLORS = {"vsup": "#1f77b4", "supervisord": "#ff7f0e", "circus": "#2ca02c", "bash-loop": "#7f7f7f"}


def _first(e: dict) -> float | None:
    return e.get("first_ok_s") if e.get("clients") is not None else e.get("serve_s")


def main(src: str, dst: str) -> None:
    with open(src) as fh:
        res = json.load(fh)
    eps = [e for e in res["episodes"] if not e.get("error")]
    if not eps:
        fig, ax = plt.subplots(figsize=(6, 1.5), dpi=110)
        ax.axis("off")
        ax.text(0.5, 0.5, "no fault episode measured yet in this run", ha="center", va="center")
        fig.savefig(dst)
        return
    r2 = any(e.get("clients") is not None for e in eps)
    faults = sorted({e["fault"] for e in eps})
    sups = [s for s in COLORS if any(e["supervisor"] == s for e in eps)]
    fig, axes = plt.subplots(
        2 if r2 else 1,
        1,
        figsize=(max(6, 1.9 * len(faults) + 2), 7.6 if r2 else 4.6),
        dpi=110,
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 2]} if r2 else None,
    )
    ax = axes[0][0]
    width = 0.8 / max(1, len(sups))
    top = 1.0
    never_watch = 0.0
    for i, s in enumerate(sups):
        for j, f in enumerate(faults):
            es = [e for e in eps if e["supervisor"] == s and e["fault"] == f]
            if not es:
                continue
            vals = [v for e in es if (v := _first(e)) is not None]
            x = j - 0.4 + width * (i + 0.5)
            if vals:
                y = statistics.median(vals)
                ax.bar(x, y, width, color=COLORS[s], label=s if j == 0 else None)
                note = (
                    "orphan\nserved"
                    if any(e.get("served_by", "").startswith("old") for e in es)
                    else f"{y:.0f}"
                )
                d = [e.get("debris") or {} for e in es]
                if any(x.get("procs") or x.get("shm") for x in d):
                    note += "\n+debris"
                ax.text(x, y, note, ha="center", va="bottom", fontsize=6.5)
                top = max(top, y)
            else:
                y = max(e["watch_s"] for e in es)
                ax.bar(
                    x, y, width, color="white", edgecolor=COLORS[s], hatch="//", label=s if j == 0 else None
                )
                ax.text(x, y, "never", ha="center", va="bottom", fontsize=6.5, color=COLORS[s])
                never_watch = max(never_watch, y)
                top = max(top, y)
    cold = res.get("reload", {}).get("bare", {}).get("cold_start_s") or [
        e["cold_start_s"] for e in eps if e.get("cold_start_s")
    ]
    if cold:
        target = statistics.median(cold) + 5
        top = max(top, target)
        ax.axhline(target, ls="--", lw=1, color="black", label=f"vLLM cold start + 5 s = {target:.0f} s")
    if never_watch:
        ax.bar(
            [0],
            [0],
            width=0,
            color="white",
            edgecolor="black",
            hatch="//",
            label=f"hatched: no success again (watched {never_watch:.0f} s)",
        )
    ax.set_xticks(range(len(faults)), [SHORT[f] for f in faults], fontsize=8)
    ax.set_ylabel("s from fault to first success" if r2 else "s from fault to first successful completion")
    ax.set_ylim(0, top * 1.22)
    front = " (vsup: its proxy; peers: HAProxy)" if r2 else ""
    ax.set_title(
        f"After a fault{front}, {res['mode']} run {res['started'][:10]}, {res['machine']['cores']} cores",
        fontsize=10,
    )
    ax.legend(fontsize=7, loc="upper left")
    if r2:
        bx = axes[1][0]
        btop = 1.0
        for i, s in enumerate(sups):
            for j, f in enumerate(faults):
                es = [e for e in eps if e["supervisor"] == s and e["fault"] == f and e.get("clients")]
                if not es:
                    continue
                failed = statistics.median([sum(d["failed"] for d in e["clients"].values()) for e in es])
                hung = statistics.median([sum(d["hung"] for d in e["clients"].values()) for e in es])
                x = j - 0.4 + width * (i + 0.5)
                bx.bar(x, failed, width, color=COLORS[s])
                bx.bar(x, hung, width, bottom=failed, color="white", edgecolor=COLORS[s], hatch="xx")
                bx.text(x, failed + hung, f"{failed:.0f}/{hung:.0f}", ha="center", va="bottom", fontsize=6.5)
                btop = max(btop, failed + hung)
        bx.bar(
            [0], [0], width=0, color="white", edgecolor="black", hatch="xx", label="hung (no answer in 60 s)"
        )
        bx.bar([0], [0], width=0, color="grey", label="failed")
        bx.set_xticks(range(len(faults)), [SHORT[f] for f in faults], fontsize=8)
        bx.set_ylabel("requests failed / hung\n(4 clients, 1 request/s each)")
        bx.set_ylim(0, btop * 1.25)
        bx.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
