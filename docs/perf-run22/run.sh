#!/usr/bin/env bash
# perf-run22's first device command (docs/perf-run22/README.md), from the repository root on the device:
#   bash docs/perf-run22/run.sh [LIMIT_S]          (writes under $OUT; LIMIT_S default 560)
# (1) the GPU tests of the MoE and MLA decode kernels and of the fast path (the MoE weight prefetch's bit-identity
# test among them, not run before); (2) perf-run21's exp.py moe: GLM-4.7-Flash's compiled batch-1 step with the MoE
# kernels' weight prefetch off / on, two rounds, with inductor's generated code logged (what its fused kernels
# between ours compute), gzipped.
set -u
OUT=${OUT:-/tmp/perf-run22}; mkdir -p "$OUT"; S=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
t() { echo "t=$(( $(date +%s) - S )) s"; }
LIMIT=${1:-560}
left() { echo $(( LIMIT - ($(date +%s) - S) )); }
timeout 220 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_kernel_moe.py tests/test_kernel_mla.py \
    tests/test_fast.py -k "gpu or cuda" > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests.log" | tail -12 | cut -c1-300; t
PYTHONPATH=. TORCH_LOGS=output_code timeout $(( $(left) - 15 )) python docs/perf-run21/exp.py moe "$OUT/moe.json" \
    > "$OUT/moe.log" 2> "$OUT/code.txt"
echo "moe rc=$?"; grep -E "b1 |critical|Error|error" "$OUT/moe.log" | tail -14 | cut -c1-300; t
grep -iE "warn|error" "$OUT/code.txt" | grep -v "^#" | head -5 | cut -c1-300
gzip -9 "$OUT/code.txt"; ls -la "$OUT"; t
