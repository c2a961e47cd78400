"""The decoder layers and the causal LM, for both LongCat-Flash and GLM-4.7-Flash.

LongCat-Flash's shortcut-connected MoE layer (ScMoE). Each layer has two attention and two dense FFN sublayers;
the MoE reads the normalised output of the *first* attention block and its result is added only at the very end:

    x = x + attn0(norm(x))
    h = norm(x)
    shortcut = moe(h)                   <- can run concurrently with everything below (parallel.py overlaps its
    x = x + mlp0(h)                        all-reduce with mlp0, attn1 and mlp1)
    x = x + attn1(norm(x))
    x = x + mlp1(norm(x)) + shortcut

GLM-4.7-Flash's layer is the standard pre-norm block: x = x + attn(norm(x)); x = x + ffn(norm(x)), where ffn is a
dense SwiGLU or a MoE (routed + shared experts) per `mlp_layer_types`.

Module names mirror transformers' state-dict names, so checkpoints map one to one (only the router differs:
transformers calls it `mlp.router.classifier` in LongCat and `mlp.gate` in GLM; ours is `mlp.router`).
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import LatentCache
from .config import ModelConfig
from .experts import SwiGLU
from .mla import MLA
from .moe import MoE
from .norm import RMSNorm
from .rope import rope_cos_sin
from . import generate as _generate


class LongcatLayer(nn.Module):
    """Shortcut-connected MoE layer: 2 attention + 2 dense FFN sublayers + 1 MoE on a shortcut."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = nn.ModuleList([RMSNorm(H, eps) for _ in range(2)])
        self.post_attention_layernorm = nn.ModuleList([RMSNorm(H, eps) for _ in range(2)])
        self.self_attn = nn.ModuleList([MLA(cfg, cache_idx=2 * layer_idx + i) for i in range(2)])
        self.mlps = nn.ModuleList([SwiGLU(H, cfg.ffn_hidden_size) for _ in range(2)])
        self.mlp = MoE(cfg)

    def forward(self, x, cos, sin, mask, cache=None, start=0):  # x (b, t, H)
        x = x + self.self_attn[0](self.input_layernorm[0](x), cos, sin, mask, cache, start)
        h = self.post_attention_layernorm[0](x)  # (b, t, H): input of both mlp0 and the MoE
        shortcut = self.mlp.start(h)  # (b, t, H) MoE on the shortcut (a parallel MoE returns a pending reduction)
        x = x + self.mlps[0](h)
        x = x + self.self_attn[1](self.input_layernorm[1](x), cos, sin, mask, cache, start)
        x = x + self.mlps[1](self.post_attention_layernorm[1](x))
        return x + self.mlp.finish(shortcut)  # wait for the MoE only here


class DecoderLayer(nn.Module):
    """Standard pre-norm layer (GLM-4.7-Flash): attention, then a dense FFN or a MoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.self_attn = MLA(cfg, cache_idx=layer_idx)
        self.mlp = MoE(cfg) if cfg.layer_is_moe[layer_idx] else SwiGLU(H, cfg.ffn_hidden_size)

    def forward(self, x, cos, sin, mask, cache=None, start=0):  # x (b, t, H)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        Layer = LongcatLayer if cfg.is_longcat else DecoderLayer
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Layer(cfg, i) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(b, s) 0/1 padding mask -> positions counting real tokens only (left padding shifts nothing)."""
    pos = attention_mask.long().cumsum(-1) - 1  # (b, s)
    return pos.clamp(min=0)


def additive_mask(attention_mask, t: int, start: int, dtype) -> torch.Tensor:
    """Causal + padding mask, additive, (b, 1, t, s) with s = start + t: 0 where allowed, finfo(dtype).min where not.

    finfo.min instead of -inf: a query row that is all padding then gets a finite (uniform) softmax, not NaN.
    """
    s = start + t
    q_pos = torch.arange(start, s, device=attention_mask.device)[:, None]  # (t, 1)
    k_pos = torch.arange(s, device=attention_mask.device)[None, :]  # (1, s)
    allowed = (k_pos <= q_pos)[None] & attention_mask[:, None, :s].bool()  # (b, t, s)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]  # (b, 1, t, s)


class CausalLM(nn.Module):
    """LongCat-Flash or GLM-4.7-Flash: embeddings -> layers -> final norm -> untied lm_head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def dtype(self):
        return self.lm_head.weight.dtype

    @property
    def device(self):
        return self.lm_head.weight.device

    def set_absorb(self, absorb: bool = True) -> "CausalLM":
        """Switch every MLA sublayer between the naive and the absorbed form."""
        for m in self.modules():
            if isinstance(m, MLA):
                m.absorb = absorb
        return self

    def moe_blocks(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def new_cache(self, batch: int, max_len: int) -> LatentCache:
        return LatentCache.for_model(self.config, batch, max_len, self.dtype, self.device)

    def forward(self, input_ids, attention_mask=None, cache: LatentCache | None = None, position_ids=None,
                output_hidden_states: bool = False):
        """input_ids (b, t) -> logits (b, t, vocab).

        attention_mask (b, s): 1 for real tokens, 0 for (left) padding, over cache + new tokens. Without
        position_ids, positions count real tokens (so a left-padded prompt sees the same positions as alone).
        With a cache, the t new tokens are written at [cache.length, cache.length + t) and the cache advances.
        """
        b, t = input_ids.shape
        start = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(b, start + t, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (b, start + t):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, start + t)} "
                             "(cached + new tokens)")
        if start + t > self.config.max_position_embeddings:
            raise ValueError(f"{start + t} tokens exceed max_position_embeddings={self.config.max_position_embeddings}")
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)[:, start:]  # (b, t)
        x = self.model.embed_tokens(input_ids)  # (b, t, H)
        cos, sin = rope_cos_sin(position_ids, self.config.qk_rope_head_dim, self.config.rope_theta, x.dtype)
        mask = additive_mask(attention_mask, t, start, x.dtype)  # (b, 1, t, s)
        hidden = [x]
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache, start)  # (b, t, H)
            hidden.append(x)
        if cache is not None:
            cache.length = start + t
        x = self.model.norm(x)
        logits = self.lm_head(x)  # (b, t, vocab), model dtype
        if output_hidden_states:
            return logits, hidden
        return logits

    generate = _generate.generate


def init_weights(model: CausalLM, seed: int = 0, std: float = 0.02, bias_std: float = 0.0) -> CausalLM:
    """Random weights for tiny models (normal(0, std); norms near 1; optional random correction bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            else:
                v = std * torch.randn(p.shape, generator=g)
            p.copy_(v.to(p.dtype))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(bias_std * torch.randn(b.shape, generator=g))
    return model
