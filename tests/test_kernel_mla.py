"""The absorbed-MLA decode kernel (longcat_ref/kernels/mla_decode.py) against its plain-PyTorch reference.

Without a GPU the kernel runs in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the CPU
tests use tiny shapes; the reference itself is checked against an explicit formula written here and against
`MLA._absorbed`. The GPU tests (skipped without CUDA) run the real sizes: r = 512, d = 64, LongCat's 64 heads and
GLM-4.7-Flash's 20, up to a 32k-slot cache, inside a CUDA graph and under torch.compile(fullgraph=True).
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from longcat_ref.kernels import mla_decode as K  # noqa: E402
from longcat_ref.kernels import support  # noqa: E402
from longcat_ref.model.config import tiny_glm, tiny_longcat  # noqa: E402
from longcat_ref.model.mla import MLA, attention_bias  # noqa: E402
from ptx import before_wait, kernel_ptx  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the small tests run natively on a GPU
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def inputs(b, h, t, r, d, S, dtype=torch.float32, seed=0, device=DEV, q_std=1.0):
    g = torch.Generator().manual_seed(seed)
    q_lat = torch.randn(b, h, t, r, generator=g) * q_std  # (b, h, t, r)
    q_rope = torch.randn(b, h, t, d, generator=g) * q_std  # (b, h, t, d)
    latent = torch.randn(b, S, r, generator=g)  # (b, S, r)
    k_rope = torch.randn(b, S, d, generator=g)  # (b, S, d)
    return [x.to(device=device, dtype=dtype) for x in (q_lat, q_rope, latent, k_rope)]


def masked_bias(valid, dtype):
    """valid (b, t, S) bool -> additive (b, 1, t, S): 0 where allowed, finfo(dtype).min where not."""
    bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
    return bias.masked_fill(~valid, torch.finfo(dtype).min)[:, None]


def explicit(q_lat, q_rope, latent, k_rope, bias, scale):
    """The definition, one (sequence, head, query) row at a time, in fp64: an independent check of the reference."""
    q_lat, q_rope, latent, k_rope, bias = (x.double().cpu() for x in (q_lat, q_rope, latent, k_rope, bias))
    b, h, t, r = q_lat.shape
    out = torch.empty(b, h, t, r, dtype=torch.float64)
    for i in range(b):
        for j in range(h):
            for k in range(t):
                s = (latent[i] @ q_lat[i, j, k] + k_rope[i] @ q_rope[i, j, k]) * scale  # (S,)
                s = s + bias[i if bias.shape[0] > 1 else 0, 0, k]  # (S,)
                e = torch.exp(s - s.max())  # (S,)
                out[i, j, k] = (e / e.sum()) @ latent[i]  # (r,)
    return out


def exact(q_lat, q_rope, latent, k_rope, bias, scale):
    """The reference's formula on the same values in fp64 (what a kernel should approach)."""
    return K.mla_decode_reference(*(x.double() for x in (q_lat, q_rope, latent, k_rope, bias)), scale)


def holes(b, t, S, seed=0):
    """(b, t, S) valid slots: a causal-looking prefix per query, batch row 1 with its first slots masked (left
    padding), and in batch row 0 the last query row masked everywhere (an all-padding row)."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.zeros(b, t, S, dtype=torch.bool)
    for i in range(b):
        n = int(torch.randint(S // 2, S + 1, (), generator=g))
        for k in range(t):
            valid[i, k, : max(1, n - (t - 1 - k))] = True  # query k sees up to its own slot
    if b > 1:
        valid[1, :, : S // 3] = False  # padding hole at the start of sequence 1
    if t > 1:
        valid[0, t - 1] = False  # a fully masked row: uniform softmax, never NaN
    return valid


# -------------------------------------------------------------------------------------------- the reference
def test_reference_matches_explicit_formula():
    b, h, t, r, d, S = 2, 3, 3, 8, 4, 21
    x = inputs(b, h, t, r, d, S)
    bias = masked_bias(holes(b, t, S).to(DEV), torch.float32)
    bias = bias + 0.3 * torch.randn(bias.shape, generator=torch.Generator().manual_seed(5)).to(DEV)  # any bias
    ref = K.mla_decode_reference(*x, bias, 0.3).cpu()
    torch.testing.assert_close(ref.double(), explicit(*x, bias, 0.3), atol=1e-5, rtol=1e-5)
    uniform = x[2][0].double().mean(0).cpu()  # (r,): the fully masked row (0, :, t-1) attends uniformly
    torch.testing.assert_close(ref[0, :, t - 1].double(), uniform.expand(h, r), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [tiny_longcat, tiny_glm])
def test_reference_is_mla_absorbed(make):
    """mla_decode_reference is exactly the middle of MLA._absorbed: bitwise, with W_uk and W_uv around it."""
    torch.manual_seed(0)
    cfg = make()
    mla = MLA(cfg).to(DEV)
    b, t, S = 2, 2, 9
    q_nope = torch.randn(b, cfg.num_attention_heads, t, cfg.qk_nope_head_dim).to(DEV)
    _, q_rope, latent, k_rope = inputs(b, cfg.num_attention_heads, t, cfg.kv_lora_rank, cfg.qk_rope_head_dim, S)
    pad = torch.ones(b, S, device=DEV)
    pad[1, :3] = 0  # sequence 1 left-padded
    mask = attention_bias(pad, torch.tensor([S - 2, S - 1], device=DEV), S, torch.float32)  # (b, 1, t, S)
    with torch.no_grad():
        want = mla._absorbed(q_nope, q_rope, latent, k_rope, mask)  # (b, h, t, v)
        w_uk, w_uv = mla.kv_b_split()
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)
        o_lat = K.mla_decode_reference(q_lat, q_rope, latent, k_rope, mask, mla.softmax_scale)
        assert torch.equal(torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv), want)
        # and the kernel inside the same sandwich (tiny r = 16, d = 4: d is padded to 16 inside)
        o_k = K.mla_decode(q_lat, q_rope, latent, k_rope, mask, mla.softmax_scale)
        torch.testing.assert_close(torch.einsum("bhtr,hvr->bhtv", o_k, w_uv), want, atol=1e-5, rtol=1e-5)
        # W_uv's product in the merge kernel (w_uv: the strided slice of kv_b_proj's weight the model passes)
        assert torch.equal(K.mla_decode_reference(q_lat, q_rope, latent, k_rope, mask, mla.softmax_scale,
                                                  w_uv=w_uv), want)
        o_uv = K.mla_decode(q_lat, q_rope, latent, k_rope, mask, mla.softmax_scale, w_uv=w_uv)  # (b, h, t, v)
        torch.testing.assert_close(o_uv, want, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------- the kernel (CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("splits", [1, 2, None], ids=["splits1", "splits2", "auto"])
def test_kernel_matches_reference(dtype, t, splits):
    b, h, r, d, S = 2, 4, 32, 16, 150  # 150 slots: tiles of 64 with a partial last one
    x = inputs(b, h, t, r, d, S, dtype)
    bias = masked_bias(holes(b, t, S).to(DEV), dtype)  # (b, 1, t, S) with holes and (t > 1) an all-masked row
    scale = (r + d) ** -0.5
    out = K.mla_decode(*x, bias, scale, splits=splits)
    assert out.shape == (b, h, t, r) and out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out, K.mla_decode_reference(*x, bias, scale), **TOL[dtype])
    tol = TOL[dtype] if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)  # bf16: nearer the exact value
    torch.testing.assert_close(out.double(), exact(*x, bias, scale), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t,splits", [(1, 1), (1, None), (2, 3)])
def test_kernel_with_w_uv_matches_reference(dtype, t, splits):
    """w_uv: the merge kernel also applies W_uv per head. v = 40 output channels (two blocks of 32, the second
    partial), W_uv a strided slice of a (h, nope + v, r) buffer as in the model; one split runs the merge too;
    holes, left padding and an all-masked row (t = 2) as above. Checked against the reference and against the
    unfused path (the kernel's o_lat, then the einsum), which rounds o_lat the same way."""
    b, h, r, d, S, nope, v = 2, 3, 32, 16, 150, 8, 40
    x = inputs(b, h, t, r, d, S, dtype, seed=6)
    w = (torch.randn(h, nope + v, r, generator=torch.Generator().manual_seed(6)) * 0.2).to(DEV, dtype)
    w_uv = w[:, nope:]  # (h, v, r), rows of r contiguous, heads strided
    bias = masked_bias(holes(b, t, S, seed=6).to(DEV), dtype)
    out = K.mla_decode(*x, bias, 0.2, splits=splits, w_uv=w_uv)
    assert out.shape == (b, h, t, v) and out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out, K.mla_decode_reference(*x, bias, 0.2, w_uv=w_uv), **TOL[dtype])
    unfused = torch.einsum("bhtr,hvr->bhtv", K.mla_decode(*x, bias, 0.2, splits=splits), w_uv)
    torch.testing.assert_close(out, unfused, **(TOL[dtype] if dtype == torch.float32 else
                                                dict(atol=1e-2, rtol=1e-2)))
    want = torch.einsum("bhtr,hvr->bhtv", exact(*x, bias, 0.2), w_uv.double())  # fp64 from the formula
    tol = TOL[dtype] if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out.double(), want, **tol)


@pytest.mark.parametrize("bias_batch", [1, 2], ids=["bias(1,1,t,S)", "bias(b,1,t,S)"])
@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float32], ids=["bias-bf16", "bias-fp32"])
def test_bias_broadcast_and_dtype(bias_batch, bias_dtype):
    b, h, t, r, d, S = 2, 3, 2, 32, 16, 90
    x = inputs(b, h, t, r, d, S, torch.bfloat16, seed=1)
    valid = holes(b, t, S, seed=1)[:bias_batch].to(DEV)
    bias = masked_bias(valid, bias_dtype)  # (bias_batch, 1, t, S)
    out = K.mla_decode(*x, bias, 0.2, splits=2)
    torch.testing.assert_close(out, K.mla_decode_reference(*x, bias, 0.2), **TOL[torch.bfloat16])


def test_all_masked_split_combines():
    """Chunks whose slots are all masked: beside a real chunk they weigh nothing; all of them: uniform."""
    b, h, t, r, d, S = 2, 3, 2, 32, 16, 256
    bs = K.block_sizes(r, d, S, 4)[2]  # 64 -> 4 tiles, 4 chunks of one tile
    assert K.split_plan(b, h * t, S, bs, splits=4) == (4, 1)
    x = inputs(b, h, t, r, d, S, seed=2)
    valid = torch.ones(b, t, S, dtype=torch.bool, device=DEV)
    valid[:, :, bs: 3 * bs] = False  # chunks 1 and 2 all masked for every row
    valid[1, 0, : 3 * bs] = False  # sequence 1, query 0: only the last chunk is real
    valid[1, 1] = False  # sequence 1, query 1: every chunk masked -> uniform over all S
    bias = masked_bias(valid, torch.float32)
    for splits in (1, 4):
        out = K.mla_decode(*x, bias, 0.2, splits=splits)
        torch.testing.assert_close(out, K.mla_decode_reference(*x, bias, 0.2), **TOL[torch.float32])
        torch.testing.assert_close(out[1, :, 1], x[2][1].mean(0).expand(h, r), atol=1e-5, rtol=1e-5)


def test_combine_reads_the_chunks_in_tiles():
    """More chunks than the merge reads at a time (COMBINE_BLOCK_SP): two steps, the second partial; r = 512 gives
    several channel blocks per row; whole chunks masked among them."""
    b, h, t, r, d, S = 1, 3, 1, 512, 16, 640
    bs = K.block_sizes(r, d, S, 4)[2]  # 16 slots a tile in fp32 at r = 512 -> 40 tiles
    assert K.split_plan(b, h * t, S, bs, splits=40) == (40, 1) and 40 > K.COMBINE_BLOCK_SP
    x = inputs(b, h, t, r, d, S, seed=5)
    valid = torch.ones(b, t, S, dtype=torch.bool, device=DEV)
    valid[:, :, 5 * bs: 9 * bs] = False  # chunks 5-8 all masked
    valid[:, :, 33 * bs: 35 * bs] = False  # and two in the second step
    bias = masked_bias(valid, torch.float32)
    out = K.mla_decode(*x, bias, 0.1, splits=40)
    torch.testing.assert_close(out, K.mla_decode_reference(*x, bias, 0.1), **TOL[torch.float32])
    torch.testing.assert_close(out.double(), exact(*x, bias, 0.1), **TOL[torch.float32])


def test_padded_sizes_and_row_masking():
    """r, d not powers of two (nor >= 16) are padded inside; 20 heads (GLM-4.7-Flash) leave padding rows in the
    second 16-row block; the cache is read in place through strides (k_rope a slice of one (b, S, r+d) buffer,
    latent one layer of a (layers, b, S, r) buffer)."""
    b, h, t, r, d, S = 1, 20, 1, 24, 4, 70
    q_lat, q_rope, latent, k_rope = inputs(b, h, t, r, d, S, seed=3)
    buf = torch.cat([latent, k_rope], -1)  # (b, S, r + d)
    layers = torch.stack([torch.zeros_like(latent), latent])  # (2, b, S, r)
    bias = masked_bias(holes(b, t, S, seed=3).to(DEV), torch.float32)
    want = K.mla_decode_reference(q_lat, q_rope, latent, k_rope, bias, 0.25)
    for splits in (1, 2):
        out = K.mla_decode(q_lat, q_rope, layers[1], buf[..., r:], bias, 0.25, splits=splits)
        torch.testing.assert_close(out, want, **TOL[torch.float32])
    q_rope_view = torch.randn(b, h, t, 2 * d, device=DEV)[..., d:]  # non-contiguous q: made contiguous inside
    torch.testing.assert_close(K.mla_decode(q_lat, q_rope_view, latent, k_rope, bias, 0.25),
                               K.mla_decode_reference(q_lat, q_rope_view, latent, k_rope, bias, 0.25),
                               **TOL[torch.float32])


def test_split_plan():
    # LongCat (64 heads, t = 1, bf16 r = 512 -> 32-slot tiles) at batch 1: ~2 programs per SM of 132
    assert K.block_sizes(512, 64, 32768, 2) == (512, 64, 32)
    assert K.block_sizes(512, 64, 32768, 4) == (512, 64, 16)
    assert K.split_plan(1, 64, 32768, 32) == (64, 16)  # 4 row blocks x 64 chunks of 16 tiles = 256 programs
    assert K.split_plan(1, 20, 32768, 32) == (128, 8)  # GLM: 2 row blocks x 128 chunks
    assert K.split_plan(1, 64, 1024, 32) == (32, 1)  # capped at one tile per chunk
    assert K.split_plan(32, 64, 1024, 32) == (3, 11)
    assert K.split_plan(128, 64, 32768, 32) == (1, 1024)  # the batch fills the GPU: no split, no combine
    for b in (1, 3, 8):
        for S in (1, 17, 100, 1000):
            for splits in (None, 1, 2, 3, 7, 1000):
                n, per = K.split_plan(b, 48, S, 16, splits=splits)
                tiles = math.ceil(S / 16)
                assert 1 <= n <= tiles and (n - 1) * per < tiles <= n * per  # no empty chunk, every tile covered


def test_prefetch_plan():
    """The cache prefetch's constexprs: 128-byte lines per slot (bf16 r = 512: 8, d = 64: 1), none without PDL."""
    assert K.prefetch_plan(512, 64, 2, True) == dict(PF_TILES=K.PREFETCH_TILES, LAT_LINES=8, KR_LINES=1, LINE=64)
    assert K.prefetch_plan(512, 64, 4, True) == dict(PF_TILES=K.PREFETCH_TILES, LAT_LINES=16, KR_LINES=2, LINE=32)
    assert K.prefetch_plan(16, 4, 2, True)["LAT_LINES"] == 1  # a tiny config: one line per slot
    assert K.prefetch_plan(512, 64, 2, False)["PF_TILES"] == 0


def test_cache_prefetch_is_issued_before_the_dependent_launch_wait():
    """With PDL the split program asks L2 for its first tiles (one `prefetch.global.L2` per 128-byte line) before
    `griddepcontrol.wait`, and reads nothing else there; with PF_TILES = 0 no prefetch is emitted."""
    pre = before_wait(kernel_ptx("mla_split", 2))
    assert any("prefetch.global.L2" in line for line in pre)
    assert not any("ld.global" in line for line in pre)  # nothing loaded before the wait
    assert "prefetch" not in kernel_ptx("mla_split", 0)


def test_custom_op_compiles_and_passes_opcheck():
    b, h, t, r, d, S = 1, 2, 1, 16, 16, 40
    x = inputs(b, h, t, r, d, S, seed=4)
    bias = masked_bias(holes(b, t, S).to(DEV), torch.float32)
    torch.library.opcheck(torch.ops.longcat_ref.mla_decode.default, (*x, bias, 0.25, 2),
                          test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda *a: K.mla_decode(*a, 0.25, splits=2) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*x, bias), K.mla_decode(*x, bias, 0.25, splits=2) * 2)
    w_uv = torch.randn(h, 8, r, device=DEV)  # (h, v, r): the op's output is then (b, h, t, v)
    torch.library.opcheck(torch.ops.longcat_ref.mla_decode.default, (*x, bias, 0.25, 2, w_uv),
                          test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda *a: K.mla_decode(*a, 0.25, w_uv=w_uv) * 2, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*x, bias), K.mla_decode(*x, bias, 0.25, w_uv=w_uv) * 2)


def test_refusals(monkeypatch):
    x = inputs(1, 2, 1, 16, 16, 8, device="cpu")
    bias = torch.zeros(1, 1, 1, 8)
    with pytest.raises(ValueError, match="bias must be"):
        K.mla_decode(*x, torch.zeros(1, 1, 1, 9), 1.0)
    with pytest.raises(ValueError, match="one dtype"):
        K.mla_decode(x[0].bfloat16(), *x[1:], bias, 1.0)
    with pytest.raises(ValueError, match="bias must be torch.bfloat16 or float32"):
        K.mla_decode(*(v.bfloat16() for v in x), bias.half(), 1.0)
    with pytest.raises(ValueError, match=r"w_uv must be \(h=2, v, r=16\), got \(2, 8, 12\)"):
        K.mla_decode(*x, bias, 1.0, w_uv=torch.zeros(2, 8, 12))
    with pytest.raises(ValueError, match="w_uv must be torch.float32 like q_lat, got torch.bfloat16"):
        K.mla_decode(*x, bias, 1.0, w_uv=torch.zeros(2, 8, 16, dtype=torch.bfloat16))
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter
    with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
        K.mla_decode(*x, bias, 1.0)
    monkeypatch.setattr(support, "have_triton", lambda: False)
    with pytest.raises(RuntimeError, match="needs Triton"):
        K.mla_decode(*x, bias, 1.0)


# -------------------------------------------------------------------------------------------- real sizes (GPU)
GPU_CASES = [  # (heads, batch, slots, queries)
    (64, 1, 1024, 1), (64, 1, 32768, 1), (64, 32, 1024, 1), (64, 1, 1024, 3),  # LongCat
    (20, 1, 1024, 1), (20, 1, 32768, 1), (20, 32, 1024, 1), (20, 2, 4096, 4),  # GLM-4.7-Flash: 20 = 16 + 4 rows
]


def gpu_inputs(h, b, S, t, seed=0):
    x = inputs(b, h, t, 512, 64, S, torch.bfloat16, seed=seed, device="cuda", q_std=0.5)
    valid = holes(b, t, S, seed=seed).cuda()
    return x, masked_bias(valid, torch.bfloat16), 192**-0.5  # LongCat's softmax scale (nope 128 + rope 64)


@cuda
@pytest.mark.parametrize("h,b,S,t", GPU_CASES)
def test_gpu_real_sizes(h, b, S, t):
    x, bias, scale = gpu_inputs(h, b, S, t)
    out = K.mla_decode(*x, bias, scale)
    assert out.shape == (b, h, t, 512) and out.dtype == torch.bfloat16 and not out.isnan().any()
    ref = K.mla_decode_reference(*x, bias, scale)  # scores in bf16 (the model's own path)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    want = K.mla_decode_reference(*(v.float() for v in x), bias.float(), scale)  # the same values in fp32
    torch.testing.assert_close(out.float(), want, atol=5e-3, rtol=1e-2)  # interpreted at S=2k: errors ~2e-3
    if S > 1024:  # forced split counts agree too (the heuristic's choice is one of many)
        for splits in (1, 7):
            torch.testing.assert_close(K.mla_decode(*x, bias, scale, splits=splits).float(), want,
                                       atol=5e-3, rtol=1e-2)


@cuda
@pytest.mark.parametrize("h,v,b,S,t", [(20, 256, 1, 128, 1), (20, 256, 1, 32768, 1), (64, 128, 1, 1024, 1),
                                       (64, 128, 1, 1024, 3), (20, 256, 32, 1024, 1)])
def test_gpu_w_uv_real_sizes(h, v, b, S, t):
    """W_uv in the merge kernel at GLM-4.7-Flash's (v = 256) and LongCat-Flash's (v = 128) sizes: equal to the
    unfused path up to bf16 rounding of the output, and to the fp32 formula."""
    x, bias, scale = gpu_inputs(h, b, S, t)
    w_uv = (torch.randn(h, 192 + v, 512, device="cuda") * 0.05).bfloat16()[:, 192:]  # a slice, as the model's
    out = K.mla_decode(*x, bias, scale, w_uv=w_uv)
    assert out.shape == (b, h, t, v) and not out.isnan().any()
    unfused = torch.einsum("bhtr,hvr->bhtv", K.mla_decode(*x, bias, scale), w_uv)
    torch.testing.assert_close(out, unfused, atol=1e-2, rtol=1e-2)
    want = torch.einsum("bhtr,hvr->bhtv", K.mla_decode_reference(*(v_.float() for v_ in x), bias.float(), scale),
                        w_uv.float())
    torch.testing.assert_close(out.float(), want, atol=1e-2, rtol=2e-2)


@cuda
def test_gpu_fp32_real_sizes():
    """fp32 caches (IEEE fp32 dots, 16-slot tiles): not the fast path, but it must be right."""
    x = inputs(2, 64, 2, 512, 64, 3000, torch.float32, device="cuda", q_std=0.5)
    bias = masked_bias(holes(2, 2, 3000).cuda(), torch.float32)
    torch.testing.assert_close(K.mla_decode(*x, bias, 192**-0.5), K.mla_decode_reference(*x, bias, 192**-0.5),
                               atol=1e-4, rtol=1e-4)


@cuda
@pytest.mark.parametrize("h", [64, 20])
def test_gpu_cuda_graph_equals_eager(h):
    x, bias, scale = gpu_inputs(h, 2, 4096, 1, seed=1)
    eager = K.mla_decode(*x, bias, scale)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (compile) outside the capture
        K.mla_decode(*x, bias, scale)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = K.mla_decode(*x, bias, scale)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    x[2].mul_(-1)  # new cache contents in place: the replay reads them
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, K.mla_decode(*x, bias, scale))


@cuda
@pytest.mark.parametrize("h", [64, 20])
def test_gpu_compile_fullgraph_equals_eager(h):
    x, bias, scale = gpu_inputs(h, 1, 32768, 1, seed=2)

    def step(q_lat, q_rope, latent, k_rope, bias):  # exact elementwise ops around the op: bitwise comparable
        return K.mla_decode(q_lat * 2, q_rope, latent, k_rope, bias, scale) * 2

    compiled = torch.compile(step, fullgraph=True)
    assert torch.equal(compiled(*x, bias), step(*x, bias))


if torch.cuda.is_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _late_writer(SRC, DST, n, spin, PDL: tl.constexpr):
        """Copies SRC into DST late: it lets the next kernel start at once (PDL), spins, then writes."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        offs = tl.program_id(0) * 1024 + tl.arange(0, 1024)
        x = tl.load(SRC + offs, mask=offs < n, other=0.0).to(tl.float32)
        for _ in range(spin):  # a few microseconds of dependent arithmetic that changes nothing
            x = x * 1.0 + 0.0 * tl.sin(x)
        tl.store(DST + offs, x.to(DST.dtype.element_ty), mask=offs < n)


@cuda
@pytest.mark.parametrize("uv", [False, True], ids=["o_lat", "w_uv"])
@pytest.mark.parametrize("pf_tiles", [0, 2])
def test_gpu_cache_written_by_the_previous_kernel_is_read_fresh(monkeypatch, pf_tiles, uv):
    """The hazard of the prefetch: in one CUDA graph a PDL kernel rewrites the whole latent cache late, after it
    has let the split kernel start; the split programs prefetch the old lines before their wait. The replay must
    equal the eager result on the new cache, bit for bit, for GLM's 20 heads over 128 slots (4 chunks of one tile:
    every tile prefetched), with the plain merge and with W_uv in the merge."""
    monkeypatch.setattr(K, "PREFETCH_TILES", pf_tiles)
    x, bias, scale = gpu_inputs(20, 1, 128, 1, seed=3)
    q_lat, q_rope, latent, k_rope = x
    w_uv = (torch.randn(20, 256, 512, device="cuda") * 0.05).bfloat16() if uv else None
    new = torch.randn_like(latent)  # the producer's data: every slot changes
    old = latent.clone()
    pdl = support.pdl(latent)

    def chain():
        _late_writer[(triton.cdiv(latent.numel(), 1024),)](new, latent, latent.numel(), 2000, PDL=pdl,
                                                             launch_pdl=pdl)
        return K.mla_decode(q_lat, q_rope, latent, k_rope, bias, scale, w_uv=w_uv)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # compile both kernels outside the capture
        chain()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain()
    for _ in range(3):
        latent.copy_(old)  # the stale cache, then the replay rewrites it
        torch.cuda.synchronize()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(latent, new)
        assert torch.equal(captured, K.mla_decode(q_lat, q_rope, new, k_rope, bias, scale, w_uv=w_uv))


@cuda
def test_gpu_cache_prefetch_changes_no_bit(monkeypatch):
    """The prefetch is a hint: the kernel with it (PREFETCH_TILES = 2) equals the kernel without, bit for bit, at
    real sizes with several tiles per chunk."""
    x, bias, scale = gpu_inputs(64, 1, 32768, 1, seed=4)
    monkeypatch.setattr(K, "PREFETCH_TILES", 0)
    off = K.mla_decode(*x, bias, scale)
    monkeypatch.setattr(K, "PREFETCH_TILES", 2)
    assert torch.equal(K.mla_decode(*x, bias, scale), off)

