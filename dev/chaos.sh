#!/usr/bin/env bash
# `make chaos` / `make chaos-long`: the fault suite (dev/chaos.py) on a private stack.
#
# The suite kills and stops Kafka, ClickHouse and S3, so it never touches `make up`'s stack or the
# servers `make test` shares: it runs its own (same jars, same Debian ClickHouse) in a network
# namespace of its own (`unshare --net`: a loopback of its own, so the usual ports are free and no
# fault can reach any other address), with ClickHouse's data on a tmpfs of its own (`--mount`:
# filling that disk fills nothing else) and its state under .dev/chaos/.
#
#   dev/chaos.sh [chaos.py options]      e.g. --long, --seed 42
#
# Network faults come from Toxiproxy (MIT, from the Go module proxy) inside the namespace: this
# kernel has no netem queueing discipline (`tc qdisc add dev lo root netem` answers "Specified
# qdisc kind is unknown"), so delay and lost answers are made in user space on the paths that
# matter (the SDK to the ingest, the consumer to ClickHouse).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export TALLY_CACHE="${TALLY_CACHE:-$HOME/.cache/tally}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$TALLY_CACHE/target}"
export TALLY_DEV_DIR="$ROOT/.dev/chaos"
TOXIPROXY_VERSION="v2.12.0"
TOXIPROXY_DIR="$TALLY_CACHE/toxiproxy-$TOXIPROXY_VERSION"
# ClickHouse's tmpfs: the long form archives six closed months of 1.5 M rows each beside ~900 000
# events of load, and merges need room of their own, so it gets twice the short form's 2 GiB (a
# long run on 2 GiB filled it before its second disk fault; its consumer "recovery" was then the
# disk's). The disk fault fills whatever is left either way.
# (The namespace's shell gets the same arguments after `inside`.)
long_form=0
[[ " $* " == *" --long "* || " $* " == *" --rounds "* ]] && long_form=1
CLICKHOUSE_DISK_MB="${TALLY_CHAOS_DISK_MB:-$((long_form ? 4096 : 2048))}"

log() { printf '\033[1m[chaos]\033[0m %s\n' "$*" >&2; }

if [[ ${1:-} == inside ]]; then
  shift
  ip link set lo up
  mkdir -p "$TALLY_DEV_DIR/clickhouse/data"
  mount -t tmpfs -o "size=${CLICKHOUSE_DISK_MB}m,mode=0755" tally-chaos-clickhouse "$TALLY_DEV_DIR/clickhouse/data"
  export TALLY_TOXIPROXY="$TOXIPROXY_DIR/server"
  # The time limit's SIGTERM reaches the suite too (it stops its services); this shell then stops
  # the stack below instead of dying with it.
  trap 'log "time limit reached: stopping"' TERM
  status=0
  python3 "$ROOT/dev/chaos.py" "$@" || status=$?
  TALLY_DEV_DIR="$TALLY_DEV_DIR" bash "$ROOT/dev/stack.sh" down >/dev/null 2>&1 || true
  exit "$status"
fi

command -v unshare >/dev/null && command -v ip >/dev/null || { log "error: needs unshare (util-linux) and ip (iproute2)"; exit 1; }
bash "$ROOT/dev/stack.sh" install
if [[ ! -x $TOXIPROXY_DIR/server ]]; then
  log "installing Toxiproxy $TOXIPROXY_VERSION (go install, Go module proxy) into $TOXIPROXY_DIR"
  GOBIN="$TOXIPROXY_DIR" go install "github.com/Shopify/toxiproxy/v2/cmd/server@$TOXIPROXY_VERSION"
fi
log "building the services (cargo build --release)"
(cd "$ROOT" && cargo build --release --locked --bins -q)
# What a previous run left (it stopped its processes unless it was killed): stop, then start clean.
TALLY_DEV_DIR="$TALLY_DEV_DIR" bash "$ROOT/dev/stack.sh" down >/dev/null 2>&1 || true
for pidfile in "$TALLY_DEV_DIR"/run/*.pid; do
  [[ -f $pidfile ]] && kill -9 "$(cat "$pidfile")" 2>/dev/null || true
done
rm -rf "$TALLY_DEV_DIR"
mkdir -p "$TALLY_DEV_DIR"
# A bound on the whole run, so that a pipeline which never recovers fails the suite instead of
# holding CI: the short form takes ~3-5 min, the long form ~25 min.
limit="${TALLY_CHAOS_LIMIT_S:-$((long_form ? 3600 : 900))}"
namespace=(unshare --net --mount --propagation private)
# Without root: a user namespace maps this user to root inside it (needs unprivileged user namespaces).
[[ $(id -u) -eq 0 ]] || namespace=(unshare --user --map-root-user --net --mount --propagation private)
status=0
timeout --kill-after=60 "$limit" "${namespace[@]}" -- bash "$0" inside "$@" || status=$?
if [[ $status -eq 124 ]]; then
  log "FAILED: the suite did not end within its limit of $limit s (TALLY_CHAOS_LIMIT_S); its logs are in ${TALLY_DEV_DIR#"$ROOT/"}/log/"
fi
exit "$status"
