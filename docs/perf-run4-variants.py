"""Run 4a of the batch-1 work (2026-11-22, one H200): `PYTHONPATH=. python docs/perf-run4-variants.py`.

GLM batch-1 decode: CUDA graph vs compiled with gemv experts; the LongCat layer: graph, compiled with grouped /
gemv experts, with and without coordinate-descent tuning. Output: docs/perf-run4-variants.{json,log}. The call hit
its 10-minute limit before the last variant (GLM compiled + tuning), which run 4b measured. Its kernel counts of
compiled variants are wrong: kernel_stats then ran the step with grad enabled, a recompile (and autotuning) inside
the profile; fixed in bench.kernel_stats (no_grad) before run 4b. The timings are unaffected. Then
compile=True meant no tuning; with the later default (tuning on the GPU) the "compiled_*" variants are tuned."""
import json, os, sys, time, traceback
import torch
from longcat_ref import CausalLM
from longcat_ref.tools.bench import ours_decode, kernel_stats, synth_, longcat_layer, decode_roofline
from longcat_ref.model.config import glm_4_7_flash

OUT = os.environ.get("OUT", ".")
res = {"torch": torch.__version__}
dump = lambda: json.dump(res, open(f"{OUT}/perf-run4-variants.json", "w"), indent=1, default=str)
dev, dt = "cuda", torch.bfloat16
ceil = dict(bandwidth_Bps=4.245e12, bf16_flops=7.6e14)


def run(tag, m, ctx, **kw):
    torch._dynamo.reset()
    t0 = time.perf_counter()
    try:
        t, dec = ours_decode(m, 1, ctx, dev, **kw)
        r = dict(ms=t * 1e3, tok_s=1 / t, wall_s=time.perf_counter() - t0)
        r.update(kernel_stats(dec))
        if "roofline" not in res.get(tag.split(":")[0], {}):
            r["roofline_ms"] = decode_roofline(m, 1, ctx, ceil)["roofline_s"] * 1e3
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


which = sys.argv[1:] or ["glm", "layer", "cdt"]
cfg = glm_4_7_flash()
if "glm" in which:
    with torch.device("meta"):
        m = CausalLM(cfg).to(dt)
    m = m.to_empty(device=dev).eval().requires_grad_(False)
    synth_(m)
    run("glm:graph", m, 128, experts="grouped")
    run("glm:compiled_gemv", m, 128, experts="gemv", compile=True)
    del m
    torch.cuda.empty_cache()
if "layer" in which:
    layer, rot, ours = longcat_layer(dev, dt, 4096)
    del layer
    ours.requires_grad_(False)
    run("layer:graph", ours, 1024, experts="grouped")
    run("layer:compiled_grouped", ours, 1024, experts="grouped", compile=True)
    run("layer:compiled_gemv", ours, 1024, experts="gemv", compile=True)
    run("layer:compiled_gemv_cdt", ours, 1024, experts="gemv",
        compile=dict(options={"coordinate_descent_tuning": True}))
    del ours
    torch.cuda.empty_cache()
if "cdt" in which:
    with torch.device("meta"):
        m = CausalLM(cfg).to(dt)
    m = m.to_empty(device=dev).eval().requires_grad_(False)
    synth_(m)
    run("glm:compiled_gemv_cdt", m, 128, experts="gemv", compile=dict(options={"coordinate_descent_tuning": True}))
print("DONE", flush=True)
