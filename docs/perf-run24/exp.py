"""perf-run24: prefetch_gemv's rows as a power-of-two head + a tail (kernels/prefetch_gemv.py `split_tiles`, SPLIT
on) against rows padded to one power of two (`tiles`, SPLIT off): GLM-4.7-Flash's o_proj K = 5120 is a tile of
8192 (3072 masked), q_b's K = 768 one of 1024. The masked lanes read no bytes but hold registers, which bound how
many programs are resident and so how much weight is in flight before the dependent-launch wait.

  screen OUT.json  the three projections of a GLM layer (q_a with kv_a, q_b with q_a's norm, o_proj) chained over
                   16 layers of distinct weights in one CUDA graph: us a layer, SPLIT off / on, two rounds, and
                   the outputs against each other
  ab OUT.json      bench's compiled batch-1 step (ctx 128), SPLIT off / on, two rounds, one process, the same
                   weights; each row's logits for a fixed context against the first row's

Not part of the package. `split_tiles` and SPLIT were in kernels/prefetch_gemv.py for the call (commit 83532ee)
and left it after: no faster (README.md). To run this again: git apply docs/perf-run24/split_tiles.diff
usage: PYTHONPATH=. python docs/perf-run24/exp.py screen|ab OUT.json
"""
import json
import sys
import time

import torch

from longcat_ref.kernels import prefetch_gemv as P
from longcat_ref.model import generate

STAMP = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__)


def screen(path):
    dev, dt, L = "cuda", torch.bfloat16, 16
    g = torch.Generator(dev).manual_seed(0)
    rnd = lambda n, k: (torch.randn(n, k, device=dev, generator=g) / k ** 0.5).to(dt)  # noqa: E731
    layers = [dict(qa=rnd(768, 2048), kva=rnd(576, 2048), qb=rnd(5120, 768), o=rnd(2048, 5120),
                   nw=(torch.rand(768, device=dev, generator=g) + 0.5).to(dt)) for _ in range(L)]
    x0 = torch.randn(1, 2048, device=dev, generator=g).to(dt)
    res = dict(STAMP, device=torch.cuda.get_device_name(), rows=[])

    def run():
        x = x0
        for w in layers:
            a = P.prefetch_gemv(x, w["qa"], weight2=w["kva"])  # (1, 1344)
            q = P.prefetch_gemv(a[:, :768], w["qb"], None, w["nw"], 1e-5)  # (1, 5120)
            x = P.prefetch_gemv(q, w["o"])  # (1, 2048)
        return x

    outs = {}
    for r in range(2):
        for split in (False, True):
            P.SPLIT = split
            run()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = run()
            graph.replay()
            torch.cuda.synchronize()
            ts = []
            for _ in range(7):
                t0 = time.perf_counter()
                for _ in range(50):
                    graph.replay()
                torch.cuda.synchronize()
                ts.append((time.perf_counter() - t0) / 50 / L * 1e6)
            us = sorted(ts)[3]
            outs.setdefault(split, out.float().clone())
            diff = float((out.float() - outs[False]).abs().max()) if False in outs else 0.0
            res["rows"].append(dict(split=split, round=r, us_per_layer=us, spread=[min(ts), max(ts)],
                                    max_abs_diff_vs_padded=diff))
            print(f"perf-run24 screen: split={int(split)} r{r} {us:6.2f} us a layer (3 launches; min {min(ts):.2f}"
                  f", max {max(ts):.2f}), max |diff| vs padded {diff:.3e}", flush=True)
            del graph
    json.dump(res, open(path, "w"), indent=1)


def ab(path):
    from longcat_ref.tools import bench

    device, dtype = "cuda", torch.bfloat16
    ceil = bench.machine_ceilings(device)
    res = dict(STAMP, machine=ceil, rows=[])
    with torch.device("meta"):
        glm = bench.CausalLM(bench.glm_4_7_flash()).to(dtype)
    glm = glm.to_empty(device=device).eval().requires_grad_(False)
    bench.synth_(glm)
    ids = torch.randint(4, glm.config.vocab_size, (1,), device=device, generator=torch.Generator(device).manual_seed(1))
    logits, kernel_stats, name = {}, bench.kernel_stats, [None]

    def stats_and_logits(dec):
        out = kernel_stats(dec)
        bench.fill_context(dec, 128)
        logits[name[0]] = dec.step(ids).float()
        return out

    bench.kernel_stats = stats_and_logits
    for r in range(2):
        for split in (False, True):
            P.SPLIT = split
            name[0] = f"glm split={int(split)} round={r}"
            generate._COMPILED.clear()
            torch._dynamo.reset()
            print(f"perf-run24 ab: {name[0]}", flush=True)
            bench.b1_rows(glm, name[0], 128, device, ceil, res["rows"], ["compiled_decode"])
            res["rows"][-1]["settings"] = dict(split=split)
            first = next(iter(logits.values()))
            res["logits_vs_first"] = {k: dict(max_abs=float((v - first).abs().max()),
                                              rel_norm=float((v - first).norm() / first.norm()),
                                              argmax_equal=bool(torch.equal(v.argmax(-1), first.argmax(-1))))
                                      for k, v in logits.items()}
            print(f"perf-run24 ab: logits vs the first row: {res['logits_vs_first']}", flush=True)
            json.dump(res, open(path, "w"), indent=1)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] in ("screen", "ab"):
        {"screen": screen, "ab": ab}[sys.argv[1]](sys.argv[2])
    else:
        sys.exit(__doc__)
