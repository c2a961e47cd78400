#!/usr/bin/env bash
# GPU run 1 of 2026-12-01 (one H200): the kernels' GPU tests, then batch-1 decode with and without them.
export PYTHONUNBUFFERED=1
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
# pyproject's addopts need nbval (not on the GPU image): run the .py tests without them
timeout 300 python3 -m pytest -o addopts="" -q -x -ra tests/test_kernel_moe.py tests/test_kernel_mla.py tests/test_fp8_keep.py 2>&1 | tail -25
timeout 120 python3 -m pytest -o addopts="" -q -ra tests/test_core.py tests/test_fast.py -k "cuda or fused or CUDA" 2>&1 | tail -6
timeout 240 python3 -m longcat_ref.tools.bench --only b1 --b1-variants graph,graph_fused,graph_fused_mla --json $OUT/b1.json 2>&1 | grep -v Warning | tail -12
