"""Per-GPU memory plan for tensor + expert parallel inference, from a meta-device model (nothing is allocated).

    python -m longcat_ref.runtime.plan                                   # LongCat-Flash-Chat on 8 and 16 GPUs of 80 GiB
    python -m longcat_ref.runtime.plan --model glm --world-size 1 2 4 --gpu-gib 24
    python -m longcat_ref.runtime.plan --model glm --world-size 1 --gpu-gib 24 --weights int4 --context 4096
    python -m longcat_ref.runtime.plan --model path/to/checkpoint --context 32768 --batch 4 --weights fp8

Per rank (the split of parallel.py; every rank holds the same amount):

    weights      the rank's shard, counted from the sharded meta model: 1/W of experts, attention heads, dense FFNs,
                 vocabulary; the small replicated parts (q_a / kv_a projections, norms, router) in full.
                 --weights sets the precision of the matrices of attention, dense FFNs and experts:
                   bf16  2 bytes
                   fp8   1 byte + an fp32 scale per 128 x 128 block (DeepSeek-V3 / LongCat-Flash-Chat-FP8 layout)
                   int4  0.5 byte + a bf16 scale per group of 128 (GPTQ / AWQ style, zero points not counted)
                 Embeddings, lm_head, norms and the router stay in the activation dtype (as quantized checkpoints
                 keep them); the router's correction bias is fp32.
    KV cache     batch x context x (kv_lora_rank + rope) x attention sublayers x --kv bytes, NOT divided by W: MLA's
                 latent is shared by all heads, so splitting heads does not split it (every rank caches it all)
    activations  a rough peak for one forward over `--chunk` new tokens (prefill), naive attention, a = the
                 --activations bytes: max(attention scores b*h/W*t*s*(a+4+a+a), gathered logits b*t*V*a + local
                 b*t*V/W*a, dense FFN b*t*3*F/W*a, router b*t*E*4*2) + a few hidden states b*t*H*a*6.
                 When they are the largest part, a smaller --chunk (chunked prefill) is the cure; the report says so.
    reserve      CUDA context, NCCL buffers, allocator slack (--reserve-gib, default 4)

Bad sizes (zero, negative, NaN, infinite, a chunk longer than the context) are refused with one line on stderr.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from ..model.config import ConfigError, glm_4_7_flash, load_config, longcat_flash_chat
from .parallel import ParallelContext, ParallelError

GiB = 2**30
WEIGHT_BYTES = {"bf16": 2.0, "fp8": 1.0 + 4 / (128 * 128), "int4": 0.5 + 2 / 128}  # per quantizable weight
VALUE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}  # KV cache and activations


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


def _quantized(name: str, p) -> bool:
    """The matrices a quantized checkpoint stores in fp8 / int4: not embeddings, lm_head, norms or the router."""
    return p.ndim >= 2 and _group(name) not in ("embedding + lm_head", "norms + router")


def weight_bytes(cfg, world: int, weights: str = "bf16", bytes_per_value: int = 2) -> dict[str, int]:
    """Bytes of rank 0's weights by kind (from the meta model sharded for `world` ranks).

    weights: the precision of the quantizable matrices (WEIGHT_BYTES); bytes_per_value: everything else."""
    from ..model.model import CausalLM

    ctx = ParallelContext(rank=0, world_size=world)
    ctx.check(cfg)
    with torch.device("meta"):
        model = CausalLM(cfg)
    ctx.shard(model)
    out: dict[str, int] = {}
    for n, p in model.named_parameters():
        per = WEIGHT_BYTES[weights] if _quantized(n, p) else bytes_per_value
        out[_group(n)] = out.get(_group(n), 0) + math.ceil(p.numel() * per)
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
                weights: str = "bf16", kv: str = "bf16", activations: str = "bf16", reserve_gib: float = 4.0) -> dict:
    """Rank 0's memory in bytes: weights by kind, their total, KV cache, activations, reserve and the total."""
    check_sizes(batch=batch, context=context, chunk=chunk, reserve_gib=reserve_gib)
    for flag, v, ok in (("weights", weights, WEIGHT_BYTES), ("kv", kv, VALUE_BYTES), ("activations", activations,
                                                                                       VALUE_BYTES)):
        if v not in ok:
            raise ValueError(f"--{flag} {v!r}: choose one of {', '.join(ok)}")
    a = VALUE_BYTES[activations]
    w = weight_bytes(cfg, world, weights, a)
    kv_b = batch * context * cfg.kv_cache_bytes_per_token(VALUE_BYTES[kv])
    act = activation_bytes(cfg, world, batch, chunk or context, context, a)
    total = sum(w.values()) + kv_b + act + reserve_gib * GiB
    return {"weights": w, "weights_total": sum(w.values()), "kv_cache": kv_b, "activations": act,
            "reserve": reserve_gib * GiB, "total": total}


def check_sizes(**sizes) -> None:
    """Refuse nonsense: counts must be integers >= 1, GiB amounts finite (gpu_gib > 0, reserve_gib >= 0)."""
    for name, v in sizes.items():
        flag = "--" + name.replace("_", "-")
        if v is None and name == "chunk":
            continue
        if name.endswith("_gib"):
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (name == "gpu_gib" and v == 0):
                raise ValueError(f"{flag} must be a finite number {'> 0' if name == 'gpu_gib' else '>= 0'}, got {v}")
        elif not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{flag} must be an integer >= 1, got {v}")
    if sizes.get("chunk") is not None and sizes.get("context") is not None and sizes["chunk"] > sizes["context"]:
        raise ValueError(f"--chunk {sizes['chunk']} is longer than --context {sizes['context']}")


def report(cfg, worlds, batch, context, chunk, gpu_gib, reserve_gib, weights="bf16", kv="bf16",
           activations="bf16", file=None):
    """Print the per-GPU table for each world size (and hints); -> {world size: rank_memory(...)}."""
    file = file or sys.stdout
    check_sizes(gpu_gib=gpu_gib)

    def g(x):
        return f"{x / GiB:8.1f}"

    rows = {}
    for W in worlds:
        try:
            rows[W] = rank_memory(cfg, W, batch, context, chunk, weights, kv, activations, reserve_gib)
        except ParallelError as e:
            print(f"world size {W}: {e}", file=file)
    if not rows:
        return rows
    kinds = sorted({k for r in rows.values() for k in r["weights"]})
    precision = ("2-byte weights" if weights == kv == activations == "bf16"  # all bf16: the short form
                 else f"weights {weights}, KV cache {kv}, activations {activations}")
    print(f"{cfg.model_type}: per-GPU memory in GiB, {precision}, batch {batch}, context {context}, "
          f"prefill chunk {chunk or context}, GPU {gpu_gib} GiB", file=file)
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
        per_tok = cfg.kv_cache_bytes_per_token(VALUE_BYTES[kv])
        if spare > 0:
            print(f"  world {W}: room for {int(spare // per_tok):,} cached tokens in total (batch x context)",
                  file=file)
        else:
            print(f"  world {W}: weights ({r['weights_total'] / GiB:.1f} GiB) + activations + reserve leave no room "
                  f"in {gpu_gib} GiB", file=file)
    heavy = [W for W, r in rows.items() if r["activations"] > max(r["weights_total"], r["kv_cache"])]
    if heavy:
        n = chunk or context
        print(f"hint: activations are the largest part for world size {', '.join(map(str, heavy))} (a prefill of "
              f"{n:,} tokens at once); prefill in chunks, e.g. --chunk {max(1, min(n // 4, 2048))}, to shrink them",
              file=file)
    return rows


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    ap = _Parser(prog="python -m longcat_ref.runtime.plan", description=__doc__.split("\n")[0],
                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="longcat", help="'longcat', 'glm', or a checkpoint directory / config.json")
    ap.add_argument("--world-size", type=int, nargs="+", default=[8, 16], help="GPUs (one table column each)")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--context", type=int, default=8192, help="cached tokens per sequence")
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk in tokens; None = the whole --context")
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU")
    ap.add_argument("--reserve-gib", type=float, default=4.0, help="CUDA context, NCCL, allocator slack")
    ap.add_argument("--weights", choices=list(WEIGHT_BYTES), default="bf16",
                    help="precision of the attention / FFN / expert matrices")
    ap.add_argument("--kv", choices=["bf16", "fp16", "fp8", "fp32"], default="bf16", help="KV cache precision")
    ap.add_argument("--activations", choices=["bf16", "fp16", "fp32"], default="bf16",
                    help="activation precision (also embeddings, norms and router weights)")
    a = ap.parse_args(argv)
    try:
        check_sizes(world_size=min(a.world_size), batch=a.batch, context=a.context, chunk=a.chunk,
                    gpu_gib=a.gpu_gib, reserve_gib=a.reserve_gib)
        cfg = {"longcat": longcat_flash_chat, "glm": glm_4_7_flash}.get(a.model, lambda: load_config(a.model))()
        rows = report(cfg, a.world_size, a.batch, a.context, a.chunk, a.gpu_gib, a.reserve_gib, a.weights, a.kv,
                      a.activations)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    return 0 if rows else 2


if __name__ == "__main__":
    sys.exit(main())
