#!/bin/bash
# perf-run17 call 1: GPU tests of the skinny kernel and the router, then GLM-4.7-Flash's (and a LongCat layer's)
# compiled batch-32 step with the router's logits in the skinny kernel (linear="auto", the default) and, in the
# same lease, with them in cuBLAS (router.SKINNY_LOGITS_MAX_TOKENS = 0): the A/B.
set -x
export PYTHONPATH=.
python -m pytest -o addopts="" -W ignore -p no:logging -q tests/test_kernel_skinny.py tests/test_kernel_router.py 2>&1 | tail -4
python -m longcat_ref.tools.bench --only b1 --b1-batch 32 --b1-variants compiled_decode --json $OUT/b32_router_skinny.json 2>&1 | grep -v "^ *$" | tail -25
python -c "
import sys
from longcat_ref.model import router as R
R.SKINNY_LOGITS_MAX_TOKENS = 0
from longcat_ref.tools import bench
sys.exit(bench.main(['--only', 'b1', '--b1-batch', '32', '--b1-variants', 'compiled_decode', '--json', '$OUT/b32_router_cublas.json']))
" 2>&1 | grep -v "^ *$" | tail -25
