"""Shared by the kernel tests: generate's fixed-shape decode step run over a few tokens from an empty static cache."""

import torch

from longcat_ref.model.cache import StaticCache


def decode_logits(fn, model, forms, ids, S=16):
    """fn: generate.decode_step or a torch.compile of it; ids (b, n) fed one column a step -> logits (n, b, vocab)."""
    b, dev = ids.shape[0], ids.device
    cache = StaticCache.for_model(model.config, b, S, device=dev)
    mask = torch.zeros(b, S, dtype=torch.long, device=dev)
    pos = torch.tensor([0], device=dev)
    with torch.no_grad():
        return torch.stack([fn(model, cache, ids[:, i], pos, mask, forms) for i in range(ids.shape[1])])
