#!/usr/bin/env bash
# The deterministic simulation of a pool (foundation/src/ring/simulation.rs) at length: many seeds of five workers
# with every kind of fault, then pools of 100 workers. Each run prints its faults' outcome; the script exits 1 if
# any run lost an acknowledged write, saw two tables of one version, or did not settle. The simulated clock makes
# every figure the same on every machine and run (the wall time aside).
#
#   benches/simulation.sh [--seeds 200] [--large-seeds 5]
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=200 LARGE=5
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds) SEEDS=$2; shift 2 ;;
    --large-seeds) LARGE=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 64 ;;
  esac
done
cargo build --release -q -p thingport-foundation --example simulate
SIM=target/release/examples/simulate
echo "== five workers, two joins, replication 2, 40 s of faults, 1,000 writes/s: seeds 1..$SEEDS"
"$SIM" --seeds "1..$SEEDS" | tail -n 1
echo "== three workers, replication 3, kills and pauses: seeds 1..$SEEDS"
"$SIM" --seeds "1..$SEEDS" --workers 3 --voters 3 --replicas 3 --joins 0 --faults kill,pause | tail -n 1
echo "== 100 workers, five joins, 60 s of faults: seeds 1..$LARGE"
"$SIM" --seeds "1..$LARGE" --workers 100 --joins 5 --seconds 60 --verbose
