#!/usr/bin/env bash
# GPU run 4 of 2026-12-01 (one H200): the whole .py test suite on the GPU (log in tests.log), then compiled
# batch-1 decode with the reworked fused MoE kernels and the MLA kernel.
export PYTHONUNBUFFERED=1
timeout 230 python3 -m pytest -o addopts="" -q -ra -p no:cacheprovider tests/ > $OUT/tests.log 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" $OUT/tests.log | tail -15
timeout 330 python3 -m longcat_ref.tools.bench --only b1 --b1-variants compiled_fused_mla --json $OUT/b1.json 2>&1 | grep -E "^  b1|ms/step|  (glm|longcat)" | tail -6
