"""kernels/moe_decode.py: the fused MoE decode kernels equal their plain-PyTorch reference, which equals a loop.

Without a GPU the kernels run in Triton's CPU interpreter (conftest.py sets TRITON_INTERPRET=1), so the shapes here
are tiny -- but chosen to leave partial tiles and partial FP8 scale blocks (H=40, I=24 with 16 x 16 blocks). The
tests at the end run only on a GPU: realistic GLM-4.7-Flash / LongCat-Flash shapes, CUDA graph capture and
torch.compile(fullgraph=True).
"""

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from longcat_ref.io import fp8 as io_fp8  # noqa: E402
from longcat_ref.kernels import moe_decode  # noqa: E402
from longcat_ref.kernels.moe_decode import choose_tiles, fused_moe, fused_moe_reference  # noqa: E402
from ptx import before_wait, kernel_ptx  # noqa: E402

FP8 = torch.float8_e4m3fn
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------------ helpers
def quantize_bank(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """w (E, R, C) float -> (E, R, C) fp8 and (E, ceil(R/bo), ceil(C/bi)) fp32 scales, per-block absmax, on w's
    device (io/fp8.quantize_blockwise, batched over experts)."""
    E, R, C = w.shape
    bo, bi = block
    nb0, nb1 = math.ceil(R / bo), math.ceil(C / bi)
    padded = F.pad(w.float(), (0, nb1 * bi - C, 0, nb0 * bo - R))  # (E, nb0*bo, nb1*bi)
    blocks = padded.view(E, nb0, bo, nb1, bi)
    amax = blocks.abs().amax(dim=(2, 4))  # (E, nb0, nb1)
    scale = torch.where(amax > 0, amax / io_fp8.FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, :, None, :, None]).clamp(-io_fp8.FP8_MAX, io_fp8.FP8_MAX)
    return q.view(E, nb0 * bo, nb1 * bi)[:, :R, :C].to(FP8).contiguous(), scale.contiguous()


def cat_fp8(a, b, dim):
    return torch.cat([a.view(torch.uint8), b.view(torch.uint8)], dim).view(FP8)


def quantize_experts(gate_up, down, block):
    """The checkpoint layout: gate and up quantized as the separate tensors they are on disk, scales stacked."""
    inter = gate_up.shape[1] // 2
    g8, gs = quantize_bank(gate_up[:, :inter], block)  # (E, I, H), (E, nbg, ceil(H/bi))
    u8, us = quantize_bank(gate_up[:, inter:], block)
    d8, ds = quantize_bank(down, block)  # (E, H, I), (E, ceil(H/bo), ceil(I/bi))
    return dict(gate_up=cat_fp8(g8, u8, 1), down=d8, gate_up_scale=torch.cat([gs, us], 1), down_scale=ds,
                block=block)


def routed(n, k, H, n_ids, dtype=torch.float32, seed=0, device=DEV):
    """Random x (n, H), router weights (n, k) fp32 and ids (n, k) in [0, n_ids), distinct per token as top-k gives."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, H, generator=g).to(device, dtype)  # (n, H)
    w = torch.rand(n, k, generator=g).to(device)  # (n, k) fp32
    idx = torch.stack([torch.randperm(n_ids, generator=g)[:k] for _ in range(n)]).to(device)  # (n, k) int64
    return x, w, idx


def make(E, H, I, n, k, dtype=torch.float32, n_ids=None, seed=0, device=DEV, scale=0.2):
    """routed(...) and random banks gate_up (E, 2I, H), down (E, H, I), generated on `device`."""
    x, w, idx = routed(n, k, H, n_ids or E, dtype, seed, device)
    g = torch.Generator(device=device).manual_seed(seed)
    gate_up = (torch.randn(E, 2 * I, H, generator=g, device=device) * scale).to(dtype)  # (E, 2I, H)
    down = (torch.randn(E, H, I, generator=g, device=device) * scale).to(dtype)  # (E, H, I)
    return x, w, idx, gate_up, down


def dequantized(q, dtype=torch.float32):
    """The fp8 experts of quantize_experts back in `dtype` (through io/fp8.dequantize, one matrix at a time)."""
    E, I2, H = q["gate_up"].shape
    inter, block = I2 // 2, q["block"]
    nbg = math.ceil(inter / block[0])
    gu = torch.stack([torch.cat([io_fp8.dequantize(q["gate_up"][e, :inter].cpu(), q["gate_up_scale"][e, :nbg].cpu(),
                                                   block),
                                 io_fp8.dequantize(q["gate_up"][e, inter:].cpu(), q["gate_up_scale"][e, nbg:].cpu(),
                                                   block)]) for e in range(E)])
    d = torch.stack([io_fp8.dequantize(q["down"][e].cpu(), q["down_scale"][e].cpu(), block) for e in range(E)])
    dev = q["gate_up"].device
    return gu.to(dev, dtype), d.to(dev, dtype)


def loop_moe(x, w, idx, gate_up, down, first_expert=0, gate_up_scale=None, down_scale=None, block=None):
    """The formula, token by token and slot by slot, in float64, written independently of the module."""
    n, k = idx.shape
    E, I2, H = gate_up.shape
    inter = I2 // 2

    def deq(w8, s):  # explicit: every weight times its block's scale
        R, C = w8.shape
        full = s.double().repeat_interleave(block[0], 0)[:R].repeat_interleave(block[1], 1)[:, :C]  # (R, C)
        return w8.float().double() * full

    out = torch.zeros(n, H, dtype=torch.float64)
    for t in range(n):
        for j in range(k):
            e = int(idx[t, j]) - first_expert
            if not 0 <= e < E:
                continue  # a zero expert or another rank's: contributes nothing
            if gate_up.dtype == FP8:
                nbg = math.ceil(inter / block[0])
                wg = deq(gate_up[e, :inter], gate_up_scale[e, :nbg])  # gate: block rows [0, nbg)
                wu = deq(gate_up[e, inter:], gate_up_scale[e, nbg:])  # up: its own block rows [nbg, 2 nbg)
            else:
                wg, wu = gate_up[e, :inter].double(), gate_up[e, inter:].double()
            wd = deq(down[e], down_scale[e]) if down.dtype == FP8 else down[e].double()
            xt = x[t].double()
            g, u = wg @ xt, wu @ xt  # (I,) each
            a = g / (1 + torch.exp(-g)) * u  # silu(g) * u
            out[t] += float(w[t, j]) * (wd @ a)
    return out


def close(got, want, tol):
    """max |got - want| <= tol * max |want| (a relative error of the whole output, robust to entries near 0)."""
    got, want = got.double().cpu(), want.double().cpu()
    err, ref = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= tol * ref, f"max error {err:.3g} > {tol} * {ref:.3g}"


H, I = 40, 24  # neither a multiple of 16 nor of 32: partial tiles and partial fp8 blocks along both axes


# ------------------------------------------------------------------------------------------------ the reference
def test_quantize_helper_matches_io_fp8():
    w = torch.randn(3, 24, 40)
    q, s = quantize_bank(w, (16, 16))
    for e in range(3):
        q_e, s_e = io_fp8.quantize_blockwise(w[e], (16, 16))
        assert torch.equal(q[e].view(torch.uint8), q_e.view(torch.uint8)) and torch.equal(s[e], s_e)


@pytest.mark.parametrize("block", [None, (16, 16), (32, 32)], ids=["unquantized", "fp8-block16", "fp8-block32"])
def test_reference_equals_a_loop_over_tokens_and_slots(block):
    x, w, idx, gu, d = make(8, H, I, 3, 4, n_ids=12, device="cpu", seed=1)
    kw = dict(first_expert=2)  # ids 0, 1: another rank's; 2..9 ours; 10, 11 past the bank (zero experts)
    if block:
        q = quantize_experts(gu, d, block)
        gu, d = q.pop("gate_up"), q.pop("down")
        kw.update(q)
    want = loop_moe(x, w, idx, gu, d, **kw)
    assert want.abs().max() > 0
    close(fused_moe_reference(x, w, idx, gu, d, **kw), want, 1e-5)


# ------------------------------------------------------------------------------------------------ the kernels
@pytest.mark.parametrize("dtype,n,k,tol", [(torch.float32, 1, 2, 1e-5), (torch.float32, 3, 4, 1e-5),
                                           (torch.bfloat16, 1, 3, 2e-2), (torch.bfloat16, 3, 2, 2e-2)],
                         ids=["fp32-n1-k2", "fp32-n3-k4", "bf16-n1-k3", "bf16-n3-k2"])
def test_kernel_equals_reference(dtype, n, k, tol):
    x, w, idx, gu, d = make(6, H, I, n, k, dtype, seed=2)
    close(fused_moe(x, w, idx, gu, d), fused_moe_reference(x, w, idx, gu, d), tol)
    assert fused_moe(x, w, idx, gu, d).dtype == dtype


@pytest.mark.parametrize("dtype,n,tol", [(torch.float32, 1, 1e-5), (torch.float32, 3, 1e-5), (torch.bfloat16, 2, 2e-2)],
                         ids=["fp32-n1", "fp32-n3", "bf16-n2"])
def test_shared_expert_as_a_slot(dtype, n, tol):
    """shared=(gate, up, down): the shared expert in the same launches, one more slot of weight 1, equals the
    routed sum plus the shared SwiGLU written out; with every routed slot someone else's, the shared one alone."""
    x, w, idx, gu, d = make(6, H, I, n, 3, dtype, seed=12)
    g = torch.Generator(device=DEV).manual_seed(13)
    sg, su, sd = [(torch.randn(*shape, generator=g, device=DEV) * 0.2).to(dtype) for shape in ((I, H), (I, H), (H, I))]
    f = lambda t: t.double()  # noqa: E731
    swiglu = (F.silu(f(x) @ f(sg).T) * (f(x) @ f(su).T)) @ f(sd).T  # (n, H)
    by_hand = f(fused_moe_reference(x, w, idx, gu, d)) + swiglu
    got = fused_moe(x, w, idx, gu, d, shared=(sg, su, sd))
    assert got.dtype == dtype
    close(got, fused_moe_reference(x, w, idx, gu, d, shared=(sg, su, sd)), tol)
    close(got.double(), by_hand, tol)
    nobody = torch.full_like(idx, 99)  # no routed expert is ours: only the shared slot is left
    close(fused_moe(x, w, idx=nobody, gate_up=gu, down=d, shared=(sg, su, sd)),
          fused_moe_reference(x, w, nobody, gu, d, shared=(sg, su, sd)), tol)
    with pytest.raises(ValueError, match="shared must be"):
        fused_moe(x, w, idx, gu, d, shared=(sg, su, sd[:, :-1]))


@pytest.mark.parametrize("block", [(16, 16), (32, 32)], ids=["block16", "block32"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_kernel_fp8_partial_blocks(block, dtype, tol):
    x, w, idx, gu, d = make(5, H, I, 3, 3, seed=3)
    q = quantize_experts(gu, d, block)
    x = x.to(dtype)
    got = fused_moe(x, w, idx, **q)
    assert got.dtype == dtype
    close(got, fused_moe_reference(x, w, idx, **q), tol)


def test_fp8_kernel_equals_kernel_on_dequantized_weights():
    x, w, idx, gu, d = make(5, H, I, 2, 4, seed=4)
    q = quantize_experts(gu, d, (16, 16))
    gu32, d32 = dequantized(q)
    close(fused_moe(x, w, idx, **q), fused_moe(x, w, idx, gu32, d32), 1e-5)


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
def test_non_local_slots_contribute_exactly_zero(fp8):
    """E=4 local experts of 8 (first_expert=4): ids 0..3 are another rank's, 8.. zero experts, and ids far outside
    the bank (which would fault if any of their weights were read) -- their router weights may even be NaN."""
    x, w, idx, gu, d = make(4, H, I, 3, 4, n_ids=8, seed=5)
    kw = dict(first_expert=4)
    if fp8:
        kw.update(quantize_experts(gu, d, (16, 16)))
        gu, d = kw.pop("gate_up"), kw.pop("down")
    idx = idx + 4  # global ids 4..11: 4..7 ours, 8..11 zero experts
    idx[0, 0], idx[1, 1], idx[2, 3] = 0, -(10**12), 10**12  # another rank's; absurd ids
    mine = (idx >= 4) & (idx < 8)
    assert mine.any() and not mine.all()
    nan_w = torch.where(mine, w, float("nan"))
    zero_w = torch.where(mine, w, 0.0)
    got = fused_moe(x, nan_w, idx, gu, d, **kw)
    assert torch.equal(got, fused_moe(x, zero_w, idx, gu, d, **kw))  # exactly: those slots add 0 * 0
    close(got, fused_moe_reference(x, zero_w, idx, gu, d, **kw), 1e-5)
    close(got, loop_moe(x.cpu(), zero_w.cpu(), idx.cpu(), gu.cpu(), d.cpu(), **{a: b.cpu() if torch.is_tensor(b) else b
                                                                              for a, b in kw.items()}), 1e-5)
    nobody = torch.tensor([[0, 3, 8, 11]] * 3, device=idx.device)  # no slot is ours
    assert torch.equal(fused_moe(x, nan_w, nobody, gu, d, **kw), torch.zeros_like(x))


def test_many_tiles_per_scale_block():
    """Tiles smaller than the 16 x 16 scale blocks (several tiles share one scale) and many reduction chunks."""
    x, w, idx, gu, d = make(3, H, I, 2, 2, seed=6)
    q = quantize_experts(gu, d, (16, 16))
    got = moe_decode._launch(x, w, idx, q["gate_up"], q["down"], 0, q["gate_up_scale"], q["down_scale"], 16, 16,
                             tiles=(4, 8, 4, 8))  # (n, k, H) fp32: the weighted outputs per slot
    close(got.sum(1).to(x.dtype), fused_moe_reference(x, w, idx, **q), 1e-5)


def test_tiles_must_divide_the_fp8_block():
    x, w, idx, gu, d = make(3, H, I, 1, 2, seed=7)
    q = quantize_experts(gu, d, (16, 16))
    with pytest.raises(ValueError, match="tiles must divide"):
        moe_decode._launch(x, w, idx, q["gate_up"], q["down"], 0, q["gate_up_scale"], q["down_scale"], 16, 16,
                           tiles=(32, 16, 16, 16))


def test_tile_heuristic():
    from longcat_ref.kernels.moe_decode import choose_launch

    # one token, 16-bit banks: one-warp narrow programs (GLM-4.7-Flash with its shared expert as a 5th slot, LongCat)
    assert choose_launch(1, 5, 2048, 1536) == ((1, 2048, 2, 512), (1, 1))
    assert choose_launch(1, 12, 6144, 2048) == ((1, 2048, 2, 512), (1, 1))
    assert choose_launch(1, 3, 40, 24) == ((1, 64, 2, 32), (1, 1))  # a tiny config: the tiles fit its sizes
    assert choose_launch(2, 5, 2048, 1536) == ((16, 512, 8, 512), (4, 4))  # two tokens: the rule
    assert choose_launch(1, 4, 2048, 1536, (128, 128), (True, True))[1] == (4, 4)  # fp8 banks: the rule
    assert choose_tiles(8, 4, 2048, 1536) == (16, 512, 8, 512)  # 8 tokens: 3072 and 8192 programs
    assert choose_tiles(64, 4, 2048, 1536) == (16, 512, 32, 512)  # 64 tokens: down wide again (16384 programs)
    assert choose_tiles(1, 4, 2048, 1536, (128, 128), (True, True)) == (8, 512, 16, 512)  # real fp8 blocks: 512
    assert choose_tiles(1, 12, 6144, 2048, (128, 128), (True, True)) == (32, 512, 32, 512)  # ... programs at least
    assert choose_tiles(3, 4, 40, 24, (8, 16), (True, True)) == (8, 64, 8, 32)  # the block caps the row tiles
    for block in [(16, 16), (32, 32), (8, 128), (24, 48), (128, 128)]:
        for n, k, h, i in [(1, 4, 2048, 1536), (8, 4, 40, 24), (64, 12, 6144, 2048)]:
            bi_, bh, bo_, bk = choose_tiles(n, k, h, i, block, (True, True))
            assert block[0] % bi_ == 0 and block[0] % bo_ == 0  # a tile's rows lie in one block row
            assert all(t & (t - 1) == 0 for t in (bi_, bh, bo_, bk))


def test_column_tiles_spanning_several_scale_blocks():
    """Reduction tiles wider than the scale block: each column's scale is applied (a vector per tile)."""
    x, w, idx, gu, d = make(3, H, I, 2, 3, seed=9)
    q = quantize_experts(gu, d, (8, 16))
    for tiles in [(8, 64, 8, 32), (8, 32, 4, 64)]:
        got = moe_decode._launch(x, w, idx, q["gate_up"], q["down"], 0, q["gate_up_scale"], q["down_scale"], 8, 16,
                                 tiles=tiles)  # (n, k, H) fp32
        close(got.sum(1).to(x.dtype), fused_moe_reference(x, w, idx, **q), 1e-5)


def test_bad_arguments_are_refused_by_name():
    x, w, idx, gu, d = make(3, H, I, 1, 2, seed=8)
    q = quantize_experts(gu, d, (16, 16))
    with pytest.raises(ValueError, match="pass block"):
        fused_moe(x, w, idx, q["gate_up"], q["down"], gate_up_scale=q["gate_up_scale"], down_scale=q["down_scale"])
    with pytest.raises(ValueError, match="gate_up_scale must be fp32"):
        fused_moe(x, w, idx, q["gate_up"], q["down"], gate_up_scale=q["gate_up_scale"][:, :2],
                  down_scale=q["down_scale"], block=(16, 16))
    with pytest.raises(ValueError, match="x's dtype"):
        fused_moe(x.bfloat16(), w, idx, gu, d)
    with pytest.raises(ValueError, match="do not agree"):
        fused_moe(x, w, idx, gu, d[:, :-1])


# ------------------------------------------------------------------------------------------------ the custom op
def test_custom_op_eager_and_compiled_graph():
    x, w, idx, gu, d = make(4, H, I, 2, 3, seed=9)
    q = quantize_experts(gu, d, (16, 16))
    want = fused_moe(x, w, idx, **q)
    op = torch.ops.longcat_ref.fused_moe(x, w, idx, q["gate_up"], q["down"], 0, q["gate_up_scale"], q["down_scale"],
                                         16, 16)  # (n, k, H) fp32: the slots, which fused_moe sums
    assert op.shape == (*idx.shape, H) and op.dtype == torch.float32
    assert torch.equal(op.sum(1).to(x.dtype), want)

    def step(x, w, idx, gate_up, down, gate_up_scale, down_scale):
        y = fused_moe(x * 1, w, idx, gate_up, down, gate_up_scale=gate_up_scale, down_scale=down_scale,
                      block=(16, 16))
        return y, x + y  # the op between ordinary ops, which the compiler may fuse around it

    backend = "inductor" if x.is_cuda else "aot_eager"  # the CPU: trace and partition, no C++ compiler needed
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    args = (x, w, idx, q["gate_up"], q["down"], q["gate_up_scale"], q["down_scale"])
    got_y, got_sum = compiled(*args)
    assert torch.equal(got_y, want)
    close(got_sum, x + want, 1e-6)


def test_custom_op_opcheck_and_fake_shape():
    """torch.library.opcheck: the schema, the fake (meta) function against the real one, AOT dispatch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, idx, gu, d = make(4, H, I, 2, 2, torch.bfloat16, seed=10)
    torch.library.opcheck(torch.ops.longcat_ref.fused_moe.default, (x, w, idx, gu, d, 0, None, None, 0, 0))
    shared = [t.contiguous() for t in (gu[0, :I], gu[0, I:], d[0])]  # a shared expert's gate, up, down
    torch.library.opcheck(torch.ops.longcat_ref.fused_moe.default, (x, w, idx, gu, d, 0, None, None, 0, 0, *shared))
    assert torch.ops.longcat_ref.fused_moe(x, w, idx, gu, d, 0, None, None, 0, 0, *shared).shape == (2, 3, H)
    q = quantize_experts(gu, d, (16, 16))  # (opcheck's schema check cannot compare fp8 tensors on the CPU)
    args = (x, w, idx, q["gate_up"], q["down"], 0, q["gate_up_scale"], q["down_scale"], 16, 16)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) if torch.is_tensor(t) else t for t in args]
        out = torch.ops.longcat_ref.fused_moe(*fake)
    assert out.shape == (2, 2, H) and out.dtype == torch.float32  # (n, k, H): the weighted slots


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU error")
def test_cpu_without_the_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, idx, gu, d = make(4, H, I, 1, 2, seed=11)
    with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
        fused_moe(x, w, idx, gu, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_rows_loaded_before_the_wait_give_the_same_bits(monkeypatch, dtype):
    """PRELOAD_SHARED (off by default): one token (one chunk a row), the shared slot's gate / up rows loaded at
    the top of kernel 1, the routed slots' after: the same bits as off, equal to the reference; the routed slots
    still count (a routed expert changed changes the result), and the shared slot too (all routed slots not ours)."""
    x, w, idx, gu, d = make(6, H, I, 1, 3, dtype, seed=21)
    assert moe_decode.choose_launch(1, 3, H, I)[0][1] >= H  # one chunk a row: the tile on which EARLY is taken
    g = torch.Generator(device=DEV).manual_seed(22)
    sh = tuple((torch.randn(*shape, generator=g, device=DEV) * 0.2).to(dtype) for shape in ((I, H), (I, H), (H, I)))
    nobody = torch.full_like(idx, 99)
    off = [fused_moe(x, w, i, gu, d, shared=sh) for i in (idx, nobody)]
    monkeypatch.setattr(moe_decode, "PRELOAD_SHARED", True)
    on = [fused_moe(x, w, i, gu, d, shared=sh) for i in (idx, nobody)]
    for a, b in zip(on, off):
        assert torch.equal(a, b)
    close(on[0], fused_moe_reference(x, w, idx, gu, d, shared=sh), 1e-5 if dtype == torch.float32 else 2e-2)
    close(on[1], fused_moe_reference(x, w, nobody, gu, d, shared=sh), 1e-5 if dtype == torch.float32 else 2e-2)
    assert not torch.equal(on[0], on[1])


# ------------------------------------------------------------------------------------------------ GPU only
def test_weight_prefetch_plan(monkeypatch):
    """PREFETCH_DOWN and PREFETCH_SHARED (both off by default) with PDL only; kernel 1 only with a shared expert;
    kernel 2 not for fp8 banks; lines per row of H (kernel 1) and of I (kernel 2), 64 bf16 values a line."""
    x, gu, d = torch.zeros(1, 2048).bfloat16(), torch.zeros(2, 3072, 2048).bfloat16(), torch.zeros(2, 2048, 1536)
    d = d.bfloat16()
    shared = (gu[0, :1536], gu[0, 1536:], d[0])
    assert [p["PF"] for p in moe_decode.prefetch_plan(x, gu, d, shared, True)] == [False, False]  # the defaults
    monkeypatch.setattr(moe_decode, "PREFETCH_DOWN", True)
    assert [p["PF"] for p in moe_decode.prefetch_plan(x, gu, d, shared, True)] == [False, True]
    monkeypatch.setattr(moe_decode, "PREFETCH_SHARED", True)
    one, two = moe_decode.prefetch_plan(x, gu, d, shared, True)
    assert one == dict(PF=True, PF_LINES=32, LINE=64) and two == dict(PF=True, PF_LINES=32, LINE=64)  # 2048, 1536
    assert [p["PF"] for p in moe_decode.prefetch_plan(x, gu, d, shared, False)] == [False, False]  # no PDL
    assert [p["PF"] for p in moe_decode.prefetch_plan(x, gu, d, None, True)] == [False, True]  # no shared expert
    assert not moe_decode.prefetch_plan(x, gu, d.to(FP8), shared, True)[1]["PF"]  # an fp8 down bank
    monkeypatch.setattr(moe_decode, "PREFETCH_DOWN", False)
    assert [p["PF"] for p in moe_decode.prefetch_plan(x, gu, d, shared, True)] == [True, False]


@pytest.mark.parametrize("kernel", ["moe_gate_up", "moe_down"])
def test_weight_prefetch_is_issued_before_the_dependent_launch_wait(kernel):
    """Compiled for sm_90 with PF (tests/ptx.py): `prefetch.global.L2` before `griddepcontrol.wait`; kernel 1
    loads nothing there, kernel 2 only the router's id through L2 (ld.global.cg: an address, read again after the
    wait); without PF neither kernel prefetches."""
    pre = before_wait(kernel_ptx(kernel, 1))
    assert any("prefetch.global.L2" in line for line in pre)
    loads = [line.strip() for line in pre if "ld.global" in line]
    assert loads == [] if kernel == "moe_gate_up" else (len(loads) == 1 and "ld.global.cg" in loads[0]), loads
    assert "prefetch" not in kernel_ptx(kernel, 0)


def test_shared_rows_are_loaded_before_the_dependent_launch_wait():
    """Kernel 1 compiled for sm_90 (tests/ptx.py) with PRELOAD_SHARED's EARLY at the one-token tile: global loads
    (the shared expert's gate / up rows) before `griddepcontrol.wait`; without it none."""
    assert any("ld.global" in line for line in before_wait(kernel_ptx("moe_gate_up", 0, 1)))
    assert not any("ld.global" in line for line in before_wait(kernel_ptx("moe_gate_up", 0, 0)))


GLM = dict(E=64, H=2048, I=1536, k=4)
LONGCAT = dict(E=32, H=6144, I=2048, k=12)  # 32 of the 512 experts, to save memory


@cuda
@pytest.mark.parametrize("shape,n,fp8", [(GLM, 1, False), (GLM, 8, False), (GLM, 1, True), (GLM, 8, True),
                                         (LONGCAT, 1, False), (LONGCAT, 1, True)],
                         ids=["glm-n1-bf16", "glm-n8-bf16", "glm-n1-fp8", "glm-n8-fp8", "longcat-n1-bf16",
                              "longcat-n1-fp8"])
def test_gpu_realistic_shapes(shape, n, fp8):
    E, h, i, k = shape["E"], shape["H"], shape["I"], shape["k"]
    zero = 8 if shape is LONGCAT else 0  # LongCat-Flash routes to zero-computation experts too (ids >= E)
    x, w, idx, gu, d = make(E, h, i, n, k, torch.bfloat16, n_ids=E + zero, seed=12, scale=0.02)
    if fp8:
        q = quantize_experts(gu, d, (128, 128))
        del gu, d
        got, want = fused_moe(x, w, idx, **q), fused_moe_reference(x, w, idx, **q)
    else:
        got, want = fused_moe(x, w, idx, gu, d), fused_moe_reference(x, w, idx, gu, d)
    torch.cuda.synchronize()
    close(got, want, 2e-2)


@cuda
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_gpu_cuda_graph_and_torch_compile(fp8):
    E, h, i, k, n = GLM["E"], GLM["H"], GLM["I"], GLM["k"], 8
    x, w, idx, gu, d = make(E, h, i, n, k, torch.bfloat16, n_ids=E + 4, seed=13, scale=0.02)
    kw = quantize_experts(gu, d, (128, 128)) if fp8 else dict(gate_up=gu, down=d)

    def step(x, w, idx):
        return fused_moe(x, w, idx, **kw)

    side = torch.cuda.Stream()  # warm up (compiles the kernels) outside the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(x, w, idx)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(x, w, idx)
    torch._dynamo.reset()
    def around(x, w, idx):
        y = step(x * 1, w, idx)
        return y, x + y

    compiled = torch.compile(around, fullgraph=True)
    for seed in (14, 15):  # new inputs copied into the captured buffers
        x2, w2, idx2 = routed(n, k, h, E + 4, torch.bfloat16, seed)
        x.copy_(x2), w.copy_(w2), idx.copy_(idx2)
        graph.replay()
        eager = step(x, w, idx)
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager)
        got_y, got_sum = compiled(x, w, idx)
        assert torch.equal(got_y, eager)
        close(got_sum, x + eager, 1e-2)
        close(eager, fused_moe_reference(x, w, idx, **kw), 2e-2)


def test_glm_moe_block_folds_its_shared_expert_into_the_kernels():
    """GLM's MoE block with experts="fused": the shared expert runs as the kernels' last slot (can_fold), and the
    block equals the readable loop + separate SwiGLU; no shared expert (LongCat) never folds."""
    import longcat_ref as L
    from longcat_ref.model.moe import MoE

    cfg = L.tiny_glm()
    moe = L.init_weights(MoE(cfg), seed=4, std=0.2, bias_std=0.05).to(DEV)
    assert moe.experts.can_fold(moe.shared_experts)
    x = torch.randn(2, 3, cfg.hidden_size, generator=torch.Generator().manual_seed(5)).to(DEV)
    with torch.no_grad():
        close(moe(x, experts="fused"), moe(x, experts="loop"), 1e-5)
    assert not moe.experts.can_fold(None)
    with pytest.raises(ValueError, match="only in the 'fused' form"):
        moe.experts(x[0], *moe.router(x[0]), torch.zeros_like(x[0]), impl="gather", shared=moe.shared_experts)


@cuda
@pytest.mark.parametrize("n", [1, 4])
def test_gpu_weight_prefetch_changes_no_bit(monkeypatch, n):
    """The weight prefetch is a hint: GLM's shapes with the shared expert as a slot, the kernels with and without it,
    eagerly and replayed in a CUDA graph after a producer of x and idx, bit for bit."""
    E, h, i, k = GLM["E"], GLM["H"], GLM["I"], GLM["k"]
    x, w, idx, gu, d = make(E, h, i, n, k, torch.bfloat16, seed=21, scale=0.02)
    g = torch.Generator(device="cuda").manual_seed(22)
    shared = tuple((torch.randn(*shape, device="cuda", generator=g) * 0.02).bfloat16()
                   for shape in ((i, h), (i, h), (h, i)))
    outs = {}
    for on in (False, True):
        monkeypatch.setattr(moe_decode, "PREFETCH_SHARED", on)
        monkeypatch.setattr(moe_decode, "PREFETCH_DOWN", on)
        x_in, idx_in = x.clone(), idx.clone()

        def step():
            x_in.copy_(x)  # the producer: the kernels' inputs written just before them
            idx_in.copy_(idx)
            return fused_moe(x_in, w, idx_in, gu, d, shared=shared)

        eager = step()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)
        outs[on] = eager
    assert torch.equal(outs[True], outs[False])
