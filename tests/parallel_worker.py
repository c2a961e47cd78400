"""One rank of the parallel tests (started by torchrun from test_parallel.py; not collected by pytest).

    torchrun ... tests/parallel_worker.py DIR [--die-rank R]

DIR holds the tiny checkpoints and the single-process reference outputs written by test_parallel.py. Each rank loads
its shard with `from_pretrained(..., parallel=ctx)`, runs the same inputs, and writes DIR/out/rank{R}.json with what it
measured; the test asserts. With --die-rank R, rank R then exits abruptly while the others sit in an all_reduce:
they must raise (and write DIR/out/death{rank}.json) instead of hanging.
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist

import longcat_ref as L
from longcat_ref.runtime.parallel import ParallelContext, load_parallel


def fast_logits(model, ids, mask):
    """The fixed-shape path generate(fast=True) runs: prefill, then 3 decode steps of given tokens -> (4, b, V)."""
    from longcat_ref.model.generate import Decoder

    dec = Decoder(model, ids.shape[0], 32, graphs=False)
    out = [dec.prefill(ids, mask)]
    for i in range(3):
        out.append(dec.step(torch.full((ids.shape[0],), 5 + i)))
    return torch.stack(out)


def main():
    d = sys.argv[1]
    die = int(sys.argv[sys.argv.index("--die-rank") + 1]) if "--die-rank" in sys.argv else None
    ctx = ParallelContext.from_env(cpu=True)  # the references are CPU fp32, whatever GPUs this machine has
    ref = torch.load(os.path.join(d, "ref.pt"))
    res = {"rank": ctx.rank, "world": ctx.world_size, "node": int(os.environ["GROUP_RANK"])}
    for kind in ("longcat", "glm"):
        r = ref[kind]
        if kind == "longcat":
            model = L.from_pretrained(os.path.join(d, kind), dtype=torch.float32, parallel=ctx)
        else:  # the demo's hook: joins the existing group, loads onto ctx.device
            model, ctx = load_parallel(os.path.join(d, kind), dtype=torch.float32)
        assert model.world_size == ctx.world_size  # shard() marks it (generate's defaults read it)
        ids, mask = r["ids"], r["mask"]
        with torch.no_grad():
            naive = model(ids, attention_mask=mask)
            absorbed = model(ids, attention_mask=mask, forms=L.Forms(attention="absorbed"))
        greedy = model.generate(ids, 8, attention_mask=mask)
        fast_greedy = model.generate(ids, 8, attention_mask=mask, fast=True)
        fast = fast_logits(model, ids, mask)
        sampled = model.generate(ids, 8, attention_mask=mask, temperature=1.0, top_p=0.9, seed=0)
        free = model.generate(ids, 8, attention_mask=mask, temperature=1.0, seed=ctx.common_seed())
        every, every_free = ([torch.empty_like(sampled) for _ in range(ctx.world_size)] for _ in range(2))
        dist.all_gather(every, sampled)
        dist.all_gather(every_free, free)
        res[kind] = {
            "max_diff_naive": (naive - r["logits"]).abs().max().item(),
            "max_diff_absorbed": (absorbed - r["logits"]).abs().max().item(),
            "greedy_equal": torch.equal(greedy, r["greedy"]),
            "fast_greedy_equal": torch.equal(fast_greedy, r["greedy"]),
            "max_diff_fast": (fast - r["fast_logits"]).abs().max().item(),
            "sampled_same_on_all_ranks": all(torch.equal(e, sampled) for e in every)
                                         and all(torch.equal(e, free) for e in every_free),
            "sampled_equal_single_process": torch.equal(sampled, r["sampled"]),
            "bytes_read": model.load_report.bytes_read,
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "state_bytes": sum(t.numel() * t.element_size() for n, t in model.state_dict().items()),
        }
        del model
        if ctx.world_size == 2:  # the FP8 checkpoint, kept FP8 in this rank's shard
            q = L.from_pretrained(os.path.join(d, f"{kind}-fp8"), dtype=torch.float32, parallel=ctx, fp8="keep")
            with torch.no_grad():
                res[kind]["fp8_max_diff"] = (q(ids, attention_mask=mask) - r["fp8_logits"]).abs().max().item()
            res[kind]["fp8_max_diff_fast"] = (fast_logits(q, ids, mask) - r["fp8_fast_logits"]).abs().max().item()
            res[kind]["fp8_greedy_equal"] = torch.equal(q.generate(ids, 8, attention_mask=mask), r["fp8_greedy"])
            res[kind]["fp8_tensors"] = sum(p.dtype == torch.float8_e4m3fn for p in q.parameters())
            del q
    with open(os.path.join(d, "out", f"rank{ctx.rank}.json"), "w") as f:
        json.dump(res, f)
    if die is None:
        ctx.close()
        return 0
    dist.barrier()
    if ctx.rank == die:
        os._exit(7)  # no goodbye: the others are about to wait on us
    t0 = time.time()
    try:
        dist.all_reduce(torch.ones(4))
        outcome = {"error": None}
    except Exception as e:  # noqa: BLE001 -- what we want to see
        outcome = {"error": f"{type(e).__name__}: {e}"[:300]}
    outcome["seconds"] = time.time() - t0
    with open(os.path.join(d, "out", f"death{ctx.rank}.json"), "w") as f:
        json.dump(outcome, f)
    return 3


if __name__ == "__main__":
    sys.exit(main())
