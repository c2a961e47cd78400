"""The prefill's RoPE and its query / key assembly for SDPA, in two Triton kernels (no concatenations).

What it computes: the part of `MLA.project` and `MLA._sdpa` (model/mla.py) between the projections and SDPA, for
a prefill of t tokens, from the projections' outputs q (b, h, t, nope + d) (q_b's), k_raw (b, t, d) (kv_a's rope
part) and kv (b, h, s, nope + v) (kv_b's, over the s key slots attention reads):

    Q[b, h, t] = [ q_scale * q[b, h, t, :nope] | RoPE(q_scale * q[b, h, t, nope:], cos[b, t], sin[b, t]) ]
    k_rope[b, t] = RoPE(k_raw[b, t], cos[b, t], sin[b, t])                        one key head, shared by all h
    K[b, h, s] = [ kv[b, h, s, :nope] | k_rope[b, s] ]                          (b, h, s, nope + d)

`rope_query` makes Q and k_rope (one kernel), `assemble_keys` makes K (one kernel); k_rope goes to the cache (if
any) between the two, so K reads every slot the cache holds. RoPE as rope.py and kernels/rope_cache.py: pairs
(x[2i], x[2i+1]) interleaved or (x[i], x[i + d/2]) half, rotated by one angle each and written de-interleaved,
out[i] = x1 cos_i - x2 sin_i, out[d/2 + i] = x2 cos_i + x1 sin_i.

Why kernels. Written as PyTorch ops this is RoPE's slices, products and concatenation for the query and for the
key, then a concatenation of [nope | rope] for each: LongCat-Flash's 2k-token layer prefill spent 0.51 ms in six
`cat` kernels (strided inputs, one of them broadcast over the 64 heads) and ~0.25 ms in RoPE's products and the
LoRA scale's, for ~200 MB of traffic worth ~50 us (one H200, 2026-12-04, docs/perf-run15/prefill_sdpa.json). Here
every byte is read once and written once, by programs whose rows are contiguous runs of the outputs.

What it bought (one H100, 2026-12-06, docs/perf-run17/; with the router's logits as a 16-bit product, router.py):
the layer's captured prefill 19.26 -> 18.09 ms at 2k tokens, 44.3-45.6 -> 40.0 ms at 8k, in the same run;
`rope_query` 38 us and `assemble_keys` 32 us a sublayer at 2k, about the bytes they move at that card's speed.

The tiling. Both kernels: program (n, j) handles token (or key slot) n = (b, t) and a block of BH heads j:
    * rope_query: a (BH, BLOCK_NOPE) tile of q's nope channels copied (scaled) into Q, two (BH, BLOCK_HALF) tiles
      of q's rope pairs rotated into Q's last d channels, the token's key pairs rotated once (the block j = 0
      writes k_rope);
    * assemble_keys: a (BH, BLOCK_NOPE) tile of kv's nope channels copied into K, k_rope's (BLOCK_HALF,) halves
      broadcast over the BH heads.
Channels are padded to powers of two with masked loads; a few KB a program, registers only, no loop.

Precision: q_scale rounded once to the model dtype before the rotation, as the eager reference; the rotation in
fp32, rounded once at the store (the eager ops round x1 cos and x2 sin separately in bf16, so in bf16 the two agree
to one rounding, in fp32 to ~1e-7: kernels/rope_cache.py has the same note). The copies are exact.

`rope_qk_reference` is exactly the formulas above in PyTorch, the definition the kernels are tested equal to
(tests/test_kernel_rope_qk.py); the model's plain path (rope.py, torch.cat) is tested equal to this one end to end.
Both are `torch.library.custom_op`s ("longcat_ref::rope_query", "longcat_ref::assemble_keys") returning new
tensors. Runs on CUDA, or on the CPU in Triton's interpreter (TRITON_INTERPRET=1); without Triton the module still
imports and a call raises a one-line error (support.require).
"""

from __future__ import annotations

import torch

from . import support
from .rope_cache import _rotate

if support.have_triton():
    import triton
    import triton.language as tl

    from .rope_cache import _pairs

    @triton.jit
    def _rope_query_kernel(
        Q, KR, COS, SIN, Q_OUT, KR_OUT,  # q (b, h, t, nope+d) view, k_raw (b, t, d) view, cos/sin (b|1, t, d);
        #                                  Q_OUT (b, h, t, nope+d), KR_OUT (b, t, d) contiguous
        T, H,
        s_qb, s_qh, s_qt, s_rb, s_rt, s_cb, s_ct,
        q_scale,
        NOPE: tl.constexpr, ROPE: tl.constexpr, BLOCK_NOPE: tl.constexpr, BLOCK_HALF: tl.constexpr,
        BH: tl.constexpr, INTERLEAVED: tl.constexpr, Q_SCALE: tl.constexpr,
    ):
        n = tl.program_id(0)
        j = tl.program_id(1)
        bi, ti = (n // T).to(tl.int64), (n % T).to(tl.int64)  # this token's sequence and position (int64 offsets)
        dtype = Q_OUT.dtype.element_ty
        QK: tl.constexpr = NOPE + ROPE
        HALF: tl.constexpr = ROPE // 2
        heads = j * BH + tl.arange(0, BH)  # (BH,)
        h_ok = heads < H
        offs_i = tl.arange(0, BLOCK_HALF)  # (BLOCK_HALF,) pair index
        i_ok = offs_i < HALF
        cs = bi * s_cb + ti * s_ct + offs_i
        c = tl.load(COS + cs, mask=i_ok, other=0.0).to(tl.float32)  # (BLOCK_HALF,) the token's angles
        s = tl.load(SIN + cs, mask=i_ok, other=0.0).to(tl.float32)

        if j == 0:  # the shared key head's rope part, rotated once per token
            k1, k2 = _pairs(KR + bi * s_rb + ti * s_rt, offs_i, i_ok, HALF, INTERLEAVED)  # (BLOCK_HALF,) each
            kr = KR_OUT + (bi * T + ti) * ROPE
            tl.store(kr + offs_i, (k1 * c - k2 * s).to(dtype), mask=i_ok)
            tl.store(kr + HALF + offs_i, (k2 * c + k1 * s).to(dtype), mask=i_ok)

        q_row = Q + bi * s_qb + ti * s_qt + heads[:, None].to(tl.int64) * s_qh  # (BH, 1) pointers
        out = Q_OUT + ((bi * H + heads[:, None]) * T + ti) * QK  # (BH, 1): Q[b, h, t, :]
        offs_d = tl.arange(0, BLOCK_NOPE)  # (BLOCK_NOPE,)
        d_ok = h_ok[:, None] & (offs_d < NOPE)[None, :]  # (BH, BLOCK_NOPE)
        qn = tl.load(q_row + offs_d[None, :], mask=d_ok, other=0.0)  # (BH, BLOCK_NOPE) the nope channels
        if Q_SCALE:
            qn = (qn.to(tl.float32) * q_scale).to(dtype)  # rounded once, as the reference
        tl.store(out + offs_d[None, :], qn.to(dtype), mask=d_ok)

        r_ok = h_ok[:, None] & i_ok[None, :]  # (BH, BLOCK_HALF)
        q1, q2 = _pairs(q_row + NOPE, offs_i[None, :], r_ok, HALF, INTERLEAVED)  # (BH, BLOCK_HALF) each, fp32
        if Q_SCALE:  # the scale rounded once before the rotation, as the reference
            q1 = (q1 * q_scale).to(dtype).to(tl.float32)
            q2 = (q2 * q_scale).to(dtype).to(tl.float32)
        tl.store(out + NOPE + offs_i[None, :], (q1 * c[None, :] - q2 * s[None, :]).to(dtype), mask=r_ok)
        tl.store(out + NOPE + HALF + offs_i[None, :], (q2 * c[None, :] + q1 * s[None, :]).to(dtype), mask=r_ok)

    @triton.jit
    def _assemble_keys_kernel(
        KV, KR, K_OUT,  # kv (b, h, s, >= nope) view, k_rope (b, s, d) view; K_OUT (b, h, s, nope+d) contiguous
        S, H,
        s_kb, s_kh, s_ks, s_rb, s_rs,
        NOPE: tl.constexpr, ROPE: tl.constexpr, BLOCK_NOPE: tl.constexpr, BLOCK_ROPE: tl.constexpr,
        BH: tl.constexpr,
    ):
        n = tl.program_id(0)
        j = tl.program_id(1)
        bi, si = (n // S).to(tl.int64), (n % S).to(tl.int64)  # this key slot's sequence and position (int64: a
        #                                                     128k-slot cache times 64 heads x 256 passes 2^31)
        QK: tl.constexpr = NOPE + ROPE
        heads = j * BH + tl.arange(0, BH)  # (BH,)
        h_ok = heads < H
        out = K_OUT + ((bi * H + heads[:, None]) * S + si) * QK  # (BH, 1): K[b, h, s, :]
        offs_d = tl.arange(0, BLOCK_NOPE)
        d_ok = h_ok[:, None] & (offs_d < NOPE)[None, :]  # (BH, BLOCK_NOPE)
        kv_row = KV + bi * s_kb + si * s_ks + heads[:, None].to(tl.int64) * s_kh  # (BH, 1)
        tl.store(out + offs_d[None, :], tl.load(kv_row + offs_d[None, :], mask=d_ok, other=0.0), mask=d_ok)
        offs_r = tl.arange(0, BLOCK_ROPE)
        r_ok = offs_r < ROPE
        kr = tl.load(KR + bi * s_rb + si * s_rs + offs_r, mask=r_ok, other=0.0)  # (BLOCK_ROPE,) shared by all heads
        both = h_ok[:, None] & r_ok[None, :]  # (BH, BLOCK_ROPE)
        tl.store(out + NOPE + offs_r[None, :], tl.broadcast_to(kr[None, :], (BH, BLOCK_ROPE)), mask=both)


# ------------------------------------------------------------------------------------------------ the reference
def rope_qk_reference(q, k_raw, kv, k_rope_all, cos, sin, nope, interleaved=True, q_scale=1.0):
    """Plain PyTorch, eager rounding: (Q (b, h, t, nope+d), k_rope (b, t, d), K (b, h, s, nope+d)).

    k_rope_all (b, s, d): the rotated key slots K reads (None: this chunk's own k_rope, s = t)."""
    q_nope, q_rope = q[..., :nope], q[..., nope:]  # (b, h, t, nope), (b, h, t, d)
    if q_scale != 1.0:
        q_nope, q_rope = q_nope * q_scale, q_rope * q_scale
    Q = torch.cat([q_nope, _rotate(q_rope, cos[:, None], sin[:, None], interleaved)], dim=-1)  # (b, h, t, qk)
    k_rope = _rotate(k_raw, cos, sin, interleaved)  # (b, t, d)
    kr = k_rope if k_rope_all is None else k_rope_all  # (b, s, d)
    K = torch.cat([kv[..., :nope], kr[:, None].expand(-1, kv.shape[1], -1, -1)], dim=-1)  # (b, h, s, qk)
    return Q, k_rope, K


# ------------------------------------------------------------------------------------------------ the launchers
def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


HEADS_PER_PROGRAM = 16  # BH: a program's heads (16 x 192 bf16 channels = 6 KB of q a program)


def _last_contiguous(**tensors):
    for name, x in tensors.items():
        if x.stride(-1) != 1:
            raise ValueError(f"rope_qk wants {name}'s last axis contiguous")


@torch.library.custom_op("longcat_ref::rope_query", mutates_args=())
def _rope_query_op(q: torch.Tensor, k_raw: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nope: int,
                   interleaved: bool, q_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    support.require(q, "rope_query (the Triton RoPE + query-assembly kernel)")
    b, h, t, qk = q.shape
    d = qk - nope
    Q = torch.empty((b, h, t, qk), dtype=q.dtype, device=q.device)  # (b, h, t, nope+d)
    k_rope = torch.empty((b, t, d), dtype=q.dtype, device=q.device)  # (b, t, d)
    if b * t == 0:
        return Q, k_rope
    _last_contiguous(q=q, k_raw=k_raw, cos=cos, sin=sin)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    bh = min(HEADS_PER_PROGRAM, _next_pow2(h))
    _rope_query_kernel[(b * t, triton.cdiv(h, bh))](
        q, k_raw, cos, sin, Q, k_rope, t, h,
        q.stride(0), q.stride(1), q.stride(2), k_raw.stride(0), k_raw.stride(1),
        0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1), float(q_scale),
        NOPE=nope, ROPE=d, BLOCK_NOPE=max(16, _next_pow2(nope)), BLOCK_HALF=max(16, _next_pow2(d // 2)), BH=bh,
        INTERLEAVED=bool(interleaved), Q_SCALE=q_scale != 1.0, num_warps=4)
    return Q, k_rope


@_rope_query_op.register_fake
def _(q, k_raw, cos, sin, nope, interleaved, q_scale):
    b, h, t, qk = q.shape
    return q.new_empty((b, h, t, qk)), q.new_empty((b, t, qk - nope))


@torch.library.custom_op("longcat_ref::assemble_keys", mutates_args=())
def _assemble_keys_op(kv: torch.Tensor, k_rope: torch.Tensor, nope: int) -> torch.Tensor:
    support.require(kv, "assemble_keys (the Triton key-assembly kernel)")
    b, h, s, _ = kv.shape
    d = k_rope.shape[-1]
    K = torch.empty((b, h, s, nope + d), dtype=kv.dtype, device=kv.device)  # (b, h, s, nope+d)
    if b * s == 0:
        return K
    _last_contiguous(kv=kv, k_rope=k_rope)
    bh = min(HEADS_PER_PROGRAM, _next_pow2(h))
    _assemble_keys_kernel[(b * s, triton.cdiv(h, bh))](
        kv, k_rope, K, s, h, kv.stride(0), kv.stride(1), kv.stride(2), k_rope.stride(0), k_rope.stride(1),
        NOPE=nope, ROPE=d, BLOCK_NOPE=max(16, _next_pow2(nope)), BLOCK_ROPE=max(16, _next_pow2(d)), BH=bh,
        num_warps=4)
    return K


@_assemble_keys_op.register_fake
def _(kv, k_rope, nope):
    return kv.new_empty(kv.shape[:-1] + (nope + k_rope.shape[-1],))


def rope_query(q, k_raw, cos, sin, nope: int, interleaved: bool = True, q_scale: float = 1.0):
    """q (b, h, t, nope + d) (q_b's output, any strides with the last axis contiguous), k_raw (b, t, d) (kv_a's
    rope part), cos/sin (b or 1, t, d) -> (Q (b, h, t, nope + d) = [q_scale q_nope | RoPE(q_scale q_rope)],
    k_rope (b, t, d) = RoPE(k_raw)), both contiguous. One kernel; CUDA or Triton's CPU interpreter."""
    b, h, t, qk = q.shape
    d = qk - nope
    if (k_raw.shape != (b, t, d) or cos.shape != sin.shape or cos.shape[0] not in (1, b)
            or cos.shape[1:] != (t, d) or d <= 0 or d % 2 or not q.dtype == k_raw.dtype):
        raise ValueError(f"rope_query wants q (b, h, t, nope+d), k_raw (b, t, d), cos/sin (b or 1, t, d) of one "
                         f"d (even) and q, k_raw of one dtype; got q {tuple(q.shape)}, nope {nope}, k_raw "
                         f"{tuple(k_raw.shape)}, cos {tuple(cos.shape)}")
    return torch.ops.longcat_ref.rope_query(q, k_raw, cos, sin, int(nope), bool(interleaved), float(q_scale))


def assemble_keys(kv, k_rope, nope: int):
    """kv (b, h, s, >= nope) (kv_b's output, any strides with the last axis contiguous), k_rope (b, s, d) ->
    K (b, h, s, nope + d) = [kv[..., :nope] | k_rope broadcast over the heads], contiguous. One kernel."""
    if (kv.dim() != 4 or k_rope.dim() != 3 or k_rope.shape[:2] != (kv.shape[0], kv.shape[2])
            or kv.shape[-1] < nope or kv.dtype != k_rope.dtype):
        raise ValueError(f"assemble_keys wants kv (b, h, s, >= nope) and k_rope (b, s, d) of one dtype; got kv "
                         f"{tuple(kv.shape)}, nope {nope}, k_rope {tuple(k_rope.shape)}")
    return torch.ops.longcat_ref.assemble_keys(kv, k_rope, int(nope))
