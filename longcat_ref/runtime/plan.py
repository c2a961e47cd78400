"""Per-GPU memory plan for tensor + expert parallel inference, from a meta-device model (nothing is allocated).

    python -m longcat_ref.runtime.plan                                   # LongCat-Flash-Chat on 8 and 16 GPUs of 80 GiB
    python -m longcat_ref.runtime.plan --model glm --world-size 1 2 4 --gpu-gib 24
    python -m longcat_ref.runtime.plan --model path/to/checkpoint --context 32768 --batch 4

Per rank (the split of parallel.py; every rank holds the same amount):

    weights      the rank's shard, counted from the sharded meta model: 1/W of experts, attention heads, dense FFNs,
                 vocabulary; the small replicated parts (q_a / kv_a projections, norms, router) in full
    KV cache     batch x context x (kv_lora_rank + rope) x attention sublayers x 2 bytes, NOT divided by W: MLA's
                 latent is shared by all heads, so splitting heads does not split it (every rank caches it all)
    activations  a rough peak for one forward over `--chunk` new tokens (prefill), naive attention:
                 max(attention scores b*h/W*t*s*(2+4+2+2) bytes, gathered logits b*t*V*2 + local b*t*V/W*2,
                     dense FFN b*t*3*F/W*2, router b*t*E*4*2) + a few hidden states b*t*H*2*6
    reserve      CUDA context, NCCL buffers, allocator slack (--reserve-gib, default 4)
"""

from __future__ import annotations

import argparse
import sys

import torch

from ..model.config import ConfigError, glm_4_7_flash, load_config, longcat_flash_chat
from .parallel import ParallelContext, ParallelError

GiB = 2**30


def _group(name: str) -> str:
    if ".experts." in name or name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
        return "experts"
    if ".self_attn." in name:
        return "attention"
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embedding + lm_head"
    if ".mlps." in name or ".shared_experts." in name or (".mlp." in name and ".router." not in name):
        return "dense FFN"
    return "norms + router"


def weight_bytes(cfg, world: int, bytes_per_param: int = 2) -> dict[str, int]:
    """Bytes of rank 0's weights by kind (from the meta model sharded for `world` ranks)."""
    from ..model.model import CausalLM

    ctx = ParallelContext(rank=0, world_size=world)
    ctx.check(cfg)
    with torch.device("meta"):
        model = CausalLM(cfg)
    ctx.shard(model)
    out: dict[str, int] = {}
    for n, p in model.named_parameters():
        out[_group(n)] = out.get(_group(n), 0) + p.numel() * bytes_per_param
    for n, b in model.named_buffers():  # the router's fp32 correction bias
        out["norms + router"] = out.get("norms + router", 0) + b.numel() * 4
    return out


def activation_bytes(cfg, world: int, batch: int, chunk: int, context: int, bpv: int = 2) -> int:
    b, t, s, H = batch, chunk, max(context, chunk), cfg.hidden_size
    h = cfg.num_attention_heads // world
    scores = b * h * t * s * (bpv + 4 + bpv + bpv)  # scores, fp32 softmax, its cast, + mask broadcast
    logits = b * t * cfg.vocab_size * bpv + b * t * (cfg.vocab_size // world) * bpv
    ffn = b * t * 3 * (cfg.ffn_hidden_size // world) * bpv
    router = b * t * cfg.num_router_experts * 4 * 2
    return max(scores, logits, ffn, router) + b * t * H * bpv * 6


def rank_memory(cfg, world: int, batch: int = 1, context: int = 8192, chunk: int | None = None,
                bytes_per_param: int = 2, reserve_gib: float = 4.0) -> dict:
    w = weight_bytes(cfg, world, bytes_per_param)
    kv = batch * context * cfg.kv_cache_bytes_per_token(bytes_per_param)
    act = activation_bytes(cfg, world, batch, chunk or context, context, bytes_per_param)
    total = sum(w.values()) + kv + act + reserve_gib * GiB
    return {"weights": w, "weights_total": sum(w.values()), "kv_cache": kv, "activations": act,
            "reserve": reserve_gib * GiB, "total": total}


def report(cfg, worlds, batch, context, chunk, gpu_gib, reserve_gib, bytes_per_param=2, file=sys.stdout):
    def g(x):
        return f"{x / GiB:8.1f}"

    rows = {}
    for W in worlds:
        try:
            rows[W] = rank_memory(cfg, W, batch, context, chunk, bytes_per_param, reserve_gib)
        except ParallelError as e:
            print(f"world size {W}: {e}", file=file)
    if not rows:
        return rows
    kinds = sorted({k for r in rows.values() for k in r["weights"]})
    print(f"{cfg.model_type}: per-GPU memory in GiB, {bytes_per_param}-byte weights, batch {batch}, context {context},"
          f" prefill chunk {chunk or context}, GPU {gpu_gib} GiB", file=file)
    print(f"{'world size':<29}" + "".join(f"{W:>9}" for W in rows), file=file)
    for k in kinds:
        print(f"  weights: {k:<19}" + "".join(g(r["weights"].get(k, 0)) + " " for r in rows.values()), file=file)
    for label, key in (("weights (total)", "weights_total"), ("KV cache (replicated)", "kv_cache"),
                       ("activations (rough peak)", "activations"), ("reserve", "reserve"), ("total", "total")):
        print(f"{label:<29}" + "".join(g(r[key]) + " " for r in rows.values()), file=file)
    print(f"{'fits in ' + str(gpu_gib) + ' GiB?':<29}" +
          "".join(f"{'yes' if r['total'] <= gpu_gib * GiB else 'NO':>9}" for r in rows.values()), file=file)
    for W, r in rows.items():
        spare = gpu_gib * GiB - r["weights_total"] - r["reserve"] - r["activations"]
        per_tok = cfg.kv_cache_bytes_per_token(bytes_per_param)
        if spare > 0:
            print(f"  world {W}: room for {int(spare // per_tok):,} cached tokens in total (batch x context)",
                  file=file)
        else:
            print(f"  world {W}: weights ({r['weights_total'] / GiB:.1f} GiB) + activations + reserve leave no room "
                  f"in {gpu_gib} GiB", file=file)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m longcat_ref.runtime.plan", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="longcat", help="'longcat', 'glm', or a checkpoint directory / config.json")
    ap.add_argument("--world-size", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=8192, help="cached tokens per sequence")
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk (default: the whole context)")
    ap.add_argument("--gpu-gib", type=float, default=80.0)
    ap.add_argument("--reserve-gib", type=float, default=4.0)
    ap.add_argument("--bytes-per-param", type=int, default=2, help="2 = bf16, 1 = fp8")
    a = ap.parse_args(argv)
    try:
        cfg = {"longcat": longcat_flash_chat, "glm": glm_4_7_flash}.get(a.model, lambda: load_config(a.model))()
        if min(a.world_size + [a.batch, a.context]) < 1:
            raise ValueError("--world-size, --batch and --context must be positive")
        rows = report(cfg, a.world_size, a.batch, a.context, a.chunk, a.gpu_gib, a.reserve_gib, a.bytes_per_param)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    return 0 if rows else 2


if __name__ == "__main__":
    sys.exit(main())
