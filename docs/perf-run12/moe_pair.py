"""perf-run12: the fused MoE pair of kernels for a few chosen (tiles, warps), one decode token, timed as
`tools/tune_moe` times them (a CUDA graph of 16 launches with distinct experts, so the weights come from memory).
Not part of the package; prints what it measured.

usage: PYTHONPATH=. python docs/perf-run12/moe_pair.py [OUT.json]
"""
import json
import sys

import torch

from longcat_ref.kernels import moe_decode
from longcat_ref.tools import tune_moe

CONFIGS = [  # (tiles (BLOCK_I, BLOCK_H, BLOCK_O, BLOCK_K), warps (kernel 1, kernel 2)); None: the package's choice
    (None, None), ((16, 512, 8, 512), (4, 4)), ((1, 2048, 2, 512), (1, 1)), ((1, 2048, 2, 512), (2, 2)),
    ((2, 2048, 4, 512), (1, 1)), ((1, 2048, 8, 512), (1, 4)), ((16, 512, 2, 512), (4, 1)), ((4, 2048, 2, 512), (4, 1)),
]
rows = []
for name in ("glm_bf16_shared", "longcat_bf16"):
    case = tune_moe.make_case(name, "cuda", 16)
    E, H, I, k, _ = tune_moe.CASES[name]
    print(f"{name}: the package picks {moe_decode.choose_launch(1, k + name.endswith('_shared'), H, I)}", flush=True)
    for tiles, warps in CONFIGS:
        us = tune_moe.time_launch(case, tiles, warps, 16)
        rows.append(dict(case=name, tiles=tiles, warps=warps, us=us, tb_s=case[-1] / (us * 1e-6) / 1e12))
        print(f"  tiles={tiles} warps={warps}: {us:7.2f} us ({rows[-1]['tb_s']:.2f} TB/s)", flush=True)
    del case
    torch.cuda.empty_cache()
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
