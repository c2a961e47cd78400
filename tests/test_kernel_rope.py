"""The norm + RoPE + cache-write kernel (longcat_ref/kernels/rope_cache.py) against its plain-PyTorch reference.

The reference is checked against the model's own lines (MLA.project + StaticCache.update: bit for bit, eager), the
kernel against the reference (in Triton's CPU interpreter without a GPU, tests/conftest.py), and the model with
Forms(rope="fused") against rope="plain" end to end. GPU tests (skipped without CUDA) run the real sizes.
"""

import pytest
import torch

pytest.importorskip("triton")

from longcat_ref.kernels import rope_cache as K  # noqa: E402
from longcat_ref.model.cache import DynamicCache, StaticCache  # noqa: E402
from longcat_ref.model.config import tiny_glm, tiny_longcat  # noqa: E402
from longcat_ref.model.forms import Forms  # noqa: E402
from longcat_ref.model.mla import MLA  # noqa: E402
from longcat_ref.model.model import CausalLM  # noqa: E402
from longcat_ref.model.rope import rope_cos_sin  # noqa: E402
from steps import decode_logits  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inputs(b, h, t, nope, r, d, S, dtype, seed=0, device=DEV, cos_batch=None):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(b, t, r + d, generator=g) * 3  # (b, t, r+d): not unit scale, so the norm matters
    q = torch.randn(b, t, h * (nope + d), generator=g)  # (b, t, h*(nope+d)), viewed per head as MLA does
    w = 1 + 0.5 * torch.randn(r, generator=g)  # (r,)
    pos = torch.randperm(S, generator=g)[:t]  # (t,) scattered slots
    ids = torch.randint(0, 1000, (cos_batch or b, t), generator=g)  # positions for the angles
    cos, sin = rope_cos_sin(ids, d, 1e4, dtype)  # (b, t, d)
    lat = torch.randn(b, S, r, generator=g)  # (b, S, r): earlier contents the kernel must keep
    kr = torch.randn(b, S, d, generator=g)  # (b, S, d)
    kv, q, w, lat, kr = (x.to(dtype) for x in (kv, q, w, lat, kr))
    q = q.view(b, t, h, nope + d).transpose(1, 2)  # (b, h, t, nope+d): a strided view, as MLA.queries gives
    return [x.to(device) for x in (kv, q, w, cos, sin, lat, kr, pos)]


def run_both(b, h, t, nope, r, d, S, dtype, interleaved=True, kv_scale=1.0, q_scale=1.0, **kw):
    kv, q, w, cos, sin, lat, kr, pos = inputs(b, h, t, nope, r, d, S, dtype, **kw)
    lat2, kr2 = lat.clone(), kr.clone()
    ref = K.rope_cache_reference(kv, q, w, 1e-6, cos, sin, lat, kr, pos, nope, interleaved, kv_scale, q_scale)
    out = K.rope_cache_write(kv, q, w, 1e-6, cos, sin, lat2, kr2, pos, nope, interleaved, kv_scale, q_scale)
    return (ref, lat, kr), (out, lat2, kr2), pos


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (3.4641, 2.0)])
@pytest.mark.parametrize("shape", [(1, 2, 1, 8, 16, 4, 10), (2, 3, 3, 6, 20, 8, 12)])  # b, h, t, nope, r, d, S
def test_kernel_equals_reference_fp32(interleaved, scales, shape):
    (ref, lat, kr), (out, lat2, kr2), pos = run_both(*shape, torch.float32, interleaved, *scales)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lat2, lat, atol=1e-6, rtol=1e-6)  # the written slots, and every other slot kept
    torch.testing.assert_close(kr2, kr, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("interleaved", [True, False])
def test_kernel_equals_reference_bf16(interleaved):
    (ref, lat, kr), (out, lat2, kr2), pos = run_both(2, 3, 2, 8, 32, 8, 6, torch.bfloat16, interleaved, 3.4641, 2.0)
    # The fp32 statistic sums in another order, and the rotation rounds once (the eager reference rounds each
    # product): on a GPU a rounding apart. Triton 3.9's CPU interpreter casts fp32 to bf16 by truncation, not to
    # nearest (half of random values land one bf16 step lower), so there the kernel's chained casts (the norm,
    # the weight, the scale) can drift 2-3 steps: the tolerance is three bf16 steps. The fp32 tests above are exact.
    tol = dict(atol=2e-2, rtol=2.5e-2)
    torch.testing.assert_close(lat2.float(), lat.float(), **tol)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    torch.testing.assert_close(kr2.float(), kr.float(), **tol)


def test_kernel_cos_sin_broadcast_over_batch():
    """cos/sin (1, t, d), one set of angles for every sequence (as a batch-shared position would give)."""
    (ref, lat, kr), (out, lat2, kr2), _ = run_both(3, 2, 1, 4, 16, 4, 5, torch.float32, cos_batch=1)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(kr2, kr, atol=1e-6, rtol=1e-6)


def test_kernel_is_not_the_reference():
    """The check can fail: a wrong eps or a swapped layout gives a different answer."""
    kv, q, w, cos, sin, lat, kr, pos = inputs(1, 2, 1, 4, 16, 8, 4, torch.float32)
    ref = K.rope_cache_reference(kv, q, w, 1e-6, cos, sin, lat.clone(), kr.clone(), pos, 4, True)
    wrong = K.rope_cache_write(kv, q, w, 1e-6, cos, sin, lat.clone(), kr.clone(), pos, 4, False)
    assert not torch.allclose(wrong, ref, atol=1e-3)


@pytest.mark.parametrize("make", [tiny_glm, tiny_longcat])
def test_reference_is_the_models_lines(make):
    """rope_cache_reference == MLA.project + StaticCache.update, bit for bit (eager, fp32 and bf16)."""
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        cfg = make()
        mla = MLA(cfg).to(dtype)
        with torch.no_grad():
            mla.kv_a_layernorm.weight.uniform_(0.5, 1.5)
        b, t, S = 2, 3, 8
        x = torch.randn(b, t, cfg.hidden_size).to(dtype)
        pos = torch.tensor([5, 1, 6])
        cos, sin = rope_cos_sin(torch.arange(t).expand(b, t) + 7, cfg.qk_rope_head_dim, cfg.rope_theta, dtype)
        c1, c2 = (StaticCache.for_model(cfg, b, S, dtype) for _ in range(2))
        with torch.no_grad():
            q_nope, q_rope, latent, k_rope = mla.project(x, cos, sin)
            c1.update(0, latent, k_rope, pos)
            q = mla.queries(x)
            kv = mla.kv_a_proj_with_mqa(x)
            lat, kr = c2.slots(0)
            ref = K.rope_cache_reference(kv, q, mla.kv_a_layernorm.weight, mla.kv_a_layernorm.eps, cos, sin, lat,
                                         kr, pos, mla.nope, mla.interleaved, mla.kv_scale, mla.q_scale)
        assert torch.equal(ref, q_rope)
        assert torch.equal(c1.latent, c2.latent) and torch.equal(c1.k_rope, c2.k_rope)


@pytest.mark.parametrize("make", [tiny_glm, tiny_longcat])
def test_model_fused_rope_equals_plain(make):
    """The whole model, prefill then two decode steps through a static cache: rope="fused" == "plain"."""
    torch.manual_seed(0)
    cfg = make()
    model = CausalLM(cfg).eval().to(DEV)
    ids = torch.randint(0, cfg.vocab_size, (2, 7), device=DEV)
    logits, caches = {}, {}
    for rope in ("plain", "fused"):
        forms = Forms(attention="absorbed", rope=rope)
        cache = StaticCache.for_model(cfg, 2, 12, device=DEV)
        with torch.no_grad():
            out = [model(ids[:, :5], cache=cache, forms=Forms(attention="absorbed"))]  # prefill: plain
            for i in (5, 6):  # decode steps: the asked form
                out.append(model(ids[:, i:i + 1], cache=cache, forms=forms))
        logits[rope], caches[rope] = torch.cat(out, 1), cache
    torch.testing.assert_close(logits["fused"], logits["plain"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches["fused"].latent, caches["plain"].latent, atol=1e-6, rtol=1e-6)


def test_fused_rope_needs_a_static_cache():
    cfg = tiny_glm()
    model = CausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 3))
    with pytest.raises(ValueError, match="StaticCache"):
        model(ids, cache=DynamicCache.for_model(cfg), forms=Forms(rope="fused"))
    with pytest.raises(ValueError, match="rope form"):
        Forms(rope="bogus")
    mla, x = model.model.layers[0].self_attn, torch.randn(1, 3, cfg.hidden_size)
    cos, sin = rope_cos_sin(torch.arange(3)[None], cfg.qk_rope_head_dim, cfg.rope_theta, torch.float32)
    with pytest.raises(ValueError, match="rope form 'bogus' is not one of"):
        mla(x, cos, sin, rope="bogus")


def test_auto_is_plain_on_cpu_or_without_static_cache():
    """rope="auto" runs the plain lines on the CPU: equal to plain bit for bit."""
    torch.manual_seed(0)
    cfg = tiny_glm()
    model = CausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 4))
    outs = []
    for rope in ("plain", "auto"):
        with torch.no_grad():
            outs.append(model(ids, cache=StaticCache.for_model(cfg, 1, 6), forms=Forms(rope=rope)))
    assert torch.equal(*outs)


def test_bad_inputs_are_refused():
    kv, q, w, cos, sin, lat, kr, pos = inputs(1, 2, 1, 4, 16, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="shapes disagree"):
        K.rope_cache_write(kv[..., :-1], q, w, 1e-6, cos, sin, lat, kr, pos, 4)
    with pytest.raises(ValueError, match="one dtype"):
        K.rope_cache_write(kv.double(), q, w, 1e-6, cos, sin, lat, kr, pos, 4)
    with pytest.raises(ValueError, match="cos/sin"):
        K.rope_cache_write(kv, q, w, 1e-6, cos[..., :4], sin[..., :4], lat, kr, pos, 4)


def test_compiled_writes_the_cache_in_place():
    """Inside torch.compile(fullgraph=True) the op writes each sublayer's cache view in place: the writes land, and
    no kernel of the compiled code copies a sublayer's whole cache (auto-functionalisation could clone it)."""
    from torch._inductor.utils import run_and_get_code

    n, b, slots, r, d, h, nope = 3, 2, 4099, 24, 8, 2, 4  # odd sizes: a full copy's element count is easy to spot
    cache = StaticCache(n, b, slots, r, d, device=DEV)
    kv, q, w, cos, sin, _, _, _ = inputs(b, h, 1, nope, r, d, 8, torch.float32)
    pos = torch.tensor([7], device=DEV)

    def step(kv, q):
        out = 0
        for layer in range(n):
            lat, kr = cache.slots(layer)  # (b, slots, r), (b, slots, d)
            o = K.rope_cache_write(kv * (layer + 1), q, w, 1e-6, cos, sin, lat, kr, pos, nope)  # (b, h, 1, d)
            out = out + o.sum() + lat[:, :2].sum()
        return out

    torch._dynamo.reset()
    _, code = run_and_get_code(torch.compile(step, fullgraph=True), kv, q)
    code = "\n".join(code)
    for full in (b * slots * r, n * b * slots * r, b * slots * d, n * b * slots * d):
        assert f"{full}L" not in code and f"{full})" not in code, f"a loop over {full} cache elements"
    for layer in range(n):  # and the writes landed, equal to the reference's
        lat, kr = torch.zeros(b, 8, r, device=DEV), torch.zeros(b, 8, d, device=DEV)
        K.rope_cache_reference(kv * (layer + 1), q, w, 1e-6, cos, sin, lat, kr, pos, nope)
        torch.testing.assert_close(cache.latent[layer, :, 7], lat[:, 7], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(cache.k_rope[layer, :, 7], kr[:, 7], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("rope", ["fused", "fused_uk"])
def test_compiled_decode_step_with_fused_rope_equals_eager_plain(rope):
    """generate's fixed-shape decode step, torch.compiled with rope="fused" (or "fused_uk": W_uk's fold in the same
    opaque op, which writes the caches in place), gives the eager plain step's logits."""
    from longcat_ref.model.generate import decode_step

    torch.manual_seed(0)
    cfg = tiny_longcat()
    model = CausalLM(cfg).eval().to(DEV)
    ids = torch.randint(0, cfg.vocab_size, (2, 6), device=DEV)
    torch._dynamo.reset()
    plain = decode_logits(decode_step, model, Forms(attention="absorbed"), ids)
    fused = decode_logits(torch.compile(decode_step, fullgraph=True, dynamic=False), model,
                          Forms(attention="absorbed", experts="gemv", linear="auto", rope=rope), ids)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ GPU: real sizes
@cuda
@pytest.mark.parametrize("h", [20, 64])  # GLM-4.7-Flash's heads, LongCat-Flash's
@pytest.mark.parametrize("t", [1, 3])
def test_gpu_real_sizes(h, t):
    (ref, lat, kr), (out, lat2, kr2), _ = run_both(2, h, t, 192 if h == 20 else 128, 512, 64, 300, torch.bfloat16,
                                                   True, 1.0 if h == 20 else 3.4641, 1.0 if h == 20 else 2.0)
    torch.testing.assert_close(lat2.float(), lat.float(), atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(kr2.float(), kr.float(), atol=3e-2, rtol=1e-2)


@cuda
def test_gpu_cuda_graph_replays():
    kv, q, w, cos, sin, lat, kr, pos = inputs(1, 20, 1, 192, 512, 64, 64, torch.bfloat16)
    lat_ref, kr_ref = lat.clone(), kr.clone()
    ref = K.rope_cache_reference(kv, q, w, 1e-6, cos, sin, lat_ref, kr_ref, pos, 192)
    K.rope_cache_write(kv, q, w, 1e-6, cos, sin, lat.clone(), kr.clone(), pos, 192)  # warm (compiles the kernel)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = K.rope_cache_write(kv, q, w, 1e-6, cos, sin, lat, kr, pos, 192)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(lat.float(), lat_ref.float(), atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=1e-2)


# ------------------------------------------------------------------------------------------------ W_uk folded in
def w_uk_of(h, nope, v, r, dtype, seed=1, device=DEV):
    """W_uk (h, nope, r) as the model makes it: a strided view of kv_b_proj's (h*(nope+v), r) weight."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(h * (nope + v), r, generator=g) / nope ** 0.5).to(dtype).to(device)  # (h*(nope+v), r)
    return w.view(h, nope + v, r)[:, :nope]  # (h, nope, r): head stride (nope+v)*r


def run_fold(b, h, t, nope, v, r, d, S, dtype, interleaved=True, kv_scale=1.0, q_scale=1.0, **kw):
    kv, q, w, cos, sin, lat, kr, pos = inputs(b, h, t, nope, r, d, S, dtype, **kw)
    w_uk = w_uk_of(h, nope, v, r, dtype)
    lat2, kr2 = lat.clone(), kr.clone()
    ref = K.rope_cache_fold_reference(kv, q, w, 1e-6, cos, sin, lat, kr, pos, nope, w_uk, interleaved, kv_scale,
                                      q_scale)
    out = K.rope_cache_fold_write(kv, q, w, 1e-6, cos, sin, lat2, kr2, pos, nope, w_uk, interleaved, kv_scale,
                                  q_scale)
    return (*ref, lat, kr), (*out, lat2, kr2)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (3.4641, 2.0)])
@pytest.mark.parametrize("shape", [(1, 1, 1, 8, 12, 16, 4, 6),  # b, h, t, nope, v, r, d, S
                                   (2, 3, 3, 6, 10, 80, 8, 12),  # r = 80: two column blocks, one partial
                                   (1, 3, 1, 12, 4, 20, 4, 5)])
def test_fold_kernel_equals_reference_fp32(interleaved, scales, shape):
    (q_rope, q_lat, lat, kr), (q_rope2, q_lat2, lat2, kr2) = run_fold(*shape, torch.float32, interleaved, *scales)
    assert q_lat2.shape == q_lat.shape and q_lat2.is_contiguous()
    torch.testing.assert_close(q_lat2, q_lat, atol=1e-5, rtol=1e-5)  # the einsum sums in another order
    torch.testing.assert_close(q_rope2, q_rope, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lat2, lat, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(kr2, kr, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("q_scale", [1.0, 2.0])
def test_fold_kernel_equals_reference_bf16(q_scale):
    (q_rope, q_lat, lat, kr), (q_rope2, q_lat2, lat2, kr2) = run_fold(2, 3, 2, 12, 8, 80, 8, 6, torch.bfloat16,
                                                                      True, 3.4641, q_scale)
    # q_lat: one fp32 sum rounded once against the einsum's; the interpreter's truncating fp32 -> bf16 cast (see
    # test_kernel_equals_reference_bf16) adds a step: the same three-step tolerance
    tol = dict(atol=2e-2, rtol=2.5e-2)
    torch.testing.assert_close(q_lat2.float(), q_lat.float(), **tol)
    torch.testing.assert_close(q_rope2.float(), q_rope.float(), **tol)
    torch.testing.assert_close(lat2.float(), lat.float(), **tol)
    torch.testing.assert_close(kr2.float(), kr.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fold_rest_is_rope_cache_write_bit_for_bit(dtype):
    """q_rope and the caches of rope_cache_fold_write == rope_cache_write's (the same helpers, _latent_work, _key_work, _q_rope_work)."""
    kv, q, w, cos, sin, lat, kr, pos = inputs(2, 3, 2, 6, 80, 8, 6, dtype)
    w_uk = w_uk_of(3, 6, 10, 80, dtype)
    lat2, kr2 = lat.clone(), kr.clone()
    out = K.rope_cache_write(kv, q, w, 1e-6, cos, sin, lat, kr, pos, 6, False, 3.4641, 2.0)
    out2, _ = K.rope_cache_fold_write(kv, q, w, 1e-6, cos, sin, lat2, kr2, pos, 6, w_uk, False, 3.4641, 2.0)
    assert torch.equal(out2, out) and torch.equal(lat2, lat) and torch.equal(kr2, kr)


def test_fold_kernel_is_not_the_reference():
    """The check can fail: a dropped q_scale, or another head's W_uk, gives a different q_lat."""
    kv, q, w, cos, sin, lat, kr, pos = inputs(1, 2, 1, 6, 80, 8, 4, torch.float32)
    w_uk = w_uk_of(2, 6, 10, 80, torch.float32)
    _, ref = K.rope_cache_fold_reference(kv, q, w, 1e-6, cos, sin, lat.clone(), kr.clone(), pos, 6, w_uk,
                                         q_scale=2.0)
    _, unscaled = K.rope_cache_fold_write(kv, q, w, 1e-6, cos, sin, lat.clone(), kr.clone(), pos, 6, w_uk)
    _, swapped = K.rope_cache_fold_write(kv, q, w, 1e-6, cos, sin, lat.clone(), kr.clone(), pos, 6, w_uk.flip(0),
                                         q_scale=2.0)
    assert not torch.allclose(unscaled, ref, atol=1e-3)
    assert not torch.allclose(swapped, ref, atol=1e-3)


def test_fold_bad_w_uk_is_refused():
    kv, q, w, cos, sin, lat, kr, pos = inputs(1, 2, 1, 4, 16, 8, 4, torch.float32)
    w_uk = w_uk_of(2, 4, 6, 16, torch.float32)
    args = (kv, q, w, 1e-6, cos, sin, lat, kr, pos, 4)
    with pytest.raises(ValueError, match=r"w_uk must be \(h=2, nope=4, r=16\)"):
        K.rope_cache_fold_write(*args, w_uk[:, :3])
    with pytest.raises(ValueError, match="w_uk must be torch.float32"):
        K.rope_cache_fold_write(*args, w_uk.double())
    with pytest.raises(ValueError, match="w_uk's last axis"):
        K.rope_cache_fold_write(*args, w_uk.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="shapes disagree"):  # and the rest is _check's
        K.rope_cache_fold_write(kv[..., :-1], *args[1:], w_uk)


# ------------------------------------------------------------------------------------------------ GPU: the fold
@cuda
@pytest.mark.parametrize("t", [1, 2])
@pytest.mark.parametrize("model", ["glm", "longcat"])
def test_gpu_fold_real_sizes(model, t):
    h, nope, v, scales = (20, 192, 256, (1.0, 1.0)) if model == "glm" else (64, 128, 128, (3.4641, 2.0))
    (q_rope, q_lat, lat, kr), (q_rope2, q_lat2, lat2, kr2) = run_fold(1, h, t, nope, v, 512, 64, 300,
                                                                      torch.bfloat16, True, *scales)
    torch.testing.assert_close(q_lat2.float(), q_lat.float(), atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(q_rope2.float(), q_rope.float(), atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(lat2.float(), lat.float(), atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(kr2.float(), kr.float(), atol=3e-2, rtol=1e-2)


@cuda
def test_gpu_fold_cuda_graph_replays():
    """Captured once, replayed with new inputs copied into the captured buffers."""
    kv, q, w, cos, sin, lat, kr, pos = inputs(1, 20, 1, 192, 512, 64, 64, torch.bfloat16)
    w_uk = w_uk_of(20, 192, 256, 512, torch.bfloat16)
    K.rope_cache_fold_write(kv, q, w, 1e-6, cos, sin, lat.clone(), kr.clone(), pos, 192, w_uk)  # warm (compiles)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, q_lat = K.rope_cache_fold_write(kv, q, w, 1e-6, cos, sin, lat, kr, pos, 192, w_uk)
    kv2, q2, _, cos2, sin2, _, _, pos2 = inputs(1, 20, 1, 192, 512, 64, 64, torch.bfloat16, seed=5)
    for dst, src in ((kv, kv2), (q, q2), (cos, cos2), (sin, sin2), (pos, pos2)):
        dst.copy_(src)
    lat_ref, kr_ref = lat.clone(), kr.clone()
    ref, ref_lat = K.rope_cache_fold_reference(kv, q, w, 1e-6, cos, sin, lat_ref, kr_ref, pos, 192, w_uk)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(q_lat.float(), ref_lat.float(), atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(lat.float(), lat_ref.float(), atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(kr.float(), kr_ref.float(), atol=3e-2, rtol=1e-2)


# ------------------------------------------------------------------------------------------------ rope "fused_uk"
@pytest.mark.parametrize("make", [tiny_glm, tiny_longcat])
def test_model_fused_uk_equals_fused_and_plain(make):
    """The whole model, prefill then two decode steps through a static cache: rope="fused_uk" (W_uk's product in
    the rope kernel) gives rope="fused"'s and "plain"'s logits and caches (LongCat: both LoRA scales)."""
    torch.manual_seed(0)
    cfg = make()
    model = CausalLM(cfg).eval().to(DEV)
    ids = torch.randint(0, cfg.vocab_size, (2, 7), device=DEV)
    logits, caches = {}, {}
    for rope in ("plain", "fused", "fused_uk"):
        cache = StaticCache.for_model(cfg, 2, 12, device=DEV)
        with torch.no_grad():
            out = [model(ids[:, :5], cache=cache, forms=Forms(attention="absorbed"))]  # prefill: plain
            for i in (5, 6):  # decode steps: the asked form
                out.append(model(ids[:, i:i + 1], cache=cache, forms=Forms(attention="absorbed", rope=rope)))
        logits[rope], caches[rope] = torch.cat(out, 1), cache
    for rope in ("fused", "plain"):
        torch.testing.assert_close(logits["fused_uk"], logits[rope], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(caches["fused_uk"].latent, caches[rope].latent, atol=1e-6, rtol=1e-6)


def test_fused_uk_runs_the_fold_kernel_and_needs_an_absorbed_attention(monkeypatch):
    """rope="fused_uk" calls rope_cache_fold_write once a layer (not rope_cache_write, nor W_uk's own product in
    MLA.fold_query: the attention uses the kernel's q_lat); with an attention form
    that does not fold W_uk it is a one-line error that says what to pass."""
    from longcat_ref.model import mla as M

    calls = {"fold": 0, "plain": 0, "fold_query": 0}

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(M, "rope_cache_fold_write", count("fold", M.rope_cache_fold_write))
    monkeypatch.setattr(M, "rope_cache_write", count("plain", M.rope_cache_write))
    monkeypatch.setattr(M.MLA, "fold_query", staticmethod(count("fold_query", M.MLA.fold_query)))  # the kernel's
    #   q_lat is the one attended with: W_uk's own product never runs
    cfg = tiny_glm()
    model = CausalLM(cfg).eval().to(DEV)
    ids = torch.randint(0, cfg.vocab_size, (1, 1), device=DEV)
    with torch.no_grad():
        model(ids, cache=StaticCache.for_model(cfg, 1, 4, device=DEV), forms=Forms(attention="absorbed",
                                                                                   rope="fused_uk"))
    assert calls == {"fold": cfg.num_attn_sublayers, "plain": 0, "fold_query": 0}
    with pytest.raises(ValueError, match="rope='fused_uk' folds W_uk into the query .* pass rope='fused'"):
        model(ids, cache=StaticCache.for_model(cfg, 1, 4, device=DEV), forms=Forms(attention="naive",
                                                                                   rope="fused_uk"))
    with pytest.raises(ValueError, match="StaticCache"):
        model(ids, cache=DynamicCache.for_model(cfg), forms=Forms(attention="absorbed", rope="fused_uk"))


@cuda
@pytest.mark.parametrize("b, folds", [(1, True), (2, True), (8, False)])
def test_gpu_auto_folds_up_to_the_limit(monkeypatch, b, folds):
    """With FOLD_IN_ROPE_MAX_ROWS = 4, the decode forms' rope "auto" folds W_uk into the rope kernel for up to 4
    query tokens of the batch and not past it; the logits equal the unfolded step's either way."""
    from longcat_ref.model import mla as M
    from longcat_ref.model.forms import DECODE

    calls = []
    fold = M.rope_cache_fold_write
    monkeypatch.setattr(M, "rope_cache_fold_write", lambda *a, **k: calls.append(1) or fold(*a, **k))
    torch.manual_seed(0)
    cfg = tiny_glm()
    model = CausalLM(cfg).eval().to("cuda")
    ids = torch.randint(0, cfg.vocab_size, (b, 1), device="cuda")
    out = {}
    for limit in (0, 4):
        monkeypatch.setattr(M, "FOLD_IN_ROPE_MAX_ROWS", limit)
        with torch.no_grad():
            out[limit] = model(ids, cache=StaticCache.for_model(cfg, b, 8, device="cuda"), forms=DECODE)
    assert len(calls) == (cfg.num_attn_sublayers if folds else 0)
    torch.testing.assert_close(out[4], out[0], atol=1e-5, rtol=1e-5)
