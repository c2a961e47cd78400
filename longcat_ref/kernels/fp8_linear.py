"""Block-scaled FP8 weights: the dequantization formula, and a Triton matmul that reads the FP8 weight in place.

The layout (DeepSeek-V3, LongCat-Flash-Chat-FP8; io/fp8.py reads it from disk): a Linear weight W (N, K) is stored as
W8 (N, K) float8_e4m3fn and one fp32 scale per bo x bi block (128 x 128 in the real files):

    W[n, k] = float(W8[n, k]) * S[n // bo, k // bi]          S: (ceil(N / bo), ceil(K / bi)); last blocks may be partial

`dequantize` is that formula (the readable path: on the CPU, and on load). `fp8_linear` computes x @ W^T without
ever writing W: each program of the kernel below owns one (BM x BN) tile of the output and walks K in BK-wide steps.

    for each step k0:                                       a tile of the output, y[m0:m0+BM, n0:n0+BN]
        a  = x[m0:m0+BM, k0:k0+BK]                          (BM, BK) activations, bf16
        b  = W8[n0:n0+BN, k0:k0+BK] -> bf16                 (BN, BK) e4m3 -> bf16 is exact (3 mantissa bits < 7)
        s  = S[(n0 + arange(BN)) // bo, k0 // bi]           (BN,) one scale per output column: BK divides bi, so the
                                                            whole step lies inside one block column
        acc += (a @ b^T) * s                                (BM, BN) fp32: the scale multiplies the partial sum

Scaling the partial sum instead of the weight is the same arithmetic as dequantize-then-matmul up to fp32
rounding, and it reads 1 byte per weight instead of 2: at decode (M = 1..32 rows) a matmul is bound by the weight
bytes it reads, so FP8 weights halve the time as well as the memory.

Decode has few rows, so a grid over output tiles alone would leave most of the GPU's 132 SMs idle (N / BN
programs). The kernel therefore also splits K (`split`): program (m, n, j) sums only its share of the K steps into an
fp32 partial, and the partials are summed afterwards (deterministic, no atomics). Tile sizes come from a short
fixed heuristic (`_config`), not an autotuner: the launch must be the same every call so that it can be captured in
a CUDA graph and traced by torch.compile (as an opaque custom op).
"""

from __future__ import annotations

import math

import torch

from . import support

# --------------------------------------------------------------------------------------------- the formula


def dequantize(w8: torch.Tensor, scale: torch.Tensor, block, dtype=torch.float32, split_rows: int | None = None):
    """(..., N, K) FP8 weights and their (..., nb_N, nb_K) block scales -> (..., N, K) in `dtype` (product in fp32).

    split_rows: rows [0, split) and [split, N) were quantized as two separate weights (an expert's gate and up
    projections stacked into gate_up_proj): each half has its own ceil(split / bo) block rows, stacked.
    On a CUDA device the same formula runs as one Triton kernel (`_dequantize_kernel`: reads 1 byte and writes 2 per
    weight, where the eager formula makes fp32 temporaries): the FP8 prefill dequantizes every expert it runs.
    """
    if w8.is_cuda and support.have_triton() and dtype in (torch.bfloat16, torch.float16, torch.float32):
        return torch.ops.longcat_ref.dequantize(w8, scale, list(block), dtype, split_rows)
    return _dequantize_formula(w8, scale, block, dtype, split_rows)


def _dequantize_formula(w8, scale, block, dtype=torch.float32, split_rows=None):
    n, k = w8.shape[-2:]
    bo, bi = block
    rows = torch.arange(n, device=w8.device)  # (N,)
    if split_rows is None:
        row_block = rows // bo  # (N,)
    else:
        row_block = torch.where(rows < split_rows, rows // bo,
                                math.ceil(split_rows / bo) + (rows - split_rows) // bo)  # (N,)
    col_block = torch.arange(k, device=w8.device) // bi  # (K,)
    s = scale.float().index_select(-2, row_block).index_select(-1, col_block)  # (..., N, K): each element's scale
    return (w8.float() * s).to(dtype)


def fp8_linear_reference(x, w8, scale, block, bias=None):
    """The plain path: dequantize W, then an ordinary matmul in x's dtype."""
    return torch.nn.functional.linear(x, dequantize(w8, scale, block, x.dtype), bias)


# ----------------------------------------------------------------------------------------------- the kernel

if support.have_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _fp8_linear_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, nb_k, k_per_split,
                           SB_N: tl.constexpr, SB_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           BK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BM + tl.arange(0, BM)  # (BM,) rows of x / y
        rn = pid_n * BN + tl.arange(0, BN)  # (BN,) rows of W = columns of y
        s_row = (rn // SB_N).to(tl.int64) * nb_k  # (BN,) offset of each output column's block row in S
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        k_lo = pid_k * k_per_split  # this program's share of K
        k_hi = tl.minimum(k_lo + k_per_split, K)
        for k0 in range(k_lo, k_hi, BK):
            rk = k0 + tl.arange(0, BK)  # (BK,)
            a = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + rk[None, :],
                        mask=(rm[:, None] < M) & (rk[None, :] < k_hi), other=0.0)  # (BM, BK)
            b = tl.load(w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :],
                        mask=(rn[:, None] < N) & (rk[None, :] < k_hi), other=0.0).to(a.dtype)  # (BN, BK) exact
            s = tl.load(s_ptr + s_row + k0 // SB_K, mask=rn < N, other=0.0)  # (BN,) this step's block scales
            if UPCAST:  # Triton's CPU interpreter (3.9) mis-multiplies bf16 tiles: there, multiply in fp32
                a, b = a.to(tl.float32), b.to(tl.float32)
            if IEEE or UPCAST:
                part = tl.dot(a, tl.trans(b), input_precision="ieee")  # (BM, BN) fp32 (fp32 inputs: no tf32)
            else:
                part = tl.dot(a, tl.trans(b))  # (BM, BN) fp32 accumulate
            acc += part * s[None, :]
        y = y_ptr + pid_k.to(tl.int64) * M * N + rm[:, None].to(tl.int64) * N + rn[None, :]  # partial j
        tl.store(y, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


    @triton.jit
    def _dequantize_kernel(w_ptr, s_ptr, o_ptr, R, C, nb_r, nb_c, split, nbg, BO: tl.constexpr, BI: tl.constexpr,
                           BR: tl.constexpr, BC: tl.constexpr):
        """One (BR, BC) tile of matrix e of a (E, R, C) bank: W = float(W8) * S[row block, c // BI], cast."""
        e = tl.program_id(2).to(tl.int64)
        r = tl.program_id(0) * BR + tl.arange(0, BR)  # (BR,)
        c = tl.program_id(1) * BC + tl.arange(0, BC)  # (BC,)
        m = (r[:, None] < R) & (c[None, :] < C)  # (BR, BC)
        off = e * R * C + r[:, None].to(tl.int64) * C + c[None, :]  # (BR, BC)
        w = tl.load(w_ptr + off, mask=m, other=0.0).to(tl.float32)  # (BR, BC)
        rb = tl.where(r < split, r // BO, nbg + (r - split) // BO)  # (BR,) block row (gate's, then up's)
        s = tl.load(s_ptr + e * nb_r * nb_c + rb[:, None] * nb_c + (c // BI)[None, :], mask=m, other=0.0)
        tl.store(o_ptr + off, (w * s).to(o_ptr.dtype.element_ty), mask=m)


def _config(M: int, N: int, K: int, block) -> tuple[int, int, int, int]:
    """Tile sizes (BM, BN, BK) and the K split: a fixed rule of thumb, the same for every call of a shape.

    BK divides the scale block's width (one scale column per step); BM >= 16 (the smallest tensor-core tile). Few
    rows (decode): small BN and a K split so that about two programs run per SM of a 132-SM GPU. Many rows
    (prefill): big tiles, no split.
    """
    bk = min(128, block[1])
    if M <= 32:
        bm, bn = 16 if M <= 16 else 32, 64
        tiles = math.ceil(M / bm) * math.ceil(N / bn)
        split = max(1, min(math.ceil(264 / tiles), math.ceil(K / bk), 16))
    else:
        bm, bn, split = 64, 128, 1
    return bm, bn, bk, split


def fp8_linear_kernel(x, w8, scale, block, bias=None, split: int | None = None):
    """y = x @ dequantize(W8)^T (+ bias) with the Triton kernel: x (..., K) bf16/fp32, W8 (N, K) e4m3 -> (..., N)."""
    support.require(x, "the FP8 matmul kernel")
    if block[1] % 16 or (block[1] > 128 and block[1] % 128):
        raise ValueError(f"FP8 weight block {tuple(block)}: the kernel needs a block width that is a multiple of 16 "
                         "(and of 128 above 128); dequantize such weights on load instead")
    return torch.ops.longcat_ref.fp8_linear(x, w8, scale, list(block), bias, split)


@torch.library.custom_op("longcat_ref::fp8_linear", mutates_args=())
def _fp8_linear_op(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, block: list[int],
                   bias: torch.Tensor | None, split: int | None) -> torch.Tensor:
    lead, K = x.shape[:-1], x.shape[-1]
    N = w8.shape[0]
    a = x.reshape(-1, K).contiguous()  # (M, K)
    M = a.shape[0]
    bm, bn, bk, auto_split = _config(M, N, K, block)
    split = split or auto_split
    steps = math.ceil(K / bk)
    k_per_split = math.ceil(steps / split) * bk  # a whole number of steps each
    split = math.ceil(K / k_per_split)
    part = torch.empty(split, M, N, device=x.device, dtype=torch.float32)  # (split, M, N) fp32 partials
    grid = (math.ceil(M / bm), math.ceil(N / bn), split)
    _fp8_linear_kernel[grid](a, w8.contiguous(), scale.float().contiguous(), part, M, N, K, scale.shape[1],
                             k_per_split, SB_N=block[0], SB_K=block[1], BM=bm, BN=bn, BK=bk,
                             IEEE=x.dtype == torch.float32, UPCAST=support.interpreting())
    y = part[0] if split == 1 else part.sum(0)  # (M, N) fp32
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*lead, N)


@_fp8_linear_op.register_fake
def _(x, w8, scale, block, bias, split):
    return x.new_empty(*x.shape[:-1], w8.shape[0])


@torch.library.custom_op("longcat_ref::dequantize", mutates_args=())
def _dequantize_op(w8: torch.Tensor, scale: torch.Tensor, block: list[int], dtype: torch.dtype,
                   split_rows: int | None) -> torch.Tensor:
    R, C = w8.shape[-2:]
    lead = w8.shape[:-2]
    w = w8.reshape(-1, R, C).contiguous()  # (E, R, C)
    s = scale.float().reshape(-1, *scale.shape[-2:]).contiguous()  # (E, nb_r, nb_c)
    out = torch.empty(w.shape, dtype=dtype, device=w8.device)
    split = R if split_rows is None else split_rows
    nbg = math.ceil(split / block[0])
    if w.shape[0]:
        grid = (math.ceil(R / 32), math.ceil(C / 128), w.shape[0])
        _dequantize_kernel[grid](w, s, out, R, C, s.shape[1], s.shape[2], split, nbg, BO=block[0], BI=block[1],
                                 BR=32, BC=128)
    return out.view(*lead, R, C)


@_dequantize_op.register_fake
def _(w8, scale, block, dtype, split_rows):
    return torch.empty(w8.shape, dtype=dtype, device=w8.device)
