"""perf-run22 experiments: the router's logits in its own kernel (kernels/router.py `route_logits`: the 64 x 2048
product and the top-k in one launch, the weight loaded before the dependent-launch wait), MLA's one-pass attention
with W_uv for a short cache (kernels/mla_decode.py ONE_PASS_MAX_SLOTS: one launch for the split and the merge) and
the MoE kernels' weight prefetch (moe_decode.PREFETCH_WEIGHTS), in GLM-4.7-Flash's compiled batch-1 decode step.
Not part of the package.

  ab OUT.json   the compiled batch-1 step at ctx 128 (bench's b1 rows: time, kernels, each kernel's cost on the
                critical path of one replay) in one process, the same weights, dynamo reset between rows:
                baseline (all three off), route_logits, + one-pass, + MoE weight prefetch, then the baseline and
                route_logits + one-pass again; and each row's logits for one
                fixed context and token against the first row's

usage: PYTHONPATH=. python docs/perf-run22/exp.py ab OUT.json
"""
import json
import sys
import time

import torch

from longcat_ref.kernels import mla_decode, moe_decode
from longcat_ref.model import generate
from longcat_ref.model import router as MR
from longcat_ref.tools import bench

REAL, ONE_PASS = MR.takes_prefetch, mla_decode.ONE_PASS_MAX_SLOTS


def settings(route_logits: bool, one_pass: bool, moe_prefetch: bool):
    """route_logits off: model/router.py never takes it (linear "auto" still takes the prefetch GEMV elsewhere);
    one_pass off: mla_decode's split + merge for every cache (ONE_PASS_MAX_SLOTS = 0)."""
    MR.takes_prefetch = REAL if route_logits else (lambda form, x, w: False)
    mla_decode.ONE_PASS_MAX_SLOTS = ONE_PASS if one_pass else 0
    moe_decode.PREFETCH_WEIGHTS = moe_prefetch
    generate._COMPILED.clear()
    torch._dynamo.reset()
    return dict(route_logits=route_logits, one_pass_max_slots=mla_decode.ONE_PASS_MAX_SLOTS,
                moe_prefetch=moe_prefetch)


if len(sys.argv) < 3 or sys.argv[1] != "ab":
    sys.exit(__doc__)
device, dtype = "cuda", torch.bfloat16
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
        ("route_logits, one-pass", (True, True, False)), ("route_logits, one-pass, moe prefetch", (True, True, True)),
        ("baseline, again", (False, False, False)), ("route_logits, one-pass, again", (True, True, False))]
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
