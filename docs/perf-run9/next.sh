#!/usr/bin/env bash
# Prepared for the next one-H200 session (not run yet). Each line is one device call (10 minutes at most).
#   1. GPU tests (fast path, grouped GEMM, MoE and MLA kernels), then the compiled steps at batch 1 and 32, after three
#      changes not yet timed: the grouped GEMM's tile map outside its op (6de29b1), the MoE op's inputs made
#      contiguous outside it, the MLA merge kernel reading the chunks as one tile (208b7c2)
#   2. GLM end to end at batch 1, ours (with and without the captured prefill, prefill_graph=True) and transformers'
#      best setting in the same run
#   3. batch 32 (transformers: grouped_mm; batched_mm runs out of memory there)
#   4. (if the budget allows: the four calls take ~29 of the 30 minutes) the fused MoE tiles with the shared slot
#      (DECODE runs k + 1 = 5 slots for GLM; the tiles were swept with 4) and the expert forms at
#      prefill-sized token counts (is SHORT_GROUP_ROWS's switch back to torch._grouped_mm right there?)
export PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest -q -o addopts="" -W ignore tests/test_fast.py tests/test_kernel_grouped.py tests/test_kernel_moe.py tests/test_kernel_mla.py -k "cuda or gpu or in_place or expert_forms or opcheck or prefill_graph" 2>&1 | tail -2; timeout 200 python3 -m longcat_ref.tools.bench --only b1 --b1-variants compiled_decode --json $OUT/b1.json 2>&1 | grep -E "^  b1"; timeout 240 python3 -m longcat_ref.tools.bench --only b1 --b1-batch 32 --b1-variants compiled_decode --json $OUT/b32.json 2>&1 | grep -E "^  b1"
timeout 580 python3 -m longcat_ref.tools.bench --only e2e --batches 1 --e2e-variants fast_compile,fast_compile_pg,hf --json $OUT/e2e1.json 2>&1 | grep -E "e2e|transformers"
timeout 580 python3 -m longcat_ref.tools.bench --only e2e --batches 32 --e2e-variants fast_compile,fast_compile_pg,hf --hf-experts grouped_mm --json $OUT/e2e32.json 2>&1 | grep -E "e2e|transformers"
timeout 150 python3 -m longcat_ref.tools.tune_moe --cases glm_bf16_shared --time-limit 120 --json $OUT/tiles_shared.json 2>&1 | tail -4; timeout 90 python3 -m longcat_ref.tools.bench_experts --case glm,longcat --tokens 256,512,2048 --forms grouped,grouped_triton --time-limit 80 --json $OUT/experts_tall.json 2>&1 | grep -v Warn
