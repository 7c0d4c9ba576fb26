#!/usr/bin/env python3
"""The archiver on the local cluster (`make test-cluster`, after dev/cluster_test.py).

In a database of its own (the cluster-mode migrations, `ON CLUSTER`), two closed months of rows
for a dozen orgs go in through the Distributed table, so each org's rows land on its shard and
both replicas of each shard hold them. Then `tally-archiver run` with the cluster's settings and
`TALLY_ARCHIVE_HOT_MONTHS=1`:

  - both months are archived with every row of both shards (the manifest's count = what went in)
    and dropped by the retention (`dropped_now`), on every replica of every shard;
  - the rollups, which the retention never touches, still hold every row on every replica;
  - `tally-archiver verify` reads the files back and agrees; a second pass archives nothing again;
  - `tally-archiver restore` refuses clearly on a cluster (not supported yet).

  python3 dev/cluster_archive.py --bin-dir DIR
"""

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE_PORT = {1: 8131, 2: 8132, 3: 8133, 4: 8134}
MONTHS = {"2025-03": 202503, "2025-04": 202504}


def log(message):
    print(f"[cluster-archive] {message}", flush=True)


def ch(node, sql, data=None, settings=""):
    """`sql` on one node (with `data` as the INSERT's body); `settings` as URL parameters (18.16
    takes no SETTINGS clause in an INSERT)."""
    url = f"http://127.0.0.1:{NODE_PORT[node]}/?{settings}" + \
        ("&query=" + urllib.parse.quote(sql) if data is not None else "")
    body = data if data is not None else sql.encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=120) as response:
            return response.read().decode()
    except urllib.error.HTTPError as error:
        raise SystemExit(f"clickhouse-{node}: {sql[:120]}: {error.read().decode()[:400]}") from error


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", required=True)
    args = parser.parse_args()
    env_lines = subprocess.run(["bash", os.path.join(ROOT, "dev", "cluster.sh"), "env"], check=True,
                               capture_output=True, text=True).stdout.splitlines()
    cluster_env = dict(line.split("=", 1) for line in env_lines if "=" in line)
    database = f"tally_archive_{secrets.token_hex(3)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update({k: v for k, v in cluster_env.items() if k.startswith("TALLY_CLICKHOUSE")})
    env.update({"TALLY_CLICKHOUSE_DATABASE": database, "TALLY_CLICKHOUSE_URL": f"http://127.0.0.1:{NODE_PORT[1]}",
                "TALLY_ARCHIVE_HOT_MONTHS": "1", "TALLY_ARCHIVE_DROP_GRACE_S": "0", "TALLY_ARCHIVE_DLQ_DAYS": "0",
                "TALLY_LOG": "warn"})
    work = tempfile.mkdtemp(prefix="tally-cluster-archive-")
    env["TALLY_ARCHIVE_URL"] = f"file://{work}"
    failures = []

    def check(ok, what):
        log(("ok    " if ok else "FAILED ") + what)
        if not ok:
            failures.append(what)

    def archiver(*command):
        out = subprocess.run([os.path.join(args.bin_dir, "tally-archiver"), *command], env=env,
                             capture_output=True, text=True, timeout=600)
        lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        return out.returncode, {line["month"]: line for line in lines if "month" in line}, out.stderr

    try:
        migrate = subprocess.run([os.path.join(args.bin_dir, "tally-consumer"), "migrate"], env=env,
                                 capture_output=True, text=True, timeout=300)
        if migrate.returncode != 0:
            raise SystemExit(f"migrations failed: {migrate.stderr[-500:]}")
        log(f"database {database}: the cluster-form migrations applied on the 4 nodes")
        rows, inserted = [], {}
        for month, partition in MONTHS.items():
            year, mon = month.split("-")
            for i in range(3000):
                org = f"org_{i % 12:02d}"
                day = 1 + i % 28
                rows.append(json.dumps({
                    "org_id": org, "event_id": str(uuid.uuid4()),
                    "timestamp": f"{year}-{mon}-{day:02d} {i % 24:02d}:{i % 60:02d}:00",
                    "received_at": f"{year}-{mon}-{day:02d} {i % 24:02d}:{i % 60:02d}:01",
                    "provider": "openai", "model": "gpt-4o", "prompt_tokens": 100 + i % 7,
                    "completion_tokens": 10 + i % 3, "total_tokens": 110 + i % 7 + i % 3,
                    "cost_nanos": 1000 + i, "latency_ms": 100, "status": "success"}))
            inserted[partition] = 3000
        ch(1, f"INSERT INTO {database}.events_all FORMAT JSONEachRow", data="\n".join(rows).encode(),
           settings="insert_distributed_sync=1")
        for node in NODE_PORT:
            ch(node, f"SYSTEM SYNC REPLICA {database}.events")
        held = {node: int(ch(node, f"SELECT count() FROM {database}.events")) for node in NODE_PORT}
        check(held[1] == held[2] and held[3] == held[4] and held[1] + held[3] == 6000 and held[1] and held[3],
              f"6000 rows of two closed months on both shards, each on both replicas: {held}")
        rollups_before = {node: int(ch(node, f"SELECT countMerge(events) FROM {database}.rollup_daily"))
                          for node in NODE_PORT}

        code, months, stderr = archiver("run")
        for month, partition in MONTHS.items():
            report = months.get(month, {})
            check(report.get("outcome") in ("dropped_now",) or (report.get("outcome") == "archived"),
                  f"{month}: {report} (exit {code}{'' if code == 0 else ': ' + stderr[-300:]})")
        manifests = {}
        for month in MONTHS:
            year, mon = month.split("-")
            directory = os.path.join(work, "events", f"year={year}", f"month={mon}")
            found = sorted(f for f in os.listdir(directory) if f.startswith("manifest")) if os.path.isdir(directory) else []
            if found:
                with open(os.path.join(directory, found[-1])) as f:
                    manifests[month] = json.load(f)
        for month in MONTHS:
            rows_archived = manifests.get(month, {}).get("totals", {}).get("rows")
            check(rows_archived == 3000, f"{month}: the manifest holds {rows_archived} rows of both shards (3000 went in)")
        code, months, stderr = archiver("run")
        again = [months[m] for m in MONTHS if m in months and months[m].get("outcome") != "dropped"]
        versions = sorted(f for m in MONTHS for f in os.listdir(os.path.join(
            work, "events", f"year={m[:4]}", f"month={m[5:]}")) if f.startswith("manifest"))
        check(code == 0 and not again and versions == ["manifest-v0001.json"] * 2,
              f"a second pass archives nothing again (exit {code}, {again or 'no month redone'}, manifests {versions})")
        left = {node: int(ch(node, f"SELECT count() FROM {database}.events")) for node in NODE_PORT}
        check(all(v == 0 for v in left.values()), f"the months are dropped on every replica of every shard: {left}")
        rollups_after = {node: int(ch(node, f"SELECT countMerge(events) FROM {database}.rollup_daily"))
                         for node in NODE_PORT}
        check(rollups_after == rollups_before and sum(rollups_after.values()) == 12000,
              f"the rollups keep every row on every replica: {rollups_after}")
        code, months, stderr = archiver("verify")
        check(code == 0 and all(months.get(m, {}).get("verified") is True for m in MONTHS),
              f"verify reads the files back: exit {code}, {[months.get(m) for m in MONTHS]}")
        code, _, stderr = archiver("restore", "2025-03")
        check(code != 0 and "not supported yet" in stderr, "restore refuses clearly on a cluster")
    finally:
        try:
            ch(1, f"DROP DATABASE IF EXISTS {database} ON CLUSTER {cluster_env.get('TALLY_CLICKHOUSE_CLUSTER', 'tally')}")
        except OSError as error:
            log(f"dropping {database}: {error}")
        shutil.rmtree(work, ignore_errors=True)
    log(f"{'PASSED' if not failures else 'FAILED'}: {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
