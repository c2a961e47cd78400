"""Multi-head Latent Attention (MLA): a naive, an absorbed and an SDPA form of the same attention, chosen per call.

Per token, MLA compresses the hidden state into a small latent (kv_lora_rank = 512) plus one shared rotary key
(qk_rope_head_dim = 64); only those 576 numbers are cached. Keys and values of all heads are linear functions of
the latent:

    q      = q_b(norm(q_a(x)))                 per head: [q_nope (128) | q_rope (64)]     (LongCat: * s_q)
    c      = norm(kv_a(x)[:512])                                                          (LongCat: * s_kv)
    k_rope = rope(kv_a(x)[512:])               one head, shared by all heads
    [k_nope | v] = kv_b(c)                     per head: 128 + 128

LongCat-Flash's LoRA scale factors s_q = sqrt(H / q_lora_rank) = 2 and s_kv = sqrt(H / kv_lora_rank) = sqrt(12)
keep the low-rank path's activations at the scale the paper trained with; GLM-4.7-Flash has none (s = 1).

Four forms of the same attention, chosen per call by `form` (the caller's choice is the visible one:
`CausalLM.forward(..., forms=Forms(attention=...))`):

* "naive": expand k_nope and v for every cached token, then ordinary attention over (h, s, 192) keys.
* "absorbed": since k_nope = W_uk c and v = W_uv c,

    q_nope . k_nope = (W_uk^T q_nope) . c          -> fold W_uk into the query: attend over the 512-wide latent
    sum_s p_s v_s   = W_uv (sum_s p_s c_s)         -> fold W_uv into the output

  so attention runs directly over the cached (s, 576) latent and nothing is ever expanded (decode).
* "fused": the absorbed form whose attention over the latent runs in one Triton kernel (kernels/mla_decode.py:
  flash-decoding, split over the context), for decode on a GPU.
* "fused_uv": "fused" with W_uv's product too in the kernel's merge step (one launch fewer a layer).
* "auto": for a few query tokens (decode, speculative verify) on a GPU "fused_uv" where the batch has at most
  FUSED_UV_MAX_ROWS query tokens in all and the kernel splits the context into at most FUSED_UV_MAX_CHUNKS chunks,
  "fused" otherwise; "absorbed" for more query tokens or without a GPU.
* "sdpa": the naive form through `F.scaled_dot_product_attention`, v at its own head dim (128 beside q/k's 192 on
  LongCat: on CUDA, cuDNN's flash kernel takes that); with mask=None it runs `is_causal` (prefill).

All of them read the same cache (cache.py) and `tests/test_core.py` / `tests/test_fast.py` prove them equal.

Between the projections and the attention, `rope` picks how the latent is normalised, q and k rotated and the
cache written: "plain" (norm.py, rope.py, cache.py: the lines of `project` and `StaticCache.update`), "fused"
(Triton kernels: with attention "sdpa" the prefill's RoPE and its query and key assembly, kernels/rope_qk.py, no
concatenation; otherwise the latent's norm, RoPE and the cache write in one kernel, kernels/rope_cache.py, which
needs a static cache), "fused_uk" ("fused" with W_uk's product, the absorbed forms' query fold, in the same
kernel: `rope_cache_fold_write`), "auto" (fused on a GPU for "sdpa", and for a few query tokens with a static cache;
fused_uk for up to FOLD_IN_ROPE_MAX_ROWS query tokens of the batch where the attention is an absorbed form).
tests/test_kernel_rope.py and tests/test_kernel_rope_qk.py prove them equal.

The mask is additive, (b, 1, t, s), built once per forward by `attention_bias` (the package's only mask builder).
mask=None means plain causal attention over this chunk's own t tokens (no cache before it, no padding).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..kernels import support
from ..kernels.gemv import batched_gemv
from ..kernels.skinny_gemm import batched_skinny_gemm
from ..kernels.mla_decode import chunks as mla_chunks
from ..kernels.mla_decode import mla_decode
from ..kernels.rope_cache import rope_cache_fold_write, rope_cache_write
from ..kernels.rope_qk import assemble_keys, rope_query
from ..kernels.prefetch_gemv import prefetch_gemv
from .forms import ATTENTION_FORMS, ROPE_FORMS
from .linear import linear as _linear
from .linear import resolve as resolve_linear
from .linear import takes_prefetch
from .norm import RMSNorm
from .rope import apply_rope


FUSED_MAX_QUERIES = 4  # "auto" runs the fused kernel for chunks of up to this many tokens (decode, verify)
# ... and W_uv's product in its merge kernel ("fused_uv") for up to this many query tokens of the whole batch: each
# merge program reads a slice of its head's W_uv, so the weight is read once per (sequence, query) -- a GEMV's
# worth at batch 1, where it saves a launch, but b*t times over for a batch, where one batched product wins
FUSED_UV_MAX_ROWS = 4
# ... and for at most this many context chunks: each merge program re-reads every chunk's partial sums of its row,
# once per block of W_uv's output channels. Measured on one H200 (2026-12-03, docs/perf-run13/): GLM-4.7-Flash at
# 128 slots (4 chunks) 3.611 -> 3.571 ms a step; a LongCat-Flash layer at 1,024 (32 chunks) 8.8 -> 12.7 us a merge
FUSED_UV_MAX_CHUNKS = 8
# rope "auto" folds W_uk into the query inside the rope-cache kernel ("fused_uk") for up to this many query tokens
# of the whole batch: each of its programs reads a tile of W_uk per token, a GEMV's worth at batch 1, where it saves
# the launch of W_uk's own product. Measured on one H100 (2026-12-07, docs/perf-run19/): GLM-4.7-Flash's compiled
# batch-1 step 4.031 -> 3.933 ms, 670 -> 623 kernels (the fold kernel 6.38 us a layer against 3.18 + 4.15)
FOLD_IN_ROPE_MAX_ROWS = 4
ABSORBED_FORMS = ("absorbed", "fused", "fused_uv")  # the forms that attend over the latent with W_uk folded in


def auto_form(batch: int, queries: int, kernels: bool, chunks: int = 1) -> str:
    """What attention form "auto" runs for `batch` sequences of `queries` new tokens; kernels: the Triton kernels
    can run here (a CUDA tensor); chunks: the context chunks the kernel would split the cache into
    (kernels/mla_decode.chunks). A pure function of shapes, so a captured or compiled step never changes form."""
    if not kernels or queries > FUSED_MAX_QUERIES:
        return "absorbed"
    few = batch * queries <= FUSED_UV_MAX_ROWS and chunks <= FUSED_UV_MAX_CHUNKS
    return "fused_uv" if few else "fused"


def fold_form(linear: str, per_head: str) -> str:
    """The form of W_uk's product (folded into the query), given the asked `linear` and its resolved `per_head`.
    "auto" sends it to cuBLAS even where gemv is picked for W_uv: its sum runs over the weight's strided axis, where
    inductor's reduction is slow (one H200, 2026-12-03, docs/perf-run11/: alone 5.90 us against cuBLAS's 3.84 for
    GLM-4.7-Flash; the compiled batch-1 step 4.322 -> 4.146 ms). Inside torch.compile that is "bmm", the same
    einsum as an opaque op: inductor otherwise copies W_uk, a strided slice of kv_b_proj's weight (3.9 MB a layer
    for GLM), before calling cuBLAS on it (docs/perf-run12/: 4.033 -> 3.949 ms). Explicit forms are kept."""
    if linear not in ("auto", "prefetch"):  # "prefetch" is "auto" for the per-head products
        return per_head
    return "bmm" if torch.compiler.is_compiling() else "plain"


@torch.library.custom_op("longcat_ref::fold_bmm", mutates_args=())
def _fold_bmm(q: torch.Tensor, w_uk: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """q (b, h, t, >= nope), W_uk (h, nope, r) -> (b, h, t, r): torch.einsum of q's first nope channels (times
    scale where it is not 1), whose bmm reads W_uk in place. q may be the whole query (nope + rope channels): the
    compiled step then hands over the buffer the rope kernel read, where a slice made inductor write a copy."""
    q_nope = q[..., : w_uk.shape[1]]  # (b, h, t, nope)
    if scale != 1.0:
        q_nope = q_nope * scale
    return torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk).contiguous()  # (b, h, t, r)


@_fold_bmm.register_fake
def _(q, w_uk, scale=1.0):
    return q.new_empty(q.shape[:-1] + (w_uk.shape[-1],))  # (b, h, t, r), contiguous


def attention_bias(attention_mask, cache_position: torch.Tensor, key_length: int, dtype) -> torch.Tensor:
    """The additive mask: query slots cache_position (t,) may see key slots k <= their own that are real tokens.

    attention_mask (b, s) 0/1 over key slots (s <= key_length; missing trailing slots count as 0), or None (no
    padding). Returns (b or 1, 1, t, key_length): 0 where allowed, finfo(dtype).min where not. finfo.min instead of
    -inf: a query row that is all padding then gets a finite (uniform) softmax, not NaN.
    """
    k_slot = torch.arange(key_length, device=cache_position.device)  # (S,)
    allowed = (k_slot[None, :] <= cache_position[:, None])[None]  # (1, t, S) causal
    if attention_mask is not None:
        valid = attention_mask.bool()  # (b, s)
        if valid.shape[1] < key_length:  # slots past the mask: not written yet
            valid = F.pad(valid, (0, key_length - valid.shape[1]), value=False)  # (b, S)
        allowed = allowed & valid[:, None, :]  # (b, t, S)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=cache_position.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]  # (b, 1, t, S)


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
    def down(self, x, linear: str = "plain"):
        """x (b, t, H) -> (q_a (b, t, q_lora_rank) or None, kv (b, t, r+rope)): the projections that read the
        sublayer's input. Where linear takes the prefetch kernel (linear.takes_prefetch), both in one launch
        (kernels/prefetch_gemv.py's two-weight form: q_a's rows then kv_a's, views of one output); else kv_a by
        itself, q_a left to `queries`."""
        q_a, kv_a = getattr(self, "q_a_proj", None), self.kv_a_proj_with_mqa
        if (q_a is not None and type(q_a) is nn.Linear and type(kv_a) is nn.Linear and q_a.bias is None
                and kv_a.bias is None and takes_prefetch(linear, x, q_a.weight)
                and takes_prefetch(linear, x, kv_a.weight)):
            both = prefetch_gemv(x, q_a.weight, weight2=kv_a.weight)  # (b, t, q_lora_rank + r+rope)
            return both[..., : q_a.out_features], both[..., q_a.out_features:]
        return None, _linear(kv_a, x, linear)  # (b, t, r+rope)

    def queries(self, x, linear: str = "plain", norm: str = "plain", q_a=None):
        """x (b, t, H) -> q (b, h, t, nope+rope), before any scale or RoPE. linear: the projections' form; norm:
        the RMSNorm's (norm.py); q_a: q_a's output where `down` made it already."""
        if hasattr(self, "q_proj"):
            q = _linear(self.q_proj, x, linear)  # (b, t, h*qk)
        else:
            if q_a is None:
                q_a = _linear(self.q_a_proj, x, linear)  # (b, t, q_lora_rank)
            ln, w = self.q_a_layernorm, self.q_b_proj.weight
            if (type(self.q_b_proj) is nn.Linear and self.q_b_proj.bias is None and takes_prefetch(linear, q_a, w)
                    and ln.weight.dtype == q_a.dtype):  # q_a's norm in q_b's kernel
                q = prefetch_gemv(q_a, w, None, ln.weight, ln.eps)  # (b, t, h*qk)
            else:
                q = _linear(self.q_b_proj, ln(q_a, norm), linear)  # (b, t, h*qk)
        return rearrange(q, "b t (h d) -> b h t d", h=self.n_heads)  # (b, h, t, nope+rope)

    def project(self, x, cos, sin, linear: str = "plain", norm: str = "plain"):
        """x (b, t, H) -> q_nope (b, h, t, nope), q_rope (b, h, t, rope), latent (b, t, r), k_rope (b, t, rope).
        linear: the form of the projections (linear.py); norm: the RMSNorms' (norm.py)."""
        q_a, kv = self.down(x, linear)  # (b, t, q_lora_rank) or None, (b, t, r+rope)
        q_nope, q_rope = self.queries(x, linear, norm, q_a).split([self.nope, self.rope_dim], dim=-1)
        latent, k_rope = kv.split([self.rank, self.rope_dim], dim=-1)  # (b, t, r), (b, t, rope)
        latent = self.kv_a_layernorm(latent, norm)  # (b, t, r)
        if self.q_scale != 1.0:  # LongCat's LoRA scales: after the norms, before kv_b and RoPE
            q_nope, q_rope = q_nope * self.q_scale, q_rope * self.q_scale
        if self.kv_scale != 1.0:
            latent = latent * self.kv_scale
        q_rope = apply_rope(q_rope, cos, sin, self.interleaved)  # (b, h, t, rope)
        k_rope = apply_rope(k_rope[:, None], cos, sin, self.interleaved)[:, 0]  # (b, t, rope): one shared head
        return q_nope, q_rope, latent, k_rope

    def project_assembled(self, x, cos, sin, linear: str = "plain", norm: str = "plain"):
        """`project` with RoPE and the query's [nope | rope] assembly in one kernel (kernels/rope_qk.py), for SDPA:
        returns q_nope (b, h, t, nope) and q_rope (b, h, t, rope) as views of q, latent (b, t, r), k_rope (b, t,
        rope), and q (b, h, t, nope+rope) = [q_nope | q_rope] contiguous, what SDPA reads (no concatenation)."""
        q_a, kv = self.down(x, linear)  # (b, t, q_lora_rank) or None, (b, t, r+rope)
        q = self.queries(x, linear, norm, q_a)  # (b, h, t, nope+rope) before any scale or RoPE
        latent, k_raw = kv.split([self.rank, self.rope_dim], dim=-1)  # (b, t, r), (b, t, rope)
        latent = self.kv_a_layernorm(latent, norm)  # (b, t, r)
        if self.kv_scale != 1.0:
            latent = latent * self.kv_scale
        q, k_rope = rope_query(q, k_raw, cos, sin, self.nope, self.interleaved, self.q_scale)  # (b,h,t,qk), (b,t,rope)
        return q[..., : self.nope], q[..., self.nope:], latent, k_rope, q

    def project_into_cache(self, x, cos, sin, cache, cache_position, linear: str = "plain", norm: str = "plain",
                           fold: bool = False):
        """`project` and the cache write in one kernel (kernels/rope_cache.py) after the projections: returns
        q_nope (b, h, t, nope), q_rope (b, h, t, rope), the whole cache, latent (b, S, r), k_rope (b, S, rope), the
        whole query q (b, h, t, nope+rope) before any scale (what the kernel read), and q_lat (b, h, t, r) = W_uk^T
        q_nope per head from the same kernel where fold is set (rope "fused_uk"), else None."""
        q_a, kv = self.down(x, linear)  # (b, t, q_lora_rank) or None, (b, t, r+rope)
        q = self.queries(x, linear, norm, q_a)  # (b, h, t, nope+rope)
        latent, k_rope = cache.slots(self.cache_idx)  # (b, S, r), (b, S, rope): written in place
        norm = self.kv_a_layernorm
        args = (kv, q, norm.weight, norm.eps, cos, sin, latent, k_rope, cache_position, self.nope)
        q_lat = None
        if fold:  # (b, h, t, rope), (b, h, t, r): W_uk's product in the same launch
            q_rope, q_lat = rope_cache_fold_write(*args, self.kv_b_split()[0], self.interleaved, self.kv_scale,
                                                  self.q_scale)
        else:
            q_rope = rope_cache_write(*args, self.interleaved, self.kv_scale, self.q_scale)  # (b, h, t, rope)
        q_nope = q[..., : self.nope]  # (b, h, t, nope)
        if self.q_scale != 1.0:
            q_nope = q_nope * self.q_scale
        return q_nope, q_rope, latent, k_rope, q, q_lat

    def forward(self, x, cos, sin, mask=None, cache=None, cache_position=None, form: str = "naive",
                linear: str = "plain", rope: str = "plain", norm: str = "plain"):
        """x (b, t, H); cos/sin (b, t, rope); mask additive (b, 1, t, s) or None (causal over these t tokens).

        With a cache, this chunk's latents are written at slots cache_position (t,) (default: 0..t-1) and
        attention reads every key slot the cache holds. form: "naive" | "absorbed" | "sdpa" | "fused" |
        "fused_uv" | "auto"
        (module docstring); linear: the form of the projections, and of the absorbed forms' per-head products with
        W_uk and W_uv (linear.py); rope: "plain" | "fused" | "fused_uk" | "auto" (module docstring); norm: the form
        of the q_a and latent RMSNorms (norm.py; with rope "fused" the latent's norm is the rope kernel's).
        """
        if cache is not None and cache_position is None:
            cache_position = torch.arange(x.shape[1], device=x.device)  # (t,)
        if rope == "auto":
            kernels = support.can_run(x) and x.is_cuda
            few = hasattr(cache, "slots") and x.shape[1] <= FUSED_MAX_QUERIES
            rope = "fused" if kernels and (form == "sdpa" or few) else "plain"
            if (rope == "fused" and form in ABSORBED_FORMS + ("auto",)
                    and x.shape[0] * x.shape[1] <= FOLD_IN_ROPE_MAX_ROWS):  # "auto" here is an absorbed form
                rope = "fused_uk"
        q_whole = None  # the whole query as the rope kernel read it (rope "fused")
        q_lat = None  # W_uk's product, where the rope kernel made it (rope "fused_uk")
        if rope == "fused" and form == "sdpa":  # the prefill's kernels: q assembled for SDPA, the keys below
            q_nope, q_rope, latent, k_rope, q_whole = self.project_assembled(x, cos, sin, linear, norm)
            if cache is not None:  # (b, s, r), (b, s, rope)
                latent, k_rope = cache.update(self.cache_idx, latent, k_rope, cache_position)
        elif rope in ("fused", "fused_uk"):
            if not hasattr(cache, "slots"):
                raise ValueError(f"rope={rope!r} writes a static cache in place: pass a StaticCache (or "
                                 "rope='plain')")
            if rope == "fused_uk" and form not in ABSORBED_FORMS + ("auto",):
                raise ValueError(f"rope='fused_uk' folds W_uk into the query for the absorbed forms; attention "
                                 f"{form!r} does not use it: pass rope='fused' (or attention='absorbed')")
            q_nope, q_rope, latent, k_rope, q_whole, q_lat = self.project_into_cache(
                x, cos, sin, cache, cache_position, linear, norm, fold=rope == "fused_uk")
        elif rope != "plain":
            raise ValueError(f"rope form {rope!r} is not one of {ROPE_FORMS}")
        else:
            q_nope, q_rope, latent, k_rope = self.project(x, cos, sin, linear, norm)
            if cache is not None:  # (b, s, r), (b, s, rope)
                latent, k_rope = cache.update(self.cache_idx, latent, k_rope, cache_position)
        if mask is None and (form != "sdpa" or cache is not None):  # causal, spelled out (SDPA: is_causal)
            where = torch.arange(x.shape[1], device=x.device) if cache_position is None else cache_position
            mask = attention_bias(None, where, latent.shape[1], q_nope.dtype)  # (1, 1, t, s)
        if form == "auto":  # decoding a few tokens on a GPU: the kernel; otherwise the absorbed einsums
            kernels = support.can_run(x) and x.is_cuda
            n = (mla_chunks(x.shape[0], self.n_heads, x.shape[1], self.rank, self.rope_dim, latent.shape[1],
                            latent.element_size(), x.device) if kernels else 1)  # static shapes only
            form = auto_form(x.shape[0], x.shape[1], kernels, n)
        if form in ABSORBED_FORMS:
            per_head = resolve_linear(linear, x, self.kv_b_proj.weight.numel() // 2)  # W_uk / W_uv's form
            fold = fold_form(linear, per_head)  # W_uk's own
            if q_lat is None and fold == "bmm" and q_whole is not None:  # W_uk's product from the buffer the
                q_lat = _fold_bmm(q_whole, self.kv_b_split()[0], self.q_scale)  # rope kernel read, without a copy
            if form == "absorbed":
                attend = functools.partial(self._absorbed, linear=per_head, fold=fold, q_lat=q_lat)
            else:
                attend = functools.partial(self._fused, linear=per_head, fold=fold, uv=form == "fused_uv", q_lat=q_lat)
        elif form == "sdpa":
            attend = functools.partial(self._sdpa, q=q_whole)  # q_whole: assembled by kernels/rope_qk.py
        elif form == "naive":
            attend = self._naive
        else:
            raise ValueError(f"attention form {form!r} is not one of {ATTENTION_FORMS}")
        o = attend(q_nope, q_rope, latent, k_rope, mask)  # (b, h, t, v)
        return _linear(self.o_proj, rearrange(o, "b h t d -> b t (h d)"), linear)  # (b, t, H)

    def expand_kv(self, latent, k_rope):
        """The naive form's expansion: latent (b, s, r), k_rope (b, s, rope) -> k (b, h, s, qk), v (b, h, s, v)."""
        kv = rearrange(self.kv_b_proj(latent), "b s (h d) -> b h s d", h=self.n_heads)  # (b, h, s, nope+v)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # (b, h, s, nope), (b, h, s, v)
        k = torch.cat([k_nope, k_rope[:, None].expand(-1, self.n_heads, -1, -1)], dim=-1)  # (b, h, s, qk)
        return k, v

    def _naive(self, q_nope, q_rope, latent, k_rope, mask):
        k, v = self.expand_kv(latent, k_rope)  # (b, h, s, qk), (b, h, s, v)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (b, h, t, qk)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.softmax_scale + mask  # (b, h, t, s)
        p = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # softmax in fp32
        return torch.matmul(p, v)  # (b, h, t, v)

    def kv_b_split(self):
        """kv_b_proj.weight (h*(nope+v), r) -> W_uk (h, nope, r), W_uv (h, v, r)."""
        # "(h d) r -> h d r" as a plain view: einops on a Parameter would add a new type to einops' backend cache
        # inside the first compiled step, and torch.compile would then recompile the whole step once more
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)  # (h, nope+v, r)
        return w[:, : self.nope], w[:, self.nope:]

    @staticmethod
    def fold_query(q_nope, w_uk, linear: str = "plain"):
        """q_nope (b, h, t, nope), W_uk (h, nope, r) -> q_lat (b, h, t, r) = W_uk^T q_nope per head. linear (a
        resolved form of linear.py): "gemv" as multiply-and-sum in fp32 (for torch.compile), "triton" in
        kernels/gemv.py (its sum runs over nope, W_uk's strided axis: the kernel's wide tile), "skinny" in
        kernels/skinny_gemm.py (the MMA reads either layout); "bmm" the plain
        einsum inside an op torch.compile cannot restride (fold_form; inference only: the op has no backward)."""
        if linear == "bmm":
            return _fold_bmm(q_nope, w_uk)  # (b, h, t, r)
        if linear == "gemv":
            return (q_nope.float()[..., None] * w_uk.float()[:, None]).sum(-2).to(q_nope.dtype)  # (b, h, t, r)
        if linear in ("triton", "skinny"):
            gemm = batched_gemv if linear == "triton" else batched_skinny_gemm
            y = gemm(rearrange(q_nope, "b h t d -> h (b t) d"), w_uk.transpose(1, 2))  # (h, b*t, r)
            return rearrange(y, "h (b t) r -> b h t r", b=q_nope.shape[0])  # (b, h, t, r)
        return torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # (b, h, t, r)

    @staticmethod
    def unfold_output(o_lat, w_uv, linear: str = "plain"):
        """o_lat (b, h, t, r), W_uv (h, v, r) -> o (b, h, t, v) = W_uv o_lat per head. linear: as fold_query."""
        if linear == "gemv":
            return (o_lat.float()[..., None, :] * w_uv.float()[:, None]).sum(-1).to(o_lat.dtype)  # (b, h, t, v)
        if linear in ("triton", "skinny"):
            gemm = batched_gemv if linear == "triton" else batched_skinny_gemm
            y = gemm(rearrange(o_lat, "b h t r -> h (b t) r"), w_uv)  # (h, b*t, v)
            return rearrange(y, "h (b t) v -> b h t v", b=o_lat.shape[0])  # (b, h, t, v)
        return torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv)  # (b, h, t, v)

    def _absorbed(self, q_nope, q_rope, latent, k_rope, mask, linear="plain", fold=None, q_lat=None):
        """linear: W_uv's product's form; fold: W_uk's (default: linear's); q_lat: that product, if made already."""
        w_uk, w_uv = self.kv_b_split()  # (h, nope, r), (h, v, r)
        if q_lat is None:
            q_lat = self.fold_query(q_nope, w_uk, fold or linear)  # (b, h, t, r): W_uk folded into the query
        scores = (torch.einsum("bhtr,bsr->bhts", q_lat, latent)  # (b, h, t, s) latent part
                  + torch.einsum("bhtd,bsd->bhts", q_rope, k_rope)) * self.softmax_scale  # + shared rope part
        p = F.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q_nope.dtype)  # (b, h, t, s)
        o_lat = torch.einsum("bhts,bsr->bhtr", p, latent)  # (b, h, t, r): attend over the latent
        return self.unfold_output(o_lat, w_uv, linear)  # (b, h, t, v): W_uv folded into the output

    def _fused(self, q_nope, q_rope, latent, k_rope, mask, linear="plain", fold=None, uv=False, q_lat=None):
        """The absorbed form with its attention over the latent in one Triton kernel (kernels/mla_decode.py):
        the scores never leave the chip and the latent cache is read once. For decoding (a few query tokens).
        uv: W_uv's product too, in the kernel's merge step ("fused_uv"); q_lat: as `_absorbed`."""
        w_uk, w_uv = self.kv_b_split()  # (h, nope, r), (h, v, r)
        if q_lat is None:
            q_lat = self.fold_query(q_nope, w_uk, fold or linear)  # (b, h, t, r)
        if uv:
            return mla_decode(q_lat, q_rope, latent, k_rope, mask, self.softmax_scale, w_uv=w_uv)  # (b, h, t, v)
        o_lat = mla_decode(q_lat, q_rope, latent, k_rope, mask, self.softmax_scale)  # (b, h, t, r)
        return self.unfold_output(o_lat, w_uv, linear)  # (b, h, t, v)

    def _sdpa(self, q_nope, q_rope, latent, k_rope, mask, q=None):
        """q: the assembled query [q_nope | q_rope] (rope "fused": kernels/rope_qk.py, which then assembles the
        keys too), or None (the concatenations as torch ops)."""
        if q is None:
            k, v = self.expand_kv(latent, k_rope)  # (b, h, s, qk), (b, h, s, v)
            q = torch.cat([q_nope, q_rope], dim=-1)  # (b, h, t, qk)
        else:
            kv = rearrange(self.kv_b_proj(latent), "b s (h d) -> b h s d", h=self.n_heads)  # (b, h, s, nope+v)
            k, v = assemble_keys(kv, k_rope, self.nope), kv[..., self.nope:]  # (b, h, s, qk), (b, h, s, v)
        # v keeps its own head dim (v < qk): SDPA's cuDNN and memory-efficient kernels take that, and padding v to
        # qk for the flash kernel cost a copy of v and of the output (docs/perf-run15)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              scale=self.softmax_scale)  # (b, h, t, v)
