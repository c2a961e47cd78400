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

`rope_cache_write` is a `torch.library.custom_op` ("longcat_ref::rope_cache_write") that mutates the two cache
tensors in place and returns q_rope; under torch.compile it is one opaque call and the caches stay in place. Runs
on CUDA, or on the CPU in Triton's interpreter (TRITON_INTERPRET=1); without Triton the module still imports and
the call raises a one-line error (support.require).
"""

from __future__ import annotations

import torch

from . import support

try:
    import triton
    import triton.language as tl
except ImportError:  # the module imports without Triton; rope_cache_write then raises through support.require
    triton = None


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
        n = tl.program_id(0)
        bi, ti = (n // T).to(tl.int64), n % T  # this token's sequence (int64: cache offsets) and position in it
        pos = tl.load(POS + ti)  # its cache slot
        dtype = LAT.dtype.element_ty
        kv = KV + bi * stride_kvb + ti * stride_kvt  # this token's kv row

        # the latent: RMSNorm (fp32 statistic, cast, weight multiply rounded once), optional scale, cache write
        offs_c = tl.arange(0, BLOCK_RANK)  # (BLOCK_RANK,)
        c_ok = offs_c < RANK
        x = tl.load(kv + offs_c, mask=c_ok, other=0.0).to(tl.float32)  # (BLOCK_RANK,)
        inv = tl.math.rsqrt(tl.sum(x * x, 0) / RANK + eps)  # () rsqrt(mean(x^2) + eps)
        y = (x * inv).to(dtype).to(tl.float32)  # (BLOCK_RANK,) normalised, rounded to the model dtype
        y = (tl.load(W + offs_c, mask=c_ok, other=0.0).to(tl.float32) * y).to(dtype)  # w * y, rounded once
        if KV_SCALE:
            y = (y.to(tl.float32) * kv_scale).to(dtype)
        tl.store(LAT + bi * stride_lb + pos * stride_ls + offs_c, y, mask=c_ok)

        # the angles of this token: d/2 of them, the first half of its cos/sin rows
        HALF: tl.constexpr = ROPE // 2
        offs_i = tl.arange(0, BLOCK_HALF)  # (BLOCK_HALF,) pair index
        i_ok = offs_i < HALF
        cs = bi * stride_cb + ti * stride_ct + offs_i
        c = tl.load(COS + cs, mask=i_ok, other=0.0).to(tl.float32)  # (BLOCK_HALF,)
        s = tl.load(SIN + cs, mask=i_ok, other=0.0).to(tl.float32)

        # the key's rope part: rotated, de-interleaved, written to its cache slot
        x1, x2 = _pairs(kv + RANK, offs_i, i_ok, HALF, INTERLEAVED)  # (BLOCK_HALF,) each
        kr = KR + bi * stride_kb + pos * stride_ks
        tl.store(kr + offs_i, (x1 * c - x2 * s).to(dtype), mask=i_ok)
        tl.store(kr + HALF + offs_i, (x2 * c + x1 * s).to(dtype), mask=i_ok)

        # the query's rope parts, every head at once: (BLOCK_H, BLOCK_HALF) tiles
        offs_h = tl.arange(0, BLOCK_H)  # (BLOCK_H,)
        hi_ok = (offs_h < H)[:, None] & i_ok[None, :]  # (BLOCK_H, BLOCK_HALF)
        qb = Q + bi * stride_qb + ti * stride_qt + offs_h[:, None] * stride_qh + NOPE  # (BLOCK_H, 1) pointers
        q1, q2 = _pairs(qb, offs_i[None, :], hi_ok, HALF, INTERLEAVED)  # (BLOCK_H, BLOCK_HALF) each
        if Q_SCALE:  # the scale rounded once before the rotation, as the reference
            q1 = (q1 * q_scale).to(dtype).to(tl.float32)
            q2 = (q2 * q_scale).to(dtype).to(tl.float32)
        qo = Q_OUT + ((bi * H + offs_h[:, None]) * T + ti) * ROPE + offs_i[None, :]  # (BLOCK_H, BLOCK_HALF)
        tl.store(qo, (q1 * c[None, :] - q2 * s[None, :]).to(dtype), mask=hi_ok)
        tl.store(qo + HALF, (q2 * c[None, :] + q1 * s[None, :]).to(dtype), mask=hi_ok)


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
