"""Top-k expert routers. One module serves both models; `cfg.router_type` picks the scoring function.

LongCat-Flash ("softmax"): a softmax over routed + zero-computation experts (512 + 256 = 768 wide)

    p   = softmax(x W^T)                      fp32, over all 768 experts
    idx = topk(p + b, k)                      the correction bias b only changes *which* experts win
    w   = p[idx] * routed_scaling_factor      weights are the unbiased probabilities (no renormalisation)

GLM-4.7-Flash / DeepSeek-V3 ("sigmoid", aux-loss-free "noaux_tc"):

    s     = sigmoid(x W^T)                    fp32, independent per expert
    group = sum of the top-2 of (s + b) in each of n_group groups; keep the best topk_group groups
    idx   = topk((s + b) masked to the kept groups, k)
    w     = s[idx] (/ sum if norm_topk_prob) * routed_scaling_factor

Everything here is fp32 (the router is where tiny differences flip an expert choice): the hidden state and the
weight are upcast before the matmul, exactly as transformers does. On a GPU with a 16-bit model, the logits' "auto"
form gets the same numbers without the upcast copies: a 16-bit x 16-bit product is exact in fp32, so
`torch.mm(x, W^T, out_dtype=torch.float32)` (cuBLAS on tensor cores, fp32 accumulation, W read in place) differs
from the fp32 GEMM only in the order of the fp32 sum. Measured on one H200 (2026-12-04, docs/perf-run15/): the
fp32 GEMM of LongCat-Flash's 2k-token prefill was 0.39 ms a layer, an fp32 CUDA-core GEMM plus a copy of W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import support
from ..kernels.router import logits_fit, route, route_logits
from ..kernels.skinny_gemm import skinny_gemm
from .linear import gemv, resolve

FUSED_MAX_TOKENS = 64  # "auto" routes up to this many tokens in the kernel (one program per token)
# ... and only for up to this many router experts. Measured on one H200 (2026-12-02, docs/perf-run7/), compiled
# batch-1 steps: GLM-4.7-Flash (64 experts) 6.706 -> 6.471 ms with the kernel; a LongCat-Flash layer (768 = 512 +
# 256 zero experts: one program walks a 1,024-wide row 12 times) 0.789 -> 0.807 ms, so LongCat keeps torch.topk.
FUSED_MAX_EXPERTS = 256
HAVE_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")  # torch.mm(..., out_dtype=...): CUDA, torch >= 2.8


class Router(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_experts = cfg.num_router_experts  # routed + zero experts
        self.top_k = cfg.moe_topk
        self.kind = cfg.router_type
        self.scaling = cfg.routed_scaling_factor
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(self.n_experts, cfg.hidden_size))
        # Selection-only bias (aux-loss-free load balancing). Kept in fp32; LongCat's loader rounds it through the
        # model dtype, as transformers does, to stay bit-identical.
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def logits(self, x: torch.Tensor, linear: str = "plain") -> torch.Tensor:
        """x (n, H) -> fp32 logits x W^T (n, E); linear: the Linear form of model/linear.py (under torch.compile
        "gemv" is one reduction kernel that reads W in its own dtype, where "plain" first copies W to fp32; "auto"
        where it resolves to "plain", on CUDA with 16-bit x and W: the 16-bit product with fp32 output, above)."""
        f = resolve(linear, x, self.weight.numel())
        if (f == "plain" and linear in ("auto", "prefetch") and x.is_cuda and HAVE_MM_OUT_DTYPE
                and x.dtype == self.weight.dtype and x.dtype in (torch.bfloat16, torch.float16)):
            return torch.mm(x, self.weight.t(), out_dtype=torch.float32)  # (n, E) fp32: exact products, fp32 sum
        if f in ("gemv", "triton"):  # "triton" too: tiny fp32 logits
            return gemv(x.float(), self.weight)  # (n, E) fp32
        if f == "skinny":  # the kernel's fp32 sum; bf16 x bf16 products are exact in fp32, as in x.float() @ W.float()
            same = x.dtype == self.weight.dtype
            return skinny_gemm(x if same else x.float(), self.weight if same else self.weight.float(),
                               out_dtype=torch.float32)  # (n, E) fp32
        return F.linear(x.float(), self.weight.float())  # (n, E) fp32

    def scores(self, x: torch.Tensor, linear: str = "plain") -> torch.Tensor:
        """x (n, H) -> fp32 scores (n, E): softmax probabilities or sigmoid gates."""
        logits = self.logits(x, linear)  # (n, E) fp32
        return logits.softmax(dim=-1) if self.kind == "softmax" else logits.sigmoid()

    def select(self, s: torch.Tensor) -> torch.Tensor:
        """scores (n, E) fp32 -> chosen expert ids (n, k). The bias enters here and only here."""
        choice = s + self.e_score_correction_bias.float()  # (n, E)
        if self.n_group > 1:
            n = choice.shape[0]
            grouped = choice.view(n, self.n_group, -1)  # (n, g, E/g)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)  # (n, g): sum of each group's top-2
            keep = group_score.topk(self.topk_group, dim=-1, sorted=False).indices  # (n, topk_group)
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)  # (n, g)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(n, -1)  # masked groups lose
        return choice.topk(self.top_k, dim=-1, sorted=False).indices  # (n, k)

    def forward(self, x: torch.Tensor, form: str = "plain", linear: str = "plain"):
        """x (n, H) -> weights (n, k) fp32, expert ids (n, k) int64; linear: the logits' Linear form.

        form: "plain" (below) | "fused": the selection after the matmul in one Triton kernel (kernels/router.py),
        where it can run and for ungrouped routing; the same experts and weights, listed best first |
        "fused_logits": "fused" with the logits in the same kernel (`route_logits`: the weight loaded before the
        dependent-launch wait, the last program selects) where it fits (up to 4 tokens, the weight in x's dtype),
        else "fused"; opt-in: measured slower in GLM-4.7-Flash's compiled batch-1 step (one H100, 2026-12-07,
        docs/perf-run22/: 3.44 -> 3.49 ms, 46 launches fewer; the kernel 4.7 us a layer on the critical path) |
        "auto": fused for up to FUSED_MAX_TOKENS tokens and FUSED_MAX_EXPERTS experts on CUDA (GLM's decode), else
        plain."""
        if form == "auto":
            few = x.shape[0] <= FUSED_MAX_TOKENS and self.n_experts <= FUSED_MAX_EXPERTS
            form = "fused" if x.is_cuda and few else "plain"
        if form == "fused_logits":
            if self.n_group == 1 and logits_fit(x, self.weight):  # the logits and the selection in one kernel
                return route_logits(x, self.weight, self.e_score_correction_bias, self.top_k, self.kind == "softmax",
                                    self.norm_topk_prob, self.scaling)
            form = "fused"
        if form == "fused" and self.n_group == 1 and support.can_run(x):
            logits = self.logits(x, linear)  # (n, E) fp32
            return route(logits, self.e_score_correction_bias, self.top_k, self.kind == "softmax",
                         self.norm_topk_prob, self.scaling)
        s = self.scores(x, linear)  # (n, E) fp32
        with torch.no_grad():
            idx = self.select(s)  # (n, k)
        w = s.gather(1, idx)  # (n, k): unbiased scores of the winners
        if self.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.scaling, idx
