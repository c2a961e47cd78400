"""The skinny GEMM kernel (kernels/skinny_gemm.py) against its definition written out, and the "skinny" linear form.

Without a GPU the kernel runs in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the shapes
here are small; on a GPU they run natively, plus GLM-4.7-Flash's real batch-32 shapes in bf16.
"""

import pytest
import torch

from longcat_ref.kernels.skinny_gemm import (MAX_TOKENS, TARGET_PROGRAMS, _skinny_op, batched_skinny_gemm,
                                             choose_tiles, skinny_gemm, skinny_reference)
from longcat_ref.kernels.support import can_run

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not can_run(torch.empty(0, device=DEV)),
                                reason="needs CUDA, or Triton's interpreter on the CPU")


def written_out(x, w):
    """y[g, m, n] = sum_k x[g, m, k] w[g, n, k], one dot product a row of w at a time, in float64."""
    G, M, K = x.shape
    y = torch.empty(G, M, w.shape[1], dtype=torch.float64)
    for g in range(G):
        for n in range(w.shape[1]):
            y[g, :, n] = (x[g].double() * w[g, n].double()).sum(-1)  # (M,)
    return y


@pytest.mark.parametrize("G,M,N,K,transposed", [
    (1, 5, 40, 300, False),  # ragged tiles on every axis
    (1, 32, 70, 2048, False),  # a decode batch, long rows: split-K
    (3, 17, 20, 70, False),  # per-head products (W_uv's layout)
    (4, 32, 48, 24, True),  # W_uk's product: the sum over the strided axis
])
def test_kernel_equals_the_definition(G, M, N, K, transposed):
    g = torch.Generator().manual_seed(G * 100 + K)
    x = torch.randn(G, M, K, generator=g)
    w = torch.randn(G, K, N, generator=g).transpose(1, 2) if transposed else torch.randn(G, N, K, generator=g)
    want = written_out(x, w)
    torch.testing.assert_close(batched_skinny_gemm(x.to(DEV), w.to(DEV)).cpu().double(), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(skinny_reference(x, w).double(), want, atol=1e-4, rtol=1e-5)


def test_bf16_operands_give_exact_products_in_fp32():
    """bf16 x bf16 products are exact in fp32: with an fp32 output (the router's logits) only the order of the sum
    differs from the float64 definition."""
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(1, 32, 512, generator=g).bfloat16(), torch.randn(1, 64, 512, generator=g).bfloat16()
    got = batched_skinny_gemm(x.to(DEV), w.to(DEV), torch.float32).cpu()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), written_out(x, w), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("layout", ["rows along K", "columns along K"])
def test_split_k_partials_sum_to_the_product(layout):
    """A short, wide weight is split over the reduction axis, in either of its layouts (a projection; W_uk's
    product, which reduces over W's strided axis): each split's fp32 partial is its own columns' sum, and the
    partials add up to the product."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 2048, generator=g)
    w = torch.randn(1, 64, 2048, generator=g) if layout == "rows along K" else \
        torch.randn(1, 2048, 64, generator=g).transpose(1, 2)  # (1, N, K) either way
    bm, bn, bk, ks, splits = choose_tiles(1, 16, 64, 2048)
    assert splits > 1
    part = _skinny_op(x.to(DEV), w.to(DEV), bm, bn, bk, ks, splits).cpu()  # (SPLIT, 1, 16, 64)
    cols = [slice(s * ks, (s + 1) * ks) for s in range(splits)]
    want = torch.stack([x[0, :, c].double() @ w[0, :, c].double().T for c in cols])  # (SPLIT, 16, 64)
    torch.testing.assert_close(part[:, 0].double(), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(part.sum(0)[0].double(), written_out(x, w)[0], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("G,M,N,K", [(1, 32, 768, 2048), (1, 32, 576, 2048), (1, 64, 2048, 5120),
                                     (20, 32, 512, 192), (1, 5, 8, 24), (1, 32, 154880, 2048)])
def test_tiles(G, M, N, K):
    """Powers of two, a token tile of 16-64; the splits cover K with whole chunks and no empty split; split only
    while there are fewer than TARGET_PROGRAMS programs."""
    bm, bn, bk, ks, split = choose_tiles(G, M, N, K)
    assert all(t & (t - 1) == 0 for t in (bm, bn, bk)) and M <= bm and 16 <= bm <= MAX_TOKENS
    assert ks % bk == 0 and split * ks >= K and (split - 1) * ks < K
    programs = G * -(-N // bn)
    assert split == 1 or programs * split // 2 < TARGET_PROGRAMS


def test_linear_with_bias_and_leading_axes_equals_f_linear():
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(40, 24, generator=g).to(DEV), torch.randn(40, generator=g).to(DEV)
    x = torch.randn(2, 9, 24, generator=g).to(DEV)
    torch.testing.assert_close(skinny_gemm(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_compiled_with_the_op_inside_equals_eager():
    """Under torch.compile(fullgraph=True) the kernel is one opaque op; the sum over splits and the cast are
    compiled around it."""
    g = torch.Generator().manual_seed(6)
    w, x = torch.randn(24, 400, generator=g).to(DEV), torch.randn(20, 400, generator=g).to(DEV)
    f = torch.compile(lambda x: torch.relu(skinny_gemm(x, w)), fullgraph=True, dynamic=False)
    with torch.no_grad():  # inference only: the op has no backward
        torch.testing.assert_close(f(x), torch.relu(x @ w.T), atol=1e-4, rtol=1e-5)


def test_bad_inputs_are_one_line_errors():
    x = torch.randn(1, 20, 8, device=DEV)
    with pytest.raises(ValueError, match="same G and K"):
        batched_skinny_gemm(x, torch.randn(1, 4, 7, device=DEV))
    with pytest.raises(ValueError, match="share one dtype"):
        batched_skinny_gemm(x, torch.randn(1, 4, 8, device=DEV, dtype=torch.float64))
    with pytest.raises(ValueError, match="at most 64"):
        batched_skinny_gemm(torch.randn(1, 65, 8, device=DEV), torch.randn(1, 4, 8, device=DEV))


def test_opcheck():
    """The custom op's registration (fake shapes, schema) as torch.library checks it."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(2, 17, 40, generator=g).to(DEV), torch.randn(2, 12, 40, generator=g).to(DEV)
    torch.library.opcheck(_skinny_op, (x, w, *choose_tiles(2, 17, 12, 40)))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("N,K,G,transposed", [(768, 2048, 1, False), (576, 2048, 1, False), (5120, 768, 1, False),
                                              (2048, 5120, 1, False), (512, 192, 20, True), (256, 512, 20, False),
                                              (64, 2048, 1, False)])
@pytest.mark.parametrize("M", [8, 32, 64])
def test_glm_shapes_in_bf16_on_cuda(N, K, G, transposed, M):
    """GLM-4.7-Flash's per-layer products at a decode batch (q_a, kv_a, q_b, o_proj, W_uk's and W_uv's products,
    the router), bf16 on tensor cores: within bf16 rounding of the fp32 product, and exact products for fp32 out."""
    g = torch.Generator(device="cuda").manual_seed(N + K)
    x = torch.randn(G, M, K, device="cuda", generator=g).bfloat16()
    w = (torch.randn(G, K, N, device="cuda", generator=g).transpose(1, 2) if transposed
         else torch.randn(G, N, K, device="cuda", generator=g)).bfloat16()
    want = torch.einsum("gmk,gnk->gmn", x.double(), w.double())
    got = batched_skinny_gemm(x, w).double()
    assert float((got - want).norm() / want.norm()) < 1e-2
    torch.testing.assert_close(batched_skinny_gemm(x, w, torch.float32).double(), want, atol=1e-3, rtol=1e-5)


def test_forms_resolve():
    """"skinny" where the kernel can run, up to 64 tokens; "auto" never picks it (opt-in: not measurably faster in
    GLM-4.7-Flash's compiled batch-32 step, linear.py)."""
    from longcat_ref.model.linear import resolve

    assert resolve("skinny", torch.randn(64, 8, device=DEV), 1) == "skinny"
    assert resolve("skinny", torch.randn(65, 8, device=DEV), 1) == "plain"
    seen = {}

    def f(x):
        seen[x.shape[0]] = resolve("auto", x, 64)
        return x + 1

    for n in (4, 5, 32):
        torch.compile(f, fullgraph=True, dynamic=False, backend="eager")(torch.randn(n, 8, device=DEV))
    assert seen == {4: "gemv", 5: "plain", 32: "plain"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 8, 32])
def test_router_logits_in_the_kernel(n, dtype):
    """The router's fp32 logits with linear="skinny" == x.float() @ W.float()^T (linear="plain")."""
    import longcat_ref as L

    r = L.init_weights(L.CausalLM(L.tiny_glm()), seed=2).model.layers[1].mlp.router.to(DEV, dtype)
    x = torch.randn(n, r.weight.shape[1], generator=torch.Generator().manual_seed(n)).to(DEV, dtype)
    from longcat_ref.model.linear import resolve

    assert resolve("skinny", x, r.weight.numel()) == "skinny"  # the kernel runs (the interpreter on a CPU)
    got = r.logits(x, "skinny")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, r.logits(x, "plain"), atol=1e-5, rtol=1e-5)


def test_per_head_products_in_the_kernel():
    """MLA's W_uk / W_uv products with linear="skinny" == the einsums."""
    from longcat_ref.model.mla import MLA

    g = torch.Generator().manual_seed(3)
    q, w_uk = torch.randn(2, 4, 3, 6, generator=g).to(DEV), torch.randn(4, 6, 10, generator=g).to(DEV)
    o, w_uv = torch.randn(2, 4, 3, 10, generator=g).to(DEV), torch.randn(4, 5, 10, generator=g).to(DEV)
    torch.testing.assert_close(MLA.fold_query(q, w_uk, "skinny"), MLA.fold_query(q, w_uk), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(MLA.unfold_output(o, w_uv, "skinny"), MLA.unfold_output(o, w_uv),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["longcat", "glm"])
def test_model_with_skinny_projections_equals_reference(kind):
    """The whole forward with linear="skinny" (a decode batch of 6 sequences, fp32: every projection, the per-head
    products and the router's logits in the kernel) == the reference forward."""
    import longcat_ref as L

    cfg = L.tiny_longcat() if kind == "longcat" else L.tiny_glm()
    m = L.init_weights(L.CausalLM(cfg), seed=1, std=0.08, bias_std=0.05).eval().to(DEV)
    ids = torch.randint(4, cfg.vocab_size, (6, 1), generator=torch.Generator().manual_seed(4)).to(DEV)
    with torch.no_grad():
        ref = m(ids)
        got = m(ids, forms=L.Forms("absorbed", "gather", linear="skinny"))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
