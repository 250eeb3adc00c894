#!/usr/bin/env bash
# Measures the gateway alone, with the load generator's acknowledging worker behind it:
#   M3  user-space memory per idle session (RSS with N sessions - RSS with none) / N, after a settle
#   M1  gateway CPU (utime + stime from /proc) per acknowledged 64-byte message at a fixed rate, and latency
# The gateway runs on core 1 and everything else on core 0, as BENCHMARKS.md says.
#
#   benches/gateway-alone.sh [--idle N] [--transport wss|quic] [--devices D] [--rate R] [--seconds S]
#                            [--settle S] [--flush-delay D (upstream.flush_delay, e.g. 1ms)] [--bin-dir DIR]
#                            [--payload BYTES (of each message's property, 32 by default: 64-byte frames)]
#
# --bin-dir takes the gateway and the load generator from DIR (another build, to compare two commits in one
# session) instead of building this tree.
#
# CALLGRIND=FILE runs the gateway under `valgrind --tool=callgrind` instead and writes to FILE the instructions it
# executes per acknowledged round trip: the same fleet runs twice at the same rate, for --seconds and for three times
# as long, and the difference of the two counts over the difference of the acknowledged messages leaves out the
# handshakes and the start. The two profiles are kept beside FILE (FILE.<seconds>s.out) for callgrind_annotate.
# The idle part (M3) and the timing figures are skipped: under valgrind they mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

IDLE=9000 TRANSPORT=wss DEVICES=1000 RATE=10 SECONDS_=20 SETTLE=30 FLUSH_DELAY=0s BIN_DIR="" PAYLOAD=32
while [ $# -gt 0 ]; do
  case "$1" in
    --idle) IDLE=$2; shift 2 ;;
    --transport) TRANSPORT=$2; shift 2 ;;
    --devices) DEVICES=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --seconds) SECONDS_=$2; shift 2 ;;
    --settle) SETTLE=$2; shift 2 ;;
    --flush-delay) FLUSH_DELAY=$2; shift 2 ;;
    --bin-dir) BIN_DIR=$2; shift 2 ;;
    --payload) PAYLOAD=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 64 ;;
  esac
done

ulimit -n 20000
if [ -n "$BIN_DIR" ]; then
  B=$(cd "$BIN_DIR" && pwd)
else
  cargo build --release -q -p thingport-gateway -p thingport-loadtest
  B=$PWD/target/release
fi
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

$B/thingport-gateway gen-cert --cert "$WORK/cert.pem" --key "$WORK/key.pem" >/dev/null
$B/thingport-gateway gen-secret --out "$WORK/secret" >/dev/null
COUNT=$(( IDLE > DEVICES ? IDLE : DEVICES ))
$B/thingport-gateway token issue --thing dev- --count "$COUNT" --secret-file "$WORK/secret" > "$WORK/fleet.txt"

taskset -c 0 $B/thingport-loadtest ack-worker --listen 127.0.0.1:0 2> "$WORK/worker.log" &
PIDS+=($!)
until grep -q "ack worker on" "$WORK/worker.log"; do sleep 0.1; done
WORKER=$(sed -n 's/ack worker on //p' "$WORK/worker.log")

cat > "$WORK/gateway.toml" <<TOML
[listen]
address = "127.0.0.1:0"
[tls]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"
[auth]
secret_file = "$WORK/secret"
[upstream]
foundations = ["$WORKER"]
flush_delay = "$FLUSH_DELAY"
[limits]
max_sessions_per_ip = 100000
accept_rate = 20000
max_handshakes = 4096
max_handshakes_per_ip = 4096
message_rate = 1000
[admin]
address = "127.0.0.1:0"
TOML
WRAP=()
if [ -n "${CALLGRIND:-}" ]; then
  WRAP=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/callgrind.%p")
fi
env ${GW_ENV:-} RUST_LOG=warn,thingport_gateway=info taskset -c 1 "${WRAP[@]}" $B/thingport-gateway --config "$WORK/gateway.toml" > "$WORK/gateway.log" 2>&1 &
GW=$!
PIDS+=($GW)
until grep -q "\"admin\":" "$WORK/gateway.log"; do sleep 0.1; done  # the JSON line of bound addresses
addr_of() { grep -o "\"$1\":\"[0-9.:]*\"" "$WORK/gateway.log" | head -1 | cut -d'"' -f4; }  # from the JSON line of bound addresses
TARGET=$(addr_of wss)
ADMIN=$(addr_of admin)
rss_kb() { awk '/VmRSS/ {print $2}' /proc/$GW/status; }
cpu_ticks() { awk '{print $14 + $15}' /proc/$GW/stat; }
HZ=$(getconf CLK_TCK)

echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), gateway on core 1, load generator on core 0"
echo "gateway at $TARGET, transport $TRANSPORT"

if [ -n "${CALLGRIND:-}" ]; then
  # instructions of one run of the fleet at the fixed rate, lasting $1 seconds; prints "instructions acked"
  counted_run() {
    callgrind_control -z "$GW" >/dev/null 2>&1
    callgrind_control -i on "$GW" >/dev/null 2>&1
    taskset -c 0 $B/thingport-loadtest run --target "$TARGET" --ca "$WORK/cert.pem" --tokens "$WORK/fleet.txt" \
      --devices "$DEVICES" --transport "$TRANSPORT" --scenario telemetry --rate "$RATE" --payload "$PAYLOAD" \
      --ramp 20 --duration "${1}s" --quiet --json > "$WORK/cg-load.json"
    callgrind_control -i off "$GW" >/dev/null 2>&1
    rm -f "$WORK"/callgrind.*
    callgrind_control -d "$GW" >/dev/null 2>&1
    local ir
    ir=$(cat "$WORK"/callgrind.* | awk '/^totals:/ {s += $2} END {print s + 0}')
    cat "$WORK"/callgrind.* > "$CALLGRIND.$1s.out"  # for callgrind_annotate
    echo "$ir $(python3 -c "import json;r=json.load(open('$WORK/cg-load.json'));print(r['acked'], r['session_errors'])")"
  }
  read -r IR1 ACK1 ERR1 < <(counted_run "$SECONDS_")
  read -r IR2 ACK2 ERR2 < <(counted_run "$(( SECONDS_ * 3 ))")
  {
    echo "callgrind: gateway $($B/thingport-gateway --version 2>/dev/null || echo '?'), $TRANSPORT, $DEVICES devices x $RATE/s, ${PAYLOAD}-byte payload"
    echo "  run of ${SECONDS_} s: $IR1 instructions, $ACK1 acknowledged, $ERR1 session errors"
    echo "  run of $(( SECONDS_ * 3 )) s: $IR2 instructions, $ACK2 acknowledged, $ERR2 session errors"
    python3 -c "print(f'  instructions per acknowledged round trip: {($IR2 - $IR1) / max($ACK2 - $ACK1, 1):,.0f}')"
  } | tee "$CALLGRIND"
  exit 0
fi

# M3: idle sessions
RSS0=$(rss_kb)
taskset -c 0 $B/thingport-loadtest run --target "$TARGET" --ca "$WORK/cert.pem" --tokens "$WORK/fleet.txt" \
  --devices "$IDLE" --transport "$TRANSPORT" --scenario idle --ramp 3000 --duration "$((SETTLE + 10))s" \
  --keepalive 600 --quiet --json > "$WORK/idle.json" &
LOAD=$!
sleep $(( IDLE / 3000 + 2 + SETTLE ))
RSSN=$(rss_kb)
wait $LOAD
python3 - "$WORK/idle.json" "$RSS0" "$RSSN" "$IDLE" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
rss0, rssn, n = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print(f"M3 idle: {r['peak_sessions']} sessions (connect errors {r['connect_errors']}); "
      f"RSS {rss0} KiB -> {rssn} KiB; {(rssn - rss0) * 1024 / max(r['peak_sessions'], 1) / 1000:.1f} KB per session")
PY

# M1: fixed-rate telemetry
sleep 2
T0=$(cpu_ticks)
if [ -n "${PROFILE:-}" ]; then
  # PROFILE=FILE: a perf profile of the gateway during the load, summarised into FILE
  perf record -F 999 -g -p "$GW" -o "$WORK/perf.data" -- sleep "$((SECONDS_ + 1))" >/dev/null 2>&1 &
  PERF=$!
fi
/usr/bin/time -f "%U %S" -o "$WORK/loadgen.time" taskset -c 0 $B/thingport-loadtest run --target "$TARGET" \
  --ca "$WORK/cert.pem" --tokens "$WORK/fleet.txt" \
  --devices "$DEVICES" --transport "$TRANSPORT" --scenario telemetry --rate "$RATE" --payload "$PAYLOAD" --ramp 2000 \
  --duration "${SECONDS_}s" --quiet --json > "$WORK/load.json"
T1=$(cpu_ticks)
echo "   gateway RSS $(rss_kb) KiB after the load (before it: $RSSN KiB), nothing scraped in between"
if [ -n "${PROFILE:-}" ]; then
  wait "$PERF" || true
  perf report -i "$WORK/perf.data" --no-children --sort symbol --stdio 2>/dev/null | grep -v '^#' | grep '%' | head -60 > "$PROFILE"
  strace -c -f -p "$GW" -o "$WORK/strace.txt" & STRACE=$!
  taskset -c 0 $B/thingport-loadtest run --target "$TARGET" --ca "$WORK/cert.pem" --tokens "$WORK/fleet.txt" \
    --devices "$DEVICES" --transport "$TRANSPORT" --scenario telemetry --rate "$RATE" --payload "$PAYLOAD" --ramp 2000 \
    --duration 5s --quiet --json > "$WORK/strace-load.json"
  kill -INT "$STRACE"; wait "$STRACE" 2>/dev/null || true
  { echo "--- syscalls during a 5 s run ($(python3 -c "import json;print(json.load(open('$WORK/strace-load.json'))['acked'])") messages acked)"; cat "$WORK/strace.txt"; } >> "$PROFILE"
fi
python3 - "$WORK/load.json" "$T0" "$T1" "$HZ" "$DEVICES" "$RATE" "$WORK/loadgen.time" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
t0, t1, hz = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cpu_us = (t1 - t0) / hz * 1e6
l = r["latency"]
print(f"M1 load: {sys.argv[5]} devices x {sys.argv[6]}/s, {r['frame_bytes']} B frames: sent {r['sent']}, acked {r['acked']}, "
      f"unacked at end {r['unacked_at_end']}, errors {r['session_errors']}")
print(f"   gateway CPU {cpu_us / 1e6:.2f} s = {cpu_us / max(r['acked'], 1):.1f} us per acknowledged message")
u, s_ = map(float, open(sys.argv[7]).read().split()[-2:])
print(f"   load generator CPU {u + s_:.2f} s over {r['elapsed_s']:.1f} s")
print(f"   latency ms p50 {l['p50_ms']:.3f} p99 {l['p99_ms']:.3f} p99.9 {l['p999_ms']:.3f} max {l['max_ms']:.3f}")
PY
grep -o 'thingport_gateway_link_frames_per_write_sum [0-9.e+]*\|thingport_gateway_link_frames_per_write_count [0-9.e+]*' \
  <(curl -s "http://$ADMIN/metrics") \
  | awk '{v[$1]=$2} END {if (v["thingport_gateway_link_frames_per_write_count"] > 0) printf "M6 frames per upstream write: %.1f\n", v["thingport_gateway_link_frames_per_write_sum"] / v["thingport_gateway_link_frames_per_write_count"]}'
