"""The RMSNorm kernel (longcat_ref/kernels/rmsnorm.py) against its plain-PyTorch reference and the model's norm.

The reference is checked against norm.py's RMSNorm (bit for bit), the kernel against the reference (in Triton's CPU
interpreter without a GPU, tests/conftest.py), and whole models with Forms(norm="fused") against norm="plain". GPU
tests (skipped without CUDA) run the real widths in bf16.
"""

import pytest
import torch

pytest.importorskip("triton")

import longcat_ref as L  # noqa: E402
from longcat_ref.kernels.rmsnorm import rmsnorm, rmsnorm_reference  # noqa: E402
from longcat_ref.model.norm import RMSNorm, fused_norm  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def ulps_apart(got, want):
    """Largest |got - want| in units of want's dtype's spacing at |want| (a bf16 ulp: 2^-7 relative)."""
    eps = torch.finfo(want.dtype).eps
    return ((got.float() - want.float()).abs() / (want.float().abs() * eps).clamp(min=1e-30)).max().item()


def norm_of(H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = RMSNorm(H, eps=1e-6)
    with torch.no_grad():
        n.weight.copy_(1 + 0.5 * torch.randn(H, generator=g))
    return n.to(DEV, dtype), g


def test_reference_is_the_model_norm():
    n, g = norm_of(40, torch.float32)
    x = (torch.randn(3, 5, 40, generator=g) * 3).to(DEV)
    with torch.no_grad():
        assert torch.equal(rmsnorm_reference(x, n.weight, n.eps), n(x))


@pytest.mark.parametrize("H", [40, 64, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_equals_reference(H, dtype):
    """Widths below, at and past a power of two (a masked tail); 3-d input; a non-contiguous view."""
    n, g = norm_of(H, dtype, seed=H)
    x = (torch.randn(2, 7, H, generator=g) * 3).to(DEV, dtype)
    with torch.no_grad():
        want = n(x)
        got = rmsnorm(x, n.weight, n.eps)
        assert got.shape == x.shape and got.dtype == want.dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        else:  # y rounded to bf16, then w * y rounded. Triton's CPU interpreter (3.9) rounds fp32 -> bf16 toward
            # zero, so here each rounding may be an ulp off; on a GPU it rounds to nearest (test_gpu_real_widths)
            assert ulps_apart(got, want) <= 2.0
        xt = x.transpose(0, 1)  # (7, 2, H): not contiguous
        assert ulps_apart(rmsnorm(xt, n.weight, n.eps), n(xt)) <= (2.0 if dtype != torch.float32 else 16.0)
        assert n(x, "fused").shape == x.shape  # the module's form


def test_errors_and_the_auto_rule():
    n, _ = norm_of(16, torch.float32)
    with pytest.raises(ValueError, match="do not agree"):
        rmsnorm(torch.zeros(2, 8, device=DEV), n.weight, 1e-6)
    with pytest.raises(ValueError, match="norm form 'fast' is not one of"):
        n(torch.zeros(2, 16, device=DEV), "fast")
    with pytest.raises(ValueError, match="norm form 'fast' is not one of"):
        L.Forms(norm="fast")
    assert not fused_norm("auto", torch.zeros(1)) and not fused_norm("plain", torch.zeros(1))  # the CPU: plain


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU error")
def test_cpu_without_the_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
        rmsnorm(torch.zeros(2, 16), torch.ones(16), 1e-6)


@pytest.mark.parametrize("family", ["longcat", "glm"])
def test_model_with_fused_norms_equals_plain(family):
    """Every RMSNorm of the layers (both of LongCat's per layer, MLA's q_a and latent norms) and the final one."""
    cfg = L.tiny_longcat() if family == "longcat" else L.tiny_glm()
    m = L.init_weights(L.CausalLM(cfg), seed=0).eval().to(DEV)
    ids = torch.randint(4, cfg.vocab_size, (2, 9), device=DEV)
    with torch.no_grad():
        want = m(ids)
        torch.testing.assert_close(m(ids, forms=L.Forms(norm="fused")), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m(ids, forms=L.PREFILL), m(ids, forms=L.Forms("sdpa", "auto")), rtol=1e-5,
                                   atol=1e-5)


@cuda
@pytest.mark.parametrize("H", [512, 1536, 2048, 6144])
def test_gpu_real_widths_bf16(H):
    """The real models' widths (MLA's latent, LongCat's q_a, GLM's and LongCat's hidden) at 2,048 rows, bf16."""
    n, g = norm_of(H, torch.bfloat16, seed=H)
    x = (torch.randn(2048, H, generator=g) * 3).to(DEV, torch.bfloat16)
    with torch.no_grad():
        want, got = n(x), n(x, "fused")
        assert ulps_apart(got, want) <= 2.0
        assert (got != want).float().mean().item() < 0.01  # off by an ulp rarely
