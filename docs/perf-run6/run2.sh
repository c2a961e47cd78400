#!/usr/bin/env bash
# GPU run 2 of 2026-12-01 (one H200): the FP8 / fused GPU tests, then compiled batch-1 decode with the fused kernels.
export PYTHONUNBUFFERED=1
timeout 200 python3 -m pytest -o addopts="" -q -x tests/test_fp8_keep.py -k "gpu" 2>&1 | grep -E "Error|error|assert|^E " | head -30
timeout 400 python3 -m longcat_ref.tools.bench --only b1 --b1-variants compiled_fused_mla --json $OUT/b1c.json 2>&1 | grep -v -i warn | tail -6
