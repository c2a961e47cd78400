"""RMSNorm in one kernel: a prefill's norms without the five fp32 passes over memory that the plain ops make.

The plain form (model/norm.py) is, per row x of H values,

    x32 = x.float();  y = x32 * rsqrt(mean(x32^2) + eps);  out = w * y.to(x.dtype)          (w in x's dtype)

and eagerly each step is its own kernel (the fp32 copy, the square, the mean, the scale, the cast back, the weight
product), each reading and writing the whole activation: for LongCat-Flash's 2k-token prefill (2,048 x 6,144 rows,
five such norms a layer, fp32 temporaries of 50 MB each) about 0.8 ms of the layer's 16 ms. Under torch.compile
inductor fuses them into one kernel; a captured prefill (generate's prefill_graph) runs eagerly, so it pays them.

The tiling: one program per row. The row (H <= a few thousand values: 6,144 for LongCat, 2,048 for GLM, 1,536 and
512 for MLA's low-rank norms) is one block of BLOCK = next power of two >= H fp32 values in registers, so the row is
read once and written once; the mean of squares is one in-register reduction (`tl.sum`). The rounding follows the
plain form step for step: y rounded to x's dtype, then the product with w (in x's dtype) computed in fp32 and rounded
once. Only the order of the reduction's sum (and rsqrt's last bit) differs from torch's, so the results agree to
within an ulp of x's dtype (tests/test_kernel_rmsnorm.py), not bit for bit.
"""

from __future__ import annotations

import torch

from . import support

WHAT = "the RMSNorm kernel"


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The plain form (model/norm.py's formula), the kernel's definition: x (..., H), weight (H,)."""
    x32 = x.float()  # fp32 inside
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


if support.have_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, o_ptr, H, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)  # (BLOCK,)
        ok = cols < H
        x = tl.load(x_ptr + row * H + cols, mask=ok, other=0.0)  # (BLOCK,) in x's dtype
        x32 = x.to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / H + eps)  # scalar: rsqrt(mean(x^2) + eps), fp32
        y = (x32 * r).to(x.dtype).to(tl.float32)  # (BLOCK,) rounded to x's dtype, as the plain form
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)  # (BLOCK,)
        tl.store(o_ptr + row * H + cols, (w * y).to(o_ptr.dtype.element_ty), mask=ok)


@torch.library.custom_op("longcat_ref::rmsnorm", mutates_args=())
def _rmsnorm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    H = x.shape[-1]
    out = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
    rows = x.numel() // H if H else 0
    if rows:
        block = max(16, triton.next_power_of_2(H))
        _rmsnorm_kernel[(rows,)](x, weight, out, H, float(eps), BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return out


@_rmsnorm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The kernel form of `rmsnorm_reference`: x (..., H) (any layout: made contiguous), weight (H,)."""
    support.require(x, WHAT)
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rmsnorm: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not agree: want (..., H) "
                         "and (H,)")
    return torch.ops.longcat_ref.rmsnorm(x.contiguous(), weight.contiguous(), float(eps))
