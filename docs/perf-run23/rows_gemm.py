"""perf-run23: a decode batch's dense product with no split over K, each program's weight rows asked of L2 before
its dependent-launch wait -- prefetch_gemv's recipe (kernels/prefetch_gemv.py) on tensor cores, for 5-32 tokens.

    y (M, N) = x (M, K) W^T        W (N, K); products on tensor cores, fp32 sums, rounded once to x.dtype

Why. At batch 32 GLM-4.7-Flash's step spends 3.0 ms of one H100's critical path in cuBLAS's dense products (~10
launches a layer) for 1.2 ms of weights (this folder's README); the split-K kernel (kernels/skinny_gemm.py) was
faster alone but its fp32 partials need a separate sum wherever the consumer is an opaque op. Here there is no
split: program p owns BN = 16 rows of W *whole* (the MMA's M side: acc^T = W x^T, the 32 tokens its N side), walks
K in BK chunks (pipelined by Triton), and writes y in x's dtype, ready for any consumer. Before its wait it asks
L2 for all of its rows (`prefetch.global.L2`, one line an address: BN x K x 2 / 128 lines, 4-10 a thread), so the
loop's loads find them in L2 or in flight while the previous kernel finishes. Programs: N / 16 (q_a 48, o_proj
128, q_b 320).

Not part of the package (an experiment of record). usage:
    TRITON_INTERPRET=1 python docs/perf-run23/rows_gemm.py check        equal to the fp32 reference (CPU)
    python docs/perf-run23/rows_gemm.py screen OUT.json                  GPU: GLM's batch-32 products in a chain
"""
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

from longcat_ref.kernels import support

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERP:
    from longcat_ref.kernels.support import prefetch_l2
else:
    @triton.jit
    def prefetch_l2(ptrs):  # the interpreter has no PTX: nothing to ask
        pass


@triton.jit
def _rows_gemm_kernel(X, W, Y, M, N, K, stride_xm, stride_wn, stride_ym,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PF_LINES: tl.constexpr,
                      LINE: tl.constexpr, PDL: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BN + tl.arange(0, BN)  # (BN,) this program's rows of W = columns of y
    n_ok = n < N
    w_rows = W + tl.minimum(n, N - 1).to(tl.int64)[:, None] * stride_wn  # (BN, 1)
    if PF_LINES > 0:  # the rows, whole, asked of L2 before the wait (they depend on no earlier kernel)
        lines = tl.minimum(tl.arange(0, PF_LINES) * LINE, K - 1)  # (PF_LINES,) one element of each line
        prefetch_l2(w_rows + lines[None, :])  # (BN, PF_LINES) lines
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    m = tl.arange(0, BM)  # (BM,) tokens
    m_ok = m < M
    acc = tl.zeros((BN, BM), dtype=tl.float32)  # acc^T (BN, BM)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)  # (BK,)
        k_ok = k < K
        w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # (BN, BK)
        xt = tl.load(X + m[None, :] * stride_xm + k[:, None], mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        if UPCAST:  # Triton's CPU interpreter mis-multiplies 16-bit tiles (kernels/skinny_gemm.py)
            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc)  # (BN, BM) fp32 accumulation on tensor cores
    out = Y + m[None, :] * stride_ym + n[:, None]  # (BN, BM) -> y[m, n]
    tl.store(out, acc.to(Y.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


def rows_gemm(x, w, bk=128, pf=True, pdl=None, stages=4, warps=4):
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    pdl = support.pdl(x) if pdl is None else pdl
    line = 128 // x.element_size()
    pf_lines = triton.next_power_of_2(triton.cdiv(K, line)) if (pf and not INTERP) else 0
    _rows_gemm_kernel[(triton.cdiv(N, 16),)](
        x, w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0), BM=max(16, triton.next_power_of_2(M)), BN=16,
        BK=min(bk, max(16, triton.next_power_of_2(K))), PF_LINES=pf_lines, LINE=line, PDL=pdl, UPCAST=INTERP,
        num_warps=warps, num_stages=stages, **({"launch_pdl": pdl} if pdl else {}))
    return y


def reference(x, w):
    return (x.float() @ w.float().T).to(x.dtype)


def check():
    g = torch.Generator().manual_seed(0)
    for M, N, K, dt in [(5, 40, 100, torch.float32), (17, 33, 300, torch.bfloat16), (32, 64, 256, torch.bfloat16),
                        (32, 16, 128, torch.float32), (1, 7, 20, torch.float32)]:
        x = torch.randn(M, K, generator=g).to(dt)
        w = torch.randn(N, K, generator=g).to(dt)
        y = rows_gemm(x, w, bk=64)
        tol = dict(atol=1e-4, rtol=1e-4) if dt == torch.float32 else dict(atol=0.05, rtol=0.02)
        torch.testing.assert_close(y.float(), reference(x, w).float(), **tol)
        print(f"rows_gemm check: M={M} N={N} K={K} {dt}: max |diff| "
              f"{(y.float() - reference(x, w).float()).abs().max():.2e}")
    print("rows_gemm check: passed")


def screen(path):
    """GLM-4.7-Flash's batch-32 dense products chained as a layer runs them (x 2048 -> q_a 768 -> q_b 5120 ->
    o_proj 2048 -> shared gate 1536 -> shared down 2048, the next layer's q_a), L = 8 layers of distinct
    weights in one CUDA graph, 20 replays x 5: us a layer for cuBLAS and for this kernel (prefetch on / off,
    PDL on / off); each chain's output against cuBLAS's."""
    dev, dt, L, M = "cuda", torch.bfloat16, 8, 32
    gen = torch.Generator(dev).manual_seed(0)
    dims = [2048, 768, 5120, 2048, 1536, 2048]
    ws = [[(torch.randn(dims[i + 1], dims[i], device=dev, generator=gen) / dims[i] ** 0.5).to(dt)
           for i in range(len(dims) - 1)] for _ in range(L)]
    x0 = torch.randn(M, 2048, device=dev, generator=gen).to(dt)
    res = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
               device=torch.cuda.get_device_name(), rows=[])
    forms = {"cublas": lambda x, w: torch.nn.functional.linear(x, w),
             "rows pf+pdl": lambda x, w: rows_gemm(x, w), "rows pdl": lambda x, w: rows_gemm(x, w, pf=False),
             "rows plain": lambda x, w: rows_gemm(x, w, pf=False, pdl=False),
             "rows pf+pdl bk64": lambda x, w: rows_gemm(x, w, bk=64),
             "rows pf+pdl 8 warps": lambda x, w: rows_gemm(x, w, warps=8)}
    ref = None
    for rnd in range(2):
        for name, f in forms.items():
            def run():
                x = x0
                for l in range(L):
                    for w in ws[l]:
                        x = f(x, w)
                return x
            run()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = run()
            graph.replay()
            torch.cuda.synchronize()
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(20):
                    graph.replay()
                torch.cuda.synchronize()
                ts.append((time.perf_counter() - t0) / 20 / L * 1e6)
            us = sorted(ts)[2]
            ref = out.float() if ref is None else ref
            diff = float((out.float() - ref).abs().max())
            res["rows"].append(dict(name=name, round=rnd, us_per_layer=us, spread=[min(ts), max(ts)],
                                    max_abs_diff_vs_cublas=diff))
            print(f"rows_gemm screen: {name:20s} r{rnd} {us:7.2f} us a layer (5 products; min {min(ts):.2f}, "
                  f"max {max(ts):.2f}), max |diff| vs cuBLAS {diff:.3e}", flush=True)
            del graph
    json.dump(res, open(path, "w"), indent=1)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "check":
        check()
    elif len(sys.argv) >= 3 and sys.argv[1] == "screen":
        screen(sys.argv[2])
    else:
        sys.exit(__doc__)
