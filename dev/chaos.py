#!/usr/bin/env python3
"""`make chaos`: exactly once from the SDK's retry to the rollup, through every fault.

Run by dev/chaos.sh inside a network namespace of its own, on a private stack (Kafka, ClickHouse
on a tmpfs, S3Proxy, Toxiproxy, and Tally's ingest, consumer, query API and archiver `serve`).
During steady SDK-like load (dev/ledger.py: batches with their own `eventId`s or, for a third
of them, an `Idempotency-Key` from which the ingest derives the ids; every unanswered or refused
request retried as it was until answered 202; 3 % of batches sent again after their 202; 2 % of
events invalid), the faults happen at moments drawn from --seed (printed first; the same seed
gives the same schedule):

  ingest      kill -9, restarted after a pause
  consumer    kill -9, restarted after a pause             target: new events visible <= 3 s after
  archiver    kill -9 in the middle of archiving a month, restarted
  kafka       the broker stopped and started again         target: <= 10 s after it listens again
  clickhouse  kill -9, down 15 s (60 s in --long)          target: <= 3 s after it answers again
  s3          the S3 server stopped while a month is being archived
  disk        ClickHouse's disk filled to the last 256 KiB, then freed
  network     answers lost (connections stalled and closed: 20 % of the SDK's, 20 % of the
              consumer's to ClickHouse) and 250 +- 150 ms of delay on both paths (Toxiproxy)

A probe sends one event every 100 ms straight to the ingest; a fault's recovery time is how long
after the fault ended (the process restarted, the server answering again, the disk freed) the
first probe sent after that moment is visible in ClickHouse. Archiver faults recover when the
month being archived is done. One line per fault: what, when, how long it lasted, the recovery,
and the events delayed (answered 202 while the pipeline was not storing, or retried).

Then, once the consumer has drained, the ledger: every id answered 202 stored once and nothing
else; rollups equal raw rows; every rejected event in the dead-letter topic with its reason; the
query API's counts per org; the months archived under the faults exactly what ClickHouse holds
(`tally-archiver run` says up to date, `verify` checks the files); the recovery targets. The last
line is `N passed, M failed`. The run's per-second series and faults go to --record (JSON, for
loadtest/plot.py).

  dev/chaos.sh [--long] [--seed N] [--rate 40] [--record FILE] [--only ingest,consumer,...] [--rounds N]
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone

from archive_roundtrip import generate
from ledger import Ledger, loader, rollup_comparisons
from tally_api import call

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV = os.environ.get("TALLY_DEV_DIR", os.path.join(ROOT, ".dev", "chaos"))
STACK = os.path.join(ROOT, "dev", "stack.sh")
BIN = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/tally/target")), "release")
CH = "http://127.0.0.1:8123/"
DB = "tally"
INGEST, QUERY = ("127.0.0.1", 8080), "http://127.0.0.1:8081"
PROXIED_INGEST, PROXIED_CH = ("127.0.0.1", 18080), "http://127.0.0.1:18123"
TOXIPROXY_API = "http://127.0.0.1:8474"
S3 = {"TALLY_S3_ACCESS_KEY_ID": "tally", "TALLY_S3_SECRET_ACCESS_KEY": "tally-dev-secret", "TALLY_S3_ENDPOINT": "http://127.0.0.1:9100"}
FAULTS = ("ingest", "consumer", "archiver", "kafka", "clickhouse", "s3", "disk", "network")
TARGETS = {"consumer": 3.0, "clickhouse": 3.0, "kafka": 10.0}  # seconds, from the recovery goals
STARTED = time.time()


def log(message):
    print(f"[chaos {time.strftime('%H:%M:%S')} +{time.time() - STARTED:6.1f}s] {message}", flush=True)


def ch(sql, timeout=60, url=CH):
    request = urllib.request.Request(url, data=sql.encode(), method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read().decode()


def stack(*args, capture=False):
    return subprocess.run(["bash", STACK, *args], check=True, stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True).stdout


def stack_env():
    out = subprocess.run(["bash", STACK, "env"], check=True, capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def http_ok(url, timeout=1.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def wait_until(what, predicate, timeout, every=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    raise SystemExit(f"{what}: not within {timeout} s")


class Service:
    """One of Tally's processes, started and killed by this script."""

    def __init__(self, name, binary, addr, env, args=()):
        self.name, self.binary, self.addr, self.env, self.args = name, binary, addr, env, list(args)
        self.process = None

    def start(self):
        env = dict(os.environ, **self.env, TALLY_LISTEN_ADDR=self.addr)
        output = open(os.path.join(DEV, "log", f"{self.name}.log"), "a")
        self.process = subprocess.Popen([os.path.join(BIN, self.binary), *self.args], env=env, stdout=output,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        with open(os.path.join(DEV, "run", f"{self.name}.pid"), "w") as f:  # for dev/chaos.sh's clean-up
            f.write(str(self.process.pid))
        wait_until(f"{self.name} healthy on {self.addr}",
                   lambda: self.process.poll() is None and http_ok(f"http://{self.addr}/healthz"), 60)

    def kill9(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()


class Toxiproxy:
    """Toxiproxy's server and its HTTP API: a proxy per path, toxics added and removed."""

    def __init__(self):
        binary = os.environ.get("TALLY_TOXIPROXY") or sys.exit("TALLY_TOXIPROXY is not set: run dev/chaos.sh")
        output = open(os.path.join(DEV, "log", "toxiproxy.log"), "a")
        self.process = subprocess.Popen([binary, "-host", "127.0.0.1", "-port", "8474"], stdout=output,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        with open(os.path.join(DEV, "run", "toxiproxy.pid"), "w") as f:
            f.write(str(self.process.pid))
        wait_until("toxiproxy", lambda: http_ok(f"{TOXIPROXY_API}/version"), 30)

    def api(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(TOXIPROXY_API + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read()

    def proxy(self, name, listen, upstream):
        self.api("POST", "/proxies", {"name": name, "listen": listen, "upstream": upstream, "enabled": True})

    def toxic(self, proxy, name, kind, toxicity=1.0, **attributes):
        self.api("POST", f"/proxies/{proxy}/toxics",
                 {"name": name, "type": kind, "stream": "downstream", "toxicity": toxicity, "attributes": attributes})

    def clear(self, proxy, name):
        self.api("DELETE", f"/proxies/{proxy}/toxics/{name}")

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        self.process.wait()


class Timeline:
    """What the load and the probe saw, for the fault lines, the checks and the recorded series."""

    def __init__(self):
        self.lock = threading.Lock()
        self.answers = []  # (sent_at, seconds, status, events) of every load request
        self.probes = []  # sent_at (epoch ms) of every probe answered 202
        self.visible = [(time.time(), 0)]  # (observed at, newest probe timestamp stored, epoch ms)
        self.backlog = []  # (observed at, events answered 202, events stored) for the ledger's orgs
        self.faults = []

    def observe(self, sent_at, seconds, status, events):
        with self.lock:
            self.answers.append((sent_at, seconds, status, events))

    def newest_visible(self):
        with self.lock:
            return self.visible[-1][1]

    def delayed(self, start, end):
        """Events answered 202 in [start, end] and events of requests left unanswered or refused."""
        with self.lock:
            answers = [a for a in self.answers if start <= a[0] <= end]
        accepted = sum(a[3] for a in answers if a[2] == 202)
        retried = sum(a[3] for a in answers if a[2] != 202)
        return accepted, retried


def probe(stop, key, timeline):
    """One event every 100 ms straight to the ingest, its timestamp the moment it is sent."""
    import http.client
    connection = None
    while not stop.is_set():
        now = time.time()
        stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        body = json.dumps({"events": [{"eventId": str(uuid.uuid4()), "timestamp": stamp, "provider": "openai",
                                       "model": "gpt-4o-mini", "latency": 100, "status": "success",
                                       "tokens": {"promptTokens": 1, "completionTokens": 1, "totalTokens": 2}}]})
        try:
            if connection is None:
                connection = http.client.HTTPConnection(*INGEST, timeout=2)
            connection.request("POST", "/v1/ingest", body, {"Content-Type": "application/json", "X-API-Key": key})
            response = connection.getresponse()
            response.read()
            if response.status == 202:
                with timeline.lock:
                    timeline.probes.append(int(now * 1000))
        except (OSError, http.client.HTTPException):
            connection = None
        time.sleep(max(0.0, 0.1 - (time.time() - now)))


def watch(stop, probe_org, orgs, ledger, timeline):
    """The newest probe stored (every 100 ms) and the ledger's backlog (every second), read from
    ClickHouse directly (not through the proxy the network fault slows)."""
    ours = ", ".join(f"'{o['id']}'" for o in orgs)
    last_backlog = 0.0
    while not stop.is_set():
        try:
            newest = int(ch(f"SELECT max(toUInt64(timestamp) * 1000 + timestamp_ms) FROM {DB}.events "
                            f"WHERE org_id = '{probe_org}'", timeout=1).strip() or 0)
            with timeline.lock:
                timeline.visible.append((time.time(), newest))
            if time.time() - last_backlog >= 1:
                last_backlog = time.time()
                stored = int(ch(f"SELECT count() FROM {DB}.events WHERE org_id IN ({ours})", timeout=2).strip())
                with timeline.lock:
                    timeline.backlog.append((last_backlog, ledger.count(), stored))
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(0.1)


class Run:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.timeline = Timeline()
        self.months = iter(f"{year}-{month:02d}" for year in (2025, 2024) for month in range(1, 13))
        self.archived_months = []

    # -------------------------------------------------------------- the stack

    def up(self):
        os.makedirs(os.path.join(DEV, "log"), exist_ok=True)
        log(f"starting the private stack in {os.path.relpath(DEV, ROOT)}/ (its own network namespace)")
        stack("infra-up")
        env = stack_env()
        stack("create-topic", env["TALLY_CONTROL_TOPIC"], "1", "--config", "cleanup.policy=compact")
        self.toxiproxy = Toxiproxy()
        self.toxiproxy.proxy("ingest", f"{PROXIED_INGEST[0]}:{PROXIED_INGEST[1]}", "127.0.0.1:8080")
        self.toxiproxy.proxy("clickhouse", "127.0.0.1:18123", "127.0.0.1:8123")
        self.token = env["TALLY_ADMIN_TOKEN"]
        self.services = {
            "query-api": Service("query-api", "tally-query-api", "127.0.0.1:8081", env),
            # The consumer reaches ClickHouse through the proxy the network fault disturbs.
            "consumer": Service("consumer", "tally-consumer", "127.0.0.1:8082",
                                dict(env, TALLY_CLICKHOUSE_URL=PROXIED_CH, TALLY_CONSUMER_INSTANCE_ID="chaos-consumer-1")),
            # The ingest reaches Kafka only (as on Kubernetes): keys and prices from the control
            # topic; its ClickHouse address is a closed port.
            "ingest": Service("ingest", "tally-ingest", "127.0.0.1:8080",
                              dict(env, TALLY_INGEST_CONTROL="kafka",
                                   TALLY_CLICKHOUSE_URL="http://127.0.0.1:9")),
            "archiver": Service("archiver", "tally-archiver", "127.0.0.1:8083",
                                dict(env, **S3, TALLY_ARCHIVE_URL="s3://tally-archive/chaos", TALLY_ARCHIVE_INTERVAL_S="2",
                                     TALLY_ARCHIVE_LOCK_STALE_S="8", TALLY_ARCHIVE_S3_RETRY_TIMEOUT_S="20",
                                     TALLY_ARCHIVE_CHUNK_ROWS="250000", TALLY_ARCHIVE_DLQ_DAYS="0"), ["serve"]),
        }
        for service in self.services.values():
            service.start()
        log("stack up: kafka, clickhouse (tmpfs), s3proxy, toxiproxy, query-api, consumer, ingest, archiver serve")

    def down(self):
        for service in getattr(self, "services", {}).values():
            service.stop()
        if hasattr(self, "toxiproxy"):
            self.toxiproxy.stop()

    def create_orgs(self):
        orgs = []
        for i in range(self.args.orgs + 1):
            status, created = call("POST", QUERY + "/admin/orgs", token=self.token, body={
                "name": f"chaos-{i}", "plan": "ENTERPRISE", "rateLimitPerMin": 10_000_000, "rateLimitBurst": 1_000_000})
            if status != 201:
                raise SystemExit(f"POST /admin/orgs answered {status}: {created}")
            orgs.append({"id": created["orgId"], "key": created["apiKey"]})
        # Ready (it has read the control topic) and knowing the new keys (the consumer's next
        # publication): neither 503 nor 401.
        wait_until("the ingest knows the new keys", lambda: call(
            "POST", f"http://{INGEST[0]}:{INGEST[1]}/v1/ingest", key=orgs[-1]["key"], body={"events": []})[0]
            not in (0, 401, 503), 30)
        return orgs[:-1], orgs[-1]

    # -------------------------------------------------------------- recovery

    def visible_after(self, since):
        """Seconds from `since` until a probe sent at or after it is stored (None: not in 180 s)."""
        since_ms = int(since * 1000)
        deadline = time.time() + 180
        while time.time() < deadline:
            with self.timeline.lock:
                seen = next((at for at, newest in self.timeline.visible if newest >= since_ms and at >= since), None)
            if seen:
                return seen - since
            time.sleep(0.05)
        return None

    def archiver_log_has(self, month, words, after_line):
        with open(os.path.join(DEV, "log", "archiver.log")) as f:
            lines = f.readlines()[after_line:]
        return any(f'"{month}"' in line and all(w in line for w in words) for line in lines)

    def archiver_log_length(self):
        with open(os.path.join(DEV, "log", "archiver.log")) as f:
            return sum(1 for _ in f)

    def seed_month(self):
        """A closed month of generated events straight into ClickHouse, for the archiver to take;
        returns once the archiver has started archiving it."""
        month = next(self.months)
        self.archived_months.append(month)
        mark = self.archiver_log_length()
        ch(generate(DB, f"{month}-01", self.args.month_rows, len(self.archived_months) % 10), timeout=300)
        wait_until(f"the archiver starting on {month}", lambda: self.archiver_log_has(month, ['"archiving"'], mark), 60, 0.05)
        return month, mark

    def month_done_after(self, month, since, mark):
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.archiver_log_has(month, ["month done", "Archived"], mark) or \
                    self.archiver_log_has(month, ["month done", "UpToDate"], mark):
                return time.time() - since
            time.sleep(0.1)
        return None

    # -------------------------------------------------------------- the faults

    def pause(self):
        return round(self.rng.uniform(0.5, 3.0), 1)

    def fault(self, name):
        """Causes `name`; returns (seconds it lasted, recovery seconds, what recovery is measured from)."""
        long = self.args.long
        if name in ("ingest", "consumer"):
            service, pause = self.services[name], self.pause()
            service.kill9()
            time.sleep(pause)
            back = self.cleared = time.time()
            service.start()
            return pause, self.visible_after(back), f"killed -9, restarted after {pause} s"
        if name == "archiver":
            month, _ = self.seed_month()
            time.sleep(self.rng.uniform(0.2, 1.0))
            pause = self.pause()
            self.services["archiver"].kill9()
            time.sleep(pause)
            back = self.cleared = time.time()
            mark = self.archiver_log_length()
            self.services["archiver"].start()
            return pause, self.month_done_after(month, back, mark), f"killed -9 while archiving {month}, restarted after {pause} s"
        if name == "kafka":
            pause = self.args.kafka_down or self.pause()
            stack("stop", "kafka")
            time.sleep(pause)
            starting = time.time()
            stack("start", "kafka")  # returns once it listens and the topics are there
            back = self.cleared = time.time()
            return pause, self.visible_after(back), (f"broker stopped, started after {pause} s, listening {back - starting:.1f} s later; "
                                                     "recovery from then")
        if name == "clickhouse":
            hold = 60 if long else 15
            with open(os.path.join(DEV, "run", "clickhouse.pid")) as f:
                os.kill(int(f.read()), signal.SIGKILL)
            time.sleep(hold)
            stack("start", "clickhouse")  # returns once it answers /ping
            back = self.cleared = time.time()
            return hold, self.visible_after(back), f"killed -9, down {hold} s, recovery from its first answer"
        if name == "s3":
            hold = 30 if long else 10
            month, mark = self.seed_month()
            stack("stop", "s3")
            time.sleep(hold)
            stack("start", "s3")
            back = self.cleared = time.time()
            return hold, self.month_done_after(month, back, mark), f"stopped {hold} s while {month} was being archived"
        if name == "disk":
            hold = 30 if long else 10
            data = os.path.join(DEV, "clickhouse", "data")
            fillers, taken = [], 0
            for attempt in range(8):  # ClickHouse writes meanwhile: fill again what is still free
                left = os.statvfs(data).f_bavail * os.statvfs(data).f_frsize
                if left <= 4 << 20:
                    break
                fillers.append(os.path.join(data, f"chaos-filler-{attempt}"))
                # As much as the filesystem gives, to its last MiB or so. A refused fallocate of
                # ~1 GiB on tmpfs costs as much as a granted one, so step back 1, 2, 4… MiB (one MiB
                # at a time took 6 minutes once, ClickHouse writing meanwhile); the next round fills
                # what this one left.
                with open(fillers[-1], "wb") as f:
                    shortfall = 1 << 20
                    while shortfall < left:
                        try:
                            os.posix_fallocate(f.fileno(), 0, left - shortfall)
                            break
                        except OSError:
                            shortfall *= 2
                taken += os.path.getsize(fillers[-1])
            left = os.statvfs(data).f_bavail * os.statvfs(data).f_frsize
            time.sleep(hold)
            for filler in fillers:
                os.remove(filler)
            back = self.cleared = time.time()
            return hold, self.visible_after(back), f"ClickHouse's disk full ({taken >> 20} MiB taken, {left >> 10} KiB left) for {hold} s"
        if name == "network":
            hold = 45 if long else 15
            for proxy in ("ingest", "clickhouse"):
                self.toxiproxy.toxic(proxy, "delay", "latency", latency=250, jitter=150)
                self.toxiproxy.toxic(proxy, "lost", "timeout", toxicity=0.2, timeout=1000)
            time.sleep(hold)
            for proxy in ("ingest", "clickhouse"):
                self.toxiproxy.clear(proxy, "delay")
                self.toxiproxy.clear(proxy, "lost")
            back = self.cleared = time.time()
            return hold, self.visible_after(back), f"{hold} s of 250+-150 ms delay and 20 % lost answers"
        raise ValueError(name)

    def schedule(self):
        """(second of the load, fault) pairs from the seed: every fault once (three times with
        --long), in a random order, at random gaps."""
        if self.args.plan:
            return self.args.plan
        chosen = [f for f in FAULTS if f in self.args.only.split(",")]
        rounds = self.args.rounds or (3 if self.args.long else 1)
        gap = (20, 60) if self.args.long else (3, 8)
        at, plan = 10.0, []
        for _ in range(rounds):
            order = chosen[:]
            self.rng.shuffle(order)
            for name in order:
                plan.append((round(at, 1), name))
                at += self.rng.uniform(*gap)
        return plan

    # -------------------------------------------------------------- the run

    def load(self, orgs, probe_org):
        ledger, stop = Ledger(), threading.Event()
        args = self.args
        threads = [threading.Thread(target=loader, daemon=True, args=(
            PROXIED_INGEST, orgs, ledger, stop, args.rate / args.threads, args.batch),
            kwargs=dict(invalid_ratio=0.02, idempotency_ratio=0.33, timeout=args.sdk_timeout, observe=self.timeline.observe))
            for _ in range(args.threads)]
        side = [threading.Thread(target=probe, args=(stop, probe_org["key"], self.timeline), daemon=True),
                threading.Thread(target=watch, args=(stop, probe_org["id"], orgs, ledger, self.timeline), daemon=True)]
        for thread in threads + side:
            thread.start()
        return ledger, stop, threads, side

    def run(self):
        plan = self.schedule()
        log(f"seed {self.args.seed}: " + "; ".join(f"t={at}s {name}" for at, name in plan))
        self.up()
        orgs, probe_org = self.create_orgs()
        log(f"load: {self.args.rate:g} requests/s of {self.args.batch} events over {len(orgs)} orgs through the SDK proxy, "
            f"SDK timeout {self.args.sdk_timeout} s; a probe event every 100 ms")
        ledger, stop, threads, side = self.load(orgs, probe_org)
        self.load_started = time.time()
        for at, name in plan:
            now = time.time() - self.load_started
            if now < at:
                time.sleep(at - now)
            started = time.time()
            log(f"fault {name}: begins")
            lasted, recovery, how = self.fault(name)
            # The archive's faults do not touch the events' path: nothing of the load waits on them.
            accepted, retried = self.timeline.delayed(started, time.time()) if name not in ("archiver", "s3") else (0, 0)
            record = {"fault": name, "at": round(started - self.load_started, 1), "lasted": lasted,
                      "recovery": None if recovery is None else round(recovery, 2), "how": how,
                      "cleared_at": round(self.cleared - self.load_started, 1),
                      "events_delayed": accepted, "events_retried": retried, "target": TARGETS.get(name)}
            self.timeline.faults.append(record)
            log(fault_line(record))
            self.status(ledger)
            if recovery is None:
                # Later faults on a pipeline that is not storing would measure nothing: stop here,
                # say what the services were doing, and let the checks fail on it.
                log(f"the pipeline did not recover from the {name} fault: the remaining faults are skipped")
                self.diagnose()
                break
        time.sleep(self.args.tail)
        ledger.finish(stop, threads, log=log)
        for thread in side:
            thread.join()
        return orgs, probe_org, ledger

    def diagnose(self):
        """What a person needs to see why a fault was not recovered from: each service's health
        and Kafka gauges, and the last lines of every log."""
        for name, service in getattr(self, "services", {}).items():
            alive = service.process.poll() is None
            log(f"  {name}: {'running' if alive else f'exited with {service.process.returncode}'}; "
                f"/readyz {'ok' if http_ok(f'http://{service.addr}/readyz', timeout=2) else 'NOT ok'}")
        try:
            with urllib.request.urlopen(f"http://{INGEST[0]}:{INGEST[1]}/metrics", timeout=2) as response:
                gauges = [line for line in response.read().decode().splitlines()
                          if line.startswith(("tally_ingest_kafka_up", "tally_ingest_producer_queue_depth",
                                              "tally_ingest_produce_seconds_count", "tally_ingest_events_accepted_total"))]
            log("  the ingest's gauges: " + "; ".join(gauges))
        except OSError as error:
            log(f"  the ingest's /metrics did not answer: {error}")
        env = stack_env()
        described = subprocess.run(
            ["java", "-cp", os.path.join(stack("kafka-libs", capture=True).strip(), "*"),
             "org.apache.kafka.tools.TopicCommand", "--bootstrap-server", env["TALLY_KAFKA_BROKERS"],
             "--describe", "--topic", env["TALLY_EVENTS_TOPIC"]],
            capture_output=True, text=True, timeout=60)
        log("  the events topic as the broker describes it (leaders, in-sync replicas):\n    "
            + "\n    ".join((described.stdout or described.stderr).strip().splitlines()[:20]))
        for name in ("ingest", "consumer", "kafka"):
            path = os.path.join(DEV, "log", f"{name}.log")
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    tail = f.readlines()[-15:]
                log(f"  the last lines of {os.path.relpath(path, ROOT)}:\n    " + "    ".join(tail))

    def restart_losses(self):
        """What ClickHouse's restarts lost and the consumer's re-reads stored again: the parts 18.16
        removed as broken at its starts (confirmed while the disk was full), and the consumer's count."""
        path = os.path.join(DEV, "log", "clickhouse-server.err.log")
        broken = 0
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                broken = sum("Considering to remove broken part" in line and "/tally/" in line for line in f)
        stored = "unknown"
        consumer = getattr(self, "services", {}).get("consumer")
        try:
            with urllib.request.urlopen(f"http://{consumer.addr}/metrics", timeout=2) as response:
                stored = next((line.split()[-1] for line in response.read().decode().splitlines()
                               if line.startswith("tally_consumer_reread_rows_stored_total")), "0")
        except (OSError, AttributeError):
            pass
        log(f"ClickHouse removed {broken} broken part(s) of tally's tables at its starts; the consumer's re-reads "
            f"after its restarts stored {stored} row(s) again (since the consumer last started)")

    def status(self, ledger):
        with ledger.lock:
            statuses = dict(ledger.statuses)
        log(f"  load so far: {ledger.count()} events answered 202, {ledger.rejected_count()} rejected, "
            f"{ledger.resent} sent again after their 202; answers {statuses}")

    # -------------------------------------------------------------- the checks

    def verify(self, orgs, probe_org, ledger):
        passed = failed = 0

        def check(ok, what):
            nonlocal passed, failed
            passed, failed = passed + bool(ok), failed + (not ok)
            log(("PASS " if ok else "FAIL ") + what)

        ours = ", ".join(f"'{o['id']}'" for o in orgs)
        expected = ledger.expected()
        last, since = None, time.time()
        while time.time() - since < 120:
            stored = int(ch(f"SELECT count() FROM {DB}.events WHERE org_id IN ({ours})"))
            if stored != last:
                log(f"draining: {stored} of {len(expected)} stored")
                last, since = stored, time.time()
            if stored >= len(expected):
                break
            time.sleep(1)
        self.restart_losses()
        rows = [tuple(line.split("\t")) for line in ch(
            f"SELECT org_id, toString(event_id) FROM {DB}.events WHERE org_id IN ({ours}) FORMAT TabSeparated",
            timeout=300).splitlines() if line]
        check(not (expected - set(rows)), f"nothing lost: {len(expected)} events answered 202, {len(expected - set(rows))} not stored")
        check(len(rows) == len(set(rows)), f"nothing duplicated: {len(rows)} rows, {len(set(rows))} distinct "
                                           f"({ledger.resent} events sent again after their 202, every unanswered request retried)")
        extra = set(rows) - expected - ledger.unknown()
        check(not extra, f"nothing else stored: {len(extra)} rows never answered 202")
        check(*ledger.abandoned_check())
        probes = ch(f"SELECT count(), uniqExact(event_id) FROM {DB}.events WHERE org_id = '{probe_org['id']}'").split()
        check(probes[0] == probes[1] and int(probes[0]) >= len(self.timeline.probes),
              f"probe events: {probes[0]} rows, {probes[1]} distinct, {len(self.timeline.probes)} answered 202")
        for rollup, column, raw, rolled in rollup_comparisons(DB, f"org_id IN ({ours})"):
            raw, rolled = ch(raw), ch(rolled)
            check(raw == rolled, f"{rollup} equals the raw rows in all {raw.count(chr(10))} (org, {column}) buckets")
        letters = [json.loads(line) for line in subprocess.run(
            [os.path.join(BIN, "tally-consumer"), "dlq", "list", "10000000"], env=dict(os.environ, **stack_env()),
            capture_output=True, text=True, check=True).stdout.splitlines()]
        lettered = {(l["org_id"], l["event_id"]): l["reason"] for l in letters if l.get("event_id")}
        wanted = {(org, eid) for org, rejected in ledger.rejected.items() for eid in rejected}
        check(wanted and wanted <= set(lettered) and all(lettered[k] for k in wanted),
              f"every rejected event is in the dead-letter topic with its reason ({len(wanted - set(lettered))} of {len(wanted)} missing)")
        window = {"from": (datetime.now(timezone.utc) - timedelta(days=3)).strftime("%Y-%m-%dT%H:00:00Z"),
                  "to": (datetime.now(timezone.utc) + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:00Z")}
        wrong = []
        for org in orgs:
            want = len(ledger.ids[org["id"]])
            _, summary = call("GET", f"{QUERY}/api/costs/summary?{urllib.parse.urlencode(window)}", key=org["key"])
            _, status = call("GET", f"{QUERY}/api/telemetry/status", key=org["key"])
            if summary.get("executionCount") != want or status.get("totalEvents") != want:
                wrong.append(f"{org['id'][:8]}: {want} vs {summary.get('executionCount')}/{status.get('totalEvents')}")
        check(not wrong, f"the query API counts exactly each org's accepted events ({len(orgs)} orgs) {wrong}")
        if self.archived_months:
            self.services["archiver"].stop()
            env = dict(os.environ, **self.services["archiver"].env)
            out = subprocess.run([os.path.join(BIN, "tally-archiver"), "run"], env=env, capture_output=True, text=True)
            reports = {r["month"]: r for r in map(json.loads, filter(None, out.stdout.splitlines())) if "month" in r}
            for month in self.archived_months:
                check(reports.get(month, {}).get("outcome") == "up_to_date", f"archived under the faults, {month} holds exactly ClickHouse's rows: "
                                                             f"{json.dumps(reports.get(month))}")
            out = subprocess.run([os.path.join(BIN, "tally-archiver"), "verify"], env=env, capture_output=True, text=True)
            verified = {r["month"]: r.get("verified") for r in map(json.loads, filter(None, out.stdout.splitlines()))}
            check(out.returncode == 0 and all(verified.get(m) for m in self.archived_months),
                  f"tally-archiver verify: every archived month's files match its manifest {verified}")
        for record in self.timeline.faults:
            if record["recovery"] is None:
                check(False, f"{record['fault']}: no recovery within the wait")
            elif record["target"]:
                check(record["recovery"] <= record["target"],
                      f"{record['fault']}: recovered in {record['recovery']} s (target {record['target']} s)")
        return passed, failed

    # -------------------------------------------------------------- the record

    def series(self):
        """Per second of the load: requests by answer, events accepted, latency percentiles of the
        answered requests, the backlog (answered 202, not yet stored) and probe freshness."""
        with self.timeline.lock:
            answers, probes = list(self.timeline.answers), list(self.timeline.probes)
            visible, backlog = list(self.timeline.visible), list(self.timeline.backlog)
        start = self.load_started
        seconds = int(max([a[0] for a in answers] + [start]) - start) + 1
        rows = [{"t": s, "requests": 0, "accepted": 0, "failed": 0, "latencies": [], "freshness": []} for s in range(seconds)]
        for sent_at, took, status, events in answers:
            row = rows[min(seconds - 1, max(0, int(sent_at - start)))]
            row["requests"] += 1
            if status == 202:
                row["accepted"] += events
                row["latencies"].append(took * 1000)
            else:
                row["failed"] += 1
        cursor = 0
        for sent_ms in probes:  # visible is in observation order, newest stored non-decreasing
            while cursor < len(visible) and visible[cursor][1] < sent_ms:
                cursor += 1
            if cursor < len(visible) and 0 <= int(sent_ms / 1000 - start) < seconds:
                rows[int(sent_ms / 1000 - start)]["freshness"].append(visible[cursor][0] * 1000 - sent_ms)
        for at, accepted, stored in backlog:
            if 0 <= int(at - start) < seconds:
                rows[int(at - start)]["backlog"] = accepted - stored
        for row in rows:
            lat, fresh = sorted(row.pop("latencies")), sorted(row.pop("freshness"))
            row["p50_ms"], row["p99_ms"] = percentile(lat, 50), percentile(lat, 99)
            row["freshness_p50_ms"], row["freshness_max_ms"] = percentile(fresh, 50), (round(fresh[-1]) if fresh else None)
        return rows


def percentile(values, p):
    if not values:
        return None
    return round(values[min(len(values) - 1, int(len(values) * p / 100))], 1)


def fault_line(r):
    recovery = "NOT RECOVERED" if r["recovery"] is None else f"recovered in {r['recovery']:5.2f} s"
    target = f" (target {r['target']:g} s)" if r["target"] else ""
    return (f"{r['fault']:<10} at t={r['at']:>6.1f}s  lasted {r['lasted']:>5} s  {recovery}{target}  "
            f"{r['events_delayed']:>6} events delayed, {r['events_retried']:>5} retried  [{r['how']}]")


def plan_arg(text):
    plan = []
    for item in text.split(","):
        at, _, name = item.partition(":")
        if name not in FAULTS:
            raise argparse.ArgumentTypeError(f"{name!r} is not a fault ({', '.join(FAULTS)})")
        plan.append((float(at), name))
    return sorted(plan)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", action="store_true", help="every fault three times, ClickHouse down 60 s, longer gaps (~25 min)")
    parser.add_argument("--seed", type=int, default=None, help="the schedule's seed (default: drawn and printed)")
    parser.add_argument("--rate", type=float, default=40, help="requests per second over all loader threads")
    parser.add_argument("--batch", type=int, default=20, help="events per request")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--orgs", type=int, default=6)
    parser.add_argument("--sdk-timeout", type=float, default=5, help="the SDK's request timeout (shorter than the produce deadline on purpose)")
    parser.add_argument("--month-rows", type=int, default=1_500_000, help="rows of each closed month the archiver faults archive")
    parser.add_argument("--kafka-down", type=float, default=None, help="seconds the broker stays stopped (default: 0.5-3 s, drawn)")
    parser.add_argument("--rounds", type=int, default=None, help="every chosen fault this many times (default 1, 3 with --long)")
    parser.add_argument("--tail", type=float, default=5, help="seconds of load after the last fault")
    parser.add_argument("--only", default=",".join(FAULTS), help="the faults to cause (comma-separated)")
    parser.add_argument("--plan", type=plan_arg, default=None,
                        help="an exact schedule instead of the seed's, e.g. '10:consumer,10:kafka' (a fault due while "
                             "another runs begins right after it: this one replays a broker stop just after a consumer restart)")
    parser.add_argument("--record", default=os.path.join(DEV, "chaos-run.json"), help="where the run's series and faults go")
    args = parser.parse_args()
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 1_000_000)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))  # so the services are stopped
    run = Run(args)
    try:
        orgs, probe_org, ledger = run.run()
        run.status(ledger)
        log("faults:")
        for record in run.timeline.faults:
            print("  " + fault_line(record), flush=True)
        passed, failed = run.verify(orgs, probe_org, ledger)
        with open(args.record, "w") as f:
            json.dump({"seed": args.seed, "long": args.long, "rate": args.rate, "batch": args.batch, "nproc": os.cpu_count(),
                       "started": datetime.fromtimestamp(run.load_started, timezone.utc).isoformat(),
                       "faults": run.timeline.faults, "series": run.series(),
                       "checks": {"passed": passed, "failed": failed}}, f, indent=1)
        log(f"run recorded in {os.path.relpath(args.record, ROOT)} (plot it: python3 loadtest/plot.py {os.path.relpath(args.record, ROOT)})")
    finally:
        run.down()
    print(f"{passed} passed, {failed} failed", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
