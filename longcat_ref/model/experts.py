"""Feed-forward blocks: the dense SwiGLU MLP and a bank of routed SwiGLU experts.

SwiGLU: down(silu(gate(x)) * up(x)). The expert bank stores all experts' weights stacked, as transformers does:

    gate_up_proj  (E, 2I, H)   rows [0, I) are gate_e, rows [I, 2I) are up_e
    down_proj     (E, H, I)

It holds only the *routed* experts (512 in LongCat-Flash): zero-computation experts have no weights, they are
handled by the MoE block (moe.py) as identities. (transformers 5.x allocates gate_up_proj for 768 experts; that is
a bug, see docs in moe.py.)

Six forms of the same sum, chosen per call by `impl` (`CausalLM.forward(..., forms=Forms(experts=...))`;
tests/test_fast.py proves them equal):

* `forward_loop` ("loop", the default and the readable reference): for each expert that received tokens, gather
  them, run the expert, scale by the router weight and scatter-add. One host sync per call (`.tolist()` of the
  per-expert counts) plus one small kernel group per active expert -- fine for tests and CPU, slow on a GPU.
* `forward_grouped` ("grouped"): sort the (token, slot) pairs by expert, then ONE grouped matmul for gate_up and one
  for down (`torch._grouped_mm`: a jagged batch of GEMMs whose group sizes live on the device). No host sync, fixed
  shapes: it can sit inside a CUDA graph. Where the torch build has no grouped matmul: a padded batched matmul.
  "grouped_triton": the same sort, then kernels/grouped_gemm.py's kernels (CUDA; FP8 banks on CUDA use them in
  "grouped" too), three launches (`_grouped_kernels`): gate_up reading x's rows in expert order in place with
  silu(gate) * up in its epilogue, down, and the router-weighted sum over slots reading down's rows in place.
  It beats torch._grouped_mm and the torch ops around it at every size measured (tools/bench_experts.py, one
  H200: LongCat-Flash 2,048 tokens 10.05 vs 13.87 ms, 8,192 tokens 21.5 vs 23.3 ms).
* `forward_gather` ("gather"): for a handful of tokens (decode), gather each slot's expert weights and run one
  batched matmul per projection. No sort, no sync; reads k experts' weights per token.
* `forward_gemv` ("gemv"): the gather form written as multiply-and-sum instead of a matmul. Eagerly that is the
  worst form (it materialises the gathered weights times x); under torch.compile it is the best for one decode
  token: the weight gather becomes an indexed load inside one reduction kernel per projection, so each chosen
  expert's weights are read once, in place -- no copy, no sort, no grouped-GEMM tiles that are 1/64 full.

* `forward_fused` ("fused"): the Triton kernels of kernels/moe_decode.py, two launches that read each chosen
  expert's weights in place (bf16 or kept FP8), for a few decode tokens on a GPU. A shared SwiGLU that `can_fold`
  (GLM's) is computed in the same launches as one more slot of weight 1 (MoE.compute decides).

"auto" picks fused for up to 64 (token, slot) pairs on CUDA (kept FP8: up to FUSED_MAX_PAIRS), gemv for tiny decode
batches inside torch.compile, gather for tiny batches on the CPU, on CUDA grouped_triton for 16-bit banks up to
`triton_max_rows` (1,024) pairs per expert on average (measured faster at every size up to there), grouped beyond.

FP8 banks (model/quant.py, `fp8="keep"`): loop, gather and gemv dequantize the experts they read (`gate_up`,
`down`); grouped runs kernels/grouped_gemm.py on CUDA and dequantizes FP8_CHUNK experts at a time elsewhere.

Non-local ids (zero experts, other ranks' experts) are weighted 0 in every form, so expert parallelism
(`first_expert`) works unchanged.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import support
from ..kernels.fp8_linear import dequantize
from ..kernels.grouped_gemm import combine_slots, grouped_gemm
from ..kernels.moe_decode import fused_moe
from .linear import linear as _linear

FP8_CHUNK = 16  # experts dequantized at a time by the grouped form of an FP8 bank
FUSED_MAX_PAIRS = 512  # "auto": up to this many (token, slot) pairs an FP8 bank runs the fused kernels
TRITON_MAX_ROWS = 1024  # "auto": 16-bit banks run "grouped_triton" up to this many pairs per expert on average


def triton_max_rows() -> int:
    """Up to how many (token, slot) pairs per expert, on average, "auto" runs grouped_triton (16-bit banks, CUDA).

    Since its gate_up reads the rows in place with SwiGLU in its epilogue and `combine_slots` sums the slots
    (`_grouped_kernels`), the Triton path beats torch._grouped_mm plus torch ops at every size measured
    (tools/bench_experts.py, one H200, 2026-12-03, docs/perf-run14/experts_tall.json): GLM-4.7-Flash 256 to 16,384
    tokens (16 to 1,024 pairs an expert; 471 vs 522 us ... 2.73 vs 4.40 ms), LongCat-Flash 256 to 16,384 tokens
    (6 to 384; 9.46 vs 11.94 ms ... 38.3 vs 45.3 ms). Past the largest measured, torch's grouped GEMM, unmeasured
    against it there."""
    return TRITON_MAX_ROWS


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x, linear: str = "plain"):  # (..., H) -> (..., H); linear: the Linear form (linear.py)
        gate, up = _linear(self.gate_proj, x, linear), _linear(self.up_proj, x, linear)  # (..., I) each
        return _linear(self.down_proj, F.silu(gate) * up, linear)  # (..., H)


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

    # ------------------------------------------------------------------------- FP8 weights kept (model/quant.py)
    @property
    def fp8(self) -> bool:
        return self.gate_up_proj.dtype == torch.float8_e4m3fn

    def to_fp8_(self, block):
        """Hold both banks in FP8 with block scales (uninitialised; the loader or quant.quantize_ fills them)."""
        E, I2, H = self.gate_up_proj.shape
        dev, fp8 = self.gate_up_proj.device, torch.float8_e4m3fn
        bo, bi = block
        self.gate_up_proj = nn.Parameter(torch.empty(E, I2, H, dtype=fp8, device=dev), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(E, H, I2 // 2, dtype=fp8, device=dev), requires_grad=False)
        nb_i = -(-self.inter // bo)
        self.register_buffer("gate_up_proj_scale_inv", torch.empty(E, 2 * nb_i, -(-H // bi), device=dev))  # gate|up
        self.register_buffer("down_proj_scale_inv", torch.empty(E, -(-H // bo), -(-self.inter // bi), device=dev))
        self.fp8_block = tuple(block)
        return self

    def gate_up(self, sel, dtype) -> torch.Tensor:
        """gate_up_proj[sel] in `dtype` (sel: an expert id or an index tensor); FP8 banks are dequantized here."""
        if not self.fp8:
            return self.gate_up_proj[sel]
        return dequantize(self.gate_up_proj[sel], self.gate_up_proj_scale_inv[sel], self.fp8_block, dtype,
                          split_rows=self.inter)

    def down(self, sel, dtype) -> torch.Tensor:
        """down_proj[sel] in `dtype`, dequantized if FP8."""
        if not self.fp8:
            return self.down_proj[sel]
        return dequantize(self.down_proj[sel], self.down_proj_scale_inv[sel], self.fp8_block, dtype)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Run local expert e on x (m, H) -> (m, H)."""
        gate, up = F.linear(x, self.gate_up(e, x.dtype)).chunk(2, dim=-1)  # (m, I) each
        return F.linear(F.silu(gate) * up, self.down(e, x.dtype))  # (m, H)

    def forward(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, out: torch.Tensor,
                impl: str = "loop", shared=None) -> torch.Tensor:
        """Add sum_j w[n,j] * expert_{idx[n,j]}(x[n]) into out (n, H), for the experts this module holds.

        x (n, H); w (n, k) fp32; idx (n, k) global expert ids (others -- zero experts, other ranks' -- are skipped).
        impl: "loop" (the readable reference) | "grouped" | "gather" | "gemv" | "auto" (the fast one for this call).
        shared: a SwiGLU to add too, computed inside the fused kernels (only with impl "fused"; see MoE.compute).
        """
        if impl == "auto":
            impl = self.choose(x, idx)
        if shared is not None:
            if impl != "fused":
                raise ValueError(f"Experts: a shared expert is computed inside the experts only in the 'fused' form, "
                                 f"not {impl!r}")
            return self.forward_fused(x, w, idx, out, shared)
        if impl == "grouped_triton":
            return self.forward_grouped(x, w, idx, out, gemm="triton")
        forms = {"loop": self.forward_loop, "grouped": self.forward_grouped, "gather": self.forward_gather,
                 "gemv": self.forward_gemv, "fused": self.forward_fused}
        return forms[impl](x, w, idx, out)

    def can_fold(self, shared) -> bool:
        """Whether the fused kernels can compute this shared SwiGLU as one more slot: plain nn.Linear matrices in
        the banks' (16-bit) dtype and of the experts' width (GLM-4.7-Flash's one shared expert, unsharded)."""
        if self.fp8 or shared is None:
            return False
        mods = (shared.gate_proj, shared.up_proj, shared.down_proj)
        return (all(type(m) is torch.nn.Linear and m.bias is None and m.weight.dtype == self.gate_up_proj.dtype
                    for m in mods)
                and tuple(shared.gate_proj.weight.shape) == tuple(shared.up_proj.weight.shape)
                == (self.inter, self.gate_up_proj.shape[2])
                and tuple(shared.down_proj.weight.shape) == (self.gate_up_proj.shape[2], self.inter)
                and shared.gate_proj.weight.stride() == shared.up_proj.weight.stride())

    def choose(self, x, idx) -> str:
        """The fast form for this call: on CUDA the fused kernels for up to 64 (token, slot) pairs (FP8 banks: up to
        FUSED_MAX_PAIRS); gemv for a few pairs inside torch.compile, gather for a few on the CPU; on CUDA
        grouped_triton for 16-bit banks up to `triton_max_rows` pairs an expert, grouped otherwise."""
        if x.is_cuda and support.have_triton() and idx.numel() <= (FUSED_MAX_PAIRS if self.fp8 else 64):
            return "fused"  # FP8 banks: the only form that reads FP8 in place
        if idx.numel() <= 16 and torch.compiler.is_compiling():
            return "gemv"
        if idx.numel() <= 64 and x.device.type == "cpu":
            return "gather"
        if x.is_cuda and support.have_triton() and not self.fp8 and idx.numel() <= triton_max_rows() * self.n_local:
            return "grouped_triton"  # the Triton kernels: rows and slots read in place (measured faster)
        if x.is_cuda and not grouped_mm_native(x, self.gate_up_proj, self.down_proj):
            # the padded fallback needs a host sync, which a CUDA graph capture cannot contain (e.g. fp32 decode)
            return "gather" if torch.cuda.is_current_stream_capturing() or idx.numel() <= 64 else "grouped"
        return "grouped"

    def forward_loop(self, x, w, idx, out):
        local = idx - self.first_expert  # (n, k) local ids; outside [0, n_local) = not ours
        counts = torch.bincount(local.clamp(-1, self.n_local).flatten() + 1, minlength=self.n_local + 2)
        for e in counts[1:-1].nonzero().flatten().tolist():  # one host sync: the experts that got tokens
            tok, slot = torch.where(local == e)  # (m,), (m,): tokens routed to expert e, and in which slot
            y = self.expert(e, x[tok]) * w[tok, slot, None]  # (m, H): scaled in fp32
            out.index_add_(0, tok, y.to(out.dtype))  # ascending expert order, as transformers
        return out

    # ------------------------------------------------------------------------------------------- fast paths
    def _local(self, idx):
        """(n, k) global ids -> local ids (n, k) clamped into [0, n_local) and a mask (n, k) of the ones we hold."""
        local = idx - self.first_expert  # (n, k)
        mine = (local >= 0) & (local < self.n_local)  # (n, k)
        return local.clamp(0, self.n_local - 1), mine

    def forward_grouped(self, x, w, idx, out, gemm: str = "torch"):
        """gemm: which grouped GEMM multiplies 16-bit banks: "torch" (torch._grouped_mm, cuBLAS/CUTLASS) or
        "triton" (kernels/grouped_gemm.py, CUDA; FP8 banks on CUDA always use it: it reads FP8 in place)."""
        if gemm not in ("torch", "triton"):
            raise ValueError(f"Experts.forward_grouped: gemm {gemm!r} is not 'torch' or 'triton'")
        if not self.fp8 or (x.is_cuda and support.have_triton()):  # FP8 on CUDA: a grouped GEMM reading FP8
            return self._grouped(x, w, idx, out, self.gate_up_proj, self.down_proj, self.first_expert, gemm)
        # FP8 banks elsewhere: dequantize FP8_CHUNK experts at a time and run the same grouped form on them, as if
        # they were an expert-parallel shard (the others' slots are weighted 0 there). No host sync; the temporary
        # weights are FP8_CHUNK experts' worth.
        for c0 in range(0, self.n_local, FP8_CHUNK):
            c = slice(c0, min(c0 + FP8_CHUNK, self.n_local))
            self._grouped(x, w, idx, out, self.gate_up(c, x.dtype), self.down(c, x.dtype), self.first_expert + c0)
        return out

    def _grouped(self, x, w, idx, out, gate_up, down, first, gemm="torch"):
        n, k = idx.shape
        E = gate_up.shape[0]
        local = idx - first  # (n, k)
        mine = (local >= 0) & (local < E)  # (n, k)
        local = local.clamp(0, E - 1)
        key = torch.where(mine, local, E).flatten()  # (n*k,): not ours -> a sentinel past the last expert
        order = key.argsort(stable=True)  # (n*k,): (token, slot) pairs sorted by expert, sentinels last
        counts = torch.zeros(E + 1, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))  # (E+1,) tokens per expert, on device
        ends = counts[:-1].cumsum(0, dtype=torch.int32)  # (E,): end row of each expert's group
        if gemm == "triton" or gate_up.dtype == torch.float8_e4m3fn:  # kernels/grouped_gemm.py (FP8: in place)
            return self._grouped_kernels(x, w, mine, order, ends, out, gate_up, down)
        xs = x[order // k]  # (n*k, H): rows grouped by expert
        h = grouped_mm(xs, gate_up.transpose(1, 2), ends)  # (n*k, 2I); rows past ends[-1] are junk
        gate, up = h.chunk(2, dim=-1)  # (n*k, I) each
        y = grouped_mm(F.silu(gate) * up, down.transpose(1, 2), ends)  # (n*k, H)
        ys = torch.empty_like(y)
        ys[order] = y  # (n*k, H) back in (token, slot) order
        ys = torch.where(mine.flatten()[:, None], ys, 0.0).view(n, k, -1)  # (n, k, H): junk rows -> 0 (not NaN*0)
        wk = torch.where(mine, w, 0.0)  # (n, k) fp32
        return out.add_(torch.einsum("nkh,nk->nh", ys.float(), wk).to(out.dtype))  # weighted sum over slots, fp32

    def _grouped_kernels(self, x, w, mine, order, ends, out, gate_up, down):
        """The grouped form in kernels/grouped_gemm.py, three launches: gate_up reading x's rows in expert order
        in place, with SwiGLU in its epilogue; down; the router-weighted sum over slots reading down's rows in
        place (`combine_slots`). The same sum as `_grouped`'s torch ops, without the gather, h, the scatter back
        and the fp32 copy."""
        n, k = mine.shape
        fp8 = gate_up.dtype == torch.float8_e4m3fn
        kw_gu = dict(scale=self.gate_up_proj_scale_inv, block=self.fp8_block, split_rows=self.inter) if fp8 else {}
        kw_d = dict(scale=self.down_proj_scale_inv, block=self.fp8_block) if fp8 else {}
        # rows past ends[-1] (pairs not ours) are never read, by down or by combine_slots: left unwritten
        a = grouped_gemm(x, gate_up, ends, rows=order // k, swiglu=True, zero_rest=False, **kw_gu)  # (n*k, I)
        y = grouped_gemm(a, down, ends, zero_rest=False, **kw_d)  # (n*k, H), expert order
        pos = torch.empty_like(order)
        pos[order] = torch.arange(n * k, device=x.device)  # (n*k,): each (token, slot) pair's row of y
        pos = torch.where(mine.flatten(), pos, -1).view(n, k)  # (n, k): -1 where the expert is not ours
        return combine_slots(y, pos, w, out)  # out (n, H) += sum_j w * y[pos], fp32

    def forward_gather(self, x, w, idx, out):
        local, mine = self._local(idx)  # (n, k), (n, k)
        gu = self.gate_up(local, x.dtype)  # (n, k, 2I, H): each slot's expert weights
        gate, up = torch.einsum("nh,nkih->nki", x, gu).chunk(2, dim=-1)  # (n, k, I) each
        y = torch.einsum("nki,nkhi->nkh", F.silu(gate) * up, self.down(local, x.dtype))  # (n, k, H)
        wk = torch.where(mine, w, 0.0)  # (n, k) fp32
        return out.add_(torch.einsum("nkh,nk->nh", y.float(), wk).to(out.dtype))

    def forward_gemv(self, x, w, idx, out):
        local, mine = self._local(idx)  # (n, k), (n, k)
        gu = self.gate_up(local, x.dtype) * x[:, None, None, :]  # (n, k, 2I, H): compiled, an indexed load, not a copy
        gate, up = gu.sum(-1, dtype=torch.float32).to(x.dtype).chunk(2, dim=-1)  # (n, k, I) each, summed in fp32
        a = F.silu(gate) * up  # (n, k, I)
        y = (self.down(local, x.dtype) * a[:, :, None, :]).sum(-1, dtype=torch.float32)  # (n, k, H) fp32
        wk = torch.where(mine, w, 0.0)  # (n, k) fp32
        return out.add_(torch.einsum("nkh,nk->nh", y, wk).to(out.dtype))

    def forward_fused(self, x, w, idx, out, shared=None):
        """The Triton kernels of kernels/moe_decode.py: two launches, the chosen experts read in place (FP8 too);
        with `shared` (a SwiGLU that `can_fold`) its three matrices as one more slot of weight 1."""
        fp8 = dict(gate_up_scale=self.gate_up_proj_scale_inv, down_scale=self.down_proj_scale_inv,
                   block=self.fp8_block) if self.fp8 else {}
        if shared is not None:
            fp8["shared"] = (shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight)
        y = fused_moe(x, w, idx, self.gate_up_proj, self.down_proj, first_expert=self.first_expert, **fp8)  # (n, H)
        return out.add_(y.to(out.dtype))


HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


@functools.lru_cache(maxsize=None)
def _sm80(index) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 8


def grouped_mm(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows [ends[g-1], ends[g]) of a (m, K) times b[g] (K, N) -> (m, N). Rows past ends[-1] are left undefined.

    torch._grouped_mm where this torch build runs it (CUDA bf16 on sm80+, or the CPU; 16-byte aligned rows and
    pointers), a padded bmm otherwise.
    """
    if grouped_mm_native(a, b):
        return torch._grouped_mm(a, b, offs=ends)
    return padded_grouped_mm(a, b, ends)


def grouped_mm_native(a: torch.Tensor, *bs: torch.Tensor) -> bool:
    """Can torch._grouped_mm multiply rows of `a` by each of the expert banks `bs` (E, K, N) here?"""
    aligned = all(d * a.element_size() % 16 == 0 for b in bs for d in (a.shape[-1], b.shape[1], b.shape[2]))
    if not torch.compiler.is_compiling():  # (compiled code allocates aligned buffers itself)
        aligned = aligned and a.data_ptr() % 16 == 0 and all(b.data_ptr() % 16 == 0 for b in bs)
    device_ok = a.device.type == "cpu" or (a.dtype == torch.bfloat16 and _sm80(a.device.index))
    return HAS_GROUPED_MM and aligned and device_ok


def padded_grouped_mm(a, b, ends):
    """The fallback: scatter rows into a (G, cap, K) padded batch, one bmm, gather back. One host sync (cap)."""
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])  # (G,)
    sizes = (ends - starts).long()  # (G,)
    cap = int(sizes.max())  # host sync: the padded group size
    row = torch.arange(a.shape[0], device=a.device)  # (m,)
    group = torch.searchsorted(ends.long(), row, right=True).clamp(max=b.shape[0] - 1)  # (m,) group of each row
    slot = row - starts.long()[group]  # (m,) position inside the group
    valid = row < ends[-1]  # (m,)
    padded = a.new_zeros(b.shape[0], max(cap, 1), a.shape[1])  # (G, cap, K)
    padded[group[valid], slot[valid]] = a[valid]
    res = torch.bmm(padded, b)  # (G, cap, N)
    out = a.new_zeros(a.shape[0], b.shape[2])  # (m, N)
    out[valid] = res[group[valid], slot[valid]]
    return out
