#!/usr/bin/env python3
"""ClickHouse compatibility check: every statement Tally issues must run on the 18.16 server of
the local stack and on a current ClickHouse (embedded by the `chdb` package).

1. Every migration statement runs on chdb (the test suite already ran them on 18.16).
2. Every distinct statement the test suite sent to the 18.16 server (read back from
   system.query_log, successful ones only) is replayed on chdb in the order first seen, with
   test database names mapped to one database. INSERT ... FORMAT <binary> statements carry their
   rows in the request body, which the log does not keep: for those the table and column list are
   checked with a SELECT ... LIMIT 0.

Usage: compat.py --clickhouse-url URL --since 'YYYY-MM-DD hh:mm:ss' [--migrations DIR]
Exits non-zero, listing each failing statement, when any statement fails on chdb.
"""
import argparse
import glob
import json
import os
import re
import sys
import tempfile
import urllib.parse
import urllib.request

DB_NAME = re.compile(r"\btally_t_[a-z0-9_]*?_[0-9a-f]{12}(_admin)?\b|\btally(_admin)?(?=\.)")
LITERAL = re.compile(r"'(?:[^'\\]|\\.)*'|\b\d+(?:\.\d+)?\b")
# An INSERT whose rows travelled in the request body: the log keeps the statement without them.
INSERT_WITHOUT_ROWS = re.compile(r"^\s*INSERT\s+INTO\s+(\S+?)\s*\(([^)]*)\)\s*(?:FORMAT\s+\w+|VALUES)\s*$", re.I | re.S)


def ch_query(url, sql):
    request = urllib.request.Request(url, data=sql.encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read().decode()


def migration_statements(directory, db):
    for path in sorted(glob.glob(os.path.join(directory, "*.sql"))):
        text = "\n".join(l for l in open(path).read().splitlines() if not l.lstrip().startswith("--"))
        for statement in re.split(r";\s*\n", text + "\n"):
            statement = statement.strip().rstrip(";").strip()
            if statement:
                yield os.path.basename(path), statement.replace("{admin}", db + "_admin").replace("{db}", db)


def logged_statements(url, since):
    ch_query(url, "SYSTEM FLUSH LOGS")
    sql = (
        "SELECT query FROM system.query_log WHERE type = 2 AND event_time >= '%s' "
        "AND (query LIKE '%%tally_t_%%' OR query LIKE '%%tally.%%' OR query LIKE '%%tally_admin.%%') "
        "AND query NOT LIKE '%%system.query_log%%' ORDER BY event_time, query_start_time FORMAT JSONEachRow" % since
    )
    seen = set()
    # Split on newlines only: str.splitlines also splits on U+2028 and friends, which the fuzzed
    # filters put into logged queries and ClickHouse writes unescaped inside JSON strings.
    logged = [
        DB_NAME.sub(lambda m: "compat_admin" if (m.group(1) or m.group(2)) else "compat", json.loads(line)["query"])
        for line in ch_query(url, sql).split("\n")
        if line
    ]
    # Tables a skipped RENAME created (the archiver renames a stale lock aside before dropping it):
    # a statement on one is checked as the same statement on the table it was renamed from. (All
    # of them first: the log orders statements of the same second arbitrarily.)
    renamed = {}
    for mapped in logged:
        rename = re.match(r"^\s*RENAME\s+TABLE\s+(\S+)\s+TO\s+(\S+)\s*$", mapped, re.I)
        if rename and "_stale_" in rename.group(2):
            renamed[rename.group(2)] = rename.group(1)
    for mapped in logged:
        for aside, table in renamed.items():
            if aside in mapped:
                mapped = re.sub(r"\b%s\b" % re.escape(aside), table, mapped)
        # Databases are dropped by the tests; the admin tables' RENAMEs are checked as migration 0005.
        if re.match(r"^\s*(DROP\s+DATABASE|RENAME\s+TABLE)", mapped, re.I):
            continue
        # A fault a test injects into its own database (consumer_clickhouse.rs adds a column that
        # refuses one org's rows): replayed into the one shared `compat` database it would change
        # `events` for every other test's statements (an ATTACH PARTITION then sees two structures).
        if "ADD COLUMN guard" in mapped:
            continue
        shape = LITERAL.sub("?", re.sub(r"\s+", " ", mapped))
        if shape in seen:
            continue
        seen.add(shape)
        yield mapped


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clickhouse-url", default="http://127.0.0.1:8123/")
    parser.add_argument("--since", required=True)
    parser.add_argument("--migrations", default=os.path.join(os.path.dirname(__file__), "..", "schemas", "migrations"))
    parser.add_argument("--event-columns", help="JSON of the event row type's columns (tally-event-columns)")
    args = parser.parse_args()

    import chdb
    from chdb import session

    workdir = tempfile.mkdtemp(prefix="tally-chdb-")
    sess = session.Session(workdir)
    server_version = sess.query("SELECT version()", "CSV").bytes().decode().strip()
    failures = []

    def run(statement):
        """None when the statement runs on chdb, else the first line of its error."""
        try:
            match = INSERT_WITHOUT_ROWS.match(statement)
            if match:
                table, columns = match.groups()
                sess.query("SELECT %s FROM %s LIMIT 0" % (columns, table), "Null")
            else:
                sess.query(statement, "Null")
            return None
        except Exception as error:  # chdb raises its own error type per version
            return str(error).splitlines()[0][:400]

    sess.query("CREATE DATABASE IF NOT EXISTS compat", "Null")
    migrations = list(migration_statements(args.migrations, "compat"))
    for name, statement in migrations:
        error = run(statement)
        if error:
            failures.append(("migration " + name, statement, error))
    checked_row_type = 0
    if args.event_columns:
        # The one row type against the table the migrations made here (18.16: common/tests).
        expected = [[c["name"], c["clickhouse_type"]] for c in json.load(open(args.event_columns))]
        described = json.loads(sess.query("DESCRIBE TABLE compat.events", "JSONCompact").bytes())["data"]
        actual = [row[:2] for row in described]
        checked_row_type = 1
        if actual != expected:
            diff = [(e, a) for e, a in zip(expected, actual) if e != a] or [(len(expected), len(actual))]
            failures.append(("event row type", "EventRow vs compat.events", "differs: %s" % diff[:5]))
    replayed = list(logged_statements(args.clickhouse_url, args.since))
    # query_log has second resolution, so statements of the same second may come out of order (an
    # INSERT before its CREATE): replay in passes until a pass makes no progress.
    # Tables the tests create and drop as they go (a restore's staging table): several tests'
    # statements meet in one `compat` database, so one test's DROP can come between another's
    # CREATE and INSERT. A retried statement gets the tables it names created again first.
    creates = {}
    for statement in replayed:
        created = re.match(r"^\s*CREATE\s+(?:TEMPORARY\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(\S+)", statement, re.I)
        if created:
            creates.setdefault(created.group(1), statement)

    def retry(statement):
        for table, create in creates.items():
            if create is not statement and re.search(r"\b%s\b" % re.escape(table), statement):
                run(create)
        return run(statement)

    pending = replayed
    first = True
    while True:
        still_failing = [(statement, run(statement) if first else retry(statement)) for statement in pending]
        first = False
        still_failing = [(statement, error) for statement, error in still_failing if error]
        if not still_failing or len(still_failing) == len(pending):
            break
        pending = [statement for statement, _ in still_failing]
    failures.extend(("logged", statement, error) for statement, error in still_failing)

    for label, statement, error in failures:
        print("FAIL [%s] %s\n  statement: %s\n" % (label, error, statement[:600]))
    checked = len(migrations) + len(replayed) + checked_row_type
    print("compat: %d statements (%d migration, %d distinct logged) checked on ClickHouse %s (chdb %s)"
          % (checked, len(migrations), len(replayed), server_version, chdb.__version__))
    print("compat: %d passed, %d failed" % (checked - len(failures), len(failures)))
    if not replayed:
        print("compat: no logged statements found since %s; is log_queries on?" % args.since)
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
