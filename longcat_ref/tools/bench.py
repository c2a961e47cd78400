"""Benchmarks: our readable and fast paths side by side with transformers, and against the roofline.

    python -m longcat_ref.tools.bench                       # every section this machine can run
    python -m longcat_ref.tools.bench --only cpu --json out.json
    python -m longcat_ref.tools.bench --plot out.json docs/perf.png

Sections (each prints a table; --json writes every number):

  cpu     tiny LongCat-Flash, fp32, one checkpoint on disk read by both: decode tokens/s and prefill time,
          ours (plain / fast) vs transformers (eager)
  layer   GPU: one full-width LongCat-Flash layer (synthetic bf16 weights shared with transformers'
          LongcatFlashDecoderLayer): decode step latency at batch 1 / 32, context 1k / 32k; prefill 2k / 8k;
          against transformers and against the roofline (bytes the step must read / measured bandwidth,
          FLOPs / measured bf16 matmul rate)
  glm     GPU: GLM-4.7-Flash at full size (synthetic bf16 weights shared with transformers): decode batch 1 / 32,
          prefill 2k
  long    GPU: one LongCat-Flash layer at 128k context: KV-cache bytes and decode step latency
  b1      GPU: batch-1 decode only (ours, no transformers): LongCat layer ctx 1k and full GLM, graph vs compiled
  fp8     GPU: one full-width LongCat-Flash layer (ours only), bf16 weights vs the same weights kept in FP8
          (block-scaled e4m3, model/quant.py): decode step at batch 1 / 32, context 1k, and prefill 2k; memory, the
          roofline of each (FP8 reads one byte per weight) and the FP8 model's distance from bf16
  e2e     GPU: what a user waits for: GLM-4.7-Flash generate() end to end (prompt 128 + 128 new, batch 1 / 32), ours
          fast and fast+compile vs transformers' best single-GPU setting (static cache + compile, batched_mm
          experts); first-call (compile) wall time, time to first token, per-step roofline

Timings are medians of repeated runs (CUDA events on GPU). Benchmarks print; tests assert equality.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
import zlib

import torch
from torch import nn

from .. import CausalLM, init_weights, tiny_longcat
from ..io.checkpoint import checkpoint_name
from ..model.config import config_to_dict, glm_4_7_flash, longcat_flash_chat
from ..model.forms import DECODE, PREFILL, REFERENCE, Forms
from ..model.generate import Decoder, decode_step

# ------------------------------------------------------------------------------------------------ timing


def timed(fn, device, reps: int = 5, inner: int = 1, warmup: int = 1) -> float:
    """Median over `reps` of the mean seconds per call of `inner` back-to-back calls."""
    for _ in range(warmup):
        fn()
    cuda = torch.device(device).type == "cuda"
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            for _ in range(inner):
                fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def machine_ceilings(device) -> dict:
    """Measured copy bandwidth (bytes read + written) and bf16 matmul rate on random data."""
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device=device)  # 2 GiB
    y = torch.empty_like(x)
    x.random_()
    bw = 2 * x.numel() / timed(lambda: y.copy_(x), device, reps=10)
    del x, y
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device,
                                                                               dtype=torch.bfloat16)
    flops = 2 * n**3 / timed(lambda: a @ b, device, reps=10, warmup=3)
    return dict(device=torch.cuda.get_device_name(device), bandwidth_Bps=bw, bf16_flops=flops,
                torch=torch.__version__)


# ------------------------------------------------------------------------------------------------ helpers

_DUMP = [lambda: None]


def checkpoint():
    """Write the JSON so far (a run cut short still leaves its numbers)."""
    _DUMP[0]()



def hf_available():
    try:
        import transformers  # noqa: F401

        return True
    except ImportError:
        return False


def set_param(model: nn.Module, name: str, tensor: torch.Tensor):
    parent, _, leaf = name.rpartition(".")
    model.get_submodule(parent)._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def synth_(module: nn.Module, std: float = 0.02, seed: int = 0):
    """Synthetic weights in place, on the module's device: the package's initialiser, one seed per tensor."""
    return init_weights(module, std=std, norm_std=0.05, per_tensor_seed=lambda n: seed * 1_000_003 + zlib.crc32(n.encode()))


def ours_sharing(cfg, hf_named: dict, prefix: str, device, dtype) -> CausalLM:
    """Our CausalLM whose tensors alias transformers' (no copy); tensors transformers lacks are synthetic."""
    with torch.device("meta"):
        model = CausalLM(cfg).to(dtype)
    fresh = []
    for name, p in list(model.named_parameters()):
        key = checkpoint_name(cfg, name)
        key = key[len(prefix):] if prefix and key.startswith(prefix) else (None if prefix else key)
        t = hf_named.get(key) if key is not None else None
        if t is None:
            t = torch.empty(p.shape, dtype=dtype, device=device)
            fresh.append(name)
        elif t.shape != p.shape:  # transformers 5.x: gate_up_proj sized for routed + zero experts
            t = t[: p.shape[0]]
        set_param(model, name, t)
    for name, b in list(model.named_buffers()):
        parent, _, leaf = name.rpartition(".")
        model.get_submodule(parent)._buffers[leaf] = torch.zeros(b.shape, dtype=b.dtype, device=device)
    init_weights(model, norm_std=0.05, per_tensor_seed=lambda n: 1 + zlib.crc32(n.encode()), only=set(fresh))
    model.synthetic_tensors = fresh  # names transformers did not provide (embedding/head of the layer bench)
    return model.eval()


def weight_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def expert_bytes(cfg, dtype_bytes=2) -> int:
    return 3 * cfg.hidden_size * cfg.expert_ffn_hidden_size * dtype_bytes


def fill_context(dec: Decoder, ctx: int, seed: int = 0):
    """Pretend `ctx` tokens were prefilled: random latents in the cache (cheap, no prefill run)."""
    g = torch.Generator(device=dec.cache.latent.device).manual_seed(seed)
    dec.cache.latent[:, :, :ctx].normal_(generator=g)
    dec.cache.k_rope[:, :, :ctx].normal_(generator=g)
    dec.attention_mask.zero_()
    dec.attention_mask[:, :ctx] = 1
    dec.cache_position.fill_(ctx)
    dec.length = ctx


def active_experts(model) -> tuple[int, float]:
    """(distinct routed experts, mean routed experts per token) of the last MoE call of each block, summed."""
    distinct, per_tok = 0, 0.0
    for moe in model.moe_blocks():
        idx = moe.last_idx
        real = idx < moe.n_routed
        distinct += int(torch.unique(idx[real]).numel())
        per_tok += float(real.sum(-1).float().mean())
    return distinct, per_tok


def decode_roofline(model, batch: int, ctx: int, ceil: dict) -> dict:
    """Bytes a decode step must read (non-expert weights + distinct experts touched + KV read) -> time floors.
    Kept-FP8 weights count one byte each, plus their scales."""
    cfg = model.config
    distinct, per_tok = active_experts(model)
    experts_all = sum(weight_bytes(m.experts) for m in model.moe_blocks())
    dense = weight_bytes(model) - experts_all - weight_bytes(model.model.embed_tokens)
    dense += sum(b.numel() * 4 for n, b in model.named_buffers() if n.endswith("_scale_inv") and ".experts." not in n)
    dense += batch * cfg.hidden_size * 2  # embedding rows read
    kv = batch * ctx * cfg.kv_cache_bytes_per_token()  # every attention sublayer's latent, read once
    fp8_experts = any(m.experts.fp8 for m in model.moe_blocks())
    nbytes = dense + distinct * expert_bytes(cfg, 1 if fp8_experts else 2) + kv
    flops = 2 * batch * (dense / 2 + per_tok * expert_bytes(cfg) / 2)  # 2 FLOP per weight per token
    flops += batch * cfg.num_attn_sublayers * cfg.num_attention_heads * ctx * 2 * (
        cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.kv_lora_rank)  # absorbed attention
    t_bytes, t_flops = nbytes / ceil["bandwidth_Bps"], flops / ceil["bf16_flops"]
    return dict(bytes=nbytes, flops=flops, roofline_s=max(t_bytes, t_flops), experts_touched=distinct)


def prefill_flops(model, t: int) -> float:
    """Useful FLOPs of a causal prefill of t tokens (matmuls with activated weights + causal attention)."""
    cfg = model.config
    _, per_tok = active_experts(model)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731  (parameters, not bytes: FP8 is 1 a weight)
    experts_all = sum(count(m.experts) for m in model.moe_blocks())
    dense_params = count(model) - experts_all - count(model.model.embed_tokens)
    mm = 2 * t * (dense_params + per_tok * expert_bytes(cfg) / 2)
    attn = cfg.num_attn_sublayers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * t * t  # causal
    return mm + attn


# ------------------------------------------------------------------------------------------------ cpu


def bench_cpu(args) -> dict:
    """Tiny LongCat on the CPU, fp32: one checkpoint (written by transformers' save_pretrained) read by both."""
    import transformers

    from ..io.checkpoint import from_pretrained

    torch.manual_seed(0)
    cfg = tiny_longcat(max_position_embeddings=1024)
    d = config_to_dict(cfg)
    hcfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    with tempfile.TemporaryDirectory() as path:
        hf = transformers.AutoModelForCausalLM.from_config(hcfg, dtype=torch.float32)
        synth_(hf, std=0.08)
        hf.save_pretrained(path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
        ours = from_pretrained(path, dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: extra threads only add synchronisation (same setting for both)
    res = dict(config="tiny_longcat (hidden 64, 2 layers, 16 routed + 8 zero experts, top-4), fp32, batch 1",
               threads=1)
    prompt, new, plen = torch.randint(4, cfg.vocab_size, (1, 32)), 64, 512
    long_prompt = torch.randint(4, cfg.vocab_size, (1, plen))
    dev = "cpu"
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
              pad_token_id=cfg.pad_token_id, attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        res["ours_plain_decode_tok_s"] = new / timed(lambda: ours.generate(prompt, max_new_tokens=new, eos_token_id=[]), dev, reps=3)
        res["ours_fast_decode_tok_s"] = new / timed(lambda: ours.generate(prompt, max_new_tokens=new, eos_token_id=[], fast=True),
                                                    dev, reps=3)
        t0 = time.perf_counter()
        ours.generate(prompt, max_new_tokens=new, eos_token_id=[], fast=True, compile=True)  # first call compiles the step
        res["ours_compile_s"] = time.perf_counter() - t0
        res["ours_fast_compiled_decode_tok_s"] = new / timed(
            lambda: ours.generate(prompt, max_new_tokens=new, eos_token_id=[], fast=True, compile=True), dev, reps=3, warmup=0)
        res["hf_decode_tok_s"] = new / timed(lambda: hf.generate(prompt, **kw), dev, reps=3)
        res["prefill_tokens"] = plen
        res["ours_plain_prefill_s"] = timed(lambda: ours(long_prompt), dev, reps=5)
        dec = Decoder(ours, 1, plen + 1)
        res["ours_fast_prefill_s"] = timed(lambda: dec.prefill(long_prompt), dev, reps=5)
        res["hf_prefill_s"] = timed(lambda: hf(long_prompt, use_cache=False), dev, reps=5)
        g_hf = hf.generate(prompt, **kw)
        res["plain_equals_hf_tokens"] = bool(torch.equal(ours.generate(prompt, max_new_tokens=new, eos_token_id=[]), g_hf))
        res["fast_equals_hf_tokens"] = bool(torch.equal(ours.generate(prompt, max_new_tokens=new, eos_token_id=[], fast=True), g_hf))
        res["fast_compiled_equals_hf_tokens"] = bool(torch.equal(
            ours.generate(prompt, max_new_tokens=new, eos_token_id=[], fast=True, compile=True), g_hf))
    torch.set_num_threads(threads)
    res["decode_speedup_vs_hf"] = max(res["ours_fast_decode_tok_s"],
                                      res["ours_fast_compiled_decode_tok_s"]) / res["hf_decode_tok_s"]
    res["prefill_speedup_vs_hf"] = res["hf_prefill_s"] / res["ours_fast_prefill_s"]
    return res


# ------------------------------------------------------------------------------------------------ gpu: layer


def longcat_layer(device, dtype, max_pos: int, small: bool = False):
    """(transformers' LongcatFlashDecoderLayer, its rotary embedding, our 1-layer CausalLM sharing its weights)."""
    import transformers
    from transformers.models.longcat_flash import modeling_longcat_flash as M

    cfg = longcat_flash_chat().replace(num_layers=1, vocab_size=1024, max_position_embeddings=max_pos)
    if small:  # the same code on a CPU-sized layer (smoke test of the benchmark itself)
        cfg = tiny_longcat(num_layers=1, max_position_embeddings=max_pos)
    d = config_to_dict(cfg)
    hcfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    hcfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        layer = M.LongcatFlashDecoderLayer(hcfg, 0).to(dtype)
    layer = layer.to_empty(device=device).eval()
    synth_(layer)
    rot = M.LongcatFlashRotaryEmbedding(hcfg).to(device)
    ours = ours_sharing(cfg, dict(layer.named_parameters()), "model.layers.0.", device, dtype)
    return layer, rot, ours


def hf_layer_decode(layer, rot, batch, ctx, device, dtype, steps=3):
    from transformers import DynamicCache

    cfg = layer.self_attn[0]
    cache = DynamicCache()
    for i in range(2):
        cache.update(torch.randn(batch, 1, ctx, cfg.kv_lora_rank, device=device, dtype=dtype),
                     torch.randn(batch, 1, ctx, cfg.qk_rope_head_dim, device=device, dtype=dtype), i)
    x = torch.randn(batch, 1, layer.hidden_size, device=device, dtype=dtype)
    pos = torch.full((batch, 1), ctx, device=device)
    cos, sin = rot(x, pos)

    def step():
        layer(x, attention_mask=None, position_ids=pos, past_key_values=cache, use_cache=True,
              position_embeddings=(cos, sin))

    return timed(step, device, reps=steps, warmup=1)


def hf_layer_prefill(layer, rot, t, device, dtype):
    x = torch.randn(1, t, layer.hidden_size, device=device, dtype=dtype)
    pos = torch.arange(t, device=device)[None]
    cos, sin = rot(x, pos)
    return timed(lambda: layer(x, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin)), device,
                 reps=2, warmup=1)


def captured(fn):
    """fn captured as a CUDA graph (after a warm-up run on a side stream): returns graph.replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@torch.no_grad()
def prefill_forms_times(model, ids, device, flops, ceil) -> dict:
    """A PREFILL forward of ids (no cache) with LongCat's shortcut MoE inline and on its side stream
    (Forms.shortcut), and inline with the norms as plain ops (Forms.norm), each eager and captured as a CUDA graph
    (what generate()'s prefill_graph replays): seconds, fraction of the bf16 peak, and whether the stream's outputs
    are bit-equal to inline's."""
    out, outs = {}, {}
    for name, kw in (("inline", dict(shortcut="inline")), ("stream", dict(shortcut="stream")),
                     ("plain_norm", dict(shortcut="inline", norm="plain"))):
        forms = dataclasses.replace(PREFILL, **kw)
        run = lambda: model(ids, forms=forms, logits_to_keep=1)  # noqa: E731
        outs[name] = run()
        for how, fn in (("eager", run), ("graph", captured(run))):
            t = timed(fn, device, reps=3)
            out[f"ours_{how}_{name}_s"], out[f"ours_{how}_{name}_flops_frac"] = t, flops / t / ceil["bf16_flops"]
    out["stream_equals_inline"] = bool(torch.equal(outs["stream"], outs["inline"]))
    return out


def kernel_stats(dec) -> dict:
    """CUDA kernels launched by one (eager) decode step and their summed device time (torch.profiler). dec: a
    Decoder (its step is run), or any callable (e.g. a prefill)."""
    from torch.profiler import ProfilerActivity, profile

    run = dec if callable(dec) else dec.run_step
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:  # no_grad: as in step(); a
        run()  # compiled step run with grad enabled would recompile (and autotune) inside the profile
        torch.cuda.synchronize()
    ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    dt = lambda e: getattr(e, "device_time", getattr(e, "cuda_time", 0.0)) / 1e6  # noqa: E731
    by_name: dict = {}
    for e in ev:
        n, t = by_name.get(e.name, (0, 0.0))
        by_name[e.name] = (n + 1, t + dt(e))
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    return dict(kernels_per_step=len(ev), kernel_busy_s=sum(dt(e) for e in ev),
                kernel_top=[(n[:90], c, t) for n, (c, t) in ranked[:15]],
                kernel_all=[(n[:160], c, t) for n, (c, t) in ranked])  # every kernel of the step: where time goes


def critical_path(events) -> list:
    """events: (name, start, duration) of the kernels of one step on one stream, any order and unit -> [(name,
    calls, cost)] ranked by cost, where a kernel's cost is what it adds to the step's critical path: its end minus
    the latest end before it (0 if it ends earlier). With programmatic dependent launch a kernel is launched early
    and waits in gdc_wait(), so its duration includes that wait and overlaps its predecessor's; this attribution
    counts each moment of the step once: the costs sum to the span, first start to last end."""
    ev = sorted(events, key=lambda e: e[1])
    if not ev:
        return []
    costs, last = {}, ev[0][1]
    for name, start, dur in ev:
        end = start + dur
        n, c = costs.get(name, (0, 0.0))
        costs[name] = (n + 1, c + max(0.0, end - last))
        last = max(last, end)
    return sorted(((n, c, t) for n, (c, t) in costs.items()), key=lambda r: -r[2])


def critical_stats(dec) -> dict:
    """One replay of the decode step's CUDA graph, profiled: its span and each kernel's cost on the critical path
    (`critical_path`), the table behind "where the time goes"."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.graph.replay()
        torch.cuda.synchronize()
    ev = [(e.name, e.time_range.start / 1e6, (e.time_range.end - e.time_range.start) / 1e6)
          for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]  # seconds
    if not ev:
        return {}
    span = max(s + d for _, s, d in ev) - min(s for _, s, _ in ev)
    return dict(graph_span_s=span, kernel_critical=[(n[:90], c, t) for n, c, t in critical_path(ev)[:20]])


def ours_decode(model, batch, ctx, device, experts="auto", compile=False, steps=20, attention="absorbed",
                router="plain", linear="plain", rope="plain", shortcut="inline", seed: int = 1):
    """Seconds per decode step (a replayed CUDA graph on GPU) at context ctx, and the Decoder. Every call replays
    the same tokens (seed) over the same context (fill_context), so two variants' steps route to the same experts
    and compare."""
    forms = Forms(attention, experts, router, linear, rope, shortcut)
    dec = Decoder(model, batch, ctx + 4 * steps + 16, compile=compile, forms=forms)
    fill_context(dec, ctx)
    ids = torch.randint(4, model.config.vocab_size, (batch,), device=device,
                        generator=torch.Generator(device).manual_seed(seed))
    dec.step(ids)  # captures the graph on GPU
    if dec.graphs:
        run = dec.graph.replay
    else:
        def run():
            dec.run_step()
    t = timed(run, device, reps=3, inner=steps, warmup=0)
    return t, dec


def record_routing(dec) -> None:
    """The decoder's own step once more, eagerly, on its inputs (the token it replays, in its context, with its
    forms), so that each MoE block's last_idx holds the experts *that* step touches: the roofline's expert bytes.
    (A replayed graph or a compiled step records no routing. It writes the token's cache slot again, with the same
    values.)"""
    with torch.no_grad():
        decode_step(dec.model, dec.cache, dec.ids, dec.cache_position, dec.attention_mask, dec.forms)


VARIANTS = {  # name -> Decoder options (all: static cache, absorbed MLA, one CUDA graph per step on GPU)
    "graph": dict(experts="grouped"),  # grouped experts
    "graph_gather": dict(experts="gather"),  # gathered experts (small batches)
    "compiled": dict(compile="tuned"),  # torch.compile'd step inside the graph (experts "auto": gemv at batch 1)
    "compiled_grouped": dict(experts="grouped", compile="tuned"),  # ... with grouped experts
    "graph_fused": dict(experts="fused"),  # the Triton MoE decode kernels (kernels/moe_decode.py)
    "graph_fused_mla": dict(experts="fused", attention="fused"),  # ... and the MLA decode kernel (mla_decode.py)
    "compiled_fused": dict(experts="fused", compile=True),  # ... inside a compiled step
    "compiled_fused_mla": dict(experts="fused", attention="fused", compile=True),  # MoE + MLA kernels, plain router
    "compiled_gemv": dict(experts="gemv", compile=True),  # the compiled step of the previous round (gemv experts)
    "compiled_decode": dict(experts="auto", attention="auto", router="auto", linear="auto", rope="auto",
                            compile=True),
    # generate(fast, compile)'s DECODE forms: on CUDA the MLA, MoE, router and rope-cache kernels, the projections
    # as gemv
    "compiled_decode_rope_plain": dict(experts="auto", attention="auto", router="auto", linear="auto",
                                       compile=True),  # ... with the latent's norm, RoPE and cache write as ops
    "compiled_decode_triton": dict(experts="auto", attention="auto", router="auto", linear="triton", rope="auto",
                                   compile=True),
    # ... with the projections (and MLA's W_uk / W_uv products) in kernels/gemv.py's split-K GEMV kernel
    "compiled_decode_prefetch": dict(experts="auto", attention="auto", router="auto", linear="prefetch",
                                     rope="auto", compile=True),
    # ... with every projection that fits (q_a with kv_a, q_b with q_a's norm) in kernels/prefetch_gemv.py, each
    # program's weight rows loaded before its PDL wait; "auto" takes it on sm_90+ for the weights under linear's
    # gemv cap (docs/perf-run21/)
    "compiled_decode_fused_logits": dict(experts="auto", attention="auto", router="fused_logits", linear="auto",
                                         rope="auto", compile=True),
    # ... with the router's logits in its selection kernel (kernels/router.py route_logits; opt-in: measured slower
    # on one H100, docs/perf-run22/)
    "compiled_decode_skinny": dict(experts="auto", attention="auto", router="auto", linear="skinny", rope="auto",
                                   compile=True),  # ... with the projections, MLA's per-head products and the
    # router's logits in kernels/skinny_gemm.py's split-K tensor-core kernel (opt-in: a decode batch of 5-64)
    "compiled_decode_cublas": dict(experts="auto", attention="auto", router="auto", compile=True),  # ... with the
    # projections through cuBLAS (= compiled_fused_mla, plus the router kernel where "auto" picks it: GLM)
    "compiled_decode_stream": dict(experts="auto", attention="auto", router="auto", linear="auto", rope="auto",
                                   shortcut="stream", compile=True),  # ... with LongCat's shortcut MoE on a side
    # stream (model/overlap.py: run eagerly between compiled graphs, the step captured with both branches)
    "graph_decode": dict(experts="auto", attention="auto", router="auto", linear="auto", rope="auto"),  # DECODE's
    # forms without torch.compile (the kernels eager, the step one CUDA graph)
    "graph_decode_stream": dict(experts="auto", attention="auto", router="auto", linear="auto", rope="auto",
                                shortcut="stream"),  # ... with the shortcut MoE on a side stream
    "tuned_decode": dict(experts="auto", attention="auto", router="auto", linear="auto", rope="auto",
                         compile="tuned"),  # ...
    # with inductor's coordinate-descent tuning of its own kernels
}


def decode_variants(model, batch, ctx, device, names, row, ceil):
    """Time each variant into row[f"ours_{name}_s"]; row["ours_s"] = the best; roofline from the first."""
    for name in names:
        try:
            t0 = time.perf_counter()
            t, dec = ours_decode(model, batch, ctx, device, **VARIANTS[name])
            row[f"ours_{name}_s"] = t
            if name == "compiled":
                row["compile_wall_s"] = time.perf_counter() - t0
            if "roofline_s" not in row:
                record_routing(dec)  # the experts the replayed step touches
                row.update(decode_roofline(model, batch, ctx, ceil))
                if dec.graphs and batch == 1:
                    row.update(kernel_stats(dec))
            elif dec.graphs and batch == 1:  # kernel count of each further variant too
                ks = kernel_stats(dec)
                row[f"{name}_kernels_per_step"], row[f"{name}_kernel_busy_s"] = ks["kernels_per_step"], ks[
                    "kernel_busy_s"]
                row[f"{name}_kernel_top"] = ks["kernel_top"]
            del dec
        except Exception as e:  # an optional variant (torch.compile) may fail on some builds: report it
            row[f"ours_{name}_error"] = f"{type(e).__name__}: {e}"[:300]
    best = min((k for k in row if k.startswith("ours_") and k.endswith("_s")), key=lambda k: row[k])
    row["ours_s"], row["ours_best"] = row[best], best[5:-2]
    return row


def bench_layer(args, ceil, res) -> dict:
    device, dtype = args.device, torch.bfloat16
    small = device == "cpu"
    max_pos = 131072 + 4096
    layer, rot, ours = longcat_layer(device, dtype, max_pos, small)
    res.update(config="LongCat-Flash, one layer (2 MLA + 2 dense FFN + MoE 512+256 experts top-12), "
                      "+ vocab-1024 embedding/head", rows=[])
    contexts = [64, 128] if small else [1024, 32768]
    for batch in () if args.layer_prefill_only else (1, 32):
        for ctx in contexts:
            row = dict(batch=batch, ctx=ctx)
            names = ["graph", "graph_gather"] if batch == 1 else ["graph"]
            if args.compile and ctx == contexts[0]:
                names += ["compiled"]
            decode_variants(ours, batch, ctx, device, names, row, ceil)
            hf_extra = batch * ctx * 64 * (192 + 256 + 128) * 2  # transformers expands K and V per step
            if hf_extra < 24e9:
                row["hf_s"] = hf_layer_decode(layer, rot, batch, ctx, device, dtype)
            else:
                row["hf_s"] = None
                row["hf_note"] = f"skipped: transformers would expand {hf_extra / 1e9:.0f} GB of K/V per step"
            res["rows"].append(row)
            print(f"  layer decode b={batch} ctx={ctx}: " + ", ".join(
                f"{k}={v * 1e3:.3f}ms" for k, v in row.items() if k.endswith("_s") and v), flush=True)
            checkpoint()
            torch.cuda.empty_cache() if device != "cpu" else None
    res["prefill"] = []
    for t in ([128, 256] if small else [2048, 8192]):
        ids = torch.randint(4, ours.config.vocab_size, (1, t), device=device)
        ts = timed(lambda: ours(ids, forms=PREFILL, logits_to_keep=1), device, reps=3)  # causal SDPA, no cache
        fl = prefill_flops(ours, t)
        row = dict(tokens=t, ours_s=ts, ours_tok_s=t / ts, flops=fl, ours_flops_frac=fl / ts / ceil["bf16_flops"])
        if device != "cpu":  # the same prefill with the shortcut MoE inline, and both captured as a CUDA graph
            row.update(prefill_forms_times(ours, ids, device, fl, ceil))
        if args.layer_prefill_only and device != "cpu":  # where the prefill's time goes
            row.update(kernel_stats(lambda: ours(ids, forms=PREFILL, logits_to_keep=1)))
        row["hf_s"] = hf_layer_prefill(layer, rot, t, device, dtype)
        row["hf_tok_s"] = t / row["hf_s"]
        res["prefill"].append(row)
        checkpoint()
        print(f"  layer prefill {t}: ours {t / ts:,.0f} tok/s ({row['ours_flops_frac']:.0%} of peak), "
              f"transformers {row['hf_tok_s']:,.0f} tok/s" + "".join(
                  f", {k[5:-2]} {row[k] * 1e3:.2f} ms ({row[k[:-2] + '_flops_frac']:.0%})" for k in row
                  if k.startswith("ours_") and k.endswith(("_inline_s", "_stream_s", "_plain_norm_s"))), flush=True)
    if args.layer_prefill_only:
        del layer, ours
        return res
    # 128k context: KV bytes and step latency
    ctx = 131072 - 128 if not small else 256
    per_tok = ours.config.kv_cache_bytes_per_token()  # == StaticCache.bytes_per_token() (tests/test_fast.py)
    res["long"] = long = dict(ctx=ctx, batch=1, kv_bytes=per_tok * ctx, kv_bytes_per_token=per_tok,
                              kv_bytes_per_token_per_sublayer=per_tok // ours.config.num_attn_sublayers)
    decode_variants(ours, 1, ctx, device, ["graph"] + (["compiled"] if args.compile else []), long, ceil)
    t = long["ours_s"]
    if not small:
        try:
            res["long"]["hf_s"] = hf_layer_decode(layer, rot, 1, ctx, device, dtype, steps=2)
        except torch.OutOfMemoryError as e:
            res["long"]["hf_note"] = f"OOM: {e}"[:200]
    checkpoint()
    print(f"  layer 128k: ours {t * 1e3:.3f} ms, KV {per_tok} B/token", flush=True)
    # equality on this layer: our fast decode step vs our plain forward, and plain vs transformers
    res["check"] = layer_check(layer, rot, ours, device, dtype)
    del layer, ours
    return res


@torch.no_grad()
def layer_check(layer, rot, ours, device, dtype) -> dict:
    """Relative differences of one prefill: ours plain vs transformers, ours fast prefill vs ours plain."""
    x = torch.randn(1, 64, ours.config.hidden_size, device=device, dtype=dtype)
    pos = torch.arange(64, device=device)[None]
    cos, sin = rot(x, pos)
    ref = layer(x, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
    impl = layer.self_attn[0].config._attn_implementation
    from ..model.mla import attention_bias
    from ..model.rope import rope_cos_sin

    c2, s2 = rope_cos_sin(pos, ours.config.qk_rope_head_dim, ours.config.rope_theta, dtype)
    mask = attention_bias(None, torch.arange(64, device=device), 64, dtype)
    mask_eager = torch.full((64, 64), torch.finfo(dtype).min, device=device, dtype=dtype).triu(1)[None, None]
    layer.self_attn[0].config._attn_implementation = "eager"
    ref_eager = layer(x, attention_mask=mask_eager, position_ids=pos, position_embeddings=(cos, sin))
    layer.self_attn[0].config._attn_implementation = impl
    got = ours.model.layers[0](x, c2, s2, mask)
    fast = ours.model.layers[0](x, c2, s2, None, forms=PREFILL)  # causal SDPA, grouped experts
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    absorbed = ours.model.layers[0](x, c2, s2, mask, forms=Forms(attention="absorbed"))
    return dict(plain_vs_hf_eager_rel=rel(got, ref_eager), plain_equals_hf_eager=bool(torch.equal(got, ref_eager)),
                plain_vs_hf_sdpa_rel=rel(got, ref), fast_vs_plain_rel=rel(fast, got),
                bf16_noise_absorbed_vs_naive_rel=rel(absorbed, got))


# ------------------------------------------------------------------------------------------------ gpu: glm


def glm_models(device, dtype, small=False):
    import transformers

    cfg = glm_4_7_flash()
    if small:
        from ..model.config import tiny_glm

        cfg = tiny_glm()
    d = config_to_dict(cfg)
    hcfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    cls = transformers.AutoModelForCausalLM
    with torch.device("meta"):
        try:
            hf = cls.from_config(hcfg, dtype=dtype, attn_implementation="sdpa", experts_implementation="grouped_mm")
        except (TypeError, ValueError):
            hf = cls.from_config(hcfg, dtype=dtype, attn_implementation="sdpa")
    hf = hf.to(dtype).to_empty(device=device).eval()
    synth_(hf)
    rot = hf.model.rotary_emb  # its inv_freq was a meta buffer: rebuild it
    hf.model.rotary_emb = type(rot)(config=hf.config).to(device)
    ours = ours_sharing(cfg, dict(hf.named_parameters()), "", device, dtype)
    return hf, ours, getattr(hf.config, "_experts_implementation", None)


def bench_glm(args, ceil, res) -> dict:
    device, dtype = args.device, torch.bfloat16
    small = device == "cpu"
    hf, ours, impl = glm_models(device, dtype, small)
    res.update(config="GLM-4.7-Flash full size (47 layers, 64 experts top-4 + 1 shared), synthetic bf16",
               hf_experts_implementation=str(impl), not_shared=ours.synthetic_tensors, rows=[])
    V = ours.config.vocab_size
    with torch.no_grad():
        for batch in (1, 32):
            row = dict(batch=batch, ctx=128)
            prompt = torch.randint(4, V, (batch, 128), device=device)
            decode_variants(ours, batch, 128, device, ["graph", "graph_gather"] if batch == 1 else ["graph"], row,
                            ceil)
            row["ours_tok_s"] = batch / row["ours_s"]
            t = row["ours_s"]
            out = hf(prompt, use_cache=True)
            pkv = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            row["hf_s"] = timed(lambda: hf(nxt, past_key_values=pkv, use_cache=True), device, reps=3, warmup=1)
            row["hf_tok_s"] = batch / row["hf_s"]
            res["rows"].append(row)
            checkpoint()
            print(f"  glm decode b={batch}: ours {row['ours_tok_s']:,.0f} tok/s ({t * 1e3:.2f} ms/step, roofline "
                  f"{row['roofline_s'] * 1e3:.2f} ms), transformers {row['hf_tok_s']:,.1f} tok/s", flush=True)
        t = 256 if small else 2048
        ids = torch.randint(4, V, (1, t), device=device)
        ts = timed(lambda: ours(ids, forms=PREFILL, logits_to_keep=1), device, reps=3)
        th = timed(lambda: hf(ids, use_cache=False), device, reps=2)
        res["prefill"] = dict(tokens=t, ours_s=ts, ours_tok_s=t / ts, hf_s=th, hf_tok_s=t / th,
                              ours_flops_frac=prefill_flops(ours, t) / ts / ceil["bf16_flops"])
        print(f"  glm prefill {t}: ours {t / ts:,.0f} tok/s, transformers {t / th:,.0f} tok/s", flush=True)
        checkpoint()
        res["check"] = glm_check(hf, ours, device)
        checkpoint()
        if args.compile:  # the whole 47-layer step through torch.compile (long compile: batch 1 only)
            row = res["rows"][0]
            decode_variants(ours, 1, 128, device, ["compiled"], row, ceil)
            row["ours_tok_s"] = 1 / row["ours_s"]
            print(f"  glm decode b=1 compiled: {row.get('ours_compiled_s', float('nan')) * 1e3:.2f} ms/step "
                  f"(compile + capture {row.get('compile_wall_s', float('nan')):.0f} s) "
                  f"{row.get('ours_compiled_error', '')}", flush=True)
            checkpoint()
    del hf, ours
    return res


@torch.no_grad()
def glm_check(hf, ours, device) -> dict:
    """Ours (plain) vs transformers with eager attention and experts (same op order: expected bit-equal), and the
    fast decode's logits vs the plain forward's, next to the bf16 noise floor (absorbed vs naive, both exact)."""
    V = ours.config.vocab_size
    p = torch.randint(4, V, (1, 16), device=device)
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    out = dict(hf_sdpa_grouped_vs_plain_rel=rel(hf(p).logits, ours(p)))
    try:
        hf.set_attn_implementation("eager")
        if hasattr(hf, "set_experts_implementation"):
            hf.set_experts_implementation("eager")
        ref = hf(p).logits
        plain = ours(p)
        out.update(hf_eager_vs_plain_rel=rel(ref, plain), plain_equals_hf_eager=bool(torch.equal(ref, plain)))
    except Exception as e:
        out["hf_eager_error"] = f"{type(e).__name__}: {e}"[:300]
    full = ours(p)  # (1, 16, V) plain, naive MLA
    out["bf16_noise_absorbed_vs_naive_rel"] = rel(ours(p, forms=Forms(attention="absorbed"))[:, -1], full[:, -1])
    dec = Decoder(ours, 1, 16)
    dec.prefill(p[:, :12])
    for i in range(12, 15):
        last = dec.step(p[:, i])
    out["fast_decode_vs_plain_rel"] = rel(last, full[:, 14])  # logits after token 14, both ways
    out["fast_decode_same_argmax"] = bool(torch.equal(last.argmax(-1), full[:, 14].argmax(-1)))
    return out


# ------------------------------------------------------------------------------------------------ gpu: batch 1


def bench_fp8(args, ceil, res) -> dict:
    """One LongCat-Flash layer, bf16 vs FP8 kept (the same weights, quantized in memory by quant.quantize_)."""
    from ..model import quant

    device = args.device
    small = device == "cpu"
    cfg = (tiny_longcat(num_layers=1, max_position_embeddings=4096, hidden_size=128, ffn_hidden_size=256,
                        expert_ffn_hidden_size=128) if small
           else longcat_flash_chat().replace(num_layers=1, vocab_size=1024, max_position_embeddings=4096 + 512))
    block = (32, 32) if small else (128, 128)
    with torch.device("meta"):
        model = CausalLM(cfg).to(torch.bfloat16)
    model = model.to_empty(device=device).eval().requires_grad_(False)
    for b in model.buffers():
        b.zero_()
    synth_(model)
    ctx, t_prefill = (64, 128) if small else (1024, 2048)
    res.update(config="LongCat-Flash, one full-width layer (2 MLA + 2 dense FFN + MoE 512+256 experts top-12) + "
                      "vocab-1024 embedding/head; FP8 = e4m3 with 128x128 block scales", rows=[], prefill=[])
    ids = torch.randint(4, cfg.vocab_size, (2, 64), device=device, generator=torch.Generator(device).manual_seed(0))
    with torch.no_grad():
        ref = model(ids, forms=PREFILL).float()
    for precision in ("bf16", "fp8"):
        if precision == "fp8":
            quant.quantize_(model, block)
            torch.cuda.empty_cache() if not small else None
            with torch.no_grad():
                got = model(ids, forms=PREFILL).float()
                plain = model(ids, forms=Forms("naive", "loop")).float()  # dequantize-per-call reference forms
            res["fp8_vs_bf16_logits_rel"] = float((got - ref).norm() / ref.norm())
            res["fp8_kernels_vs_fp8_plain_rel"] = float((got - plain).norm() / plain.norm())
        wbytes = weight_bytes(model) + sum(b.numel() * 4 for n, b in model.named_buffers() if n.endswith("_scale_inv"))
        res[f"{precision}_weight_bytes"] = wbytes
        for batch in (1, 32):
            row = dict(precision=precision, batch=batch, ctx=ctx)
            names = ["graph", "graph_fused"]  # grouped experts (bf16: the fast form at batch 32), fused kernels
            if precision == "fp8" and batch == 1:
                names = ["graph_fused", "graph_gather"]  # FP8 grouped dequantizes every expert: not for batch 1
            if args.compile and batch == 1:
                names += ["compiled_fused"]
            decode_variants(model, batch, ctx, device, names, row, ceil)
            row["over_roofline"] = row["ours_s"] / row["roofline_s"]
            res["rows"].append(row)
            print(f"  fp8 section {precision} decode b={batch} ctx={ctx}: " + ", ".join(
                f"{k}={v * 1e3:.3f}ms" for k, v in row.items() if k.endswith("_s") and v and k.startswith("ours"))
                + f"; roofline {row['roofline_s'] * 1e3:.3f} ms, {row.get('kernels_per_step', '?')} kernels",
                flush=True)
            checkpoint()
        x = torch.randint(4, cfg.vocab_size, (1, t_prefill), device=device)
        with torch.no_grad():
            ts = timed(lambda: model(x, forms=PREFILL, logits_to_keep=1), device, reps=3)
        fl = prefill_flops(model, t_prefill)
        res["prefill"].append(dict(precision=precision, tokens=t_prefill, ours_s=ts, tok_s=t_prefill / ts,
                                   flops_frac=fl / ts / ceil["bf16_flops"]))
        if device != "cpu":
            res[f"{precision}_peak_bytes"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        print(f"  fp8 section {precision} prefill {t_prefill}: {ts * 1e3:.1f} ms = {t_prefill / ts:,.0f} tok/s "
              f"({fl / ts / ceil['bf16_flops']:.0%} of the bf16 peak); weights {wbytes / 2**30:.2f} GiB", flush=True)
        checkpoint()
    print(f"  fp8 vs bf16 logits: rel {res['fp8_vs_bf16_logits_rel']:.4f}; FP8 kernels vs FP8 plain forms: rel "
          f"{res['fp8_kernels_vs_fp8_plain_rel']:.2e}", flush=True)
    del model
    return res


def bench_b1(args, ceil, res) -> dict:
    """Batch-1 decode, ours only (no transformers): the LongCat layer at context 1k and the full GLM at context
    128, CUDA graph vs torch.compile + graph; kernels per step, each kernel's cost on the critical path of one graph
    replay (`kernel_critical`, `critical_path`) and the roofline of each run (it depends on how many distinct
    experts that run's tokens touched)."""
    from ..model.config import tiny_glm

    device, dtype = args.device, torch.bfloat16
    small = device == "cpu"
    res["rows"] = []
    _, _, layer = longcat_layer(device, dtype, 4096, small)  # our layer; its weights came from transformers'
    variants = args.b1_variants.split(",")
    b1_rows(layer.requires_grad_(False), "longcat_layer", 64 if small else 1024, device, ceil, res["rows"], variants,
            args.b1_batch)
    del layer
    torch.cuda.empty_cache() if device != "cpu" else None
    if args.b1_layer_only:
        return res
    with torch.device("meta"):
        glm = CausalLM(tiny_glm() if small else glm_4_7_flash()).to(dtype)
    glm = glm.to_empty(device=device).eval().requires_grad_(False)
    synth_(glm)
    b1_rows(glm, "glm", 128, device, ceil, res["rows"], variants, args.b1_batch)
    return res


def b1_rows(model, name, ctx, device, ceil, rows, variants=("graph", "compiled"), batch=1):
    for variant in variants:
        torch._dynamo.reset()
        t0 = time.perf_counter()
        t, dec = ours_decode(model, batch, ctx, device, **VARIANTS[variant])
        record_routing(dec)  # the experts this row's replayed step touches (for its roofline)
        row = dict(model=name, ctx=ctx, batch=batch, variant=variant, ours_s=t, tok_s=batch / t,
                   setup_wall_s=time.perf_counter() - t0, **decode_roofline(model, batch, ctx, ceil))
        row["over_roofline"] = t / row["roofline_s"]
        if dec.graphs:
            row.update(kernel_stats(dec))
            row.update(critical_stats(dec))
        rows.append(row)
        del dec
        checkpoint()
        print(f"  b1 {name} b={batch} ctx={ctx} {variant}: {t * 1e3:.3f} ms = {batch / t:,.0f} tok/s, roofline "
              f"{row['roofline_s'] * 1e3:.3f} ms ({row['over_roofline']:.2f}x), "
              f"{row.get('kernels_per_step', '?')} kernels (setup {row['setup_wall_s']:.0f} s)", flush=True)
        if row.get("kernel_critical"):  # where the step's time goes: each kernel's cost on the critical path
            top = ", ".join(f"{n[:40]} {c}x {cost * 1e6:.0f} us" for n, c, cost in row["kernel_critical"][:6])
            print(f"    critical path of one replay ({row['graph_span_s'] * 1e3:.3f} ms): {top}", flush=True)


# ------------------------------------------------------------------------------------------------ gpu: end to end


def wall(fn, device) -> float:
    """Wall-clock seconds of one call (what a user waits), device work included."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_e2e(args, ceil, res) -> dict:
    """What a user experiences: generate() wall clock for GLM-4.7-Flash at full size (synthetic bf16), prompt 128 +
    128 new tokens, batch 1 and 32 -- ours (fast: CUDA graph; fast + compile) and transformers at its best
    single-GPU setting (static cache, which makes its generate() torch.compile the forward; batched_mm experts) --
    plus the one-time compile wall time of each, time to first token, and the per-step roofline."""
    device, dtype = args.device, torch.bfloat16
    small = device == "cpu"
    hf, ours, _ = glm_models(device, dtype, small)
    try:
        hf.set_experts_implementation(args.hf_experts)
    except Exception as e:  # noqa: BLE001 -- older transformers: report what ran
        res["hf_experts_note"] = f"batched_mm not set: {type(e).__name__}: {e}"[:200]
    res["hf_experts_implementation"] = str(getattr(hf.config, "_experts_implementation", None))
    res.update(config="GLM-4.7-Flash full size, synthetic bf16, prompt 128 + 128 new tokens, greedy", rows=[])
    V, plen, new = ours.config.vocab_size, 128, (16 if small else 128)
    batches = [1, 32] if not args.batches else [int(b) for b in args.batches.split(",")]
    with torch.no_grad():
        for batch in batches:
            ids = torch.randint(4, V, (batch, plen), device=device, generator=torch.Generator(device).manual_seed(0))
            row = dict(batch=batch, prompt=plen, new_tokens=new)
            variants = [("fast", dict(fast=True)), ("fast_compile", dict(fast=True, compile=True)),
                        ("fast_compile_tuned", dict(fast=True, compile="tuned")),
                        ("fast_compile_tuned_pg", dict(fast=True, compile="tuned", prefill_graph=True)),
                        # the prefill captured per prompt bucket (the default on CUDA since 2026-12-02) / not
                        ("fast_pg", dict(fast=True, prefill_graph=True)),
                        ("fast_compile_pg", dict(fast=True, compile=True, prefill_graph=True)),
                        ("fast_eager_prefill", dict(fast=True, prefill_graph=False)),
                        ("fast_compile_eager_prefill", dict(fast=True, compile=True, prefill_graph=False))]
            variants = [(n, dict(kw, eos_token_id=[])) for n, kw in variants]  # exactly `new` tokens, as transformers
            want = args.e2e_variants.split(",")
            if unknown := sorted(set(want) - {n for n, _ in variants} - {"hf"}):
                raise SystemExit(f"--e2e-variants: unknown {', '.join(unknown)} (see --help)")
            variants = sorted((v for v in variants if v[0] in want), key=lambda v: want.index(v[0]))  # as asked:
            # the first one pays the compile; the later ones find inductor's cache warm
            for name, kw in variants:
                torch._dynamo.reset()
                first = wall(lambda: ours.generate(ids, new, **kw), device)  # includes the one-time compile/capture
                t = min(wall(lambda: ours.generate(ids, new, **kw), device) for _ in range(2))
                ttft = min(wall(lambda: ours.generate(ids, 1, **kw), device) for _ in range(2))
                row[f"ours_{name}_tok_s"], row[f"ours_{name}_first_call_s"] = batch * new / t, first
                row[f"ours_{name}_ttft_s"] = ttft
                other, other_new = ids[:, : plen - 28], max(1, new - 28)  # new lengths, same bucket: no recompile
                row[f"ours_{name}_other_prompt_s"] = wall(lambda: ours.generate(other, other_new, **kw), device)
                print(f"  e2e b={batch} ours {name}: {batch * new / t:,.1f} tok/s end to end, first call "
                      f"{first:.1f} s, TTFT {ttft * 1e3:.1f} ms; prompt {plen - 28} + {max(1, new - 28)} new (no "
                      f"recompile): {row[f'ours_{name}_other_prompt_s']:.2f} s", flush=True)
                checkpoint()
            ours(ids[:, -1:], forms=DECODE)  # one token per row, eagerly: the experts a decode step touches
            row.update(decode_roofline(ours, batch, plen + new // 2, ceil))
            row["roofline_tok_s"] = batch / row["roofline_s"]
            hkw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       eos_token_id=None, pad_token_id=0, cache_implementation="static")
            try:
                if "hf" not in want:
                    raise RuntimeError("not asked for (--e2e-variants)")
                torch._dynamo.reset()
                first = wall(lambda: hf.generate(ids, **hkw), device)
                t = min(wall(lambda: hf.generate(ids, **hkw), device) for _ in range(2))
                row["hf_static_compile_tok_s"], row["hf_static_compile_first_call_s"] = batch * new / t, first
                print(f"  e2e b={batch} transformers static+compile: {batch * new / t:,.1f} tok/s, first call "
                      f"{first:.1f} s", flush=True)
            except Exception as e:  # noqa: BLE001
                row["hf_error"] = f"{type(e).__name__}: {e}"[:300]
                print(f"  transformers: {row['hf_error']}", flush=True)
            res["rows"].append(row)
            checkpoint()
    del hf, ours
    return res


# ------------------------------------------------------------------------------------------------ report


def summary(results: dict) -> str:
    lines = []
    ok = lambda k: isinstance(results.get(k), dict) and "error" not in results[k]  # noqa: E731
    c = results.get("cpu") if ok("cpu") else None
    if c:
        lines.append(f"CPU ({c['config']}):")
        lines.append(f"  decode tok/s: ours plain {c['ours_plain_decode_tok_s']:.0f}, ours fast "
                     f"{c['ours_fast_decode_tok_s']:.0f}, fast+compile {c['ours_fast_compiled_decode_tok_s']:.0f} "
                     f"(compile {c['ours_compile_s']:.0f} s once), transformers {c['hf_decode_tok_s']:.0f}"
                     f"  -> {c.get('decode_speedup_vs_hf', float('nan')):.2f}x (target >= 3x)")
        lines.append(f"  prefill {c['prefill_tokens']} tokens: ours plain {c['ours_plain_prefill_s'] * 1e3:.1f} ms, "
                     f"ours fast {c['ours_fast_prefill_s'] * 1e3:.1f} ms, transformers "
                     f"{c.get('hf_prefill_s', float('nan')) * 1e3:.1f} ms -> "
                     f"{c.get('prefill_speedup_vs_hf', float('nan')):.2f}x (target >= 1.5x)")
    m = results.get("machine")
    if m:
        lines.append(f"GPU {m['device']}: copy {m['bandwidth_Bps'] / 1e12:.2f} TB/s, bf16 matmul "
                     f"{m['bf16_flops'] / 1e12:.0f} TFLOP/s (measured), torch {m['torch']}")
    lay = results.get("layer") if ok("layer") else None
    if lay:
        lines.append("LongCat-Flash layer decode step (ms): batch ctx | ours | roofline | ours/roofline | "
                     "transformers | speedup")
        for r in lay["rows"]:
            hf = r.get("hf_s")
            lines.append(f"  {r['batch']:>3} {r['ctx']:>6} | {r['ours_s'] * 1e3:7.3f} | {r['roofline_s'] * 1e3:7.3f} | "
                         f"{r['ours_s'] / r['roofline_s']:5.2f}x | " +
                         (f"{hf * 1e3:8.2f} | {hf / r['ours_s']:6.1f}x" if hf else r.get("hf_note", "-")))
        for r in lay.get("prefill", []):
            lines.append(f"  prefill {r['tokens']}: ours {r['ours_tok_s']:,.0f} tok/s = {r['ours_flops_frac']:.0%} "
                         f"of measured bf16 peak; transformers {r['hf_tok_s']:,.0f} tok/s")
        lo = lay.get("long")
        if lo:
            lines.append(f"  128k context: KV {lo['kv_bytes'] / 2**20:.0f} MiB "
                         f"({lo['kv_bytes_per_token_per_sublayer']} B/token/sublayer), step "
                         f"{lo['ours_s'] * 1e3:.3f} ms (roofline {lo['roofline_s'] * 1e3:.3f} ms)" +
                         (f", transformers {lo['hf_s'] * 1e3:.1f} ms" if lo.get("hf_s") else ""))
        if "check" in lay:
            lines.append(f"  check: {lay['check']}")
    g = results.get("glm") if ok("glm") else None
    if g:
        lines.append("GLM-4.7-Flash decode (tok/s): batch | ours | transformers | ours ms/step | roofline ms")
        for r in g["rows"]:
            lines.append(f"  {r['batch']:>3} | {r['ours_tok_s']:9,.0f} | {r['hf_tok_s']:9,.1f} | "
                         f"{r['ours_s'] * 1e3:6.2f} | {r['roofline_s'] * 1e3:6.2f}")
        p = g.get("prefill")
        if p:
            lines.append(f"  prefill {p['tokens']}: ours {p['ours_tok_s']:,.0f} tok/s, transformers "
                         f"{p['hf_tok_s']:,.0f} tok/s")
        lines.append(f"  check: {g.get('check')}")
    e = results.get("e2e") if ok("e2e") else None
    if e:
        lines.append("GLM-4.7-Flash generate() end to end (tok/s, prompt 128 + 128): batch | ours fast | ours "
                     "fast+compile (first call s) | transformers static+compile (first call s) | roofline")
        for r in e["rows"]:
            nan = float("nan")
            lines.append(f"  {r['batch']:>3} | {r.get('ours_fast_tok_s', nan):8,.1f} | "
                         f"{r.get('ours_fast_compile_tok_s', nan):8,.1f} "
                         f"({r.get('ours_fast_compile_first_call_s', nan):.0f}) | "
                         f"{r.get('hf_static_compile_tok_s', float('nan')):8,.1f} "
                         f"({r.get('hf_static_compile_first_call_s', float('nan')):.0f}) | "
                         f"{r['roofline_tok_s']:8,.0f}; TTFT ours {r.get('ours_fast_compile_ttft_s', nan) * 1e3:.0f} ms"
                         + (f"; tuned {r['ours_fast_compile_tuned_tok_s']:,.1f} tok/s "
                            f"({r['ours_fast_compile_tuned_first_call_s']:.0f} s)"
                            if "ours_fast_compile_tuned_tok_s" in r else ""))
    b1 = results.get("b1") if ok("b1") else None
    if b1:
        lines.append("Batch-1 decode: model ctx variant | ms/step | tokens/s | roofline ms | ours/roofline | kernels")
        for r in b1["rows"]:
            lines.append(f"  {r['model']} {r['ctx']} {r['variant']} | {r['ours_s'] * 1e3:.3f} | {r['tok_s']:,.0f} | "
                         f"{r['roofline_s'] * 1e3:.3f} | {r['over_roofline']:.2f}x | {r.get('kernels_per_step')}")
    for k, v in results.items():
        if isinstance(v, dict) and "error" in v:
            lines.append(f"{k}: ERROR {v['error'].splitlines()[-1]}")
    return "\n".join(lines)


def plot(results: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    lay = results.get("layer", {})
    rows = lay.get("rows", [])
    if rows:
        ax = axes[0]
        names = [f"b{r['batch']}\nctx {r['ctx'] // 1024}k" if r['ctx'] >= 1024 else f"b{r['batch']}\nctx {r['ctx']}" for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.27 for i in x], [r["roofline_s"] * 1e3 for r in rows], 0.27, label="roofline")
        ax.bar(list(x), [r["ours_s"] * 1e3 for r in rows], 0.27, label="longcat_ref (fast)")
        ax.bar([i + 0.27 for i in x], [(r.get("hf_s") or float("nan")) * 1e3 for r in rows], 0.27,
               label="transformers")
        ax.set_yscale("log"), ax.set_xticks(list(x)), ax.set_xticklabels(names)
        ax.set_ylabel("ms per decode step (log)"), ax.set_title("LongCat-Flash layer: decode step")
        ax.legend(fontsize=8)
    pre = lay.get("prefill", [])
    if pre:
        ax = axes[1]
        x = range(len(pre))
        ax.bar([i - 0.2 for i in x], [r["ours_tok_s"] / 1e3 for r in pre], 0.4, label="longcat_ref")
        ax.bar([i + 0.2 for i in x], [r["hf_tok_s"] / 1e3 for r in pre], 0.4, label="transformers")
        ax.set_xticks(list(x)), ax.set_xticklabels([f"{r['tokens']} tokens" for r in pre])
        ax.set_ylabel("k tokens/s"), ax.set_title("LongCat-Flash layer: prefill"), ax.legend(fontsize=8)
    g = results.get("glm", {})
    if g.get("rows"):
        ax = axes[2]
        x = range(len(g["rows"]))
        ax.bar([i - 0.27 for i in x], [r["batch"] / r["roofline_s"] for r in g["rows"]], 0.27, label="roofline")
        ax.bar(list(x), [r["ours_tok_s"] for r in g["rows"]], 0.27, label="longcat_ref (fast)")
        ax.bar([i + 0.27 for i in x], [r["hf_tok_s"] for r in g["rows"]], 0.27, label="transformers")
        ax.set_yscale("log"), ax.set_xticks(list(x)), ax.set_xticklabels([f"batch {r['batch']}" for r in g["rows"]])
        ax.set_ylabel("tokens/s (log)"), ax.set_title("GLM-4.7-Flash (full size): decode"), ax.legend(fontsize=8)
    m = results.get("machine", {})
    fig.suptitle(f"{m.get('device', '?')}, torch {m.get('torch', '?')}, {results.get('date', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m longcat_ref.tools.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=None,
                    help="comma-separated sections: cpu,layer,glm,b1,fp8,e2e (default: cpu,layer,glm,e2e where possible)")
    ap.add_argument("--json", default=None, help="write all numbers to this file")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd decode step (layer)")
    ap.add_argument("--b1-layer-only", action="store_true", help="b1: the LongCat layer only (skip the full GLM)")
    ap.add_argument("--layer-prefill-only", action="store_true",
                    help="layer: only the prefill rows (2k, 8k tokens), with their kernel profiles")
    ap.add_argument("--b1-batch", type=int, default=1, help="b1: the decode step's batch (default 1; e.g. 32 for "
                    "the batch-32 step's profile)")
    ap.add_argument("--b1-variants", default="graph,compiled",
                    help=f"b1: comma-separated decode variants, of {', '.join(VARIANTS)}")
    ap.add_argument("--e2e-variants", default="fast,fast_compile,hf",
                    help="e2e: which of fast, fast_compile, fast_compile_tuned[_pg], fast[_compile]_pg, "
                    "fast[_compile]_eager_prefill, hf to time, in this order (the first pays the cold compile; _pg: "
                    "prefill_graph=True, _eager_prefill: False, neither: generate()'s default)")
    ap.add_argument("--hf-experts", default="batched_mm",
                    help="e2e: transformers' experts_implementation (batched_mm: best at batch 1; grouped_mm: batch 32)")
    ap.add_argument("--batches", default=None, help="e2e: comma-separated batch sizes (default 1,32)")
    ap.add_argument("--plot", nargs=2, metavar=("RESULTS_JSON", "PNG"), help="plot a results file and exit")
    args = ap.parse_args(argv)
    if args.plot:
        plot(json.load(open(args.plot[0])), args.plot[1])
        return 0
    gpu_ok = args.device != "cpu"
    sections = args.only.split(",") if args.only else (["cpu", "layer", "glm", "e2e"] if gpu_ok else ["cpu"])
    unknown = set(sections) - {"cpu", "layer", "glm", "b1", "fp8", "e2e"}
    if unknown:
        print(f"error: unknown section(s) {sorted(unknown)}; choose from cpu, layer, glm, b1, fp8, e2e",
              file=sys.stderr)
        return 2
    results = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__)
    ceil = dict(bandwidth_Bps=50e9, bf16_flops=1e12)  # CPU placeholders (sections on CPU are smoke runs only)
    if gpu_ok:
        results["machine"] = ceil = machine_ceilings(args.device)
        print(f"machine: {ceil}", flush=True)
    if args.json:
        _DUMP[0] = lambda: json.dump(results, open(args.json, "w"), indent=1, default=str)
    for name in sections:
        fn = dict(cpu=bench_cpu, layer=lambda a, r: bench_layer(a, ceil, r),
                  glm=lambda a, r: bench_glm(a, ceil, r), b1=lambda a, r: bench_b1(a, ceil, r),
                  fp8=lambda a, r: bench_fp8(a, ceil, r),
                  e2e=lambda a, r: bench_e2e(a, ceil, r))[name]
        print(f"[{name}]", flush=True)
        try:
            results[name] = {}
            results[name] = fn(args, results[name]) if name != "cpu" else fn(args)
        except Exception:
            results[name] = dict(error=traceback.format_exc())
            print(results[name]["error"], file=sys.stderr, flush=True)
        if gpu_ok:
            torch.cuda.empty_cache()
        if args.json:
            json.dump(results, open(args.json, "w"), indent=1, default=str)
    print(summary(results))
    return 0 if not any(isinstance(v, dict) and "error" in v for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
