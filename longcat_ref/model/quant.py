"""FP8 weights kept in memory: block-scaled e4m3 Linear weights and expert banks, multiplied without dequantizing.

A model loaded with `from_pretrained(dir, fp8="keep")` from an FP8 checkpoint (LongCat-Flash-Chat-FP8) keeps each
quantized weight as it is on disk: W8 (N, K) float8_e4m3fn plus `weight_scale_inv` (ceil(N/128), ceil(K/128))
fp32, one byte per weight instead of two (kernels/fp8_linear.py has the formula). What changes per module:

    nn.Linear            -> FP8Linear: y = x @ dequantize(W8, S)^T + b
    RowParallelLinear    -> the same weight and buffer; its forward calls `linear`, which sees the FP8 weight
    Experts              -> gate_up_proj / down_proj in FP8 with `gate_up_proj_scale_inv` / `down_proj_scale_inv`
                            (gate's block rows stacked over up's, as they are two tensors on disk)

How the product is computed follows where the tensors live, as with SDPA's backends: on a CUDA device the Triton
kernels read the FP8 weights in place (kernels/fp8_linear.py; the experts' fused decode form, kernels/moe_decode.py,
and their grouped prefill form, kernels/grouped_gemm.py);
on the CPU the weight is dequantized for each call (the readable path, equal to a model loaded with
`fp8="dequantize"`: tests/test_fp8.py). The MLA's `kv_b_proj` is dequantized once on load and kept in the model
dtype, as vLLM does: the absorbed form folds it into the query and the output (mla.py), which wants it whole.
Embeddings, lm_head, norms and the router are never FP8 (they are not in the files either).

`quantize_` turns an already built model's weights into this form in memory (synthetic FP8 weights for the
benchmarks, and the tests' comparisons); the checkpoint writer uses the same per-block absmax rule (io/fp8.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import support
from ..kernels.fp8_linear import dequantize, fp8_linear_kernel

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value
NOT_FP8 = ("kv_b_proj",)  # quantized on disk, kept dequantized in memory (see the module docstring)


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype == FP8


KERNEL_MAX_ROWS = 32  # CUDA: up to this many rows the Triton kernel reads FP8 in place; more: dequantize + cuBLAS


def fp8_matmul(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    """x (..., K) @ dequantize(w8 (N, K))^T -> (..., N).

    On CUDA, for up to KERNEL_MAX_ROWS rows (decode, short prompts) the Triton kernel, which reads the FP8 weight
    in place: the product is bound by the weight bytes. For more rows (prefill) it is bound by arithmetic, where
    cuBLAS is the faster GEMM: the weight is dequantized into a temporary (one Triton pass, 1 byte read and 2
    written per weight) and multiplied there -- the reference formula itself. Measured on LongCat-Flash's dense
    projections (one H200, docs/perf-run15/README.md): the kernel wins at 16 rows (o_proj 37.8 vs 81.4 us), the
    dequantized product from 64 rows (o_proj 80.1 vs 124.9 us; 2,048 rows 306 vs 793 us, 674 vs 260 TFLOP/s).
    The kernel's split-K decode tiling covers up to 32 rows, hence the bound. Elsewhere always dequantize +
    matmul."""
    if x.is_cuda and support.have_triton() and x.numel() <= KERNEL_MAX_ROWS * x.shape[-1]:
        return fp8_linear_kernel(x, w8, scale, block)
    return F.linear(x, dequantize(w8, scale, block, x.dtype))


def linear(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
    """x @ m.weight^T (no bias) for a Linear-like module m whose weight is in the model dtype or kept FP8."""
    if is_fp8(m.weight):
        return fp8_matmul(x, m.weight, m.weight_scale_inv, m.fp8_block)
    return F.linear(x, m.weight)


class FP8Linear(nn.Linear):
    """An nn.Linear whose weight is FP8 with block scales (`to_fp8_` makes one from an nn.Linear, in place)."""

    def forward(self, x):  # (..., K) -> (..., N)
        y = linear(x, self)
        return y if self.bias is None else y + self.bias


def scale_shape(rows: int, cols: int, block, split_rows: int | None = None) -> tuple[int, int]:
    """Block-scale grid of a (rows, cols) weight; split_rows: two weights stacked (gate over up)."""
    if split_rows is None:
        return math.ceil(rows / block[0]), math.ceil(cols / block[1])
    return math.ceil(split_rows / block[0]) + math.ceil((rows - split_rows) / block[0]), math.ceil(cols / block[1])


def to_fp8_(m: nn.Module, block) -> nn.Module:
    """Give a Linear-like module (nn.Linear, RowParallelLinear) an FP8 weight and a scale buffer, in place.

    The values are left uninitialised (the loader or `quantize_` fills them); on the meta device nothing is
    allocated. A plain nn.Linear becomes an FP8Linear; subclasses keep their class (their forward calls `linear`).
    """
    w = m.weight
    m.weight = nn.Parameter(torch.empty(w.shape, dtype=FP8, device=w.device), requires_grad=False)
    m.register_buffer("weight_scale_inv", torch.empty(scale_shape(*w.shape, block), device=w.device))
    m.fp8_block = tuple(block)
    if type(m) is nn.Linear:
        m.__class__ = FP8Linear  # adds only a forward: the state is nn.Linear's plus the buffer above
    return m


def fp8_targets(model: nn.Module, names=None) -> list[str]:
    """Names of the Linear-like modules and expert banks that hold FP8 weights in a kept-FP8 model.

    names: the checkpoint's FP8 weights by our names (`<module>.weight`, or the experts' `gate_up_proj` /
    `down_proj`), or None for every quantizable one (attention and FFN projections and the experts). kv_b_proj,
    embeddings, lm_head, norms and routers are never targets.
    """
    from .experts import Experts

    out = []
    for name, m in model.named_modules():
        if isinstance(m, Experts):
            if names is None or f"{name}.gate_up_proj" in names:
                out.append(name)
        elif isinstance(m, nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            if leaf in NOT_FP8 or not (leaf.endswith("_proj") or leaf == "kv_a_proj_with_mqa"):
                continue  # lm_head, kv_b_proj
            if names is None or f"{name}.weight" in names:
                out.append(name)
    return out


def convert_(model: nn.Module, block, names=None) -> list[str]:
    """Turn the FP8 targets of `model` into their FP8 form in place (best on the meta device); returns them."""
    from .experts import Experts

    targets = fp8_targets(model, names)
    for name in targets:
        m = model.get_submodule(name)
        if isinstance(m, Experts):
            m.to_fp8_(block)
        else:
            to_fp8_(m, block)
    return targets


def quantize_blockwise(w: torch.Tensor, block, split_rows: int | None = None):
    """(..., N, K) float -> (FP8 (..., N, K), scales), per-block absmax / 448, on w's device.

    split_rows: quantize rows [0, split) and [split, N) as two weights (gate and up), scales stacked.
    """
    if split_rows is not None:
        a, sa = quantize_blockwise(w[..., :split_rows, :], block)
        b, sb = quantize_blockwise(w[..., split_rows:, :], block)
        return torch.cat([a, b], dim=-2), torch.cat([sa, sb], dim=-2)
    *lead, n, k = w.shape
    bo, bi = block
    nb0, nb1 = math.ceil(n / bo), math.ceil(k / bi)
    padded = w.new_zeros(*lead, nb0 * bo, nb1 * bi, dtype=torch.float32)
    padded[..., :n, :k] = w.float()
    blocks = padded.view(*lead, nb0, bo, nb1, bi)  # (..., nb0, bo, nb1, bi)
    amax = blocks.abs().amax(dim=(-3, -1))  # (..., nb0, nb1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # the dequantization multiplier
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view_as(padded)[..., :n, :k]
    return q.to(FP8).contiguous(), scale.contiguous()


@torch.no_grad()
def quantize_(model: nn.Module, block=(128, 128)) -> list[str]:
    """Quantize an already built model's FP8 targets in memory (synthetic FP8 weights); returns their names.

    Each target's weight is replaced by its blockwise FP8 value and scales, exactly as the checkpoint writer would
    store it; kv_b_proj stays as it is (it would be dequantized on load).
    """
    from .experts import Experts

    targets = fp8_targets(model)
    for name in targets:
        m = model.get_submodule(name)
        if isinstance(m, Experts):
            gu = quantize_blockwise(m.gate_up_proj.data, block, split_rows=m.inter)
            d = quantize_blockwise(m.down_proj.data, block)
            m.to_fp8_(block)
            (m.gate_up_proj.data, m.gate_up_proj_scale_inv), (m.down_proj.data, m.down_proj_scale_inv) = gu, d
        else:
            w8, s = quantize_blockwise(m.weight.data, block)
            to_fp8_(m, block)
            m.weight.data, m.weight_scale_inv = w8, s
    return targets


def fp8_bytes(model: nn.Module) -> int:
    """Bytes held in FP8 weights and their scales."""
    return sum(t.numel() * t.element_size() for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if is_fp8(t) or n.endswith("_scale_inv"))
