#!/usr/bin/env python3
"""Memory soak: does the ingest's memory stay flat whether or not /metrics is scraped?

Two ingest replicas produce to the local Kafka under the same open-model load; replica A's
/metrics is scraped every second, replica B's never. RSS of both is sampled every 30 s; the run
prints the series and each replica's growth between the first sample after warm-up and the last.

Usage: loadtest/soak_memory.py [--minutes 30] [--rate 100000] [--events 100]
"""
import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_ingest as bench  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--rate", type=float, default=100000, help="events per second, both replicas together")
    parser.add_argument("--events", type=int, default=100)
    args = parser.parse_args()
    seconds = args.minutes * 60

    database = "tally_soak_%08x" % random.getrandbits(32)
    key = bench.bench_org(database)
    topic = "tally.soak.%08x" % random.getrandbits(32)
    bench.create_topic(topic, 8)
    replicas = {}
    for name, port in (("scraped", 18080), ("unscraped", 18083)):
        replicas[name] = bench.start("tally-ingest", {"TALLY_CLICKHOUSE_DATABASE": database,
                                                      "TALLY_LISTEN_ADDR": "127.0.0.1:%d" % port,
                                                      "TALLY_EVENTS_TOPIC": topic})
        bench.wait_http("http://127.0.0.1:%d/readyz" % port, 60)
    stop = threading.Event()

    def scrape():
        while not stop.is_set():
            try:
                urllib.request.urlopen("http://127.0.0.1:18080/metrics", timeout=5).read()
            except Exception:
                pass
            stop.wait(1)

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    loads = [subprocess.Popen([os.path.join(bench.BIN, "tally-loadgen"), "--url", "http://127.0.0.1:%d" % port,
                               "--key", key, "--events", str(args.events), "--duration", str(seconds),
                               "--connections", "32", "--rate", str(args.rate / 2 / args.events)],
                              stdout=subprocess.PIPE, text=True) for port in (18080, 18083)]
    samples = []
    started = time.time()
    try:
        while any(load.poll() is None for load in loads):
            samples.append((round(time.time() - started), {n: round(bench.rss_mib(p.pid), 1) for n, p in replicas.items()}))
            print(json.dumps(samples[-1]), flush=True)
            time.sleep(30)
    finally:
        stop.set()
        results = [json.loads(load.communicate()[0].strip().splitlines()[-1]) for load in loads]
        for process in replicas.values():
            bench.stop(process)
        subprocess.run(["curl", "-s", "-o", "/dev/null", "http://127.0.0.1:8123/", "--data", "DROP DATABASE IF EXISTS " + database])
        subprocess.run(["curl", "-s", "-o", "/dev/null", "http://127.0.0.1:8123/", "--data", "DROP DATABASE IF EXISTS " + database + "_admin"])
        bench.delete_topic(topic)
    warm = next((s for s in samples if s[0] >= 60), samples[0])
    last = samples[-1]
    print("\nmemory soak, nproc=%d: %.0f min at %.0f events/s (%d events/request) over two replicas"
          % (os.cpu_count(), args.minutes, args.rate, args.events))
    for name in replicas:
        print("  %-9s RSS %.1f MiB at %d s -> %.1f MiB at %d s (%+.1f MiB)"
              % (name, warm[1][name], warm[0], last[1][name], last[0], last[1][name] - warm[1][name]))
    for result in results:
        print("  load: %.0f events/s accepted, p99 %.2f ms, %s"
              % (result["accepted_events_per_s"], result["latency_ms"]["p99"], json.dumps(result["statuses"])))


if __name__ == "__main__":
    main()
