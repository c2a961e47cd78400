"""perf-run21 experiments: the split attention kernel's cache prefetch (kernels/mla_decode.py PREFETCH_TILES: its
first tiles asked of L2 before the dependent-launch wait), 16-slot tiles, and the prefetch GEMV for the projections
(Forms(linear="prefetch"), kernels/prefetch_gemv.py), in GLM-4.7-Flash's compiled batch-1 decode step. Not part of
the package.

  ab OUT.json    the compiled batch-1 step at ctx 128 (bench's b1 rows: time, kernels, each kernel's cost on the
                 critical path of one replay) in one process, the same weights, dynamo reset between rows:
                 cache prefetch off / on, on + 16-slot tiles, on + linear="prefetch"; and the step's logits for one
                 fixed context and token in each, against the first row's
  moe OUT.json   GLM-4.7-Flash's compiled batch-1 step with the MoE kernels' weight prefetch
                 (moe_decode.PREFETCH_WEIGHTS) off / on, two rounds
  lc OUT.json [ROUNDS]   the LongCat-Flash layer's compiled batch-1 step (ctx 1k), the cache prefetch off / on,
                 alternated for ROUNDS rounds (default 2): its run-to-run spread hides small effects
  auto OUT.json  linear "auto" taking the prefetch kernel where linear.takes_prefetch says, off / on: the LongCat
                 layer (ctx 1k, two rounds) and GLM-4.7-Flash (ctx 128), compiled batch-1 step
  bench [--pf N] [--tile BYTES] [--uvmax N] [--linear NAME] -- ARGS...
                 `python -m longcat_ref.tools.bench ARGS...` with the split kernel's PREFETCH_TILES, TILE_BYTES,
                 mla.FUSED_UV_MAX_CHUNKS and the linear form of generate()'s decode forms set so

usage: PYTHONPATH=. python docs/perf-run21/exp.py ab OUT.json
       PYTHONPATH=. python docs/perf-run21/exp.py lc OUT.json 2
       PYTHONPATH=. python docs/perf-run21/exp.py bench --pf 2 --linear prefetch -- --only e2e --batches 1
"""
import dataclasses
import json
import sys
import time

import torch

from longcat_ref.kernels import mla_decode, moe_decode
from longcat_ref.model import generate, mla
from longcat_ref.tools import bench


def settings(pf=None, tile=None, linear=None, uvmax=None, moepf=None):
    """The knobs of this run, for the process: the split kernel's prefetch and tile size (read at launch, so at
    trace time of a compiled step: reset dynamo after), and the linear form of generate()'s decode step."""
    if pf is not None:
        mla_decode.PREFETCH_TILES = int(pf)
    if tile is not None:
        mla_decode.TILE_BYTES = int(tile)
    if moepf is not None:  # the MoE kernels' weight prefetch before their wait (opt-in, written after call 9)
        moe_decode.PREFETCH_WEIGHTS = moepf in (True, 1, "1")
    if uvmax is not None:  # W_uv in the merge kernel for up to this many chunks (16-slot tiles make more)
        mla.FUSED_UV_MAX_CHUNKS = int(uvmax)
    if linear is not None:  # Decoder's default forms (generate(fast=True) builds its Decoder with them)
        d = list(generate.Decoder.__init__.__defaults__)
        i = [j for j, v in enumerate(d) if isinstance(v, type(generate.DECODE))][0]
        d[i] = dataclasses.replace(d[i], linear=linear)
        generate.Decoder.__init__.__defaults__ = tuple(d)
    generate._COMPILED.clear()
    torch._dynamo.reset()
    return dict(prefetch_tiles=mla_decode.PREFETCH_TILES, tile_bytes=mla_decode.TILE_BYTES,
                fused_uv_max_chunks=mla.FUSED_UV_MAX_CHUNKS, moe_prefetch=moe_decode.PREFETCH_WEIGHTS,
                decode_linear=[v for v in generate.Decoder.__init__.__defaults__
                               if isinstance(v, type(generate.DECODE))][0].linear)


def glm_model(device, dtype):
    with torch.device("meta"):
        glm = bench.CausalLM(bench.glm_4_7_flash()).to(dtype)
    glm = glm.to_empty(device=device).eval().requires_grad_(False)
    bench.synth_(glm)
    return glm


def flags(argv):
    out, i = {}, 0
    while i < len(argv) and argv[i] != "--":
        out[argv[i].lstrip("-")] = argv[i + 1]
        i += 2
    return out, argv[i + 1:]


cmd = sys.argv[1]
device, dtype = "cuda", torch.bfloat16
if cmd == "bench":
    kw, rest = flags(sys.argv[2:])
    print(f"perf-run21: {settings(**kw)}", flush=True)
    sys.exit(bench.main(rest))
if cmd == "auto":  # "auto" linear taking the prefetch kernel (linear.takes_prefetch) off / on: LongCat, GLM
    from longcat_ref.model import linear as LIN

    real = LIN.takes_prefetch

    def auto_prefetch(on: bool):  # off: "auto" as before perf-run21 ("prefetch" itself unchanged)
        f = real if on else (lambda form, x, w: form == "prefetch" and real(form, x, w))
        LIN.takes_prefetch = mla.takes_prefetch = f
        settings()

    ceil, rows = bench.machine_ceilings(device), []
    _, _, layer = bench.longcat_layer(device, dtype, 4096, False)
    for r in range(2):
        for on in (0, 1):
            auto_prefetch(on)
            bench.b1_rows(layer.requires_grad_(False), f"longcat_layer auto_prefetch={on} round={r}", 1024, device,
                          ceil, rows, ["compiled_decode"])
            json.dump(rows, open(sys.argv[2], "w"), indent=1)
    del layer
    torch.cuda.empty_cache()
    glm = glm_model(device, dtype)
    for on in (0, 1):
        auto_prefetch(on)
        bench.b1_rows(glm, f"glm auto_prefetch={on}", 128, device, ceil, rows, ["compiled_decode"])
        json.dump(rows, open(sys.argv[2], "w"), indent=1)
    sys.exit(0)
if cmd == "moe":  # the MoE kernels' weight prefetch off / on, GLM (ctx 128) then the LongCat layer, two rounds
    ceil, rows = bench.machine_ceilings(device), []
    glm = glm_model(device, dtype)
    for r in range(2):
        for on in (0, 1):
            settings(moepf=on)
            bench.b1_rows(glm, f"glm moe_prefetch={on} round={r}", 128, device, ceil, rows, ["compiled_decode"])
            json.dump(rows, open(sys.argv[2], "w"), indent=1)
    sys.exit(0)
if cmd == "lc":  # the LongCat-Flash layer (ctx 1k): the cache prefetch off / on, alternated over rounds
    ceil, rows = bench.machine_ceilings(device), []
    _, _, layer = bench.longcat_layer(device, dtype, 4096, False)
    for r in range(int(sys.argv[3]) if len(sys.argv) > 3 else 2):
        for pf in (0, 2):
            settings(pf=pf)
            bench.b1_rows(layer.requires_grad_(False), f"longcat_layer pf={pf} round={r}", 1024, device, ceil, rows,
                          ["compiled_decode"])
            json.dump(rows, open(sys.argv[2], "w"), indent=1)
    sys.exit(0)
if cmd != "ab":
    sys.exit(__doc__)
ceil = bench.machine_ceilings(device)
res = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__, machine=ceil, rows=[])
glm = glm_model(device, dtype)
ids = torch.randint(4, glm.config.vocab_size, (1,), device=device, generator=torch.Generator(device).manual_seed(1))
logits, kernel_stats = {}, bench.kernel_stats


def stats_and_logits(dec):  # b1_rows' profile of the step, then that step's logits for a fixed context and token
    out = kernel_stats(dec)
    bench.fill_context(dec, 128)
    logits[name] = dec.step(ids).float()
    return out


bench.kernel_stats = stats_and_logits
rows = [("no cache prefetch", dict(pf=0, tile=32768, uvmax=8), "compiled_decode"),
        ("cache prefetch", dict(pf=2, tile=32768, uvmax=8), "compiled_decode"),
        ("cache prefetch, 16-slot tiles", dict(pf=2, tile=16384, uvmax=16), "compiled_decode"),  # 14 chunks
        ("cache prefetch, linear=prefetch", dict(pf=2, tile=32768, uvmax=8), "compiled_decode_prefetch")]
if len(sys.argv) > 3:  # a subset, by index: ab OUT.json 0,1
    rows = [rows[int(i)] for i in sys.argv[3].split(",")]
for name, kw, variant in rows:
    s = settings(**kw)
    s["decode_linear"] = bench.VARIANTS[variant]["linear"]  # the b1 row's own forms (not generate()'s default)
    print(f"perf-run21 ab: {name}: {s}", flush=True)
    bench.b1_rows(glm, f"glm {name}", 128, device, ceil, res["rows"], [variant])
    res["rows"][-1]["settings"] = s
    json.dump(res, open(sys.argv[2], "w"), indent=1)
first = next(iter(logits.values()))
res["logits_max_abs_diff_vs_first"] = {k: float((v - first).abs().max()) for k, v in logits.items()}
print(f"perf-run21 ab: logits max |diff| vs the first row: {res['logits_max_abs_diff_vs_first']}", flush=True)
json.dump(res, open(sys.argv[2], "w"), indent=1)
