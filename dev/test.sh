#!/usr/bin/env bash
# `make test`: every test against the real local stack, then the ClickHouse compatibility check.
#  1. installs what is missing and starts ClickHouse, Kafka and MinIO (dev/stack.sh infra-up);
#     they stay up afterwards so the next run is fast (`make down` stops them)
#  2. cargo test --workspace: unit, property and integration tests (each integration test makes
#     its own database and topics, so they run in parallel)
#  3. dev/compat.py: every migration and every statement the tests sent to ClickHouse 18.16 is
#     replayed on a current ClickHouse (chdb); any statement that fails there fails the run
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TALLY_CACHE="${TALLY_CACHE:-$HOME/.cache/tally}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$TALLY_CACHE/target}"
CHDB_VERSION="4.4.0"
VENV="$TALLY_CACHE/venv-chdb-$CHDB_VERSION"
CLICKHOUSE_URL="http://127.0.0.1:8123"

cd "$ROOT"
bash dev/stack.sh infra-up

if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import chdb' 2>/dev/null; then
  echo "[test] installing chdb $CHDB_VERSION (a current ClickHouse engine) from PyPI into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "chdb==$CHDB_VERSION"
fi

# Tests that stop and restart a broker run their own, from the same jars.
TALLY_KAFKA_LIBS="$(bash dev/stack.sh kafka-libs)"
export TALLY_KAFKA_LIBS

since="$(curl -fsS "$CLICKHOUSE_URL/?query=SELECT+now()")"
echo "[test] cargo test --workspace"
cargo test --workspace --locked
echo "[test] ClickHouse compatibility (18.16 server vs current chdb) for statements since $since"
"$VENV/bin/python" dev/compat.py --clickhouse-url "$CLICKHOUSE_URL/" --since "$since"
