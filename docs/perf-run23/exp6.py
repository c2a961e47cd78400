"""perf-run23, for the next device call: rows_gemm.py's kernel as the dense products of GLM-4.7-Flash's compiled
batch-32 decode step. Every plain nn.Linear product of 5-32 tokens without a bias, in the model's dtype, with K a
multiple of 8 (q_a, kv_a, q_b, o_proj, the shared expert's gate / up / down) runs in rows_gemm (a custom op, opaque
to torch.compile) instead of cuBLAS; everything else is the shipped step. Patched here, not in the package.

  cpu          tiny GLM (config.tiny_glm), batch 8, one eager decode step in Triton's interpreter: logits with
               the patch against without (run with TRITON_INTERPRET=1)
  ab OUT.json  GPU: bench's b1 rows at batch 32, ctx 128, one process, the same weights: shipped, rows, shipped
               again, rows again; each row's logits for a fixed context against the first row's

usage: TRITON_INTERPRET=1 PYTHONPATH=. python docs/perf-run23/exp6.py cpu
       PYTHONPATH=. python docs/perf-run23/exp6.py ab OUT.json
"""
import json
import sys
import time

import torch
from torch import nn

import rows_gemm as R  # this folder's rows_gemm.py
from longcat_ref.model import experts as E
from longcat_ref.model import generate
from longcat_ref.model import mla as A

ROWS = [False]
COUNT = [0]


@torch.library.custom_op("perf23::rows_gemm", mutates_args=())
def rows_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return R.rows_gemm(x, w)


@rows_op.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[0])


def patched(orig):
    def linear(m, x, form="plain"):
        tokens = x[..., 0].numel()
        if (ROWS[0] and type(m) is nn.Linear and m.bias is None and m.weight.dtype == x.dtype
                and 5 <= tokens <= 32 and x.shape[-1] % 8 == 0 and m.weight.stride(-1) == 1):
            COUNT[0] += 1
            y = torch.ops.perf23.rows_gemm(x.reshape(tokens, x.shape[-1]).contiguous(), m.weight)  # (M, N)
            return y.reshape(*x.shape[:-1], m.weight.shape[0])
        return orig(m, x, form)
    return linear


E._linear, A._linear = patched(E._linear), patched(A._linear)


def cpu():
    from longcat_ref.model.cache import StaticCache
    from longcat_ref.model.config import tiny_glm
    from longcat_ref.model.forms import DECODE
    from longcat_ref.model.model import CausalLM

    torch.manual_seed(0)
    model = CausalLM(tiny_glm()).eval()
    b, S = 8, 16
    ids = torch.randint(4, model.config.vocab_size, (b, 1))
    out = {}
    for rows in (False, True):
        ROWS[0], COUNT[0] = rows, 0
        cache = StaticCache.for_model(model.config, b, S, model.dtype, "cpu")
        mask = torch.zeros(b, S, dtype=torch.long)
        mask[:, :1] = 1
        with torch.no_grad():
            out[rows] = model(ids, attention_mask=mask, cache=cache, cache_position=torch.tensor([0]),
                              forms=DECODE, logits_to_keep=1)[:, -1]
        print(f"exp6 cpu: rows={rows}: {COUNT[0]} products in rows_gemm")
    diff = float((out[True] - out[False]).abs().max())
    print(f"exp6 cpu: logits max |diff| {diff:.2e}")
    assert COUNT[0] > 0 and diff < 1e-4, diff


def ab(path):
    from longcat_ref.tools import bench

    device, dtype = "cuda", torch.bfloat16
    ceil = bench.machine_ceilings(device)
    res = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__, machine=ceil,
               rows=[])
    with torch.device("meta"):
        glm = bench.CausalLM(bench.glm_4_7_flash()).to(dtype)
    glm = glm.to_empty(device=device).eval().requires_grad_(False)
    bench.synth_(glm)
    ids = torch.randint(4, glm.config.vocab_size, (32,), device=device,
                        generator=torch.Generator(device).manual_seed(1))
    logits, kernel_stats = {}, bench.kernel_stats

    def stats_and_logits(dec):
        out = kernel_stats(dec)
        bench.fill_context(dec, 128)
        logits[name] = dec.step(ids).float()
        return out

    bench.kernel_stats = stats_and_logits
    for name, rows in [("shipped", False), ("rows_gemm", True), ("shipped again", False), ("rows_gemm again", True)]:
        ROWS[0] = rows
        generate._COMPILED.clear()
        torch._dynamo.reset()
        print(f"perf-run23 exp6: {name}", flush=True)
        bench.b1_rows(glm, f"glm {name}", 128, device, ceil, res["rows"], ["compiled_decode"], batch=32)
        first = next(iter(logits.values()))
        res["logits_max_abs_diff_vs_first"] = {k: float((v - first).abs().max()) for k, v in logits.items()}
        print(f"perf-run23 exp6: logits max |diff| vs the first row: {res['logits_max_abs_diff_vs_first']}",
              flush=True)
        json.dump(res, open(path, "w"), indent=1)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "cpu":
        cpu()
    elif len(sys.argv) >= 3 and sys.argv[1] == "ab":
        ab(sys.argv[2])
    else:
        sys.exit(__doc__)
