#!/usr/bin/env bash
# perf-run21's device command (docs/perf-run21/README.md), from the repository root on the device:
#   bash docs/perf-run21/run.sh [LIMIT_S]          (writes under $OUT; LIMIT_S default 580)
# (1) the GPU tests of the MLA decode kernel (its cache prefetch among them), of the prefetch GEMV and of inductor's
# PDL in the compiled step; (2) exp.py ab: GLM-4.7-Flash's compiled batch-1 step with the cache prefetch off / on,
# 16-slot tiles, linear="prefetch"; (3) with the time left, bench's end-to-end batch-1 row of ours (fast_compile)
# with the fastest setting of (2).
set -u
OUT=${OUT:-/tmp/perf-run21}; mkdir -p "$OUT"; S=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
pip list 2>/dev/null | grep -iE "^(einops|torch|triton|transformers) "
t() { echo "t=$(( $(date +%s) - S )) s"; }
LIMIT=${1:-580}  # seconds this command may run (the device call's limit less a margin)
left() { echo $(( LIMIT - ($(date +%s) - S) )); }
timeout 200 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_kernel_mla.py \
    tests/test_kernel_prefetch_gemv.py tests/test_fast.py -k "gpu or cuda or inductor_pdl" > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests.log" | tail -12 | cut -c1-300; t
PYTHONPATH=. timeout $(( $(left) - 20 )) python docs/perf-run21/exp.py ab "$OUT/ab.json" > "$OUT/ab.log" 2>&1
echo "ab rc=$?"; grep -E "perf-run21|b1 |critical|Error|error" "$OUT/ab.log" | tail -14 | cut -c1-400; t
BEST=$(python - "$OUT/ab.json" <<'PY'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["rows"]
    s = min(rows, key=lambda r: r["ours_s"])["settings"]
    print(f"--pf {s['prefetch_tiles']} --tile {s['tile_bytes']} --uvmax {s['fused_uv_max_chunks']} "
          f"--linear {s['decode_linear']}")
except Exception:
    print("--pf 2")
PY
)
echo "e2e with: $BEST"
if [ "$(left)" -gt 150 ]; then
    PYTHONPATH=. timeout $(( $(left) - 3 )) python docs/perf-run21/exp.py bench $BEST -- --only e2e --batches 1 \
        --e2e-variants fast_compile --json "$OUT/e2e.json" > "$OUT/e2e.log" 2>&1; echo "e2e rc=$?"
    grep -v "^\s*$" "$OUT/e2e.log" | grep -iv warn | tail -6 | cut -c1-300; t
fi
