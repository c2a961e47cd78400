#!/usr/bin/env bash
# perf-run22's first device command (docs/perf-run22/README.md), from the repository root on the device:
#   bash docs/perf-run22/run.sh [LIMIT_S]          (writes under $OUT; LIMIT_S default 560)
# (1) the router kernel's tests (route_logits: its CUDA-graph test among them) and the GPU tests of the MoE and MLA
# decode kernels and of the fast path (the MoE weight prefetch's bit-identity test, not run before); (2) exp.py ab:
# MLA's attention with W_uv alone (exp.py mla: split + merge against the one-pass kernel's tiles); GLM-4.7-Flash's
# compiled batch-1 step: baseline, route_logits, + MLA one-pass (the best tile of exp.py mla), + MoE weight
# prefetch, and again.
set -u
OUT=${OUT:-/tmp/perf-run22}; mkdir -p "$OUT"; S=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
t() { echo "t=$(( $(date +%s) - S )) s"; }
LIMIT=${1:-560}
left() { echo $(( LIMIT - ($(date +%s) - S) )); }
timeout 100 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_kernel_router.py > "$OUT/tests_router.log" 2>&1
echo "router tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests_router.log" | tail -8 | cut -c1-300; t
timeout 200 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_kernel_moe.py tests/test_kernel_mla.py \
    tests/test_fast.py -k "gpu or cuda" > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests.log" | tail -12 | cut -c1-300; t
PYTHONPATH=. timeout 90 python docs/perf-run22/exp.py mla "$OUT/mla.json" > "$OUT/mla.log" 2>&1
echo "mla rc=$?"; grep -E "perf-run22|best|Error" "$OUT/mla.log" | tail -26 | cut -c1-200; t
BEST=$(grep "^best " "$OUT/mla.log" | awk '{print $2","$3}')
PYTHONPATH=. ONE_PASS=${BEST:-16,4} timeout $(( $(left) - 10 )) python docs/perf-run22/exp.py ab "$OUT/ab.json" > "$OUT/ab.log" 2>&1
echo "ab rc=$?"; grep -E "perf-run22|b1 |critical|Error|error" "$OUT/ab.log" | tail -16 | cut -c1-300; t
