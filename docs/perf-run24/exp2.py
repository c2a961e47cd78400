"""perf-run24: why do the logits of two forms that agree to bf16 rounding alone (prefetch_gemv padded / split at
batch 1, cuBLAS / rows_gemm at batch 32) differ by 1.25 and 4.22 in the step? The hypothesis: a top-4 expert
choice flips on a rounding difference in some MoE layer. Here GLM-4.7-Flash's decode step runs EAGERLY (DECODE
forms, no compile, no graph) on the synthetic weights and bench's context, once per form; a hook keeps each layer's
output and each MoE block keeps its experts (last_idx). Printed per pair of forms: the first layer whose choice
differs, how many layers differ, the hidden state's relative difference before and after it, and the logits'.

usage: PYTHONPATH=. python docs/perf-run24/exp2.py OUT.json
"""
import json
import sys
import time

import torch

sys.path.insert(0, "docs/perf-run23")
import exp6  # noqa: E402  (patches _linear: exp6.ROWS[0] = True routes 5-32-token products to rows_gemm)

from longcat_ref.kernels import prefetch_gemv as P  # noqa: E402
from longcat_ref.model.forms import DECODE  # noqa: E402
from longcat_ref.model.generate import Decoder  # noqa: E402
from longcat_ref.model.moe import MoE  # noqa: E402
from longcat_ref.tools import bench  # noqa: E402

device, dtype = "cuda", torch.bfloat16
with torch.device("meta"):
    glm = bench.CausalLM(bench.glm_4_7_flash()).to(dtype)
glm = glm.to_empty(device=device).eval().requires_grad_(False)
bench.synth_(glm)
outs = []
for layer in glm.model.layers:
    layer.register_forward_hook(lambda m, a, o: outs.append(o.float().clone()))
moes = [m for m in glm.modules() if isinstance(m, MoE)]
res = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
           device=torch.cuda.get_device_name(), pairs=[])


def run(batch, split, rows):
    P.SPLIT, exp6.ROWS[0] = split, rows
    dec = Decoder(glm, batch, 256, compile=False, graphs=False, forms=DECODE)
    bench.fill_context(dec, 128)
    ids = torch.randint(4, glm.config.vocab_size, (batch,), device=device,
                        generator=torch.Generator(device).manual_seed(1))
    outs.clear()
    logits = dec.step(ids).float()
    return logits, [o for o in outs], [m.last_idx.sort(-1).values.clone() for m in moes]


first_moe = len(glm.model.layers) - len(moes)  # GLM: layer 0 is dense
for batch, a, b, what in [(1, (False, False), (False, False), "padded vs padded (determinism)"),
                          (1, (False, False), (True, False), "prefetch_gemv padded vs split"),
                          (32, (False, False), (False, False), "cuBLAS vs cuBLAS (determinism)"),
                          (32, (False, False), (False, True), "cuBLAS vs rows_gemm")]:
    la, ha, ia = run(batch, *a)
    lb, hb, ib = run(batch, *b)
    flips = [i for i, (x, y) in enumerate(zip(ia, ib)) if not torch.equal(x, y)]
    rel = [float((x - y).norm() / x.norm()) for x, y in zip(ha, hb)]
    f = flips[0] + first_moe if flips else None
    row = dict(what=what, batch=batch, moe_layers_with_a_different_choice=len(flips),
               first_layer_with_a_different_choice=f, hidden_rel_diff_per_layer=rel,
               tokens_with_a_different_choice=int(sum((x != y).any(-1).sum() for x, y in zip(ia, ib))),
               logits_max_abs=float((la - lb).abs().max()), logits_rel=float((la - lb).norm() / la.norm()))
    res["pairs"].append(row)
    before = rel[f - 1] if f else rel[-1]
    print(f"perf-run24 exp2: {what} (batch {batch}): {len(flips)} MoE layers choose differently, the first is "
          f"layer {f}; hidden rel diff {before:.2e} before it, {rel[-1]:.2e} at the last layer; logits max |diff| "
          f"{row['logits_max_abs']:.3f}, rel {row['logits_rel']:.2e}", flush=True)
    print("  hidden rel diff by layer: " + " ".join(f"{r:.0e}" for r in rel), flush=True)
    json.dump(res, open(sys.argv[1], "w"), indent=1)
