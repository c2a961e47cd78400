"""Checkpoint loading and writing: both expert layouts, sharding, strict accounting, every error, dtype casting,
the MTP block, and the parallel hooks (shard / shard_rule)."""

import json
import os

import pytest
import torch

import longcat_ref as L
from longcat_ref.io.checkpoint import (MTP, PHANTOM, CheckpointError, checkpoint_tensors, load_weights, mtp_tensors,
                                    original_longcat_config)
from longcat_ref.model.config import ConfigError, config_from_dict


def tiny(kind, seed=1):
    cfg = L.tiny_longcat() if kind == "longcat" else L.tiny_glm()
    return L.init_weights(L.CausalLM(cfg), seed=seed, std=0.08, bias_std=0.05).eval()


IDS = torch.randint(4, 512, (2, 7), generator=torch.Generator().manual_seed(0))


def same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(a(IDS), b(IDS))


@pytest.mark.parametrize("kind", ["longcat", "glm"])
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("shard", [None, 30_000])
def test_layouts_roundtrip(tmp_path, kind, layout, shard):
    m = tiny(kind)
    L.save_checkpoint(m, tmp_path, layout=layout, max_shard_bytes=shard)
    files = os.listdir(tmp_path)
    assert ("model.safetensors.index.json" in files) == bool(shard)
    if shard:
        assert sum(f.endswith(".safetensors") for f in files) > 2
    keys = checkpoint_tensors(m, layout)
    if layout == "per_expert":
        assert "model.layers.1.mlp.experts.7.up_proj.weight" in keys and not any("gate_up_proj" in k for k in keys)
    else:
        assert "model.layers.1.mlp.experts.gate_up_proj" in keys
    router = "mlp.router.classifier.weight" if kind == "longcat" else "mlp.gate.weight"
    assert f"model.layers.1.{router}" in keys
    back = L.from_pretrained(tmp_path, dtype=torch.float32)
    same_model(m, back)
    assert back.load_report.skipped == {}
    assert not back.training


def test_original_longcat_layout_config_and_mtp(tmp_path):
    m = tiny("longcat")
    L.save_checkpoint(m, tmp_path, original_config=True, mtp=True, max_shard_bytes=40_000)
    cfgd = json.loads((tmp_path / "config.json").read_text())
    assert cfgd["model_type"] == "longcat_flash"  # the published config.json has it
    assert cfgd["num_layers"] == 2 and cfgd["zero_expert_type"] == "identity"
    assert cfgd["rope_theta"] == 1e7 and "rope_parameters" not in cfgd
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    mtp_names = sorted(k for k in weight_map if k.startswith("model.mtp."))
    H = m.config.hidden_size
    for name in ["model.mtp.embed_tokens.weight", "model.mtp.layers.0.eh_proj.weight",
                 "model.mtp.layers.0.enorm.m.weight", "model.mtp.layers.0.hnorm.m.weight",
                 "model.mtp.layers.0.self_attn.kv_b_proj.weight",
                 "model.mtp.layers.0.transformer_layer.mlp.down_proj.weight", "model.mtp.norm.weight"]:
        assert name in mtp_names
    back = L.from_pretrained(tmp_path, dtype=torch.float32, mtp=False)  # kept by default: tests/test_mtp.py
    same_model(m, back)
    assert back.config == m.config.replace(num_nextn_predict_layers=1)
    assert back.load_report.skipped == {MTP: len(mtp_names)}
    mtp = mtp_tensors(tmp_path)
    assert sorted(mtp) == mtp_names
    assert mtp["model.mtp.layers.0.eh_proj.weight"].shape == (H, 2 * H)


def test_original_config_is_read_as_longcat():
    d = original_longcat_config(L.tiny_longcat())
    assert d["model_type"] == "longcat_flash"
    assert config_from_dict(d) == L.tiny_longcat(num_nextn_predict_layers=1)
    d.pop("model_type")  # copies that lost model_type are recognised by LongCat's own fields
    assert config_from_dict(d) == L.tiny_longcat(num_nextn_predict_layers=1)


def test_dtype_is_cast_while_loading(tmp_path):
    m = tiny("longcat")
    L.save_checkpoint(m, tmp_path)
    bf = L.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for (n, p), (_, q) in zip(m.named_parameters(), bf.named_parameters()):
        if n.endswith("mlp.router.weight"):  # LongCat's router stays fp32, as the serving engines keep it
            assert q.dtype == torch.float32 and torch.equal(q, p), n
        else:
            assert q.dtype == torch.bfloat16 and torch.equal(q, p.to(torch.bfloat16)), n
    b, b0 = bf.model.layers[0].mlp.router.e_score_correction_bias, m.model.layers[0].mlp.router.e_score_correction_bias
    assert b.dtype == torch.float32 and torch.equal(b, b0)  # the fp32 bias is not rounded
    # router_dtype=None: as transformers, the router weight in the model dtype and the bias rounded through it
    hf_like = L.from_pretrained(tmp_path, dtype=torch.bfloat16, router_dtype=None)
    w = hf_like.model.layers[0].mlp.router.weight
    assert w.dtype == torch.bfloat16 and torch.equal(w, m.model.layers[0].mlp.router.weight.to(torch.bfloat16))
    b = hf_like.model.layers[0].mlp.router.e_score_correction_bias
    assert b.dtype == torch.float32 and torch.equal(b, b0.to(torch.bfloat16).float()) and not torch.equal(b, b0)
    # and the other way round: a bf16 file loads into fp32
    L.save_checkpoint(hf_like, tmp_path / "bf16")
    back = L.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert back.lm_head.weight.dtype == torch.float32 and torch.equal(back.lm_head.weight, bf.lm_head.weight.float())


def test_glm_bias_stays_fp32_and_mtp_layer_is_skipped(tmp_path):
    m = tiny("glm")
    nl = m.config.num_layers
    extra = {f"model.layers.{nl}.eh_proj.weight": torch.zeros(64, 128),
             f"model.layers.{nl}.mlp.gate.e_score_correction_bias": torch.zeros(8)}
    L.save_checkpoint(m, tmp_path, extra=extra)
    bf = L.from_pretrained(tmp_path, dtype=torch.bfloat16)
    b = bf.model.layers[1].mlp.router.e_score_correction_bias
    assert b.dtype == torch.float32 and torch.equal(b, m.model.layers[1].mlp.router.e_score_correction_bias)
    assert bf.load_report.skipped == {MTP: 2} and "missing" in bf.load_report.mtp_note  # an incomplete block
    assert sorted(mtp_tensors(tmp_path)) == sorted(extra)


def test_phantom_zero_expert_rows_are_skipped(tmp_path):
    """transformers 5.x sizes gate_up_proj for routed + zero experts: fused (E+Z) rows, or extra per-expert keys."""
    m = tiny("longcat")
    E, Z = m.config.n_routed_experts, m.config.zero_expert_num
    fused = checkpoint_tensors(m, "fused")
    g = fused["model.layers.0.mlp.experts.gate_up_proj"]
    fused["model.layers.0.mlp.experts.gate_up_proj"] = torch.cat([g, torch.randn(Z, *g.shape[1:])])
    L.save_checkpoint(m, tmp_path / "fused", layout="fused", extra=fused)
    back = L.from_pretrained(tmp_path / "fused", dtype=torch.float32)
    same_model(m, back)
    assert back.load_report.skipped == {PHANTOM: 1}
    extra = {f"model.layers.0.mlp.experts.{e}.{w}.weight": torch.zeros(32, 64) for e in range(E, E + Z)
             for w in ("gate_proj", "up_proj")}
    L.save_checkpoint(m, tmp_path / "per", extra=extra)
    back = L.from_pretrained(tmp_path / "per", dtype=torch.float32)
    same_model(m, back)
    assert back.load_report.skipped == {PHANTOM: 2 * Z}


# ------------------------------------------------------------------------------------------------- errors
@pytest.fixture
def saved(tmp_path):
    m = tiny("longcat")
    L.save_checkpoint(m, tmp_path / "ckpt", max_shard_bytes=60_000)
    return m, tmp_path / "ckpt"


def _rewrite(path, change):
    from safetensors.torch import load_file, save_file

    t = load_file(path)
    change(t)
    save_file(t, path)


def _shard_of(path, key):
    return path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][key]


def test_error_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        L.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        L.from_pretrained(tmp_path)


def test_error_unknown_model_type(saved):
    _, p = saved
    d = json.loads((p / "config.json").read_text())
    (p / "config.json").write_text(json.dumps({**d, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="unknown model_type 'llama'"):
        L.from_pretrained(p)
    (p / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        L.from_pretrained(p)


def test_error_missing_tensor(saved):
    _, p = saved
    key = "model.layers.1.mlp.experts.5.down_proj.weight"
    _rewrite(_shard_of(p, key), lambda t: t.pop(key))
    idx = json.loads((p / "model.safetensors.index.json").read_text())
    idx["weight_map"].pop(key)
    (p / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.experts\.5\.down_proj\.weight"):
        L.from_pretrained(p)


def test_error_wrong_shape(saved):
    _, p = saved
    key = "model.layers.0.self_attn.1.kv_b_proj.weight"
    _rewrite(_shard_of(p, key), lambda t: t.__setitem__(key, torch.zeros(256, 17)))
    with pytest.raises(CheckpointError, match=r"kv_b_proj.weight .* has shape \[256, 17\], expected \[256, 16\]"):
        L.from_pretrained(p)


def test_error_truncated_and_corrupt_files(saved):
    _, p = saved
    shard = _shard_of(p, "lm_head.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=f"{shard.name}: truncated or corrupt"):
        L.from_pretrained(p)
    shard.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match=f"{shard.name}: truncated"):
        L.from_pretrained(p)
    n = int.from_bytes(data[:8], "little")
    shard.write_bytes(data[:8] + b"\xff" * n + data[8 + n:])  # same size, garbage header
    with pytest.raises(CheckpointError, match=f"{shard.name}: corrupt safetensors header"):
        L.from_pretrained(p)


def test_error_index_points_at_missing_shard(saved):
    _, p = saved
    shard = _shard_of(p, "lm_head.weight")
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"points at a missing shard: {shard.name}"):
        L.from_pretrained(p)


def test_error_broken_index(saved):
    _, p = saved
    (p / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        L.from_pretrained(p)


def test_error_unexpected_tensor(saved):
    _, p = saved
    shard = _shard_of(p, "lm_head.weight")
    _rewrite(shard, lambda t: t.__setitem__("model.layers.0.mlp.frobnicator.weight", torch.zeros(2)))
    idx = json.loads((p / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.layers.0.mlp.frobnicator.weight"] = shard.name
    (p / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.mlp\.frobnicator\.weight"):
        L.from_pretrained(p)


def test_error_no_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(L.model.config.config_to_dict(L.tiny_glm())))
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        L.from_pretrained(tmp_path)


def test_config_errors_are_still_config_errors():
    with pytest.raises(ConfigError):
        config_from_dict({"model_type": "llama"})


# ------------------------------------------------------------------------------------------------- parallel hooks
class HalfExperts:
    """A toy parallel plan: this 'rank' owns experts [E/2, E) and rows [V/2, V) of lm_head."""

    def __init__(self, cfg):
        self.E, self.V = cfg.n_routed_experts, cfg.vocab_size
        self.checked = False

    def check(self, cfg):
        self.checked = True

    def shard(self, model):
        for moe in model.moe_blocks():
            ex = moe.experts
            ex.gate_up_proj = torch.nn.Parameter(ex.gate_up_proj[self.E // 2:])
            ex.down_proj = torch.nn.Parameter(ex.down_proj[self.E // 2:])
            ex.first_expert = self.E // 2
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight[self.V // 2:])

    def shard_rule(self, name, shape):
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            return (0, self.E // 2, self.E)
        if name == "lm_head.weight":
            return (0, self.V // 2, self.V)
        return None


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_parallel_hooks_load_only_owned_slices(tmp_path, layout):
    m = tiny("longcat")
    L.save_checkpoint(m, tmp_path, layout=layout)
    plan = HalfExperts(m.config)
    part = L.from_pretrained(tmp_path, dtype=torch.float32, parallel=plan)
    assert plan.checked
    E, V = plan.E, plan.V
    full = m.state_dict()
    for name, t in part.state_dict().items():
        if "experts." in name:
            assert torch.equal(t, full[name][E // 2:]), name
        elif name == "lm_head.weight":
            assert torch.equal(t, full[name][V // 2:])
        else:
            assert torch.equal(t, full[name]), name
    # half the expert bytes and half the lm_head were never read
    whole = L.from_pretrained(tmp_path, dtype=torch.float32)
    assert part.load_report.bytes_read < whole.load_report.bytes_read


def test_shard_rule_mismatch_is_reported(tmp_path):
    m = tiny("longcat")
    L.save_checkpoint(m, tmp_path)
    model = L.io.checkpoint.build_empty(m.config)
    with pytest.raises(CheckpointError, match="sharding rule mismatch"):
        load_weights(model, m.config, tmp_path, torch.float32,
                     shard_rule=lambda n, s: (0, 0, 2) if n.endswith("experts.down_proj") else None)


def test_progress_bar(tmp_path, capsys):
    m = tiny("glm")
    L.save_checkpoint(m, tmp_path)
    same_model(m, L.from_pretrained(tmp_path, dtype=torch.float32, progress=True))
    assert "loading" in capsys.readouterr().err  # tqdm's bar on stderr (automatic for loads > 1 GiB on a terminal)


# ------------------------------------------------------------------------------------------------- real config files
# The key sets of the published config.json files (shared/reference/real-checkpoints.md).
GLM_4_7_FLASH_CONFIG = {
    "architectures": ["Glm4MoeLiteForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "pad_token_id": 154820, "eos_token_id": [154820, 154827, 154829], "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 10240, "max_position_embeddings": 202752, "model_type": "glm4_moe_lite",
    "moe_intermediate_size": 1536, "topk_method": "noaux_tc", "norm_topk_prob": True, "num_attention_heads": 20,
    "n_group": 1, "topk_group": 1, "n_routed_experts": 64, "n_shared_experts": 1, "routed_scaling_factor": 1.8,
    "num_experts_per_tok": 4, "first_k_dense_replace": 1, "num_hidden_layers": 47, "num_key_value_heads": 20,
    "num_nextn_predict_layers": 1, "partial_rotary_factor": 1.0, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 1000000, "tie_word_embeddings": False, "dtype": "bfloat16", "transformers_version": "5.0.0",
    "q_lora_rank": 768, "kv_lora_rank": 512, "qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "v_head_dim": 256,
    "vocab_size": 154880,
}
LONGCAT_FLASH_CHAT_CONFIG = {
    "architectures": ["LongcatFlashForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attention_method": "MLA", "auto_map": {"AutoConfig": "configuration_longcat_flash.LongcatFlashConfig"},
    "bos_token_id": 1, "eos_token_id": 2, "expert_ffn_hidden_size": 2048, "ffn_hidden_size": 12288,
    "hidden_size": 6144, "kv_lora_rank": 512, "max_position_embeddings": 131072, "mla_scale_kv_lora": True,
    "mla_scale_q_lora": True, "model_type": "longcat_flash", "moe_topk": 12, "n_routed_experts": 512,
    "num_attention_heads": 64, "num_layers": 28, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-05, "rope_theta": 10000000.0, "routed_scaling_factor": 6.0,
    "use_cache": True, "v_head_dim": 128, "vocab_size": 131072, "zero_expert_num": 256, "zero_expert_type": "identity",
}


def test_real_glm_4_7_flash_config_loads():
    assert config_from_dict(GLM_4_7_FLASH_CONFIG) == L.glm_4_7_flash()
    with pytest.raises(ConfigError, match=r"partial_rotary_factor=0\.5 is not supported"):
        config_from_dict({**GLM_4_7_FLASH_CONFIG, "partial_rotary_factor": 0.5})
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['rope_frobnication'\] for glm4_moe_lite: .*"
                                          "remove it from config.json"):
        config_from_dict({**GLM_4_7_FLASH_CONFIG, "rope_frobnication": 2})


def test_real_longcat_flash_chat_config_loads():
    assert config_from_dict(LONGCAT_FLASH_CHAT_CONFIG) == L.longcat_flash_chat()
    # the engines' config classes add these keys
    extra = {"params_dtype": "bfloat16", "nextn_use_scmoe": False, "num_nextn_layers": 1}
    assert config_from_dict({**LONGCAT_FLASH_CHAT_CONFIG, **extra}) == L.longcat_flash_chat().replace(num_nextn_predict_layers=1)


def test_glm_real_mtp_names_bf16_gate_fp32_bias(tmp_path):
    """GLM-4.7-Flash on disk: bf16 weights (gate included), fp32 correction bias, and the MTP layer at index
    num_hidden_layers with its own embed_tokens, shared_head, eh_proj, enorm/hnorm plus a full MoE layer."""
    m = tiny("glm")
    cfg, nl, H, V = m.config, m.config.num_layers, m.config.hidden_size, m.config.vocab_size
    biases = {f"model.layers.{i}.mlp.gate.e_score_correction_bias": b.float() for i, b in
              ((i, m.model.layers[i].mlp.router.e_score_correction_bias) for i in (1, 2))}
    mtp = {f"model.layers.{nl}.{k}": torch.randn(s) for k, s in {
        "eh_proj.weight": (H, 2 * H), "enorm.weight": (H,), "hnorm.weight": (H,), "embed_tokens.weight": (V, H),
        "shared_head.head.weight": (V, H), "shared_head.norm.weight": (H,), "input_layernorm.weight": (H,),
        "self_attn.kv_b_proj.weight": (256, 16), "mlp.gate.weight": (8, H),
        "mlp.gate.e_score_correction_bias": (8,), "mlp.experts.0.gate_proj.weight": (24, H),
        "mlp.shared_experts.down_proj.weight": (H, 24)}.items()}
    mtp = {k: (v if "correction_bias" in k else v.to(torch.bfloat16)) for k, v in mtp.items()}
    L.save_checkpoint(m, tmp_path, dtype=torch.bfloat16, extra={**biases, **mtp}, max_shard_bytes=50_000,
                      config_overrides={"num_nextn_predict_layers": 1})
    infos = L.io.checkpoint.index_checkpoint(tmp_path)
    assert infos["model.layers.1.mlp.gate.weight"].dtype == "BF16"
    assert infos["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == "F32"
    for dtype in (torch.bfloat16, torch.float32):
        got = L.from_pretrained(tmp_path, dtype=dtype)
        r = got.model.layers[1].mlp.router
        assert r.e_score_correction_bias.dtype == torch.float32
        assert torch.equal(r.e_score_correction_bias, m.model.layers[1].mlp.router.e_score_correction_bias)
        assert torch.equal(r.weight.float(), m.model.layers[1].mlp.router.weight.to(torch.bfloat16).float())
        assert got.load_report.skipped == {MTP: len(mtp)}
    assert sorted(mtp_tensors(tmp_path)) == sorted(mtp)


# ------------------------------------------------------------------------------------------------- router precision
def test_bf16_loading_selects_the_same_experts_as_fp32(tmp_path):
    """LongCat's router weight and bias stay fp32 in a bf16 model: the same inputs pick the same experts. Rounding
    them to bf16 (router_dtype=None, as transformers does) picks different experts for some tokens."""
    m = L.init_weights(L.CausalLM(L.tiny_longcat()), seed=4, std=0.08, bias_std=0.002).eval()
    L.save_checkpoint(m, tmp_path)
    f32 = L.from_pretrained(tmp_path, dtype=torch.float32)
    bf16 = L.from_pretrained(tmp_path, dtype=torch.bfloat16)
    rounded = L.from_pretrained(tmp_path, dtype=torch.bfloat16, router_dtype=None)
    x = torch.randn(4096, m.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    flips = 0
    with torch.no_grad():
        for i in range(m.config.num_layers):
            ra, rb, rc = (mm.model.layers[i].mlp.router for mm in (f32, bf16, rounded))
            assert rb.weight.dtype == rb.e_score_correction_bias.dtype == torch.float32
            wa, ia = ra(x.float())
            wb, ib = rb(x)
            assert torch.equal(ia.sort(-1).values, ib.sort(-1).values) and torch.equal(wa, wb)
            _, ic = rc(x)
            flips += int((ia.sort(-1).values != ic.sort(-1).values).any(-1).sum())
    assert flips > 0  # the test can fail: a rounded router really selects differently


def test_glm_router_weight_follows_the_model_dtype(tmp_path):
    m = tiny("glm")
    L.save_checkpoint(m, tmp_path)
    bf = L.from_pretrained(tmp_path, dtype="bfloat16")
    assert bf.model.layers[1].mlp.router.weight.dtype == torch.bfloat16
    assert bf.model.layers[1].mlp.router.e_score_correction_bias.dtype == torch.float32


# ------------------------------------------------------------------------------------------------- from_pretrained args
def test_dtype_argument_forms(tmp_path):
    m = tiny("longcat")
    L.save_checkpoint(m, tmp_path / "f32")
    L.save_checkpoint(m, tmp_path / "bf16", dtype=torch.bfloat16)
    assert L.from_pretrained(tmp_path / "f32").dtype == torch.float32  # default on the CPU
    for d in ("bfloat16", "bf16", "torch.bfloat16", torch.bfloat16):
        assert L.from_pretrained(tmp_path / "f32", dtype=d).dtype == torch.bfloat16, d
    assert L.from_pretrained(tmp_path / "bf16", dtype="float32").dtype == torch.float32
    assert L.from_pretrained(tmp_path / "bf16", dtype="auto").dtype == torch.bfloat16  # the tensors' dtype
    assert L.from_pretrained(tmp_path / "f32", dtype="auto").dtype == torch.float32
    L.save_checkpoint(m, tmp_path / "declared", config_overrides={"dtype": "float16"})
    assert L.from_pretrained(tmp_path / "declared", dtype="auto").dtype == torch.float16  # config.json's dtype
    for bad in ("int8", "cuda", torch.int64, 3):
        with pytest.raises(ValueError, match="dtype"):
            L.from_pretrained(tmp_path / "f32", dtype=bad)
    from longcat_ref.io.checkpoint import resolve_dtype

    assert resolve_dtype(None, "cuda") == torch.bfloat16 and resolve_dtype(None, "cpu") == torch.float32


def _hub_cache(tmp_path, src, repo="org--tiny", rev="0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face cache as huggingface_hub lays it out: blobs/, snapshots/<rev>/ (symlinks), refs/main."""
    root = tmp_path / "hub" / f"models--{repo}"
    (root / "blobs").mkdir(parents=True)
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in os.listdir(src):
        blob = root / "blobs" / f"blob-{f}"
        blob.write_bytes((src / f).read_bytes())
        os.symlink(os.path.relpath(blob, snap), snap / f)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    return tmp_path / "hub"


def test_hub_id_resolves_from_the_local_cache(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    m = tiny("glm")
    L.save_checkpoint(m, tmp_path / "src", max_shard_bytes=40_000)
    cache = _hub_cache(tmp_path, tmp_path / "src")
    same_model(m, L.from_pretrained("org/tiny", cache_dir=cache, local_files_only=True))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: local_files_only by default
    same_model(m, L.from_pretrained("org/tiny", cache_dir=cache))
    with pytest.raises(CheckpointError, match="org/absent: not a directory and not found in the local Hugging Face "
                                              "cache"):
        L.from_pretrained("org/absent", cache_dir=cache)


def test_config_to_dict_roundtrip():
    for cfg in (L.tiny_longcat(), L.tiny_glm(), L.glm_4_7_flash(), L.longcat_flash_chat()):
        d = cfg.to_dict()
        assert json.loads(json.dumps(d)) == d and config_from_dict(d) == cfg
