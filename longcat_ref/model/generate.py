"""Autoregressive generation: greedy or temperature / top-p sampling, on the model's one forward.

One prefill forward over the (left-padded) prompts fills the cache; then one token per step. Two ways to run the
same forward (tests prove them equal):

* plain (default): a DynamicCache that grows, the reference forms. Easy to step through.
* fast=True: a StaticCache preallocated for a bucket of lengths, and a decode step with fixed shapes

      decode_step(model, cache, ids, cache_position, attention_mask)  ->  logits (b, vocab)

  whose inputs are device tensors updated in place, so it never syncs with the host. On a GPU it is captured once as
  a CUDA graph and replayed (one launch per token); compile=True also wraps it in torch.compile. It is built once per
  (model, batch, bucket) and kept (`Decoder.get`): a new prompt length or max_new_tokens inside the same bucket
  reuses the compiled step and the captured graph -- nothing is compiled twice. Prefill runs the same forward
  eagerly with the prefill forms (SDPA attention, grouped experts), decode with the decode forms (absorbed
  attention, gathered / gemv experts). Under torchrun the sharded model's collectives are inside that same step,
  so they are captured with it.

Sampling is seeded through a private torch.Generator, so the same seed gives the same tokens. A row that emits a
stop token is finished: it keeps receiving the pad token (or the stop token if the config has no pad) until every
row is done.
"""

from __future__ import annotations

import math
import time

import torch

from .cache import DynamicCache, StaticCache
from .forms import DECODE, PREFILL
from . import speculative as _speculative


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


def _check_args(cfg, input_ids, max_new_tokens, temperature, top_p):
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not (isinstance(top_p, int | float) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be a (batch, seq) integer tensor, got {tuple(input_ids.shape)} "
                         f"{input_ids.dtype}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
        raise ValueError(f"input_ids hold ids outside [0, vocab_size={cfg.vocab_size}): "
                         f"min {int(input_ids.min())}, max {int(input_ids.max())}")
    total = input_ids.shape[1] + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} tokens "
                         f"exceeds max_position_embeddings={cfg.max_position_embeddings}")


def _stop_ids(eos_token_id) -> list[int]:
    """None -> []; an int, a 0-d tensor / numpy int, or a list of them -> a list of ints."""
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.tolist()
    if not isinstance(eos_token_id, list | tuple):
        eos_token_id = [eos_token_id]
    return [int(e) for e in eos_token_id]


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             eos_token_id=None, seed: int | None = None, attention_mask: torch.Tensor | None = None,
             on_token=None, fast: bool = False, compile: bool = False, cache_len: int | None = None,
             speculative=False) -> torch.Tensor:
    """input_ids (b, s) -> (b, s + n) with n <= max_new_tokens (fewer only if every row stopped).

    eos_token_id: None never stops early; an int or a list of ints stops a row. attention_mask (b, s) marks left
    padding. on_token(ids (b,)) is called after each step (streaming). fast=True: static cache, fixed-shape decode
    step, a CUDA graph on GPU (module docstring); compile=True (with fast) also torch.compiles that step, once per
    model and bucket ("tuned": with inductor's coordinate-descent tuning, a longer compile). cache_len (fast only): the static cache's size (default: a bucket, `bucket_len`).
    """
    cfg = model.config
    _check_args(cfg, input_ids, max_new_tokens, temperature, top_p)
    if compile and not fast:
        raise ValueError("compile=True compiles the fast decode step: pass fast=True as well")
    b, s = input_ids.shape
    device = input_ids.device
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    stops = _stop_ids(eos_token_id)
    stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (stops[0] if stops else 0)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    if (spec := _speculative.as_speculation(speculative)) is not None:
        return _speculative.generate(model, input_ids, max_new_tokens, temperature, top_p, stops, pad, mask, gen,
                                     spec, on_token, fast, cache_len, compile)

    if fast:
        dec = Decoder.get(model, b, cache_len or bucket_len(s + max_new_tokens, cfg), compile=compile)
        logits = dec.prefill(input_ids, mask)  # (b, vocab)
        step_fn = dec.step  # nxt (b,) -> (b, vocab): one fixed-shape step
    else:
        cache = DynamicCache.for_model(cfg)
        logits = model(input_ids, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1]  # prefill: (b, vocab)

        def step_fn(nxt):
            nonlocal mask
            mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=device)], dim=1)  # (b, s + 1)
            return model(nxt[:, None], attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1]  # one step
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


# ------------------------------------------------------------------------------------------------- fast decoding
def bucket_len(total: int, cfg, smallest: int = 256) -> int:
    """The static cache size for `total` tokens: the next power of two >= max(total, smallest), capped at the
    model's max_position_embeddings. Every prompt + max_new_tokens inside one bucket shares one compiled step."""
    n = max(smallest, 1 << max(0, total - 1).bit_length())
    return max(total, min(n, cfg.max_position_embeddings))


def decode_step(model, cache: StaticCache, ids, cache_position, attention_mask, forms=DECODE):
    """One fixed-shape decode step: ids (b,) written at slot cache_position (1,) -> logits (b, vocab).

    attention_mask (b, max_len) marks the real tokens in the cache; the new one is marked here. Advances the slot in
    place, so a captured CUDA graph replays the next step. No host sync anywhere.
    """
    attention_mask.index_fill_(1, cache_position, 1)  # the new token is real (and visible to itself)
    logits = model(ids[:, None], attention_mask=attention_mask, cache=cache, cache_position=cache_position,
                   forms=forms, logits_to_keep=1)[:, -1]  # (b, vocab)
    cache_position.add_(1)
    return logits


_COMPILED = {}  # torch.compile options -> torch.compile(decode_step): one compiled function per setting


def compiled_decode_step(compile: bool | str = True):
    """torch.compile(decode_step, dynamic=False), made once per setting: True is inductor's default; "tuned" adds
    its coordinate-descent tuning of each generated kernel's block sizes (a longer one-time compile; the decode
    step's reductions run faster on a GPU)."""
    if compile not in (True, "tuned"):
        raise ValueError(f"compile must be False, True or 'tuned', got {compile!r}")
    if compile not in _COMPILED:
        opts = {"options": {"coordinate_descent_tuning": True}} if compile == "tuned" else {}
        _COMPILED[compile] = torch.compile(decode_step, dynamic=False, **opts)
    return _COMPILED[compile]


class Decoder:
    """Prefill once, then decode one token per `step` with fixed shapes (a replayed CUDA graph on GPU).

    Holds the static cache and the step's input tensors; `Decoder.get` keeps one per (model, batch, max_len,
    compile), so the compiled step and the captured graph are reused by every later generate() call.
    """

    keep = 2  # decoders kept per model (each holds a static cache)

    def __init__(self, model, batch: int, max_len: int, compile: bool = False, graphs: bool | None = None,
                 forms=DECODE):
        if max_len > model.config.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds max_position_embeddings="
                             f"{model.config.max_position_embeddings}")
        self.model, self.batch, self.max_len = model, batch, max_len
        dev = model.device
        self.cache = StaticCache.for_model(model.config, batch, max_len, model.dtype, dev)
        self.ids = torch.zeros(batch, dtype=torch.long, device=dev)  # the step's static inputs
        self.cache_position = torch.zeros(1, dtype=torch.long, device=dev)
        self.attention_mask = torch.zeros(batch, max_len, dtype=torch.long, device=dev)
        self.graphs = (dev.type == "cuda") if graphs is None else graphs
        if self.graphs and dev.type != "cuda":
            raise ValueError("graphs=True needs a CUDA model; use graphs=False on the CPU")
        self.step_fn = compiled_decode_step(compile) if compile else decode_step
        self.forms = forms  # the decode step's forms (prefill always uses PREFILL)
        self.graph = None
        self.logits = None
        self.length = 0  # tokens in the cache (host side, for the overflow check only)
        self.setup_s = None  # wall time of the first step: compile + capture (None until it ran)

    @classmethod
    def get(cls, model, batch: int, max_len: int, compile: bool = False) -> "Decoder":
        kept = model.__dict__.setdefault("_decoders", {})  # on the model: freed with it
        key = (batch, max_len, compile, model.dtype, model.device)
        if key not in kept:
            while len(kept) >= cls.keep:  # free the oldest static cache
                kept.pop(next(iter(kept)))
            kept[key] = cls(model, batch, max_len, compile=compile)
        return kept[key]

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask=None):
        """input_ids (b, t) [+ 0/1 attention_mask (b, t), left padding] -> logits (b, vocab) of the last position."""
        b, t = input_ids.shape
        if b != self.batch or t > self.max_len:
            raise ValueError(f"prefill of {tuple(input_ids.shape)} does not fit batch={self.batch}, "
                             f"max_len={self.max_len}")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        self.attention_mask.zero_()
        self.attention_mask[:, :t] = mask
        pos = torch.arange(t, device=input_ids.device)
        logits = self.model(input_ids, attention_mask=self.attention_mask, cache=self.cache, cache_position=pos,
                            forms=PREFILL, logits_to_keep=1)[:, -1]  # (b, vocab)
        self.cache_position.fill_(t)
        self.length = t
        return logits

    def capture(self):
        """Record one decode step as a CUDA graph (after a warm-up run; the state it advanced is restored)."""
        state = [t.clone() for t in (self.cache_position, self.attention_mask)]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            self.run_step()  # warm-up: cuBLAS handles, lazy inits, compilation
        torch.cuda.current_stream().wait_stream(s)
        for t, v in zip((self.cache_position, self.attention_mask), state):
            t.copy_(v)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.run_step()

    def run_step(self):
        """The decode step on the current inputs, not replayed (eager or compiled)."""
        return self.step_fn(self.model, self.cache, self.ids, self.cache_position, self.attention_mask, self.forms)

    @torch.no_grad()
    def step(self, next_ids):
        """next_ids (b,) -> logits (b, vocab) for the position after them."""
        if self.length >= self.max_len:
            raise ValueError(f"KV cache overflow: max_len {self.max_len} reached")
        self.ids.copy_(next_ids)
        first = self.setup_s is None
        t0 = time.perf_counter()
        if self.graphs:
            if self.graph is None:
                self.capture()
            self.graph.replay()
            logits = self.logits.clone()
        else:
            logits = self.run_step()
        if first:
            if logits.is_cuda:
                torch.cuda.synchronize()
            self.setup_s = time.perf_counter() - t0
        self.length += 1
        return logits
