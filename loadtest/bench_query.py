#!/usr/bin/env python3
"""`make bench-query`: the query API under load, on a month of data for 1000 orgs.

1. Bulk-loads --events synthetic events (default 50 M) of 1000 orgs spread over the last 30 days
   into a fresh database, through the consumer's own insert path (so the rollup views run as in
   production), and creates the 1000 orgs with an API key and a monthly budget each.
2. Starts tally-query-api on it and drives each endpoint in turn with tally-loadgen (--method GET:
   open model, --rate requests/s for --seconds, latency from each request's scheduled start, the
   next org's key per request), then reads from system.query_log how many ClickHouse rows the
   endpoint read per request. (Earlier runs used k6 with loadtest/k6/query.js, the same open
   model; the project no longer runs k6, which is AGPL.)
3. Prints p50/p95/p99/max latency, achieved requests/s, non-200 answers and rows read per request,
   against the targets (p95 <= 20 ms for summary, budget and status; <= 50 ms for timeseries and
   perf over 30 days).

Usage: loadtest/bench_query.py [--events 50000000] [--rate 200] [--seconds 30] [--keep DATABASE]
                               [--only status,summary,budget,timeseries,perf,overview,costs]
  --keep DATABASE reuses (and keeps) a database loaded by an earlier run.
Needs the local stack (dev/stack.sh infra-up) and release binaries.
"""
import argparse
import datetime
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_consumer as bc  # noqa: E402
import bench_ingest as bi  # noqa: E402

ORGS = 1000


def iso(t):
    return t.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def setup_orgs(database):
    rng = random.Random(7)
    keys, orgs, key_rows, budgets = [], [], [], []
    for i in range(ORGS):
        org = "org-%04d" % i
        key = "tally_%048x" % rng.getrandbits(192)
        keys.append(key)
        orgs.append("('%s', 'bench org %d', 'ENTERPRISE', 0, 0, now(), 0, 1)" % (org, i))
        key_rows.append("('%s', '%s', '%s', 'bench', now(), 0, 1)" % (hashlib.sha256(key.encode()).hexdigest(), key[:14], org))
        budgets.append("('%s', %d, [50, 80, 100], 1)" % (org, 1000 * 10**9))
    bc.ch("INSERT INTO %s_admin.orgs (org_id, name, plan, rate_limit_per_min, rate_limit_burst, created_at, deleted, version) VALUES %s"
          % (database, ", ".join(orgs)))
    bc.ch("INSERT INTO %s_admin.api_keys (key_hash, key_prefix, org_id, name, created_at, revoked, version) VALUES %s"
          % (database, ", ".join(key_rows)))
    bc.ch("INSERT INTO %s_admin.budgets (org_id, monthly_limit_nanos, alert_thresholds, version) VALUES %s"
          % (database, ", ".join(budgets)))
    return keys


def rows_read(database, since, until):
    bc.ch("SYSTEM FLUSH LOGS")
    out = bc.ch("SELECT count(), sum(read_rows) FROM system.query_log WHERE type = 2 AND event_time >= '%s' "
                "AND event_time <= '%s' AND query LIKE '%%%s.%%' AND query NOT LIKE '%%query_log%%'"
                % (since, until, database))
    queries, rows = out.split("\t")
    return int(queries), int(rows)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=50_000_000)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--keep", default="", help="reuse this already loaded database and keep it")
    parser.add_argument("--only", default="", help="comma-separated endpoint names (e.g. perf,timeseries) to drive")
    args = parser.parse_args()
    database = args.keep or "tally_bench_query_%08x" % random.getrandbits(32)
    if not args.keep or bc.ch("SELECT count() FROM system.databases WHERE name = '%s'" % database) != "1":
        bc.tool("migrate", database)
        loaded = bc.tool("load", database, args.events, 30)
        print("loaded %d events of %d orgs over 30 days in %.0f s (%.0f rows/s)"
              % (loaded["rows"], ORGS, loaded["seconds"], loaded["rows_per_s"]), flush=True)
        keys = setup_orgs(database)
        # Measure a settled table, as in production, not one still merging the bulk load.
        started = time.time()
        while int(bc.ch("SELECT count() FROM system.merges WHERE database = '%s'" % database)) and time.time() - started < 600:
            time.sleep(2)
        print("merges settled after %.0f s; parts: %s" % (time.time() - started, bc.ch(
            "SELECT groupArray(concat(table, '=', toString(c))) FROM (SELECT table, count() AS c FROM system.parts "
            "WHERE active AND database = '%s' GROUP BY table ORDER BY table)" % database)), flush=True)
    else:
        rng = random.Random(7)
        keys = ["tally_%048x" % rng.getrandbits(192) for _ in range(ORGS)]
    total = int(bc.ch("SELECT count() FROM %s.events" % database))
    rollup = int(bc.ch("SELECT count() FROM %s.rollup_hourly" % database))
    keys_file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump(keys, keys_file)
    keys_file.close()
    now = datetime.datetime.now(datetime.timezone.utc)
    month = "from=%s&to=%s" % (urllib.parse.quote(iso(now - datetime.timedelta(days=30))), urllib.parse.quote(iso(now)))
    endpoints = [
        ("status", "/api/telemetry/status", 20),
        ("summary", "/api/costs/summary", 20),
        ("budget", "/api/costs/budget", 20),
        ("timeseries 30d", "/api/analytics/timeseries?bucket=hour&" + month, 50),
        ("perf 30d", "/api/analytics/perf?" + month, 50),
        ("overview 30d", "/api/analytics/overview?" + month, None),
        ("costs list", "/api/costs?limit=50", None),
    ]
    if args.only:
        wanted = args.only.split(",")
        endpoints = [e for e in endpoints if e[0].split()[0] in wanted]
    api = bi.start("tally-query-api", {"TALLY_CLICKHOUSE_DATABASE": database, "TALLY_ADMIN_TOKEN": bi.ADMIN,
                                       "TALLY_LISTEN_ADDR": "127.0.0.1:18181", "TALLY_MIGRATE": "false"})
    results = []
    try:
        bi.wait_http("http://127.0.0.1:18181/readyz", 60)
        for name, target, _ in endpoints:
            since = bc.ch("SELECT now()")
            out = subprocess.run([os.path.join(bi.BIN, "tally-loadgen"), "--url", "http://127.0.0.1:18181", "--path", target,
                                  "--method", "GET", "--keys-file", keys_file.name, "--rate", str(args.rate),
                                  "--duration", str(args.seconds), "--connections", "64"],
                                 check=True, stdout=subprocess.PIPE, text=True).stdout
            until = bc.ch("SELECT now()")
            summary = json.loads(out.strip().splitlines()[-1])
            latency = summary["latency_ms"]
            duration = {"p(50)": latency["p50"], "p(95)": latency["p95"], "p(99)": latency["p99"], "max": latency["max"]}
            requests = {"count": summary["requests"], "rate": summary["requests_per_s"]}
            failed = summary["non_2xx"]
            queries, read = rows_read(database, since, until)
            results.append((name, duration, requests, failed, read / max(1, requests["count"]), queries / max(1, requests["count"])))
            print(name, json.dumps({k: round(v, 2) for k, v in duration.items()}), file=sys.stderr, flush=True)
    finally:
        bi.stop(api)
        os.unlink(keys_file.name)
        if not args.keep:
            bc.ch("DROP DATABASE IF EXISTS " + database)
            bc.ch("DROP DATABASE IF EXISTS " + database + "_admin")

    print("\nnproc=%d  %d events, %d orgs, %d rollup_hourly rows; %d requests/s per endpoint for %d s (tally-loadgen, open model)"
          % (os.cpu_count(), total, ORGS, rollup, args.rate, args.seconds))
    print("%-15s %8s %8s %8s %8s %9s %7s %12s %8s  %s" % ("endpoint", "p50 ms", "p95 ms", "p99 ms", "max ms", "req/s",
                                                         "non-200", "rows/request", "queries", "target p95"))
    for (name, d, r, failed, read, queries), (_, _, target) in zip(results, endpoints):
        verdict = "" if target is None else ("<= %d ms: %s" % (target, "met" if d["p(95)"] <= target else "NOT met"))
        print("%-15s %8.2f %8.2f %8.2f %8.1f %9.1f %7d %12.0f %8.1f  %s" % (
            name, d["p(50)"], d["p(95)"], d["p(99)"], d["max"], r["rate"], failed, read, queries, verdict))


if __name__ == "__main__":
    main()
