"""perf-run25's experiment: a GLM-4.7-Flash MoE layer at decode with no inductor kernel in it (the glue folded).

In the compiled batch-1 step each MoE layer runs 12 kernels; 9 are ours (Triton, launched with programmatic
dependent launch, PDL: each loads what does not depend on the previous kernel, then waits), and 3 are inductor's
reductions between them, which do not take part in PDL:

    red A   x1 = x + o_proj(...);  h = norm2(x1)                   (the residual add and the post-attention norm)
    red B   logits = norm2(x1) W_router^T                          (the norm again, and the router's product)
    red C   x2 = x1 + sum_j part[j];  norm1'(x2)                   (the MoE's slots summed, the residual add, and
                                                                    the next layer's input norm)

Here the layer is written so that those three are folded into our kernels:

    q_a + kv_a    prefetch_gemv(x, ..., norm_weight=norm1)  the input norm in the projection's prologue (the kernel
                                                            already does this for q_b with q_a's norm)
    addnorm_logits(x, o, W_router, norm2)                   one kernel: x1 = x + o, h = norm2(x1), logits = h W^T
                                                            (fp32); program 0 also stores x1 and h
    route, fused_moe's two kernels                          unchanged (the package's)
    add_slots(part, x1)                                     x2 = x1 + sum_j part[j]: a few programs, PDL

so the layer is 11 kernels, every one PDL-chained. The math is the package's, rounding step by rounding step:
x + o and x1 + moe in the model dtype, the norm as norm.py (fp32 statistic, cast, the weight's product rounded
once), the router's logits in fp32 from the 16-bit h and W, the slots summed in fp32 and rounded once.

`install()` patches DecoderLayer.forward and MLA.down, which decide by one predicate, `fold_ok` (an installed MoE
layer, one decode token per sequence, where the kernels run): the layer then hands the attention x un-normed and
MLA.down norms it inside q_a + kv_a's kernel. The folded layer always runs the fused router and experts, whatever
`forms` asks of them (the decode step's DECODE forms pick them anyway); `uninstall()` undoes both. An
experiment's monkeypatch, not the package: it goes there only if the compiled step is faster.
"""

from __future__ import annotations

import torch

from longcat_ref.kernels import support
from longcat_ref.kernels.prefetch_gemv import prefetch_gemv, tiles
from longcat_ref.kernels.router import route
from longcat_ref.model import mla as mla_mod
from longcat_ref.model import model as model_mod
from longcat_ref.model.linear import takes_prefetch
from longcat_ref.model.moe import MoE

MAX_TOKENS = 4
FOLDED = [0]  # calls of a layer that ran folded (eagerly: each call; compiled: each trace)
NUM_WARPS = 4

if support.have_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _addnorm_logits_kernel(X, A, W, NW, L, S, HN, M, E, H, stride_xm, stride_am, stride_we, eps,
                               BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
                               PDL: tl.constexpr = False):
        p = tl.program_id(0)
        rows = p * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,) this program's experts
        r_ok = rows < E
        h = tl.arange(0, BLOCK_H)  # (BLOCK_H,) a whole row
        h_ok = h < H
        wt = tl.load(W + rows.to(tl.int64)[:, None] * stride_we + h[None, :], mask=r_ok[:, None] & h_ok[None, :],
                     other=0.0)  # (BLOCK_R, BLOCK_H): before the wait
        nw = tl.load(NW + h, mask=h_ok, other=0.0).to(tl.float32)  # (BLOCK_H,)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        dtype = S.dtype.element_ty
        for m in tl.static_range(BLOCK_M):
            if m < M:
                xv = tl.load(X + m * stride_xm + h, mask=h_ok, other=0.0).to(tl.float32)  # (BLOCK_H,)
                av = tl.load(A + m * stride_am + h, mask=h_ok, other=0.0).to(tl.float32)
                s = (xv + av).to(dtype)  # x + o in the model dtype: the residual stream
                sf = s.to(tl.float32)
                inv = tl.math.rsqrt(tl.sum(sf * sf, 0) / H + eps)  # ()
                hn = (nw * (sf * inv).to(dtype).to(tl.float32)).to(dtype)  # (BLOCK_H,) norm.py's formula
                lg = tl.sum(wt.to(tl.float32) * hn.to(tl.float32)[None, :], axis=1)  # (BLOCK_R,) fp32
                tl.store(L + m * E + rows, lg, mask=r_ok)
                if p == 0:
                    tl.store(S + m * H + h, s, mask=h_ok)
                    tl.store(HN + m * H + h, hn, mask=h_ok)

    @triton.jit
    def _add_slots_kernel(P, X, Y, H, stride_xm, KS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        m = tl.program_id(0)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) columns of H
        ok = c < H
        acc = tl.load(P + (m * KS) * H + c, mask=ok, other=0.0)  # (BLOCK,) fp32, slot 0
        for j in tl.static_range(1, KS):  # the slots in order, fp32
            acc += tl.load(P + (m * KS + j) * H + c, mask=ok, other=0.0)
        dtype = Y.dtype.element_ty
        xv = tl.load(X + m * stride_xm + c, mask=ok, other=0.0).to(tl.float32)
        y = (xv + acc.to(dtype).to(tl.float32)).to(dtype)  # moe rounded once, then x1 + moe in the model dtype
        tl.store(Y + m * H + c, y, mask=ok)


@torch.library.custom_op("perf_run25::addnorm_logits", mutates_args=())
def _addnorm_logits_op(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, nw: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    M, H = x.shape
    E = w.shape[0]
    logits = torch.empty(M, E, dtype=torch.float32, device=x.device)
    s = torch.empty(M, H, dtype=x.dtype, device=x.device)
    hn = torch.empty(M, H, dtype=x.dtype, device=x.device)
    block_r, block_h = tiles(E, H)
    pdl = support.pdl(x)
    _addnorm_logits_kernel[(triton.cdiv(E, block_r),)](
        x, a, w, nw, logits, s, hn, M, E, H, x.stride(0), a.stride(0), w.stride(0), float(eps),
        BLOCK_M=triton.next_power_of_2(M), BLOCK_R=block_r, BLOCK_H=block_h, PDL=pdl, num_warps=NUM_WARPS,
        launch_pdl=pdl)
    return logits, s, hn


@_addnorm_logits_op.register_fake
def _(x, a, w, nw, eps):
    M, H = x.shape
    return x.new_empty(M, w.shape[0], dtype=torch.float32), x.new_empty(M, H), x.new_empty(M, H)


@torch.library.custom_op("perf_run25::add_slots", mutates_args=())
def _add_slots_op(part: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    M, KS, H = part.shape
    y = torch.empty(M, H, dtype=x.dtype, device=x.device)
    block = 256
    pdl = support.pdl(x)
    _add_slots_kernel[(M, triton.cdiv(H, block))](part, x, y, H, x.stride(0), KS=KS, BLOCK=block, PDL=pdl,
                                                  num_warps=2, launch_pdl=pdl)
    return y


@_add_slots_op.register_fake
def _(part, x):
    return x.new_empty(x.shape)


def addnorm_logits_reference(x, a, w, nw, eps):
    s = x + a  # (M, H) model dtype
    s32 = s.float()
    hn = nw * (s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)
    return (hn.float()[..., None, :] * w.float()).sum(-1), s, hn


def add_slots_reference(part, x):
    return x + part.sum(1).to(x.dtype)


# ------------------------------------------------------------------------------------------------ the patch
_ORIG = {}


def _static_ok(layer) -> bool:
    """The layer's own facts: a MoE with one router group, a foldable shared expert, 16/32-bit banks, no zero
    experts (GLM-4.7-Flash's MoE layers)."""
    mlp = layer.mlp
    if not isinstance(mlp, MoE):
        return False
    return (mlp.router.n_group == 1 and mlp.experts.can_fold(mlp.shared_experts) and not mlp.experts.fp8
            and not mlp.add_zero_experts and mlp.router.weight.dtype == layer.input_layernorm.weight.dtype)


def fold_ok(attn, x) -> bool:
    """Does this call run folded? The one predicate of both patches (the layer's forward then hands the attention
    x un-normed, and MLA.down norms it inside q_a + kv_a's kernel): an installed layer, one new token per sequence,
    at most MAX_TOKENS sequences, where the kernels run, the router in x's dtype."""
    ln = getattr(attn, "_fold_ln", None)
    return (ln is not None and x.dim() == 3 and x.shape[1] == 1 and x.shape[0] <= MAX_TOKENS
            and support.can_run(x) and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and ln.weight.dtype == x.dtype)


def folded_forward(self, x, cos, sin, mask=None, cache=None, cache_position=None, forms=model_mod.REFERENCE):
    if not fold_ok(self.self_attn, x):  # (the layer's own facts, router dtype included, were checked at install)
        return _ORIG["layer"](self, x, cos, sin, mask, cache, cache_position, forms)
    if not torch.compiler.is_compiling():  # (a global mutated while tracing would be a guard: a recompile a step)
        FOLDED[0] += 1
    b, t, H = x.shape
    n = b * t
    o = self.self_attn(x, cos, sin, mask, cache, cache_position, forms.attention, forms.linear, forms.rope,
                       forms.norm)  # (b, t, H): x un-normed, input_layernorm inside q_a + kv_a's kernel (down)
    ln2, mlp = self.post_attention_layernorm, self.mlp
    r = mlp.router
    logits, x1, h = torch.ops.perf_run25.addnorm_logits(x.reshape(n, H), o.reshape(n, H), r.weight, ln2.weight,
                                                        float(ln2.eps))  # (n, E) fp32, (n, H), (n, H)
    w, idx = route(logits, r.e_score_correction_bias, r.top_k, r.kind == "softmax", r.norm_topk_prob, r.scaling)
    if not torch.compiler.is_compiling() and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        mlp.last_idx = idx  # as MoE.compute: the experts of an eager call (bench's roofline reads them)
    sh, ex = mlp.shared_experts, mlp.experts
    part = torch.ops.longcat_ref.fused_moe(h, w, idx, ex.gate_up_proj, ex.down_proj, int(ex.first_expert), None,
                                           None, 0, 0, sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight)
    return torch.ops.perf_run25.add_slots(part, x1).view(b, t, H)  # (b, t, H)


def folded_down(self, x, linear="plain"):
    if not fold_ok(self, x):
        return _ORIG["down"](self, x, linear)
    ln = self._fold_ln
    q_a, kv_a = getattr(self, "q_a_proj", None), self.kv_a_proj_with_mqa
    if (q_a is not None and takes_prefetch(linear, x, q_a.weight) and takes_prefetch(linear, x, kv_a.weight)
            and q_a.bias is None and kv_a.bias is None):
        both = prefetch_gemv(x, q_a.weight, None, ln.weight, ln.eps, weight2=kv_a.weight)  # the norm inside
        return both[..., : q_a.out_features], both[..., q_a.out_features:]
    return _ORIG["down"](self, ln(x), linear)


def install(model):
    """Patch the classes (once) and give each MoE layer's attention its input norm."""
    if not _ORIG:
        _ORIG["layer"] = model_mod.DecoderLayer.forward
        _ORIG["down"] = mla_mod.MLA.down
        model_mod.DecoderLayer.forward = folded_forward
        mla_mod.MLA.down = folded_down
    for layer in model.model.layers:
        # in __dict__, not as a submodule: the model's modules and parameters stay as they were
        object.__setattr__(layer.self_attn, "_fold_ln", layer.input_layernorm if _static_ok(layer) else None)


def uninstall(model):
    if _ORIG:
        model_mod.DecoderLayer.forward = _ORIG.pop("layer")
        mla_mod.MLA.down = _ORIG.pop("down")
    for layer in model.model.layers:
        object.__setattr__(layer.self_attn, "_fold_ln", None)
