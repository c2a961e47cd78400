#!/usr/bin/env bash
# perf-run22's third device command: the MoE and router kernels' tests, exp3.py (the down kernel's weight prefetch
# off / on, two rounds), then bench's end-to-end batch-1 rows with the shipped defaults (ours fast_compile and
# transformers' best setting, one process) with the time left.
#   bash docs/perf-run22/run3.sh [LIMIT_S]
set -u
OUT=${OUT:-/tmp/perf-run22}; mkdir -p "$OUT"; S=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
t() { echo "t=$(( $(date +%s) - S )) s"; }
LIMIT=${1:-560}
left() { echo $(( LIMIT - ($(date +%s) - S) )); }
timeout 100 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_kernel_moe.py tests/test_kernel_router.py \
    -k "gpu or cuda or prefetch" > "$OUT/tests3.log" 2>&1
echo "tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests3.log" | tail -8 | cut -c1-300; t
PYTHONPATH=. timeout 200 python docs/perf-run22/exp3.py "$OUT/ab3.json" > "$OUT/ab3.log" 2>&1
echo "ab3 rc=$?"; grep -E "b1 |critical|Error|error" "$OUT/ab3.log" | tail -10 | cut -c1-300; t
timeout $(( $(left) - 5 )) python -m longcat_ref.tools.bench --only e2e --batches 1 --e2e-variants fast_compile,hf \
    --json "$OUT/e2e1.json" > "$OUT/e2e1.log" 2>&1
echo "e2e rc=$?"; grep -E "tok/s|first|Error" "$OUT/e2e1.log" | tail -8 | cut -c1-300; t
