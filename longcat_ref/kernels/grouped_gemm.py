"""A grouped GEMM: many small matmuls of different heights in one launch, FP8 expert banks read in place.

What it computes. The routed experts of a prefill (model/experts.py, `_grouped`) sort the (token, slot) rows by
expert, so that expert g's rows are one contiguous slice of the activations a (m, K):

    rows [ends[g-1], ends[g]) of a   @   b[g]^T        b (G, N, K): the bank as the model stores it
                                                       (gate_up_proj (E, 2I, H), down_proj (E, H, I))

G matmuls of the same N and K but of different (data-dependent) heights, m rows in all. `ends` (G,) holds the
cumulative group ends and lives on the device: reading it on the host (`.tolist()`) would stall the GPU and could
not be captured in a CUDA graph. So the launch must not depend on the group sizes.

The tile -> group map (what vLLM's moe_align_block_size does, written plainly). Pad every group's rows up to a
multiple of BM: group g then occupies exactly tiles_g = cdiv(size_g, BM) M-tiles of BM rows, and the tiles of all
groups, one after another, number at most

    sum_g cdiv(size_g, BM)  <=  sum_g (size_g / BM + 1)  =  m / BM + G  <=  floor(m / BM) + 1 + G   (= n_tiles)

which depends on the shapes (m, G, BM) only. The grid is n_tiles x cdiv(N, BN) programs, every call the same. A few
device-side torch ops (`_tile_map`, no host sync) turn `ends` into, for each tile index t (they run in the wrapper,
outside the opaque custom op, where torch.compile fuses them):

    tiles_g     = cdiv(size_g, BM)                          (G,)  an empty group has no tile
    tile_end    = cumsum(tiles_g)                           (G,)  tile_end[g-1] <= t < tile_end[g]: t is g's
    group[t]    = searchsorted(tile_end, t, right=True)     (n_tiles,)  (right=True skips empty groups)
    row0[t]     = start_g + (t - tile_start_g) * BM         (n_tiles,)  the tile's first row
    row_end[t]  = end_g                                     (n_tiles,)  its rows: [row0, min(row0 + BM, end_g))

Tiles past the last group's (group[t] == G: the slack of the bound) get an empty row range and do nothing. The
padding rows are never read or written: a tile's loads and stores are masked to its own group's rows, so a group of
size BM + 1 costs two tiles, the second one one row high. The output starts as zeros, and rows past ends[-1] (those
of no group) stay 0.

FP8 banks. b may be float8_e4m3fn with one fp32 scale per bo x bi block of each expert's matrix (fp8_linear.py's
layout, scale (G, ceil(N / bo), ceil(K / bi))). As in `_fp8_linear_kernel`, the weight is never dequantized into
memory: each step of the K loop reads a (BN, BK) FP8 tile, converts it to a's dtype (exact: e4m3 has 3 mantissa bits
and a small exponent range, bf16 has 7 and fp32's range), multiplies, and scales the (BM, BN) fp32 partial sum by
one scale per output column:

    acc += (a_tile @ b_tile^T) * S[g, row_block(n0 + arange(BN)), k0 // bi][None, :]

BK divides bi, so the step lies inside one block column and each output column has one scale for it; the columns'
block rows may differ (BN > bo, or the gate/up seam of `split_rows`), hence a vector. That is dequantize-then-matmul
up to fp32 rounding, reading 1 byte per weight and writing none: the plain FP8 prefill instead dequantizes the whole
bank into bf16 first (for LongCat-Flash's 512 experts that costs many times the matmul itself).

Two fusions for the MoE (model/experts.py's kernel path), both optional:

* `rows` (m,): the kernel reads row rows[r] of a for its row r, so the caller need not gather the activations into
  expert order first (LongCat-Flash's 2k-token prefill: x[order] is 24,576 rows x 6,144, 0.7 ms of copying).
* `swiglu=True`: b is an expert's gate over up (G, 2I, K) and the output is silu(a gate^T) * (a up^T) (m, I). Each
  program keeps two (BM, BN) accumulators, gate columns [n0, n0 + BN) and the same up columns (b's rows I + n0 ...),
  so h = a b^T (m, 2I) is never written or read back. The epilogue rounds as the unfused path does: gate and up to
  a's dtype, silu in fp32 rounded, the product rounded. BN is halved (two tiles of BN / 2 columns per step: the
  same shared memory and registers as one unfused tile).

And the other end: `combine_slots` sums each token's k expert outputs (rows of the down GEMM's output in expert
order) weighted by the router, reading them in place by position, in fp32 -- instead of a scatter back to (token,
slot) order, a mask, an fp32 copy and an einsum (1.3 ms of the same prefill).

The tile transposed (`choose_swap`, 16-bit banks): a program computes acc^T = w x^T, (BN, BM), the weight tile as
the MMA's left operand and the rows as its right, and turns the accumulators back before the epilogue. The same
sums; on Hopper it lets a tile of 16 or 32 rows (a decode batch's few rows an expert) use warp-group MMAs.

Tile sizes come from fixed rules (`choose_tiles`, `choose_swap`), not an autotuner: the launch is a pure function of
the shapes, the same on every call, as a CUDA graph and torch.compile (which sees the kernel as an opaque custom op)
need.
"""

from __future__ import annotations

import math

import torch

from . import support
from .fp8_linear import dequantize

FP8 = torch.float8_e4m3fn

# --------------------------------------------------------------------------------------------- the reference


def grouped_gemm_reference(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor, *, scale=None, block=None,
                           split_rows: int | None = None, rows: torch.Tensor | None = None,
                           swiglu: bool = False) -> torch.Tensor:
    """The plain path: per group, (dequantize b[g] if FP8), then a[rows] @ w^T in a's dtype. Reads `ends` on the
    host (one sync): it is the readable definition the kernel is tested against, not a fast path.
    rows: gather a's rows first (a[rows]); swiglu: then silu(gate) * up of the two halves of the product."""
    _check(a, b, ends, scale, block, split_rows, rows, swiglu)
    if rows is not None:
        a = a[rows.long()]  # (m, K)
    if swiglu:
        gate, up = grouped_gemm_reference(a, b, ends, scale=scale, block=block, split_rows=split_rows).chunk(2, -1)
        return torch.nn.functional.silu(gate) * up  # (m, N / 2)
    out = a.new_zeros(a.shape[0], b.shape[1])  # (m, N): rows of no group stay 0
    start = 0
    for g, end in enumerate(ends.tolist()):
        end = min(end, a.shape[0])
        if end > start:
            w = b[g] if scale is None else dequantize(b[g], scale[g], block, a.dtype, split_rows)  # (N, K)
            out[start:end] = a[start:end] @ w.T  # (size_g, N)
        start = max(start, end)
    return out


def _check(a, b, ends, scale, block, split_rows=None, rows=None, swiglu=False):
    if a.dim() != 2 or b.dim() != 3 or ends.dim() != 1 or a.shape[1] != b.shape[2] or ends.shape[0] != b.shape[0]:
        raise ValueError(f"grouped_gemm: shapes do not agree: a {tuple(a.shape)} (m, K), b {tuple(b.shape)} "
                         f"(G, N, K), ends {tuple(ends.shape)} (G,)")
    if rows is not None and (rows.dim() != 1 or rows.dtype.is_floating_point):
        raise ValueError(f"grouped_gemm: rows must be a 1-d integer tensor of a's row indices, got "
                         f"{tuple(rows.shape)} {rows.dtype}")
    if swiglu and (b.shape[1] % 2 or (split_rows is not None and 2 * split_rows != b.shape[1])):
        raise ValueError(f"grouped_gemm: swiglu needs b's {b.shape[1]} rows to be gate over up, two equal halves "
                         f"(split_rows {split_rows})")
    if a.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"grouped_gemm: a is {a.dtype}; the activations must be fp32, bf16 or fp16 (an FP8 bank is "
                         "multiplied in a's dtype)")
    if (b.dtype == FP8) != (scale is not None) or (scale is not None and block is None):
        raise ValueError("grouped_gemm: an FP8 bank (float8_e4m3fn) comes with its scale and block, others with "
                         "neither")
    if scale is None and b.dtype != a.dtype:
        raise ValueError(f"grouped_gemm: b is {b.dtype}, a is {a.dtype}: they must agree (or b FP8 with scales)")
    if scale is not None:
        bo, bi = block
        N, K = b.shape[1:]
        halves = [N] if split_rows is None else [split_rows, N - split_rows]  # gate over up: block rows stacked
        nb_n = sum(math.ceil(h / bo) for h in halves)
        if tuple(scale.shape) != (b.shape[0], nb_n, math.ceil(K / bi)):
            raise ValueError(f"grouped_gemm: scale {tuple(scale.shape)} does not fit b {tuple(b.shape)} with block "
                             f"{tuple(block)} (split_rows={split_rows}): want {(b.shape[0], nb_n, math.ceil(K / bi))}")


# ----------------------------------------------------------------------------------------------- the kernel

if support.have_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _tile_dot(x, b_row, rk, mask, dtype, IEEE: tl.constexpr, UPCAST: tl.constexpr, SWAP: tl.constexpr):
        """x (BM, BK) times the (BN, BK) tile of b at b_row + rk, transposed -> (BM, BN) fp32; SWAP: the same
        product transposed, w x^T -> (BN, BM) (the weight tile is the MMA's left operand)."""
        w = tl.load(b_row + rk[None, :], mask=mask, other=0.0).to(dtype)  # (BN, BK)
        if UPCAST:  # Triton's CPU interpreter (3.9) mis-multiplies bf16 tiles: there, multiply in fp32
            x, w = x.to(tl.float32), w.to(tl.float32)
        if SWAP:
            lhs, rhs = w, tl.trans(x)  # (BN, BK) @ (BK, BM)
        else:
            lhs, rhs = x, tl.trans(w)  # (BM, BK) @ (BK, BN)
        if IEEE or UPCAST:
            return tl.dot(lhs, rhs, input_precision="ieee")  # fp32 (fp32 inputs: no tf32)
        return tl.dot(lhs, rhs)  # fp32 accumulate

    @triton.jit
    def _col_scale(part, s, SWAP: tl.constexpr):
        """A partial product scaled by one scale per output column s (BN,): part (BM, BN), or (BN, BM) with SWAP."""
        if SWAP:  # (one return: Triton 3.6 compiles the code after a constexpr branch's return too)
            scaled = part * s[:, None]
        else:
            scaled = part * s[None, :]
        return scaled

    @triton.jit
    def _block_rows(rn, split, nbg, SB_N: tl.constexpr):
        """(BN,) rows of b -> their FP8 block rows (gate's, then up's after `split`)."""
        return tl.where(rn < split, rn // SB_N, nbg + (rn - split) // SB_N)

    @triton.jit
    def _grouped_gemm_kernel(a_ptr, rows_ptr, b_ptr, s_ptr, o_ptr, group_ptr, row0_ptr, row_end_ptr, N, K, nb_n,
                             nb_k, split, nbg, n_work, SB_N: tl.constexpr, SB_K: tl.constexpr,
                             HAS_SCALE: tl.constexpr, HAS_ROWS: tl.constexpr, SWIGLU: tl.constexpr,
                             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
                             UPCAST: tl.constexpr, SWAP: tl.constexpr):
        """Output tiles pid, pid + P, pid + 2P, ... of the n_work (P programs: one tile each unless the launch is
        capped, `programs` in the wrapper)."""
        for tile in range(tl.program_id(0), n_work, tl.num_programs(0)):
            _grouped_tile(tile, a_ptr, rows_ptr, b_ptr, s_ptr, o_ptr, group_ptr, row0_ptr, row_end_ptr, N, K, nb_n,
                          nb_k, split, nbg, SB_N, SB_K, HAS_SCALE, HAS_ROWS, SWIGLU, BM, BN, BK, IEEE, UPCAST,
                          SWAP)

    @triton.jit
    def _grouped_tile(pid, a_ptr, rows_ptr, b_ptr, s_ptr, o_ptr, group_ptr, row0_ptr, row_end_ptr, N, K, nb_n, nb_k,
                      split, nbg, SB_N: tl.constexpr, SB_K: tl.constexpr, HAS_SCALE: tl.constexpr,
                      HAS_ROWS: tl.constexpr, SWIGLU: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, SWAP: tl.constexpr):
        """One (BM, BN) tile of the output: M-tile t of the tile map, columns [n0, n0 + BN). With SWIGLU the output
        has N / 2 columns and the tile reads b's rows n0 + arange(BN) (gate) and N / 2 + n0 + arange(BN) (up)."""
        n_out = N // 2 if SWIGLU else N  # the output's columns
        n_blocks = tl.cdiv(n_out, BN)
        t = pid // n_blocks  # the M-tile; its n-blocks run next to each other (the a tile stays in L2)
        pid_n = pid % n_blocks
        g = tl.load(group_ptr + t).to(tl.int64)  # its group (past the last tile: an empty row range below)
        row0 = tl.load(row0_ptr + t)
        row_end = tl.minimum(tl.load(row_end_ptr + t), row0 + BM)  # rows [row0, row_end) are this tile's
        rm = row0 + tl.arange(0, BM)  # (BM,) rows of the output
        rn = pid_n * BN + tl.arange(0, BN)  # (BN,) columns of the output = rows of b[g] (gate's with SWIGLU)
        m_ok = rm < row_end  # (BM,)
        n_ok = rn < n_out  # (BN,)
        src = tl.load(rows_ptr + rm, mask=m_ok, other=0) if HAS_ROWS else rm  # (BM,) the rows of a read
        a_row = a_ptr + src[:, None].to(tl.int64) * K  # (BM, 1) int64: m * K may pass 2^31
        b_row = b_ptr + g * N * K + rn[:, None].to(tl.int64) * K  # (BN, 1) int64: G*N*K passes 2^31 (LongCat)
        b_up = b_row + n_out * K  # (BN, 1) the up rows (SWIGLU; one expert's N * K fits in int32)
        if HAS_SCALE:
            s_row = s_ptr + g * nb_n * nb_k + _block_rows(rn, split, nbg, SB_N).to(tl.int64) * nb_k  # (BN,)
            s_up = s_ptr + g * nb_n * nb_k + _block_rows(rn + n_out, split, nbg, SB_N).to(tl.int64) * nb_k
        if SWAP:  # the accumulators transposed (BN, BM), turned back before the epilogue
            acc = tl.zeros((BN, BM), dtype=tl.float32)
            acc_up = tl.zeros((BN, BM), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)  # (BM, BN) gate (or the only) accumulator
            acc_up = tl.zeros((BM, BN), dtype=tl.float32)  # (BM, BN) up (SWIGLU)
        k_hi = tl.where(row0 < row_end, K, 0)  # an empty tile skips the loop (and stores nothing: mask all off)
        for k0 in range(0, k_hi, BK):
            rk = k0 + tl.arange(0, BK)  # (BK,)
            k_ok = rk < K  # (BK,)
            x = tl.load(a_row + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
            wmask = n_ok[:, None] & k_ok[None, :]  # (BN, BK)
            part = _tile_dot(x, b_row, rk, wmask, x.dtype, IEEE, UPCAST, SWAP)  # (BM, BN) fp32 (SWAP: (BN, BM))
            if HAS_SCALE:
                s = tl.load(s_row + k0 // SB_K, mask=n_ok, other=0.0)  # (BN,) this step's scales (BK divides bi)
                part = _col_scale(part, s, SWAP)  # the partial sum scaled, not the weight
            acc += part
            if SWIGLU:
                part = _tile_dot(x, b_up, rk, wmask, x.dtype, IEEE, UPCAST, SWAP)  # (BM, BN) fp32
                if HAS_SCALE:
                    part = _col_scale(part, tl.load(s_up + k0 // SB_K, mask=n_ok, other=0.0), SWAP)
                acc_up += part
        if SWAP:
            acc = tl.trans(acc)  # (BM, BN)
            acc_up = tl.trans(acc_up)  # (BM, BN)
        dtype = o_ptr.dtype.element_ty
        if SWIGLU:  # rounded as the unfused path: h in a's dtype, silu(gate) rounded, the product rounded
            gate = acc.to(dtype).to(tl.float32)  # (BM, BN)
            act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # (BM, BN) silu
            acc = act * acc_up.to(dtype).to(tl.float32)  # (BM, BN)
        out = o_ptr + rm[:, None].to(tl.int64) * n_out + rn[None, :]  # (BM, BN)
        tl.store(out, acc.to(dtype), mask=m_ok[:, None] & n_ok[None, :])


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _pow2_divisor(x: int) -> int:
    return x & -x  # the largest power of two dividing x


def _k_step(K: int, dtype: torch.dtype, block=None) -> int:
    """BK (see `choose_tiles`); refuses an FP8 block width it cannot step through (a function of dtype and block
    alone, so that the wrapper checks it without touching the row count, which torch.compile may keep symbolic)."""
    wide = dtype != torch.float32
    if block is None:
        return min(64 if wide else 32, max(16, _next_pow2(K)))
    bk = min(128 if wide else 64, _pow2_divisor(block[1]))
    if bk < 16:
        raise ValueError(f"grouped_gemm: FP8 block {tuple(block)}: the kernel's K step must divide the block width "
                         f"{block[1]} and be a power of two >= 16; dequantize such weights instead")
    return bk


def choose_tiles(m: int, N: int, K: int, G: int, dtype: torch.dtype, block=None) -> tuple[int, int, int, int]:
    """(BM, BN, BK, num_warps) for m rows in G groups, a fixed rule of the shapes (num_stages is always 3).

    * BM from the mean group height m / G (each group pads up to a multiple of BM, so a tall BM wastes rows):
      16 / 32 / 64, and 128 from 128 rows a group (LongCat-Flash's 8k-token prefill, 192 rows an expert: 20.6 ms
      with 128 x 128 tiles and 8 warps against 24.4 ms with 64 x 128, one H200, docs/perf-run14; at 2k tokens,
      48 rows an expert, 64 x 128 stays the faster, 10.0 vs 10.7 ms). 16: the smallest dot tile.
    * BN 128 (16..128 for a narrow N); BK 64 (bf16) / 32 (fp32) -- at most 3 stages x (BM + BN) x BK of tiles in
      shared memory.
    * FP8 (block = (bo, bi)): BK is the largest power of two <= 128 (64 with fp32 activations) dividing bi, so that a
      K step lies inside one scale column; a block width with no such divisor >= 16 is refused (ValueError).
      LongCat-Flash's 128 x 128 blocks with bf16: 64 x 128 x 128 tiles, vLLM's default for block FP8.
    * num_warps 4 (one warp group, 64 x 128), 8 for 128 x 128.
    """
    per_group = math.ceil(m / max(G, 1))
    bm = 16 if per_group <= 16 else 32 if per_group <= 32 else 64 if per_group < 128 else 128
    bn = min(128, max(16, _next_pow2(N)))
    bk = _k_step(K, dtype, block)
    return bm, bn, bk, 8 if bm * bn >= 128 * 128 else 4


def choose_swap(m: int, N: int, K: int, G: int, dtype: torch.dtype, block=None) -> bool:
    """Compute each tile transposed, acc^T = w x^T (BN, BM), and turn it back before the epilogue? For 16-bit
    banks, yes; for FP8 banks (block given), no.

    Swapped, the weight tile is the MMA's left operand and the rows (tokens) its right, so on Hopper a tile of 16
    or 32 rows still runs warp-group MMAs (the unswapped form falls back to smaller MMAs below 64 rows) and the
    weights stream as the wide side. Measured (tools/bench_experts.py's Triton path, one H200,
    docs/perf-run15/swap.json, us): GLM-4.7-Flash bf16 32 tokens 345 vs 356, 2,048 tokens 678 vs 727;
    LongCat-Flash bf16 2,048 tokens 9,883 vs 9,863 (even), 8,192 tokens 19,622 vs 22,011. FP8 banks, whose weight
    tile is converted to bf16 in registers first, run slower swapped (GLM 32 tokens 371 vs 327, LongCat 2,048
    tokens 13,208 vs 11,078)."""
    return block is None


def _tile_map(ends: torch.Tensor, m: int, bm: int, n_tiles: int):
    """Device-side: for each of the n_tiles M-tiles, (group, first row, group end) as int32 (n_tiles,) tensors.

    Plain torch ops on the device, no host sync: the same launch whatever the group sizes (see the module doc).
    """
    ends = ends.long().clamp(0, m)  # (G,)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])  # (G,) each group's first row
    tiles = (ends - starts).clamp(min=0).add(bm - 1).div(bm, rounding_mode="floor")  # (G,) cdiv(size_g, BM)
    tile_end = tiles.cumsum(0)  # (G,) cumulative: group g owns tiles [tile_end[g-1], tile_end[g])
    t = torch.arange(n_tiles, device=ends.device)  # (n_tiles,)
    group = torch.searchsorted(tile_end, t, right=True)  # (n_tiles,) G for the slack tiles past the last group
    live = group < ends.shape[0]  # (n_tiles,)
    g = group.clamp(max=ends.shape[0] - 1)  # (n_tiles,) a valid index to gather with
    row0 = starts[g] + (t - (tile_end[g] - tiles[g])) * bm  # (n_tiles,) the tile's first row
    row_end = torch.where(live, ends[g], row0)  # (n_tiles,) slack tiles: empty [row0, row0)
    return g.int(), row0.int(), row_end.int()


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor, *, scale: torch.Tensor | None = None,
                 block=None, split_rows: int | None = None, rows: torch.Tensor | None = None,
                 swiglu: bool = False, programs: int | None = None, zero_rest: bool = True) -> torch.Tensor:
    """Rows [ends[g-1], ends[g]) of a (m, K) times b[g]^T, b (G, N, K) -> (m, N) in a.dtype; rows past ends[-1]: 0.

    b: a.dtype, or float8_e4m3fn with scale (G, nb_N, nb_K) fp32 and block (bo, bi); split_rows: b's rows [0, s)
    and [s, N) were quantized as two weights with their block rows stacked (an expert's gate over up), as in
    `dequantize`. `ends` (G,) int: cumulative, non-decreasing, on a's device (values past m are clamped to m).
    rows (m,) int: row r of the product reads a[rows[r]] (a may then have any number of rows); swiglu: b is gate
    over up and the result silu(gate) * up (m, N / 2) (module doc). programs: launch at most this many programs,
    each looping over output tiles (a persistent grid: it leaves the other SMs to a concurrent stream; measured
    slower, docs/perf-run15). zero_rest=False: rows past ends[-1] are left unwritten (torch.empty), for callers
    that never read them (model/experts.py's kernel path: a memset fewer each call).
    No host sync, a launch fixed by the shapes: callable inside a CUDA graph and under torch.compile.
    """
    support.require(a, "the grouped GEMM kernel")
    _check(a, b, ends, scale, block, split_rows, rows, swiglu)
    _k_step(b.shape[2], a.dtype, block)  # a block width the kernel cannot step through: ValueError here
    (m, K), (G, N) = (a.shape if rows is None else (rows.shape[0], a.shape[1])), b.shape[:2]
    bm = choose_tiles(m, N, K, G, a.dtype, block)[0]
    n_tiles = m // bm + 1 + G  # >= cdiv(m, bm) + G: the bound on the padded groups' tiles (module doc)
    # The tile map is plain torch ops here, outside the opaque op, so that torch.compile fuses them into a kernel
    # or two (and shares them between the gate_up and down GEMMs of one MoE call: same rows, same groups); inside
    # the op they ran eagerly as ~20 small kernels per call.
    group, row0, row_end = _tile_map(ends, m, bm, n_tiles)  # (n_tiles,) each, on the device
    return torch.ops.longcat_ref.grouped_gemm(a, b, group, row0, row_end, bm, scale,
                                              None if block is None else list(block), split_rows,
                                              None if rows is None else rows.int(), swiglu, programs or 0,
                                              zero_rest)


@torch.library.custom_op("longcat_ref::grouped_gemm", mutates_args=())
def _grouped_gemm_op(a: torch.Tensor, b: torch.Tensor, group: torch.Tensor, row0: torch.Tensor,
                     row_end: torch.Tensor, bm: int, scale: torch.Tensor | None, block: list[int] | None,
                     split_rows: int | None, rows: torch.Tensor | None = None, swiglu: bool = False,
                     programs: int = 0, zero_rest: bool = True) -> torch.Tensor:
    """The kernel launch, given the tile map (`_tile_map`: each M-tile's group and row range) and its BM."""
    m, K = a.shape if rows is None else (rows.shape[0], a.shape[1])
    G, N = b.shape[:2]
    shape = (m, N // 2 if swiglu else N)
    out = (torch.zeros if zero_rest else torch.empty)(shape, device=a.device, dtype=a.dtype)  # rows of no group
    if m == 0 or N == 0 or G == 0:
        return out
    _, bn, bk, warps = choose_tiles(m, N, K, G, a.dtype, block)
    if swiglu:  # two tiles (gate, up) of half the columns: the shared memory and registers of one
        bn = max(16, min(bn // 2, _next_pow2(N // 2)))
    n_tiles = group.shape[0]
    if scale is None:
        s, sb_n, sb_k, nb_n, nb_k, split, nbg = out, 1, 1, 0, 0, N, 0  # (s unused: HAS_SCALE=False)
    else:
        s = scale.float().contiguous()  # (G, nb_N, nb_K)
        (sb_n, sb_k), (nb_n, nb_k) = block, s.shape[1:]
        split = N if split_rows is None else split_rows
        nbg = math.ceil(split / sb_n)  # the gate's block rows; the up half's follow
    n_work = n_tiles * math.ceil(out.shape[1] / bn)  # output tiles
    grid = (n_work if not programs else min(n_work, programs),)
    _grouped_gemm_kernel[grid](a.contiguous(), group if rows is None else rows, b.contiguous(), s, out, group, row0,
                               row_end, N, K, nb_n, nb_k, split, nbg, n_work, SB_N=sb_n, SB_K=sb_k,
                               HAS_SCALE=scale is not None, HAS_ROWS=rows is not None, SWIGLU=swiglu, BM=bm, BN=bn,
                               BK=bk, IEEE=a.dtype == torch.float32, UPCAST=support.interpreting(),
                               SWAP=choose_swap(m, N, K, G, a.dtype, block), num_warps=warps,
                               num_stages=3)
    return out


@_grouped_gemm_op.register_fake
def _(a, b, group, row0, row_end, bm, scale, block, split_rows, rows=None, swiglu=False, programs=0,
      zero_rest=True):
    return a.new_empty(a.shape[0] if rows is None else rows.shape[0], b.shape[1] // 2 if swiglu else b.shape[1])


# ------------------------------------------------------------------------------ the weighted sum over slots
#
# After the down GEMM, row r of y (m, H) is one (token, slot) pair's expert output, in expert order. The MoE's
# output is, per token t, the router-weighted sum over its k slots, in fp32:
#
#     out[t] += round( sum_{j < k, pos[t, j] >= 0}  w[t, j] * y[pos[t, j]] )        pos: the pair's row of y
#
# One program per (token, block of BH channels): k masked loads of a row block of y (a slot with pos < 0 -- a zero
# expert, another rank's -- reads nothing), an fp32 accumulator, one load and store of out. y is read once in
# all, in place: no scatter back to (token, slot) order, no fp32 copy.


def combine_slots_reference(y: torch.Tensor, pos: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (n, H) += sum over slots j with pos[n, j] >= 0 of w[n, j] * y[pos[n, j]] (fp32), rounded to out's dtype.

    y (m, H); pos (n, k) int rows of y (< 0: skipped); w (n, k) fp32. The plain path, the kernel's definition."""
    ok = pos >= 0  # (n, k)
    ys = torch.where(ok[..., None], y[pos.clamp(min=0).long()].float(), 0.0)  # (n, k, H) fp32
    return out.add_((ys * torch.where(ok, w, 0.0)[..., None]).sum(1).to(out.dtype))  # (n, H)


if support.have_triton():

    @triton.jit
    def _combine_kernel(y_ptr, pos_ptr, w_ptr, o_ptr, H, KS: tl.constexpr, BH: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)  # the token
        rh = tl.program_id(1) * BH + tl.arange(0, BH)  # (BH,) channels
        h_ok = rh < H  # (BH,)
        acc = tl.zeros((BH,), dtype=tl.float32)  # (BH,)
        for j in tl.static_range(KS):  # the slots, in order
            p = tl.load(pos_ptr + t * KS + j)  # scalar: the pair's row of y, < 0 for none
            wj = tl.load(w_ptr + t * KS + j)  # scalar fp32
            yv = tl.load(y_ptr + tl.maximum(p, 0).to(tl.int64) * H + rh, mask=h_ok & (rh * 0 + p >= 0),
                         other=0.0)  # (BH,)
            acc += wj * yv.to(tl.float32)
        o = o_ptr + t * H + rh  # (BH,)
        prev = tl.load(o, mask=h_ok, other=0.0)  # (BH,)
        dtype = o_ptr.dtype.element_ty
        tl.store(o, (prev.to(tl.float32) + acc.to(dtype).to(tl.float32)).to(dtype), mask=h_ok)


def combine_slots(y: torch.Tensor, pos: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The kernel form of `combine_slots_reference` (adds into out in place and returns it)."""
    support.require(y, "the slot-combine kernel")
    n, k = pos.shape
    if y.dim() != 2 or out.shape != (n, y.shape[1]) or w.shape != (n, k) or not out.is_contiguous():
        raise ValueError(f"combine_slots: shapes do not agree: y {tuple(y.shape)} (m, H), pos {tuple(pos.shape)} "
                         f"(n, k), w {tuple(w.shape)} (n, k), out {tuple(out.shape)} (n, H), contiguous")
    torch.ops.longcat_ref.combine_slots(y, pos.int().contiguous(), w.float().contiguous(), out)
    return out


@torch.library.custom_op("longcat_ref::combine_slots", mutates_args=("out",))
def _combine_slots_op(y: torch.Tensor, pos: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    n, k = pos.shape
    H = y.shape[1]
    if n == 0 or H == 0:
        return
    bh = min(1024, max(16, _next_pow2(H)))
    _combine_kernel[(n, math.ceil(H / bh))](y.contiguous(), pos, w, out, H, KS=k, BH=bh, num_warps=4)


@_combine_slots_op.register_fake
def _(y, pos, w, out):
    return None
