"""perf-run20 diagnostics: where GLM-4.7-Flash's compiled batch-1 decode step spends its time, kernel by kernel in
launch order, and the inductor code behind the kernel names. Not part of the package.

  trace OUTDIR   the compiled batch-1 step (bench's `compiled_decode` variant, ctx 128) profiled over one CUDA-graph
                 replay: OUTDIR/trace.txt lists every kernel of the step in order with its device time and the gap
                 before it; OUTDIR/output_code.py is inductor's generated module of the step (the largest one written
                 by this process), so that names such as triton_red_fused_17 can be read as code.

usage: PYTHONPATH=. python docs/perf-run20/exp.py trace OUTDIR
"""
import os
import shutil
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from longcat_ref.tools import bench

out = sys.argv[2]
os.makedirs(out, exist_ok=True)
t_start = time.time()
device, dtype = "cuda", torch.bfloat16
with torch.device("meta"):
    glm = bench.CausalLM(bench.glm_4_7_flash()).to(dtype)
glm = glm.to_empty(device=device).eval().requires_grad_(False)
bench.synth_(glm)
torch._dynamo.reset()
t, dec = bench.ours_decode(glm, 1, 128, device, **bench.VARIANTS["compiled_decode"])
print(f"perf-run20 trace: compiled step {t * 1e3:.3f} ms (graph replay)", flush=True)
for _ in range(3):
    dec.graph.replay()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    dec.graph.replay()
    torch.cuda.synchronize()
ev = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
            key=lambda e: e.time_range.start)
how = "one graph replay"
if len(ev) < 100:  # the profiler saw the graph as one event: profile the compiled step run eagerly instead
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.run_step()
        torch.cuda.synchronize()
    ev = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                key=lambda e: e.time_range.start)
    how = "the compiled step run without its graph"
lines, prev_end = [], None
for i, e in enumerate(ev):
    start, end = e.time_range.start, e.time_range.end  # microseconds
    gap = 0.0 if prev_end is None else start - prev_end
    lines.append(f"{i:4d} {start - ev[0].time_range.start:9.2f} {end - start:7.2f} {gap:6.2f}  {e.name[:150]}")
    prev_end = end
span = ev[-1].time_range.end - ev[0].time_range.start
busy = sum(e.time_range.end - e.time_range.start for e in ev)
with open(os.path.join(out, "trace.txt"), "w") as f:
    f.write(f"# GLM-4.7-Flash compiled batch-1 step, ctx 128, {how}: {len(ev)} kernels, span {span:.1f} us,"
            f" busy {busy:.1f} us\n# index, start (us), duration (us), gap before (us), name\n")
    f.write("\n".join(lines) + "\n")
print(f"perf-run20 trace: {len(ev)} kernels, span {span:.1f} us, busy {busy:.1f} us", flush=True)
from torch._inductor.utils import cache_dir  # noqa: E402

best = None
for root, _, files in os.walk(cache_dir()):
    for name in files:
        p = os.path.join(root, name)
        if name.endswith(".py") and os.path.getmtime(p) >= t_start:
            with open(p, errors="replace") as f:
                if "def call(" in f.read():
                    if best is None or os.path.getsize(p) > os.path.getsize(best):
                        best = p
if best:
    shutil.copy(best, os.path.join(out, "output_code.py"))
    print(f"perf-run20 trace: output code {best} ({os.path.getsize(best)} bytes)", flush=True)
