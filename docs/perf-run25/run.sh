#!/usr/bin/env bash
# perf-run25's device command: the GPU checks (the MoE kernel tests; exp.py gpu), then exp.py's compiled
# batch-1 A/B with the time left.   bash docs/perf-run25/run.sh [LIMIT_S]
set -u
OUT=${OUT:-/tmp/perf-run25}; mkdir -p "$OUT"; S=$(date +%s)
LIMIT=${1:-560}
left() { echo $(( LIMIT - ($(date +%s) - S) )); }
t() { echo "t=$(( $(date +%s) - S )) s"; }
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
timeout 150 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_kernel_moe.py > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests.log" | tail -6 | cut -c1-300; t
PYTHONPATH=. timeout 120 python docs/perf-run25/exp.py gpu > "$OUT/check.log" 2>&1
echo "check rc=$?"; tail -8 "$OUT/check.log" | cut -c1-300; t
PYTHONPATH=. timeout $(( $(left) - 5 )) python docs/perf-run25/exp.py ab "$OUT/ab.json" > "$OUT/ab.log" 2>&1
echo "ab rc=$?"; grep -E "b1 |critical|perf-run25 ab: logits|Error|error" "$OUT/ab.log" | tail -14 | cut -c1-500; t
