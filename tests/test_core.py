"""Core equalities that need no oracle: naive == absorbed == SDPA attention, cached == recompute (growing and static
caches, every attention form), padding == alone."""

import pytest
import torch

import longcat_ref as L
from longcat_ref.kernels.support import can_run
from longcat_ref.model.config import ConfigError, config_from_dict, config_to_dict


def tiny(kind, **kw):
    cfg = L.tiny_longcat(**kw) if kind == "longcat" else L.tiny_glm(**kw)
    return L.init_weights(L.CausalLM(cfg), seed=1, std=0.08, bias_std=0.05).eval()


KINDS = ["longcat", "glm"]
# fused: the Triton kernel, on these CPU tensors in Triton's interpreter (conftest.py sets it up where there is no
# GPU; on a CUDA machine the kernel is tested on the GPU: tests/test_kernel_mla.py, tests/test_fp8_keep.py)
ATTENTION = ["naive", "absorbed", "sdpa"] + (["fused", "fused_uv"] if can_run(torch.empty(0)) else [])


@pytest.mark.parametrize("kind", KINDS)
def test_attention_forms_equal(kind):
    m = tiny(kind)
    ids = torch.randint(0, 512, (3, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(ids)
        assert torch.equal(ref, m(ids, forms=L.REFERENCE))  # the default is the reference
        for form in ATTENTION[1:]:
            torch.testing.assert_close(m(ids, forms=L.Forms(attention=form)), ref, atol=1e-5, rtol=1e-5, msg=form)


def test_forms_are_checked():
    with pytest.raises(ValueError, match="attention form 'flash'"):
        L.Forms(attention="flash")
    with pytest.raises(ValueError, match="experts form"):
        L.Forms(experts="fast")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("static", [False, True])
def test_cached_decode_equals_recompute(kind, attention, static):
    m = tiny(kind)
    forms = L.Forms(attention=attention)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2, 16) if static else m.new_cache()  # static: 16 slots, 4 never written
        parts = [m(ids[:, :5], cache=cache, forms=forms)]  # prefill 5
        for t in range(5, 12):  # then one token at a time
            parts.append(m(ids[:, t:t + 1], cache=cache, forms=forms))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 12
    assert isinstance(cache, L.StaticCache if static else L.DynamicCache)


@pytest.mark.parametrize("kind", KINDS)
def test_static_cache_at_device_positions_equals_recompute(kind):
    """The fixed-shape use generate(fast=True) captures: a padded batch, the key mask over all slots, and the slot
    to write given as a device tensor (the cache's own count is never read)."""
    m = tiny(kind)
    ids = torch.randint(4, 512, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 left-padded
    cache, keys = m.new_cache(2, 16), torch.zeros(2, 16, dtype=torch.long)
    with torch.no_grad():
        full = m(ids, attention_mask=mask)
        keys[:, :6] = mask[:, :6]
        parts = [m(ids[:, :6], attention_mask=keys, cache=cache, cache_position=torch.arange(6))]
        for t in range(6, 10):
            keys[:, t] = 1
            parts.append(m(ids[:, t:t + 1], attention_mask=keys, cache=cache, cache_position=torch.tensor([t]),
                           forms=L.DECODE))
    got = torch.cat(parts, 1)
    torch.testing.assert_close(got[mask.bool()], full[mask.bool()], atol=1e-5, rtol=1e-5)
    assert cache.length == 0  # the caller chose the slots


@pytest.mark.parametrize("kind", KINDS)
def test_left_padding_equals_alone(kind):
    m = tiny(kind)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(4, 512, (1, 9), generator=g), torch.randint(4, 512, (1, 5), generator=g)
    batch = torch.full((2, 9), 3)
    mask = torch.zeros(2, 9, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, 4:], mask[1, 4:] = b[0], 1
    with torch.no_grad():
        out = m(batch, attention_mask=mask)
        torch.testing.assert_close(out[0], m(a)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1, 4:], m(b)[0], atol=1e-5, rtol=1e-5)
    gen = m.generate(batch, max_new_tokens=6, attention_mask=mask)
    assert torch.equal(gen[0, 9:], m.generate(a, max_new_tokens=6)[0, 9:])
    assert torch.equal(gen[1, 9:], m.generate(b, max_new_tokens=6)[0, 5:])


def test_sampling_is_seeded_and_stops():
    m = tiny("longcat")
    ids = torch.randint(4, 512, (2, 4), generator=torch.Generator().manual_seed(3))
    a = m.generate(ids, 10, temperature=1.0, top_p=0.9, seed=7)
    b = m.generate(ids, 10, temperature=1.0, top_p=0.9, seed=7)
    c = m.generate(ids, 10, temperature=1.0, top_p=0.9, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = m.generate(ids, 10)
    stop = int(greedy[0, 4])  # row 0's first generated token
    out = m.generate(ids, 10, eos_token_id=stop)
    assert int(out[0, 4]) == stop and (out[0, 5:] == m.config.pad_token_id).all()  # row 0 stopped, then padded
    row1 = greedy[1, 4:].tolist()
    if stop in row1:  # all rows stopped: generation ends early
        assert out.shape[1] == 4 + row1.index(stop) + 1
    else:
        assert torch.equal(out[1], greedy[1])
    with pytest.raises(ValueError, match="top_p"):
        m.generate(ids, 2, temperature=1.0, top_p=0.0)


def test_top_p_keeps_only_the_nucleus():
    from longcat_ref.model.generate import sample_next

    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, 1.0, 0.8, g)) for _ in range(200)}
    assert picks == {0, 1}


def test_prompt_too_long():
    m = tiny("longcat")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m.generate(torch.zeros(1, 500, dtype=torch.long), max_new_tokens=20)


def test_cache_bytes_match_the_formula():
    cfg = L.longcat_flash_chat()
    assert cfg.kv_cache_bytes_per_token(2) == 56 * 576 * 2 == 64512
    m = tiny("longcat")
    c = m.new_cache(1, 100)
    assert c.bytes_per_token() == m.config.num_attn_sublayers * (16 + 4) * 4


# ---------------------------------------------------------------------------------------------- config
def test_config_roundtrip_and_errors():
    for cfg in (L.longcat_flash_chat(), L.glm_4_7_flash(), L.tiny_longcat(), L.tiny_glm()):
        assert config_from_dict(config_to_dict(cfg)) == cfg
    d = config_to_dict(L.tiny_longcat())
    with pytest.raises(ConfigError, match="unknown config field"):
        config_from_dict({**d, "frobnicate": 1})
    with pytest.raises(ConfigError, match="moe_topk"):
        config_from_dict({**d, "moe_topk": 100})
    with pytest.raises(ConfigError, match="qk_head_dim"):
        config_from_dict({**d, "qk_head_dim": 99})
    with pytest.raises(ConfigError, match="head_dim"):
        config_from_dict({**d, "head_dim": 6})
    with pytest.raises(ConfigError, match="model_type"):
        config_from_dict({**d, "model_type": "llama"})
    with pytest.raises(ConfigError, match="n_group"):
        config_from_dict({**config_to_dict(L.tiny_glm()), "n_group": 3})


def test_original_longcat_config_keys():
    """The original remote-code config: no model_type, num_layers, mla_scale_*, zero_expert_type, router_bias."""
    d = config_to_dict(L.tiny_longcat())
    d.pop("model_type")
    d.update(mla_scale_q_lora=True, mla_scale_kv_lora=True, zero_expert_type="identity", router_bias=False,
             norm_topk_prob=False, num_nextn_predict_layers=1, attention_method="MLA", rope_theta=1e7)
    d.pop("rope_parameters")
    cfg = config_from_dict(d)
    assert cfg.is_longcat and cfg.num_nextn_predict_layers == 1 and cfg.rope_theta == 1e7
    with pytest.raises(ConfigError, match="zero_expert_type"):
        config_from_dict({**d, "zero_expert_type": "const"})


def test_load_config_from_dir_and_file(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(L.tiny_glm())))
    assert L.load_config(tmp_path) == L.load_config(tmp_path / "config.json") == L.tiny_glm()
    with pytest.raises(FileNotFoundError):
        L.load_config(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------- accounting
def test_parameter_counts_reproduce_the_paper():
    c = L.parameter_counts(L.longcat_flash_chat())
    assert 559.5e9 < c["total"] < 560.5e9  # "560B"
    assert 18.6e9 <= c["activated_min"] < 18.7e9  # "18.6B" (the paper truncates 18.69)
    assert 31.3e9 <= c["activated_max"] < 31.4e9  # "31.3B"


def test_parameter_counts_glm():
    c = L.parameter_counts(L.glm_4_7_flash())
    assert round(c["total_with_embedding"] / 1e9, 2) == 29.94  # "30B" counts every weight
    assert 3.5e9 < c["activated_max"] < 3.7e9  # "A3B": ~3.6B per token
