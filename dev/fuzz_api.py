#!/usr/bin/env python3
"""Property-based API testing of the ingest and the query API with schemathesis, part of `make test`.

Starts an ingest and a query API (the binaries `cargo test` built) against the local stack with
their own database, topic and org, then lets schemathesis generate requests from each service's
own OpenAPI document (/openapi.json) and fails on any 5xx. The query API is fuzzed with the org's
key on its org routes (the admin routes are covered by its integration tests). Exits non-zero
when either run fails.

Usage: dev/fuzz_api.py SCHEMATHESIS [--max-examples 60]    (TALLY_BIN_DIR = the binaries' folder)
"""
import os
import random
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "loadtest"))
import bench_ingest as services  # noqa: E402  (process helpers shared with the benchmarks)


def main():
    schemathesis = sys.argv[1]
    max_examples = sys.argv[sys.argv.index("--max-examples") + 1] if "--max-examples" in sys.argv else "60"
    database = "tally_t_fuzz_%012x" % random.getrandbits(48)
    key = services.bench_org(database, port=18181)
    topic = "tally.t.fuzz.%08x" % random.getrandbits(32)
    services.create_topic(topic, 2)
    services.create_topic(topic + ".dlq", 1)
    ingest = services.start("tally-ingest", {"TALLY_CLICKHOUSE_DATABASE": database, "TALLY_LISTEN_ADDR": "127.0.0.1:18180",
                                             "TALLY_EVENTS_TOPIC": topic, "TALLY_DLQ_TOPIC": topic + ".dlq"})
    query = services.start("tally-query-api", {"TALLY_CLICKHOUSE_DATABASE": database, "TALLY_ADMIN_TOKEN": services.ADMIN,
                                               "TALLY_LISTEN_ADDR": "127.0.0.1:18182"})
    statuses = {}
    try:
        for name, base, extra in (("ingest", "http://127.0.0.1:18180", []),
                                  ("query-api", "http://127.0.0.1:18182", ["--exclude-path-regex", "^/admin"])):
            services.wait_http(base + "/readyz", 60)
            statuses[name] = subprocess.run([schemathesis, "run", base + "/openapi.json",
                                             "--checks", "not_a_server_error", "--header", "X-API-Key: " + key,
                                             "--max-examples", max_examples, "--request-timeout", "15",
                                             "--suppress-health-check", "all", *extra]).returncode
    finally:
        services.stop(ingest)
        services.stop(query)
        services.delete_topic(topic)
        services.delete_topic(topic + ".dlq")
        subprocess.run(["curl", "-s", "-o", "/dev/null", "http://127.0.0.1:8123/", "--data", "DROP DATABASE IF EXISTS " + database])
    for name, status in statuses.items():
        print("fuzz_api: schemathesis %s against the %s's /openapi.json" % ("passed" if status == 0 else "FAILED", name))
    return 0 if statuses and all(status == 0 for status in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
