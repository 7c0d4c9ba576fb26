#!/usr/bin/env python3
"""Property-based API testing of the ingest and the query API with schemathesis, part of `make test`.

Starts an ingest and a query API (the binaries `cargo test` built) against the local stack with
their own database, topic and org, then lets schemathesis generate requests from each service's
own OpenAPI document (/openapi.json) and fails on any 5xx and on any answer the document does not
declare: a status it does not list for the route, a content type other than the declared one, a
body that does not match the declared schema (schemathesis' conformance checks). The query API is
fuzzed twice: its org routes with the org's key, its admin routes with the admin token (the live
stream, /api/telemetry/stream, is left out: an answer that never ends cannot be checked whole; its
own tests are query-api/tests/stream.rs). Exits
non-zero when any run fails.

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
    checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
    org_key = ["--header", "X-API-Key: " + key]
    admin = ["--header", "Authorization: Bearer " + services.ADMIN]
    try:
        for name, base, extra in (("ingest", "http://127.0.0.1:18180", org_key),
                                  ("query API's org routes", "http://127.0.0.1:18182", org_key + ["--exclude-path-regex", "^/admin|^/api/telemetry/stream$"]),
                                  ("query API's admin routes", "http://127.0.0.1:18182", admin + ["--include-path-regex", "^/admin"])):
            services.wait_http(base + "/readyz", 60)
            statuses[name] = subprocess.run([schemathesis, "run", base + "/openapi.json", "--checks", checks,
                                             "--max-examples", max_examples, "--request-timeout", "15",
                                             "--suppress-health-check", "all", *extra]).returncode
    finally:
        services.stop(ingest)
        services.stop(query)
        services.delete_topic(topic)
        services.delete_topic(topic + ".dlq")
        subprocess.run(["curl", "-s", "-o", "/dev/null", "http://127.0.0.1:8123/", "--data", "DROP DATABASE IF EXISTS " + database])
        subprocess.run(["curl", "-s", "-o", "/dev/null", "http://127.0.0.1:8123/", "--data", "DROP DATABASE IF EXISTS " + database + "_admin"])
    for name, status in statuses.items():
        print("fuzz_api: schemathesis (%s) %s against the %s" % (checks.replace(",", ", "), "passed" if status == 0 else "FAILED", name))
    return 0 if statuses and all(status == 0 for status in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
