#!/usr/bin/env bash
# The gateway side by side with nginx and HAProxy, each terminating TLS 1.3 WebSockets with the same ECDSA P-256
# certificate and driven by the same load generator (method: docs/BENCHMARKS.md).
#
#   thingport gateway  -> acknowledging worker (link protocol)          [wss, and quic for M5]
#   nginx / HAProxy    -> plain WebSocket backend speaking the device protocol, acknowledging at once
#   direct             -> the same backend without a proxy (the M2 baseline)
#
# Servers under test run on core 1, everything else on core 0. Each figure is the median of --runs runs.
#   M1  CPU per acknowledged 64-byte round trip at a fixed rate (utime+stime of the server's processes)
#   M2  latency the proxy adds over the direct path at that rate (p50/p99/p99.9)
#   M3  user-space memory per idle connection: (RSS with N - RSS with 0) / N after a settle
#   M5  the gateway over QUIC vs WSS
#   M6  frames per upstream write (gateway)
#
#   M1' with --steps "10 20 40": the highest offered rate (devices x per-device rate) at which p99 stays within
#       5 ms, one run of --seconds per step
#
#   benches/compare.sh [--runs 3] [--idle 9000] [--devices 1000] [--rate 10] [--seconds 20] [--settle 30]
#                      [--steps "10 20 40"]   (--runs 0 --steps ... measures only the steps)
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=3 IDLE=9000 DEVICES=1000 RATE=10 SECONDS_=20 SETTLE=30 OUT="" STEPS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS=$2; shift 2 ;;
    --idle) IDLE=$2; shift 2 ;;
    --devices) DEVICES=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --seconds) SECONDS_=$2; shift 2 ;;
    --settle) SETTLE=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 64 ;;
  esac
done
[ "$IDLE" -lt 9500 ] || { echo "--idle must stay below HAProxy's maxconn of 9500" >&2; exit 64; }

if ! command -v nginx >/dev/null || ! command -v haproxy >/dev/null; then
  echo "installing nginx and haproxy (Debian packages)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx haproxy openssl >/dev/null
fi
ulimit -n 20000
cargo build --release -q -p thingport-gateway -p thingport-loadtest
B=$PWD/target/release
WORK=$(mktemp -d)
OUT=${OUT:-$WORK/results.jsonl}
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/nginx/nginx.pid" ] && kill "$(cat "$WORK/nginx/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
HZ=$(getconf CLK_TCK)

# one certificate for everyone: an ECDSA P-256 leaf (benches/peers/README.md)
mkdir -p "$WORK/tls" "$WORK/nginx/logs" "$WORK/nginx/tmp"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$WORK/tls/key.pem" \
  -out "$WORK/tls/cert.pem" -days 30 -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -addext "basicConstraints=critical,CA:FALSE" -addext "keyUsage=critical,digitalSignature" \
  -addext "extendedKeyUsage=serverAuth" 2>/dev/null
cat "$WORK/tls/cert.pem" "$WORK/tls/key.pem" > "$WORK/tls/haproxy.pem"
PEERS=benches/peers
sed "s#\${WORK}#$WORK#g" "$PEERS/nginx-wss-proxy.conf" > "$WORK/nginx/nginx.conf"
sed "s#\${WORK}#$WORK#g" "$PEERS/haproxy-wss-proxy.cfg" > "$WORK/haproxy.cfg"

$B/thingport-gateway gen-secret --out "$WORK/secret" >/dev/null
COUNT=$(( IDLE > DEVICES ? IDLE : DEVICES ))
$B/thingport-gateway token issue --thing dev- --count "$COUNT" --secret-file "$WORK/secret" > "$WORK/fleet.txt"

# backends, on core 0 with the load generator
taskset -c 0 $B/thingport-loadtest ws-backend --listen 127.0.0.1:9000 2>/dev/null &
PIDS+=($!)
taskset -c 0 $B/thingport-loadtest ack-worker --listen 127.0.0.1:7109 2>/dev/null &
PIDS+=($!)
cat > "$WORK/gateway.toml" <<TOML
[listen]
address = "127.0.0.1:8445"
[tls]
cert = "$WORK/tls/cert.pem"
key = "$WORK/tls/key.pem"
[auth]
secret_file = "$WORK/secret"
[upstream]
foundations = ["127.0.0.1:7109"]
[limits]
max_sessions_per_ip = 100000
accept_rate = 20000
max_handshakes = 4096
max_handshakes_per_ip = 4096
message_rate = 1000
[admin]
address = "127.0.0.1:9445"
TOML

wait_port() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
rss_kb() { local t=0; for p in $1; do t=$((t + $(awk '/VmRSS/ {print $2}' /proc/"$p"/status))); done; echo $t; }
cpu_ticks() { local t=0; for p in $1; do t=$((t + $(awk '{print $14 + $15}' /proc/"$p"/stat))); done; echo $t; }

# start_server NAME: starts it on core 1; sets SERVER_PIDS (the processes measured) and PORT, TRANSPORT
start_server() {
  case "$1" in
    gateway|gateway-quic)
      taskset -c 1 $B/thingport-gateway --config "$WORK/gateway.toml" > "$WORK/gateway.log" 2>&1 &
      SERVER_PIDS=$!; STOP_PIDS=$!; PORT=8445
      TRANSPORT=$([ "$1" = gateway ] && echo wss || echo quic) ;;
    nginx)
      taskset -c 1 nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx/" &
      STOP_PIDS=$!; PORT=8443; TRANSPORT=wss
      wait_port 8443; sleep 0.3
      SERVER_PIDS="$(cat "$WORK/nginx/nginx.pid") $(pgrep -P "$(cat "$WORK/nginx/nginx.pid")" | tr '\n' ' ')" ;;
    haproxy)
      taskset -c 1 haproxy -f "$WORK/haproxy.cfg" -db > "$WORK/haproxy.log" 2>&1 &
      SERVER_PIDS=$!; STOP_PIDS=$!; PORT=8444; TRANSPORT=wss ;;
    direct)
      SERVER_PIDS=""; STOP_PIDS=""; PORT=9000; TRANSPORT=ws ;;
  esac
  [ "$1" = gateway-quic ] || wait_port "$PORT"
  [ "$1" = gateway-quic ] && { wait_port 9445; sleep 0.5; }
  sleep 1
}
stop_server() {
  for p in $STOP_PIDS; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/nginx/nginx.pid" ] && kill "$(cat "$WORK/nginx/nginx.pid")" 2>/dev/null || true
  sleep 1
}
loadgen() {
  taskset -c 0 $B/thingport-loadtest run --target "127.0.0.1:$PORT" --ca "$WORK/tls/cert.pem" \
    --tokens "$WORK/fleet.txt" --transport "$TRANSPORT" --quiet --json "$@"
}

echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); servers on core 1, load generator and backends on core 0"
for run in $(seq 1 "$RUNS"); do
  for target in direct gateway gateway-quic nginx haproxy; do
    start_server "$target"
    RSS0=0; RSSN=0; SESSIONS=0
    if [ -n "$SERVER_PIDS" ]; then
      RSS0=$(rss_kb "$SERVER_PIDS")
      loadgen --devices "$IDLE" --scenario idle --ramp 3000 --duration "$((SETTLE + 10))s" --keepalive 600 \
        > "$WORK/idle.json" &
      LOAD=$!
      sleep $(( IDLE / 3000 + 2 + SETTLE ))
      RSSN=$(rss_kb "$SERVER_PIDS")
      wait $LOAD
      SESSIONS=$(python3 -c "import json;print(json.load(open('$WORK/idle.json'))['peak_sessions'])")
      sleep 2
    fi
    T0=$([ -n "$SERVER_PIDS" ] && cpu_ticks "$SERVER_PIDS" || echo 0)
    loadgen --devices "$DEVICES" --scenario telemetry --rate "$RATE" --payload 32 --ramp 2000 \
      --duration "${SECONDS_}s" > "$WORK/load.json"
    T1=$([ -n "$SERVER_PIDS" ] && cpu_ticks "$SERVER_PIDS" || echo 0)
    FPW=""
    if [ "$target" = gateway ]; then
      FPW=$(curl -s http://127.0.0.1:9445/metrics | awk '/^thingport_gateway_link_frames_per_write_sum/ {s=$2} /^thingport_gateway_link_frames_per_write_count/ {c=$2} END {if (c > 0) printf "%.2f", s / c}')
    fi
    python3 - "$WORK/load.json" "$target" "$run" "$RSS0" "$RSSN" "$SESSIONS" "$T0" "$T1" "$HZ" "$FPW" >> "$OUT" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
target, run, rss0, rssn, sessions, t0, t1, hz, fpw = sys.argv[2:11]
acked = max(r["acked"], 1)
print(json.dumps({
    "target": target, "run": int(run),
    "kb_per_idle": (int(rssn) - int(rss0)) * 1.024 / int(sessions) if int(sessions) else None,
    "idle_sessions": int(sessions),
    "cpu_us_per_msg": (int(t1) - int(t0)) / int(hz) * 1e6 / acked if target != "direct" else None,
    "acked": r["acked"], "sent": r["sent"], "errors": r["session_errors"] + r["connect_errors"],
    "unacked_at_end": r["unacked_at_end"], "frame_bytes": r["frame_bytes"],
    "p50": r["latency"]["p50_ms"], "p99": r["latency"]["p99_ms"], "p999": r["latency"]["p999_ms"],
    "frames_per_write": float(fpw) if fpw else None,
}))
PY
    tail -1 "$OUT" >&2
    stop_server
  done
done

if [ -n "$STEPS" ]; then
  echo "M1 rate steps: $DEVICES devices, ${SECONDS_}s per step, p99 limit 5 ms"
  for target in gateway nginx haproxy; do
    best=0
    for step in $STEPS; do
      start_server "$target"
      loadgen --devices "$DEVICES" --scenario telemetry --rate "$step" --payload 32 --ramp 2000 \
        --duration "${SECONDS_}s" > "$WORK/step.json"
      stop_server
      read -r p99 acked_rate <<<"$(python3 -c "import json;r=json.load(open('$WORK/step.json'));print(r['latency']['p99_ms'], round(r['acked']/r['elapsed_s']))")"
      echo "  $target offered $((DEVICES * step))/s: acked ${acked_rate}/s p99 ${p99} ms"
      if python3 -c "import sys; sys.exit(0 if $p99 <= 5.0 else 1)"; then best=$((DEVICES * step)); fi
    done
    echo "  $target: highest offered rate with p99 <= 5 ms: ${best}/s"
  done
fi
[ -s "$OUT" ] || exit 0
python3 - "$OUT" "$RATE" "$DEVICES" "$IDLE" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(target, key):
    vals = [r[key] for r in rows if r["target"] == target and r[key] is not None]
    return statistics.median(vals) if vals else None
targets = ["gateway", "gateway-quic", "nginx", "haproxy", "direct"]
rate = int(sys.argv[2]) * int(sys.argv[3])
print(f"\nmedian of {max(r['run'] for r in rows)} runs; {sys.argv[3]} devices x {sys.argv[2]}/s = {rate} msg/s; "
      f"{sys.argv[4]} idle sessions for memory\n")
print(f"{'target':<14}{'KB/idle':>9}{'CPU us/msg':>12}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}{'errors':>8}{'frames/write':>14}")
for t in targets:
    f = lambda k, fmt: (fmt.format(med(t, k)) if med(t, k) is not None else "-")
    print(f"{t:<14}{f('kb_per_idle', '{:.1f}'):>9}{f('cpu_us_per_msg', '{:.1f}'):>12}{f('p50', '{:.3f}'):>9}"
          f"{f('p99', '{:.3f}'):>9}{f('p999', '{:.3f}'):>10}{f('errors', '{:.0f}'):>8}{f('frames_per_write', '{:.1f}'):>14}")
base = {k: med("direct", k) for k in ("p50", "p99", "p999")}
print("\nM2 latency added over the direct path (ms, p50 / p99 / p99.9):")
for t in ["gateway", "nginx", "haproxy"]:
    print(f"  {t:<10}" + " / ".join(f"{med(t, k) - base[k]:.3f}" for k in ("p50", "p99", "p999")))
print("\nratios, gateway / peer (below 1 is better for the gateway):")
for peer in ["nginx", "haproxy"]:
    cpu = med("gateway", "cpu_us_per_msg") / med(peer, "cpu_us_per_msg")
    mem = med("gateway", "kb_per_idle") / med(peer, "kb_per_idle")
    print(f"  vs {peer:<8} CPU per message {cpu:.2f}   memory per idle connection {mem:.2f}")
q, w = med("gateway-quic", "cpu_us_per_msg"), med("gateway", "cpu_us_per_msg")
print(f"\nM5 QUIC / WSS: CPU per message {q / w:.2f}, memory per idle session "
      f"{med('gateway-quic', 'kb_per_idle') / med('gateway', 'kb_per_idle'):.2f}")
PY
