#!/usr/bin/env bash
# perf-run23's first device command: the L2 prefetch screen (exp.py).   bash docs/perf-run23/run.sh
set -u
OUT=${OUT:-/tmp/perf-run23}; mkdir -p "$OUT"; S=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
PYTHONPATH=. timeout 200 python docs/perf-run23/${EXP:-exp.py} "$OUT/${NAME:-screen}.json" > "$OUT/${NAME:-screen}.log" 2>&1
echo "screen rc=$?"; grep -vE "^\s*$" "$OUT/${NAME:-screen}.log" | tail -45 | cut -c1-300; echo "t=$(( $(date +%s) - S )) s"
