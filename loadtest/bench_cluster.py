#!/usr/bin/env python3
"""`make bench-cluster`: what replication and sharding cost and give, in one run on this machine.

The same --events synthetic events (as the ingest writes them: one record per request of 100
events of one org, 1000 orgs, keyed by org) are preloaded into a fresh 8-partition topic on the
single broker of `make up` and into one on the three-broker cluster (replication factor 3, min
ISR 2), then drained by tally-consumer, each scenario into a fresh database:

  single      one consumer, the single-node ClickHouse (plain MergeTree)
  cluster-1   one consumer, the cluster (2 shards x 2 replicas, insert_quorum 2)
  cluster-2   two consumers in one group, the cluster

For each: rows/s (wall, from the consumer's start to the last row), the consumers' CPU seconds per
million rows, and every ClickHouse server's CPU seconds per million rows (one server, or the four
of the cluster summed: what replication costs per row). The cluster's own services are stopped
first (`dev/cluster.sh services-down`) so they do not compete; `dev/cluster.sh up` restarts them.

Usage: loadtest/bench_cluster.py [--events 2000000] [--skip single,...]
"""
import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_ingest as bi  # noqa: E402  (start/stop/cpu_seconds)

ROOT = bi.ROOT
TOOL = os.path.join(bi.BIN, "tally-consumer-bench")
CLUSTER_SH = os.path.join(ROOT, "dev", "cluster.sh")
SINGLE = {"ch": "http://127.0.0.1:8123", "kafka": "127.0.0.1:9092", "pids": [os.path.join(ROOT, ".dev", "run", "clickhouse.pid")]}
CLUSTER = {"ch": "http://127.0.0.1:8131", "kafka": "127.0.0.1:9192,127.0.0.1:9193,127.0.0.1:9194",
           "pids": [os.path.join(ROOT, ".dev", "cluster", "run", f"clickhouse-{n}.pid") for n in (1, 2, 3, 4)]}
SHARDS = "http://127.0.0.1:8131,http://127.0.0.1:8132;http://127.0.0.1:8133,http://127.0.0.1:8134"


def ch(url, sql):
    request = urllib.request.Request(url + "/", data=sql.encode())
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read().decode().strip()


def server_cpu(side):
    return sum(bi.cpu_seconds(int(open(p).read().strip())) for p in side["pids"])


def env_of(side, database, topic, cluster):
    env = {"TALLY_CLICKHOUSE_URL": side["ch"], "TALLY_CLICKHOUSE_DATABASE": database, "TALLY_KAFKA_BROKERS": side["kafka"],
           "TALLY_EVENTS_TOPIC": topic, "TALLY_CONSUMER_GROUP": "bench-" + topic + "-" + database}
    if cluster:
        env.update({"TALLY_CLICKHOUSE_CLUSTER": "tally", "TALLY_CLICKHOUSE_SHARDS": SHARDS})
    return env


def migrate(side, database, cluster):
    env = dict(os.environ, **env_of(side, database, "unused", cluster))
    subprocess.run([os.path.join(bi.BIN, "tally-consumer"), "migrate"], env=env, check=True, capture_output=True)


def count(side, database, cluster):
    table = "events_all" if cluster else "events"
    return int(ch(side["ch"], f"SELECT count() FROM {database}.{table}"))


def drain(name, side, topic, events, consumers, cluster):
    database = "bench_cluster_" + uuid.uuid4().hex[:8]
    migrate(side, database, cluster)
    server_before = server_cpu(side)
    started = time.time()
    processes = [bi.start("tally-consumer", dict(env_of(side, database, topic, cluster),
                                                   TALLY_MIGRATE="false", TALLY_LISTEN_ADDR=f"127.0.0.1:{18090 + i}",
                                                   TALLY_CONSUMER_INSTANCE_ID=f"{database}-{i}"))
                 for i in range(consumers)]
    try:
        last, changed, rows = -1, time.time(), 0
        next_progress = time.time() + 10
        while rows < events:
            rows = count(side, database, cluster)
            if rows != last:
                last, changed = rows, time.time()
            elif time.time() - changed > 120:
                raise SystemExit(f"{name}: stalled at {rows} of {events} rows")
            if time.time() >= next_progress:
                print(f"  {name}: {rows:>9} of {events} rows, {rows / (time.time() - started):,.0f} rows/s so far", flush=True)
                next_progress += 10
            time.sleep(0.25)
        seconds = time.time() - started
        consumer_cpu = sum(bi.cpu_seconds(p.pid) for p in processes)
    finally:
        for process in processes:
            bi.stop(process)
    server = server_cpu(side) - server_before
    on_cluster = " ON CLUSTER tally" if cluster else ""
    for db in (database, database + "_admin"):
        ch(side["ch"], f"DROP DATABASE IF EXISTS {db}{on_cluster}")
    return {"scenario": name, "rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
            "consumer_cpu_s_per_m": round(consumer_cpu / rows * 1e6, 2),
            "clickhouse_cpu_s_per_m": round(server / rows * 1e6, 2), "database": database}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--skip", default="", help="comma-separated scenarios to skip")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    subprocess.run(["bash", CLUSTER_SH, "services-down"], check=True, capture_output=True)
    print(f"nproc={os.cpu_count()}; load average before: {open('/proc/loadavg').read().split()[:3]}", flush=True)
    topic = "tally.bench.cluster." + uuid.uuid4().hex[:8]
    bi.create_topic(topic, 8)
    subprocess.run(["bash", CLUSTER_SH, "create-topic", topic, "8"], check=True)
    results = []
    try:
        for side in (SINGLE, CLUSTER):
            env = dict(os.environ, TALLY_KAFKA_BROKERS=side["kafka"])
            out = subprocess.run([TOOL, "preload", topic, str(args.events), "100"], env=env, check=True,
                                 capture_output=True, text=True).stdout
            loaded = json.loads(out.strip().splitlines()[-1])
            print(f"preloaded {loaded['events']} events into {topic} on {side['kafka']} in {loaded['seconds']:.1f} s", flush=True)
        for name, side, consumers, cluster in (("single", SINGLE, 1, False), ("cluster-1", CLUSTER, 1, True),
                                               ("cluster-2", CLUSTER, 2, True)):
            if name in skip:
                continue
            result = drain(name, side, topic, args.events, consumers, cluster)
            results.append(result)
            print(json.dumps(result), flush=True)
    finally:
        bi.delete_topic(topic)
        subprocess.run(["bash", CLUSTER_SH, "delete-topic", topic], check=False)
    print(f"\n{'scenario':<10} {'rows/s':>10} {'consumer CPU s/M':>17} {'ClickHouse CPU s/M':>19}")
    for r in results:
        print(f"{r['scenario']:<10} {r['rows_per_s']:>10,} {r['consumer_cpu_s_per_m']:>17} {r['clickhouse_cpu_s_per_m']:>19}")
    by = {r["scenario"]: r for r in results}
    if "single" in by and "cluster-1" in by:
        print(f"cluster-1 / single: {by['cluster-1']['rows_per_s'] / by['single']['rows_per_s']:.2f}x rows/s, "
              f"{by['cluster-1']['clickhouse_cpu_s_per_m'] / by['single']['clickhouse_cpu_s_per_m']:.2f}x ClickHouse CPU per row")
    if "cluster-1" in by and "cluster-2" in by:
        print(f"cluster-2 / cluster-1: {by['cluster-2']['rows_per_s'] / by['cluster-1']['rows_per_s']:.2f}x rows/s")
    print("load average after:", open("/proc/loadavg").read().split()[:3])


if __name__ == "__main__":
    main()
