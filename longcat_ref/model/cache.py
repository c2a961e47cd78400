"""The latent KV cache of Multi-head Latent Attention.

MLA never caches per-head keys and values. Per token and per attention sublayer it caches one latent vector:

    latent  (kv_lora_rank values)      c = kv_a_layernorm(kv_a(x)[:r]) * s_kv     -> expands to k_nope and v
    k_rope  (qk_rope_head_dim values)  the single rotary key shared by all heads, after RoPE

LongCat-Flash: (512 + 64) x 2 attention sublayers x 28 layers x 2 bytes = 64,512 bytes per token in bf16
(a 64-head MHA with 192+128 dims would need 64 * 320 * 56 * 2 = 2,293,760).

The cache is preallocated for `max_len` tokens (a "static" cache): decoding writes in place, shapes never change,
which is what torch.compile and CUDA graphs need.
"""

from __future__ import annotations

import torch


class LatentCache:
    def __init__(self, n_sublayers: int, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype=torch.float32, device="cpu"):
        self.latent = torch.zeros(n_sublayers, batch, max_len, kv_lora_rank, dtype=dtype, device=device)
        self.k_rope = torch.zeros(n_sublayers, batch, max_len, rope_dim, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # tokens written so far (host-side int; advanced by the model after each forward)

    @classmethod
    def for_model(cls, cfg, batch: int, max_len: int, dtype=torch.float32, device="cpu") -> "LatentCache":
        return cls(cfg.num_attn_sublayers, batch, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype, device)

    @property
    def batch(self) -> int:
        return self.latent.shape[1]

    def nbytes(self) -> int:
        return self.latent.numel() * self.latent.element_size() + self.k_rope.numel() * self.k_rope.element_size()

    def bytes_per_token(self) -> int:
        return self.nbytes() // self.max_len

    def update(self, layer: int, start: int, latent: torch.Tensor, k_rope: torch.Tensor):
        """Write (b, t, r) / (b, t, d) at positions [start, start+t) of sublayer `layer`; return all positions
        [0, start+t) as views (b, s, r), (b, s, d)."""
        end = start + latent.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len {self.max_len}")
        self.latent[layer, :, start:end] = latent
        self.k_rope[layer, :, start:end] = k_rope
        return self.latent[layer, :, :end], self.k_rope[layer, :, :end]
