"""Every fast path equals the readable one: grouped/gathered experts, vectorised zero experts, SDPA prefill,
the static cache with its fixed-shape decode step, generate(fast=True), torch.compile (compiled once, whatever the
prompt length), CUDA graphs (GPU only)."""

import contextlib
import copy
from pathlib import Path
import os
import subprocess
import sys

import einops._backends
import pytest
import torch

import longcat_ref as L
from longcat_ref.kernels.support import can_run
from longcat_ref.model.experts import Experts, grouped_mm, padded_grouped_mm
from longcat_ref.model.generate import Decoder
from longcat_ref.model.moe import add_identity_experts, add_identity_experts_vectorised

KINDS = ["longcat", "glm"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny(kind, dtype=torch.float32, **kw):
    cfg = L.tiny_longcat(**kw) if kind == "longcat" else L.tiny_glm(**kw)
    return L.init_weights(L.CausalLM(cfg), seed=1, std=0.08, bias_std=0.05).to(dtype).eval()


def padded_batch(seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize("n", [1, 3, 37])
@pytest.mark.parametrize("first", [0, 5])
def test_expert_forms_equal(n, first):
    """loop == grouped == gather, with ids outside this bank (zero experts, other ranks' experts) skipped."""
    g = torch.Generator().manual_seed(n + first)
    ex = Experts(8, 16, 12, first_expert=first)
    with torch.no_grad():
        ex.gate_up_proj.normal_(generator=g).mul_(0.3)  # outputs O(1): fp32 tolerances stay meaningful across
        ex.down_proj.normal_(generator=g).mul_(0.3)  # torch builds with other summation orders
    x = torch.randn(n, 16, generator=g)
    idx = torch.randint(0, 20, (n, 3), generator=g)  # global ids: some below first, some past the bank
    idx[0, 0] = first + 2  # at least one ours
    w = torch.rand(n, 3, generator=g)
    ref = ex.forward_loop(x, w, idx, torch.zeros(n, 16))
    assert ref.abs().sum() > 0
    kernels = ("fused", "grouped_triton") if can_run(x) else ()  # the Triton kernels, here in the interpreter
    for impl in ("grouped", "gather", "gemv", "auto") + kernels:
        with torch.no_grad():
            torch.testing.assert_close(ex(x, w, idx, torch.zeros(n, 16), impl=impl), ref, rtol=1e-5, atol=1e-5,
                                       msg=impl)
    with pytest.raises(ValueError, match="gemm 'cublas' is not"):
        ex.forward_grouped(x, w, idx, torch.zeros(n, 16), gemm="cublas")


def test_auto_picks_gemv_only_inside_compile(monkeypatch):
    """The gemv form materialises weights * x eagerly: "auto" may pick it only where torch.compile fuses it."""
    ex = Experts(8, 16, 12)
    x, idx = torch.randn(2, 16), torch.zeros(2, 4, dtype=torch.long)
    assert ex.choose(x, idx) == "gather"
    assert ex.choose(torch.randn(40, 16), torch.zeros(40, 4, dtype=torch.long)) == "grouped"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert ex.choose(x, idx) == "gemv"
    assert ex.choose(torch.randn(40, 16), torch.zeros(40, 4, dtype=torch.long)) == "grouped"


def test_padded_grouped_mm_equals_grouped_mm():
    """The fallback for torch builds without a grouped matmul: same result, empty groups included."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(11, 8, generator=g), torch.randn(4, 8, 8, generator=g)  # 16-byte rows: the real kernel
    ends = torch.tensor([3, 3, 9, 10], dtype=torch.int32)  # group 1 empty; row 10 past the end (junk allowed)
    ref = torch.cat([a[s:e] @ b[i] for i, (s, e) in enumerate(zip([0, 3, 3, 9], ends.tolist()))])
    torch.testing.assert_close(padded_grouped_mm(a, b, ends)[:10], ref)
    torch.testing.assert_close(grouped_mm(a, b, ends)[:10], ref)


def test_zero_experts_vectorised():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(9, 6, generator=g), torch.rand(9, 4, generator=g)
    idx = torch.randint(0, 12, (9, 4), generator=g)
    a = add_identity_experts(x, w, idx, 7, torch.zeros(9, 6))
    b = add_identity_experts_vectorised(x, w, idx, 7, torch.zeros(9, 6))
    assert a.abs().sum() > 0
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("forms", [L.PREFILL, L.DECODE, L.Forms("sdpa", "grouped"), L.Forms("naive", "gather"),
                                   L.Forms("absorbed", "gather", linear="gemv")])
def test_fast_forms_equal_reference(kind, forms):
    """Each fast combination of forms == the reference forward, on a left-padded batch."""
    m = tiny(kind)
    ids, mask = padded_batch(1)
    with torch.no_grad():
        ref = m(ids, attention_mask=mask)
        got = m(ids, attention_mask=mask, forms=forms)
        causal = m(ids[:1, 4:], forms=forms)  # no mask, no cache: SDPA may run is_causal
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(causal, m(ids[:1, 4:]), atol=1e-5, rtol=1e-5)


def test_linear_gemv_form_equals_the_module():
    """linear(m, x, "gemv") == m(x) for an nn.Linear with and without bias; a subclass (FP8, row-parallel) runs its
    own forward; "auto" is plain outside torch.compile; the per-head W_uk / W_uv products too."""
    from longcat_ref.model.linear import linear
    from longcat_ref.model.mla import MLA
    from longcat_ref.model.router import Router

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 24, generator=g)
    for bias in (False, True):
        m = L.init_weights(torch.nn.Linear(24, 40, bias=bias), seed=1, std=0.2)  # the bias too: normal(0, std)
        torch.testing.assert_close(linear(m, x, "gemv"), m(x), atol=1e-5, rtol=1e-5)
        assert torch.equal(linear(m, x, "auto"), m(x)) and torch.equal(linear(m, x), m(x))

    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    d = L.init_weights(Doubled(24, 8), seed=2, std=0.2)
    assert torch.equal(linear(d, x, "gemv"), d(x))
    q, w_uk = torch.randn(2, 4, 3, 6, generator=g), torch.randn(4, 6, 10, generator=g)
    o, w_uv = torch.randn(2, 4, 3, 10, generator=g), torch.randn(4, 5, 10, generator=g)
    torch.testing.assert_close(MLA.fold_query(q, w_uk, "gemv"), MLA.fold_query(q, w_uk), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(MLA.unfold_output(o, w_uv, "gemv"), MLA.unfold_output(o, w_uv),
                               atol=1e-5, rtol=1e-5)
    for cfg in (L.tiny_longcat(), L.tiny_glm()):  # the router's fp32 logits, its weight in bf16 as loaded
        router = L.init_weights(Router(cfg), seed=3, std=0.2).bfloat16()
        h = torch.randn(5, cfg.hidden_size, generator=g).bfloat16()
        want = h.float() @ router.weight.float().T  # (n, E): the formula, in fp32
        got = router.logits(h, "gemv")
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(router.logits(h), want, atol=1e-5, rtol=1e-5)
        w_g, i_g = router(h, "plain", "gemv")
        w_p, i_p = router(h)
        assert torch.equal(i_g.sort(-1).values, i_p.sort(-1).values)
    with pytest.raises(ValueError, match="linear form 'cublas' is not one of"):
        L.Forms(linear="cublas")


def test_auto_attention_form():
    """attention="auto": the kernel for a few query tokens where the kernels run, W_uv's product inside its merge
    step for at most FUSED_UV_MAX_ROWS query tokens in the whole batch (batch 1 decode, a short verify), the
    absorbed einsums otherwise. A function of shapes only."""
    from longcat_ref.model import mla

    from longcat_ref.kernels import mla_decode

    assert mla.FUSED_UV_MAX_ROWS == 4 and mla.FUSED_MAX_QUERIES == 4 and mla.FUSED_UV_MAX_CHUNKS == 8
    assert mla.auto_form(1, 1, True) == "fused_uv" and mla.auto_form(2, 2, True) == "fused_uv"
    assert mla.auto_form(1, 4, True) == "fused_uv" and mla.auto_form(5, 1, True) == "fused"
    assert mla.auto_form(32, 1, True) == "fused" and mla.auto_form(1, 5, True) == "absorbed"
    assert mla.auto_form(1, 1, False) == "absorbed"
    assert mla.auto_form(1, 1, True, chunks=8) == "fused_uv" and mla.auto_form(1, 1, True, chunks=9) == "fused"
    # the chunk counts of the measured cases (132 SMs): GLM-4.7-Flash at 128 slots, LongCat-Flash at 1,024
    assert mla_decode.chunks(1, 20, 1, 512, 64, 128, 2, "cpu") == 4
    assert mla_decode.chunks(1, 64, 1, 512, 64, 1024, 2, "cpu") == 32


def test_w_uk_product_goes_to_cublas_under_auto(monkeypatch):
    """linear="auto": W_uk's product (summed over the weight's strided axis) runs through cuBLAS even where W_uv's
    runs as gemv (measured faster, mla.fold_form): eagerly plain, inside torch.compile "bmm" (the same einsum as an
    opaque op); an explicit form is kept for both."""
    from longcat_ref.model import mla

    assert mla.fold_form("auto", "gemv") == "plain" and mla.fold_form("auto", "plain") == "plain"
    assert mla.fold_form("gemv", "gemv") == "gemv" and mla.fold_form("triton", "triton") == "triton"
    q, w = torch.randn(2, 3, 1, 8), torch.randn(3, 16, 5)[:, :8]  # W_uk: a strided slice, as kv_b_split gives
    assert torch.equal(mla.MLA.fold_query(q, w, "bmm"), mla.MLA.fold_query(q, w, "plain"))  # the op: one einsum
    seen = []
    fold = mla.MLA.fold_query
    monkeypatch.setattr(mla.MLA, "fold_query", staticmethod(lambda q, w, linear="plain": seen.append(linear)
                                                            or fold(q, w, linear)))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # where "auto" picks gemv for W_uv
    m = tiny("glm")
    with torch.no_grad():
        m(torch.ones(1, 1, dtype=torch.long), forms=L.Forms(attention="absorbed", linear="auto"))
        m(torch.ones(1, 1, dtype=torch.long), forms=L.Forms(attention="absorbed", linear="gemv"))
    n = m.config.num_attn_sublayers
    assert n > 0 and seen == ["bmm"] * n + ["gemv"] * n  # compiling: the einsum as an op inductor cannot restride


@pytest.mark.skipif(not can_run(torch.empty(0)), reason="the rope kernel needs Triton (here: its interpreter)")
@pytest.mark.parametrize("kind", KINDS)
def test_w_uk_product_reads_the_whole_query_after_the_rope_kernel(kind, monkeypatch):
    """With rope "fused" and W_uk's product as "bmm" (linear="auto" while compiling), the op gets the whole query
    the rope kernel read (nope + rope channels; LongCat's q scale applied inside), not a slice that inductor would
    copy: the same numbers as the plain rope path, bit for bit in fp32's tolerance."""
    from longcat_ref.model import mla

    q, w = torch.randn(2, 3, 1, 12), torch.randn(3, 16, 5)[:, :8]  # whole query (nope 8 + rope 4), W_uk a slice
    want = torch.einsum("bhtd,hdr->bhtr", q[..., :8] * 2.0, w)
    assert torch.equal(mla._fold_bmm(q, w, 2.0), want)
    torch.library.opcheck(torch.ops.longcat_ref.fold_bmm.default, (q, w, 2.0), test_utils=("test_schema",
                                                                                           "test_faketensor"))
    seen = []
    op = mla._fold_bmm
    monkeypatch.setattr(mla, "_fold_bmm", lambda q, w, scale=1.0: seen.append(q.shape[-1]) or op(q, w, scale))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # linear="auto" -> gemv, W_uk's -> "bmm"
    m = tiny(kind)
    ids = torch.randint(4, 512, (2, 6), generator=torch.Generator().manual_seed(8))
    out = {}
    with torch.no_grad():
        for rope in ("plain", "fused"):
            cache = m.new_cache(2, 8)
            m(ids[:, :5], cache=cache, forms=L.Forms(attention="absorbed"))  # prefill: plain
            seen.clear()
            out[rope] = m(ids[:, 5:], cache=cache, forms=L.Forms(attention="absorbed", linear="auto", rope=rope))
            widths = {"plain": m.config.qk_nope_head_dim,  # q_nope, sliced (and scaled) before the op
                      "fused": m.config.qk_nope_head_dim + m.config.qk_rope_head_dim}[rope]  # the whole query
            assert seen == [widths] * m.config.num_attn_sublayers, rope
    torch.testing.assert_close(out["fused"], out["plain"], atol=1e-5, rtol=1e-5)


def test_linear_auto_picks_gemv_only_while_compiling_for_few_tokens_and_small_weights(monkeypatch):
    from longcat_ref.model import linear as lin

    x1, x8 = torch.zeros(1, 1, 8), torch.zeros(2, 4, 8)
    assert lin.resolve("auto", x1, 100) == "plain"  # eager: never gemv
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert lin.resolve("auto", x1, 100) == "gemv"
    assert lin.resolve("auto", x1, lin.GEMV_MAX_WEIGHT + 1) == "plain"  # a large weight stays with cuBLAS
    assert lin.resolve("auto", x8, 100) == "plain"  # 8 tokens > GEMV_MAX_TOKENS
    assert lin.resolve("gemv", x8, 10**9) == "gemv" and lin.resolve("plain", x1, 1) == "plain"  # explicit forms


@pytest.mark.parametrize("kind", KINDS)
def test_decoder_equals_plain_forward(kind):
    """Prefill and every fixed-shape decode step give the logits of a plain forward over the whole sequence."""
    m = tiny(kind)
    ids, mask = padded_batch(2)
    dec = Decoder(m, batch=3, max_len=16, graphs=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        logits = dec.prefill(ids, mask)
        torch.testing.assert_close(logits, m(ids, attention_mask=mask)[:, -1], atol=1e-5, rtol=1e-5)
        for _ in range(5):
            nxt = torch.randint(4, 512, (3,), generator=g)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
            torch.testing.assert_close(dec.step(nxt), m(ids, attention_mask=mask)[:, -1], atol=1e-5, rtol=1e-5)
    assert dec.length == 15 and int(dec.cache_position) == 15


@pytest.mark.parametrize("kind", KINDS)
def test_generate_fast_equals_plain(kind):
    m = tiny(kind)
    ids, mask = padded_batch(4)
    a = m.generate(ids, max_new_tokens=8, attention_mask=mask)
    b = m.generate(ids, max_new_tokens=8, attention_mask=mask, fast=True)
    assert torch.equal(a, b)
    a = m.generate(ids[:1], max_new_tokens=6, temperature=0.8, top_p=0.9, seed=3)
    b = m.generate(ids[:1], max_new_tokens=6, temperature=0.8, top_p=0.9, seed=3, fast=True)
    assert torch.equal(a, b)
    # a second call with another prompt reuses the kept decoder (same bucket): a stale cache must not leak in
    c = m.generate(ids[1:2, 2:], max_new_tokens=5, fast=True)
    assert torch.equal(c, m.generate(ids[1:2, 2:], max_new_tokens=5))
    assert len(m._decoders) == 2  # batch 3 and batch 1, one bucket each


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_graph_pads_to_the_bucket_and_gives_the_same_tokens(kind):
    """prefill_graph=True: the prompt left-padded to its bucket (on the CPU eagerly, the same padding) gives the
    plain path's tokens, greedy and sampled, already-padded rows included; the cache then holds the bucket."""
    from longcat_ref.model.generate import prompt_bucket

    m = tiny(kind)
    ids, mask = padded_batch(5)  # (3, 10), rows 0 and 2 left-padded already
    a = m.generate(ids, max_new_tokens=8, attention_mask=mask)
    b = m.generate(ids, max_new_tokens=8, attention_mask=mask, fast=True, prefill_graph=True)
    assert torch.equal(a, b)
    dec = next(d for d in m._decoders.values() if d.prefill_graph)
    assert list(dec.prefills) == [prompt_bucket(10)] == [16] and dec.length == 16 + 7  # bucket + decoded steps
    a = m.generate(ids[:1, 3:], max_new_tokens=6, temperature=0.8, top_p=0.9, seed=3)
    b = m.generate(ids[:1, 3:], max_new_tokens=6, temperature=0.8, top_p=0.9, seed=3, fast=True, prefill_graph=True)
    assert torch.equal(a, b)
    with torch.no_grad():  # the last position's logits themselves, padded prefill against the prompt as it is
        plain = Decoder(m, 3, 64).prefill(ids, mask)
        padded = Decoder(m, 3, 64, prefill_graph=True).prefill(ids, mask)
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-5)


def test_prefill_graph_falls_back_when_the_bucket_leaves_no_room():
    m = tiny("longcat")
    ids = torch.randint(4, 500, (1, 20), generator=torch.Generator().manual_seed(1))  # bucket 32
    dec = Decoder(m, 1, 40, prefill_graph=True)
    with torch.no_grad():
        dec.prefill(ids, room=10)  # 32 + 10 > 40: prefilled as it is
    assert dec.prefills == {} and dec.length == 20
    with torch.no_grad():
        dec.prefill(ids, room=8)  # 32 + 8 fits
    assert list(dec.prefills) == [32] and dec.length == 32
    with pytest.raises(ValueError, match="prefill_graph=True captures the fast path"):
        m.generate(ids, 4, prefill_graph=True)
    with pytest.raises(ValueError, match="prefill_graph must be None"):
        m.generate(ids, 4, fast=True, prefill_graph="yes")


def test_prefill_graph_default_is_off_on_the_cpu():
    """prefill_graph=None (the default) captures only on CUDA: on the CPU the prompt is prefilled as it is (padding
    would only cost there). (tests/test_mtp.py runs speculative decoding with fast=True and this default.)"""
    m = tiny("longcat")
    ids = torch.randint(4, m.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(2))
    m.generate(ids, 3, fast=True)
    assert [d.prefill_graph for d in m._decoders.values()] == [False]
    from longcat_ref.model.generate import auto_prefill_graph

    assert auto_prefill_graph(m, "cuda") and not auto_prefill_graph(m, "cpu")
    m.world_size = 2  # as runtime/parallel.py's shard() marks a sharded model: not captured (not run on GPUs yet)
    assert not auto_prefill_graph(m, "cuda")


def test_bucket_len():
    from longcat_ref.model.generate import bucket_len

    cfg = L.tiny_longcat()  # max_position_embeddings 256
    assert [bucket_len(n, cfg) for n in (1, 17, 256)] == [256, 256, 256]
    big = L.glm_4_7_flash()
    assert [bucket_len(n, big) for n in (100, 257, 1000, 1024, 1025)] == [256, 512, 1024, 1024, 2048]


def test_static_cache_memory_is_the_latent_only():
    cfg = L.longcat_flash_chat()
    with torch.device("meta"):
        c = L.StaticCache.for_model(cfg, batch=1, max_len=128, dtype=torch.bfloat16, device="meta")
    per_sublayer = c.bytes_per_token() // cfg.num_attn_sublayers
    assert per_sublayer == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2 == 1152


def test_decoder_errors():
    m = tiny("longcat")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Decoder(m, 1, 10**6)
    dec = Decoder(m, 1, 4, graphs=False)
    with pytest.raises(ValueError, match="does not fit"):
        dec.prefill(torch.ones(2, 3, dtype=torch.long))
    dec.prefill(torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="overflow"):
        dec.step(torch.ones(1, dtype=torch.long))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            Decoder(m, 1, 4, graphs=True)
    with pytest.raises(ValueError, match="fast=True"):
        m.generate(torch.ones(1, 3, dtype=torch.long), 2, compile=True)


def test_compiled_decode_step_equals_eager_and_compiles_once():
    """torch.compile wraps the model's own forward (through generate's decode step): its greedy tokens equal the
    eager ones, and three prompts of different lengths with different max_new_tokens compile the step ONCE (they
    share one static-cache bucket; dynamo's counters count the compiled frames). Batch 3 x top-2 is a "tiny" batch,
    so the compiled step runs the gemv experts and the gemv projections (DECODE's "auto"), the eager one the
    gathered experts and plain projections."""
    from torch._dynamo.utils import counters

    m = tiny("glm", num_layers=2, mlp_layer_types=["dense", "sparse"])
    torch._dynamo.reset()
    counters.clear()
    einops._backends._type2backend.clear()  # as in a fresh process: einops has seen no tensor types yet
    ids, mask = padded_batch(5)
    prompts = [(ids, mask, 6), (ids[:, 3:], mask[:, 3:], 3), (torch.cat([ids, ids], 1), torch.cat([mask] * 2, 1), 9)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for p, pm, n in prompts:
            got = m.generate(p, n, attention_mask=pm, fast=True, compile=True)
            assert torch.equal(got, m.generate(p, n, attention_mask=pm)), p.shape
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert m._decoders[(3, 256, True, False, m.dtype, m.device)].setup_s > 0  # the one-time compile was timed


def test_critical_path_counts_each_moment_once():
    """bench.critical_path: a kernel costs its end minus the latest end before it. Launched early (PDL), b's
    duration overlaps a's, yet it costs only what it runs past a's end; c, inside b's window, costs nothing; the
    gap before d is d's. The costs sum to the span; durations would count the overlap twice."""
    from longcat_ref.tools.bench import critical_path

    ev = [("d", 9.0, 1.0), ("a", 0.0, 2.0), ("b", 1.0, 4.0), ("c", 2.5, 1.0), ("a", 10.0, 0.5)]  # (name, start, dur)
    got = {n: (calls, cost) for n, calls, cost in critical_path(ev)}
    assert got == {"a": (2, 2.5), "b": (1, 3.0), "c": (1, 0.0), "d": (1, 5.0)}
    assert sum(c for _, c in got.values()) == 10.5 == max(s + d for _, s, d in ev) - min(s for _, s, _ in ev)
    assert [n for n, _, _ in critical_path(ev)] == ["d", "b", "a", "c"] and critical_path([]) == []


def test_bench_b1_rows_replay_one_token_and_count_its_own_experts(monkeypatch):
    """bench's batch-1 rows: every variant replays the same token over the same context, and each row's roofline
    counts the experts *its* step touched (recorded from that step, not left over from an earlier call or from
    the token without its context). Tiny LongCat (zero experts: the count of real experts varies by token)."""
    from longcat_ref.tools import bench

    m = tiny("longcat").eval().requires_grad_(False)
    ceil = dict(bandwidth_Bps=1e12, bf16_flops=1e15)
    run_step = bench.Decoder.run_step

    def replay(dec):  # as a CUDA graph replay or a compiled step: the timed steps record no routing
        kept = [blk.last_idx for blk in dec.model.moe_blocks()]
        out = run_step(dec)
        for blk, idx in zip(dec.model.moe_blocks(), kept):
            blk.last_idx = idx
        return out

    monkeypatch.setattr(bench.Decoder, "run_step", replay)
    rows = []
    with torch.no_grad():
        bench.b1_rows(m, "tiny", 6, "cpu", ceil, rows, ["graph", "graph_gather"])
        _, dec = bench.ours_decode(m, 1, 6, "cpu", experts="grouped", steps=1)
        bench.record_routing(dec)
        want = bench.active_experts(m)[0]  # the replayed token's experts, in its context
        assert [r["experts_touched"] for r in rows] == [want, want]
        for blk in m.moe_blocks():  # a stale routing (another token) must not survive into a row
            blk.last_idx = torch.zeros_like(blk.last_idx)
        bench.b1_rows(m, "tiny", 6, "cpu", ceil, rows, ["graph"])
        assert rows[-1]["experts_touched"] == want


def test_bench_cli_rejects_unknown_section():
    r = subprocess.run([sys.executable, "-m", "longcat_ref.tools.bench", "--only", "nope", "--device", "cpu"],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 2 and "unknown section" in r.stderr


@CUDA
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_graph_decode_equals_eager(kind):
    m = tiny(kind, dtype=torch.bfloat16).cuda()
    ids, mask = (t.cuda() for t in padded_batch(6))
    outs = []
    for graphs in (False, True):
        dec = Decoder(m, batch=3, max_len=16, graphs=graphs)
        with torch.no_grad():
            dec.prefill(ids, mask)
            outs.append(torch.stack([dec.step(torch.full((3,), 9 + i, device="cuda")) for i in range(4)]))
    torch.testing.assert_close(outs[1].float(), outs[0].float(), atol=2e-2, rtol=2e-2)


@CUDA
@pytest.mark.parametrize("kind", KINDS)
def test_programmatic_dependent_launch_changes_no_bit(kind, monkeypatch):
    """Our decode kernels launched with PDL (kernels/support.pdl: sm_90+) give bit for bit the logits of plain
    launches, in a captured CUDA graph, over several steps (a missing gdc_wait would read a half-written input)."""
    from longcat_ref.kernels import support

    m = tiny(kind, dtype=torch.bfloat16).cuda()
    ids, mask = (t.cuda() for t in padded_batch(6))
    outs = []
    for use in (False, True):
        monkeypatch.setattr(support, "USE_PDL", use)
        assert support.pdl(ids) == (use and torch.cuda.get_device_capability()[0] >= 9)
        dec = Decoder(m, batch=3, max_len=16, graphs=True)
        with torch.no_grad():
            dec.prefill(ids, mask)
            outs.append(torch.stack([dec.step(torch.full((3,), 9 + i, device="cuda")) for i in range(5)]))
    assert torch.equal(outs[1], outs[0])


@CUDA
@pytest.mark.parametrize("kind", KINDS)
def test_inductor_pdl_in_the_compiled_step_changes_no_bit(kind, monkeypatch):
    """The compiled decode step with inductor's own kernels launched with PDL (DECODE_INDUCTOR_OPTIONS'
    triton.enable_pdl, where torch has it) gives bit for bit the logits of the step compiled without it, in a
    captured CUDA graph, over several steps: a generated kernel that loaded its input before its gdc_wait would read
    it half written."""
    import longcat_ref.model.generate as G

    if "triton.enable_pdl" not in G.DECODE_INDUCTOR_OPTIONS:
        pytest.skip("this torch's inductor has no triton.enable_pdl")
    m = tiny(kind, dtype=torch.bfloat16).cuda()
    ids, mask = (t.cuda() for t in padded_batch(6))
    outs = []
    for use in (False, True):
        monkeypatch.setitem(G.DECODE_INDUCTOR_OPTIONS, "triton.enable_pdl", use)
        monkeypatch.setattr(G, "_COMPILED", {})  # a fresh torch.compile with these options
        torch._dynamo.reset()
        dec = Decoder(m, batch=3, max_len=16, compile=True)
        with torch.no_grad():
            dec.prefill(ids, mask)
            outs.append(torch.stack([dec.step(torch.full((3,), 9 + i, device="cuda")) for i in range(5)]))
    assert torch.equal(outs[1], outs[0])


def test_decode_step_options_turn_on_inductor_pdl_where_torch_has_it():
    """DECODE_INDUCTOR_OPTIONS asks for inductor's PDL exactly when this torch knows the option (an unknown option
    would make torch.compile raise); on the CPU inductor generates no PDL code either way."""
    import torch._inductor.config as inductor_config

    from longcat_ref.model.generate import DECODE_INDUCTOR_OPTIONS

    assert DECODE_INDUCTOR_OPTIONS.get("triton.enable_pdl", False) == hasattr(inductor_config.triton, "enable_pdl")
    assert DECODE_INDUCTOR_OPTIONS["combo_kernels"] is True


def test_programmatic_dependent_launch_is_for_cuda_only():
    from longcat_ref.kernels import support

    assert not support.pdl(torch.zeros(1))  # the CPU (and Triton's interpreter) launch plainly


def test_auto_sends_16bit_banks_to_the_triton_path_up_to_the_measured_bound(monkeypatch):
    """"auto" on CUDA with Triton: fused for up to 64 pairs, grouped_triton for 16-bit banks up to triton_max_rows
    pairs an expert on average, torch's grouped beyond (and for FP8 banks past the fused bound: "grouped" reads
    FP8 in the kernels anyway). The device test is faked: only the choice is checked here."""
    from longcat_ref.model import experts as E

    ex = Experts(4, 16, 8)
    monkeypatch.setattr(E.support, "have_triton", lambda: True)
    x = type("Cuda", (), {"is_cuda": True, "device": torch.device("cuda")})()
    pairs = lambda n: torch.zeros(n, 1, dtype=torch.long)  # noqa: E731
    assert ex.choose(x, pairs(64)) == "fused"
    assert ex.choose(x, pairs(65)) == "grouped_triton"
    assert ex.choose(x, pairs(E.triton_max_rows() * 4)) == "grouped_triton"
    monkeypatch.setattr(E, "grouped_mm_native", lambda *a: True)
    assert ex.choose(x, pairs(E.triton_max_rows() * 4 + 1)) == "grouped"


@CUDA
def test_cuda_grouped_experts_equal_loop():
    g = torch.Generator(device="cuda").manual_seed(0)
    ex = Experts(16, 64, 32).cuda().to(torch.bfloat16)
    with torch.no_grad():
        ex.gate_up_proj.normal_(generator=g)
        ex.down_proj.normal_(generator=g)
    x = torch.randn(40, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    idx = torch.randint(0, 24, (40, 4), device="cuda", generator=g)
    w = torch.rand(40, 4, device="cuda", generator=g)
    ref = copy.deepcopy(ex).float().forward_loop(x.float(), w, idx, torch.zeros(40, 64, device="cuda"))
    assert ex.choose(x, idx) == "grouped_triton"  # 160 pairs over 16 experts
    for impl in ("grouped", "gather", "gemv", "grouped_triton", "fused"):
        got = ex(x, w, idx, torch.zeros(40, 64, device="cuda", dtype=torch.bfloat16), impl=impl)
        assert float((got.float() - ref).norm() / ref.norm()) < 2e-2, impl


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_generate_on_cuda_captures_and_matches(dtype):
    """The CUDA-graph decode captures in both dtypes (fp32 has no native grouped_mm: no host sync may be captured);
    in fp32 its greedy tokens equal the readable path's."""
    m = L.from_pretrained(Path(L.__file__).parent / "assets" / "tiny-longcat", dtype=dtype, device="cuda")
    ids = torch.tensor([[1, 60, 61, 62, 63], [1, 70, 71, 72, 73]], device="cuda")
    fast = m.generate(ids, 24, fast=True)
    assert fast.shape == (2, 29)
    if dtype == torch.float32:
        assert torch.equal(fast, m.generate(ids, 24))


class _FakeGraphs:
    """torch.cuda's stream and graph API as plain Python (the CPU has no CUDA graph): records what
    Decoder.capture asks of it; `capturing` is True inside a `torch.cuda.graph` block."""

    def __init__(self):
        self.capturing, self.captures, self.current = False, 0, "main"
        self.set_streams = []

    def install(self, monkeypatch):
        fake = self

        class Stream:
            def wait_stream(self, other):
                pass

        class graph:
            def __init__(self, g, stream=None):
                pass

            def __enter__(self):
                fake.capturing, fake.captures = True, fake.captures + 1

            def __exit__(self, *exc):
                fake.capturing = False  # (a real failed capture also leaves its stream current)

        import contextlib
        for name, value in dict(Stream=Stream, stream=lambda s: contextlib.nullcontext(), graph=graph,
                                CUDAGraph=lambda: object(), current_stream=lambda: Stream(),
                                set_stream=lambda st: fake.set_streams.append(st)).items():
            monkeypatch.setattr(torch.cuda, name, value)


@pytest.mark.parametrize("failures", [0, 1, 2])
def test_decoder_capture_retries_a_failed_capture_once(monkeypatch, failures):
    """Decoder.capture's control flow (on the CPU, torch.cuda's graph API faked): CAPTURE_WARMUPS warm-ups from
    the same restored state, then the capture; a capture that raises is retried once after as many warm-ups again
    with a one-line RuntimeWarning, and restores the main stream; a second failure is a one-line RuntimeError that
    says what to do. Warm-ups and failed captures leave the step's inputs where they were."""
    from longcat_ref.model import generate as G

    m = tiny("glm").requires_grad_(False)  # (Decoder.step, which calls capture, runs under no_grad)
    dec = Decoder(m, 1, 64, graphs=False)
    dec.prefill(torch.tensor([[1, 5, 6, 7]]))
    before = [dec.cache_position.clone(), dec.attention_mask.clone()]
    fake, calls, seen = _FakeGraphs(), {"warm": 0, "fail": 0}, set()
    fake.install(monkeypatch)
    step = dec.step_fn

    def flaky(*args):
        if fake.capturing and calls["fail"] < failures:
            calls["fail"] += 1
            try:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")
            except RuntimeError:  # as torch.cuda.graph's end of a failed capture: its own error, chained
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")  # noqa: B904
        calls["warm"] += not fake.capturing
        seen.add(int(args[3]))  # the slot every run starts from (args: model, cache, ids, cache_position, ...)
        return step(*args)

    dec.step_fn = flaky
    if failures < G.CAPTURE_ATTEMPTS:
        with pytest.warns(RuntimeWarning, match="retrying") if failures else contextlib.nullcontext():
            dec.capture()
        assert dec.graph is not None and dec.logits.shape == (1, m.config.vocab_size)
    else:
        with pytest.raises(RuntimeError, match=r"failed 2 times \(last: RuntimeError: CUDA error: operation not "
                                               r"permitted when stream is capturing\); generate\(\.\.\., "
                                               r"compile=False\)") as err:
            with pytest.warns(RuntimeWarning):
                dec.capture()
        assert "\n" not in str(err.value) and dec.graph is None
    attempts = min(failures + 1, G.CAPTURE_ATTEMPTS)
    assert fake.captures == attempts and calls["warm"] == attempts * G.CAPTURE_WARMUPS
    assert len(fake.set_streams) == min(failures, G.CAPTURE_ATTEMPTS)  # the main stream put back per failure
    assert len(dec.failed_captures) == min(failures, G.CAPTURE_ATTEMPTS)  # each failed graph kept alive
    assert seen == {int(before[0])}  # each warm-up (and the capture) from the same restored state
    ran = int(failures < G.CAPTURE_ATTEMPTS)  # the fake ran the step it "captured" (a real capture only records)
    assert int(dec.cache_position) == int(before[0]) + ran  # warm-ups and failed captures leave no trace
    assert int(dec.attention_mask.sum()) == int(before[1].sum()) + ran


@CUDA
def test_capture_retry_on_cuda_recovers_and_matches():
    """On a GPU: the first capture of the decode step fails for real (a synchronize inside it, as inductor's
    first autotuning run did on 2026-12-06), the retry captures it, the main stream is current again, and the
    greedy tokens equal the readable path's (fp32)."""
    m = tiny("glm").cuda()
    ids = torch.tensor([[1, 60, 61, 62, 63]], device="cuda")
    dec = Decoder(m, 1, 64)
    logits = dec.prefill(ids, room=8)
    step, n = dec.step_fn, {"sync": 0}

    def syncs_in_first_capture(*args):
        if torch.cuda.is_current_stream_capturing() and n["sync"] == 0:
            n["sync"] += 1
            torch.cuda.synchronize()  # not permitted while capturing: the capture fails
        return step(*args)

    dec.step_fn = syncs_in_first_capture
    main = torch.cuda.current_stream()
    out = [logits.argmax(-1)]
    with pytest.warns(RuntimeWarning, match="retrying"):
        out.append(dec.step(out[-1]).argmax(-1))
    assert n["sync"] == 1 and torch.cuda.current_stream() == main and len(dec.failed_captures) == 1
    for _ in range(6):
        out.append(dec.step(out[-1]).argmax(-1))
    got = torch.cat([ids, torch.stack(out, 1)], 1)
    assert torch.equal(got, m.generate(ids, 8))


@CUDA
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_generate_on_cuda_matches(kind):
    """The default fast path on CUDA (fast=True, compile=True: DECODE's kernels -- the fused MoE, router, rope and
    MLA kernels with W_uv in the merge at batch 1 -- inside the compiled step with its inductor options), fp32:
    its greedy tokens equal the readable path's, at batch 1 and 3."""
    torch._dynamo.reset()
    m = tiny(kind).cuda()
    g = torch.Generator().manual_seed(5)
    for b in (1, 3):
        ids = torch.randint(4, m.config.vocab_size, (b, 7), generator=g).cuda()
        assert torch.equal(m.generate(ids, 10, fast=True, compile=True), m.generate(ids, 10)), b


@CUDA
def test_prefill_graph_captures_on_cuda_and_matches():
    """The prefill captured as a CUDA graph per bucket: fp32 greedy tokens equal the readable path's, for two
    prompt lengths in one bucket (the second replays the first's graph) and one in another."""
    m = L.from_pretrained(Path(L.__file__).parent / "assets" / "tiny-longcat", dtype=torch.float32, device="cuda")
    g = torch.Generator().manual_seed(4)
    for t in (9, 13, 20):
        ids = torch.randint(4, m.config.vocab_size, (2, t), generator=g).cuda()
        assert torch.equal(m.generate(ids, 12, fast=True), m.generate(ids, 12)), t  # default on CUDA: captured
    dec = next(d for d in m._decoders.values() if d.prefill_graph)
    assert sorted(dec.prefills) == [16, 32] and all(v[2] is not None for v in dec.prefills.values())


def test_compiled_static_cache_write_is_in_place():
    """torch.compile writes a decode token into the StaticCache in place: no kernel of the compiled code runs over a
    sublayer's whole cache (indexing the stacked tensor inside the step made inductor copy all of it per step)."""
    from torch._inductor.utils import run_and_get_code

    from longcat_ref.model.cache import StaticCache

    n, b, slots, r, rope = 3, 2, 4099, 24, 8  # odd sizes: a full copy's element count is easy to spot
    cache = StaticCache(n, b, slots, r, rope)

    def step(latent, k_rope, pos):
        out = 0
        for layer in range(n):
            lat, kr = cache.update(layer, latent * (layer + 1), k_rope, pos)  # (b, slots, r), (b, slots, rope)
            out = out + lat[:, :2].sum() + kr[:, :2].sum()
        return out

    torch._dynamo.reset()
    latent, k_rope, pos = torch.randn(b, 1, r), torch.randn(b, 1, rope), torch.tensor([7])
    _, code = run_and_get_code(torch.compile(step, fullgraph=True), latent, k_rope, pos)
    code = "\n".join(code)
    for full in (b * slots * r, n * b * slots * r, b * slots * rope, n * b * slots * rope):
        assert f"{full}L" not in code and f"{full})" not in code, f"a loop over {full} cache elements"
    for layer in range(n):  # and the writes landed
        torch.testing.assert_close(cache.latent[layer, :, 7], latent[:, 0] * (layer + 1))
        torch.testing.assert_close(cache.k_rope[layer, :, 7], k_rope[:, 0])


def test_shortcut_form_is_checked_and_stays_inline_off_cuda():
    """Forms(shortcut=...) names where LongCat's shortcut MoE runs (model/overlap.py): a bad name, and "stream"
    for CPU tensors, are refused in one line; "auto" is inline on the CPU (no streams there)."""
    from longcat_ref.model.overlap import shortcut_on_stream

    with pytest.raises(ValueError, match="shortcut form 'side'"):
        L.Forms(shortcut="side")
    x = torch.zeros(2, 3)
    assert not shortcut_on_stream("inline", x) and not shortcut_on_stream("auto", x)
    with pytest.raises(ValueError, match="shortcut='stream' needs CUDA tensors, got cpu"):
        shortcut_on_stream("stream", x)
    m = tiny("longcat")
    ids = torch.randint(4, m.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="needs CUDA"), torch.no_grad():
        m(ids, forms=L.Forms(shortcut="stream"))
    with torch.no_grad():
        assert torch.equal(m(ids, forms=L.Forms(shortcut="auto")), m(ids))


@CUDA
def test_shortcut_moe_on_a_side_stream_is_bit_equal(monkeypatch):
    """LongCat's shortcut MoE on the side stream (eager, inside a captured CUDA graph, and inside a compiled +
    captured decode step) gives the logits of the inline order (bit for bit eagerly and captured: the same kernels on
    two streams, joined before the MoE's output is read). Counts that the side stream was really used (every
    layer, every call)."""
    import dataclasses

    import longcat_ref.model.model as model_mod

    calls = []
    start = model_mod.start_on_side_stream
    monkeypatch.setattr(model_mod, "start_on_side_stream", lambda *a: calls.append(1) or start(*a))
    m = tiny("longcat", dtype=torch.bfloat16).cuda()
    ids, mask = (t.cuda() for t in padded_batch(7))
    inline, stream = L.Forms(shortcut="inline"), L.Forms(shortcut="stream")
    with torch.no_grad():
        want = m(ids, attention_mask=mask, forms=inline)
        assert torch.equal(m(ids, attention_mask=mask, forms=stream), want)
        assert len(calls) == m.config.num_layers
        pf = [L.Forms(attention="sdpa", experts="auto", shortcut=s) for s in ("inline", "stream")]
        outs = []
        for f in pf:
            static = {}

            def run(f=f):
                static["out"] = m(ids, forms=f)

            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                run()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            graph.replay()
            outs.append(static["out"].clone())
        assert torch.equal(outs[1], outs[0])
    # Inside torch.compile the fork is compiler-disabled, so inductor compiles the layer as pieces around it and fuses
    # (and rounds) differently: equal to bf16 rounding there, not bit for bit.
    torch._dynamo.reset()
    steps, before = [], len(calls)
    for f in (L.DECODE, dataclasses.replace(L.DECODE, shortcut="stream")):
        dec = Decoder(m, batch=3, max_len=24, compile=True, forms=f)
        with torch.no_grad():
            dec.prefill(ids, mask)
            steps.append(torch.stack([dec.step(torch.full((3,), 9 + i, device="cuda")) for i in range(4)]))
    assert len(calls) > before
    torch.testing.assert_close(steps[1].float(), steps[0].float(), atol=3e-2, rtol=3e-2)


def test_bench_decode_variants_name_valid_forms():
    """Every decode variant of the bench (tools/bench.py VARIANTS) names forms that exist: each builds a Forms the
    way `ours_decode` does, and only Decoder options besides them (a misspelt form would fail only on a GPU)."""
    import inspect

    from longcat_ref.tools import bench

    params = inspect.signature(bench.ours_decode).parameters
    for name, kw in bench.VARIANTS.items():
        assert set(kw) <= set(params), (name, set(kw) - set(params))
        opts = {k: kw.get(k, params[k].default) for k in ("attention", "experts", "router", "linear", "rope",
                                                          "shortcut")}
        L.Forms(**opts)  # raises a one-line ValueError for a form that is not one of its field's
    assert bench.VARIANTS["compiled_decode_fused_logits"]["router"] == "fused_logits"
