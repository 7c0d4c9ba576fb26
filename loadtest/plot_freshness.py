#!/usr/bin/env python3
"""The distribution of freshness (ingest 202 to the row visible in ClickHouse) of recorded runs of
`make bench-consumer` (loadtest/bench_consumer.py --record-freshness FILE): one cumulative curve
per run, with its batch wait, the 500 ms target and each run's p99 marked.

  $(bash dev/tools.sh plot) loadtest/plot_freshness.py FILE.json [--out PNG]   (default: FILE.png)
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--out")
    args = parser.parse_args()
    with open(args.file) as f:
        runs = json.load(f)["runs"]
    figure, axis = plt.subplots(figsize=(8, 5))
    for run in runs:
        samples = sorted(run["samples_ms"])
        share = [(i + 1) / len(samples) for i in range(len(samples))]
        label = (f"{run.get('recorded_at', '')[:16].replace('T', ' ')} batch wait {run['batch_max_wait_ms']} ms: "
                 f"p50 {run['p50_ms']:.0f}, p99 {run['p99_ms']:.0f} ms "
                 f"({run['markers']} markers)")
        line, = axis.step(samples, share, where="post", label=label)
        axis.plot([run["p99_ms"]], [0.99], "o", color=line.get_color())
    axis.axvline(500, color="#888", linestyle="--", linewidth=1)
    axis.text(492, 0.5, "target: p99 ≤ 500 ms", color="#555", fontsize=9, rotation=90, ha="right", va="center")
    axis.set_xlabel("ingest 202 → row visible in ClickHouse (ms)")
    axis.set_ylabel("share of markers")
    rate = runs[0]["rate"] if runs else 0
    axis.set_title(f"Freshness at {rate:,.0f} events/s, one consumer, {runs[0].get('nproc', '?')} cores")
    axis.set_ylim(0, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(loc="upper left", bbox_to_anchor=(0, -0.18), fontsize=9, frameon=False)
    out = args.out or os.path.splitext(args.file)[0] + ".png"
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
