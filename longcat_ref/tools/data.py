"""Training data for the tiny LongCat-Flash: a chat corpus derived offline from the Python standard library, and
packed training batches (the tokenizer is io/tokenizer.py's `train_tokenizer`, the template io/chat.py's).

Corpus. For a fixed list of pure-Python standard-library modules we read the docstring of every public function and
class (`inspect`, nothing is downloaded) and turn each into one chat round in LongCat-Flash-Chat's template:

    <longcat_s>[Round 0] USER:What does the function json.dumps do? ASSISTANT:Serialize ``obj`` to ...</longcat_s>

Docstrings change between Python releases, so the corpus is built once and shipped, one round per line, in
`longcat_ref/assets/stdlib_chat.txt` (built with Python 3.11; CPython's docstrings are under the PSF license).
`python -m longcat_ref.tools.data` rebuilds it from the running Python; `corpus_sha256` is logged with every run.

Tokenizer. `io.tokenizer.train_tokenizer(corpus_texts(), 2048, min_frequency=0)`, deterministic for a given corpus
(tools/train.py; tests/test_train.py retrains it and compares with the shipped tokenizer.json). Special tokens:

    id 0 <longcat_unk>   1 <longcat_s> (bos)   2 </longcat_s> (eos)   3 <longcat_pad> (pad)

Batches. All rounds are tokenized, concatenated into one stream (each round starts with bos and ends with eos) and
cut into rows of seq_len + 1 tokens; a seeded torch.Generator picks the rows of each batch.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import re

import torch

from ..io.chat import longcat_chat_prompt
from ..io.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, UNK  # noqa: F401 -- ids 0-3, re-exported for readers

# Pure-Python modules whose import has no side effects; sorted names make the corpus order deterministic.
MODULES = [
    "builtins", "abc", "argparse", "base64", "bisect", "calendar", "collections", "colorsys", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.utils", "enum", "filecmp",
    "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html", "html.parser", "http.client", "http.cookies", "imaplib", "inspect", "io", "ipaddress", "json",
    "json.decoder", "json.encoder", "keyword", "linecache", "locale", "logging", "logging.handlers", "lzma",
    "mailbox", "mimetypes", "netrc", "ntpath", "numbers", "operator", "optparse", "os", "os.path", "pathlib",
    "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "posixpath", "pprint", "queue",
    "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib",
    "socket", "socketserver", "statistics", "string", "stringprep", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree",
    "zipfile", "zipimport",
]


def summary(doc: str, max_chars: int = 300) -> str | None:
    """The first paragraph of a docstring, on one line, cut at a sentence end near max_chars."""
    para = inspect.cleandoc(doc).split("\n\n")[0]
    text = re.sub(r"\s+", " ", para).strip()
    if len(text) < 12 or text.startswith(("(", "[", "<")) or "\u2014" in text:
        return None  # signatures like "f(a, b) -> c" or empty summaries teach nothing
    if len(text) > max_chars:
        cut = text.rfind(". ", 0, max_chars)
        text = text[: cut + 1] if cut > 40 else text[:max_chars].rsplit(" ", 1)[0] + " ..."
    return text if text.isascii() else None


def stdlib_qa(modules=MODULES) -> list[tuple[str, str]]:
    """(question, answer) pairs from the docstrings of the listed modules' public functions and classes."""
    pairs, seen = [], set()
    for mod_name in modules:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        if mod.__doc__ and (a := summary(mod.__doc__)):
            pairs.append((f"What is the {mod_name} module for?", a))
        for name in sorted(vars(mod)):
            obj = getattr(mod, name)
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            if getattr(obj, "__module__", None) not in (mod_name, None) and not mod_name.startswith("os"):
                continue  # re-exported from elsewhere: asked once, where it is defined
            a = summary(obj.__doc__ or "")
            if a is None or (mod_name, name) in seen:
                continue
            seen.add((mod_name, name))
            kind = "class" if inspect.isclass(obj) else "function"
            pairs.append((f"What does the {kind} {mod_name}.{name} do?", a))
            if inspect.isclass(obj):  # and its public methods
                for meth in sorted(vars(obj)):
                    m = vars(obj)[meth]
                    if meth.startswith("_") or not callable(m) or not (b := summary(getattr(m, "__doc__", None) or "")):
                        continue
                    pairs.append((f"What does the method {mod_name}.{name}.{meth} do?", b))
    return pairs


def chat_text(q: str, a: str) -> str:
    """One round in LongCat-Flash-Chat's template, "[Round 0] USER:{q} ASSISTANT:{a}" (bos/eos are added as ids,
    not text, by `encode_corpus`)."""
    return longcat_chat_prompt([{"role": "user", "content": q}]) + a


CORPUS_FILE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "stdlib_chat.txt")


def build_corpus() -> list[str]:
    """Derive the chat rounds from the running Python's standard library."""
    return [chat_text(q, a) for q, a in stdlib_qa()]


def corpus_texts(path: str = CORPUS_FILE) -> list[str]:
    """The shipped corpus: one chat round per line."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no corpus at {path}: rebuild it with `python -m longcat_ref.tools.data`")
    with open(path, encoding="utf-8") as f:
        return [line for line in f.read().split("\n") if line]


def corpus_sha256(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------- batches
def encode_corpus(tok, texts: list[str]) -> torch.Tensor:
    """One stream of ids: bos, round, eos, bos, round, eos, ... (int64). tok: an io.tokenizer.Tokenizer or a plain
    `tokenizers.Tokenizer`."""
    tok = getattr(tok, "tok", tok)  # the tokenizers.Tokenizer inside ours
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    ids = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids += [bos, *enc.ids, eos]
    return torch.tensor(ids, dtype=torch.long)


def make_rows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut the stream into rows of seq_len + 1 (inputs are row[:-1], targets row[1:])."""
    n = (stream.numel() - 1) // seq_len
    return stream[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len)  # (n, seq_len + 1), overlapping by one


def split_rows(rows: torch.Tensor, val_fraction: float = 0.05):
    """Last rows for validation, the rest for training (no shuffling: deterministic and leak-free)."""
    n_val = max(1, int(len(rows) * val_fraction))
    return rows[:-n_val], rows[-n_val:]


if __name__ == "__main__":
    texts = build_corpus()
    with open(CORPUS_FILE, "w", encoding="utf-8") as f:
        f.write("\n".join(texts) + "\n")
    print(f"wrote {len(texts)} chat rounds to {CORPUS_FILE} (sha256 {corpus_sha256(texts)[:16]})")
