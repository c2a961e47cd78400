"""Experiments (one GPU), not the package: `PYTHONPATH=. python docs/perf-run17/exp.py --part router_ab`.

Prepared on 2026-12-06 for the next device session. `--device cpu` runs the same steps on the tiny GLM config, to
check the plumbing only.

router_ab: GLM-4.7-Flash's compiled decode step (bench's `compiled_decode` forms, batch 32 by default) twice in one
process, A/B/A/B: with the router's fp32 logits as today (linear="auto" -> "plain" past 4 tokens: the weight copied
to fp32, an fp32 GEMM) and with only the logits in kernels/skinny_gemm.py (docs/perf-run16/: alone at 32 tokens
5.4 vs 13.4 us with the partials' sum). The switch is a patch of `model/router.py`'s `resolve` inside this script,
never a package setting; if the step wins, the rule goes into the package with this run's numbers.

linear_ab: the same step compiled once per rule -- "cublas" (today), "small" (the router's logits and the products
with weights of up to 3.5M elements in the skinny kernel: GLM's q_a, kv_a, the shared expert's gate, up and down),
"small+o" (... and o_proj; q_b stays on cuBLAS: a tie alone) -- each decoder kept, then the captured steps timed
interleaved, `--rounds` times, so that the A/B needs no second compile.

prefill_ab: LongCat-Flash's one-layer prefill (bench's `longcat_layer`, 2k and 8k tokens) with the forms before
this change (attention "sdpa", experts and norm "auto": RoPE and SDPA's [nope | rope] concatenations as torch ops,
the router's fp32 GEMM) and with PREFILL (+ rope "auto": kernels/rope_qk.py; linear "auto": the router's logits as
a 16-bit product with fp32 output), and PREFILL with the router's selection in kernels/router.py ("PREFILL+route":
one program per token, against torch.topk's), eager and captured as a CUDA graph, interleaved, with the kernel
profile of each and the largest difference of their logits from "before".

router_mm: GLM-4.7-Flash's compiled batch-32 step with the router's logits as the fp32 GEMM (before) and as the
16-bit product with fp32 output (router.py's "auto" now), compiled once each, timed interleaved.
"""

import argparse
import dataclasses
import json
import time

import torch

from longcat_ref.kernels import support
from longcat_ref.model import linear as L
from longcat_ref.model import router as R
from longcat_ref.model.config import glm_4_7_flash, tiny_glm
from longcat_ref.model.forms import PREFILL, Forms
from longcat_ref.model.linear import resolve as linear_resolve
from longcat_ref.model.model import CausalLM
from longcat_ref.tools import bench as B


def skinny_logits_resolve(form, x, weight_numel):
    """linear.resolve, except that "auto" sends the router's logits of 5-64 tokens to the skinny kernel."""
    f = linear_resolve(form, x, weight_numel)
    if form == "auto" and f == "plain" and support.can_run(x) and 4 < x[..., 0].numel() <= 64:
        return "skinny"
    return f


def synth_glm(device):
    """GLM-4.7-Flash (the tiny GLM on the CPU) with bench's synthetic bf16 weights, on device."""
    with torch.device("meta"):
        glm = CausalLM(tiny_glm() if device == "cpu" else glm_4_7_flash()).to(torch.bfloat16)
    glm = glm.to_empty(device=device).eval().requires_grad_(False)
    B.synth_(glm)
    return glm


def compiled_step(glm, part, label, batch, device, out, save, round_=0):
    """Compile and capture bench's compiled_decode step under whatever is patched now; time it and profile it."""
    torch._dynamo.reset()
    t0 = time.perf_counter()
    t, dec = B.ours_decode(glm, batch, 128, device, **B.VARIANTS["compiled_decode"])
    row = dict(part=part, round=round_, label=label, batch=batch, ms=t * 1e3, tok_s=batch / t,
               setup_s=time.perf_counter() - t0)
    if dec.graphs:
        row.update(B.kernel_stats(dec))  # the patch still applied: the compiled step as captured
    out.append(row)
    print(f"  round {round_} {label}: {t * 1e3:.3f} ms = {batch / t:,.0f} tok/s, {row.get('kernels_per_step', '?')} "
          f"kernels (set-up {row['setup_s']:.0f} s)", flush=True)
    save()
    return dec


def replay_rounds(decs, part, batch, device, rounds, out, save):
    """Time the captured steps (label, Decoder) interleaved, `rounds` times: no recompiling."""
    for r in range(1, rounds + 1):
        for label, dec in decs:
            if not dec.graphs:  # the CPU (plumbing only): run_step would write past the cache's end
                continue
            dec.cache_position.fill_(128)  # back to the context's end: 61 replays stay inside the cache
            t = B.timed(dec.graph.replay, device, reps=3, inner=20, warmup=1)
            out.append(dict(part=part, round=r, label=label, batch=batch, ms=t * 1e3, tok_s=batch / t))
            print(f"  round {r} {label}: {t * 1e3:.3f} ms = {batch / t:,.0f} tok/s", flush=True)
        save()


def router_ab(out, device, batch, rounds, save):
    glm = synth_glm(device)
    for r in range(rounds):
        for label, fn in (("logits plain", linear_resolve), ("logits skinny", skinny_logits_resolve)):
            R.resolve = fn
            compiled_step(glm, "router_ab", label, batch, device, out, save, r)  # its decoder dropped
    R.resolve = linear_resolve

Q_B_NUMEL = 5120 * 768  # GLM-4.7-Flash's q_b: a tie alone (docs/perf-run16/), kept on cuBLAS in "small+o"


def numel_rule(cap, skip=()):
    """linear.resolve, except that "auto" sends a compiled product of 5-32 tokens whose weight has at most cap
    elements (and not one of skip) to the skinny kernel: a patch for this experiment, not a package setting."""
    def rule(form, x, weight_numel):
        f = linear_resolve(form, x, weight_numel)
        if (form == "auto" and f == "plain" and torch.compiler.is_compiling() and support.can_run(x)
                and 4 < x[..., 0].numel() <= 32 and weight_numel <= cap and weight_numel not in skip):
            return "skinny"
        return f
    return rule


def linear_ab(out, device, batch, rounds, save, budget_s=430):
    """Compile each rule once (its decoder kept), then time the captured steps interleaved, `rounds` times."""
    glm = synth_glm(device)
    rules = [("cublas", linear_resolve, linear_resolve),  # (label, linear.py's resolve, router.py's)
             ("small", numel_rule(3_500_000), skinny_logits_resolve),  # q_a, kv_a, shared gate/up/down, router
             ("small+o", numel_rule(11_000_000, (Q_B_NUMEL,)), skinny_logits_resolve)]  # ... and o_proj
    t_start, decs = time.perf_counter(), []
    for label, lin, rou in rules:
        if time.perf_counter() - t_start > budget_s:
            print(f"  {label}: skipped (time budget)", flush=True)
            continue
        L.resolve, R.resolve = lin, rou
        decs.append((label, compiled_step(glm, "linear_ab", label, batch, device, out, save)))
    L.resolve, R.resolve = linear_resolve, linear_resolve
    replay_rounds(decs, "linear_ab", batch, device, rounds, out, save)

OLD_PREFILL = Forms(attention="sdpa", experts="auto", norm="auto")  # PREFILL before kernels/rope_qk.py


def prefill_ab(out, device, rounds, save, tokens=(2048, 8192)):
    small = device == "cpu"
    ceil = B.machine_ceilings(device) if not small else dict(bf16_flops=1e12)
    out.append(dict(part="prefill_ab", machine=ceil))
    _, _, ours = B.longcat_layer(device, torch.bfloat16, 131072 + 4096, small)
    for t in ((128, 256) if small else tokens):
        ids = torch.randint(4, ours.config.vocab_size, (1, t), device=device)
        runs = {}
        with torch.no_grad():
            ours(ids, forms=OLD_PREFILL, logits_to_keep=1)
            fl = B.prefill_flops(ours, t)  # counts the experts the last forward routed to
            variants = [("before", OLD_PREFILL), ("PREFILL", PREFILL),
                        ("PREFILL+route", dataclasses.replace(PREFILL, router="fused"))]  # + the router's kernel
            for label, forms in variants:
                run = (lambda f: lambda: ours(ids, forms=f, logits_to_keep=1))(forms)  # noqa: E731
                y = run()
                runs[label] = dict(eager=run, graph=B.captured(run) if not small else run, y=y.float())
                row = dict(part="prefill_ab", tokens=t, label=label, profile=True)
                if not small:
                    row.update(B.kernel_stats(run))
                out.append(row)
            scale = runs["before"]["y"].abs().max().item()
            for r in range(rounds):
                for label in runs:
                    for how in ("eager", "graph"):
                        ts = B.timed(runs[label][how], device, reps=3)
                        diff = (runs[label]["y"] - runs["before"]["y"]).abs().max().item()
                        out.append(dict(part="prefill_ab", tokens=t, label=label, how=how, round=r, ms=ts * 1e3,
                                        flops_frac=fl / ts / ceil["bf16_flops"], logits_max_diff=diff,
                                        logits_max_abs=scale))
                        print(f"  prefill {t} {label:8s} {how:5s} round {r}: {ts * 1e3:.2f} ms "
                              f"({fl / ts / ceil['bf16_flops']:.1%} of the bf16 peak)", flush=True)
            for label in runs:
                diff = (runs[label]["y"] - runs["before"]["y"]).abs().max().item()
                print(f"  prefill {t}: logits max |{label} - before| = {diff:.3g} (max |logit| {scale:.3g})",
                      flush=True)
        save()
        del runs
        torch.cuda.empty_cache() if not small else None


def router_mm(out, device, batch, rounds, save):
    glm = synth_glm(device)
    decs = []
    for label, mm in (("fp32 GEMM", False), ("16-bit mm, fp32 out", True)):
        R.HAVE_MM_OUT_DTYPE = mm and hasattr(torch.ops.aten.mm, "dtype")
        decs.append((label, compiled_step(glm, "router_mm", label, batch, device, out, save)))
    R.HAVE_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")
    replay_rounds(decs, "router_mm", batch, device, rounds, out, save)

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", default="router_ab",
                    help="comma-separated: router_ab, linear_ab, prefill_ab, router_mm (default: %(default)s)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32, help="decode batch (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=2, help="A/B rounds, each compiles twice (default: %(default)s)")
    ap.add_argument("--out", default="exp.json", help="where the rows go (default: %(default)s)")
    a = ap.parse_args()
    rows = []
    save = lambda: json.dump(dict(torch=torch.__version__, rows=rows), open(a.out, "w"), indent=1)  # noqa: E731
    for part in a.part.split(","):
        {"router_ab": lambda o: router_ab(o, a.device, a.batch, a.rounds, save),
         "linear_ab": lambda o: linear_ab(o, a.device, a.batch, a.rounds, save),
         "prefill_ab": lambda o: prefill_ab(o, a.device, a.rounds, save),
         "router_mm": lambda o: router_mm(o, a.device, a.batch, a.rounds, save)}[part](rows)
    save()
