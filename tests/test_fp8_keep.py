"""FP8 weights kept in memory (`from_pretrained(dir, fp8="keep")`, model/quant.py) and the FP8 matmul kernel.

The kept model must compute what the dequantized model computes: on the CPU its products dequantize per call
(exactly equal), on a GPU the Triton kernels read FP8 in place (equal within bf16 rounding, tests at the bottom).
kernels/fp8_linear.py runs here in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA).
"""

import pytest
import torch

import longcat_ref as L
from longcat_ref.io.checkpoint import CheckpointError
from longcat_ref.kernels.support import can_run
from longcat_ref.model import quant
from longcat_ref.runtime.parallel import ParallelContext

from test_fp8 import ref_dequant, reference_model, tiny

CUDA = torch.cuda.is_available()
FORMS = [L.REFERENCE, L.PREFILL, L.DECODE, L.Forms(attention="absorbed", experts="gemv"),
         L.Forms(attention="naive", experts="grouped")]
FUSED = L.Forms(attention="fused", experts="fused", router="fused")  # the Triton kernels (CPU: the interpreter)
CPU_FORMS = FORMS + ([FUSED] if can_run(torch.empty(0)) else [])


@pytest.fixture(params=[("longcat", (16, 16), {}), ("glm", (16, 16), {}),
                        # widths that leave partial blocks: 40 = 32 + 8 rows/columns, experts' I = 24
                        ("glm", (32, 32), dict(hidden_size=40, ffn_hidden_size=56, expert_ffn_hidden_size=24))],
                ids=["longcat-16", "glm-16", "glm-32-partial"])
def ckpt(request, tmp_path):
    kind, block, kw = request.param
    m = tiny(kind, **kw)
    L.save_checkpoint(m, tmp_path, quantize="fp8", fp8_block=block)
    return tmp_path, m, block


def test_kept_model_holds_fp8(ckpt):
    path, m, block = ckpt
    kept = L.from_pretrained(path, dtype=torch.float32, fp8="keep")
    deq = L.from_pretrained(path, dtype=torch.float32)
    fp8 = {n for n, p in kept.named_parameters() if p.dtype == torch.float8_e4m3fn}
    assert fp8 and all(".kv_b_proj." not in n and "embed" not in n and "lm_head" not in n and "router" not in n
                       for n in fp8)
    assert any(n.endswith("experts.gate_up_proj") for n in fp8) and any(n.endswith("q_a_proj.weight") for n in fp8)
    assert kept.load_report.kept_fp8 > 0 and kept.load_report.dequantized > 0  # kv_b_proj is dequantized
    assert "kept in FP8" in kept.load_report.summary()
    # every kept weight dequantizes to exactly what the dequantizing loader gives
    sd = deq.state_dict()
    for name, p in kept.named_parameters():
        if p.dtype != torch.float8_e4m3fn:
            assert torch.equal(p, sd[name]), name
            continue
        owner = kept.get_submodule(name.rsplit(".", 1)[0])
        if name.endswith("gate_up_proj"):
            got = owner.gate_up(slice(None), torch.float32)
        elif name.endswith("down_proj") and p.dim() == 3:
            got = owner.down(slice(None), torch.float32)
        else:
            got = quant.dequantize(p, owner.weight_scale_inv, block)
        assert torch.equal(got, sd[name]), name
    weights = sum(p.numel() for p in kept.parameters() if p.dtype == torch.float8_e4m3fn)
    assert quant.fp8_bytes(kept) < 1.2 * weights  # one byte per weight, plus small scale grids


def test_kept_model_equals_dequantized_model_in_every_form(ckpt):
    path, m, block = ckpt
    kept = L.from_pretrained(path, dtype=torch.float32, fp8="keep")
    deq = L.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(4, 512, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = deq(ids)
        for forms in CPU_FORMS:
            torch.testing.assert_close(kept(ids, forms=forms), want, atol=2e-5, rtol=1e-5, msg=str(forms))
    prompt = ids[:1, :5]
    a = deq.generate(prompt, max_new_tokens=6)
    assert torch.equal(kept.generate(prompt, max_new_tokens=6), a)
    assert torch.equal(kept.generate(prompt, max_new_tokens=6, fast=True), a)


def test_quantize_in_memory_equals_the_writer(ckpt):
    """quant.quantize_ on the original model gives the same FP8 bytes and scales as writing + loading with keep."""
    path, m, block = ckpt
    kept = L.from_pretrained(path, dtype=torch.float32, fp8="keep")
    q = tiny("longcat" if m.config.is_longcat else "glm", **{k: getattr(m.config, k) for k in
                                                             ("hidden_size", "ffn_hidden_size",
                                                              "expert_ffn_hidden_size")})
    targets = quant.quantize_(q, block)
    assert targets
    ks, qs = kept.state_dict(), q.state_dict()
    for name, t in ks.items():
        if t.dtype == torch.float8_e4m3fn or name.endswith("_scale_inv"):
            assert qs[name].dtype == t.dtype and torch.equal(qs[name].view(torch.uint8) if t.dtype ==
                                                             torch.float8_e4m3fn else qs[name],
                                                             t.view(torch.uint8) if t.dtype ==
                                                             torch.float8_e4m3fn else t), name


def test_reference_dequant_agrees_with_package():
    """The package's formula against the block loop of test_fp8 (which can fail independently)."""
    w = torch.randn(40, 56)
    w8, s = quant.quantize_blockwise(w, (16, 16))
    assert torch.equal(quant.dequantize(w8, s, (16, 16)), ref_dequant(w8, s, (16, 16)))
    gu = torch.randn(3, 2 * 24, 40)  # gate (24 rows) over up (24 rows): two block grids, stacked
    q, sc = quant.quantize_blockwise(gu, (16, 16), split_rows=24)
    assert sc.shape == (3, 4, 3)
    for e in range(3):
        want = torch.cat([ref_dequant(q[e, :24], sc[e, :2], (16, 16)), ref_dequant(q[e, 24:], sc[e, 2:], (16, 16))])
        assert torch.equal(quant.dequantize(q[e], sc[e], (16, 16), split_rows=24), want)


@pytest.mark.parametrize("kind,kw", [("longcat", {}), ("glm", dict(expert_ffn_hidden_size=32))])
def test_parallel_shards_keep_whole_blocks(tmp_path, kind, kw):
    """Kept FP8 under tensor/expert parallelism: each rank's values and scales are the whole model's slices."""
    m = tiny(kind, **kw)
    L.save_checkpoint(m, tmp_path, quantize="fp8", fp8_block=(16, 16))
    whole = L.from_pretrained(tmp_path, dtype=torch.float32, fp8="keep").state_dict()
    for rank in range(2):
        ctx = ParallelContext(rank=rank, world_size=2)
        part = L.from_pretrained(tmp_path, dtype=torch.float32, parallel=ctx, fp8="keep")
        n_fp8 = 0
        for name, t in part.state_dict().items():
            base = name.removesuffix("_scale_inv")
            dim = ctx.plan.get(base if not name.endswith("_scale_inv") else base)
            if dim is None:
                assert torch.equal(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t,
                                   whole[name].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else whole[name]), name
                continue
            n = t.shape[dim]
            ref = whole[name].narrow(dim, rank * n, n)
            n_fp8 += t.dtype == torch.float8_e4m3fn
            assert torch.equal(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t,
                               ref.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else ref), name
        assert n_fp8 > 0


def test_parallel_shard_that_cuts_a_block_is_refused(tmp_path):
    m = tiny("glm")
    L.save_checkpoint(m, tmp_path, quantize="fp8", fp8_block=(40, 40))  # rank boundaries at 96, 64, ... cut blocks
    with pytest.raises(CheckpointError, match="cuts a 40-wide FP8 block.*fp8='dequantize'"):
        L.from_pretrained(tmp_path, dtype=torch.float32, parallel=ParallelContext(rank=1, world_size=2), fp8="keep")


def test_keep_needs_an_fp8_checkpoint(tmp_path):
    L.save_checkpoint(tiny("glm"), tmp_path)
    with pytest.raises(CheckpointError, match="fp8='keep' needs an FP8 checkpoint"):
        L.from_pretrained(tmp_path, fp8="keep")
    with pytest.raises(ValueError, match="fp8 must be 'dequantize' or 'keep'"):
        L.from_pretrained(tmp_path, fp8="yes")


def test_nan_in_kept_fp8_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    L.save_checkpoint(tiny("glm"), tmp_path, quantize="fp8", fp8_block=(16, 16))
    f = next(p for p in sorted(tmp_path.glob("*.safetensors")))
    t = load_file(f)
    key = next(k for k, v in t.items() if v.dtype == torch.float8_e4m3fn)
    t[key].view(torch.uint8)[0, 0] = 0x7F  # e4m3fn NaN
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="NaN"):
        L.from_pretrained(tmp_path, fp8="keep")


# ------------------------------------------------------------------------------------------ the matmul kernel
from longcat_ref.kernels.fp8_linear import fp8_linear_kernel, fp8_linear_reference  # noqa: E402

KERNELS = pytest.mark.skipif(not (CUDA or can_run(torch.empty(0))),
                             reason="the kernels need CUDA, or Triton's interpreter on the CPU")


@KERNELS
@pytest.mark.parametrize("M,N,K,block,dtype", [
    (1, 40, 48, (16, 16), torch.float32),  # partial row blocks (40 = 2 x 16 + 8)
    (3, 70, 96, (32, 32), torch.float32),
    (20, 33, 64, (16, 32), torch.bfloat16),
    (40, 50, 80, (16, 16), torch.float32),  # the prefill tiling (M > 32)
])
@pytest.mark.parametrize("split", [None, 1, 2])
def test_fp8_matmul_kernel_equals_dequantize_then_matmul(M, N, K, block, dtype, split):
    g = torch.Generator().manual_seed(M * N)
    w8, s = quant.quantize_blockwise(torch.randn(N, K, generator=g), block)
    x = torch.randn(M, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    dev = "cuda" if CUDA else "cpu"
    y = fp8_linear_kernel(x.to(dev), w8.to(dev), s.to(dev), block, bias.to(dev), split=split).cpu()
    ref = fp8_linear_reference(x, w8, s, block, bias)
    assert y.dtype == dtype and y.shape == (M, N)
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-5)
    else:  # bf16 output rounding (the kernel rounds its fp32 sum once; the reference rounds the dequantized W)
        ref32 = torch.nn.functional.linear(x.float(), quant.dequantize(w8, s, block), bias.float())
        assert (y.float() - ref32).norm() / ref32.norm() < 8e-3


@KERNELS
@pytest.mark.parametrize("first", [0, 3])
def test_fp8_bank_through_the_kernels_equals_the_loop(first):
    """The expert forms that read an FP8 bank in place (fused: decode; grouped through kernels/grouped_gemm.py: the
    CUDA prefill path) equal the loop, which dequantizes expert by expert. I = 24 leaves partial 16-row blocks."""
    from longcat_ref.model.experts import Experts

    dev = "cuda" if CUDA else "cpu"
    g = torch.Generator().manual_seed(first)
    ex = Experts(6, 40, 24, first_expert=first)
    with torch.no_grad():
        ex.gate_up_proj.normal_(generator=g).mul_(0.3)
        ex.down_proj.normal_(generator=g).mul_(0.3)
    quant.quantize_(ex, (16, 16))
    ex = ex.to(dev)
    x = torch.randn(9, 40, generator=g).to(dev)
    idx = torch.randint(0, 12, (9, 3), generator=g).to(dev)  # some ids outside this bank
    w = torch.rand(9, 3, generator=g).to(dev)
    ref = ex.forward_loop(x, w, idx, torch.zeros(9, 40, device=dev))
    assert ref.abs().sum() > 0
    grouped = ex._grouped(x, w, idx, torch.zeros(9, 40, device=dev), ex.gate_up_proj, ex.down_proj, first)
    fused = ex.forward_fused(x, w, idx, torch.zeros(9, 40, device=dev))
    torch.testing.assert_close(grouped, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)


@KERNELS
def test_fp8_kernel_refuses_unsupported_blocks():
    w8, s = quant.quantize_blockwise(torch.randn(8, 24), (8, 24))
    with pytest.raises(ValueError, match="multiple of 16"):
        fp8_linear_kernel(torch.randn(1, 24, device="cuda" if CUDA else "cpu"), w8, s, (8, 24))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("M", [1, 8, 32, 512])
@pytest.mark.parametrize("N,K", [(1536, 6144), (6144, 12288), (2048, 5120)])
def test_fp8_matmul_kernel_real_sizes_gpu(M, N, K):
    g = torch.Generator(device="cuda").manual_seed(0)
    w8, s = quant.quantize_blockwise(torch.randn(N, K, device="cuda", generator=g), (128, 128))
    x = torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16)
    y = fp8_linear_kernel(x, w8, s, (128, 128))
    ref = torch.nn.functional.linear(x.float(), quant.dequantize(w8, s, (128, 128)))
    assert (y.float() - ref).norm() / ref.norm() < 8e-3


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_fp8_matmul_rows_choose_kernel_or_dequantize_gpu():
    """quant.fp8_matmul on CUDA: up to KERNEL_MAX_ROWS rows the Triton kernel (bit-equal to calling it), past that
    dequantize + cuBLAS (bit-equal to the reference formula); both close to the fp32 product."""
    g = torch.Generator(device="cuda").manual_seed(1)
    w8, s = quant.quantize_blockwise(torch.randn(1536, 6144, device="cuda", generator=g), (128, 128))
    for M in (quant.KERNEL_MAX_ROWS, quant.KERNEL_MAX_ROWS + 2, 2048):  # rows counted over the leading dims
        x = torch.randn(2, M // 2, 6144, device="cuda", generator=g, dtype=torch.bfloat16)
        y = quant.fp8_matmul(x, w8, s, (128, 128))
        if M <= quant.KERNEL_MAX_ROWS:
            assert torch.equal(y, fp8_linear_kernel(x, w8, s, (128, 128)))
        else:
            assert torch.equal(y, fp8_linear_reference(x, w8, s, (128, 128)))
        ref = torch.nn.functional.linear(x.float(), quant.dequantize(w8, s, (128, 128)))
        assert y.shape == ref.shape and (y.float() - ref).norm() / ref.norm() < 8e-3


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kind", ["longcat", "glm"])
def test_kept_model_on_gpu_equals_dequantized(tmp_path, kind):
    """On CUDA the kept model's products run in the Triton kernels (FP8 read in place): in fp32 its logits equal the
    dequantized model's in every form, and greedy tokens are equal eagerly and with CUDA graphs. (In bf16 a rounding
    difference can flip a near-tie in the router and move a logit far: bf16 is only run, in every form.)"""
    m = tiny(kind)
    L.save_checkpoint(m, tmp_path, quantize="fp8", fp8_block=(16, 16))
    kept = L.from_pretrained(tmp_path, dtype=torch.float32, device="cuda", fp8="keep")
    deq = L.from_pretrained(tmp_path, dtype=torch.float32, device="cuda")
    ids = torch.randint(4, 512, (2, 9), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    with torch.no_grad():
        want = deq(ids)
        for forms in FORMS + [FUSED]:
            torch.testing.assert_close(kept(ids, forms=forms), want, atol=1e-4, rtol=1e-4, msg=str(forms))
    prompt = ids[:1, :5]
    a = deq.generate(prompt, max_new_tokens=8)
    assert torch.equal(kept.generate(prompt, max_new_tokens=8), a)
    assert torch.equal(kept.generate(prompt, max_new_tokens=8, fast=True), a)
    bf = L.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda", fp8="keep")
    with torch.no_grad():
        for forms in FORMS + [FUSED]:
            assert torch.isfinite(bf(ids, forms=forms)).all(), forms
    assert bf.generate(prompt, max_new_tokens=8, fast=True).shape == (1, 13)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("split", [None, 24])
def test_dequantize_kernel_equals_formula_gpu(split):
    """On CUDA `dequantize` runs a Triton kernel: bitwise the formula's fp32 product, cast."""
    from longcat_ref.kernels.fp8_linear import _dequantize_formula

    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(3, 56, 40, device="cuda", generator=g)
    w8, s = quant.quantize_blockwise(w, (16, 16), split_rows=split)
    for dtype in (torch.float32, torch.bfloat16):
        got = quant.dequantize(w8, s, (16, 16), dtype, split_rows=split)
        assert torch.equal(got, _dequantize_formula(w8, s, (16, 16), dtype, split_rows=split)), dtype
