#!/usr/bin/env bash
# The load generator's scenarios against the whole system (a gateway process and a pool of foundation worker
# processes sharing the ring, replication 2, on loopback): a fixed-rate telemetry run, service calls through the REST
# API, a reconnect storm, a drain (the gateway is sent SIGTERM mid-run and started again; devices follow GOAWAY and
# reconnect), and `kill -9` of a worker mid-run.
#
#   benches/scenarios.sh [--devices 1000] [--rate 10] [--seconds 60] [--workers 3] [--only telemetry]
#                        [--bin-dir DIR] [--pool-tls]
#
# --only telemetry runs the telemetry scenario alone; --bin-dir takes the servers and the load generator from DIR
# (another build, to compare two commits in one session) instead of building this tree. After the telemetry run
# the script prints the CPU time each server process used during it and what each worker passed on to another
# worker's partition (`thingport_foundation_frames_forwarded_total`). --pool-tls gives the pool credentials
# (`thingport-foundation pool init`): links and peer connections are then mutual TLS and membership datagrams sealed.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=1000 RATE=10 SECONDS_=60 WORKERS=3 ONLY="" BIN_DIR= POOL_TLS=
while [ $# -gt 0 ]; do
  case "$1" in
    --devices) DEVICES=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --seconds) SECONDS_=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --bin-dir) BIN_DIR=$2; shift 2 ;;
    --pool-tls) POOL_TLS=1; shift ;;
    *) echo "unknown option $1" >&2; exit 64 ;;
  esac
done
ulimit -n 20000
if [ -n "$BIN_DIR" ]; then
  B=$(cd "$BIN_DIR" && pwd)
else
  cargo build --release -q -p thingport-gateway -p thingport-foundation -p thingport-loadtest
  B=$PWD/target/release
fi
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

$B/thingport-gateway gen-cert --cert "$WORK/cert.pem" --key "$WORK/key.pem" >/dev/null
$B/thingport-gateway gen-secret --out "$WORK/secret" >/dev/null
echo "bench-key" > "$WORK/api-keys"
$B/thingport-gateway token issue --thing dev- --count "$DEVICES" --secret-file "$WORK/secret" > "$WORK/fleet.txt"
POOL_LINE=""
if [ -n "$POOL_TLS" ]; then
  $B/thingport-foundation pool init --dir "$WORK/pool" --host bench >/dev/null
  POOL_LINE="pool_credentials = \"$WORK/pool\""
fi
# worker i: links on 7190+i, API on 8190+i, peer port 7290+i; worker 1 is every worker's seed
FOUNDATIONS=""
for i in $(seq 1 "$WORKERS"); do
  cat > "$WORK/foundation-$i.toml" <<TOML
id = "foundation-$i"
link_address = "127.0.0.1:$((7190 + i))"
api_address = "127.0.0.1:$((8190 + i))"
admin_address = "127.0.0.1:$((9190 + i))"
peer_address = "127.0.0.1:$((7290 + i))"
seeds = ["127.0.0.1:7291"]
bootstrap_members = $WORKERS
api_keys_file = "$WORK/api-keys"
$POOL_LINE
[storage]
data_dir = "$WORK/store-$i"
TOML
  FOUNDATIONS="$FOUNDATIONS\"127.0.0.1:$((7190 + i))\", "
done
cat > "$WORK/gateway.toml" <<TOML
[listen]
address = "127.0.0.1:8491"
[tls]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"
[auth]
secret_file = "$WORK/secret"
[upstream]
foundations = [${FOUNDATIONS%, }]
$POOL_LINE
[limits]
max_sessions_per_ip = 100000
accept_rate = 20000
max_handshakes = 4096
max_handshakes_per_ip = 4096
message_rate = 1000
[session]
drain_timeout = "5s"
[admin]
address = "127.0.0.1:9491"
TOML
wait_port() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
declare -A WORKER_PID
for i in $(seq 1 "$WORKERS"); do
  taskset -c 1 $B/thingport-foundation --config "$WORK/foundation-$i.toml" > "$WORK/foundation-$i.log" 2>&1 &
  WORKER_PID[$i]=$!
  PIDS+=($!)
done
start_gateway() {
  taskset -c 1 $B/thingport-gateway --config "$WORK/gateway.toml" >> "$WORK/gateway.log" 2>&1 &
  GW=$!
  PIDS+=($GW)
  wait_port 8491
}
# until the pool has made its partition table
for _ in $(seq 1 300); do
  curl -sf -o /dev/null http://127.0.0.1:9191/readyz && break
  sleep 0.1
done
start_gateway
run() {
  echo "== $1"
  shift
  taskset -c 0 $B/thingport-loadtest run --target 127.0.0.1:8491 --ca "$WORK/cert.pem" --tokens "$WORK/fleet.txt" \
    --devices "$DEVICES" --ramp 2000 --quiet "$@"
}
echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); gateway and $WORKERS foundation workers on core 1, load on core 0"
# CPU seconds (user + system) a process has used
cpu() { awk -v t="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / t }' "/proc/$1/stat"; }
SERVERS=("gateway:$GW")
for i in $(seq 1 "$WORKERS"); do SERVERS+=("foundation-$i:${WORKER_PID[$i]}"); done
declare -A CPU_BEFORE
for s in "${SERVERS[@]}"; do CPU_BEFORE[$s]=$(cpu "${s#*:}"); done
run "telemetry: $DEVICES devices x $RATE/s for ${SECONDS_}s" --scenario telemetry --rate "$RATE" --duration "${SECONDS_}s"
for s in "${SERVERS[@]}"; do
  echo "cpu during telemetry: ${s%%:*} $(awk -v a="${CPU_BEFORE[$s]}" -v b="$(cpu "${s#*:}")" 'BEGIN { printf "%.2f", b - a }') s"
done
for i in $(seq 1 "$WORKERS"); do
  echo "foundation-$i passed on: $(curl -s "http://127.0.0.1:$((9190 + i))/metrics" |
    awk '/^thingport_foundation_frames_forwarded_total / { n = $2 } END { print n + 0 }') frames"
done
[ "$ONLY" = telemetry ] && exit 0
run "service calls through the API: 200/s for 20s" --scenario service --api 127.0.0.1:8191 --api-key bench-key \
  --call-rate 200 --duration 20s
run "reconnect storm: 30% of $DEVICES devices drop and reconnect mid-run" --scenario reconnect --rate 1 \
  --reconnect-share 0.3 --duration 20s
if [ "$WORKERS" -ge 3 ]; then
  echo "== kill -9 of foundation-2, 10 s into a 30 s telemetry run"
  ( sleep 10; kill -9 "${WORKER_PID[2]}" ) &
  run "telemetry through the kill" --scenario telemetry --rate "$RATE" --duration 30s
  curl -s -H 'x-api-key: bench-key' http://127.0.0.1:8191/v1/cluster | python3 -c "
import json,sys
v=json.load(sys.stdin)
print('table after the kill: version', v['table']['version'], {k.split('#')[0]: n for k, n in v['table']['replica_slots'].items()})"
fi
echo "== drain: SIGTERM to the gateway 10 s into a 30 s run, then a new gateway on the same port"
( sleep 11; kill -TERM "$GW"; wait "$GW" 2>/dev/null; start_gateway ) &
RESTART=$!
taskset -c 0 $B/thingport-loadtest run --target 127.0.0.1:8491 --ca "$WORK/cert.pem" --tokens "$WORK/fleet.txt" \
  --devices "$DEVICES" --ramp 2000 --quiet --scenario drain --rate 1 --duration 30s
wait "$RESTART" || true
grep -c "drained" "$WORK/gateway.log" | sed 's/^/gateway drains logged: /'
