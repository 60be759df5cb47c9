#!/bin/bash
# A soak of the deterministic simulations (#15): cluster_sim and engine_sim
# with N seeds each (cluster_sim: N per test function, two functions), and
# the proptest suites with N cases. Every failing cluster_sim seed is named
# at the end (CSNAP_SIM_SOAK=1); replay one with
#   CSNAP_SIM_SEED=S CSNAP_SIM_TRACE=1 cargo test --release -p csnap-io --test cluster_sim
# Usage: scripts/sim-soak.sh [N]   (default 100000)
set -euo pipefail
n="${1:-100000}"
cd "$(dirname "$0")/.."
export CSNAP_SIM_SOAK=1 CSNAP_SIM_SEEDS="$n"
status=0
for t in cluster_sim engine_sim; do
    echo "== $t: $n seeds"
    /usr/bin/time -f "$t: %e s" cargo test --release -p csnap-io --test "$t" -- --nocapture 2>&1 |
        grep -E "^cluster_sim [ab]:|^engine sim:|seed [0-9]+ failed|test result|: [0-9.]+ s$" || status=1
done
echo "== proptest suites: $n cases"
PROPTEST_CASES="$n" cargo test --release -p csnap-store --test model || status=1
PROPTEST_CASES="$n" cargo test --release -p csnap-fsm --test disk_sched --test nbd_fsm || status=1
exit "$status"
