"""Parameter accounting, counted the way the LongCat-Flash paper counts.

total          every weight except the input embedding table (the lm_head counts), all experts included
activated_min  the non-expert weights + 0 routed experts per MoE layer (all top-k slots went to zero experts)
activated_max  the non-expert weights + top-k routed experts per MoE layer (no zero expert chosen)
(shared experts are non-expert weights: every token runs them.)

For LongCat-Flash-Chat this gives 560B total and 18.6B-31.3B activated, the paper's numbers; the model card's
~27B average corresponds to about 8 of the 12 slots landing on real experts. Counts come from a meta-device model,
so nothing is allocated.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


def parameter_counts(cfg: ModelConfig) -> dict:
    from .model import CausalLM

    with torch.device("meta"):
        model = CausalLM(cfg)
    embed = model.model.embed_tokens.weight.numel()
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    all_params = sum(p.numel() for p in model.parameters())
    non_expert = all_params - experts - embed
    per_expert = 3 * cfg.hidden_size * cfg.expert_ffn_hidden_size
    n_moe = sum(cfg.layer_is_moe)
    return {
        "total": all_params - embed,
        "total_with_embedding": all_params,
        "embedding": embed,
        "non_expert": non_expert,
        "per_expert": per_expert,
        "moe_layers": n_moe,
        "activated_min": non_expert,
        "activated_max": non_expert + n_moe * min(cfg.moe_topk, cfg.n_routed_experts) * per_expert,
    }


def activated_for(cfg: ModelConfig, real_experts_per_layer: float) -> float:
    """Activated parameters when on average `real_experts_per_layer` slots per MoE layer hit real experts."""
    c = parameter_counts(cfg)
    return c["non_expert"] + c["moe_layers"] * real_experts_per_layer * c["per_expert"]
