#!/usr/bin/env python3
"""`make verify-e2e`: the end-to-end ledger against `make up`'s stack.

Creates --orgs orgs, sends --seconds of SDK batches (--rate requests/s of --batch events through
the ingest, about 2 % of events invalid, 3 % of batches sent again after their 202, every batch
retried with the same ids until answered 202) and records every event id answered 202 and every
rejected one. Then, once the consumer has drained:
  - every accepted id is in ClickHouse, once, and nothing else of these orgs is;
  - the hourly and daily rollups equal the raw rows for these orgs;
  - every rejected event is in the dead-letter topic (`tally-consumer dlq list`) with its reason;
  - the query API's status and cost summary count exactly the accepted events per org.
The last line is `N passed, M failed`.

  python3 dev/verify_e2e.py [--seconds 20] [--rate 40] [--batch 25] [--orgs 4]
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone

from ledger import Ledger, loader, rollup_comparisons
from tally_api import admin_token, call

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STACK = os.path.join(ROOT, "dev", "stack.sh")
INGEST = ("127.0.0.1", 8080)
QUERY = "http://127.0.0.1:8081"
CH = "http://127.0.0.1:8123/"
DB = "tally"
BIN = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/tally/target")), "release")


def log(message):
    print(f"[verify-e2e {time.strftime('%H:%M:%S')}] {message}", flush=True)


def ch(sql):
    with urllib.request.urlopen(urllib.request.Request(CH, data=sql.encode()), timeout=120) as response:
        return response.read().decode()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rate", type=float, default=40)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--orgs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    if call("GET", QUERY + "/healthz", timeout=5)[0] != 200:
        raise SystemExit("the query API of `make up` does not answer on :8081: run `make up` first")
    token = admin_token(STACK)
    orgs = []
    for i in range(args.orgs):
        status, created = call("POST", QUERY + "/admin/orgs", token=token, body={
            "name": f"verify-e2e-{i}", "plan": "ENTERPRISE", "rateLimitPerMin": 10_000_000, "rateLimitBurst": 1_000_000})
        if status != 201:
            raise SystemExit(f"POST /admin/orgs answered {status}: {created}")
        orgs.append({"id": created["orgId"], "key": created["apiKey"]})
    for _ in range(100):
        if call("POST", f"http://{INGEST[0]}:{INGEST[1]}/v1/ingest", key=orgs[-1]["key"], body={"events": []})[0] != 401:
            break
        time.sleep(0.2)
    started = datetime.now(timezone.utc)
    log(f"{args.orgs} orgs; sending {args.rate:g} requests/s of {args.batch} events for {args.seconds:g} s")
    ledger, stop = Ledger(), threading.Event()
    threads = [threading.Thread(target=loader, args=(INGEST, orgs, ledger, stop, args.rate / args.threads, args.batch, 0.02),
                                daemon=True) for _ in range(args.threads)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        time.sleep(min(5, max(0, deadline - time.monotonic())))
        log(f"{ledger.count()} events accepted, {ledger.rejected_count()} rejected, {ledger.resent} sent again; answers {dict(ledger.statuses)}")
    ledger.finish(stop, threads, log=log)
    ours = ", ".join(f"'{o['id']}'" for o in orgs)
    expected = ledger.expected()
    for _ in range(120):
        stored = int(ch(f"SELECT count() FROM {DB}.events WHERE org_id IN ({ours})"))
        log(f"draining: {stored} of {len(expected)} stored")
        if stored >= len(expected):
            break
        time.sleep(1)
    passed = failed = 0

    def check(ok, what):
        nonlocal passed, failed
        passed, failed = passed + bool(ok), failed + (not ok)
        log(("PASS " if ok else "FAIL ") + what)

    rows = [tuple(line.split("\t")) for line in ch(
        f"SELECT org_id, toString(event_id) FROM {DB}.events WHERE org_id IN ({ours}) FORMAT TabSeparated").splitlines() if line]
    check(not (expected - set(rows)), f"nothing missing: {len(expected)} accepted events, {len(expected - set(rows))} not stored")
    check(len(rows) == len(set(rows)), f"nothing duplicated: {len(rows)} rows, {len(set(rows))} distinct ({ledger.resent} events were sent twice)")
    extra = set(rows) - expected - ledger.unknown()
    check(not extra, f"nothing else stored: {len(extra)} rows not answered 202")
    check(*ledger.abandoned_check())
    for rollup, column, raw, rolled in rollup_comparisons(DB, f"org_id IN ({ours})"):
        raw, rolled = ch(raw), ch(rolled)
        check(raw == rolled, f"{rollup} equals the raw rows in {raw.count(chr(10))} (org, {column}) buckets")
    env = dict(os.environ, **{line.split("=", 1)[0]: line.split("=", 1)[1]
                              for line in subprocess.run(["bash", STACK, "env"], capture_output=True, text=True).stdout.splitlines()
                              if "=" in line})
    letters = [json.loads(line) for line in subprocess.run([os.path.join(BIN, "tally-consumer"), "dlq", "list", "10000000"],
                                                          env=env, capture_output=True, text=True, check=True).stdout.splitlines()]
    org_ids = {o["id"] for o in orgs}
    lettered = {(l["org_id"], l["event_id"]): l["reason"] for l in letters if l["org_id"] in org_ids and l["event_id"]}
    wanted = {(org, eid) for org, rejected in ledger.rejected.items() for eid in rejected}
    check(ledger.rejected_count() > 0, f"{ledger.rejected_count()} events were rejected by the ingest")
    check(wanted <= set(lettered), f"every rejected event is in the dead-letter topic ({len(wanted - set(lettered))} of {len(wanted)} missing)")
    check(all(lettered[k] for k in wanted if k in lettered), "each dead letter says its reason")
    window = {"from": (started - timedelta(days=3)).strftime("%Y-%m-%dT%H:00:00Z"),
              "to": (datetime.now(timezone.utc) + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:00Z")}
    for org in orgs:
        want = len(ledger.ids[org["id"]])
        _, summary = call("GET", f"{QUERY}/api/costs/summary?{urllib.parse.urlencode(window)}", key=org["key"])
        _, status = call("GET", f"{QUERY}/api/telemetry/status", key=org["key"])
        check(summary.get("executionCount") == want and status.get("totalEvents") == want,
              f"org {org['id'][:8]}: the query API counts its {want} accepted events (summary {summary.get('executionCount')}, status {status.get('totalEvents')})")
    print(f"{passed} passed, {failed} failed", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
