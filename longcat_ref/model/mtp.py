"""The multi-token-prediction (MTP) head: one more decoder block that drafts token t+2 at position t.

DeepSeek-V3 style, as both serving engines run it. For position t it fuses the main model's hidden state at t with
the embedding of token t+1, runs one decoder block over those fused states (with its own latent KV cache: it
attends to the earlier positions' fused states, like any layer), and predicts token t+2:

    e   = enorm(embed_tokens(x_{t+1}))                  (b, t, H)   GLM: zeroed where position == 0
    h   = hnorm(h_t)                                    (b, t, H)   h_t: the main model's output AFTER its final norm
    x   = eh_proj(cat[e, h])                            (b, t, H)   Linear(2H -> H), embedding first
    x   = x + attn(input_layernorm(x))                  one MLA, its positions = those of h_t
    x   = x + ffn(post_attention_layernorm(x))          LongCat: a dense SwiGLU; GLM: a full MoE layer
    logits = head(final_norm(x))                        LongCat: model.mtp.norm + the main lm_head (shared)
                                                        GLM: shared_head.norm + shared_head.head (its own)

Which hidden state feeds hnorm -- read in vLLM (vllm-project/vllm):
* `vllm/model_executor/models/longcat_flash_mtp.py` (commit 0bb55d60), `LongCatMultiTokenPredictorLayer.forward`:
  `hnorm(previous_hidden_states)`, `eh_proj(cat([enorm(inputs_embeds), hnorm(prev)]))`, `mtp_block` (a
  `DeepseekV2DecoderLayer`, dense because `n_routed_experts = None`), then `final_layernorm(hidden, residual)`; the
  logits use the main `lm_head`. No position-0 masking.
* `vllm/model_executor/models/deepseek_mtp.py` (03356f8c) and `glm4_moe_lite_mtp.py` (055e47c2): the same fusion,
  `inputs_embeds[positions == 0] = 0` first, the block's output `residual + hidden_states` returned, logits from
  `shared_head.head(shared_head.norm(.))`.
* `previous_hidden_states` is what the target model's forward returned: the runner passes
  `target_hidden_states = hidden_states[:num_scheduled_tokens]` (vllm/v1/spec_decode, gpu_model_runner), and
  `FlashModel.forward` (`longcat_flash.py`, 055e47c2) ends with `hidden_states, _ = self.norm(hidden_states,
  residual); return hidden_states` -- so h_t is taken after the main model's final norm. The positions given to
  the draft are the target positions (those of h_t), with the input ids shifted by one.
* Chaining (k > 1 drafts): the next draft step's `previous_hidden_states` is what this forward returns -- LongCat:
  the state after `final_layernorm`; GLM: the block output before `shared_head.norm` (as the engines do).

Module names mirror the checkpoints' (shared/reference/real-checkpoints.md, MTP section): attached as
`CausalLM.mtp`, our `mtp.<name>` is the checkpoint's
    LongCat  `model.mtp.<name>`: embed_tokens, layers.0.{eh_proj, enorm.m, hnorm.m, input_layernorm,
             post_attention_layernorm, self_attn.*, transformer_layer.mlp.*}, norm
    GLM      `model.layers.{num_layers}.<name>`: embed_tokens, eh_proj, enorm, hnorm, input_layernorm,
             post_attention_layernorm, self_attn.*, mlp.* (router: mlp.gate), shared_head.{norm, head}
(io/checkpoint.py maps them; `mtp_checkpoint_name`).
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import DynamicCache, StaticCache
from .experts import SwiGLU
from .forms import REFERENCE, Forms
from .mla import MLA, attention_bias
from .moe import MoE
from .norm import RMSNorm
from .rope import rope_cos_sin


class _Wrapped(nn.Module):
    """LongCat stores enorm / hnorm as `enorm.m.weight` and the FFN as `transformer_layer.mlp.*`: one level more."""

    def __init__(self, name: str, module: nn.Module):
        super().__init__()
        self.add_module(name, module)


class _LongcatMTPLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.enorm = _Wrapped("m", RMSNorm(H, eps))
        self.hnorm = _Wrapped("m", RMSNorm(H, eps))
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.self_attn = MLA(cfg, cache_idx=0)
        self.transformer_layer = _Wrapped("mlp", SwiGLU(H, cfg.ffn_hidden_size))


class MTPHead(nn.Module):
    """The MTP head of LongCat-Flash (dense block, shared lm_head) or GLM-4.7-Flash (MoE block, own head)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        H, V, eps = cfg.hidden_size, cfg.vocab_size, cfg.rms_norm_eps
        self.embed_tokens = nn.Embedding(V, H)
        if cfg.is_longcat:
            self.layers = nn.ModuleList([_LongcatMTPLayer(cfg)])
            self.norm = RMSNorm(H, eps)
        else:
            self.eh_proj = nn.Linear(2 * H, H, bias=False)
            self.enorm, self.hnorm = RMSNorm(H, eps), RMSNorm(H, eps)
            self.input_layernorm = RMSNorm(H, eps)
            self.post_attention_layernorm = RMSNorm(H, eps)
            self.self_attn = MLA(cfg, cache_idx=0)
            self.mlp = MoE(cfg)
            self.shared_head = nn.Module()
            self.shared_head.norm = RMSNorm(H, eps)
            self.shared_head.head = nn.Linear(H, V, bias=False)

    # the parts, named the same for both models
    def parts(self):
        """(eh_proj, enorm, hnorm, input_layernorm, self_attn, post_attention_layernorm, ffn, final_norm)."""
        if self.config.is_longcat:
            m = self.layers[0]
            return (m.eh_proj, m.enorm.m, m.hnorm.m, m.input_layernorm, m.self_attn, m.post_attention_layernorm,
                    m.transformer_layer.mlp, self.norm)
        return (self.eh_proj, self.enorm, self.hnorm, self.input_layernorm, self.self_attn,
                self.post_attention_layernorm, self.mlp, self.shared_head.norm)

    def new_cache(self, batch: int | None = None, max_len: int | None = None, dtype=None, device=None):
        """The head's own latent cache (one attention sublayer): a DynamicCache, or a StaticCache of max_len slots."""
        if max_len is None:
            return DynamicCache(1)
        w = self.embed_tokens.weight
        cfg = self.config
        return StaticCache(1, batch, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype or w.dtype,
                           device or w.device)

    def forward(self, next_ids, hidden, position_ids, lm_head=None, attention_mask=None, cache=None,
                cache_position=None, forms: Forms = REFERENCE):
        """next_ids (b, t): token t+1 for each position t; hidden (b, t, H): the main model's final-normed hidden
        state at t (or this head's own output, when chaining); position_ids (b, t): the positions t.

        Returns logits (b, t, vocab) for token t+2, and the state a chained draft step feeds back as `hidden`.
        lm_head: the main model's (LongCat shares it; GLM ignores it). cache / cache_position / attention_mask as in
        CausalLM.forward: the head's cache uses the same slots as the main model's.
        """
        cfg = self.config
        eh_proj, enorm, hnorm, ln1, attn, ln2, ffn, final_norm = self.parts()
        b, t = next_ids.shape
        e = self.embed_tokens(next_ids)  # (b, t, H)
        if not cfg.is_longcat:
            e = e.masked_fill((position_ids == 0)[..., None], 0.0)  # deepseek_mtp / glm4_moe_lite_mtp
        x = eh_proj(torch.cat([enorm(e), hnorm(hidden.to(e.dtype))], dim=-1))  # (b, t, 2H) -> (b, t, H)
        cos, sin = rope_cos_sin(position_ids, cfg.qk_rope_head_dim, cfg.rope_theta, x.dtype)  # (b, t, rope)
        if cache_position is None:
            cache_position = (torch.arange(t, device=x.device) if cache is None
                              else cache.next_positions(t, x.device))  # (t,)
        key_length = t if cache is None else cache.key_length(t)
        mask = attention_bias(attention_mask, cache_position, key_length, x.dtype)  # (b|1, 1, t, S)
        x = x + attn(ln1(x), cos, sin, mask, cache, cache_position, forms.attention, forms.linear,
                     forms.rope)  # (b, t, H)
        h = ln2(x)  # (b, t, H)
        moe = isinstance(ffn, MoE)
        x = x + (ffn(h, forms.experts, forms.router, forms.linear) if moe else ffn(h, forms.linear))  # (b, t, H)
        if cfg.is_longcat:
            x = final_norm(x)  # (b, t, H): vLLM returns (and chains) the normed state
            return lm_head(x), x  # (b, t, V) through the shared lm_head
        return self.shared_head.head(final_norm(x)), x  # (b, t, V); chains the un-normed block output


def init_mtp(head: MTPHead, seed: int = 0, std: float = 0.02) -> MTPHead:
    """Random weights for a tiny head: the package's one initialiser (model.init_weights)."""
    from .model import init_weights

    return init_weights(head, seed=seed, std=std)
