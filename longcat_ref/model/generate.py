"""Autoregressive generation with the latent KV cache: greedy or temperature / top-p sampling.

One prefill forward over the (left-padded) prompts fills the cache; then one token per step. Sampling is seeded
through a private torch.Generator, so the same seed gives the same tokens. A row that emits a stop token is
finished: it keeps receiving the pad token (or the stop token if the config has no pad) until every row is done.
"""

from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """logits (b, vocab) -> next ids (b,). temperature 0 is greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (b, vocab) fp32
    if top_p < 1.0:
        p_sorted, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the top token always survives)
        drop = (p_sorted.cumsum(-1) - p_sorted) >= top_p
        p_sorted = p_sorted.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, p_sorted)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             eos_token_id=None, seed: int | None = None, attention_mask: torch.Tensor | None = None,
             on_token=None, fast: bool = False, compile: bool = False) -> torch.Tensor:
    """input_ids (b, s) -> (b, s + n) with n <= max_new_tokens (fewer only if every row stopped).

    eos_token_id: None never stops early; an int or a list of ints stops a row. attention_mask (b, s) marks left
    padding. on_token(ids (b,)) is called after each step (streaming). fast=True decodes with fast.FastDecoder
    (static cache, absorbed MLA, grouped experts, one CUDA graph per step on GPU); same tokens up to rounding.
    compile=True (with fast) also torch.compiles the decode step: a one-time compile, then fused kernels.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    cfg = model.config
    b, s = input_ids.shape
    total = s + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({s}) + max_new_tokens ({max_new_tokens}) = {total} tokens exceeds "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    stops = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (stops[0] if stops else 0)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)

    mask = attention_mask.long()
    if fast:
        from ..runtime.fast import FastDecoder

        dec = FastDecoder(model, b, total, compile=compile)
        logits = dec.prefill(input_ids, mask)  # prefill: (b, vocab)
        step_fn = dec.step  # nxt (b,) -> (b, vocab): one fixed-shape step
    else:
        cache = model.new_cache(b, total)
        logits = model(input_ids, attention_mask=mask, cache=cache)[:, -1]  # prefill: (b, vocab)

        def step_fn(nxt):
            nonlocal mask
            mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=device)], dim=1)
            return model(nxt[:, None], attention_mask=mask, cache=cache)[:, -1]  # one decode step
    out = [input_ids]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, gen)  # (b,)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        out.append(nxt[:, None])
        if on_token is not None:
            on_token(nxt)
        if len(stops):
            done = done | torch.isin(nxt, stop_ids)
            if bool(done.all()):
                break
        if step + 1 == max_new_tokens:
            break
        logits = step_fn(nxt)
    return torch.cat(out, dim=1)
