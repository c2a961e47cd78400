#!/usr/bin/env bash
# For the next session's device call: rows_gemm.py's screen, then exp6.py's batch-32 step A/B (shipped against
# rows_gemm for the dense products) with the time left.   bash docs/perf-run23/run7.sh [LIMIT_S]
set -u
OUT=${OUT:-/tmp/perf-run23}; mkdir -p "$OUT"; S=$(date +%s)
LIMIT=${1:-560}
left() { echo $(( LIMIT - ($(date +%s) - S) )); }
nvidia-smi --query-gpu=name --format=csv,noheader
PYTHONPATH=. timeout 150 python docs/perf-run23/rows_gemm.py screen "$OUT/rows_gemm.json" > "$OUT/rows_gemm.log" 2>&1
echo "rows_gemm rc=$?"; grep -E "screen|Error|error" "$OUT/rows_gemm.log" | tail -14 | cut -c1-300
echo "t=$(( $(date +%s) - S )) s"
PYTHONPATH=. timeout $(( $(left) - 5 )) python docs/perf-run23/exp6.py ab "$OUT/b32_rows.json" > "$OUT/b32_rows.log" 2>&1
echo "exp6 rc=$?"; grep -E "b1 |exp6|Error|error" "$OUT/b32_rows.log" | tail -12 | cut -c1-400
echo "t=$(( $(date +%s) - S )) s"
