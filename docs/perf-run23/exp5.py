"""perf-run23 call 3: screen 3's touch kernel in GLM-4.7-Flash's compiled batch-1 decode step. At the start of each
MoE layer's decode step a second stream (a branch of the step's CUDA graph, joined at the step's end) reads the
weights the layer will stream later -- o_proj's (21 MB), and in the last rows also the shared expert's (19 MB) --
with plain loads (a touch kernel, 264 programs of 8 warps), while the main stream runs the norm, q_a / kv_a, q_b
and the attention kernels, which leave the memory mostly idle. Nothing reads what the touch writes (one int32 a
program into a sink), so no value changes: each row's logits are checked against the first row's.

Rows (bench's b1 rows at ctx 128, one process, the same weights): baseline, touch o_proj + shared, touch o_proj,
baseline again, touch o_proj + shared again. The step time is the replayed graph's; the "critical path" table of a
row with the touch mixes two streams. Not part of the package.

usage: PYTHONPATH=. python docs/perf-run23/exp5.py OUT.json
"""
import json
import sys
import time

import torch
import triton
import triton.language as tl

from longcat_ref.model import generate
from longcat_ref.model import model as M
from longcat_ref.model.moe import MoE
from longcat_ref.tools import bench


@triton.jit
def _touch_kernel(P, OUT, N, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(pid * BLOCK, N, tl.num_programs(0) * BLOCK):
        idx = i + tl.arange(0, BLOCK)
        acc += tl.load(P + idx, mask=idx < N, other=0)
    tl.store(OUT + pid, tl.sum(acc, 0))


SIDE = {}  # device index -> the second stream
PROGRAMS = 264


@torch.library.custom_op("perf23::touch_l2", mutates_args=("sink",))
def touch_l2(ws: list[torch.Tensor], sink: torch.Tensor) -> None:
    main = torch.cuda.current_stream()
    side = SIDE.setdefault(sink.device.index, torch.cuda.Stream(sink.device))
    side.wait_stream(main)  # after what the main stream has queued so far (the previous layer)
    with torch.cuda.stream(side):
        for w in ws:
            v = w.view(torch.int32).reshape(-1)
            _touch_kernel[(PROGRAMS,)](v, sink, v.numel(), BLOCK=2048, num_warps=8)


@touch_l2.register_fake
def _(ws, sink):
    return None


WHICH = []  # "o_proj", "shared": what the touch reads (empty: the baseline)
SINK = {}
_forward = M.DecoderLayer.forward


def forward(self, x, cos, sin, mask=None, cache=None, cache_position=None, forms=M.REFERENCE):
    if WHICH and x.is_cuda and x.shape[1] == 1 and isinstance(self.mlp, MoE):  # decode steps only
        ws = [self.self_attn.o_proj.weight] if "o_proj" in WHICH else []
        if "shared" in WHICH:
            s = self.mlp.shared_experts
            ws += [s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight]
        sink = SINK.setdefault(x.device.index, torch.zeros(PROGRAMS, dtype=torch.int32, device=x.device))
        torch.ops.perf23.touch_l2(ws, sink)
    return _forward(self, x, cos, sin, mask, cache, cache_position, forms)


M.DecoderLayer.forward = forward
_run_step = generate.Decoder.run_step


def run_step(self):
    out = _run_step(self)
    for side in SIDE.values():  # the second stream joins the step (a capture must end joined)
        torch.cuda.current_stream().wait_stream(side)
    return out


generate.Decoder.run_step = run_step

if len(sys.argv) < 2:
    sys.exit(__doc__)
device, dtype = "cuda", torch.bfloat16
ceil = bench.machine_ceilings(device)
res = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__, machine=ceil, rows=[])
with torch.device("meta"):
    glm = bench.CausalLM(bench.glm_4_7_flash()).to(dtype)
glm = glm.to_empty(device=device).eval().requires_grad_(False)
bench.synth_(glm)
ids = torch.randint(4, glm.config.vocab_size, (1,), device=device, generator=torch.Generator(device).manual_seed(1))
logits, kernel_stats = {}, bench.kernel_stats


def stats_and_logits(dec):  # b1_rows' profile of the step, then that step's logits for a fixed context and token
    out = kernel_stats(dec)
    bench.fill_context(dec, 128)
    logits[name] = dec.step(ids).float()
    return out


bench.kernel_stats = stats_and_logits
rows = [("baseline", []), ("touch o_proj + shared", ["o_proj", "shared"]), ("touch o_proj", ["o_proj"]),
        ("baseline again", []), ("touch o_proj + shared again", ["o_proj", "shared"])]
for name, which in rows:
    WHICH[:] = which
    generate._COMPILED.clear()
    torch._dynamo.reset()
    print(f"perf-run23 touch: {name}", flush=True)
    bench.b1_rows(glm, f"glm {name}", 128, device, ceil, res["rows"], ["compiled_decode"])
    res["rows"][-1]["touch"] = list(which)
    first = next(iter(logits.values()))
    res["logits_max_abs_diff_vs_first"] = {k: float((v - first).abs().max()) for k, v in logits.items()}
    print(f"perf-run23 touch: logits max |diff| vs the first row: {res['logits_max_abs_diff_vs_first']}", flush=True)
    json.dump(res, open(sys.argv[1], "w"), indent=1)
