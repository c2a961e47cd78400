"""Experiments (one H200), not the package: `PYTHONPATH=. python docs/perf-run16/exp.py --part shapes,...`.

shapes: the dense products of a decode batch (GLM-4.7-Flash's and a LongCat-Flash layer's projections, the per-head
W_uk / W_uv products, the routers' fp32 logits) at 8-64 tokens: cuBLAS (F.linear / the einsum) against the skinny
kernel (kernels/skinny_gemm.py) with its tile rule, and a sweep of its tiles (target programs, BN, BK, stages) at 32
tokens. Each product runs 8 times in a CUDA graph over distinct weight copies (> 200 MB in all, so that no weight
is read from L2), the time a call = replay / 8.
"""

import argparse
import itertools
import json
import math

import torch
import torch.nn.functional as F

from longcat_ref.kernels import skinny_gemm as SK
from longcat_ref.tools import bench as B

# name: (G, N, K, k_contiguous, dtype of x and w, out dtype)
GLM = {
    "glm_q_a": (1, 768, 2048, True), "glm_kv_a": (1, 576, 2048, True), "glm_q_b": (1, 5120, 768, True),
    "glm_o_proj": (1, 2048, 5120, True), "glm_shared_gate": (1, 1536, 2048, True),
    "glm_shared_down": (1, 2048, 1536, True), "glm_router": (1, 64, 2048, True),
    "glm_w_uk": (20, 512, 192, False), "glm_w_uv": (20, 256, 512, True),
}
LONGCAT = {
    "lc_q_a": (1, 1536, 6144, True), "lc_kv_a": (1, 576, 6144, True), "lc_q_b": (1, 12288, 1536, True),
    "lc_o_proj": (1, 6144, 8192, True), "lc_router": (1, 768, 6144, True),
    "lc_w_uk": (64, 512, 128, False), "lc_w_uv": (64, 128, 512, True),
}
COPIES_BYTES = 200 * 2**20
INNER = 8


def weights(G, N, K, kc, dtype=torch.bfloat16):
    n = max(INNER, math.ceil(COPIES_BYTES / (G * N * K * 2)))
    out = []
    for _ in range(n):
        w = torch.randn(G, K, N, device="cuda", dtype=dtype).transpose(1, 2) if not kc else \
            torch.randn(G, N, K, device="cuda", dtype=dtype)
        out.append(w * 0.02)
    return out


def time_calls(fn, ws):
    """fn(w) over INNER distinct copies in one CUDA graph: seconds a call."""
    it = itertools.cycle(ws)
    seq = [next(it) for _ in range(INNER)]
    run = lambda: [fn(w) for w in seq]  # noqa: E731
    return B.timed(B.captured(run), "cuda", reps=20) / INNER


def shapes(out, sweep=True, save=lambda: None):
    for name, (G, N, K, kc) in {**GLM, **LONGCAT}.items():
        router = name.endswith("router")
        ws = weights(G, N, K, kc)
        nbytes = G * N * K * 2
        for M in (8, 16, 32, 64):
            x = torch.randn(G, M, K, device="cuda", dtype=torch.bfloat16)
            if G == 1 and router:
                cub = lambda w: F.linear(x[0].float(), w[0].float())  # noqa: E731  (router.logits' plain form)
                ker = lambda w: SK.skinny_gemm(x[0], w[0], out_dtype=torch.float32)  # noqa: E731
            elif G == 1:
                cub = lambda w: F.linear(x[0], w[0])  # noqa: E731
                ker = lambda w: SK.skinny_gemm(x[0], w[0])  # noqa: E731
            else:
                cub = lambda w: torch.einsum("gmk,gnk->gmn", x, w)  # noqa: E731
                ker = lambda w: SK.batched_skinny_gemm(x, w)  # noqa: E731
            w0 = ws[0]
            want = torch.einsum("gmk,gnk->gmn", x.float(), w0.float())
            err = (ker(w0).float().reshape(want.shape) - want).abs().max().item()
            t_c, t_k = time_calls(cub, ws), time_calls(ker, ws)
            tiles = SK.choose_tiles(G, M, N, K)
            t_op = time_calls(lambda w: SK._skinny_op(x, w, *tiles), ws)
            row = dict(part="shapes", name=name, M=M, G=G, N=N, K=K, cublas_us=t_c * 1e6, skinny_us=t_k * 1e6,
                       skinny_op_us=t_op * 1e6, tiles=tiles, cublas_tb_s=nbytes / t_c / 1e12,
                       skinny_op_tb_s=nbytes / t_op / 1e12, max_err=err)
            out.append(row)
            print(f"  {name:16s} M={M:3d}: cuBLAS {t_c * 1e6:7.2f} us ({nbytes / t_c / 1e12:4.2f} TB/s)  skinny "
                  f"{t_k * 1e6:7.2f} (op {t_op * 1e6:7.2f}, {nbytes / t_op / 1e12:4.2f} TB/s) tiles {tiles} "
                  f"err {err:.1e}", flush=True)
            if sweep and M == 32:
                best = None
                for target, bn, bk, st in itertools.product((132, 264, 528, 1056), (64, 128), (64, 128, 256),
                                                            (2, 3, 4)):
                    t = SK.choose_tiles(G, M, N, K, target=target, block_n=bn, block_k=bk)
                    try:
                        us = time_calls(lambda w: SK._skinny_op(x, w, *t, 4, st), ws) * 1e6
                    except Exception as e:  # out of shared memory etc.
                        out.append(dict(part="sweep", name=name, target=target, bn=bn, bk=bk, stages=st,
                                        error=type(e).__name__))
                        continue
                    out.append(dict(part="sweep", name=name, M=M, target=target, bn=bn, bk=bk, stages=st, tiles=t,
                                    us=us, tb_s=nbytes / us / 1e6))
                    if best is None or us < best[0]:
                        best = (us, target, bn, bk, st, t)
                print(f"    best {best[0]:7.2f} us ({nbytes / best[0] / 1e6:4.2f} TB/s): target {best[1]} BN "
                      f"{best[2]} BK {best[3]} stages {best[4]} tiles {best[5]}", flush=True)
        del ws
        torch.cuda.empty_cache()
        save()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", default="shapes", help="comma-separated: shapes (default: %(default)s)")
    ap.add_argument("--no-sweep", action="store_true", help="shapes without the tile sweep")
    ap.add_argument("--out", default="exp.json", help="where the rows go (default: %(default)s)")
    a = ap.parse_args()
    rows = []
    save = lambda: json.dump(dict(torch=torch.__version__, rows=rows), open(a.out, "w"), indent=1)  # noqa: E731
    for part in a.part.split(","):
        {"shapes": lambda o: shapes(o, not a.no_sweep, save)}[part](rows)
    save()
