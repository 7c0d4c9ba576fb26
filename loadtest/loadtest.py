#!/usr/bin/env python3
"""`make loadtest SCENARIO=steady RATE=… DURATION=…`: one scenario of loadtest/k6/scenarios.json,
driven by tally-loadgen (the Rust load generator: the rates two cores allow) against `make up`'s
stack, with a progress line every 5 s and a summary that passes or fails the scenario's
thresholds.

The same shapes as the k6 scripts: `scenarios.json` gives rate (requests/s, open model), batch
(events per request), orgs (made through the admin API, their keys used in turn), their limits,
the p95/p99 thresholds and the statuses that are not failures (429 in many-orgs). The spike runs
three phases: the rate, spike_factor × the rate, the rate again.

  python3 loadtest/loadtest.py steady [--rate R] [--duration 30s] [--batch N] [--orgs N]
Exit status 0 when every threshold holds.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "dev"))
from tally_api import admin_token, call  # noqa: E402

INGEST = "http://127.0.0.1:8080"
QUERY = "http://127.0.0.1:8081"
CONSUMER = "http://127.0.0.1:8082"
LOADGEN = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/tally/target")), "release", "tally-loadgen")


def seconds(text):
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", str(text))
    if not match:
        raise SystemExit(f"duration {text!r}: use e.g. 30s, 5m, 2h")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def metric(url, name):
    try:
        text = urllib.request.urlopen(url + "/metrics", timeout=2).read().decode()
    except OSError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def progress(stop, started, phases, samples):
    """A line every 5 s; every second a sample (events accepted so far, consumer lag) for --record."""
    accepted0 = metric(INGEST, "tally_ingest_events_accepted_total") or 0
    tick = 0
    while not stop.wait(1):
        tick += 1
        accepted = (metric(INGEST, "tally_ingest_events_accepted_total") or 0) - accepted0
        lag = metric(CONSUMER, "tally_consumer_lag_records")
        elapsed = time.time() - started
        samples.append({"t": round(elapsed, 1), "accepted_total": accepted, "lag": lag})
        if tick % 5 == 0:
            print(f"[loadtest] {elapsed:6.0f} s of {phases:.0f}: {accepted:,.0f} events accepted "
                  f"({accepted / max(elapsed, 1):,.0f}/s), consumer lag {lag if lag is not None else '?'} records", flush=True)


def record_run(path, scenario, phases, batch, series, samples, results, passed):
    """The run's per-second series (the load generator's requests and latencies, the ingest's
    accepted events and the consumer's lag) as loadtest/plot.py reads it."""
    by_second = {}
    for sample in samples:
        by_second[int(sample["t"])] = sample
    rows, previous = [], 0
    for row in series:
        sample = by_second.get(row["t"] + 1)
        accepted = None
        if sample:
            accepted, previous = sample["accepted_total"] - previous, sample["accepted_total"]
        rows.append({"t": row["t"], "requests": row["requests"], "failed": row["requests"] - row["ok"],
                     "accepted": accepted, "p50_ms": row["p50_ms"], "p99_ms": row["p99_ms"],
                     "lag": sample["lag"] if sample else None})
    with open(path, "w") as f:
        json.dump({"kind": "loadtest", "scenario": scenario, "phases": phases, "batch": batch, "nproc": os.cpu_count(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - len(rows))),
                   "results": results, "passed": passed, "series": rows}, f, indent=1)
    print(f"[loadtest] run recorded in {path} (plot: $(bash dev/tools.sh plot) loadtest/plot.py {path})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario")
    parser.add_argument("--rate", type=float)
    parser.add_argument("--duration")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--orgs", type=int)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--record", help="write the run's per-second series here (JSON, for loadtest/plot.py)")
    args = parser.parse_args()
    scenarios = json.load(open(os.path.join(ROOT, "loadtest", "k6", "scenarios.json")))
    if args.scenario not in scenarios or args.scenario.startswith("_"):
        raise SystemExit(f"unknown scenario {args.scenario!r}: one of {', '.join(k for k in scenarios if not k.startswith('_'))} "
                         "(bad-input and query are k6-only: see docs/load-testing.md)")
    s = dict(scenarios[args.scenario])
    rate = args.rate or s["rate"]
    duration = seconds(args.duration or s["duration"])
    batch = args.batch or s["batch"]
    orgs = args.orgs or s["orgs"]
    if call("GET", QUERY + "/healthz", timeout=5)[0] != 200:
        raise SystemExit("the query API of `make up` does not answer on :8081: run `make up` first")

    token = admin_token(os.path.join(ROOT, "dev", "stack.sh"))
    print(f"[loadtest] {args.scenario}: creating {orgs} orgs through the admin API", flush=True)
    keys = []
    for i in range(orgs):
        body = {"name": f"loadtest-{args.scenario}-{i}", "plan": "ENTERPRISE" if s["per_minute"] is None else "FREE",
                "rateLimitPerMin": s["per_minute"] if s["per_minute"] is not None else 10_000_000,
                "rateLimitBurst": s["burst"] if s["burst"] is not None else 1_000_000}
        status, created = call("POST", QUERY + "/admin/orgs", token=token, body=body)
        if status != 201:
            raise SystemExit(f"POST /admin/orgs answered {status}: {created}")
        keys.append(created["apiKey"])
    for _ in range(100):  # the ingest learns new keys at its next refresh
        if call("POST", INGEST + "/v1/ingest", key=keys[-1], body={"events": []})[0] != 401:
            break
        time.sleep(0.2)
    keys_file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump(keys, keys_file)
    keys_file.close()

    phases = [(rate, duration)]
    if "spike_factor" in s:
        phases = [(rate, duration), (rate * s["spike_factor"], 60.0), (rate, duration)]
    total = sum(d for _, d in phases)
    print(f"[loadtest] {args.scenario}: {' then '.join(f'{r:g} req/s for {d:g} s' for r, d in phases)}, "
          f"{batch} events per request, open model (tally-loadgen)", flush=True)
    stop, samples, series = threading.Event(), [], []
    watcher = threading.Thread(target=progress, args=(stop, time.time(), total, samples), daemon=True)
    watcher.start()
    results = []
    series_file = keys_file.name + ".series"
    try:
        for phase_rate, phase_seconds in phases:
            out = subprocess.run([LOADGEN, "--url", INGEST, "--path", "/v1/ingest", "--keys-file", keys_file.name,
                                  "--key", keys[0], "--events", str(batch), "--rate", str(phase_rate),
                                  "--duration", str(phase_seconds), "--connections", str(args.connections),
                                  "--series", series_file],
                                 check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            with open(series_file) as f:
                series += [dict(row, t=row["t"] + len(series)) for row in json.load(f)]
    finally:
        stop.set()
        os.unlink(keys_file.name)
        if os.path.exists(series_file):
            os.unlink(series_file)

    failed = []
    expected = {str(code) for code in s["expect"]}
    for index, result in enumerate(results):
        label = f"phase {index + 1} ({result['target_rate']:g} req/s)" if len(results) > 1 else args.scenario
        unexpected = {code: n for code, n in result["statuses"].items() if code not in expected}
        latency = result["latency_ms"]
        print(f"[loadtest] {label}: {result['requests']} requests, {result['requests_per_s']:,.1f} req/s "
              f"({result['accepted_events_per_s']:,.0f} events/s accepted), p50 {latency['p50']:.1f} ms, "
              f"p95 {latency['p95']:.1f} ms, p99 {latency['p99']:.1f} ms; statuses {result['statuses']}", flush=True)
        if unexpected:
            failed.append(f"{label}: statuses {unexpected} (expected only {sorted(expected)})")
        if latency["p95"] > s["p95_ms"]:
            failed.append(f"{label}: p95 {latency['p95']:.1f} ms > {s['p95_ms']} ms")
        if latency["p99"] > s["p99_ms"]:
            failed.append(f"{label}: p99 {latency['p99']:.1f} ms > {s['p99_ms']} ms")
        if result["requests_per_s"] < 0.95 * result["target_rate"]:
            failed.append(f"{label}: {result['requests_per_s']:.1f} req/s < 95 % of the {result['target_rate']:g} scheduled")
    for line in failed:
        print(f"[loadtest] FAIL {line}")
    print(f"[loadtest] {args.scenario}: {'PASSED' if not failed else 'FAILED'} "
          f"(thresholds: p95 ≤ {s['p95_ms']} ms, p99 ≤ {s['p99_ms']} ms, statuses {sorted(expected)}, ≥ 95 % of the rate)")
    if args.record:
        record_run(args.record, args.scenario, [{"rate": r, "seconds": d} for r, d in phases], batch, series, samples,
                   results, not failed)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
