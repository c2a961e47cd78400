"""Experiments (one GPU), not the package: `PYTHONPATH=. python docs/perf-run17/exp.py --part router_ab`.

Prepared on 2026-12-06 for the next device session; on a GPU it has not run yet (no device could be started that
day). `--device cpu` runs the same steps on the tiny GLM config, to check the plumbing only.

router_ab: GLM-4.7-Flash's compiled decode step (bench's `compiled_decode` forms, batch 32 by default) twice in one
process, A/B/A/B: with the router's fp32 logits as today (linear="auto" -> "plain" past 4 tokens: the weight copied
to fp32, an fp32 GEMM) and with only the logits in kernels/skinny_gemm.py (docs/perf-run16/: alone at 32 tokens
5.4 vs 13.4 us with the partials' sum). The switch is a patch of `model/router.py`'s `resolve` inside this script,
never a package setting; if the step wins, the rule goes into the package with this run's numbers.
"""

import argparse
import json
import time

import torch

from longcat_ref.kernels import support
from longcat_ref.model import router as R
from longcat_ref.model.config import glm_4_7_flash, tiny_glm
from longcat_ref.model.linear import resolve as linear_resolve
from longcat_ref.model.model import CausalLM
from longcat_ref.tools import bench as B


def skinny_logits_resolve(form, x, weight_numel):
    """linear.resolve, except that "auto" sends the router's logits of 5-64 tokens to the skinny kernel."""
    f = linear_resolve(form, x, weight_numel)
    if form == "auto" and f == "plain" and support.can_run(x) and 4 < x[..., 0].numel() <= 64:
        return "skinny"
    return f


def router_ab(out, device, batch, rounds, save):
    small = device == "cpu"
    with torch.device("meta"):
        glm = CausalLM(tiny_glm() if small else glm_4_7_flash()).to(torch.bfloat16)
    glm = glm.to_empty(device=device).eval().requires_grad_(False)
    B.synth_(glm)
    for r in range(rounds):
        for label, fn in (("logits plain", linear_resolve), ("logits skinny", skinny_logits_resolve)):
            R.resolve = fn
            torch._dynamo.reset()
            t0 = time.perf_counter()
            t, dec = B.ours_decode(glm, batch, 128, device, **B.VARIANTS["compiled_decode"])
            row = dict(part="router_ab", round=r, label=label, batch=batch, ms=t * 1e3, tok_s=batch / t,
                       setup_s=time.perf_counter() - t0)
            if dec.graphs:
                row.update(B.kernel_stats(dec))
            out.append(row)
            print(f"  round {r} {label:14s}: {t * 1e3:.3f} ms = {batch / t:,.0f} tok/s, "
                  f"{row.get('kernels_per_step', '?')} kernels (set-up {row['setup_s']:.0f} s)", flush=True)
            del dec
            save()
    R.resolve = linear_resolve


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", default="router_ab", help="comma-separated: router_ab (default: %(default)s)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32, help="decode batch (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=2, help="A/B rounds, each compiles twice (default: %(default)s)")
    ap.add_argument("--out", default="exp.json", help="where the rows go (default: %(default)s)")
    a = ap.parse_args()
    rows = []
    save = lambda: json.dump(dict(torch=torch.__version__, rows=rows), open(a.out, "w"), indent=1)  # noqa: E731
    for part in a.part.split(","):
        {"router_ab": lambda o: router_ab(o, a.device, a.batch, a.rounds, save)}[part](rows)
    save()
