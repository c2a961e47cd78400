#!/usr/bin/env bash
# perf-run24's device command: prefetch_gemv's GPU tests (SPLIT on, the default), exp.py's screen, then its
# compiled batch-1 step A/B with the time left.   bash docs/perf-run24/run.sh [LIMIT_S]
set -u
OUT=${OUT:-/tmp/perf-run24}; mkdir -p "$OUT"; S=$(date +%s)
LIMIT=${1:-560}
left() { echo $(( LIMIT - ($(date +%s) - S) )); }
t() { echo "t=$(( $(date +%s) - S )) s"; }
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_kernel_prefetch_gemv.py \
    > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests.log" | tail -6 | cut -c1-300; t
PYTHONPATH=. timeout 90 python docs/perf-run24/exp.py screen "$OUT/screen.json" > "$OUT/screen.log" 2>&1
echo "screen rc=$?"; grep -E "screen|Error|error" "$OUT/screen.log" | tail -6 | cut -c1-300; t
PYTHONPATH=. timeout $(( $(left) - 5 )) python docs/perf-run24/exp.py ab "$OUT/ab.json" > "$OUT/ab.log" 2>&1
echo "ab rc=$?"; grep -E "b1 |critical|perf-run24 ab: logits|Error|error" "$OUT/ab.log" | tail -12 | cut -c1-400; t
