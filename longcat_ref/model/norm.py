"""RMSNorm, computed in fp32 and cast back before the weight multiply (exactly as transformers does).

    y = w * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)        x32 = x.float()

The multiply by `w` happens in the model dtype, after the cast: in bf16 this ordering is what makes our logits
bit-identical to transformers'.

`fused=True` (fast path) computes the same normalisation with `F.rms_norm` (one kernel on the GPU instead of
six); tests/test_fast.py proves it equal to the spelled-out form.
"""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:  # fast path: same math, fp32 inside, weight multiply after the cast
            return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        x32 = x.float()  # fp32 inside: the mean of squares overflows/rounds badly in bf16
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
