#!/usr/bin/env python3
"""Plots of a recorded run: `make plots` (every committed run) or one file.

A run is the JSON that `make chaos` (dev/chaos.py --record) or `make loadtest` (loadtest/loadtest.py
--record) wrote: a per-second `series` and, for chaos, the `faults`. The plot shows, over the
seconds of the run:
  1. throughput: events accepted per second, and requests that were not answered 2xx (refused,
     unanswered, timed out) per second;
  2. request latency: p50 and p99 of the answered requests of each second (log scale);
  3. the pipeline behind the ingest: backlog (events answered 202 and not yet in ClickHouse, or the
     consumer's lag in records) and freshness (202 to visible in ClickHouse, the slowest probe of
     each second);
with each fault of a chaos run as a shaded span from its start to its recovery, labelled.

  $(bash dev/tools.sh plot) loadtest/plot.py RUN.json [--out PNG]    (default: RUN.png beside it)
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {"ingest": "#d62728", "consumer": "#9467bd", "archiver": "#8c564b", "kafka": "#ff7f0e",
           "clickhouse": "#1f77b4", "s3": "#7f7f7f", "disk": "#bcbd22", "network": "#17becf"}


def column(series, key):
    return [row.get(key) for row in series]


def mark_faults(axes, faults):
    """Each fault: a darker span while it lasted (until the process was restarted, the server
    answered again, the disk was freed), a lighter one until the pipeline had recovered."""
    for index, fault in enumerate(faults):
        cleared = fault.get("cleared_at", fault["at"] + float(fault["lasted"]))
        end = cleared + float(fault["recovery"] or 0)
        colour = COLOURS.get(fault["fault"], "#333333")
        for ax in axes:
            ax.axvspan(fault["at"], cleared, color=colour, alpha=0.25, linewidth=0)
            ax.axvspan(cleared, end, color=colour, alpha=0.10, linewidth=0)
        recovery = "not recovered" if fault["recovery"] is None else f"+{fault['recovery']:.1f} s"
        axes[0].annotate(f"{fault['fault']}\n{recovery}", xy=(fault["at"], 1.0), xycoords=("data", "axes fraction"),
                         xytext=(2, -2 - 18 * (index % 2)), textcoords="offset points", va="top", fontsize=7, color=colour)


def plot(run, out):
    series, faults = run["series"], run.get("faults", [])
    t = column(series, "t")
    fig, axes = plt.subplots(3, 1, figsize=(12, 8.5), sharex=True, constrained_layout=True)
    title = run.get("title") or (f"make chaos{' --long' if run.get('long') else ''} (seed {run.get('seed')})"
                                 if faults or "seed" in run else
                                 f"make loadtest {run.get('scenario', '')} ("
                                 + " then ".join(f"{p['rate']:g} req/s for {p['seconds']:g} s" for p in run.get("phases", []))
                                 + f" of {run.get('batch')} events)")
    checks = run.get("checks")
    if checks:
        title += f": {checks['passed']} passed, {checks['failed']} failed"
    fig.suptitle(f"{title}; {run.get('started', '')[:19]} UTC, nproc {run.get('nproc', '?')}", fontsize=11)

    ax = axes[0]
    ax.plot(t, column(series, "accepted"), color="#2ca02c", linewidth=1, label="events accepted /s")
    ax.set_ylabel("events / s")
    ax.set_ylim(bottom=0)
    failed = column(series, "failed")
    if any(failed):
        twin = ax.twinx()
        twin.bar(t, failed, width=1.0, color="#d62728", alpha=0.6, label="requests not answered 2xx /s")
        twin.set_ylabel("requests / s", color="#d62728")
        twin.set_ylim(bottom=0)
        twin.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)

    ax = axes[1]
    for key, colour in (("p50_ms", "#1f77b4"), ("p99_ms", "#ff7f0e")):
        values = column(series, key)
        ax.plot([x for x, v in zip(t, values) if v], [v for v in values if v], color=colour, linewidth=1, label=key.replace("_ms", ""))
    ax.set_yscale("log")
    ax.set_ylabel("request latency (ms)")
    ax.legend(loc="upper left", fontsize=8)

    ax = axes[2]
    backlog_key = "backlog" if any(r.get("backlog") is not None for r in series) else "lag"
    backlog = column(series, backlog_key)
    ax.plot([x for x, v in zip(t, backlog) if v is not None], [v for v in backlog if v is not None],
            color="#9467bd", linewidth=1, label="events answered 202, not yet stored" if backlog_key == "backlog" else "consumer lag (records)")
    ax.set_ylabel("backlog (events)" if backlog_key == "backlog" else "consumer lag (records)")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", fontsize=8)
    fresh = column(series, "freshness_max_ms")
    if any(v is not None for v in fresh):
        twin = ax.twinx()
        twin.plot([x for x, v in zip(t, fresh) if v is not None], [v / 1000 for v in fresh if v is not None],
                  color="#e377c2", linewidth=1, label="freshness: 202 to visible, slowest probe (s)")
        twin.set_ylabel("freshness (s)", color="#e377c2")
        twin.set_yscale("log")
        twin.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("seconds of load")
    mark_faults(axes, faults)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run JSON files")
    parser.add_argument("--out", help="the PNG (one run only; default: the run's name with .png)")
    args = parser.parse_args()
    for path in args.runs:
        with open(path) as f:
            run = json.load(f)
        plot(run, args.out or os.path.splitext(path)[0] + ".png")


if __name__ == "__main__":
    main()
