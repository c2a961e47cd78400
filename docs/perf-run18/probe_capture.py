"""Why did `bench --only e2e` (fast_compile) fail on an H100 on 2026-12-06? (docs/perf-run17/, call 5: inductor's
autotuning of a reduction ran inside the decode step's CUDA graph capture, after a warm-up of the same step.)

Experiment, not the package: `PYTHONPATH=. python docs/perf-run18/probe_capture.py --layers 4 [--hf]`. GLM-4.7-Flash
at full width with `--layers` decoder layers (synthetic bf16 weights, as bench), one generate(fast=True,
compile=True) of 128 + 16 tokens, twice, printing dynamo's counters (graphs compiled, graph breaks) after each; run
it with TORCH_LOGS=recompiles,graph_breaks for the reasons. `--hf`: the weights shared with a transformers model, as
bench's e2e builds them; `--warmups N`: generate.CAPTURE_WARMUPS; `--attempts N`: generate.CAPTURE_ATTEMPTS
(default 1: no retry, so that a failed capture shows as it did on 2026-12-06; where the tree has them).
"""

import argparse
import dataclasses
import time
import traceback

import torch

from longcat_ref.tools import bench as B

ap = argparse.ArgumentParser()
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--hf", action="store_true")
ap.add_argument("--warmups", type=int, default=None)
ap.add_argument("--new", type=int, default=16)
ap.add_argument("--device", default="cuda")
ap.add_argument("--attempts", type=int, default=1)
ap.add_argument("--gc-first", action="store_true", help="gc.collect() before the warm-ups (torch.cuda.graph collects "
                "before a capture where torch.compiler.config.force_cudagraph_gc is set: a guarded object collected "
                "there would force a recompile inside the capture)")
a = ap.parse_args()

from longcat_ref.model import generate as G  # noqa: E402

if a.warmups is not None:
    if not hasattr(G, "CAPTURE_WARMUPS"):
        raise SystemExit("this tree has no CAPTURE_WARMUPS")
    G.CAPTURE_WARMUPS = a.warmups
if hasattr(G, "CAPTURE_ATTEMPTS"):
    G.CAPTURE_ATTEMPTS = a.attempts
print("tree:", G.__file__, "CAPTURE_WARMUPS =", getattr(G, "CAPTURE_WARMUPS", "absent (1 warm-up)"),
      "CAPTURE_ATTEMPTS =", getattr(G, "CAPTURE_ATTEMPTS", "absent (1)"), flush=True)

import gc  # noqa: E402

from torch._dynamo.utils import counters  # noqa: E402

capture = G.Decoder.capture


def logged_capture(self):
    if a.gc_first:
        gc.collect()
    n0 = counters["stats"]["unique_graphs"]
    print(f"capture: {n0} graphs compiled before it", flush=True)
    return capture(self)


G.Decoder.capture = logged_capture
full = B.glm_4_7_flash
def cut(cfg):
    types = cfg.mlp_layer_types[: a.layers] if cfg.mlp_layer_types else None
    return dataclasses.replace(cfg, num_layers=a.layers, mlp_layer_types=types)


B.glm_4_7_flash = lambda: cut(full())
dev, dt = a.device, torch.bfloat16
if a.hf:
    hf, ours, _ = B.glm_models(dev, dt, dev == "cpu")
else:
    from longcat_ref.model.config import tiny_glm
    from longcat_ref.model.model import CausalLM
    with torch.device("meta"):
        ours = CausalLM(cut(tiny_glm()) if dev == "cpu" else B.glm_4_7_flash()).to(dt)
    ours = ours.to_empty(device=dev).eval().requires_grad_(False)
    B.synth_(ours)
print("layers", ours.config.num_layers, "hf" if a.hf else "ours only", flush=True)

ids = torch.randint(4, ours.config.vocab_size, (1, 128), device=dev, generator=torch.Generator(dev).manual_seed(0))
for attempt in range(2):
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            out = ours.generate(ids, a.new, fast=True, compile=True, eos_token_id=[])
        torch.cuda.synchronize() if dev == "cuda" else None
        print(f"generate {attempt}: ok in {time.perf_counter() - t0:.1f} s, {out.shape}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"generate {attempt}: FAILED after {time.perf_counter() - t0:.1f} s: {type(e).__name__}: "
              f"{str(e)[:300]}", flush=True)
        print("".join(traceback.format_exc().splitlines(True)[-40:]), flush=True)
        break
    print("dynamo counters:", {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles",
                                                                                "graph_break", "unimplemented")},
          flush=True)
