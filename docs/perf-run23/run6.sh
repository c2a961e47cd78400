#!/usr/bin/env bash
# perf-run23's last device command: rows_gemm.py's screen (GLM's batch-32 dense products, cuBLAS against the
# no-split tensor-core kernel).   bash docs/perf-run23/run6.sh [LIMIT_S]
set -u
OUT=${OUT:-/tmp/perf-run23}; mkdir -p "$OUT"; S=$(date +%s)
LIMIT=${1:-200}
nvidia-smi --query-gpu=name --format=csv,noheader
PYTHONPATH=. timeout $(( LIMIT - 5 )) python docs/perf-run23/rows_gemm.py screen "$OUT/rows_gemm.json" > "$OUT/rows_gemm.log" 2>&1
echo "rows_gemm rc=$?"; grep -E "screen|Error|error" "$OUT/rows_gemm.log" | tail -14 | cut -c1-300
echo "t=$(( $(date +%s) - S )) s"
