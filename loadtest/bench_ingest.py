#!/usr/bin/env python3
"""`make bench-ingest`: the ingest benchmark, all on this machine, load generator included.

For 1, 100 and 1000 events per request it drives, in one run and with the same bodies:
  ceiling  the bare axum handler that only reads the body (tally-ceiling)
  discard  the ingest doing everything (auth, parse, validate, price, encode) but produce
  kafka    the ingest producing to the local Kafka (acks=all, idempotent), answering after the ack
and prints events/s, requests/s, p50/p99 latency, the server's CPU microseconds per event
(from /proc/<pid>/stat) and its RSS. The load generator runs a closed model (each connection
sends its next request when the previous answered) for --seconds per scenario.

Usage: loadtest/bench_ingest.py [--seconds 15] [--connections 16] [--events 1,100,1000]
                                [--scenarios ceiling,discard,kafka] [--server-threads N] [--rate R]
                                [--rounds N] [--baseline DIR]
         --server-threads N: runtime worker threads of the server under test (ceiling and ingest
         alike: TALLY_WORKER_THREADS for the ingest, tokio's TOKIO_WORKER_THREADS for the ceiling);
         --loadgen-threads N: the same for the load
         generator; default for both: one per core
         --rate R: an open model at R requests/s for every cell instead of the closed one
         --rounds N: the scenarios N times in turn, each cell's ratio against the ceiling of its own
         round, and the median per scenario (this machine's ceiling drifts by a third between runs)
         --baseline DIR: scenario 'baseline' is DIR's tally-ingest with the discard sink (an A/B of
         two builds against the same ceilings)
         scenario ceiling+N: the ceiling spinning N ns of CPU per request on top of its work, to
         calibrate what a server with N ns of its own work per request shows in this harness
       loadtest/bench_ingest.py --sustain EVENTS_PER_S [--seconds 300] [--events 1000]
         the kafka scenario in an open model: requests scheduled at a fixed rate, latency measured
         from each request's scheduled start (no coordinated omission)
       loadtest/bench_ingest.py --instructions [--events 1] [--scenarios ceiling,discard[,baseline]]
         each server's user-space instructions per request under valgrind's callgrind (one worker):
         the own work per request counted exactly, where CPU time on a shared machine drifts;
         --keep DIR keeps the dumps (callgrind_annotate DIR/discard-1.<pid>.1 shows where it goes)
       loadtest/bench_ingest.py ... --perf DIR
         after each measured cell, a separate run of the same cell under `perf record -e cpu-clock
         -g` (DWARF call graphs, 499 Hz; not the measured run, which perf would slow), written to
         DIR/<scenario>-<events>.data, then summarised by loadtest/profile_ingest.py: where the
         server's CPU per request goes, by stage; for each server after the ceiling in a round, also
         where its microseconds above the ceiling go, symbol by symbol, kernel and user space apart
Needs the local stack (dev/stack.sh infra-up) and release binaries (cargo build --release).
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/tally/target"))
BIN = os.environ.get("TALLY_BIN_DIR", os.path.join(TARGET, "release"))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ADMIN = "bench-admin-token-%016x" % random.getrandbits(64)


def cpu_times(pid):
    """The process's user and kernel CPU seconds so far (utime, stime)."""
    fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def cpu_seconds(pid):
    return sum(cpu_times(pid))


def context_switches(pid):
    """Voluntary + involuntary context switches of all the process's threads so far: a thread that
    parks for want of work and is woken again costs kernel time the request pays for."""
    total = 0
    for task in os.listdir("/proc/%d/task" % pid):
        try:
            for line in open("/proc/%d/task/%s/status" % (pid, task)):
                if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                    total += int(line.split()[1])
        except OSError:
            pass  # the thread ended meanwhile
    return total


def rss_mib(pid):
    for line in open("/proc/%d/status" % pid):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_http(url, seconds=30, any_status=False):
    """Waits until `url` answers 200 (or, with any_status, answers at all: the ceiling has no GET)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError:
            if any_status:
                return
            time.sleep(0.1)
        except Exception:
            time.sleep(0.1)
    raise SystemExit("not answering: " + url)


def start(binary, env, args=(), bin_dir=None):
    full_env = dict(os.environ, TALLY_LOG="warn", TALLY_LOG_FORMAT="json", **env)
    log = open(os.path.join(ROOT, ".dev", "log", "bench-%s.log" % os.path.basename(binary)), "a")
    return subprocess.Popen([os.path.join(bin_dir or BIN, binary), *args], env=full_env, stdout=log, stderr=log)


def stop(process):
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def bench_org(database, port=18081):
    """A database with the schema and an org whose limit is far above any benchmark rate."""
    api = start("tally-query-api", {"TALLY_CLICKHOUSE_DATABASE": database, "TALLY_ADMIN_TOKEN": ADMIN,
                                     "TALLY_LISTEN_ADDR": "127.0.0.1:%d" % port})
    try:
        wait_http("http://127.0.0.1:%d/readyz" % port, 60)
        request = urllib.request.Request(
            "http://127.0.0.1:%d/admin/orgs" % port,
            data=json.dumps({"name": "bench", "plan": "ENTERPRISE", "rateLimitPerMin": 4000000000,
                             "rateLimitBurst": 4000000000}).encode(),
            headers={"Authorization": "Bearer " + ADMIN, "Content-Type": "application/json"})
        with urllib.request.urlopen(request) as response:
            return json.load(response)["apiKey"]
    finally:
        stop(api)


def create_topic(name, partitions):
    subprocess.run(["bash", os.path.join(ROOT, "dev", "stack.sh"), "create-topic", name, str(partitions)], check=True)


def delete_topic(name):
    """Benchmarks leave nothing behind: their topics hold gigabytes."""
    subprocess.run(["bash", os.path.join(ROOT, "dev", "stack.sh"), "delete-topic", name], check=False,
                   capture_output=True)


LOADGEN_ENV = dict(os.environ)


def loadgen(url, key, events, seconds, connections, rate=0.0):
    out = subprocess.run([os.path.join(BIN, "tally-loadgen"), "--url", url, "--key", key, "--events", str(events),
                          "--duration", str(seconds), "--connections", str(connections), "--rate", str(rate)],
                         check=True, capture_output=True, text=True, env=LOADGEN_ENV)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(process, url, key, events, seconds, connections, rate=0.0):
    loadgen(url, key, events, 2, connections, rate)  # warm-up: connections, allocator, caches
    (user_before, system_before), switches_before = cpu_times(process.pid), context_switches(process.pid)
    result = loadgen(url, key, events, seconds, connections, rate)
    user, system = cpu_times(process.pid)
    result["server_cpu_s"] = (user - user_before) + (system - system_before)
    result["server_system_share"] = (system - system_before) / max(1e-9, result["server_cpu_s"])
    result["switches_per_request"] = (context_switches(process.pid) - switches_before) / max(1, result["requests"])
    result["server_rss_mib"] = rss_mib(process.pid)
    accepted = result["accepted_events_per_s"] * result["seconds"]
    result["cpu_us_per_event"] = result["server_cpu_s"] * 1e6 / accepted if accepted else float("nan")
    return result


def profile(process, url, key, events, connections, measured, path, rate=0.0, seconds=8, ceiling=None):
    """A run of the cell under `perf record` (its own run: perf's sampling costs CPU), then the
    per-stage summary of loadtest/profile_ingest.py scaled to the measured CPU per request; with
    `ceiling` (the ceiling's profile path and measured result in the same round), also where the
    microseconds above it go, symbol by symbol."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    recorder = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "499", "--call-graph", "dwarf,16384",
                                 "-p", str(process.pid), "-o", path + ".data"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    loadgen(url, key, events, seconds, connections, rate)
    recorder.send_signal(2)
    recorder.wait()
    us_per_request = measured["cpu_us_per_event"] * events
    against = []
    if ceiling:
        ceiling_path, ceiling_measured = ceiling
        against = ["--against", ceiling_path + ".data",
                   "--against-us", "%.3f" % (ceiling_measured["cpu_us_per_event"] * events)]
    subprocess.run([sys.executable, os.path.join(ROOT, "loadtest", "profile_ingest.py"), path + ".data",
                    "--us-per-request", "%.3f" % us_per_request, "--json", path + ".json", *against], check=False)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--events", default="1,100,1000")
    parser.add_argument("--scenarios", default="ceiling,discard,kafka")
    parser.add_argument("--rate", type=float, default=0,
                        help="requests/s of an open model for every cell (default: closed model)")
    parser.add_argument("--sustain", type=float, default=0, help="open-model kafka run at this many events/s")
    parser.add_argument("--server-threads", type=int, default=0, help="worker threads of the server under test")
    parser.add_argument("--loadgen-threads", type=int, default=0, help="worker threads of the load generator")
    parser.add_argument("--perf", default="", help="also profile each cell with perf into this directory")
    parser.add_argument("--keep", default="",
                        help="with --instructions: keep the callgrind dumps in this directory (for callgrind_annotate)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the scenarios this many times in turn; ratios per round and their median")
    parser.add_argument("--baseline", default="",
                        help="directory of another build's tally-ingest: scenario 'baseline' runs it (discard sink)")
    parser.add_argument("--instructions", action="store_true",
                        help="instead of timing: user-space instructions per request of each server under callgrind")
    args = parser.parse_args()
    if args.sustain:
        return sustain(args)
    if args.instructions:
        return instructions(args)
    events_list = [int(e) for e in args.events.split(",")]
    scenarios = args.scenarios.split(",")

    database = "tally_bench_%08x" % random.getrandbits(32)
    key = bench_org(database)
    topic = "tally.bench.%08x" % random.getrandbits(32)
    if "kafka" in scenarios:
        create_topic(topic, 8)
    env = {"TALLY_CLICKHOUSE_DATABASE": database, "TALLY_LISTEN_ADDR": "127.0.0.1:18080",
           "TALLY_EVENTS_TOPIC": topic, "TALLY_DLQ_TOPIC": "tally.events.dlq.v1"}
    threads = {"TOKIO_WORKER_THREADS": str(args.server_threads)} if args.server_threads else {}
    if args.loadgen_threads:
        LOADGEN_ENV["TOKIO_WORKER_THREADS"] = str(args.loadgen_threads)
    env.update(threads)
    rows = []
    if "baseline" in scenarios and not args.baseline:
        raise SystemExit("scenario 'baseline' needs --baseline DIR (a directory holding another build's tally-ingest)")
    ceilings = {}  # events per request -> the ceiling's profile path and result, this round
    for round_number, scenario in ((r, s) for r in range(1, args.rounds + 1) for s in scenarios):
        if scenario.startswith("ceiling"):
            # ceiling+N: the ceiling spinning N ns of CPU per request (a calibration of the harness)
            work = dict(threads, TALLY_CEILING_WORK_NS=scenario.partition("+")[2] or "0")
            process, url = start("tally-ceiling", work, ["127.0.0.1:18090"]), "http://127.0.0.1:18090"
            time.sleep(0.5)
        else:
            process = start("tally-ingest", dict(env, TALLY_SINK="kafka" if scenario == "kafka" else "discard"),
                            bin_dir=args.baseline if scenario == "baseline" else None)
            url = "http://127.0.0.1:18080"
            wait_http(url + "/readyz", 60)
        try:
            for events in events_list:
                result = measure(process, url, key, events, args.seconds, args.connections, args.rate)
                result["scenario"] = scenario
                result["round"] = round_number
                rows.append(result)
                print(json.dumps(result), file=sys.stderr)
                if args.perf:
                    path = os.path.join(args.perf, "%s-%d" % (scenario, events))
                    profile(process, url, key, events, args.connections, result, path, args.rate,
                            ceiling=ceilings.get(events))
                    if scenario == "ceiling":  # what the servers after it in this round are read against
                        ceilings[events] = (path, result)
        finally:
            stop(process)

    print("\nnproc=%d  seconds=%s  connections=%d  worker threads: server %s, load generator %s (same machine); %s"
          % (os.cpu_count(), args.seconds, args.connections, args.server_threads or "one per core",
             args.loadgen_threads or "one per core",
             "open model, %.0f requests/s" % args.rate if args.rate else "closed model"))
    print("%5s %-12s %6s %12s %10s %9s %9s %10s %6s %8s %8s %s" % (
        "round", "scenario", "ev/req", "events/s", "req/s", "p50 ms", "p99 ms", "cpu us/ev", "sys %", "cs/req",
        "rss MiB", "statuses"))
    for r in rows:
        print("%5d %-12s %6d %12.0f %10.0f %9.2f %9.2f %10.3f %6.0f %8.3f %8.1f %s" % (
            r["round"], r["scenario"], r["events_per_request"], r["accepted_events_per_s"], r["requests_per_s"],
            r["latency_ms"]["p50"], r["latency_ms"]["p99"], r["cpu_us_per_event"], 100 * r["server_system_share"],
            r["switches_per_request"], r["server_rss_mib"],
            json.dumps(r["statuses"])))
    # Each cell against the ceiling of its own round (the machine drifts between rounds).
    ceiling = {(r["round"], r["events_per_request"]): r for r in rows if r["scenario"] == "ceiling"}
    ratios = {}
    for r in rows:
        base = ceiling.get((r["round"], r["events_per_request"]))
        if r["scenario"] != "ceiling" and base and base["accepted_events_per_s"]:
            ratio = r["cpu_us_per_event"] / base["cpu_us_per_event"]
            ratios.setdefault((r["scenario"], r["events_per_request"]), []).append(ratio)
            print("round %d, %s at %d events/request: %.1f%% of the ceiling's events/s, %.2fx its CPU per request" % (
                r["round"], r["scenario"], r["events_per_request"],
                100 * r["accepted_events_per_s"] / base["accepted_events_per_s"], ratio))
    if args.rounds > 1:
        for (scenario, events), values in ratios.items():
            print("%s at %d events/request over %d rounds: median %.2fx the ceiling's CPU per request (%s)" % (
                scenario, events, len(values), statistics.median(values),
                ", ".join("%.2f" % v for v in values)))
    subprocess.run(["curl", "-s", "-o", "/dev/null", "http://127.0.0.1:8123/", "--data", "DROP DATABASE IF EXISTS " + database])
    subprocess.run(["curl", "-s", "-o", "/dev/null", "http://127.0.0.1:8123/", "--data", "DROP DATABASE IF EXISTS " + database + "_admin"])
    if "kafka" in scenarios:
        delete_topic(topic)


def instructions(args):
    """Each server's own work per request, counted exactly: the user-space instructions it executes
    (valgrind's callgrind, one runtime worker, counters zeroed after a warm-up) divided by the
    requests it answered. Deterministic where CPU time on a shared machine is not; it leaves out
    the kernel (the sockets, the wake-ups), which the timed runs include."""
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        raise SystemExit("--instructions needs valgrind (Debian: apt-get install valgrind)")
    database = "tally_bench_%08x" % random.getrandbits(32)
    key = bench_org(database)
    out_dir = args.keep or tempfile.mkdtemp(prefix="tally-callgrind-")
    os.makedirs(out_dir, exist_ok=True)
    env = {"TALLY_CLICKHOUSE_DATABASE": database, "TALLY_LISTEN_ADDR": "127.0.0.1:18080", "TALLY_SINK": "discard",
           "TOKIO_WORKER_THREADS": "1"}
    cells = []
    try:
        for scenario in [s for s in args.scenarios.split(",") if s in ("ceiling", "discard", "baseline")]:
            for events in [int(e) for e in args.events.split(",")]:
                if scenario == "ceiling":
                    binary, cmd_args, url = "tally-ceiling", ["127.0.0.1:18090"], "http://127.0.0.1:18090"
                else:
                    binary, cmd_args, url = "tally-ingest", [], "http://127.0.0.1:18080"
                path = os.path.join(args.baseline if scenario == "baseline" else BIN, binary)
                log = open(os.path.join(ROOT, ".dev", "log", "bench-callgrind.log"), "a")
                process = subprocess.Popen(
                    ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + os.path.join(out_dir, "%s-%d.%%p" % (scenario, events)),
                     path, *cmd_args], env=dict(os.environ, TALLY_LOG="warn", TALLY_LOG_FORMAT="json", **env),
                    stdout=log, stderr=log)
                try:
                    wait_http(url + ("/v1/ingest" if scenario == "ceiling" else "/readyz"), 120, any_status=True)
                    loadgen(url, key, events, 3, 4)  # warm-up
                    subprocess.run(["callgrind_control", "-z", str(process.pid)], check=True, capture_output=True)
                    result = loadgen(url, key, events, args.seconds, 4)
                    subprocess.run(["callgrind_control", "-d", str(process.pid)], check=True, capture_output=True)
                finally:
                    stop(process)
                dump = os.path.join(out_dir, "%s-%d.%d.1" % (scenario, events, process.pid))
                total = next(int(line.split()[1]) for line in open(dump) if line.startswith(("summary:", "totals:")))
                cells.append((scenario, events, result["requests"], total / max(1, result["requests"])))
                print("%s at %d events/request: %d requests, %.0f instructions per request" % cells[-1], file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(out_dir, ignore_errors=True)
        for name in (database, database + "_admin"):
            subprocess.run(["curl", "-s", "-o", "/dev/null", "http://127.0.0.1:8123/", "--data", "DROP DATABASE IF EXISTS " + name])
    print("\nnproc=%d  user-space instructions per request under callgrind (one runtime worker; kernel not counted)"
          % os.cpu_count())
    print("%-10s %6s %10s %14s %12s %14s" % ("scenario", "ev/req", "requests", "instr/request", "x ceiling", "above ceiling"))
    ceiling = {events: per for scenario, events, _, per in cells if scenario == "ceiling"}
    for scenario, events, requests, per in cells:
        base = ceiling.get(events)
        print("%-10s %6d %10d %14.0f %12s %14s" % (scenario, events, requests, per,
                                                    "%.2f" % (per / base) if base else "-",
                                                    "%.0f" % (per - base) if base else "-"))


def sustain(args):
    events = int(args.events.split(",")[0])
    database = "tally_bench_%08x" % random.getrandbits(32)
    key = bench_org(database)
    topic = "tally.bench.%08x" % random.getrandbits(32)
    create_topic(topic, 8)
    process = start("tally-ingest", {"TALLY_CLICKHOUSE_DATABASE": database, "TALLY_LISTEN_ADDR": "127.0.0.1:18080",
                                     "TALLY_EVENTS_TOPIC": topic})
    try:
        wait_http("http://127.0.0.1:18080/readyz", 60)
        before = cpu_seconds(process.pid)
        result = loadgen("http://127.0.0.1:18080", key, events, args.seconds, max(args.connections, 64),
                         rate=args.sustain / events)
        result["server_cpu_s"] = cpu_seconds(process.pid) - before
        result["server_rss_mib"] = rss_mib(process.pid)
    finally:
        stop(process)
        subprocess.run(["curl", "-s", "-o", "/dev/null", "http://127.0.0.1:8123/", "--data", "DROP DATABASE IF EXISTS " + database])
        subprocess.run(["curl", "-s", "-o", "/dev/null", "http://127.0.0.1:8123/", "--data", "DROP DATABASE IF EXISTS " + database + "_admin"])
        delete_topic(topic)
    print(json.dumps(result))
    print("sustained kafka (acks=all), nproc=%d: target %.0f events/s for %.0f s at %d events/request -> "
          "%.0f events/s accepted, p50 %.2f ms, p99 %.2f ms, max %.2f ms, ingest cpu %.3f us/event, rss %.1f MiB, %s"
          % (os.cpu_count(), args.sustain, args.seconds, events, result["accepted_events_per_s"],
             result["latency_ms"]["p50"], result["latency_ms"]["p99"], result["latency_ms"]["max"],
             result["server_cpu_s"] * 1e6 / max(1, result["accepted_events_per_s"] * result["seconds"]),
             result["server_rss_mib"], json.dumps(result["statuses"])))


if __name__ == "__main__":
    main()
