#!/usr/bin/env bash
# GPU run 3 of 2026-12-01 (one H200): the whole .py test suite on the GPU, then one LongCat layer bf16 vs FP8.
export PYTHONUNBUFFERED=1
timeout 300 python3 -m pytest -o addopts="" -q -ra -p no:cacheprovider tests/ 2>&1 | grep -E "passed|failed|FAILED|Error" | head -20
timeout 280 python3 -m longcat_ref.tools.bench --only fp8 --compile --json $OUT/fp8.json 2>&1 | grep -v -i warn | tail -14
