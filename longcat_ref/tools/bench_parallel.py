"""Benchmark full-width LongCat-Flash layers split over the GPUs of one host (tensor + expert parallel, parallel.py).

    torchrun --nproc-per-node 4 -m longcat_ref.tools.bench_parallel --out runs/bench_parallel
    torchrun --nproc-per-node 2 -m longcat_ref.tools.bench_parallel --tiny --out /tmp/bp      # CPU / gloo smoke test
    torchrun --nproc-per-node 8 -m longcat_ref.tools.bench_parallel --fast --compile --fp8    # FP8 weights kept
    torchrun --nproc-per-node 8 -m longcat_ref.tools.bench_parallel --fast --spec 1           # + MTP verify cost

Real LongCat-Flash-Chat widths (hidden 6144, 64 heads, 512 routed + 256 zero experts, top-12, vocab 131072) with as
many layers as fit, synthetic bf16 weights generated on each GPU (replicated tensors get the same seed on every
rank, sharded ones a per-rank seed; no checkpoint is read). Measures, all ranks in lockstep:

  * prefill tokens/s (batch 1 x --prefill tokens), decode tokens/s at batch 1 and 32 after a --context prompt
  * the same with half the layers: per-layer time = slope, and the extrapolation to 28 layers
  * memory per GPU (weights, peak)
  * a torch.profiler trace of prefill, decode and the layers alone on 32 x 1024 tokens (big all_reduces), 4 layers,
    annotated L{i}.attn0/moe/mlp0/attn1/mlp1, and how much of the MoE all_reduce's GPU time ran concurrently with
    compute kernels (by annotation), plus a timeline PNG

Writes results.json, trace_*.json.gz and timeline_*.png to --out (rank 0). Without --fast the experts run the
readable per-expert loop of experts.py (one host sync per MoE call): reference-implementation numbers. With --fast
decode runs generate()'s fixed-shape step on the same sharded model (CUDA graph, collectives captured; --compile).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
import zlib

import torch
import torch.distributed as dist
from torch import nn

from ..model.config import longcat_flash_chat, tiny_longcat
from ..model.forms import DECODE, PREFILL, REFERENCE
from ..model.generate import Decoder
from ..model import quant
from ..model.mla import attention_bias
from ..model.model import CausalLM, LongcatLayer, init_weights
from ..runtime.parallel import ParallelContext
from ..model.rope import rope_cos_sin

GiB = 2**30


# ------------------------------------------------------------------------------------------------- model
def build(cfg, ctx: ParallelContext, dtype, seed: int = 0, std: float = 0.02, fp8_block=None):
    """Meta -> shard -> allocate on ctx.device in `dtype` -> synthetic weights (same on all ranks where replicated).

    fp8_block: keep the quantizable matrices in FP8 (model/quant.py) with this block, generated directly in FP8 (no
    bf16 copy of the model is ever made): values N(0, 1) * 16 in e4m3 and every block scale std / 16."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    ctx.shard(model)
    if fp8_block is not None:
        quant.convert_(model, fp8_block)
    for p in model.parameters():
        if p.dtype != torch.float8_e4m3fn:
            p.data = p.data.to(dtype)
    model = model.to_empty(device=ctx.device)
    seed_of = lambda n: seed * 1_000_003 + zlib.crc32(n.encode()) + (7919 * ctx.rank if n in ctx.plan else 0)  # noqa
    # replicated tensors: the same seed on every rank; sharded ones (in ctx.plan): a per-rank seed
    plain = {n for n, p in model.named_parameters() if p.dtype != torch.float8_e4m3fn}
    init_weights(model, std=std, norm_std=0.0, per_tensor_seed=seed_of, only=plain)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dtype == torch.float8_e4m3fn:
                g = torch.Generator(device=p.device).manual_seed(seed_of(n))
                for part in (p.data if p.dim() == 3 else p.data[None]):  # one matrix at a time: a small temporary
                    part.copy_((torch.randn(part.shape, device=p.device, generator=g) * 16).to(torch.float8_e4m3fn))
        for n, b in model.named_buffers():
            if n.endswith("_scale_inv"):
                b.fill_(std / 16)
            elif n.endswith("e_score_correction_bias"):
                b.zero_()
    return model.eval()


def sync(ctx):
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    if ctx.world_size > 1:
        dist.barrier()


def prompt(cfg, batch, length, device, seed=0):
    g = torch.Generator().manual_seed(seed)  # identical on every rank
    return torch.randint(4, cfg.vocab_size, (batch, length), generator=g).to(device)


@torch.no_grad()
def prefill_time(model, ctx, batch, length, reps=2, fast=False):
    ids = prompt(model.config, batch, length, ctx.device)
    times = []
    for _ in range(reps + 1):  # first = warm-up
        cache = model.new_cache(batch, length)
        sync(ctx)
        t = time.perf_counter()
        model(ids, cache=cache, forms=PREFILL if fast else REFERENCE, logits_to_keep=1)
        sync(ctx)
        times.append(time.perf_counter() - t)
    return min(times[1:])


@torch.no_grad()
def decode_time_fast(model, ctx, batch, context, steps, compile=False):
    """The fast path's seconds per decode step: generate()'s fixed-shape step (static cache, absorbed MLA, gathered
    experts; its TP/EP collectives inside one CUDA graph on GPU, torch.compile'd if asked), after a `context` prompt.
    Returns (seconds per step, one-time set-up seconds of the first step: compile + capture)."""
    dec = Decoder(model, batch, context + steps + 4, compile=compile)
    nxt = dec.prefill(prompt(model.config, batch, context, ctx.device)).argmax(-1)  # (b,)
    nxt = dec.step(nxt).argmax(-1)  # first step: compile + capture
    sync(ctx)
    t = time.perf_counter()
    for _ in range(steps):
        nxt = dec.step(nxt).argmax(-1)  # (b,): same on every rank
    sync(ctx)
    return (time.perf_counter() - t) / steps, dec.setup_s


@torch.no_grad()
def verify_costs(model, ctx, batch, context, k, reps=5, seed=0):
    """Self-speculative decoding on the sharded model (model/speculative.py): seconds of one main forward over t = 1
    (plain decode) and t = k + 1 tokens (a verify step), and of the MTP head over 1 and k + 1 tokens, with the
    context filled to `context` slots of a static cache; on GPU each is a replayed CUDA graph with its collectives
    captured. The MTP head (synthetic, the same on every rank) is replicated, as the loader keeps it."""
    from ..model.mtp import MTPHead
    from ..model.speculative import _Graph
    from .bench_spec import step_fns

    cfg, dev = model.config, ctx.device
    dt = model.lm_head.weight.dtype
    with torch.device("meta"):
        head = MTPHead(cfg).to(dt)
    head = head.to_empty(device=dev).eval()
    init_weights(head, std=0.02, norm_std=0.0, per_tensor_seed=lambda n: seed * 1_000_003 + zlib.crc32(n.encode()))
    for n, b in head.named_buffers():
        if n.endswith("e_score_correction_bias"):
            b.data = torch.zeros_like(b, dtype=torch.float32)
    S = context + k + 8
    cache, hcache = model.new_cache(batch, S), head.new_cache(batch, S, dt, dev)
    mask = torch.zeros(batch, S, dtype=torch.long, device=dev)
    mask[:, :context] = 1
    ids = prompt(cfg, batch, context, dev, seed)
    for a0 in range(0, context, 512):  # the values do not matter, the bytes read do
        t = min(512, context - a0)
        model(ids[:, a0:a0 + t], attention_mask=mask, cache=cache, cache_position=torch.arange(a0, a0 + t, device=dev),
              forms=DECODE)
    out = {}
    for t in (1, k + 1):
        x = prompt(cfg, batch, t, dev, seed + t)
        slots = torch.arange(context, context + t, device=dev)
        pos = slots[None].expand(batch, t).contiguous()
        hid = torch.zeros(batch, t, cfg.hidden_size, device=dev, dtype=dt)
        mask[:, context:context + t] = 1

        main_fn, head_fn = step_fns(model, head, mask, cache, hcache)
        gm = _Graph(main_fn, (x, pos, slots)) if dev.type == "cuda" else main_fn
        gh = _Graph(head_fn, (x, hid, pos, slots)) if dev.type == "cuda" else head_fn
        out[f"main_{t}_s"] = min(timed(lambda: gm(x, pos, slots), ctx) for _ in range(reps))
        out[f"head_{t}_s"] = min(timed(lambda: gh(x, hid, pos, slots), ctx) for _ in range(reps))
        mask[:, context:] = 0
        del gm, gh
    d1, cost = out["main_1_s"], out[f"main_{k + 1}_s"] + out[f"head_{k + 1}_s"] + (k - 1) * out["head_1_s"]
    out.update(k=k, batch=batch, step_s=cost, verify_over_decode=out[f"main_{k + 1}_s"] / d1)
    for acc in (0.6, 0.8, 0.9):  # tokens/s at an assumed acceptance per draft (the paper reports ~0.9 for k = 1)
        out[f"tok_s_at_{acc}"] = batch * (1 - acc ** (k + 1)) / (1 - acc) / cost
    out["tok_s_plain"] = batch / d1
    return out


@torch.no_grad()
def decode_time(model, ctx, batch, context, steps, warm=2):
    """Seconds per decode step (greedy, one token per sequence) after a `context`-token prompt."""
    cache = model.new_cache(batch, context + warm + steps + 1)
    nxt = fill(model, prompt(model.config, batch, context, ctx.device), cache).argmax(-1)  # (b,)
    for _ in range(warm):
        nxt = model(nxt[:, None], cache=cache)[:, -1].argmax(-1)
    sync(ctx)
    t = time.perf_counter()
    for _ in range(steps):
        nxt = model(nxt[:, None], cache=cache)[:, -1].argmax(-1)  # (b,): same on every rank
    sync(ctx)
    return (time.perf_counter() - t) / steps


@torch.no_grad()
def fill(model, ids, cache, chunk=None):
    """Prefill in chunks -> last logits (b, V). (A 32 x 1024 prompt's logits at once: 8 GiB; chunks keep the
    logits of one call near 4096 rows.)"""
    chunk = chunk or max(1, min(128, 4096 // ids.shape[0]))
    for i in range(0, ids.shape[1], chunk):
        logits = model(ids[:, i:i + chunk], cache=cache)[:, -1]  # (b, V)
    return logits


def timed(fn, ctx):
    sync(ctx)
    t = time.perf_counter()
    fn()
    sync(ctx)
    return time.perf_counter() - t


class first_layers:
    """Temporarily run only the first k layers (their cache slots keep their indices)."""

    def __init__(self, model, k):
        self.model, self.k = model, k

    def __enter__(self):
        self.full = self.model.model.layers
        self.model.model.layers = nn.ModuleList(list(self.full)[: self.k])

    def __exit__(self, *exc):
        self.model.model.layers = self.full


# ------------------------------------------------------------------------------------------------- profiling
def annotate(model):
    """Wrap each LongCat layer's sublayers in profiler ranges L{i}.attn0 / moe / mlp0 / attn1 / mlp1 / moe.wait."""
    def wrap(obj, attr, label):
        f = getattr(obj, attr)

        def g(*a, **k):
            with torch.profiler.record_function(label):
                return f(*a, **k)
        setattr(obj, attr, g)

    for i, layer in enumerate(model.model.layers):
        if isinstance(layer, LongcatLayer):
            wrap(layer.self_attn[0], "forward", f"L{i}.attn0")
            wrap(layer.mlp, "start", f"L{i}.moe")
            wrap(layer.mlps[0], "forward", f"L{i}.mlp0")
            wrap(layer.self_attn[1], "forward", f"L{i}.attn1")
            wrap(layer.mlps[1], "forward", f"L{i}.mlp1")
            wrap(layer.mlp, "finish", f"L{i}.moe.wait")


def profile(fn, ctx):
    from torch.profiler import ProfilerActivity, profile as prof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    fn()  # warm-up outside the trace
    sync(ctx)
    with prof(activities=acts) as p:
        fn()
        sync(ctx)
    return p


def analyse_trace(path):
    """Kernels labelled by the annotation they were launched in; MoE all_reduce time overlapped with compute."""
    op = gzip.open if path.endswith(".gz") else open
    with op(path, "rt") as f:
        ev = json.load(f)["traceEvents"]
    kernels = [e for e in ev if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        return {"note": "no GPU kernels in the trace (CPU run)"}
    launch = {e["args"]["correlation"]: e for e in ev
              if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    annos = sorted((e for e in ev if e.get("cat") == "user_annotation" and "dur" in e and e["name"].startswith("L")),
                   key=lambda e: e["ts"])

    def label_of(k):
        lz = launch.get(k.get("args", {}).get("correlation"))
        if lz is None:
            return None
        best = None
        for a in annos:  # innermost (shortest) annotation around the launch, same thread
            if a["ts"] > lz["ts"]:
                break
            if a["tid"] == lz["tid"] and a["ts"] <= lz["ts"] <= a["ts"] + a["dur"] and (
                    best is None or a["dur"] < best["dur"]):
                best = a
        return None if best is None else best["name"].split(".", 1)[1]

    rows = []
    for k in kernels:
        nccl = "nccl" in k["name"].lower()
        rows.append(dict(ts=k["ts"], end=k["ts"] + k["dur"], stream=k["args"].get("stream"), nccl=nccl,
                         allreduce=nccl and "allreduce" in k["name"].lower(), label=label_of(k), name=k["name"]))
    moe_ar = [r for r in rows if r["allreduce"] and r["label"] == "moe"]
    compute = [r for r in rows if not r["nccl"]]
    per_label: dict[str, float] = {}
    covered = 0.0
    for ar in moe_ar:
        segs = []
        for c in compute:
            a, b = max(ar["ts"], c["ts"]), min(ar["end"], c["end"])
            if b > a:
                per_label[c["label"] or "other"] = per_label.get(c["label"] or "other", 0.0) + (b - a)
                segs.append((a, b))
        segs.sort()
        end = -1.0
        for a, b in segs:  # union of compute time inside this all_reduce
            if b > end:
                covered += b - max(a, end)
                end = b
    total = sum(r["end"] - r["ts"] for r in moe_ar)
    return {"moe_allreduce_kernels": len(moe_ar), "moe_allreduce_gpu_us": round(total, 1),
            "overlapped_with_compute_us": round(covered, 1),
            "overlapped_fraction": round(covered / total, 3) if total else None,
            "overlap_us_by_compute_label": {k: round(v, 1) for k, v in sorted(per_label.items())},
            "streams": sorted({str(r["stream"]) for r in rows}), "_rows": rows}


def timeline_png(rows, path, title):
    """One layer's kernels per stream: compute coloured by sublayer, NCCL all_reduces by who launched them."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    moe = [r for r in rows if r["allreduce"] and r["label"] == "moe"]
    if not moe:
        return False
    j = len(moe) // 2  # a layer in the middle of the trace: the end of its MoE compute up to the next layer's attn0
    ar = moe[j]
    nxt = [r["ts"] for r in rows if r["label"] == "attn0" and r["ts"] > ar["end"]]
    t1 = min(nxt) if nxt else ar["end"] + 4 * (ar["end"] - ar["ts"])
    t0 = ar["ts"] - 0.15 * (t1 - ar["ts"])
    window = [r for r in rows if r["end"] > t0 and r["ts"] < t1]
    streams = sorted({r["stream"] for r in window}, key=str)
    colors = {"attn0": "tab:blue", "moe": "tab:red", "mlp0": "tab:green", "attn1": "tab:cyan", "mlp1": "tab:olive",
              "moe.wait": "black", None: "lightgray"}
    fig, ax = plt.subplots(figsize=(14, 1.2 + 0.6 * len(streams)))
    for i, s in enumerate(streams):
        for r in window:
            if r["stream"] == s:
                nccl_c = "tab:red" if r["label"] == "moe" else "tab:purple"
                c = nccl_c if r["nccl"] else colors.get(r["label"], "gray")
                ax.broken_barh([((r["ts"] - ar["ts"]) / 1e3, (r["end"] - r["ts"]) / 1e3)], (i - 0.4, 0.8), color=c)
    ax.set_yticks(range(len(streams)))
    moe_streams = {r["stream"] for r in window if r["allreduce"] and r["label"] == "moe"}
    ax.set_yticklabels([f"stream {s}: " + ("MoE reduction" if s in moe_streams else "compute + TP all_reduces")
                        for s in streams], fontsize=8)
    ax.set_xlabel("ms (0 = the MoE all_reduce starts)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in
               ("tab:blue", "tab:red", "tab:green", "tab:cyan", "tab:olive", "tab:purple")]
    ax.legend(handles, ["attn0", "MoE experts + its all_reduce", "mlp0", "attn1", "mlp1", "other all_reduces"],
              loc="lower left", bbox_to_anchor=(0, 1.0), fontsize=7, ncol=6, frameon=False)
    ax.set_title(title, fontsize=9, pad=18)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return True


# ------------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(prog="torchrun ... -m longcat_ref.tools.bench_parallel")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/bench_parallel"))
    ap.add_argument("--layers", type=int, default=0, help="0: as many as fit (at most 28)")
    ap.add_argument("--reserve-gib", type=float, default=18.0, help="left free for KV cache, activations, NCCL")
    ap.add_argument("--prefill", type=int, default=4096)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--overlap-batch", type=int, default=32, help="profile the layers alone on this many ...")
    ap.add_argument("--overlap-len", type=int, default=1024, help="... sequences of this length (big all_reduces)")
    ap.add_argument("--tiny", action="store_true", help="tiny config in fp32 (CPU smoke test)")
    ap.add_argument("--batches", default="1,32", help="decode batch sizes, comma-separated, ascending")
    ap.add_argument("--no-slope", action="store_true", help="skip the half-depth run (per-layer slope)")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiler traces")
    ap.add_argument("--fast", action="store_true", help="decode with generate()'s fast step (static cache, CUDA "
                    "graph with the collectives captured) instead of the reference forward")
    ap.add_argument("--compile", action="store_true", help="with --fast: torch.compile the decode step too")
    ap.add_argument("--spec", type=int, default=0, metavar="K", help="also time self-speculative decoding with K "
                    "drafts (MTP head): verify(K+1) vs decode(1) at batch 1 and 32, tokens/s at acceptance 0.6-0.9")
    ap.add_argument("--fp8", action="store_true", help="keep the attention / FFN / expert matrices in FP8 (e4m3, "
                    "128 x 128 block scales; --tiny: 16 x 16), as fp8='keep' loads LongCat-Flash-Chat-FP8")
    a = ap.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",")]

    ctx = ParallelContext.from_env()
    cuda = ctx.device.type == "cuda"
    dtype = torch.bfloat16 if cuda and not a.tiny else torch.float32
    base = tiny_longcat() if a.tiny else longcat_flash_chat()
    if a.tiny:
        a.prefill, a.context, a.steps = min(a.prefill, 64), min(a.context, 32), min(a.steps, 4)
        a.overlap_batch, a.overlap_len = min(a.overlap_batch, 2), min(a.overlap_len, 16)
    layers = a.layers
    if not layers:
        from ..runtime.plan import weight_bytes

        prec = "fp8" if a.fp8 else "bf16"
        one, two = (sum(weight_bytes(base.replace(num_layers=n), ctx.world_size, prec).values()) for n in (1, 2))
        per_layer, rest = two - one, 2 * one - two
        free = torch.cuda.mem_get_info()[0] if cuda else 64 * GiB
        layers = int(max(1, min(28, (free - rest - a.reserve_gib * GiB) // per_layer)))
        if ctx.world_size > 1:
            t = torch.tensor([layers], device=ctx.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            layers = int(t)
    cfg = base.replace(num_layers=layers)
    t0 = time.perf_counter()
    block = ((16, 16) if a.tiny else (128, 128)) if a.fp8 else None
    model = build(cfg, ctx, dtype, fp8_block=block)
    sync(ctx)
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "world_size": ctx.world_size, "layers": layers, "dtype": str(dtype), "date": time.strftime("%Y-%m-%d"),
           "weights": "fp8 (e4m3, block scales, kept)" if a.fp8 else str(dtype),
           "build_s": round(time.perf_counter() - t0, 1),
           "weights_gib_per_rank": round(sum(p.numel() * p.element_size() for p in model.parameters()) / GiB, 2)}
    ctx.print(f"[bench] {layers} layers built on {ctx.world_size} x {res['device']} in {res['build_s']} s, "
              f"{res['weights_gib_per_rank']} GiB weights per rank", flush=True)

    from ..runtime.plan import weight_bytes

    res["plan_weights_gib_per_rank"] = round(sum(weight_bytes(cfg, ctx.world_size, "fp8" if a.fp8 else "bf16").values())
                                             / GiB, 2)
    os.makedirs(a.out, exist_ok=True)

    def save():  # after every measurement: a later failure (e.g. out of memory) keeps what was measured
        if ctx.is_main:
            with open(os.path.join(a.out, "results.json"), "w") as f:
                json.dump(res, f, indent=2)

    half = layers if a.no_slope else max(1, layers // 2)
    for k in dict.fromkeys((layers, half)):
        row = res[f"L{k}"] = {}
        with first_layers(model, k):
            p = prefill_time(model, ctx, 1, a.prefill, fast=a.fast)
            row.update(prefill_tok_s=round(a.prefill / p, 1), prefill_s=round(p, 4))
            save()
            for b in batches:
                if a.fast:
                    d, setup = decode_time_fast(model, ctx, b, a.context, a.steps, compile=a.compile)
                    row[f"decode_b{b}_setup_s"] = round(setup, 1)
                else:
                    d = decode_time(model, ctx, b, a.context, a.steps)
                row.update({f"decode_b{b}_step_ms": round(d * 1e3, 2), f"decode_b{b}_tok_s": round(b / d, 2)})
                if cuda:
                    row[f"peak_gib_after_b{b}"] = round(torch.cuda.max_memory_allocated() / GiB, 2)
                save()
        ctx.print(f"[bench] {k} layers: {res[f'L{k}']}", flush=True)
    with first_layers(model, layers):  # greedy tokens from a short prompt (all ranks in lockstep)
        res["greedy_tokens_from_16_token_prompt"] = model.generate(prompt(cfg, 1, 16, ctx.device), 8)[0, 16:].tolist()
        if a.fast:
            res["fast_greedy_tokens_from_16_token_prompt"] = model.generate(
                prompt(cfg, 1, 16, ctx.device), 8, fast=True, compile=a.compile)[0, 16:].tolist()
    save()
    full, part = res[f"L{layers}"], res[f"L{half}"]
    if layers > half and {1, 32} <= set(batches):
        extra = {}
        for key in ("decode_b1_step_ms", "decode_b32_step_ms"):
            slope = (full[key] - part[key]) / (layers - half)
            extra[key.replace("_step_ms", "_per_layer_ms")] = round(slope, 3)
            extra[key.replace("_step_ms", "_28_layers_step_ms")] = round(full[key] + slope * (28 - layers), 2)
        sp = (full["prefill_s"] - part["prefill_s"]) / (layers - half)
        extra["prefill_per_layer_s"] = round(sp, 4)
        extra["prefill_28_layers_tok_s"] = round(a.prefill / (full["prefill_s"] + sp * (28 - layers)), 1)
        extra["decode_b1_28_layers_tok_s"] = round(1e3 / extra["decode_b1_28_layers_step_ms"], 2)
        extra["decode_b32_28_layers_tok_s"] = round(32e3 / extra["decode_b32_28_layers_step_ms"], 1)
        res["extrapolated_28_layers_at_this_width"] = extra
    if a.spec:
        with first_layers(model, layers):
            res["speculative"] = rows = [verify_costs(model, ctx, b, a.context, a.spec) for b in batches]
        save()
        for r in rows:
            ctx.print(f"[bench] speculative k={a.spec} b={r['batch']}: decode {r['main_1_s'] * 1e3:.2f} ms, verify "
                      f"{r[f'main_{a.spec + 1}_s'] * 1e3:.2f} ms (x{r['verify_over_decode']:.2f}), step "
                      f"{r['step_s'] * 1e3:.2f} ms; tok/s plain {r['tok_s_plain']:.1f}, at acceptance 0.6/0.8/0.9: "
                      + " / ".join(f"{r[f'tok_s_at_{x}']:.1f}" for x in (0.6, 0.8, 0.9)), flush=True)
    if cuda:
        res["peak_gib_per_rank"] = round(torch.cuda.max_memory_allocated() / GiB, 2)
        res["gpu_total_gib"] = round(torch.cuda.get_device_properties(ctx.device).total_memory / GiB, 1)

    # profiler traces with 4 layers (the pattern repeats per layer; keeps the files small)
    annotate(model)
    with first_layers(model, 0 if a.no_profile else min(4, layers)):
        cache_holder = {}

        def do_prefill():
            cache = model.new_cache(1, a.prefill)
            with torch.no_grad():
                model(prompt(cfg, 1, a.prefill, ctx.device), cache=cache)

        def do_decode():
            if "c" not in cache_holder:
                cache = model.new_cache(32, a.context + 8)
                fill(model, prompt(cfg, 32, a.context, ctx.device), cache)
                cache_holder["c"] = cache
            cache = cache_holder["c"]
            cache.length = a.context  # rewind: decode the same position again
            with torch.no_grad():
                model(prompt(cfg, 32, 1, ctx.device, seed=1), cache=cache)

        B, T, H = a.overlap_batch, a.overlap_len, cfg.hidden_size
        x0 = torch.randn(B, T, H, generator=torch.Generator(ctx.device).manual_seed(3), device=ctx.device,
                         dtype=dtype)  # (B, T, H): same values on every rank (same seed, same kernel)
        pos = torch.arange(T, device=ctx.device).expand(B, T)  # (B, T)
        cos, sin = rope_cos_sin(pos, cfg.qk_rope_head_dim, cfg.rope_theta, dtype)
        mask = attention_bias(None, torch.arange(T, device=ctx.device), T, dtype)  # (1, 1, T, T) causal

        @torch.no_grad()
        def do_layers():  # the layers alone on B x T tokens: no embedding / 8 GiB of logits
            x = x0
            for layer in model.model.layers:
                x = layer(x, cos, sin, mask)  # (B, T, H)
            return x

        if a.no_profile:
            save()
            ctx.close()
            return 0
        tl = min(timed(do_layers, ctx) for _ in range(2))
        res[f"layers_{B}x{T}"] = {"layers": len(model.model.layers), "s": round(tl, 4),
                                  "per_layer_s": round(tl / len(model.model.layers), 4),
                                  "tok_s_per_layer": round(B * T * len(model.model.layers) / tl, 1)}
        ctx.print(f"[bench] layers at {B}x{T}: {res[f'layers_{B}x{T}']}", flush=True)
        for name, fn in (("prefill", do_prefill), ("decode_b32", do_decode), (f"layers_{B}x{T}", do_layers)):
            p = profile(fn, ctx)
            if ctx.is_main:
                path = os.path.join(a.out, f"trace_{name}_rank0.json")
                p.export_chrome_trace(path)
                with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as g:
                    g.write(f.read())
                os.remove(path)
                ov = analyse_trace(path + ".gz")
                rows = ov.pop("_rows", None)
                res[f"overlap_{name}"] = ov
                if rows:
                    timeline_png(rows, os.path.join(a.out, f"timeline_{name}.png"),
                                 f"{name}, one LongCat layer, rank 0 of {ctx.world_size} x {res['device']}: the MoE "
                                 "all_reduce (red, own stream) runs while mlp0 / attn1 / mlp1 compute")
                ctx.print(f"[bench] {name} overlap: {ov}", flush=True)
            sync(ctx)

    if ctx.is_main:
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump(res, f, indent=2)
        print(json.dumps(res, indent=2))
    ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
