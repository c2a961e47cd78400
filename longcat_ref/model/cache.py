"""The latent KV cache of Multi-head Latent Attention, in two forms: one that grows, one that is preallocated.

MLA never caches per-head keys and values. Per token and per attention sublayer it caches one latent vector:

    latent  (kv_lora_rank values)      c = kv_a_layernorm(kv_a(x)[:r]) * s_kv     -> expands to k_nope and v
    k_rope  (qk_rope_head_dim values)  the single rotary key shared by all heads, after RoPE

LongCat-Flash: (512 + 64) x 2 attention sublayers x 28 layers x 2 bytes = 64,512 bytes per token in bf16
(a 64-head MHA with 192+128 dims would need 64 * 320 * 56 * 2 = 2,293,760).

Both caches have the same interface, used by `MLA.forward` and `CausalLM.forward`:

    cache.update(layer, latent, k_rope, cache_position)  write this chunk's t tokens at slots cache_position (t,);
                                                          return every key slot of `layer`: (b, S, r), (b, S, rope)
    cache.key_length(t)                                   S, the number of key slots attention reads
    cache.next_positions(t, device)                       the slots a forward writes when the caller names none

* `DynamicCache` (teaching; the default of generate()): grows by concatenation, S = tokens so far. Shapes change
  every step, which is what makes it easy to read and impossible to capture.
* `StaticCache` (speed): preallocated for `max_len` slots. A forward writes in place (`index_copy_` at the device
  tensor `cache_position`) and attention always reads all S = max_len slots; slots not yet written (and padding)
  are masked out by the caller's mask. Shapes never change, so the same forward can be captured as a CUDA graph
  and compiled once (gpt-fast's KVCache works the same way). The sublayers' slots are one (n, b, max_len, ...)
  tensor, but each write goes through that sublayer's own view, made once at construction: torch.compile then
  writes the token in place. Indexing the stacked tensor inside the compiled step (`latent[layer].index_copy_`)
  made inductor copy the sublayers' whole caches on every step (measured on one H200, GLM-4.7-Flash: ~0.2 ms of a
  batch-1 step, 3.9 ms of a batch-32 one; tests/test_fast.py checks that the compiled write is in place).
"""

from __future__ import annotations

import torch


class DynamicCache:
    """Per attention sublayer, the latents of every token so far, concatenated along the sequence."""

    def __init__(self, n_sublayers: int):
        self.latent: list[torch.Tensor | None] = [None] * n_sublayers  # each (b, s, r)
        self.k_rope: list[torch.Tensor | None] = [None] * n_sublayers  # each (b, s, rope)

    @classmethod
    def for_model(cls, cfg) -> "DynamicCache":
        return cls(cfg.num_attn_sublayers)

    @property
    def length(self) -> int:
        """Tokens written so far (read off the shapes: nothing to keep in sync)."""
        return 0 if self.latent[0] is None else self.latent[0].shape[1]

    def key_length(self, t: int) -> int:
        return self.length + t

    def next_positions(self, t: int, device) -> torch.Tensor:
        return torch.arange(self.length, self.length + t, device=device)  # (t,)

    def update(self, layer: int, latent: torch.Tensor, k_rope: torch.Tensor, cache_position=None):
        """Append (b, t, r) / (b, t, rope) (cache_position must be the next t slots); return (b, s, r), (b, s, rope)."""
        if self.latent[layer] is not None:
            latent = torch.cat([self.latent[layer], latent], dim=1)  # (b, s, r)
            k_rope = torch.cat([self.k_rope[layer], k_rope], dim=1)  # (b, s, rope)
        self.latent[layer], self.k_rope[layer] = latent, k_rope
        return latent, k_rope

    def crop(self, n: int) -> "DynamicCache":
        """Keep the first n tokens (speculative decoding's roll-back; a chat turn that re-renders differently after n shared tokens); -> self."""
        if n <= 0:
            self.latent, self.k_rope = [None] * len(self.latent), [None] * len(self.k_rope)
        elif n < self.length:
            self.latent = [t[:, :n] for t in self.latent]
            self.k_rope = [t[:, :n] for t in self.k_rope]
        return self

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.latent + self.k_rope if t is not None)


class StaticCache:
    """Preallocated latents for `max_len` slots; writes at device-tensor positions, reads every slot."""

    def __init__(self, n_sublayers: int, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype=torch.float32, device="cpu"):
        self.latent = torch.zeros(n_sublayers, batch, max_len, kv_lora_rank, dtype=dtype, device=device)
        self.k_rope = torch.zeros(n_sublayers, batch, max_len, rope_dim, dtype=dtype, device=device)
        self.max_len = max_len
        self.latent_layers = self.latent.unbind(0)  # per sublayer (b, max_len, r): views, written in place
        self.k_rope_layers = self.k_rope.unbind(0)  # per sublayer (b, max_len, rope)
        # Host-side count of tokens written, advanced by CausalLM.forward only when it chose the slots itself
        # (cache_position=None: the teaching use). A caller that passes cache_position (generate's fixed-shape
        # decode step) keeps its own device-side position and never reads this.
        self.length = 0

    @classmethod
    def for_model(cls, cfg, batch: int, max_len: int, dtype=torch.float32, device="cpu") -> "StaticCache":
        return cls(cfg.num_attn_sublayers, batch, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype, device)

    @property
    def batch(self) -> int:
        return self.latent.shape[1]

    def key_length(self, t: int) -> int:
        return self.max_len

    def next_positions(self, t: int, device) -> torch.Tensor:
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length + t} tokens > max_len {self.max_len}")
        return torch.arange(self.length, self.length + t, device=device)  # (t,)

    def slots(self, layer: int):
        """One sublayer's cache, every slot: (b, max_len, r), (b, max_len, rope) views, to be written in place."""
        return self.latent_layers[layer], self.k_rope_layers[layer]

    def update(self, layer: int, latent: torch.Tensor, k_rope: torch.Tensor, cache_position: torch.Tensor):
        """Write (b, t, r) / (b, t, rope) at slots cache_position (t,); return all slots (b, max_len, r|rope)."""
        lat, rope = self.slots(layer)  # (b, max_len, r), (b, max_len, rope)
        lat.index_copy_(1, cache_position, latent)  # in place: no new shapes, no host sync
        rope.index_copy_(1, cache_position, k_rope)
        return lat, rope

    def nbytes(self) -> int:
        return self.latent.numel() * self.latent.element_size() + self.k_rope.numel() * self.k_rope.element_size()

    def bytes_per_token(self) -> int:
        return self.nbytes() // self.max_len
