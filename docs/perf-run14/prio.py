"""Experiments (one H200), not the package: `PYTHONPATH=. python docs/perf-run14/prio.py [--part prio,tiles]`.

prio: LongCat-Flash's layer prefill (bench's real-size layer) with the shortcut MoE inline or on the side stream,
with the two streams at different CUDA priorities (lower number = higher priority), eager and captured on the
chosen main stream. tiles: the expert kernel path (grouped_triton) with the grouped GEMM's tiles forced.
"""

import argparse
import dataclasses
import json
import os

import torch

from longcat_ref.kernels import grouped_gemm as gg
from longcat_ref.model import overlap
from longcat_ref.model.forms import PREFILL
from longcat_ref.tools import bench as B
from longcat_ref.tools import bench_experts as BE


def prio(out):
    ours = B.longcat_layer("cuda", torch.bfloat16, 8192 + 64, False)[2]
    peak = 745e12
    for t in (2048, 8192):
        ids = torch.randint(4, ours.config.vocab_size, (1, t), device="cuda")
        with torch.no_grad():
            ours(ids, forms=PREFILL, logits_to_keep=1)  # records the routing prefill_flops counts
        fl = B.prefill_flops(ours, t)
        want = None
        for label, main_p, side_p, sc in [("inline", 0, 0, "inline"), ("stream", 0, 0, "stream"),
                                          ("stream main-high", -5, 0, "stream"),
                                          ("stream side-high", 0, -5, "stream")]:
            overlap._SIDE[torch.device("cuda", 0)] = torch.cuda.Stream(priority=side_p)
            overlap._SIDE[torch.device("cuda")] = overlap._SIDE[torch.device("cuda", 0)]
            main = torch.cuda.Stream(priority=main_p)
            forms = dataclasses.replace(PREFILL, shortcut=sc)
            with torch.no_grad(), torch.cuda.stream(main):
                run = lambda: ours(ids, forms=forms, logits_to_keep=1)  # noqa: E731
                y = run()
                want = y if want is None else want
                te = B.timed(run, "cuda", reps=5)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=main):
                    run()
                tg = B.timed(graph.replay, "cuda", reps=5)
            row = dict(tokens=t, form=label, main_priority=main_p, side_priority=side_p, eager_ms=te * 1e3,
                       graph_ms=tg * 1e3, eager_frac=fl / te / peak, graph_frac=fl / tg / peak,
                       equal=bool(torch.equal(y, want)))
            out.append(row)
            print(f"  prio {t} {label:18s} eager {te * 1e3:6.2f} ms ({row['eager_frac']:.0%})  graph {tg * 1e3:6.2f} "
                  f"ms ({row['graph_frac']:.0%})  equal={row['equal']}", flush=True)
    del ours
    torch.cuda.empty_cache()


def tiles(out):
    from longcat_ref.model.experts import Experts

    E, H, I, k = BE.CASES["longcat"]
    with torch.device("cuda"):
        ex = Experts(E, H, I).to(torch.bfloat16).requires_grad_(False)
    ex.gate_up_proj.uniform_(-0.05, 0.05), ex.down_proj.uniform_(-0.05, 0.05)
    rule = gg.choose_tiles
    for n in (2048, 8192):
        for forced in (None, (64, 128, 64, 4), (128, 128, 64, 8), (64, 256, 64, 8), (128, 256, 64, 8)):
            gg.choose_tiles = rule if forced is None else (lambda *a, f=forced, **kw: f)
            try:
                us, _ = BE.time_form(ex, "grouped_triton", n, k, 2)
            except Exception as e:
                print(f"  tiles n={n} {forced}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                continue
            finally:
                gg.choose_tiles = rule
            out.append(dict(tokens=n, tiles=forced, us=us))
            print(f"  tiles n={n} {str(forced or 'rule'):20s}: {us:8.1f} us", flush=True)
        us, _ = BE.time_form(ex, "grouped", n, k, 2)
        out.append(dict(tokens=n, tiles="torch grouped", us=us))
        print(f"  tiles n={n} torch grouped        : {us:8.1f} us", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="prio,tiles")
    args = ap.parse_args()
    res = {}
    for part in args.part.split(","):
        res[part] = []
        {"prio": prio, "tiles": tiles}[part](res[part])
    with open(os.path.join(os.environ.get("OUT", "."), "prio.json"), "w") as f:
        json.dump(res, f, indent=1)
