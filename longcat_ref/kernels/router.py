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

The logits in the same launch (`route_logits`, up to MAX_TOKENS decode tokens). Before the selection the router
multiplies the token by its weight W (E, H): GLM-4.7-Flash's 64 x 2048, 256 KB, a GEMV of its own (inductor's
reduction, or cuBLAS) that waits for the layer's norm and makes the selection wait for it. Here the product and the
selection are one kernel, over cdiv(E, BLOCK_R) programs:

    program p:  w = W[rows, :]            (BLOCK_R, BLOCK_H) whole rows, loaded BEFORE the dependent-launch wait
                wait for the previous kernel (the norm that makes x)
                logits[m, rows] = sum_h w * x[m, :]          fp32 products and sum, per token m
                ticket = atomic_add(counter, 1)              acquire-release: this program's logits are visible
                if ticket == programs - 1:                   the last one to finish (all logits are written)
                    for each token: read its E logits (from L2), select as above, write w and ids
                    counter = 0                              ready for the next call (a replayed CUDA graph too)

Each logit is one program's sum in a fixed order, so the result does not depend on which program is last. The
ticket is the only cross-program step; a kernel boundary (what `route` after a separate product has) would be the
other way to wait for all logits, at the price of a launch.

Only the plain, ungrouped selection (n_group = 1, as both models use) has a kernel; `Router` keeps its own code for
group-limited routing. `route_reference` is the same selection in plain PyTorch, the definition the kernels are tested
equal to (tests/test_kernel_router.py; route_logits against the selection of the fp64 logits). model/router.py
runs route_logits for `Forms(router="fused_logits")`. Measured on one H100 (2026-12-07, docs/perf-run22/), in
GLM-4.7-Flash's compiled batch-1 step: 46 launches fewer, but the step 3.44 -> 3.49 ms (the kernel takes 4.7 us a
layer on the critical path, where the logits' reduction and `route` took 1.7 + 1.9): opt-in.
"""

from __future__ import annotations

import torch

from . import support

WHAT = "the router kernel"

if support.have_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _select(lg, bias_ptr, E, w_ptr, idx_ptr, row, scaling, SOFTMAX: tl.constexpr, NORM: tl.constexpr,
                K: tl.constexpr, KP: tl.constexpr, BLOCK_E: tl.constexpr):
        """One token's selection from its fp32 logits lg (BLOCK_E,) (padding -inf): scores, the biased top-k,
        the weights; writes the (k,) weights and ids of token `row`."""
        e = tl.arange(0, BLOCK_E)  # (BLOCK_E,) expert ids, padded to a power of two
        ok = e < E
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

    @triton.jit
    def _route_kernel(logits_ptr, bias_ptr, w_ptr, idx_ptr, E, scaling, SOFTMAX: tl.constexpr, NORM: tl.constexpr,
                      K: tl.constexpr, KP: tl.constexpr, BLOCK_E: tl.constexpr, PDL: tl.constexpr = False):
        if PDL:  # programmatic dependent launch (support.pdl): wait for the previous kernel, let the next one start
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, BLOCK_E)
        lg = tl.load(logits_ptr + row * E + e, mask=e < E, other=-float("inf"))  # (BLOCK_E,) fp32 logits
        _select(lg, bias_ptr, E, w_ptr, idx_ptr, row, scaling, SOFTMAX, NORM, K, KP, BLOCK_E)

    @triton.jit
    def _route_logits_kernel(
        X, W, L, T, bias_ptr, w_ptr, idx_ptr,  # x (M, H) rows strided, W (E, H) rows strided, logits (M, E) fp32,
        M, E, H, stride_xm, stride_we, scaling,  # the ticket counter (1,) int32 (0 between calls), bias, w, ids
        SOFTMAX: tl.constexpr, NORM: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BLOCK_E: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr = False,
    ):
        p = tl.program_id(0)
        rows = p * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,) this program's experts
        r_ok = rows < E
        h = tl.arange(0, BLOCK_H)  # (BLOCK_H,) a whole row of W
        h_ok = h < H
        # the router's weight does not depend on the previous kernel: loaded before the wait
        wt = tl.load(W + rows.to(tl.int64)[:, None] * stride_we + h[None, :], mask=r_ok[:, None] & h_ok[None, :],
                     other=0.0)  # (BLOCK_R, BLOCK_H)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        for m in tl.static_range(BLOCK_M):  # the tokens: this program's logits of each, fp32 products and sum
            if m < M:
                x = tl.load(X + m * stride_xm + h, mask=h_ok, other=0.0).to(tl.float32)  # (BLOCK_H,)
                lg = tl.sum(wt.to(tl.float32) * x[None, :], axis=1)  # (BLOCK_R,)
                tl.store(L + m * E + rows, lg, mask=r_ok)
        # a ticket: the program that finishes last (all logits written and, by the acquire-release atomic, visible
        # to it) picks every token's winners, then sets the counter back to 0 for the next call
        ticket = tl.atomic_add(T, 1, sem="acq_rel", scope="gpu")
        if ticket == tl.num_programs(0) - 1:
            e = tl.arange(0, BLOCK_E)
            for m in tl.static_range(BLOCK_M):
                if m < M:  # .cg: from L2, where the other programs' stores are (not a stale L1 line)
                    row_lg = tl.load(L + m * E + e, mask=e < E, other=-float("inf"), cache_modifier=".cg")
                    _select(row_lg, bias_ptr, E, w_ptr, idx_ptr, m, scaling, SOFTMAX, NORM, K, KP, BLOCK_E)
            tl.atomic_xchg(T, 0, sem="relaxed", scope="gpu")


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


MAX_TOKENS = 4  # route_logits: decode tokens (a short speculative verify), one pass over the weight tile each
TILE = 8192  # route_logits: the values of one program's weight tile (BLOCK_R rows x BLOCK_H), 64 a thread
MAX_H = 8192  # route_logits: a row of the weight must fit one tile
_TICKETS: dict = {}  # device -> the (1,) int32 ticket counter of route_logits (0 between calls)


def _ticket(device: torch.device) -> torch.Tensor:
    """The ticket counter of `route_logits` on this device: made (zeroed) on the first call -- a warm-up, before
    any CUDA graph capture -- and back at 0 after every call. One per device: calls on a device are ordered in its
    stream (two route_logits running at once on two streams of one device would share it)."""
    key = (device.type, device.index)
    if key not in _TICKETS:
        _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _TICKETS[key]


def logits_tiles(E: int, H: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_H) of route_logits for a weight (E, H): whole rows, as many as make TILE values."""
    block_h = max(16, _next_pow2(H))
    return max(1, min(TILE // block_h, _next_pow2(E))), block_h


def logits_fit(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Can route_logits take x (n, H) and the router weight (E, H) here: a kernel can run, at most MAX_TOKENS
    tokens, the weight 2-D in x's dtype with contiguous rows, H <= MAX_H. (Static facts only.)"""
    return (support.can_run(x) and x.dim() == 2 and weight.dim() == 2 and weight.dtype == x.dtype
            and weight.stride(-1) == 1 and x.shape[1] == weight.shape[1] <= MAX_H and x.shape[0] <= MAX_TOKENS
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16))


@torch.library.custom_op("longcat_ref::route_logits", mutates_args=())
def _route_logits_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int, softmax: bool, norm: bool,
                     scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    M, H = x.shape
    E = weight.shape[0]
    w = torch.empty(M, k, dtype=torch.float32, device=x.device)
    idx = torch.empty(M, k, dtype=torch.int64, device=x.device)
    if M:
        logits = torch.empty(M, E, dtype=torch.float32, device=x.device)  # (M, E): written, then read by the last
        block_r, block_h = logits_tiles(E, H)
        pdl = support.pdl(x)  # programmatic dependent launch (sm_90+ CUDA)
        _route_logits_kernel[(triton.cdiv(E, block_r),)](
            x, weight, logits, _ticket(x.device), bias, w, idx, M, E, H, x.stride(0), weight.stride(0),
            float(scaling), SOFTMAX=softmax, NORM=norm, K=k, KP=_next_pow2(k), BLOCK_E=max(16, _next_pow2(E)),
            BLOCK_M=_next_pow2(M), BLOCK_R=block_r, BLOCK_H=block_h, PDL=pdl, num_warps=4, launch_pdl=pdl)
    return w, idx


@_route_logits_op.register_fake
def _(x, weight, bias, k, softmax, norm, scaling):
    n = x.shape[0]
    return (x.new_empty(n, k, dtype=torch.float32), x.new_empty(n, k, dtype=torch.int64))


def route_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int, softmax: bool, norm: bool,
                 scaling: float):
    """x (n, H), the router weight (E, H), bias (E,) -> (weights (n, k) fp32, ids (n, k) int64), best first: the
    logits x W^T (fp32 products and sum) and the selection in ONE launch, for up to MAX_TOKENS decode tokens.

    Each program owns a few whole rows of W, loaded before its dependent-launch wait (as kernels/prefetch_gemv.py
    does), and writes those experts' logits; the last program to finish -- counted with an atomic ticket -- reads
    all of them back and picks the winners as `route` does. The logits are each one program's fixed-order sum, so
    the result does not depend on which program finishes last. Raises a one-line error for what it cannot take."""
    support.require(x, WHAT)
    if (x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1] or bias.shape != (weight.shape[0],)
            or not 0 < k <= weight.shape[0]):
        raise ValueError(f"route_logits: x must be (n, H), weight (E, H), bias (E,) and 0 < k <= E; got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(bias.shape)}, k={k}")
    if not logits_fit(x, weight) or bias.device != x.device:
        raise ValueError(f"route_logits: at most {MAX_TOKENS} tokens, H <= {MAX_H}, the weight in x's dtype "
                         f"({x.dtype}) with contiguous rows, all on x's device; got {x.shape[0]} tokens, H = "
                         f"{x.shape[1]}, weight {weight.dtype} strides {weight.stride()}: use route(logits, ...)")
    x = x if x.stride(-1) == 1 else x.contiguous()
    return torch.ops.longcat_ref.route_logits(x, weight, bias.contiguous(), int(k), bool(softmax), bool(norm),
                                              float(scaling))


def route_reference(logits, bias, k: int, softmax: bool, norm: bool, scaling: float):
    """The same selection in plain PyTorch (what `Router` computes for n_group = 1), winners best first."""
    p = logits.float().softmax(-1) if softmax else logits.float().sigmoid()  # (n, E)
    idx = (p + bias.float()).topk(k, dim=-1, sorted=True).indices  # (n, k)
    w = p.gather(1, idx)  # (n, k)
    if norm:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scaling, idx
