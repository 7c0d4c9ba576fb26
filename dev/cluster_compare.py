#!/usr/bin/env python3
"""Same answers on the cluster as on one server (issue 13): `make test-cluster` runs it.

Generates one data set (fixed seed: 30 days of events of several users, providers, models,
statuses, with and without a client cost, every timestamp distinct), sends it through the ingest
of the single-node stack (`make up`: ingest :8080, query API :8081) and through the cluster's
nginx (`dev/cluster.sh up`: :8280, query API :8285), each to an org of its own, waits until both
have stored all of it, then asks both query APIs every org-scoped endpoint — status, cost
summary over whole and ragged ranges, the events list with filters and every cursor page, the
budget, the analytics (overview, timeseries by hour and by day in two time zones and by
provider/model/user, perf, costs) and the per-user analytics — and requires identical JSON once
each org's id is replaced by a placeholder. The last line is `N passed, M failed`.

  python3 dev/cluster_compare.py [--events 20000]
"""

import argparse
import json
import os
import random
import sys
import time
import urllib.parse
import uuid
from datetime import datetime, timedelta, timezone

from tally_api import admin_token, call

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SINGLE = {"ingest": "http://127.0.0.1:8080", "query": "http://127.0.0.1:8081", "token_from": os.path.join(ROOT, "dev", "stack.sh")}
CLUSTER = {"ingest": "http://127.0.0.1:8280", "query": "http://127.0.0.1:8285", "token_from": os.path.join(ROOT, "dev", "cluster.sh")}
MODELS = [("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("anthropic", "claude-3-5-sonnet-20241022"), ("ollama", "llama3")]


def log(message):
    print(f"[cluster-compare {time.strftime('%H:%M:%S')}] {message}", flush=True)


def data_set(count, seed, now):
    """`count` events over the 30 days before `now`, each timestamp distinct (ms)."""
    rng = random.Random(seed)
    span_ms = 30 * 86_400_000
    offsets = rng.sample(range(60_000, span_ms), count)
    events = []
    for offset in offsets:
        provider, model = rng.choice(MODELS)
        prompt, completion = rng.randint(5, 6000), rng.randint(1, 1500)
        event = {
            "eventId": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "timestamp": (now - timedelta(milliseconds=offset)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "provider": provider, "model": model,
            "tokens": {"promptTokens": prompt, "completionTokens": completion, "totalTokens": prompt + completion},
            "latency": rng.randint(20, 20_000),
            "status": "error" if rng.random() < 0.05 else "success",
            "userId": f"user-{rng.randint(0, 12)}",
            "executionId": f"exec-{rng.randint(0, 500)}",
        }
        if rng.random() < 0.5:
            event["cost"] = round(rng.uniform(0, 0.5), 9)
        events.append(event)
    return events


def setup(side, name):
    token = admin_token(side["token_from"])
    status, created = call("POST", f"{side['query']}/admin/orgs", token=token, body={
        "name": name, "plan": "ENTERPRISE", "rateLimitPerMin": 10_000_000, "rateLimitBurst": 1_000_000})
    if status != 201:
        raise SystemExit(f"creating an org on {side['query']} answered {status}: {created}")
    side["org"], side["key"] = created["orgId"], created["apiKey"]
    # On the cluster the query API reads the admin tables through any node: a key is known once
    # the node read has fetched its row (replication, usually well under a second).
    for _ in range(50):
        status, _ = call("PUT", f"{side['query']}/api/costs/budget", key=side["key"], body={"limit": 1234.5, "thresholds": [50, 80, 100]})
        if status != 401:
            break
        time.sleep(0.2)
    if status not in (200, 201, 204):
        raise SystemExit(f"setting the budget answered {status}")


def send(side, events, batch=200):
    deadline = time.monotonic() + 30
    while True:  # the ingest replicas learn the new key at their next refresh
        status, _ = call("POST", f"{side['ingest']}/v1/ingest", key=side["key"], body={"events": []})
        if status != 401 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    for start in range(0, len(events), batch):
        body = {"events": events[start:start + batch]}
        while True:
            status, answer = call("POST", f"{side['ingest']}/v1/ingest", key=side["key"], body=body)
            if status == 202:
                if answer["accepted"] != len(body["events"]):
                    raise SystemExit(f"{side['ingest']} accepted {answer} of {len(body['events'])}")
                break
            time.sleep(0.3)  # 401 from a replica that has not refreshed yet, 503: retry, same ids


def wait_stored(side, count, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, answer = call("GET", f"{side['query']}/api/telemetry/status", key=side["key"])
        if status == 200 and answer["totalEvents"] >= count:
            return answer["totalEvents"]
        time.sleep(2)
    raise SystemExit(f"{side['query']} stored {answer} of {count} events after {timeout} s")


def requests(now):
    """Every (label, path) asked of both query APIs."""
    iso = lambda t: t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    whole = {"from": iso(now - timedelta(days=31)), "to": iso(now + timedelta(minutes=5))}
    ragged = {"from": iso(now - timedelta(days=17, hours=5, minutes=13, seconds=7, milliseconds=321)),
              "to": iso(now - timedelta(days=2, hours=3, minutes=1, milliseconds=17))}
    week = {"from": iso(now - timedelta(days=7, minutes=29)), "to": iso(now - timedelta(hours=1, minutes=7))}
    out = [("status", "/api/telemetry/status"), ("budget", "/api/costs/budget")]
    for label, window in (("whole", whole), ("ragged", ragged), ("week", week)):
        q = lambda **extra: urllib.parse.urlencode({**window, **extra})
        out += [
            (f"summary {label}", f"/api/costs/summary?{q()}"),
            (f"overview {label}", f"/api/analytics/overview?{q()}"),
            (f"overview {label} openai", f"/api/analytics/overview?{q(provider='openai')}"),
            (f"perf {label}", f"/api/analytics/perf?{q()}"),
            (f"costs {label}", f"/api/analytics/costs?{q()}"),
            (f"costs {label} user-3", f"/api/analytics/costs?{q(userId='user-3')}"),
            (f"timeseries {label} hour", f"/api/analytics/timeseries?{q(bucket='hour')}"),
            (f"timeseries {label} day Kolkata", f"/api/analytics/timeseries?{q(bucket='day', tz='Asia/Kolkata')}"),
            (f"timeseries {label} day Adelaide by model", f"/api/analytics/timeseries?{q(bucket='day', tz='Australia/Adelaide', groupBy='model')}"),
            (f"timeseries {label} day by provider", f"/api/analytics/timeseries?{q(bucket='day', groupBy='provider')}"),
            (f"user-5 overview {label}", f"/analytics/user/user-5/overview?{q()}"),
            (f"user-5 timeseries {label}", f"/analytics/user/user-5/timeseries?{q(bucket='day', tz='Europe/Paris')}"),
            (f"user-5 perf {label}", f"/analytics/user/user-5/perf?{q()}"),
            (f"user-5 costs {label} gpt-4o", f"/analytics/user/user-5/costs?{q(model='gpt-4o')}"),
            (f"events {label} errors of anthropic", f"/api/costs?{q(status='error', provider='anthropic', limit=50, offset=10)}"),
            (f"events {label} exec-42", f"/api/costs?{q(executionId='exec-42')}"),
        ]
    return out, whole


def normalize(value, side):
    return json.loads(json.dumps(value).replace(side["org"], "<org>"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    for side, how in ((SINGLE, "make up"), (CLUSTER, "make cluster-up")):
        try:
            call("GET", f"{side['query']}/healthz", timeout=5)
        except OSError:
            raise SystemExit(f"nothing answers on {side['query']}: start it with `{how}` first")
    now = datetime.now(timezone.utc).replace(microsecond=0)
    events = data_set(args.events, args.seed, now)
    name = f"compare-{uuid.uuid4().hex[:8]}"
    for side in (SINGLE, CLUSTER):
        setup(side, name)
        log(f"{side['ingest']}: org {side['org'][:8]}, sending {len(events)} events")
        send(side, events)
    for side in (SINGLE, CLUSTER):
        log(f"{side['query']}: {wait_stored(side, len(events))} events stored")
    passed = failed = 0

    def compare(label, path):
        nonlocal passed, failed
        answers = []
        for side in (SINGLE, CLUSTER):
            status, body = call("GET", f"{side['query']}{path}", key=side["key"])
            answers.append((status, normalize(body, side)))
        if answers[0] == answers[1] and answers[0][0] == 200:
            passed += 1
            return answers[0][1]
        failed += 1
        log(f"FAIL {label}: {path}\n  single:  {json.dumps(answers[0])[:600]}\n  cluster: {json.dumps(answers[1])[:600]}")
        return None

    asked, whole = requests(now)
    for label, path in asked:
        compare(label, path)
    # Every page of the events list, by cursor.
    pages, cursor = 0, None
    while True:
        query = {**whole, "limit": 1000, **({"cursor": cursor} if cursor else {})}
        page = compare(f"events page {pages + 1}", f"/api/costs?{urllib.parse.urlencode(query)}")
        pages += 1
        if not page or not page.get("nextCursor"):
            break
        cursor = page["nextCursor"]
    log(f"{len(asked)} requests and {pages} event pages asked of both query APIs")
    print(f"{passed} passed, {failed} failed", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
