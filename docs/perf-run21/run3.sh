#!/usr/bin/env bash
# perf-run21's third device command: after "auto" took the prefetch GEMV in the compiled decode step. The GPU tests
# of the fast path and the kernel, then exp.py auto (the LongCat layer and GLM with it off / on).
set -u
OUT=${OUT:-/tmp/perf-run21}; mkdir -p "$OUT"; S=$(date +%s)
LIMIT=${1:-560}
t() { echo "t=$(( $(date +%s) - S )) s"; }
left() { echo $(( LIMIT - ($(date +%s) - S) )); }
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_fast.py \
    tests/test_kernel_prefetch_gemv.py -k "gpu or cuda or capture" > "$OUT/tests3.log" 2>&1
echo "tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests3.log" | tail -10 | cut -c1-300; t
PYTHONPATH=. timeout $(( $(left) - 3 )) python docs/perf-run21/exp.py auto "$OUT/auto.json" > "$OUT/auto.log" 2>&1
echo "auto rc=$?"; grep -E "b1 |critical|Error" "$OUT/auto.log" | tail -14 | cut -c1-300; t
