"""perf-run20 experiments: programmatic dependent launch in inductor's own kernels (its option
`triton.enable_pdl`, added to `generate.DECODE_INDUCTOR_OPTIONS` for this process), and where GLM-4.7-Flash's
compiled batch-1 decode step spends its time, kernel by kernel in launch order. Not part of the package.

  ab OUT.json    the compiled batch-1 decode step (bench's `compiled_decode` variant) of the LongCat layer (ctx 1k)
                 and of GLM-4.7-Flash (ctx 128), with inductor's PDL off and on, and GLM with W_uk's product in its
                 own bmm (mla.FOLD_IN_ROPE_MAX_ROWS = 0), in one process: the same weights, dynamo reset between rows
  bench --pdl N -- ARGS...   `python -m longcat_ref.tools.bench ARGS...` with inductor's PDL off (0) or on (1)
  trace OUTDIR [--pdl N]   the compiled batch-1 step (bench's `compiled_decode` variant, ctx 128) profiled
                 over one CUDA-graph replay: OUTDIR/trace.txt lists every kernel of the step in order with its
                 device time and the gap before it; OUTDIR/output_code.py is inductor's generated module of the
                 step (the largest one written by this process), so that kernel names can be read as code.

usage: PYTHONPATH=. python docs/perf-run20/exp.py ab OUT.json
       PYTHONPATH=. python docs/perf-run20/exp.py bench --pdl 1 -- --only e2e --batches 1 --json OUT.json
       PYTHONPATH=. python docs/perf-run20/exp.py trace OUTDIR --pdl 1
"""
import json
import os
import shutil
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from longcat_ref.model import generate, mla
from longcat_ref.tools import bench


def set_pdl(on: bool):
    """Inductor's PDL for the compiled decode step of this process (a fresh torch.compile of it)."""
    generate.DECODE_INDUCTOR_OPTIONS["triton.enable_pdl"] = bool(on)
    generate._COMPILED.clear()
    torch._dynamo.reset()


def glm_model(device, dtype):
    with torch.device("meta"):
        glm = bench.CausalLM(bench.glm_4_7_flash()).to(dtype)
    glm = glm.to_empty(device=device).eval().requires_grad_(False)
    bench.synth_(glm)
    return glm


cmd = sys.argv[1]
device, dtype = "cuda", torch.bfloat16
if cmd == "bench":
    set_pdl(sys.argv[3] == "1")
    print(f"perf-run20: inductor PDL {generate.DECODE_INDUCTOR_OPTIONS}", flush=True)
    rest = sys.argv[4:]
    sys.exit(bench.main(rest[1:] if rest[:1] == ["--"] else rest))
if cmd == "ab":
    ceil = bench.machine_ceilings(device)
    res = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__, machine=ceil,
               rows=[])
    _, _, layer = bench.longcat_layer(device, dtype, 4096, False)
    for pdl in (0, 1):
        set_pdl(pdl)
        bench.b1_rows(layer.requires_grad_(False), f"longcat_layer pdl={pdl}", 1024, device, ceil, res["rows"],
                      ["compiled_decode"])
    del layer
    torch.cuda.empty_cache()
    glm = glm_model(device, dtype)
    ids = torch.randint(4, glm.config.vocab_size, (1,), device=device, generator=torch.Generator(device).manual_seed(1))
    logits, kernel_stats = {}, bench.kernel_stats

    def stats_and_logits(dec):  # b1_rows' profile of the step, then that step's logits for a fixed context and token
        out = kernel_stats(dec)
        bench.fill_context(dec, 128)
        logits[name] = dec.step(ids).float()
        return out

    bench.kernel_stats = stats_and_logits
    for pdl, fold in ((0, 4), (1, 4), (0, 0)):
        set_pdl(pdl)
        mla.FOLD_IN_ROPE_MAX_ROWS = fold
        name = f"glm pdl={pdl} fold={fold}"
        bench.b1_rows(glm, name, 128, device, ceil, res["rows"], ["compiled_decode"])
        json.dump(res, open(sys.argv[2], "w"), indent=1)
    base = logits["glm pdl=0 fold=4"]
    res["logits_max_abs_diff_vs_pdl0_fold4"] = {k: float((v - base).abs().max()) for k, v in logits.items()}
    print(f"perf-run20 ab: logits max |diff| vs pdl=0 fold=4: {res['logits_max_abs_diff_vs_pdl0_fold4']}", flush=True)
    json.dump(res, open(sys.argv[2], "w"), indent=1)
    sys.exit(0)
out = sys.argv[2]
os.makedirs(out, exist_ok=True)
set_pdl(len(sys.argv) > 4 and sys.argv[3] == "--pdl" and sys.argv[4] == "1")
t_start = time.time()
glm = glm_model(device, dtype)
t, dec = bench.ours_decode(glm, 1, 128, device, **bench.VARIANTS["compiled_decode"])
print(f"perf-run20 trace: compiled step {t * 1e3:.3f} ms (graph replay), {generate.DECODE_INDUCTOR_OPTIONS}",
      flush=True)
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
    f.write(f"# {generate.DECODE_INDUCTOR_OPTIONS}\n# GLM-4.7-Flash compiled batch-1 step, ctx 128, {how}: "
            f"{len(ev)} kernels, span {span:.1f} us, busy {busy:.1f} us\n"
            "# index, start (us), duration (us), gap before (us), name\n")
    f.write("\n".join(lines) + "\n")
print(f"perf-run20 trace: {len(ev)} kernels, span {span:.1f} us, busy {busy:.1f} us", flush=True)
try:  # where inductor writes its generated code (moved between torch versions)
    from torch._inductor.runtime.cache_dir_utils import cache_dir
except ImportError:
    from torch._inductor.utils import cache_dir

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
