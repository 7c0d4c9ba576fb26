#!/usr/bin/env python3
"""The exactly-once suite on the local cluster (issue 13): `make test-cluster`.

Runs against `dev/cluster.sh up` (3 Kafka brokers, ClickHouse 2 shards x 2 replicas, two
consumers in one group, two ingest replicas behind nginx, the query API). Load goes through nginx
the whole time, as an SDK would send it: batches of events with their own `eventId`s, a batch
retried with the same ids until it is answered 202, and now and then a batch answered 202 sent
once more (an SDK whose answer was lost). Every id answered 202 goes into a ledger, per org.
While the load runs, the chaos schedule:

  kill -9 consumer-1, restart it 15 s later      (group rebalance, reconciliation of its partitions)
  stop kafka-2, start it 15 s later              (a broker restart; RF 3, min ISR 2)
  kill -9 clickhouse-2 for 60 s                  (a replica of shard 1; quorum inserts wait for it)
  stop clickhouse-3 and clickhouse-4 for 30 s    (all of shard 2)

Then, once the consumers have drained, the checks; the last line is `N passed, M failed`:
  - every id of the ledger is stored, nothing else is, and nothing twice (retried ids included);
  - every row is on the shard of its org (cityHash64(org_id) % 2) and both replicas of each shard
    hold the same rows;
  - on every replica, the hourly and daily rollups equal the raw rows per org (events, tokens,
    cost, errors);
  - per org, the query API (through the Distributed tables) answers the ledger's count and the
    raw cost, and each org's key sees only its own rows (org isolation).

  python3 dev/cluster_test.py [--seconds 240] [--rate 60] [--orgs 8] [--no-chaos]
"""

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from datetime import datetime, timedelta, timezone

from ledger import Ledger, loader, rollup_comparisons
from tally_api import admin_token, call

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, ".dev", "cluster", "run")
INGEST = ("127.0.0.1", 8280)
QUERY = "http://127.0.0.1:8285"
NODE_PORT = {1: 8131, 2: 8132, 3: 8133, 4: 8134}
SHARD_NODES = {0: (1, 2), 1: (3, 4)}  # shard index (cityHash64 % 2) -> its nodes
DB = os.environ.get("TALLY_CLICKHOUSE_DATABASE", "tally")


def log(message):
    print(f"[cluster-test {time.strftime('%H:%M:%S')}] {message}", flush=True)


def ch(node, sql, timeout=60):
    request = urllib.request.Request(f"http://127.0.0.1:{NODE_PORT[node]}/", data=sql.encode(), method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read().decode()


def cluster(*args):
    subprocess.run(["bash", os.path.join(ROOT, "dev", "cluster.sh"), *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill9(name):
    with open(os.path.join(RUN, f"{name}.pid")) as f:
        pid = int(f.read().strip())
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def http_json(method, url, token=None, key=None, body=None):
    status, answer = call(method, url, token=token, key=key, body=body)
    if status >= 300:
        raise SystemExit(f"{method} {url} answered {status}: {answer}")
    return answer


def create_orgs(count, token):
    """`count` orgs with limits no test load reaches, at least two on each shard."""
    orgs = []
    while len(orgs) < count or min(Counter(o["shard"] for o in orgs).get(s, 0) for s in (0, 1)) < 2:
        created = http_json("POST", f"{QUERY}/admin/orgs", token=token, body={
            "name": f"cluster-test-{len(orgs)}", "plan": "ENTERPRISE",
            "rateLimitPerMin": 10_000_000, "rateLimitBurst": 1_000_000})
        shard = int(ch(1, f"SELECT cityHash64('{created['orgId']}') % 2").strip())
        orgs.append({"id": created["orgId"], "key": created["apiKey"], "shard": shard})
    return orgs


def org_list(orgs):
    return ", ".join(f"'{o['id']}'" for o in orgs)


def stored_count(orgs):
    """Rows of the test's orgs over the cluster, from the first node that answers."""
    for node in (1, 2, 3, 4):
        try:
            return int(ch(node, f"SELECT count() FROM {DB}.events_all WHERE org_id IN ({org_list(orgs)})", timeout=3))
        except (OSError, urllib.error.URLError):
            continue
    return None


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, ok, what):
        if ok:
            self.passed += 1
            log(f"PASS {what}")
        else:
            self.failed += 1
            log(f"FAIL {what}")


def chaos_schedule(seconds):
    """(at second, label, action) for a run of `seconds` seconds of load."""
    if seconds < 220:
        raise SystemExit("the chaos schedule needs --seconds 220 or more")
    return [
        (20, "kill -9 consumer-1", lambda: kill9("consumer-1")),
        (35, "restart consumer-1", lambda: cluster("start", "consumer-1")),
        (50, "stop kafka-2", lambda: cluster("stop", "kafka-2")),
        (65, "start kafka-2", lambda: cluster("start", "kafka-2")),
        (80, "kill -9 clickhouse-2 (shard 1 replica) for 60 s", lambda: kill9("clickhouse-2")),
        (140, "restart clickhouse-2", lambda: cluster("start", "clickhouse-2")),
        (160, "stop shard 2 (clickhouse-3, clickhouse-4) for 30 s",
         lambda: (cluster("stop", "clickhouse-3"), cluster("stop", "clickhouse-4"))),
        (190, "start shard 2", lambda: (cluster("start", "clickhouse-3"), cluster("start", "clickhouse-4"))),
    ]


def run_load(args, orgs, ledger):
    stop = threading.Event()
    threads = [threading.Thread(target=loader, args=(INGEST, orgs, ledger, stop, args.rate / args.threads, args.batch), daemon=True)
               for _ in range(args.threads)]
    for thread in threads:
        thread.start()
    wanted = {"consumer": "consumer-1", "kafka": "kafka-2", "replica": "clickhouse-2", "shard": "shard 2"}
    chosen = [wanted[c] for c in args.chaos.split(",") if c]
    schedule = [] if args.no_chaos else [step for step in chaos_schedule(args.seconds)
                                          if any(name in step[1] for name in chosen)]
    started = time.monotonic()
    next_progress = 10
    while (elapsed := time.monotonic() - started) < args.seconds:
        while schedule and elapsed >= schedule[0][0]:
            at, label, action = schedule.pop(0)
            log(f"t={at:>3}s chaos: {label}")
            action()
        if elapsed >= next_progress:
            with ledger.lock:
                statuses = dict(ledger.statuses)
            log(f"t={int(elapsed):>3}s load: {ledger.count():>8} events answered 202, {ledger.resent} resent; "
                f"answers {statuses}; stored so far {stored_count(orgs)}")
            next_progress += 10
        time.sleep(0.2)
    ledger.finish(stop, threads, log=log)
    for _, label, action in schedule:
        log(f"after the load, chaos: {label}")
        action()


def drain(orgs, expected, timeout):
    """Waits until the cluster stores `expected` rows of the test's orgs (or stops moving)."""
    started = time.monotonic()
    last, last_change = None, time.monotonic()
    while time.monotonic() - started < timeout:
        stored = stored_count(orgs)
        if stored != last:
            last, last_change = stored, time.monotonic()
            log(f"draining: {stored} of {expected} events stored")
        if stored == expected:
            return
        if stored is not None and stored > expected or time.monotonic() - last_change > 120:
            return
        time.sleep(3)


def diagnose(node, raw, rolled):
    """For each org whose hourly rollup lacks rows: the run of Kafka records (consecutive offsets of
    one partition) whose rows are exactly what is missing, when they arrived, and the rollup parts'
    history around then (system.part_log), so a failure can be traced to the insert behind it."""
    def per_hour(text):
        out = {}
        for line in text.splitlines():
            org, hour, count = line.split("\t")[:3]
            out[(org, hour)] = int(count)
        return out
    have, want = per_hour(rolled), per_hour(raw)
    missing = {}
    for (org, hour), count in want.items():
        if count != have.get((org, hour), 0):
            missing.setdefault(org, Counter())[hour] = count - have.get((org, hour), 0)
    for org, deficit in missing.items():
        if any(n < 0 for n in deficit.values()):
            log(f"  org {org[:8]}: the rollup counts some hours twice ({sum(-n for n in deficit.values() if n < 0)} rows "
                f"too many) and lacks others ({sum(n for n in deficit.values() if n > 0)} rows)")
            deficit = Counter({hour: n for hour, n in deficit.items() if n > 0})
            if not deficit:
                continue
        # Only the months of the shortfall: an insert is one part per month, and one month's part
        # of it may be all that is missing.
        months = ", ".join(sorted({f"'{hour[:7]}'" for hour in deficit}))
        rows = ch(node, f"SELECT kafka_partition, kafka_offset, toString(toStartOfHour(timestamp)), toString(received_at) "
                        f"FROM {DB}.events WHERE org_id = '{org}' AND substring(toString(timestamp), 1, 7) IN ({months}) "
                        "ORDER BY kafka_partition, kafka_offset FORMAT TSV", 300)
        records, arrived = {}, {}
        for line in rows.splitlines():
            partition, offset, hour, received = line.split("\t")
            records.setdefault((int(partition), int(offset)), Counter())[hour] += 1
            arrived[(int(partition), int(offset))] = received
        keys, found = sorted(records), None
        for i, first in enumerate(keys):
            total = Counter()
            for last in keys[i:]:
                if last[0] != first[0] or sum(total.values()) > sum(deficit.values()):
                    break
                total += records[last]
                if total == deficit:
                    found = (first, last)
                    break
            if found:
                break
        log(f"  org {org[:8]}: the rollup lacks {sum(deficit.values())} rows over {len(deficit)} hours; "
            + (f"exactly the rows of partition {found[0][0]} offsets {found[0][1]}..{found[1][1]}, "
               f"which arrived at {arrived[found[0]]}" if found else "no run of records matches exactly"))
        if found:
            parts = ch(node, "SELECT event_time, event_type, table, part_name, rows, merged_from, error FROM system.part_log "
                             f"WHERE database = '{DB}' AND table LIKE 'rollup%' AND event_time BETWEEN "
                             f"toDateTime('{arrived[found[0]]}') - 5 AND toDateTime('{arrived[found[0]]}') + 120 "
                             "ORDER BY event_time FORMAT TSV", 60)
            log("  rollup parts written, fetched or removed from then (part_log):\n    " + "\n    ".join(parts.splitlines()[:80]))


def verify(orgs, ledger, checks):
    expected = ledger.expected()
    for node in (1, 2, 3, 4):
        for table in ("events", "rollup_hourly", "rollup_daily"):
            ch(node, f"SYSTEM SYNC REPLICA {DB}.{table}", timeout=300)
    rows = ch(1, f"SELECT org_id, toString(event_id) FROM {DB}.events_all WHERE org_id IN ({org_list(orgs)}) "
                 "FORMAT TabSeparated", timeout=300).split("\n")
    stored = [tuple(line.split("\t")) for line in rows if line]
    stored_set = set(stored)
    lost = expected - stored_set
    extra = stored_set - expected - ledger.unknown()
    checks.check(not lost, f"0 lost: all {len(expected)} events answered 202 are stored ({len(lost)} missing)")
    checks.check(len(stored) == len(stored_set),
                 f"0 duplicated: {len(stored)} rows, {len(stored_set)} distinct (org, event id)")
    checks.check(not extra, f"nothing stored that was not answered 202 ({len(extra)} extra)")
    checks.check(*ledger.abandoned_check())
    checks.check(ledger.resent > 0, f"{ledger.resent} events were sent again after their 202; each is stored once (above)")

    for shard, nodes in SHARD_NODES.items():
        answers = []
        for node in nodes:
            wrong = int(ch(node, f"SELECT count() FROM {DB}.events WHERE cityHash64(org_id) % 2 != {shard}"))
            checks.check(wrong == 0, f"node {node}: every row belongs to shard {shard + 1}'s orgs ({wrong} do not)")
            answers.append(ch(node, f"SELECT count(), sum(cost_nanos), sum(total_tokens) FROM {DB}.events").strip())
        checks.check(answers[0] == answers[1], f"shard {shard + 1}: both replicas hold the same rows ({' vs '.join(answers)})")
        for node in nodes:
            for rollup, column, raw, rolled in rollup_comparisons(DB, f"org_id IN ({org_list(orgs)})"):
                raw, rolled = ch(node, raw), ch(node, rolled)
                buckets = raw.count("\n")
                checks.check(raw == rolled, f"node {node}: {rollup} equals the raw rows in all {buckets} (org, {column}) buckets")
                if raw != rolled:
                    differ = sorted(set(raw.splitlines()) ^ set(rolled.splitlines()))[:6]
                    log("  differing buckets (org, bucket, count, tokens, cost, errors), raw and rollup lines:\n    "
                        + "\n    ".join(differ))
                    if rollup == "rollup_hourly":
                        diagnose(node, raw, rolled)

    now = datetime.now(timezone.utc)
    window = {"from": (now - timedelta(days=3)).strftime("%Y-%m-%dT%H:00:00Z"),
              "to": (now + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:00Z")}
    for org in orgs:
        want = len(ledger.ids[org["id"]])
        cost = int(ch(1, f"SELECT sum(cost_nanos) FROM {DB}.events_all WHERE org_id = '{org['id']}'").strip() or 0)
        summary = http_json("GET", f"{QUERY}/api/costs/summary?{urllib.parse.urlencode(window)}", key=org["key"])
        status = http_json("GET", f"{QUERY}/api/telemetry/status", key=org["key"])
        checks.check(summary["executionCount"] == want and summary["totalNanos"] == cost and status["totalEvents"] == want,
                     f"org {org['id'][:8]} (shard {org['shard'] + 1}): the query API sees exactly its {want} events "
                     f"(summary {summary['executionCount']}, status {status['totalEvents']}, cost {summary['totalNanos']} of {cost})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=240, help="seconds of load (the chaos needs 220 or more)")
    parser.add_argument("--rate", type=float, default=60, help="requests per second over all loader threads")
    parser.add_argument("--batch", type=int, default=20, help="events per request")
    parser.add_argument("--threads", type=int, default=6)
    parser.add_argument("--orgs", type=int, default=8)
    parser.add_argument("--no-chaos", action="store_true", help="the load and the checks, no failures")
    parser.add_argument("--chaos", default="consumer,kafka,replica,shard",
                        help="which failures of the schedule to cause (comma-separated: consumer, kafka, replica, shard)")
    parser.add_argument("--drain-timeout", type=int, default=900)
    args = parser.parse_args()

    orgs = create_orgs(args.orgs, admin_token(os.path.join(ROOT, "dev", "cluster.sh")))
    log(f"{len(orgs)} orgs: {Counter(o['shard'] + 1 for o in orgs)} per shard; waiting for both ingest replicas to know their keys")
    time.sleep(7)  # the consumers publish the new keys within 5 s; the ingest replicas read them at once
    ledger = Ledger()
    log(f"load: {args.rate} requests/s of {args.batch} events through nginx for {args.seconds} s"
        + ("" if args.no_chaos else ", with the chaos schedule"))
    run_load(args, orgs, ledger)
    expected = ledger.count()
    log(f"load done: {expected} distinct events answered 202 ({ledger.resent} sent again); answers {dict(ledger.statuses)}")
    drain(orgs, expected, args.drain_timeout)
    checks = Checks()
    verify(orgs, ledger, checks)
    print(f"{checks.passed} passed, {checks.failed} failed", flush=True)
    sys.exit(1 if checks.failed else 0)


if __name__ == "__main__":
    main()
