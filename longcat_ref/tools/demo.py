"""Chat with a LongCat-Flash (or GLM-4.7-Flash) checkpoint: load it, apply the chat template, stream the reply.

    python -m longcat_ref.demo                          # the embedded tiny model, one chat turn
    python -m longcat_ref.demo --model DIR --prompt "What is MLA?" --dtype bfloat16 --device cuda
    python -m longcat_ref.demo --interactive            # multi-turn
    python -m longcat_ref.demo --json                   # one JSON object: prompt_ids, generated_ids, text, timings

Without --model it uses `longcat_ref/assets/tiny-longcat/` if that directory exists (a small trained checkpoint);
otherwise it builds one on the fly into a temporary directory: random weights for `config.tiny_longcat`, written in
the *original* LongCat-Flash-Chat layout (per-expert tensors, sharded with an index, the original config.json
keys, an MTP block), plus a byte-level BPE tokenizer trained on `assets/demo_corpus.txt` -- and then
loads it back like any real checkpoint. An untrained model prints gibberish; the point is the machinery.

Bad input (a missing or broken model directory, a bad flag value, an unavailable --device, a prompt that is not
valid UTF-8 or longer than the context, a closed stdin in --interactive, a malformed RANK, ids out of the vocabulary)
prints one line on stderr and exits non-zero -- never a traceback (an unexpected exception is printed as one line
with its type). The demo writes no files, so it has no output paths to check.

--interactive edits lines with readline where Python has it (arrows, history), and keeps the KV cache between turns:
each turn prefills only the tokens after the longest prefix it shares with the previous turn's prompt + reply
(the plain path; --fast rebuilds its static cache each turn). Model loading lives in `load_model(args, parallel=None)`, and only rank 0 prints,
so the same command can run under torchrun with a parallel plan.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..io.chat import LONGCAT_CHAT_TEMPLATE, default_chat_template
from ..io.checkpoint import CheckpointError, from_pretrained, read_config, save_checkpoint
from ..model.config import LONGCAT, ConfigError, tiny_longcat
from ..model.cache import DynamicCache
from ..model.counts import activated_for, parameter_counts
from ..model.model import CausalLM, init_weights
from ..model.speculative import Speculation
from ..runtime.parallel import ParallelContext, ParallelError
from ..io.tokenizer import TokenizerError, load_tokenizer, save_generation_config, save_tokenizer, train_tokenizer

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TRAINED_DIR = ASSETS / "tiny-longcat"  # a small trained checkpoint (when present)
CORPUS = ASSETS / "demo_corpus.txt"  # text for the on-the-fly tokenizer
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DEFAULT_PROMPT = "Tell me a short story about a fox."


class DemoError(Exception):
    """Bad input to the demo: printed as one line, exit status 1."""


_CTX = [ParallelContext()]  # world size 1 until main() joins torchrun's group (ParallelContext.from_env)


def env_rank() -> int | None:
    """RANK as an int (0 without torchrun); None if it is set but not an integer (reported by main)."""
    v = os.environ.get("RANK", "0").strip() or "0"
    return int(v) if v.isdigit() else None


def is_main() -> bool:
    """Rank 0 (or no torchrun at all) prints; other ranks stay quiet."""
    if _CTX[0].world_size > 1:
        return _CTX[0].is_main
    return env_rank() in (0, None)


def out(*a, end="\n", file=None):
    if is_main():
        print(*a, end=end, file=file or sys.stdout, flush=True)


# --------------------------------------------------------------------------------------------- the embedded model
def build_tiny_checkpoint(path, seed: int = 0) -> str:
    """A tiny random LongCat-Flash in the original on-disk layout + a tokenizer trained on the demo corpus."""
    tok = train_tokenizer([CORPUS.read_text(encoding="utf-8")], vocab_size=512)
    cfg = tiny_longcat(vocab_size=tok.vocab_size)
    model = init_weights(CausalLM(cfg), seed=seed, std=0.25)  # large enough that the logits are not ~uniform
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    save_checkpoint(model, path, layout="per_expert", original_config=True, mtp=True, max_shard_bytes=total // 3 + 1)
    save_tokenizer(tok, path, model_max_length=cfg.max_position_embeddings, chat_template=LONGCAT_CHAT_TEMPLATE)
    save_generation_config(path, bos_token_id=tok.bos_id, eos_token_id=tok.eos_ids[0], pad_token_id=tok.pad_id)
    return os.fspath(path)


_TMP = []  # keeps the temporary checkpoint alive until exit


def default_model_dir() -> tuple[str, str]:
    """(directory, how it came about) for the embedded default."""
    if TRAINED_DIR.is_dir():
        return os.fspath(TRAINED_DIR), "the embedded tiny trained LongCat-Flash (longcat_ref/assets/tiny-longcat)"
    t0 = time.perf_counter()
    _TMP.append(tempfile.TemporaryDirectory(prefix="longcat-demo-"))
    path = build_tiny_checkpoint(_TMP[-1].name)
    shards = len([f for f in os.listdir(path) if f.endswith(".safetensors")])
    return path, (f"a tiny LongCat-Flash with random weights, built in {time.perf_counter() - t0:.2f} s and written "
                  f"to {path} in the original layout (per-expert tensors in {shards} shards + index, original "
                  f"config.json keys, an MTP block), with a byte-level BPE tokenizer trained on "
                  f"assets/demo_corpus.txt")


def load_model(args, parallel=None):
    """-> (model, tokenizer, info). The one place the demo loads weights (a parallel plan goes here).

    info: {"source": what was loaded, "load_s": seconds spent in from_pretrained + load_tokenizer}.
    """
    if args.model is not None:
        path, source = args.model, f"checkpoint {args.model}"
        if not os.path.isdir(path):
            raise DemoError(f"--model {path}: no such directory")
    else:
        path, source = default_model_dir()
    t0 = time.perf_counter()
    device = torch.device(args.device) if parallel is None or parallel.world_size == 1 else parallel.device
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    read_config(path)  # cheap checks first: config.json, then the tokenizer, then the weights
    tok = load_tokenizer(path)
    model = from_pretrained(path, dtype=dtype, device=device, parallel=parallel, fp8=args.fp8)
    if device.type == "cpu" and sum(p.numel() for p in model.parameters()) < 10_000_000:
        torch.set_num_threads(1)  # tiny matmuls: threads only add synchronisation (and spin when cores are busy)
    if tok.vocab_size > model.config.vocab_size:
        raise DemoError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                        f"{model.config.vocab_size}")
    return model, tok, {"source": source, "load_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------- one turn
class ExpertStats:
    """Counts, per token and MoE layer, how many of the top-k slots went to real vs zero-computation experts
    (from MoE.last_idx after every forward)."""

    def __init__(self, model):
        self.blocks = model.moe_blocks()
        self.n_routed = model.config.n_routed_experts
        self.real = []  # one tensor of per-(token, layer) real-expert counts per forward
        self.steps = []  # per forward: (tokens,) real experts summed over the MoE layers, or None (not recorded)

    def collect(self):
        step = []
        for m in self.blocks:
            if m.last_idx is not None:
                self.real.append((m.last_idx < self.n_routed).sum(-1).flatten().cpu())  # (tokens,)
                step.append(self.real[-1])
                m.last_idx = None
        self.steps.append(torch.stack(step).sum(0) if step and len(step) == len(self.blocks) else None)

    def per_generated(self, n_gen: int) -> list:
        """Real FFN experts (summed over layers) each generated token used when it was fed back in; None where
        not recorded (the last token is never fed back; a replayed CUDA graph records nothing)."""
        counts = [int(s[-1]) if s is not None else None for s in self.steps[1:]][:n_gen]
        return counts + [None] * (n_gen - len(counts))

    def summary(self, k: int) -> dict:
        if not self.real:
            return {}
        r = torch.cat(self.real).float()
        return {"top_k": k, "real_mean": r.mean().item(), "real_min": int(r.min()), "real_max": int(r.max()),
                "zero_mean": k - r.mean().item(), "token_layer_samples": r.numel()}


ROUTING_COLOURS = (34, 36, 32, 33, 31)  # ANSI blue, cyan, green, yellow, red: few -> many real experts


def routing_line(pieces: list, counts: list, most: int) -> str:
    """Each generated token (its text piece) coloured by its real-expert count (of `most`), then a legend."""
    def colour(c):
        return ROUTING_COLOURS[min(len(ROUTING_COLOURS) - 1, c * len(ROUTING_COLOURS) // (most + 1))]
    text = "".join(p if c is None else f"\x1b[{colour(c)}m{p}\x1b[0m" for p, c in zip(pieces, counts))
    bins = [(lo, hi) for lo, hi in ((-(-(most + 1) * i // 5), -(-(most + 1) * (i + 1) // 5) - 1) for i in range(5))
            if lo <= hi]
    legend = "  ".join(f"\x1b[{colour(lo)}m{lo}-{hi}\x1b[0m" for lo, hi in bins)
    return (f"{text}\n-- routing: real FFN experts per token, summed over the MoE layers (of {most}): {legend}; "
            "plain: not recorded")


def _shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run_turn(model, tok, prompt: str, args, stream: bool, session: dict | None = None) -> dict:
    """Encode, generate (streaming to stdout if `stream`), decode; -> ids, text, timings and statistics.

    session (a dict kept by the caller between chat turns; plain path only): holds the last turn's ids and its
    DynamicCache. The cache is cut back to the longest prefix the new prompt shares with them (a reply re-tokenized
    by the template may differ from the generated ids), and only the rest of the prompt is prefilled. The result's
    "prefill_tokens" says how many tokens were prefilled, "cached_tokens" how many were reused."""
    cfg = model.config
    prompt_ids = getattr(prompt, "ids", None) or tok.encode_prompt(prompt)  # a Prompt carries its ids
    n, maxpos = len(prompt_ids), cfg.max_position_embeddings
    if n == 0:
        raise DemoError("the prompt is empty")
    if n >= maxpos:
        raise DemoError(f"the prompt is {n} tokens; the model's context (max_position_embeddings) is {maxpos}")
    max_new = min(args.max_new_tokens, maxpos - n)
    eos = tok.eos_ids or cfg.eos_ids
    stats, dec, times = ExpertStats(model), tok.stream(), []

    def on_token(nxt):  # after every step: nxt (1,)
        times.append(time.perf_counter())
        stats.collect()
        piece = dec.put(int(nxt[0]))
        if stream and piece:
            out(piece, end="")

    fast, compile = getattr(args, "fast", False), getattr(args, "compile", False)
    k = getattr(args, "speculative", None)
    spec = Speculation(k=k) if k else False  # MTP drafts verified k + 1 per forward (model/speculative.py)
    cache, cached = None, 0
    if session is not None and not (fast or compile or spec):
        cache = session.get("cache") or DynamicCache.for_model(cfg)
        kept = session.get("ids", [])[:cache.length]  # the cache holds these (a reply's last id is never forwarded)
        cached = min(_shared_prefix(kept, prompt_ids), n - 1)  # at least one token to prefill
        cache.crop(cached)
    fresh = {k for k, d in model.__dict__.get("_decoders", {}).items() if d.setup_s is not None}
    t0 = time.perf_counter()
    ids = model.generate(torch.tensor([prompt_ids], device=model.device), max_new, temperature=args.temperature,
                         top_p=args.top_p, eos_token_id=eos, seed=args.seed, on_token=on_token,
                         fast=fast or compile, compile=compile, past_key_values=cache, speculative=spec)
    if session is not None:
        session.update(ids=ids[0].tolist(), cache=cache)
    setup = [d.setup_s for k, d in model.__dict__.get("_decoders", {}).items()
             if d.setup_s is not None and k not in fresh]  # a decode step set up (compiled, captured) this turn
    rest = dec.flush()
    if stream:
        out(rest)
    gen = ids[0, n:].tolist()
    stopped = bool(gen) and gen[-1] in eos
    prefill = times[0] - t0
    decode = times[-1] - times[0]
    el = torch.finfo(model.dtype).bits // 8
    return {
        "prompt": prompt, "prompt_ids": prompt_ids, "generated_ids": gen,
        "text": tok.decode(gen), "stop_reason": "eos" if stopped else "max_new_tokens",
        "max_new_tokens": max_new, "prefill_tokens": n - cached, "cached_tokens": cached,
        "timings": {"prefill_s": prefill, "decode_s": decode, "prefill_tokens_per_s": n / prefill,
                    "decode_setup_s": setup[0] if setup else None,
                    "decode_tokens_per_s": (len(gen) - 1) / decode if len(gen) > 1 and decode > 0 else None},
        "experts": stats.summary(cfg.moe_topk),
        **({"routing": stats.per_generated(len(gen)), "routing_pieces": [tok.decode([t]) for t in gen]}
           if getattr(args, "show_routing", False) else {}),
        "kv_cache": {"bytes_per_token": cfg.kv_cache_bytes_per_token(el), "tokens": n + len(gen),
                     "bytes_used": cfg.kv_cache_bytes_per_token(el) * (n + len(gen)),
                     "bytes_allocated": cfg.kv_cache_bytes_per_token(el) * (n + max_new)},
        **({"acceptance_rate": spec.acceptance_rate, "speculative": spec.as_dict()} if spec else {}),
    }


def report(model, r: dict):
    cfg = model.config
    t, e, kv = r["timings"], r["experts"], r["kv_cache"]
    dec = f", decode {t['decode_tokens_per_s']:.1f} tokens/s" if t["decode_tokens_per_s"] else ""
    reused = f" (+ {r['cached_tokens']} kept in the cache)" if r.get("cached_tokens") else ""
    out(f"-- {len(r['generated_ids'])} tokens (stopped at {r['stop_reason']}): prefill {r['prefill_tokens']} "
        f"tokens{reused} in {t['prefill_s'] * 1e3:.1f} ms{dec}")
    if t.get("decode_setup_s") is not None:
        out(f"-- one-time set-up of the fast decode step (compile, and the CUDA-graph capture on a GPU; reused by later turns): "
            f"{t['decode_setup_s']:.1f} s, included in the decode rate above")
    if "speculative" in r:
        sp = r["speculative"]
        out(f"-- speculative (MTP head, k={sp['k']}): acceptance {sp['acceptance_rate']:.2f}, "
            f"{sp['tokens_per_step']:.2f} tokens per verify step")
    if e:
        c = parameter_counts(cfg)
        zero = f", {e['zero_mean']:.2f} to zero (identity) experts" if cfg.zero_expert_num else ""
        out(f"-- experts: per token and MoE layer, {e['real_mean']:.2f} of the top-{e['top_k']} slots went to real "
            f"experts (min {e['real_min']}, max {e['real_max']}){zero}")
        out(f"-- activated parameters per token: {activated_for(cfg, e['real_mean']):,.0f} on average "
            f"(possible range {c['activated_min']:,} - {c['activated_max']:,}, of {c['total']:,})")
    if "routing" in r and r["generated_ids"]:
        out(routing_line(r["routing_pieces"], r["routing"], cfg.moe_topk * len(model.moe_blocks())))
    out(f"-- KV cache: {kv['bytes_per_token']:,} bytes/token (latent {cfg.kv_lora_rank} + rope key "
        f"{cfg.qk_rope_head_dim} values x {cfg.num_attn_sublayers} attention sublayers); {kv['bytes_used']:,} bytes "
        f"for these {kv['tokens']} tokens")


# --------------------------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _checked(convert, ok, expected: str):
    """An argparse type: convert the text, check the value, or fail naming what was expected."""
    def parse(s):
        try:
            v = convert(s)
        except ValueError:
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}")
        return v
    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_temperature = _checked(float, lambda v: v >= 0, "a number >= 0 (0 = greedy)")
_top_p = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _device(s):
    try:
        d = torch.device(s)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {s!r} (try cpu or cuda)") from None
    if d.type not in ("cpu", "cuda", "mps", "xpu"):
        raise argparse.ArgumentTypeError(f"unsupported device {s!r} (try cpu or cuda)")
    backend = getattr(torch, d.type) if d.type != "mps" else torch.backends.mps
    if d.type != "cpu" and not (hasattr(backend, "is_available") and backend.is_available()):
        raise argparse.ArgumentTypeError(f"{s!r}: {d.type} is not available on this machine (try cpu)")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise argparse.ArgumentTypeError(f"{s!r} is not available: this machine has {n} CUDA device(s) (try cuda:0)")
    return s


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m longcat_ref.demo", formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Chat with a LongCat-Flash or GLM-4.7-Flash checkpoint (streamed, with statistics).\n"
                            "Without --model: the embedded tiny LongCat-Flash (untrained unless "
                            "longcat_ref/assets/tiny-longcat exists, so expect gibberish).",
                epilog="Prompts are rendered with the checkpoint's own chat template (tokenizer_config.json or "
                       "chat_template.jinja; the package's LongCat-Flash-Chat / GLM-4.7-Flash one if it ships none), "
                       "e.g. 'SYSTEM:{system} [Round 0] USER:{prompt} ASSISTANT:'. What you type stays plain text.")
    p.add_argument("--model", metavar="DIR", help="checkpoint directory: config.json, *.safetensors (+ index), "
                   "tokenizer.json, tokenizer_config.json (default: the embedded tiny model)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the user message (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--system", default=None, help="a system prompt (LongCat: 'SYSTEM:...' before round 0)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=48, metavar="N",
                   help="stop after N new tokens (default 48; fewer if the context is full or eos comes first)")
    p.add_argument("--temperature", type=_temperature, default=0.8, metavar="T",
                   help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=_top_p, default=0.95, metavar="P", help="nucleus sampling mass in (0, 1] "
                   "(default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0: reruns print the same text)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when a GPU is visible, else cpu; "
                   "under torchrun each rank uses cuda:LOCAL_RANK, or the CPU with --device cpu)")
    p.add_argument("--interactive", action="store_true", help="multi-turn chat: read user turns from stdin "
                   "(an empty line or EOF ends it)")
    p.add_argument("--fp8", choices=("dequantize", "keep"), default="dequantize",
                   help="an FP8 checkpoint (LongCat-Flash-Chat-FP8): dequantize it on load into --dtype, or keep it "
                   "in FP8 in memory (half the memory; Triton kernels on CUDA) (default: %(default)s)")
    p.add_argument("--fast", action="store_true", help="decode with the fast path: static cache, absorbed MLA, "
                   "gathered experts, one CUDA graph per token on GPU with the fused MLA / MoE decode kernels (also "
                   "under torchrun; same forward, same greedy tokens)")
    p.add_argument("--compile", action="store_true", help="with the fast path, also torch.compile the decode step "
                   "(a one-time compile, printed; later prompts and turns reuse it)")
    p.add_argument("--speculative", type=_positive_int, nargs="?", const=1, default=None, metavar="K",
                   help="self-speculative decoding with the checkpoint's MTP head: draft K tokens (default 1), "
                   "verify them in one forward; greedy tokens unchanged")
    p.add_argument("--show-routing", action="store_true", help="after the reply, print it again with each token "
                   "coloured by how many real FFN experts it used (terminal colours, with a legend)")
    p.add_argument("--json", action="store_true", help="print one JSON object (prompt_ids, generated_ids, text, "
                   "timings, statistics) instead of streaming")
    return p


class Prompt(str):
    """A rendered chat prompt (the text) carrying its ids, in which the user's text is plain text, never tokens."""

    ids: list[int]


def chat_prompt(tok, model_type: str, messages) -> Prompt:
    """The checkpoint's chat template (the package's one for model_type if it ships none) -> text + ids."""
    template = None if tok.chat_template else default_chat_template(model_type)
    prompt = Prompt(tok.apply_chat_template(messages, chat_template=template))
    prompt.ids = tok.apply_chat_template(messages, tokenize=True, chat_template=template, add_special_tokens=True)
    return prompt


def chat_once(model, tok, args, messages, stream: bool) -> dict:
    prompt = chat_prompt(tok, model.config.model_type, messages)
    if stream:
        out(f"USER: {messages[-1]['content']}")
        out("ASSISTANT: ", end="")
    return run_turn(model, tok, prompt, args, stream)


def _valid_utf8(text: str | None, what: str) -> None:
    """Command-line bytes that are not UTF-8 reach Python as lone surrogates: refuse them by name."""
    if text is not None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise DemoError(f"{what} is not valid UTF-8 text") from None


def read_user_turn() -> str:
    """One line from stdin ('' at EOF), with readline's editing and history when stdin is a terminal."""
    if sys.stdin is None or sys.stdin.closed:
        raise DemoError("--interactive reads the user's turns from stdin, which is closed")
    try:
        if sys.stdin.isatty():
            return input("USER> ") + "\n"  # readline (imported in main) edits this line
        print("USER> ", end="", flush=True)
        return sys.stdin.readline()
    except EOFError:
        return ""
    except UnicodeDecodeError:
        raise DemoError("stdin is not valid UTF-8 text") from None
    except (OSError, ValueError) as e:
        raise DemoError(f"cannot read stdin: {e}") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ctx = None
    try:
        if env_rank() is None:
            raise DemoError(f"the environment variable RANK={os.environ.get('RANK')!r} is not a process rank "
                            "(an integer >= 0)")
        if args.json and args.interactive:
            raise DemoError("--json and --interactive cannot be combined")
        _valid_utf8(args.prompt, "--prompt")
        _valid_utf8(args.system, "--system")
        if args.interactive and (sys.stdin is None or sys.stdin.closed):
            raise DemoError("--interactive reads the user's turns from stdin, which is closed")
        # under torchrun: join the group, this rank's GPU (gloo on the CPU with --device cpu); else world size 1
        ctx = ParallelContext.from_env(cpu=torch.device(args.device).type == "cpu")
        _CTX[0] = ctx
        if ctx.world_size > 1:
            args.seed = ctx.common_seed(args.seed)  # every rank samples the same tokens from the same logits
        model, tok, info = load_model(args, parallel=ctx if ctx.world_size > 1 else None)
        source, load_s = info["source"], info["load_s"]
        cfg = model.config
        system = [{"role": "system", "content": args.system}] if args.system else []
        if args.json:
            r = chat_once(model, tok, args, system + [{"role": "user", "content": args.prompt}], stream=False)
            r["timings"]["load_s"] = load_s
            r.update(model=source, dtype=str(model.dtype).removeprefix("torch."), device=str(model.device),
                     load_report=model.load_report.summary(), parameters=parameter_counts(cfg))
            out(json.dumps(r))
            return 0

        c = parameter_counts(cfg)
        name = "LongCat-Flash" if cfg.model_type == LONGCAT else "GLM-4.7-Flash"
        out(f"model: {source}")
        out(f"  {name}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.n_routed_experts} routed"
            + (f" + {cfg.zero_expert_num} zero" if cfg.zero_expert_num else "")
            + (f" + {cfg.n_shared_experts} shared" if cfg.n_shared_experts else "")
            + f" experts, top-{cfg.moe_topk}; {c['total']:,} parameters (+ {c['embedding']:,} embedding), "
            f"{c['activated_min']:,} - {c['activated_max']:,} activated per token")
        out(f"  loaded in {load_s:.2f} s ({str(model.dtype).removeprefix('torch.')} on {model.device}): "
            f"{model.load_report.summary()}")
        if args.model is None and not TRAINED_DIR.is_dir():
            out("  note: these weights are random (untrained), so the reply is gibberish -- by design.")
        elif args.model is None:
            out("  note: a tiny model trained on a little text: expect echoes of its training text, not answers "
                "(an untrained tiny model prints plain gibberish).")
        if not tok.chat_template:
            out(f"  note: the checkpoint ships no chat template; using the package's {name} one (io/chat.py)")
        if not args.interactive:
            report(model, chat_once(model, tok, args, system + [{"role": "user", "content": args.prompt}], True))
            return 0
        if is_main() and sys.stdin.isatty():
            try:
                import readline  # noqa: F401 -- line editing and history for input()
            except ImportError:  # not on every platform (Windows)
                pass
        history, session = [], {}  # the chat so far; the last turn's ids and KV cache
        while True:
            line = ctx.broadcast_object(read_user_turn() if is_main() else None)  # rank 0 reads for all
            if not line.strip():
                return 0
            msgs = system + history + [{"role": "user", "content": line.strip()}]
            try:
                _valid_utf8(line, "the input line")
                out("ASSISTANT: ", end="")
                r = run_turn(model, tok, chat_prompt(tok, cfg.model_type, msgs), args, stream=True, session=session)
            except DemoError as e:
                out(f"\nerror: {e}; starting a new conversation", file=sys.stderr)
                history, session = [], {}
                continue
            report(model, r)
            history = msgs[len(system):] + [{"role": "assistant", "content": r["text"]}]
    except (DemoError, CheckpointError, ConfigError, TokenizerError, ParallelError, ValueError, OSError) as e:
        print(f"{_rank_prefix()}error: {_one_line(e)}", file=sys.stderr)  # every rank: an error may be one rank's
        return 1
    except Exception as e:  # noqa: BLE001 -- the contract: one line, never a traceback
        print(f"{_rank_prefix()}error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if ctx is not None:
            ctx.close()


def _rank_prefix() -> str:
    """'[rank N] ' under a multi-process launch, else ''. Reads the environment with defaults only: the error
    handler must not raise (a missing RANK once raised KeyError here)."""
    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "1"):
        return ""
    return f"[rank {os.environ.get('RANK', '?')}] "


def _one_line(e: BaseException) -> str:
    return " | ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
