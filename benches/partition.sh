#!/usr/bin/env bash
# A network partition of the cache ring (RELIABILITY P1), with network namespaces: three foundation workers, each in
# its own namespace, joined by a bridge in a fourth. Writes go through worker A's API before the cut; then worker C's
# link to the bridge goes down. Checked: the majority (A, B) makes a table without C and goes on acknowledging writes;
# C, cut off alone, acknowledges none and reports not ready; after the link comes back, C learns the pool declared it
# down, rejoins, and gets a share of the partitions again; A and B never stop; every write acknowledged anywhere is
# readable on all three. The workers talk over mutual TLS with the pool's credentials (`pool init`, `pool issue`).
# Needs root (ip netns); everything it creates is removed.
#
#   sudo benches/partition.sh                          # builds the release binary
#   sudo THINGPORT_BIN=target/debug benches/partition.sh   # uses binaries already built (as .ci/run does)
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/netns.sh
[ "$(id -u)" = 0 ] || { echo "needs root for network namespaces" >&2; exit 64; }
if [ -n "${THINGPORT_BIN:-}" ]; then
  B=$(cd "$THINGPORT_BIN" && pwd)
else
  cargo build --release -q -p thingport-foundation --bin thingport-foundation
  B=$PWD/target/release
fi
WORK=$(mktemp -d)
NS=(tp-a tp-b tp-c)
BR=tp-br
declare -A PID
cleanup() {
  for p in "${PID[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  netns_clear "${NS[@]}" "$BR"
  if [ -n "${KEEP:-}" ]; then echo "logs in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
fail() { echo "FAILED: $*" >&2; exit 1; }
# namespaces left by an interrupted run
netns_clear "${NS[@]}" "$BR"
netns_pool "$BR" 10.77.0 "${NS[@]}"

echo "partition-key" > "$WORK/api-keys"
# the pool's credentials: made for w0's host, issued for the two others (the addresses are not loopback, so the
# workers refuse to start without them)
"$B/thingport-foundation" pool init --dir "$WORK/pool-0" --host w0 >/dev/null
for i in 1 2; do
  "$B/thingport-foundation" pool issue --dir "$WORK/pool-0" --out "$WORK/pool-$i" --host "w$i" >/dev/null
done
for i in 0 1 2; do
  ip=10.77.0.$((i + 1))
  cat > "$WORK/w$i.toml" <<TOML
id = "w$i"
link_address = "$ip:7101"
api_address = "$ip:8080"
admin_address = "$ip:9101"
peer_address = "$ip:7201"
seeds = ["10.77.0.1:7201"]
bootstrap_members = 3
write_timeout = "3s"
request_timeout = "1s"
api_keys_file = "$WORK/api-keys"
# the API in the clear inside the test's own namespaces (the links and the ring are mutual TLS)
api_plain_http = true
pool_credentials = "$WORK/pool-$i"
[storage]
data_dir = "$WORK/store-$i"
TOML
  ip netns exec "${NS[$i]}" "$B/thingport-foundation" --config "$WORK/w$i.toml" > "$WORK/w$i.out" 2> "$WORK/w$i.log" &
  PID[$i]=$!
done
api() { # api <worker index> <method> <path> [json body] -> prints the HTTP status
  local i=$1 method=$2 path=$3 body=${4:-}
  ip netns exec "${NS[$i]}" curl -s -o /dev/null -w '%{http_code}' -m 10 -X "$method" \
    -H 'x-api-key: partition-key' -H 'content-type: application/json' ${body:+-d "$body"} \
    "http://10.77.0.$((i + 1)):8080$path" || true
}
members() { # members <worker index> -> the table's worker ids, sorted, if no change is under way
  ip netns exec "${NS[$1]}" curl -s -m 5 -H 'x-api-key: partition-key' "http://10.77.0.$(($1 + 1)):8080/v1/cluster" |
    python3 -c "import json,sys; v=json.load(sys.stdin); t=v['table']; print(','.join(sorted(m.split('#')[0] for m in t['members'])) if t and not v['changing'] else '')" 2>/dev/null || true
}
wait_members() { # wait_members <worker index> <ids>
  for _ in $(seq 1 300); do [ "$(members "$1")" = "$2" ] && return 0; sleep 0.1; done
  fail "worker $1 never settled on $2 (it shows '$(members "$1")')"
}
wait_members 0 w0,w1,w2
echo "pool of three formed"

# 30 things written through A, before the cut
for t in $(seq 1 30); do
  [ "$(api 0 PUT "/v1/things/t$t")" = 201 ] || fail "creating t$t"
  [ "$(api 0 PUT "/v1/things/t$t/properties/p" "{\"value\": $t}")" = 200 ] || fail "writing t$t"
done
echo "30 writes acknowledged through A"

echo "cutting C off"
CUT=$(date +%s%N)
ip -n "$BR" link set v2-br down
wait_members 0 w0,w1
echo "A and B made a table without C $(( ($(date +%s%N) - CUT) / 1000000 )) ms after the cut"

# the majority goes on; the minority acknowledges nothing
acked_on_c=0
for t in $(seq 31 50); do
  [ "$(api 0 PUT "/v1/things/t$t")" = 201 ] || fail "creating t$t on the majority side"
  [ "$(api 1 PUT "/v1/things/t$t/properties/p" "{\"value\": $t}")" = 200 ] || fail "writing t$t on the majority side"
done
echo "20 writes acknowledged through A and B during the partition"
for t in $(seq 1 10); do
  status=$(api 2 PUT "/v1/things/t$t/properties/q" "{\"value\": $t}")
  [ "$status" = 200 ] && acked_on_c=$((acked_on_c + 1))
done
echo "writes through C during the partition: $acked_on_c of 10 acknowledged"
[ "$acked_on_c" = 0 ] || fail "the cut-off minority acknowledged writes"
ready=$(ip netns exec tp-c curl -s -o /dev/null -w '%{http_code}' -m 5 http://10.77.0.3:9101/readyz || true)
echo "C's /readyz: $ready"
[ "$ready" = 503 ] || fail "C reports ready while cut off"

echo "healing"
HEAL=$(date +%s%N)
ip -n "$BR" link set v2-br up
wait_members 0 w0,w1,w2
echo "C rejoined and the table holds all three again $(( ($(date +%s%N) - HEAL) / 1000000 )) ms after the heal"
for i in 0 1 2; do
  case "$(ps -o stat= -p "${PID[$i]}" 2>/dev/null)" in ""|Z*) fail "worker $i exited" ;; esac
done

for t in $(seq 1 50); do
  for i in 0 1 2; do
    body=$(ip netns exec "${NS[$i]}" curl -s -m 5 -H 'x-api-key: partition-key' "http://10.77.0.$((i + 1)):8080/v1/things/t$t/properties/p" || echo "no answer")
    value=$(echo "$body" | python3 -c "import json,sys; print(json.load(sys.stdin)['value'])" 2>/dev/null || echo missing)
    [ "$value" = "$t" ] || fail "t$t on worker $i: $body"
  done
done
echo "all 50 acknowledged writes readable on A, B and C after the heal"
echo "PASSED"
