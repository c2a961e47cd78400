"""Tokenizers: load a checkpoint's tokenizer, call it like transformers' fast tokenizer, render its chat template,
decode while streaming, and train the tiny byte-level BPE ones (the package's one trainer).

    tok = load_tokenizer("path/to/checkpoint")          # also longcat_ref.load_tokenizer
    enc = tok(["Hi", "A longer prompt"], padding=True, return_tensors="pt")   # left-padded, for generate
    ids = tok.apply_chat_template(messages, tokenize=True, return_tensors="pt")
    out = model.generate(ids, max_new_tokens=32, eos_token_id=tok.eos_ids)
    text = tok.decode(out[0, ids.shape[1]:])

Loading uses the `tokenizers` library (the Rust core of transformers' fast tokenizers) on the checkpoint's
`tokenizer.json`. The special tokens come from the files transformers writes next to it, first hit wins:

    bos / pad   tokenizer_config.json ("bos_token": "<s>" or {"content": "<s>", ...}) -> special_tokens_map.json
                -> generation_config.json (ids) -> config.json (ids)
    eos (stop)  generation_config.json "eos_token_id" (an id or a list, what transformers' generate stops on)
                -> tokenizer_config.json / special_tokens_map.json "eos_token" -> config.json
    template    chat_template.jinja -> tokenizer_config.json "chat_template" (a string, or a list of
                {"name", "template"} of which "default" is used), as transformers reads them

Where this differs from transformers, on purpose: `decode` skips special tokens by default (the text a reader
wants); `apply_chat_template` defaults to add_generation_prompt=True and tokenize=False (a prompt to generate
from), and with tokenize=True user text is always encoded as plain text (transformers: sanitize_control_tokens).

Tiny tokenizers for tests, notebooks, the demo and the trained tiny model (`train_tokenizer`) follow the
convention agreed across this project, modelled on LongCat-Flash-Chat's token strings:

    id 0 <longcat_unk>   id 1 <longcat_s> (bos)   id 2 </longcat_s> (eos)   id 3 <longcat_pad> (pad)

Streaming: byte-level BPE tokens can end in the middle of a UTF-8 character, so decoding token by token would
print broken characters. `StreamDecoder` wraps `tokenizers.decoders.DecodeStream`, which only emits text once it
is complete; `flush()` returns what is held back at the end, so the pieces always join to decode(all ids).
"""

from __future__ import annotations

import json
import os
import re

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .chat import MARK_END, MARK_START, render_chat, template_literals

UNK, BOS, EOS, PAD = "<longcat_unk>", "<longcat_s>", "</longcat_s>", "<longcat_pad>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD]  # ids 0, 1, 2, 3


class TokenizerError(ValueError):
    """A tokenizer directory or an input we cannot use; the message names the file or the problem."""


class BatchEncoding(dict):
    """{"input_ids": ..., "attention_mask": ...}, also readable as attributes (enc.input_ids), like transformers'."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _ids_list(ids) -> list[int]:
    """A list of ids from a list, a tuple or a 1-d tensor / array."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], (list, tuple)):
        raise TokenizerError("decode takes one sequence of ids; use batch_decode for a batch")
    return [int(i) for i in ids]


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the checkpoint's special tokens and chat template.

    tok(text or texts, padding=..., return_tensors=...) -> BatchEncoding(input_ids, attention_mask)
    encode(text) -> ids (never adds bos/eos); encode_prompt(text) -> ids with bos first iff the checkpoint's
    tokenizer_config says `add_bos_token`; decode(ids) / batch_decode(rows) -> text;
    apply_chat_template(messages, ...) -> the prompt (text or ids); stream() -> a StreamDecoder.
    Attributes: bos_id, eos_ids (a list: any of them stops), pad_id, add_bos, chat_template, padding_side.
    """

    padding_side = "left"  # generation appends on the right, so prompts are padded on the left

    def __init__(self, tok: _HFTokenizer, bos_id=None, eos_ids=(), pad_id=None, path=None, add_bos=False,
                 chat_template: str | None = None):
        self.tok, self.bos_id, self.eos_ids, self.pad_id, self.path = tok, bos_id, list(eos_ids), pad_id, path
        self.add_bos = bool(add_bos) and bos_id is not None
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def special_tokens(self) -> dict[str, str]:
        """{"bos_token": ..., "eos_token": ..., "pad_token": ...} (the template variables transformers passes)."""
        names = {"bos_token": self.bos_id, "eos_token": self.eos_ids[0] if self.eos_ids else None,
                 "pad_token": self.pad_id}
        return {k: self.tok.id_to_token(i) for k, i in names.items() if i is not None}

    # --------------------------------------------------------------------------------------------- encoding
    def encode(self, text: str, split_special_tokens: bool = False) -> list[int]:
        """text -> ids. Special tokens written in the text become their ids, unless split_special_tokens."""
        if split_special_tokens:
            return self.encode_plain(text)
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_plain(self, text: str) -> list[int]:
        """text -> ids with no added token matched at all: normalizer, pre-tokenizer and model only."""
        t = self.tok
        if t.normalizer is not None:
            text = t.normalizer.normalize_str(text)
        pieces = [p for p, _ in t.pre_tokenizer.pre_tokenize_str(text)] if t.pre_tokenizer is not None else [text]
        return [tk.id for p in pieces for tk in t.model.tokenize(p)]

    def encode_prompt(self, text: str) -> list[int]:
        """A rendered prompt -> ids, with the bos token first when the checkpoint was trained that way."""
        return self._with_bos(self.encode(text))

    def _with_bos(self, ids: list[int]) -> list[int]:
        return [self.bos_id] + ids if self.add_bos and ids[:1] != [self.bos_id] else ids

    def __call__(self, text, padding: bool | str = False, return_tensors: str | None = None,
                 add_special_tokens: bool = True, split_special_tokens: bool = False,
                 padding_side: str | None = None) -> BatchEncoding:
        """text (a string or a list of strings) -> BatchEncoding(input_ids, attention_mask), as transformers.

        add_special_tokens: bos first when the checkpoint says add_bos_token. padding=True / "longest": pad every
        row to the longest, on the left by default (padding_side), with pad_id and attention_mask 0.
        return_tensors="pt": torch int64 tensors, shape (batch, len); a single string gives a batch of one.
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TokenizerError("tok(...) takes a string or a list of strings")
        rows = [self.encode(t, split_special_tokens) for t in texts]
        if add_special_tokens:
            rows = [self._with_bos(r) for r in rows]
        masks = [[1] * len(r) for r in rows]
        if padding not in (False, True, "longest", "do_not_pad"):
            raise TokenizerError(f"padding={padding!r}: use True / 'longest' (pad to the longest row) or False")
        if padding in (True, "longest") and len({len(r) for r in rows}) > 1:
            side = padding_side or self.padding_side
            if side not in ("left", "right"):
                raise TokenizerError(f"padding_side={side!r}: use 'left' (for generation) or 'right'")
            if self.pad_id is None:
                raise TokenizerError("this tokenizer has no pad token (pad_token / pad_token_id); cannot pad")
            n = max(len(r) for r in rows)
            pad = [[self.pad_id] * (n - len(r)) for r in rows]
            zeros = [[0] * (n - len(r)) for r in rows]
            if side == "left":
                rows, masks = [p + r for p, r in zip(pad, rows)], [z + m for z, m in zip(zeros, masks)]
            else:
                rows, masks = [r + p for p, r in zip(pad, rows)], [m + z for z, m in zip(zeros, masks)]
        if return_tensors is not None:
            if return_tensors != "pt":
                raise TokenizerError(f"return_tensors={return_tensors!r}: only 'pt' (torch) is supported")
            if len({len(r) for r in rows}) > 1:
                raise TokenizerError("the texts have different lengths: pass padding=True to make one tensor")
            import torch

            return BatchEncoding(input_ids=torch.tensor(rows, dtype=torch.long),
                                 attention_mask=torch.tensor(masks, dtype=torch.long))
        if single:
            return BatchEncoding(input_ids=rows[0], attention_mask=masks[0])
        return BatchEncoding(input_ids=rows, attention_mask=masks)

    # --------------------------------------------------------------------------------------------- decoding
    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """ids (a list or a 1-d tensor) -> text; special tokens (bos, eos, pad) are left out by default."""
        return self.tok.decode(_ids_list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        """rows of ids (a list of lists or a 2-d tensor) -> one text per row."""
        rows = sequences.tolist() if hasattr(sequences, "tolist") else list(sequences)
        return self.tok.decode_batch([_ids_list(r) for r in rows], skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    # --------------------------------------------------------------------------------------------- chat
    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False, *,
                            tools=None, documents=None, chat_template: str | None = None,
                            add_special_tokens: bool = False, return_tensors: str | None = None,
                            **template_kwargs):
        """Render a conversation with the checkpoint's Jinja chat template (as transformers does).

        messages: [{"role": ..., "content": ...}, ...]. template_kwargs reach the template (enable_thinking=False,
        clear_thinking=False, ...). chat_template: a Jinja string to use instead of the checkpoint's.
        tokenize=False -> the prompt string. tokenize=True -> ids (a (1, n) tensor with return_tensors="pt"), where
        the template's markup is parsed for special tokens and the caller's text is not: a user who types
        `</longcat_s>` gets the ids of that plain text. add_special_tokens=True also puts bos first when the
        checkpoint says add_bos_token (transformers never adds it here; the shipped tiny model was trained so).
        """
        template = chat_template or self.chat_template
        if template is None:
            where = f" in {self.path}" if self.path else ""
            raise TokenizerError(f"no chat template{where} (tokenizer_config.json 'chat_template' or "
                                 "chat_template.jinja); pass chat_template=... (see longcat_ref.io.chat)")
        kw = dict(add_generation_prompt=add_generation_prompt, tools=tools, documents=documents,
                  special_tokens=self.special_tokens(), **template_kwargs)
        if not tokenize:
            return render_chat(template, messages, **kw)
        ids = self.encode_marked(render_chat(template, messages, mark_re=self._control_re(template), **kw))
        if add_special_tokens:
            ids = self._with_bos(ids)
        if return_tensors is None:
            return ids
        if return_tensors != "pt":
            raise TokenizerError(f"return_tensors={return_tensors!r}: only 'pt' (torch) is supported")
        import torch

        return torch.tensor([ids], dtype=torch.long)

    def control_tokens(self, template: str) -> list[str]:
        """Tokens that only the template may write: every special token, and the other added tokens that occur in
        the template's own text (transformers' rule for sanitize_control_tokens)."""
        literal = template_literals(template)
        added = self.tok.get_added_tokens_decoder().values()
        return [a.content for a in added if a.special or (a.content in literal and not a.content.isspace())]

    def _control_re(self, template: str) -> re.Pattern:
        toks = sorted(self.control_tokens(template), key=len, reverse=True)  # longest first: <|a|b|> before <|a|>
        return re.compile("|".join(map(re.escape, toks)) or "(?!)")

    def encode_marked(self, text: str) -> list[int]:
        """Encode a prompt rendered with marked user strings: marked tokens as plain text, the rest as usual.

        The text splits into [markup, marked token, markup, marked token, ..., markup]; a lone marker (a template
        that cut a marked token with a string method) is dropped but still separates the text around it.
        """
        added = sorted((a.content for a in self.tok.get_added_tokens_decoder().values()), key=len, reverse=True)
        alt = "|".join(map(re.escape, added)) or "(?!)"
        parts = re.split(f"{MARK_START}({alt}){MARK_END}|[{MARK_START}{MARK_END}]", text)
        ids = []
        for i, part in enumerate(parts):
            if not part:
                continue
            if i % 2 == 0:  # the template's markup (and user text without control tokens)
                ids += self.encode(part)
            else:  # a control token the caller typed
                plain = self.encode_plain(part)
                if self.tok.token_to_id(part) in plain:
                    raise TokenizerError(f"cannot encode {part!r} as plain text: the vocabulary makes that token")
                ids += plain
        return ids


class StreamDecoder:
    """Incremental detokenizer: put(id) -> the new text that is now complete (maybe ''); flush() -> the rest.

    `tokenizers.decoders.DecodeStream` does the work: it re-decodes a few tokens of context and returns None while
    the text ends in an incomplete character. It never returns the held-back tail, so we keep the ids and let
    flush() decode it (an incomplete character at the very end decodes as U+FFFD, as in decode(all ids)).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.t, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0  # characters returned so far
        self._stream = decoders.DecodeStream(skip_special_tokens=skip_special_tokens)

    def put(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        piece = self._stream.step(self.t.tok, int(token_id)) or ""
        self.emitted += len(piece)
        return piece

    def flush(self) -> str:
        """Whatever is still held back; afterwards the decoder starts afresh."""
        rest = self.t.decode(self.ids, skip_special_tokens=self.skip)[self.emitted:]
        self.ids, self.emitted = [], 0
        self._stream = decoders.DecodeStream(skip_special_tokens=self.skip)
        return rest


# ------------------------------------------------------------------------------------------------- loading
def _read_json(path):
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return d


def _token_content(v):
    """transformers writes special tokens as "<s>" or as an AddedToken dict {"content": "<s>", ...}."""
    return v.get("content") if isinstance(v, dict) else v


def _as_list(v):
    return [] if v is None else (list(v) if isinstance(v, (list, tuple)) else [v])


def _chat_template(path: str, tcfg: dict) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's chat_template (a string or a named list)."""
    file = os.path.join(path, "chat_template.jinja")
    if os.path.exists(file):
        with open(file, encoding="utf-8") as f:
            return f.read()
    t = tcfg.get("chat_template")
    if t is None or isinstance(t, str):
        return t
    if isinstance(t, list) and all(isinstance(x, dict) and {"name", "template"} <= set(x) for x in t):
        named = {x["name"]: x["template"] for x in t}
        if "default" in named:
            return named["default"]
        raise TokenizerError(f"{path}: tokenizer_config.json has chat templates {sorted(named)} but no 'default'")
    raise TokenizerError(f"{path}: tokenizer_config.json 'chat_template' must be a string or a list of "
                         "{'name', 'template'}")


def load_tokenizer(path) -> Tokenizer:
    """Load tokenizer.json, the special tokens and the chat template from a checkpoint directory."""
    path = os.fspath(path)
    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
        raise TokenizerError(f"{path}: no tokenizer.json (the demo needs the checkpoint's tokenizer)")
    try:
        tok = _HFTokenizer.from_file(file)
    except Exception as e:  # noqa: BLE001 -- the Rust library raises plain Exception
        raise TokenizerError(f"{file}: cannot be read by the tokenizers library ({str(e)[:200]})") from None
    tcfg = _read_json(os.path.join(path, "tokenizer_config.json"))
    smap = _read_json(os.path.join(path, "special_tokens_map.json"))
    gcfg = _read_json(os.path.join(path, "generation_config.json"))
    mcfg = _read_json(os.path.join(path, "config.json"))

    def by_name(key):
        for d in (tcfg, smap):
            name = _token_content(d.get(key))
            if name is not None:
                i = tok.token_to_id(name)
                if i is None:
                    raise TokenizerError(f"{path}: {key} {name!r} is not in tokenizer.json's vocabulary")
                return i
        return None

    def first(*vals):
        return next((v for v in vals if v is not None and v != []), None)

    bos = first(by_name("bos_token"), gcfg.get("bos_token_id"), mcfg.get("bos_token_id"))
    pad = first(by_name("pad_token"), gcfg.get("pad_token_id"), mcfg.get("pad_token_id"))
    eos = _as_list(first(gcfg.get("eos_token_id"), by_name("eos_token"), mcfg.get("eos_token_id")))
    for i in eos:
        if not isinstance(i, int) or not 0 <= i < tok.get_vocab_size(with_added_tokens=True):
            raise TokenizerError(f"{path}: eos token id {i!r} is outside the vocabulary")
    return Tokenizer(tok, bos, eos, pad, path, add_bos=tcfg.get("add_bos_token", False),
                     chat_template=_chat_template(path, tcfg))


# ------------------------------------------------------------------------------------------------- tiny ones
def train_tokenizer(texts, vocab_size: int = 512, min_frequency: int = 2, add_bos: bool = False) -> Tokenizer:
    """Train a byte-level BPE tokenizer (deterministic: same texts and settings -> same tokenizer.json).

    ids 0-3 are SPECIAL_TOKENS, then the 256 byte symbols, then merges up to vocab_size (pairs seen fewer than
    min_frequency times are not merged). Byte-level means every string can be encoded (no unknown tokens).
    add_bos: the prompts of a model trained with bos first (the shipped tiny model: tools/train.py).
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 256} (specials + 256 bytes), got {vocab_size}")
    tok = _HFTokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=min_frequency,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    return Tokenizer(tok, bos_id=1, eos_ids=[2], pad_id=3, add_bos=add_bos)


def tokenizer_config(tokenizer: Tokenizer, model_max_length: int | None = None,
                     chat_template: str | None = None) -> dict:
    """The tokenizer_config.json transformers reads for this tokenizer (special tokens, add_bos_token, template)."""
    tok = tokenizer.tok
    specials = {**tokenizer.special_tokens(), "unk_token": UNK if tok.id_to_token(0) == UNK else None}
    specials = {k: v for k, v in specials.items() if v is not None}
    added = {str(i): {"content": a.content, "lstrip": a.lstrip, "normalized": a.normalized, "rstrip": a.rstrip,
                      "single_word": a.single_word, "special": a.special}
             for i, a in sorted(tok.get_added_tokens_decoder().items())}
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": tokenizer.add_bos, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "added_tokens_decoder": added, **specials}
    if model_max_length:
        tcfg["model_max_length"] = model_max_length
    template = chat_template or tokenizer.chat_template
    if template:
        tcfg["chat_template"] = template
    return tcfg


def save_tokenizer(tokenizer: Tokenizer, path, model_max_length: int | None = None, chat_template: str | None = None):
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json as transformers does."""
    os.makedirs(path, exist_ok=True)
    tokenizer.tok.save(os.path.join(path, "tokenizer.json"))
    tcfg = tokenizer_config(tokenizer, model_max_length, chat_template)
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tcfg, f, indent=2, ensure_ascii=False)
        f.write("\n")
    smap = {k: tcfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in tcfg}
    with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(smap, f, indent=2, ensure_ascii=False)
    return path


def save_generation_config(path, bos_token_id=None, eos_token_id=None, pad_token_id=None):
    """generation_config.json, where transformers' generate reads its stop ids."""
    d = {k: v for k, v in dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id).items()
         if v is not None}
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(d, f, indent=2)
    return path
