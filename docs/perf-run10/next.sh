#!/usr/bin/env bash
# Prepared for the next one-H200 session (not run yet). Each line is one device call (10 minutes at most).
#   1. the GEMV question in isolation: every GLM-4.7-Flash batch-1 projection through cuBLAS, inductor's reduction
#      (plain and coordinate-descent tuned) and our kernel's tile sweep (tools/tune_gemv.py); LongCat's without
#      the sweep. If a tile beats inductor on most shapes: put it in kernels/gemv.choose_tiles and time
#      `--b1-variants compiled_decode_triton` again (call 7 of perf-run10: 4.916 ms against 4.428).
#   2. compile="tuned" end to end from a cold machine: its set-up against the 120 s target, its speed against
#      fast_compile's 227.9 tok/s (the tuning is what inductor's own reductions may lack: call 1's profile shows
#      GLM's projections at ~1.2-2.6 TB/s).
export PYTHONUNBUFFERED=1
timeout 420 python3 -m longcat_ref.tools.tune_gemv --model glm --time-limit 360 --json $OUT/gemv_glm.json 2>&1 | tail -9; timeout 150 python3 -m longcat_ref.tools.tune_gemv --model longcat --no-sweep --json $OUT/gemv_longcat.json 2>&1 | tail -9
timeout 580 python3 -m longcat_ref.tools.bench --only e2e --batches 1 --e2e-variants fast_compile_tuned,fast_compile --json $OUT/e2e1_tuned.json 2>&1 | grep -E "e2e b"
