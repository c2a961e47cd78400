"""The router kernel (kernels/router.py) against its plain-PyTorch reference and against the model's Router.

On a CPU-only machine it runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); on a GPU natively.
"""

import pytest
import torch

import longcat_ref as L
from longcat_ref.kernels import router as R
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


# ------------------------------------------------------------------------------ the logits in the kernel too
LOGIT_CASES = [  # M tokens, E experts, H, k, softmax, norm, scaling: GLM (64 of 2048, top-4), odd sizes, LongCat-like
    (1, 64, 2048, 4, False, True, 1.8), (3, 40, 100, 3, True, False, 2.0), (4, 24, 33, 2, False, True, 1.0),
    (2, 768, 96, 12, True, False, 6.0), (1, 16, 16, 16, False, True, 1.0)]


@pytest.mark.parametrize("M,E,H,k,softmax,norm,scaling", LOGIT_CASES)
def test_route_logits_equals_the_selection_of_the_exact_logits(M, E, H, k, softmax, norm, scaling):
    """route_logits(x, W) == the selection (written out token by token) of the fp64 logits x W^T: the same experts
    best first, the weights to fp32 rounding; and the ticket counter is back at 0 after each call."""
    g = torch.Generator().manual_seed(E + H)
    x, W = torch.randn(M, H, generator=g), torch.randn(E, H, generator=g) / H ** 0.5
    bias = 0.1 * torch.randn(E, generator=g)
    for _ in range(2):  # a second call: the counter was reset by the first
        w, idx = R.route_logits(x.to(DEV), W.to(DEV), bias.to(DEV), k, softmax, norm, scaling)
        wi, ii = independent(x.double() @ W.double().T, bias, k, softmax, norm, scaling)
        assert idx.dtype == torch.int64 and w.dtype == torch.float32 and w.shape == (M, k)
        assert torch.equal(idx.cpu(), ii)
        torch.testing.assert_close(w.cpu(), wi, atol=1e-5, rtol=1e-5)
        assert int(R._ticket(idx.device)) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_route_logits_in_16_bit_are_the_fp32_products(dtype):
    """16-bit x and W (GLM's bf16 model): the logits are fp32 sums of the exact products, so the selection is the
    one of x.float() @ W.float().T."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 2048, generator=g).to(dtype)
    W = (torch.randn(64, 2048, generator=g) / 45).to(dtype)
    bias = (0.05 * torch.randn(64, generator=g)).to(dtype)
    w, idx = R.route_logits(x.to(DEV), W.to(DEV), bias.to(DEV), 4, False, True, 1.8)
    wi, ii = independent(x.double() @ W.double().T, bias.float(), 4, False, True, 1.8)
    assert torch.equal(idx.cpu(), ii)
    torch.testing.assert_close(w.cpu(), wi, atol=1e-5, rtol=1e-5)


def test_route_logits_refuses_what_it_cannot_take():
    x, W, b = torch.randn(5, 32, device=DEV), torch.randn(8, 32, device=DEV), torch.zeros(8, device=DEV)
    with pytest.raises(ValueError, match="at most 4 tokens"):
        R.route_logits(x, W, b, 2, True, False, 1.0)
    with pytest.raises(ValueError, match="weight in x's dtype"):
        R.route_logits(x[:2], W.double(), b, 2, True, False, 1.0)
    with pytest.raises(ValueError, match="0 < k <= E"):
        R.route_logits(x[:2], W, b, 9, True, False, 1.0)
    with pytest.raises(ValueError, match=r"weight \(E, H\)"):
        R.route_logits(x[:2], W[:, :16], b, 2, True, False, 1.0)


def test_route_logits_op_traces_and_passes_opcheck():
    g = torch.Generator().manual_seed(2)
    x, W, b = (torch.randn(1, 64, generator=g).to(DEV), torch.randn(16, 64, generator=g).to(DEV),
               torch.zeros(16).to(DEV))
    f = torch.compile(lambda x, W, b: R.route_logits(x, W, b, 4, False, True, 1.8), fullgraph=True,
                      backend="aot_eager" if not CUDA else "inductor")
    w, idx = f(x, W, b)
    wr, ir = R.route_reference((x.double() @ W.double().T).float(), b, 4, False, True, 1.8)
    assert torch.equal(idx, ir.to(DEV))
    torch.testing.assert_close(w, wr.to(DEV), atol=1e-5, rtol=1e-5)
    torch.library.opcheck(R._route_logits_op, (x, W, b, 4, False, True, 1.8))


@pytest.mark.parametrize("form,n,taken", [("fused_logits", 3, True), ("fused_logits", 5, False),
                                          ("fused", 3, False)])
def test_router_fused_logits_takes_the_logits_kernel_where_it_fits(form, n, taken, monkeypatch):
    """Router(x, "fused_logits"): the logits in the router's kernel for up to 4 tokens, else `route` after the
    logits' own product (as "fused", which never takes it); the same experts and weights as the plain router."""
    from longcat_ref.model import router as MR

    calls = []
    real = MR.route_logits
    monkeypatch.setattr(MR, "route_logits", lambda *a: calls.append(1) or real(*a))
    cfg = L.tiny_glm()
    moe = L.init_weights(MoE(cfg), seed=2, std=0.2, bias_std=0.05).to(DEV)
    x = torch.randn(n, cfg.hidden_size, generator=torch.Generator().manual_seed(3)).to(DEV)
    with torch.no_grad():
        w, idx = moe.router(x, form)
        wp, ip = moe.router(x)
    assert bool(calls) == taken
    order = ip.argsort(-1)
    assert torch.equal(idx.sort(-1).values, ip.gather(1, order))
    torch.testing.assert_close(w.gather(1, idx.argsort(-1)), wp.gather(1, order), atol=1e-6, rtol=1e-6)


def test_compiled_decode_step_with_the_logits_kernel_equals_eager_plain(monkeypatch):
    """generate's fixed-shape decode step, torch.compiled with the router's logits in its kernel (router
    "fused_logits"; tiny GLM, fp32) == the eager plain step's logits, and every MoE layer took the kernel."""
    from longcat_ref.model import router as MR
    from longcat_ref.model.generate import decode_step
    from test_kernel_prefetch_gemv import decode_logits

    calls = []
    real = MR.route_logits
    monkeypatch.setattr(MR, "route_logits", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    cfg = L.tiny_glm()
    model = L.init_weights(L.CausalLM(cfg), seed=3, std=0.2, bias_std=0.05).eval().to(DEV)
    ids = torch.randint(0, cfg.vocab_size, (1, 5), device=DEV)
    torch._dynamo.reset()
    plain = decode_logits(decode_step, model, L.Forms(attention="absorbed"), ids)
    got = decode_logits(torch.compile(decode_step, fullgraph=True, dynamic=False), model,
                        L.Forms(attention="absorbed", experts="gemv", router="fused_logits", linear="prefetch",
                                rope="fused_uk"), ids)
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)
    assert len(calls) >= sum(cfg.layer_is_moe), calls  # traced once per MoE layer (at least)


def test_route_logits_ptx_loads_the_weight_before_the_wait_and_picks_after_the_ticket():
    """The kernel compiled for sm_90 with PDL (tests/ptx.py, no GPU needed): the weight's loads come before the
    dependent-launch wait and nothing else does (no atomic, no store); after it, the acquire-release ticket, then
    the logits read back from L2 (.cg) and the counter's reset."""
    from ptx import before_wait, kernel_ptx

    ptx = kernel_ptx("route_logits")
    pre = "\n".join(before_wait(ptx))
    assert "ld.global" in pre and "atom." not in pre and "st.global" not in pre
    post = ptx[ptx.index("griddepcontrol.wait"):]
    ticket = post.index("atom.global.gpu.acq_rel.add")
    assert post.index("ld.global.cg") > ticket and post.rindex("atom.global.gpu.relaxed.exch") > ticket


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_route_logits_in_a_cuda_graph_replays_the_eager_result():
    """GLM's router (64 x 2048, bf16, one token) in a CUDA graph after a producer kernel, replayed 3 times with new
    inputs: each replay picks what the eager call picks for those inputs, bit for bit, and the counter ends at 0."""
    g = torch.Generator(device="cuda").manual_seed(5)
    W = (torch.randn(64, 2048, device="cuda", generator=g) / 45).bfloat16()
    bias = (0.05 * torch.randn(64, device="cuda", generator=g)).float()
    src = torch.randn(1, 2048, device="cuda", generator=g).bfloat16()
    x = torch.empty_like(src)
    R.route_logits(x.copy_(src), W, bias, 4, False, True, 2.5)  # warm-up: compiles, makes the counter
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = R.route_logits(torch.mul(src, 1.0, out=x), W, bias, 4, False, True, 2.5)  # a producer, then it
    for i in range(3):
        src.copy_(torch.randn(1, 2048, device="cuda", generator=g).bfloat16())
        graph.replay()
        want = R.route_logits(src.clone(), W, bias, 4, False, True, 2.5)
        assert torch.equal(out[1], want[1]) and torch.equal(out[0], want[0]), i
    torch.cuda.synchronize()
    assert int(R._ticket(W.device)) == 0
