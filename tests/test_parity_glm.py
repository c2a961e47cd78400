"""GLM-4.7-Flash: our model == transformers' Glm4MoeLiteForCausalLM (fp32, eager attention and experts)."""

import pytest
import torch

from oracle import check_parity, hf_glm  # noqa: E402  (skips without transformers)

import longcat_ref as L

CONFIGS = {
    "base": dict(seed=0),
    "groups": dict(seed=1, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3, bias_std=0.2),
    "no-norm": dict(seed=2, norm_topk_prob=False, bias_std=0.3),
    "dense-x2": dict(seed=3, num_hidden_layers=4, mlp_layer_types=["dense", "dense", "sparse", "sparse"],
                     n_shared_experts=2),
    "no-qlora-half-rope": dict(seed=4, q_lora_rank=None, rope_interleave=False, qk_rope_head_dim=8),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    oracle, path = hf_glm(tmp_path_factory.mktemp(request.param), **CONFIGS[request.param])
    return request.param, oracle, L.from_pretrained(path, dtype=torch.float32)


def test_logits_and_greedy_tokens_match(pair):
    name, oracle, ours = pair
    ids = torch.randint(3, oracle.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(5))
    check_parity(oracle, ours, ids, pad_token_id=0, max_new_tokens=12, msg=name)


def test_group_limited_selection_is_exercised(tmp_path):
    """With n_group > 1, experts outside the kept groups are never chosen, and grouping changes choices."""
    oracle, path = hf_glm(tmp_path, **CONFIGS["groups"])
    ours = L.from_pretrained(path, dtype=torch.float32)
    router = ours.moe_blocks()[0].router
    h = torch.randn(256, ours.config.hidden_size, generator=torch.Generator().manual_seed(0))
    s = router.scores(h)
    idx = router.select(s)
    groups = idx // (router.n_experts // router.n_group)
    assert all(len(set(g)) <= router.topk_group for g in groups.tolist())
    flat = (s + router.e_score_correction_bias).topk(router.top_k, dim=-1).indices
    assert not torch.equal(idx.sort(-1).values, flat.sort(-1).values)


def test_bf16_bit_exact(tmp_path):
    import transformers

    _, path = hf_glm(tmp_path, seed=9, bias_std=0.1)
    oracle = transformers.Glm4MoeLiteForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, attn_implementation="eager", experts_implementation="eager").eval()
    ours = L.from_pretrained(path, dtype=torch.bfloat16)
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ours(ids), oracle(ids).logits)


@pytest.mark.parametrize("seed", [101, 202, 303])
def test_random_untuned_configs(tmp_path, seed):
    import random

    r = random.Random(seed)
    G = r.choice([1, 2, 4])
    E = G * r.randint(2, 4)
    L_ = r.randint(2, 4)
    k_dense = r.randint(0, L_ - 1)
    kw = dict(hidden_size=r.choice([32, 48, 64]), num_attention_heads=r.randint(1, 5), qk_nope_head_dim=r.choice([4, 8]),
              qk_rope_head_dim=r.choice([2, 4, 8]), v_head_dim=r.choice([4, 12]), kv_lora_rank=r.choice([8, 16]),
              q_lora_rank=r.choice([None, 16]), intermediate_size=r.choice([40, 64]), moe_intermediate_size=r.choice([8, 20]),
              n_routed_experts=E, n_group=G, topk_group=r.randint(1, G), num_hidden_layers=L_,
              mlp_layer_types=["dense"] * k_dense + ["sparse"] * (L_ - k_dense), n_shared_experts=r.randint(1, 2),
              norm_topk_prob=r.choice([True, False]), rope_interleave=r.choice([True, False]),
              routed_scaling_factor=r.choice([1.0, 1.8, 2.5]))
    kw["num_experts_per_tok"] = r.randint(1, kw["topk_group"] * (E // G))
    kw["num_key_value_heads"] = kw["num_attention_heads"]
    oracle, path = hf_glm(tmp_path, seed=seed, bias_std=r.choice([0.0, 0.2]), **kw)
    ours = L.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(3, 99, (2, 10), generator=torch.Generator().manual_seed(seed))
    check_parity(oracle, ours, ids, pad_token_id=0, msg=str(kw))
