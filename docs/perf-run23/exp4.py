"""perf-run23 call 2: GLM-4.7-Flash's compiled batch-32 decode step with inductor's GEMM autotuning. At batch 32
the step's dense products (q_a, kv_a, q_b, W_uk / W_uv, o_proj, the shared expert, the router) are ~10 cuBLAS
launches a layer, ~58 us a layer on one H100's critical path for ~21 us of weights (call 1's b32_h100.json). With
max_autotune_gemm inductor times its own Triton GEMM templates against cuBLAS for each shape and keeps the faster
(the templates are Triton kernels: with triton.enable_pdl they may start during the kernel before them).

Rows (bench's b1 rows at batch 32, ctx 128, one process, the same weights): the step as shipped, then with
max_autotune_gemm (backends ATEN,TRITON), then as shipped again. Not part of the package.

usage: PYTHONPATH=. python docs/perf-run23/exp4.py OUT.json
"""
import json
import sys
import time

import torch

from longcat_ref.model import generate
from longcat_ref.tools import bench

if len(sys.argv) < 2:
    sys.exit(__doc__)
device, dtype = "cuda", torch.bfloat16
ceil = bench.machine_ceilings(device)
res = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__, machine=ceil, rows=[])
with torch.device("meta"):
    glm = bench.CausalLM(bench.glm_4_7_flash()).to(dtype)
glm = glm.to_empty(device=device).eval().requires_grad_(False)
bench.synth_(glm)
shipped = dict(generate.DECODE_INDUCTOR_OPTIONS)
tuned = dict(shipped, max_autotune_gemm=True, max_autotune_gemm_backends="ATEN,TRITON")
for name, opts in [("shipped", shipped), ("max_autotune_gemm", tuned), ("shipped again", shipped)]:
    generate.DECODE_INDUCTOR_OPTIONS.clear()
    generate.DECODE_INDUCTOR_OPTIONS.update(opts)
    generate._COMPILED.clear()
    torch._dynamo.reset()
    print(f"perf-run23 b32: {name}: {opts}", flush=True)
    bench.b1_rows(glm, f"glm {name}", 128, device, ceil, res["rows"], ["compiled_decode"], batch=32)
    res["rows"][-1]["inductor_options"] = opts
    json.dump(res, open(sys.argv[1], "w"), indent=1)
