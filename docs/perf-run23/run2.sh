#!/usr/bin/env bash
# perf-run23's second device command: screen 2 (exp2.py: the L2 prefetch on a second stream), then, on an H200 only
# (the card issue 19's batch-32 and prefill targets were set on), the compiled batch-32 GLM step with its profile and
# the LongCat layer's 2k / 8k prefill, with the time left.   bash docs/perf-run23/run2.sh [LIMIT_S]
set -u
OUT=${OUT:-/tmp/perf-run23}; mkdir -p "$OUT"; S=$(date +%s)
LIMIT=${1:-560}
left() { echo $(( LIMIT - ($(date +%s) - S) )); }
t() { echo "t=$(( $(date +%s) - S )) s"; }
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$GPU"
PYTHONPATH=. timeout 120 python docs/perf-run23/exp2.py "$OUT/screen2.json" > "$OUT/screen2.log" 2>&1
echo "screen2 rc=$?"; grep -vE "^\s*$" "$OUT/screen2.log" | tail -40 | cut -c1-300; t
case "$GPU" in *H200*) ;; *) echo "not an H200: no batch-32 / prefill rows"; exit 0 ;; esac
timeout $(( $(left) - 150 )) python -m longcat_ref.tools.bench --only b1 --b1-batch 32 --b1-variants compiled_decode \
    --json "$OUT/b32.json" > "$OUT/b32.log" 2>&1
echo "b32 rc=$?"; grep -E "ms|tok/s|critical|Error" "$OUT/b32.log" | tail -12 | cut -c1-300; t
timeout $(( $(left) - 5 )) python -m longcat_ref.tools.bench --only layer --layer-prefill-only \
    --json "$OUT/prefill.json" > "$OUT/prefill.log" 2>&1
echo "prefill rc=$?"; grep -E "ms|peak|Error" "$OUT/prefill.log" | tail -12 | cut -c1-300; t
