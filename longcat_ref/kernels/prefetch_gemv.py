"""A decode projection whose weight is loaded before it may read its input: y = x W^T, whole rows prefetched.

What it computes (the math of `model/linear.py`), for M decode tokens (1-4) and a weight W (N, K):

    y[m, n] = sum_k x'[m, k] W[n, k]  (+ b[n])          products and sum in fp32, rounded once to x.dtype
    x' = x, or, with norm_weight given, the model's RMSNorm of x (norm.py) computed here:
    x' = w_norm * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)        (the product rounded once, as norm.py)

Why. At batch 1 a projection reads its weight once and does two flops a weight: its time is the time to read W.
Each kernel of a decode step waits for the one before it, and a short kernel's time is mostly that wait, the launch
and the first loads' latency (docs/perf-run20/: GLM-4.7-Flash's q_b with q_a's norm costs 6.7 us on the step's
critical path for 7.9 MB, 2.6 us of reading). With programmatic dependent launch (kernels/support.py) a kernel may
start while the previous one finishes: everything it loads *before* its `gdc_wait()` overlaps that kernel's tail.
A weight is never written by the step, so here the whole weight is loaded first, into registers, and only then
does the program wait, read the few KB of x (the previous kernel's output), and reduce.

The tiling. Program p owns rows [p * BLOCK_N, (p + 1) * BLOCK_N) of W, each WHOLE (BLOCK_K = K padded to a power
of two, at most MAX_K = 8192), one (BLOCK_N, BLOCK_K) tile:

    w    = W[rows, :]                  (BLOCK_N, BLOCK_K)  loaded before the wait: the program's share of W
    wait for the previous kernel
    for each token m:  x = X[m, :]     (BLOCK_K,)          (normed here when norm_weight is given: every program
                                                            recomputes the K-long statistic; K values from L2)
                       y[m, rows] = sum_k w * x            (BLOCK_N,) fp32, rounded once

BLOCK_N is chosen so that the tile is 8,192 values (64 a thread at 4 warps): 8 rows of K = 768 (GLM's q_b: 640
programs), 4 of 2048 (q_a, kv_a), 1 of 5120 -> 8192 (o_proj: 2,048 programs of 16 KB). No split over K: one program
holds a row whole, so nothing is summed outside the kernel and it writes y in the model dtype, ready for the next
kernel. How much of W is in flight before the wait is bounded by how many programs are resident (an H100 holds
at most 132 x 16 four-warp programs, ~2,100, fewer where registers run out; not measured); the rest load as
programs finish.

Two weights of one input in one launch (`weight2`): MLA's q_a and kv_a both read the sublayer's input, so one
kernel does both, y = [x W^T | x W2^T]: programs [0, P1) take W's rows and the rest W2's (P1 = cdiv(N1, BLOCK_N),
one tile shape for both), each writing its columns of the one output; the callers take the two halves as views.

Inference only, fixed launch shapes, no host sync: the op is opaque to torch.compile and can be captured in a CUDA
graph. `prefetch_gemv_reference` is the definition it is tested equal to (tests/test_kernel_prefetch_gemv.py); the
model uses it through `Forms(linear="prefetch")` (model/linear.py; in model/mla.py q_a with kv_a, and q_b with q_a's
norm).
Measured on one H100 (2026-12-07, docs/perf-run21/): GLM-4.7-Flash's compiled batch-1 step with every projection
that fits in this kernel (q_a with kv_a, q_b with q_a's norm, o_proj: 3 launches a layer, 5.4 us each on the
critical path) 3.453 ms against 3.744 with inductor's fused reductions, the same run; linear "auto" takes it there.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import support

WHAT = "prefetch_gemv (the whole-row GEMV kernel)"
MAX_K = 8192  # a row must fit one tile: K padded to a power of two at most this
TILE = 8192  # BLOCK_N * BLOCK_K: the values of one program's weight tile (64 a thread at 4 warps)
MAX_TOKENS = 4  # decode tokens (a short speculative verify): one pass over the tile each
NUM_WARPS = 4

if support.have_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _prefetch_gemv_kernel(
        X, W, W2, B, NW, Y,  # x (M, K) rows strided, W (N1, K) and W2 (N - N1, K) rows strided, bias (N,), norm
        M, N, N1, P1, K, stride_xm, stride_wn, stride_wn2, stride_ym, eps,  # weight (K,), y (M, N)
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
        NORM: tl.constexpr, TWO: tl.constexpr = False, PDL: tl.constexpr = False,
    ):
        pid = tl.program_id(0)
        w_ptr, stride_w, first, limit, col0 = W, stride_wn, pid * BLOCK_N, N1, 0  # one weight: N1 = N
        if TWO:  # programs [0, P1) take W's N1 rows, the others W2's N - N1 rows, written after them in y
            if pid >= P1:
                w_ptr, stride_w, first, limit, col0 = W2, stride_wn2, (pid - P1) * BLOCK_N, N - N1, N1
        rows = first + tl.arange(0, BLOCK_N)  # (BLOCK_N,) this program's rows of its weight
        n_ok = rows < limit
        cols = col0 + rows  # (BLOCK_N,) their columns of y (and of the bias)
        k = tl.arange(0, BLOCK_K)  # (BLOCK_K,) a whole row
        k_ok = k < K
        # the weight (and the bias, the norm weight) does not depend on the previous kernel: loaded before the wait
        w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * stride_w + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0)  # (BLOCK_N, BLOCK_K)
        if HAS_BIAS:
            b = tl.load(B + cols, mask=n_ok, other=0.0).to(tl.float32)  # (BLOCK_N,)
        if NORM:
            nw = tl.load(NW + k, mask=k_ok, other=0.0).to(tl.float32)  # (BLOCK_K,)
        if PDL:  # programmatic dependent launch (support.pdl): now wait for the previous kernel's writes
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        dtype = Y.dtype.element_ty
        for m in tl.static_range(BLOCK_M):  # the tokens, one pass over the tile each
            if m < M:
                x = tl.load(X + m * stride_xm + k, mask=k_ok, other=0.0).to(tl.float32)  # (BLOCK_K,)
                if NORM:  # norm.py's RMSNorm: fp32 statistic, cast, the weight's product rounded once
                    inv = tl.math.rsqrt(tl.sum(x * x, 0) / K + eps)  # ()
                    x = (x * inv).to(dtype).to(tl.float32)
                    x = (nw * x).to(dtype).to(tl.float32)  # (BLOCK_K,)
                y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)  # (BLOCK_N,) fp32 products and sum
                if HAS_BIAS:
                    y += b
                tl.store(Y + m * stride_ym + cols, y.to(dtype), mask=n_ok)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def tiles(N: int, K: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for W (N, K): whole rows (BLOCK_K = K padded to a power of two, at least 16) and as many
    rows as make TILE values (at least 1, at most N padded). A pure function of the shape."""
    block_k = max(16, _next_pow2(K))
    return max(1, min(TILE // block_k, _next_pow2(N))), block_k


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Can the kernel take x (..., K) @ weight (N, K)^T here: it can run (support.can_run), at most MAX_TOKENS
    tokens, the weight 2-D in x's dtype with contiguous rows, K <= MAX_K. (Static facts only.)"""
    return (support.can_run(x) and weight.dim() == 2 and weight.dtype == x.dtype and weight.stride(-1) == 1
            and x.shape[-1] == weight.shape[1] <= MAX_K and x[..., 0].numel() <= MAX_TOKENS
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16))


@torch.library.custom_op("longcat_ref::prefetch_gemv", mutates_args=())
def _prefetch_gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      norm_weight: Optional[torch.Tensor], eps: float,
                      weight2: Optional[torch.Tensor] = None) -> torch.Tensor:
    support.require(x, WHAT)
    M, K = x.shape
    N1 = weight.shape[0]
    N = N1 + (0 if weight2 is None else weight2.shape[0])
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)  # (M, N) = [x W^T | x W2^T]
    if M == 0 or N == 0:
        return y
    block_n, block_k = tiles(max(N1, N - N1), K)  # one tile shape for both weights (the same K)
    p1 = triton.cdiv(N1, block_n)  # programs of W; those of W2 follow
    pdl = support.pdl(x)  # programmatic dependent launch (sm_90+ CUDA)
    w2 = weight if weight2 is None else weight2
    _prefetch_gemv_kernel[(p1 + triton.cdiv(N - N1, block_n),)](
        x, weight, w2, bias if bias is not None else y, norm_weight if norm_weight is not None else y, y,
        M, N, N1, p1, K, x.stride(0), weight.stride(0), w2.stride(0), y.stride(0), float(eps),
        BLOCK_M=_next_pow2(M), BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None,
        NORM=norm_weight is not None, TWO=weight2 is not None, PDL=pdl, num_warps=NUM_WARPS, launch_pdl=pdl)
    return y


@_prefetch_gemv_op.register_fake
def _(x, weight, bias, norm_weight, eps, weight2=None):
    return x.new_empty(x.shape[0], weight.shape[0] + (0 if weight2 is None else weight2.shape[0]))  # (M, N)


def _check_weight(x, weight, name):
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K or weight.dtype != x.dtype or weight.stride(-1) != 1:
        raise ValueError(f"prefetch_gemv: {name} must be (N, {K}) in {x.dtype} with contiguous rows, got "
                         f"{tuple(weight.shape)} {weight.dtype} strides {weight.stride()}")


def prefetch_gemv(x: torch.Tensor, weight: torch.Tensor, bias=None, norm_weight=None, eps: float = 0.0,
                  weight2: torch.Tensor | None = None):
    """x (..., K) -> (..., N) = x' W^T (+ bias) in x.dtype, x' = x or RMSNorm(x) with norm_weight (K,) and eps
    (norm.py's formula). With weight2 (N2, K): two projections of the same input in one launch, y = [x' W^T |
    x' W2^T] (..., N + N2) (MLA's q_a and kv_a; the bias then covers both, (N + N2,)). For up to MAX_TOKENS tokens
    and K up to MAX_K; see `fits`. Raises a one-line error naming the problem for anything else."""
    support.require(x, WHAT)
    K = x.shape[-1]
    _check_weight(x, weight, "weight")
    if weight2 is not None:
        _check_weight(x, weight2, "weight2")
        if weight2.device != weight.device:
            raise ValueError("prefetch_gemv: weight and weight2 must be on one device")
    if K > MAX_K or x[..., 0].numel() > MAX_TOKENS:
        raise ValueError(f"prefetch_gemv: at most {MAX_TOKENS} tokens of K <= {MAX_K} (a row is one tile), got "
                         f"{x[..., 0].numel()} tokens of K = {K}: use linear='auto'")
    N = weight.shape[0] + (0 if weight2 is None else weight2.shape[0])
    for t, name, n in ((bias, "bias", N), (norm_weight, "norm_weight", K)):
        if t is not None and (t.shape != (n,) or t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"prefetch_gemv: {name} must be ({n},) {x.dtype} on {x.device}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)  # (M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.ops.longcat_ref.prefetch_gemv(x2, weight, bias, norm_weight, float(eps), weight2)  # (M, N)
    return y.reshape(*lead, N)


def prefetch_gemv_reference(x, weight, bias=None, norm_weight=None, eps: float = 0.0, weight2=None):
    """The definition in PyTorch: norm.py's RMSNorm where norm_weight is given, then fp32 products and sum (and the
    bias), rounded once to x.dtype; with weight2, the two weights' outputs side by side."""
    if weight2 is not None:
        weight = torch.cat([weight, weight2])  # (N + N2, K): the definition, not how the kernel reads them
    if norm_weight is not None:
        x32 = x.float()
        x = norm_weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)  # (..., K)
    y = x.float() @ weight.float().T  # (..., N) fp32
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
