"""Autoregressive generation: greedy, or sampling with temperature / top-k / top-p, on the model's one forward.

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

Choosing the next token happens outside the forward (`next_token`), so every option below works the same on both
paths: repetition penalty on the logits, then greedy argmax, or temperature -> top-k -> top-p -> a draw (the order
transformers applies them). Sampling is seeded through a private torch.Generator, so the same seed gives the same
tokens. A row that emits a stop token (or whose text reaches a stop string) is finished: it keeps receiving the pad
token until every row is done.

The arguments take transformers' names and meanings (`generate` docstring); what differs is written there.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings

import torch
import torch._inductor.config  # noqa: F401 -- DECODE_INDUCTOR_OPTIONS asks it for triton.enable_pdl

from .cache import DynamicCache, StaticCache
from .forms import DECODE, PREFILL
from . import speculative as _speculative


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None,
                top_k: int | None = None) -> torch.Tensor:
    """logits (b, vocab) -> next ids (b,). temperature <= 0 is greedy (argmax); else temperature, then top_k (keep the
    k largest logits; None or 0 keeps all), then top_p (the smallest set of tokens holding mass >= top_p), then a
    draw from what is left."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature  # (b, vocab) fp32
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (b, 1): the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (b, vocab)
    if top_p < 1.0:
        p_sorted, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the top token always survives)
        drop = (p_sorted.cumsum(-1) - p_sorted) >= top_p
        p_sorted = p_sorted.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, p_sorted)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def repetition_penalized(logits: torch.Tensor, seq: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty, as transformers applies it: every id already in seq (b, L) -- prompt included, pad
    ids too -- has its logit divided by `penalty` if positive, multiplied if negative. logits (b, vocab) -> same."""
    if penalty == 1.0:
        return logits
    score = logits.gather(1, seq)  # (b, L)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seq, score)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_args(cfg, input_ids, max_new_tokens, temperature, top_p, *, top_k=None, repetition_penalty=1.0,
                attention_mask=None):
    """Every argument checked before any work, each error naming the argument (ValueError, TypeError for a
    non-tensor input_ids)."""
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if temperature is not None and not (_is_number(temperature) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not (_is_number(top_p) and 0.0 < top_p <= 1.0):  # NaN and inf fail the comparison
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if top_k is not None and not (_is_int(top_k) and top_k >= 0):
        raise ValueError(f"top_k must be None or an int >= 0 (0 = no top-k), got {top_k!r}")
    if not (_is_number(repetition_penalty) and math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1.0 = none), got {repetition_penalty!r}")
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32) or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, seq) integer tensor, got {tuple(input_ids.shape)} "
                         f"{input_ids.dtype}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
        raise ValueError(f"input_ids hold ids outside [0, vocab_size={cfg.vocab_size}): "
                         f"min {int(input_ids.min())}, max {int(input_ids.max())}")
    total = input_ids.shape[1] + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} tokens "
                         f"exceeds max_position_embeddings={cfg.max_position_embeddings}")
    if attention_mask is not None:
        m = attention_mask
        if not isinstance(m, torch.Tensor) or m.shape != input_ids.shape:
            raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got "
                             f"{tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__}")
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (a real token)")
        m = m.long()
        if bool((m.sum(1) == 0).any()):
            raise ValueError("attention_mask has a row with no real token")
        if bool((m[:, -1] == 0).any()):  # a 0 in the middle is only a masked token; at the end it is right padding
            raise ValueError("attention_mask has right padding (a row ending in 0): generate needs left padding, the "
                             "new tokens follow the last column (tokenize with padding_side='left')")


def _token_ids(value, name: str, vocab_size: int) -> list[int]:
    """An int, a numpy integer, a 0-d or 1-d tensor / array, or a list of them -> a list of ids in [0, vocab)."""
    if hasattr(value, "tolist") and not _is_int(value):  # tensor or numpy array (a numpy scalar is an Integral)
        value = value.tolist()
    items = list(value) if isinstance(value, list | tuple) else [value]
    if not all(_is_int(e) for e in items):
        raise ValueError(f"{name} must be an int or a list of ints, got {value!r}")
    ids = [int(e) for e in items]
    bad = [e for e in ids if not 0 <= e < vocab_size]
    if bad:
        raise ValueError(f"{name} {bad[0]} is outside [0, vocab_size={vocab_size})")
    return ids


def _stop_ids(eos_token_id, model=None) -> list[int]:
    """eos_token_id as given (any of `_token_ids`' forms); None -> the model's default: its generation_config.json
    eos_token_id where the loader read one (`model.generation_config`), else config.eos_token_id; [] never stops."""
    vocab = model.config.vocab_size if model is not None else 1 << 62
    if eos_token_id is None:
        if model is None:
            return []
        gcfg = getattr(model, "generation_config", None) or {}
        eos_token_id = gcfg.get("eos_token_id", model.config.eos_ids)
        if eos_token_id is None:
            return []
    return _token_ids(eos_token_id, "eos_token_id", vocab)


def _stopped_by_strings(tokenizer, stop_strings, rows: list[list[int]], done: torch.Tensor) -> torch.Tensor:
    """(b,) bool: the rows whose generated text (decoded with `tokenizer`) now contains one of stop_strings."""
    hit = [not bool(d) and any(s in tokenizer.decode(r) for s in stop_strings) for r, d in zip(rows, done.tolist())]
    return torch.tensor(hit, dtype=torch.bool, device=done.device)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int | None = None, temperature: float | None = None,
             top_p: float = 1.0, eos_token_id=None, seed: int | None = None,
             attention_mask: torch.Tensor | None = None, on_token=None, fast: bool = False, compile: bool = False,
             cache_len: int | None = None, *, do_sample: bool | None = None, top_k: int | None = None,
             repetition_penalty: float = 1.0, stop_strings=None, tokenizer=None, pad_token_id=None,
             max_length: int | None = None, streamer=None, past_key_values: DynamicCache | None = None,
             speculative=False, prefill_graph: bool | None = None) -> torch.Tensor:
    """input_ids (b, s) -> (b, s + n) with n <= max_new_tokens (fewer only if every row stopped).

    Length: max_new_tokens new tokens, or max_length = prompt + new tokens in total (max_new_tokens wins when both
    are given, as in transformers); one of them is required.
    Choosing tokens (transformers' semantics):
      do_sample: False = greedy (argmax) whatever temperature / top_k / top_p say; True = sample (temperature None
        means 1.0; 0 is refused). None (the default, this package's older convention kept): sample iff a
        temperature > 0 is given -- so `generate(ids, n)` is greedy and `generate(ids, n, temperature=0.7)` samples.
      temperature, top_k (None or 0: off; top_k=1 is greedy), top_p (1.0: off): applied in that order when sampling.
      repetition_penalty (1.0: off): CTRL's penalty on every id already in the sequence, prompt included, applied to
        the logits in greedy and sampling alike (`repetition_penalized`).
      seed: a private torch.Generator, so the same seed gives the same tokens (None: the global RNG).
    Stopping:
      eos_token_id: None (default) = the model's own stop ids -- generation_config.json's eos_token_id where the
        loader found one (`model.generation_config`), else config.json's; an int, numpy int, tensor or list of them
        stops a row; [] never stops.
      stop_strings: a string or list of strings; a row stops once its generated text (decoded by `tokenizer`, any
        object with decode(ids) -> str, required with stop_strings) contains one. The tokens that made the string
        are kept in the output (as transformers does); a string reaching back into the prompt does not count.
      pad_token_id: what finished rows receive until every row is done (default: generation_config.json's
        pad_token_id, else config.pad_token_id, else the first stop id, else 0).
    Inputs: attention_mask (b, s) of 0/1 marks LEFT padding (a 0 between 1s just masks that token); right padding
      (a row ending in 0) is refused with a ValueError. Ids outside [0, vocab_size) and every bad argument are refused by name before any work.
    Streaming: on_token(ids (b,)) is called after each step; streamer is any object with put() / end() (transformers'
      BaseStreamer protocol: put(prompt ids (b, s)) once, put(new ids (b,)) per step, end() at the end) -- e.g.
      `io.streaming.TextIteratorStreamer`.
    past_key_values (plain path only): a DynamicCache that already holds the first L < s tokens of input_ids (from
      an earlier call on the same sequence); only input_ids[:, L:] are prefilled, and the cache is extended in place
      (afterwards it holds every returned token but the last) -- how a chat keeps its history between turns.
    fast=True: static cache, fixed-shape decode step, a CUDA graph on GPU (module docstring); compile=True (with
    fast) also torch.compiles that step, once per model and bucket ("tuned": with inductor's coordinate-descent
    tuning, a longer compile). cache_len (fast only): the static cache's size (default: a bucket, `bucket_len`).
    prefill_graph (fast only; default None = True on CUDA in one process, else False): the prompt is left-padded to a
    power-of-two bucket (`prompt_bucket`, masked) and its prefill, a fixed shape then, is captured once per bucket
    as a CUDA graph and replayed (on the CPU it runs eagerly at the padded shape, which only costs there): an eager
    prefill of a short prompt is bound by launching ~15k small kernels. Used where the bucket fits the cache with
    max_new_tokens to spare and b x bucket <= PREFILL_GRAPH_ROWS, else the prompt is prefilled as it is. Measured
    (one H200, 2026-12-02, GLM-4.7-Flash, prompt 128 + 128, compile=True): batch 1 223 tok/s end to end against 183
    without it, time to first token 32 ms against 154; batch 32 the same speed (1,649 against 1,647 tok/s).
    Every option above gives the same tokens with fast=True as without (tests/test_generate.py).
    """
    cfg = model.config
    if max_new_tokens is None:
        if max_length is None:
            raise ValueError("pass max_new_tokens (new tokens) or max_length (prompt + new tokens)")
        if not _is_int(max_length) or max_length <= input_ids.shape[-1]:
            raise ValueError(f"max_length must be an int > the prompt length {input_ids.shape[-1]}, got "
                             f"{max_length!r}")
        max_new_tokens = int(max_length) - input_ids.shape[-1]
    _check_args(cfg, input_ids, max_new_tokens, temperature, top_p, top_k=top_k,
                repetition_penalty=repetition_penalty, attention_mask=attention_mask)
    max_new_tokens = int(max_new_tokens)
    if do_sample not in (None, True, False):
        raise ValueError(f"do_sample must be None, True or False, got {do_sample!r}")
    if do_sample is None:
        do_sample = temperature is not None and temperature > 0
    if do_sample and temperature == 0:
        raise ValueError("temperature must be > 0 with do_sample=True (do_sample=False is greedy)")
    temp = (1.0 if temperature is None else float(temperature)) if do_sample else 0.0
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if stop_strings is not None:
        if not stop_strings or not all(isinstance(s, str) and s for s in stop_strings):
            raise ValueError(f"stop_strings must be a non-empty string or list of them, got {stop_strings!r}")
        if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
            raise ValueError("stop_strings needs tokenizer= (an object with decode(ids) -> str)")
    if streamer is not None and not (callable(getattr(streamer, "put", None)) and
                                     callable(getattr(streamer, "end", None))):
        raise ValueError("streamer must have put() and end() methods (transformers' BaseStreamer protocol)")
    if compile and not fast:
        raise ValueError("compile=True compiles the fast decode step: pass fast=True as well")
    if prefill_graph not in (None, True, False):
        raise ValueError(f"prefill_graph must be None (auto), True or False, got {prefill_graph!r}")
    if prefill_graph and not fast:
        raise ValueError("prefill_graph=True captures the fast path's prefill: pass fast=True as well")
    b, s = input_ids.shape
    if past_key_values is not None:
        if fast:
            raise ValueError("past_key_values works with the plain path only (fast=True keeps its own static cache)")
        if not isinstance(past_key_values, DynamicCache) or past_key_values.length >= s or (
                past_key_values.length and past_key_values.latent[0].shape[0] != b):
            raise ValueError(f"past_key_values must be a DynamicCache of batch {b} holding fewer than the {s} "
                             f"tokens of input_ids")
    device = input_ids.device
    input_ids = input_ids.long()
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    stops = _stop_ids(eos_token_id, model)
    stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
    if pad_token_id is None:
        gcfg = getattr(model, "generation_config", None) or {}
        pad_token_id = next((p for p in (gcfg.get("pad_token_id"), cfg.pad_token_id) if p is not None),
                            stops[0] if stops else 0)
    pad = _token_ids(pad_token_id, "pad_token_id", cfg.vocab_size)
    if len(pad) != 1:
        raise ValueError(f"pad_token_id must be one id, got {pad_token_id!r}")
    pad = pad[0]
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    if (spec := _speculative.as_speculation(speculative)) is not None:
        extras = dict(top_k=top_k, stop_strings=stop_strings, streamer=streamer, past_key_values=past_key_values,
                      prefill_graph=prefill_graph is True)  # asked for by name; None (auto) is not a request
        unsupported = [k for k, v in extras.items() if v] + (["repetition_penalty"] if repetition_penalty != 1.0 else [])
        if unsupported:
            raise ValueError(f"speculative decoding does not support {', '.join(unsupported)} yet: drop "
                             f"{'it' if len(unsupported) == 1 else 'them'} or speculative=")
        return _speculative.generate(model, input_ids, max_new_tokens, temp, top_p, stops, pad, mask, gen,
                                     spec, on_token, fast, cache_len, compile)

    if fast:
        if prefill_graph is None:
            prefill_graph = auto_prefill_graph(model, device)
        dec = Decoder.get(model, b, cache_len or bucket_len(s + max_new_tokens, cfg), compile=compile,
                          prefill_graph=prefill_graph)
        logits = dec.prefill(input_ids, mask, room=max_new_tokens)  # (b, vocab)
        step_fn = dec.step  # nxt (b,) -> (b, vocab): one fixed-shape step
    else:
        cache = DynamicCache.for_model(cfg) if past_key_values is None else past_key_values
        new = input_ids[:, cache.length:]  # the tokens not in the cache yet: all of them unless past_key_values
        logits = model(new, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1]  # prefill: (b, vocab)

        def step_fn(nxt):
            nonlocal mask
            mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=device)], dim=1)  # (b, s + 1)
            return model(nxt[:, None], attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1]  # one step
    if streamer is not None:
        streamer.put(input_ids.cpu())
    out = [input_ids]
    seq = input_ids  # (b, s + t): what the repetition penalty looks at
    rows = [[] for _ in range(b)]  # the generated ids per row, for stop_strings
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logits = repetition_penalized(logits, seq, repetition_penalty)
        nxt = sample_next(logits, temp, top_p, gen, top_k)  # (b,)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        out.append(nxt[:, None])
        if repetition_penalty != 1.0:
            seq = torch.cat([seq, nxt[:, None]], dim=1)
        if on_token is not None:
            on_token(nxt)
        if streamer is not None:
            streamer.put(nxt.cpu())
        if len(stops):
            done = done | torch.isin(nxt, stop_ids)
        if stop_strings is not None:
            for r, t in zip(rows, nxt.tolist()):
                r.append(t)
            done = done | _stopped_by_strings(tokenizer, stop_strings, rows, done)
        if (len(stops) or stop_strings is not None) and bool(done.all()):
            break
        if step + 1 == max_new_tokens:
            break
        logits = step_fn(nxt)
    if streamer is not None:
        streamer.end()
    return torch.cat(out, dim=1)


# ------------------------------------------------------------------------------------------------- fast decoding
CAPTURE_ATTEMPTS = 2  # Decoder.capture: a failed capture is retried once, after as many warm-ups again
CAPTURE_WARMUPS = 3  # warm-up runs of the decode step before its capture, on a side stream, as torch.cuda.graph's
#   documentation does: a step that first runs compiled code (or compiles again) inside the capture fails there
PREFILL_GRAPH_ROWS = 4096  # prefill_graph: captured prefills of at most this many (batch x bucket) token rows;
#   beyond, a prefill is compute-bound and the graph's memory pool would hold large activations for nothing


def auto_prefill_graph(model, device) -> bool:
    """generate()'s default prefill_graph: capture where a CUDA graph exists (on the CPU padding would only cost),
    for a model in one process (a sharded model's captured prefill has not run on several GPUs yet)."""
    return torch.device(device).type == "cuda" and getattr(model, "world_size", 1) == 1


def prompt_bucket(t: int, smallest: int = 16) -> int:
    """The fixed prefill length for a t-token prompt (prefill_graph): the next power of two >= max(t, smallest)."""
    return max(smallest, 1 << max(0, t - 1).bit_length())


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


# inductor's options for the decode step: "combo kernels" launch independent small kernels of the step together as
# one (horizontal fusion). Measured on one H200 (2026-12-03, docs/perf-run13/): GLM-4.7-Flash's compiled batch-1
# step 3.571 -> 3.472 ms, 743 -> 670 kernels.
DECODE_INDUCTOR_OPTIONS = {"combo_kernels": True}
# ... and programmatic dependent launch in inductor's own kernels (`triton.enable_pdl`, off in torch by default; on
# CUDA sm_90+ only): each generated kernel loads what the kernel before it did not write -- the weights -- before its
# gdc_wait, as our Triton kernels do (kernels/support.py), so the step's weight reads overlap the previous kernel's
# tail. Measured on one H100 (2026-12-07, docs/perf-run20/): GLM-4.7-Flash's compiled batch-1 step 3.872 -> 3.737 ms,
# the logits bit for bit the same; the LongCat layer's step within its run-to-run spread (three pairs).
if hasattr(torch._inductor.config.triton, "enable_pdl"):  # torch 2.11 and 2.13 have it
    DECODE_INDUCTOR_OPTIONS["triton.enable_pdl"] = True


def compiled_decode_step(compile: bool | str = True):
    """torch.compile(decode_step, dynamic=False), made once per setting, with DECODE_INDUCTOR_OPTIONS: True is
    that; "tuned" adds inductor's coordinate-descent tuning of each generated kernel's block sizes (a longer
    one-time compile; the decode step's reductions run faster on a GPU)."""
    if compile not in (True, "tuned"):
        raise ValueError(f"compile must be False, True or 'tuned', got {compile!r}")
    if compile not in _COMPILED:
        opts = dict(DECODE_INDUCTOR_OPTIONS, **({"coordinate_descent_tuning": True} if compile == "tuned" else {}))
        _COMPILED[compile] = torch.compile(decode_step, dynamic=False, options=opts)
    return _COMPILED[compile]


def _first_error(e: BaseException) -> str:
    """The first line of the first exception in e's chain (a failed capture's own error comes second: the end of
    the capture fails because of what happened inside it)."""
    for _ in range(8):
        if e.__context__ is None:
            break
        e = e.__context__
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:200]


class Decoder:
    """Prefill once, then decode one token per `step` with fixed shapes (a replayed CUDA graph on GPU).

    Holds the static cache and the step's input tensors; `Decoder.get` keeps one per (model, batch, max_len,
    compile), so the compiled step and the captured graph are reused by every later generate() call.
    """

    keep = 2  # decoders kept per model (each holds a static cache)

    def __init__(self, model, batch: int, max_len: int, compile: bool = False, graphs: bool | None = None,
                 forms=DECODE, prefill_graph: bool = False):
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
        self.failed_captures = []  # CUDAGraph objects of captures that failed (capture)
        self.length = 0  # tokens in the cache (host side, for the overflow check only)
        self.setup_s = None  # wall time of the first step: compile + capture (None until it ran)
        # prefill_graph: pad each prompt on the left to its bucket (`prompt_bucket`) and run the prefill at that
        # fixed shape, captured once per bucket as a CUDA graph on GPU (eagerly elsewhere: the same padding)
        self.prefill_graph = prefill_graph
        self.prefills = {}  # bucket P -> (ids (b, P), positions (P,), graph or None, logits or None)

    @classmethod
    def get(cls, model, batch: int, max_len: int, compile: bool = False, prefill_graph: bool = False) -> "Decoder":
        kept = model.__dict__.setdefault("_decoders", {})  # on the model: freed with it
        key = (batch, max_len, compile, prefill_graph, model.dtype, model.device)
        if key not in kept:
            while len(kept) >= cls.keep:  # free the oldest static cache
                kept.pop(next(iter(kept)))
            kept[key] = cls(model, batch, max_len, compile=compile, prefill_graph=prefill_graph)
        return kept[key]

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask=None, room: int = 1):
        """input_ids (b, t) [+ 0/1 attention_mask (b, t), left padding] -> logits (b, vocab) of the last position.

        room: the tokens still to be decoded after it. With prefill_graph, a prompt whose bucket P leaves that room
        (P + room <= max_len) and holds at most PREFILL_GRAPH_ROWS token rows (b * P) is padded on the left to P
        tokens (masked: the same positions and logits) and run at that fixed shape; any other runs as it is."""
        b, t = input_ids.shape
        if b != self.batch or t > self.max_len:
            raise ValueError(f"prefill of {tuple(input_ids.shape)} does not fit batch={self.batch}, "
                             f"max_len={self.max_len}")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        P = prompt_bucket(t)
        if self.prefill_graph and P + room <= self.max_len and b * P <= PREFILL_GRAPH_ROWS:
            return self._prefill_bucket(input_ids, mask, P)
        self.attention_mask.zero_()
        self.attention_mask[:, :t] = mask
        pos = torch.arange(t, device=input_ids.device)
        logits = self.model(input_ids, attention_mask=self.attention_mask, cache=self.cache, cache_position=pos,
                            forms=PREFILL, logits_to_keep=1)[:, -1]  # (b, vocab)
        self.cache_position.fill_(t)
        self.length = t
        return logits

    def _prefill_bucket(self, input_ids, mask, P):
        """The prompt left-padded to P tokens in fixed buffers; its prefill replayed (a CUDA graph per P on GPU)."""
        b, t = input_ids.shape
        if P not in self.prefills:
            self.prefills[P] = self._prefill_setup(P)
        ids, pos, graph, logits = self.prefills[P]
        ids.zero_()  # (b, P): pad slots hold id 0, masked out below
        ids[:, P - t:] = input_ids
        self.attention_mask.zero_()  # (b, max_len)
        self.attention_mask[:, P - t:P] = mask  # the pads are 0: never attended, positions count real tokens only
        if graph is not None:
            graph.replay()
            logits = logits.clone()  # (b, vocab)
        else:
            logits = self._prefill_run(ids, pos)
        self.cache_position.fill_(P)
        self.length = P
        return logits

    def _prefill_run(self, ids, pos):
        return self.model(ids, attention_mask=self.attention_mask, cache=self.cache, cache_position=pos,
                          forms=PREFILL, logits_to_keep=1)[:, -1]  # (b, vocab)

    def _prefill_setup(self, P):
        """Fixed buffers for bucket P; on GPU a warm-up run, then the prefill captured as a CUDA graph. (The
        warm-up writes slots [0, P) of the cache, which the real prefill then overwrites.)"""
        dev = self.ids.device
        ids = torch.zeros(self.batch, P, dtype=torch.long, device=dev)  # (b, P)
        pos = torch.arange(P, device=dev)  # (P,)
        if not self.graphs:
            return ids, pos, None, None
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            self._prefill_run(ids, pos)  # warm-up: kernel compilation, cuBLAS handles
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._prefill_run(ids, pos)  # (b, vocab), a static output
        return ids, pos, graph, logits

    def capture(self):
        """Record one decode step as a CUDA graph (after CAPTURE_WARMUPS warm-up runs, each from the same state,
        which is restored after them). A capture that fails (compiled code that compiles, autotunes or syncs for
        the first time inside it) is retried once after more warm-ups, with a one-line warning; a second failure
        is a one-line error saying what to do."""
        state = [t.clone() for t in (self.cache_position, self.attention_mask)]
        for attempt in range(1, CAPTURE_ATTEMPTS + 1):
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(CAPTURE_WARMUPS):  # cuBLAS handles, lazy inits, compilation and inductor's
                    self._restore(state)  # autotuning: none of it may run in a capture (a synchronize ends it)
                    self.run_step()
            torch.cuda.current_stream().wait_stream(s)
            self._restore(state)
            graph, main = torch.cuda.CUDAGraph(), torch.cuda.current_stream()
            try:
                with torch.cuda.graph(graph, stream=torch.cuda.Stream()):  # a fresh capture stream per attempt
                    logits = self.run_step()  # (b, vocab), a static output
            except Exception as e:  # noqa: BLE001 -- whatever ended the capture (CUDA, inductor, Triton)
                torch.cuda.set_stream(main)  # a failed capture leaves its own stream current
                self.failed_captures.append(graph)  # kept alive: torch's allocator still holds a filter that reads
                #   it (a capture_end that fails returns before ending the graph's allocation to its pool)
                self._restore(state)  # (nothing ran: a capture only records)
                why = _first_error(e)
                if attempt == CAPTURE_ATTEMPTS:
                    raise RuntimeError(f"capturing the decode step as a CUDA graph failed {attempt} times (last: "
                                       f"{why}); generate(..., compile=False) avoids the compiled step, or run with "
                                       "TORCH_LOGS=recompiles to see what compiled inside the capture") from e
                warnings.warn(f"capturing the decode step as a CUDA graph failed ({why}); warming it up again and "
                              "retrying", RuntimeWarning, stacklevel=3)
                continue
            self.graph, self.logits = graph, logits
            return

    def _restore(self, state):
        for t, v in zip((self.cache_position, self.attention_mask), state):
            t.copy_(v)

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
