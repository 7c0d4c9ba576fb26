#!/usr/bin/env python3
"""The k6 scripts' check in `make test`, without k6 (AGPL: SREs bring their own).

Starts an ingest and a query API (the binaries `cargo test` built) against the local stack with
a database and topics of their own, then for every script in loadtest/k6/: `node --check` (syntax),
and a smoke run under Node with the stand-ins of loadtest/k6/standin/ — the script's own setup()
(orgs and keys through the admin API), two iterations of each scenario's function with real HTTP
requests, teardown() and handleSummary(). A script whose requests, checks or thresholds no longer
match the API fails the run.

Usage: dev/k6_check.py    (TALLY_BIN_DIR = the binaries' folder)
"""
import glob
import os
import random
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "loadtest"))
import bench_ingest as services  # noqa: E402  (process helpers shared with the benchmarks)

K6 = os.path.join(ROOT, "loadtest", "k6")


def main():
    scripts = sorted(glob.glob(os.path.join(K6, "*.js")))
    libs = sorted(glob.glob(os.path.join(K6, "lib", "*.js")))
    database = "tally_t_k6_%012x" % random.getrandbits(48)
    topic = "tally.t.k6.%08x" % random.getrandbits(32)
    services.create_topic(topic, 2)
    services.create_topic(topic + ".dlq", 1)
    query = services.start("tally-query-api", {"TALLY_CLICKHOUSE_DATABASE": database, "TALLY_ADMIN_TOKEN": services.ADMIN,
                                               "TALLY_LISTEN_ADDR": "127.0.0.1:18282"})
    ingest = None
    failed = []
    try:
        services.wait_http("http://127.0.0.1:18282/readyz", 60)  # migrated
        ingest = services.start("tally-ingest", {"TALLY_CLICKHOUSE_DATABASE": database, "TALLY_LISTEN_ADDR": "127.0.0.1:18280",
                                                 "TALLY_EVENTS_TOPIC": topic, "TALLY_DLQ_TOPIC": topic + ".dlq",
                                                 "TALLY_KEY_REFRESH_MS": "500"})
        services.wait_http("http://127.0.0.1:18280/readyz", 60)
        env = dict(os.environ, TALLY_INGEST_URL="http://127.0.0.1:18280", TALLY_QUERY_URL="http://127.0.0.1:18282",
                   TALLY_ADMIN_TOKEN=services.ADMIN)
        for path in libs + scripts:
            if subprocess.run(["node", "--check", path]).returncode != 0:
                failed.append(os.path.relpath(path, ROOT) + " (syntax)")
        for path in scripts:
            run = subprocess.run(["node", "--import", os.path.join(K6, "standin", "register.mjs"),
                                  os.path.join(K6, "standin", "run.mjs"), path, "2"], env=env, cwd=K6)
            if run.returncode != 0:
                failed.append(os.path.relpath(path, ROOT))
    finally:
        for process in (ingest, query):
            if process:
                services.stop(process)
        services.delete_topic(topic)
        services.delete_topic(topic + ".dlq")
        for db in (database, database + "_admin"):
            subprocess.run(["curl", "-s", "-o", "/dev/null", "http://127.0.0.1:8123/", "--data", "DROP DATABASE IF EXISTS " + db])
    print("k6_check: %d scripts syntax-checked and smoke-run under Node; %s" % (
        len(scripts), "all passed" if not failed else "FAILED: " + ", ".join(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
