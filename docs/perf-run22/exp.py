"""perf-run22 experiments: the router's logits in its own kernel (kernels/router.py `route_logits`: the 64 x 2048
product and the top-k in one launch, the weight loaded before the dependent-launch wait), MLA's one-pass attention
with W_uv for a short cache (kernels/mla_decode.py ONE_PASS_MAX_SLOTS: one launch for the split and the merge) and
the MoE kernels' weight prefetch (moe_decode.PREFETCH_WEIGHTS), in GLM-4.7-Flash's compiled batch-1 decode step.
Not part of the package. The record of device calls 1 and 2: the tree of commit c8c4501 (call 2 with the next
commit's route_logits fix and the rows below), where the one-pass kernel, moe_decode.PREFETCH_WEIGHTS and
router.LOGITS_IN_KERNEL_AUTO existed as used here (since removed or renamed); exp3.py is call 3's.

  ab OUT.json   the compiled batch-1 step at ctx 128 (bench's b1 rows: time, kernels, each kernel's cost on the
                critical path of one replay) in one process, the same weights, dynamo reset between rows:
                call 1: baseline (all three off), route_logits, + one-pass, + MoE weight prefetch, then the
                baseline and route_logits + one-pass again (it stopped at the second row: a compile error);
                call 2: baseline, route_logits, + MoE weight prefetch, baseline, route_logits; and each row's
                logits for one fixed context and token against the first row's

  mla OUT.json  MLA's attention with W_uv alone at GLM-4.7-Flash's sizes (20 heads, r = 512, v = 256, batch 1, one
                query; S = 128, 224, 256 slots) and LongCat-Flash's (64 heads, v = 128; S = 128, 256), 50 calls
                captured in one CUDA graph: microseconds a call for the
                split + merge and for the one-pass kernel at (BLOCK_S, warps) = (16, 4), (32, 4), (32, 8), (64, 8);
                each output against the split + merge's. Prints the best one-pass tile as "best BLOCK_S WARPS".

  (ab reads ONE_PASS="BLOCK_S,WARPS" from the environment for the one-pass rows, default the package's.)

usage: PYTHONPATH=. python docs/perf-run22/exp.py mla OUT.json
       PYTHONPATH=. ONE_PASS=32,8 python docs/perf-run22/exp.py ab OUT.json
"""
import os
import json
import sys
import time

import torch

from longcat_ref.kernels import mla_decode, moe_decode
from longcat_ref.model import generate
from longcat_ref.model import router as MR
from longcat_ref.tools import bench

ONE_PASS = 256  # the one-pass rows' ONE_PASS_MAX_SLOTS (the package's default is 0 until measured)


def settings(route_logits: bool, one_pass: bool, moe_prefetch: bool):
    """route_logits: model/router.py's LOGITS_IN_KERNEL_AUTO (linear "auto" takes the prefetch GEMV elsewhere
    either way); one_pass off: mla_decode's split + merge for every cache (ONE_PASS_MAX_SLOTS = 0)."""
    MR.LOGITS_IN_KERNEL_AUTO = route_logits
    mla_decode.ONE_PASS_MAX_SLOTS = ONE_PASS if one_pass else 0
    moe_decode.PREFETCH_WEIGHTS = moe_prefetch
    generate._COMPILED.clear()
    torch._dynamo.reset()
    return dict(route_logits=route_logits, one_pass_max_slots=mla_decode.ONE_PASS_MAX_SLOTS,
                moe_prefetch=moe_prefetch)


if len(sys.argv) < 3 or sys.argv[1] not in ("ab", "mla"):
    sys.exit(__doc__)
device, dtype = "cuda", torch.bfloat16
if os.environ.get("ONE_PASS"):
    mla_decode.ONE_PASS_BLOCK_S, mla_decode.ONE_PASS_WARPS = (int(v) for v in os.environ["ONE_PASS"].split(","))
if sys.argv[1] == "mla":
    K = mla_decode
    g = torch.Generator(device).manual_seed(0)
    out, best = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
                     device=torch.cuda.get_device_name(), rows=[]), {}
    for h, v, S in [(20, 256, 128), (20, 256, 224), (20, 256, 256), (64, 128, 128), (64, 128, 256)]:
        q_lat, q_rope = (torch.randn(1, h, 1, n, device=device, generator=g).to(dtype) for n in (512, 64))
        latent = torch.randn(1, S, 512, device=device, generator=g).to(dtype)
        k_rope = torch.randn(1, S, 64, device=device, generator=g).to(dtype)
        bias = torch.zeros(1, 1, 1, S, device=device, dtype=dtype)
        bias[..., S - S // 8:] = torch.finfo(dtype).min  # the static cache's unwritten tail
        w_uv = (torch.randn(h, 192 + v, 512, device=device, generator=g) * 0.05).to(dtype)[:, 192:]
        ref = None
        for name, cfg in [("split", None), ("one_pass 16/4", (16, 4)), ("one_pass 32/4", (32, 4)),
                          ("one_pass 32/8", (32, 8)), ("one_pass 64/8", (64, 8))]:
            K.ONE_PASS_MAX_SLOTS = 0 if cfg is None else 256
            if cfg is not None:
                K.ONE_PASS_BLOCK_S, K.ONE_PASS_WARPS = cfg
            call = lambda: K.mla_decode(q_lat, q_rope, latent, k_rope, bias, 0.1, w_uv=w_uv)  # noqa: E731
            o = call()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(50):
                    call()
            graph.replay()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                graph.replay()
            torch.cuda.synchronize()
            us = (time.perf_counter() - t0) / 20 / 50 * 1e6
            ref = o if ref is None else ref
            diff = float((o.float() - ref.float()).abs().max())
            out["rows"].append(dict(heads=h, v=v, S=S, variant=name, us=us, max_abs_diff_vs_split=diff))
            print(f"perf-run22 mla: h={h} S={S} {name}: {us:.2f} us a call, max |diff| vs split {diff:.2e}",
                  flush=True)
            if cfg is not None and h == 20 and S == 256 and (not best or us < best["us"]):
                best = dict(us=us, cfg=cfg)
            del graph
    json.dump(out, open(sys.argv[2], "w"), indent=1)
    print(f"best {best['cfg'][0]} {best['cfg'][1]}")
    sys.exit(0)
ceil = bench.machine_ceilings(device)
res = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__, machine=ceil, rows=[])
with torch.device("meta"):
    glm = bench.CausalLM(bench.glm_4_7_flash()).to(dtype)
glm = glm.to_empty(device=device).eval().requires_grad_(False)
bench.synth_(glm)
ids = torch.randint(4, glm.config.vocab_size, (1,), device=device, generator=torch.Generator(device).manual_seed(1))
logits, kernel_stats = {}, bench.kernel_stats


def stats_and_logits(dec):  # b1_rows' profile of the step, then that step's logits for a fixed context and token
    out = kernel_stats(dec)
    bench.fill_context(dec, 128)
    logits[name] = dec.step(ids).float()
    return out


bench.kernel_stats = stats_and_logits
rows = [("baseline", (False, False, False)), ("route_logits", (True, False, False)),
        ("route_logits, moe prefetch", (True, False, True)), ("baseline, again", (False, False, False)),
        ("route_logits, again", (True, False, False))]
for name, kw in rows:
    s = settings(*kw)
    print(f"perf-run22 ab: {name}: {s}", flush=True)
    bench.b1_rows(glm, f"glm {name}", 128, device, ceil, res["rows"], ["compiled_decode"])
    res["rows"][-1]["settings"] = s
    json.dump(res, open(sys.argv[2], "w"), indent=1)
first = next(iter(logits.values()))
res["logits_max_abs_diff_vs_first"] = {k: float((v - first).abs().max()) for k, v in logits.items()}
res["argmax"] = {k: int(v.argmax()) for k, v in logits.items()}
print(f"perf-run22 ab: logits max |diff| vs the first row: {res['logits_max_abs_diff_vs_first']}", flush=True)
json.dump(res, open(sys.argv[2], "w"), indent=1)
