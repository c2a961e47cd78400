#!/usr/bin/env bash
# GPU run 5 of 2026-12-01 (one H200): GLM-4.7-Flash end to end, batch 1, with the DECODE forms' kernels (fast, and
# fast + compile). transformers' best setting was measured in perf-run5 on the same machine kind (75.8 tok/s).
export PYTHONUNBUFFERED=1
timeout 560 python3 -m longcat_ref.tools.bench --only e2e --batches 1 --e2e-variants fast,fast_compile --json $OUT/e2e.json 2>&1 | grep -E "e2e|tok/s|error|Error" | tail -8
