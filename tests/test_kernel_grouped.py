"""kernels/grouped_gemm.py: the grouped GEMM kernel equals its plain-PyTorch reference, which equals a loop here.

Without a GPU the kernel runs in Triton's CPU interpreter (conftest.py sets TRITON_INTERPRET=1), so the shapes are
tiny, chosen to hit the edges of the tile -> group map (groups of 0, 1, BM - 1, BM, BM + 1 rows, an empty last
group, rows past ends[-1]) and partial FP8 scale blocks (N=40, K=48 with 32 x 32 blocks; gate/up halves of 24 rows
with 16 x 16 blocks). The tests at the end run only on a GPU: LongCat-Flash prefill sizes and CUDA graph capture.
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from longcat_ref.kernels import grouped_gemm as gg  # noqa: E402
from longcat_ref.kernels.grouped_gemm import (combine_slots, combine_slots_reference, grouped_gemm,  # noqa: E402
                                              grouped_gemm_reference)
from longcat_ref.model.quant import quantize_blockwise  # noqa: E402

FP8 = torch.float8_e4m3fn
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


# ------------------------------------------------------------------------------------------------ helpers
def close(got, want, tol):
    """Max error relative to the largest |want| (at least 1)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    err = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    assert err <= tol * max(1.0, want.float().abs().max().item() if want.numel() else 0.0), err


def ends_of(sizes, device=DEV) -> torch.Tensor:
    return torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)  # (G,) cumulative group ends


def make(sizes, N, K, dtype=torch.float32, extra=3, seed=0):
    """a (sum(sizes) + extra, K), a bank b (G, N, K), ends: `extra` rows past ends[-1] belong to no group."""
    g = torch.Generator().manual_seed(seed)
    m = sum(sizes) + extra
    a = torch.randn(m, K, generator=g).to(DEV, dtype)
    b = torch.randn(len(sizes), N, K, generator=g).to(DEV, dtype)
    return a, b, ends_of(sizes)


def dequant_loop(w8, scale, block, split_rows=None):
    """(N, K) fp8 and (nb_N, nb_K) scales -> (N, K) fp32, each scale repeated over its block (independently of
    fp8_linear.dequantize): with split_rows, the gate's block rows then the up half's."""
    N, K = w8.shape
    bo, bi = block
    if split_rows is None:
        rows = scale.repeat_interleave(bo, 0)[:N]  # (N, nb_K)
    else:
        nbg = math.ceil(split_rows / bo)
        rows = torch.cat([scale[:nbg].repeat_interleave(bo, 0)[:split_rows],
                          scale[nbg:].repeat_interleave(bo, 0)[:N - split_rows]])  # (N, nb_K)
    return w8.float() * rows.repeat_interleave(bi, 1)[:, :K]  # (N, K)


def loop(a, b, ends, scale=None, block=None, split_rows=None):
    """The definition, in fp32: each group's slice of rows times its (dequantized) matrix; other rows 0."""
    out = torch.zeros(a.shape[0], b.shape[1])
    start = 0
    for g, end in enumerate(ends.tolist()):
        w = b[g].float() if scale is None else dequant_loop(b[g].cpu(), scale[g].cpu(), block, split_rows)
        out[start:end] = a[start:end].float().cpu() @ w.cpu().T
        start = end
    return out


def check(a, b, ends, **fp8):
    """The kernel against the reference and the loop; rows past ends[-1] exactly 0. Returns the kernel's output."""
    got = grouped_gemm(a, b, ends, **fp8)
    assert got.dtype == a.dtype and got.shape == (a.shape[0], b.shape[1])
    tol = TOL[a.dtype]
    close(got, grouped_gemm_reference(a, b, ends, **fp8), tol)
    close(got.cpu(), loop(a, b, ends, **fp8), tol)
    assert not got[int(ends[-1]):].any()
    return got


# ------------------------------------------------------------------------------------------------ the tile map
@pytest.mark.parametrize("sizes,bm", [([0, 1, 15, 16, 17, 0], 16), ([5, 0, 0, 40, 3], 16), ([0, 0, 0], 16),
                                      ([33], 32)])
def test_tile_map_covers_each_row_once(sizes, bm):
    """Every row of a group lies in exactly one live tile of that group; slack tiles are empty."""
    m = sum(sizes) + 2
    ends = ends_of(sizes, "cpu")
    n_tiles = math.ceil(m / bm) + len(sizes)
    group, row0, row_end = gg._tile_map(ends, m, bm, n_tiles)
    owner = torch.full((m,), -1)
    for g, r0, r1 in zip(group.tolist(), row0.tolist(), row_end.tolist()):
        rows = torch.arange(r0, min(r0 + bm, r1))
        assert (owner[rows] == -1).all()
        owner[rows] = g
    want = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    assert torch.equal(owner[:sum(sizes)], want) and (owner[sum(sizes):] == -1).all()
    assert sum(math.ceil(s / bm) for s in sizes) <= n_tiles


# ------------------------------------------------------------------------------------------------ bf16 / fp32
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bm", [16, 32])
def test_group_edges(dtype, bm):
    """Groups of 0, 1, BM-1, BM, BM+1 rows and an empty last group; 3 rows past ends[-1] come out 0."""
    sizes = [0, 1, bm - 1, bm, bm + 1, 0]
    a, b, ends = make(sizes, 40, 48, dtype, seed=bm)
    assert gg.choose_tiles(a.shape[0], 40, 48, len(sizes), dtype)[0] == bm  # the sizes sit on BM's edges
    check(a, b, ends)


def test_one_group_holds_every_row_and_n_blocks():
    """All rows in one group (between two empty ones); N=136: two column blocks of 128, the second partial."""
    a, b, ends = make([0, 37, 0], 136, 40, torch.float32, extra=0, seed=1)
    check(a, b, ends)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_no_rows(dtype):
    a, b, ends = make([0, 0], 40, 48, dtype, extra=0)
    assert grouped_gemm(a, b, ends).shape == (0, 40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_equals_torch_grouped_mm(dtype):
    """The bank layout (G, N, K) is torch._grouped_mm's b (G, K, N) transposed; rows past ends[-1] are undefined
    there, so only the grouped rows are compared."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    a, b, ends = make([3, 0, 17, 9], 40, 48, dtype, seed=2)
    try:
        want = torch._grouped_mm(a, b.transpose(1, 2), offs=ends)
    except RuntimeError as e:
        pytest.skip(f"torch._grouped_mm does not run this here: {e}")
    got = grouped_gemm(a, b, ends)
    r = int(ends[-1])
    close(got[:r], want[:r], TOL[dtype])


# ------------------------------------------------------------------------------------------------ FP8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block", [(16, 16), (32, 32)], ids=["b16", "b32"])
def test_fp8_partial_blocks(dtype, block):
    """N=40, K=48: the last block row and (with 32 x 32) the last block column are partial."""
    a, w, ends = make([0, 1, 15, 17, 0], 40, 48, torch.float32, seed=3)
    q, s = quantize_blockwise(w, block)  # (G, 40, 48) e4m3, (G, nb_N, nb_K) fp32
    check(a.to(dtype), q, ends, scale=s, block=block)


def test_fp8_column_blocks_cross_scale_blocks():
    """N=136 with 32-row blocks: a 128-column tile spans four scale block rows, the second tile a partial one."""
    a, w, ends = make([9, 0, 20], 136, 64, torch.float32, seed=4)
    q, s = quantize_blockwise(w, (32, 32))
    check(a.bfloat16(), q, ends, scale=s, block=(32, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp8_split_rows_gate_over_up(dtype):
    """gate_up (G, 2I, H) with I=24 and 16 x 16 blocks: gate and up quantized apart, 2 + 2 block rows (not 3)."""
    I = 24
    a, w, ends = make([4, 17, 0, 12], 2 * I, 40, torch.float32, seed=5)
    q, s = quantize_blockwise(w, (16, 16), split_rows=I)
    assert s.shape[1] == 4
    got = check(a.to(dtype), q, ends, scale=s, block=(16, 16), split_rows=I)
    flat = grouped_gemm(a.to(dtype), q, ends, scale=s[:, [0, 1, 3]], block=(16, 16))  # the wrong (unsplit) map
    assert not torch.allclose(got.float(), flat.float(), atol=1e-2)


def test_errors():
    a, w, ends = make([3, 4], 40, 48, torch.float32)
    q, s = quantize_blockwise(w, (16, 16))
    with pytest.raises(ValueError, match="scale and block"):
        grouped_gemm(a, q, ends)
    with pytest.raises(ValueError, match="must agree"):
        grouped_gemm(a, w.bfloat16(), ends)
    with pytest.raises(ValueError, match="do not agree"):
        grouped_gemm(a, w[:, :, :-1], ends)
    with pytest.raises(ValueError, match="does not fit"):
        grouped_gemm(a, q, ends, scale=s[:, :-1], block=(16, 16))
    q24, s24 = quantize_blockwise(w, (24, 24))  # a K step must divide 24 and be a power of two >= 16: none is
    with pytest.raises(ValueError, match="block width 24"):
        grouped_gemm(a, q24, ends, scale=s24, block=(24, 24))
    with pytest.raises(ValueError, match="activations must be"):  # FP8 activations: refused, not multiplied in FP8
        grouped_gemm(a.to(FP8), q, ends, scale=s, block=(16, 16))


# ------------------------------------------------------------------------------------------------ the MoE fusions
def swiglu_loop(a, b, ends, rows, **fp8):
    """The definition, in fp32 from `loop`: gather a's rows, multiply, silu(gate) * up."""
    h = loop(a[rows.long()], b, ends, **fp8)  # (m, 2I)
    gate, up = h.chunk(2, -1)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fp8", [False, True], ids=["16bit", "fp8"])
def test_rows_and_swiglu(dtype, fp8):
    """rows: the kernel reads a[rows[r]] (a permutation with repeats, of a shorter a); swiglu: silu(gate) * up of
    gate over up, I=24 (FP8: gate and up quantized apart, 16 x 16 blocks). Against the reference, the fp32 loop,
    and the unfused kernel (gather, GEMM, then silu * up as torch ops)."""
    I, sizes = 24, [4, 0, 17, 12, 1]
    a, w, ends = make(sizes, 2 * I, 40, torch.float32, seed=11)
    a, w = a * 0.3, w * 0.3  # gate and up O(1): bf16's rounding of each stays within the tolerance of the product
    g = torch.Generator().manual_seed(12)
    rows = torch.randint(0, 9, (a.shape[0],), generator=g).to(DEV)  # rows of a 9-row activation
    x = a[:9].to(dtype)
    kw = {}
    if fp8:
        q, sc = quantize_blockwise(w, (16, 16), split_rows=I)
        w, kw = q, dict(scale=sc, block=(16, 16), split_rows=I)
    else:
        w = w.to(dtype)
    got = grouped_gemm(x, w, ends, rows=rows, swiglu=True, **kw)
    assert got.shape == (a.shape[0], I) and got.dtype == dtype
    tol = 2 * TOL[dtype]  # bf16: gate and up rounded, then their product: two roundings of O(1) values
    close(got, grouped_gemm_reference(x, w, ends, rows=rows, swiglu=True, **kw), tol)
    close(got.cpu(), swiglu_loop(x.cpu(), w.cpu(), ends.cpu(), rows.cpu(),
                                 **{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()}), tol)
    gate, up = grouped_gemm(x[rows], w, ends, **kw).chunk(2, -1)
    unfused = torch.nn.functional.silu(gate) * up
    if dtype == torch.float32:
        close(got, unfused, 1e-6)
    else:  # the same rounding steps: equal but for silu's exp (Triton's vs torch's), within a bf16 ulp or two
        assert ((got.float() - unfused.float()).abs() <= unfused.float().abs() * 2 ** -6 + 1e-6).all()
    assert not got[int(ends[-1]):].any()
    with pytest.raises(ValueError, match="two equal halves"):
        grouped_gemm(x, w[:, :-1] if not fp8 else w, ends, rows=rows, swiglu=True,
                     **(dict(kw, split_rows=I - 8) if fp8 else {}))
    with pytest.raises(ValueError, match="1-d integer"):
        grouped_gemm(x, w, ends, rows=rows.float(), **kw)


@pytest.mark.parametrize("programs", [1, 3, 7])
def test_capped_grid_loops_over_every_tile(programs):
    """programs=P: P programs, each looping over the output tiles pid, pid + P, ... (a persistent grid): bit-equal
    to one program a tile, plain and with rows + swiglu, with more tiles than programs and (7) a short last
    round."""
    I, sizes = 24, [4, 0, 17, 12, 1, 20]
    a, w, ends = make(sizes, 2 * I, 40, torch.float32, seed=13)
    rows = torch.randint(0, a.shape[0], (a.shape[0],), generator=torch.Generator().manual_seed(3)).to(DEV)
    for extra in ({}, dict(rows=rows, swiglu=True)):
        want = grouped_gemm(a, w, ends, **extra)
        got = grouped_gemm(a, w, ends, programs=programs, **extra)
        assert torch.equal(got, want)
        assert got.abs().sum() > 0  # every tile's rows written, not zeros from a skipped tile
        close(got, grouped_gemm_reference(a, w, ends, **extra), TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fp8", [False, True], ids=["16bit", "fp8"])
def test_swapped_tiles_equal_the_plain_tiles(monkeypatch, dtype, fp8):
    """choose_swap -> True: each tile computed transposed (w x^T, scales per row of the tile, turned back before
    the epilogue) equals the plain tile's result (choose_swap -> False), plain and with rows + swiglu, 16-bit and
    FP8 banks."""
    I, sizes = 24, [4, 0, 17, 12, 1, 20]
    a, w, ends = make(sizes, 2 * I, 48, torch.float32, seed=17)
    a, w = a * 0.3, w * 0.3
    rows = torch.randint(0, a.shape[0], (a.shape[0],), generator=torch.Generator().manual_seed(4)).to(DEV)
    kw = {}
    if fp8:
        q, sc = quantize_blockwise(w, (16, 16), split_rows=I)
        w, kw = q, dict(scale=sc, block=(16, 16), split_rows=I)
    else:
        w = w.to(dtype)
    x = a.to(dtype)
    assert gg.choose_swap(1, 2, 3, 4, dtype, kw.get("block")) == (not fp8)  # the rule: 16-bit banks swap
    for extra in ({}, dict(rows=rows, swiglu=True)):
        monkeypatch.setattr(gg, "choose_swap", lambda *args, **kws: False)
        want = grouped_gemm(x, w, ends, **kw, **extra)
        monkeypatch.setattr(gg, "choose_swap", lambda *args, **kws: True)
        got = grouped_gemm(x, w, ends, **kw, **extra)
        monkeypatch.undo()
        close(got, want, 1e-6 if dtype == torch.float32 else 2 ** -7)
        if dtype == torch.float32:  # (the plain tiles' bf16 agreement with the reference: the tests above)
            close(got, grouped_gemm_reference(x, w, ends, **kw, **extra), TOL[dtype])
        assert not got[int(ends[-1]):].any()


def test_zero_rest_false_writes_every_group_row():
    """zero_rest=False: the output starts uninitialised (filled with NaN here to show it); every row of a group is
    still written, equal to the zeroed launch, and only rows past ends[-1] keep what was there."""
    a, w, ends = make([4, 0, 17, 12, 1], 24, 40, torch.float32, extra=5, seed=21)
    want = grouped_gemm(a, w, ends)
    real_empty = torch.empty
    try:
        torch.empty = lambda *s, **kw: real_empty(*s, **kw).fill_(float("nan"))  # noqa: E731
        got = grouped_gemm(a, w, ends, zero_rest=False)
    finally:
        torch.empty = real_empty
    end = int(ends[-1])
    assert torch.equal(got[:end], want[:end])
    assert got[end:].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_combine_slots(dtype):
    """out += sum_j w * y[pos] over the slots with pos >= 0: the kernel, its reference, and the scatter-back form
    it replaces (ys[order] = y, masked, an fp32 einsum); H=40: one 64-channel block, partly masked."""
    g = torch.Generator().manual_seed(13)
    n, k, H = 7, 3, 40
    y = torch.randn(n * k + 2, H, generator=g).to(DEV, dtype)
    order = torch.randperm(n * k, generator=g)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(n * k)
    mine = torch.rand(n, k, generator=g) > 0.3
    pos = torch.where(mine.flatten(), pos, -1).view(n, k).to(DEV)
    w = torch.rand(n, k, generator=g).to(DEV)
    base = torch.randn(n, H, generator=g).to(DEV, dtype)
    got = combine_slots(y, pos, w, base.clone())
    close(got, combine_slots_reference(y, pos, w, base.clone()), TOL[dtype])  # bf16: within an ulp
    ys = torch.empty(n * k, H, device=DEV, dtype=dtype)
    ys[order.to(DEV)] = y[:n * k]  # the old form (experts.py's torch path): scatter back to (token, slot) order
    ys = torch.where(mine.flatten().to(DEV)[:, None], ys, 0.0).view(n, k, H)
    old = base.clone().add_(torch.einsum("nkh,nk->nh", ys.float(), torch.where(mine.to(DEV), w, 0.0)).to(dtype))
    close(got, old, TOL[dtype])
    with pytest.raises(ValueError, match="do not agree"):
        combine_slots(y, pos, w[:, :2], base.clone())


# ------------------------------------------------------------------------------------------------ the custom op
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_custom_op_compiled_graph(dynamic):
    """torch.compile(fullgraph=True) traces the wrapper and the opaque op; dynamic: the row count symbolic (a
    second call with more rows reuses the graph)."""
    a, w, ends = make([5, 0, 11], 40, 48, torch.float32, seed=6)
    q, s = quantize_blockwise(w, (16, 16))
    want = grouped_gemm(a, q, ends, scale=s, block=(16, 16))

    def step(a, q, ends, s):
        y = grouped_gemm(a * 1, q, ends, scale=s, block=(16, 16))
        return y, y + 1  # the op between ordinary ops

    backend = "inductor" if a.is_cuda else "aot_eager"  # the CPU: trace and partition, no C++ compiler needed
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend, dynamic=dynamic)
    got, plus = compiled(a, q, ends, s)
    assert torch.equal(got, want)
    close(plus, want + 1, 1e-6)
    if dynamic:
        a2 = torch.randn(a.shape[0] + 9, a.shape[1], device=a.device)
        close(compiled(a2, q, ends, s)[0], grouped_gemm_reference(a2, q, ends, scale=s, block=(16, 16)), 1e-5)


def test_custom_op_opcheck_and_fake_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    a, b, ends = make([2, 0, 5], 24, 32, torch.float32, seed=7)
    bm = gg.choose_tiles(a.shape[0], 24, 32, 3, a.dtype)[0]
    tiles = gg._tile_map(ends, a.shape[0], bm, a.shape[0] // bm + 1 + 3)  # (group, row0, row_end)
    torch.library.opcheck(torch.ops.longcat_ref.grouped_gemm.default, (a, b, *tiles, bm, None, None, None))
    q, s = quantize_blockwise(b, (16, 16))  # (opcheck cannot compare fp8 tensors on the CPU: the fake shape only)
    real = (a.bfloat16(), q, *tiles, s)
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(t) for t in real]
        out = torch.ops.longcat_ref.grouped_gemm(*args[:5], bm, args[5], [16, 16], None)
    assert out.shape == (a.shape[0], 24) and out.dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU error")
def test_cpu_without_the_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a, b, ends = make([2, 3], 16, 16)
    with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
        grouped_gemm(a, b, ends)


# ------------------------------------------------------------------------------------------------ GPU only
def prefill(G=64, N=4096, K=6144, m=2048 * 12 // 8, seed=8):
    """LongCat-Flash gate_up for 64 of its experts (one EP rank of 8): 2048 tokens x 12 slots / 8 ranks rows,
    split among the experts at random (some empty), 8 rows past ends[-1]."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    cut = torch.randint(0, m - 8, (G - 1,), generator=g, device="cuda").sort().values
    ends = torch.cat([cut, cut.new_tensor([m - 8])]).to(torch.int32)
    ends[G // 2] = ends[G // 2 - 1]  # an empty group for sure
    a = (torch.randn(m, K, generator=g, device="cuda") * 0.5).bfloat16()
    w = torch.randn(G, N, K, generator=g, device="cuda", dtype=torch.bfloat16) * 0.02
    return a, w, ends


@cuda
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_gpu_longcat_prefill(fp8):
    a, w, ends = prefill()
    kw = {}
    if fp8:
        w, s = quantize_blockwise(w, (128, 128))
        kw = dict(scale=s, block=(128, 128))
    got = grouped_gemm(a, w, ends, **kw)
    want = grouped_gemm_reference(a, w, ends, **kw)
    truth = grouped_gemm_reference(a.float(), w if fp8 else w.float(), ends, **kw)  # fp32
    torch.cuda.synchronize()
    assert not got[int(ends[-1]):].any()
    for ref in (want, truth):
        assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    close(got, truth, 2e-2)


@cuda
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_gpu_cuda_graph_and_torch_compile(fp8):
    a, w, ends = prefill(G=16, N=1024, K=2048, m=1536)
    kw = {}
    if fp8:
        w, s = quantize_blockwise(w, (128, 128))
        kw = dict(scale=s, block=(128, 128))

    def step(a, ends):
        return grouped_gemm(a, w, ends, **kw)

    side = torch.cuda.Stream()  # warm up (compiles the kernel) outside the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(a, ends)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(a, ends)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, ends: (step(a * 1, ends), a + 1), fullgraph=True)
    for seed in (9, 10):  # new rows and new group sizes copied into the captured buffers
        a2, _, ends2 = prefill(G=16, N=8, K=2048, m=1536, seed=seed)
        a.copy_(a2), ends.copy_(ends2)
        graph.replay()
        eager = step(a, ends)
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager)
        got, _ = compiled(a, ends)
        assert torch.equal(got, eager)
        want = grouped_gemm_reference(a, w, ends, **kw)
        assert ((eager.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


@cuda
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_gpu_expert_kernels_equal_the_torch_ops(fp8):
    """model/experts.py's kernel path (rows read in place, SwiGLU in gate_up's epilogue, the slot sum in
    combine_slots) against the torch-op path it replaces, at LongCat-Flash's expert sizes (64 experts of one EP rank,
    1,024 tokens x 12 slots, a third of the slots not this rank's), and captured in a CUDA graph."""
    from longcat_ref.model.experts import Experts

    g = torch.Generator(device="cuda").manual_seed(14)
    ex = Experts(64, 6144, 2048, first_expert=64).cuda().bfloat16()
    with torch.no_grad():
        ex.gate_up_proj.normal_(generator=g).mul_(0.02)
        ex.down_proj.normal_(generator=g).mul_(0.02)
    n = 1024
    x = torch.randn(n, 6144, generator=g, device="cuda").bfloat16()
    idx = torch.randint(0, 192, (n, 12), generator=g, device="cuda")  # ids 0..63 and 128..191: not ours
    w = torch.rand(n, 12, generator=g, device="cuda")
    with torch.no_grad():
        want = ex.forward_grouped(x, w, idx, torch.zeros_like(x))  # torch._grouped_mm and torch ops
        if fp8:  # the bank held in FP8 as a checkpoint stores it (gate and up quantized apart)
            gu = quantize_blockwise(ex.gate_up_proj.data, (128, 128), split_rows=ex.inter)
            d = quantize_blockwise(ex.down_proj.data, (128, 128))
            ex.to_fp8_((128, 128))
            (ex.gate_up_proj.data, ex.gate_up_proj_scale_inv), (ex.down_proj.data, ex.down_proj_scale_inv) = gu, d
            want = ex.forward_loop(x, w, idx, torch.zeros_like(x))  # the FP8 bank's own reference
        got = ex.forward_grouped(x, w, idx, torch.zeros_like(x), gemm="triton")
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < (2e-2 if fp8 else 1e-2)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            ex.forward_grouped(x, w, idx, torch.zeros_like(x), gemm="triton")
        torch.cuda.current_stream().wait_stream(side)
        graph, out = torch.cuda.CUDAGraph(), torch.zeros_like(x)
        with torch.cuda.graph(graph):
            ex.forward_grouped(x, w, idx, out, gemm="triton")
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, got)


@cuda
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_gpu_tall_groups_and_swiglu(fp8):
    """Groups of ~200 rows (BM = 128: LongCat-Flash's 8k-token prefill), plain and with rows + swiglu (gate over up,
    FP8: quantized apart), against the reference."""
    a, w, ends = prefill(G=16, N=1024, K=2048, m=16 * 200)
    assert gg.choose_tiles(a.shape[0], 1024, 2048, 16, a.dtype)[0] == 128
    kw = {}
    if fp8:
        w, s = quantize_blockwise(w, (128, 128), split_rows=512)
        kw = dict(scale=s, block=(128, 128), split_rows=512)
    rows = torch.randperm(a.shape[0], device="cuda")
    for extra in ({}, dict(rows=rows, swiglu=True)):
        got = grouped_gemm(a, w, ends, **kw, **extra)
        want = grouped_gemm_reference(a, w, ends, **kw, **extra)
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2
        assert not got[int(ends[-1]):].any()
