#!/usr/bin/env python3
"""Runs every ```sql block of docs/analysts.md on both ClickHouse versions and compares results.

1. On the local 18.16 server: a fresh database gets the migrations and deterministic sample
   events (plus a budget); each query then runs as the read-only `analyst` user.
2. On a current ClickHouse (chdb, run with the tools venv's python): the same migrations, data
   and queries.
3. Every query must succeed on both, return at least one row, and return the same rows.
4. The analyst must not reach the admin tables: reading the key hashes (or orgs, budgets) of the
   sample's admin database, or going around the user's databases with a table function, must be
   refused by the server.

The sample database has a fixed name, `tally_t_analysts`: the analyst user may see it and `tally`
only (dev/clickhouse/users.xml), so one run at a time.

Usage: analysts.py [--clickhouse-url http://127.0.0.1:8123/] [--doc docs/analysts.md]
Prints 'analysts: N passed, M failed' and exits non-zero on any failure.
"""
import argparse
import base64
import os
import random
import re
import sys
import tempfile
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compat import migration_statements  # noqa: E402

MODELS = [("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("anthropic", "claude-3-5-sonnet-20241022"), ("ollama", "llama3")]


def sample_rows(db):
    rng = random.Random(20261122)
    rows = []
    for i in range(600):
        org = "org-demo" if i % 5 else "org-other"
        day, hour, minute, second = rng.randint(1, 29), rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59)
        provider, model = MODELS[rng.randrange(len(MODELS))]
        prompt, completion = rng.randint(1, 4000), rng.randint(1, 900)
        env = ["['env'], ['prod']", "['env'], ['dev']", "[], []"][i % 3]
        rows.append(
            "('%s', '%08x-0000-4000-8000-%012x', '2026-11-%02d %02d:%02d:%02d', %d, '2026-11-%02d %02d:%02d:%02d', '%s', '%s', "
            "%d, %d, %d, %d, '%s', %d, '%s', 'user-%d', 'svc-%d', %d, %d, %s)"
            % (org, i, i, day, hour, minute, second, rng.randint(0, 999), day, hour, minute, second, provider, model,
               prompt, completion, prompt + completion, rng.randint(1, 50_000_000), "client" if i % 2 else "computed",
               rng.randint(10, 20_000), "error" if i % 11 == 0 else "success", i % 7, i % 3,
               rng.randint(0, 10_000), rng.randint(0, 50_000), env))
    return [
        "INSERT INTO %s.events (org_id, event_id, timestamp, timestamp_ms, received_at, provider, model, prompt_tokens, "
        "completion_tokens, total_tokens, cost_nanos, cost_source, latency_ms, status, user_id, service, input_bytes, "
        "output_bytes, metadata_keys, metadata_values) VALUES %s" % (db, ", ".join(rows)),
        "INSERT INTO %s_admin.budgets (org_id, monthly_limit_nanos, alert_thresholds, version) VALUES "
        "('org-demo', 5000000000000, [50, 80, 100], 1), ('org-demo', 3000000000000, [50, 80, 100], 2)" % db,
        "INSERT INTO %s_admin.api_keys (key_hash, key_prefix, org_id, name, created_at, revoked, version) VALUES "
        "('%s', 'tly_demo', 'org-demo', 'default', now(), 0, 1)" % (db, "ab" * 32),
    ]


def forbidden_reads(db):
    """Queries the analyst must be refused: the admin tables, directly or around the user's databases."""
    admin = db + "_admin"
    reads = ["SELECT key_hash FROM %s.api_keys" % admin, "SELECT * FROM %s.orgs" % admin,
             "SELECT * FROM %s.budgets" % admin,
             "SELECT key_hash FROM remote('127.0.0.1', '%s', 'api_keys')" % admin,
             "SELECT * FROM url('http://127.0.0.1:8123/?query=SELECT%%20key_hash%%20FROM%%20%s.api_keys', TSV, 'k String')" % admin]
    return reads + ["SELECT key_hash FROM tally_admin.api_keys"]


def doc_queries(path):
    text = open(path).read()
    return [block.strip() for block in re.findall(r"```sql\n(.*?)```", text, re.S)]


class Server:
    """The local 18.16 server over HTTP."""

    def __init__(self, url):
        self.url = url

    def run(self, sql, user=None):
        request = urllib.request.Request(self.url, data=sql.encode())
        if user:
            token = base64.b64encode(("%s:%s" % user).encode()).decode()
            request.add_header("Authorization", "Basic " + token)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.read().decode()
        except urllib.error.HTTPError as error:
            raise RuntimeError(error.read().decode().strip().splitlines()[0][:400])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clickhouse-url", default="http://127.0.0.1:8123/")
    parser.add_argument("--doc", default=os.path.join(ROOT, "docs", "analysts.md"))
    parser.add_argument("--migrations", default=os.path.join(ROOT, "schemas", "migrations"))
    args = parser.parse_args()
    import chdb
    from chdb import session

    db = "tally_t_analysts"
    queries = doc_queries(args.doc)
    server = Server(args.clickhouse_url)
    sess = session.Session(tempfile.mkdtemp(prefix="tally-chdb-analysts-"))
    setup = ["DROP DATABASE IF EXISTS %s" % db, "DROP DATABASE IF EXISTS %s_admin" % db,
             "CREATE DATABASE IF NOT EXISTS %s" % db]
    setup += [statement for _, statement in migration_statements(args.migrations, db)]
    setup += sample_rows(db)
    failures = []
    try:
        for statement in setup:
            server.run(statement)
            sess.query(statement, "Null")
        for index, query in enumerate(queries, 1):
            sql = re.sub(r"\btally\.", db + ".", query)
            try:
                old = server.run(sql + "\nFORMAT TSV", user=("analyst", "analyst"))
            except RuntimeError as error:
                failures.append((index, "18.16: %s" % error, query))
                continue
            try:
                new = sess.query(sql, "TSV").bytes().decode()
            except Exception as error:  # chdb raises its own error type per version
                failures.append((index, "current: %s" % str(error).splitlines()[0][:400], query))
                continue
            if not old.strip():
                failures.append((index, "no rows on the sample data", query))
            elif old != new:
                failures.append((index, "results differ:\n  18.16:   %r\n  current: %r" % (old[:300], new[:300]), query))
        refused = 0
        for query in forbidden_reads(db):
            try:
                answer = server.run(query + "\nFORMAT TSV", user=("analyst", "analyst"))
                failures.append(("admin", "the analyst read it: %r" % answer[:200], query))
            except RuntimeError as error:
                refused += 1
                print("analysts: refused as it must be: %s\n  -> %s" % (query[:90], str(error)[:140]))
    finally:
        server.run("DROP DATABASE IF EXISTS %s" % db)
        server.run("DROP DATABASE IF EXISTS %s_admin" % db)
    for index, error, query in failures:
        print("FAIL query %d of %s: %s\n%s\n" % (index, os.path.relpath(args.doc, ROOT), error, query))
    print("analysts: %d queries of %s run on 18.16 (as the read-only analyst) and on ClickHouse %s (chdb %s)"
          % (len(queries), os.path.relpath(args.doc, ROOT),
             sess.query("SELECT version()", "CSV").bytes().decode().strip(), chdb.__version__))
    print("analysts: %d passed, %d failed; %d reads of the admin tables refused to the analyst"
          % (len(queries) - len([f for f in failures if f[0] != "admin"]), len(failures), refused))
    return 1 if failures or not queries else 0


if __name__ == "__main__":
    sys.exit(main())
