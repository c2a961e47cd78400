#!/usr/bin/env bash
# Prepared for the next session's one-H200 run (not run yet): the GPU checks this round could not make. Each line
# is one device call (a call may run 10 minutes at most).
#   1. the GPU paths' tests (make test-gpu), incl. the rewritten kept-FP8 test, the grouped GEMM and dequantize kernels
#   2. batch-1 decode: the previous round's compiled gemv step against the fused kernels, in the same run, with the
#      full kernel list of each step (kernel_all in the JSON)
#   3. one LongCat layer bf16 vs FP8 again (the FP8 prefill now goes through the grouped GEMM)
#   4. GLM-4.7-Flash end to end, ours (DECODE forms with the kernels) and transformers' best setting in the same run
export PYTHONUNBUFFERED=1
timeout 400 make test-gpu ARGS="-x -q" > $OUT/test_gpu.log 2>&1; tail -5 $OUT/test_gpu.log
timeout 500 python3 -m longcat_ref.tools.bench --only b1 --b1-variants compiled_gemv,compiled_decode,compiled_fused_mla --json $OUT/b1.json 2>&1 | grep -E "^  b1" 
timeout 400 python3 -m longcat_ref.tools.bench --only fp8 --compile --json $OUT/fp8.json 2>&1 | grep -E "fp8 section|fp8 vs"
timeout 580 python3 -m longcat_ref.tools.bench --only e2e --batches 1 --json $OUT/e2e.json 2>&1 | grep -E "e2e"
