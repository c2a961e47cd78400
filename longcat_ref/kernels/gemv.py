"""The dense projections of a few decode tokens in one Triton kernel: y = x W^T, each weight read once, in place.

What is computed (the math of `model/linear.py`'s "gemv" form), for G independent matrices (1 for a projection,
the heads for MLA's per-head W_uk / W_uv products), M tokens (1-4 when decoding), W (G, N, K):

    y[g, m, n] = sum_k x[g, m, k] W[g, n, k]          products and sum in fp32, rounded once to x.dtype

Why a kernel at all. At batch 1 a projection is a matrix-vector product: two flops per weight byte pair, so its time
is the time to read W. GLM-4.7-Flash runs six such reads a layer (q_a, kv_a, q_b, W_uk, W_uv, o_proj: 1-21 MB each,
~44 MB a layer). cuBLAS is bound there by launch and tail effects, and inductor's reductions of the "gemv" form
read them at ~1.2-2.6 TB/s on an H200 (one, the W_uk product, which reduces over a strided axis, at ~0.4). What
a GEMV needs to run at bandwidth is enough bytes in flight: many programs, each streaming long contiguous runs.

    Kernel  grid (G * cdiv(N, BLOCK_N), SPLIT)                                                     "split-K GEMV"
        program (gn, s): matrix g = gn // cdiv(N, BLOCK_N), rows n = [(gn % ..) * BLOCK_N, +BLOCK_N),
                         columns [s * K_SPLIT, min(K, (s + 1) * K_SPLIT))
            for each BLOCK_K chunk c of those columns:
                acc[m, n] += sum_c x[g, m, c] * W[g, n, c]      a (BLOCK_M, BLOCK_N, BLOCK_K) product in fp32
            part[s, g, m, n] = acc                               -> (SPLIT, G, M, N) fp32
    then  y = part.sum(0), rounded once to x.dtype (in PyTorch, see below)

    Split-K. A projection with few rows (kv_a: 576 rows of 2048) gives too few row tiles to fill the GPU, so the
    reduction axis is split over SPLIT programs too, until there are TARGET_PROGRAMS programs (or every split is one
    BLOCK_K chunk). Each split writes its own fp32 partial sums; nothing is added atomically, so the result does not
    depend on the order the programs run in.

    The tile follows the layout. W's contiguous axis goes along the tile's long side: rows along K (a projection,
    W_uv: W[n, k] with k contiguous) take BLOCK_N = 8 rows x BLOCK_K = 512 columns (1 KB runs of bf16); W_uk's
    product reduces over the axis that is NOT contiguous (W_uk (h, nope, r): the sum runs over nope, the output over
    r), so there the tile is BLOCK_N = 128 output columns (contiguous) x BLOCK_K = 32 reduced rows. The product tile
    BLOCK_M x BLOCK_N x BLOCK_K stays at 4,096 fp32 values either way (32 per thread at 4 warps).

The custom op `longcat_ref::gemv_partials` returns the partials and `gemv` / `batched_gemv` sum them in ordinary
PyTorch: under torch.compile that sum, the bias and the cast fuse into whatever reads y (the RMSNorm of q_a's
output, the residual add after o_proj), as the fused MoE kernels' sum over slots does (moe_decode.py). The tiles
are chosen outside the op, from shapes and strides (`choose_tiles`, a pure function), and passed to it: the op's
output shape then depends on its arguments only.

Measured (one H200, 2026-12-02, `bench --only b1 --b1-variants compiled_decode_triton`, docs/perf-run10/):
SLOWER than what it replaces, so `linear="auto"` does not pick it. GLM-4.7-Flash's compiled batch-1 step took
4.916 ms with these kernels against 4.428 ms with inductor's reductions (1,108 kernels against 960: the partial
sums and casts that inductor had fused into its own reductions now run beside the op); the kernel read GLM's
~44 MB of projections a layer in ~35 us (~1.2 TB/s, no faster than inductor's reductions); the LongCat layer's
step, whose large dense weights had been cuBLAS's, took 0.738 against 0.657 ms (its 18 launches 468 us). The
likely cause is too few bytes in flight: q_a's 768 rows make 96 row tiles, split twice, 192 programs each
loading 8 KB per iteration with no overlap between iterations. Sweeping the tiles (more splits, taller row
tiles, more warps) is the next step; until then it is a tested, readable form of the split-K GEMV and a measured
negative result.

Fixed launch shapes, no host sync: the kernel can be captured in a CUDA graph. Inference only (no backward).
`gemv_reference` is the definition the kernel is tested equal to (tests/test_kernel_gemv.py); without Triton this
module still imports and the kernel forms raise a one-line error (kernels/support.py).
"""

from __future__ import annotations

import math

import torch

from . import support

WHAT = "gemv (the Triton GEMV kernel)"
TARGET_PROGRAMS = 512  # enough programs in flight to keep an H200's memory busy (~4 per SM), as moe_decode.py
PRODUCT_TILE = 4096  # BLOCK_M * BLOCK_N * BLOCK_K: fp32 values of one chunk's product (32 a thread at 4 warps)
NUM_WARPS = 4


# ------------------------------------------------------------------------------------------------ the kernel
if support.have_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _gemv_kernel(
        x_ptr,  # (G, M, K), strides s_x*
        w_ptr,  # (G, N, K), strides s_w*: any layout (K contiguous, or N contiguous for W_uk's product)
        part_ptr,  # (SPLIT, G, M, N) fp32, contiguous: the output
        G, M, N, K, K_SPLIT,
        s_xg, s_xm, s_xk, s_wg, s_wn, s_wk,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        gn = tl.program_id(0)  # (matrix, row tile)
        s = tl.program_id(1)  # which split of the reduction axis
        n_tiles = tl.cdiv(N, BLOCK_N)
        g = gn // n_tiles
        n = (gn % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output rows
        m = tl.arange(0, BLOCK_M)  # (BLOCK_M,) tokens
        nmask, mmask = n < N, m < M
        k0 = s * K_SPLIT
        k_end = tl.minimum(K, k0 + K_SPLIT)  # this split's columns [k0, k_end)
        x_rows = x_ptr + g.to(tl.int64) * s_xg + m[:, None] * s_xm  # (BLOCK_M, 1) row pointers
        w_rows = w_ptr + g.to(tl.int64) * s_wg + n.to(tl.int64)[:, None] * s_wn  # (BLOCK_N, 1), int64 offsets
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # (BLOCK_M, BLOCK_N)
        for c0 in range(k0, k_end, BLOCK_K):
            c = c0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,) columns of this chunk
            cmask = c < k_end
            xv = tl.load(x_rows + c[None, :] * s_xk, mask=mmask[:, None] & cmask[None, :],
                         other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_K)
            wv = tl.load(w_rows + c[None, :] * s_wk, mask=nmask[:, None] & cmask[None, :],
                         other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_K)
            acc += tl.sum(xv[:, None, :] * wv[None, :, :], axis=2)  # (BLOCK_M, BLOCK_N): this chunk's part
        out = part_ptr + ((s * G + g).to(tl.int64) * M + m[:, None]) * N + n[None, :]  # (BLOCK_M, BLOCK_N)
        tl.store(out, acc, mask=mmask[:, None] & nmask[None, :])


# ------------------------------------------------------------------------------------------------ tiles
def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def choose_tiles(G: int, M: int, N: int, K: int, k_contiguous: bool = True) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, K_SPLIT, SPLIT) for G matrices (N, K) and M tokens (module docstring).

    k_contiguous: W's reduction axis is its contiguous one (a projection). Otherwise (W_uk's product) the tile is
    wide along N. SPLIT: powers of two until G * cdiv(N, BLOCK_N) * SPLIT >= TARGET_PROGRAMS or a split is one
    chunk. A pure function of its arguments: deterministic, and the same on every call of a graph."""
    block_m = _next_pow2(max(1, M))
    if k_contiguous:
        block_n = 8
        block_k = max(16, min(512, _next_pow2(K), PRODUCT_TILE // (block_m * block_n)))
    else:
        block_n = max(16, min(128, _next_pow2(N)))
        block_k = max(8, min(_next_pow2(K), PRODUCT_TILE // (block_m * block_n)))
    programs = G * math.ceil(N / block_n)
    split = 1
    while programs * split < TARGET_PROGRAMS and K > 2 * split * block_k:
        split *= 2
    k_split = math.ceil(math.ceil(K / split) / block_k) * block_k  # a whole number of chunks per split
    return block_m, block_n, block_k, k_split, math.ceil(K / k_split)


# ------------------------------------------------------------------------------------------------ the op
def _check(x, w):
    """Shapes and dtypes (never values). Raises ValueError naming what is wrong."""
    if x.dim() != 3 or w.dim() != 3 or x.shape[0] != w.shape[0] or x.shape[2] != w.shape[2]:
        raise ValueError(f"gemv: x must be (G, M, K) and w (G, N, K) with the same G and K; got {tuple(x.shape)}, "
                         f"{tuple(w.shape)}")
    if x.dtype != w.dtype or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"gemv: x and w must share one dtype of fp32, bf16, fp16; got {x.dtype}, {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"gemv: x and w must be on one device; got {x.device}, {w.device}")


@torch.library.custom_op("longcat_ref::gemv_partials", mutates_args=())
def _gemv_op(x: torch.Tensor, w: torch.Tensor, block_m: int, block_n: int, block_k: int, k_split: int,
             split: int, num_warps: int = NUM_WARPS) -> torch.Tensor:
    support.require(x, WHAT)
    _check(x, w)
    G, M, K = x.shape
    N = w.shape[1]
    part = torch.empty(split, G, M, N, dtype=torch.float32, device=x.device)  # (SPLIT, G, M, N)
    if part.numel() == 0:
        return part
    if M > block_m:
        raise ValueError(f"gemv: {M} tokens do not fit BLOCK_M={block_m}")
    _gemv_kernel[(G * triton.cdiv(N, block_n), split)](
        x, w, part, G, M, N, K, k_split, *x.stride(), *w.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    return part


@_gemv_op.register_fake
def _(x, w, block_m, block_n, block_k, k_split, split, num_warps=NUM_WARPS):
    _check(x, w)
    return x.new_empty(split, x.shape[0], x.shape[1], w.shape[1], dtype=torch.float32)  # (SPLIT, G, M, N)


def batched_gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (G, M, K), w (G, N, K), any strides -> y (G, M, N) = x W^T per matrix, in x.dtype (fp32 sum, one rounding).

    Runs where kernels/support.can_run(x) (CUDA; the CPU under TRITON_INTERPRET=1), else a one-line error."""
    support.require(x, WHAT)
    _check(x, w)
    G, M, K = x.shape
    k_contiguous = w.stride(2) == 1 or w.stride(1) != 1
    tiles = choose_tiles(G, M, w.shape[1], K, k_contiguous)
    return _gemv_op(x, w, *tiles).sum(0).to(x.dtype)  # (G, M, N): the splits summed in fp32, rounded once


def gemv(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """x (..., K), W (N, K) (+ bias (N,)) -> (..., N) in x.dtype: `model/linear.py`'s gemv form in the kernel."""
    support.require(x, WHAT)
    lead, K = x.shape[:-1], x.shape[-1]
    x3 = x.reshape(1, -1, K)  # (1, M, K): the tokens
    tiles = choose_tiles(1, x3.shape[1], weight.shape[0], K, True)
    _check(x3, weight[None])
    y = _gemv_op(x3, weight[None], *tiles).sum(0)[0]  # (M, N) fp32
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, weight.shape[0])  # (..., N), rounded once


def gemv_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The definition: x (G, M, K), w (G, N, K) -> (G, M, N), fp32 products and sum, rounded once to x.dtype."""
    return torch.einsum("gmk,gnk->gmn", x.float(), w.float()).to(x.dtype)
