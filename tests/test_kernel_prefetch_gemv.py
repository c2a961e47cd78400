"""The whole-row GEMV kernel (kernels/prefetch_gemv.py) against its definition, and the "prefetch" linear form.

Without a GPU the kernel runs in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the shapes
here are small; on a GPU they run natively, plus GLM-4.7-Flash's real projection shapes in bf16 and a graph replay.
"""

import pytest
import torch

import longcat_ref as L
from longcat_ref.kernels import prefetch_gemv as P
from longcat_ref.kernels.support import can_run
from longcat_ref.model import mla as M
from longcat_ref.model.linear import linear, resolve
from longcat_ref.model.norm import RMSNorm
from steps import decode_logits

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not can_run(torch.empty(0, device=DEV)),
                                reason="needs CUDA, or Triton's interpreter on the CPU")


def written_out(x, w, b=None, nw=None, eps=0.0):
    """The definition one value at a time in float64 (the norm in fp64 too: fp32 inputs make it exact enough)."""
    x = x.double()
    if nw is not None:
        x = nw.double() * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    y = torch.empty(*x.shape[:-1], w.shape[0], dtype=torch.float64)
    for m in range(x.shape[0]):
        for n in range(w.shape[0]):
            y[m, n] = (x[m] * w[n].double()).sum() + (0.0 if b is None else float(b[n]))
    return y


@pytest.mark.parametrize("M_,N,K", [(1, 40, 300), (3, 9, 2048), (4, 70, 24), (2, 1, 5)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("norm", [False, True])
def test_kernel_equals_the_definition_fp32(M_, N, K, bias, norm):
    """Ragged row tiles, K not a power of two, 1-4 tokens; with and without the bias and the RMSNorm prologue."""
    g = torch.Generator().manual_seed(M_ * 1000 + N + K)
    x, w = torch.randn(M_, K, generator=g), torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    nw = torch.rand(K, generator=g) + 0.5 if norm else None
    to = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    got = P.prefetch_gemv(x.to(DEV), w.to(DEV), to(b), to(nw), 1e-6).cpu()
    want = written_out(x, w, b, nw, 1e-6)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(P.prefetch_gemv_reference(x, w, b, nw, 1e-6).double(), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("M_,N1,N2,K", [(1, 40, 9, 300), (3, 7, 70, 24), (2, 1, 1, 5), (4, 768, 576, 64)])
@pytest.mark.parametrize("norm", [False, True])
def test_two_weights_in_one_launch_equal_the_definition(M_, N1, N2, K, norm):
    """weight2: x' W^T and x' W2^T side by side (q_a and kv_a), the bias over both, the norm once for both; the
    rows of each weight in their own programs (ragged tiles at the seam)."""
    g = torch.Generator().manual_seed(M_ + N1 * 7 + N2 * 11 + K)
    x, w, w2 = torch.randn(M_, K, generator=g), torch.randn(N1, K, generator=g), torch.randn(N2, K, generator=g)
    b = torch.randn(N1 + N2, generator=g)
    nw = torch.rand(K, generator=g) + 0.5 if norm else None
    to = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    got = P.prefetch_gemv(x.to(DEV), w.to(DEV), b.to(DEV), to(nw), 1e-6, weight2=w2.to(DEV)).cpu()
    want = written_out(x, torch.cat([w, w2]), b, nw, 1e-6)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(P.prefetch_gemv_reference(x, w, b, nw, 1e-6, weight2=w2).double(), want,
                               atol=1e-4, rtol=1e-5)


def test_kernel_in_bf16_is_the_reference_to_one_rounding():
    """bf16: the norm rounds as norm.py (cast, then the weight's product rounded once); the sum in fp32."""
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(2, 96, generator=g).bfloat16(), (torch.randn(33, 96, generator=g) / 8).bfloat16()
    nw = (torch.rand(96, generator=g) + 0.5).bfloat16()
    got = P.prefetch_gemv(x.to(DEV), w.to(DEV), None, nw.to(DEV), 1e-6).cpu().float()
    want = P.prefetch_gemv_reference(x, w, None, nw, 1e-6).float()
    torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)
    normed = RMSNorm(96, eps=1e-6)
    normed.weight.data = nw
    torch.testing.assert_close(P.prefetch_gemv_reference(x, w, None, nw, 1e-6),  # the reference is norm.py's
                               (normed(x).float() @ w.float().T).bfloat16())


def test_the_norm_and_the_bias_are_really_applied():
    """The check can fail: the kernel with the norm differs from the kernel without it, and so for the bias."""
    g = torch.Generator().manual_seed(8)
    x, w, b = (3 * torch.randn(1, 64, generator=g)).to(DEV), torch.randn(16, 64, generator=g).to(DEV), \
        torch.randn(16, generator=g).to(DEV)
    nw = torch.full((64,), 1.0, device=DEV)
    plain, normed, biased = P.prefetch_gemv(x, w), P.prefetch_gemv(x, w, None, nw, 1e-6), P.prefetch_gemv(x, w, b)
    assert not torch.allclose(plain, normed, atol=1e-2) and not torch.allclose(plain, biased, atol=1e-2)
    torch.testing.assert_close(biased - plain, b.expand_as(plain), atol=1e-4, rtol=1e-5)


def test_tiles_are_whole_rows_of_one_tile_size():
    for N, K in ((5120, 768), (768, 2048), (576, 2048), (2048, 5120), (3, 5), (1, 8192)):
        bn, bk = P.tiles(N, K)
        assert bk >= K and bk & (bk - 1) == 0 and bn & (bn - 1) == 0 and bn * bk <= max(P.TILE, bk)
    assert P.tiles(5120, 768) == (8, 1024) and P.tiles(2048, 5120) == (1, 8192) and P.tiles(768, 2048) == (4, 2048)


def test_bad_inputs_are_one_line_errors():
    x = torch.randn(1, 8, device=DEV)
    with pytest.raises(ValueError, match=r"weight must be \(N, 8\)"):
        P.prefetch_gemv(x, torch.randn(4, 7, device=DEV))
    with pytest.raises(ValueError, match="weight must be"):
        P.prefetch_gemv(x, torch.randn(4, 8, device=DEV, dtype=torch.float64))
    with pytest.raises(ValueError, match="at most 4 tokens"):
        P.prefetch_gemv(torch.randn(5, 8, device=DEV), torch.randn(4, 8, device=DEV))
    with pytest.raises(ValueError, match="K <= 8192"):
        P.prefetch_gemv(torch.randn(1, 8200, device=DEV), torch.randn(2, 8200, device=DEV))
    with pytest.raises(ValueError, match="norm_weight must be"):
        P.prefetch_gemv(x, torch.randn(4, 8, device=DEV), None, torch.ones(7, device=DEV))
    with pytest.raises(ValueError, match=r"weight2 must be \(N, 8\)"):
        P.prefetch_gemv(x, torch.randn(4, 8, device=DEV), weight2=torch.randn(3, 9, device=DEV))
    with pytest.raises(ValueError, match=r"bias must be \(7,\)"):  # with two weights the bias covers both
        P.prefetch_gemv(x, torch.randn(4, 8, device=DEV), torch.ones(4, device=DEV),
                        weight2=torch.randn(3, 8, device=DEV))


def test_fits_and_the_forms_fall_back_to_auto():
    """"prefetch" takes the kernel where it fits and is "auto" elsewhere (too many tokens, rows too long, another
    dtype), and for the per-head products and the router (resolve)."""
    w = torch.randn(4, 8, device=DEV)
    assert P.fits(torch.randn(2, 8, device=DEV), w)
    assert not P.fits(torch.randn(5, 8, device=DEV), w) and not P.fits(torch.randn(1, 8, device=DEV), w.double())
    assert not P.fits(torch.randn(1, 9000, device=DEV), torch.randn(2, 9000, device=DEV))
    for tokens in (1, 40):
        x = torch.randn(tokens, 8, device=DEV)
        assert resolve("prefetch", x, w.numel()) == resolve("auto", x, w.numel())
    m = L.init_weights(torch.nn.Linear(24, 40, bias=True), seed=1, std=0.2).to(DEV)
    for tokens in (3, 9):  # the kernel, then the plain product past MAX_TOKENS
        x = torch.randn(tokens, 24, device=DEV)
        torch.testing.assert_close(linear(m, x, "prefetch"), m(x), atol=1e-5, rtol=1e-5)


def test_auto_takes_the_kernel_only_where_measured(monkeypatch):
    """"auto" takes the kernel where it would be the gemv form (torch.compile tracing, few tokens, a weight under
    the cap) on a GPU with PDL, and nowhere else; "prefetch" wherever the kernel fits."""
    import longcat_ref.model.linear as LIN

    w, x = torch.randn(4, 8, device=DEV), torch.randn(1, 8, device=DEV)
    assert LIN.takes_prefetch("prefetch", x, w) and not LIN.takes_prefetch("plain", x, w)
    assert not LIN.takes_prefetch("auto", x, w)  # not tracing (and no PDL in the interpreter)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert LIN.takes_prefetch("auto", x, w) == LIN.support.pdl(x)  # tracing: exactly where PDL is
    monkeypatch.setattr(LIN.support, "pdl", lambda x: True)  # as on an H100
    assert LIN.takes_prefetch("auto", x, w)
    assert not LIN.takes_prefetch("auto", torch.randn(5, 8, device=DEV), w)  # past GEMV_MAX_TOKENS
    monkeypatch.setattr(LIN, "GEMV_MAX_WEIGHT", 31)  # a weight over the cap: cuBLAS, as for gemv
    assert not LIN.takes_prefetch("auto", x, w) and LIN.takes_prefetch("prefetch", x, w)
    assert not LIN.takes_prefetch("triton", x, w)


def test_compiled_with_the_op_inside_equals_eager():
    m = L.init_weights(torch.nn.Linear(40, 24, bias=True), seed=6, std=0.2).to(DEV)
    x = torch.randn(1, 40, generator=torch.Generator().manual_seed(6)).to(DEV)
    f = torch.compile(lambda x: torch.relu(linear(m, x, "prefetch")), fullgraph=True, dynamic=False)
    with torch.no_grad():  # inference only: the op has no backward
        torch.testing.assert_close(f(x), torch.relu(m(x)), atol=1e-5, rtol=1e-5)


def test_opcheck():
    g = torch.Generator().manual_seed(5)
    x, w, nw = (torch.randn(2, 40, generator=g).to(DEV), torch.randn(12, 40, generator=g).to(DEV),
                torch.rand(40, generator=g).to(DEV))
    torch.library.opcheck(P._prefetch_gemv_op, (x, w, None, nw, 1e-6))
    torch.library.opcheck(P._prefetch_gemv_op, (x, w, None, None, 0.0, torch.randn(5, 40, generator=g).to(DEV)))


@pytest.mark.parametrize("kind", ["longcat", "glm"])
def test_model_with_prefetch_projections_equals_reference(kind, monkeypatch):
    """The whole forward with linear="prefetch" (decode-sized chunks, fp32) == the reference forward; MLA's q_b
    took q_a's norm into its kernel and q_a with kv_a ran as one launch in every attention sublayer (counted), and
    every projection that fits ran the kernel."""
    cfg = L.tiny_longcat() if kind == "longcat" else L.tiny_glm()
    m = L.init_weights(L.CausalLM(cfg), seed=1, std=0.08, bias_std=0.05).eval().to(DEV)
    calls = {"with_norm": 0, "two": 0, "plain": 0}
    kernel = P.prefetch_gemv

    def count(x, w, b=None, nw=None, eps=0.0, weight2=None):
        calls["with_norm" if nw is not None else "two" if weight2 is not None else "plain"] += 1
        return kernel(x, w, b, nw, eps, weight2=weight2)

    monkeypatch.setattr(M, "prefetch_gemv", count)
    monkeypatch.setattr(P, "prefetch_gemv", count)
    ids = torch.randint(4, cfg.vocab_size, (2, 2), generator=torch.Generator().manual_seed(4)).to(DEV)
    with torch.no_grad():
        ref = m(ids)
        got = m(ids, forms=L.Forms("absorbed", "gather", linear="prefetch"))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    n = cfg.num_attn_sublayers
    assert calls["with_norm"] == n and calls["two"] == n and calls["plain"] > 0, calls


def test_compiled_decode_step_with_prefetch_projections_equals_eager_plain():
    """generate's fixed-shape decode step, torch.compiled with linear="prefetch" (the rope and MoE forms of the
    compiled step too), gives the eager plain step's logits (tiny GLM, fp32)."""
    from longcat_ref.model.generate import decode_step

    torch.manual_seed(0)
    cfg = L.tiny_glm()
    model = L.CausalLM(cfg).eval().to(DEV)
    ids = torch.randint(0, cfg.vocab_size, (1, 5), device=DEV)
    torch._dynamo.reset()
    plain = decode_logits(decode_step, model, L.Forms(attention="absorbed"), ids)
    got = decode_logits(torch.compile(decode_step, fullgraph=True, dynamic=False), model,
                        L.Forms(attention="absorbed", experts="gemv", linear="prefetch", rope="fused_uk"), ids)
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ GPU only
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("N,K,norm", [(5120, 768, True), (768, 2048, False), (576, 2048, False),
                                      (2048, 5120, False)])
def test_glm_shapes_in_bf16_on_cuda(N, K, norm):
    """GLM-4.7-Flash's q_b (with q_a's norm), q_a, kv_a and o_proj, bf16, batch 1, against the fp32 definition."""
    g = torch.Generator(device="cuda").manual_seed(N + K)
    x = torch.randn(1, K, device="cuda", generator=g).bfloat16()
    w = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).bfloat16()
    nw = (torch.rand(K, device="cuda", generator=g) + 0.5).bfloat16() if norm else None
    want = P.prefetch_gemv_reference(x, w, None, nw, 1e-6).float()
    got = P.prefetch_gemv(x, w, None, nw, 1e-6).float()
    assert float((got - want).norm() / want.norm()) < 1e-2


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_glm_q_a_and_kv_a_in_one_launch_on_cuda():
    """GLM-4.7-Flash's q_a (768 x 2048) and kv_a (576 x 2048) as one launch, bf16: each half equals its weight's
    own kernel bit for bit (the same rows, the same sums), and the fp32 definition to bf16 rounding."""
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(1, 2048, device="cuda", generator=g).bfloat16()
    w, w2 = ((torch.randn(n, 2048, device="cuda", generator=g) / 45).bfloat16() for n in (768, 576))
    both = P.prefetch_gemv(x, w, weight2=w2)
    assert torch.equal(both[:, :768], P.prefetch_gemv(x, w)) and torch.equal(both[:, 768:], P.prefetch_gemv(x, w2))
    want = P.prefetch_gemv_reference(x, w, weight2=w2).float()
    assert float((both.float() - want).norm() / want.norm()) < 1e-2


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graph_replays_after_a_producer():
    """Captured after a kernel that writes x (PDL: the weight is loaded before the wait, x after it): replays with
    new inputs give the reference's result, bit for bit from one replay to the next."""
    g = torch.Generator(device="cuda").manual_seed(3)
    src, w = torch.randn(1, 768, device="cuda", generator=g).bfloat16(), \
        (torch.randn(5120, 768, device="cuda", generator=g) / 28).bfloat16()
    nw = torch.ones(768, device="cuda", dtype=torch.bfloat16)
    x = torch.empty_like(src)
    P.prefetch_gemv(x.copy_(src * 2), w, None, nw, 1e-6)  # warm (compiles)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = P.prefetch_gemv(torch.mul(src, 2, out=x), w, None, nw, 1e-6)
    outs = []
    for scale in (1.0, -3.0, 1.0):
        src.mul_(scale)  # a new input (the last replay repeats the one before)
        graph.replay()
        torch.testing.assert_close(y.float(), P.prefetch_gemv_reference(src * 2, w, None, nw, 1e-6).float(),
                                   atol=2e-2, rtol=1e-2)
        outs.append(y.clone())
    assert not torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
