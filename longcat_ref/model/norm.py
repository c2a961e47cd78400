"""RMSNorm, computed in fp32 and cast back before the weight multiply (exactly as transformers does).

    y = w * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)        x32 = x.float()

The multiply by `w` happens in the model dtype, after the cast: in bf16 this ordering is what makes our logits
bit-identical to transformers'. (Under torch.compile these few elementwise ops fuse into one kernel.)

Forms: "plain" (the lines below), "fused" (kernels/rmsnorm.py: one Triton kernel a call, CUDA; equal to within an ulp
of the dtype), "auto" (fused for CUDA tensors outside torch.compile, where inductor fuses the plain ops itself).
"""

import torch
from torch import nn

from ..kernels import support
from ..kernels.rmsnorm import rmsnorm
from .forms import NORM_FORMS


def fused_norm(form: str, x: torch.Tensor) -> bool:
    """Does this call run the kernel? form: a Forms.norm value; x: the input."""
    if form == "plain":
        return False
    if form == "fused":
        return True  # (rmsnorm says in one line what it needs where it cannot run)
    if form != "auto":
        raise ValueError(f"norm form {form!r} is not one of {NORM_FORMS}")
    return x.is_cuda and support.can_run(x) and not torch.compiler.is_compiling()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, form: str = "plain") -> torch.Tensor:
        if fused_norm(form, x):
            return rmsnorm(x, self.weight, self.eps)  # (..., H): the same formula in one kernel
        x32 = x.float()  # fp32 inside: the mean of squares overflows/rounds badly in bf16
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
