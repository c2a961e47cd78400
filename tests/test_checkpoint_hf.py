"""The original LongCat-Flash-Chat on-disk layout against transformers.

1. A checkpoint written by transformers' save_pretrained, and the same weights written by us in the original
   layout (per-expert tensors, `model.mtp.*`, the published config.json key set, sharded with an index),
   load to models with identical logits.
2. transformers itself loads the original layout once `LongcatFlashExperts.gate_up_proj` holds n_routed_experts
   rows instead of routed + zero (architecture facts 1.5; its forward never reads the extra rows), and then agrees
   with its own save_pretrained checkpoint and with us.
"""

import contextlib
import json
import os

import pytest
import torch

from oracle import hf_longcat, transformers  # noqa: E402  (skips without transformers)

import longcat_ref as L
from longcat_ref.io.checkpoint import MTP, PHANTOM


@contextlib.contextmanager
def gate_up_holds_routed_experts():
    """Patch transformers' LongcatFlashExperts to allocate gate_up_proj for the routed experts only."""
    from transformers.models.longcat_flash import modeling_longcat_flash as M

    orig = M.LongcatFlashExperts.__init__

    def init(self, config):
        orig(self, config)
        if self.gate_up_proj is not None:
            self.gate_up_proj = torch.nn.Parameter(
                torch.empty(self.num_routed_experts, 2 * self.intermediate_size, self.hidden_size))

    M.LongcatFlashExperts.__init__ = init
    try:
        yield
    finally:
        M.LongcatFlashExperts.__init__ = orig


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("orig")
    oracle, hf_dir = hf_longcat(tmp, seed=5, bias_std=0.1)
    ours_hf = L.from_pretrained(hf_dir, dtype=torch.float32)
    orig_dir = tmp / "original"
    L.save_checkpoint(ours_hf, orig_dir, layout="per_expert", original_config=True, mtp=True, max_shard_bytes=30_000)
    return oracle, hf_dir, ours_hf, orig_dir


IDS = torch.randint(4, 99, (2, 11), generator=torch.Generator().manual_seed(3))


def test_save_pretrained_and_original_layout_give_identical_logits(checkpoints):
    oracle, hf_dir, ours_hf, orig_dir = checkpoints
    files = os.listdir(orig_dir)
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 3
    cfgd = json.loads((orig_dir / "config.json").read_text())
    assert cfgd["model_type"] == "longcat_flash" and cfgd["attention_method"] == "MLA"  # the published key set
    assert any(k.startswith("model.mtp.") for k in
               json.loads((orig_dir / "model.safetensors.index.json").read_text())["weight_map"])
    ours_orig = L.from_pretrained(orig_dir, dtype=torch.float32)
    assert PHANTOM in ours_hf.load_report.skipped  # save_pretrained wrote transformers' phantom rows
    assert not ours_orig.load_report.skipped and ours_orig.load_report.mtp_kept  # the MTP block is kept
    with torch.no_grad():
        a, b = ours_hf(IDS), ours_orig(IDS)
        assert torch.equal(a, b)
        torch.testing.assert_close(a, oracle(IDS).logits, atol=1e-5, rtol=1e-5)


def test_transformers_loads_the_original_layout_when_patched(checkpoints):
    oracle, hf_dir, ours_hf, orig_dir = checkpoints
    hf_cfg = transformers.LongcatFlashConfig.from_pretrained(orig_dir)  # the published key set
    assert hf_cfg.num_layers == 2 and hf_cfg.zero_expert_num == oracle.config.zero_expert_num
    # transformers uses head_dim as the rotary width (default 64 = the real model's qk_rope_head_dim); tiny: 4
    hf_cfg.head_dim = hf_cfg.qk_rope_head_dim
    with pytest.raises(RuntimeError, match="mismatch|size"):  # unpatched: the gate_up_proj bug
        transformers.LongcatFlashForCausalLM.from_pretrained(orig_dir, config=hf_cfg, dtype=torch.float32)
    with gate_up_holds_routed_experts():
        hf_orig = transformers.LongcatFlashForCausalLM.from_pretrained(
            orig_dir, config=hf_cfg, dtype=torch.float32, attn_implementation="eager").eval()
    assert hf_orig.model.layers[0].mlp.experts.gate_up_proj.shape[0] == hf_cfg.n_routed_experts
    ours_orig = L.from_pretrained(orig_dir, dtype=torch.float32)
    with torch.no_grad():
        h = hf_orig(IDS).logits
        assert torch.equal(h, oracle(IDS).logits)  # same weights, same code: bit-identical
        torch.testing.assert_close(ours_orig(IDS), h, atol=1e-5, rtol=1e-5)
    hf_ids = hf_orig.generate(IDS, max_new_tokens=8, do_sample=False)  # stops at eos 2, pads with 3
    assert torch.equal(ours_orig.generate(IDS, 8, eos_token_id=2), hf_ids)


def test_bf16_original_layout_bit_exact(tmp_path, checkpoints):
    """bf16 on disk, loaded in bf16 by both: bit-identical logits (our fp32 router holds the same bf16 values)."""
    oracle, hf_dir, ours_hf, orig_dir = checkpoints
    bf_dir = tmp_path / "bf16"
    L.save_checkpoint(ours_hf, bf_dir, original_config=True, mtp=True, dtype=torch.bfloat16, max_shard_bytes=20_000)
    hf_cfg = transformers.LongcatFlashConfig.from_pretrained(bf_dir)
    hf_cfg.head_dim = hf_cfg.qk_rope_head_dim
    with gate_up_holds_routed_experts():
        hf = transformers.LongcatFlashForCausalLM.from_pretrained(
            bf_dir, config=hf_cfg, dtype=torch.bfloat16, attn_implementation="eager").eval()
    ours = L.from_pretrained(bf_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours(IDS), hf(IDS).logits)
