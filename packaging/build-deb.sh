#!/usr/bin/env bash
# Builds the thingport .deb for this machine (amd64): the release binaries, then cargo-deb (installed if missing).
#   packaging/build-deb.sh            -> target/debian/thingport_VERSION-1_amd64.deb
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
cargo build --release --locked -p thingport-gateway -p thingport-foundation -p thingport-loadtest
cargo deb -p thingport-gateway --no-build
ls -l target/debian/*.deb
