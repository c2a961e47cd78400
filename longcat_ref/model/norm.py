"""RMSNorm, computed in fp32 and cast back before the weight multiply (exactly as transformers does).

    y = w * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)        x32 = x.float()

The multiply by `w` happens in the model dtype, after the cast: in bf16 this ordering is what makes our logits
bit-identical to transformers'. (Under torch.compile these few elementwise ops fuse into one kernel.)
"""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # fp32 inside: the mean of squares overflows/rounds badly in bf16
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
