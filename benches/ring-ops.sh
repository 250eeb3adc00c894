#!/usr/bin/env bash
# The cache ring alone, on worker processes: put and get operations per second per worker at replication 2, the
# failover time after `kill -9` of a worker and after SIGSTOP of one (the longest time a partition's puts stalled),
# and the partitions moved when a worker joins. Workers run on core 1, the load (foundation's `ring_load` example, straight to the
# partitions' primaries over the peer protocol) on core 0.
#
#   benches/ring-ops.sh [--workers 3] [--seconds 10] [--concurrency 256]
set -euo pipefail
cd "$(dirname "$0")/.."
WORKERS=3 SECONDS_=10 CONCURRENCY=256
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) WORKERS=$2; shift 2 ;;
    --seconds) SECONDS_=$2; shift 2 ;;
    --concurrency) CONCURRENCY=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 64 ;;
  esac
done
cargo build --release -q -p thingport-foundation --bin thingport-foundation --example ring_load
B=$PWD/target/release
WORK=$(mktemp -d)
declare -A PID
cleanup() { for p in "${PID[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; if [ -n "${KEEP:-}" ]; then echo "logs in $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
echo "bench-key" > "$WORK/api-keys"

# worker i: peer port 7260+i, API port 8260+i; the first is every other's seed
start_worker() {
  local i=$1
  cat > "$WORK/w$i.toml" <<TOML
id = "w$i"
link_address = "127.0.0.1:$((7160 + i))"
api_address = "127.0.0.1:$((8260 + i))"
admin_address = "127.0.0.1:$((9260 + i))"
peer_address = "127.0.0.1:$((7260 + i))"
seeds = ["127.0.0.1:7261"]
bootstrap_members = $WORKERS
api_keys_file = "$WORK/api-keys"
[storage]
data_dir = "$WORK/store-$i"
TOML
  taskset -c 1 "$B/thingport-foundation" --config "$WORK/w$i.toml" > "$WORK/w$i.out" 2> "$WORK/w$i.log" &
  PID[$i]=$!
}
# waits until worker 1's table has $1 members and no change is under way
wait_table() {
  for _ in $(seq 1 300); do
    view=$(curl -s -H 'x-api-key: bench-key' http://127.0.0.1:8261/v1/cluster || true)
    if echo "$view" | python3 -c "import json,sys; v=json.load(sys.stdin); sys.exit(0 if v['table'] and len(v['table']['members'])==$1 and not v['changing'] else 1)" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "the pool did not settle on $1 members" >&2; return 1
}
# the load's peers: the workers that run
peers() { for i in "${!PID[@]}"; do echo "127.0.0.1:$((7260 + i))"; done | paste -sd,; }
for i in $(seq 1 "$WORKERS"); do start_worker "$i"; done
wait_table "$WORKERS"
load() { RING_LOAD_DEBUG=${RING_LOAD_DEBUG:-} taskset -c 0 "$B/examples/ring_load" --peers "$(peers)" --concurrency "$CONCURRENCY" "$@"; }

echo "== puts (replication 2), $WORKERS workers on core 1"
load --seconds "$SECONDS_" --reads 0
echo "== gets"
load --seconds "$SECONDS_" --reads 1

echo "== kill -9 of w2 after 3 s of puts (default failure detection: probe 500 ms, suspect 1.5 s)"
load --seconds 10 --reads 0 &
LOAD=$!
sleep 3
kill -9 "${PID[2]}"; unset 'PID[2]'
KILLED=$(date +%s.%N)
wait_table $((WORKERS - 1))
echo "table settled on $((WORKERS - 1)) members $(echo "$(date +%s.%N) - $KILLED" | bc) s after the kill"
wait $LOAD

echo "== w$((WORKERS + 1)) joins"
start_worker $((WORKERS + 1))
wait_table "$WORKERS"
grep -h "partition table changed" "$WORK"/w*.log | tail -1
curl -s -H 'x-api-key: bench-key' http://127.0.0.1:8261/v1/cluster | python3 -c "
import json,sys
v=json.load(sys.stdin)
print('replica slots:', {k.split('#')[0]: n for k, n in v['table']['replica_slots'].items()})
print('things per worker:', {m['id']: m['keys'] for m in v['members']})"

echo "== SIGSTOP of w3 after 3 s of puts: nothing refuses connections, so failure detection (default: probe 500 ms,"
echo "   suspect 1.5 s) must notice the silence"
load --seconds 10 --reads 0 &
LOAD=$!
sleep 3
kill -STOP "${PID[3]}"
PAUSED=$(date +%s.%N)
wait_table $((WORKERS - 1))
echo "table settled on $((WORKERS - 1)) members $(echo "$(date +%s.%N) - $PAUSED" | bc) s after the pause"
wait $LOAD
kill -CONT "${PID[3]}"
RESUMED=$(date +%s%N)
wait_table "$WORKERS"
echo "w3, resumed, rejoined: the table holds $WORKERS members again $(( ($(date +%s%N) - RESUMED) / 1000000 )) ms after the resume"
