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
* "triton": the same sum in our Triton kernel (kernels/gemv.py: a split-K GEMV whose tile follows the weight's
  layout, ~4 K fp32 products per chunk), on CUDA for up to TRITON_MAX_TOKENS tokens, plain otherwise. Opaque to
  torch.compile: what inductor fused into the gemv form's reduction (a norm before, an add after) runs beside it.
  Opt-in only: measured slower than the gemv form (one H200, 2026-12-02: GLM-4.7-Flash's compiled batch-1 step
  4.916 against 4.428 ms; kernels/gemv.py's docstring has the numbers).
* "skinny": the product on tensor cores in our split-K kernel (kernels/skinny_gemm.py: the weight's rows as the
  MMA's wide side, the few tokens as its narrow one), on CUDA for up to SKINNY_MAX_TOKENS (64) tokens, plain
  otherwise: for a decode *batch*. It returns fp32 partial sums per split, summed and rounded here in PyTorch.
  Opt-in only. Alone, at 32 tokens, in a CUDA graph, it beats cuBLAS on most of GLM-4.7-Flash's projections (one
  H200, 2026-12-04, docs/perf-run16/: q_a 3.8 vs 5.8 us, kv_a 3.4 vs 5.6, o_proj 10.1 vs 11.4, the router's fp32
  logits 2.65 vs 13.4). In the compiled batch-32 step the sums of the partials run as separate reductions where
  the consumer is an opaque op, and the step was not measurably faster: 16.93 vs 17.01 ms, in the same run.
* "prefetch": "auto", except that a projection of up to 4 tokens whose rows fit one tile (K <= 8192, the weight
  in x's dtype) runs in kernels/prefetch_gemv.py on CUDA: each program loads its whole rows of W before its
  programmatic-dependent-launch wait, so the weight read overlaps the previous kernel; in MLA (model/mla.py)
  q_a and kv_a run as one launch, and q_b takes q_a's RMSNorm into its kernel. Everywhere the kernel fits (also
  eagerly, and in Triton's CPU interpreter); "auto" takes it in the compiled decode step on sm_90+ GPUs.
* "auto": gemv for up to GEMV_MAX_TOKENS tokens while torch.compile traces and for weights of at most
  GEMV_MAX_WEIGHT elements, plain otherwise; where it would be gemv on a GPU with programmatic dependent launch
  (sm_90+), "prefetch"'s kernel instead, for the weights it fits (`takes_prefetch`). Why (one H100, 2026-12-07,
  docs/perf-run21/): GLM-4.7-Flash's compiled batch-1 step 3.744 -> 3.453 ms (577 kernels, was 623), its
  generate() 128 + 128 tokens 273 tok/s end to end. Why the size cap (one H200, 2026-12-02, docs/perf-run7/): every
  GLM-4.7-Flash projection is below it (at most 10.5M elements), and gemv made its compiled batch-1 step 6.47 ->
  5.46 ms; a LongCat-Flash layer with *every* projection as gemv got slower (0.807 -> 0.836 ms), its 12288 x 6144
  dense down projection taking 72 us as a reduction against ~31 us in cuBLAS, which is near the bandwidth for a
  weight that large. (The LongCat layer with this cap -- small ones gemv, large ones cuBLAS -- was not timed.)

Only a plain `nn.Linear` (exactly that class) takes the gemv form, and the triton and skinny forms only with its
weight in x's dtype; any subclass runs its own forward. The fp32 sum rounds once to the model dtype, like cuBLAS's fp32
accumulation (the order of the sum differs, so bf16 results may differ in the last bit). tests/test_fast.py and
tests/test_kernel_gemv.py and tests/test_kernel_skinny.py prove the forms equal.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import support
from ..kernels import prefetch_gemv as _prefetch
from ..kernels.gemv import gemv as triton_gemv
from ..kernels.skinny_gemm import MAX_TOKENS as SKINNY_MAX_TOKENS
from ..kernels.skinny_gemm import skinny_gemm

GEMV_MAX_TOKENS = 4  # "auto": the gemv form for up to this many tokens (decode, a short speculative verify)
GEMV_MAX_WEIGHT = 16 * 2**20  # "auto": ... and weights of up to this many elements (32 MiB in bf16)
TRITON_MAX_TOKENS = 16  # "triton": the kernel for up to this many tokens (its token tile is a power of two)


def resolve(form: str, x: torch.Tensor, weight_numel: int) -> str:
    """The form one product runs in, for input x (..., K) and a weight of weight_numel elements: "auto" -> "gemv"
    or "plain"; "triton" / "skinny" -> themselves where the kernel can run (kernels/support.py) for up to
    TRITON_MAX_TOKENS / SKINNY_MAX_TOKENS tokens, else "plain"; "prefetch" as "auto" (its kernel is taken by
    `linear` itself, for an nn.Linear it fits); the others unchanged."""
    if form == "prefetch":
        form = "auto"
    if form not in ("auto", "triton", "skinny"):
        return form  # "plain", "gemv": no look at x (the plain path dispatches no extra op)
    tokens = x[..., 0].numel()
    if form == "auto":
        few = tokens <= GEMV_MAX_TOKENS and weight_numel <= GEMV_MAX_WEIGHT
        return "gemv" if torch.compiler.is_compiling() and few else "plain"
    if form == "triton":
        return "triton" if support.can_run(x) and tokens <= TRITON_MAX_TOKENS else "plain"
    return "skinny" if support.can_run(x) and tokens <= SKINNY_MAX_TOKENS else "plain"


def takes_prefetch(form: str, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Does the product of x (..., K) by weight run in kernels/prefetch_gemv.py? "prefetch": wherever the kernel
    fits (`fits`: CUDA or Triton's interpreter, <= 4 tokens, K <= 8192, the weight in x's dtype); "auto": where
    it fits and "auto" would be the gemv form (torch.compile tracing, <= GEMV_MAX_TOKENS tokens, <= GEMV_MAX_WEIGHT
    elements), on a GPU with programmatic dependent launch (sm_90+: the kernel's point is loading its weight
    before the wait). Static facts only, so a compiled step never changes form."""
    if form not in ("prefetch", "auto") or not _prefetch.fits(x, weight):
        return False
    return form == "prefetch" or (resolve("auto", x, weight.numel()) == "gemv" and support.pdl(x))


def gemv(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """The "gemv" form of x W^T (+ b): x (..., K), W (N, K) -> (..., N) in x.dtype, products and sum in fp32."""
    y = (x.float()[..., None, :] * weight.float()).sum(-1)  # (..., N): fp32 products and sum
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)  # (..., N), rounded once


def linear(m: nn.Module, x: torch.Tensor, form: str = "plain") -> torch.Tensor:
    """m(x) in the given form: x (..., K) -> (..., N)."""
    if type(m) is nn.Linear:
        if takes_prefetch(form, x, m.weight) and (m.bias is None or m.bias.dtype == x.dtype):
            return _prefetch.prefetch_gemv(x, m.weight, m.bias)  # (..., N)
        f = resolve(form, x, m.weight.numel())
        if f == "gemv":
            return gemv(x, m.weight, m.bias)  # (..., N)
        if f == "triton" and m.weight.dtype == x.dtype:
            return triton_gemv(x, m.weight, m.bias)  # (..., N)
        if f == "skinny" and m.weight.dtype == x.dtype:
            return skinny_gemm(x, m.weight, m.bias)  # (..., N)
    return m(x)  # (..., N)
