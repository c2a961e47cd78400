#!/usr/bin/env bash
# Prepared for the next one-H200 session (not run yet): what this session's device time did not reach. Each line
# is one device call (10 minutes at most).
#   1. LongCat layer + GLM: the DECODE forms with the 16M-element gemv cap against the same with cuBLAS projections,
#      in one run (the capped LongCat step was never timed)
#   2. GLM end to end at batch 1, ours and transformers' best setting in the same run
#   3. the same at batch 32 (transformers: grouped_mm; batched_mm runs out of memory there)
#   4. the tuned GLM step (compile="tuned"), cut by its time limit this session
export PYTHONUNBUFFERED=1
timeout 560 python3 -m longcat_ref.tools.bench --only b1 --b1-variants compiled_decode,compiled_decode_cublas --json $OUT/b1.json 2>&1 | grep -E "^  b1"
timeout 580 python3 -m longcat_ref.tools.bench --only e2e --batches 1 --e2e-variants fast_compile,hf --json $OUT/e2e1.json 2>&1 | grep -E "e2e|transformers"
timeout 580 python3 -m longcat_ref.tools.bench --only e2e --batches 32 --e2e-variants fast,fast_compile,hf --hf-experts grouped_mm --json $OUT/e2e32.json 2>&1 | grep -E "e2e|transformers"
timeout 580 python3 -m longcat_ref.tools.bench --only b1 --b1-variants tuned_decode --json $OUT/b1_tuned.json 2>&1 | grep -E "^  b1"
