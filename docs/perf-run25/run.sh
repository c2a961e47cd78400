#!/usr/bin/env bash
# perf-run25's device command: the GPU checks (the MoE kernel tests; exp.py gpu), exp.py's compiled batch-1 A/B
# (one round), then bench's end-to-end batch-1 rows (ours fast_compile with the A/B's fastest setting, and
# transformers' best) with the time left.   bash docs/perf-run25/run.sh [LIMIT_S]
set -u
OUT=${OUT:-/tmp/perf-run25}; mkdir -p "$OUT"; S=$(date +%s)
LIMIT=${1:-560}
left() { echo $(( LIMIT - ($(date +%s) - S) )); }
t() { echo "t=$(( $(date +%s) - S )) s"; }
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
[ "${SKIP_TESTS:-0}" = 1 ] || timeout 45 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_kernel_moe.py > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests.log" | tail -6 | cut -c1-300; t
PYTHONPATH=. timeout 60 python docs/perf-run25/exp.py gpu > "$OUT/check.log" 2>&1
echo "check rc=$?"; tail -8 "$OUT/check.log" | cut -c1-300; t
PYTHONPATH=. timeout $(( $(left) - 5 )) python docs/perf-run25/exp.py ab "$OUT/ab.json" 1 > "$OUT/ab.log" 2>&1
echo "ab rc=$?"; grep -E "b1 |critical|perf-run25 ab: logits|Error|error" "$OUT/ab.log" | tail -14 | cut -c1-500; t
MODE=$(python - "$OUT/ab.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
best = min(rows, key=lambda r: r["ours_s"])["settings"]
print("none" if not best["fold"] else ("e2e_preload" if best["preload_shared"] else "e2e"))
PY
)
echo "e2e mode: $MODE, $(left) s left"
if [ "$(left)" -lt 250 ]; then
  echo "e2e skipped: too little time left"; exit 0
elif [ "$MODE" = "none" ]; then
  timeout $(( $(left) - 5 )) python -m longcat_ref.tools.bench --only e2e --batches 1 --e2e-variants fast_compile,hf \
      --json "$OUT/e2e.json" > "$OUT/e2e.log" 2>&1
else
  PYTHONPATH=. timeout $(( $(left) - 5 )) python docs/perf-run25/exp.py "$MODE" "$OUT/e2e.json" > "$OUT/e2e.log" 2>&1
fi
echo "e2e rc=$?"; grep -E "tok/s|first|Error|perf-run25" "$OUT/e2e.log" | tail -8 | cut -c1-300; t
