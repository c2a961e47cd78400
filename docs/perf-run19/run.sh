#!/usr/bin/env bash
# perf-run19's device command (docs/perf-run19/README.md), from the repository root on the device:
#   bash docs/perf-run19/run.sh          (writes under $OUT)
# ~9 minutes on one H100 / H200: (1) the GPU tests of the decode-step capture and of the rope kernels (~1.5 min);
# (2) exp.py ab: the compiled batch-1 step with W_uk's product in the rope-cache kernel or not, the LongCat layer
# and GLM-4.7-Flash (~3 min); (3) bench's end-to-end batch-1 row, ours (`fast_compile`, with the fold where (2)
# measured it faster) and transformers' best setting (~4 min). If (3)'s compiled capture fails, (4) runs
# docs/perf-run18/probe_capture.py once (the 4-layer diagnostic) in what time is left.
set -u
OUT=${OUT:-/tmp/perf-run19}; mkdir -p "$OUT"; S=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
pip list 2>/dev/null | grep -iE "^(einops|torch|triton|transformers) "
t() { echo "t=$(( $(date +%s) - S )) s"; }
left() { echo $(( 575 - ($(date +%s) - S) )); }
timeout 150 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_kernel_rope.py tests/test_fast.py \
    -k "gpu or capture or compiled_generate_on_cuda" > "$OUT/tests.log" 2>&1; echo "tests rc=$?"
grep -E "passed|failed|FAILED|Error" "$OUT/tests.log" | tail -8 | cut -c1-300; t
PYTHONPATH=. timeout 230 python docs/perf-run19/exp.py ab "$OUT/ab.json" > "$OUT/ab.log" 2>&1; echo "ab rc=$?"
grep -E "b1 |Error|error" "$OUT/ab.log" | tail -8 | cut -c1-300; t
FOLD=$(python - "$OUT/ab.json" <<'PY'
import json, sys
try:
    rows = {r["model"]: r["ours_s"] for r in json.load(open(sys.argv[1]))["rows"]}
    print(4 if rows["glm fold=4"] < rows["glm fold=0"] else 0)
except Exception:
    print(0)
PY
)
echo "e2e with FOLD_IN_ROPE_MAX_ROWS=$FOLD"
PYTHONPATH=. timeout $(left) python docs/perf-run19/exp.py bench --fold "$FOLD" -- --only e2e --batches 1 \
    --e2e-variants fast_compile,hf --json "$OUT/e2e.json" > "$OUT/e2e.log" 2>&1; echo "e2e rc=$?"
grep -v "^\s*$" "$OUT/e2e.log" | grep -iv warn | tail -14 | cut -c1-300; t
if grep -qiE "capturing the decode step|Traceback" "$OUT/e2e.log" && [ "$(left)" -gt 60 ]; then
    TORCH_LOGS=recompiles,graph_breaks PYTHONPATH=. timeout $(left) python docs/perf-run18/probe_capture.py \
        --layers 4 --hf --warmups 3 > "$OUT/probe.log" 2>&1; echo "probe rc=$?"
    grep -v "^\s*$" "$OUT/probe.log" | grep -iv warn | tail -20 | cut -c1-300; t
fi
