"""Time one decode token's dense projections every way we have: cuBLAS, inductor's reduction, our GEMV kernel's tiles.

    python -m longcat_ref.tools.tune_gemv                        # GLM-4.7-Flash's six per-layer reads
    python -m longcat_ref.tools.tune_gemv --model longcat --json gemv.json
    python -m longcat_ref.tools.tune_gemv --shapes q_a,o_proj --no-sweep
    python -m longcat_ref.tools.tune_gemv --narrow                # one- and two-warp programs of 1-4 rows

For each weight a layer reads at batch 1 (q_a, kv_a, q_b, o_proj; MLA's per-head W_uk and W_uv products; LongCat's
dense SwiGLU too) it times, on the same data:

* `cublas`: F.linear (the "plain" form; the per-head products as torch.bmm);
* `inductor`: the "gemv" form (multiply-and-sum in fp32) under torch.compile, as the compiled decode step runs it;
  `inductor_tuned` the same with inductor's coordinate-descent tuning (what compile="tuned" turns on);
* `ours`: kernels/gemv.py with `choose_tiles`' heuristic, then (unless --no-sweep) a sweep of its row tile,
  chunk, split and warps.

Each timing replays a CUDA graph that runs the product on `copies` different weights (enough to exceed the L2
cache), so the weights come from memory as in a real step; microseconds per product and the bandwidth that is
(weight bytes / time). Our kernel is timed without the sum over its splits (in the compiled step that sum fuses into
the next kernel). A script that prints what it measured: nothing is asserted. CUDA only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from ..model.config import glm_4_7_flash, longcat_flash_chat
from .tune_moe import graph_us

L2_BYTES = 256 * 2**20  # the copies of a weight span at least this much memory (an H200's L2 is 50 MB)
SWEEP = dict(block_n=(4, 8, 16, 32), block_k=(128, 256, 512, 1024), split=(1, 2, 4, 8, 16), warps=(4, 8))
# --narrow: one-warp programs of 1-4 rows with long column runs (what won for the fused MoE kernels' single token,
# docs/perf-run12/: the first sweep above started at 4 rows and 4 warps); none fit W_uk's sum over 192 strided rows
NARROW = dict(block_n=(1, 2, 4), block_k=(512, 1024, 2048), split=(1, 2, 4), warps=(1, 2))


def shapes(cfg, dense: bool = False) -> dict:
    """name -> (G matrices, N rows, K columns, reduction over a non-contiguous axis) of one decode layer's reads;
    dense: the dense SwiGLU's gate (= up) and down too (LongCat-Flash: two in every layer; GLM's is layer 0's)."""
    h, nope, v, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    out = dict(q_a=(1, cfg.q_lora_rank, cfg.hidden_size, False),
               kv_a=(1, r + cfg.qk_rope_head_dim, cfg.hidden_size, False),
               q_b=(1, h * (nope + cfg.qk_rope_head_dim), cfg.q_lora_rank, False),
               w_uk=(h, r, nope, True), w_uv=(h, v, r, False),
               o_proj=(1, cfg.hidden_size, h * v, False))
    if dense:
        out.update(dense_gate=(1, cfg.ffn_hidden_size, cfg.hidden_size, False),
                   dense_down=(1, cfg.hidden_size, cfg.ffn_hidden_size, False))
    return out


def make(G, N, K, transposed, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    nbytes = G * N * K * torch.finfo(dtype).bits // 8
    copies = max(4, min(64, math.ceil(L2_BYTES / nbytes)))
    ws = []
    for _ in range(copies):
        w = torch.empty(G, K, N, device=device, dtype=dtype) if transposed else torch.empty(G, N, K, device=device,
                                                                                             dtype=dtype)
        w.uniform_(-0.05, 0.05, generator=g)
        ws.append(w.transpose(1, 2) if transposed else w)  # (G, N, K), strided as the model holds it
    x = torch.randn(G, 1, K, device=device, dtype=dtype, generator=g)  # one token
    return x, ws, nbytes


def contenders(x, ws, tuned_ok=True):
    """name -> run() over all copies, for the baselines."""
    G = x.shape[0]

    def cublas():
        for w in ws:
            F.linear(x[0], w[0]) if G == 1 else torch.bmm(x, w.transpose(1, 2))

    def reduction(w):  # the "gemv" form: (G, 1, K) x (G, N, K) -> (G, 1, N), fp32 products and sum
        return (x.float()[:, :, None, :] * w.float()[:, None]).sum(-1).to(x.dtype)

    out = {"cublas": cublas}
    for name, opts in (("inductor", {}), ("inductor_tuned", {"coordinate_descent_tuning": True})):
        if name == "inductor_tuned" and not tuned_ok:
            continue
        torch._dynamo.reset()
        f = torch.compile(reduction, fullgraph=True, dynamic=False, options=opts)
        f(ws[0])  # compile (and tune) outside the capture

        def run(f=f):
            for w in ws:
                f(w)
        out[name] = run
    return out


def ours(x, ws, tiles, warps):
    from ..kernels.gemv import _gemv_op

    def run():
        for w in ws:
            _gemv_op(x, w, *tiles, warps)
    return run


def sweep_configs(G, N, K, transposed, narrow=False):
    from ..kernels.gemv import choose_tiles

    bm = choose_tiles(G, 1, N, K, not transposed)[0]
    for bn, bk, split, warps in itertools.product(*(NARROW if narrow else SWEEP).values()):
        if bn > max(4, 2 ** math.ceil(math.log2(N))) or bk > max(16, 2 ** math.ceil(math.log2(K))):
            continue
        if bm * bn * bk > 16384:  # registers
            continue
        k_split = math.ceil(math.ceil(K / split) / bk) * bk
        if math.ceil(K / k_split) != split:
            continue  # this split leaves an empty one
        yield (bm, bn, bk, k_split, split), warps


def tune(name, G, N, K, transposed, sweep, deadline, tuned_ok, narrow=False):
    from ..kernels.gemv import NUM_WARPS, choose_tiles

    x, ws, nbytes = make(G, N, K, transposed, torch.bfloat16, "cuda")
    rows = []

    def record(kind, run, tiles=None, warps=None):
        us = graph_us(run, len(ws))
        row = dict(shape=name, G=G, N=N, K=K, kind=kind, us=us, tb_s=nbytes / (us * 1e-6) / 1e12)
        if tiles:
            row.update(tiles=list(tiles), warps=warps)
        rows.append(row)
        extra = f" tiles(M,N,K,K_SPLIT,SPLIT)={tuple(tiles)} warps={warps}" if tiles else ""
        print(f"  {name:10s} {kind:15s} {us:8.2f} us ({row['tb_s']:.2f} TB/s){extra}", flush=True)

    for kind, run in contenders(x, ws, tuned_ok).items():
        record(kind, run)
    base = choose_tiles(G, 1, N, K, not transposed)
    record("ours", ours(x, ws, base, NUM_WARPS), base, NUM_WARPS)
    if sweep:
        for tiles, warps in sweep_configs(G, N, K, transposed, narrow):
            if time.monotonic() > deadline:
                print(f"  {name}: time limit reached, sweep cut", flush=True)
                break
            record("ours_sweep", ours(x, ws, tiles, warps), tiles, warps)
    del ws
    torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="glm", choices=("glm", "longcat"), help="whose projection shapes")
    ap.add_argument("--shapes", default=None, help="comma-separated subset (default: all of the model's)")
    ap.add_argument("--no-sweep", action="store_true", help="baselines and the heuristic only")
    ap.add_argument("--no-tuned", action="store_true", help="skip inductor's coordinate-descent tuning")
    ap.add_argument("--time-limit", type=float, default=480.0, help="seconds; the sweeps stop after this")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--narrow", action="store_true", help="sweep one- and two-warp programs of 1-4 rows instead")
    args = ap.parse_args(argv)
    table = shapes(glm_4_7_flash(), dense=False) if args.model == "glm" else shapes(longcat_flash_chat(), dense=True)
    names = list(table) if not args.shapes else [s for s in args.shapes.split(",") if s]
    for n in names:
        if n not in table:
            sys.exit(f"tune_gemv: unknown shape {n!r} for {args.model}; choose from {', '.join(table)}")
    if not torch.cuda.is_available():
        sys.exit("tune_gemv: needs a CUDA GPU (the kernels' timings mean nothing elsewhere)")
    deadline = time.monotonic() + args.time_limit
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}; {args.model}, one token, bf16; "
          f"microseconds per product", flush=True)
    rows = []
    with torch.no_grad():
        for n in names:
            rows += tune(n, *table[n], not args.no_sweep, deadline, not args.no_tuned, args.narrow)
    print("best per shape:")
    for n in names:
        got = [r for r in rows if r["shape"] == n]
        best = {k: min((r for r in got if r["kind"].startswith(k)), key=lambda r: r["us"], default=None)
                for k in ("cublas", "inductor", "ours")}
        print(f"  {n:10s} " + ", ".join(f"{k} {b['us']:.2f} us ({b['tb_s']:.2f} TB/s)" for k, b in best.items() if b)
              + (f"; ours best tiles={tuple(best['ours']['tiles'])} warps={best['ours']['warps']}"
                 if best["ours"] else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, model=args.model,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
