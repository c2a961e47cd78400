"""Time the routed experts' forms against the number of tokens: where each form wins, on this GPU.

    python -m longcat_ref.tools.bench_experts                        # GLM-4.7-Flash's bank, 1..256 tokens
    python -m longcat_ref.tools.bench_experts --case longcat --tokens 1,8,32 --json experts.json

For each case (a model's routed-expert bank at full size, bf16, random values: only the bytes matter) and each
token count n, it times `Experts.forward` in each form on n tokens routed to k distinct experts each:

    fused          kernels/moe_decode.py: one program per (token, slot) pair and tile, each pair's expert read
                   in place (an expert chosen by two tokens is read twice, from L2 if the two are close in time)
    grouped        the pairs sorted by expert, two torch._grouped_mm (cuBLAS/CUTLASS): each expert read once
    grouped_triton the same sort, kernels/grouped_gemm.py's Triton grouped GEMM instead of torch._grouped_mm
                   (`Forms(experts=...)` names these forms; "auto" chooses among them by this table)
    gather         each pair's expert gathered into a (n, k, 2I, H) copy, then batched matmuls (small n only)

Each timing replays a CUDA graph of R calls whose routings differ (R random draws), so the weights come from
memory, not from L2, as in a decode step. It prints microseconds per call and the bandwidth that is (bytes of the
distinct experts the routing touched / time). This is what `Experts.choose` rests on. A script that prints what it
measured: nothing is asserted. CUDA only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from .tune_moe import graph_us

CASES = {  # name: (E experts, hidden H, expert width I, k slots)
    "glm": (64, 2048, 1536, 4),
    "longcat": (512, 6144, 2048, 12),
}
FORMS = ("fused", "grouped", "grouped_triton", "gather")
GATHER_MAX_PAIRS = 64  # the gather form copies n * k experts: beyond this it is neither fast nor small


def time_form(experts, form, n, k, repeats, trials=5, seed=0):
    """(microseconds per call, mean distinct experts touched per call) from a CUDA graph of `repeats` calls."""
    E, H = experts.n_local, experts.gate_up_proj.shape[2]
    device, dtype = experts.gate_up_proj.device, experts.gate_up_proj.dtype
    dtype = torch.bfloat16 if experts.fp8 else dtype  # a kept-FP8 bank multiplies bf16 activations
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, H, device=device, generator=g).to(dtype)
    w = torch.rand(n, k, device=device, generator=g)
    idxs = [torch.rand(n, E, device=device, generator=g).topk(k, dim=-1).indices for _ in range(repeats)]
    out = torch.zeros(n, H, device=device, dtype=dtype)
    touched = sum(i.unique().numel() for i in idxs) / repeats

    def run():
        for idx in idxs:
            experts(x, w, idx, out, impl=form)

    return graph_us(run, repeats, trials), touched


def bench_case(name, tokens, forms, repeats, deadline):
    from longcat_ref.model.experts import Experts

    E, H, I, k = CASES[name]
    with torch.device("cuda"):
        experts = Experts(E, H, I).to(torch.bfloat16).requires_grad_(False)
    experts.gate_up_proj.uniform_(-0.05, 0.05), experts.down_proj.uniform_(-0.05, 0.05)
    per_expert = (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()) * 2  # bytes
    rows = []
    for n in tokens:
        for form in forms:
            if form == "gather" and n * k > GATHER_MAX_PAIRS:
                continue
            if time.monotonic() > deadline:
                print(f"  {name}: time limit reached, cut", flush=True)
                return rows
            try:
                us, touched = time_form(experts, form, n, k, repeats)
            except Exception as e:  # e.g. out of memory: report it and go on
                print(f"  {name} n={n:4d} {form:15s}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                torch.cuda.empty_cache()
                continue
            row = dict(case=name, tokens=n, form=form, us=us, experts_touched=touched,
                       tb_s=touched * per_expert / (us * 1e-6) / 1e12)
            rows.append(row)
            print(f"  {name} n={n:4d} {form:15s}: {us:8.1f} us  ({touched:5.1f} experts, {row['tb_s']:.2f} TB/s)",
                  flush=True)
    del experts
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m longcat_ref.tools.bench_experts", description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="glm", help=f"comma-separated, of {', '.join(CASES)} (default: glm)")
    ap.add_argument("--tokens", default="1,4,8,16,32,64,128,256", help="comma-separated token counts")
    ap.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated, of {', '.join(FORMS)}")
    ap.add_argument("--repeats", type=int, default=8, help="calls per CUDA graph, each with its own routing")
    ap.add_argument("--time-limit", type=float, default=300, help="seconds; the sweep stops after this")
    ap.add_argument("--json", default=None, help="write the rows to this file")
    args = ap.parse_args(argv)
    cases, forms = args.case.split(","), args.forms.split(",")
    bad = [c for c in cases if c not in CASES] + [f for f in forms if f not in FORMS]
    if bad:
        print(f"error: unknown case or form {bad}; cases: {', '.join(CASES)}; forms: {', '.join(FORMS)}",
              file=sys.stderr)
        return 2
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        tokens = []
    if not tokens or min(tokens) < 1:
        print(f"error: --tokens {args.tokens!r}: give comma-separated positive integers, e.g. 1,8,32", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: bench_experts times CUDA kernels and needs a GPU", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.time_limit
    res = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
               device=torch.cuda.get_device_name(), rows=[])
    for name in cases:
        res["rows"] += bench_case(name, tokens, forms, args.repeats, deadline)
        if args.json:
            json.dump(res, open(args.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
