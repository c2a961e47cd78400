"""The MoE block: router + routed experts + zero-computation experts (LongCat) or shared experts (GLM).

    moe(x) = sum_{j<k} w_j * E_{idx_j}(x)        E_e = SwiGLU expert       if e <  n_routed
                                                 E_e(x) = x  (identity)    if e >= n_routed ("zero-computation")
           + shared(x)                           GLM only; not weighted

Zero-computation experts are LongCat-Flash's dynamic computation: a token whose top-12 includes z zero experts
runs only 12 - z real FFNs. Their identity output is scaled by the router weight (times routed_scaling_factor)
like any other expert, as transformers, vLLM and Meituan's code do.

Note on transformers 5.x: its LongcatFlashExperts sizes `gate_up_proj` for routed + zero experts (768 rows) while
the checkpoint holds 512; the forward never reads the extra rows. We allocate only the 512 real experts.
"""

from __future__ import annotations

import torch
from torch import nn

from .experts import Experts, SwiGLU
from .router import Router


def add_identity_experts(x, w, idx, first_zero: int, out):
    """out[n] += sum over slots j with idx[n,j] >= first_zero of w[n,j] * x[n] (zero experts, ascending id)."""
    zero = idx - first_zero  # (n, k): >= 0 for zero experts
    for e in torch.unique(zero[zero >= 0]).tolist():  # one host sync; ascending ids, as transformers
        tok, slot = torch.where(zero == e)
        out.index_add_(0, tok, (x[tok] * w[tok, slot, None]).to(out.dtype))
    return out


def add_identity_experts_vectorised(x, w, idx, first_zero: int, out):
    """The same sum with no host sync (fast path): out += x * (sum of the zero experts' weights), in fp32."""
    wz = torch.where(idx >= first_zero, w, 0.0).sum(-1, keepdim=True)  # (n, 1) fp32
    return out.add_((x * wz).to(out.dtype))


class MoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_routed = cfg.n_routed_experts
        self.router = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.expert_ffn_hidden_size)
        self.add_zero_experts = cfg.zero_expert_num > 0  # a parallel shard sets False on all ranks but one
        self.shared_experts = (SwiGLU(cfg.hidden_size, cfg.expert_ffn_hidden_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self.last_idx = None  # (n, k) expert ids of the last eager call, for statistics (demo, notebooks)

    def forward(self, x: torch.Tensor, experts: str = "loop", router: str = "plain", linear: str = "plain"):
        return self.finish(self.start(x, experts, router, linear))

    def start(self, x: torch.Tensor, experts: str = "loop", router: str = "plain", linear: str = "plain"):
        """Begin the MoE: x (b, t, H) -> what `finish` turns into the output. LongCat's layer calls `start` right
        after attention 0 and `finish` only where the shortcut is added, so a parallel MoE's reduction (whose
        `start` returns it in flight) overlaps the dense sublayers in between."""
        return self.compute(x, experts, router, linear)

    def finish(self, pending) -> torch.Tensor:
        return pending  # (b, t, H): here the output itself (a parallel MoE waits for its reduction here)

    def compute(self, x: torch.Tensor, experts: str = "loop", router: str = "plain", linear: str = "plain"):
        """x (b, t, H) -> this module's MoE output (b, t, H). experts: the Experts form ("loop" is the reference;
        any other form also sums the zero experts vectorised, with no host sync); router: the Router form;
        linear: the Linear form of the router's logits and of the shared experts."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (n, H), n = b*t
        w, idx = self.router(flat, router, linear)  # (n, k) fp32, (n, k)
        if not torch.compiler.is_compiling() and not _capturing(x):
            self.last_idx = idx
        out = torch.zeros_like(flat)  # (n, H)
        impl = self.experts.choose(flat, idx) if experts == "auto" else experts
        fold = impl == "fused" and self.experts.can_fold(self.shared_experts)  # the shared expert in the kernels
        self.experts(flat, w, idx, out, impl=impl, shared=self.shared_experts if fold else None)  # real experts
        if self.add_zero_experts:
            add = add_identity_experts if experts == "loop" else add_identity_experts_vectorised
            add(flat, w, idx, self.n_routed, out)  # zero-computation experts
        out = out.view(shape)  # (b, t, H)
        if self.shared_experts is not None and not fold:
            out = out + self.shared_experts(x, linear)
        return out


def _capturing(x) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()
