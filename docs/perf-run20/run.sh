#!/usr/bin/env bash
# perf-run20's device command (docs/perf-run20/README.md), from the repository root on the device:
#   bash docs/perf-run20/run.sh [LIMIT_S]          (writes under $OUT; LIMIT_S default 580)
# ~9 minutes on one H100 / H200: (1) the GPU tests of the decode-step capture and of the rope kernels, and the
# compiled-generate tests again with inductor's PDL on (TORCHINDUCTOR_ENABLE_PDL=1); (2) exp.py ab: the compiled
# batch-1 step with inductor's PDL off / on (the LongCat layer, GLM-4.7-Flash) and GLM with W_uk's own bmm; (3)
# bench's end-to-end batch-1 row, ours (`fast_compile`, inductor's PDL as (2) measured faster) and transformers'
# best; (4) exp.py trace: GLM's compiled step kernel by kernel in order, and inductor's code of it.
set -u
OUT=${OUT:-/tmp/perf-run20}; mkdir -p "$OUT"; S=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
pip list 2>/dev/null | grep -iE "^(einops|torch|triton|transformers) "
python -c "import torch._inductor.config as c; print('inductor enable_pdl option:', hasattr(c.triton, 'enable_pdl'))"
t() { echo "t=$(( $(date +%s) - S )) s"; }
LIMIT=${1:-580}  # seconds this command may run (the device call's limit less a margin)
left() { echo $(( LIMIT - ($(date +%s) - S) )); }
timeout 150 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_kernel_rope.py tests/test_fast.py \
    -k "gpu or capture or compiled_generate_on_cuda" > "$OUT/tests.log" 2>&1; echo "tests rc=$?"
grep -E "passed|failed|FAILED|Error" "$OUT/tests.log" | tail -8 | cut -c1-300; t
TORCHINDUCTOR_ENABLE_PDL=1 timeout 100 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_fast.py \
    -k "compiled_generate_on_cuda or capture_retry" > "$OUT/tests_pdl.log" 2>&1; echo "tests (inductor PDL) rc=$?"
grep -E "passed|failed|FAILED|Error" "$OUT/tests_pdl.log" | tail -8 | cut -c1-300; t
PYTHONPATH=. timeout 260 python docs/perf-run20/exp.py ab "$OUT/ab.json" > "$OUT/ab.log" 2>&1; echo "ab rc=$?"
grep -E "b1 |Error|error" "$OUT/ab.log" | tail -8 | cut -c1-300; t
PDL=$(python - "$OUT/ab.json" <<'PY'
import json, sys
try:
    rows = {r["model"]: r["ours_s"] for r in json.load(open(sys.argv[1]))["rows"]}
    print(1 if rows["glm pdl=1 fold=4"] < rows["glm pdl=0 fold=4"] else 0)
except Exception:
    print(0)
PY
)
echo "e2e with inductor PDL=$PDL"
PYTHONPATH=. timeout $(( $(left) - 70 )) python docs/perf-run20/exp.py bench --pdl "$PDL" -- --only e2e --batches 1 \
    --e2e-variants fast_compile,hf --json "$OUT/e2e.json" > "$OUT/e2e.log" 2>&1; echo "e2e rc=$?"
grep -v "^\s*$" "$OUT/e2e.log" | grep -iv warn | tail -8 | cut -c1-300; t
if [ "$(left)" -gt 50 ]; then
    PYTHONPATH=. timeout $(( $(left) - 3 )) python docs/perf-run20/exp.py trace "$OUT" --pdl "$PDL" > "$OUT/trace.log" \
        2>&1; echo "trace rc=$?"
    grep -E "perf-run20|Error" "$OUT/trace.log" | tail -5 | cut -c1-300; t
fi
