#!/usr/bin/env bash
# Checks the monitoring files shipped in the package against the servers that feed them: the alert rules pass
# `promtool check rules`, the dashboard is valid JSON, and every thingport metric either of them names is exported
# by a running worker or gateway; every metric a server exports has a HELP text.
#
#   packaging/check-monitoring.sh BIN_DIR     # BIN_DIR holds thingport-foundation, -gateway and -loadtest
set -euo pipefail
cd "$(dirname "$0")/.."
B=$(cd "${1:?usage: check-monitoring.sh BIN_DIR}" && pwd)
RULES=packaging/monitoring/thingport-alerts.yml
DASHBOARD=packaging/monitoring/thingport-dashboard.json
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
fail() { echo "FAILED: $*" >&2; exit 1; }

promtool check rules "$RULES"
python3 -m json.tool "$DASHBOARD" >/dev/null || fail "$DASHBOARD is not valid JSON"

# a worker and a gateway, every port chosen by the system; each prints its bound addresses as its first line
echo "key-1" > "$WORK/api-keys"
"$B/thingport-foundation" pool init --dir "$WORK/pool" --host check >/dev/null
cat > "$WORK/foundation.toml" <<TOML
link_address = "127.0.0.1:0"
api_address = "127.0.0.1:0"
admin_address = "127.0.0.1:0"
peer_address = "127.0.0.1:0"
api_keys_file = "$WORK/api-keys"
pool_credentials = "$WORK/pool"
[storage]
data_dir = "$WORK/store"
TOML
"$B/thingport-foundation" --config "$WORK/foundation.toml" > "$WORK/foundation.out" 2> "$WORK/foundation.log" &
PIDS+=($!)
first_line() { for _ in $(seq 1 100); do [ -s "$1" ] && { head -1 "$1"; return; }; sleep 0.1; done; fail "no addresses in $1"; }
addr() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
WORKER=$(first_line "$WORK/foundation.out")
"$B/thingport-gateway" gen-cert --cert "$WORK/cert.pem" --key "$WORK/key.pem" >/dev/null
"$B/thingport-gateway" gen-secret --out "$WORK/secret" >/dev/null
cat > "$WORK/gateway.toml" <<TOML
[listen]
address = "127.0.0.1:0"
[tls]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"
[auth]
secret_file = "$WORK/secret"
[upstream]
foundations = ["$(addr "$WORKER" link)"]
pool_credentials = "$WORK/pool"
[admin]
address = "127.0.0.1:0"
TOML
"$B/thingport-gateway" --config "$WORK/gateway.toml" > "$WORK/gateway.out" 2> "$WORK/gateway.log" &
PIDS+=($!)
GATEWAY=$(first_line "$WORK/gateway.out")
# scraped once the worker is ready (its ring metrics are set) and the gateway's links are up
for _ in $(seq 1 100); do
  curl -sf "http://$(addr "$WORKER" admin)/readyz" >/dev/null &&
    curl -sf "http://$(addr "$GATEWAY" admin)/metrics" | grep -q '^thingport_gateway_links_up [1-9]' && break
  sleep 0.1
done
# a few devices for two seconds, so that the per-frame series (histograms among them) have samples
"$B/thingport-gateway" token issue --thing check- --count 5 --secret-file "$WORK/secret" > "$WORK/tokens"
"$B/thingport-loadtest" run --target "$(addr "$GATEWAY" wss)" --ca "$WORK/cert.pem" --tokens "$WORK/tokens" \
  --rate 5 --duration 2s --quiet > "$WORK/load.out" || fail "the devices' run failed: $(cat "$WORK/load.out")"
curl -sf "http://$(addr "$WORKER" admin)/metrics" > "$WORK/worker.metrics"
curl -sf "http://$(addr "$GATEWAY" admin)/metrics" > "$WORK/gateway.metrics"

missing=0
for scrape in worker gateway; do
  for name in $(awk '$1 == "#" && $2 == "TYPE" { print $3 }' "$WORK/$scrape.metrics"); do
    grep -q "^# HELP $name " "$WORK/$scrape.metrics" || { echo "no HELP text: $name ($scrape)"; missing=1; }
  done
done
# the names the rules and the dashboard use, without a histogram's _bucket/_sum/_count
used=$(grep -ohE 'thingport_[a-z_]+' "$RULES" "$DASHBOARD" | sed -E 's/_(bucket|sum|count)$//' | sort -u)
for name in $used; do
  grep -qE "^# TYPE $name " "$WORK/worker.metrics" "$WORK/gateway.metrics" ||
    { echo "not exported by a running worker or gateway: $name"; missing=1; }
done
[ "$missing" = 0 ] || fail "see above"
echo "monitoring: rules and dashboard use $(echo "$used" | wc -w) metrics, all exported with HELP texts"
