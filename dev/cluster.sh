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
#   dev/cluster.sh down | status | clean
#
# Ports: ZooKeeper 12181; ClickHouse node N (1..4; shard = (N+1)/2, replica = 2-N%2) HTTP 813N,
# native 913N, interserver 923N; Kafka node N (1..3) 919(N+1) (brokers 9192-9194), controllers
# 919(N+4) (9195-9197). Memory (measured idle, RSS): ZooKeeper 75 MiB, each Kafka ~320 MiB (512 MiB
# heap), each ClickHouse server ~85 MiB (256 MiB caches): 1.4 GiB for the whole cluster idle.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEV="$ROOT/.dev"
CL="$DEV/cluster"
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
  wait_until zookeeper 60 port_open "$ZK_PORT"
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
      -e '/<\/yandex>/d' "$ROOT/dev/clickhouse/config.xml"
    cat <<EOF
    <!-- dev/cluster.sh: node $n, shard $(ch_shard "$n"), replica $(ch_replica "$n") -->
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

create_topic() { # create_topic NAME PARTITIONS
  local tries
  for tries in $(seq 1 15); do
    kafka_topics --create --if-not-exists --topic "$1" --partitions "$2" --replication-factor 3 \
      --config min.insync.replicas=2 >>"$CL/log/kafka-topics.log" 2>&1 && return 0
    sleep 2
  done
  tail -n 20 "$CL/log/kafka-topics.log" >&2
  die "could not create topic $1 on the cluster"
}

# ---------------------------------------------------------------- commands

infra_up() {
  install_all
  start_zookeeper
  start_clickhouse
  start_kafka
  create_topic tally.events.v1 8
  create_topic tally.events.dlq.v1 2
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
  log "applying the cluster form of the migrations to database $db"
  ch 1 "CREATE DATABASE IF NOT EXISTS $db ON CLUSTER $CLUSTER_NAME" >/dev/null
  count=0
  while IFS= read -r -d '' statement; do
    ch 1 "$statement" >/dev/null || die "statement failed on the cluster: ${statement:0:300}"
    count=$((count + 1))
  done < <(cd "$ROOT" && cargo run -q --locked -p tally-testkit --bin cluster_ddl -- "$db" "$CLUSTER_NAME")
  [[ $count -gt 10 ]] || die "only $count statements came out of cluster_ddl"
  log "$count statements applied ON CLUSTER"
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
  for n in "${KAFKA_NODES[@]}"; do stop_proc "kafka-$n"; done
  for n in "${CH_NODES[@]}"; do stop_proc "clickhouse-$n"; done
  stop_proc zookeeper
}

status() {
  local name
  for name in zookeeper clickhouse-1 clickhouse-2 clickhouse-3 clickhouse-4 kafka-1 kafka-2 kafka-3; do
    if is_running "$name"; then printf '%-13s running  pid %s\n' "$name" "$(pid_of "$name")"; else printf '%-13s stopped\n' "$name"; fi
  done
}

cmd="${1:-}"; shift || true
case "$cmd" in
  install) install_all ;;
  infra-up) infra_up ;;
  smoke) smoke ;;
  schema) schema ;;
  down) down ;;
  status) status ;;
  stop) stop_proc "${1:?component}" ;;
  clean) down; rm -rf "$CL"; log "removed .dev/cluster/" ;;
  *) sed -n '2,17p' "$0"; exit 2 ;;
esac
