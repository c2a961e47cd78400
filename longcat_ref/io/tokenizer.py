"""Tokenizers: load a checkpoint's `tokenizer.json`, train tiny byte-level BPE ones, decode while streaming.

Loading uses the `tokenizers` library (the Rust core of transformers' fast tokenizers) on the checkpoint's
`tokenizer.json`. The special tokens come from the files transformers writes next to it, first hit wins:

    bos / pad   tokenizer_config.json ("bos_token": "<s>" or {"content": "<s>", ...}) -> special_tokens_map.json
                -> generation_config.json (ids) -> config.json (ids)
    eos (stop)  generation_config.json "eos_token_id" (an id or a list, what transformers' generate stops on)
                -> tokenizer_config.json / special_tokens_map.json "eos_token" -> config.json

Tiny tokenizers for tests, notebooks and the demo (`train_tokenizer`) follow the convention agreed across this
project, modelled on LongCat-Flash-Chat's token strings:

    id 0 <longcat_unk>   id 1 <longcat_s> (bos)   id 2 </longcat_s> (eos)   id 3 <longcat_pad> (pad)

Streaming: byte-level BPE tokens can end in the middle of a UTF-8 character, so decoding token by token would
print broken characters. `StreamDecoder` re-decodes a short window and only emits text once it is complete
(no trailing U+FFFD): the concatenation of its pieces equals decoding all ids at once.
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

UNK, BOS, EOS, PAD = "<longcat_unk>", "<longcat_s>", "</longcat_s>", "<longcat_pad>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD]  # ids 0, 1, 2, 3


class TokenizerError(ValueError):
    """A tokenizer directory we cannot use; the message names the file."""


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the checkpoint's special tokens.

    encode(text) -> ids (never adds bos/eos: chat templates spell out their special tokens, as transformers'
    apply_chat_template does); encode_prompt(text) -> ids with bos first iff the checkpoint's tokenizer_config
    says `add_bos_token`; decode(ids) -> text; bos_id, eos_ids (a list: any of them stops), pad_id.
    """

    def __init__(self, tok: _HFTokenizer, bos_id=None, eos_ids=(), pad_id=None, path=None, add_bos=False):
        self.tok, self.bos_id, self.eos_ids, self.pad_id, self.path = tok, bos_id, list(eos_ids), pad_id, path
        self.add_bos = bool(add_bos) and bos_id is not None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """A rendered prompt -> ids, with the bos token first when the checkpoint was trained that way."""
        return ([self.bos_id] if self.add_bos else []) + self.encode(text)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def stream(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Incremental detokenizer: put(id) -> the new text that is now complete (maybe ''); flush() -> the rest.

    Keeps two offsets into the ids seen so far: text up to `read` has been emitted; decoding restarts at `prefix`
    (a few tokens back, so decoders that look at context -- leading spaces, byte fallback -- see it).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.t, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def _decode(self, a: int, b: int | None = None) -> str:
        return self.t.decode(self.ids[a:b], skip_special_tokens=self.skip)

    def put(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        done = self._decode(self.prefix, self.read)  # already emitted
        text = self._decode(self.prefix)
        if len(text) > len(done) and not text.endswith("\ufffd"):  # complete characters: emit them
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        done, text = self._decode(self.prefix, self.read), self._decode(self.prefix)
        self.prefix = self.read = len(self.ids)
        return text[len(done):]


# ------------------------------------------------------------------------------------------------- loading
def _read_json(path):
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
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


def load_tokenizer(path) -> Tokenizer:
    """Load tokenizer.json and the special tokens from a checkpoint directory."""
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
    return Tokenizer(tok, bos, eos, pad, path, add_bos=tcfg.get("add_bos_token", False))


# ------------------------------------------------------------------------------------------------- tiny ones
def train_tokenizer(texts, vocab_size: int = 512) -> Tokenizer:
    """Train a byte-level BPE tokenizer (deterministic: same texts -> same tokenizer.json).

    ids 0-3 are SPECIAL_TOKENS, then the 256 byte symbols, then merges up to vocab_size. Byte-level means every
    string can be encoded (no unknown tokens).
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 256} (specials + 256 bytes), got {vocab_size}")
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    return Tokenizer(tok, bos_id=1, eos_ids=[2], pad_id=3)


def save_tokenizer(tokenizer: Tokenizer, path, model_max_length: int | None = None, chat_template: str | None = None):
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json as transformers does."""
    os.makedirs(path, exist_ok=True)
    tok = tokenizer.tok
    tok.save(os.path.join(path, "tokenizer.json"))

    def name(i):
        return None if i is None else tok.id_to_token(i)

    eos = tokenizer.eos_ids[0] if tokenizer.eos_ids else None
    specials = {"bos_token": name(tokenizer.bos_id), "eos_token": name(eos),
                "pad_token": name(tokenizer.pad_id), "unk_token": name(0) if tok.id_to_token(0) == UNK else None}
    specials = {k: v for k, v in specials.items() if v is not None}
    added = {str(i): {"content": tok.id_to_token(i), "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
             for i in range(tok.get_vocab_size(with_added_tokens=True)) if tok.id_to_token(i) in SPECIAL_TOKENS}
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "added_tokens_decoder": added, **specials}
    if model_max_length:
        tcfg["model_max_length"] = model_max_length
    if chat_template:
        tcfg["chat_template"] = chat_template
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f, indent=2, ensure_ascii=False)
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2, ensure_ascii=False)
    return path


def save_generation_config(path, bos_token_id=None, eos_token_id=None, pad_token_id=None):
    """generation_config.json, where transformers' generate reads its stop ids."""
    d = {k: v for k, v in dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id).items()
         if v is not None}
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(d, f, indent=2)
    return path
