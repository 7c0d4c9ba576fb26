#!/usr/bin/env bash
# The local cluster (issue 13), next to the single-node stack of dev/stack.sh and on the same
# installs: three Apache Kafka KRaft nodes (broker + controller each) from the same Maven Central
# jars, ClickHouse 18.16 as two shards x two replicas (four clickhouse-server processes, each with
# its own ports and data directory) coordinated by Debian's ZooKeeper, and nginx (Debian) as the
# load balancer in front of the ingest replicas. Loopback only; state under .dev/cluster/.
#
#   dev/cluster.sh infra-up     install what is missing, start zookeeper, 4 clickhouse, 3 kafka
#   dev/cluster.sh smoke        check it: a replicated table on every node, a Distributed read
#                               over both shards, a topic with replication factor 3 and min ISR 2
#   dev/cluster.sh schema       the cluster form of the migrations (tally_schemas::cluster)
#                               applied to a fresh database and checked on every node
#   dev/cluster.sh up           infra-up, then the services on it (consumers apply the migrations
#                               in cluster form): two ingest replicas behind nginx, two consumers
#                               in one group, the query API reading every shard; demo org+traffic
#   dev/cluster.sh services-down  stop the services, keep the cluster
#   dev/cluster.sh down | status | clean
#
# Services (database "tally"): nginx 127.0.0.1:8280 -> ingest-1 :8281, ingest-2 :8282; nginx
# 127.0.0.1:8130 -> the four ClickHouse nodes' HTTP ports (what ingest and the query API read
# through); consumer-1 :8283, consumer-2 :8284 (ops); query-api :8285.
# Ports: ZooKeeper 12181; ClickHouse node N (1..4; shard = (N+1)/2, replica = 2-N%2) HTTP 813N,
# native 913N, interserver 923N; Kafka node N (1..3) 919(N+1) (brokers 9192-9194), controllers
# 919(N+4) (9195-9197). Memory (measured idle, RSS): ZooKeeper 75 MiB, each Kafka ~320 MiB (512 MiB
# heap), each ClickHouse server ~85 MiB (256 MiB caches): 1.4 GiB for the whole cluster idle.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEV="$ROOT/.dev"
CL="$DEV/cluster"
export TALLY_CACHE="${TALLY_CACHE:-$HOME/.cache/tally}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$TALLY_CACHE/target}"
ZK_PORT=12181
CLUSTER_NAME="tally"
KAFKA_BOOTSTRAP="127.0.0.1:9192,127.0.0.1:9193,127.0.0.1:9194"
CH_NODES=(1 2 3 4)
KAFKA_NODES=(1 2 3)

log() { printf '\033[1m[cluster]\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

mkdir -p "$CL/run" "$CL/log"

PROC_RUN="$CL/run" PROC_LOG="$CL/log"
# shellcheck source=dev/proc.sh
source "$ROOT/dev/proc.sh"
wait_until() { # wait_until NAME SECONDS CHECK...
  local name="$1" secs="$2"; shift 2
  for _ in $(seq 1 $((secs * 5))); do
    if "$@"; then return 0; fi
    is_running "$name" || { tail -n 30 "$CL/log/$name.log" >&2 || true; die "$name exited during start-up (log: .dev/cluster/log/$name.log)"; }
    sleep 0.2
  done
  tail -n 30 "$CL/log/$name.log" >&2 || true
  die "$name did not come up in ${secs}s"
}
http_ok() { curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null; }

install_debian() { # install_debian COMMAND PACKAGE...
  local command="$1"; shift
  command -v "$command" >/dev/null 2>&1 || [[ -e $command ]] && return 0
  log "installing $* from Debian"
  local sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "$@" >"$CL/log/apt.log" 2>&1 \
    || { tail -n 20 "$CL/log/apt.log" >&2; die "apt-get install $* failed"; }
}

install_all() {
  bash "$ROOT/dev/stack.sh" install
  install_debian /usr/share/java/zookeeper.jar zookeeper
  install_debian nginx nginx-light
}

# ---------------------------------------------------------------- ZooKeeper

start_zookeeper() {
  is_running zookeeper && return 0
  port_open "$ZK_PORT" && die "port $ZK_PORT is taken by a process this script did not start"
  mkdir -p "$CL/zookeeper/data"
  printf '%s\n' "tickTime=2000" "initLimit=10" "syncLimit=5" "dataDir=$CL/zookeeper/data" \
    "clientPort=$ZK_PORT" "clientPortAddress=127.0.0.1" "admin.enableServer=false" \
    "4lw.commands.whitelist=ruok,stat,mntr" "autopurge.purgeInterval=1" >"$CL/zookeeper/zoo.cfg"
  log "starting zookeeper (Debian) on 127.0.0.1:$ZK_PORT"
  start_bg zookeeper java -Xms64m -Xmx256m -Dzookeeper.log.dir="$CL/log" \
    -Dlog4j.configuration="file:/etc/zookeeper/conf/log4j.properties" \
    -cp "/etc/zookeeper/conf:/usr/share/java/zookeeper.jar" \
    org.apache.zookeeper.server.quorum.QuorumPeerMain "$CL/zookeeper/zoo.cfg"
  # The port opens before ZooKeeper serves (it replays its log first); ClickHouse started in
  # between fails its handshake and exits. Wait for `stat` to answer with a mode.
  wait_until zookeeper 60 zk_serving
}

zk_serving() {
  local answer
  answer="$(exec 3<>"/dev/tcp/127.0.0.1/$ZK_PORT" && printf stat >&3 && timeout 2 cat <&3)" 2>/dev/null || return 1
  [[ $answer == *"Mode:"* ]]
}

# ---------------------------------------------------------------- ClickHouse, 2 shards x 2 replicas

ch_http_port() { echo $((8130 + $1)); }
ch_tcp_port() { echo $((9130 + $1)); }
ch_shard() { echo $((($1 + 1) / 2)); }
ch_replica() { echo $((2 - $1 % 2)); }

remote_servers() {
  local shard node
  echo "    <remote_servers><$CLUSTER_NAME>"
  for shard in 1 2; do
    echo "      <shard><internal_replication>true</internal_replication>"
    for node in $((shard * 2 - 1)) $((shard * 2)); do
      echo "        <replica><host>127.0.0.1</host><port>$(ch_tcp_port "$node")</port></replica>"
    done
    echo "      </shard>"
  done
  echo "    </$CLUSTER_NAME></remote_servers>"
}

start_clickhouse_node() {
  local n="$1" name="clickhouse-$1"
  is_running "$name" && return 0
  local dir="$CL/$name" http tcp
  http="$(ch_http_port "$n")" tcp="$(ch_tcp_port "$n")"
  port_open "$http" && die "port $http is taken by a process this script did not start"
  mkdir -p "$dir/data/tmp" "$dir/data/user_files" "$dir/data/format_schemas" "$dir/log"
  {
    sed -e "s#@DATA@#$dir/data#g" -e "s#@LOG@#$dir/log#g" \
      -e "s#<http_port>8123</http_port>#<http_port>$http</http_port>#" \
      -e "s#<tcp_port>9000</tcp_port>#<tcp_port>$tcp</tcp_port>#" \
      -e "s#<uncompressed_cache_size>[0-9]*#<uncompressed_cache_size>268435456#" \
      -e "s#<mark_cache_size>[0-9]*#<mark_cache_size>268435456#" \
      -e 's#<level>warning</level>#<level>information</level>#' \
      -e '/<\/yandex>/d' "$ROOT/dev/clickhouse/config.xml"
    cat <<EOF
    <!-- dev/cluster.sh: node $n, shard $(ch_shard "$n"), replica $(ch_replica "$n"); logs at information
         level: block deduplication and quorum messages are info-level, and the cluster suite's
         failures are traced with them -->
    <!-- every part's life (written, fetched, merged, removed) in system.part_log: where a part
         went is what a rollup the cluster suite finds short is traced with -->
    <part_log><database>system</database><table>part_log</table><flush_interval_milliseconds>7500</flush_interval_milliseconds></part_log>
    <interserver_http_host>127.0.0.1</interserver_http_host>
    <interserver_http_port>$((9230 + n))</interserver_http_port>
    <zookeeper><node><host>127.0.0.1</host><port>$ZK_PORT</port></node></zookeeper>
    <macros>
        <cluster>$CLUSTER_NAME</cluster>
        <shard>$(ch_shard "$n")</shard>
        <!-- unique over the cluster: the admin tables are one replica set over every node -->
        <replica>node-$n</replica>
    </macros>
    <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>
$(remote_servers)
</yandex>
EOF
  } >"$dir/config.xml"
  cp "$ROOT/dev/clickhouse/users.xml" "$dir/users.xml"
  log "starting $name (shard $(ch_shard "$n"), replica $(ch_replica "$n")) on 127.0.0.1:$http (http) and :$tcp (native)"
  local server=clickhouse-server
  command -v clickhouse-server >/dev/null 2>&1 || server=/usr/sbin/clickhouse-server
  start_bg "$name" "$server" --config-file="$dir/config.xml"
}

start_clickhouse() {
  local n
  for n in "${CH_NODES[@]}"; do start_clickhouse_node "$n"; done
  for n in "${CH_NODES[@]}"; do wait_until "clickhouse-$n" 60 http_ok "http://127.0.0.1:$(ch_http_port "$n")/ping"; done
}

# ---------------------------------------------------------------- Kafka, three KRaft nodes

kafka_libs() { bash "$ROOT/dev/stack.sh" kafka-libs; }

start_kafka() {
  local libs n voters="1@127.0.0.1:9195,2@127.0.0.1:9196,3@127.0.0.1:9197" cluster_id=""
  libs="$(kafka_libs)"
  [[ -f $CL/kafka.cluster-id ]] || java -cp "$libs/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1 >"$CL/kafka.cluster-id"
  cluster_id="$(cat "$CL/kafka.cluster-id")"
  for n in "${KAFKA_NODES[@]}"; do
    local name="kafka-$n" dir="$CL/kafka-$n" port=$((9191 + n)) controller=$((9194 + n))
    is_running "$name" && continue
    port_open "$port" && die "port $port is taken by a process this script did not start"
    mkdir -p "$dir/data"
    sed -e "s#@DATA@#$dir/data#g" \
      -e "s#^node.id=.*#node.id=$n#" \
      -e "s#^controller.quorum.voters=.*#controller.quorum.voters=$voters#" \
      -e "s#^listeners=.*#listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller#" \
      -e "s#^advertised.listeners=.*#advertised.listeners=PLAINTEXT://127.0.0.1:$port#" \
      -e "s#^default.replication.factor=.*#default.replication.factor=3#" \
      -e "s#^min.insync.replicas=.*#min.insync.replicas=2#" \
      -e "s#^offsets.topic.replication.factor=.*#offsets.topic.replication.factor=3#" \
      -e "s#^transaction.state.log.replication.factor=.*#transaction.state.log.replication.factor=3#" \
      -e "s#^transaction.state.log.min.isr=.*#transaction.state.log.min.isr=2#" \
      -e "s#^share.coordinator.state.topic.replication.factor=.*#share.coordinator.state.topic.replication.factor=3#" \
      -e "s#^share.coordinator.state.topic.min.isr=.*#share.coordinator.state.topic.min.isr=2#" \
      "$ROOT/dev/kafka/server.properties" >"$dir/server.properties"
    if [[ ! -f "$dir/data/meta.properties" ]]; then
      java -Dlog4j2.configurationFile="$ROOT/dev/kafka/log4j2.properties" -cp "$libs/*" kafka.tools.StorageTool format \
        -t "$cluster_id" -c "$dir/server.properties" >>"$CL/log/$name.log" 2>&1 || die "$name storage format failed"
    fi
    log "starting $name (KRaft broker + controller) on 127.0.0.1:$port"
    start_bg "$name" java -Xms128m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
      -Dlog4j2.configurationFile="$ROOT/dev/kafka/log4j2.properties" -cp "$libs/*" kafka.Kafka "$dir/server.properties"
  done
  for n in "${KAFKA_NODES[@]}"; do wait_until "kafka-$n" 120 port_open $((9191 + n)); done
}

# kafka_topics ARGS...: the topic tool against the cluster
kafka_topics() {
  java -cp "$(kafka_libs)/*" -Dlog4j2.configurationFile="$ROOT/dev/kafka/log4j2.properties" \
    org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BOOTSTRAP" "$@"
}

create_topic() { # create_topic NAME PARTITIONS [--config K=V ...]
  local tries topic="$1" partitions="$2"
  shift 2
  for tries in $(seq 1 15); do
    kafka_topics --create --if-not-exists --topic "$topic" --partitions "$partitions" --replication-factor 3 \
      --config min.insync.replicas=2 "$@" >>"$CL/log/kafka-topics.log" 2>&1 && return 0
    sleep 2
  done
  tail -n 20 "$CL/log/kafka-topics.log" >&2
  die "could not create topic $topic on the cluster"
}

# ---------------------------------------------------------------- the services on the cluster

DB="${TALLY_CLICKHOUSE_DATABASE:-tally}"
INGEST_LB=8280
CH_LB=8130
QUERY_PORT=8285
SHARDS="http://127.0.0.1:8131,http://127.0.0.1:8132;http://127.0.0.1:8133,http://127.0.0.1:8134"

start_nginx() {
  is_running nginx && return 0
  mkdir -p "$CL/nginx/temp"
  cat >"$CL/nginx/nginx.conf" <<EOF
worker_processes 1;
pid $CL/nginx/nginx.pid;
error_log $CL/log/nginx-error.log warn;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $CL/nginx/temp/body;
  proxy_temp_path $CL/nginx/temp/proxy;
  fastcgi_temp_path $CL/nginx/temp/fastcgi;
  uwsgi_temp_path $CL/nginx/temp/uwsgi;
  scgi_temp_path $CL/nginx/temp/scgi;
  client_max_body_size 64m;
  # The two ingest replicas; a replica that fails (connection refused, 502/503) is skipped.
  upstream ingest {
    server 127.0.0.1:8281 max_fails=1 fail_timeout=5s;
    server 127.0.0.1:8282 max_fails=1 fail_timeout=5s;
    keepalive 64;
  }
  # Every ClickHouse node: reads through the Distributed tables work from any of them.
  upstream clickhouse {
    server 127.0.0.1:8131 max_fails=1 fail_timeout=5s;
    server 127.0.0.1:8132 max_fails=1 fail_timeout=5s;
    server 127.0.0.1:8133 max_fails=1 fail_timeout=5s;
    server 127.0.0.1:8134 max_fails=1 fail_timeout=5s;
    keepalive 32;
  }
  server {
    listen 127.0.0.1:$INGEST_LB;
    location / {
      proxy_pass http://ingest;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_next_upstream error timeout http_502 http_503 non_idempotent;
    }
  }
  server {
    listen 127.0.0.1:$CH_LB;
    location / {
      proxy_pass http://clickhouse;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_next_upstream error timeout;
      proxy_read_timeout 300s;
    }
  }
}
EOF
  log "starting nginx (Debian): ingest on 127.0.0.1:$INGEST_LB, clickhouse on 127.0.0.1:$CH_LB"
  start_bg nginx nginx -e "$CL/log/nginx-error.log" -p "$CL/nginx" -c "$CL/nginx/nginx.conf"
  wait_until nginx 20 port_open "$INGEST_LB"
}

admin_token() { bash "$ROOT/dev/stack.sh" env | sed -n 's/^TALLY_ADMIN_TOKEN=//p'; }

cluster_env() { # the TALLY_* settings every service gets on the cluster
  echo "TALLY_KAFKA_BROKERS=$KAFKA_BOOTSTRAP"
  echo "TALLY_CLICKHOUSE_DATABASE=$DB"
  echo "TALLY_CLICKHOUSE_CLUSTER=$CLUSTER_NAME"
  echo "TALLY_CONTROL_TOPIC=tally.control.v1" # the consumers publish the keys and prices there
  echo "TALLY_ADMIN_TOKEN=$(admin_token)"
  echo "TALLY_LOG_FORMAT=json"
}

start_service() { # start_service NAME BINARY PORT EXTRA_ENV...
  local name="$1" binary="$2" port="$3"; shift 3
  if is_running "$name"; then
    # A service keeps running across `make test-cluster` runs; one started before its binary was
    # rebuilt would test the old code.
    [[ $CARGO_TARGET_DIR/release/$binary -nt $PROC_RUN/$name.pid ]] || return 0
    log "$name: its binary was rebuilt since it started; restarting it"
    stop_proc "$name"
  fi
  log "starting $name on 127.0.0.1:$port"
  # shellcheck disable=SC2046
  start_bg "$name" env $(cluster_env) TALLY_LISTEN_ADDR="127.0.0.1:$port" "$@" "$CARGO_TARGET_DIR/release/$binary"
  wait_until "$name" 60 http_ok "http://127.0.0.1:$port/healthz"
}

# Consumers migrate (the migration lock lives on node 1, which every runner names) and write each
# org's rows to its shard; the query API reads through the ClickHouse load balancer.
start_consumer() { # start_consumer N [ENV...]
  local n="$1"; shift
  start_service "consumer-$n" tally-consumer $((8282 + n)) TALLY_CLICKHOUSE_URL=http://127.0.0.1:8131 \
    TALLY_CLICKHOUSE_SHARDS="$SHARDS" TALLY_CONSUMER_INSTANCE_ID="consumer-$n" "$@"
}
# The ingest replicas reach Kafka only (as on Kubernetes): keys and prices from the control topic.
start_ingest() { start_service "ingest-$1" tally-ingest $((8280 + $1)) TALLY_INGEST_CONTROL=kafka TALLY_CLICKHOUSE_URL=http://127.0.0.1:9; }
start_query() {
  start_service query-api tally-query-api "$QUERY_PORT" TALLY_CLICKHOUSE_URL="http://127.0.0.1:$CH_LB" TALLY_MIGRATE=false
}

services_up() {
  (cd "$ROOT" && cargo build --release --locked --bins -q) || die "cargo build failed"
  start_nginx
  start_consumer 1
  start_consumer 2
  start_ingest 1
  start_ingest 2
  start_query
}

services_down() {
  local name
  for name in ingest-1 ingest-2 query-api consumer-1 consumer-2 nginx; do stop_proc "$name"; done
}

demo() {
  local body key
  body="$(curl -fsS -X POST -H "Authorization: Bearer $(admin_token)" -H 'Content-Type: application/json' \
    -d '{"name":"cluster-demo","plan":"ENTERPRISE"}' "http://127.0.0.1:$QUERY_PORT/admin/orgs")" || die "POST /admin/orgs failed"
  key="$(sed -n 's/.*"apiKey":"\([^"]*\)".*/\1/p' <<<"$body")"
  (umask 077; printf 'TALLY_INGEST_URL=http://127.0.0.1:%s\nTALLY_QUERY_URL=http://127.0.0.1:%s\nTALLY_DEMO_API_KEY=%s\n' \
    "$INGEST_LB" "$QUERY_PORT" "$key" >"$CL/demo.env")
  # Both ingest replicas read the key from the control topic on their own (<= 5 s after the
  # consumers publish it): wait until several answers in a row (nginx alternates between them)
  # know the key and come from a ready replica.
  local known=0 code
  for _ in $(seq 1 100); do
    code="$(curl -s -o /dev/null -w '%{http_code}' -X POST -H "X-API-Key: $key" -H 'Content-Type: application/json' \
      -d '{"events":[]}' "http://127.0.0.1:$INGEST_LB/v1/ingest")"
    if [[ $code != 401 && $code != 503 ]]; then known=$((known + 1)); else known=0; fi
    [[ $known -ge 4 ]] && break
    sleep 0.2
  done
  log "demo traffic through nginx: 20 requests/s of 10-event batches for 10 s"
  "$CARGO_TARGET_DIR/release/tally-loadgen" --url "http://127.0.0.1:$INGEST_LB" --path /v1/ingest --key "$key" \
    --rate 20 --duration 10 --events 10 --connections 4 2>&1 | tail -n 2 >&2
}

up() {
  infra_up
  services_up
  demo
  cat <<EOF

The Tally cluster is up (database $DB, ClickHouse cluster '$CLUSTER_NAME').
  ingest      http://127.0.0.1:$INGEST_LB   (nginx -> ingest-1 :8281, ingest-2 :8282)
  query-api   http://127.0.0.1:$QUERY_PORT   (reads $DB.events_all, rollup_hourly_all through nginx :$CH_LB)
  consumers   http://127.0.0.1:8283, :8284   (/metrics; one group; each org's rows to its shard)
  clickhouse  http://127.0.0.1:8131-8134   (shard 1: 8131, 8132; shard 2: 8133, 8134; any node via :$CH_LB)
  kafka       $KAFKA_BOOTSTRAP   (replication factor 3, min.insync.replicas 2)
  settings    .dev/cluster/demo.env   logs .dev/cluster/log/
EOF
}

# ---------------------------------------------------------------- commands

infra_up() {
  install_all
  start_zookeeper
  start_clickhouse
  start_kafka
  create_topic tally.events.v1 8
  create_topic tally.events.dlq.v1 2
  create_topic tally.control.v1 1 --config cleanup.policy=compact
  log "cluster up: clickhouse http 8131-8134 (cluster '$CLUSTER_NAME': 2 shards x 2 replicas), kafka $KAFKA_BOOTSTRAP, zookeeper 127.0.0.1:$ZK_PORT"
}

ch() { # ch NODE SQL: one statement on one node, its output
  curl -fsS --max-time 60 "http://127.0.0.1:$(ch_http_port "$1")/" --data-binary "$2"
}

smoke() {
  local db="smoke_$RANDOM$RANDOM" n total
  log "smoke test: database $db ON CLUSTER, a replicated table per shard, a Distributed table over both"
  ch 1 "CREATE DATABASE $db ON CLUSTER $CLUSTER_NAME" >/dev/null
  ch 1 "CREATE TABLE $db.t_local ON CLUSTER $CLUSTER_NAME (k UInt32, v String)
        ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/$db/t_local', '{replica}') ORDER BY k" >/dev/null
  ch 1 "CREATE TABLE $db.t ON CLUSTER $CLUSTER_NAME AS $db.t_local
        ENGINE = Distributed($CLUSTER_NAME, $db, t_local, k)" >/dev/null
  # One write per shard, each on its first replica; each must reach its second replica.
  ch 1 "INSERT INTO $db.t_local SELECT number, 'shard 1' FROM system.numbers LIMIT 1000" >/dev/null
  ch 3 "INSERT INTO $db.t_local SELECT number + 1000, 'shard 2' FROM system.numbers LIMIT 500" >/dev/null
  for n in 2 4; do ch "$n" "SYSTEM SYNC REPLICA $db.t_local" >/dev/null; done
  local counts=""
  for n in "${CH_NODES[@]}"; do counts+="$(ch "$n" "SELECT count() FROM $db.t_local") "; done
  total="$(ch 2 "SELECT count() FROM $db.t")"
  ch 1 "DROP DATABASE $db ON CLUSTER $CLUSTER_NAME" >/dev/null
  [[ $counts == "1000 1000 500 500 " ]] || die "replicas hold $counts rows (expected 1000 1000 500 500)"
  [[ $total == 1500 ]] || die "the Distributed table reads $total rows (expected 1500)"
  log "replicas hold ${counts% } rows; the Distributed table reads $total"
  local described
  described="$(kafka_topics --describe --topic tally.events.v1 2>/dev/null)"
  grep -q "ReplicationFactor: 3" <<<"$described" || die "tally.events.v1 is not replicated 3 times: $described"
  grep -q "min.insync.replicas=2" <<<"$described" || die "tally.events.v1 lacks min.insync.replicas=2: $described"
  log "tally.events.v1: 8 partitions, replication factor 3, min.insync.replicas=2"
}

# The cluster form of the migrations (tally_schemas::cluster) applied to a fresh database, then
# checked: every table on every node, an org's rows and rollups replicated within its shard, the
# Distributed tables reading both shards, the admin tables on every node.
schema() {
  local db="cluster_schema_$RANDOM" n count
  log "applying the migrations in cluster form to database $db (tally-consumer migrate, TALLY_CLICKHOUSE_CLUSTER=$CLUSTER_NAME)"
  (cd "$ROOT" && cargo build --release --locked --bins -q) || die "cargo build failed"
  TALLY_CLICKHOUSE_URL=http://127.0.0.1:8131 TALLY_CLICKHOUSE_DATABASE="$db" TALLY_CLICKHOUSE_CLUSTER="$CLUSTER_NAME" \
    "$CARGO_TARGET_DIR/release/tally-consumer" migrate >&2 || die "the migrations failed on the cluster"
  count="$(ch 1 "SELECT count() FROM $db.schema_migrations")"
  [[ $count -ge 5 ]] || die "only $count migrations recorded"
  for n in 2 3 4; do
    # Replicated: the other nodes fetch the recorded rows asynchronously.
    ch "$n" "SYSTEM SYNC REPLICA $db.schema_migrations" >/dev/null
    [[ $(ch "$n" "SELECT count() FROM $db.schema_migrations") == "$count" ]] || die "node $n does not see the $count migrations recorded"
  done
  log "$count migrations applied ON CLUSTER and recorded on every node"
  for n in "${CH_NODES[@]}"; do
    local tables
    tables="$(ch "$n" "SELECT count() FROM system.tables WHERE database = '$db' AND name IN ('events', 'events_all', 'rollup_hourly', 'rollup_hourly_all', 'rollup_daily', 'rollup_daily_all', 'rollup_hourly_mv', 'rollup_daily_mv', 'model_prices')")"
    [[ $tables == 9 ]] || die "node $n has $tables of the 9 tables of $db"
    tables="$(ch "$n" "SELECT count() FROM system.tables WHERE database = '${db}_admin' AND name IN ('orgs', 'api_keys', 'budgets')")"
    [[ $tables == 3 ]] || die "node $n has $tables of the 3 admin tables"
  done
  # One org's events on each shard's first replica; the rollup views run there and replicate.
  ch 1 "INSERT INTO $db.events (org_id, event_id, timestamp, cost_nanos) SELECT 'org-a', generateUUIDv4(), toDateTime('2026-11-02 10:00:00') + number, 1000 FROM system.numbers LIMIT 300" >/dev/null
  ch 3 "INSERT INTO $db.events (org_id, event_id, timestamp, cost_nanos) SELECT 'org-b', generateUUIDv4(), toDateTime('2026-11-02 10:00:00') + number, 7 FROM system.numbers LIMIT 200" >/dev/null
  ch 1 "INSERT INTO ${db}_admin.orgs (org_id, name, version) VALUES ('org-a', 'A', 1)" >/dev/null
  for n in "${CH_NODES[@]}"; do ch "$n" "SYSTEM SYNC REPLICA $db.events" >/dev/null; ch "$n" "SYSTEM SYNC REPLICA $db.rollup_hourly" >/dev/null; ch "$n" "SYSTEM SYNC REPLICA ${db}_admin.orgs" >/dev/null; done
  local got
  got="$(ch 2 "SELECT count(), sum(cost_nanos) FROM $db.events") / $(ch 4 "SELECT count(), sum(cost_nanos) FROM $db.events")"
  [[ $got == $'300\t300000 / 200\t1400' ]] || die "shard replicas hold $got (expected 300 300000 / 200 1400)"
  got="$(ch 2 "SELECT toUInt64(countMerge(events)), sumMerge(cost_nanos_sum) FROM $db.rollup_hourly_all")"
  [[ $got == $'500\t301400' ]] || die "the rollups over the cluster hold $got (expected 500 301400)"
  got="$(ch 4 "SELECT count() FROM ${db}_admin.orgs")"
  [[ $got == 1 ]] || die "node 4 has $got admin rows (expected the one written on node 1)"
  ch 1 "DROP DATABASE ${db}_admin ON CLUSTER $CLUSTER_NAME" >/dev/null
  ch 1 "DROP DATABASE $db ON CLUSTER $CLUSTER_NAME" >/dev/null
  log "every node has the schema; each shard's replicas hold its org's rows (300 / 200) and rollups; rollup_hourly_all reads 500 events, 301400 nano-dollars; admin rows reach every node"
}

down() {
  local n
  services_down
  for n in "${KAFKA_NODES[@]}"; do stop_proc "kafka-$n"; done
  for n in "${CH_NODES[@]}"; do stop_proc "clickhouse-$n"; done
  stop_proc zookeeper
}

status() {
  proc_status zookeeper clickhouse-1 clickhouse-2 clickhouse-3 clickhouse-4 kafka-1 kafka-2 kafka-3 \
    nginx ingest-1 ingest-2 consumer-1 consumer-2 query-api
}

cmd="${1:-}"; shift || true
case "$cmd" in
  install) install_all ;;
  infra-up) infra_up ;;
  up) up ;;
  services-up) services_up ;;
  services-down) services_down ;;
  start) case "${1:?component}" in
      consumer-*) n="${1#consumer-}"; shift; start_consumer "$n" "$@" ;;
      ingest-*) start_ingest "${1#ingest-}" ;;
      clickhouse-*) start_clickhouse_node "${1#clickhouse-}"; wait_until "$1" 60 http_ok "http://127.0.0.1:$(ch_http_port "${1#clickhouse-}")/ping" ;;
      kafka-*) start_kafka ;;
      query-api) start_query ;;
      nginx) start_nginx ;;
      *) die "start: consumer-N, ingest-N, clickhouse-N, kafka-N, query-api or nginx" ;;
    esac ;;
  env) cluster_env; echo "TALLY_CLICKHOUSE_SHARDS=$SHARDS" ;;
  create-topic) create_topic "${1:?topic}" "${2:-8}" ;;
  delete-topic) kafka_topics --delete --if-exists --topic "${1:?topic}" >>"$CL/log/kafka-topics.log" 2>&1 ;;
  smoke) smoke ;;
  schema) schema ;;
  down) down ;;
  status) status ;;
  stop) stop_proc "${1:?component}" ;;
  clean) down; rm -rf "$CL"; log "removed .dev/cluster/" ;;
  *) sed -n '2,26p' "$0"; exit 2 ;;
esac
