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
