"""The router kernel (kernels/router.py) against its plain-PyTorch reference and against the model's Router.

On a CPU-only machine it runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); on a GPU natively.
"""

import pytest
import torch

import longcat_ref as L
from longcat_ref.kernels.router import route, route_reference
from longcat_ref.kernels.support import can_run
from longcat_ref.model.moe import MoE

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not can_run(torch.empty(0, device=DEV)),
                                reason="needs CUDA, or Triton's interpreter on the CPU")


def independent(logits, bias, k, softmax, norm, scaling):
    """The selection written out token by token: scores, then k times the best remaining (p + b)."""
    W, I = [], []
    for row in logits.double():
        p = torch.softmax(row, 0) if softmax else torch.sigmoid(row)
        choice, ids = (p + bias.double()).tolist(), []
        for _ in range(k):
            best = max(range(len(choice)), key=lambda e: (choice[e], -e))  # ties: the lower id
            ids.append(best)
            choice[best] = float("-inf")
        w = p[ids]
        W.append((w / w.sum() if norm else w) * scaling)
        I.append(ids)
    return torch.stack(W).float(), torch.tensor(I)


CASES = [  # n, E, k, softmax, norm, scaling: LongCat (768 = 512 + 256 zero experts, top-12), GLM (64, top-4), odd
    (3, 768, 12, True, False, 6.0), (2, 64, 4, False, True, 1.8), (4, 24, 2, False, True, 1.0),
    (5, 40, 3, True, False, 2.0), (1, 16, 16, False, True, 1.0)]


@pytest.mark.parametrize("n,E,k,softmax,norm,scaling", CASES)
def test_kernel_equals_reference_and_the_formula(n, E, k, softmax, norm, scaling):
    g = torch.Generator().manual_seed(E + k)
    logits, bias = torch.randn(n, E, generator=g), 0.1 * torch.randn(E, generator=g)
    w, idx = route(logits.to(DEV), bias.to(DEV), k, softmax, norm, scaling)
    wr, ir = route_reference(logits, bias, k, softmax, norm, scaling)
    wi, ii = independent(logits, bias, k, softmax, norm, scaling)
    assert idx.dtype == torch.int64 and w.dtype == torch.float32 and w.shape == (n, k)
    assert torch.equal(idx.cpu(), ir) and torch.equal(ir, ii)  # best first, in both
    torch.testing.assert_close(w.cpu(), wr, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(wr, wi, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["longcat", "glm"])
def test_router_fused_picks_the_same_experts_and_weights(kind):
    """Router(x, "fused") == Router(x): the same (expert, weight) pairs per token (the plain one lists them in
    no particular order); the MoE block with the routing and the experts in kernels == loop."""
    cfg = L.tiny_longcat() if kind == "longcat" else L.tiny_glm()
    moe = L.init_weights(MoE(cfg), seed=2, std=0.2, bias_std=0.05).to(DEV)
    x = torch.randn(7, cfg.hidden_size, generator=torch.Generator().manual_seed(3)).to(DEV)
    with torch.no_grad():
        w, idx = moe.router(x, "fused")
        wp, ip = moe.router(x)
        order = ip.argsort(-1)
        assert torch.equal(idx.sort(-1).values, ip.gather(1, order))
        torch.testing.assert_close(w.gather(1, idx.argsort(-1)), wp.gather(1, order), atol=1e-6, rtol=1e-6)
        out = moe(x[None], experts="fused", router="fused")
        ref = moe(x[None], experts="loop")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_bias_is_read_in_its_own_dtype(dtype):
    """A model cast to bf16 whole holds the bias in bf16: the kernel reads it as it is (no copy kernel) and adds
    it in fp32, the same selection as the reference given the same rounded bias."""
    g = torch.Generator().manual_seed(11)
    logits, bias = torch.randn(3, 64, generator=g), (0.1 * torch.randn(64, generator=g)).to(dtype)
    w, idx = route(logits.to(DEV), bias.to(DEV), 4, False, True, 1.8)
    wr, ir = route_reference(logits, bias, 4, False, True, 1.8)
    wi, ii = independent(logits, bias.float(), 4, False, True, 1.8)
    assert torch.equal(idx.cpu(), ir) and torch.equal(ir, ii)
    torch.testing.assert_close(w.cpu(), wr, atol=1e-6, rtol=1e-6)


def test_custom_op_traces():
    logits, bias = torch.randn(2, 64), torch.zeros(64)
    f = torch.compile(lambda l, b: route(l, b, 4, False, True, 1.8), fullgraph=True,
                      backend="aot_eager" if not CUDA else "inductor")
    w, idx = f(logits.to(DEV), bias.to(DEV))
    wr, ir = route_reference(logits, bias, 4, False, True, 1.8)
    assert torch.equal(idx.cpu(), ir)
    torch.testing.assert_close(w.cpu(), wr, atol=1e-6, rtol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="0 < k <= E"):
        route(torch.randn(2, 8, device=DEV), torch.zeros(8, device=DEV), 9, True, False, 1.0)


@pytest.mark.parametrize("kind", ["longcat", "glm"])
def test_whole_model_with_the_router_kernel_equals_the_reference(kind):
    """Forms(router="fused") through CausalLM.forward: the logits of the reference forms (fp32)."""
    cfg = L.tiny_longcat() if kind == "longcat" else L.tiny_glm()
    model = L.init_weights(L.CausalLM(cfg), seed=4, std=0.2, bias_std=0.05).to(DEV).eval()
    ids = torch.randint(4, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(5)).to(DEV)
    with torch.no_grad():
        ref = model(ids)
        got = model(ids, forms=L.Forms(attention="absorbed", experts="gather", router="fused"))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_router_auto_is_plain_off_cuda_and_a_bad_form_is_refused():
    cfg = L.tiny_glm()
    moe = L.init_weights(MoE(cfg), seed=2, std=0.2).to(DEV)
    x = torch.randn(3, cfg.hidden_size).to(DEV)
    with torch.no_grad():
        w, idx = moe.router(x, "auto")
        wp, ip = moe.router(x, "fused" if CUDA else "plain")
    assert torch.equal(idx, ip) and torch.equal(w, wp)  # auto == the kernel on CUDA, == plain elsewhere
    wide = L.tiny_longcat(n_routed_experts=256, zero_expert_num=8)  # 264 > FUSED_MAX_EXPERTS: torch.topk
    moe = L.init_weights(MoE(wide), seed=2, std=0.2).to(DEV)
    x = torch.randn(3, wide.hidden_size).to(DEV)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(moe.router(x, "auto"), moe.router(x, "plain")))
    with pytest.raises(ValueError, match="router form 'topk' is not one of"):
        L.Forms(router="topk")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_logits_auto_is_the_fp32_product(dtype):
    """linear="auto" logits == x.float() @ W.float(): bit for bit off CUDA or in fp32 (the same fp32 GEMM); on CUDA
    with a 16-bit model the 16-bit product with fp32 output (router.py), equal up to the order of the fp32 sum."""
    from longcat_ref.model import router as R

    cfg = L.tiny_longcat()
    moe = L.init_weights(MoE(cfg), seed=3, std=0.2).to(DEV).to(dtype)
    for n in (3, 40, 300):  # gemv sizes (eager: plain), a decode batch, a prefill
        x = torch.randn(n, cfg.hidden_size, generator=torch.Generator().manual_seed(n)).to(dtype).to(DEV)
        with torch.no_grad():
            got, want = moe.router.logits(x, "auto"), moe.router.logits(x, "plain")
        assert got.dtype == torch.float32 and got.shape == (n, cfg.num_router_experts)
        exact = not (CUDA and dtype == torch.bfloat16 and R.HAVE_MM_OUT_DTYPE)
        if exact:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert not torch.equal(got.to(dtype).float(), got)  # fp32 output, not rounded to the model dtype
