"""Demo: a tiny LongCat-Flash, built, saved in the real layout, loaded back and asked to generate.

    python -m longcat_ref.demo
"""

import sys
import tempfile

import torch

from . import CausalLM, from_pretrained, init_weights, save_checkpoint, tiny_longcat
from .counts import parameter_counts


def main(argv=None):
    cfg = tiny_longcat()
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(init_weights(CausalLM(cfg), seed=0), d)
        model = from_pretrained(d, dtype=torch.float32)
    c = parameter_counts(cfg)
    print(f"tiny LongCat-Flash: {c['total']:,} parameters, {c['activated_min']:,}-{c['activated_max']:,} activated")
    ids = torch.tensor([[1, 10, 20, 30]])
    out = model.generate(ids, max_new_tokens=16, seed=0)
    print("generated ids (untrained model, so gibberish):", out[0, 4:].tolist())
    return 0


if __name__ == "__main__":
    sys.exit(main())
