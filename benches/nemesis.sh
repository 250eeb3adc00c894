#!/usr/bin/env bash
# Faults under load (RELIABILITY, issue 14's nemesis): five foundation workers, each in its own network namespace,
# joined by a bridge in a sixth, with mutual TLS on the ring. A client in each worker's namespace writes properties
# no other write uses through that worker and takes and releases the lock `nemesis` (benches/nemesis_client.py);
# a gateway in a seventh namespace links to all five, and ten devices (thingport-loadtest) send it a frame each 0.1 s,
# every one a property of its own.
# Then ROUNDS faults, one at a time, each held FAULT seconds and healed for HEAL seconds, chosen by SEED from:
#   halves  - two workers cut off from the other three (their links to the bridge down)
#   leader  - the consensus group's leader cut off alone
#   partial - a worker cut off from every other worker, and from the consensus group's leader for UDP only (SWIM):
#             the pool declares it down while it still reaches the leader over TCP (leases, Raft, replication)
#   kill    - kill -9 of a worker, started again with its store at the heal
#   pause   - SIGSTOP of a worker, SIGCONT at the heal
# After the last heal and the pool settling on all five: every write and device frame acknowledged is read back, and the
# lock's history is checked (grants in the order of their tokens, and no grant before the previous holder's lease
# ended: its release, or its ttl counted from its request). Needs root (ip netns); everything it creates is removed.
#
#   sudo benches/nemesis.sh [--rounds 4] [--fault 6] [--heal 6] [--seed N] [--only partial,kill]
#   sudo THINGPORT_BIN=target/debug benches/nemesis.sh --rounds 2   # binaries already built (as .ci/run does)
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/netns.sh
ROUNDS=4 FAULT=6 HEAL=6 SEED=$$
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --fault) FAULT=$2; shift 2 ;;
    --heal) HEAL=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 64 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "needs root for network namespaces" >&2; exit 64; }
if [ -n "${THINGPORT_BIN:-}" ]; then
  B=$(cd "$THINGPORT_BIN" && pwd)
else
  cargo build --release -q -p thingport-foundation -p thingport-gateway -p thingport-loadtest
  B=$PWD/target/release
fi
N=5
WORK=$(mktemp -d)
NS=(tpn-0 tpn-1 tpn-2 tpn-3 tpn-4)
GNS=tpn-g  # the gateway's and the devices', 10.78.0.6
BR=tpn-br
declare -A PID CLIENT
cleanup() {
  local rc=$?
  # every process left in the test's namespaces (the workers and clients, whatever their pids are by now)
  for ns in "${NS[@]}" "$GNS"; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -CONT "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
  done
  wait 2>/dev/null || true
  netns_clear "${NS[@]}" "$GNS" "$BR"
  if [ -n "${KEEP:-}" ] || [ "$rc" != 0 ]; then echo "logs in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
fail() { echo "FAILED: $*" >&2; exit 1; }
netns_clear "${NS[@]}" "$GNS" "$BR"
netns_pool "$BR" 10.78.0 "${NS[@]}" "$GNS"

KEY=nemesis-key
echo "sha256:$(printf %s "$KEY" | sha256sum | cut -d' ' -f1) role=admin name=nemesis" > "$WORK/api-keys"
"$B/thingport-foundation" pool init --dir "$WORK/pool-0" --host w0 >/dev/null
for i in $(seq 1 $((N - 1))); do
  "$B/thingport-foundation" pool issue --dir "$WORK/pool-0" --out "$WORK/pool-$i" --host "w$i" >/dev/null
done
start_worker() { # start_worker <index>
  local i=$1
  ip netns exec "${NS[$i]}" "$B/thingport-foundation" --config "$WORK/w$i.toml" >> "$WORK/w$i.out" 2>> "$WORK/w$i.log" &
  PID[$i]=$!
}
for i in $(seq 0 $((N - 1))); do
  ip=10.78.0.$((i + 1))
  cat > "$WORK/w$i.toml" <<TOML
id = "w$i"
link_address = "$ip:7101"
api_address = "$ip:8080"
admin_address = "$ip:9101"
peer_address = "$ip:7201"
seeds = ["10.78.0.1:7201", "10.78.0.2:7201"]
bootstrap_members = $N
write_timeout = "3s"
request_timeout = "1s"
api_keys_file = "$WORK/api-keys"
api_plain_http = true
pool_credentials = "$WORK/pool-$i"
[storage]
data_dir = "$WORK/store-$i"
TOML
  start_worker "$i"
done
view() { # view <worker index> <python expression over v, the /v1/cluster answer>
  ip netns exec "${NS[$1]}" curl -s -m 3 -H "x-api-key: $KEY" "http://10.78.0.$(($1 + 1)):8080/v1/cluster" |
    python3 -c "import json,sys; v=json.load(sys.stdin); print($2)" 2>/dev/null || true
}
members() { view "$1" "','.join(sorted(m.split('#')[0] for m in v['table']['members'])) if v['table'] and not v['changing'] and v['unheld_partitions'] == 0 else ''"; }
wait_members() { # wait_members <worker index> <ids> <seconds>
  for _ in $(seq 1 $(($3 * 10))); do [ "$(members "$1")" = "$2" ] && return 0; sleep 0.1; done
  fail "worker $1 never settled on $2 (it shows '$(members "$1")')"
}
ALL=w0,w1,w2,w3,w4
wait_members 0 "$ALL" 60
echo "pool of five formed"

# the gateway, linked to every worker, and its devices
DEVICES=10
"$B/thingport-foundation" pool issue --dir "$WORK/pool-0" --out "$WORK/pool-g" --host gateway --role gateway >/dev/null
"$B/thingport-gateway" gen-cert --cert "$WORK/cert.pem" --key "$WORK/key.pem" >/dev/null
"$B/thingport-gateway" gen-secret --out "$WORK/secret" >/dev/null
"$B/thingport-gateway" token issue --thing dev- --count "$DEVICES" --secret-file "$WORK/secret" > "$WORK/fleet.txt"
cat > "$WORK/gateway.toml" <<TOML
[listen]
address = "10.78.0.6:8491"
[tls]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"
[auth]
secret_file = "$WORK/secret"
[upstream]
foundations = ["10.78.0.1:7101", "10.78.0.2:7101", "10.78.0.3:7101", "10.78.0.4:7101", "10.78.0.5:7101"]
pool_credentials = "$WORK/pool-g"
TOML
ip netns exec "$GNS" "$B/thingport-gateway" --config "$WORK/gateway.toml" >> "$WORK/gateway.log" 2>&1 &
for _ in $(seq 1 100); do
  ip netns exec "$GNS" bash -c 'exec 3<>/dev/tcp/10.78.0.6/8491' 2>/dev/null && break
  sleep 0.1
done

TOTAL=$(( ROUNDS * (FAULT + HEAL) + 5 ))
for i in $(seq 0 $((N - 1))); do
  ip netns exec "${NS[$i]}" python3 benches/nemesis_client.py "c$i" "http://10.78.0.$((i + 1)):8080" "$KEY" "$WORK" "$TOTAL" \
    2>> "$WORK/c$i.err" &
  CLIENT[$i]=$!
done
ip netns exec "$GNS" "$B/thingport-loadtest" run --target 10.78.0.6:8491 --ca "$WORK/cert.pem" \
  --tokens "$WORK/fleet.txt" --rate 10 --values numbered --duration "${TOTAL}s" --acked "$WORK/devices.txt" \
  --quiet > "$WORK/loadtest.out" 2>> "$WORK/loadtest.err" &
FLEET=$!
sleep 3

RANDOM=$SEED
echo "seed $SEED, $ROUNDS rounds of $FAULT s faults and $HEAL s heals"
cut() { for i in "$@"; do ip -n "$BR" link set "v$i-br" down; done; }
mend() { for i in "$@"; do ip -n "$BR" link set "v$i-br" up; done; }
# blackhole <add|del> <worker> <leader>: rules that drop what the worker and every other send each other, except
# TCP between the worker and the leader
blackhole() {
  local j proto
  for j in $(seq 0 $((N - 1))); do
    [ "$j" != "$2" ] || continue
    proto=""
    [ "$j" != "$3" ] || proto="ipproto udp"
    # shellcheck disable=SC2086
    ip -n "${NS[$2]}" rule "$1" to "10.78.0.$((j + 1))/32" $proto blackhole
    # shellcheck disable=SC2086
    ip -n "${NS[$j]}" rule "$1" to "10.78.0.$(($2 + 1))/32" $proto blackhole
  done
}
leader_index() { view 0 "v['consensus']['leader'] or ''" | tr -dc '0-9'; }
FAULTS=(halves leader kill pause partial)
[ -z "${ONLY:-}" ] || IFS=, read -r -a FAULTS <<< "$ONLY"
for fault in "${FAULTS[@]}"; do
  case "$fault" in halves|leader|kill|pause|partial) ;; *) fail "unknown fault '$fault' in --only" ;; esac
done
for round in $(seq 1 "$ROUNDS"); do
  fault=${FAULTS[$((RANDOM % ${#FAULTS[@]}))]}
  victim=$((RANDOM % N))
  case "$fault" in
    halves)
      other=$(( (victim + 1 + RANDOM % (N - 1)) % N ))
      echo "round $round: w$victim and w$other cut off from the other three"
      cut "$victim" "$other"; sleep "$FAULT"; mend "$victim" "$other" ;;
    leader)
      leader=$(leader_index)
      victim=${leader:-$victim}
      echo "round $round: the consensus leader w$victim cut off alone"
      cut "$victim"; sleep "$FAULT"; mend "$victim" ;;
    kill)
      echo "round $round: kill -9 of w$victim"
      kill -9 "${PID[$victim]}"; wait "${PID[$victim]}" 2>/dev/null || true
      sleep "$FAULT"; start_worker "$victim" ;;
    pause)
      echo "round $round: SIGSTOP of w$victim"
      kill -STOP "${PID[$victim]}"; sleep "$FAULT"; kill -CONT "${PID[$victim]}" ;;
    partial)
      leader=$(leader_index)
      leader=${leader:-0}
      [ "$victim" != "$leader" ] || victim=$(( (leader + 1) % N ))
      echo "round $round: w$victim cut off from all, but for TCP to the consensus leader w$leader"
      blackhole add "$victim" "$leader"; sleep "$FAULT"; blackhole del "$victim" "$leader" ;;
  esac
  sleep "$HEAL"
done
for i in $(seq 0 $((N - 1))); do wait "${CLIENT[$i]}" 2>/dev/null || true; done
CLIENT=()
wait "$FLEET" || fail "the devices' load test failed (loadtest.err)"
# every acknowledged device frame as a write for the checker
awk '{ print "frame", $1, $2, $3 }' "$WORK/devices.txt" > "$WORK/cdev.log"
echo "device frames: $(grep -m1 -i 'acked\|acknowledged' "$WORK/loadtest.out" | tr -s ' ' || true)"
for i in $(seq 0 $((N - 1))); do wait_members "$i" "$ALL" 60; done
echo "pool of five settled again"

# every acknowledged write, read back through each worker in turn (a read that fails is tried again: only an answer
# counts); the lock's history
n=0
for thing in $(cat "$WORK"/c*.log | awk '$1 == "write" || $1 == "frame" { print $2 }' | sort -u); do
  i=$((n % N)); n=$((n + 1))
  for _ in $(seq 1 50); do
    status=$(ip netns exec "${NS[$i]}" curl -s -m 5 -o "$WORK/read-$thing.json" -w '%{http_code}' \
      -H "x-api-key: $KEY" "http://10.78.0.$((i + 1)):8080/v1/things/$thing" || true)
    case "$status" in 200|404) break ;; esac
    sleep 0.2
  done
  [ "$status" = 200 ] || echo '{"properties": {}}' > "$WORK/read-$thing.json"
done
if python3 - "$WORK" <<'PY'
import glob, json, os, sys
work = sys.argv[1]
writes, locks, frames = [], [], []
for path in glob.glob(f"{work}/c*.log"):
    holder = os.path.basename(path)[:-4]
    for line in open(path):
        f = line.split()
        if f[0] == "write":
            writes.append((f[1], f[2], int(f[3]), int(f[4])))
        elif f[0] == "frame":
            frames.append((f[1], f[2], int(f[3]), 200))
        elif f[0] == "lock":
            locks.append((holder, int(f[1]), float(f[2]), float(f[3]), float(f[4]), int(f[5]), int(f[6])))
acked = [w for w in writes if w[3] == 200]
lost = []
for thing, prop, value, _ in acked + frames:
    try:
        state = json.load(open(f"{work}/read-{thing}.json"))
        got = state["properties"].get(prop, {}).get("value")
    except Exception:
        got = None
    if got != value:
        lost.append((thing, prop, value, got))
statuses = {}
for w in writes:
    statuses[w[3]] = statuses.get(w[3], 0) + 1
print(f"writes: {len(writes)} sent, {len(acked)} acknowledged, answers {dict(sorted(statuses.items()))}")
print(f"device frames acknowledged: {len(frames)}")
print(f"acknowledged writes and frames missing after the heal: {len(lost)}")
for l in lost[:10]:
    print("  lost", l)
locks.sort(key=lambda l: l[3])
bad = []
# each grant against every earlier one: the latest end so far, and the highest token so far
latest = None  # (end, holder, token)
highest = None  # (token, holder)
for holder, token, sent, granted, release, ttl_ms, _ in locks:
    if granted >= sent + ttl_ms / 1000:
        continue  # answered after its ttl counted from the request: the holder never used it
    if latest and (latest[1], latest[2]) != (holder, token) and granted < latest[0]:
        bad.append(f"token {token} ({holder}) granted {latest[0] - granted:.3f} s before {latest[2]} ({latest[1]}) ended")
    if highest and token < highest[0] or (highest and token == highest[0] and holder != highest[1]):
        bad.append(f"token {token} ({holder}) granted after {highest[0]} ({highest[1]})")
    # a holder uses the lock from the grant's answer until it sends its release, and never past its ttl counted
    # from its request (whatever the release's answer: a lost answer may hide a release that took effect)
    end = min(release, sent + ttl_ms / 1000)
    if latest is None or end > latest[0]:
        latest = (end, holder, token)
    if highest is None or token > highest[0]:
        highest = (token, holder)
print(f"lock grants: {len(locks)}; violations: {len(bad)}")
for b in bad[:10]:
    print("  ", b)
sys.exit(1 if lost or bad or not acked or not locks or not frames else 0)
PY
then echo "PASSED"; else fail "acknowledged writes missing or the lock's history broken (above)"; fi
