"""The prefill's RoPE + query / key assembly kernels (longcat_ref/kernels/rope_qk.py) against their reference.

The reference is checked against the model's own lines (MLA.project + MLA.expand_kv + torch.cat: bit for bit,
eager), the kernels against the reference (in Triton's CPU interpreter without a GPU, tests/conftest.py), and the
model with Forms(attention="sdpa", rope="fused") against the plain SDPA form and the reference end to end, with and
without a cache. GPU tests (skipped without CUDA) run LongCat-Flash's real head sizes in bf16.
"""

import pytest
import torch

pytest.importorskip("triton")

from longcat_ref.kernels import rope_qk as K  # noqa: E402
from longcat_ref.kernels import support  # noqa: E402
from longcat_ref.model.cache import DynamicCache, StaticCache  # noqa: E402
from longcat_ref.model.config import tiny_glm, tiny_longcat  # noqa: E402
from longcat_ref.model.forms import PREFILL, REFERENCE, Forms  # noqa: E402
from longcat_ref.model.mla import MLA  # noqa: E402
from longcat_ref.model.model import CausalLM  # noqa: E402
from longcat_ref.model.rope import rope_cos_sin  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inputs(b, h, t, nope, d, v, dtype, s=None, seed=0, cos_batch=None, device=DEV):
    """q (b, h, t, nope+d) and kv (b, h, s, nope+v) as strided per-head views of flat projections, as MLA makes
    them; k_raw (b, t, d) a slice of a wider row (kv_a's rope part); cos/sin (b or 1, t, d)."""
    g = torch.Generator().manual_seed(seed)
    s = s or t
    q = torch.randn(b, t, h * (nope + d), generator=g).view(b, t, h, nope + d).transpose(1, 2)  # (b, h, t, qk)
    kv_a = torch.randn(b, t, 5 + d, generator=g)  # (b, t, r+d) with a small r: k_raw is a strided slice
    kv = torch.randn(b, s, h * (nope + v), generator=g).view(b, s, h, nope + v).transpose(1, 2)  # (b, h, s, .)
    k_all = torch.randn(b, s, d, generator=g)  # (b, s, d): rotated key slots (a cache's)
    ids = torch.randint(0, 1000, (cos_batch or b, t), generator=g)
    cos, sin = rope_cos_sin(ids, d, 1e4, dtype)  # (b, t, d)
    q, kv_a, kv, k_all = (x.to(dtype).to(device) for x in (q, kv_a, kv, k_all))
    return q, kv_a[..., 5:], kv, k_all, cos.to(device), sin.to(device)


def both(b, h, t, nope, d, v, dtype, interleaved=True, q_scale=1.0, s=None, **kw):
    q, k_raw, kv, k_all, cos, sin = inputs(b, h, t, nope, d, v, dtype, s, **kw)
    ref = K.rope_qk_reference(q, k_raw, kv, k_all if s else None, cos, sin, nope, interleaved, q_scale)
    Q, k_rope = K.rope_query(q, k_raw, cos, sin, nope, interleaved, q_scale)
    Kk = K.assemble_keys(kv, k_all if s else k_rope, nope)
    return ref, (Q, k_rope, Kk)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("q_scale", [1.0, 2.0])
@pytest.mark.parametrize("shape", [(1, 2, 3, 8, 4, 8, None), (2, 20, 5, 12, 8, 16, None),  # b, h, t, nope, d, v, s
                                   (2, 3, 2, 6, 8, 4, 7)])  # h = 20 > 16: two head blocks; s: keys from a cache
def test_kernels_equal_reference_fp32(interleaved, q_scale, shape):
    *shape, s = shape
    ref, out = both(*shape, torch.float32, interleaved, q_scale, s)
    for name, r, o in zip(("Q", "k_rope", "K"), ref, out):
        assert o.shape == r.shape and o.is_contiguous(), name
        torch.testing.assert_close(o, r, atol=1e-6, rtol=1e-6, msg=name)
    assert torch.equal(out[2][..., : shape[3]], ref[2][..., : shape[3]])  # the copies are exact


def check_bf16(shape, q_scale, **kw):
    """bf16: the copies exact; the rotation within half a bf16 step of the exact rotation of the same bf16 inputs (the
    kernel rounds once; the eager reference rounds its two products apart, so it is the fp32 math that is compared)."""
    b, h, t, nope, d, v = shape
    q, k_raw, kv, _, cos, sin = inputs(b, h, t, nope, d, v, torch.bfloat16, **kw)
    Q, k = K.rope_query(q, k_raw, cos, sin, nope, True, q_scale)
    Kk = K.assemble_keys(kv, k, nope)
    qs = (q * q_scale).float() if q_scale != 1.0 else q.float()  # the scale rounded once, as both do
    Qr, kr, Kr = K.rope_qk_reference(qs, k_raw.float(), kv.float(), None, cos.float(), sin.float(), nope)
    assert torch.equal(Q[..., :nope].float(), Qr[..., :nope]) and torch.equal(Kk[..., :nope].float(), Kr[..., :nope])
    step = 2**-7 if support.interpreting() else 2**-8  # Triton's CPU interpreter truncates fp32 -> bf16 (seen: 8.6032
    #                                                    -> 8.5625), so there a whole bf16 step; on a GPU it rounds
    for name, got, want in (("Q", Q, Qr), ("k_rope", k, kr), ("K", Kk, Kr.to(torch.bfloat16).float())):
        torch.testing.assert_close(got.float(), want, atol=1e-6, rtol=step, msg=name)


def test_kernels_equal_reference_bf16():
    check_bf16((2, 5, 3, 8, 8, 8), 2.0, cos_batch=1)
    check_bf16((1, 3, 4, 12, 8, 16), 1.0)


@pytest.mark.parametrize("make", [tiny_glm, tiny_longcat])
def test_reference_is_the_models_own_lines(make):
    """rope_qk_reference == MLA.project's RoPE + _sdpa's concatenations, bit for bit (eager, fp32)."""
    torch.manual_seed(0)
    cfg = make()
    mla = MLA(cfg).eval()
    x = torch.randn(2, 5, cfg.hidden_size)
    cos, sin = rope_cos_sin(torch.arange(5)[None].expand(2, -1), cfg.qk_rope_head_dim, cfg.rope_theta,
                            torch.float32)
    with torch.no_grad():
        q_nope, q_rope, latent, k_rope = mla.project(x, cos, sin)
        k, _ = mla.expand_kv(latent, k_rope)
        q = mla.queries(x)
        k_raw = mla.kv_a_proj_with_mqa(x)[..., mla.rank:]
        kv = mla.kv_b_proj(latent).view(2, 5, mla.n_heads, -1).transpose(1, 2)
        Q, kr, Kk = K.rope_qk_reference(q, k_raw, kv, None, cos, sin, mla.nope, mla.interleaved, mla.q_scale)
    assert torch.equal(Q, torch.cat([q_nope, q_rope], -1)) and torch.equal(kr, k_rope) and torch.equal(Kk, k)


@pytest.mark.parametrize("make", [tiny_glm, tiny_longcat])
def test_model_sdpa_with_the_kernels_equals_plain_and_reference(make):
    """The whole model, fp32: a prefill in attention "sdpa" with rope "fused" == without == the reference (naive);
    then a second chunk through a cache (keys from the cache's slots) == the plain SDPA form's."""
    torch.manual_seed(0)
    cfg = make()
    model = CausalLM(cfg).eval().to(DEV)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), device=DEV)
    with torch.no_grad():
        ref = model(ids, forms=REFERENCE)
        plain = model(ids, forms=Forms(attention="sdpa"))
        fused = model(ids, forms=Forms(attention="sdpa", rope="fused"))
        torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
        chunks = {}
        for rope in ("plain", "fused"):
            for cache in (DynamicCache.for_model(cfg), StaticCache.for_model(cfg, 2, 12, device=DEV)):
                forms = Forms(attention="sdpa", rope=rope)
                a = model(ids[:, :6], cache=cache, forms=forms)
                b = model(ids[:, 6:], cache=cache, forms=forms)
                chunks[rope, type(cache).__name__] = torch.cat([a, b], 1)
    for k, v in chunks.items():
        torch.testing.assert_close(v, ref, atol=1e-5, rtol=1e-5, msg=str(k))


def test_prefill_forms_ask_for_the_kernels_and_run_plain_on_cpu():
    """PREFILL asks rope "auto" (the kernels on CUDA); off CUDA it is the plain lines, equal to plain bit for bit."""
    assert PREFILL.rope == "auto" and PREFILL.attention == "sdpa" and PREFILL.linear == "auto"
    torch.manual_seed(0)
    cfg = tiny_longcat()
    model = CausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 6))
    with torch.no_grad():
        a = model(ids, forms=PREFILL)
        b = model(ids, forms=Forms(attention="sdpa", experts="auto", norm="auto"))
    assert torch.equal(a, b)


def test_bad_inputs_are_refused():
    q, k_raw, kv, k_all, cos, sin = inputs(1, 2, 3, 8, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="rope_query wants"):
        K.rope_query(q, k_raw[..., :2], cos, sin, 8)
    with pytest.raises(ValueError, match="rope_query wants"):
        K.rope_query(q, k_raw, cos[..., :2], sin[..., :2], 8)
    with pytest.raises(ValueError, match="assemble_keys wants"):
        K.assemble_keys(kv, k_all[:, :2], 8)
    with pytest.raises(ValueError, match="one dtype"):
        K.assemble_keys(kv, k_all.double(), 8)


@cuda
@pytest.mark.parametrize("t", [1, 2048])
def test_gpu_longcat_sizes_bf16(t):
    """LongCat-Flash's heads (64 x [128 | 64], v 128), bf16, on the GPU: the kernels against the reference."""
    check_bf16((1, 64, t, 128, 64, 128), 2.0)


def test_mla_refuses_an_unknown_attention_form():
    cfg = tiny_glm()
    mla = MLA(cfg).eval()
    x = torch.randn(1, 3, cfg.hidden_size)
    cos, sin = rope_cos_sin(torch.arange(3)[None], cfg.qk_rope_head_dim, cfg.rope_theta, torch.float32)
    with pytest.raises(ValueError, match="attention form 'bogus' is not one of"):
        mla(x, cos, sin, form="bogus")
