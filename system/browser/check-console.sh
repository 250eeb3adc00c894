#!/usr/bin/env bash
# The web console in a real browser: starts the demo (two workers and a gateway, as processes), adds a viewer key,
# and runs console_test.py in Debian's chromium through chromedriver. Screenshots go to target/console-screenshots.
#
#   system/browser/check-console.sh [BIN_DIR]     # BIN_DIR holds thingport-demo and examples/device (target/debug)
#
# THINGS (default 100000) things fill the pool first; FIRST_PAGE_MS (default 300) is the devices page's budget.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${1:-target/debug}
for tool in chromium chromedriver /usr/bin/python3; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install chromium chromium-driver python3-selenium)"; exit 1; }
done
/usr/bin/python3 -c 'import selenium' 2>/dev/null || { echo "needs python3-selenium"; exit 1; }
[ -x "$bin/thingport-demo" ] && [ -x "$bin/examples/device" ] || {
  echo "needs $bin/thingport-demo and $bin/examples/device (cargo build --bins && cargo build -p thingport-device --example device)"
  exit 1
}

dir=$(mktemp -d)
demo_pid=""
finish() {
  status=$?
  if [ -n "$demo_pid" ] && kill -0 "$demo_pid" 2>/dev/null; then
    kill -TERM "$demo_pid"
    wait "$demo_pid" || true
  fi
  if [ "$status" != 0 ]; then
    echo "--- demo output"; cat "$dir/demo.out" || true
    for log in "$dir"/*.log; do echo "--- $log"; tail -n 30 "$log"; done
  fi
  rm -rf "$dir"
  exit "$status"
}
trap finish EXIT

"$bin/thingport-demo" --dir "$dir" --port 0 --api-port 0 --no-device > "$dir/demo.out" 2>&1 &
demo_pid=$!
for _ in $(seq 1 300); do
  grep -q "console " "$dir/demo.out" && break
  kill -0 "$demo_pid" 2>/dev/null || { echo "the demo stopped"; exit 1; }
  sleep 0.1
done
grep -q "console " "$dir/demo.out" || { echo "the demo did not start within 30 s"; exit 1; }

api=$(sed -n 's|.*console *http://\([^/]*\)/console.*|\1|p' "$dir/demo.out")
admin_key=$(sed -n "s|.*application key: \([^)]*\)).*|\1|p" "$dir/demo.out")
target=$(sed -n 's|.*--target \([^ ]*\) .*|\1|p' "$dir/demo.out" | head -n 1)
viewer_key=$("$bin/thingport-demo" foundation --config "$dir/foundation-1.toml" api-key add --role viewer --name browser 2>/dev/null)
token=$("$bin/thingport-demo" gateway token issue --thing browser-device --secret-file "$dir/provisioning.key")
mkdir -p target/console-screenshots

API=$api ADMIN_KEY=$admin_key VIEWER_KEY=$viewer_key SHOTS=target/console-screenshots \
  DEVICE_CMD="exec $bin/examples/device --target $target --ca $dir/cert.pem --thing browser-device --token $token" \
  /usr/bin/python3 system/browser/console_test.py
