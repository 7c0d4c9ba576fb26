#!/usr/bin/env bash
# The local stack, with no Docker engine: real Apache Kafka (KRaft, Maven Central jars on the JDK),
# ClickHouse (Debian's package), S3Proxy (an S3 server, Apache-2.0, Maven Central jars on the JDK,
# filesystem backend), and Tally's own services. Nothing AGPL is installed or run: no MinIO server,
# no k6 (SREs bring their own k6 for loadtest/k6/; the demo traffic uses tally-loadgen).
# Everything listens on 127.0.0.1 and keeps its state under .dev/; downloads and builds are cached
# under $TALLY_CACHE so a second run is fast. Every command is idempotent.
#
#   dev/stack.sh install            install whatever is missing
#   dev/stack.sh infra-up           start kafka, clickhouse, s3 (and create topics, bucket)
#   dev/stack.sh up                 infra-up + build + start services + demo org, key and traffic
#   dev/stack.sh down | status | clean
#   dev/stack.sh restart NAME       restart one component (ingest, consumer, query-api, kafka, ...)
#   dev/stack.sh start|stop NAME    start or stop one component
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEV="${TALLY_DEV_DIR:-$ROOT/.dev}" # TALLY_DEV_DIR: another stack's state (dev/chaos.sh runs one in its own network namespace)
TALLY_CACHE="${TALLY_CACHE:-$HOME/.cache/tally}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$TALLY_CACHE/target}"

KAFKA_VERSION="4.1.1"
S3PROXY_VERSION="2.6.0"
KAFKA_LIBS="$TALLY_CACHE/kafka-$KAFKA_VERSION-$(sha256sum "$ROOT/dev/kafka/pom.xml" | cut -c1-12)/libs"
S3PROXY_LIBS="$TALLY_CACHE/s3proxy-$S3PROXY_VERSION-$(sha256sum "$ROOT/dev/s3proxy/pom.xml" | cut -c1-12)/libs"

KAFKA_BROKERS="127.0.0.1:9092"
CLICKHOUSE_URL="http://127.0.0.1:8123"
S3_ENDPOINT="http://127.0.0.1:9100"
S3_ACCESS_KEY="tally"
S3_SECRET_KEY="tally-dev-secret"
S3_BUCKET="tally-archive"
INGEST_ADDR="127.0.0.1:8080"
QUERY_ADDR="127.0.0.1:8081"
CONSUMER_ADDR="127.0.0.1:8082"
EVENTS_TOPIC="tally.events.v1"
DLQ_TOPIC="tally.events.dlq.v1"
# The API keys and prices, published by the consumer for the ingest, which reads Kafka only
# (TALLY_INGEST_CONTROL=kafka, as on Kubernetes). Compacted: the newest snapshot is what remains.
CONTROL_TOPIC="tally.control.v1"
EVENTS_PARTITIONS=8

log() { printf '\033[1m[stack]\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

mkdir -p "$DEV/run" "$DEV/log"

# ---------------------------------------------------------------- process helpers

PROC_RUN="$DEV/run" PROC_LOG="$DEV/log"
# shellcheck source=dev/proc.sh
source "$ROOT/dev/proc.sh"

wait_http() { # wait_http NAME URL SECONDS
  local name="$1" url="$2" secs="$3"
  for _ in $(seq 1 $((secs * 5))); do
    if curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; then return 0; fi
    is_running "$name" || { tail -n 30 "$DEV/log/$name.log" >&2 || true; die "$name exited during start-up (log: .dev/log/$name.log)"; }
    sleep 0.2
  done
  tail -n 30 "$DEV/log/$name.log" >&2 || true
  die "$name not answering at $url after ${secs}s"
}

wait_port() { # wait_port NAME PORT SECONDS
  local name="$1" port="$2" secs="$3"
  for _ in $(seq 1 $((secs * 5))); do
    if port_open "$port"; then return 0; fi
    is_running "$name" || { tail -n 30 "$DEV/log/$name.log" >&2 || true; die "$name exited during start-up (log: .dev/log/$name.log)"; }
    sleep 0.2
  done
  die "$name not listening on $port after ${secs}s"
}

# ---------------------------------------------------------------- installs

install_clickhouse() {
  command -v clickhouse-server >/dev/null 2>&1 || [[ -x /usr/sbin/clickhouse-server ]] && command -v clickhouse-client >/dev/null 2>&1 && return 0
  log "installing clickhouse-server and clickhouse-client from Debian"
  if [[ $(id -u) -eq 0 ]]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q clickhouse-server clickhouse-client >"$DEV/log/apt-clickhouse.log" 2>&1 \
    || { tail -n 20 "$DEV/log/apt-clickhouse.log" >&2; die "apt-get install clickhouse failed"; }
}

install_kafka() {
  [[ -f "$KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar" && -f "$KAFKA_LIBS/kafka-tools-$KAFKA_VERSION.jar" ]] && return 0
  log "fetching Apache Kafka $KAFKA_VERSION jars from Maven Central"
  mvn -q -B -f "$ROOT/dev/kafka/pom.xml" -Dkafka.version="$KAFKA_VERSION" dependency:copy-dependencies \
    -DoutputDirectory="$KAFKA_LIBS" -DincludeScope=runtime >"$DEV/log/mvn-kafka.log" 2>&1 \
    || { tail -n 30 "$DEV/log/mvn-kafka.log" >&2; die "mvn could not fetch the Kafka jars"; }
}

install_s3proxy() {
  [[ -f "$S3PROXY_LIBS/s3proxy-$S3PROXY_VERSION.jar" ]] && return 0
  log "fetching S3Proxy $S3PROXY_VERSION jars from Maven Central"
  mvn -q -B -f "$ROOT/dev/s3proxy/pom.xml" -Ds3proxy.version="$S3PROXY_VERSION" dependency:copy-dependencies \
    -DoutputDirectory="$S3PROXY_LIBS" -DincludeScope=runtime >"$DEV/log/mvn-s3proxy.log" 2>&1 \
    || { tail -n 30 "$DEV/log/mvn-s3proxy.log" >&2; die "mvn could not fetch the S3Proxy jars"; }
}

install_all() {
  command -v java >/dev/null || die "a JDK (17+) is required (Kafka and S3Proxy run on it)"
  command -v mvn >/dev/null || die "Maven is required (it fetches the Kafka and S3Proxy jars)"
  command -v cargo >/dev/null || die "Rust (rustup) is required"
  install_clickhouse
  install_kafka
  install_s3proxy
}

# ---------------------------------------------------------------- components

start_clickhouse() {
  if is_running clickhouse; then return 0; fi
  if curl -fsS -o /dev/null --max-time 1 "$CLICKHOUSE_URL/ping" 2>/dev/null; then
    log "reusing the ClickHouse already answering on $CLICKHOUSE_URL (not started by this checkout)"; return 0
  fi
  install_clickhouse
  local dir="$DEV/clickhouse"
  mkdir -p "$dir/data/tmp" "$dir/data/user_files" "$dir/data/format_schemas"
  sed -e "s#@DATA@#$dir/data#g" -e "s#@LOG@#$DEV/log#g" "$ROOT/dev/clickhouse/config.xml" >"$dir/config.xml"
  cp "$ROOT/dev/clickhouse/users.xml" "$dir/users.xml"
  log "starting clickhouse on 127.0.0.1:8123 (http) and :9000 (native)"
  local server=clickhouse-server
  command -v clickhouse-server >/dev/null 2>&1 || server=/usr/sbin/clickhouse-server
  start_bg clickhouse "$server" --config-file="$dir/config.xml"
  wait_http clickhouse "$CLICKHOUSE_URL/ping" 60
}

start_kafka() {
  if is_running kafka; then return 0; fi
  if port_open 9092; then log "reusing the Kafka already listening on $KAFKA_BROKERS (not started by this checkout)"; return 0; fi
  install_kafka
  local dir="$DEV/kafka"
  mkdir -p "$dir/data"
  sed -e "s#@DATA@#$dir/data#g" "$ROOT/dev/kafka/server.properties" >"$dir/server.properties"
  local cp="$KAFKA_LIBS/*"
  if [[ ! -f "$dir/data/meta.properties" ]]; then
    local cluster_id
    cluster_id="$(java -cp "$cp" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)"
    log "formatting kafka storage (cluster $cluster_id)"
    java -Dlog4j2.configurationFile="$ROOT/dev/kafka/log4j2.properties" -cp "$cp" kafka.tools.StorageTool format \
      -t "$cluster_id" -c "$dir/server.properties" >>"$DEV/log/kafka.log" 2>&1 || die "kafka storage format failed"
  fi
  log "starting kafka $KAFKA_VERSION (KRaft) on $KAFKA_BROKERS"
  start_bg kafka java -Xms256m -Xmx1g -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$ROOT/dev/kafka/log4j2.properties" -cp "$cp" kafka.Kafka "$dir/server.properties"
  wait_port kafka 9092 90
  create_topic "$EVENTS_TOPIC" "$EVENTS_PARTITIONS"
  create_topic "$DLQ_TOPIC" 2
}

# create_topic NAME PARTITIONS [--config K=V ...]: idempotent
create_topic() {
  local topic="$1" partitions="$2" tries
  shift 2
  for tries in 1 2 3 4 5 6 7 8 9 10; do
    if java -cp "$KAFKA_LIBS/*" -Dlog4j2.configurationFile="$ROOT/dev/kafka/log4j2.properties" \
        org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BROKERS" --create --if-not-exists \
        --topic "$topic" --partitions "$partitions" --replication-factor 1 \
        --config min.insync.replicas=1 "$@" >>"$DEV/log/kafka-topics.log" 2>&1; then
      return 0
    fi
    sleep 2
  done
  tail -n 20 "$DEV/log/kafka-topics.log" >&2
  die "could not create topic $topic"
}

# delete_topic NAME: benchmarks remove what they created
delete_topic() {
  java -cp "$KAFKA_LIBS/*" -Dlog4j2.configurationFile="$ROOT/dev/kafka/log4j2.properties" \
    org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BROKERS" --delete --if-exists \
    --topic "$1" >>"$DEV/log/kafka-topics.log" 2>&1
}

# s3_request METHOD PATH: a SigV4-signed request to the local S3 server; prints the HTTP status.
s3_request() {
  curl -s -o /dev/null -w '%{http_code}' -X "$1" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" \
    --aws-sigv4 "aws:amz:us-east-1:s3" --user "$S3_ACCESS_KEY:$S3_SECRET_KEY" "$S3_ENDPOINT$2" || true
}

start_s3() {
  if is_running s3; then return 0; fi
  if port_open 9100; then log "reusing the S3 server already listening on $S3_ENDPOINT (not started by this checkout)"; return 0; fi
  install_s3proxy
  local dir="$DEV/s3"
  mkdir -p "$dir/data"
  (umask 077; printf '%s\n' "s3proxy.endpoint=$S3_ENDPOINT" "s3proxy.authorization=aws-v2-or-v4" \
    "s3proxy.identity=$S3_ACCESS_KEY" "s3proxy.credential=$S3_SECRET_KEY" "jclouds.provider=filesystem" \
    "jclouds.filesystem.basedir=$dir/data" >"$dir/s3proxy.properties")
  log "starting s3proxy $S3PROXY_VERSION (S3 API, filesystem backend) on $S3_ENDPOINT"
  start_bg s3 java -Xms64m -Xmx256m -XX:+UseSerialGC -Dlogback.configurationFile="$ROOT/dev/s3proxy/logback.xml" \
    -cp "$S3PROXY_LIBS/*" org.gaul.s3proxy.Main --properties "$dir/s3proxy.properties"
  wait_port s3 9100 60
  # 200 when created, 409 when it exists already.
  local code=""
  for _ in $(seq 1 60); do
    code="$(s3_request PUT "/$S3_BUCKET")"
    [[ $code == 200 || $code == 409 ]] && return 0
    sleep 0.5
  done
  die "could not create bucket $S3_BUCKET (HTTP $code; log: .dev/log/s3.log)"
}

admin_token() {
  local f="$DEV/admin.token"
  [[ -s $f ]] || (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$f")
  cat "$f"
}

build_services() {
  log "building the services (cargo build --release, target dir $CARGO_TARGET_DIR)"
  (cd "$ROOT" && cargo build --release --locked --bins -q) || die "cargo build failed"
}

service_env() { # the TALLY_* configuration every service gets on the local stack
  echo "TALLY_KAFKA_BROKERS=$KAFKA_BROKERS"
  echo "TALLY_CLICKHOUSE_URL=$CLICKHOUSE_URL"
  echo "TALLY_CLICKHOUSE_DATABASE=${TALLY_CLICKHOUSE_DATABASE:-tally}"
  echo "TALLY_EVENTS_TOPIC=$EVENTS_TOPIC"
  echo "TALLY_DLQ_TOPIC=$DLQ_TOPIC"
  echo "TALLY_CONTROL_TOPIC=$CONTROL_TOPIC"
  echo "TALLY_ADMIN_TOKEN=$(admin_token)"
  echo "TALLY_ARCHIVE_URL=file://$DEV/archive" # the query API reads dropped months from it
  echo "TALLY_LOG_FORMAT=json"
}

start_service() { # start_service NAME BINARY ADDR [ENV...]
  local name="$1" binary="$2" addr="$3"; shift 3
  if is_running "$name"; then return 0; fi
  local exe="$CARGO_TARGET_DIR/release/$binary"
  [[ -x $exe ]] || build_services
  log "starting $name on $addr"
  # shellcheck disable=SC2046
  start_bg "$name" env $(service_env) TALLY_LISTEN_ADDR="$addr" "$@" "$exe"
  wait_http "$name" "http://$addr/healthz" 30
}

start_one() {
  case "$1" in
    clickhouse) start_clickhouse ;;
    kafka) start_kafka ;;
    s3) start_s3 ;;
    # The ingest reaches Kafka only: keys and prices from the control topic the consumer fills.
    ingest) start_service ingest tally-ingest "$INGEST_ADDR" TALLY_INGEST_CONTROL=kafka ;;
    # Static group membership: a consumer restarted after a crash gets its partitions back at
    # once instead of waiting out the dead member's session (10 s).
    consumer)
      is_running consumer || create_topic "$CONTROL_TOPIC" 1 --config cleanup.policy=compact \
        --config segment.ms=3600000 --config min.cleanable.dirty.ratio=0.1
      start_service consumer tally-consumer "$CONSUMER_ADDR" TALLY_CONSUMER_INSTANCE_ID=local-consumer-1 ;;
    query-api) start_service query-api tally-query-api "$QUERY_ADDR" ;;
    *) die "unknown component $1 (clickhouse kafka s3 ingest consumer query-api)" ;;
  esac
}

SERVICES=(query-api consumer ingest)
INFRA=(clickhouse kafka s3)

infra_up() {
  install_all
  start_clickhouse
  start_kafka
  start_s3
}

write_demo_env() {
  local key="$1"
  cat >"$DEV/demo.env" <<EOF
TALLY_INGEST_URL=http://$INGEST_ADDR
TALLY_QUERY_URL=http://$QUERY_ADDR
TALLY_DEMO_API_KEY=$key
TALLY_ADMIN_TOKEN=$(admin_token)
TALLY_CLICKHOUSE_URL=$CLICKHOUSE_URL
TALLY_KAFKA_BROKERS=$KAFKA_BROKERS
TALLY_S3_ENDPOINT=$S3_ENDPOINT
TALLY_S3_BUCKET=$S3_BUCKET
TALLY_S3_ACCESS_KEY_ID=$S3_ACCESS_KEY
TALLY_S3_SECRET_ACCESS_KEY=$S3_SECRET_KEY
EOF
  chmod 600 "$DEV/demo.env"
}

demo_org() {
  local key=""
  if [[ -f "$DEV/demo.env" ]]; then
    key="$(sed -n 's/^TALLY_DEMO_API_KEY=//p' "$DEV/demo.env")"
    if [[ -n $key ]] && curl -fsS -o /dev/null -H "X-API-Key: $key" "http://$QUERY_ADDR/api/telemetry/status"; then
      write_demo_env "$key"; return 0
    fi
  fi
  log "creating the demo org and its API key"
  local body
  body="$(curl -fsS -X POST -H "Authorization: Bearer $(admin_token)" -H 'Content-Type: application/json' \
    -d '{"name":"demo","plan":"ENTERPRISE"}' "http://$QUERY_ADDR/admin/orgs")" || die "POST /admin/orgs failed"
  key="$(sed -n 's/.*"apiKey":"\([^"]*\)".*/\1/p' <<<"$body")"
  [[ -n $key ]] || die "POST /admin/orgs returned no apiKey: $body"
  write_demo_env "$key"
}

demo_traffic() {
  local key; key="$(sed -n 's/^TALLY_DEMO_API_KEY=//p' "$DEV/demo.env")"
  # The ingest is ready once it has read the keys and prices (from the control topic the consumer
  # publishes); then it learns the new demo key at the consumer's next publication (<= 5 s).
  wait_http ingest "http://$INGEST_ADDR/readyz" 30
  for _ in $(seq 1 75); do
    local code
    code="$(curl -s -o /dev/null -w '%{http_code}' -X POST -H "X-API-Key: $key" -H 'Content-Type: application/json' \
      -d '{"events":[]}' "http://$INGEST_ADDR/v1/ingest")"
    [[ $code != 401 ]] && break
    sleep 0.2
  done
  log "sending demo traffic with tally-loadgen (open model: 20 requests/s of 10-event batches for 15 s)"
  "$CARGO_TARGET_DIR/release/tally-loadgen" --url "http://$INGEST_ADDR" --path /v1/ingest --key "$key" \
    --rate 20 --duration 15 --events 10 --connections 4 >"$DEV/log/demo-traffic.log" 2>&1 \
    || { tail -n 30 "$DEV/log/demo-traffic.log" >&2; die "demo traffic failed"; }
  tail -n 2 "$DEV/log/demo-traffic.log" >&2
}

# One archiver pass into .dev/archive (a CronJob runs `tally-archiver run` in production). On a
# fresh stack every month is still open, so it archives nothing and says so.
archive_pass() {
  log "running one archiver pass (tally-archiver run, archive in .dev/archive)"
  TALLY_CLICKHOUSE_URL="$CLICKHOUSE_URL" TALLY_CLICKHOUSE_DATABASE=tally TALLY_ARCHIVE_URL="file://$DEV/archive" \
    TALLY_KAFKA_BROKERS="$KAFKA_BROKERS" TALLY_DLQ_TOPIC="$DLQ_TOPIC" \
    "$CARGO_TARGET_DIR/release/tally-archiver" run >"$DEV/log/archiver.log" 2>&1 \
    || { tail -n 20 "$DEV/log/archiver.log" >&2; die "the archiver pass failed (.dev/log/archiver.log)"; }
  sed 's/^/  /' "$DEV/log/archiver.log" | grep '"month"' || true
}

up() {
  infra_up
  build_services
  for s in "${SERVICES[@]}"; do start_one "$s"; done
  demo_org
  demo_traffic
  archive_pass
  local key; key="$(sed -n 's/^TALLY_DEMO_API_KEY=//p' "$DEV/demo.env")"
  cat <<EOF

Tally is up.
  dashboard   http://$QUERY_ADDR/dashboard   (sign in with the demo key: TALLY_DEMO_API_KEY in .dev/demo.env)
  ingest      http://$INGEST_ADDR   (POST /v1/ingest, POST /analytics/events)
  query-api   http://$QUERY_ADDR   (GET /api/telemetry/status, /api/telemetry/stream, /api/costs/summary, admin /admin/orgs)
  consumer    http://$CONSUMER_ADDR   (/metrics, /readyz)
  clickhouse  $CLICKHOUSE_URL   (database tally, admin tables in tally_admin; clickhouse-client --port 9000; read-only user analyst/analyst)
  kafka       $KAFKA_BROKERS   (topics $EVENTS_TOPIC, $DLQ_TOPIC; $CONTROL_TOPIC: the keys and prices the ingest reads)
  s3          $S3_ENDPOINT   (S3Proxy; bucket $S3_BUCKET, access key $S3_ACCESS_KEY, secret in .dev/demo.env)
  archive     .dev/archive/   (tally-archiver run: closed months as Parquet + manifests; .dev/log/archiver.log)
  logs        .dev/log/      pids .dev/run/      settings .dev/demo.env

Try:
  source .dev/demo.env
  curl -s -H "X-API-Key: \$TALLY_DEMO_API_KEY" \$TALLY_QUERY_URL/api/telemetry/status
  curl -s -H "X-API-Key: \$TALLY_DEMO_API_KEY" \$TALLY_QUERY_URL/api/costs/summary
EOF
}

down() {
  for s in "${SERVICES[@]}"; do stop_proc "$s"; done
  for s in s3 kafka clickhouse; do stop_proc "$s"; done
}

status() { proc_status "${INFRA[@]}" "${SERVICES[@]}"; }

cmd="${1:-}"; shift || true
case "$cmd" in
  install) install_all ;;
  infra-up) infra_up ;;
  up) up ;;
  down) down ;;
  status) status ;;
  build) build_services ;;
  start) start_one "${1:?component}" ;;
  stop) stop_proc "${1:?component}" ;;
  restart) stop_proc "${1:?component}"; [[ ${1} == ingest || ${1} == consumer || ${1} == query-api ]] && build_services; start_one "$1" ;;
  clean) down; rm -rf "$DEV"; log "removed .dev/" ;;
  env) service_env ;;
  kafka-libs) install_kafka; echo "$KAFKA_LIBS" ;;
  s3-libs) install_s3proxy; echo "$S3PROXY_LIBS" ;;
  create-topic) create_topic "${1:?topic}" "${2:-4}" "${@:3}" ;;
  delete-topic) delete_topic "${1:?topic}" ;;
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac
