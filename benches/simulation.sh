#!/usr/bin/env bash
# The deterministic simulation of a pool (foundation/src/ring/simulation.rs) at length: 200 seeds of five workers
# with every kind of fault, 200 of three workers with three copies under kills and pauses, and five pools of 100
# workers. Each part prints its summary and the seeds that lost an acknowledged write, saw two tables of one
# version, or did not settle, with their faults; the script exits 1 if any did. The simulated clock makes every
# figure the same on every machine and run (the wall time aside).
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
STATUS=0
# every line but those of sound seeds
unsound() { grep -v '^seed [0-9]*: .* 0 lost, 0 violations, settled$' || true; }
echo "== five workers, two joining, replication 2, 40 s of faults, 1,000 writes/s: seeds 1..$SEEDS"
"$SIM" --seeds "1..$SEEDS" | unsound || STATUS=1
echo "== three workers, replication 3, kills and pauses: seeds 1..$SEEDS"
"$SIM" --seeds "1..$SEEDS" --workers 3 --voters 3 --replicas 3 --joins 0 --faults kill,pause | unsound || STATUS=1
echo "== 100 workers, five joining, 60 s of faults: seeds 1..$LARGE"
"$SIM" --seeds "1..$LARGE" --workers 100 --joins 5 --seconds 60 --verbose || STATUS=1
exit $STATUS
