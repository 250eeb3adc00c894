#!/usr/bin/env bash
# The data layer measured (docs/BENCHMARKS.md, "Durable state"), each part beside its ceiling in the same run:
#  1. SQLite alone (rusqlite, fsync per commit): one row per value, one row per frame keyed by thing, and one row per
#     frame in arrival order as thingport's journal;
#  2. durable acknowledged values/s through a gateway and one worker with durability = "disk" on SQLite, open-loop
#     load at rising rates (1,000 devices x R messages/s x 10 float properties), p50/p99 from intended send times;
#  3. the same on PostgreSQL (a private server from .ci/postgres.sh), beside COPY of the same rows into it;
#  4. one property's day at 1 Hz (86,400 values) read through the store, and bytes on disk per value;
#  5. a worker holding 10,000 things and 10 M logged values: time from start to ready.
#
#   benches/storage.sh [--devices 1000] [--rates "5 10 15"] [--seconds 20] [--values 10000000] [--parts "1 2 3 4 5"]
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICES=1000 RATES="5 10 15" SECONDS_=20 PARTS="1 2 3 4 5" VALUES=10000000
while [ $# -gt 0 ]; do
  case "$1" in
    --devices) DEVICES=$2; shift 2 ;;
    --rates) RATES=$2; shift 2 ;;
    --seconds) SECONDS_=$2; shift 2 ;;
    --values) VALUES=$2; shift 2 ;;
    --parts) PARTS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 64 ;;
  esac
done
ulimit -n 20000
cargo build --release -q -p thingport-gateway -p thingport-foundation -p thingport-loadtest
cargo build --release -q -p thingport-foundation --example store_bench
B=$PWD/target/release
WORK=$(mktemp -d /var/tmp/thingport-storage.XXXXXX)
PIDS=()
PG_DIR=""
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "$PG_DIR" ] && .ci/postgres.sh stop "$PG_DIR"
  rm -rf "$WORK"
}
trap cleanup EXIT
echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); servers on core 1, load generator on core 0"

part() { [[ " $PARTS " == *" $1 "* ]]; }

if part 1; then
echo "== 1. SQLite alone: batched inserts, fsync per commit, 1,000 things x 10 properties, 100 frames a commit"
taskset -c 1 "$B/examples/store_bench" ceiling --dir "$WORK/ceiling"
fi

$B/thingport-gateway gen-cert --cert "$WORK/cert.pem" --key "$WORK/key.pem" >/dev/null
$B/thingport-gateway gen-secret --out "$WORK/secret" >/dev/null
echo "bench-key" > "$WORK/api-keys"
$B/thingport-gateway token issue --thing dev- --count "$DEVICES" --secret-file "$WORK/secret" > "$WORK/fleet.txt"
cat > "$WORK/gateway.toml" <<TOML
[listen]
address = "127.0.0.1:8591"
[tls]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"
[auth]
secret_file = "$WORK/secret"
[upstream]
foundations = ["127.0.0.1:7591"]
[limits]
max_sessions_per_ip = 100000
accept_rate = 20000
max_handshakes = 4096
max_handshakes_per_ip = 4096
message_rate = 1000
[admin]
address = "127.0.0.1:9591"
TOML
worker_config() { # worker_config <storage lines>
  cat > "$WORK/foundation.toml" <<TOML
id = "foundation-1"
link_address = "127.0.0.1:7591"
api_address = "127.0.0.1:8592"
admin_address = "127.0.0.1:9592"
peer_address = "127.0.0.1:7592"
api_keys_file = "$WORK/api-keys"
durability = "disk"
[storage]
$1
TOML
}
wait_ready() { for _ in $(seq 1 600); do curl -sf -o /dev/null "http://127.0.0.1:$1/readyz" && return 0; sleep 0.05; done; return 1; }
start_worker() {
  taskset -c 1 "$B/thingport-foundation" --config "$WORK/foundation.toml" > "$WORK/foundation.out" 2>> "$WORK/foundation.log" &
  WORKER=$!
  PIDS+=($WORKER)
  wait_ready 9592
}
start_gateway() {
  taskset -c 1 "$B/thingport-gateway" --config "$WORK/gateway.toml" >> "$WORK/gateway.log" 2>&1 &
  GATEWAY=$!
  PIDS+=($GATEWAY)
  wait_ready 9591
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
load() { # load <rate>: prints msgs/s, values/s, p50, p99 and the worker's CPU over the run
  local before after
  before=$(awk '{print $14 + $15}' "/proc/$WORKER/stat")
  taskset -c 0 "$B/thingport-loadtest" run --target 127.0.0.1:8591 --ca "$WORK/cert.pem" --tokens "$WORK/fleet.txt" \
    --devices "$DEVICES" --ramp 2000 --quiet --json --scenario telemetry --rate "$1" --batch 10 --values float \
    --duration "${SECONDS_}s" > "$WORK/report.json"
  after=$(awk '{print $14 + $15}' "/proc/$WORKER/stat")
  python3 - "$WORK/report.json" "$1" "$DEVICES" "$((after - before))" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
rate, devices, ticks = float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
l = r["latency"]
print(json.dumps({"offered_msgs_per_s": rate * devices, "acked_msgs_per_s": round(r["acked"] / r["elapsed_s"]),
                  "acked_values_per_s": round(r["acked"] * 10 / r["elapsed_s"]), "sent": r["sent"],
                  "acked": r["acked"], "unacked_at_end": r["unacked_at_end"], "session_errors": r["session_errors"],
                  "p50_ms": l["p50_ms"], "p99_ms": l["p99_ms"], "p999_ms": l["p999_ms"],
                  "worker_cpu_s": ticks / 100, "elapsed_s": round(r["elapsed_s"], 1)}))
PY
}

rates() { # a worker and a gateway, the load at each rate, both stopped
  start_worker
  start_gateway
  for rate in $RATES; do
    echo "-- $rate messages/s per device for ${SECONDS_}s"
    load "$rate"
  done
  stop "$GATEWAY"; stop "$WORKER"
}

if part 2; then
echo "== 2. gateway -> one worker -> SQLite, durability disk: $DEVICES devices x 10 float properties a message"
worker_config "data_dir = \"$WORK/store-sqlite\""
rates
ls -l "$WORK/store-sqlite"
fi

if part 3; then
  echo "== 3. gateway -> one worker -> PostgreSQL, durability disk, beside COPY into the same server"
  eval "$(.ci/postgres.sh start)"
  PG_DIR=$THINGPORT_TEST_POSTGRES_DIR
  psql "$THINGPORT_TEST_POSTGRES dbname=postgres" -qc "CREATE DATABASE bench" >/dev/null
  worker_config "data_dir = \"$WORK/store-postgres\"
provider = \"postgres\"
postgres_url = \"$THINGPORT_TEST_POSTGRES dbname=bench\""
  rates
  ROWS=$((DEVICES * 10 * 100))
  python3 - "$ROWS" "$DEVICES" > "$WORK/rows.tsv" <<'PY'
import sys
rows, devices = int(sys.argv[1]), int(sys.argv[2])
value = "\\\\x04" + "00" * 6 + "3540"  # a float, in COPY's text form of bytea
for i in range(rows):
    print(f"{i % (devices * 10)}\t{1795000000000 + i}\t7\t{i // (devices * 10)}\t0\t{value}\t{1795000000000 + i}")
PY
  psql "$THINGPORT_TEST_POSTGRES dbname=bench" -qc "CREATE TABLE copy_values (LIKE property_values INCLUDING ALL)"
  start=$(date +%s.%N)
  psql "$THINGPORT_TEST_POSTGRES dbname=bench" -qc "\\copy copy_values FROM '$WORK/rows.tsv'"
  end=$(date +%s.%N)
  python3 -c "print({'copy_rows': $ROWS, 'copy_values_per_s': round($ROWS / ($end - $start))})"
  psql "$THINGPORT_TEST_POSTGRES dbname=bench" -tAc \
    "SELECT 'property_values rows: ' || count(*) || ', table + index bytes per row: ' || round(pg_total_relation_size('property_values')::numeric / greatest(count(*), 1)) FROM property_values"
fi

if part 4; then
echo "== 4. one property's day at 1 Hz through the store"
taskset -c 1 "$B/examples/store_bench" history --dir "$WORK/day"
fi

if part 5; then
  echo "== 5. a worker holding 10,000 things and $VALUES logged values: start to ready"
  taskset -c 1 "$B/examples/store_bench" fill --dir "$WORK/big" --things 10000 --values "$VALUES" 2>/dev/null
  python3 - "$WORK/big/thingport.sqlite" "$VALUES" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
pages, free, size = (db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "freelist_count", "page_size"))
chunks, values, blob = db.execute("SELECT COUNT(*), SUM(count), SUM(LENGTH(data)) FROM value_chunks").fetchone()
n = int(sys.argv[2])
print(f"file: {pages * size} bytes ({free * size} of them free pages the journal left); in use: {(pages - free) * size / n:.1f} bytes per logged value; value_chunks: {chunks} chunks holding {values} values, {blob / values:.1f} bytes of chunk data per value")
PY
  worker_config "data_dir = \"$WORK/big\""
  for i in 1 2 3; do
    start=$(date +%s.%N)
    start_worker
    end=$(date +%s.%N)
    python3 -c "print('start to ready, run $i: %.2f s' % ($end - $start))"
    stop "$WORKER"
  done
fi
