#!/usr/bin/env bash
# The device run this session could not make (docs/perf-run18/README.md), as one command for the next one:
#   bash docs/perf-run18/run.sh        (on the device, from the repository root; writes under $OUT)
# It needs docs/perf-run18/oldtree/longcat_ref, untracked (`git archive f923066 longcat_ref | tar -x -C
# docs/perf-run18/oldtree`, less its assets/tiny-longcat), so that it travels with the working tree.
# ~8 minutes on one H100 / H200: the GPU tests of the capture (~1 min), three 4-layer probes (~1 min each),
# then bench's end-to-end row (our compile ~2 min, transformers' ~1.5 min).
set -u
OUT=${OUT:-/tmp/perf-run18}; mkdir -p "$OUT"; S=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
pip list 2>/dev/null | grep -iE "^(einops|torch|triton|transformers) "
t() { echo "t=$(( $(date +%s) - S )) s"; }
timeout 120 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_fast.py \
    -k "capture or compiled_generate_on_cuda" > "$OUT/tests.log" 2>&1; echo "tests rc=$?"; tail -3 "$OUT/tests.log"; t
export TORCH_LOGS=recompiles,graph_breaks
probe() { n=$1; pp=$2; shift 2; echo "=== $n PYTHONPATH=$pp $*"; PYTHONPATH=$pp timeout 150 python \
    docs/perf-run18/probe_capture.py --layers 4 --hf "$@" > "$OUT/$n.log" 2>&1; echo "rc=$?"
    grep -v "^\s*$" "$OUT/$n.log" | grep -iv warn | tail -20 | cut -c1-300; t; }
probe A . --warmups 1
probe B . --warmups 3
[ -d docs/perf-run18/oldtree/longcat_ref ] && probe C docs/perf-run18/oldtree
unset TORCH_LOGS
PYTHONPATH=. timeout $(( 570 - ($(date +%s) - S) )) python -m longcat_ref.tools.bench --only e2e --batches 1 \
    --e2e-variants fast_compile,hf --json "$OUT/e2e.json" > "$OUT/e2e.log" 2>&1; echo "e2e rc=$?"
grep -v "^\s*$" "$OUT/e2e.log" | grep -iv warn | tail -15 | cut -c1-300; t
