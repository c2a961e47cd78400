"""perf-run23 screen: do weights asked of L2 during latency-bound kernels (l2.py, one bulk
prefetch instruction a chunk) make the projection after them faster? GLM-4.7-Flash's sizes, batch 1, on one GPU,
each chain captured in one CUDA graph over L = 16 layers of distinct weights (so no layer finds the one before it
in L2), 20 replays: microseconds a layer for

  base         MLA's attention (split + merge with W_uv, 256 slots) -> o_proj (2048 x 5120, prefetch_gemv)
  pf P         l2_prefetch(o_proj's weight, P programs) -> the same
  pf0          l2_prefetch of 128 bytes (the extra launch alone) -> the same
  pf P, 2 mla  the prefetch, then the attention twice (a longer latency-bound stretch), then o_proj
  2 mla        the attention twice, then o_proj (2 mla's baseline)
  gemv / gemv x2   o_proj alone / twice in a row (the second from L2): the L2-warm projection's cost
  mla only     the attention alone

Not part of the package. usage: PYTHONPATH=. python docs/perf-run23/exp.py OUT.json
"""
import json
import sys
import time

import torch

import l2 as L2  # this folder's l2.py (the kernel as the calls ran it)
from longcat_ref.kernels import mla_decode as MD
from longcat_ref.kernels import prefetch_gemv as PG

if len(sys.argv) < 2:
    sys.exit(__doc__)
dev, dt, L = "cuda", torch.bfloat16, 16
g = torch.Generator(dev).manual_seed(0)
h, r, d, v, S, H = 20, 512, 64, 256, 256, 2048
q_lat, q_rope = (torch.randn(1, h, 1, n, device=dev, generator=g).to(dt) for n in (r, d))
latent = torch.randn(1, S, r, device=dev, generator=g).to(dt)
k_rope = torch.randn(1, S, d, device=dev, generator=g).to(dt)
bias = torch.zeros(1, 1, 1, S, device=dev, dtype=dt)
w_uv = [(torch.randn(h, v, r, device=dev, generator=g) * 0.05).to(dt) for _ in range(L)]
w_o = [(torch.randn(H, h * v, device=dev, generator=g) * 0.02).to(dt) for _ in range(L)]
o_static = torch.randn(1, h * v, device=dev, generator=g).to(dt)
dummy = torch.zeros(64, device=dev, dtype=dt)
res = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
           device=torch.cuda.get_device_name(), l2_bytes=torch.cuda.get_device_properties(0).L2_cache_size,
           rows=[])


def mla(l):
    return MD.mla_decode(q_lat, q_rope, latent, k_rope, bias, 0.1, w_uv=w_uv[l]).reshape(1, h * v)  # (1, 5120)


def chain(pf=None, n_mla=1, gemvs=1, attn=True):
    def run(l):
        if pf is not None:
            L2.l2_prefetch(dummy if pf == 0 else w_o[l], programs=max(pf, 1))
        o = mla(l) if attn else o_static
        for _ in range(n_mla - 1):
            o = o + 0 * mla(l)
        for _ in range(gemvs):
            y = PG.prefetch_gemv(o.contiguous(), w_o[l])
        return y
    return run


def time_chain(name, run, **kw):
    for l in range(L):
        run(l)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [run(l) for l in range(L)]
    graph.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) / 20 / L * 1e6)
    us = sorted(ts)[len(ts) // 2]
    res["rows"].append(dict(name=name, us_per_layer=us, spread=[min(ts), max(ts)], **kw))
    print(f"perf-run23 screen: {name:24s} {us:7.2f} us a layer (min {min(ts):.2f}, max {max(ts):.2f})", flush=True)
    del graph
    return outs[-1]


ref = time_chain("base", chain())
for rnd in range(2):
    time_chain(f"base r{rnd}", chain())
    time_chain(f"pf0 r{rnd}", chain(pf=0))
    for P in (16, 66, 132, 264):
        y = time_chain(f"pf {P} r{rnd}", chain(pf=P), programs=P)
        assert torch.equal(y, ref)
    time_chain(f"2 mla r{rnd}", chain(n_mla=2))
    time_chain(f"pf 132, 2 mla r{rnd}", chain(pf=132, n_mla=2))
    time_chain(f"gemv r{rnd}", chain(attn=False))
    time_chain(f"gemv x2 r{rnd}", chain(attn=False, gemvs=2))
    time_chain(f"mla only r{rnd}", lambda l: mla(l))
json.dump(res, open(sys.argv[1], "w"), indent=1)
