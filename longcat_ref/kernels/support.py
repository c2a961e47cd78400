"""Can a Triton kernel run here? (CUDA with Triton, or Triton's CPU interpreter.)"""

from __future__ import annotations

import importlib.util
import os

import torch

def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None (blocked on purpose)
        return False


HAVE_TRITON = _find_triton()  # a constant: torch.compile traces calls through it without a graph break


def have_triton() -> bool:
    return HAVE_TRITON


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run on the CPU through Triton's interpreter (read when a kernel is defined)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def can_run(x: torch.Tensor) -> bool:
    """Can a kernel run on tensors living where x lives?"""
    return have_triton() and (x.is_cuda or (interpreting() and x.device.type == "cpu"))


def require(x: torch.Tensor, what: str) -> None:
    """Raise a one-line error saying what to do when a kernel form is asked for where it cannot run."""
    if not have_triton():
        raise RuntimeError(f"{what} needs Triton (pip install triton; it comes with CUDA builds of torch); "
                           "use the plain form instead")
    if not can_run(x):
        raise RuntimeError(f"{what} runs on CUDA tensors (got {x.device}); on the CPU use the plain form, or set "
                           "TRITON_INTERPRET=1 before importing longcat_ref to run the kernel slowly in Triton's "
                           "interpreter")


# Programmatic dependent launch (PDL, sm_90 and later): a kernel launched with it may start while the kernel before it
# in the stream is finishing -- its programs are scheduled, and run up to their `gdc_wait()`, which blocks until the
# previous kernel has completed and its writes are visible. At decode every layer is ~19 short kernels in a row, so
# the gap between two of them (launch, scheduling, the first loads) is a real part of the step. Each of our decode
# kernels takes a PDL constexpr: when it is set, the program calls gdc_wait() before it reads anything and then
# gdc_launch_dependents() (the next kernel may be scheduled). The math and the results are the same either way.
USE_PDL = True  # a constant, read at launch: False launches every kernel plainly (the A/B of a benchmark)


_SM90: dict = {}  # device index -> sm_90 or later (a plain dict, not lru_cache: torch.compile traces `pdl` when
# linear.takes_prefetch asks it at trace time, and dynamo warns on lru_cache-wrapped functions)


def _sm90(index: int) -> bool:
    if index not in _SM90:
        _SM90[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _SM90[index]


def pdl(x: torch.Tensor) -> bool:
    """Launch with programmatic dependent launch? CUDA (not the interpreter) on sm_90 or later, and USE_PDL."""
    return USE_PDL and x.is_cuda and not interpreting() and _sm90(x.device.index or 0)


LINE_BYTES = 128  # the cache line one `prefetch_l2` address brings in

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def prefetch_l2(ptrs):
        """Ask L2 for the 128-byte line holding each pointer of the block (PTX `prefetch.global.L2`), before a
        kernel's dependent-launch wait: a hint, which reads no value into registers and makes nothing wait. L2 is
        where every SM's later loads look, so a line another kernel is still writing is read correctly after the
        wait: a prefetch can change when bytes arrive, never which. PTX only: not in Triton's CPU interpreter (the
        kernels compile it only with PDL, which the interpreter never has)."""
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)
