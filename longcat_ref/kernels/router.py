"""The router's selection for a few decode tokens in one Triton kernel: scores, biased top-k, weights.

What is computed (model/router.py, `Router.forward` after its fp32 matmul), for each token's logits row l (E,):

    softmax router (LongCat-Flash):  p = softmax(l)          sigmoid router (GLM-4.7-Flash):  p = sigmoid(l)
    idx = top-k of (p + b)           the correction bias b only decides which experts win
    w   = p[idx]  (/ sum if norm_topk_prob)  * routed_scaling_factor

Why a kernel. Eagerly (and still under torch.compile, which cannot fuse a top-k into its neighbours) this is a
softmax or sigmoid, an add, a top-k (one or two kernels of its own), a gather, a sum and a divide: five to eight
launches per MoE layer for a few hundred numbers per token. At batch 1 each launch costs more than its work, so the
router is a good share of a decode step's kernels (GLM-4.7-Flash: 46 MoE layers).

The tiling. One program per token holds its whole row in registers (E = 768 for LongCat-Flash, padded to a power of
two, 1024; 64 for GLM-4.7-Flash) and picks the k winners one at a time:

    for j in 0..k-1:   i_j = argmax(choice);  w_j = p[i_j];  choice[i_j] = -inf         k = 12 (LongCat), 4 (GLM)

k passes over a row of at most 1024 values, all on chip (the winners gather in a (k,) register vector, normalised at
the end): nothing is written but the (k,) ids and weights. The
winners come out in descending order of p + b (ties: the lower id first), as `torch.topk(..., sorted=True)`; the
plain router asks torch.topk for no order, so the two may list the same experts in another order (the MoE sum is
the same up to fp32 rounding).

Only the plain, ungrouped selection (n_group = 1, as both models use) has a kernel; `Router` keeps its own code for
group-limited routing. `route_reference` is the same selection in plain PyTorch, the definition the kernel is tested
equal to (tests/test_kernel_router.py).
"""

from __future__ import annotations

import torch

from . import support

WHAT = "the router kernel"

if support.have_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _route_kernel(logits_ptr, bias_ptr, w_ptr, idx_ptr, E, scaling, SOFTMAX: tl.constexpr, NORM: tl.constexpr,
                      K: tl.constexpr, KP: tl.constexpr, BLOCK_E: tl.constexpr, PDL: tl.constexpr = False):
        if PDL:  # programmatic dependent launch (support.pdl): wait for the previous kernel, let the next one start
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, BLOCK_E)  # (BLOCK_E,) expert ids, padded to a power of two
        ok = e < E
        lg = tl.load(logits_ptr + row * E + e, mask=ok, other=-float("inf"))  # (BLOCK_E,) fp32 logits
        if SOFTMAX:
            z = tl.exp(lg - tl.max(lg, axis=0))  # (BLOCK_E,): padding -> exp(-inf) = 0
            p = z / tl.sum(z, axis=0)
        else:
            p = tl.sigmoid(lg)
        bias = tl.load(bias_ptr + e, mask=ok, other=0.0).to(tl.float32)  # (BLOCK_E,) in its own dtype, used in fp32
        choice = tl.where(ok, p + bias, -float("inf"))  # (BLOCK_E,)
        jj = tl.arange(0, KP)  # (KP,) the k slots, padded to a power of two
        wv = tl.zeros((KP,), dtype=tl.float32)  # (KP,) the winners' scores
        iv = tl.zeros((KP,), dtype=tl.int64)  # (KP,) their ids
        for j in tl.static_range(K):  # the k winners, best first
            i = tl.argmax(choice, axis=0)  # scalar: the first index of the maximum
            wj = tl.sum(tl.where(e == i, p, 0.0), axis=0)  # scalar: its unbiased score p[i]
            wv = tl.where(jj == j, wj, wv)
            iv = tl.where(jj == j, i.to(tl.int64), iv)
            choice = tl.where(e == i, -float("inf"), choice)  # out of the running
        if NORM:  # renormalise over the winners (GLM); the padding slots hold 0
            wv = wv / (tl.sum(wv, axis=0) + 1e-20)
        tl.store(w_ptr + row * K + jj, wv * scaling, mask=jj < K)
        tl.store(idx_ptr + row * K + jj, iv, mask=jj < K)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


@torch.library.custom_op("longcat_ref::route", mutates_args=())
def _route_op(logits: torch.Tensor, bias: torch.Tensor, k: int, softmax: bool, norm: bool,
              scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    n, E = logits.shape
    w = torch.empty(n, k, dtype=torch.float32, device=logits.device)
    idx = torch.empty(n, k, dtype=torch.int64, device=logits.device)
    if n:  # (.float() / .contiguous(): no-ops when called through `route`, which makes them so outside the op)
        pdl = support.pdl(logits)  # programmatic dependent launch (sm_90+ CUDA)
        _route_kernel[(n,)](logits.float().contiguous(), bias.contiguous(), w, idx, E, float(scaling),
                            SOFTMAX=softmax, NORM=norm, K=k, KP=_next_pow2(k), BLOCK_E=max(16, _next_pow2(E)),
                            PDL=pdl, launch_pdl=pdl)
    return w, idx


@_route_op.register_fake
def _(logits, bias, k, softmax, norm, scaling):
    n = logits.shape[0]
    return (logits.new_empty(n, k, dtype=torch.float32), logits.new_empty(n, k, dtype=torch.int64))


def route(logits: torch.Tensor, bias: torch.Tensor, k: int, softmax: bool, norm: bool, scaling: float):
    """logits (n, E) fp32, bias (E,) -> (weights (n, k) fp32, ids (n, k) int64), best first; the Triton kernel.

    Any 0 < k <= E; E up to a few thousand (the row lives in registers)."""
    support.require(logits, WHAT)
    if logits.dim() != 2 or bias.shape != (logits.shape[1],) or not 0 < k <= logits.shape[1]:
        raise ValueError(f"route: logits must be (n, E) with bias (E,) and 0 < k <= E; got {tuple(logits.shape)}, "
                         f"{tuple(bias.shape)}, k={k}")
    # fp32 and contiguous here, outside the opaque op, where torch.compile fuses the cast into what makes the
    # logits; the bias is read in its own dtype by the kernel (a cast inside the op was one eager copy kernel per
    # layer, 1.5 us, when the model had been cast to bf16 whole)
    logits, bias = logits.float().contiguous(), bias.contiguous()  # (n, E) fp32, (E,)
    return torch.ops.longcat_ref.route(logits, bias, int(k), bool(softmax), bool(norm), float(scaling))


def route_reference(logits, bias, k: int, softmax: bool, norm: bool, scaling: float):
    """The same selection in plain PyTorch (what `Router` computes for n_group = 1), winners best first."""
    p = logits.float().softmax(-1) if softmax else logits.float().sigmoid()  # (n, E)
    idx = (p + bias.float()).topk(k, dim=-1, sorted=True).indices  # (n, k)
    w = p.gather(1, idx)  # (n, k)
    if norm:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scaling, idx
