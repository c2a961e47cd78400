"""perf-run23 screen 2: exp.py found the prefetch kernel (on the step's one stream) slower than none: the next
kernel waits for it, and it seems to end only when its bytes have arrived. Here the prefetch goes on a second
stream (a branch of the CUDA graph, forked at each layer's start), joined before o_proj or only at the graph's
end; and a per-line form (`prefetch.global.L2`, one 128-byte line an address) beside the bulk one. Same sizes and
timing as exp.py (L = 16 layers of distinct weights, microseconds a layer, 5 x 20 replays, the median).

Not part of the package. usage: PYTHONPATH=. python docs/perf-run23/exp2.py OUT.json
"""
import json
import sys
import time

import torch
import triton
import triton.language as tl

import l2 as L2  # this folder's l2.py (the kernel as the calls ran it)
from longcat_ref.kernels import mla_decode as MD
from longcat_ref.kernels import prefetch_gemv as PG
from longcat_ref.kernels.support import prefetch_l2


@triton.jit
def _lines_kernel(P, NLINES, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    for i in range(pid * BLOCK, NLINES, tl.num_programs(0) * BLOCK):
        idx = i + tl.arange(0, BLOCK)
        prefetch_l2(P.to(tl.pointer_type(tl.int8)) + tl.minimum(idx, NLINES - 1).to(tl.int64) * 128)


def lines(t, programs):
    _lines_kernel[(programs,)](t, t.nbytes // 128, BLOCK=512, num_warps=4)


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
res = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
           device=torch.cuda.get_device_name(), rows=[])
side = torch.cuda.Stream()


def mla(l):
    return MD.mla_decode(q_lat, q_rope, latent, k_rope, bias, 0.1, w_uv=w_uv[l]).reshape(1, h * v)  # (1, 5120)


def chain(pf=None, how="bulk", join="gemv", P=132, n_mla=1):
    def run(l):
        main = torch.cuda.current_stream()
        if pf == "side":
            side.wait_stream(main)
            with torch.cuda.stream(side):
                (L2.l2_prefetch(w_o[l], programs=P) if how == "bulk" else lines(w_o[l], P))
        elif pf == "inline":
            (L2.l2_prefetch(w_o[l], programs=P) if how == "bulk" else lines(w_o[l], P))
        o = mla(l)
        for _ in range(n_mla - 1):
            o = o + 0 * mla(l)
        if pf == "side" and join == "gemv":
            main.wait_stream(side)
        return PG.prefetch_gemv(o, w_o[l])
    return run


def time_chain(name, run, **kw):
    for l in range(L):
        run(l)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        side.wait_stream(torch.cuda.current_stream())  # the side stream joins the capture (joined back below)
        outs = [run(l) for l in range(L)]
        torch.cuda.current_stream().wait_stream(side)
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
    print(f"perf-run23 screen2: {name:34s} {us:7.2f} us a layer (min {min(ts):.2f}, max {max(ts):.2f})", flush=True)
    del graph
    return outs[-1]


ref = time_chain("base", chain())
for rnd in range(2):
    time_chain(f"base r{rnd}", chain())
    for how in ("bulk", "lines"):
        for join in ("gemv", "end"):
            for P in (132, 264):
                y = time_chain(f"side {how} join={join} P={P} r{rnd}", chain("side", how, join, P))
                assert torch.equal(y, ref)
        time_chain(f"inline {how} P=132 r{rnd}", chain("inline", how, P=132))
    time_chain(f"2 mla r{rnd}", chain(n_mla=2))
    time_chain(f"side bulk join=gemv P=132, 2 mla r{rnd}", chain("side", "bulk", "gemv", 132, n_mla=2))
    time_chain(f"side bulk join=end P=132, 2 mla r{rnd}", chain("side", "bulk", "end", 132, n_mla=2))
json.dump(res, open(sys.argv[1], "w"), indent=1)
