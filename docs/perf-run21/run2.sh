#!/usr/bin/env bash
# perf-run21's second device command (the same lease as run.sh when it holds): transformers' best batch-1
# end-to-end setting (static cache + compile + batched_mm) beside ours, and the LongCat layer's cache-prefetch A/B
# over rounds. `bash docs/perf-run21/run2.sh [LIMIT_S] [EXP_BENCH_FLAGS...]`, writes under $OUT.
set -u
OUT=${OUT:-/tmp/perf-run21}; mkdir -p "$OUT"; S=$(date +%s)
LIMIT=${1:-580}; shift || true
t() { echo "t=$(( $(date +%s) - S )) s"; }
left() { echo $(( LIMIT - ($(date +%s) - S) )); }
nvidia-smi --query-gpu=name --format=csv,noheader
PYTHONPATH=. timeout $(( $(left) - 200 )) python docs/perf-run21/exp.py bench "$@" -- --only e2e --batches 1 \
    --e2e-variants fast_compile,hf --json "$OUT/e2e2.json" > "$OUT/e2e2.log" 2>&1; echo "e2e rc=$?"
grep -v "^\s*$" "$OUT/e2e2.log" | grep -iv warn | tail -6 | cut -c1-300; t
PYTHONPATH=. timeout $(( $(left) - 3 )) python docs/perf-run21/exp.py lc "$OUT/lc.json" 2 > "$OUT/lc.log" 2>&1
echo "lc rc=$?"; grep -E "b1 |Error" "$OUT/lc.log" | tail -8 | cut -c1-300; t
