#!/usr/bin/env bash
# perf-run23's call-3 command: exp5.py (the touch kernel on a second stream in the compiled batch-1 step).
#   bash docs/perf-run23/run5.sh [LIMIT_S]
set -u
OUT=${OUT:-/tmp/perf-run23}; mkdir -p "$OUT"; S=$(date +%s)
LIMIT=${1:-560}
nvidia-smi --query-gpu=name --format=csv,noheader
PYTHONPATH=. timeout $(( LIMIT - 5 )) python docs/perf-run23/exp5.py "$OUT/touch.json" > "$OUT/touch.log" 2>&1
echo "exp5 rc=$?"; grep -E "b1 |touch:|Error|error" "$OUT/touch.log" | tail -16 | cut -c1-300
echo "t=$(( $(date +%s) - S )) s"
