"""Fast decoding: a static latent cache, a fixed-shape decode step, and CUDA graphs / torch.compile around it.

The readable path (model.py) builds a mask with a Python-int `start` and reads the cache as views [:end], so every
decode step has new shapes. Here the shapes never change:

    cache   StaticCache: LatentCache preallocated for max_len; a decode step writes at a *device* slot
            (index_copy_) and attention always reads all max_len positions
    mask    valid (b, max_len) bool on the device: True for real tokens already written; the additive mask is
            built from it inside the step
    rope    positions (b,) on the device, advanced inside the step

so one decode step can be captured once as a CUDA graph and replayed: a single launch per token instead of
hundreds of kernel launches and Python calls. Decode uses absorbed MLA (attend over the 576-wide latent, never
expand the cache), grouped/gathered experts (no host sync; "gemv" experts inside torch.compile at batch 1, where
the weight gather fuses into the reduction) and vectorised zero experts. Prefill uses the naive MLA form through
SDPA (flash attention where the head dims allow) and grouped experts. compile=True on the GPU also turns on
inductor's coordinate-descent tuning (a longer one-time compile: minutes for the 47-layer GLM step).

    dec = FastDecoder(model, batch=2, max_len=1024)     # graphs=None: CUDA graphs on GPU, eager on CPU
    logits = dec.prefill(input_ids, attention_mask)     # (b, vocab) for the last prompt position
    logits = dec.step(next_ids)                         # (b, vocab), one token per row

`model.generate(..., fast=True)` uses it. `tests/test_fast.py` proves every piece equal to the readable path.
"""

from __future__ import annotations

import contextlib

import torch

from ..model.cache import LatentCache
from ..model.experts import Experts
from ..model.mla import MLA
from ..model.model import position_ids_from_mask
from ..model.moe import MoE
from ..model.norm import RMSNorm
from ..model.rope import rope_cos_sin


class StaticCache(LatentCache):
    """A LatentCache with a fixed-shape decode mode: writes at `slot` (a device tensor), reads all max_len rows."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.slot = torch.zeros(1, dtype=torch.long, device=self.latent.device)  # next position to write
        self.static = False  # False: behave exactly like LatentCache (prefill); True: fixed-shape decode

    def update(self, layer: int, start: int, latent: torch.Tensor, k_rope: torch.Tensor):
        if not self.static:
            return super().update(layer, start, latent, k_rope)
        self.latent[layer].index_copy_(1, self.slot, latent)  # (b, 1, r) written at position slot
        self.k_rope[layer].index_copy_(1, self.slot, k_rope)  # (b, 1, rope)
        return self.latent[layer], self.k_rope[layer]  # (b, max_len, r), (b, max_len, rope): masked by the caller


@contextlib.contextmanager
def fast_paths(model, absorb: bool, experts: str = "auto", causal: bool = False, stream=None):
    """Switch `model` to its fast paths for the duration: MLA absorbed (decode) or naive-through-SDPA (prefill),
    grouped/gathered experts, vectorised zero experts, fused RMSNorm; a CUDA `stream` runs each MoE there, beside
    the dense sublayers (LongCat's shortcut). Restores every flag afterwards."""
    saved = []
    for m in model.modules():
        if isinstance(m, MLA):
            saved.append((m, dict(absorb=m.absorb, sdpa=m.sdpa, causal=m.causal)))
            m.absorb, m.sdpa, m.causal = absorb, not absorb, causal
        elif isinstance(m, MoE):
            saved.append((m, dict(fast=m.fast, stream=m.stream)))
            m.fast, m.stream = True, stream
        elif isinstance(m, RMSNorm):
            saved.append((m, dict(fused=m.fused)))
            m.fused = True
        elif isinstance(m, Experts):
            saved.append((m, dict(impl=m.impl)))
            m.impl = experts
    try:
        yield model
    finally:
        for m, flags in saved:
            for k, v in flags.items():
                setattr(m, k, v)


def decode_step(model, cache: StaticCache, ids, pos, valid):
    """One fixed-shape decode step. ids (b,), pos (b,) positions, valid (b, max_len) -> logits (b, vocab).

    Writes the new tokens' latents at cache.slot and advances slot, pos and valid in place (so a captured graph
    replays the next step). No host sync anywhere: safe inside a CUDA graph.
    """
    cfg = model.config
    valid.index_fill_(1, cache.slot, True)  # the new token is visible to itself
    x = model.model.embed_tokens(ids[:, None])  # (b, 1, H)
    mask = torch.zeros(valid.shape, dtype=x.dtype, device=x.device).masked_fill(~valid, torch.finfo(x.dtype).min)
    mask = mask[:, None, None, :]  # (b, 1, 1, max_len) additive: unwritten and padding positions are masked
    cos, sin = rope_cos_sin(pos[:, None], cfg.qk_rope_head_dim, cfg.rope_theta, x.dtype)  # (b, 1, rope)
    for layer in model.model.layers:
        x = layer(x, cos, sin, mask, cache, 0)  # (b, 1, H)
    logits = model.lm_head(model.model.norm(x))[:, 0]  # (b, vocab)
    cache.slot.add_(1)
    pos.add_(1)
    return logits


class FastDecoder:
    """Prefill once, then decode one token per `step` with fixed shapes (a replayed CUDA graph on GPU)."""

    def __init__(self, model, batch: int, max_len: int, graphs: bool | None = None, compile: bool | dict = False,
                 experts: str = "auto", overlap: bool | None = None):
        if max_len > model.config.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds max_position_embeddings="
                             f"{model.config.max_position_embeddings}")
        self.model, self.batch, self.max_len, self.experts = model, batch, max_len, experts
        dev = model.device
        self.cache = StaticCache.for_model(model.config, batch, max_len, model.dtype, dev)
        self.ids = torch.zeros(batch, dtype=torch.long, device=dev)  # static inputs of the captured step
        self.pos = torch.zeros(batch, dtype=torch.long, device=dev)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=dev)
        self.graphs = (dev.type == "cuda") if graphs is None else graphs
        if self.graphs and dev.type != "cuda":
            raise ValueError("graphs=True needs a CUDA model; use graphs=False on the CPU")
        overlap = (self.graphs and not compile and model.config.is_longcat) if overlap is None else overlap
        self.side = torch.cuda.Stream(device=dev) if overlap else None  # the MoE's side stream (GPU)
        # compile=True on the GPU: inductor's coordinate-descent tuning of each generated kernel's block sizes
        # (longer compile; the decode step's reductions run markedly faster). A dict: torch.compile's kwargs.
        tune = {"options": {"coordinate_descent_tuning": True}} if dev.type == "cuda" else {}
        opts = compile if isinstance(compile, dict) else tune
        self.step_fn = torch.compile(decode_step, dynamic=False, **opts) if compile else decode_step
        self.graph = None
        self.logits = None

    # ---------------------------------------------------------------------------------------------- prefill
    @torch.no_grad()
    def prefill(self, input_ids, attention_mask=None):
        """input_ids (b, t) [+ 0/1 attention_mask (b, t), left padding] -> logits (b, vocab) of the last position."""
        b, t = input_ids.shape
        if b != self.batch or t > self.max_len:
            raise ValueError(f"prefill of {tuple(input_ids.shape)} does not fit batch={self.batch}, "
                             f"max_len={self.max_len}")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        causal = attention_mask is None or bool(mask.all())  # one host sync per prompt: can SDPA skip the mask?
        self.cache.static, self.cache.length = False, 0
        with fast_paths(self.model, absorb=False, experts=self.experts, causal=causal):
            logits = self.model(input_ids, attention_mask=None if causal else mask, cache=self.cache)[:, -1]
        self.valid.zero_()
        self.valid[:, :t] = mask.bool()
        self.pos.copy_(position_ids_from_mask(mask)[:, -1] + 1)  # next position of each row
        self.cache.slot.fill_(t)
        return logits

    # ----------------------------------------------------------------------------------------------- decode
    def _eager_step(self):
        with fast_paths(self.model, absorb=True, experts=self.experts, stream=self.side):
            self.cache.static = True
            try:
                return self.step_fn(self.model, self.cache, self.ids, self.pos, self.valid)
            finally:
                self.cache.static = False

    def capture(self):
        """Record one decode step as a CUDA graph (warm-up run first; the state it advanced is restored)."""
        state = [t.clone() for t in (self.cache.slot, self.pos, self.valid)]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            self._eager_step()  # warm-up: cuBLAS handles, lazy inits, compilation
        torch.cuda.current_stream().wait_stream(s)
        for t, v in zip((self.cache.slot, self.pos, self.valid), state):
            t.copy_(v)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._eager_step()

    @torch.no_grad()
    def step(self, next_ids):
        """next_ids (b,) -> logits (b, vocab) for the position after them."""
        if self.cache.length >= self.max_len:
            raise ValueError(f"KV cache overflow: max_len {self.max_len} reached")
        self.ids.copy_(next_ids)
        if self.graphs:
            if self.graph is None:
                self.capture()
            self.graph.replay()
            logits = self.logits.clone()
        else:
            logits = self._eager_step()
        self.cache.length += 1
        return logits
