#!/usr/bin/env bash
# Streams of changes under device load: a gateway and WORKERS foundation worker processes (two by default,
# replication 2; on loopback), DEVICES devices reporting RATE messages per second each, and STREAMS Server-Sent Event streams held by
# foundation-1, one per device's thing (`thingport-loadtest watch`). Prints foundation-1's memory per open stream
# (RSS with the streams open and idle, less RSS before) and the delay from the primary's receipt of a value to its
# delivery on a stream (on this machine's clock, in whole milliseconds), with the device load's own report.
#
#   benches/streams.sh [--devices 1000] [--rate 10] [--streams 1000] [--seconds 30] [--bin-dir DIR]
#                      [--workers 1|2] [--durability disk|replicated|memory]
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=1000 RATE=10 STREAMS=1000 SECONDS_=30 BIN_DIR= WORKERS=2 DURABILITY=disk
while [ $# -gt 0 ]; do
  case "$1" in
    --devices) DEVICES=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --streams) STREAMS=$2; shift 2 ;;
    --seconds) SECONDS_=$2; shift 2 ;;
    --bin-dir) BIN_DIR=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --durability) DURABILITY=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 64 ;;
  esac
done
case "$WORKERS" in 1|2) ;; *) echo "--workers is 1 or 2" >&2; exit 64 ;; esac
[ "$STREAMS" -le "$DEVICES" ] || { echo "--streams is at most --devices (one stream per device's thing)" >&2; exit 64; }
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
KEY=bench-key
HASH=$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)
echo "sha256:$HASH role=admin name=bench" > "$WORK/api-keys"
$B/thingport-gateway token issue --thing dev- --count "$DEVICES" --secret-file "$WORK/secret" > "$WORK/fleet.txt"
UPSTREAM=
for i in $(seq 1 "$WORKERS"); do
  UPSTREAM="$UPSTREAM${UPSTREAM:+, }\"127.0.0.1:$((7170 + i))\""
  cat > "$WORK/foundation-$i.toml" <<TOML
id = "foundation-$i"
link_address = "127.0.0.1:$((7170 + i))"
api_address = "127.0.0.1:$((8170 + i))"
admin_address = "127.0.0.1:$((9170 + i))"
peer_address = "127.0.0.1:$((7270 + i))"
seeds = ["127.0.0.1:7271"]
bootstrap_members = $WORKERS
api_keys_file = "$WORK/api-keys"
durability = "$DURABILITY"
[storage]
data_dir = "$WORK/store-$i"
TOML
done
cat > "$WORK/gateway.toml" <<TOML
[listen]
address = "127.0.0.1:8471"
[tls]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"
[auth]
secret_file = "$WORK/secret"
[upstream]
foundations = [$UPSTREAM]
[limits]
max_sessions_per_ip = 100000
accept_rate = 20000
max_handshakes = 4096
max_handshakes_per_ip = 4096
message_rate = 1000
[admin]
address = "127.0.0.1:9471"
TOML
wait_port() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
for i in $(seq 1 "$WORKERS"); do
  taskset -c 1 $B/thingport-foundation --config "$WORK/foundation-$i.toml" > "$WORK/foundation-$i.log" 2>&1 &
  PIDS+=($!)
  [ "$i" = 1 ] && F1=$!
done
for _ in $(seq 1 300); do curl -sf -o /dev/null "http://127.0.0.1:$((9170 + WORKERS))/readyz" && break; sleep 0.1; done
taskset -c 1 $B/thingport-gateway --config "$WORK/gateway.toml" > "$WORK/gateway.log" 2>&1 &
PIDS+=($!)
wait_port 8471
devices() {
  taskset -c 0 $B/thingport-loadtest run --target 127.0.0.1:8471 --ca "$WORK/cert.pem" --tokens "$WORK/fleet.txt" \
    --devices "$DEVICES" --ramp 2000 --quiet --scenario telemetry --values float "$@"
}
rss() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }
echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); gateway and $WORKERS worker(s) (durability $DURABILITY) on core 1, load and streams on core 0"
echo "== the devices' things made (a short run at 1/s)"
devices --rate 1 --duration 2s > /dev/null
sleep 2
BEFORE=$(rss "$F1")
taskset -c 0 $B/thingport-loadtest watch --api 127.0.0.1:8171 --api-key "$KEY" --things dev- --count "$STREAMS" \
  --duration "$((SECONDS_ + 10))s" > "$WORK/watch.out" 2> "$WORK/watch.err" &
WATCH=$!
PIDS+=($WATCH)
for _ in $(seq 1 600); do grep -q "streams open" "$WORK/watch.err" && break; sleep 0.1; done
grep -q "streams open" "$WORK/watch.err" || { cat "$WORK/watch.err"; echo "the streams did not open"; exit 1; }
sleep 6
AFTER=$(rss "$F1")
echo "foundation-1 RSS: $BEFORE KiB before, $AFTER KiB with $STREAMS idle streams open:" \
  "$(awk -v a="$BEFORE" -v b="$AFTER" -v n="$STREAMS" 'BEGIN { printf "%.1f", (b - a) / n }') KiB per stream"
curl -s http://127.0.0.1:9171/metrics | grep -E '^thingport_streams ' || true
echo "== $DEVICES devices x $RATE/s for ${SECONDS_}s, with the streams reading"
devices --rate "$RATE" --duration "${SECONDS_}s"
wait "$WATCH"
echo "== the streams (from the start of the load to its end, and 10 s more)"
cat "$WORK/watch.out"
curl -s http://127.0.0.1:9171/metrics | grep -E '^thingport_(stream_cuts_total|stream_events_total|change_log_changes) ' || true
for i in $(seq 1 "$WORKERS"); do
  echo "foundation-$i passed on: $(curl -s "http://127.0.0.1:$((9170 + i))/metrics" |
    awk '/^thingport_foundation_frames_forwarded_total / { n = $2 } END { print n + 0 }') frames"
done
