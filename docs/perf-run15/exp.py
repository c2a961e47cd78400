"""Experiments (one H200), not the package: `PYTHONPATH=. python docs/perf-run15/exp.py --part bank,layer,...`.

The grouped expert GEMMs with a capped grid (`grouped_gemm(..., programs=P)`: P programs looping over the tiles).
bank: LongCat-Flash's expert bank alone (the Triton path, 2k and 8k tokens): how much bandwidth P programs reach.
layer: bench's real-size LongCat-Flash layer prefill, the shortcut MoE on the side stream with its expert GEMMs
capped at P programs, captured as a CUDA graph: does leaving SMs free let the dense branch overlap the experts?
fp8bank: the same bank kept in FP8 (128 x 128 block scales), the Triton path with the tile rule and forced tiles.
fp8linear: LongCat-Flash's dense FP8 projections (128 x 128 blocks), the Triton kernel reading FP8 in place
against dequantize (the Triton formula kernel) + cuBLAS, by row count, each in a CUDA graph.
fp8prefill: bench's FP8 LongCat-Flash layer (bench_fp8's model), a 2k-token PREFILL forward eager and captured, bf16
and kept FP8, with each one's kernel profile.
skew: the LongCat bank (bf16, then FP8) at 2k tokens under routings of growing skew: uniform top-12, and top-12 of
noise plus a per-expert popularity (std s): how the rows per expert spread changes each bank's time.
swap: the expert banks (LongCat-Flash's, GLM-4.7-Flash's; bf16 and FP8) with each tile computed transposed
(`choose_swap`: w x^T, the weight as the MMA's left operand) against the plain tiles, at several tile shapes.
sdpa: LongCat-Flash's prefill attention (64 heads, qk 192, v 128, 2k and 8k tokens, bf16): v padded to 192 (as
mla._sdpa did before 2026-12-04) against v as it is, with SDPA's default choice and each backend forced; then the
layer prefill.
"""

import argparse
import dataclasses
import functools
import json
import os

import torch

from longcat_ref.kernels import grouped_gemm as gg
from longcat_ref.model import experts as EX
from longcat_ref.model.forms import PREFILL
from longcat_ref.tools import bench as B
from longcat_ref.tools import bench_experts as BE

CAPS = [None, 264, 132, 116, 100, 88, 66]


def capped(P):
    EX.grouped_gemm = gg.grouped_gemm if P is None else functools.partial(gg.grouped_gemm, programs=P)


def to_fp8(ex):
    """The bank quantized in place to FP8 with 128 x 128 block scales, 32 experts at a time (the fp32 temporaries of
    the whole bank would not fit)."""
    from longcat_ref.model.quant import quantize_blockwise

    gu16, d16 = ex.gate_up_proj.data, ex.down_proj.data
    ex.to_fp8_((128, 128))
    for c in range(0, ex.n_local, 32):
        ex.gate_up_proj.data[c:c + 32], ex.gate_up_proj_scale_inv[c:c + 32] = quantize_blockwise(
            gu16[c:c + 32], (128, 128), split_rows=ex.inter)
        ex.down_proj.data[c:c + 32], ex.down_proj_scale_inv[c:c + 32] = quantize_blockwise(d16[c:c + 32], (128, 128))
    del gu16, d16
    torch.cuda.empty_cache()


def _bank(case, fp8):
    E, H, I, k = BE.CASES[case]
    with torch.device("cuda"):
        ex = EX.Experts(E, H, I).to(torch.bfloat16).requires_grad_(False)
    ex.gate_up_proj.uniform_(-0.05, 0.05), ex.down_proj.uniform_(-0.05, 0.05)
    if fp8:
        to_fp8(ex)
    return ex, k


def bank(out):
    ex, k = _bank("longcat", False)
    nbytes = (ex.gate_up_proj.numel() + ex.down_proj.numel()) * 2
    for n in (2048, 8192):
        for P in CAPS:
            capped(P)
            us, touched = BE.time_form(ex, "grouped_triton", n, k, 2)
            out.append(dict(part="bank", tokens=n, programs=P, us=us, tb_s=nbytes / us / 1e6))
            print(f"  bank n={n} programs={str(P):5s}: {us:8.1f} us  {nbytes / us / 1e6:5.2f} TB/s", flush=True)
    capped(None)
    del ex
    torch.cuda.empty_cache()


def fp8bank(out):
    ex, k = _bank("longcat", True)
    nbytes = ex.gate_up_proj.numel() + ex.down_proj.numel()
    rule = gg.choose_tiles
    for n in (2048, 8192):
        for forced in (None, (64, 128, 64, 4), (64, 128, 128, 8), (128, 128, 64, 8), (128, 128, 128, 8),
                       (32, 128, 128, 4)):
            gg.choose_tiles = rule if forced is None else (lambda *a, f=forced, **kw: f)
            try:
                us, _ = BE.time_form(ex, "grouped_triton", n, k, 2)
            except Exception as e:
                print(f"  fp8bank n={n} {forced}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                continue
            finally:
                gg.choose_tiles = rule
            out.append(dict(part="fp8bank", tokens=n, tiles=forced, us=us, tb_s=nbytes / us / 1e6))
            print(f"  fp8bank n={n} {str(forced or 'rule'):20s}: {us:8.1f} us  {nbytes / us / 1e6:5.2f} TB/s",
                  flush=True)
    del ex
    torch.cuda.empty_cache()


LINEARS = {"q_a (1536 x 6144)": (1536, 6144), "o_proj (6144 x 8192)": (6144, 8192),
           "mlp gate (12288 x 6144)": (12288, 6144), "mlp down (6144 x 12288)": (6144, 12288)}


def fp8linear(out):
    from longcat_ref.kernels.fp8_linear import dequantize, fp8_linear_kernel
    from longcat_ref.model.quant import quantize_blockwise

    for name, (N, K) in LINEARS.items():
        w8, sc = quantize_blockwise(torch.randn(N, K, device="cuda") * 0.02, (128, 128))
        for M in (16, 64, 128, 256, 512, 1024, 2048, 8192):
            x = torch.randn(M, K, device="cuda").bfloat16()
            kern = lambda: fp8_linear_kernel(x, w8, sc, (128, 128))  # noqa: E731
            deq = lambda: torch.nn.functional.linear(x, dequantize(w8, sc, (128, 128), x.dtype))  # noqa: E731
            ts = {}
            for label, fn in (("kernel", kern), ("dequant+cublas", deq)):
                ts[label] = B.timed(B.captured(fn), "cuda", reps=5, inner=1) * 1e6
            tf = {k: 2 * M * N * K / v / 1e6 for k, v in ts.items()}  # TFLOP/s
            out.append(dict(part="fp8linear", linear=name, rows=M, us=ts, tflops=tf))
            print(f"  fp8linear {name:24s} M={M:5d}: kernel {ts['kernel']:8.1f} us ({tf['kernel']:4.0f} TF/s)  "
                  f"dequant+cublas {ts['dequant+cublas']:8.1f} us ({tf['dequant+cublas']:4.0f} TF/s)", flush=True)


def fp8prefill(out):
    from longcat_ref import CausalLM
    from longcat_ref.model import quant
    from longcat_ref.model.config import longcat_flash_chat

    cfg = longcat_flash_chat().replace(num_layers=1, vocab_size=1024, max_position_embeddings=4096 + 512)
    with torch.device("meta"):
        model = CausalLM(cfg).to(torch.bfloat16)
    model = model.to_empty(device="cuda").eval().requires_grad_(False)
    for b in model.buffers():
        b.zero_()
    B.synth_(model)
    ids = torch.randint(4, cfg.vocab_size, (1, 2048), device="cuda")
    for precision in ("bf16", "fp8"):
        if precision == "fp8":
            quant.quantize_(model, (128, 128))
            torch.cuda.empty_cache()
        with torch.no_grad():
            run = lambda: model(ids, forms=PREFILL, logits_to_keep=1)  # noqa: E731
            te = B.timed(run, "cuda", reps=5)
            tg = B.timed(B.captured(run), "cuda", reps=5)
            ks = B.kernel_stats(run)
        fl = B.prefill_flops(model, 2048)
        out.append(dict(part="fp8prefill", precision=precision, eager_ms=te * 1e3, graph_ms=tg * 1e3,
                        frac=fl / tg / 745e12, kernels=ks["kernels_per_step"], busy_ms=ks["kernel_busy_s"] * 1e3,
                        kernel_all=ks["kernel_all"]))
        print(f"  fp8prefill {precision}: eager {te * 1e3:.2f} ms, captured {tg * 1e3:.2f} ms ({fl / tg / 745e12:.1%}),"
              f" {ks['kernels_per_step']} kernels, {ks['kernel_busy_s'] * 1e3:.2f} ms busy", flush=True)
        for n, c, t in ks["kernel_all"][:6]:
            print(f"    {t * 1e3:7.3f} ms {c:4d}  {n[:100]}", flush=True)
        moe = next(iter(model.moe_blocks()))
        idx = moe.last_idx
        counts = torch.bincount(idx[idx < moe.n_routed].flatten(), minlength=moe.n_routed)
        top = counts.sort(descending=True).values
        out[-1].update(rows_per_expert_top=top[:16].tolist(), experts_touched=int((counts > 0).sum()),
                       real_pairs=int(counts.sum()))
        print(f"    routing: {int(counts.sum())} real pairs, {int((counts > 0).sum())} experts, mean "
              f"{counts.float().mean():.1f}, top {top[:12].tolist()}, >128 rows: {int((counts > 128).sum())}",
              flush=True)
        ex = moe.experts
        us_uniform, _ = BE.time_form(ex, "grouped_triton", 2048, idx.shape[1], 2)
        x = torch.randn(2048, cfg.hidden_size, device="cuda").bfloat16()
        w = torch.rand(idx.shape, device="cuda")
        o = torch.zeros_like(x)
        with torch.no_grad():
            t_model = B.timed(B.captured(lambda: ex(x, w, idx, o, impl="grouped_triton")), "cuda", reps=5)
            real = torch.where(idx < moe.n_routed, idx, torch.randint_like(idx, 0, moe.n_routed))
            t_all = B.timed(B.captured(lambda: ex(x, w, real, o, impl="grouped_triton")), "cuda", reps=5)
        out[-1].update(bank_uniform_us=us_uniform, bank_model_idx_us=t_model * 1e6, bank_no_zero_us=t_all * 1e6)
        print(f"    the model's bank alone: uniform routing {us_uniform:.0f} us, the model's routing "
              f"{t_model * 1e6:.0f} us, its zero-expert slots sent to real experts {t_all * 1e6:.0f} us", flush=True)
        if precision == "fp8":
            rule = gg.choose_tiles
            for forced in ((128, 128, 128, 8), (64, 128, 128, 8)):
                gg.choose_tiles = lambda *a, f=forced, **kw: f
                try:
                    with torch.no_grad():
                        tf = B.timed(B.captured(run), "cuda", reps=5)
                finally:
                    gg.choose_tiles = rule
                out.append(dict(part="fp8prefill", precision=precision, tiles=forced, graph_ms=tf * 1e3))
                print(f"  fp8prefill fp8 tiles {forced}: captured {tf * 1e3:.2f} ms", flush=True)


def skew(out):
    ex, k = _bank("longcat", False)
    E, H = ex.n_local, ex.gate_up_proj.shape[2]
    g = torch.Generator(device="cuda").manual_seed(0)
    n = 2048
    x = torch.randn(n, H, device="cuda", generator=g).bfloat16()
    w = torch.rand(n, k, device="cuda", generator=g)
    o = torch.zeros_like(x)
    pop = torch.randn(E, device="cuda", generator=g)
    idxs = {f"s={s_}": (torch.randn(n, E, device="cuda", generator=g) + s_ * pop).topk(k, -1).indices
            for s_ in (0.0, 0.25, 0.5, 1.0)}
    for precision in ("bf16", "fp8"):
        if precision == "fp8":
            to_fp8(ex)
        for name, idx in idxs.items():
            counts = torch.bincount(idx.flatten(), minlength=E)
            with torch.no_grad():
                t = B.timed(B.captured(lambda: ex(x, w, idx, o, impl="grouped_triton")), "cuda", reps=5)
            out.append(dict(part="skew", precision=precision, routing=name, us=t * 1e6, max_rows=int(counts.max()),
                            experts=int((counts > 0).sum()), over_64=int((counts > 64).sum())))
            print(f"  skew {precision} {name:7s}: {t * 1e6:8.0f} us; rows per expert max {int(counts.max())}, "
                  f"{int((counts > 64).sum())} experts > 64 rows, {int((counts > 0).sum())} touched", flush=True)


def swap(out):
    rule, rule_swap = gg.choose_tiles, gg.choose_swap
    for case, tokens in (("glm", (32, 2048)), ("longcat", (2048, 8192))):
        for fp8 in (False, True):
            ex, k = _bank(case, fp8)
            for n in tokens:
                for sw, tiles in [(False, None), (True, None), (True, (16, 128)), (True, (32, 128)),
                                  (True, (64, 128)), (True, (128, 128))]:
                    def forced(m, N, K, G, dtype, block=None, t=tiles):
                        bm, bn, bk, w = rule(m, N, K, G, dtype, block)
                        if t is None:
                            return bm, bn, bk, w
                        return t[0], t[1], bk, 8 if t[0] * t[1] >= 128 * 128 else 4
                    gg.choose_tiles, gg.choose_swap = forced, (lambda *a, v=sw, **kw: v)
                    try:
                        us, _ = BE.time_form(ex, "grouped_triton", n, k, 2)
                    except Exception as e:
                        print(f"  swap {case} fp8={fp8} n={n} swap={sw} {tiles}: {type(e).__name__}: "
                              f"{str(e)[:100]}", flush=True)
                        continue
                    finally:
                        gg.choose_tiles, gg.choose_swap = rule, rule_swap
                    out.append(dict(part="swap", case=case, fp8=fp8, tokens=n, swap=sw, tiles=tiles, us=us))
                    print(f"  swap {case:7s} {'fp8 ' if fp8 else 'bf16'} n={n:5d} swap={sw!s:5s} "
                          f"{str(tiles or 'rule'):10s}: {us:8.1f} us", flush=True)
            del ex
            torch.cuda.empty_cache()


def sdpa(out):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    for t in (2048, 8192):
        q = torch.randn(1, 64, t, 192, device="cuda", generator=g).bfloat16()
        k = torch.randn(1, 64, t, 192, device="cuda", generator=g).bfloat16()
        v = torch.randn(1, 64, t, 128, device="cuda", generator=g).bfloat16()
        padded = lambda: F.scaled_dot_product_attention(q, k, F.pad(v, (0, 64)), is_causal=True)[..., :128]  # noqa
        plain = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        want = padded()
        for be in (None, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            for label, fn in (("padded", padded), ("plain", plain)):
                try:
                    if be is None:
                        got, us = fn(), B.timed(B.captured(fn), "cuda", reps=5) * 1e6
                    else:
                        with sdpa_kernel([be]):
                            got, us = fn(), B.timed(B.captured(fn), "cuda", reps=5) * 1e6
                except Exception as e:
                    print(f"  sdpa t={t} {str(be):32s} {label:6s}: {type(e).__name__}: {str(e)[:80]}", flush=True)
                    continue
                err = float((got.float() - want.float()).abs().max())
                out.append(dict(part="sdpa", tokens=t, backend=str(be), v=label, us=us, max_abs_vs_padded=err))
                print(f"  sdpa t={t} {str(be):32s} {label:6s}: {us:8.1f} us  max |diff| vs padded default {err:.2e}",
                      flush=True)


def layer(out):
    ours = B.longcat_layer("cuda", torch.bfloat16, 8192 + 64, False)[2]
    peak = 745e12
    for t in (2048, 8192):
        ids = torch.randint(4, ours.config.vocab_size, (1, t), device="cuda")
        with torch.no_grad():
            want = ours(ids, forms=PREFILL, logits_to_keep=1)  # records the routing prefill_flops counts
        fl = B.prefill_flops(ours, t)
        for sc, P in [("inline", None)] + [("stream", P) for P in CAPS]:
            capped(P)
            forms = dataclasses.replace(PREFILL, shortcut=sc)
            with torch.no_grad():
                run = lambda: ours(ids, forms=forms, logits_to_keep=1)  # noqa: E731
                y = run()
                tg = B.timed(B.captured(run), "cuda", reps=5)
            row = dict(part="layer", tokens=t, shortcut=sc, programs=P, graph_ms=tg * 1e3, frac=fl / tg / peak,
                       equal=bool(torch.equal(y, want)))
            out.append(row)
            print(f"  layer {t} {sc:6s} programs={str(P):5s} captured {tg * 1e3:6.2f} ms ({row['frac']:.1%})  "
                  f"equal={row['equal']}", flush=True)
    capped(None)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = dict(bank=bank, layer=layer, fp8bank=fp8bank, fp8linear=fp8linear, fp8prefill=fp8prefill, skew=skew,
                 swap=swap, sdpa=sdpa)
    ap.add_argument("--part", default="bank,layer", help=f"comma list of {', '.join(parts)} (default: bank,layer)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "exp.json"))
    args = ap.parse_args()
    rows = []
    for part in args.part.split(","):
        parts[part](rows)
        json.dump(rows, open(args.out, "w"), indent=1)
