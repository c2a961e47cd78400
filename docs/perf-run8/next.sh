#!/usr/bin/env bash
# Prepared for the 2026-12-02 evening session, and run there: docs/perf-run9/README.md has the results.
#   1. the kernel tests on the GPU (the shared-expert slot has only run in Triton's interpreter), then the compiled
#      batch-1 step with the shared expert folded into the fused MoE kernels
#   2. GLM end to end at batch 1, ours and transformers' best setting in the same run
#   3. batch 32 (transformers: grouped_mm; batched_mm runs out of memory there)
export PYTHONUNBUFFERED=1
timeout 120 python3 -m pytest -q -o addopts="" tests/test_kernel_moe.py tests/test_kernel_router.py tests/test_fast.py 2>&1 | tail -3; timeout 400 python3 -m longcat_ref.tools.bench --only b1 --b1-variants compiled_decode --json $OUT/b1.json 2>&1 | grep -E "^  b1"
timeout 580 python3 -m longcat_ref.tools.bench --only e2e --batches 1 --e2e-variants fast_compile,hf --json $OUT/e2e1.json 2>&1 | grep -E "e2e|transformers"
timeout 580 python3 -m longcat_ref.tools.bench --only e2e --batches 32 --e2e-variants fast,fast_compile,hf --hf-experts grouped_mm --json $OUT/e2e32.json 2>&1 | grep -E "e2e|transformers"
