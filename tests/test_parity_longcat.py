"""LongCat-Flash: our model == transformers' LongcatFlashForCausalLM (fp32, eager) on tiny random configs."""

import pytest
import torch

from oracle import check_parity, hf_longcat  # noqa: E402  (skips without transformers)

import longcat_ref as L

CONFIGS = {
    "base": dict(seed=0),
    "zero-heavy": dict(seed=1, n_routed_experts=4, zero_expert_num=4, moe_topk=4, routed_scaling_factor=6.0),
    "biased": dict(seed=2, bias_std=0.3),
    "wide-heads": dict(seed=3, num_attention_heads=8, num_key_value_heads=8, qk_nope_head_dim=12, v_head_dim=6,
                       qk_rope_head_dim=8, head_dim=8, kv_lora_rank=20, q_lora_rank=40, num_layers=3),
    "few-zero-topk2": dict(seed=4, moe_topk=2, n_routed_experts=10, zero_expert_num=2, routed_scaling_factor=1.0),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    kw = dict(CONFIGS[request.param])
    oracle, path = hf_longcat(tmp_path_factory.mktemp(request.param), **kw)
    ours = L.from_pretrained(path, dtype=torch.float32)
    return request.param, oracle, ours


def test_logits_and_greedy_tokens_match(pair):
    name, oracle, ours = pair
    ids = torch.randint(4, oracle.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(5))
    check_parity(oracle, ours, ids, pad_token_id=3, max_new_tokens=12, msg=name)


def test_configs_exercise_zero_experts_and_bias(tmp_path):
    """The parity configs must actually route to zero experts, and the bias must change the selection."""
    oracle, path = hf_longcat(tmp_path, **CONFIGS["biased"])
    ours = L.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(4, 99, (2, 11), generator=torch.Generator().manual_seed(5))
    ours(ids)
    moe = ours.moe_blocks()[0]
    assert (moe.last_idx >= moe.n_routed).any(), "no zero expert was chosen"
    h = torch.randn(64, ours.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with_bias = moe.router.select(moe.router.scores(h))
    bias = moe.router.e_score_correction_bias.clone()
    moe.router.e_score_correction_bias.zero_()
    without = moe.router.select(moe.router.scores(h))
    moe.router.e_score_correction_bias.copy_(bias)
    assert not torch.equal(with_bias.sort(-1).values, without.sort(-1).values), "bias never changed a selection"


def test_left_padded_generation_matches_transformers(tmp_path):
    oracle, path = hf_longcat(tmp_path, seed=11)
    ours = L.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(4, 99, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 3, 0  # left padding on row 0
    with torch.no_grad():
        ref = oracle.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=3)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(got, ref)


def test_bf16_bit_exact(tmp_path):
    """In bf16 the op order matters; ours follows transformers' exactly."""
    import transformers

    _, path = hf_longcat(tmp_path, seed=12, bias_std=0.1)
    oracle = transformers.LongcatFlashForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                                  attn_implementation="eager").eval()
    ours = L.from_pretrained(path, dtype=torch.bfloat16, router_dtype=None)  # router rounded as transformers does
    ids = torch.randint(4, 99, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ours(ids), oracle(ids).logits)


@pytest.mark.parametrize("seed", [101, 202, 303])
def test_random_untuned_configs(tmp_path, seed):
    """Sizes drawn at random (not tuned for): logits within 1e-5, greedy tokens identical."""
    import random

    r = random.Random(seed)
    rope = r.choice([2, 4, 8])
    E = r.randint(2, 9)
    Z = r.randint(1, 5)
    kw = dict(hidden_size=r.choice([32, 40, 64]), num_attention_heads=r.randint(1, 6), qk_nope_head_dim=r.choice([4, 8, 12]),
              qk_rope_head_dim=rope, head_dim=rope, v_head_dim=r.choice([4, 8, 16]), kv_lora_rank=r.choice([8, 16, 24]),
              q_lora_rank=r.choice([8, 16, 32]), ffn_hidden_size=r.choice([32, 48]), expert_ffn_hidden_size=r.choice([8, 16]),
              n_routed_experts=E, zero_expert_num=Z, moe_topk=r.randint(2, E + Z), num_layers=r.randint(1, 3),
              routed_scaling_factor=r.choice([1.0, 2.5, 6.0]))
    kw["num_key_value_heads"] = kw["num_attention_heads"]
    oracle, path = hf_longcat(tmp_path, seed=seed, bias_std=r.choice([0.0, 0.2]), **kw)
    ours = L.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(4, 99, (2, 10), generator=torch.Generator().manual_seed(seed))
    check_parity(oracle, ours, ids, pad_token_id=3, msg=str(kw))
