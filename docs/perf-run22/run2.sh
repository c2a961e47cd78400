#!/usr/bin/env bash
# perf-run22's second device command: bench's end-to-end rows with the shipped defaults, in one process each with
# transformers' best setting for that batch: batch 1 (static cache + compile + batched_mm), then the LongCat
# layer's prefill rows (2k, 8k tokens), then batch 32 (grouped_mm) with the time left.
#   bash docs/perf-run22/run2.sh [LIMIT_S]
set -u
OUT=${OUT:-/tmp/perf-run22}; mkdir -p "$OUT"; S=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
t() { echo "t=$(( $(date +%s) - S )) s"; }
LIMIT=${1:-560}
left() { echo $(( LIMIT - ($(date +%s) - S) )); }
B="python -m longcat_ref.tools.bench"
timeout $(( $(left) - 10 )) $B --only e2e --batches 1 --e2e-variants fast_compile,hf --json "$OUT/e2e1.json" \
    > "$OUT/e2e1.log" 2>&1
echo "e2e b1 rc=$?"; grep -E "tok/s|first|Error" "$OUT/e2e1.log" | tail -8 | cut -c1-300; t
timeout $(( $(left) - 10 )) $B --only layer --layer-prefill-only --json "$OUT/prefill.json" > "$OUT/prefill.log" 2>&1
echo "prefill rc=$?"; grep -E "prefill|peak|Error" "$OUT/prefill.log" | tail -8 | cut -c1-300; t
timeout $(( $(left) - 5 )) $B --only e2e --batches 32 --e2e-variants fast_compile,hf --hf-experts grouped_mm \
    --json "$OUT/e2e32.json" > "$OUT/e2e32.log" 2>&1
echo "e2e b32 rc=$?"; grep -E "tok/s|first|Error" "$OUT/e2e32.log" | tail -8 | cut -c1-300; t
