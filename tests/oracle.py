"""Helpers that build transformers oracles (tiny random models) and save them with `save_pretrained`.

transformers is the test oracle only; tests that import this module skip when it is not installed.
"""

from __future__ import annotations

import pytest
import torch

from longcat_ref import Forms

transformers = pytest.importorskip("transformers")


def randomize(model, seed: int, std: float = 0.08, bias_std: float = 0.0):
    """Random weights everywhere (norm weights near 1), plus an optional random correction bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(bias_std * torch.randn(b.shape, generator=g))
    return model


def hf_longcat(tmp_path, seed=0, bias_std=0.0, **kw):
    """A tiny transformers LongcatFlashForCausalLM, randomized and saved; returns (hf_model, dir)."""
    base = dict(vocab_size=99, hidden_size=48, ffn_hidden_size=64, expert_ffn_hidden_size=24, num_layers=2,
                num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=4,
                head_dim=4, v_head_dim=8, qk_nope_head_dim=8, n_routed_experts=6, zero_expert_num=3, moe_topk=3,
                routed_scaling_factor=2.0, max_position_embeddings=256, rms_norm_eps=1e-6, pad_token_id=3,
                bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return _build(transformers.LongcatFlashForCausalLM, transformers.LongcatFlashConfig(**base),
                  tmp_path / f"hf_longcat_{seed}", seed, bias_std)


def hf_glm(tmp_path, seed=0, bias_std=0.0, **kw):
    base = dict(vocab_size=99, hidden_size=48, intermediate_size=72, moe_intermediate_size=20, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=4,
                v_head_dim=12, qk_nope_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                routed_scaling_factor=1.8, n_group=1, topk_group=1, norm_topk_prob=True, max_position_embeddings=256,
                rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    base.update(kw)
    return _build(transformers.Glm4MoeLiteForCausalLM, transformers.Glm4MoeLiteConfig(**base),
                  tmp_path / f"hf_glm_{seed}", seed, bias_std, experts_implementation="eager")


def _build(cls, cfg, path, seed, bias_std, **load_kw):
    """Instantiate, randomize, save_pretrained, and reload the oracle exactly as the facts file prescribes."""
    torch.manual_seed(seed)
    randomize(cls(cfg), seed, bias_std=bias_std).save_pretrained(path)
    oracle = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager", **load_kw).eval()
    return oracle, path


def check_parity(oracle, ours, ids, pad_token_id, max_new_tokens=8, msg=""):
    """fp32 logits within 1e-5 in both MLA forms, and identical greedy tokens."""
    with torch.no_grad():
        ref = oracle(ids).logits
        for attention in ("naive", "absorbed"):
            torch.testing.assert_close(ours(ids, forms=Forms(attention=attention)), ref, atol=1e-5, rtol=0,
                                       msg=f"{msg} attention={attention}")
        want = oracle.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                               pad_token_id=pad_token_id, attention_mask=torch.ones_like(ids))
    got = ours.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=[])  # HF: eos_token_id=None, never stops
    assert torch.equal(got, want), f"{msg}: {got.tolist()} != {want.tolist()}"
