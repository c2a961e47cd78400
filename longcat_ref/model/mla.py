"""Multi-head Latent Attention (MLA), in a *naive* and an *absorbed* form behind one flag.

Per token, MLA compresses the hidden state into a small latent (kv_lora_rank = 512) plus one shared rotary key
(qk_rope_head_dim = 64); only those 576 numbers are cached. Keys and values of all heads are linear functions of
the latent:

    q      = q_b(norm(q_a(x)))                 per head: [q_nope (128) | q_rope (64)]     (LongCat: * s_q)
    c      = norm(kv_a(x)[:512])                                                          (LongCat: * s_kv)
    k_rope = rope(kv_a(x)[512:])               one head, shared by all heads
    [k_nope | v] = kv_b(c)                     per head: 128 + 128

LongCat-Flash's LoRA scale factors s_q = sqrt(H / q_lora_rank) = 2 and s_kv = sqrt(H / kv_lora_rank) = sqrt(12)
keep the low-rank path's activations at the scale the paper trained with; GLM-4.7-Flash has none (s = 1).

Naive form (`absorb=False`): expand k_nope and v for every cached token, then ordinary attention over
(h, s, 192) keys. Absorbed form (`absorb=True`): since k_nope = W_uk c and v = W_uv c,

    q_nope . k_nope = (W_uk^T q_nope) . c          -> fold W_uk into the query: attend over the 512-wide latent
    sum_s p_s v_s   = W_uv (sum_s p_s c_s)         -> fold W_uv into the output

so attention runs directly over the cached (s, 576) latent and nothing is ever expanded. Both read the same
`LatentCache`; `tests/test_mla.py` proves them equal.

A third form, for prefill speed (`sdpa=True`, used when `absorb` is False): the naive form through
`F.scaled_dot_product_attention`, with v zero-padded to the q/k head dim so that the flash kernel applies
(192 = 192 on LongCat). `causal=True` is a hint from the caller that the mask is exactly causal from position 0
(no padding, no cache before), so SDPA can skip reading the mask. `tests/test_fast.py` proves it equal to naive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .norm import RMSNorm
from .rope import apply_rope


class MLA(nn.Module):
    def __init__(self, cfg, cache_idx: int = 0):
        super().__init__()
        self.cache_idx = cache_idx  # which attention sublayer of the cache this module reads and writes
        self.n_heads = cfg.num_attention_heads  # heads held by this module (a tensor-parallel shard may hold fewer)
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        self.q_scale, self.kv_scale = cfg.q_scale, cfg.kv_scale
        self.softmax_scale = cfg.softmax_scale
        self.interleaved = cfg.rope_interleave
        self.absorb = False  # the one flag: naive (expand K/V) vs absorbed (attend over the latent)
        self.sdpa = False  # fast path: the naive form through F.scaled_dot_product_attention
        self.causal = False  # hint for sdpa: the mask is plain causal from position 0
        H, qk = cfg.hidden_size, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(H, self.n_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=1e-6)  # 1e-6, not rms_norm_eps (as transformers)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.rank + self.rope_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(self.rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, H, bias=cfg.attention_bias)

    # ----------------------------------------------------------------------------------------------------------
    def project(self, x, cos, sin):
        """x (b, t, H) -> q_nope (b, h, t, nope), q_rope (b, h, t, rope), latent (b, t, r), k_rope (b, t, rope)."""
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)  # (b, t, h*qk)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # (b, t, h*qk)
        q = rearrange(q, "b t (h d) -> b h t d", h=self.n_heads)  # (b, h, t, nope+rope)
        q_nope, q_rope = q.split([self.nope, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope_dim], dim=-1)  # (b,t,r) (b,t,rope)
        latent = self.kv_a_layernorm(latent)  # (b, t, r)
        if self.q_scale != 1.0:  # LongCat's LoRA scales: after the norms, before kv_b and RoPE
            q_nope, q_rope = q_nope * self.q_scale, q_rope * self.q_scale
        if self.kv_scale != 1.0:
            latent = latent * self.kv_scale
        q_rope = apply_rope(q_rope, cos, sin, self.interleaved)  # (b, h, t, rope)
        k_rope = apply_rope(k_rope[:, None], cos, sin, self.interleaved)[:, 0]  # (b, t, rope): one shared head
        return q_nope, q_rope, latent, k_rope

    def forward(self, x, cos, sin, mask=None, cache=None, start: int = 0):
        """x (b, t, H); cos/sin (b, t, rope); mask: additive (b, 1, t, s) or None; writes [start, start+t) of cache."""
        q_nope, q_rope, latent, k_rope = self.project(x, cos, sin)
        if cache is not None:
            latent, k_rope = cache.update(self.cache_idx, start, latent, k_rope)  # (b, s, r), (b, s, rope)
        attend = self._absorbed if self.absorb else (self._sdpa if self.sdpa else self._naive)
        o = attend(q_nope, q_rope, latent, k_rope, mask)  # (b, h, t, v)
        return self.o_proj(rearrange(o, "b h t d -> b t (h d)"))  # (b, t, H)

    def expand_kv(self, latent, k_rope):
        """The naive form's expansion: latent (b, s, r), k_rope (b, s, rope) -> k (b, h, s, qk), v (b, h, s, v)."""
        kv = rearrange(self.kv_b_proj(latent), "b s (h d) -> b h s d", h=self.n_heads)  # (b, h, s, nope+v)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # (b, h, s, nope), (b, h, s, v)
        k = torch.cat([k_nope, k_rope[:, None].expand(-1, self.n_heads, -1, -1)], dim=-1)  # (b, h, s, qk)
        return k, v

    def _naive(self, q_nope, q_rope, latent, k_rope, mask):
        k, v = self.expand_kv(latent, k_rope)  # (b, h, s, qk), (b, h, s, v)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (b, h, t, qk)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.softmax_scale  # (b, h, t, s)
        if mask is not None:
            scores = scores + mask
        p = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # softmax in fp32
        return torch.matmul(p, v)  # (b, h, t, v)

    def kv_b_split(self):
        """kv_b_proj.weight (h*(nope+v), r) -> W_uk (h, nope, r), W_uv (h, v, r)."""
        # "(h d) r -> h d r" as a plain view: einops on a Parameter would add a new type to einops' backend cache
        # inside the first compiled step, and torch.compile would then recompile the whole step once more
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)  # (h, nope+v, r)
        return w[:, : self.nope], w[:, self.nope:]

    def _absorbed(self, q_nope, q_rope, latent, k_rope, mask):
        w_uk, w_uv = self.kv_b_split()  # (h, nope, r), (h, v, r)
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # (b, h, t, r): W_uk folded into the query
        scores = (torch.einsum("bhtr,bsr->bhts", q_lat, latent)  # (b, h, t, s) latent part
                  + torch.einsum("bhtd,bsd->bhts", q_rope, k_rope)) * self.softmax_scale  # + shared rope part
        if mask is not None:
            scores = scores + mask
        p = F.softmax(scores, dim=-1, dtype=torch.float32).to(q_nope.dtype)  # (b, h, t, s)
        o_lat = torch.einsum("bhts,bsr->bhtr", p, latent)  # (b, h, t, r): attend over the latent
        return torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv)  # (b, h, t, v): W_uv folded into the output

    def _sdpa(self, q_nope, q_rope, latent, k_rope, mask):
        k, v = self.expand_kv(latent, k_rope)  # (b, h, s, qk), (b, h, s, v)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (b, h, t, qk)
        pad = q.shape[-1] - self.v_dim
        if pad > 0:
            v = F.pad(v, (0, pad))  # (b, h, s, qk): same head dim as q/k, so flash attention applies
        causal = self.causal and q.shape[2] == k.shape[2]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                           scale=self.softmax_scale)  # (b, h, t, qk)
        return o[..., : self.v_dim]  # (b, h, t, v)
