"""The decoder layers and the causal LM, for both LongCat-Flash and GLM-4.7-Flash.

LongCat-Flash's shortcut-connected MoE layer (ScMoE). Each layer has two attention and two dense FFN sublayers;
the MoE reads the normalised output of the *first* attention block and its result is added only at the very end:

    x = x + attn0(norm(x))
    h = norm(x)
    shortcut = moe(h)                   <- can run concurrently with everything below (runtime/parallel.py overlaps
    x = x + mlp0(h)                        its all-reduce with mlp0, attn1 and mlp1; overlap.py runs it on a
                                           side CUDA stream: Forms(shortcut="stream"))
    x = x + attn1(norm(x))
    x = x + mlp1(norm(x)) + shortcut

GLM-4.7-Flash's layer is the standard pre-norm block: x = x + attn(norm(x)); x = x + ffn(norm(x)), where ffn is a
dense SwiGLU or a MoE (routed + shared experts) per `mlp_layer_types`.

Module names mirror transformers' state-dict names, so checkpoints map one to one (only the router differs:
transformers calls it `mlp.router.classifier` in LongCat and `mlp.gate` in GLM; ours is `mlp.router`).

One forward serves every use. `CausalLM.forward` takes the cache and the slots to write (`cache_position`) as
arguments: with a `DynamicCache` (or none) it is the readable teaching path; with a `StaticCache` and a device
tensor `cache_position` its shapes never change, so generate() captures and compiles this same function for fast
decoding, and runtime/parallel.py shards this same model across processes. Which of the equivalent forms the
modules use (naive/absorbed/SDPA attention, loop/grouped/gathered experts) is the `forms` argument of each call:
nothing is switched on modules beforehand.
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import DynamicCache, StaticCache
from .config import ModelConfig
from .experts import SwiGLU
from .forms import DECODE, PREFILL, REFERENCE, Forms  # noqa: F401 (re-exported)
from .mla import MLA, attention_bias
from .moe import MoE
from .norm import RMSNorm
from .overlap import join_side_stream, shortcut_on_stream, start_on_side_stream
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

    def forward(self, x, cos, sin, mask=None, cache=None, cache_position=None, forms: Forms = REFERENCE):
        a = dict(mask=mask, cache=cache, cache_position=cache_position, form=forms.attention,
                 linear=forms.linear, rope=forms.rope, norm=forms.norm)  # x (b, t, H)
        nf = forms.norm
        x = x + self.self_attn[0](self.input_layernorm[0](x, nf), cos, sin, **a)
        h = self.post_attention_layernorm[0](x, nf)  # (b, t, H): input of both mlp0 and the MoE
        # the MoE on the shortcut (a parallel MoE: its reduction in flight until finish), on a side CUDA stream
        # for forms.shortcut "stream" (overlap.py): concurrent with the three sublayers below
        side = shortcut_on_stream(forms.shortcut, x)
        moe_args = (forms.experts, forms.router, forms.linear)
        shortcut = start_on_side_stream(self.mlp, h, *moe_args) if side else self.mlp.start(h, *moe_args)
        x = x + self.mlps[0](h, forms.linear)
        x = x + self.self_attn[1](self.input_layernorm[1](x, nf), cos, sin, **a)
        x = x + self.mlps[1](self.post_attention_layernorm[1](x, nf), forms.linear)
        if side:
            join_side_stream(x.device)
        return x + self.mlp.finish(shortcut)  # (b, t, H): wait for the MoE only here


class DecoderLayer(nn.Module):
    """Standard pre-norm layer (GLM-4.7-Flash): attention, then a dense FFN or a MoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.self_attn = MLA(cfg, cache_idx=layer_idx)
        self.mlp = MoE(cfg) if cfg.layer_is_moe[layer_idx] else SwiGLU(H, cfg.ffn_hidden_size)

    def forward(self, x, cos, sin, mask=None, cache=None, cache_position=None, forms: Forms = REFERENCE):
        x = x + self.self_attn(self.input_layernorm(x, forms.norm), cos, sin, mask, cache, cache_position,
                               forms.attention, forms.linear, forms.rope, forms.norm)
        h = self.post_attention_layernorm(x, forms.norm)  # (b, t, H)
        if isinstance(self.mlp, MoE):
            return x + self.mlp(h, forms.experts, forms.router, forms.linear)  # (b, t, H)
        return x + self.mlp(h, forms.linear)  # (b, t, H)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        Layer = LongcatLayer if cfg.is_longcat else DecoderLayer
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Layer(cfg, i) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def position_ids_from_mask(attention_mask: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    """(b, s) 0/1 key mask -> the positions (b, t) of the tokens at slots cache_position (t,), counting real tokens
    only (so a left-padded prompt sees the same positions as alone)."""
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (b, s)
    return pos.index_select(1, cache_position)  # (b, t)


class CausalLM(nn.Module):
    """LongCat-Flash or GLM-4.7-Flash: embeddings -> layers -> final norm -> untied lm_head."""

    world_size = 1  # the processes this model is sharded over (runtime/parallel.py's shard() sets it)

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

    def moe_blocks(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def new_cache(self, batch: int | None = None, max_len: int | None = None):
        """A DynamicCache (no arguments), or a StaticCache preallocated for `batch` x `max_len` tokens."""
        if max_len is None:
            return DynamicCache.for_model(self.config)
        return StaticCache.for_model(self.config, batch, max_len, self.dtype, self.device)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, cache_position=None,
                forms: Forms = REFERENCE, logits_to_keep: int = 0, output_hidden_states: bool = False):
        """input_ids (b, t) -> logits (b, t, vocab) (the last `logits_to_keep` positions if > 0).

        cache: None, a DynamicCache or a StaticCache; this chunk is written at slots cache_position (t,) (default:
        the next t slots). attention_mask (b, s): 1 for real tokens, 0 for (left) padding, over the key slots
        (cached + new; slots past s count as 0). Without position_ids, positions count real tokens. Nothing here
        syncs with the host when cache_position and attention_mask are given: generate() captures this forward.
        """
        b, t = input_ids.shape
        dev = input_ids.device
        mine = cache_position is None  # the cache chooses the slots (and a StaticCache advances its count)
        if cache is None:
            key_length, cache_position = t, (torch.arange(t, device=dev) if mine else cache_position)
        else:
            key_length = cache.key_length(t)
            if mine:
                cache_position = cache.next_positions(t, dev)  # (t,)
        if mine:
            end = (cache.length if cache is not None else 0) + t
            if end > self.config.max_position_embeddings:
                raise ValueError(f"{end} tokens exceed max_position_embeddings={self.config.max_position_embeddings}")
        if attention_mask is not None and (attention_mask.shape[0] != b or attention_mask.shape[1] > key_length
                                           or (isinstance(cache, DynamicCache | None) and
                                               attention_mask.shape[1] != key_length)):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({b}, {key_length}) "
                             "(cached + new tokens)")
        if position_ids is None:
            position_ids = (cache_position[None].expand(b, t) if attention_mask is None
                            else position_ids_from_mask(attention_mask, cache_position))  # (b, t)
        x = self.model.embed_tokens(input_ids)  # (b, t, H)
        cos, sin = rope_cos_sin(position_ids, self.config.qk_rope_head_dim, self.config.rope_theta, x.dtype)
        plain_causal = cache is None and attention_mask is None and forms.attention == "sdpa"
        mask = None if plain_causal else attention_bias(attention_mask, cache_position, key_length, x.dtype)
        hidden = [x]
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache, cache_position, forms)  # (b, t, H)
            hidden.append(x)
        if mine and isinstance(cache, StaticCache):
            cache.length += t
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(self.model.norm(x, forms.norm))  # (b, t, vocab), model dtype
        if output_hidden_states:
            return logits, hidden
        return logits

    generate = _generate.generate


def init_weights(module: nn.Module, seed: int = 0, std: float = 0.02, bias_std: float = 0.0, norm_std: float = 0.1,
                 per_tensor_seed=None, only=None):
    """The package's one random initialiser (tiny models, the demo, training, benchmarks' synthetic weights).

    Weights normal(0, std); norm weights 1 + normal(0, norm_std); the routers' correction bias normal(0, bias_std).
    per_tensor_seed=None draws everything from one CPU generator in parameter order (bitwise reproducible anywhere:
    what tiny models and the shipped one use). A function name -> int instead draws each tensor on its own device
    from its own seed (a big model on a GPU never visits the CPU; parallel shards give replicated tensors the same
    values on every rank). only: a set of parameter names to fill (default: all). Works on any nn.Module.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if only is not None and name not in only:
                continue
            mean, sd = (1.0, norm_std) if name.endswith(("norm.weight", "norm.m.weight")) else (0.0, std)
            if per_tensor_seed is None:
                p.copy_((mean + sd * torch.randn(p.shape, generator=g)).to(p.dtype))
            else:
                p.normal_(mean, sd, generator=torch.Generator(device=p.device).manual_seed(per_tensor_seed(name)))
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias") and only is None:
                if per_tensor_seed is None:
                    b.copy_(bias_std * torch.randn(b.shape, generator=g))
                else:
                    b.normal_(0.0, bias_std, generator=torch.Generator(device=b.device).manual_seed(
                        per_tensor_seed(name))) if bias_std else b.zero_()
    return module
