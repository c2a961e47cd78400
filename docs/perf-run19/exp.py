"""perf-run19 experiments: W_uk's product inside the rope-cache kernel (rope "fused_uk", kernels/rope_cache.py
`rope_cache_fold_write`) against its own cuBLAS bmm after the rope-cache kernel (rope "fused"), for this process
only, through `mla.FOLD_IN_ROPE_MAX_ROWS` (the query tokens of a batch up to which rope "auto" folds). Not part of
the package.

  ab OUT.json [--folds 0,4]   the compiled batch-1 decode step (bench's `compiled_decode` variant) of the LongCat
                              layer (ctx 1k) and of GLM-4.7-Flash (ctx 128), once per value, in one process: the
                              same weights, dynamo reset between rows
  bench --fold N -- ARGS...   `python -m longcat_ref.tools.bench ARGS...` with FOLD_IN_ROPE_MAX_ROWS = N

usage: PYTHONPATH=. python docs/perf-run19/exp.py ab OUT.json
       PYTHONPATH=. python docs/perf-run19/exp.py bench --fold 4 -- --only e2e --batches 1 --json OUT.json
"""
import argparse
import json
import sys
import time

import torch

from longcat_ref.model import mla
from longcat_ref.tools import bench

ap = argparse.ArgumentParser()
sub = ap.add_subparsers(dest="cmd", required=True)
p_ab = sub.add_parser("ab")
p_ab.add_argument("out")
p_ab.add_argument("--folds", default="0,4")
p_b = sub.add_parser("bench")
p_b.add_argument("--fold", type=int, required=True)
p_b.add_argument("rest", nargs=argparse.REMAINDER)
a = ap.parse_args()

if a.cmd == "bench":
    mla.FOLD_IN_ROPE_MAX_ROWS = a.fold
    print(f"perf-run19: FOLD_IN_ROPE_MAX_ROWS={mla.FOLD_IN_ROPE_MAX_ROWS}", flush=True)
    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    sys.exit(bench.main(rest))

device, dtype = "cuda", torch.bfloat16
ceil = bench.machine_ceilings(device)
folds = [int(f) for f in a.folds.split(",")]
res = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__, machine=ceil, rows=[])
_, _, layer = bench.longcat_layer(device, dtype, 4096, False)
for f in folds:
    mla.FOLD_IN_ROPE_MAX_ROWS = f
    bench.b1_rows(layer.requires_grad_(False), f"longcat_layer fold={f}", 1024, device, ceil, res["rows"],
                  ["compiled_decode"])
del layer
torch.cuda.empty_cache()
with torch.device("meta"):
    glm = bench.CausalLM(bench.glm_4_7_flash()).to(dtype)
glm = glm.to_empty(device=device).eval().requires_grad_(False)
bench.synth_(glm)
for f in folds:
    mla.FOLD_IN_ROPE_MAX_ROWS = f
    bench.b1_rows(glm, f"glm fold={f}", 128, device, ceil, res["rows"], ["compiled_decode"])
    json.dump(res, open(a.out, "w"), indent=1)
json.dump(res, open(a.out, "w"), indent=1)
