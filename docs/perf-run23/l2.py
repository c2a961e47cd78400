"""perf-run23's L2 prefetch kernel (the record of what exp.py and exp2.py ran; it was in the package as
`longcat_ref/kernels/l2_prefetch.py` for those calls and left it after them: measured no faster, see README.md).

Weights asked of L2 ahead of the kernel that reads them: one bulk prefetch instruction per chunk (sm_90+).

Why. At batch 1 a decode layer alternates kernels that stream weights at the memory's bandwidth (the projections,
the MoE) with kernels bound by latency (the attention's split and merge, the norms, the router), during which the
memory sits nearly idle: ~15 us a GLM-4.7-Flash layer on one H100 (docs/perf-run22/). A weight is never written by
the step, so it may be fetched at any time; asking L2 for the next projection's weight while the latency-bound
kernels run would let that projection read it from L2 instead of HBM.

How. Hopper's copy engine takes `cp.async.bulk.prefetch.L2.global [addr], size`: one instruction asks L2 for
`size` contiguous bytes (a multiple of 16), reads nothing into registers or shared memory, and makes nothing wait.
Program p of P takes chunks [p * BLOCK, (p + 1) * BLOCK) of the tensor's bytes, one chunk a thread: CHUNK =
ceil(nbytes / (P * BLOCK)) rounded up to 128 bytes; a thread whose chunk starts past the end issues nothing (a
predicate in the instruction). A hint: it changes when bytes arrive, never which (L2 is where every SM's loads
look), so no result depends on it.

PTX only: no CPU interpreter form.
"""

from __future__ import annotations

import torch

from longcat_ref.kernels import support

WHAT = "l2_prefetch (the bulk L2 prefetch kernel)"
BLOCK = 128  # chunks a program: one a thread at 4 warps
NUM_WARPS = 4

if support.have_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def bulk_prefetch_l2(ptrs, nbytes):
        """Ask L2 for nbytes (int32, a multiple of 16; 0 issues nothing) from each byte pointer of the block."""
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [ptrs, nbytes], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _l2_prefetch_kernel(P, NBYTES, CHUNK, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pid = tl.program_id(0)
        first = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64) * CHUNK  # (BLOCK,) each thread's first byte
        size = tl.minimum(tl.maximum(NBYTES - first, 0), CHUNK).to(tl.int32)  # (BLOCK,) its bytes (0 past the end)
        bulk_prefetch_l2(P.to(tl.pointer_type(tl.int8)) + first, size)
        if PDL:  # nothing here reads what an earlier kernel writes: the wait only keeps the stream's order
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()


def plan(nbytes: int, programs: int) -> int:
    """CHUNK: the bytes one thread asks for, a multiple of 128, so that programs x BLOCK threads cover nbytes."""
    per = -(-nbytes // (programs * BLOCK))
    return max(128, -(-per // 128) * 128)


def l2_prefetch(t: torch.Tensor, programs: int = 132) -> None:
    """Ask L2 for t's bytes (contiguous, CUDA, sm_90+) with `programs` programs: a hint, no result."""
    if not (t.is_cuda and support.have_triton() and support._sm90(t.device.index or 0)):
        raise RuntimeError(f"{WHAT} runs on CUDA sm_90+ tensors (got {t.device})")
    if not t.is_contiguous() or t.nbytes % 16:
        raise ValueError(f"{WHAT}: the tensor must be contiguous with a multiple of 16 bytes, got strides "
                         f"{t.stride()} and {t.nbytes} bytes")
    pdl = support.pdl(t)
    _l2_prefetch_kernel[(programs,)](t, t.nbytes, plan(t.nbytes, programs), BLOCK=BLOCK, PDL=pdl,
                                     num_warps=NUM_WARPS, launch_pdl=pdl)
