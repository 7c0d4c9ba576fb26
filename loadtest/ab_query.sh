#!/usr/bin/env bash
# The query API before and after a change, in one run on one loaded database: builds the query API
# of OLD_REV from a git worktree, then drives both binaries in turn, new → old → new, with
# loadtest/bench_query.py on the same database (loaded once and kept as tally_bq).
#
#   bash loadtest/ab_query.sh OLD_REV [bench_query.py arguments, e.g. --rate 50 --seconds 20]
#
# Needs the local stack (dev/stack.sh infra-up). A query API older than migration 0005 (the admin
# tables in <db>_admin) reads them from <db>: they are renamed there for its run and back after.
# Session 5's run (loadtest/RESULTS.md) was: bash loadtest/ab_query.sh 505dc44 --rate 50 --seconds 20
set -euo pipefail
OLD_REV="${1:?usage: ab_query.sh OLD_REV [bench_query.py arguments]}"
shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tally/target}"
WORKTREE="$(mktemp -d)/old"
OLD_BIN="$(mktemp -d)"
ch() { curl -fsS http://127.0.0.1:8123/ --data-binary "$1"; }
cleanup() { git -C "$ROOT" worktree remove --force "$WORKTREE" 2>/dev/null || true; }
trap cleanup EXIT

git -C "$ROOT" worktree add -f "$WORKTREE" "$OLD_REV" >/dev/null
echo "[ab] building the query API of $OLD_REV"
(cd "$WORKTREE" && cargo build --release --locked -q -p tally-query-api)
cp "$CARGO_TARGET_DIR/release/tally-query-api" "$OLD_BIN/"
echo "[ab] building the query API and the load tools of $(git -C "$ROOT" rev-parse --short HEAD)"
(cd "$ROOT" && cargo build --release --locked -q -p tally-query-api -p tally-loadtest)
cp "$CARGO_TARGET_DIR/release/tally-loadgen" "$CARGO_TARGET_DIR/release/tally-consumer-bench" "$OLD_BIN/"
old_has_admin_db() { git -C "$ROOT" cat-file -e "$OLD_REV:schemas/migrations/0005_admin_database.sql" 2>/dev/null; }

cd "$ROOT"
echo "[ab] run A: new"
python3 loadtest/bench_query.py --keep tally_bq "$@"
if ! old_has_admin_db; then for t in orgs api_keys budgets; do ch "RENAME TABLE tally_bq_admin.$t TO tally_bq.$t"; done; fi
echo "[ab] run B: old ($OLD_REV)"
TALLY_BIN_DIR="$OLD_BIN" python3 loadtest/bench_query.py --keep tally_bq "$@" || true
if ! old_has_admin_db; then for t in orgs api_keys budgets; do ch "RENAME TABLE tally_bq.$t TO tally_bq_admin.$t"; done; fi
echo "[ab] run C: new again"
python3 loadtest/bench_query.py --keep tally_bq "$@"
echo "[ab] done; the database tally_bq is kept (DROP DATABASE tally_bq; DROP DATABASE tally_bq_admin)"
