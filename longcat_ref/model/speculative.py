"""Self-speculative decoding with the MTP head: draft k tokens cheaply, verify them in one forward of the model.

One step, with the cache holding the committed tokens and `nxt` the last sampled token (not yet in the cache):

    draft    d_1..d_k     the MTP head (model/mtp.py) at the last committed position, chained k times
    verify   one forward of the main model over [nxt, d_1, ..., d_k] (k + 1 tokens) -> target distributions
             p_0..p_k (p_i: the token after d_i) and the final-normed hidden states of those k + 1 positions
    accept   d_i while it survives the acceptance test against p_{i-1}; at the first rejection draw the
             replacement from the residual, or when all k survive draw a bonus token from p_k
    commit   the accepted prefix + that one token: 1..k+1 new tokens per verify step
    roll back the rejected positions' cache slots

Acceptance (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding", Chen et al. 2023):
accept d ~ q with probability min(1, p(d) / q(d)); on rejection draw from norm(max(0, p - q)). The token that
comes out is distributed exactly as p, whatever q is: P(d) = q(d) min(1, p/q) + (1 - sum_x min(p, q)) *
max(0, p - q)(d) / (1 - sum_x min(p, q)) = min(p, q)(d) + max(0, p - q)(d) = p(d). Greedy decoding is the case where
p and q are one-hot (argmax): d is accepted iff it equals the target's argmax, and the replacement is that argmax,
so the committed tokens are plain greedy's, always -- the draft only decides how many arrive per step.
(temperature and top_p shape p and q exactly as `sample_next` does.)

Rolling back without moving memory: every row of the batch writes the k + 1 verify slots; a row that accepted a
tokens keeps slots [n, n + a] and marks the rest 0 in its attention mask (holes: positions count real tokens, so a
hole changes nothing). The slot pointer advances by max(a) + 1 over the rows; slots past it are rolled back for
all rows: a DynamicCache is truncated (`crop`), a StaticCache just moves its pointer (those slots are overwritten
next step; the mask hides them until then). The MTP head's own cache uses the same slots and the same mask.

The MTP head at position j reads (h_j, token j+1): after a verify step, one head forward over the same k + 1 slots
with the tokens shifted by one (the accepted drafts, then the new token at each row's own index) writes the head's
cache for the committed positions and yields the next first draft at each row's last committed position.

Two ways to run it, like generate(): plain (DynamicCache, reference forms) and fast (StaticCache sized for the
worst case, fixed shapes: the verify and head steps always have k + 1 tokens, the chained draft steps 1; on a GPU
each is captured once as a CUDA graph and replayed). Under torchrun the sharded model runs as it is and the head is
replicated: every rank computes the same drafts and the same acceptances (the logits are all-gathered).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .cache import DynamicCache, StaticCache
from .forms import DECODE, PREFILL, REFERENCE


@dataclass
class Speculation:
    """Options and statistics of one speculative generate(): pass `speculative=Speculation(k=2)` to read them."""

    k: int = 1  # draft tokens per verify step (chained MTP head for k > 1)
    steps: int = 0  # verify steps run
    drafted: int = 0  # draft tokens proposed (rows still generating only)
    accepted: int = 0  # of which accepted
    accepted_at: list = field(default_factory=list)  # accepted_at[i]: drafts accepted at draft position i + 1
    drafted_at: list = field(default_factory=list)
    new_tokens: int = 0  # tokens committed by verify steps (rows still generating only)
    row_steps: int = 0  # verify steps summed over the rows still generating

    def __post_init__(self):
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"speculative k must be an int >= 1, got {self.k!r}")

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens per verify step and row: 1 + accepted drafts (at most k + 1)."""
        return self.new_tokens / self.row_steps if self.row_steps else 0.0

    def as_dict(self) -> dict:
        return {"k": self.k, "steps": self.steps, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate, "tokens_per_step": self.tokens_per_step,
                "acceptance_at": [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at)]}


def as_speculation(speculative) -> Speculation | None:
    """generate()'s `speculative` argument: False/None, True (k = 1), an int k, or a Speculation."""
    if speculative is None or speculative is False:
        return None
    if speculative is True:
        return Speculation(k=1)
    if isinstance(speculative, Speculation):
        return speculative
    if isinstance(speculative, int):
        return Speculation(k=speculative)
    raise ValueError(f"speculative must be False, True, an int k >= 1 or a Speculation, got {speculative!r}")


# ------------------------------------------------------------------------------------------------- the rule
def probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """logits (..., V) -> the distribution sample_next draws from (..., V), fp32. temperature 0: one-hot argmax."""
    if temperature <= 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    p = torch.softmax(logits.float() / temperature, dim=-1)  # (..., V)
    if top_p < 1.0:
        p_sorted, order = p.sort(dim=-1, descending=True)
        drop = (p_sorted.cumsum(-1) - p_sorted) >= top_p  # as sample_next: the top token always survives
        p = torch.zeros_like(p).scatter_(-1, order, p_sorted.masked_fill(drop, 0.0))
        p = p / p.sum(-1, keepdim=True)
    return p


def draw(p: torch.Tensor, generator=None) -> torch.Tensor:
    """p (b, V) -> ids (b,); a one-hot p gives its argmax without drawing (greedy consumes no random numbers)."""
    if bool((p.max(-1).values == 1.0).all()):
        return p.argmax(-1)
    return torch.multinomial(p, 1, generator=generator).squeeze(-1)


def accept(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator=None):
    """Speculative rejection sampling.

    p (b, k+1, V): the target at the k+1 verified positions; q (b, k, V): the draft distributions; drafts (b, k).
    Returns n_accepted (b,) in 0..k and the next token (b,): drawn from norm(max(0, p_a - q_a)) at the first
    rejected position a, or from p_k when all k drafts were accepted. The result is distributed as p (module doc).
    """
    b, k = drafts.shape
    p_d = p[:, :k].gather(-1, drafts[..., None])[..., 0]  # (b, k) target prob of each draft
    q_d = q.gather(-1, drafts[..., None])[..., 0]  # (b, k) draft prob of each draft (> 0: it was drawn)
    if bool(((p_d == 0) | (p_d == 1)).all()) and bool(((q == 0) | (q == 1)).all()):
        u = torch.zeros(b, k, device=p.device)  # one-hot p and q (greedy): the test is p_d >= q_d, no randomness
    else:
        u = torch.rand(b, k, generator=generator, device=p.device)  # (b, k)
    ok = u * q_d < p_d  # (b, k): accept with probability min(1, p/q)
    n_acc = ok.long().cumprod(-1).sum(-1)  # (b,) accepted prefix length
    q_pad = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)  # (b, k+1, V): no draft after the last
    idx = n_acc[:, None, None].expand(b, 1, p.shape[-1])  # (b, 1, V)
    p_a, q_a = p.gather(1, idx)[:, 0], q_pad.gather(1, idx)[:, 0]  # (b, V) at position n_acc
    residual = (p_a - q_a).clamp(min=0)  # (b, V); = p_k where all were accepted (q_pad is 0 there)
    mass = residual.sum(-1, keepdim=True)  # (b, 1)
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_a)  # p == q exactly: draw from p
    return n_acc, draw(residual, generator)


# ------------------------------------------------------------------------------------------------- the loop
class _State:
    """The caches, the key mask and the slot pointer of one speculative generation (plain or fast)."""

    def __init__(self, model, batch, mask, k, fast, max_len):
        self.model, self.head, self.fast, self.k = model, model.mtp, fast, k
        dev = mask.device
        if fast:
            self.cache = StaticCache.for_model(model.config, batch, max_len, model.dtype, dev)
            self.head_cache = model.mtp.new_cache(batch, max_len, model.dtype, dev)
            self.mask = torch.zeros(batch, max_len, dtype=torch.long, device=dev)
            self.mask[:, :mask.shape[1]] = mask
            self.forms, self.prefill_forms = DECODE, PREFILL
        else:
            self.cache, self.head_cache = DynamicCache.for_model(model.config), model.mtp.new_cache()
            self.mask = mask.clone()
            self.forms = self.prefill_forms = REFERENCE
        self.n = mask.shape[1]  # slots in use (the same for every row)
        self.max_len = max_len
        self.use_graphs = fast and dev.type == "cuda"  # the fixed-shape steps as CUDA graphs (not the prefill)
        self.graphs = {}

    def keys(self, upto: int) -> torch.Tensor:
        """The attention mask as the forward wants it: all max_len slots (fast) or the first `upto` (plain)."""
        return self.mask if self.fast else self.mask[:, :upto]

    def open(self, t: int):
        """Mark slots [n, n+t) real (they are about to be written); the plain mask grows."""
        if not self.fast:
            grow = self.n + t - self.mask.shape[1]
            if grow > 0:
                self.mask = F.pad(self.mask, (0, grow))
        self.mask[:, self.n:self.n + t] = 1

    def positions(self, t: int):
        """Slots [n, n+t) -> cache_position (t,), and position_ids (b, t) counting real tokens (holes skipped)."""
        slots = torch.arange(self.n, self.n + t, device=self.mask.device)
        pos = (self.keys(self.n + t).cumsum(-1) - 1).clamp(min=0).index_select(1, slots)  # (b, t)
        return slots, pos

    def _main(self, ids, pos, slots, forms):
        logits, hidden = self.model(ids, attention_mask=self.keys(self.n + ids.shape[1]), position_ids=pos,
                                    cache=self.cache, cache_position=slots, forms=forms, output_hidden_states=True)
        return logits, self.model.model.norm(hidden[-1])  # (b, t, V), (b, t, H): h_t as vLLM feeds hnorm

    def _head(self, ids, hidden, pos, slots, forms):
        return self.head(ids, hidden, pos, lm_head=self.model.lm_head, attention_mask=self.keys(self.n + ids.shape[1]),
                         cache=self.head_cache, cache_position=slots, forms=forms)

    def run(self, name, fn, *inputs, forms):
        """fn(*inputs, forms) eagerly, or (fast, on a GPU, fixed shapes) through a CUDA graph captured once."""
        if not self.use_graphs or name == "prefill":
            return fn(*inputs, forms)
        key = (name, tuple(x.shape for x in inputs))
        if key not in self.graphs:
            self.graphs[key] = _Graph(lambda *xs: fn(*xs, forms), inputs)
        return self.graphs[key](*inputs)

    def main(self, ids, forms, name="verify"):
        """Main model over ids (b, t) at slots [n, n+t) -> logits (b, t, V), final-normed hidden (b, t, H)."""
        slots, pos = self.positions(ids.shape[1])
        return self.run(name, self._main, ids, pos, slots, forms=forms)

    def draft(self, ids, hidden, forms, at: int | None = None, name="head"):
        """The MTP head over ids (b, t) at slots [n, n+t) (or at slot `at`) -> logits (b, t, V), state (b, t, H)."""
        n0 = self.n
        if at is not None:
            self.n = at
        slots, pos = self.positions(ids.shape[1])
        out = self.run(name, self._head, ids, hidden, pos, slots, forms=forms)
        self.n = n0
        return out

    def roll_back(self, n_acc: torch.Tensor):
        """After a verify over slots [n, n+k]: row r keeps [n, n + n_acc[r]]; the pointer moves past max(n_acc)."""
        k1 = self.k + 1
        keep = torch.arange(k1, device=n_acc.device)[None] <= n_acc[:, None]  # (b, k+1)
        self.mask[:, self.n:self.n + k1] = keep.long()
        self.n += int(n_acc.max()) + 1
        if not self.fast:  # a growing cache: truncate what no row keeps
            self.mask = self.mask[:, :self.n]
            self.cache.crop(self.n)
            self.head_cache.crop(self.n)
        else:
            self.mask[:, self.n:] = 0  # a static cache: those slots are simply rewritten later


class _Graph:
    """One fixed-shape step captured as a CUDA graph: inputs are copied into static tensors, the graph replayed.
    The caches and the key mask are read and written in place, so they are the same tensors in every replay."""

    def __init__(self, fn, inputs):
        self.static = [x.clone() for x in inputs]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn(*self.static)  # warm-up (writes the same slots the real call writes)
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(*self.static)

    def __call__(self, *inputs):
        for dst, x in zip(self.static, inputs):
            dst.copy_(x)
        self.graph.replay()
        return tuple(o.clone() for o in self.out)


def needed_slots(batch: int, prompt: int, max_new_tokens: int, k: int) -> int:
    """Static-cache slots a speculative generation can need: each verify step writes k + 1 slots and advances by
    1..k+1; one row gains >= 1 token per step, so at most max_new_tokens steps (batch 1: at most the tokens)."""
    if batch == 1:
        return prompt + max_new_tokens + 2 * (k + 1)
    return prompt + max_new_tokens * (k + 1) + 2 * (k + 1)


@torch.no_grad()
def generate(model, input_ids, max_new_tokens, temperature, top_p, stops, pad, mask, gen, spec: Speculation,
             on_token=None, fast=False, cache_len=None, compile=False):
    """The speculative loop behind `generate(..., speculative=...)` (arguments already checked there): the
    same tokens as plain greedy for temperature 0, the same distribution when sampling. -> (b, s + n)."""
    if getattr(model, "mtp", None) is None:
        raise ValueError("speculative decoding needs the model's MTP head: load a checkpoint that has one "
                         "(from_pretrained keeps it) or attach model.mtp = MTPHead(cfg)")
    if compile:
        raise ValueError("speculative decoding does not torch.compile its steps: drop compile=True (fast=True "
                         "still captures CUDA graphs)")
    b, s = input_ids.shape
    k, dev = spec.k, input_ids.device
    if len(spec.accepted_at) < k:
        spec.accepted_at += [0] * (k - len(spec.accepted_at))
        spec.drafted_at += [0] * (k - len(spec.drafted_at))
    max_len = cache_len or needed_slots(b, s, max_new_tokens, k)
    if fast and max_len < needed_slots(b, s, max_new_tokens, k):
        raise ValueError(f"cache_len {max_len} < the {needed_slots(b, s, max_new_tokens, k)} slots speculative "
                         f"decoding with k={k} may need")
    st = _State(model, b, mask, k, fast, max_len)
    if max_new_tokens == 0:
        return input_ids

    # prefill: the prompt through the model, the first token, then the head over the prompt (tokens shifted)
    st.n = 0
    logits, hidden = st.main(input_ids, st.prefill_forms, name="prefill")  # (b, s, V), (b, s, H)
    nxt = draw(probs(logits[:, -1], temperature, top_p), gen)  # (b,)
    head_ids = torch.cat([input_ids[:, 1:], nxt[:, None]], dim=1)  # (b, s): token t+1 at each t
    d_logits, d_state = st.draft(head_ids, hidden, st.prefill_forms, name="prefill")  # (b, s, V), (b, s, H)
    st.n = s
    last = torch.full((b,), s - 1, dtype=torch.long, device=dev)  # each row's last committed slot's index

    out = [[] for _ in range(b)]  # committed tokens per row
    done = [False] * b  # a row that emitted a stop token

    def emit(row_tokens):
        """Append each row's tokens up to its stop token / max_new_tokens -> what was appended, per row."""
        before = [len(o) for o in out]
        for r in range(b):
            if done[r] or len(out[r]) >= max_new_tokens:
                continue
            for tok in row_tokens[r]:
                out[r].append(tok)
                if stops and tok in stops:
                    done[r] = True
                    break
                if len(out[r]) >= max_new_tokens:
                    break
        return [o[n:] for o, n in zip(out, before)]

    emit([[int(x)] for x in nxt])
    if on_token is not None:
        on_token(nxt)

    def stream(rows):  # on_token gets one (b,) tensor per committed column (rows that got fewer: pad)
        for j in range(max(len(x) for x in rows)):
            on_token(torch.tensor([x[j] if j < len(x) else pad for x in rows], device=dev))
    pick = lambda x, i: x.gather(1, i[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0]  # (b, t, D) at i (b,)
    q_logits, q_state = pick(d_logits, last), pick(d_state, last)  # (b, V), (b, H): the first draft
    while not all(done[r] or len(out[r]) >= max_new_tokens for r in range(b)):
        active = [r for r in range(b) if not (done[r] or len(out[r]) >= max_new_tokens)]
        # draft: d_1 from the head at the last committed slot, d_2.. by chaining it on its own output
        qs, drafts = [], []
        for i in range(k):
            q = probs(q_logits, temperature, top_p)  # (b, V)
            d = draw(q, gen)  # (b,)
            qs.append(q)
            drafts.append(d)
            if i + 1 < k:  # one more head step at the next slot, on the draft (rewritten after the verify)
                st.open(i + 1)
                step_logits, step_state = st.draft(d[:, None], q_state[:, None], st.forms, at=st.n + i)
                q_logits, q_state = step_logits[:, 0], step_state[:, 0]
        drafts_t = torch.stack(drafts, 1)  # (b, k)
        # verify: the k + 1 tokens [nxt, d_1..d_k] in one forward
        st.open(k + 1)
        v_ids = torch.cat([nxt[:, None], drafts_t], dim=1)  # (b, k+1)
        v_logits, v_hidden = st.main(v_ids, st.forms)  # (b, k+1, V), (b, k+1, H)
        n_acc, new = accept(probs(v_logits, temperature, top_p), torch.stack(qs, 1), drafts_t, gen)  # (b,), (b,)
        # the head over the same k+1 slots: token after slot n+i is d_{i+1} (accepted) or the new token
        if not fast:
            st.head_cache.crop(st.n)  # drop the chained draft steps' entries (rewritten now)
        h_ids = torch.cat([drafts_t, new[:, None]], dim=1)  # (b, k+1)
        h_ids = h_ids.scatter(1, n_acc[:, None], new[:, None])  # the new token right after each row's last kept
        d_logits, d_state = st.draft(h_ids, v_hidden, st.forms)  # (b, k+1, V), (b, k+1, H)
        q_logits, q_state = pick(d_logits, n_acc), pick(d_state, n_acc)  # next first draft, per row
        # statistics over the rows still generating, then commit and roll back
        na = n_acc.tolist()
        spec.steps += 1
        spec.row_steps += len(active)
        for r in active:
            spec.drafted += k
            spec.accepted += na[r]
            for i in range(k):
                spec.drafted_at[i] += 1 if i == 0 or na[r] >= i else 0
                spec.accepted_at[i] += 1 if na[r] > i else 0
            spec.new_tokens += na[r] + 1
        dl = drafts_t.tolist()
        appended = emit([dl[r][:na[r]] + [int(new[r])] for r in range(b)])
        if on_token is not None and any(appended):
            stream(appended)
        st.roll_back(n_acc)
        nxt = new
    n = min(max_new_tokens, max(len(o) for o in out))
    rows = [o[:n] + [pad] * (n - len(o[:n])) for o in out]
    return torch.cat([input_ids, torch.tensor(rows, dtype=input_ids.dtype, device=dev).view(b, n)], dim=1)
