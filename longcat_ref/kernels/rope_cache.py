"""The latent's RMSNorm, RoPE of the query and the key, and the cache write of one decode step, in one Triton kernel.

What it computes: the tail of `MLA.project` (model/mla.py) and `StaticCache.update` (model/cache.py) for one chunk
of t tokens at cache slots pos (t,), from the two projections' outputs q (b, h, t, nope + d) and kv (b, t, r + d):

    latent_cache[b, pos[t]] = kv_scale * RMSNorm(kv[b, t, :r])                         (r = kv_lora_rank = 512)
    rope_cache[b, pos[t]]   = RoPE(kv[b, t, r:], cos[b, t], sin[b, t])                 (d = qk_rope_head_dim = 64)
    q_rope[b, h, t]         = RoPE(q_scale * q[b, h, t, nope:], cos[b, t], sin[b, t])  returned (b, h, t, d)

RMSNorm is the model's (norm.py): y = w * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype), x32 = x in fp32. RoPE rotates
pairs by one angle each: pair i is (x[2i], x[2i+1]) in the interleaved layout of both real checkpoints, (x[i],
x[i + d/2]) in the half layout, and the result is written de-interleaved (rope.py):

    out[i] = x1 * cos_i - x2 * sin_i,   out[d/2 + i] = x2 * cos_i + x1 * sin_i,      i < d/2

with cos_i = cos[..., i] (rope_cos_sin repeats the d/2 angles twice, so the first half holds them all).
`rope_cache_reference` is exactly those formulas in PyTorch; `rope_cache_write` is the kernel, tested equal to it
(tests/test_kernel_rope.py).

Why a kernel. Between the projections and the attention kernel a decode step of MLA only moves a few KB, but as
PyTorch ops it is several launches: the latent's norm and its cache write, the key's RoPE, its cache write, the
query's RoPE (GLM-4.7-Flash's compiled batch-1 step, one H200, 2026-12-02: four kernels a layer, ~4.5 us of its
~89 us, each of them a launch latency more than work). Here one program per token does all of it: the kernel is
one launch whatever t, h or the layouts are.

The tiling. Program n (of b * t) handles token (n // t, n % t):
    * the latent: one (BLOCK_RANK,) vector, r padded to a power of two with a masked load; its mean of squares is
      one tl.sum in fp32;
    * the key's rope part: two (BLOCK_HALF,) vectors x1, x2 (d/2 pairs) and one angle vector;
    * the query's rope parts of all h heads: two (BLOCK_H, BLOCK_HALF) tiles, rotated by the same angles.
Everything is a few KB (r = 512, d = 64, h <= 64): registers, no shared memory, no loop.

Precision: the norm as norm.py (fp32 statistic, cast, then the weight multiply rounded once in the model dtype;
kv_scale after it, rounded once), q_scale rounded once before the rotation, as the eager reference does; the
rotation itself in fp32, rounded once at the store. The eager reference rounds x1 * cos and x2 * sin separately in
bf16 (torch.compile, like this kernel, does not), and the statistic's fp32 sum runs in another order, so in bf16
the two agree to one rounding, in fp32 to ~1e-7.

W_uk's product in the same launch (`rope_cache_fold_write`). The absorbed attention's next step folds W_uk into
the query, q_lat[b, h, t] = W_uk[h]^T (q_scale * q[b, h, t, :nope]) (b, h, t, r), W_uk (h, nope, r) a strided view
of kv_b_proj's weight (`w.view(h, nope + v, r)[:, :nope]`: head stride (nope + v) r). In GLM-4.7-Flash's compiled
batch-1 step (one H200, docs/perf-run13/) the rope-cache kernel takes 3.0 us a layer and W_uk's cuBLAS bmm 3.8 us,
both latency-bound; `rope_cache_fold_write` does both in one launch, and returns (q_rope, q_lat). It reads all of
W_uk (h x nope x r: 3.9 MB for GLM) once per token, so it is meant for a few tokens (decode), not for a prefill.
Its grid is (b * t, h, cdiv(r, FOLD_BLOCK_C = 64)): program (n, head, cb) loads its (BLOCK_NOPE, 64) tile of
W_uk[head] (nope padded to a power of two, masked) before the programmatic-dependent-launch wait -- no kernel
before it writes the weight, so that load's latency overlaps the previous kernel's tail -- then waits, loads token
n's nope row of this head (scaled and rounded once as the reference), and stores its 64 channels of q_lat, the
products and the sum over nope in fp32, rounded once. The token's rope-cache work is spread over its programs, so
that none does much more than its tile: program (n, head, 0) also rotates that head's q_rope, and program (n, h - 1,
last column block) normalises and writes the latent and rotates and writes the key (the same @triton.jit helpers as
`_rope_cache_kernel`: `_latent_work`, `_key_work`, `_q_rope_work`, one home each). The first version left all of
it to program (n, 0, 0), after its own tile: 6.38 us a GLM layer (one H100, docs/perf-run19/); spread, 5.27 us
(one H100, docs/perf-run20/: GLM-4.7-Flash's compiled batch-1 step 3.998 ms without the fold, 3.872 with it). `rope_cache_fold_reference` is rope_cache_reference and the model's einsum (model/mla.py's `_fold_bmm`),
which the kernel is tested equal to.

`rope_cache_write` is a `torch.library.custom_op` ("longcat_ref::rope_cache_write") that mutates the two cache
tensors in place and returns q_rope; under torch.compile it is one opaque call and the caches stay in place. Runs
on CUDA, or on the CPU in Triton's interpreter (TRITON_INTERPRET=1); without Triton the module still imports and
the call raises a one-line error (support.require). `rope_cache_fold_write` is the same kind of op
("longcat_ref::rope_cache_fold"), returning the pair.
"""

from __future__ import annotations

import torch

from . import support

try:
    import triton
    import triton.language as tl
except ImportError:  # the module imports without Triton; rope_cache_write then raises through support.require
    triton = None

FOLD_BLOCK_C = 64  # q_lat's channels per program of the fold kernel (min(64, BLOCK_RANK) for a tiny r)


# ------------------------------------------------------------------------------------------------ the reference
def _rotate(x, cos, sin, interleaved: bool):
    """x (..., d) -> (..., d) de-interleaved: [x1 c - x2 s | x2 c + x1 s]; cos/sin (..., d) broadcastable."""
    half = x.shape[-1] // 2
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :half], x[..., half:])  # (..., d/2) each
    c, s = cos[..., :half], sin[..., :half]  # (..., d/2): one angle per pair
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)  # (..., d)


def rope_cache_reference(kv, q, norm_weight, eps, cos, sin, latent_cache, rope_cache, cache_position, nope,
                         interleaved=True, kv_scale=1.0, q_scale=1.0):
    """Plain PyTorch, eager rounding: writes the two caches in place and returns q_rope (b, h, t, d)."""
    r = latent_cache.shape[-1]
    lat = kv[..., :r]  # (b, t, r)
    x32 = lat.float()
    lat = norm_weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(lat.dtype)  # (b, t, r)
    if kv_scale != 1.0:
        lat = lat * kv_scale
    q_rope = q[..., nope:]  # (b, h, t, d)
    if q_scale != 1.0:
        q_rope = q_rope * q_scale
    latent_cache.index_copy_(1, cache_position, lat)  # (b, S, r) in place
    rope_cache.index_copy_(1, cache_position, _rotate(kv[..., r:], cos, sin, interleaved))  # (b, S, d) in place
    return _rotate(q_rope, cos[:, None], sin[:, None], interleaved)  # (b, h, t, d)


def _q_nope(q, nope, q_scale):
    """q's nope part (b, h, t, nope), times q_scale where it is not 1 (rounded once to the model dtype)."""
    qn = q[..., :nope]  # (b, h, t, nope)
    return qn * q_scale if q_scale != 1.0 else qn


def rope_cache_fold_reference(kv, q, norm_weight, eps, cos, sin, latent_cache, rope_cache, cache_position, nope,
                              w_uk, interleaved=True, kv_scale=1.0, q_scale=1.0):
    """rope_cache_reference, and W_uk folded into the query: returns (q_rope (b, h, t, d), q_lat (b, h, t, r)),
    q_lat = einsum(q_scale * q_nope, W_uk) as the model's `_fold_bmm` (model/mla.py)."""
    q_rope = rope_cache_reference(kv, q, norm_weight, eps, cos, sin, latent_cache, rope_cache, cache_position,
                                  nope, interleaved, kv_scale, q_scale)  # (b, h, t, d)
    return q_rope, torch.einsum("bhtd,hdr->bhtr", _q_nope(q, nope, q_scale), w_uk)  # (b, h, t, r)


# ------------------------------------------------------------------------------------------------ the kernel
if triton is not None:

    @triton.jit
    def _pairs(base, offs, ok, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
        """The two elements of each pair: (x[2i], x[2i+1]) interleaved, (x[i], x[i+HALF]) half; in fp32."""
        if INTERLEAVED:
            return (tl.load(base + 2 * offs, mask=ok, other=0.0).to(tl.float32),
                    tl.load(base + 2 * offs + 1, mask=ok, other=0.0).to(tl.float32))
        return (tl.load(base + offs, mask=ok, other=0.0).to(tl.float32),
                tl.load(base + offs + HALF, mask=ok, other=0.0).to(tl.float32))

    @triton.jit
    def _angles(COS, SIN, bi, ti, stride_cb, stride_ct, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
        """Token (bi, ti)'s d/2 angles, the first half of its cos/sin rows: (c, s, offs_i, i_ok), (BLOCK_HALF,)."""
        offs_i = tl.arange(0, BLOCK_HALF)  # (BLOCK_HALF,) pair index
        i_ok = offs_i < HALF
        cs = bi * stride_cb + ti * stride_ct + offs_i
        c = tl.load(COS + cs, mask=i_ok, other=0.0).to(tl.float32)  # (BLOCK_HALF,)
        s = tl.load(SIN + cs, mask=i_ok, other=0.0).to(tl.float32)
        return c, s, offs_i, i_ok

    @triton.jit
    def _rotate_store(out, x1, x2, c, s, ok, HALF: tl.constexpr):
        """Store the rotated pairs de-interleaved: out[i] = x1 c - x2 s, out[HALF + i] = x2 c + x1 s (any shape)."""
        dtype = out.dtype.element_ty
        tl.store(out, (x1 * c - x2 * s).to(dtype), mask=ok)
        tl.store(out + HALF, (x2 * c + x1 * s).to(dtype), mask=ok)

    @triton.jit
    def _latent_work(KV, W, POS, LAT, n, T, stride_kvb, stride_kvt, stride_lb, stride_ls, eps, kv_scale,
                     RANK: tl.constexpr, BLOCK_RANK: tl.constexpr, KV_SCALE: tl.constexpr):
        """Token n's latent: RMSNorm (fp32 statistic, cast, weight multiply rounded once), optional scale, cache
        write."""
        bi, ti = (n // T).to(tl.int64), n % T  # this token's sequence (int64: cache offsets) and position in it
        pos = tl.load(POS + ti)  # its cache slot
        dtype = LAT.dtype.element_ty
        offs_c = tl.arange(0, BLOCK_RANK)  # (BLOCK_RANK,)
        c_ok = offs_c < RANK
        x = tl.load(KV + bi * stride_kvb + ti * stride_kvt + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        inv = tl.math.rsqrt(tl.sum(x * x, 0) / RANK + eps)  # () rsqrt(mean(x^2) + eps)
        y = (x * inv).to(dtype).to(tl.float32)  # (BLOCK_RANK,) normalised, rounded to the model dtype
        y = (tl.load(W + offs_c, mask=c_ok, other=0.0).to(tl.float32) * y).to(dtype)  # w * y, rounded once
        if KV_SCALE:
            y = (y.to(tl.float32) * kv_scale).to(dtype)
        tl.store(LAT + bi * stride_lb + pos * stride_ls + offs_c, y, mask=c_ok)

    @triton.jit
    def _key_work(KV, COS, SIN, POS, KR, n, T, stride_kvb, stride_kvt, stride_cb, stride_ct, stride_kb, stride_ks,
                  RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
        """Token n's key rope part: rotated, de-interleaved, written to its cache slot."""
        bi, ti = (n // T).to(tl.int64), n % T
        pos = tl.load(POS + ti)
        HALF: tl.constexpr = ROPE // 2
        c, s, offs_i, i_ok = _angles(COS, SIN, bi, ti, stride_cb, stride_ct, HALF, BLOCK_HALF)
        x1, x2 = _pairs(KV + bi * stride_kvb + ti * stride_kvt + RANK, offs_i, i_ok, HALF, INTERLEAVED)
        _rotate_store(KR + bi * stride_kb + pos * stride_ks + offs_i, x1, x2, c, s, i_ok, HALF)

    @triton.jit
    def _q_rope_work(Q, COS, SIN, Q_OUT, n, T, H, heads, h_ok, stride_qb, stride_qh, stride_qt, stride_cb,
                     stride_ct, q_scale, ROPE: tl.constexpr, NOPE: tl.constexpr, BLOCK_HALF: tl.constexpr,
                     INTERLEAVED: tl.constexpr, Q_SCALE: tl.constexpr):
        """Token n's query rope parts of `heads`: one head ((1,) index and h_ok) or a block of them ((BLOCK_H, 1)
        indices, h_ok (BLOCK_H, 1)); all rotated by the token's angles."""
        bi, ti = (n // T).to(tl.int64), n % T
        HALF: tl.constexpr = ROPE // 2
        c, s, offs_i, i_ok = _angles(COS, SIN, bi, ti, stride_cb, stride_ct, HALF, BLOCK_HALF)
        ok = h_ok & i_ok  # (BLOCK_HALF,) or (BLOCK_H, BLOCK_HALF)
        qb = Q + bi * stride_qb + ti * stride_qt + heads * stride_qh + NOPE  # pointers to the rope parts
        q1, q2 = _pairs(qb, offs_i, ok, HALF, INTERLEAVED)  # each the shape of ok
        if Q_SCALE:  # the scale rounded once before the rotation, as the reference
            dtype = Q_OUT.dtype.element_ty
            q1 = (q1 * q_scale).to(dtype).to(tl.float32)
            q2 = (q2 * q_scale).to(dtype).to(tl.float32)
        _rotate_store(Q_OUT + ((bi * H + heads) * T + ti) * ROPE + offs_i, q1, q2, c, s, ok, HALF)

    @triton.jit
    def _rope_cache_kernel(
        KV, Q, W, COS, SIN, POS, LAT, KR, Q_OUT,  # (b, t, r+d), (b, h, t, nope+d), (r,), (b, t, d) x2, (t,),
        #                                           (b, S, r), (b, S, d) caches; Q_OUT (b, h, t, d) contiguous
        T, H,  # tokens per sequence, heads
        stride_kvb, stride_kvt, stride_qb, stride_qh, stride_qt, stride_cb, stride_ct,
        stride_lb, stride_ls, stride_kb, stride_ks,
        eps, kv_scale, q_scale,
        RANK: tl.constexpr, ROPE: tl.constexpr, NOPE: tl.constexpr, BLOCK_RANK: tl.constexpr,
        BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr,
        KV_SCALE: tl.constexpr, Q_SCALE: tl.constexpr, PDL: tl.constexpr = False,
    ):
        if PDL:  # programmatic dependent launch (support.pdl): wait for the previous kernel, let the next one start
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        n = tl.program_id(0)  # one program per token: the latent, the key, every head's q_rope
        _latent_work(KV, W, POS, LAT, n, T, stride_kvb, stride_kvt, stride_lb, stride_ls, eps, kv_scale,
                     RANK, BLOCK_RANK, KV_SCALE)
        _key_work(KV, COS, SIN, POS, KR, n, T, stride_kvb, stride_kvt, stride_cb, stride_ct, stride_kb, stride_ks,
                  RANK, ROPE, BLOCK_HALF, INTERLEAVED)
        offs_h = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1) every head at once
        _q_rope_work(Q, COS, SIN, Q_OUT, n, T, H, offs_h, offs_h < H, stride_qb, stride_qh, stride_qt, stride_cb,
                     stride_ct, q_scale, ROPE, NOPE, BLOCK_HALF, INTERLEAVED, Q_SCALE)

    @triton.jit
    def _rope_cache_fold_kernel(
        KV, Q, W, COS, SIN, POS, LAT, KR, Q_OUT,  # as _rope_cache_kernel
        W_UK, Q_LAT,  # (h, nope, r) a strided view, last axis contiguous; Q_LAT (b, h, t, r) contiguous
        T, H,  # tokens per sequence, heads
        stride_kvb, stride_kvt, stride_qb, stride_qh, stride_qt, stride_cb, stride_ct,
        stride_lb, stride_ls, stride_kb, stride_ks, stride_wh, stride_wd,
        eps, kv_scale, q_scale,
        RANK: tl.constexpr, ROPE: tl.constexpr, NOPE: tl.constexpr, BLOCK_RANK: tl.constexpr,
        BLOCK_HALF: tl.constexpr, BLOCK_NOPE: tl.constexpr, BLOCK_C: tl.constexpr,
        INTERLEAVED: tl.constexpr, KV_SCALE: tl.constexpr, Q_SCALE: tl.constexpr, PDL: tl.constexpr = False,
    ):
        """Program (n, head, cb): q_lat's channels [cb * BLOCK_C, (cb + 1) * BLOCK_C) of token n, head `head`; the
        programs (n, head, 0) also that head's q_rope, and (n, H - 1, last cb) the token's latent and key."""
        n = tl.program_id(0)
        head = tl.program_id(1)
        cb = tl.program_id(2)
        offs_d = tl.arange(0, BLOCK_NOPE)  # (BLOCK_NOPE,) nope channels
        d_ok = offs_d < NOPE
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,) this program's latent channels
        c_ok = offs_c < RANK
        # W_uk is a weight: no kernel before this one writes it, so its tile is loaded before the dependent-launch
        # wait and its memory latency overlaps the previous kernel's tail
        w = tl.load(W_UK + head.to(tl.int64) * stride_wh + offs_d[:, None] * stride_wd + offs_c[None, :],
                    mask=d_ok[:, None] & c_ok[None, :], other=0.0)  # (BLOCK_NOPE, BLOCK_C)
        if PDL:  # programmatic dependent launch (support.pdl): wait for the previous kernel, let the next one start
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        bi, ti = (n // T).to(tl.int64), n % T  # this token's sequence and position in it
        dtype = Q_LAT.dtype.element_ty
        qn = tl.load(Q + bi * stride_qb + head * stride_qh + ti * stride_qt + offs_d, mask=d_ok,
                     other=0.0).to(tl.float32)  # (BLOCK_NOPE,) this (token, head)'s nope row
        if Q_SCALE:  # the scale rounded once to the model dtype, as the reference
            qn = (qn * q_scale).to(dtype).to(tl.float32)
        q_lat = tl.sum(w.to(tl.float32) * qn[:, None], axis=0)  # (BLOCK_C,) products and sum in fp32
        tl.store(Q_LAT + ((bi * H + head) * T + ti) * RANK + offs_c, q_lat.to(dtype), mask=c_ok)
        # token n's other work, spread so that no program does much more than its tile: every (n, head, 0) rotates
        # its head's q_rope, and the last program of the token (n, H - 1, last column block) the latent and the key
        if cb == 0:
            one = head + tl.zeros([1], dtype=tl.int32)  # (1,) this head (a vector: masks must be tensors)
            _q_rope_work(Q, COS, SIN, Q_OUT, n, T, H, one, one < H, stride_qb, stride_qh, stride_qt, stride_cb,
                         stride_ct, q_scale, ROPE, NOPE, BLOCK_HALF, INTERLEAVED, Q_SCALE)
        if (head == H - 1) & (cb == tl.num_programs(2) - 1):
            _latent_work(KV, W, POS, LAT, n, T, stride_kvb, stride_kvt, stride_lb, stride_ls, eps, kv_scale,
                         RANK, BLOCK_RANK, KV_SCALE)
            _key_work(KV, COS, SIN, POS, KR, n, T, stride_kvb, stride_kvt, stride_cb, stride_ct, stride_kb,
                      stride_ks, RANK, ROPE, BLOCK_HALF, INTERLEAVED)

# ------------------------------------------------------------------------------------------------ the launcher
def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _check(kv, q, norm_weight, cos, sin, latent_cache, rope_cache, cache_position, nope):
    """Shapes and dtypes (static facts only: nothing here reads device data)."""
    if kv.dim() != 3 or q.dim() != 4 or latent_cache.dim() != 3 or rope_cache.dim() != 3 or cos.dim() != 3:
        raise ValueError("rope_cache_write wants kv (b, t, r+d), q (b, h, t, nope+d), cos/sin (b or 1, t, d), "
                         "latent_cache (b, S, r), rope_cache (b, S, d)")
    b, t, _ = kv.shape
    r, d = latent_cache.shape[-1], rope_cache.shape[-1]
    if kv.shape[-1] != r + d or q.shape[0] != b or q.shape[2] != t or q.shape[-1] != nope + d or d % 2:
        raise ValueError(f"rope_cache_write shapes disagree: kv {tuple(kv.shape)}, q {tuple(q.shape)}, nope "
                         f"{nope}, latent_cache {tuple(latent_cache.shape)}, rope_cache {tuple(rope_cache.shape)}")
    if latent_cache.shape[:2] != (b, rope_cache.shape[1]) or rope_cache.shape[0] != b:
        raise ValueError(f"rope_cache_write caches {tuple(latent_cache.shape)} / {tuple(rope_cache.shape)} do not "
                         f"hold {b} sequences of one length")
    if cos.shape != sin.shape or cos.shape[0] not in (1, b) or cos.shape[1:] != (t, d):
        raise ValueError(f"rope_cache_write cos/sin must be ({b} or 1, {t}, {d}), got {tuple(cos.shape)}")
    if norm_weight.shape != (r,) or cache_position.shape != (t,) or cache_position.dtype not in (torch.int64,
                                                                                                 torch.int32):
        raise ValueError(f"rope_cache_write wants a ({r},) norm weight and ({t},) integer cache positions")
    if not (q.dtype == latent_cache.dtype == rope_cache.dtype == kv.dtype):
        raise ValueError(f"rope_cache_write wants one dtype for kv, q and the caches, got {kv.dtype}, {q.dtype}, "
                         f"{latent_cache.dtype}, {rope_cache.dtype}")


@torch.library.custom_op("longcat_ref::rope_cache_write", mutates_args=("latent_cache", "rope_cache"))
def _rope_cache_op(kv: torch.Tensor, q: torch.Tensor, norm_weight: torch.Tensor, eps: float, cos: torch.Tensor,
                   sin: torch.Tensor, latent_cache: torch.Tensor, rope_cache: torch.Tensor,
                   cache_position: torch.Tensor, nope: int, interleaved: bool, kv_scale: float,
                   q_scale: float) -> torch.Tensor:
    support.require(kv, "rope_cache_write (the Triton norm + RoPE + cache-write kernel)")
    b, h, t, _ = q.shape
    r, d = latent_cache.shape[-1], rope_cache.shape[-1]
    out = torch.empty((b, h, t, d), dtype=q.dtype, device=q.device)  # (b, h, t, d)
    if b * t == 0:
        return out
    for x, name in ((kv, "kv"), (q, "q"), (cos, "cos"), (sin, "sin"), (latent_cache, "latent_cache"),
                    (rope_cache, "rope_cache")):
        if x.stride(-1) != 1:
            raise ValueError(f"rope_cache_write wants {name}'s last axis contiguous")
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    pdl = support.pdl(q)  # programmatic dependent launch (sm_90+ CUDA)
    _rope_cache_kernel[(b * t,)](
        kv, q, norm_weight, cos, sin, cache_position, latent_cache, rope_cache, out,
        t, h,
        kv.stride(0), kv.stride(1), q.stride(0), q.stride(1), q.stride(2),
        0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1),
        latent_cache.stride(0), latent_cache.stride(1), rope_cache.stride(0), rope_cache.stride(1),
        float(eps), float(kv_scale), float(q_scale),
        RANK=r, ROPE=d, NOPE=nope, BLOCK_RANK=max(16, _next_pow2(r)), BLOCK_HALF=max(16, _next_pow2(d // 2)),
        BLOCK_H=max(2, _next_pow2(h)), INTERLEAVED=bool(interleaved), KV_SCALE=kv_scale != 1.0,
        Q_SCALE=q_scale != 1.0, PDL=pdl, num_warps=4, launch_pdl=pdl,
    )
    return out


@_rope_cache_op.register_fake
def _(kv, q, norm_weight, eps, cos, sin, latent_cache, rope_cache, cache_position, nope, interleaved, kv_scale,
      q_scale):
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], rope_cache.shape[-1]))  # (b, h, t, d)


def rope_cache_write(kv, q, norm_weight, eps, cos, sin, latent_cache, rope_cache, cache_position, nope,
                     interleaved=True, kv_scale=1.0, q_scale=1.0) -> torch.Tensor:
    """Write RMSNorm(kv[..., :r]) (* kv_scale) and RoPE(kv[..., r:]) at cache slots cache_position (t,) of
    latent_cache (b, S, r) / rope_cache (b, S, d), in place, and return RoPE(q_scale * q[..., nope:]) (b, h, t, d).

    kv (b, t, r + d) and q (b, h, t, nope + d) are the projections' outputs (q may be a strided view: its last
    axis contiguous); norm_weight (r,) and eps the latent's RMSNorm; cos/sin (b or 1, t, d) as rope_cos_sin makes
    them; interleaved: the pairs' layout (rope.py). One dtype for kv, q and the caches. Runs on CUDA, or on the
    CPU in Triton's interpreter; elsewhere it raises a one-line error. One opaque op for torch.compile.
    """
    _check(kv, q, norm_weight, cos, sin, latent_cache, rope_cache, cache_position, nope)
    return torch.ops.longcat_ref.rope_cache_write(kv, q, norm_weight, float(eps), cos, sin, latent_cache,
                                                  rope_cache, cache_position, int(nope), bool(interleaved),
                                                  float(kv_scale), float(q_scale))


def _check_w_uk(q, latent_cache, nope, w_uk):
    h, r = q.shape[1], latent_cache.shape[-1]
    if w_uk.dim() != 3 or tuple(w_uk.shape) != (h, nope, r):
        raise ValueError(f"rope_cache_fold_write w_uk must be (h={h}, nope={nope}, r={r}), got {tuple(w_uk.shape)}")
    if w_uk.dtype != q.dtype or w_uk.device != q.device:
        raise ValueError(f"rope_cache_fold_write w_uk must be {q.dtype} on {q.device} like q, got {w_uk.dtype} on "
                         f"{w_uk.device}")
    if w_uk.stride(2) != 1:
        raise ValueError(f"rope_cache_fold_write wants w_uk's last axis (r) contiguous, got strides {w_uk.stride()}")


@torch.library.custom_op("longcat_ref::rope_cache_fold", mutates_args=("latent_cache", "rope_cache"))
def _rope_cache_fold_op(kv: torch.Tensor, q: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                        cos: torch.Tensor, sin: torch.Tensor, latent_cache: torch.Tensor, rope_cache: torch.Tensor,
                        cache_position: torch.Tensor, nope: int, w_uk: torch.Tensor, interleaved: bool,
                        kv_scale: float, q_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    support.require(kv, "rope_cache_fold_write (the Triton norm + RoPE + cache-write + W_uk kernel)")
    b, h, t, _ = q.shape
    r, d = latent_cache.shape[-1], rope_cache.shape[-1]
    out = torch.empty((b, h, t, d), dtype=q.dtype, device=q.device)  # (b, h, t, d)
    q_lat = torch.empty((b, h, t, r), dtype=q.dtype, device=q.device)  # (b, h, t, r)
    if b * t == 0:
        return out, q_lat
    for x, name in ((kv, "kv"), (q, "q"), (cos, "cos"), (sin, "sin"), (latent_cache, "latent_cache"),
                    (rope_cache, "rope_cache"), (w_uk, "w_uk")):
        if x.stride(-1) != 1:
            raise ValueError(f"rope_cache_fold_write wants {name}'s last axis contiguous")
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    block_rank = max(16, _next_pow2(r))
    block_c = min(FOLD_BLOCK_C, block_rank)
    pdl = support.pdl(q)  # programmatic dependent launch (sm_90+ CUDA)
    _rope_cache_fold_kernel[(b * t, h, triton.cdiv(r, block_c))](
        kv, q, norm_weight, cos, sin, cache_position, latent_cache, rope_cache, out, w_uk, q_lat,
        t, h,
        kv.stride(0), kv.stride(1), q.stride(0), q.stride(1), q.stride(2),
        0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1),
        latent_cache.stride(0), latent_cache.stride(1), rope_cache.stride(0), rope_cache.stride(1),
        w_uk.stride(0), w_uk.stride(1),
        float(eps), float(kv_scale), float(q_scale),
        RANK=r, ROPE=d, NOPE=nope, BLOCK_RANK=block_rank, BLOCK_HALF=max(16, _next_pow2(d // 2)),
        BLOCK_NOPE=max(16, _next_pow2(nope)), BLOCK_C=block_c,
        INTERLEAVED=bool(interleaved), KV_SCALE=kv_scale != 1.0, Q_SCALE=q_scale != 1.0, PDL=pdl, num_warps=4,
        launch_pdl=pdl,
    )
    return out, q_lat


@_rope_cache_fold_op.register_fake
def _(kv, q, norm_weight, eps, cos, sin, latent_cache, rope_cache, cache_position, nope, w_uk, interleaved,
      kv_scale, q_scale):
    b, h, t = q.shape[:3]
    return (q.new_empty((b, h, t, rope_cache.shape[-1])),  # (b, h, t, d)
            q.new_empty((b, h, t, latent_cache.shape[-1])))  # (b, h, t, r)


def rope_cache_fold_write(kv, q, norm_weight, eps, cos, sin, latent_cache, rope_cache, cache_position, nope, w_uk,
                          interleaved=True, kv_scale=1.0, q_scale=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_cache_write, and W_uk folded into the query in the same launch: returns (q_rope (b, h, t, d), q_lat
    (b, h, t, r)), q_lat[b, h, t] = W_uk[h]^T (q_scale * q[b, h, t, :nope]) (the scaled query rounded once to the
    model dtype; products and sum in fp32, rounded once), as `rope_cache_fold_reference`.

    w_uk (h, nope, r) in q's dtype, read in place through its strides (the model's view of kv_b_proj's weight,
    `w.view(h, nope + v, r)[:, :nope]`); its last axis must be contiguous. The rest as `rope_cache_write`.
    """
    _check(kv, q, norm_weight, cos, sin, latent_cache, rope_cache, cache_position, nope)
    _check_w_uk(q, latent_cache, nope, w_uk)
    return torch.ops.longcat_ref.rope_cache_fold(kv, q, norm_weight, float(eps), cos, sin, latent_cache,
                                                 rope_cache, cache_position, int(nope), w_uk, bool(interleaved),
                                                 float(kv_scale), float(q_scale))
