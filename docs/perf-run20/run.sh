#!/usr/bin/env bash
# perf-run20's first device command (docs/perf-run20/README.md), from the repository root on the device:
#   bash docs/perf-run20/run.sh          (writes under $OUT)
# ~8 minutes on one H100 / H200: (1) the GPU tests of the decode-step capture and of the rope kernels; (2) perf-run19's
# exp.py ab: the compiled batch-1 step with W_uk's product in the rope-cache kernel (now with the token's work spread
# over its programs) or not, the LongCat layer and GLM-4.7-Flash; (3) bench's end-to-end batch-1 row, ours and
# transformers' best; (4) exp.py trace: GLM's compiled step kernel by kernel in order, and inductor's code of it;
# (5) tune_moe --narrow on LongCat-Flash's expert shapes (the MoE kernels' tiles on this card) in what time is left.
set -u
OUT=${OUT:-/tmp/perf-run20}; mkdir -p "$OUT"; S=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
pip list 2>/dev/null | grep -iE "^(einops|torch|triton|transformers) "
t() { echo "t=$(( $(date +%s) - S )) s"; }
left() { echo $(( 580 - ($(date +%s) - S) )); }
timeout 150 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_kernel_rope.py tests/test_fast.py \
    -k "gpu or capture or compiled_generate_on_cuda" > "$OUT/tests.log" 2>&1; echo "tests rc=$?"
grep -E "passed|failed|FAILED|Error" "$OUT/tests.log" | tail -8 | cut -c1-300; t
PYTHONPATH=. timeout 230 python docs/perf-run19/exp.py ab "$OUT/ab.json" > "$OUT/ab.log" 2>&1; echo "ab rc=$?"
grep -E "b1 |Error|error" "$OUT/ab.log" | tail -8 | cut -c1-300; t
PYTHONPATH=. timeout 240 python docs/perf-run19/exp.py bench --fold 4 -- --only e2e --batches 1 \
    --e2e-variants fast_compile,hf --json "$OUT/e2e.json" > "$OUT/e2e.log" 2>&1; echo "e2e rc=$?"
grep -v "^\s*$" "$OUT/e2e.log" | grep -iv warn | tail -8 | cut -c1-300; t
PYTHONPATH=. timeout 110 python docs/perf-run20/exp.py trace "$OUT" > "$OUT/trace.log" 2>&1; echo "trace rc=$?"
grep -E "perf-run20|Error" "$OUT/trace.log" | tail -5 | cut -c1-300; t
if [ "$(left)" -gt 40 ]; then
    timeout $(( $(left) - 5 )) python -m longcat_ref.tools.tune_moe --narrow --cases longcat_bf16 \
        --time-limit $(( $(left) - 25 )) --json "$OUT/tune_longcat.json" > "$OUT/tune.log" 2>&1; echo "tune rc=$?"
    tail -12 "$OUT/tune.log" | cut -c1-200; t
fi
