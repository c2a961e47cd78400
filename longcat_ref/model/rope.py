"""Rotary position embeddings (RoPE), with DeepSeek's interleaved pair layout.

Only the `qk_rope_head_dim` slice of each query/key head is rotated (64 dims in both real models); the other
`qk_nope_head_dim` dims carry no position. Angles: inv_freq[i] = theta^(-2i/d) for i < d/2, computed in fp32
(theta = 1e7 for LongCat-Flash, 1e6 for GLM-4.7-Flash); cos/sin are then cast to the model dtype.

Interleaved layout: the checkpoint's rope dims are pairs (x0, x1), (x2, x3), ... each rotated by one angle.
`apply_rope_interleaved` rotates them and returns them *de-interleaved*: [rotated evens | rotated odds]. That is a
fixed permutation applied to both q and k, so q.k is unchanged -- and it is the layout the KV cache stores (same
as transformers).
"""

import torch


def inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    """(dim/2,) fp32 inverse frequencies, computed exactly as transformers does."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def rope_cos_sin(position_ids: torch.Tensor, dim: int, theta: float, dtype: torch.dtype):
    """position_ids (b, t) -> cos, sin (b, t, dim) in `dtype` (angles in fp32)."""
    freqs = position_ids[..., None].float() * inv_freq(dim, theta, position_ids.device)  # (b, t, dim/2) fp32
    emb = torch.cat((freqs, freqs), dim=-1)  # (b, t, dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, h, t, d) with interleaved pairs; cos/sin (b, t, d). Returns (b, h, t, d) de-interleaved."""
    half = x.shape[-1] // 2
    c = cos[..., :half].unsqueeze(1)  # (b, 1, t, d/2): one angle per pair
    s = sin[..., :half].unsqueeze(1)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (b, h, t, d/2) each: first and second element of each pair
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)  # (b, h, t, d)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The non-interleaved (GPT-NeoX) layout: pairs are (x_i, x_{i+d/2}). x (b, h, t, d); cos/sin (b, t, d)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def apply_rope(x, cos, sin, interleaved: bool = True):
    return apply_rope_interleaved(x, cos, sin) if interleaved else apply_rope_half(x, cos, sin)
