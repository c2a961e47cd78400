"""LongCat-Flash's shortcut MoE on a side CUDA stream: the overlap the shortcut connection exists for, on one GPU.

Why it can overlap. In a LongCat-Flash layer (model.py) the MoE reads h = norm(x after attention 0), and its output
is added only at the very end of the layer:

    main stream:   attn0 -> h -> mlp0(h) -> attn1 -> mlp1 -> x + ... + shortcut
                              \\                              /
    side stream:               +---- moe(h) ----------------+      (fork after h, join before the last add)

Nothing in between reads the MoE's output, so the two branches may run at the same time. Across GPUs that hides
the experts' all-reduce (runtime/parallel.py). On one GPU the branches use the machine differently: in a prefill
the expert GEMMs read the whole expert bank and are bound by memory bandwidth (LongCat-Flash, 2k tokens: ~9.6 ms
at the memory floor), while the dense projections and attention of the other branch are bound by arithmetic; in a
decode step both are chains of small kernels that leave the GPU idle between launches. Two streams let the GPU
schedule one branch's blocks into the other's idle SMs and bandwidth (docs/perf-run14/ measures it).

The form `Forms(shortcut=...)` chooses (never global state): "inline" runs the MoE on the current stream where the
layer calls it (the reference order); "stream" forks it onto this device's side stream; "auto" is "stream" for
CUDA tensors outside torch.compile, else "inline". The kernels are the same either way, so the result is bit-equal
(tests/test_fast.py). The fork and the join also work while a CUDA graph is being captured: the graph then holds
the two branches as parallel paths. Inside torch.compile the MoE runs eagerly between two compiled graphs (the
functions below are compiler-disabled: dynamo does not trace stream switches), so "auto" keeps compiled steps
inline.

Memory: the side stream waits for the main stream before each MoE (so it reads a finished h, and blocks the main
stream freed earlier are not reused under it), and the main stream waits for the side stream before it reads the
MoE's output; every tensor crossing the streams is kept alive until after the join.
"""

from __future__ import annotations

import torch

_SIDE: dict = {}  # torch.device -> its side stream (one per device, made on first use)


def shortcut_on_stream(form: str, x: torch.Tensor) -> bool:
    """Does the shortcut MoE run on the side stream? form: a Forms.shortcut value; x: the layer's input."""
    if form == "inline":
        return False
    if form == "stream":
        if not x.is_cuda:
            raise ValueError(f"shortcut='stream' needs CUDA tensors, got {x.device.type}; use 'inline' or 'auto'")
        return True
    return x.is_cuda and not torch.compiler.is_compiling()  # "auto"


def side_stream(device: torch.device) -> torch.cuda.Stream:
    device = torch.device(device)
    if device not in _SIDE:
        _SIDE[device] = torch.cuda.Stream(device)
    return _SIDE[device]


@torch.compiler.disable
def start_on_side_stream(moe, h: torch.Tensor, experts: str, router: str, linear: str):
    """moe.start(h, ...) launched on the side stream after everything queued so far on the current one."""
    side = side_stream(h.device)
    side.wait_stream(torch.cuda.current_stream(h.device))
    with torch.cuda.stream(side):
        return moe.start(h, experts, router, linear)


@torch.compiler.disable
def join_side_stream(device: torch.device) -> None:
    """The current stream waits for the side stream's work (the MoE) before what it queues next."""
    torch.cuda.current_stream(device).wait_stream(side_stream(device))
