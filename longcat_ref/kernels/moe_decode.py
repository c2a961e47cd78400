"""The routed experts of a few decode tokens in two Triton kernels, reading each chosen expert's weights in place.

What is computed (the math of `Experts.forward_gather`, model/experts.py), for tokens n and router slots j:

    out[n] = sum_j w[n, j] * down_e (silu(gate_e x[n]) * up_e x[n]),      e = idx[n, j] - first_expert

with the expert bank stacked as the model holds it:

    gate_up  (E, 2I, H)   rows [0, I) are gate_e, rows [I, 2I) are up_e
    down     (E, H, I)

Why a kernel at all. At decode time there are a handful of tokens and k (4 for GLM-4.7-Flash, 12 for LongCat-Flash)
experts each: every (token, slot) pair multiplies ONE vector by an expert's (2I, H) and (H, I) matrices. That is a
matrix-vector product (GEMV): two flops per weight read, so the time is the time to read the chosen experts'
weights from memory once. The plain forms either copy those weights first (gather: `gate_up[idx]` materialises
n*k expert matrices, then reads them again) or sort tokens into grouped-GEMM tiles that are mostly empty. Here each
program computes its slice straight from the bank, `gate_up + e * stride_e`: no copy, no sort, no host sync.
(Once per (token, slot) that chose the expert: two of the n tokens choosing the same expert read it twice -- the
second read often from L2. For the one-token decode this is made for, every chosen expert is read exactly once.)

Why two kernels. down needs the whole activation a = silu(gate) * up (I values) of a (token, slot) before any of
its outputs can be summed, and those I values are produced by many programs of the first kernel. A kernel launch
boundary is the cheap, deterministic grid-wide barrier between them (the (n*k, I) activation buffer in between is
tiny: a few KB).

    Kernel 1  grid (n*k, cdiv(I, BLOCK_I))                                                    "gate_up + act"
        program (p, ib), p = token * k + slot, e = its local expert:
            for each BLOCK_H chunk h of the hidden axis:            tiles (BLOCK_I, BLOCK_H) of gate_e and of up_e
                gate[rows] += sum_h W_gate[e, rows, h] * x[token, h]    rows = [ib*BLOCK_I, +BLOCK_I)
                up[rows]   += sum_h W_up[e, rows, h]   * x[token, h]    fp32 accumulators, elementwise * and tl.sum
            act[p, rows] = silu(gate) * up                                  -> (n*k, I) buffer in x.dtype

    Kernel 2  grid (n*k, cdiv(H, BLOCK_O))                                                    "down, weighted"
        program (p, ob), p = token * k + slot:
            part[p, rows] = w[p] * sum_i W_down[e, rows, i] * act[p, i]     over BLOCK_K chunks of I, fp32
                                                                            rows = [ob*BLOCK_O, +BLOCK_O) of H
    then  out[token] = sum_j part[token * k + j]     (the sum over the k slots: fixed order, no atomics)

    The custom op returns the partials (n, k, H) and `fused_moe` sums them in ordinary PyTorch: under
    torch.compile that sum is fused into the kernel that adds the MoE output to the residual stream, instead of
    two launches of its own (a reduction and a cast) inside the op. (Measured, one H200, 2026-12-02: those two were
    ~5 us of each of GLM-4.7-Flash's 46 MoE layers at batch 1.)

    (The first version looped over the k slots inside each program of kernel 2: n * H / BLOCK_O programs, too few
    loads in flight -- GLM-4.7-Flash's down projection ran at a sixth of the bandwidth on an H200. One program per
    slot gives k times more programs; the price is the (n*k, H) fp32 partials, a few KB.)

Both grids depend only on shapes: no data-dependent launch, no host sync, so the pair can be captured in a CUDA graph
and, wrapped as the custom op `longcat_ref::fused_moe`, sits opaque inside `torch.compile(fullgraph=True)`.

The shared expert (GLM-4.7-Flash: one SwiGLU of the experts' width, added unweighted) can ride along as one more
slot per token, `shared=(gate, up, down)`: slot k of each token points at the shared matrices instead of the bank
and has weight 1, so the dense FFN costs no launches of its own (it would be two reductions per layer). The grids
become (n*(k+1), ...), and everything else is the same.

Slots that are not ours (zero-computation experts, i.e. idx >= E; other ranks' experts under expert parallelism,
i.e. idx - first_expert outside [0, E)) are handled with masks: the program's weight loads are all masked off (no
byte of any expert is read for them), kernel 1 writes zeros and kernel 2 weights them 0.

Offsets into the banks are int64: E * 2I * H is 512 * 4096 * 6144 ~ 1.3e10 for LongCat-Flash, past 2^31.

FP8 (block-scaled, the DeepSeek-V3 layout of io/fp8.py): a weight matrix W (R, C) is W8 (R, C) float8_e4m3fn and
S (ceil(R/bo), ceil(C/bi)) fp32, W[r, c] = float(W8[r, c]) * S[r // bo, c // bi]. The kernels load the fp8 bytes
(half the bytes of bf16 -- the point of keeping FP8 weights) and dequantize in registers. The row tiles are chosen
so that BLOCK_I and BLOCK_O divide bo: a tile's rows then lie in one block row, and the scales it needs are one
vector over its columns, s[c] = S[row block, c // bi]. That vector is folded into the vector the tile multiplies:

    sum_c W[r, c] x[c] = sum_c W8[r, c] (S[r // bo, c // bi] x[c])            x is the token (kernel 1) or act (2)

one multiply per column instead of one per weight, correct for any reduction tile and for partial last blocks (R
or C not a multiple of the block: the tile's masked tail and the block's missing tail coincide). The scale indices:

    gate_up_scale (E, 2*nbg, ceil(H/bi)), nbg = ceil(I/bo): gate and up are separate tensors on disk, each with its
        own nbg block rows, stacked: gate row i -> block row i // bo, up row I + i -> block row nbg + i // bo
        (NOT (I + i) // bo: when I is not a multiple of bo, up's blocks do not continue gate's)
    down_scale    (E, ceil(H/bo), ceil(I/bi)): row o, column c -> [e, o // bo, c // bi]

Tile sizes and warps: `choose_launch` (`choose_tiles` is its tiles), a fixed heuristic of the shapes (no
triton.autotune: its first call benchmarks, which is neither deterministic nor allowed inside a CUDA graph capture).
See its docstring. One decode token runs in one-warp programs of a single row (kernel 1) or two (kernel 2): for
GLM-4.7-Flash 7,680 and 5,120 programs, measured 21.5 -> 16.8 and 12.0 -> 10.4 us in the compiled step; for the
LongCat-Flash layer 106.9 -> 101.2 and 83.5 -> 53.4 us (docs/perf-run12/).

Inference only: the op has no backward (autograd raises if asked for gradients through it).

`fused_moe_reference` is the same sum in plain PyTorch, the definition the kernels are tested equal to
(tests/test_kernel_moe.py). Triton is imported only if it is installed: without it this module still imports and
`fused_moe` raises a one-line error (kernels/support.py).
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import support
from .fp8_linear import dequantize

WHAT = "fused_moe (the fused MoE decode kernels)"
TARGET_PROGRAMS = 512  # enough programs in flight to keep an H200's memory busy (~4 per SM on 132 SMs)
# 16-bit banks, measured (one H200, 2026-12-02, `python -m longcat_ref.tools.tune_moe`, docs/perf-run8/tiles.json):
# kernel 1's row tile at most 16 (LongCat-Flash: 32 -> 16 rows, 297 -> 281 us per layer), and kernel 2's row tile
# as narrow as 8 rows until there are DOWN_TARGET_PROGRAMS programs (LongCat-Flash: 32 -> 8 rows, 297 -> 231 us;
# GLM-4.7-Flash: 16 -> 8 rows, 28.7 -> 26.2 us). FP8 banks kept the first rule: every tile within ~5% there.
ROW_CAP_16BIT = 16
DOWN_TARGET_PROGRAMS = 8192
NUM_WARPS = 4
# The weight prefetch (with PDL only; off: measured no faster): before its dependent-launch wait kernel 2's programs
# ask L2 for their down rows, the expert read from the router's ids of two kernels back (complete by then in
# practice; a stale id would only prefetch the wrong lines: the ids are read again after the wait for the real
# loads), PREFETCH_DOWN; kernel 1's shared-expert programs likewise for their gate / up rows (no kernel writes them;
# the routed slots' rows depend on the router's output, still being written), PREFETCH_SHARED. support.prefetch_l2: a
# hint, the same bits. Measured on one H100 (2026-12-07, docs/perf-run22/), GLM-4.7-Flash's compiled batch-1 step:
# both on, down 566 -> 432 us a step over 46 layers and gate_up 1028 -> 1105 us; the down prefetch alone, down 564
# -> 449 us and gate_up 1027 -> 1155 us (its early programs' requests slow the gate_up kernel still running), the
# step 3.433 / 3.449 ms off against 3.446 / 3.456 on. Read at launch: the A/B of a benchmark
PREFETCH_DOWN = False
PREFETCH_SHARED = False
# The shared expert's gate / up rows LOADED (into registers, not an L2 hint) before kernel 1's dependent-launch wait,
# where a program's rows are one chunk (BLOCK_H >= H: the one-token tiles): the shared expert depends on no kernel
# before it, so its programs resident while the router's selection runs read their weights then. Off and unmeasured:
# written for docs/perf-run25/'s A/B, which got no GPU (2026-12-07); tested bit-equal on the CPU, its PTX checked
PRELOAD_SHARED = False
# One decode token, 16-bit banks: one warp per program and rows of 1 (kernel 1, 2048 columns a load) or 2 (kernel
# 2), measured (one H200, 2026-12-03, `tune_moe --narrow` and docs/perf-run12/moe_pair.py): the pair for one
# GLM-4.7-Flash token (5 slots with its shared expert) 30.5 -> 25.5 us, for one LongCat-Flash token (12 slots)
# 218.5 -> 200.3 us. Two or more tokens (speculative verify, small batches; not measured narrow) keep the rules above.
NARROW_TOKENS = 1  # n at most this -> (1 row, up to 2048 columns, 1 warp) and (2 rows, 512 columns, 1 warp)


# ------------------------------------------------------------------------------------------------ the kernels
if support.have_triton():
    import triton
    import triton.language as tl

    from .support import prefetch_l2

    @triton.jit
    def _gate_up_act_kernel(
        x_ptr,  # (n, H) contiguous, x.dtype
        idx_ptr,  # (n*k,) global expert ids, int64 (or int32)
        gu_ptr,  # (E, 2I, H) gate_up bank, x.dtype or fp8, strides s_gu_*
        gus_ptr,  # (E, 2*nbg, ceil(H/bi)) fp32 scales (FP8 only; any tensor otherwise), strides s_gus_*
        act_ptr,  # (n*KS, I) contiguous, x.dtype: the output
        sg_ptr, su_ptr,  # (I, H) the shared expert's gate and up (SHARED only; any tensor otherwise), strides s_sh_*
        first_expert, n_local, H, I, nbg,
        s_gu_e, s_gu_r, s_gu_c, s_gus_e, s_gus_r, s_gus_c, s_sh_r, s_sh_c,
        K: tl.constexpr, KS: tl.constexpr, SHARED: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr,
        FP8: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr,
        PDL: tl.constexpr = False, PF: tl.constexpr = False, PF_LINES: tl.constexpr = 1, LINE: tl.constexpr = 64,
        EARLY: tl.constexpr = False,
    ):
        if EARLY:  # the shared expert's rows of this program, loaded before the wait (PRELOAD_SHARED; one chunk)
            sh0 = tl.program_id(0) % KS == K  # (EARLY implies SHARED and BLOCK_H >= H)
            i0 = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)  # (BLOCK_I,)
            h0 = tl.arange(0, BLOCK_H)  # (BLOCK_H,) the whole row
            m0 = (i0 < tl.where(sh0, I, 0))[:, None] & (h0 < H)[None, :]  # (BLOCK_I, BLOCK_H): routed -> nothing
            pre_g = tl.load(sg_ptr + i0.to(tl.int64)[:, None] * s_sh_r + h0[None, :] * s_sh_c, mask=m0, other=0.0)
            pre_u = tl.load(su_ptr + i0.to(tl.int64)[:, None] * s_sh_r + h0[None, :] * s_sh_c, mask=m0, other=0.0)
        if PF:  # the shared expert's rows of this program, asked of L2 before the wait (PREFETCH_SHARED)
            if tl.program_id(0) % KS == K:  # (PF implies SHARED, 16-bit matrices with contiguous rows)
                ri = tl.minimum(tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I), I - 1).to(tl.int64)  # (BLOCK_I,)
                cols = tl.minimum(tl.arange(0, PF_LINES), (H - 1) // LINE) * LINE  # (PF_LINES,) line starts
                prefetch_l2(sg_ptr + ri[:, None] * s_sh_r + cols[None, :])  # (BLOCK_I, PF_LINES) gate's lines
                prefetch_l2(su_ptr + ri[:, None] * s_sh_r + cols[None, :])  # up's
        if PDL:  # programmatic dependent launch (support.pdl): wait for the previous kernel, let the next one start
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        p = tl.program_id(0)  # the (token, slot) pair: token * KS + slot; KS = K, or K + 1 with the shared expert
        ib = tl.program_id(1)  # which BLOCK_I rows of gate (and of up)
        tok = p // KS
        slot = p % KS
        j = tok * K + tl.minimum(slot, K - 1)  # its entry in idx (the shared slot reads a neighbour's, unused)
        e = tl.load(idx_ptr + j).to(tl.int64) - first_expert  # scalar local expert id, int64
        mine = (e >= 0) & (e < n_local)  # scalar: do we hold this expert?
        e = tl.where(mine, e, 0)  # keep the pointers inside the bank even where every load is masked
        g_base = gu_ptr + e * s_gu_e  # scalar pointer: gate_e's row 0
        u_base = g_base + I * s_gu_r  # up_e's row 0 (row I of the stacked matrix)
        s_r, s_c = s_gu_r, s_gu_c
        if SHARED:  # the last slot is the shared expert: its own matrices, weight 1
            sh = slot == K
            mine = mine | sh
            g_base = tl.where(sh, sg_ptr, g_base)
            u_base = tl.where(sh, su_ptr, u_base)
            s_r = tl.where(sh, s_sh_r, s_gu_r)
            s_c = tl.where(sh, s_sh_c, s_gu_c)
        i = ib * BLOCK_I + tl.arange(0, BLOCK_I)  # (BLOCK_I,) rows of gate_e, i.e. rows I + i of up_e
        # (a limit of 0 rather than `(i < I) & mine`: Triton 3.9's interpreter turns block & scalar bool into int32)
        imask = i < tl.where(mine, I, 0)  # (BLOCK_I,): not ours -> no row, nothing is loaded
        if EARLY:  # the shared slot's rows are in registers already: loaded here for the routed slots only
            imask = i < tl.where(mine & (slot != K), I, 0)
        g_rows = g_base + i.to(tl.int64)[:, None] * s_r  # (BLOCK_I, 1) row pointers, int64 offsets
        u_rows = u_base + i.to(tl.int64)[:, None] * s_r  # (BLOCK_I, 1) the same rows of up_e
        if FP8:  # the tile's rows lie in one block row (BLOCK_I | bo): gate's and up's scale rows, as pointers
            sg_row = gus_ptr + e * s_gus_e + ((ib * BLOCK_I) // BO) * s_gus_r
            su_row = gus_ptr + e * s_gus_e + (nbg + (ib * BLOCK_I) // BO) * s_gus_r
        h_end = tl.where(mine, H, 0)  # scalar: no scale is read for a slot that is not ours
        acc_g = tl.zeros((BLOCK_I,), dtype=tl.float32)  # (BLOCK_I,)
        acc_u = tl.zeros((BLOCK_I,), dtype=tl.float32)  # (BLOCK_I,)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)  # (BLOCK_H,) hidden columns of this chunk
            hmask = h < H  # (BLOCK_H,)
            xv = tl.load(x_ptr + tok * H + h, mask=hmask, other=0.0).to(tl.float32)  # (BLOCK_H,)
            m = imask[:, None] & hmask[None, :]  # (BLOCK_I, BLOCK_H)
            wg = tl.load(g_rows + h[None, :] * s_c, mask=m, other=0.0).to(tl.float32)  # (BLOCK_I, BLOCK_H)
            wu = tl.load(u_rows + h[None, :] * s_c, mask=m, other=0.0).to(tl.float32)  # (BLOCK_I, BLOCK_H)
            if EARLY:  # one chunk: the shared slot takes the tiles it loaded before the wait
                wg = tl.where(sh, pre_g.to(tl.float32), wg)
                wu = tl.where(sh, pre_u.to(tl.float32), wu)
            xg, xu = xv, xv
            if FP8:  # W[r, c] x[c] = W8[r, c] (S[r // bo, c // bi] x[c]): the column's scale folded into x
                xg = xv * tl.load(sg_row + (h // BI) * s_gus_c, mask=h < h_end, other=0.0)  # (BLOCK_H,)
                xu = xv * tl.load(su_row + (h // BI) * s_gus_c, mask=h < h_end, other=0.0)  # (BLOCK_H,)
            acc_g += tl.sum(wg * xg[None, :], axis=1)  # (BLOCK_I,) this chunk's part of gate
            acc_u += tl.sum(wu * xu[None, :], axis=1)  # (BLOCK_I,)
        # gate and up rounded to x.dtype as the plain forms do (they come out of a matmul in x.dtype), then
        # silu(gate) * up in fp32, rounded once into the buffer
        g = acc_g.to(act_ptr.dtype.element_ty).to(tl.float32)  # (BLOCK_I,)
        u = acc_u.to(act_ptr.dtype.element_ty).to(tl.float32)  # (BLOCK_I,)
        a = g * tl.sigmoid(g) * u  # (BLOCK_I,): 0 where not ours (g = u = 0)
        tl.store(act_ptr + p * I + i, a.to(act_ptr.dtype.element_ty), mask=i < I)

    @triton.jit
    def _down_kernel(
        act_ptr,  # (n*k, I) contiguous, x.dtype (kernel 1's output)
        w_ptr,  # (n*k,) router weights, fp32
        idx_ptr,  # (n*k,) global expert ids
        d_ptr,  # (E, H, I) down bank, x.dtype or fp8, strides s_d_*
        ds_ptr,  # (E, ceil(H/bo), ceil(I/bi)) fp32 scales (FP8 only; any tensor otherwise), strides s_ds_*
        part_ptr,  # (n*KS, H) fp32: each slot's weighted output, summed over slots afterwards
        sd_ptr,  # (H, I) the shared expert's down (SHARED only; any tensor otherwise), strides s_sd_*
        first_expert, n_local, H, I,
        s_d_e, s_d_r, s_d_c, s_ds_e, s_ds_r, s_ds_c, s_sd_r, s_sd_c,
        K: tl.constexpr, KS: tl.constexpr, SHARED: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr,
        FP8: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
        PDL: tl.constexpr = False, PF: tl.constexpr = False, PF_LINES: tl.constexpr = 1, LINE: tl.constexpr = 64,
    ):
        if PF:  # this program's rows of down, asked of L2 before the wait (PREFETCH_DOWN; 16-bit, contiguous rows)
            p0 = tl.program_id(0)
            j0 = (p0 // KS) * K + tl.minimum(p0 % KS, K - 1)
            e0 = tl.load(idx_ptr + j0, cache_modifier=".cg").to(tl.int64) - first_expert  # the router's id (L2):
            e0 = tl.minimum(tl.maximum(e0, 0), n_local - 1)  # only an address, kept inside the bank
            base, s_row = d_ptr + e0 * s_d_e, s_d_r
            if SHARED:
                if p0 % KS == K:
                    base, s_row = sd_ptr, s_sd_r
            ro = tl.minimum(tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O), H - 1).to(tl.int64)  # (BLOCK_O,)
            cols = tl.minimum(tl.arange(0, PF_LINES), (I - 1) // LINE) * LINE  # (PF_LINES,) line starts
            prefetch_l2(base + ro[:, None] * s_row + cols[None, :])  # (BLOCK_O, PF_LINES)
        if PDL:  # programmatic dependent launch (support.pdl): wait for the previous kernel, let the next one start
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        p = tl.program_id(0)  # the (token, slot) pair: token * KS + slot
        ob = tl.program_id(1)  # which BLOCK_O rows of down (= output features of H)
        o = ob * BLOCK_O + tl.arange(0, BLOCK_O)  # (BLOCK_O,)
        tok = p // KS
        slot = p % KS
        j = tok * K + tl.minimum(slot, K - 1)  # its entry in idx and w
        e = tl.load(idx_ptr + j).to(tl.int64) - first_expert  # scalar local expert id
        mine = (e >= 0) & (e < n_local)
        e = tl.where(mine, e, 0)
        wj = tl.where(mine, tl.load(w_ptr + j).to(tl.float32), 0.0)  # scalar router weight, 0 if not ours
        d_base = d_ptr + e * s_d_e  # scalar pointer: down_e's row 0
        s_r, s_c = s_d_r, s_d_c
        if SHARED:  # the shared expert: its own matrix, weight 1
            sh = slot == K
            mine = mine | sh
            wj = tl.where(sh, 1.0, wj)
            d_base = tl.where(sh, sd_ptr, d_base)
            s_r = tl.where(sh, s_sd_r, s_d_r)
            s_c = tl.where(sh, s_sd_c, s_d_c)
        rows = d_base + o.to(tl.int64)[:, None] * s_r  # (BLOCK_O, 1) row pointers, int64
        rmask = o < tl.where(mine, H, 0)  # (BLOCK_O,): not ours -> no row, nothing is loaded
        i_end = tl.where(mine, I, 0)  # scalar: the activation's length, 0 if not ours
        if FP8:  # the tile's rows lie in one block row (BLOCK_O | bo)
            s_row = ds_ptr + e * s_ds_e + ((ob * BLOCK_O) // BO) * s_ds_r
        y = tl.zeros((BLOCK_O,), dtype=tl.float32)  # (BLOCK_O,)
        for c0 in range(0, I, BLOCK_K):
            c = c0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,) columns of down = the activation's index
            cmask = c < i_end  # (BLOCK_K,)
            a = tl.load(act_ptr + p * I + c, mask=cmask, other=0.0).to(tl.float32)  # (BLOCK_K,)
            if FP8:  # the column's scale folded into the activation
                a = a * tl.load(s_row + (c // BI) * s_ds_c, mask=cmask, other=0.0)  # (BLOCK_K,)
            wd = tl.load(rows + c[None, :] * s_c, mask=rmask[:, None] & cmask[None, :],
                         other=0.0).to(tl.float32)  # (BLOCK_O, BLOCK_K)
            y += tl.sum(wd * a[None, :], axis=1)  # (BLOCK_O,)
        tl.store(part_ptr + p * H + o, wj * y, mask=o < H)


# ------------------------------------------------------------------------------------------------ tiles
def _pow2_divisor(b: int) -> int:
    """The largest power of two dividing b (a tile must be a power of two for tl.arange)."""
    return b & -b


def _rows_tile(rows: int, row_programs: int, cap: int, target: int = TARGET_PROGRAMS) -> int:
    """The widest row tile in 32, 16, 8 that still launches `target` programs, else 8; never more than cap
    or than the rows there are (rounded up to a power of two)."""
    tile = 8
    for t in (32, 16):
        if row_programs * math.ceil(rows / t) >= target:
            tile = t
            break
    return max(1, min(tile, cap, _next_pow2(rows)))


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def choose_tiles(n: int, k: int, H: int, I: int, block=None, fp8=(False, False)) -> tuple[int, int, int, int]:
    """(BLOCK_I, BLOCK_H, BLOCK_O, BLOCK_K) for n tokens, k slots, hidden H, expert width I.

    A GEMV runs at memory bandwidth only with enough bytes in flight: many programs, each loading big tiles. (A
    first version with 8 x 128 tiles and the slots looped inside kernel 2 ran GLM-4.7-Flash's down projection at a
    sixth of the bandwidth on an H200: 37 us where 6 would do.)

    * Reduction axes (BLOCK_H over H in kernel 1, BLOCK_K over I in kernel 2): up to 512 columns per load, 1 KB of
      a bf16 row, 512 bytes of fp8.
    * Row axes (BLOCK_I over I, BLOCK_O over H): the widest of 32 / 16 / 8 rows that still gives at least
      TARGET_PROGRAMS programs (n*k * cdiv(I, BLOCK_I) in kernel 1, n*k * cdiv(H, BLOCK_O) in kernel 2). For
      16-bit banks, measured: BLOCK_I at most ROW_CAP_16BIT, and kernel 2 aims at DOWN_TARGET_PROGRAMS programs
      (narrower down tiles, more loads in flight). E.g. GLM-4.7-Flash (H=2048, I=1536, k=4), one token, bf16:
      BLOCK_I = 8 (768 programs), BLOCK_O = 8 (1024 programs).
    * FP8 (fp8 = (gate_up is fp8, down is fp8), block = (bo, bi)): a row tile is capped to the largest power of two
      dividing bo, so that its rows lie in one block row; the columns' scales are a vector (see the kernels).

    A pure function of the shapes: deterministic, free, and the same on every call of a CUDA graph / compiled graph.
    """
    return choose_launch(n, k, H, I, block, fp8)[0]


def choose_launch(n: int, k: int, H: int, I: int, block=None, fp8=(False, False)):
    """((BLOCK_I, BLOCK_H, BLOCK_O, BLOCK_K), (kernel 1's warps, kernel 2's)): `choose_tiles`'s rule, and for
    16-bit banks and one token (NARROW_TOKENS) one-warp programs of 1 row x up to 2048 columns (kernel 1) and 2 rows
    x 512 columns (kernel 2), which measured faster for both models' single decode token."""
    big = 1 << 30
    bo = block[0] if block is not None else big
    block_i = _rows_tile(I, n * k, _pow2_divisor(bo) if fp8[0] else ROW_CAP_16BIT)
    block_h = max(1, min(512, _next_pow2(H)))
    block_o = (_rows_tile(H, n * k, _pow2_divisor(bo)) if fp8[1]
               else _rows_tile(H, n * k, big, DOWN_TARGET_PROGRAMS))
    block_k = max(1, min(512, _next_pow2(I)))
    warps_1 = warps_2 = NUM_WARPS
    if not fp8[0] and n <= NARROW_TOKENS:
        block_i, block_h, warps_1 = 1, max(1, min(2048, _next_pow2(H))), 1
    if not fp8[1] and n <= NARROW_TOKENS:
        block_o, warps_2 = min(2, _next_pow2(H)), 1
    return (block_i, block_h, block_o, block_k), (warps_1, warps_2)


# ------------------------------------------------------------------------------------------------ checks
def _check(x, w, idx, gate_up, down, gate_up_scale, down_scale, bo, bi):
    """Shapes and dtypes (never values: no host sync). Raises ValueError naming what is wrong."""
    if x.dim() != 2 or gate_up.dim() != 3 or down.dim() != 3:
        raise ValueError(f"fused_moe: x must be (n, H), gate_up (E, 2I, H), down (E, H, I); got {tuple(x.shape)}, "
                         f"{tuple(gate_up.shape)}, {tuple(down.shape)}")
    n, H = x.shape
    E, I2, H2 = gate_up.shape
    I = I2 // 2
    if H2 != H or I2 % 2 or tuple(down.shape) != (E, H, I):
        raise ValueError(f"fused_moe: x (n, H)={tuple(x.shape)}, gate_up (E, 2I, H)={tuple(gate_up.shape)} and "
                         f"down (E, H, I)={tuple(down.shape)} do not agree")
    if idx.dim() != 2 or idx.shape[0] != n or tuple(w.shape) != tuple(idx.shape):
        raise ValueError(f"fused_moe: w and idx must both be (n, k) with n={n}; got {tuple(w.shape)}, "
                         f"{tuple(idx.shape)}")
    if idx.dtype not in (torch.int64, torch.int32) or not w.dtype.is_floating_point:
        raise ValueError(f"fused_moe: idx must be int64 (or int32) and w floating; got {idx.dtype}, {w.dtype}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"fused_moe: x must be fp32, bf16 or fp16; got {x.dtype}")
    for name, bank, scale, want in (("gate_up", gate_up, gate_up_scale, (E, 2 * _cdiv(I, bo), _cdiv(H, bi))),
                                    ("down", down, down_scale, (E, _cdiv(H, bo), _cdiv(I, bi)))):
        if bank.dtype == torch.float8_e4m3fn:
            if not bo or not bi:
                raise ValueError(f"fused_moe: {name} is float8_e4m3fn: pass block=(bo, bi), e.g. (128, 128)")
            if scale is None or tuple(scale.shape) != want or scale.dtype != torch.float32:
                got = None if scale is None else (tuple(scale.shape), scale.dtype)
                raise ValueError(f"fused_moe: {name} is fp8 with block ({bo}, {bi}): {name}_scale must be fp32 "
                                 f"{want}; got {got}")
        elif bank.dtype != x.dtype:
            raise ValueError(f"fused_moe: {name} must be in x's dtype ({x.dtype}) or float8_e4m3fn; got {bank.dtype}")
        elif scale is not None:
            raise ValueError(f"fused_moe: {name}_scale given but {name} is not fp8 ({bank.dtype})")
    for t in (w, idx, gate_up, down, gate_up_scale, down_scale):
        if t is not None and t.device != x.device:
            raise ValueError(f"fused_moe: all tensors must be on x's device ({x.device}); got one on {t.device}")


def prefetch_plan(x, gate_up, down, shared, pdl: bool) -> tuple[dict, dict]:
    """The weight prefetch's constexprs of kernel 1 and kernel 2 (PREFETCH_SHARED, PREFETCH_DOWN; with PDL only): PF
    on where the rows it would prefetch are 16-bit with contiguous columns (kernel 1: the shared expert's gate and up;
    kernel 2: the down bank, and the shared down where there is one); PF_LINES 128-byte lines per row (a power of
    two), LINE elements per line."""
    line = max(1, support.LINE_BYTES // x.element_size())
    E, I2, H = gate_up.shape
    I = I2 // 2
    k1 = PREFETCH_SHARED and pdl and shared is not None and all(t.stride(-1) == 1 for t in shared[:2])
    k2 = (PREFETCH_DOWN and pdl and down.dtype != torch.float8_e4m3fn and down.stride(-1) == 1
          and (shared is None or shared[2].stride(-1) == 1))
    return (dict(PF=k1, PF_LINES=_next_pow2(_cdiv(H, line)), LINE=line),
            dict(PF=k2, PF_LINES=_next_pow2(_cdiv(I, line)), LINE=line))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b) if b else 0


# ------------------------------------------------------------------------------------------------ the launcher
def _launch(x, w, idx, gate_up, down, first_expert, gate_up_scale, down_scale, bo, bi, tiles=None, warps=None,
            shared=None):
    """Run the two kernels: the weighted per-slot outputs (n, k, H) fp32 -- (n, k + 1, H) with shared = (gate (I, H),
    up (I, H), down (H, I)), the shared expert as a last slot of weight 1. tiles=(BLOCK_I, BLOCK_H, BLOCK_O, BLOCK_K)
    overrides choose_tiles, warps=(kernel 1's, kernel 2's) NUM_WARPS (both for tuning scripts)."""
    support.require(x, WHAT)
    _check(x, w, idx, gate_up, down, gate_up_scale, down_scale, bo, bi)
    n, H = x.shape
    k = idx.shape[1]
    E, I = gate_up.shape[0], gate_up.shape[1] // 2
    fp8 = (gate_up.dtype == torch.float8_e4m3fn, down.dtype == torch.float8_e4m3fn)
    if shared is not None:
        _check_shared(x, gate_up, shared)
    ks = k + (shared is not None)  # slots per token
    chosen_tiles, chosen_warps = choose_launch(n, ks, H, I, (bo, bi) if any(fp8) else None, fp8)
    block_i, block_h, block_o, block_k = tiles or chosen_tiles
    for t in (block_i, block_h, block_o, block_k):
        if t < 1 or t & (t - 1):
            raise ValueError(f"fused_moe: tiles must be powers of two, got {(block_i, block_h, block_o, block_k)}")
    if (fp8[0] and bo % block_i) or (fp8[1] and bo % block_o):
        raise ValueError(f"fused_moe: with fp8 block ({bo}, {bi}) the row tiles must divide {bo}, so that a tile's "
                         f"rows lie in one block row: got BLOCK_I={block_i}, BLOCK_O={block_o}")
    if n == 0 or k == 0 or E == 0:
        return torch.zeros(n, ks, H, dtype=torch.float32, device=x.device)
    warps_1, warps_2 = warps or (chosen_warps if tiles is None else (NUM_WARPS, NUM_WARPS))
    pdl = support.pdl(x)  # programmatic dependent launch (sm_90+ CUDA)
    x = x.contiguous()  # (n, H): tiny
    w = w.contiguous().view(-1)  # (n*k,)
    idx = idx.contiguous().view(-1)  # (n*k,)
    act = torch.empty(n * ks, I, dtype=x.dtype, device=x.device)  # (n*ks, I): silu(gate) * up per (token, slot)
    gus = gate_up_scale if fp8[0] else w  # an unused pointer when not fp8 (FP8=False compiles its loads away)
    ds = down_scale if fp8[1] else w
    gus_st = gus.stride() if fp8[0] else (0, 0, 0)
    ds_st = ds.stride() if fp8[1] else (0, 0, 0)
    bo_, bi_ = (bo, bi) if any(fp8) else (1, 1)
    sg, su, sd = shared if shared is not None else (gate_up, gate_up, down)  # unused pointers without SHARED
    sh_st = sg.stride() if shared is not None else (0, 0)
    sd_st = sd.stride() if shared is not None else (0, 0)
    pf1, pf2 = prefetch_plan(x, gate_up, down, shared, pdl)
    _gate_up_act_kernel[(n * ks, triton.cdiv(I, block_i))](
        x, idx, gate_up, gus, act, sg, su,
        first_expert, E, H, I, _cdiv(I, bo_),
        *gate_up.stride(), *gus_st, *sh_st,
        K=k, KS=ks, SHARED=shared is not None, BO=bo_, BI=bi_, FP8=fp8[0], BLOCK_I=block_i, BLOCK_H=block_h,
        PDL=pdl, **pf1, EARLY=PRELOAD_SHARED and shared is not None and block_h >= H and not fp8[0],
        num_warps=warps_1, launch_pdl=pdl)
    part = torch.empty(n * ks, H, dtype=torch.float32, device=x.device)  # (n*ks, H) weighted, fp32
    _down_kernel[(n * ks, triton.cdiv(H, block_o))](
        act, w, idx, down, ds, part, sd,
        first_expert, E, H, I,
        *down.stride(), *ds_st, *sd_st,
        K=k, KS=ks, SHARED=shared is not None, BO=bo_, BI=bi_, FP8=fp8[1], BLOCK_O=block_o, BLOCK_K=block_k,
        PDL=pdl, **pf2, num_warps=warps_2, launch_pdl=pdl)
    return part.view(n, ks, H)  # (n, ks, H) fp32: summed over the slots by `fused_moe`


def _check_shared(x, gate_up, shared):
    """The shared expert as a slot: matrices in x's dtype (banks too, not fp8), gate and up (I, H) with one layout,
    down (H, I)."""
    E, I2, H = gate_up.shape
    sg, su, sd = shared
    ok = (gate_up.dtype == x.dtype and all(t.dtype == x.dtype and t.device == x.device for t in shared)
          and tuple(sg.shape) == tuple(su.shape) == (I2 // 2, H) and tuple(sd.shape) == (H, I2 // 2)
          and sg.stride() == su.stride())
    if not ok:
        raise ValueError(f"fused_moe: shared must be (gate (I, H), up (I, H), down (H, I)) with I={I2 // 2}, H={H}, "
                         f"in x's dtype ({x.dtype}), banks not fp8; got {[(tuple(t.shape), t.dtype) for t in shared]}")


# The custom op: torch.compile sees one opaque node with a known output shape (register_fake) and never traces into
# Triton; eagerly (CPU interpreter or CUDA) it just calls the launcher.
@torch.library.custom_op("longcat_ref::fused_moe", mutates_args=())
def _fused_moe_op(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                  first_expert: int, gate_up_scale: Optional[torch.Tensor], down_scale: Optional[torch.Tensor],
                  block_o: int, block_i: int, shared_gate: Optional[torch.Tensor] = None,
                  shared_up: Optional[torch.Tensor] = None, shared_down: Optional[torch.Tensor] = None) -> torch.Tensor:
    shared = None if shared_gate is None else (shared_gate, shared_up, shared_down)
    return _launch(x, w, idx, gate_up, down, first_expert, gate_up_scale, down_scale, block_o, block_i, shared=shared)


@_fused_moe_op.register_fake
def _(x, w, idx, gate_up, down, first_expert, gate_up_scale, down_scale, block_o, block_i, shared_gate=None,
      shared_up=None, shared_down=None):
    _check(x, w, idx, gate_up, down, gate_up_scale, down_scale, block_o, block_i)
    if shared_gate is not None:
        _check_shared(x, gate_up, (shared_gate, shared_up, shared_down))
    slots = idx.shape[1] + (0 if shared_gate is None else 1)  # (an int: a bool would reach the symbolic shape)
    return x.new_empty(x.shape[0], slots, x.shape[1], dtype=torch.float32)  # (n, slots, H) fp32


def fused_moe(x, w, idx, gate_up, down, *, first_expert=0, gate_up_scale=None, down_scale=None,
              block=None, shared=None) -> torch.Tensor:
    """sum_j w[n,j] * expert_{idx[n,j]}(x[n]) -> (n, H) in x.dtype, summed over slots in fp32.

    x (n, H) bf16/fp32; w (n, k) fp32 router weights; idx (n, k) int64 GLOBAL expert ids; local id = idx - first_expert;
    ids outside [0, E) (zero-computation experts, other ranks' experts) contribute 0 and their weights are never read.
    gate_up (E, 2I, H), down (E, H, I): in x.dtype, or float8_e4m3fn with scales:
    gate_up_scale (E, 2*ceil(I/bo), ceil(H/bi)) fp32 -- gate's block rows stacked over up's (gate and up are separate
      tensors on disk, each with its own ceil(I/bo) block rows, so row r of gate_up uses block row r//bo if r < I else
      ceil(I/bo) + (r-I)//bo);
    down_scale (E, ceil(H/bo), ceil(I/bi)) fp32; block=(bo, bi) e.g. (128, 128) real, tests may use (32, 32) or (16,16).

    Runs where kernels/support.can_run(x) (CUDA; the CPU under TRITON_INTERPRET=1), else raises a one-line error.
    Fixed launch shapes and no host sync: it can be captured in a CUDA graph; it is the custom op
    torch.ops.longcat_ref.fused_moe, opaque to torch.compile; the op returns the weighted per-slot outputs (n, k, H)
    fp32, and the sum over slots is here, where the compiler can fuse it with what follows.

    shared (optional): the shared expert's (gate (I, H), up (I, H), down (H, I)) in x.dtype, of the experts' width
    I, with banks in x.dtype (not fp8): computed in the same two launches as one more slot of weight 1, and added.
    """
    bo, bi = block if block is not None else (0, 0)
    sg, su, sd = shared if shared is not None else (None, None, None)
    # contiguous here, outside the opaque op: torch.compile then writes x, w, idx contiguously where they are made
    # (inside the op a strided input cost one eager copy kernel per call)
    x, w, idx = x.contiguous(), w.contiguous(), idx.contiguous()  # (n, H), (n, k), (n, k)
    part = _fused_moe_op(x, w, idx, gate_up, down, int(first_expert), gate_up_scale, down_scale, int(bo), int(bi),
                         sg, su, sd)
    return part.sum(1).to(x.dtype)  # (n, H): the sum over the k slots in fp32, in a fixed order, rounded once


# ------------------------------------------------------------------------------------------------ the reference
def _take(bank: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """bank[local] (advanced indexing) -- for fp8 through a uint8 view, which every device can index."""
    if bank.dtype == torch.float8_e4m3fn:
        return bank.view(torch.uint8)[local].view(torch.float8_e4m3fn)
    return bank[local]


def fused_moe_reference(x, w, idx, gate_up, down, *, first_expert=0, gate_up_scale=None, down_scale=None,
                        block=None, shared=None) -> torch.Tensor:
    """Plain PyTorch: dequantize (if fp8) the chosen experts' weights in fp32, then the forward_gather math:
    gate,up = x@W_gu^T chunks; a = silu(gate)*up; y = a@W_d^T; sum_j w*y in fp32 (non-local slots weighted 0); cast to
    x.dtype.

    The dequantized weights are cast to x.dtype and the matmuls run in x.dtype, as the model runs them when the
    checkpoint is dequantized on load.
    """
    bo, bi = block if block is not None else (0, 0)
    _check(x, w, idx, gate_up, down, gate_up_scale, down_scale, bo, bi)
    E, I = gate_up.shape[0], gate_up.shape[1] // 2
    local = idx.long() - first_expert  # (n, k)
    mine = (local >= 0) & (local < E)  # (n, k)
    local = local.clamp(0, E - 1)  # (n, k): not ours -> some expert, weighted 0 below
    gu = _take(gate_up, local)  # (n, k, 2I, H)
    d = _take(down, local)  # (n, k, H, I)
    if gate_up.dtype == torch.float8_e4m3fn:  # gate's block rows, then up's (split_rows)
        gu = dequantize(gu, gate_up_scale[local], (bo, bi), split_rows=I)  # (n, k, 2I, H) fp32
    if down.dtype == torch.float8_e4m3fn:
        d = dequantize(d, down_scale[local], (bo, bi))  # (n, k, H, I) fp32
    gu, d = gu.to(x.dtype), d.to(x.dtype)
    gate, up = torch.einsum("nh,nkih->nki", x, gu).chunk(2, dim=-1)  # (n, k, I) each
    y = torch.einsum("nki,nkhi->nkh", F.silu(gate) * up, d)  # (n, k, H)
    wk = torch.where(mine, w.float(), 0.0)  # (n, k) fp32
    out = torch.einsum("nkh,nk->nh", y.float(), wk)  # (n, H) fp32
    if shared is not None:  # the shared expert, weight 1: silu(x G^T) * (x U^T) D^T in x.dtype
        sg, su, sd = shared
        out = out + ((F.silu(x @ sg.T) * (x @ su.T)) @ sd.T).float()  # (n, H)
    return out.to(x.dtype)  # (n, H)
