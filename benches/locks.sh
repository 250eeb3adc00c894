#!/usr/bin/env bash
# Lock acquire/release through the API: WORKERS foundation worker processes on loopback (a consensus group of
# that many voters, up to five), and `thingport-loadtest locks` with CLIENTS clients spread over their APIs, each
# in a loop of POST /v1/locks/{name} and DELETE with its token. Prints operations per second, latency and the token
# check. The consensus log fsyncs every append.
#
#   benches/locks.sh [--workers 3] [--clients 64] [--names N] [--seconds 10] [--bin-dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
WORKERS=3 CLIENTS=64 NAMES= SECONDS_=10 BIN_DIR=
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) WORKERS=$2; shift 2 ;;
    --clients) CLIENTS=$2; shift 2 ;;
    --names) NAMES=$2; shift 2 ;;
    --seconds) SECONDS_=$2; shift 2 ;;
    --bin-dir) BIN_DIR=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 64 ;;
  esac
done
[ "$WORKERS" -ge 1 ] && [ "$WORKERS" -le 9 ] || { echo "--workers is 1 to 9" >&2; exit 64; }
if [ -n "$BIN_DIR" ]; then
  B=$(cd "$BIN_DIR" && pwd)
else
  cargo build --release -q -p thingport-foundation -p thingport-loadtest
  B=$PWD/target/release
fi
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

KEY=bench-key
HASH=$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)
echo "sha256:$HASH role=admin name=bench" > "$WORK/api-keys"
APIS=()
for i in $(seq 1 "$WORKERS"); do
  cat > "$WORK/foundation-$i.toml" <<TOML
id = "foundation-$i"
link_address = "127.0.0.1:$((7180 + i))"
api_address = "127.0.0.1:$((8180 + i))"
admin_address = "127.0.0.1:$((9180 + i))"
peer_address = "127.0.0.1:$((7280 + i))"
seeds = ["127.0.0.1:7281"]
bootstrap_members = $WORKERS
api_keys_file = "$WORK/api-keys"
[storage]
data_dir = "$WORK/store-$i"
TOML
  APIS+=("127.0.0.1:$((8180 + i))")
  $B/thingport-foundation --config "$WORK/foundation-$i.toml" > "$WORK/foundation-$i.log" 2>&1 &
  PIDS+=($!)
done
# ready, and a consensus group with every worker as a voter (up to five)
want=$(( WORKERS < 5 ? WORKERS : 5 ))
for _ in $(seq 1 300); do
  voters=$(curl -sf -H "x-api-key: $KEY" http://${APIS[0]}/v1/cluster 2>/dev/null \
    | python3 -c 'import json,sys; c=json.load(sys.stdin)["consensus"]; print(len(c["voters"]) if c["leader"] else 0)' 2>/dev/null || echo 0)
  [ "$voters" = "$want" ] && break
  sleep 0.1
done
[ "$voters" = "$want" ] || { echo "no consensus group of $want voters within 30 s" >&2; tail -n 20 "$WORK"/foundation-1.log >&2; exit 1; }
echo "workers $WORKERS  voters $want  clients $CLIENTS  names ${NAMES:-$CLIENTS}  load $(cut -d' ' -f1 /proc/loadavg)"
START_CPU=$(for p in "${PIDS[@]}"; do awk '{print $14+$15}' /proc/$p/stat; done | paste -sd+ | bc)
$B/thingport-loadtest locks --api "${APIS[@]}" --api-key "$KEY" --clients "$CLIENTS" ${NAMES:+--names $NAMES} \
  --duration "${SECONDS_}s"
END_CPU=$(for p in "${PIDS[@]}"; do awk '{print $14+$15}' /proc/$p/stat; done | paste -sd+ | bc)
echo "workers' CPU during the run: $(echo "scale=2; ($END_CPU - $START_CPU) / $(getconf CLK_TCK)" | bc) s"
