"""How one dense projection runs: `linear(m, x, form)`, called by the forward for every per-layer nn.Linear.

    y = x W^T (+ b)        x (..., K), W (N, K)

Two forms of the same product, chosen per call (`CausalLM.forward(..., forms=Forms(linear=...))`):

* "plain": `m(x)`. cuBLAS on a GPU; a module with its own forward (kept FP8 weights, a row-parallel shard with its
  all_reduce) runs that forward.
* "gemv": the product written as multiply-and-sum, in fp32:  y[..., n] = sum_k x[..., k] W[n, k]. Eagerly that
  is the worst form (it materialises x * W), so it is only for torch.compile, where inductor turns it into ONE
  reduction kernel that reads W once, in place, and takes the elementwise work around it (the RMSNorm before,
  SiLU * up or the residual add after) into the same kernel. At batch 1 on a GPU a cuBLAS GEMV of a 1-20 MB
  weight is bound by launch and tail effects rather than by bandwidth (GLM-4.7-Flash runs nine per layer); this
  is the same trick as the experts' "gemv" form (experts.py).
* "auto": gemv for up to GEMV_MAX_TOKENS tokens while torch.compile traces, plain otherwise.

Only a plain `nn.Linear` (exactly that class, weight in the model dtype) takes the gemv form; any subclass runs its
own forward. The fp32 sum rounds once to the model dtype, like cuBLAS's fp32 accumulation (the order of the sum
differs, so bf16 results may differ in the last bit). tests/test_fast.py proves the forms equal.
"""

from __future__ import annotations

import torch
from torch import nn

GEMV_MAX_TOKENS = 4  # "auto": the gemv form for up to this many tokens (decode, a short speculative verify)


def resolve(form: str, x: torch.Tensor) -> str:
    """"auto" -> "gemv" or "plain" for input x (..., K); other forms unchanged."""
    if form == "auto":
        return "gemv" if torch.compiler.is_compiling() and x[..., 0].numel() <= GEMV_MAX_TOKENS else "plain"
    return form


def linear(m: nn.Module, x: torch.Tensor, form: str = "plain") -> torch.Tensor:
    """m(x) in the given form: x (..., K) -> (..., N)."""
    if resolve(form, x) == "gemv" and type(m) is nn.Linear:
        y = (x.float()[..., None, :] * m.weight.float()).sum(-1)  # (..., N): fp32 products and sum
        if m.bias is not None:
            y = y + m.bias.float()
        return y.to(x.dtype)  # (..., N), rounded once
    return m(x)  # (..., N)
