"""The end-to-end ledger the cluster suite and `make verify-e2e` share: SDK-like load with its own
`eventId`s (retried with the same ids until answered 202; now and then sent again after its 202,
as an SDK whose answer was lost), some invalid events when asked, and a record of every id the
ingest accepted and every event it rejected, per org."""

import http.client
import json
import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone

MODELS = [("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("anthropic", "claude-3-5-sonnet-20241022"), ("ollama", "llama3")]


def rollup_comparisons(db, where):
    """(rollup, its bucket column, SQL of the raw rows' totals per (org, bucket), SQL of the same
    totals from the rollup) for the hourly and daily rollups, over the rows `where` selects: the
    two answers must be equal, line for line."""
    for rollup, column, bucket in (("rollup_hourly", "hour", "toStartOfHour(timestamp)"), ("rollup_daily", "day", "toDate(timestamp)")):
        raw = (f"SELECT org_id, {bucket} AS b, count(), sum(total_tokens), sum(cost_nanos), sum(status = 'error') "
               f"FROM {db}.events WHERE {where} GROUP BY org_id, b ORDER BY org_id, b")
        rolled = (f"SELECT org_id, {column} AS b, countMerge(events), sumMerge(total_tokens_sum), sumMerge(cost_nanos_sum), "
                  f"sumMerge(errors) FROM {db}.{rollup} WHERE {where} GROUP BY org_id, b ORDER BY org_id, b")
        yield rollup, column, raw, rolled


class Ledger:
    def __init__(self):
        self.lock = threading.Lock()
        self.ids = defaultdict(set)  # org id -> event ids answered 202 (accepted)
        self.rejected = defaultdict(dict)  # org id -> event id -> the rejection's reason text
        self.resent = 0  # events of batches sent again after their 202
        self.statuses = Counter()
        self.requests = 0
        # Set by `finish` when retrying has lasted too long: the loaders then stop retrying and
        # record what was never answered 202 in `abandoned` (org id -> event ids).
        self.give_up = threading.Event()
        self.abandoned = defaultdict(set)

    def add(self, org, ids, resent=False):
        with self.lock:
            self.ids[org].update(ids)
            if resent:
                self.resent += len(ids)

    def count(self):
        with self.lock:
            return sum(len(v) for v in self.ids.values())

    def rejected_count(self):
        with self.lock:
            return sum(len(v) for v in self.rejected.values())

    def abandoned_count(self):
        with self.lock:
            return sum(len(v) for v in self.abandoned.values())

    def expected(self):
        """(org, event id) of every event answered 202."""
        with self.lock:
            return {(org, i) for org, ids in self.ids.items() for i in ids}

    def unknown(self):
        """(org, event id) of the events given up on: never answered, so stored or not."""
        with self.lock:
            return {(org, i) for org, ids in self.abandoned.items() for i in ids}

    def abandoned_check(self):
        """(ok, text) for the suites' checks: every request was answered 202 in the end."""
        n = self.abandoned_count()
        return n == 0, f"every request was answered 202 in the end ({n} events given up on, unanswered after the load)"

    def finish(self, stop, threads, wait=90.0, log=print):
        """Stops the loaders: each ends once its current request is answered 202 (an SDK retries
        until then). A pipeline that never recovered would keep them retrying for ever, so after
        `wait` seconds they give up; what they gave up on is in `abandoned` (the caller's checks
        fail on it). Returns the number of abandoned events."""
        stop.set()
        deadline = time.monotonic() + wait
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            log(f"the load's last requests were still unanswered {wait:g} s after it stopped: giving up on them "
                "(the pipeline did not recover; see the services' logs)")
            self.give_up.set()
            for thread in threads:
                thread.join()
        return self.abandoned_count()


def event(now, invalid=False):
    provider, model = random.choice(MODELS)
    prompt, completion = random.randint(10, 4000), random.randint(1, 900)
    e = {
        "eventId": str(uuid.uuid4()),
        "timestamp": (now - timedelta(seconds=random.randint(0, 48 * 3600))).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        "provider": provider, "model": model,
        "tokens": {"promptTokens": prompt, "completionTokens": completion, "totalTokens": prompt + completion},
        "latency": random.randint(50, 9000),
        "status": "error" if random.random() < 0.03 else "success",
        "userId": f"user-{random.randint(0, 40)}",
    }
    if random.random() < 0.5:
        e["cost"] = round(random.uniform(0, 0.2), 6)
    if invalid:  # one of the validation rules, at random
        kind = random.choice(["tokens", "timestamp", "latency"])
        if kind == "tokens":
            e["tokens"]["promptTokens"] = -1
        elif kind == "timestamp":
            e["timestamp"] = "not a time"
        else:
            e["latency"] = -5
    return e


def batch(size, invalid_ratio=0.0):
    now = datetime.now(timezone.utc)
    return [event(now, invalid=random.random() < invalid_ratio) for _ in range(size)]


# The ingest derives the id of the event at `index` of a request sent with `Idempotency-Key: key`
# by `org` as UUIDv5(IDEMPOTENCY_NAMESPACE, "org\nkey\nindex") (schemas/src/parse/validate.rs).
IDEMPOTENCY_NAMESPACE = uuid.UUID(int=0x7A11E5D04F1C4B7E9C3A1D2E3F405A6B)


def derived_event_id(org, key, index):
    return str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"{org}\n{key}\n{index}"))


def loader(ingest, orgs, ledger, stop, rate_per_thread, batch_size, invalid_ratio=0.0, resend_ratio=0.03,
           idempotency_ratio=0.0, timeout=30, observe=None):
    """Posts batches to `ingest` ((host, port)) at `rate_per_thread` per second until `stop`.

    A share `idempotency_ratio` of the batches carry no `eventId`s but an `Idempotency-Key` header,
    from which the ingest derives their ids. Every request is retried as it was (same body, same
    key) until it is answered 202, an SDK whose requests time out after `timeout` seconds.
    `observe(sent_at, seconds, status, events)` is told of every attempt (status "connection" or
    "timeout" when there was no answer)."""
    connection = None
    next_at = time.monotonic()
    while not stop.is_set():
        next_at += 1.0 / rate_per_thread
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        org = random.choice(orgs)
        events = batch(batch_size, invalid_ratio)
        headers = {"Content-Type": "application/json", "X-API-Key": org["key"]}
        if random.random() < idempotency_ratio:
            key = str(uuid.uuid4())
            headers["Idempotency-Key"] = key
            for index, e in enumerate(events):
                del e["eventId"]
                e["_id"] = derived_event_id(org["id"], key, index)
        body = json.dumps({"events": [{k: v for k, v in e.items() if k != "_id"} for e in events]}).encode()
        for e in events:
            e["eventId"] = e.pop("_id", None) or e["eventId"]
        sends = 2 if random.random() < resend_ratio else 1
        for attempt in range(sends):
            while not (stop.is_set() and attempt > 0):  # an SDK retries until answered 202, with the same ids
                if ledger.give_up.is_set():
                    if attempt == 0:
                        with ledger.lock:
                            ledger.abandoned[org["id"]].update(e["eventId"] for e in events)
                    return
                sent_at = time.time()
                try:
                    if connection is None:
                        connection = http.client.HTTPConnection(*ingest, timeout=timeout)
                    connection.request("POST", "/v1/ingest", body, headers)
                    response = connection.getresponse()
                    answer = response.read()
                    status = response.status
                except (OSError, http.client.HTTPException) as error:
                    connection = None
                    status = "timeout" if isinstance(error, TimeoutError) else "connection"
                with ledger.lock:
                    ledger.statuses[status] += 1
                    ledger.requests += 1
                if observe:
                    observe(sent_at, time.time() - sent_at, status, len(events))
                if status == 202:
                    record(ledger, org["id"], events, json.loads(answer), resent=attempt > 0)
                    break
                time.sleep(0.2)


def record(ledger, org, events, answer, resent=False):
    rejected = {r["index"]: r["reason"] for r in answer.get("rejected") or []}
    if answer.get("accepted", 0) + len(rejected) != len(events):
        raise SystemExit(f"the ingest's answer does not add up: {answer} for {len(events)} events")
    ledger.add(org, [e["eventId"] for i, e in enumerate(events) if i not in rejected], resent=resent)
    if not resent:
        with ledger.lock:
            for i, reason in rejected.items():
                ledger.rejected[org][events[i]["eventId"]] = reason
