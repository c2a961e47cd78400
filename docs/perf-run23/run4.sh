#!/usr/bin/env bash
# perf-run23: on an H200 only (the card issue 19's batch-32 and prefill targets were set on), the compiled batch-32
# GLM step with its profile, then the LongCat layer's 2k / 8k prefill with the time left; elsewhere it stops at once.
#   bash docs/perf-run23/run4.sh [LIMIT_S]
set -u
OUT=${OUT:-/tmp/perf-run23}; mkdir -p "$OUT"; S=$(date +%s)
LIMIT=${1:-560}
left() { echo $(( LIMIT - ($(date +%s) - S) )); }
t() { echo "t=$(( $(date +%s) - S )) s"; }
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$GPU"
case "$GPU" in *H200*) ;; *) echo "not an H200: nothing run"; exit 0 ;; esac
timeout $(( $(left) - 120 )) python -m longcat_ref.tools.bench --only b1 --b1-batch 32 --b1-variants compiled_decode \
    --json "$OUT/b32_h200.json" > "$OUT/b32_h200.log" 2>&1
echo "b32 rc=$?"; grep -E "b1 |critical|Error" "$OUT/b32_h200.log" | tail -6 | cut -c1-400; t
timeout $(( $(left) - 5 )) python -m longcat_ref.tools.bench --only layer --layer-prefill-only \
    --json "$OUT/prefill_h200.json" > "$OUT/prefill_h200.log" 2>&1
echo "prefill rc=$?"; grep -vE "^\s*$|Warning|warn" "$OUT/prefill_h200.log" | tail -14 | cut -c1-300; t
