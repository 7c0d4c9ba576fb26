#!/usr/bin/env python3
"""`make bench-consumer`: the consumer benchmark, in one run on this machine.

1. Preloads a fresh topic (8 partitions) with --events synthetic events, as the ingest writes them
   (one record per request of --per-record events of one org, 1000 orgs, keyed by org, lz4), in
   each record format of --formats (JSONEachRow, RowBinary: one topic each, the same events).
2. Drains the same rows into ClickHouse three ways, each into its own freshly migrated database
   (the events table with its two rollup views):
   ceiling  the preloaded rows themselves (same ids, times and values), written in RowBinary as the
            consumer writes them before the clock starts, then inserted as the consumer inserts
            (100 000 rows per INSERT, streamed in 256 KiB chunks): no Kafka, no decoding
   tally    tally-consumer draining the topic (its own group; reconciliation and dedup on);
            `tally-rowbinary` drains the RowBinary topic
   engine   ClickHouse's Kafka table engine reading the records in their format (`engine`:
            JSONEachRow, `engine-rowbinary`: RowBinary) with a materialized view into the events
            table, draining the same topic with its own group
   and prints rows/s, CPU seconds per million rows of the client process and of clickhouse-server,
   the client's peak RSS, and "CH busy": the share of the drain ClickHouse spent in INSERTs (the
   rest it waited for the client between inserts; see insert_busy).
3. Freshness: the whole pipeline (ingest with the Kafka sink writing the first of --formats, consumer) under a steady
   --fresh-rate events/s (open model, 100 events/request); a marker event is sent every
   ~100 ms and the time from its 2xx to its row being visible in ClickHouse is measured by
   polling a point lookup every 10 ms. Prints p50/p95/p99/max.

Usage: loadtest/bench_consumer.py [--events 20000000] [--per-record 100] [--skip engine,...]
                                  [--formats JSONEachRow,RowBinary] [--rounds N] [--baseline DIR]
                                  [--fresh-rate 50000] [--fresh-seconds 60]
Needs the local stack (dev/stack.sh infra-up) and release binaries (cargo build --release).
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_ingest as bi  # noqa: E402  (shared helpers: start/stop/wait_http/cpu/loadgen/bench_org)

CH = os.environ.get("TALLY_CLICKHOUSE_URL", "http://127.0.0.1:8123")
# The consumer's default TALLY_BATCH_MAX_ROWS (consumer/src/config.rs).
CONSUMER_BATCH_ROWS = 100_000
TOOL = os.path.join(bi.BIN, "tally-consumer-bench")

# The record's JSON keys: every column of tally.events but the Kafka position.
RECORD_COLUMNS = """org_id String, event_id UUID, timestamp DateTime('UTC'), timestamp_ms UInt16,
    received_at DateTime('UTC'), provider String, model String, prompt_tokens UInt32,
    completion_tokens UInt32, total_tokens UInt32, cost_nanos Int64,
    cost_source Enum8('client' = 1, 'computed' = 2, 'unknown' = 3), latency_ms UInt32,
    status Enum8('success' = 1, 'error' = 2), http_status UInt16, error String, execution_id String,
    agent_id String, user_id String, service String, action String, request_id String,
    input_bytes UInt64, output_bytes UInt64, metadata_keys Array(String), metadata_values Array(String)"""


def ch(sql):
    request = urllib.request.Request(CH + "/", data=sql.encode())
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read().decode().strip()


def clickhouse_pid():
    return int(open(os.path.join(bi.ROOT, ".dev", "run", "clickhouse.pid")).read().strip())


def peak_rss_mib(pid):
    for line in open("/proc/%d/status" % pid):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def tool(*args):
    out = subprocess.run([TOOL, *map(str, args)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def count_rows(database):
    return int(ch("SELECT count() FROM %s.events" % database))


def wait_rows(database, expected, timeout, stall=60):
    """When the table holds `expected` rows, or when its count stopped moving for `stall` seconds
    (then the time of its last change): returns (time, rows)."""
    deadline = time.time() + timeout
    last, changed = -1, time.time()
    while time.time() < deadline:
        rows = count_rows(database)
        if rows >= expected:
            return time.time(), rows
        if rows != last:
            last, changed = rows, time.time()
        elif time.time() - changed > stall:
            print("%s.events stalled at %d of %d rows for %d s" % (database, rows, expected, stall), file=sys.stderr)
            return changed, rows
        time.sleep(0.25)
    raise SystemExit("%s.events never reached %d rows (has %d)" % (database, expected, count_rows(database)))


def run_ceiling(database, events, per_record, now_ms, batch_rows):
    """The preload's own rows (its per-record count and clock), RowBinary built before the clock
    starts, inserted as the consumer inserts; without a preload (tally and engine skipped) rows of
    the same shape."""
    ch_before = bi.cpu_seconds(clickhouse_pid())
    started = time.time()
    command = [TOOL, "ceiling", database, str(events), str(batch_rows), str(per_record)] + ([str(now_ms)] if now_ms else [])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = status
    result = json.loads(process.stdout.read().strip().splitlines()[-1])
    if status != 0:
        raise SystemExit("ceiling failed")
    return {"scenario": "ceiling", "rows": result["rows"], "seconds": result["seconds"],
            "client_cpu_s": usage.ru_utime + usage.ru_stime,
            "clickhouse_cpu_s": bi.cpu_seconds(clickhouse_pid()) - ch_before,
            "client_rss_mib": usage.ru_maxrss / 1024, "wall_incl_build_s": time.time() - started}


def run_tally(database, topic, events, batch_rows, binary="tally-consumer"):
    """The consumer reads each record in the format its `tally-format` header names."""
    ch_before = bi.cpu_seconds(clickhouse_pid())
    started = time.time()
    process = bi.start(binary, {
        "TALLY_CLICKHOUSE_DATABASE": database, "TALLY_EVENTS_TOPIC": topic, "TALLY_MIGRATE": "false",
        "TALLY_CONSUMER_GROUP": "bench-" + database, "TALLY_LISTEN_ADDR": "127.0.0.1:18082",
        "TALLY_BATCH_MAX_ROWS": str(batch_rows)})
    try:
        finished, _ = wait_rows(database, events, 3600)
        cpu = bi.cpu_seconds(process.pid)
        rss = peak_rss_mib(process.pid)
    finally:
        bi.stop(process)
    return {"scenario": "tally", "rows": count_rows(database), "seconds": finished - started, "client_cpu_s": cpu,
            "clickhouse_cpu_s": bi.cpu_seconds(clickhouse_pid()) - ch_before, "client_rss_mib": rss}


def run_engine(database, topic, events, record_format="JSONEachRow"):
    ch_before = bi.cpu_seconds(clickhouse_pid())
    started = time.time()
    # The engine reads the records in their own format: RowBinary records hold the same columns,
    # in this order, as binary rows.
    ch("CREATE TABLE %s.events_queue (%s) ENGINE = Kafka('127.0.0.1:9092', '%s', '%s', '%s')"
       % (database, RECORD_COLUMNS, topic, "bench-engine-" + topic, record_format))
    ch("CREATE MATERIALIZED VIEW %s.events_from_kafka TO %s.events AS SELECT *, toUInt16(0) AS kafka_partition, toUInt64(0) AS kafka_offset, toUInt32(0) AS kafka_index FROM %s.events_queue"
       % (database, database, database))
    try:
        finished, _ = wait_rows(database, events, 3600)
        cpu = bi.cpu_seconds(clickhouse_pid()) - ch_before
    finally:
        ch("DROP TABLE IF EXISTS %s.events_from_kafka" % database)
        ch("DROP TABLE IF EXISTS %s.events_queue" % database)
    return {"scenario": "engine", "rows": count_rows(database), "seconds": finished - started, "client_cpu_s": 0.0,
            "clickhouse_cpu_s": cpu, "client_rss_mib": 0.0}


def insert_busy(database):
    """How much of a drain ClickHouse spent inserting: the sum of the INSERTs' durations over the
    time from the first one's start to the last one's end (system.query_log; whole seconds on 18.16).
    Near 1 for the ceiling; what is missing is time ClickHouse waited for the client between inserts.
    Unlike rows/s, it hardly moves with the machine's speed, so it compares runs minutes apart."""
    ch("SYSTEM FLUSH LOGS")
    out = ch("SELECT count(), sum(query_duration_ms) / 1000, toUInt64(max(event_time)) - toUInt64(min(query_start_time)) "
             "FROM system.query_log WHERE type = 2 AND query LIKE 'INSERT INTO %s.events%%'" % database)
    inserts, busy, span = out.split("\t")
    return {"inserts": int(inserts), "insert_busy_s": float(busy), "insert_span_s": max(1, int(span))}


def settle():
    """Lets the machine finish what the last drain left: its parts written back to disk (a drain
    writes gigabytes; the next one would share the disk with that write-back) and no merge
    running. It does not remove the order effect: with it, an A/A run (session 16) still had the
    same binary 1.2x faster right after the ceiling than after itself in one round of two, which
    is why rounds also rotate the order."""
    started = time.time()
    os.sync()
    while time.time() - started < 60 and int(ch("SELECT count() FROM system.merges") or 0) > 0:
        time.sleep(0.5)


def table_sums(database):
    """What a drain stored, to compare across drains: count, distinct ids, tokens and exact cost."""
    return ch("SELECT count(), uniqExact(org_id, event_id), sum(total_tokens), sum(cost_nanos) FROM %s.events"
              % database)


def freshness(rate, seconds, record_format="JSONEachRow"):
    database = "tally_bench_%08x" % random.getrandbits(32)
    key = bi.bench_org(database)
    org = ch("SELECT org_id FROM %s_admin.orgs LIMIT 1" % database)
    topic = "tally.bench.fresh.%08x" % random.getrandbits(32)
    bi.create_topic(topic, 8)
    env = {"TALLY_CLICKHOUSE_DATABASE": database, "TALLY_EVENTS_TOPIC": topic}
    ingest = bi.start("tally-ingest", dict(env, TALLY_LISTEN_ADDR="127.0.0.1:18080", TALLY_RECORD_FORMAT=record_format))
    consumer = bi.start("tally-consumer", dict(env, TALLY_LISTEN_ADDR="127.0.0.1:18082",
                                              TALLY_CONSUMER_GROUP="bench-" + topic))
    samples, errors = [], []
    try:
        bi.wait_http("http://127.0.0.1:18080/readyz", 60)
        bi.wait_http("http://127.0.0.1:18082/readyz", 60)
        load = {}
        thread = threading.Thread(target=lambda: load.update(
            bi.loadgen("http://127.0.0.1:18080", key, 100, seconds, 64, rate=rate / 100)))
        thread.start()
        time.sleep(3)  # steady state first
        deadline = time.time() + seconds - 6
        while time.time() < deadline:
            event_id = str(uuid.uuid4())
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
            body = json.dumps({"events": [{"eventId": event_id, "timestamp": stamp, "provider": "openai",
                                           "model": "gpt-4o", "latency": 1, "status": "success",
                                           "tokens": {"promptTokens": 1, "completionTokens": 1, "totalTokens": 2}}]})
            request = urllib.request.Request("http://127.0.0.1:18080/v1/ingest", data=body.encode(), headers={
                "X-API-Key": key, "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as response:
                acked = time.time()
                if response.status != 202:
                    errors.append(response.status)
                    continue
            lookup = ("SELECT count() FROM %s.events WHERE org_id = '%s' AND timestamp = toDateTime('%s', 'UTC') "
                      "AND event_id = toUUID('%s')" % (database, org, stamp[:19].replace("T", " "), event_id))
            while ch(lookup) == "0":
                if time.time() - acked > 30:
                    raise SystemExit("marker %s not visible after 30 s" % event_id)
                time.sleep(0.01)
            samples.append(time.time() - acked)
            time.sleep(0.1)
        thread.join()
    finally:
        bi.stop(ingest)
        bi.stop(consumer)
        ch("DROP DATABASE IF EXISTS " + database)
        ch("DROP DATABASE IF EXISTS " + database + "_admin")
        bi.delete_topic(topic)
    samples.sort()

    def pct(p):
        return samples[min(len(samples) - 1, int(p / 100 * len(samples)))] * 1000

    # Without TALLY_BATCH_MAX_WAIT_MS the consumer waits its default, 250 ms.
    return {"rate": rate, "seconds": seconds, "record_format": record_format, "markers": len(samples), "p50_ms": pct(50), "p95_ms": pct(95),
            "p99_ms": pct(99), "max_ms": samples[-1] * 1000, "load_events_per_s": load.get("accepted_events_per_s"),
            "load_statuses": load.get("statuses"), "batch_max_wait_ms": os.environ.get("TALLY_BATCH_MAX_WAIT_MS", "250"),
            "samples_ms": [round(x * 1000, 1) for x in samples]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20_000_000)
    parser.add_argument("--per-record", type=int, default=100)
    parser.add_argument("--skip", default="", help="comma list of ceiling,tally,engine,freshness")
    parser.add_argument("--fresh-rate", type=float, default=50_000)
    parser.add_argument("--fresh-seconds", type=float, default=60)
    parser.add_argument("--record-freshness", metavar="JSON",
                        help="append the freshness run (every marker's 202-to-visible time) to this file; "
                             "loadtest/plot_freshness.py draws it")
    parser.add_argument("--rounds", type=int, default=1,
                        help="drain the same topic this many times (ceiling, tally, baseline in turn each round, "
                             "each round starting one later; the engine once): on a shared machine whose speed "
                             "drifts, each round's ratio compares runs a minute apart, and the median of the "
                             "rounds is the figure")
    parser.add_argument("--batch-rows", type=int, default=CONSUMER_BATCH_ROWS,
                        help="rows per INSERT of the ceiling, and the consumer's TALLY_BATCH_MAX_ROWS (default: the "
                             "consumer's default): the two insert alike")
    parser.add_argument("--formats", default="JSONEachRow",
                        help="comma list of record formats (JSONEachRow, RowBinary): a topic of the same events in "
                             "each, drained by tally and the engine in the same rounds")
    parser.add_argument("--baseline", metavar="DIR",
                        help="each round also drains with DIR/tally-consumer (another build, e.g. from a git "
                             "worktree): an A/B of two consumers in one sitting, on the same records")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    formats = list(filter(None, args.formats.split(",")))
    unknown = set(formats) - {"JSONEachRow", "RowBinary"}
    if unknown or not formats:
        raise SystemExit("--formats takes JSONEachRow and/or RowBinary, not %s" % ", ".join(sorted(unknown)))
    suffix = "%08x" % random.getrandbits(32)
    topics = {f: "tally.bench.consumer.%s.%s" % (f.lower(), suffix) for f in formats}

    def kind(base, record_format):
        """`tally`/`engine` for JSONEachRow records, `tally-rowbinary`/`engine-rowbinary` for RowBinary."""
        return base if record_format == "JSONEachRow" else base + "-" + record_format.lower()

    runs = []  # (round, name, run function)
    for number in range(1, args.rounds + 1):
        round_runs = []
        if "ceiling" not in skip:
            round_runs.append((number, "ceiling",
                               lambda db: run_ceiling(db, args.events, args.per_record, loaded.get("now_ms"), args.batch_rows)))
        if "tally" not in skip:
            for f in formats:
                round_runs.append((number, kind("tally", f), lambda db, t=topics[f]: run_tally(db, t, args.events, args.batch_rows)))
        if args.baseline:
            binary = os.path.join(os.path.abspath(args.baseline), "tally-consumer")
            round_runs.append((number, "baseline",
                               lambda db, b=binary: run_tally(db, topics[formats[0]], args.events, args.batch_rows, b)))
        # Each round starts with another drain: whatever state one drain leaves for the next
        # is spread over all of them.
        shift = (number - 1) % max(1, len(round_runs))
        runs.extend(round_runs[shift:] + round_runs[:shift])
    if "engine" not in skip:
        for f in formats:
            runs.append((1, kind("engine", f), lambda db, f=f: run_engine(db, topics[f], args.events, f)))
    rows = []
    loaded = {}
    try:
        if {"tally", "engine"} - skip or args.baseline:
            for f in formats:
                bi.create_topic(topics[f], 8)
                # Every topic holds the same events: the first preload's clock for the others.
                extra = [f] + ([loaded["now_ms"]] if loaded else [])
                this = tool("preload", topics[f], args.events, args.per_record, *extra)
                loaded = loaded or this
                print("preloaded %d events in %d records (%.1f MB of %s) in %.1f s" % (
                    this["events"], this["records"], this["payload_bytes"] / 1e6, f, this["seconds"]), flush=True)
        for number, name, run in runs:
            label = name if args.rounds == 1 else "%s.%d" % (name, number)
            database = "tally_bench_%s_%s_%d" % (name.replace("-", "_"), suffix, number)
            tool("migrate", database)
            try:
                result = dict(run(database), scenario=label, round=number, kind=name)
                if not name.startswith("engine"):
                    result.update(insert_busy(database))
                rows.append(result)
                print(json.dumps(result), file=sys.stderr, flush=True)
                result["sums"] = table_sums(database)
            finally:
                ch("DROP DATABASE IF EXISTS " + database)
                ch("DROP DATABASE IF EXISTS " + database + "_admin")
                settle()
    finally:
        for t in topics.values():
            bi.delete_topic(t)
    # The drains' topic (~12 GB) is gone before the freshness run, which measures the pipeline
    # alone. Session 22: with the topic still on the broker, the run after the drains measured p99
    # 668 ms; with it deleted first, 320 ms; the freshness run on its own, 381 and 438 ms.
    fresh = None
    if "freshness" not in skip:
        settle()
        fresh = freshness(args.fresh_rate, args.fresh_seconds, formats[0])

    print("\nnproc=%d  events=%d  per record=%d  rows per insert=%d  (everything on this machine)" % (
        os.cpu_count(), args.events, args.per_record, args.batch_rows))
    print("%-17s %10s %9s %12s %16s %16s %10s %9s" % ("scenario", "rows", "seconds", "rows/s", "client cpu s/M",
                                                      "clickhouse cpu s/M", "rss MiB", "CH busy"))
    for r in rows:
        million = r["rows"] / 1e6
        busy = "%.0f%%" % (100 * r["insert_busy_s"] / r["insert_span_s"]) if "insert_span_s" in r else "-"
        print("%-17s %10d %9.1f %12.0f %16.2f %16.2f %10.1f %9s%s" % (
            r["scenario"], r["rows"], r["seconds"], r["rows"] / r["seconds"], r["client_cpu_s"] / million,
            r["clickhouse_cpu_s"] / million, r["client_rss_mib"], busy,
            "" if r["rows"] >= args.events else "  (stalled: %d rows missing)" % (args.events - r["rows"])))
    speed = {(r["round"], r["kind"]): r["rows"] / r["seconds"] for r in rows}
    for name in [kind("tally", f) for f in formats] + ["baseline"]:
        ratios = [speed[(n, name)] / speed[(n, "ceiling")] for n in range(1, args.rounds + 1)
                  if (n, name) in speed and (n, "ceiling") in speed]
        if ratios:
            print("%s / ceiling: %s%s" % (name, ", ".join("%.1f%%" % (100 * x) for x in ratios),
                                          "" if len(ratios) == 1 else "  (median %.1f%%)" % (100 * statistics.median(ratios))))
    if len(formats) > 1 and "tally" not in skip:
        ab = [speed[(n, "tally-rowbinary")] / speed[(n, "tally")] for n in range(1, args.rounds + 1)
              if (n, "tally-rowbinary") in speed and (n, "tally") in speed]
        print("tally-rowbinary / tally (rows/s, same round): %s" % ", ".join("%.3f" % x for x in ab))
    if args.baseline:
        ab = [speed[(n, "tally")] / speed[(n, "baseline")] for n in range(1, args.rounds + 1)
              if (n, "tally") in speed and (n, "baseline") in speed]
        print("tally / baseline (rows/s, same round): %s" % ", ".join("%.3f" % x for x in ab))
    for f in formats:
        if (1, kind("tally", f)) in speed and (1, kind("engine", f)) in speed:
            print("%s / kafka engine on the same %s records: %.2fx" % (
                kind("tally", f), f, speed[(1, kind("tally", f))] / speed[(1, kind("engine", f))]))
    sums = {r["scenario"]: r["sums"] for r in rows if "sums" in r}
    for name, value in sums.items():
        print("%-17s count, distinct ids, tokens, cost_nanos: %s" % (name, value.replace("\t", ", ")))
    if fresh:
        print("freshness (%s records) at %.0f events/s for %.0f s (%d markers, load %s events/s %s): p50 %.0f ms, "
              "p95 %.0f ms, p99 %.0f ms, max %.0f ms" % (fresh["record_format"], fresh["rate"], fresh["seconds"], fresh["markers"],
                                            fresh["load_events_per_s"], json.dumps(fresh["load_statuses"]),
                                            fresh["p50_ms"], fresh["p95_ms"], fresh["p99_ms"], fresh["max_ms"]))
        if args.record_freshness:
            runs = []
            if os.path.exists(args.record_freshness):
                with open(args.record_freshness) as f:
                    runs = json.load(f)["runs"]
            runs.append(dict(fresh, nproc=os.cpu_count(), recorded_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
            with open(args.record_freshness, "w") as f:
                json.dump({"runs": runs}, f)
            print("freshness run recorded in %s" % args.record_freshness)


if __name__ == "__main__":
    main()
