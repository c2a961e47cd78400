"""Feed-forward blocks: the dense SwiGLU MLP and a bank of routed SwiGLU experts.

SwiGLU: down(silu(gate(x)) * up(x)). The expert bank stores all experts' weights stacked, as transformers does:

    gate_up_proj  (E, 2I, H)   rows [0, I) are gate_e, rows [I, 2I) are up_e
    down_proj     (E, H, I)

It holds only the *routed* experts (512 in LongCat-Flash): zero-computation experts have no weights, they are
handled by the MoE block (moe.py) as identities. (transformers 5.x allocates gate_up_proj for 768 experts; that is
a bug, see docs in moe.py.)

`forward_loop` is the readable reference: for each expert that received tokens, gather them, run the expert,
scale by the router weight and scatter-add. It costs one host sync per call (`.tolist()` of the per-expert counts)
plus one small kernel group per active expert -- fine for tests and CPU, slow on a GPU at decode time (see
`forward_grouped` in the fast paths).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):  # (..., H) -> (..., H)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    def __init__(self, n_experts: int, hidden: int, inter: int, first_expert: int = 0):
        super().__init__()
        self.first_expert = first_expert  # global id of local expert 0 (expert parallelism shifts it)
        self.inter = inter
        self.gate_up_proj = nn.Parameter(torch.zeros(n_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.zeros(n_experts, hidden, inter))

    @property
    def n_local(self) -> int:
        return self.gate_up_proj.shape[0]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Run local expert e on x (m, H) -> (m, H)."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)  # (m, I) each
        return F.linear(F.silu(gate) * up, self.down_proj[e])  # (m, H)

    def forward(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Add sum_j w[n,j] * expert_{idx[n,j]}(x[n]) into out (n, H), for the experts this module holds.

        x (n, H); w (n, k) fp32; idx (n, k) global expert ids (others -- zero experts, other ranks' -- are skipped).
        """
        return self.forward_loop(x, w, idx, out)

    def forward_loop(self, x, w, idx, out):
        local = idx - self.first_expert  # (n, k) local ids; outside [0, n_local) = not ours
        counts = torch.bincount(local.clamp(-1, self.n_local).flatten() + 1, minlength=self.n_local + 2)
        for e in counts[1:-1].nonzero().flatten().tolist():  # one host sync: the experts that got tokens
            tok, slot = torch.where(local == e)  # (m,), (m,): tokens routed to expert e, and in which slot
            y = self.expert(e, x[tok]) * w[tok, slot, None]  # (m, H): scaled in fp32
            out.index_add_(0, tok, y.to(out.dtype))  # ascending expert order, as transformers
        return out
