"""Train an MTP head (model/mtp.py) for a trained model, with the model frozen, and measure its acceptance.

    python -m longcat_ref.tools.train_mtp                       # the shipped tiny model -> runs/tiny-longcat-mtp
    python -m longcat_ref.tools.train_mtp --ship                # add the head to longcat_ref/assets/tiny-longcat

The MTP loss as in DeepSeek-V3 / LongCat-Flash: cross-entropy of the head's prediction of token t+2 from the main
model's final-normed hidden state at t and the embedding of token t+1, over every position of the training rows
(the papers train it jointly with the main model, weighted by a factor lambda; here the main model is frozen and only
the head learns, so the loss is the MTP term alone). The head's embedding starts as a copy of the main model's.

Acceptance is measured two ways on the held-out rows (never trained on):
* teacher-forced: at every position t, does the head's argmax for t+2 equal the main model's greedy token at t+1
  (given the true t+1)? That is what greedy speculative decoding with k = 1 accepts, over real text;
* generated: greedy `generate(..., speculative=Speculation(k))` from held-out prompts, k = 1 and 2 (the model's
  own continuations; the rate counts every drafted token).

--ship adds the head's tensors (real names, model.mtp.*) to the shipped model.safetensors, leaving every other
tensor and config.json as they are, and writes mtp_metrics.json next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from . import data as D
from ..io.checkpoint import checkpoint_tensors, from_pretrained, save_checkpoint
from ..io.tokenizer import load_tokenizer
from ..model.mtp import MTPHead, init_mtp
from ..model.speculative import Speculation
from .train import SHIPPED_DIR, deterministic, normal_permissions

DEFAULT_OUT = os.path.join("runs", "tiny-longcat-mtp")


def mtp_batch_loss(model, rows: torch.Tensor) -> torch.Tensor:
    """rows (b, T + 1) -> the MTP loss: CE of head(h_t, x_{t+1}) against x_{t+2}, t = 0..T-2."""
    x = rows[:, :-1]  # (b, T) what the main model reads
    with torch.no_grad():
        _, hidden = model(x, output_hidden_states=True)
        h = model.model.norm(hidden[-1])  # (b, T, H) final-normed, as the engines feed hnorm
    T = x.shape[1]
    pos = torch.arange(T - 1)[None].expand(x.shape[0], -1)  # (b, T-1)
    logits, _ = model.mtp(rows[:, 1:T], h[:, :T - 1], pos, lm_head=model.lm_head)  # (b, T-1, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 2:T + 1].flatten())


@torch.no_grad()
def teacher_forced_acceptance(model, rows: torch.Tensor) -> dict:
    """Per held-out position: head argmax (t+2) == main greedy token at t+1; also head top-1 vs the true token."""
    x = rows[:, :-1]
    logits, hidden = model(x, output_hidden_states=True)  # (b, T, V)
    h = model.model.norm(hidden[-1])
    T = x.shape[1]
    pos = torch.arange(T - 1)[None].expand(x.shape[0], -1)
    d_logits, _ = model.mtp(rows[:, 1:T], h[:, :T - 1], pos, lm_head=model.lm_head)  # (b, T-1, V)
    draft = d_logits.argmax(-1)  # (b, T-1): the head's guess for x_{t+2}
    target = logits[:, 1:T].argmax(-1)  # (b, T-1): the main model's greedy token at t+2 given x_{t+1}
    return {"positions": draft.numel(), "acceptance_greedy_k1": float((draft == target).float().mean()),
            "head_top1_vs_text": float((draft == rows[:, 2:T + 1]).float().mean()),
            "main_top1_vs_text": float((target == rows[:, 2:T + 1]).float().mean()),
            "mtp_loss": float(F.cross_entropy(d_logits.flatten(0, 1).float(), rows[:, 2:T + 1].flatten()))}


@torch.no_grad()
def generated_acceptance(model, rows: torch.Tensor, k: int, prompt_len: int = 16, new: int = 48) -> dict:
    spec = Speculation(k=k)
    model.generate(rows[:, :prompt_len], new, speculative=spec)
    return spec.as_dict()


def train_head(model, train_rows, steps=300, batch=8, lr=3e-3, seed=0, log=print):
    """A fresh head on `model` (frozen), AdamW + cosine decay; returns the loss per step."""
    torch.manual_seed(seed)
    model.mtp = init_mtp(MTPHead(model.config), seed=seed)
    with torch.no_grad():
        model.mtp.embed_tokens.weight.copy_(model.model.embed_tokens.weight)
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.mtp.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.mtp.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(step / steps * 3.14159265)).item()))
        rows = train_rows[torch.randint(0, len(train_rows), (batch,), generator=g)]
        loss = mtp_batch_loss(model, rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(round(loss.item(), 5))
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step:4d}  mtp loss {loss.item():.4f}")
    model.mtp.eval()
    for p in params:
        p.requires_grad_(False)
    return losses


def ship(model, directory: str) -> None:
    """Add the head's tensors (model.mtp.*) to the checkpoint's single model.safetensors; nothing else changes."""
    f = os.path.join(directory, "model.safetensors")
    with safe_open(f, framework="pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys() if not k.startswith("model.mtp.")}
        meta = h.metadata()
    dtype = next(iter(tensors.values())).dtype
    tensors.update({k: v.to(dtype) for k, v in checkpoint_tensors(model).items() if k.startswith("model.mtp.")})
    tmp = f + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, f)
    normal_permissions([f])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=SHIPPED_DIR, help="a trained checkpoint (default: the shipped tiny model)")
    ap.add_argument("--out", default=None, help=f"where to write model + head (default {DEFAULT_OUT})")
    ap.add_argument("--ship", action="store_true", help="add the head to the shipped checkpoint instead")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=128)
    a = ap.parse_args(argv)
    with deterministic():
        return _main(a)


def _main(a) -> int:
    t0 = time.time()
    model = from_pretrained(a.model, dtype=torch.float32, mtp=False)
    tok = load_tokenizer(a.model)
    stream = D.encode_corpus(tok, D.corpus_texts())
    train_rows, val_rows = D.split_rows(D.make_rows(stream, a.seq_len))
    losses = train_head(model, train_rows, steps=a.steps)
    res = {"steps": a.steps, "batch": 8, "seq_len": a.seq_len, "lr": 3e-3, "main_model": "frozen",
           "loss": losses, "held_out": teacher_forced_acceptance(model, val_rows),
           "generated_k1": generated_acceptance(model, val_rows, 1),
           "generated_k2": generated_acceptance(model, val_rows, 2),
           "wall_seconds": round(time.time() - t0, 1), "threads": torch.get_num_threads()}
    print(json.dumps({k: v for k, v in res.items() if k != "loss"}, indent=1))
    if a.ship:
        ship(model, SHIPPED_DIR)
        out = SHIPPED_DIR
    else:
        out = a.out or DEFAULT_OUT
        save_checkpoint(model, out)
    with open(os.path.join(out, "mtp_metrics.json"), "w") as f:
        json.dump(res, f)
    normal_permissions([os.path.join(out, "mtp_metrics.json")])
    print(f"wrote the head to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
