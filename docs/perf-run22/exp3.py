"""perf-run22 call 3: the MoE down kernel's weight prefetch alone (moe_decode.PREFETCH_DOWN; PREFETCH_SHARED off, as
call 2 measured it slower), GLM-4.7-Flash's compiled batch-1 step at ctx 128, off / on, two rounds, one process,
the same weights (bench's b1 rows: time, kernels, each kernel's cost on the critical path). Not part of the package.

usage: PYTHONPATH=. python docs/perf-run22/exp3.py OUT.json
"""
import json
import sys
import time

import torch

from longcat_ref.kernels import moe_decode
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
for r in range(2):
    for on in (False, True):
        moe_decode.PREFETCH_SHARED, moe_decode.PREFETCH_DOWN = False, on
        generate._COMPILED.clear()
        torch._dynamo.reset()
        name = f"glm down_prefetch={int(on)} round={r}"
        print(f"perf-run22 call 3: {name}", flush=True)
        bench.b1_rows(glm, name, 128, device, ceil, res["rows"], ["compiled_decode"])
        res["rows"][-1]["settings"] = dict(prefetch_down=on, prefetch_shared=False)
        json.dump(res, open(sys.argv[1], "w"), indent=1)
