#!/usr/bin/env bash
# Checks the unit files: `systemd-analyze verify` must print nothing, and `systemd-analyze security --offline`
# must score each service at 2.0 or lower. Works without a running systemd. The units name /usr/bin binaries;
# verify needs them to exist, so it runs on copies that point at the given directory of built binaries.
#   systemd/check-units.sh target/debug
set -euo pipefail
BIN=$(cd "${1:?directory of built thingport binaries}" && pwd)
cd "$(dirname "$0")"
command -v systemd-analyze >/dev/null || { apt-get update -qq && apt-get install -y -qq systemd >/dev/null; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
for unit in thingport-gateway.service thingport-foundation@.service thingport.target; do
  sed "s#/usr/bin/thingport-#$BIN/thingport-#g" "$unit" > "$WORK/$unit"
done
cp "$WORK/thingport-foundation@.service" "$WORK/thingport-foundation@1.service"
status=0
for unit in thingport-gateway.service thingport-foundation@1.service thingport.target; do
  out=$(cd "$WORK" && systemd-analyze verify "$WORK/$unit" 2>&1 || true)
  if [ -n "$out" ]; then
    echo "systemd-analyze verify $unit:"; echo "$out"; status=1
  else
    echo "verify $unit: clean"
  fi
done
for unit in thingport-gateway.service thingport-foundation@1.service; do
  score=$(systemd-analyze security --offline=yes "$WORK/$unit" 2>/dev/null | grep -o 'Overall exposure level[^:]*: [0-9.]*' | grep -o '[0-9.]*$')
  if systemd-analyze security --offline=yes --threshold=20 "$WORK/$unit" >/dev/null 2>&1; then
    echo "security $unit: $score (threshold 2.0)"
  else
    echo "security $unit: $score, above 2.0"; status=1
  fi
done
exit $status
