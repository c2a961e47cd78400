"""One rank of test_mtp.py's torchrun test (not collected by pytest): torchrun ... tests/spec_worker.py DIR.

Loads each tiny checkpoint of DIR sharded over the ranks (TP/EP, gloo), its MTP head replicated, and writes
DIR/rank{R}.json: greedy speculative (plain and fast) vs the single-process greedy tokens in DIR/ref.json, the
acceptance count, and a seeded speculative sample (the test compares it across ranks)."""

import json
import os
import sys

import torch

import longcat_ref as L
from longcat_ref.model.speculative import Speculation
from longcat_ref.runtime.parallel import ParallelContext
from test_mtp import repeat_head


def main():
    d = sys.argv[1]
    ctx = ParallelContext.from_env(cpu=True)  # the references are CPU fp32, whatever GPUs this machine has
    ref = json.loads(open(os.path.join(d, "ref.json")).read())
    res = {}
    for kind in ("longcat", "glm"):
        m = L.from_pretrained(os.path.join(d, kind), dtype=torch.float32, parallel=ctx)
        repeat_head(m)
        ids = torch.tensor(ref[kind]["ids"])
        spec = Speculation(k=2)
        greedy = m.generate(ids, 10, speculative=spec).tolist()
        fast = m.generate(ids, 10, speculative=1, fast=True).tolist()
        sampled = m.generate(ids, 10, temperature=1.0, seed=ctx.common_seed(0), speculative=2).tolist()
        res[kind] = {"greedy_equal": greedy == ref[kind]["greedy"], "fast_greedy_equal": fast == ref[kind]["greedy"],
                     "accepted": spec.accepted, "sampled": sampled,
                     "sharded": m.lm_head.weight.shape[0] < m.config.vocab_size}
        assert res[kind]["sharded"]
    with open(os.path.join(d, f"rank{ctx.rank}.json"), "w") as f:
        json.dump(res, f)
    ctx.close()


if __name__ == "__main__":
    main()
