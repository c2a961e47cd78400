"""Tensor + expert parallelism on torch.distributed, applied *after* the model is built (gpt-fast style).

The model code (model.py, mla.py, moe.py, ...) knows nothing about processes. `ParallelContext.shard(model)` walks a
(meta-device) model and swaps a few modules for parallel ones of the same name, so the checkpoint names stay the same
and `from_pretrained(path, parallel=ctx)` can read each rank's slices straight from the memory-mapped safetensors:

    module                               split                            communication
    embed_tokens                         vocab rows                       all_reduce (each id lives on one rank)
    MLA q_b_proj / q_proj, kv_b_proj     output columns = heads           -- (64 heads / 16 ranks = 4 per rank)
    MLA o_proj                           input columns = heads            all_reduce (row-parallel)
    MLA q_a, kv_a (+ norms), router      replicated                       --
    dense SwiGLU (mlps, GLM dense)       gate/up columns, down rows       all_reduce
    MoE routed experts                   experts [r*E/W, (r+1)*E/W)       one all_reduce for the whole MoE, async
    MoE zero (identity) experts          added on rank 0 only             (inside that one all_reduce)
    MoE shared experts (GLM)             gate/up columns, down rows       (inside that one all_reduce)
    lm_head                              vocab rows                       all_gather -> every rank has full logits

Tokens are replicated: every rank sees the whole batch and computes the same router decision (the router input is
the output of an all_reduce, identical on all ranks). Each rank runs only its own experts on the tokens routed to
them; one sum over ranks then gives the MoE output.

ScMoE overlap: `ParallelMoE.start` launches that sum as an *asynchronous* all_reduce on its own process group (its own
NCCL communicator, hence its own CUDA stream) and returns the tensor in flight; `finish` waits for it. LongcatLayer
calls `start` right after attention 0 and `finish` only where the shortcut is added, so the reduction overlaps dense
FFN 0, attention 1 and dense FFN 1 -- the point of the shortcut-connected MoE. (On the default group the o_proj / FFN
reductions would queue behind it on the same stream.)

Every collective is a functional collective (`torch.distributed._functional_collectives`, as gpt-fast uses): it
returns a tensor and is waited on where that tensor is used. The same code then runs eagerly, inside a captured
CUDA graph (NCCL supports capture) and under torch.compile, so generate(fast=True) works on a sharded model as it
does on a whole one: the sharded model *is* the model, with a few modules swapped.

At world size 1 (no torchrun, no process group), `ParallelContext()` changes nothing: notebooks never need one.

Why parallelize after construction rather than parallel layers in the model: the model files stay the single,
readable, process-free description of the math; the parallel plan is this one file; and sharding a *meta* model
before allocation means no process ever holds more than its own slices.
"""

from __future__ import annotations

import atexit
import datetime
import math
import os
import time

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from ..model.experts import Experts, SwiGLU
from ..model.mla import MLA
from ..model.moe import MoE
from ..model.quant import linear


_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # renamed after torch 2.11


class ParallelError(ValueError):
    """A world size this model cannot be split over (raised before anything is loaded)."""


# ---------------------------------------------------------------------------------------------- parallel modules
class RowParallelLinear(nn.Linear):
    """y = all_reduce(x_local @ W_local^T) + b: this rank holds in_features / W input columns; bias added once."""

    def __init__(self, in_local: int, out: int, bias: bool, group, reduce: bool = True, device=None, dtype=None):
        super().__init__(in_local, out, bias=bias, device=device, dtype=dtype)
        self.group, self.reduce = group, reduce

    def forward(self, x):  # x (..., in/W) -> (..., out)
        y = linear(x, self)  # (..., out): this rank's partial sum (the weight may be kept FP8: model/quant.py)
        if self.reduce:
            y = funcol.all_reduce(y, "sum", self.group)
        return y if self.bias is None else y + self.bias  # a partial (reduce=False) output carries no bias


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, start + n) of the embedding table; ids outside are looked up elsewhere and summed in."""

    def __init__(self, n_local: int, dim: int, start: int, group, device=None, dtype=None, vocab_size=None):
        super().__init__(n_local, dim, device=device, dtype=dtype)
        self.start, self.group, self.vocab_size = start, group, vocab_size

    def forward(self, ids):  # ids (b, t) -> (b, t, H)
        # An id outside the whole vocabulary would be owned by no rank and silently become a zero vector: refuse it,
        # as nn.Embedding does in one process. The check costs one host sync per forward, so it is skipped while a
        # CUDA graph is captured or torch.compile traces (the fast decode step: its ids come from generate, which
        # checked the prompt and only produces ids < vocab_size).
        if self.vocab_size is not None and ids.numel() and not torch.compiler.is_compiling() and not (
                ids.is_cuda and torch.cuda.is_current_stream_capturing()):
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"input_ids hold ids outside [0, vocab_size={self.vocab_size}): min {lo}, max {hi}")
        local = ids - self.start  # (b, t)
        mine = (local >= 0) & (local < self.num_embeddings)  # (b, t)
        x = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)  # (b, t, H)
        x = x * mine[..., None].to(x.dtype)  # zero rows this rank does not own
        return funcol.all_reduce(x, "sum", self.group)


class VocabParallelHead(nn.Linear):
    """lm_head over vocab rows [r*V/W, (r+1)*V/W); all_gather gives every rank the full, identical logits."""

    def __init__(self, hidden: int, v_local: int, group, world: int, device=None, dtype=None):
        super().__init__(hidden, v_local, bias=False, device=device, dtype=dtype)
        self.group, self.world = group, world

    def forward(self, x):  # x (b, t, H) -> (b, t, V)
        y = F.linear(x, self.weight).contiguous()  # (b, t, V/W)
        parts = _all_gather(y, 0, self.group)  # (W*b, t, V/W): rank r's slice in rows r*b..
        return torch.cat(funcol.wait_tensor(parts).chunk(self.world, dim=0), dim=-1)  # (b, t, V): same on all ranks


class ParallelMoE(MoE):
    """This rank's experts (+ zero experts on rank 0, + its slice of the shared experts); one async all_reduce."""

    def __init__(self, cfg, rank: int, world: int, group):
        super().__init__(cfg)
        n = cfg.n_routed_experts // world
        self.experts = Experts(n, cfg.hidden_size, cfg.expert_ffn_hidden_size, first_expert=rank * n)
        self.add_zero_experts = self.add_zero_experts and rank == 0  # identity output added exactly once
        self.group = group

    def start(self, x, experts: str = "loop", router: str = "plain", linear: str = "plain"):
        """x (b, t, H) -> the sum over ranks of this rank's share, in flight when this returns."""
        return funcol.all_reduce(self.compute(x, experts, router, linear), "sum", self.group)  # (b, t, H), async

    def finish(self, pending):
        return funcol.wait_tensor(pending)  # (b, t, H): the full MoE output (on GPU the host does not block)


# ---------------------------------------------------------------------------------------------- the context
def _let_gloo_threads_finish():
    """At exit, before the interpreter finalizes: release the GIL for a moment.

    gloo's worker threads drop their last collective (and its tensors) just after it completes, and a tensor's
    Python object needs the GIL to go. A thread that asks for the GIL once the interpreter is finalizing aborts the
    process (std::terminate: SIGABRT after all work is done, ~1 run in 10 of the 2-rank CPU test before this hook).
    atexit hooks run before that point, so the threads finish here.
    """
    time.sleep(0.2)


class ParallelContext:
    """Who am I (rank of world), which groups to talk over, which device to use. World size 1 = plain model.

    `rank`/`world_size` without a process group build a context for *planning only* (plan.py, `check`): `shard`
    then works on a meta model, but a forward pass needs the real groups (use `from_env` under torchrun).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, group=None, moe_group=None, device="cpu",
                 local_rank: int = 0):
        if not 0 <= rank < world_size:
            raise ParallelError(f"rank {rank} is not in [0, world_size={world_size})")
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.group, self.moe_group = group, moe_group
        self.device = torch.device(device)
        self.plan: dict[str, int] = {}  # parameter name -> dim it is split along (filled by `shard`)

    # -------------------------------------------------------------------------- setup
    @classmethod
    def from_env(cls, backend: str | None = None, timeout_s: float | None = None,
                 cpu: bool = False) -> "ParallelContext":
        """Under torchrun: join the process group (env://) and pick cuda:LOCAL_RANK (or cpu). Otherwise world 1.

        cpu: run on the CPU (gloo) even where GPUs are visible.
        timeout_s (default: env LONGCAT_DIST_TIMEOUT or 300): how long a collective may wait for a peer before
        this process raises instead of hanging (a dead rank makes the others exit with an error).
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        gpu = torch.cuda.is_available() and not cpu
        if world == 1 and not dist.is_initialized():
            return cls(device="cuda" if gpu else "cpu")
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        if gpu:
            if local_rank >= torch.cuda.device_count():
                raise ParallelError(f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                                   f"device(s): start at most that many processes per node, or run on the CPU")
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        timeout = datetime.timedelta(seconds=timeout_s or float(os.environ.get("LONGCAT_DIST_TIMEOUT", "300")))
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timeout)
        if backend == "gloo":
            atexit.unregister(_let_gloo_threads_finish)  # once, however many contexts
            atexit.register(_let_gloo_threads_finish)
        # A second communicator for the MoE reduction: on NCCL it gets its own stream, so the async MoE all_reduce
        # runs concurrently with the o_proj / FFN all_reduces of the default group instead of queueing before them.
        moe_group = dist.new_group(backend=backend, timeout=timeout)
        return cls(dist.get_rank(), dist.get_world_size(), dist.group.WORLD, moe_group, device, local_rank)

    def close(self):
        """Leave the process groups (call it on every rank, last thing before exit)."""
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, *args, **kw):
        """print on rank 0 only."""
        if self.is_main:
            print(*args, **kw)

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank (e.g. a prompt typed into rank 0's terminal)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    # -------------------------------------------------------------------------- the plan
    def check(self, cfg) -> None:
        """Raise ParallelError naming every size that this world size does not divide (before loading anything)."""
        W = self.world_size
        if W == 1:
            return
        sizes = {"num_attention_heads": cfg.num_attention_heads, "vocab_size": cfg.vocab_size}
        if cfg.is_longcat or not all(cfg.layer_is_moe):  # dense FFNs exist
            sizes["ffn_hidden_size"] = cfg.ffn_hidden_size
        if any(cfg.layer_is_moe):
            sizes["n_routed_experts"] = cfg.n_routed_experts
            if cfg.n_shared_experts:
                sizes["shared expert width"] = cfg.n_shared_experts * cfg.expert_ffn_hidden_size
        bad = [f"{k}={v}" for k, v in sizes.items() if v % W]
        if bad:
            g = math.gcd(*sizes.values())
            ok = [d for d in range(1, min(g, 1024) + 1) if g % d == 0]
            raise ParallelError(f"world size {W} does not divide {', '.join(bad)} of this {cfg.model_type} config; "
                                f"use a world size that divides all of {sorted(set(sizes.values()))}: one of {ok}")

    def shard(self, model) -> None:
        """Swap modules of `model` (best on the meta device, before allocation) for this rank's parallel ones."""
        if self.world_size == 1:
            return
        cfg = model.config
        self.check(cfg)
        W, r, g = self.world_size, self.rank, self.group
        self.plan = {}
        model.world_size = W
        dev, dt = model.lm_head.weight.device, model.lm_head.weight.dtype
        kw = dict(device=dev, dtype=dt)

        def column(parent, name, prefix):  # output features split: keep rows [r*n, (r+1)*n)
            old = getattr(parent, name)
            setattr(parent, name, nn.Linear(old.in_features, old.out_features // W, bias=old.bias is not None, **kw))
            self.plan[f"{prefix}.{name}.weight"] = 0
            if old.bias is not None:
                self.plan[f"{prefix}.{name}.bias"] = 0

        def row(parent, name, prefix, group, reduce=True):  # input features split: keep columns [r*n, (r+1)*n)
            old = getattr(parent, name)
            setattr(parent, name, RowParallelLinear(old.in_features // W, old.out_features, old.bias is not None,
                                                    group, reduce, **kw))
            self.plan[f"{prefix}.{name}.weight"] = 1

        def swiglu(m, prefix, group, reduce=True):
            column(m, "gate_proj", prefix)
            column(m, "up_proj", prefix)
            row(m, "down_proj", prefix, group, reduce)

        V = cfg.vocab_size // W
        model.model.embed_tokens = VocabParallelEmbedding(V, cfg.hidden_size, r * V, g, vocab_size=cfg.vocab_size, **kw)
        model.lm_head = VocabParallelHead(cfg.hidden_size, V, g, W, **kw)
        self.plan["model.embed_tokens.weight"] = self.plan["lm_head.weight"] = 0
        for name, m in list(model.named_modules()):
            if isinstance(m, MLA):
                m.n_heads //= W  # local heads
                column(m, "q_proj" if hasattr(m, "q_proj") else "q_b_proj", name)
                column(m, "kv_b_proj", name)
                row(m, "o_proj", name, g)
            elif isinstance(m, MoE):
                parent, child = name.rsplit(".", 1)
                with torch.device(dev):
                    pm = ParallelMoE(cfg, r, W, self.moe_group)
                pm.to(dt)
                pm.router.e_score_correction_bias.data = pm.router.e_score_correction_bias.data.float()
                model.get_submodule(parent).register_module(child, pm)
                self.plan[f"{name}.experts.gate_up_proj"] = self.plan[f"{name}.experts.down_proj"] = 0
                if pm.shared_experts is not None:  # partial sums, reduced with the experts' in one all_reduce
                    swiglu(pm.shared_experts, f"{name}.shared_experts", self.moe_group, reduce=False)
            elif isinstance(m, SwiGLU) and ".shared_experts" not in name:
                swiglu(m, name, g)

    def shard_rule(self, name: str, global_shape) -> tuple[int, int, int] | None:
        """The slice (dim, start, end) of checkpoint tensor `name` this rank owns, or None for all of it."""
        dim = self.plan.get(name)
        if dim is None:
            return None
        n = global_shape[dim] // self.world_size
        return dim, self.rank * n, (self.rank + 1) * n

    def __repr__(self):
        return f"ParallelContext(rank={self.rank}, world_size={self.world_size}, device={self.device})"


    def common_seed(self, seed: int | None = None) -> int:
        """A sampling seed that is the same on every rank: `seed`, or one drawn on rank 0 and broadcast."""
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ())) if self.is_main else 0
        return int(self.broadcast_object(seed))


# ---------------------------------------------------------------------------------------------- demo hook
def load_parallel(path, dtype=torch.bfloat16, **kw):
    """For demo.py: join torchrun's process group (world size 1 without torchrun), load this rank's shard of the
    checkpoint at `path` onto cuda:LOCAL_RANK (or cpu) -> (model, ctx).

    Then, on EVERY rank, in lockstep: read user input on rank 0 only and share it (`ctx.broadcast_object`); call
    `model.generate(...)` with the same arguments and `seed=ctx.common_seed(args.seed)` (the logits are all-gathered,
    identical on all ranks, so greedy and seeded sampling pick identical tokens); print with `ctx.print`; finish with
    `ctx.close()`.
    """
    from ..io.checkpoint import from_pretrained

    ctx = ParallelContext.from_env()
    return from_pretrained(path, dtype=dtype, device=ctx.device, parallel=ctx, **kw), ctx
