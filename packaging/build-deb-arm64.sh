#!/usr/bin/env bash
# Cross-builds the arm64 thingport .deb with Debian's rustc-web (rustup here has no arm64 standard library) and
# smoke-tests the arm64 gateway under qemu: --version, then a WSS HELLO and acknowledged data from the amd64 load
# generator. Needs root for the packages. The whole arm64 build uses Debian's /usr/bin/rustc (rustup's cannot link
# Debian's arm64 standard library), with no -L to /usr/aarch64-linux-gnu (that mixes the cross loader with the arm64
# libc, and threaded programs hang).
#   packaging/build-deb-arm64.sh   -> target/debian/thingport_VERSION-1_arm64.deb
set -euo pipefail
cd "$(dirname "$0")/.."
if ! dpkg -s libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu qemu-user-static >/dev/null 2>&1; then
  dpkg --add-architecture arm64
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rustc-web libstd-rust-web-dev \
    libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static >/dev/null
fi
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
TARGET=aarch64-unknown-linux-gnu
export RUSTC=/usr/bin/rustc CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
cargo build --release --locked --target "$TARGET" --target-dir target/arm64 \
  -p thingport-gateway -p thingport-foundation -p thingport-loadtest
# cargo-deb looks for the binaries under target/TARGET/release
mkdir -p "target/$TARGET/release"
cp target/arm64/$TARGET/release/thingport-{gateway,foundation,loadtest} "target/$TARGET/release/"
cargo deb -p thingport-gateway --no-build --target "$TARGET"
unset RUSTC
ls -l target/debian/*arm64.deb

# smoke test: the arm64 gateway under qemu, an amd64 acknowledging worker and load generator
GW=target/$TARGET/release/thingport-gateway
qemu-aarch64-static "$GW" --version
cargo build --release -q -p thingport-gateway -p thingport-loadtest
B=target/release
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
$B/thingport-gateway gen-cert --cert "$WORK/cert.pem" --key "$WORK/key.pem" >/dev/null
$B/thingport-gateway gen-secret --out "$WORK/secret" >/dev/null
$B/thingport-gateway token issue --thing arm- --count 10 --secret-file "$WORK/secret" > "$WORK/fleet.txt"
$B/thingport-loadtest ack-worker --listen 127.0.0.1:7301 2>/dev/null &
PIDS+=($!)
cat > "$WORK/gateway.toml" <<TOML
[listen]
address = "127.0.0.1:8543"
[tls]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"
[auth]
secret_file = "$WORK/secret"
[upstream]
foundations = ["127.0.0.1:7301"]
[admin]
address = "127.0.0.1:9543"
TOML
qemu-aarch64-static "$GW" --config "$WORK/gateway.toml" > "$WORK/gateway.log" 2>&1 &
PIDS+=($!)
GWPID=$!
for _ in $(seq 1 100); do grep -q "link up" "$WORK/gateway.log" && break; sleep 0.1; done
$B/thingport-loadtest run --target 127.0.0.1:8543 --ca "$WORK/cert.pem" --tokens "$WORK/fleet.txt" \
  --scenario telemetry --rate 2 --duration 5s --quiet
echo "arm64 gateway (under qemu) idle RSS: $(awk '/VmRSS/ {print $2}' /proc/$GWPID/status) KiB"
