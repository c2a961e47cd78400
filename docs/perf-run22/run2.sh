#!/usr/bin/env bash
# perf-run22's second device command (the same lease): the router tests after the fix, then exp.py ab without the
# one-pass rows (call 1 measured that kernel 4-15x slower alone): baseline, route_logits, + MoE weight prefetch,
# baseline and route_logits again.
set -u
OUT=${OUT:-/tmp/perf-run22}; mkdir -p "$OUT"; S=$(date +%s)
t() { echo "t=$(( $(date +%s) - S )) s"; }
LIMIT=${1:-560}
left() { echo $(( LIMIT - ($(date +%s) - S) )); }
timeout 100 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_kernel_router.py > "$OUT/tests_router2.log" 2>&1
echo "router tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests_router2.log" | tail -8 | cut -c1-300; t
PYTHONPATH=. timeout $(( $(left) - 10 )) python docs/perf-run22/exp.py ab "$OUT/ab2.json" > "$OUT/ab2.log" 2>&1
echo "ab rc=$?"; grep -E "perf-run22|b1 |critical|Error|error" "$OUT/ab2.log" | tail -16 | cut -c1-300; t
