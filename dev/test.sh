#!/usr/bin/env bash
# `make test`: every test against the real local stack, then the ClickHouse compatibility check.
#  1. installs what is missing and starts ClickHouse, Kafka and S3Proxy (dev/stack.sh infra-up);
#     they stay up afterwards so the next run is fast (`make down` stops them)
#  2. cargo test --workspace with the consumer's test-only failpoints: unit, property and
#     integration tests (each integration test makes its own database, topics or bucket, so they
#     run in parallel)
#  3. dev/fuzz_api.py: schemathesis generates requests from the OpenAPI documents of the ingest
#     and the query API; any 5xx, or any answer the document does not declare, fails the run
#  3b. dev/k6_check.py: every k6 script of loadtest/k6 syntax-checked and smoke-run under Node
#     with stand-ins for the k6 modules (real HTTP to an ingest and a query API; k6 is AGPL and
#     not run by the project)
#  3c. dev/dashboard_test.sh: the dashboard (/dashboard) in Debian's headless Chromium driven by
#     Selenium: KPIs, charts and tables equal the API's answers, live updates without reload (also
#     across a query API restart), the user view, org isolation, phone width
#  4. dev/compat.py: every migration and every statement the tests sent to ClickHouse 18.16 is
#     replayed on a current ClickHouse (chdb); any statement that fails there fails the run; and
#     the event row type's columns must equal the `events` table the migrations make there
#  5. dev/analysts.py: every query of docs/analysts.md runs on 18.16 (as the read-only analyst)
#     and on chdb over the same sample data, and must give the same rows; the analyst must be
#     refused the admin tables
#  6. dev/archive_roundtrip.py: tally-archiver archives two generated months; pyarrow, DuckDB and
#     chdb read the files back and must find ClickHouse's per-org rows and exact sums
#  7. dev/k8s_check.sh: the Kubernetes manifests rendered, validated against Kubernetes' and the
#     operators' schemas (and refused when broken on purpose), their invariants, the alerts' unit
#     tests, the policy scan (`make k8s-check`; its tools are installed at step 1)
#  7b. dev/kafka_auth_check.py: the services on a SASL_SSL (SCRAM-SHA-512) broker with exactly the
#     KafkaUsers' ACLs of k8s/: each does its work, and is refused what its ACLs do not grant
#  8. dev/chaos.sh: `make chaos`'s short form (~4 min): every fault once under SDK-like load on a
#     private stack in its own network namespace, then the end-to-end ledger
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TALLY_CACHE="${TALLY_CACHE:-$HOME/.cache/tally}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$TALLY_CACHE/target}"
CLICKHOUSE_URL="http://127.0.0.1:8123"

cd "$ROOT"
bash dev/stack.sh infra-up
# kubectl-validate, promtool, the Prometheus Operator's CRDs, checkov: into the cache, once.
bash dev/k8s_check.sh install

# Python tools, pinned (dev/tools.sh): chdb, schemathesis, DuckDB, pyarrow.
TOOLS_PYTHON="$(bash dev/tools.sh)"
VENV="$(dirname "$(dirname "$TOOLS_PYTHON")")"

# Tests that stop and restart a broker run their own, from the same jars.
TALLY_KAFKA_LIBS="$(bash dev/stack.sh kafka-libs)"
export TALLY_KAFKA_LIBS

since="$(curl -fsS "$CLICKHOUSE_URL/?query=SELECT+now()")"
# The S3 server's endpoint and credentials, for the tests of the object store.
TALLY_TEST_S3_ENDPOINT="http://127.0.0.1:9100"
export TALLY_TEST_S3_ENDPOINT

echo "[test] cargo test --workspace --features tally-consumer/failpoints"
cargo test --workspace --locked --features tally-consumer/failpoints
echo "[test] schemathesis against the OpenAPI documents of the ingest and the query API"
TALLY_BIN_DIR="$CARGO_TARGET_DIR/debug" python3 dev/fuzz_api.py "$VENV/bin/schemathesis" --max-examples 60
echo "[test] the k6 scripts (loadtest/k6): syntax, and a smoke run of each under Node against the real services"
TALLY_BIN_DIR="$CARGO_TARGET_DIR/debug" python3 dev/k6_check.py
echo "[test] the dashboard in headless Chromium (dev/dashboard_test.py)"
bash dev/dashboard_test.sh
echo "[test] ClickHouse compatibility (18.16 server vs current chdb) for statements since $since"
cargo run -q --locked -p tally-testkit --bin event_columns >"$CARGO_TARGET_DIR/event-columns.json"
"$VENV/bin/python" dev/compat.py --clickhouse-url "$CLICKHOUSE_URL/" --since "$since" \
  --event-columns "$CARGO_TARGET_DIR/event-columns.json"
echo "[test] the analysts' cookbook (docs/analysts.md) on both ClickHouse versions"
"$VENV/bin/python" dev/analysts.py --clickhouse-url "$CLICKHOUSE_URL/"
echo "[test] the archive read back by pyarrow, DuckDB and chdb"
TALLY_BIN_DIR="$CARGO_TARGET_DIR/debug" "$VENV/bin/python" dev/archive_roundtrip.py --clickhouse-url "$CLICKHOUSE_URL/"
echo "[test] the Kubernetes manifests (k8s/): schemas, invariants, alerts, policy scan"
bash dev/k8s_check.sh
echo "[test] the services on an authenticated Kafka (SCRAM over TLS) with the ACLs of k8s/"
"$(bash dev/tools.sh k8s)" dev/kafka_auth_check.py --bin-dir "$CARGO_TARGET_DIR/debug" \
  --kafka-libs "$TALLY_KAFKA_LIBS" --clickhouse-url "$CLICKHOUSE_URL"
echo "[test] make chaos, short form: every fault once under load on a private stack, then the ledger"
bash dev/chaos.sh
