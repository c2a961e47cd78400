"""perf-run23 screen 3: exp2.py found the bulk prefetch (and the per-line one) on a second stream no faster than none:
the projection after it did not find its weight in L2. Here the side stream *reads* the weight (a touch kernel:
plain 16-byte loads summed into one value a program, as a real consumer would; the projection after it on the
main stream then reads L2, like exp.py's "gemv x2"), and the bulk prefetch again with an evict_last L2 policy.
Same sizes and timing as exp.py / exp2.py.

Not part of the package. usage: PYTHONPATH=. python docs/perf-run23/exp3.py OUT.json
"""
import json
import sys
import time

import torch
import triton
import triton.language as tl

from longcat_ref.kernels import mla_decode as MD
from longcat_ref.kernels import prefetch_gemv as PG


@triton.jit
def _touch_kernel(P, OUT, N, BLOCK: tl.constexpr, EVICT_LAST: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(pid * BLOCK, N, tl.num_programs(0) * BLOCK):
        idx = i + tl.arange(0, BLOCK)
        if EVICT_LAST:
            acc += tl.load(P + idx, mask=idx < N, other=0, eviction_policy="evict_last")
        else:
            acc += tl.load(P + idx, mask=idx < N, other=0)
    tl.store(OUT + pid, tl.sum(acc, 0))


@triton.jit
def _bulk_policy_kernel(P, NBYTES, CHUNK, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    first = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64) * CHUNK
    size = tl.minimum(tl.maximum(NBYTES - first, 0), CHUNK).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b64 pol; setp.ne.s32 p, $2, 0; createpolicy.fractional.L2::evict_last.b64 pol, 1.0;"
        " @p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol; mov.u32 $0, 0; }",
        "=r,l,r", [P.to(tl.pointer_type(tl.int8)) + first, size], dtype=tl.int32, is_pure=False, pack=1)


sink = None


def touch(t, programs, evict_last=False, block=2048):
    w = t.view(torch.int32).reshape(-1)
    _touch_kernel[(programs,)](w, sink, w.numel(), BLOCK=block, EVICT_LAST=evict_last, num_warps=8)


def bulk_policy(t, programs):
    chunk = max(128, -(-(-(-t.nbytes // (programs * 128))) // 128) * 128)
    _bulk_policy_kernel[(programs,)](t, t.nbytes, chunk, BLOCK=128, num_warps=4)


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
sink = torch.zeros(4096, device=dev, dtype=torch.int32)
res = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
           device=torch.cuda.get_device_name(), rows=[])
side = torch.cuda.Stream()


def mla(l):
    return MD.mla_decode(q_lat, q_rope, latent, k_rope, bias, 0.1, w_uv=w_uv[l]).reshape(1, h * v)  # (1, 5120)


def chain(pf=None, P=132, n_mla=1, where="side"):
    def run(l):
        main = torch.cuda.current_stream()
        if pf is not None:
            if where == "side":
                side.wait_stream(main)
            with torch.cuda.stream(side if where == "side" else main):
                {"touch": lambda: touch(w_o[l], P), "touch_el": lambda: touch(w_o[l], P, True),
                 "bulk_el": lambda: bulk_policy(w_o[l], P)}[pf]()
        o = mla(l)
        for _ in range(n_mla - 1):
            o = o + 0 * mla(l)
        return PG.prefetch_gemv(o, w_o[l])
    return run


def time_chain(name, run):
    for l in range(L):
        run(l)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        side.wait_stream(torch.cuda.current_stream())
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
    res["rows"].append(dict(name=name, us_per_layer=us, spread=[min(ts), max(ts)]))
    print(f"perf-run23 screen3: {name:34s} {us:7.2f} us a layer (min {min(ts):.2f}, max {max(ts):.2f})", flush=True)
    del graph
    return outs[-1]


ref = time_chain("base", chain())
for rnd in range(2):
    time_chain(f"base r{rnd}", chain())
    for pf in ("touch", "touch_el", "bulk_el"):
        for P in (66, 132, 264):
            y = time_chain(f"side {pf} P={P} r{rnd}", chain(pf, P))
            assert torch.equal(y, ref)
    time_chain(f"2 mla r{rnd}", chain(n_mla=2))
    for pf in ("touch", "bulk_el"):
        time_chain(f"side {pf} P=132, 2 mla r{rnd}", chain(pf, 132, n_mla=2))
json.dump(res, open(sys.argv[1], "w"), indent=1)
