#!/usr/bin/env bash
# perf-run23's call-2 command: exp4.py (the batch-32 step with inductor's GEMM autotuning).  bash run3.sh [LIMIT_S]
set -u
OUT=${OUT:-/tmp/perf-run23}; mkdir -p "$OUT"; S=$(date +%s)
LIMIT=${1:-560}
nvidia-smi --query-gpu=name --format=csv,noheader
PYTHONPATH=. timeout $(( LIMIT - 5 )) python docs/perf-run23/exp4.py "$OUT/b32_autotune.json" > "$OUT/b32_autotune.log" 2>&1
echo "exp4 rc=$?"; grep -E "b1 |critical|Error|error" "$OUT/b32_autotune.log" | tail -12 | cut -c1-400
echo "t=$(( $(date +%s) - S )) s"
