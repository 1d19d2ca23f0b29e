"""Chart of time-to-serve-again per fault and supervisor (run in the bench tools venv: matplotlib).

    python bench/chart.py bench/results/latest.json bench/results/latest.png

"never" is drawn as a hatched bar up to the watch window, labelled; the dashed line is vLLM's
cold start + 5 s, the target.
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


def main(src: str, dst: str) -> None:
    with open(src) as fh:
        res = json.load(fh)
    eps = [e for e in res["episodes"] if not e.get("error")]
    faults = sorted({e["fault"] for e in eps})
    sups = [s for s in COLORS if any(e["supervisor"] == s for e in eps)]
    fig, ax = plt.subplots(figsize=(max(6, 1.9 * len(faults) + 2), 4.6), dpi=110)
    width = 0.8 / max(1, len(sups))
    top = 1.0
    never_watch = 0.0
    for i, s in enumerate(sups):
        for j, f in enumerate(faults):
            es = [e for e in eps if e["supervisor"] == s and e["fault"] == f]
            if not es:
                continue
            vals = [e["serve_s"] for e in es if e["serve_s"] is not None]
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
        ax.axhline(target, ls="--", lw=1, color="black", label=f"target: cold start + 5 s = {target:.0f} s")
    if never_watch:
        ax.bar(
            [0],
            [0],
            width=0,
            color="white",
            edgecolor="black",
            hatch="//",
            label=f"hatched: never served again (watched {never_watch:.0f} s)",
        )
    ax.set_xticks(range(len(faults)), [SHORT[f] for f in faults], fontsize=8)
    ax.set_ylabel("seconds from fault to first successful completion")
    ax.set_ylim(0, top * 1.18)
    ax.set_title(
        f"Time to serve again after a fault ({res['mode']} run, {res['started'][:10]}, "
        f"{res['machine']['cores']} cores)",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
