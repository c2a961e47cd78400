"""Run 4b of the batch-1 work (2026-11-22, one H200): `PYTHONPATH=. python docs/perf-run4-b1-compiled.py`.

The new defaults at batch 1: the LongCat layer at ctx 1k and the full GLM at ctx 128, CUDA graph vs compiled
(gemv experts, coordinate-descent tuning). Output: docs/perf-run4-b1-compiled.{json,log}. The bench section
`python -m longcat_ref.tools.bench --only b1` times the same things through the same functions."""
import json, os, sys, time, traceback
import torch
from longcat_ref import CausalLM
from longcat_ref.tools.bench import ours_decode, kernel_stats, synth_, longcat_layer, decode_roofline, machine_ceilings
from longcat_ref.model.config import glm_4_7_flash

OUT = os.environ.get("OUT", ".")
res = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
dump = lambda: json.dump(res, open(f"{OUT}/perf-run4-b1-compiled.json", "w"), indent=1, default=str)
dev, dt = "cuda", torch.bfloat16
res["machine"] = ceil = machine_ceilings(dev)
print(ceil, flush=True)


def run(tag, m, ctx, **kw):
    torch._dynamo.reset()
    t0 = time.perf_counter()
    try:
        t, dec = ours_decode(m, 1, ctx, dev, **kw)
        r = dict(ms=t * 1e3, tok_s=1 / t, compile_capture_wall_s=time.perf_counter() - t0)
        r.update(kernel_stats(dec))
        rf = decode_roofline(m, 1, ctx, ceil)
        r.update(roofline_ms=rf["roofline_s"] * 1e3, over_roofline=t / rf["roofline_s"])
        res[tag] = r
        print(tag, {k: v for k, v in r.items() if k != "kernel_top"}, flush=True)
        for row in r["kernel_top"]:
            print("   ", row, flush=True)
        del dec
    except Exception:
        res[tag] = dict(error=traceback.format_exc()[-1500:])
        print(tag, "ERROR", res[tag]["error"], flush=True)
    dump()
    torch.cuda.empty_cache()


layer, rot, ours = longcat_layer(dev, dt, 4096)
del layer
ours.requires_grad_(False)
run("layer_b1_ctx1k:graph", ours, 1024, experts="grouped")
run("layer_b1_ctx1k:compiled", ours, 1024, compile=True)
del ours
torch.cuda.empty_cache()
with torch.device("meta"):
    m = CausalLM(glm_4_7_flash()).to(dt)
m = m.to_empty(device=dev).eval().requires_grad_(False)
synth_(m)
run("glm_b1:compiled", m, 128, compile=True)
run("glm_b1:graph", m, 128, experts="grouped")
print("DONE", flush=True)
