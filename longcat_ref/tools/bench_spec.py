"""Benchmark of self-speculative decoding (model/speculative.py): what a verify step costs, and what it buys.

    python -m longcat_ref.tools.bench_spec                       # both sections (verify needs a GPU)
    python -m longcat_ref.tools.bench_spec --only tiny --json spec.json

Sections:

  verify  GPU: GLM-4.7-Flash at full size, synthetic bf16 weights (acceptance is meaningless on random weights, so
          none is claimed): with the context filled to --ctx tokens in a static cache, the latency of one main
          forward over t = 1 (plain decode) and t = k + 1 tokens (a verify step), and of the MTP head over 1 and
          k + 1 tokens, each as a replayed CUDA graph. The speedup at acceptance rate a (per draft, independent) is
              E[tokens per step] = (1 - a^(k+1)) / (1 - a)
              step cost         = verify(k+1) + head(k+1) + (k - 1) * head(1)     (what speculative.py runs)
              speedup           = E * decode(1) / step cost
          printed for a = 0.6 / 0.8 / 0.9 and k = 1, 2, 3, batch 1 and 32.
  tiny    the shipped tiny model with its trained head: tokens/s of greedy generate() with and without
          speculation (plain and fast paths) on --device, and the measured acceptance (same tokens, checked).

Timings are medians (CUDA events on GPU). The numbers are printed; --json writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from ..io.checkpoint import from_pretrained
from ..model.config import glm_4_7_flash
from ..model.model import CausalLM
from ..model.mtp import MTPHead
from ..model.speculative import Speculation, _Graph
from .bench import synth_, timed
from .train import SHIPPED_DIR


def step_fns(model, head, mask, cache, hcache):
    """The two fixed-shape calls a speculative step makes (what speculative.py runs), for timing:
    main(ids, position_ids, slots) -> (logits, final-normed hidden state); head(ids, hidden, position_ids, slots)."""
    from ..model.forms import DECODE

    def main_fn(i, p, s):
        lg, hs = model(i, attention_mask=mask, position_ids=p, cache=cache, cache_position=s, forms=DECODE,
                       output_hidden_states=True)
        return lg, model.model.norm(hs[-1])

    def head_fn(i, h, p, s):
        return head(i, h, p, lm_head=model.lm_head, attention_mask=mask, cache=hcache, cache_position=s,
                    forms=DECODE)

    return main_fn, head_fn


def bench_verify(args) -> dict:
    if not torch.cuda.is_available():
        raise RuntimeError("the verify section needs a GPU")
    dev, dt = "cuda", torch.bfloat16
    cfg = glm_4_7_flash()
    with torch.device("meta"):
        model, head = CausalLM(cfg), MTPHead(cfg)
    model = synth_(model.to(dt).to_empty(device=dev)).eval()
    head = synth_(head.to(dt).to_empty(device=dev)).eval()
    for m in (model, head):
        for n, b in m.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.data = b.data.float()
    from ..model.forms import DECODE

    res = {"model": "GLM-4.7-Flash (synthetic bf16)", "ctx": args.ctx, "rows": []}
    for batch in args.batches:
        S = args.ctx + 8
        cache = model.new_cache(batch, S)
        hcache = head.new_cache(batch, S, dt, dev)
        mask = torch.zeros(batch, S, dtype=torch.long, device=dev)
        mask[:, :args.ctx] = 1
        with torch.no_grad():  # fill the context in chunks (the values do not matter, the bytes read do)
            for a in range(0, args.ctx, 512):
                t = min(512, args.ctx - a)
                ids = torch.randint(0, cfg.vocab_size, (batch, t), device=dev)
                model(ids, attention_mask=mask, cache=cache, cache_position=torch.arange(a, a + t, device=dev),
                      forms=DECODE)
        lat = {}
        for t in sorted({1} | {k + 1 for k in args.k}):
            ids = torch.randint(0, cfg.vocab_size, (batch, t), device=dev)
            slots = torch.arange(args.ctx, args.ctx + t, device=dev)
            pos = slots[None].expand(batch, t).contiguous()
            hid = torch.randn(batch, t, cfg.hidden_size, device=dev, dtype=dt)
            mask[:, args.ctx:args.ctx + t] = 1

            main_fn, head_fn = step_fns(model, head, mask, cache, hcache)
            with torch.no_grad():
                gm, gh = _Graph(main_fn, (ids, pos, slots)), _Graph(head_fn, (ids, hid, pos, slots))
                lat[f"main_{t}"] = timed(lambda: gm(ids, pos, slots), dev, reps=args.reps, inner=5)
                lat[f"head_{t}"] = timed(lambda: gh(ids, hid, pos, slots), dev, reps=args.reps, inner=5)
            mask[:, args.ctx:] = 0
            del gm, gh
        d1 = lat["main_1"]
        for k in args.k:
            cost = lat[f"main_{k + 1}"] + lat[f"head_{k + 1}"] + (k - 1) * lat["head_1"]
            row = {"batch": batch, "k": k, "decode_1_ms": d1 * 1e3, "verify_ms": lat[f"main_{k + 1}"] * 1e3,
                   "head_1_ms": lat["head_1"] * 1e3, f"head_{k + 1}_ms": lat[f"head_{k + 1}"] * 1e3,
                   "step_ms": cost * 1e3, "verify_over_decode": lat[f"main_{k + 1}"] / d1}
            for a in (0.6, 0.8, 0.9):
                row[f"speedup_at_{a}"] = (1 - a ** (k + 1)) / (1 - a) * d1 / cost
            res["rows"].append(row)
            print(f"batch {batch:3d} k={k}: decode {d1 * 1e3:.2f} ms, verify({k + 1}) {row['verify_ms']:.2f} ms "
                  f"(x{row['verify_over_decode']:.2f}), step {row['step_ms']:.2f} ms; speedup at a=0.6/0.8/0.9: "
                  + " / ".join(f"{row[f'speedup_at_{a}']:.2f}" for a in (0.6, 0.8, 0.9)), flush=True)
        del cache, hcache
        torch.cuda.empty_cache()
    return res


def bench_tiny(args) -> dict:
    dev = args.device
    model = from_pretrained(SHIPPED_DIR, dtype=torch.float32, device=dev, mtp=True)
    ids = torch.randint(4, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0)).to(dev)
    n = args.new_tokens
    res = {"model": "shipped tiny LongCat-Flash + trained MTP head", "device": dev, "new_tokens": n, "rows": []}
    for fast in (False, True):
        ref = model.generate(ids, n, eos_token_id=[], fast=fast)
        base = timed(lambda: model.generate(ids, n, eos_token_id=[], fast=fast), dev, reps=args.reps)
        row = {"fast": fast, "plain_tokens_per_s": n / base}
        for k in args.k:
            spec = Speculation(k=k)
            assert torch.equal(model.generate(ids, n, eos_token_id=[], fast=fast, speculative=spec), ref)
            t = timed(lambda: model.generate(ids, n, eos_token_id=[], fast=fast, speculative=k), dev, reps=args.reps)
            row[f"k{k}"] = {"tokens_per_s": n / t, "acceptance_rate": spec.acceptance_rate,
                            "tokens_per_step": spec.tokens_per_step, "speedup": base / t}
        res["rows"].append(row)
        print(f"fast={fast}: plain {row['plain_tokens_per_s']:.1f} tokens/s; "
              + "; ".join(f"k={k}: {row[f'k{k}']['tokens_per_s']:.1f} tokens/s (x{row[f'k{k}']['speedup']:.2f}, "
                          f"acceptance {row[f'k{k}']['acceptance_rate']:.2f})" for k in args.k), flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m longcat_ref.tools.bench_spec", description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=None, help="comma-separated sections: verify,tiny (default: both where possible)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ctx", type=int, default=1024, help="verify: tokens already in the cache")
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    ap.add_argument("--k", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    ap.add_argument("--new-tokens", type=int, default=128, help="tiny: tokens generated per run")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    sections = a.only.split(",") if a.only else (["verify", "tiny"] if torch.cuda.is_available() else ["tiny"])
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__}
    for s in sections:
        print(f"[{s}]", flush=True)
        results[s] = {"verify": bench_verify, "tiny": bench_tiny}[s](a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
