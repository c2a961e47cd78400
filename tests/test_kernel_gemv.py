"""The GEMV kernel (kernels/gemv.py) against its definition written out, and the "triton" linear form in the model.

Without a GPU the kernel runs in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the shapes
here are small; on a GPU they run natively, plus GLM-4.7-Flash's real projection shapes in bf16.
"""

import pytest
import torch

import longcat_ref as L
from longcat_ref.kernels.gemv import (PRODUCT_TILE, TARGET_PROGRAMS, _gemv_op, batched_gemv, choose_tiles, gemv,
                                      gemv_reference)
from longcat_ref.kernels.support import can_run
from longcat_ref.model.linear import linear, resolve
from longcat_ref.model.mla import MLA

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not can_run(torch.empty(0, device=DEV)),
                                reason="needs CUDA, or Triton's interpreter on the CPU")


def written_out(x, w):
    """y[g, m, n] = sum_k x[g, m, k] w[g, n, k], one dot product at a time in float64."""
    G, M, K = x.shape
    y = torch.empty(G, M, w.shape[1], dtype=torch.float64)
    for g in range(G):
        for m in range(M):
            for n in range(w.shape[1]):
                y[g, m, n] = (x[g, m].double() * w[g, n].double()).sum()
    return y


@pytest.mark.parametrize("G,M,N,K,transposed", [
    (1, 1, 40, 300, False),  # one projection, ragged tiles
    (1, 3, 8, 2048, False),  # few rows, long rows: split-K
    (3, 2, 20, 70, False),  # per-head products (W_uv's layout)
    (4, 1, 48, 24, True),  # W_uk's product: the sum over the strided axis
])
def test_kernel_equals_the_definition(G, M, N, K, transposed):
    g = torch.Generator().manual_seed(G * 100 + K)
    x = torch.randn(G, M, K, generator=g)
    w = torch.randn(G, K, N, generator=g).transpose(1, 2) if transposed else torch.randn(G, N, K, generator=g)
    got = batched_gemv(x.to(DEV), w.to(DEV)).cpu()
    want = written_out(x, w)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gemv_reference(x, w).double(), want, atol=1e-4, rtol=1e-5)


def test_split_k_partials_sum_to_the_product():
    """A short, wide weight is split over the reduction axis: every split's fp32 partial is its own columns' sum."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(1, 1, 2048, generator=g), torch.randn(1, 8, 2048, generator=g)
    tiles = choose_tiles(1, 1, 8, 2048)
    assert tiles[4] > 1
    part = _gemv_op(x.to(DEV), w.to(DEV), *tiles).cpu()  # (SPLIT, 1, 1, 8)
    ks = tiles[3]
    for s in range(tiles[4]):
        torch.testing.assert_close(part[s, 0], x[0, :, s * ks:(s + 1) * ks] @ w[0, :, s * ks:(s + 1) * ks].T,
                                   atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("G,M,N,K,kc", [(1, 1, 768, 2048, True), (1, 1, 576, 2048, True), (1, 4, 2048, 5120, True),
                                        (20, 1, 512, 192, False), (20, 1, 256, 512, True), (1, 16, 8, 24, True)])
def test_tiles(G, M, N, K, kc):
    """Powers of two; the product tile at most PRODUCT_TILE; the splits cover K with whole chunks and no empty
    split; split only while there are fewer than TARGET_PROGRAMS programs."""
    bm, bn, bk, ks, split = choose_tiles(G, M, N, K, kc)
    assert all(t & (t - 1) == 0 for t in (bm, bn, bk)) and bm >= M
    assert bm * bn * bk <= max(PRODUCT_TILE, bm * bn * 16)
    assert ks % bk == 0 and split * ks >= K and (split - 1) * ks < K
    programs = G * -(-N // bn)
    assert split == 1 or programs * split // 2 < TARGET_PROGRAMS


def test_gemv_with_bias_and_leading_axes_equals_linear():
    g = torch.Generator().manual_seed(2)
    m = L.init_weights(torch.nn.Linear(24, 40, bias=True), seed=1, std=0.2).to(DEV)
    x = torch.randn(2, 3, 24, generator=g).to(DEV)
    torch.testing.assert_close(gemv(x, m.weight, m.bias), m(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(linear(m, x, "triton"), m(x), atol=1e-5, rtol=1e-5)
    assert resolve("triton", x, m.weight.numel()) == "triton"
    assert resolve("triton", torch.randn(17, 24, device=DEV), 1) == "plain"  # past TRITON_MAX_TOKENS: cuBLAS


def test_per_head_products_in_the_kernel():
    """MLA's W_uk / W_uv products with linear="triton" == the einsums."""
    g = torch.Generator().manual_seed(3)
    q, w_uk = torch.randn(2, 4, 3, 6, generator=g).to(DEV), torch.randn(4, 6, 10, generator=g).to(DEV)
    o, w_uv = torch.randn(2, 4, 3, 10, generator=g).to(DEV), torch.randn(4, 5, 10, generator=g).to(DEV)
    torch.testing.assert_close(MLA.fold_query(q, w_uk, "triton"), MLA.fold_query(q, w_uk), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(MLA.unfold_output(o, w_uv, "triton"), MLA.unfold_output(o, w_uv),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["longcat", "glm"])
def test_model_with_triton_projections_equals_reference(kind):
    """The whole forward with linear="triton" (one decode-sized chunk, fp32) == the reference forward."""
    cfg = L.tiny_longcat() if kind == "longcat" else L.tiny_glm()
    m = L.init_weights(L.CausalLM(cfg), seed=1, std=0.08, bias_std=0.05).eval().to(DEV)
    ids = torch.randint(4, cfg.vocab_size, (2, 3), generator=torch.Generator().manual_seed(4)).to(DEV)
    with torch.no_grad():
        ref = m(ids)
        got = m(ids, forms=L.Forms("absorbed", "gather", linear="triton"))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_compiled_with_the_op_inside_equals_eager():
    """Under torch.compile(fullgraph=True) the kernel is one opaque op; the sum over splits, the bias and the cast
    are compiled around it."""
    m = L.init_weights(torch.nn.Linear(40, 24, bias=True), seed=6, std=0.2).to(DEV)
    x = torch.randn(1, 40, generator=torch.Generator().manual_seed(6)).to(DEV)
    f = torch.compile(lambda x: torch.relu(linear(m, x, "triton")), fullgraph=True, dynamic=False)
    with torch.no_grad():  # inference only: the op has no backward
        torch.testing.assert_close(f(x), torch.relu(m(x)), atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_one_line_errors():
    x = torch.randn(1, 2, 8, device=DEV)
    with pytest.raises(ValueError, match="same G and K"):
        batched_gemv(x, torch.randn(1, 4, 7, device=DEV))
    with pytest.raises(ValueError, match="share one dtype"):
        batched_gemv(x, torch.randn(1, 4, 8, device=DEV, dtype=torch.float64))


def test_opcheck():
    """The custom op's registration (fake shapes, schema) as torch.library checks it."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(2, 1, 40, generator=g).to(DEV), torch.randn(2, 12, 40, generator=g).to(DEV)
    torch.library.opcheck(_gemv_op, (x, w, *choose_tiles(2, 1, 12, 40)))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("N,K,G,transposed", [(768, 2048, 1, False), (576, 2048, 1, False), (5120, 768, 1, False),
                                              (2048, 5120, 1, False), (512, 192, 20, True), (256, 512, 20, False)])
def test_glm_shapes_in_bf16_on_cuda(N, K, G, transposed):
    """GLM-4.7-Flash's six per-layer reads (q_a, kv_a, q_b, o_proj, W_uk's and W_uv's products), bf16, batch 1."""
    g = torch.Generator(device="cuda").manual_seed(N + K)
    x = torch.randn(G, 1, K, device="cuda", generator=g).bfloat16()
    w = (torch.randn(G, K, N, device="cuda", generator=g).transpose(1, 2) if transposed
         else torch.randn(G, N, K, device="cuda", generator=g)).bfloat16()
    want = torch.einsum("gmk,gnk->gmn", x.float(), w.float())
    got = batched_gemv(x, w).float()
    assert float((got - want).norm() / want.norm()) < 1e-2


def test_tune_gemv_lists_each_layers_reads_and_valid_sweeps():
    """tools/tune_gemv.py's table: GLM-4.7-Flash's six reads (~44 MB a layer in bf16) and LongCat's dense SwiGLU;
    every swept configuration covers K with whole chunks and no empty split."""
    from longcat_ref.model.config import glm_4_7_flash, longcat_flash_chat
    from longcat_ref.tools.tune_gemv import shapes, sweep_configs

    glm = shapes(glm_4_7_flash())
    assert list(glm) == ["q_a", "kv_a", "q_b", "w_uk", "w_uv", "o_proj"]
    assert glm["w_uk"] == (20, 512, 192, True) and glm["o_proj"] == (1, 2048, 5120, False)
    assert 40e6 < sum(G * N * K * 2 for G, N, K, _ in glm.values()) < 48e6
    assert "dense_gate" in shapes(longcat_flash_chat(), dense=True)
    for G, N, K, t in glm.values():
        for narrow in (False, True):  # --narrow: one- and two-warp programs of 1-4 rows (long runs along a
            configs = list(sweep_configs(G, N, K, t, narrow))  # contiguous K: none for W_uk's strided sum)
            assert (bool(configs) or narrow and t) and all((w <= 2) == narrow for _, w in configs)
            for (bm, bn, bk, ks, split), warps in configs:
                assert ks % bk == 0 and split * ks >= K and (split - 1) * ks < K and bm * bn * bk <= 16384
