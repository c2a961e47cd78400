"""Absorbed-MLA decode attention over the latent cache, split over the context (flash-decoding), in Triton.

What it computes: the middle of `MLA._absorbed` (model/mla.py), between the absorbed query and the latent output,

    scores = (q_lat . latent + q_rope . k_rope) * softmax_scale + bias     (b, h, t, S)   softmax over S in fp32
    o_lat  = softmax(scores) @ latent                                        (b, h, t, r)

with q_lat (b, h, t, r) the query with W_uk folded in (r = kv_lora_rank = 512), q_rope (b, h, t, d) (d = 64), and
the cache latent (b, S, r), k_rope (b, S, d) shared by every head. `mla_decode_reference` is exactly those einsums;
`mla_decode` is the kernel, tested equal to it (tests/test_kernel_mla.py).

Why a kernel. The unfused einsums write the scores (b, h, t, S) to memory, read them back for the softmax, write p,
read p again for p @ latent, and read the whole latent cache twice (once for the scores, once for the output). At
decode the latent is the big operand (S x 512 values per sequence per layer, against t x h x 512 for the query), so
the einsums cost two passes over the cache plus the round trips of the scores. Here one program loads a tile of the
latent once and uses it for both products while the scores stay in registers: nothing of size S is ever written, and
the cache comes from memory once (with 64 heads, 4 row blocks read the same tile; their programs are launched side
by side, so the repeats are served by L2).

The tiling. Decode has t = 1 query per sequence (up to ~4 when speculative decoding verifies drafts), and all h
heads attend over the same latent (MLA is one shared "KV head"). So the t*h query rows of one sequence are one small
matrix, rows ordered (head, query): row = head * t + query, and each row adds its own bias row (its query's). A
program takes BLOCK_R = 16 rows (tl.dot needs M >= 16; rows past t*h are masked, e.g. GLM-4.7-Flash's 20 heads
make 2 row blocks with 12 padding rows) and walks the cache in tiles of BLOCK_S slots:

    scores (BLOCK_R, BLOCK_S) = q_lat (BLOCK_R, r) @ latent_tile^T (r, BLOCK_S) + q_rope (BLOCK_R, d) @ k_rope_tile^T
    online softmax:  m' = max(m, rowmax(scores));  p = exp(scores - m');  alpha = exp(m - m')
                     l = l * alpha + rowsum(p);    acc = acc * alpha + p @ latent_tile (BLOCK_S, r)

The running max m keeps every exp <= 1; rescaling by alpha whenever the max grows makes the result exactly the
softmax over all the slots seen, normalised at the end by l. The whole latent width r = 512 is one tile (the
accumulator acc (16, 512) fp32 lives in registers), so BLOCK_S is chosen for the tile to fit: 32 slots of bf16
(32 KB per latent tile, two pipeline stages, 4 warps, as sglang's MLA decode kernel runs on Hopper). Compiled ahead
of time for sm_90 by Triton 3.9 this takes 56 KB of shared memory and 168 registers per thread, no spills: 3
programs fit on one SM. (64-slot tiles: 92 KB and 244 registers.)

Why split over the context. One program per (sequence, row block) gives b * cdiv(t*h, 16) programs: at batch 1
that is 4 programs for LongCat's 64 heads (2 for GLM's 20) on a GPU with 132 SMs, so almost all of the chip would
sit idle while 4 SMs stream a 32k-slot cache. Flash-decoding cuts the S slots into SPLITS contiguous chunks: kernel
1 runs grid (row blocks, SPLITS, b), each program doing the loop above over its chunk and writing its partial
(m, l, acc) to fp32 scratch; kernel 2 (grid (b, t*h, r / 64): 64 channels of one row per program, the chunks read
32 at a time as one tile) merges the partials of a row:

    M = max_i m_i,   w_i = exp(m_i - M),   o = (sum_i w_i acc_i) / (sum_i w_i l_i)

which is the same log-sum-exp rescaling as the online softmax, applied across chunks instead of tiles.

The split heuristic (`split_plan`): about 2 programs per SM,

    SPLITS = clamp(ceil(2 * n_SM / (b * row_blocks)), 1, cdiv(S, BLOCK_S))

then rounded so that no chunk is empty (every chunk holds >= 1 slot: tiles_per_split = cdiv(tiles, SPLITS),
SPLITS = cdiv(tiles, tiles_per_split)). n_SM is read from the device (132 on an H100/H200; 132 assumed in Triton's
CPU interpreter). With SPLITS = 1 (a large batch already fills the GPU) kernel 1 normalises and writes o_lat itself
and kernel 2 does not run. The price of splitting is the fp32 scratch: at batch 1, 64 heads, S = 32k it is 64
chunks x 64 rows x 512 x 4 bytes = 8 MB written and read back (L2-sized) beside the 32 MB cache read; a large batch
needs no split and pays nothing. Everything depends on shapes only: no autotuning, no host sync, no data-dependent
lengths, so the same launch is deterministic and can be captured in a CUDA graph.

W_uv in the merge (`w_uv`, the attention form "fused_uv"). After the attention, the absorbed form multiplies
o_lat by W_uv per head (o[h] = W_uv[h] o_lat[h], W_uv (h, v, r): 5.2 MB for GLM-4.7-Flash, 8.4 MB for LongCat),
one more launch. With `w_uv` given, kernel 2 does it where o_lat is made: grid (b, h, cdiv(v, UV_BLOCK_V)), each
program loads a (UV_BLOCK_V = 32, r) tile of its head's W_uv (whole 1 KB rows of r), merges the chunks of each of
the head's t query rows over all r channels, rounds o_lat to the model dtype (as the unfused path stores it) and
writes those 32 channels of o = W_uv o_lat (fp32 products and sum, rounded once). The tile does not depend on the
attention, so it is loaded before the dependent-launch wait (support.pdl): its latency overlaps the split kernel's
tail. The merge runs even for one chunk (no DIRECT store), and the partials are read once per v-block (from L2).
W_uv is read once per (sequence, query), so this pays at batch 1 only, and the partials' re-reads grow with the
chunk count: `mla.auto_form` uses it for up to FUSED_UV_MAX_ROWS query rows in the batch and FUSED_UV_MAX_CHUNKS
chunks (one H200, docs/perf-run13/: GLM-4.7-Flash's step 3.611 -> 3.571 ms at 4 chunks; LongCat-Flash's merge
8.8 -> 12.7 us at 32 chunks); a batch keeps one batched product.

The cache prefetch (PREFETCH_TILES, with PDL only). The split kernel cannot load anything before its dependent-launch
wait: the query is the previous kernel's output, and so is this step's slot of the cache (the rope kernel writes
it). But the addresses of its chunk are known at launch, and most of those lines were written steps ago. So before
the wait each program issues `prefetch.global.L2` for the first PREFETCH_TILES tiles of its chunk, one per
128-byte line (`support.prefetch_l2`): a hint, which reads nothing into registers and makes nothing wait. After the
wait the tiles are loaded as always, from L2 instead of DRAM. L2 is where every SM's loads meet, so a line the previous kernel
was still writing (this step's slot) is read with its new value after the wait: the prefetch changes no value,
only when the bytes arrive. At batch 1 each chunk is one or two tiles up to ~17k slots (about 2 programs per SM),
so the whole cache read overlaps the previous kernel's tail. Triton's CPU interpreter cannot run PTX: there (and
without PDL) the kernel is built without it. Tested: the PTX has the prefetches and nothing else before the wait
(tests/ptx.py compiles for sm_90 without a GPU); on a GPU a kernel that rewrites the whole cache late, after letting
the split kernel start, is read fresh, and the result with the prefetch is bit-identical to without.

Masking. S is the whole static cache; slots not written yet and padding are masked by the caller's additive bias,
0 where allowed and finfo(dtype).min where not (as `attention_bias` builds it; -inf is not supported: a fully
masked row would be NaN, as in the reference). exp(finfo.min - m) underflows to exactly 0, as in the reference. A
row whose slots are all masked gets scores that all round to the same finfo.min, hence a uniform softmax, as in the
reference; a chunk whose slots are all masked writes a finite partial (m = finfo.min) whose weight exp(m - M) is 0
next to any chunk with a real slot, and uniform among chunks that are all masked. Slots past S in the last tile are
-inf, but every chunk starts on a real slot, so m is finite after its first tile and no exp(-inf - -inf) occurs.
(exp, not exp2 with the scale folded in: finfo.min * log2(e) would overflow to -inf.)

Sizes that are not powers of two. tl.arange needs power-of-two lengths and tl.dot needs K >= 16, so r and d are
padded up to BLOCK_RANK = max(16, next_pow2(r)), BLOCK_ROPE = max(16, next_pow2(d)) with masked loads (zeros add
nothing to the dots) and masked stores. The real sizes (512, 64) need no padding; the padding lets the tiny test
configs (r = 16, d = 4) run the same kernel.

Precision: the dots accumulate in fp32 (fp32 inputs use IEEE fp32, not TF32), scores, m and l are fp32, p is cast to
the latent's dtype for p @ latent (as the reference casts p to q's dtype), and o_lat is written in q_lat's dtype.
The reference computes the scores in q's dtype before its fp32 softmax; the kernel keeps them in fp32, so in bf16
the kernel is the more accurate of the two. (Triton 3.9's CPU interpreter multiplies bf16 tl.dot operands as their
raw uint16 bits; interpreted, the kernel therefore upcasts the same bf16 values to fp32 before each dot: `_dot`.)

Offsets: the batch offset into the cache (b * S * r can pass 2^31 at b = 128, S = 32k) and into the scratch is
int64; offsets inside one sequence stay int32, checked on the host.

`mla_decode` is a `torch.library.custom_op` ("longcat_ref::mla_decode") with a fake implementation, so
torch.compile sees one opaque call of known output shape (fullgraph works) and a CUDA graph captures its two
launches. Without Triton the module still imports; calling `mla_decode` raises a one-line error (support.require).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import support

try:
    import triton
    import triton.language as tl

    from .support import prefetch_l2
except ImportError:  # the module imports without Triton; mla_decode then raises through support.require
    triton = None

BLOCK_R = 16  # query rows (head, query) per program: tl.dot's minimum M
TILE_BYTES = 32 * 1024  # one latent tile (BLOCK_S x r) at most this big: bf16 r=512 -> BLOCK_S = 32
NUM_WARPS, NUM_STAGES = 4, 2  # sglang's MLA decode kernel runs (16 rows x 512) x 32-slot tiles at these on Hopper
PROGRAMS_PER_SM = 2
# The cache prefetch (with PDL only): before its dependent-launch wait each split program asks L2 for the first
# PREFETCH_TILES tiles of its chunk (`prefetch.global.L2`, one instruction per 128-byte line), so their DRAM latency
# overlaps the previous kernel's tail; 0 turns it off (read at launch, like support.USE_PDL; the A/B of a benchmark)
PREFETCH_TILES = 2
COMBINE_BLOCK_C, COMBINE_BLOCK_SP = 64, 32  # kernel 2: channels per program, chunks read per step (one tile)
# kernel 2 with W_uv (w_uv given): output channels v per program (one W_uv tile of 32 x 512), chunks read per step
UV_BLOCK_V, UV_BLOCK_SP = 32, 8


# ------------------------------------------------------------------------------------------------ the reference
def mla_decode_reference(q_lat, q_rope, latent, k_rope, bias, softmax_scale, splits=None, w_uv=None):
    """Plain PyTorch: exactly the einsums of `MLA._absorbed` between q_lat and o_lat (splits is ignored); with
    w_uv (h, v, r) also its last one, o = W_uv o_lat per head (b, h, t, v)."""
    scores = (torch.einsum("bhtr,bsr->bhts", q_lat, latent)  # (b, h, t, S) latent part, in q's dtype
              + torch.einsum("bhtd,bsd->bhts", q_rope, k_rope)) * softmax_scale  # + the shared rope part
    p = F.softmax(scores + bias, dim=-1, dtype=torch.float32).to(q_lat.dtype)  # (b, h, t, S) softmax in fp32
    o_lat = torch.einsum("bhts,bsr->bhtr", p, latent)  # (b, h, t, r)
    if w_uv is None:
        return o_lat
    return torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv)  # (b, h, t, v)


# ------------------------------------------------------------------------------------------------ the plan
def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def block_sizes(r: int, d: int, S: int, element_size: int) -> tuple[int, int, int]:
    """(BLOCK_RANK, BLOCK_ROPE, BLOCK_S): r, d padded to powers of two >= 16; BLOCK_S in [16, 64] with the latent
    tile <= TILE_BYTES (bf16 r=512: 32; fp32 r=512: 16), and no larger than S needs."""
    block_rank, block_rope = max(16, _next_pow2(r)), max(16, _next_pow2(d))
    fit = TILE_BYTES // (block_rank * element_size)  # slots per tile that fit the byte budget
    block_s = max(16, min(64, 1 << (max(fit, 1).bit_length() - 1)))  # largest power of two <= fit, in [16, 64]
    return block_rank, block_rope, min(block_s, max(16, _next_pow2(S)))


_SM_COUNT: dict = {}  # (device type, index) -> SMs (a plain dict, which torch.compile traces: the model calls this)


def _sm_count(device: torch.device) -> int:
    key = (device.type, device.index)
    if key not in _SM_COUNT:  # Triton's CPU interpreter: plan as for an H100/H200
        _SM_COUNT[key] = (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda"
                          else 132)
    return _SM_COUNT[key]


def split_plan(b: int, rows: int, S: int, block_s: int, n_sm: int = 132, splits: int | None = None):
    """(SPLITS, tiles_per_split) for b sequences of `rows` query rows over S slots.

    SPLITS = clamp(ceil(PROGRAMS_PER_SM * n_sm / (b * row_blocks)), 1, tiles), or the asked `splits` clamped to
    [1, tiles]; then rounded down so that every chunk holds at least one slot (no empty chunk)."""
    tiles = math.ceil(S / block_s)
    if splits is None:
        splits = math.ceil(PROGRAMS_PER_SM * n_sm / (b * math.ceil(rows / BLOCK_R)))
    splits = max(1, min(int(splits), tiles))
    per = math.ceil(tiles / splits)  # tiles per chunk
    return math.ceil(tiles / per), per


def prefetch_plan(r: int, d: int, element_size: int, pdl: bool) -> dict:
    """The split kernel's cache-prefetch constexprs: PF_TILES tiles of its chunk (PREFETCH_TILES with PDL, else 0:
    without the early launch there is nothing to overlap), LAT_LINES / KR_LINES 128-byte lines per slot of the
    latent / k_rope (powers of two, for tl.arange), LINE elements per line."""
    line = max(1, support.LINE_BYTES // element_size)
    return dict(PF_TILES=PREFETCH_TILES if pdl else 0, LAT_LINES=_next_pow2(math.ceil(r / line)),
                KR_LINES=_next_pow2(math.ceil(d / line)), LINE=line)


def chunks(b: int, h: int, t: int, r: int, d: int, S: int, element_size: int, device) -> int:
    """How many context chunks `mla_decode` splits b sequences of h heads x t queries over S slots into (its
    `split_plan` on this device); 1 means no split."""
    block_s = block_sizes(r, d, S, element_size)[2]
    return split_plan(b, h * t, S, block_s, _sm_count(torch.device(device)))[0]


# ------------------------------------------------------------------------------------------------ the kernels
if triton is not None:

    @triton.jit
    def _dot(a, b, acc, UPCAST: tl.constexpr):
        """acc + a @ b with fp32 accumulation (fp32 inputs in IEEE fp32, not TF32). UPCAST (Triton's CPU interpreter
        only): multiply the operands as fp32, because the interpreter's tl.dot multiplies bf16 operands as their raw
        uint16 bits (Triton 3.9); the values are the same bf16 values, so the result is what the GPU computes."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision="ieee")

    @triton.jit
    def _mla_split_kernel(
        Q_LAT, Q_ROPE, LATENT, K_ROPE, BIAS,  # (b, R, r), (b, R, d), (b, S, r), (b, S, d), (b, 1, t, S) strided
        M_PART, L_PART, ACC_PART, OUT,  # (b, SPLITS, R) x2, (b, SPLITS, R, r) fp32; OUT (b, R, r)
        R, T, S, tiles_per_split, n_splits,  # R = h * t query rows
        stride_lb, stride_ls, stride_kb, stride_ks,  # latent / k_rope: batch, slot strides (last dim contiguous)
        stride_bb, stride_bt, stride_bs,  # bias: batch (0 if broadcast), query, slot strides
        scale,
        RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_RANK: tl.constexpr, BLOCK_ROPE: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, DIRECT: tl.constexpr, UPCAST: tl.constexpr,
        PDL: tl.constexpr = False, PF_TILES: tl.constexpr = 0, LAT_LINES: tl.constexpr = 1,
        KR_LINES: tl.constexpr = 1, LINE: tl.constexpr = 64,
    ):
        pid_r, pid_sp = tl.program_id(0), tl.program_id(1)
        pid_b = tl.program_id(2).to(tl.int64)  # int64: b * S * r can pass 2^31
        lat_base = LATENT + pid_b * stride_lb  # this sequence's cache
        kr_base = K_ROPE + pid_b * stride_kb
        start = pid_sp * tiles_per_split * BLOCK_S  # this chunk's first slot (< S: no chunk is empty)
        end = tl.minimum(start + tiles_per_split * BLOCK_S, S)
        if PF_TILES > 0:  # the cache prefetch: only the addresses, which depend on no earlier kernel's output
            for i in tl.static_range(PF_TILES):  # slots past the chunk are clamped to its last one (a repeat)
                s = tl.minimum(start + i * BLOCK_S + tl.arange(0, BLOCK_S), end - 1)  # (BLOCK_S,) slots
                lines = tl.minimum(tl.arange(0, LAT_LINES), (RANK - 1) // LINE) * LINE  # (LAT_LINES,) line starts
                prefetch_l2(lat_base + s[:, None] * stride_ls + lines[None, :])  # (BLOCK_S, LAT_LINES) lines
                lines = tl.minimum(tl.arange(0, KR_LINES), (ROPE - 1) // LINE) * LINE  # (KR_LINES,)
                prefetch_l2(kr_base + s[:, None] * stride_ks + lines[None, :])  # (BLOCK_S, KR_LINES)
        if PDL:  # programmatic dependent launch (support.pdl): wait for the previous kernel, let the next one start
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,) row = head * t + query
        row_ok = rows < R  # (BLOCK_R,) padding rows past h*t
        qry = rows % T  # (BLOCK_R,) which bias row each query row uses
        offs_c = tl.arange(0, BLOCK_RANK)  # (BLOCK_RANK,) latent channels
        offs_d = tl.arange(0, BLOCK_ROPE)  # (BLOCK_ROPE,) rope channels
        c_ok = offs_c < RANK
        d_ok = offs_d < ROPE

        q_lat = tl.load(Q_LAT + pid_b * R * RANK + rows[:, None] * RANK + offs_c[None, :],
                        mask=row_ok[:, None] & c_ok[None, :], other=0.0)  # (BLOCK_R, BLOCK_RANK)
        q_rope = tl.load(Q_ROPE + pid_b * R * ROPE + rows[:, None] * ROPE + offs_d[None, :],
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_R, BLOCK_ROPE)
        bias_base = BIAS + pid_b * stride_bb + qry[:, None] * stride_bt  # (BLOCK_R, 1) pointers

        m = tl.full([BLOCK_R], float("-inf"), tl.float32)  # (BLOCK_R,) running max
        l = tl.zeros([BLOCK_R], tl.float32)  # (BLOCK_R,) running sum of exp
        acc = tl.zeros([BLOCK_R, BLOCK_RANK], tl.float32)  # (BLOCK_R, BLOCK_RANK) running sum of p * latent
        for s0 in range(start, end, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)  # (BLOCK_S,) slots of this tile
            s_ok = offs_s < end  # (BLOCK_S,) only the cache's last tile has slots past S
            if RANK == BLOCK_RANK:  # no channel mask at the real sizes: whole-row loads
                lat_mask = s_ok[:, None]
            else:
                lat_mask = s_ok[:, None] & c_ok[None, :]
            lat = tl.load(lat_base + offs_s[:, None] * stride_ls + offs_c[None, :],
                          mask=lat_mask, other=0.0)  # (BLOCK_S, BLOCK_RANK): read once, used by both dots
            kr = tl.load(kr_base + offs_s[:, None] * stride_ks + offs_d[None, :],
                         mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_S, BLOCK_ROPE)
            scores = _dot(q_lat, tl.trans(lat), tl.zeros([BLOCK_R, BLOCK_S], tl.float32), UPCAST)  # (BLOCK_R, BLOCK_S)
            scores = _dot(q_rope, tl.trans(kr), scores, UPCAST)  # + the shared rope part
            bias = tl.load(bias_base + offs_s[None, :] * stride_bs, mask=s_ok[None, :], other=0.0)  # (BLOCK_R, BLOCK_S)
            scores = scores * scale + bias.to(tl.float32)  # (BLOCK_R, BLOCK_S)
            scores = tl.where(s_ok[None, :], scores, float("-inf"))  # slots past S count for nothing
            m_new = tl.maximum(m, tl.max(scores, 1))  # (BLOCK_R,) finite: the tile has a real slot or m is finite
            alpha = tl.exp(m - m_new)  # (BLOCK_R,) rescales what was summed under the old max (0 on the first tile)
            p = tl.exp(scores - m_new[:, None])  # (BLOCK_R, BLOCK_S) in [0, 1]
            l = l * alpha + tl.sum(p, 1)  # (BLOCK_R,)
            acc = _dot(p.to(lat.dtype), lat, acc * alpha[:, None], UPCAST)  # (BLOCK_R, BLOCK_RANK)
            m = m_new

        out_mask = row_ok[:, None] & c_ok[None, :]  # (BLOCK_R, BLOCK_RANK)
        if DIRECT:  # one chunk: this program saw every slot, so it writes o_lat itself
            o = acc / l[:, None]  # (BLOCK_R, BLOCK_RANK)
            tl.store(OUT + pid_b * R * RANK + rows[:, None] * RANK + offs_c[None, :],
                     o.to(OUT.dtype.element_ty), mask=out_mask)
        else:  # one chunk of several: the partial (m, l, acc) for the combine kernel
            part = pid_b * n_splits + pid_sp  # int64 index of (sequence, chunk)
            tl.store(M_PART + part * R + rows, m, mask=row_ok)
            tl.store(L_PART + part * R + rows, l, mask=row_ok)
            tl.store(ACC_PART + part * R * RANK + rows[:, None] * RANK + offs_c[None, :], acc, mask=out_mask)

    @triton.jit
    def _mla_combine_kernel(
        M_PART, L_PART, ACC_PART, OUT,  # (b, SPLITS, R) x2, (b, SPLITS, R, r) fp32 -> OUT (b, R, r)
        R, n_splits,
        RANK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_SP: tl.constexpr, PDL: tl.constexpr = False,
    ):
        """One (sequence, row, BLOCK_C channels) of the merge; the chunks are read BLOCK_SP at a time as one tile
        (a loop over the chunks one by one left LongCat's 32 chunks x 64 rows latency-bound: 13.5 us a call)."""
        if PDL:  # programmatic dependent launch (support.pdl): wait for the previous kernel, let the next one start
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        pid_b = tl.program_id(0).to(tl.int64)
        row = tl.program_id(1)
        offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,) this program's channels
        c_ok = offs_c < RANK
        first = pid_b * n_splits * R + row  # index of (sequence, chunk 0, row) in the (b, SPLITS, R) partials
        sp = tl.arange(0, BLOCK_SP)  # (BLOCK_SP,) chunk offsets
        m_max = tl.full([], float("-inf"), tl.float32)  # () the largest chunk max
        for s0 in range(0, n_splits, BLOCK_SP):
            m = tl.load(M_PART + first + (s0 + sp) * R, mask=s0 + sp < n_splits, other=float("-inf"))  # (BLOCK_SP,)
            m_max = tl.maximum(m_max, tl.max(m, axis=0))
        l_tot = tl.zeros([], tl.float32)  # () sum_i w_i l_i
        acc = tl.zeros([BLOCK_C], tl.float32)  # (BLOCK_C,) sum_i w_i acc_i
        for s0 in range(0, n_splits, BLOCK_SP):
            ok = s0 + sp < n_splits  # (BLOCK_SP,)
            at = first + (s0 + sp) * R  # (BLOCK_SP,) the chunks' (sequence, chunk, row) indices
            w = tl.exp(tl.load(M_PART + at, mask=ok, other=float("-inf")) - m_max)  # (BLOCK_SP,) chunk weights:
            #   0 for an all-masked chunk beside a real one, 1 among all-masked chunks, 0 past the last chunk
            l_tot += tl.sum(w * tl.load(L_PART + at, mask=ok, other=0.0), axis=0)
            part = tl.load(ACC_PART + at[:, None] * RANK + offs_c[None, :], mask=ok[:, None] & c_ok[None, :],
                           other=0.0)  # (BLOCK_SP, BLOCK_C)
            acc += tl.sum(w[:, None] * part, axis=0)
        o = acc / l_tot  # (BLOCK_C,)
        tl.store(OUT + (pid_b * R + row) * RANK + offs_c, o.to(OUT.dtype.element_ty), mask=c_ok)


    @triton.jit
    def _mla_combine_uv_kernel(
        M_PART, L_PART, ACC_PART, W_UV, OUT,  # partials as above; W_UV (h, V, r) rows contiguous; OUT (b, R, V)
        R, T, V, n_splits, stride_wh, stride_wv,
        RANK: tl.constexpr, BLOCK_RANK: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_SP: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        """For one (sequence, head, BLOCK_V output channels) and each of the head's T query rows: the merge over
        all r channels, then o = W_uv o_lat for those channels -- the unfused path's next kernel (the per-head W_uv
        product) done where o_lat already is. The W_uv tile does not depend on the previous kernel, so it is loaded
        first, before the dependent-launch wait: its memory latency overlaps the attention kernel's tail."""
        pid_b = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        offs_c = tl.arange(0, BLOCK_RANK)  # (BLOCK_RANK,) every latent channel
        c_ok = offs_c < RANK
        offs_v = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)  # (BLOCK_V,) this program's output channels
        v_ok = offs_v < V
        w_uv = tl.load(W_UV + head * stride_wh + offs_v[:, None] * stride_wv + offs_c[None, :],
                       mask=v_ok[:, None] & c_ok[None, :], other=0.0)  # (BLOCK_V, BLOCK_RANK) whole rows of r
        if PDL:  # programmatic dependent launch (support.pdl): wait for the previous kernel, let the next one start
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        sp = tl.arange(0, BLOCK_SP)  # (BLOCK_SP,) chunk offsets
        for qry in range(0, T):
            row = head * T + qry  # rows are ordered (head, query)
            first = pid_b * n_splits * R + row  # index of (sequence, chunk 0, row) in the (b, SPLITS, R) partials
            m_max = tl.full([], float("-inf"), tl.float32)  # () the largest chunk max
            for s0 in range(0, n_splits, BLOCK_SP):
                m = tl.load(M_PART + first + (s0 + sp) * R, mask=s0 + sp < n_splits,
                            other=float("-inf"))  # (BLOCK_SP,)
                m_max = tl.maximum(m_max, tl.max(m, axis=0))
            l_tot = tl.zeros([], tl.float32)  # () sum_i w_i l_i
            acc = tl.zeros([BLOCK_RANK], tl.float32)  # (BLOCK_RANK,) sum_i w_i acc_i
            for s0 in range(0, n_splits, BLOCK_SP):
                ok = s0 + sp < n_splits  # (BLOCK_SP,)
                at = first + (s0 + sp) * R  # (BLOCK_SP,)
                w = tl.exp(tl.load(M_PART + at, mask=ok, other=float("-inf")) - m_max)  # (BLOCK_SP,) chunk weights
                l_tot += tl.sum(w * tl.load(L_PART + at, mask=ok, other=0.0), axis=0)
                part = tl.load(ACC_PART + at[:, None] * RANK + offs_c[None, :], mask=ok[:, None] & c_ok[None, :],
                               other=0.0)  # (BLOCK_SP, BLOCK_RANK)
                acc += tl.sum(w[:, None] * part, axis=0)
            o_lat = (acc / l_tot).to(OUT.dtype.element_ty).to(tl.float32)  # (BLOCK_RANK,) rounded as stored
            o = tl.sum(w_uv.to(tl.float32) * o_lat[None, :], axis=1)  # (BLOCK_V,) products and sum in fp32
            tl.store(OUT + (pid_b * R + row) * V + offs_v, o.to(OUT.dtype.element_ty), mask=v_ok)


# ------------------------------------------------------------------------------------------------ the launcher
def _check(q_lat, q_rope, latent, k_rope, bias):
    """Shapes and dtypes (static facts only: nothing here reads device data)."""
    if q_lat.dim() != 4 or q_rope.dim() != 4 or latent.dim() != 3 or k_rope.dim() != 3 or bias.dim() != 4:
        raise ValueError("mla_decode wants q_lat (b, h, t, r), q_rope (b, h, t, d), latent (b, S, r), "
                         "k_rope (b, S, d), bias (b or 1, 1, t, S)")
    b, h, t, r = q_lat.shape
    S, d = latent.shape[1], k_rope.shape[2]
    if q_rope.shape != (b, h, t, d) or latent.shape != (b, S, r) or k_rope.shape != (b, S, d):
        raise ValueError(f"mla_decode shapes disagree: q_lat {tuple(q_lat.shape)}, q_rope {tuple(q_rope.shape)}, "
                         f"latent {tuple(latent.shape)}, k_rope {tuple(k_rope.shape)}")
    if bias.shape[0] not in (1, b) or bias.shape[1] != 1 or bias.shape[2] not in (1, t) or bias.shape[3] != S:
        raise ValueError(f"mla_decode bias must be ({b} or 1, 1, {t}, {S}), got {tuple(bias.shape)}")
    if not (q_rope.dtype == latent.dtype == k_rope.dtype == q_lat.dtype):
        raise ValueError(f"mla_decode wants one dtype for q_lat, q_rope, latent, k_rope, got {q_lat.dtype}, "
                         f"{q_rope.dtype}, {latent.dtype}, {k_rope.dtype}")
    if bias.dtype not in (q_lat.dtype, torch.float32):
        raise ValueError(f"mla_decode bias must be {q_lat.dtype} or float32, got {bias.dtype}")


def _check_w_uv(q_lat, w_uv):
    h, r = q_lat.shape[1], q_lat.shape[3]
    if w_uv.dim() != 3 or w_uv.shape[0] != h or w_uv.shape[2] != r:
        raise ValueError(f"mla_decode w_uv must be (h={h}, v, r={r}), got {tuple(w_uv.shape)}")
    if w_uv.dtype != q_lat.dtype:
        raise ValueError(f"mla_decode w_uv must be {q_lat.dtype} like q_lat, got {w_uv.dtype}")
    if w_uv.device != q_lat.device:
        raise ValueError("mla_decode wants every tensor on one device")


def _launch(q_lat, q_rope, latent, k_rope, bias, softmax_scale, splits, w_uv=None):
    _check(q_lat, q_rope, latent, k_rope, bias)
    if w_uv is not None:
        _check_w_uv(q_lat, w_uv)
    support.require(q_lat, "mla_decode (the Triton MLA decode kernel)")
    if len({x.device for x in (q_lat, q_rope, latent, k_rope, bias)}) != 1:
        raise ValueError("mla_decode wants every tensor on one device")
    b, h, t, r = q_lat.shape
    S, d = latent.shape[1], k_rope.shape[2]
    R = h * t  # query rows per sequence, ordered (head, query)
    V = r if w_uv is None else w_uv.shape[1]
    out = torch.empty((b, h, t, V), dtype=q_lat.dtype, device=q_lat.device)  # (b, h, t, r or v) = (b, R, .) rows
    if out.numel() == 0:
        return out
    if S == 0:  # softmax over no slots: the reference's sum over an empty s is 0
        return out.zero_()
    q_lat, q_rope = q_lat.contiguous(), q_rope.contiguous()  # small: (b, h, t, r) read as (b, R, r)
    if latent.stride(-1) != 1:  # the cache is read in place through its strides (a slice of a bigger buffer is
        latent = latent.contiguous()  # fine) as long as a slot's channels are contiguous
    if k_rope.stride(-1) != 1:
        k_rope = k_rope.contiguous()
    bias = bias.expand(bias.shape[0], 1, t, S)  # a (., 1, 1, S) bias: stride 0 over the queries
    stride_bb = 0 if bias.shape[0] == 1 else bias.stride(0)  # (1, 1, t, S): one bias for every sequence
    block_rank, block_rope, block_s = block_sizes(r, d, S, q_lat.element_size())
    n_splits, per = split_plan(b, R, S, block_s, _sm_count(q_lat.device), splits)
    row_blocks = math.ceil(R / BLOCK_R)
    pdl = support.pdl(q_lat)  # programmatic dependent launch (sm_90+ CUDA)
    pf = prefetch_plan(r, d, q_lat.element_size(), pdl)  # the cache prefetch before the wait (PDL only)
    lim = 2**31
    if ((S - 1) * max(latent.stride(1), k_rope.stride(1)) + r >= lim or (t - 1) * bias.stride(2)
            + (S - 1) * bias.stride(3) >= lim):
        raise ValueError("mla_decode: offsets inside one sequence must fit in int32")
    if b > 65535 or n_splits > 65535:
        raise ValueError(f"mla_decode: batch {b} or splits {n_splits} over the CUDA grid limit 65535")

    direct = n_splits == 1 and w_uv is None  # with W_uv the merge kernel always runs: it applies W_uv
    if direct:
        m_part = l_part = acc_part = out  # unused (DIRECT)
    else:
        m_part = torch.empty((b, n_splits, R), dtype=torch.float32, device=q_lat.device)  # (b, SPLITS, R)
        l_part = torch.empty_like(m_part)  # (b, SPLITS, R)
        acc_part = torch.empty((b, n_splits, R, r), dtype=torch.float32, device=q_lat.device)  # (b, SPLITS, R, r)
    _mla_split_kernel[(row_blocks, n_splits, b)](  # row blocks fastest: programs sharing a chunk run together
        q_lat, q_rope, latent, k_rope, bias, m_part, l_part, acc_part, out,
        R, t, S, per, n_splits,
        latent.stride(0), latent.stride(1), k_rope.stride(0), k_rope.stride(1),
        stride_bb, bias.stride(2), bias.stride(3),
        float(softmax_scale),
        RANK=r, ROPE=d, BLOCK_RANK=block_rank, BLOCK_ROPE=block_rope, BLOCK_R=BLOCK_R, BLOCK_S=block_s,
        DIRECT=direct, UPCAST=support.interpreting() and q_lat.dtype == torch.bfloat16,
        PDL=pdl, **pf, num_warps=NUM_WARPS, num_stages=NUM_STAGES, launch_pdl=pdl,
    )
    if w_uv is not None:
        if w_uv.stride(-1) != 1:
            w_uv = w_uv.contiguous()
        block_v = min(UV_BLOCK_V, _next_pow2(V))
        block_sp = min(UV_BLOCK_SP, max(2, _next_pow2(n_splits)))
        _mla_combine_uv_kernel[(b, h, triton.cdiv(V, block_v))](
            m_part, l_part, acc_part, w_uv, out, R, t, V, n_splits, w_uv.stride(0), w_uv.stride(1),
            RANK=r, BLOCK_RANK=block_rank, BLOCK_V=block_v, BLOCK_SP=block_sp, PDL=pdl, num_warps=4,
            launch_pdl=pdl)
    elif n_splits > 1:
        block_c = min(COMBINE_BLOCK_C, block_rank)
        block_sp = min(COMBINE_BLOCK_SP, max(2, 1 << (n_splits - 1).bit_length()))  # (>= 2: a 1-wide tile is odd)
        _mla_combine_kernel[(b, R, triton.cdiv(r, block_c))](m_part, l_part, acc_part, out, R, n_splits, RANK=r,
                                                            BLOCK_C=block_c, BLOCK_SP=block_sp, PDL=pdl, num_warps=4,
                                                            launch_pdl=pdl)
    return out


@torch.library.custom_op("longcat_ref::mla_decode", mutates_args=())
def _mla_decode_op(q_lat: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                   bias: torch.Tensor, softmax_scale: float, splits: Optional[int] = None,
                   w_uv: Optional[torch.Tensor] = None) -> torch.Tensor:
    # (Optional[int], not `int | None`: the spelling every torch version's schema inference knows)
    return _launch(q_lat, q_rope, latent, k_rope, bias, softmax_scale, splits, w_uv)


@_mla_decode_op.register_fake
def _(q_lat, q_rope, latent, k_rope, bias, softmax_scale, splits=None, w_uv=None):
    v = q_lat.shape[-1] if w_uv is None else w_uv.shape[1]
    return q_lat.new_empty(q_lat.shape[:-1] + (v,))  # (b, h, t, r or v), contiguous, q_lat's dtype


def mla_decode(q_lat, q_rope, latent, k_rope, bias, softmax_scale, *, splits: int | None = None,
               w_uv: torch.Tensor | None = None) -> torch.Tensor:
    """o_lat (b, h, t, r) = softmax((q_lat . latent + q_rope . k_rope) * softmax_scale + bias over S, fp32) @ latent.

    q_lat (b, h, t, r) (the query with W_uk folded in), q_rope (b, h, t, d), latent (b, S, r), k_rope (b, S, d): one
    dtype. bias (b or 1, 1, t, S) additive, in that dtype or fp32, 0 or finfo.min (not -inf); an all-masked row gives
    the uniform softmax, as the reference. splits: the number of context chunks (default: the heuristic of
    `split_plan`; tests force small counts). w_uv (h, v, r), q_lat's dtype: return o = W_uv o_lat per head
    (b, h, t, v) instead, its product done in the merge kernel (o_lat rounded to q_lat's dtype first, as stored).
    Returns q_lat's dtype. Runs on CUDA, or on the CPU in Triton's interpreter (TRITON_INTERPRET=1); elsewhere it
    raises a one-line error. One opaque op for torch.compile.
    """
    return torch.ops.longcat_ref.mla_decode(q_lat, q_rope, latent, k_rope, bias, float(softmax_scale), splits,
                                            w_uv)
