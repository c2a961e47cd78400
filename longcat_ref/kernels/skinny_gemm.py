"""A skinny GEMM: the dense projections of a decode batch (16-64 tokens) on tensor cores, split over K.

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
            SPLIT = 1:  y[g, m, n] = acc, rounded once
            else:       part[s, g, m, n] = acc                  (SPLIT, G, M, N) fp32
                        count[tile] += 1                        atomically; the program that counts last sums
                        y = sum_s part[s] in split order        every split's tile, rounds once, zeroes count

    The swap. The tile is computed transposed, acc^T = W x^T: the weight's BN = 64 rows are the MMA's M side and
    the few tokens (BM = 16, 32 or 64) its N side. Hopper's warp-group MMA needs 64 rows on the M side; the tokens
    alone could not fill it, the weight rows can (grouped_gemm.py's `choose_swap` is the same trick).

    Split-K. A projection with few rows (kv_a: 576 rows of 2048) gives too few row tiles to fill 132 SMs, so the
    reduction axis is split until there are about TARGET_PROGRAMS programs. Each split writes its own fp32
    partial sums and bumps its tile's counter; the last one to arrive (whichever it is) adds the SPLIT partials
    in split order. Nothing is summed atomically, so the result does not depend on the order the programs run in,
    and y comes out of the one kernel. (The first version returned the partials and summed them in PyTorch: in
    GLM-4.7-Flash's compiled batch-32 step those sums became separate reductions, and the step was no faster than
    with cuBLAS, 16.93 vs 17.01 ms, one H200, 2026-12-04, docs/perf-run16/.) The counters are a per-device
    pool of int32s, zero between calls (each tile's last program zeroes its own): a CUDA graph replays them.

    Either layout. The W tile is loaded by pointer arithmetic from W's strides: rows along K (a projection, W_uv)
    or columns along K (W_uk's product reduces over its strided axis). Loads are coalesced along whichever axis is
    contiguous; the MMA does not care.

The custom op `longcat_ref::skinny_gemm` returns y; `skinny_gemm` / `batched_skinny_gemm` choose its tiles, a pure
function of shapes (`choose_tiles`), outside the op, so a CUDA graph or torch.compile sees the same launch on every
call. Fixed shapes, no host sync, inference only. `skinny_reference` is the definition the kernel is tested equal to
(tests/test_kernel_skinny.py); without Triton this module still imports and the kernel raises a one-line error (kernels/support.py).
"""

from __future__ import annotations

import math

import torch

from . import support

WHAT = "skinny_gemm (the Triton split-K GEMM for a decode batch)"
TARGET_PROGRAMS = 132  # programs to aim for (one per SM of an H200): fewer splits to sum than 264 measured
#   nearly as fast (docs/perf-run16/, the sweep)
BLOCK_N = 64  # weight rows a program (the MMA's M side, swapped)
BLOCK_K = 128  # reduced columns a step (256-byte runs of a bf16 weight row)
NUM_WARPS = 4
NUM_STAGES = 3
MAX_TOKENS = 64  # the token tile is a power of two from 16 to this
MAX_SPLIT = 8  # at most this many splits of K: the last program of a tile reads them all (SUM_SPLITS at a time)
SUM_SPLITS = 4  # partial tiles the last program loads at once (one round trip to L2 for each SUM_SPLITS)


# ------------------------------------------------------------------------------------------------ the kernel
if support.have_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _skinny_kernel(
        x_ptr,  # (G, M, K), strides s_x*
        w_ptr,  # (G, N, K), strides s_w*: any layout
        y_ptr,  # (G, M, N) contiguous, the output's dtype: the result
        part_ptr,  # (SPLIT, G, M, N) fp32, contiguous: each split's partial sums (SPLIT > 1)
        count_ptr,  # (G * cdiv(N, BN),) int32, zero on entry and on exit: splits done, per output tile
        G, M, N, K, K_SPLIT, SPLIT,
        s_xg, s_xm, s_xk, s_wg, s_wn, s_wk,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
        SPLIT_K: tl.constexpr, SUM_SPLITS: tl.constexpr,
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
        mask = nmask[:, None] & mmask[None, :]  # (BN, BM)
        tile = (g.to(tl.int64) * M + m[None, :]) * N + n[:, None]  # (BN, BM): offsets of y[g, m, n]
        if SPLIT_K:  # write this split's partial; the last split of the tile to finish sums them all
            tl.store(part_ptr + s.to(tl.int64) * G * M * N + tile, acc, mask=mask)
            tl.debug_barrier()  # every thread's partial stored before the release below
            done = tl.atomic_add(count_ptr + gn, 1, sem="acq_rel", scope="gpu")  # splits finished before this one
            if done == SPLIT - 1:  # the last: the others' partials are visible (acquire); read them from L2 (.cg)
                total = tl.zeros((BN, BM), dtype=tl.float32)
                r = tl.arange(0, SUM_SPLITS)  # (SUM_SPLITS,): that many partial tiles loaded at once
                for s2 in range(0, SPLIT, SUM_SPLITS):  # in split order, whichever program came last: deterministic
                    ss = s2 + r
                    ptrs = part_ptr + ss.to(tl.int64)[:, None, None] * G * M * N + tile[None, :, :]
                    parts = tl.load(ptrs, mask=(ss < SPLIT)[:, None, None] & mask[None, :, :], other=0.0,
                                    cache_modifier=".cg")  # (SUM_SPLITS, BN, BM)
                    total += tl.sum(parts, axis=0)  # (BN, BM)
                tl.store(y_ptr + tile, total.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(count_ptr + gn, 0)  # the counter back to zero for the next call (or graph replay)
        else:
            tl.store(y_ptr + tile, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------ tiles
def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def choose_tiles(G: int, M: int, N: int, K: int, target: int = TARGET_PROGRAMS, block_n: int = BLOCK_N,
                 block_k: int = BLOCK_K) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, K_SPLIT, SPLIT) for G matrices (N, K) and M tokens (module docstring).

    SPLIT: powers of two until G * cdiv(N, BN) * SPLIT >= target, a split is down to one BK chunk, or MAX_SPLIT. A pure
    function of its arguments: deterministic, and the same on every call of a graph."""
    if M > MAX_TOKENS:
        raise ValueError(f"skinny_gemm: {M} tokens; the kernel takes at most {MAX_TOKENS} (use the plain form)")
    block_m = max(16, _next_pow2(M))
    block_k = max(16, min(block_k, _next_pow2(K)))
    programs = G * math.ceil(N / block_n)
    split = 1
    while programs * split < target and K >= 2 * split * block_k and split < MAX_SPLIT:
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


COUNTERS = 1 << 16  # the split counters' pool a device (int32): each call takes the next slice, cyclically
_pools: dict = {}  # device -> [counters (COUNTERS,) int32, all zero between calls; the next free index]


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """n split counters, zero, that no call in flight uses: the next slice of the device's pool (every call leaves
    its counters at zero, so the pool needs no reset; two calls share a slice only COUNTERS tiles apart). While a
    CUDA graph is being captured and the device has no pool yet, a fresh zeroed slice (the memset is captured)."""
    if n > COUNTERS:
        raise ValueError(f"skinny_gemm: {n} output tiles exceed the counter pool ({COUNTERS}); use the plain form")
    pool = _pools.get(device)
    if pool is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return torch.zeros(n, dtype=torch.int32, device=device)
        pool = _pools[device] = [torch.zeros(COUNTERS, dtype=torch.int32, device=device), 0]
    start = pool[1] if pool[1] + n <= COUNTERS else 0
    pool[1] = start + n
    return pool[0][start:start + n]


@torch.library.custom_op("longcat_ref::skinny_gemm", mutates_args=())
def _skinny_op(x: torch.Tensor, w: torch.Tensor, block_m: int, block_n: int, block_k: int, k_split: int,
               split: int, out_dtype: torch.dtype, num_warps: int = NUM_WARPS,
               num_stages: int = NUM_STAGES) -> torch.Tensor:
    support.require(x, WHAT)
    _check(x, w)
    G, M, K = x.shape
    N = w.shape[1]
    y = torch.empty(G, M, N, dtype=out_dtype, device=x.device)  # (G, M, N)
    if y.numel() == 0:
        return y
    if M > block_m:
        raise ValueError(f"skinny_gemm: {M} tokens do not fit BM={block_m}")
    tiles = G * triton.cdiv(N, block_n)
    if split > 1:
        part = torch.empty(split, G, M, N, dtype=torch.float32, device=x.device)  # (SPLIT, G, M, N) partials
        count = _counters(x.device, tiles)  # (tiles,) int32, zero
    else:
        part = count = y  # unused pointers: nothing is split
    _skinny_kernel[(tiles, split)](
        x, w, y, part, count, G, M, N, K, k_split, split, *x.stride(), *w.stride(),
        BM=block_m, BN=block_n, BK=block_k, IEEE=x.dtype == torch.float32, UPCAST=support.interpreting(),
        SPLIT_K=split > 1, SUM_SPLITS=SUM_SPLITS, num_warps=num_warps, num_stages=num_stages)
    return y


@_skinny_op.register_fake
def _(x, w, block_m, block_n, block_k, k_split, split, out_dtype, num_warps=NUM_WARPS, num_stages=NUM_STAGES):
    _check(x, w)
    return x.new_empty(x.shape[0], x.shape[1], w.shape[1], dtype=out_dtype)  # (G, M, N)


def batched_skinny_gemm(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (G, M, K), w (G, N, K), any strides -> y (G, M, N) = x W^T per matrix, fp32 sum rounded once to out_dtype
    (default x.dtype). Runs where kernels/support.can_run(x) (CUDA; the CPU under TRITON_INTERPRET=1)."""
    support.require(x, WHAT)
    _check(x, w)
    tiles = choose_tiles(x.shape[0], x.shape[1], w.shape[1], x.shape[2])
    return _skinny_op(x, w, *tiles, out_dtype or x.dtype)  # (G, M, N)


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias=None, out_dtype: torch.dtype | None = None):
    """x (..., K), W (N, K) (+ bias (N,)) -> (..., N) = x W^T (+ b): the kernel's form of `F.linear`, fp32 sum
    rounded once to out_dtype (default x.dtype; fp32 for the router's logits; with a bias the kernel's fp32 sum
    plus the bias, then one rounding)."""
    support.require(x, WHAT)
    lead, K = x.shape[:-1], x.shape[-1]
    x3 = x.reshape(1, -1, K)  # (1, M, K): the tokens
    _check(x3, weight[None])
    out = out_dtype or x.dtype
    tiles = choose_tiles(1, x3.shape[1], weight.shape[0], K)
    y = _skinny_op(x3, weight[None], *tiles, torch.float32 if bias is not None else out)[0]  # (M, N)
    if bias is not None:
        y = (y + bias.float()).to(out)
    return y.reshape(*lead, weight.shape[0])  # (..., N)


def skinny_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The definition: x (G, M, K), w (G, N, K) -> (G, M, N), fp32 products and sum, rounded once to x.dtype."""
    return torch.einsum("gmk,gnk->gmn", x.float(), w.float()).to(x.dtype)
