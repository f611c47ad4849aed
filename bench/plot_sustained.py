#!/usr/bin/env python3
"""Draws the per-second series of bench/sustained.rs: one PNG per CSV.

Usage: plot_sustained.py OUT/batch.csv [OUT/unary.csv ...]
Reads OUT/<scenario>.json beside each CSV (title, aims, marks, verdicts) and
writes OUT/<scenario>.png. Needs matplotlib (`make bench-sustained` installs
a pinned one into target/plotenv).
"""

import csv
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402


def column(rows, name, scale=1.0):
    out = []
    for r in rows:
        v = r.get(name, "")
        out.append(float(v) * scale if v not in ("", None) else math.nan)
    return out


AIM_STYLES = [("tab:red", "--"), ("darkred", "-."), ("tab:pink", ":")]


def aim_lines(ax, meta, panel):
    aims = [a for a in meta.get("aims", []) if a["panel"] == panel]
    for (color, style), aim in zip(AIM_STYLES, aims):
        ax.axhline(aim["value"], color=color, linestyle=style, linewidth=1.3,
                   label=aim["label"])


def thousands(ax):
    ax.yaxis.set_major_formatter(
        matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:.0f}k" if v >= 1000 else f"{v:.0f}"))


def finite(values):
    return [v for v in values if not math.isnan(v)]


def marks(axes, meta):
    for m in meta.get("marks", []):
        for i, ax in enumerate(axes):
            ax.axvline(m["at"], color="tab:gray", linestyle=":", linewidth=1.2,
                       label=m["label"] if i == 0 else None)


def size_panel(ax, sec, rows):
    size = column(rows, "data_dir_bytes", 1 / (1 << 20))
    ax.plot(sec, size, color="tab:brown", label="data dir MiB (left)")
    ax.set_ylabel("data dir MiB")
    ax.set_ylim(0, max(finite(size) + [1.0]) * 1.15)
    ax.grid(True, alpha=0.3)
    rss = ax.twinx()
    mem = column(rows, "rss_kb", 1 / 1024)
    rss.plot(sec, mem, color="tab:olive", label="daemon RSS MiB (right)")
    rss.set_ylabel("RSS MiB")
    rss.set_ylim(0, max(finite(mem) + [1.0]) * 1.3)
    handles = ax.get_legend_handles_labels()
    more = rss.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left", fontsize=8)


def latency_axis(ax, label, plotted):
    ax.set_yscale("log")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
    # Headroom above the highest line for the legend.
    top = max(finite([v for series in plotted for v in series]) + [1.0])
    ax.set_ylim(top=top * 6)
    ax.legend(loc="upper left", fontsize=8, ncol=3)


def plot(path):
    base = os.path.splitext(path)[0]
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    meta = {}
    if os.path.exists(base + ".json"):
        with open(base + ".json") as f:
            meta = json.load(f)
    if not rows:
        print(f"{path}: no rows", file=sys.stderr)
        return 1
    sec = column(rows, "second")
    openloop = "e2e_p99_ms" in rows[0]

    fig, axes = plt.subplots(3, 1, figsize=(12, 10), sharex=True,
                             gridspec_kw={"height_ratios": [3, 3, 2]})
    tput, lat, size = axes

    if openloop:
        tput.plot(sec, column(rows, "msgs"), label="published (acked) per second", color="tab:blue")
        tput.plot(sec, column(rows, "delivered"), label="delivered per second",
                  color="tab:green", linestyle="--")
    else:
        tput.plot(sec, column(rows, "msgs"), label="msgs/s", color="tab:blue")
    msgs = finite(column(rows, "msgs"))
    if msgs:
        mean = sum(msgs) / len(msgs)
        tput.axhline(mean, color="tab:blue", linestyle=":", linewidth=1,
                     label=f"run mean {mean:,.0f}")
    aim_lines(tput, meta, "msgs")
    thousands(tput)
    tput.set_ylabel("messages per second")
    tput.set_ylim(bottom=0)
    tput.grid(True, alpha=0.3)
    tput.legend(loc="lower left", fontsize=8)

    if openloop:
        series = [
            ("e2e_p50_ms", "publish→delivery p50", "tab:green", 1.0, 1.5),
            ("e2e_p99_ms", "publish→delivery p99", "tab:orange", 1.0, 1.5),
            ("e2e_max_ms", "publish→delivery max", "tab:purple", 0.4, 0.8),
            ("p99_ms", "publish call p99", "tab:blue", 0.6, 0.8),
        ]
        panel = "e2e"
    else:
        per = " per call" if meta.get("scenario") == "batch" else ""
        series = [
            ("p50_ms", "p50" + per, "tab:green", 1.0, 1.5),
            ("p99_ms", "p99" + per, "tab:orange", 1.0, 1.5),
            ("p999_ms", "p999" + per, "tab:red", 0.7, 1.5),
            ("max_ms", "max" + per, "tab:purple", 0.4, 0.8),
        ]
        panel = "latency"
    plotted = []
    for name, label, color, alpha, width in series:
        values = column(rows, name)
        plotted.append(values)
        lat.plot(sec, values, label=label, color=color, alpha=alpha, linewidth=width)
    aim_lines(lat, meta, panel)
    latency_axis(lat, "ms per second window (log)", plotted)

    size_panel(size, sec, rows)
    size.set_xlabel("second of the run")
    size.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    marks(axes, meta)
    if meta.get("marks"):
        tput.legend(loc="lower left", fontsize=8)

    title = meta.get("title", os.path.basename(base))
    sub = ", ".join(x for x in (meta.get("started", ""), meta.get("machine", "")) if x)
    fig.suptitle(f"{title}\n{sub}", fontsize=11)
    verdicts = meta.get("verdicts", [])
    if verdicts:
        fig.text(0.01, 0.005, "\n".join(verdicts), fontsize=8, family="monospace",
                 va="bottom", ha="left")
    bottom = 0.01 + 0.016 * len(verdicts)
    fig.tight_layout(rect=(0, bottom, 1, 0.96))
    out = base + ".png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"plot: {out}")
    return 0


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    return max(plot(p) for p in argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
