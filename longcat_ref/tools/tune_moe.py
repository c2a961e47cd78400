"""Measure the fused MoE decode kernels' tile sizes on this GPU: the table behind `moe_decode.choose_tiles`.

    python -m longcat_ref.tools.tune_moe                       # GLM-4.7-Flash and LongCat-Flash shapes, bf16 + fp8
    python -m longcat_ref.tools.tune_moe --cases glm_bf16 --json tiles.json
    python -m longcat_ref.tools.tune_moe --cases glm_bf16_shared    # with GLM's shared expert as a 5th slot

For each case (a model's expert shapes, one decode token, its k slots) it times the pair of kernels
(`moe_decode._launch`) for a sweep of one kernel's tiles and warps while the other kernel keeps the heuristic's
choice, so each sweep shows one kernel's effect. Each timing replays a CUDA graph of R launches whose router
choices differ (R sets of k distinct experts drawn at random), so the experts' weights come from memory, not from
L2, as in a real decode step. It prints microseconds per launch, the bandwidth that is (bytes of the chosen experts'
weights / time), and the heuristic's own time first. A script that prints what it measured: nothing is asserted.
CUDA only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch

CASES = {  # name: (E experts in the bank, hidden H, expert width I, k slots, fp8)
    "glm_bf16": (64, 2048, 1536, 4, False),
    "glm_bf16_shared": (64, 2048, 1536, 4, False),  # + GLM's shared expert as one more slot (what DECODE runs)
    "longcat_bf16": (512, 6144, 2048, 12, False),
    "longcat_fp8": (512, 6144, 2048, 12, True),
}
KERNEL_1 = [dict(block_i=bi, block_h=bh, warps=w)
            for bi, bh, w in itertools.product((4, 8, 16, 32), (256, 512, 1024), (4, 8))]
KERNEL_2 = [dict(block_o=bo, block_k=bk, warps=w)
            for bo, bk, w in itertools.product((4, 8, 16, 32, 64), (128, 256, 512, 1024), (4, 8)) if bo * bk <= 32768]
# --narrow: rows of 1-8 and 1-4 warps (GEMV kernels elsewhere run one row per warp; the first sweep stopped at 4 rows)
NARROW_1 = [dict(block_i=bi, block_h=bh, warps=w)
            for bi, bh, w in itertools.product((1, 2, 4, 8), (512, 1024, 2048), (1, 2, 4))]
NARROW_2 = [dict(block_o=bo, block_k=bk, warps=w)
            for bo, bk, w in itertools.product((1, 2, 4, 8), (256, 512, 1024), (1, 2, 4))]

def make_case(name, device, repeats, seed=0):
    """The bank (random values: only the bytes matter), x, and `repeats` router choices of k distinct experts."""

    E, H, I, k, fp8 = CASES[name]
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = torch.bfloat16
    gate_up = torch.empty(E, 2 * I, H, device=device, dtype=dtype).uniform_(-0.05, 0.05, generator=g)
    down = torch.empty(E, H, I, device=device, dtype=dtype).uniform_(-0.05, 0.05, generator=g)
    kw = {}
    if fp8:  # the DeepSeek-V3 block layout (128 x 128), scales all one: the kernels read the same bytes either way
        gate_up, down = gate_up.to(torch.float8_e4m3fn), down.to(torch.float8_e4m3fn)
        nb = -(-I // 128)
        kw = dict(gate_up_scale=torch.ones(E, 2 * nb, -(-H // 128), device=device),
                  down_scale=torch.ones(E, -(-H // 128), nb, device=device), bo=128, bi=128)
    x = torch.randn(1, H, device=device, generator=g).to(dtype)
    w = torch.rand(1, k, device=device, generator=g)
    idxs = [torch.randperm(E, device=device, generator=g)[:k].view(1, k) for _ in range(repeats)]
    slots = k + name.endswith("_shared")
    if name.endswith("_shared"):  # a shared expert's gate, up, down per call (each layer has its own: not from L2)
        kw["shared"] = [tuple(torch.empty(*shape, device=device, dtype=dtype).uniform_(-0.05, 0.05, generator=g)
                              for shape in ((I, H), (I, H), (H, I))) for _ in range(repeats)]
    weight_bytes = slots * (gate_up[0].numel() * gate_up.element_size() + down[0].numel() * down.element_size())
    return x, w, idxs, gate_up, down, kw, weight_bytes

def time_launch(case, tiles, warps, repeats, trials=5):
    """Microseconds per `_launch` (both kernels and the partials' allocation), from a CUDA graph of `repeats`."""
    from longcat_ref.kernels import moe_decode

    x, w, idxs, gate_up, down, kw, _ = case
    gus, ds = kw.get("gate_up_scale"), kw.get("down_scale")
    bo, bi = kw.get("bo", 0), kw.get("bi", 0)

    shareds = kw.get("shared", [None] * len(idxs))

    def run():
        for idx, shared in zip(idxs, shareds):
            moe_decode._launch(x, w, idx, gate_up, down, 0, gus, ds, bo, bi, tiles=tiles, warps=warps, shared=shared)

    return graph_us(run, repeats, trials)


def graph_us(run, repeats, trials=5) -> float:
    """Microseconds per call of `run()` (which makes `repeats` calls): run once eagerly (compiling the Triton
    kernels outside the capture), capture it as a CUDA graph, replay; the best of `trials` replays."""
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / repeats)
    return best

def sweep(name, device, repeats, deadline, narrow=False):
    from longcat_ref.kernels import moe_decode

    case = make_case(name, device, repeats)
    E, H, I, k, fp8 = CASES[name]
    nbytes = case[-1]
    base, (nw1, nw2) = moe_decode.choose_launch(1, k + name.endswith("_shared"), H, I, (128, 128) if fp8 else None,
                                                (fp8, fp8))  # the package's choice: the other kernel keeps it
    rows = []

    def record(kernel, tiles, warps):
        if fp8 and (128 % tiles[0] or 128 % tiles[2]):
            return  # a row tile must divide the 128-row scale block
        us = time_launch(case, tiles, warps, repeats)
        row = dict(case=name, kernel=kernel, tiles=list(tiles), warps=list(warps), us=us,
                   tb_s=nbytes / (us * 1e-6) / 1e12)
        rows.append(row)
        print(f"  {name:13s} {kernel:9s} tiles(I,H,O,K)={tuple(tiles)} warps={tuple(warps)}: {us:7.2f} us "
              f"({row['tb_s']:.2f} TB/s)", flush=True)

    record("heuristic", base, (nw1, nw2))
    for c in (NARROW_1 if narrow else KERNEL_1):
        if time.monotonic() > deadline:
            print(f"  {name}: time limit reached, sweep cut", flush=True)
            return rows
        record("gate_up", (c["block_i"], c["block_h"], base[2], base[3]), (c["warps"], nw2))
    for c in (NARROW_2 if narrow else KERNEL_2):
        if time.monotonic() > deadline:
            print(f"  {name}: time limit reached, sweep cut", flush=True)
            return rows
        record("down", (base[0], base[1], c["block_o"], c["block_k"]), (nw1, c["warps"]))
    return rows

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--repeats", type=int, default=16, help="launches per CUDA graph (distinct router choices)")
    ap.add_argument("--time-limit", type=float, default=480.0, help="seconds; the sweep stops after this")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--narrow", action="store_true", help="sweep row tiles of 1-8 rows and 1-4 warps instead")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tune_moe: needs a CUDA GPU (the kernels' timings mean nothing elsewhere)")
    names = [c for c in args.cases.split(",") if c]
    for c in names:
        if c not in CASES:
            sys.exit(f"tune_moe: unknown case {c!r}; choose from {', '.join(CASES)}")
    deadline = time.monotonic() + args.time_limit
    rows = []
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}; microseconds per pair of kernels, "
          f"one token", flush=True)
    for name in names:
        rows += sweep(name, "cuda", args.repeats, deadline, args.narrow)
    print("best per case and kernel:")
    for name in names:
        for kernel in ("heuristic", "gate_up", "down"):
            got = [r for r in rows if r["case"] == name and r["kernel"] == kernel]
            if got:
                b = min(got, key=lambda r: r["us"])
                print(f"  {name:13s} {kernel:9s} {b['us']:7.2f} us ({b['tb_s']:.2f} TB/s) tiles={tuple(b['tiles'])} "
                      f"warps={tuple(b['warps'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)

if __name__ == "__main__":
    main()
