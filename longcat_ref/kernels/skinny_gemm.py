"""A skinny GEMM: the dense projections of a decode batch (5-64 tokens) on tensor cores, split over K.

What is computed (the math of `model/linear.py`'s "plain" form), for G independent matrices (1 for a projection,
the heads for MLA's per-head W_uk / W_uv products), M tokens (a decode batch: 5-64), W (G, N, K):

    y[g, m, n] = sum_k x[g, m, k] W[g, n, k]          products and sum in fp32, rounded once to the output dtype

Why a kernel. At 32 tokens a projection still reads its whole weight to do 64 flops per weight element: it is bound
by memory, like a GEMV, but it is too many products for the GEMV kernel's fp32 FMAs (gemv.py). cuBLAS picks tiles
for it that leave the memory idle: GLM-4.7-Flash's batch-32 step spent ~3 ms in cuBLAS's small GEMMs for ~0.9 ms
worth of weight bytes (one H200, 2026-12-04, docs/perf-run15/). What the product needs is the GEMV's recipe (many
programs, each streaming long contiguous runs of W) with the multiply on tensor cores:

    Kernel  grid (G * cdiv(N, BN), SPLIT)                                                "split-K, swapped tile"
        program (gn, s): matrix g = gn // cdiv(N, BN), rows n = [(gn % ..) * BN, +BN),
                         columns [s * K_SPLIT, min(K, (s + 1) * K_SPLIT))
            for each BK chunk c of those columns:
                acc^T[n, m] += W[g, n, c] @ x[g, m, c]^T       a (BN, BK) x (BK, BM) tensor-core MMA, fp32 acc
            part[s, g, m, n] = acc                              -> (SPLIT, G, M, N) fp32
    then  y = part.sum(0), rounded once (in PyTorch: under torch.compile it fuses into an inductor consumer)

    The swap. The tile is computed transposed, acc^T = W x^T: the weight's BN = 64 rows are the MMA's M side and
    the few tokens (BM = 16, 32 or 64) its N side. Hopper's warp-group MMA needs 64 rows on the M side; the tokens
    alone could not fill it, the weight rows can (grouped_gemm.py's `choose_swap` is the same trick).

    Split-K. A projection with few rows (kv_a: 576 rows of 2048) gives too few row tiles to fill 132 SMs, so the
    reduction axis is split until there are about TARGET_PROGRAMS programs. Each split writes its own fp32
    partial sums; nothing is added atomically, so the result does not depend on the order the programs run in.

    Either layout. The W tile is loaded by pointer arithmetic from W's strides: rows along K (a projection, W_uv)
    or columns along K (W_uk's product reduces over its strided axis). Loads are coalesced along whichever axis is
    contiguous; the MMA does not care.

The custom op `longcat_ref::skinny_partials` returns the partials; `skinny_gemm` / `batched_skinny_gemm` sum and
round them in ordinary PyTorch. The tiles are a pure function of shapes (`choose_tiles`), chosen outside the op,
so a CUDA graph or torch.compile sees the same launch on every call. Fixed shapes, no host sync, inference only.
`skinny_reference` is the definition the kernel is tested equal to (tests/test_kernel_skinny.py); without Triton
this module still imports and the kernel raises a one-line error (kernels/support.py).

What it bought (one H200, torch 2.11, Triton 3.6, 2026-12-04, docs/perf-run16/). The op alone, 32 tokens, in a
CUDA graph with rotating weights, partials op against cuBLAS: GLM-4.7-Flash's q_a 3.8 vs 5.8 us, kv_a 3.4 vs 5.6,
q_b 5.5 vs 5.5, o_proj 10.1 vs 11.4, the router's fp32 logits 2.65 vs 13.4 (LongCat-Flash's 6.8 vs 41.9); the
per-head W_uk / W_uv products slower (4.6 vs 4.15, 5.4 vs 4.8). In the whole compiled batch-32 GLM step it was not
measurably faster (16.93 vs 17.01 ms, same run): where the consumer is an opaque op (our Triton kernels) the sum of
the partials is a separate reduction (~0.8-1 ms in all), eating most of the ~0.7 ms the products saved. A variant
that summed the partials in the kernel (the last program of each tile, counted with atomics) made the op itself
slower (q_a 9.1 us, o_proj 17.3) and the step 17.63 ms, so it was not kept. Hence "skinny" is an opt-in form.
"""

from __future__ import annotations

import math

import torch

from . import support

WHAT = "skinny_gemm (the Triton split-K GEMM for a decode batch)"
TARGET_PROGRAMS = 264  # programs to aim for (2 per SM of an H200): enough loads in flight
BLOCK_N = 64  # weight rows a program (the MMA's M side, swapped)
BLOCK_K = 128  # reduced columns a step (256-byte runs of a bf16 weight row)
NUM_WARPS = 4
NUM_STAGES = 3
MAX_TOKENS = 64  # the token tile is a power of two from 16 to this


# ------------------------------------------------------------------------------------------------ the kernel
if support.have_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _skinny_kernel(
        x_ptr,  # (G, M, K), strides s_x*
        w_ptr,  # (G, N, K), strides s_w*: any layout
        part_ptr,  # (SPLIT, G, M, N) fp32, contiguous: the output
        G, M, N, K, K_SPLIT,
        s_xg, s_xm, s_xk, s_wg, s_wn, s_wk,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        gn = tl.program_id(0)  # (matrix, row tile)
        s = tl.program_id(1)  # which split of the reduction axis
        n_tiles = tl.cdiv(N, BN)
        g = gn // n_tiles
        n = (gn % n_tiles) * BN + tl.arange(0, BN)  # (BN,) weight rows = output columns
        m = tl.arange(0, BM)  # (BM,) tokens
        nmask, mmask = n < N, m < M
        k0 = s * K_SPLIT
        k_end = tl.minimum(K, k0 + K_SPLIT)  # this split's columns [k0, k_end)
        w_rows = w_ptr + g.to(tl.int64) * s_wg + n.to(tl.int64)[:, None] * s_wn  # (BN, 1), int64 offsets
        x_cols = x_ptr + g.to(tl.int64) * s_xg + m[None, :] * s_xm  # (1, BM): x^T's columns
        acc = tl.zeros((BN, BM), dtype=tl.float32)  # (BN, BM): acc^T
        for c0 in range(k0, k_end, BK):
            c = c0 + tl.arange(0, BK)  # (BK,) columns of this chunk
            cmask = c < k_end
            w = tl.load(w_rows + c[None, :] * s_wk, mask=nmask[:, None] & cmask[None, :], other=0.0)  # (BN, BK)
            xt = tl.load(x_cols + c[:, None] * s_xk, mask=cmask[:, None] & mmask[None, :], other=0.0)  # (BK, BM)
            if IEEE or UPCAST:  # fp32 operands: fp32 products, not TF32 (UPCAST: Triton's CPU interpreter
                #                 mis-multiplies 16-bit tiles, so there they are multiplied in fp32)
                acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")  # (BN, BM)
            else:
                acc = tl.dot(w, xt, acc)  # (BN, BM): fp32 accumulation on tensor cores
        out = part_ptr + ((s * G + g).to(tl.int64) * M + m[None, :]) * N + n[:, None]  # (BN, BM) -> [.., m, n]
        tl.store(out, acc, mask=nmask[:, None] & mmask[None, :])


# ------------------------------------------------------------------------------------------------ tiles
def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def choose_tiles(G: int, M: int, N: int, K: int, target: int = TARGET_PROGRAMS, block_n: int = BLOCK_N,
                 block_k: int = BLOCK_K) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, K_SPLIT, SPLIT) for G matrices (N, K) and M tokens (module docstring).

    SPLIT: powers of two until G * cdiv(N, BN) * SPLIT >= target or a split is down to one BK chunk. A pure
    function of its arguments: deterministic, and the same on every call of a graph."""
    if M > MAX_TOKENS:
        raise ValueError(f"skinny_gemm: {M} tokens; the kernel takes at most {MAX_TOKENS} (use the plain form)")
    block_m = max(16, _next_pow2(M))
    block_k = max(16, min(block_k, _next_pow2(K)))
    programs = G * math.ceil(N / block_n)
    split = 1
    while programs * split < target and K >= 2 * split * block_k:
        split *= 2
    k_split = math.ceil(math.ceil(K / split) / block_k) * block_k  # a whole number of chunks per split
    return block_m, block_n, block_k, k_split, math.ceil(K / k_split)


# ------------------------------------------------------------------------------------------------ the op
def _check(x, w):
    """Shapes and dtypes (never values). Raises ValueError naming what is wrong."""
    if x.dim() != 3 or w.dim() != 3 or x.shape[0] != w.shape[0] or x.shape[2] != w.shape[2]:
        raise ValueError(f"skinny_gemm: x must be (G, M, K) and w (G, N, K) with the same G and K; got "
                         f"{tuple(x.shape)}, {tuple(w.shape)}")
    if x.dtype != w.dtype or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"skinny_gemm: x and w must share one dtype of fp32, bf16, fp16; got {x.dtype}, {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"skinny_gemm: x and w must be on one device; got {x.device}, {w.device}")


@torch.library.custom_op("longcat_ref::skinny_partials", mutates_args=())
def _skinny_op(x: torch.Tensor, w: torch.Tensor, block_m: int, block_n: int, block_k: int, k_split: int,
               split: int, num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES) -> torch.Tensor:
    support.require(x, WHAT)
    _check(x, w)
    G, M, K = x.shape
    N = w.shape[1]
    part = torch.empty(split, G, M, N, dtype=torch.float32, device=x.device)  # (SPLIT, G, M, N)
    if part.numel() == 0:
        return part
    if M > block_m:
        raise ValueError(f"skinny_gemm: {M} tokens do not fit BM={block_m}")
    _skinny_kernel[(G * triton.cdiv(N, block_n), split)](
        x, w, part, G, M, N, K, k_split, *x.stride(), *w.stride(),
        BM=block_m, BN=block_n, BK=block_k, IEEE=x.dtype == torch.float32, UPCAST=support.interpreting(),
        num_warps=num_warps, num_stages=num_stages)
    return part


@_skinny_op.register_fake
def _(x, w, block_m, block_n, block_k, k_split, split, num_warps=NUM_WARPS, num_stages=NUM_STAGES):
    _check(x, w)
    return x.new_empty(split, x.shape[0], x.shape[1], w.shape[1], dtype=torch.float32)  # (SPLIT, G, M, N)


def batched_skinny_gemm(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (G, M, K), w (G, N, K), any strides -> y (G, M, N) = x W^T per matrix, fp32 sum rounded once to out_dtype
    (default x.dtype). Runs where kernels/support.can_run(x) (CUDA; the CPU under TRITON_INTERPRET=1)."""
    support.require(x, WHAT)
    _check(x, w)
    tiles = choose_tiles(x.shape[0], x.shape[1], w.shape[1], x.shape[2])
    return _skinny_op(x, w, *tiles).sum(0).to(out_dtype or x.dtype)  # (G, M, N): splits summed in fp32


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias=None, out_dtype: torch.dtype | None = None):
    """x (..., K), W (N, K) (+ bias (N,)) -> (..., N) = x W^T (+ b): the kernel's form of `F.linear`, fp32 sum
    rounded once to out_dtype (default x.dtype; fp32 for the router's logits)."""
    support.require(x, WHAT)
    lead, K = x.shape[:-1], x.shape[-1]
    x3 = x.reshape(1, -1, K)  # (1, M, K): the tokens
    _check(x3, weight[None])
    y = _skinny_op(x3, weight[None], *choose_tiles(1, x3.shape[1], weight.shape[0], K)).sum(0)[0]  # (M, N) fp32
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype).reshape(*lead, weight.shape[0])  # (..., N), rounded once


def skinny_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The definition: x (G, M, K), w (G, N, K) -> (G, M, N), fp32 products and sum, rounded once to x.dtype."""
    return torch.einsum("gmk,gnk->gmn", x.float(), w.float()).to(x.dtype)
