#!/usr/bin/env python3
"""`make bench-archiver`: the archiver on a month of 20 M events (and one of 5 M), in one run.

1. Loads --small events (default 5 M) into July 2026 and --large (default 20 M) into August 2026
   of a fresh database, 1000 orgs, through the consumer's insert path, and waits for merges.
2. For each month: the raw read ceiling (the archiver's own chunked SELECTs streamed to nowhere by
   the same client, `tally-archiver-bench ceiling`), then the archiver end to end into a local
   directory (`tally-archiver-bench archive`: stream, write Parquet, upload, read every file back,
   check per-org sums, publish), with each process's peak RSS. The large month is archived a
   second time into a bucket of the local S3 server.
3. Bytes per event of the archive, against ClickHouse's own compressed size of the partition
   (system.parts) and against a current ClickHouse's `FORMAT Parquet` of the same rows in the
   same order (chdb reading them from the local ClickHouse), default settings.
4. One org's rows of the archived large month read as the query API reads them (footer, that
   org's row groups by ranged requests), against reading the files whole.

Targets: >= 1 M rows/s and >= 60 % of the ceiling; bytes/event no larger than system.parts' or
chdb's; peak RSS flat between the two sizes.

Usage: loadtest/bench_archiver.py [--small 5000000] [--large 20000000] [--keep DATABASE]
Run by `make bench-archiver` with the tools' python (dev/tools.sh: chdb). Needs the local stack.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_consumer as bc  # noqa: E402
import bench_ingest as bi  # noqa: E402

TOOL = os.path.join(bi.BIN, "tally-archiver-bench")
S3 = os.environ.get("TALLY_TEST_S3_ENDPOINT", "http://127.0.0.1:9100")
S3_KEY, S3_SECRET = "tally", "tally-dev-secret"


def archiver_tool(env, *args):
    started = time.time()
    out = subprocess.run([TOOL, *args], check=True, capture_output=True, text=True, env={**os.environ, **env})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.setdefault("seconds", time.time() - started)
    return result


def make_bucket(name):
    subprocess.run(["curl", "-fsS", "-X", "PUT", "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "--aws-sigv4", "aws:amz:us-east-1:s3",
                    "--user", "%s:%s" % (S3_KEY, S3_SECRET), "%s/%s" % (S3, name)], check=True)


def chdb_parquet_bytes(database, partition, out):
    """A current ClickHouse's FORMAT Parquet of the partition's rows, sorted as the archive is."""
    import chdb
    columns = bc.ch(
        "SELECT arrayStringConcat(groupArray(concat(name, ' ', type)), ', ') FROM system.columns "
        "WHERE database = '%s' AND table = 'events'" % database)
    select = "SELECT * FROM %s.events WHERE toYYYYMM(timestamp) = %d FORMAT Native" % (database, partition)
    url = bc.CH + "/?query=" + urllib_quote(select)
    started = time.time()
    chdb.query("SELECT * FROM url('%s', Native, '%s') ORDER BY org_id, timestamp, timestamp_ms, event_id "
               "INTO OUTFILE '%s' FORMAT Parquet SETTINGS max_bytes_before_external_sort = 2000000000"
               % (url, columns, out))
    return os.path.getsize(out), time.time() - started


def urllib_quote(text):
    import urllib.parse
    return urllib.parse.quote(text, safe="")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=5_000_000)
    parser.add_argument("--large", type=int, default=20_000_000)
    parser.add_argument("--keep", default="", help="reuse this already loaded database and keep it")
    args = parser.parse_args()
    database = args.keep or "tally_bench_archiver_%08x" % random.getrandbits(32)
    months = [("2026-07", 202607, args.small), ("2026-08", 202608, args.large)]
    print("nproc=%d; database %s" % (os.cpu_count(), database), flush=True)
    if not args.keep or bc.ch("SELECT count() FROM system.databases WHERE name = '%s'" % database) != "1":
        bc.tool("migrate", database)
        for month, _, events in months:
            loaded = bc.tool("load-month", database, events, month)
            print("loaded %d events into %s in %.0f s" % (loaded["rows"], month, loaded["seconds"]), flush=True)
        started = time.time()
        while int(bc.ch("SELECT count() FROM system.merges WHERE database = '%s'" % database)) and time.time() - started < 900:
            time.sleep(2)
        print("merges settled after %.0f s" % (time.time() - started), flush=True)

    work = tempfile.mkdtemp(prefix="tally-bench-archiver-")
    env = {"TALLY_CLICKHOUSE_DATABASE": database, "TALLY_LOG": "warn"}
    results = {}
    try:
        for month, partition, _ in months:
            rows, compressed, on_disk = map(int, bc.ch(
                "SELECT sum(rows), sum(data_compressed_bytes), sum(bytes_on_disk) FROM system.parts "
                "WHERE active AND database = '%s' AND table = 'events' AND partition_id = '%d'"
                % (database, partition)).split("\t"))
            print("%s: %d rows, ClickHouse: %d compressed bytes (%.1f B/event), %d on disk"
                  % (month, rows, compressed, compressed / rows, on_disk), flush=True)
            ceiling = archiver_tool(env, "ceiling", month)
            print("  ceiling      %9.0f rows/s  %6.1f s  peak RSS %6.0f MiB"
                  % (ceiling["rows_per_s"], ceiling["seconds"], ceiling["peak_rss_mib"]), flush=True)
            local = archiver_tool({**env, "TALLY_ARCHIVE_URL": "file://%s/local" % work}, "archive", month)
            print("  archive dir  %9.0f rows/s  %6.1f s  peak RSS %6.0f MiB  %d files, %d row groups, %.1f B/event"
                  % (local["rows_per_s"], local["seconds"], local["peak_rss_mib"], local["files"], local["row_groups"],
                     local["bytes_per_event"]), flush=True)
            results[month] = {"rows": rows, "clickhouse_compressed": compressed, "ceiling": ceiling, "local": local}
        month, partition, _ = months[-1]
        bucket = "bench-archiver-%08x" % random.getrandbits(32)
        make_bucket(bucket)
        s3 = archiver_tool({**env, "TALLY_ARCHIVE_URL": "s3://" + bucket, "TALLY_S3_ENDPOINT": S3,
                            "TALLY_S3_ACCESS_KEY_ID": S3_KEY, "TALLY_S3_SECRET_ACCESS_KEY": S3_SECRET}, "archive", month)
        print("%s archive S3 %9.0f rows/s  %6.1f s  peak RSS %6.0f MiB" % (month, s3["rows_per_s"], s3["seconds"], s3["peak_rss_mib"]), flush=True)
        results[month]["s3"] = s3
        chdb_bytes, chdb_seconds = chdb_parquet_bytes(database, partition, os.path.join(work, "chdb.parquet"))
        results[month]["chdb_parquet"] = chdb_bytes
        print("%s chdb FORMAT Parquet: %d bytes (%.1f B/event) in %.0f s"
              % (month, chdb_bytes, chdb_bytes / results[month]["rows"], chdb_seconds), flush=True)
        org = bc.ch("SELECT org_id FROM %s.events WHERE toYYYYMM(timestamp) = %d GROUP BY org_id ORDER BY count() DESC LIMIT 1"
                    % (database, partition))
        read = archiver_tool({**env, "TALLY_ARCHIVE_URL": "file://%s/local" % work}, "org-read", month, org)
        results[month]["org_read"] = read
        print("%s one org (%s, %d of %d rows): %.0f ms, %d bytes fetched, %d of %d row groups; whole files: %.0f ms, %d bytes"
              % (month, org, read["rows"], read["month_rows"], read["per_org"]["ms"], read["per_org"]["bytes_fetched"],
                 read["per_org"]["row_groups_read"], read["per_org"]["row_groups"], read["whole_files"]["ms"],
                 read["whole_files"]["bytes_fetched"]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep:
            bc.ch("DROP DATABASE IF EXISTS %s" % database)
            bc.ch("DROP DATABASE IF EXISTS %s_admin" % database)

    large = results[months[-1][0]]
    small = results[months[0][0]]
    ratio = large["local"]["rows_per_s"] / large["ceiling"]["rows_per_s"]
    print("\ntargets (%s, %d rows):" % (months[-1][0], large["rows"]))
    print("  >= 1 M rows/s end to end:        local %.2f M/s, S3 %.2f M/s"
          % (large["local"]["rows_per_s"] / 1e6, large["s3"]["rows_per_s"] / 1e6))
    print("  >= 60 %% of the read ceiling:     %.1f %% (%.0f vs %.0f rows/s)"
          % (100 * ratio, large["local"]["rows_per_s"], large["ceiling"]["rows_per_s"]))
    print("  bytes/event <= ClickHouse's:     %.1f vs %.1f (%.2fx)" % (
        large["local"]["bytes_per_event"], large["clickhouse_compressed"] / large["rows"],
        large["local"]["bytes_per_event"] / (large["clickhouse_compressed"] / large["rows"])))
    print("  bytes/event <= chdb Parquet:     %.1f vs %.1f (%.2fx)" % (
        large["local"]["bytes_per_event"], large["chdb_parquet"] / large["rows"],
        large["local"]["bytes_per_event"] / (large["chdb_parquet"] / large["rows"])))
    print("  peak RSS flat:                   %.0f MiB (%d rows) vs %.0f MiB (%d rows)" % (
        small["local"]["peak_rss_mib"], small["rows"], large["local"]["peak_rss_mib"], large["rows"]))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
