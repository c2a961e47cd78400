import json, os, torch
from longcat_ref.model import generate
from longcat_ref.tools import bench
ceil = bench.machine_ceilings("cuda"); rows = []
_, _, layer = bench.longcat_layer("cuda", torch.bfloat16, 4096, False)
for r in range(2):
    for pdl in (0, 1):
        generate.DECODE_INDUCTOR_OPTIONS["triton.enable_pdl"] = bool(pdl); generate._COMPILED.clear(); torch._dynamo.reset()
        bench.b1_rows(layer.requires_grad_(False), f"longcat_layer pdl={pdl} round={r}", 1024, "cuda", ceil, rows, ["compiled_decode"])
json.dump(rows, open(os.environ["OUT"] + "/lc.json", "w"), indent=1)
