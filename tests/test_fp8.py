"""FP8 block-scaled checkpoints (LongCat-Flash-Chat-FP8 layout), dequantized on load.

Tiny FP8 checkpoints are written by the package's own writer (`save_checkpoint(quantize="fp8")`): per-expert, sharded,
with shapes that leave partial blocks. The reference is a block-by-block loop written here (and transformers'
`_dequantize_fp8_weight` where installed); a model built from those dequantized tensors must equal the loaded one
exactly, whole and under tensor/expert-parallel slicing whose shard boundaries cut blocks.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import longcat_ref as L
from longcat_ref.io.checkpoint import MTP, CheckpointError, index_checkpoint
from longcat_ref.io.fp8 import dequantize, quantize_blockwise
from longcat_ref.runtime.parallel import ParallelContext


def tiny(kind, **kw):
    cfg = L.tiny_longcat(**kw) if kind == "longcat" else L.tiny_glm(**kw)
    return L.init_weights(L.CausalLM(cfg), seed=3, std=0.08, bias_std=0.05).eval()


def ref_dequant(w8, scale, block):
    """The definition, one block at a time: W[r, c] = fp8[r, c] * S[r // bo, c // bi] in fp32."""
    out = w8.float().clone()
    bo, bi = block
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi] *= scale[i, j]
    return out


def raw_tensors(path):
    """Every tensor of a checkpoint directory, by name (test-side reader, independent of the loader)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def reference_model(path, cfg, block):
    """A model built from the dequantized tensors with load_state_dict (no loader involved)."""
    raw = raw_tensors(path)
    deq = {}
    for k, t in raw.items():
        if k.endswith("weight_scale_inv"):
            continue
        deq[k] = ref_dequant(t, raw[k + "_scale_inv"], block) if t.dtype == torch.float8_e4m3fn else t.float()
    model = L.CausalLM(cfg)
    sd = {}
    for name, p in model.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            pre = name[: -len(".gate_up_proj")]
            sd[name] = torch.stack([torch.cat([deq[f"{pre}.{e}.gate_proj.weight"], deq[f"{pre}.{e}.up_proj.weight"]])
                                    for e in range(p.shape[0])])
        elif name.endswith("experts.down_proj"):
            pre = name[: -len(".down_proj")]
            sd[name] = torch.stack([deq[f"{pre}.{e}.down_proj.weight"] for e in range(p.shape[0])])
        else:
            key = name.replace("mlp.router.weight", "mlp.router.classifier.weight") if cfg.is_longcat \
                else name.replace("mlp.router.", "mlp.gate.")
            sd[name] = deq[key]
    model.load_state_dict(sd)
    return model.eval()


def test_quantize_blockwise_partial_blocks():
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(0))
    w[128:, 256:] = 0.0  # the last, partial block all zero: scale 1, values 0
    q, s = quantize_blockwise(w, (128, 128))
    assert q.dtype == torch.float8_e4m3fn and q.shape == (200, 300)
    assert s.dtype == torch.float32 and s.shape == (2, 3)  # ceil(200/128) x ceil(300/128)
    assert s[1, 2] == 1.0
    back = dequantize(q, s, (128, 128))
    assert torch.equal(back, ref_dequant(q, s, (128, 128)))
    torch.testing.assert_close(back, w, rtol=0.07, atol=float(s.max()) * 2**-9)  # e4m3: 3 mantissa bits, subnormals


def test_dequantize_matches_transformers():
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    if not hasattr(fp8, "_dequantize_fp8_weight"):  # transformers < 5.23 (the GPU machines' 5.17) lacks the helper
        pytest.skip("this transformers has no _dequantize_fp8_weight")
    w = torch.randn(150, 70, generator=torch.Generator().manual_seed(1))
    q, s = quantize_blockwise(w, (64, 32))
    want = fp8._dequantize_fp8_weight(q.clone(), s, [64, 32], torch.float32)
    assert torch.equal(dequantize(q, s, (64, 32)), want)


@pytest.mark.parametrize("kind", ["longcat", "glm"])
def test_fp8_layout_as_published(tmp_path, kind):
    m = tiny(kind)
    L.save_checkpoint(m, tmp_path, quantize="fp8", fp8_block=(16, 16), max_shard_bytes=20_000)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}
    infos = index_checkpoint(tmp_path)
    fp8 = {k for k, i in infos.items() if i.dtype == "F8_E4M3"}
    router = "model.layers.1.mlp.router.classifier.weight" if kind == "longcat" else "model.layers.1.mlp.gate.weight"
    for k in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", router]:
        assert k not in fp8 and infos[k].dtype == "F32", k
    kv_a = next(k for k in fp8 if k.endswith("kv_a_proj_with_mqa.weight"))
    assert infos[kv_a].shape == (20, 64) and infos[kv_a + "_scale_inv"].shape == (2, 4)  # 20 rows: a partial block
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in fp8
    for k in fp8:
        o, i = infos[k].shape
        assert infos[k + "_scale_inv"].dtype == "F32" and infos[k + "_scale_inv"].shape == (math.ceil(o / 16),
                                                                                            math.ceil(i / 16))


@pytest.mark.parametrize("kind,block,kw", [
    ("longcat", (16, 16), {}),
    ("glm", (16, 16), {}),
    # the real 128 x 128 blocks, with widths that leave partial blocks (160 = 128 + 32, 200, 136)
    ("glm", (128, 128), dict(hidden_size=160, ffn_hidden_size=200, expert_ffn_hidden_size=136)),
])
@pytest.mark.parametrize("shard", [None, 25_000])
def test_dequantized_model_equals_model_from_dequantized_tensors(tmp_path, kind, block, kw, shard):
    m = tiny(kind, **kw)
    L.save_checkpoint(m, tmp_path, quantize="fp8", fp8_block=block, max_shard_bytes=shard)
    if shard:
        assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ref = reference_model(tmp_path, m.config, block)
    got = L.from_pretrained(tmp_path, dtype=torch.float32)
    assert got.load_report.dequantized > 0 and got.load_report.skipped == {}
    sg, sr = got.state_dict(), ref.state_dict()
    assert sg.keys() == sr.keys()
    for k in sg:
        assert torch.equal(sg[k], sr[k]), k
    assert not torch.equal(sg["model.layers.0.self_attn.o_proj.weight" if kind == "glm" else
                              "model.layers.0.self_attn.0.o_proj.weight"],
                           m.state_dict()["model.layers.0.self_attn.o_proj.weight" if kind == "glm" else
                                          "model.layers.0.self_attn.0.o_proj.weight"])  # it was quantized
    ids = torch.randint(4, 512, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(got(ids), ref(ids))
    # bf16: dequantized in fp32, then rounded once
    bf = L.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for k, t in bf.state_dict().items():
        want = sr[k] if t.dtype == torch.float32 else sr[k].to(torch.bfloat16)
        assert torch.equal(t, want), k


@pytest.mark.parametrize("kind", ["longcat", "glm"])
@pytest.mark.parametrize("block", [(16, 16), (40, 40)])
def test_parallel_slices_fp8_in_whole_blocks(tmp_path, kind, block):
    """Each rank's slices equal the slices of the whole dequantized model; with 40-wide blocks the rank boundaries
    (96 rows of q_b_proj, 64 columns of o_proj, ...) cut blocks, which must be dequantized first, then sliced."""
    m = tiny(kind)
    L.save_checkpoint(m, tmp_path, quantize="fp8", fp8_block=block, max_shard_bytes=30_000)
    whole = L.from_pretrained(tmp_path, dtype=torch.float32).state_dict()
    W = 2
    cut = 0
    for rank in range(W):
        ctx = ParallelContext(rank=rank, world_size=W)
        part = L.from_pretrained(tmp_path, dtype=torch.float32, parallel=ctx)
        for name, t in part.state_dict().items():
            dim = ctx.plan.get(name)
            if dim is None:
                assert torch.equal(t, whole[name]), name
                continue
            n = whole[name].shape[dim] // W
            assert torch.equal(t, whole[name].narrow(dim, rank * n, n)), name
            cut += (rank * n) % block[dim if whole[name].dim() == 2 else 0] != 0
        assert part.load_report.bytes_read < L.from_pretrained(tmp_path).load_report.bytes_read
    if block == (40, 40):
        assert cut > 0  # some boundaries really cut a block


# ------------------------------------------------------------------------------------------------- errors
@pytest.fixture
def fp8_ckpt(tmp_path):
    m = tiny("longcat")
    L.save_checkpoint(m, tmp_path, quantize="fp8", fp8_block=(16, 16))
    return tmp_path


KEY = "model.layers.0.self_attn.1.q_b_proj.weight"


def _edit(path, change):
    f = path / "model.safetensors"
    t = load_file(f)
    change(t)
    save_file(t, f)


def test_error_missing_scale(fp8_ckpt):
    _edit(fp8_ckpt, lambda t: t.pop(KEY + "_scale_inv"))
    with pytest.raises(CheckpointError, match=rf"FP8 tensor {KEY} .* has no scale tensor {KEY}_scale_inv"):
        L.from_pretrained(fp8_ckpt)


def test_error_scale_of_the_wrong_shape(fp8_ckpt):
    _edit(fp8_ckpt, lambda t: t.__setitem__(KEY + "_scale_inv", torch.ones(12, 3)))
    with pytest.raises(CheckpointError, match=rf"scale {KEY}_scale_inv of FP8 tensor {KEY} is F32 \[12, 3\], "
                                              r"expected float \[12, 2\]"):
        L.from_pretrained(fp8_ckpt)


def test_error_fp8_without_quantization_config(fp8_ckpt):
    d = json.loads((fp8_ckpt / "config.json").read_text())
    d.pop("quantization_config")
    (fp8_ckpt / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"tensor model\.\S+ in .* is F8_E4M3 but config.json has no "
                                              "quantization_config"):
        L.from_pretrained(fp8_ckpt)


def test_error_unsupported_quantization_config(fp8_ckpt):
    d = json.loads((fp8_ckpt / "config.json").read_text())
    d["quantization_config"]["weight_block_size"] = [128]
    (fp8_ckpt / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="weight_block_size must be two positive integers"):
        L.from_pretrained(fp8_ckpt)
    d["quantization_config"]["fmt"] = "e5m2"
    (fp8_ckpt / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="fmt='e5m2' is not supported"):
        L.from_pretrained(fp8_ckpt)


def test_error_stray_scale(fp8_ckpt):
    _edit(fp8_ckpt, lambda t: t.__setitem__("model.norm.weight_scale_inv", torch.ones(1, 1)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.norm\.weight_scale_inv .*not FP8"):
        L.from_pretrained(fp8_ckpt)


def test_fp8_mtp_block_is_recognised(tmp_path):
    m = tiny("longcat")
    L.save_checkpoint(m, tmp_path, quantize="fp8", fp8_block=(16, 16), mtp=True)
    infos = index_checkpoint(tmp_path)
    assert infos["model.mtp.layers.0.eh_proj.weight"].dtype == "F8_E4M3"
    got = L.from_pretrained(tmp_path, mtp=False)
    assert got.load_report.skipped == {MTP: sum(k.startswith("model.mtp.") for k in infos)}
    kept = L.from_pretrained(tmp_path)  # kept by default, dequantized (scales counted with their weights)
    assert kept.load_report.mtp_kept == sum(k.startswith("model.mtp.") for k in infos) and not kept.load_report.skipped
