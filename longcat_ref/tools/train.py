"""Train a tiny LongCat-Flash on a CPU and watch its dynamic computation: zero-computation experts under an expert
bias steered by a PID controller, plus the hidden z-loss and a load-balance loss.

    python -m longcat_ref.tools.train --plot docs/training_dynamics.png   # into runs/tiny-longcat, + two ablations
    python -m longcat_ref.tools.train --ship --plot docs/training_dynamics.png   # rewrite the shipped model (README)
    python -m longcat_ref.tools.train --steps 20 --ablation-steps 0 --out /tmp/x          # a quick look

The checkpoint goes to --out (default runs/tiny-longcat, relative to the working directory); the package's own
model (longcat_ref/assets/tiny-longcat, SHIPPED_DIR) is only rewritten with --ship. Every output path is checked
before training starts, and the files are written with the usual permissions (0644 under umask 022).

What the sources say, and what we do (model card in /work/shared/seeds; tech report arXiv 2509.01322, whose body we
know only through public summaries -- marked [summary] -- so treat those details as unconfirmed):

* Budget control. Each MoE picks k = 12 of 512 FFN + 256 zero (identity) experts; the model card says the average
  stays at ~27B activated parameters (about 8 FFN experts of 12 slots) thanks to an "expert bias adjusted by a PID
  controller". [summary] The bias update is

      delta b_i = mu * (K_e / K * 1 / N  -  T_i / (K * T_all))        for each FFN expert i (N of them)

  (T_i tokens sent to expert i out of T_all tokens, K slots each) and the zero experts' biases are not updated:
  when every FFN expert gets its share K_e/(K N), the zero experts get the rest. That rule is the *integral* term of
  a PID controller on e_i = K_e/(K N) - T_i/(K T_all). `ExpertBiasPID` adds proportional and derivative terms
  (positional form); with kp = kd = 0 and ki = mu it is exactly the rule above. The gains are ours (TrainConfig),
  chosen on a synthetic router and short runs: the bias is added to softmax probabilities (~1/36 each here), so
  useful gains are ~1e-2; a larger ki (0.2) made the budget oscillate between 2 and 11 FFN experts per token, and the
  per-step counts are noisy enough that kd > 0 only adds jitter (kd = 0). The bias is a buffer, never trained.
* Load balance. The per-expert targets above also balance the FFN experts (corpus level, as the report says);
  [summary] the report adds a device-level balance loss with all zero experts as one extra group. We add a
  Switch-style balance loss among the FFN experts only (`balance_loss`), so it never fights the controller's budget.
* Hidden z-loss against massive activations (model card: "a hidden z-loss to suppress massive activations"):
  coef * mean_t (logsumexp_i |h_t,i|)^2 over every layer's output hidden state h ([summary] a z-loss on hidden
  states with a small coefficient; the exact form and coefficient here are ours).
* Deterministic computation (model card: it "guarantees the exact reproducibility of experiments"): seeded init and
  batches, torch.use_deterministic_algorithms; on one CPU with a fixed thread count the same seed gives the same
  loss curve bit for bit (tests/test_train.py). Other CPUs or thread counts may round differently.

* Ours, not LongCat's: the routers train at 10x the learning rate without weight decay (`make_optimizer` says why).

Not reproduced: hyperparameter transfer, model-growth init, router-gradient balancing, bf16/fp8, parallelism.

Training itself is plain: AdamW, linear warmup + cosine decay, gradient clipping, next-token cross-entropy on a chat
corpus built from standard-library docstrings (data.py). The router's top-k runs under no_grad; gradients reach the
router through the gathered (unbiased) probabilities that weight each expert's output, and through the balance loss.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from . import data as D
from ..io.chat import LONGCAT_CHAT_TEMPLATE
from ..io.checkpoint import save_checkpoint
from ..io.tokenizer import save_tokenizer, train_tokenizer
from ..model.config import ModelConfig, tiny_longcat
from ..model.counts import parameter_counts
from ..model.model import CausalLM, init_weights

SHIPPED_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tiny-longcat")  # in the package
DEFAULT_OUT = os.path.join("runs", "tiny-longcat")  # relative to the working directory, never inside the package


def model_config(vocab_size: int, seq_len: int = 128) -> ModelConfig:
    """The shipped tiny LongCat-Flash: LongCat-Flash-Chat's proportions (FFN:zero experts = 2:1, top-12) at toy size."""
    return tiny_longcat(vocab_size=vocab_size, hidden_size=128, num_layers=2, num_attention_heads=4, q_lora_rank=64,
                        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, ffn_hidden_size=256,
                        expert_ffn_hidden_size=64, n_routed_experts=24, zero_expert_num=12, moe_topk=12,
                        routed_scaling_factor=6.0, max_position_embeddings=max(512, seq_len), rope_theta=1e4)


@dataclass
class TrainConfig:
    steps: int = 200  # length of the lr schedule
    stop_after: int | None = None  # stop early (ablations: the main run's first steps, same schedule)
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    router_lr_mult: float = 10.0  # see make_optimizer
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 20
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    clip: float = 1.0
    seed: int = 0
    init_std: float = 0.02
    # budget controller: target share of the k slots that land on FFN experts (LongCat-Flash-Chat: ~8 of 12)
    controller: bool = True
    target_real_share: float = 8 / 12
    kp: float = 0.02
    ki: float = 0.05
    kd: float = 0.0
    z_loss: float = 1e-4  # hidden z-loss coefficient (0: off)
    balance: float = 0.01  # load-balance loss coefficient among FFN experts (0: off)
    vocab_size: int = 2048
    eval_every: int = 50
    threads: int = 2

    def lr_at(self, step: int) -> float:
        """Linear warmup to lr over `warmup` steps, then cosine decay to lr * min_lr_ratio at `steps`."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


# ------------------------------------------------------------------------------------------------- controller
class ExpertBiasPID:
    """PID control of one router's e_score_correction_bias so each FFN expert receives target/N of the slots.

    error_i(t)  = target / N - T_i / (K T_all)                       i over the N FFN experts (fp64 state)
    b_i(t)      = kp * error_i(t) + ki * sum_{s<=t} error_i(s) + kd * (error_i(t) - error_i(t-1))
    b_zero      = 0                                                   zero experts' biases are never changed

    Positive error (expert under-used) raises its bias, so it wins top-k more often. Since the router's scores
    are softmax probabilities (~1/(N+Z) each), useful gains are of the order of 1e-2.
    """

    def __init__(self, router, n_routed: int, target_share: float, kp: float, ki: float, kd: float):
        self.router, self.n = router, n_routed
        self.target = target_share / n_routed  # K_e / (K N)
        self.kp, self.ki, self.kd = kp, ki, kd
        self.integral = torch.zeros(n_routed, dtype=torch.float64)
        self.prev = None

    @torch.no_grad()
    def update(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (n, k): the experts chosen in the last step -> the new FFN-expert biases (N,)."""
        counts = torch.bincount(idx.flatten(), minlength=self.router.n_experts)[: self.n]  # (N,) T_i
        share = counts.double() / idx.numel()  # T_i / (K T_all)
        err = self.target - share  # (N,)
        self.integral += err
        deriv = torch.zeros_like(err) if self.prev is None else err - self.prev
        self.prev = err
        b = self.kp * err + self.ki * self.integral + self.kd * deriv  # (N,)
        self.router.e_score_correction_bias[: self.n] = b.float()
        return b


# ------------------------------------------------------------------------------------------------- statistics
def routing_stats(idx: torch.Tensor, n_routed: int, n_experts: int) -> dict:
    """idx (n, k) -> real experts per token (mean), and the FFN experts' load spread (max/mean, coeff. of var.)."""
    real = (idx < n_routed).sum(-1).double()  # (n,) FFN experts per token
    load = torch.bincount(idx.flatten(), minlength=n_experts)[:n_routed].double()  # (N,)
    mean = load.mean().clamp(min=1e-9)
    return {"real_per_token": real.mean().item(), "load_max_over_mean": (load.max() / mean).item(),
            "load_cv": (load.std(unbiased=False) / mean).item()}


def hidden_z_loss(hidden: list[torch.Tensor]) -> torch.Tensor:
    """mean over layers and tokens of (logsumexp_i |h_i|)^2, computed in fp32: large for massive activations."""
    z = [torch.logsumexp(h.float().abs(), dim=-1) for h in hidden]  # each (b, t)
    return torch.stack([(x**2).mean() for x in z]).mean()


def balance_loss(scores: torch.Tensor, idx: torch.Tensor, n_routed: int) -> torch.Tensor:
    """Switch-style load balance among the FFN experts only: N * sum_i f_i * P_i, 1.0 when uniform.

    f_i: share of the FFN-expert slots that went to expert i (no gradient); P_i: expert i's share of the mean router
    probability over FFN experts. Normalised within the FFN experts, so it never pushes the FFN-vs-zero split,
    which is the controller's job. (The report's device-level balance loss puts all zero experts in one extra
    group; with no devices here, each FFN expert is its own group.)
    """
    p = scores[:, :n_routed].mean(0)  # (N,) fp32, differentiable
    real = idx[idx < n_routed]
    f = torch.bincount(real, minlength=n_routed).float() / max(1, real.numel())  # (N,)
    return n_routed * (f * (p / p.sum())).sum()


class RouterTap:
    """Forward hooks that keep each router's (differentiable) scores for the balance loss."""

    def __init__(self, model):
        self.scores, self.idx = [], []
        self.handles = [b.router.register_forward_hook(self.hook) for b in model.moe_blocks()]

    def hook(self, router, inputs, output):
        self.scores.append(router.scores(inputs[0]))  # (n, E): recomputed, a small (n, H) x (H, E) product
        self.idx.append(output[1])

    def remove(self):
        for h in self.handles:
            h.remove()


def lm_loss(model, rows: torch.Tensor, z_coef: float = 0.0, balance_coef: float = 0.0):
    """rows (b, t+1) -> (total loss, cross-entropy, z-loss value, max |hidden|, balance-loss value)."""
    x, y = rows[:, :-1], rows[:, 1:]
    tap = RouterTap(model)
    try:
        logits, hidden = model(x, output_hidden_states=True)  # (b, t, V), [embeddings, layer outputs...]
    finally:
        tap.remove()
    ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    layer_out = hidden[1:]
    z = hidden_z_loss(layer_out)
    max_act = max(h.detach().abs().max() for h in layer_out)
    n = model.config.n_routed_experts
    bal = torch.stack([balance_loss(s, i, n) for s, i in zip(tap.scores, tap.idx)]).mean()
    total = ce
    if z_coef:
        total = total + z_coef * z
    if balance_coef:
        total = total + balance_coef * bal
    return total, ce, z.detach(), max_act, bal.detach()


def make_optimizer(model, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms (1-d weights) and routers; routers at lr * router_lr_mult.

    Why the router multiplier: with one lr for all, the tiny router's softmax stayed almost uniform (per-token std
    of its 36 probabilities ~0.001 around 1/36 after 80 steps), so the controller's +-0.003 biases decided the
    selection and routing was nearly token-independent; at 10x (no decay) the std was ~0.02 and routing followed
    the tokens (measured on this model; not a LongCat recipe). foreach=False: the plain per-parameter loop.
    """
    router = [p for n, p in model.named_parameters() if ".router." in n]
    rid = {id(p) for p in router}
    decay = [p for p in model.parameters() if p.ndim >= 2 and id(p) not in rid]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0},
                              {"params": router, "weight_decay": 0.0, "lr_mult": tc.router_lr_mult}],
                             lr=tc.lr, betas=tc.betas, eps=tc.eps, foreach=False)


def train_step(model, opt, rows: torch.Tensor, tc: TrainConfig, lr: float):
    """One optimizer step on rows (b, t+1) -> (loss, ce, z, max|h|, grad norm before clipping)."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    loss, ce, z, max_act, bal = lm_loss(model, rows, tc.z_loss, tc.balance)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip)
    opt.step()
    return loss.detach(), ce.detach(), z, max_act, bal, gn


@torch.no_grad()
def evaluate(model, rows: torch.Tensor, batch: int = 32) -> float:
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(rows), batch):
        r = rows[i:i + batch]
        logits = model(r[:, :-1])
        tot += F.cross_entropy(logits.float().flatten(0, 1), r[:, 1:].flatten(), reduction="sum").item()
        n += r[:, 1:].numel()
    model.train()
    return tot / n


# ------------------------------------------------------------------------------------------------- training
@dataclass
class Run:
    model: CausalLM
    metrics: dict = field(default_factory=dict)


def train(tc: TrainConfig, cfg: ModelConfig, train_rows: torch.Tensor, val_rows: torch.Tensor | None = None,
          log=print, name: str = "run") -> Run:
    """Train a fresh model from seed tc.seed; returns it with per-step metrics (lists)."""
    with deterministic():
        return _train(tc, cfg, train_rows, val_rows, log, name)


@contextlib.contextmanager
def deterministic():
    """torch.use_deterministic_algorithms for the block (restored after). Uninitialised memory is not filled with
    NaN (torch's default in this mode): every buffer we allocate is written before it is read, and the fill costs
    ~20% of a CPU step here."""
    import torch.utils.deterministic as det

    old = (torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old[0])
        det.fill_uninitialized_memory = old[1]


def _train(tc, cfg, train_rows, val_rows, log, name) -> Run:
    torch.manual_seed(tc.seed)
    model = init_weights(CausalLM(cfg), seed=tc.seed, std=tc.init_std).train()
    opt = make_optimizer(model, tc)
    blocks = model.moe_blocks()
    pids = [ExpertBiasPID(b.router, cfg.n_routed_experts, tc.target_real_share, tc.kp, tc.ki, tc.kd)
            for b in blocks] if tc.controller else []
    gen = torch.Generator().manual_seed(tc.seed)
    keys = ["loss", "ce", "z", "balance", "max_act", "grad_norm", "lr", "real_per_token", "load_max_over_mean",
            "load_cv"]
    m = {k: [] for k in keys}
    m.update(real_per_token_layer=[[] for _ in blocks], val_step=[], val_loss=[], seconds=[])
    t0 = time.perf_counter()
    n_steps = min(tc.steps, tc.stop_after or tc.steps)
    for step in range(n_steps):
        lr = tc.lr_at(step)
        rows = train_rows[torch.randint(len(train_rows), (tc.batch_size,), generator=gen)]  # (b, t+1)
        loss, ce, z, max_act, bal, gn = train_step(model, opt, rows, tc, lr)
        # routing statistics of this step's forward, then the controller (selection bias only, never weights)
        st = [routing_stats(b.last_idx, cfg.n_routed_experts, cfg.num_router_experts) for b in blocks]
        for pid, b in zip(pids, blocks):
            pid.update(b.last_idx)
        for k, v in (("loss", loss.item()), ("ce", ce.item()), ("z", z.item()), ("balance", bal.item()),
                     ("max_act", max_act.item()), ("grad_norm", gn.item()), ("lr", lr)):
            m[k].append(v)
        for k in ("real_per_token", "load_max_over_mean", "load_cv"):
            m[k].append(sum(s[k] for s in st) / len(st))
        for i, s in enumerate(st):
            m["real_per_token_layer"][i].append(s["real_per_token"])
        m["seconds"].append(time.perf_counter() - t0)
        last = step + 1 == n_steps
        if val_rows is not None and tc.eval_every and ((step + 1) % tc.eval_every == 0 or last):
            m["val_step"].append(step + 1)
            m["val_loss"].append(evaluate(model, val_rows))
        if log and (step % 25 == 0 or last):
            v = f" val {m['val_loss'][-1]:.3f}" if m["val_step"] and m["val_step"][-1] == step + 1 else ""
            log(f"[{name}] step {step + 1:4d}/{n_steps} loss {ce.item():.3f}{v} real/token "
                f"{m['real_per_token'][-1]:.2f}/{cfg.moe_topk} load max/mean {m['load_max_over_mean'][-1]:.2f} "
                f"max|h| {max_act.item():.1f} lr {lr:.2e} ({m['seconds'][-1]:.0f}s)")
    return Run(model.eval(), m)


# ------------------------------------------------------------------------------------------------- entry point
def prepare_data(tc: TrainConfig):
    texts = D.corpus_texts()
    tok = train_tokenizer(texts, tc.vocab_size, min_frequency=0, add_bos=True)  # trained with bos before each round
    stream = D.encode_corpus(tok, texts)
    train_rows, val_rows = D.split_rows(D.make_rows(stream, tc.seq_len))
    info = {"documents": len(texts), "tokens": int(stream.numel()), "corpus_sha256": D.corpus_sha256(texts),
            "python": sys.version.split()[0], "train_rows": len(train_rows), "val_rows": len(val_rows)}
    return tok, train_rows, val_rows, info


def plot(metrics: dict, path: str) -> str:
    """The README figure: FFN experts per token with and without the controller, and max |hidden| +- z-loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = metrics["runs"]
    k, target = metrics["model"]["moe_topk"], metrics["runs"]["main"]["train_config"]["target_real_share"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for name, label in (("main", "PID controller on"), ("no_controller", "controller off")):
        if name in runs:
            ax[0].plot(runs[name]["metrics"]["real_per_token"], label=label)
            ax[1].plot(runs[name]["metrics"]["load_max_over_mean"], label=label)
    ax[0].axhline(target * k, color="k", ls="--", lw=1, label=f"target {target * k:.0f} of {k}")
    ax[0].set(xlabel="step", ylabel="FFN experts per token (of 12 slots)", title="budget control")
    ax[1].set(xlabel="step", ylabel="busiest FFN expert / mean load", title="load balance across FFN experts")
    for name, label in (("main", "hidden z-loss on"), ("no_zloss", "hidden z-loss off")):
        if name in runs:
            ax[2].plot(runs[name]["metrics"]["max_act"], label=label)
    ax[2].set(xlabel="step", ylabel="max |hidden state|", title="massive activations")
    for a in ax:
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m longcat_ref.tools.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=None, help="checkpoint directory (config, weights, tokenizer, metrics); "
                   f"default {DEFAULT_OUT}, or the shipped model's directory with --ship")
    p.add_argument("--ship", action="store_true", help="write the package's shipped tiny model "
                   "(longcat_ref/assets/tiny-longcat) instead of --out")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--ablation-steps", type=int, default=60,
                   help="steps of the two comparison runs (controller off; z-loss off); 0 skips them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--plot", default=None, help="also write the figure here (.png, .pdf or .svg; needs matplotlib)")
    p.add_argument("--plot-only", action="store_true", help="only redraw --plot from OUT/metrics.json")
    a = p.parse_args(argv)
    try:
        a.out = resolve_out(a.out, a.ship)
        if a.plot_only:
            if not a.plot:
                raise ValueError("--plot-only needs --plot PATH")
            check_plot_path(a.plot)
            with open(os.path.join(a.out, "metrics.json")) as f:
                print(plot(json.load(f), a.plot))
            return 0
        if a.steps < 1 or a.ablation_steps < 0 or a.batch_size < 1 or not a.lr > 0:
            raise ValueError("--steps and --batch-size must be >= 1, --ablation-steps >= 0 and --lr > 0")
        check_out_dir(a.out)
        if a.plot:
            check_plot_path(a.plot)
        return run_all(a)
    except ImportError as e:
        print(f"error: --plot needs matplotlib ({e}); install the dev extras or drop --plot", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def resolve_out(out: str | None, ship: bool) -> str:
    """--out / --ship -> the checkpoint directory; the shipped model's directory only when asked for by --ship."""
    if ship:
        if out is not None and os.path.realpath(out) != os.path.realpath(SHIPPED_DIR):
            raise ValueError("--ship writes the shipped model's directory; drop --out")
        return SHIPPED_DIR
    out = DEFAULT_OUT if out is None else out
    if os.path.realpath(out) == os.path.realpath(SHIPPED_DIR):
        raise ValueError(f"--out {out} is the shipped model inside the package; pass --ship to rewrite it")
    return out


def _writable_dir(d: str, what: str) -> None:
    """Create d (and parents) if needed and check that files can be written in it, or raise naming `what`."""
    if os.path.exists(d) and not os.path.isdir(d):
        raise ValueError(f"{what} {d} exists and is not a directory")
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{what} {d} cannot be created ({e.strerror})") from None
    if not os.access(d, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {d} is not writable")


def check_out_dir(out: str) -> None:
    """Before training: the checkpoint directory can be written."""
    _writable_dir(out, "--out")


def check_plot_path(path: str) -> None:
    """Before training: matplotlib is there, the figure's format is known and its directory can be written."""
    import matplotlib  # ImportError: reported by main

    if os.path.splitext(path)[1].lower() not in (".png", ".pdf", ".svg"):
        raise ValueError(f"--plot {path}: use a .png, .pdf or .svg file name")
    if os.path.isdir(path):
        raise ValueError(f"--plot {path} is a directory; give a file name")
    _writable_dir(os.path.dirname(os.path.abspath(path)), "--plot's directory")
    del matplotlib


def normal_permissions(paths) -> None:
    """safetensors writes its file with mode 0600; give written files the mode open() would (0666 minus umask)."""
    mask = os.umask(0)
    os.umask(mask)
    for p in paths:
        os.chmod(p, 0o666 & ~mask)


def run_all(a) -> int:
    tc = TrainConfig(steps=a.steps, seed=a.seed, batch_size=a.batch_size, lr=a.lr)
    torch.set_num_threads(tc.threads)
    t0 = time.perf_counter()
    tok, train_rows, val_rows, info = prepare_data(tc)
    cfg = model_config(tok.vocab_size, tc.seq_len)
    counts = parameter_counts(cfg)
    print(f"data: {info['documents']} chat rounds, {info['tokens']:,} tokens; model: {counts['total']:,} params, "
          f"{counts['activated_min']:,}-{counts['activated_max']:,} activated; torch threads {torch.get_num_threads()}")
    runs = {}
    main_run = train(tc, cfg, train_rows, val_rows, name="main")
    runs["main"] = main_run
    abl = {}
    if a.ablation_steps:  # the main run's first ablation_steps (same seed, data, schedule) without one feature
        abl["no_controller"] = TrainConfig(**{**asdict(tc), "stop_after": a.ablation_steps, "controller": False})
        abl["no_zloss"] = TrainConfig(**{**asdict(tc), "stop_after": a.ablation_steps, "z_loss": 0.0})
    for name, atc in abl.items():
        runs[name] = train(atc, cfg, train_rows, val_rows, name=name)

    os.makedirs(a.out, exist_ok=True)
    before = set(os.listdir(a.out))
    save_checkpoint(main_run.model, a.out)
    save_tokenizer(tok, a.out, model_max_length=cfg.max_position_embeddings, chat_template=LONGCAT_CHAT_TEMPLATE)
    wall = time.perf_counter() - t0
    metrics = {"data": info, "model": {"moe_topk": cfg.moe_topk, "n_routed_experts": cfg.n_routed_experts,
                                       "zero_expert_num": cfg.zero_expert_num, **counts},
               "wall_seconds": wall, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "runs": {n: {"train_config": asdict(abl.get(n, tc)), "metrics": r.metrics} for n, r in runs.items()}}
    with open(os.path.join(a.out, "metrics.json"), "w") as f:
        json.dump(_rounded(metrics), f, separators=(",", ":"))
    written = [os.path.join(a.out, f) for f in os.listdir(a.out) if f not in before or f in _OUTPUT_FILES]
    normal_permissions(p for p in written if os.path.isfile(p))
    if a.plot:
        plot(metrics, a.plot)
    print(f"wrote {a.out} in {wall / 60:.1f} min")
    return 0


_OUTPUT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "metrics.json"}


def _rounded(x, nd: int = 6):
    """Floats to nd significant digits (keeps metrics.json small)."""
    if isinstance(x, float):
        return float(f"{x:.{nd}g}")
    if isinstance(x, dict):
        return {k: _rounded(v, nd) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v, nd) for v in x]
    return x


if __name__ == "__main__":
    sys.exit(main())
