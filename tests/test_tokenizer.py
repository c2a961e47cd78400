"""Tokenizer training / loading / special tokens, calling it like transformers (padding, tensors), decode and
streaming decode. The chat templates are tested in test_chat.py."""

import json
import random
from pathlib import Path

import pytest
import torch

import longcat_ref as L
from longcat_ref.io.chat import LONGCAT_CHAT_TEMPLATE, longcat_chat_prompt
from longcat_ref.io.tokenizer import (SPECIAL_TOKENS, TokenizerError, load_tokenizer, save_generation_config,
                                      save_tokenizer, train_tokenizer)
from longcat_ref.tools.demo import CORPUS, TRAINED_DIR

ROOT = Path(__file__).resolve().parents[1]

TEXT = CORPUS.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([TEXT], vocab_size=400)


def test_training_is_deterministic_and_follows_the_convention(tok):
    again = train_tokenizer([TEXT], vocab_size=400)
    assert tok.tok.to_str() == again.tok.to_str()
    assert tok.vocab_size == 400
    assert [tok.token_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert SPECIAL_TOKENS == ["<longcat_unk>", "<longcat_s>", "</longcat_s>", "<longcat_pad>"]
    assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (1, [2], 3)
    s = "The fox said: 'Those grapes are sour' -- naïve café, 狐狸, 🦊!"
    assert tok.decode(tok.encode(s)) == s  # byte level: any string round-trips
    assert len(tok.encode("The tortoise and the hare")) < len("The tortoise and the hare") / 2  # merges learned
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([TEXT], vocab_size=100)


def test_save_and_load(tmp_path, tok):
    save_tokenizer(tok, tmp_path, model_max_length=512)
    tc = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tc["eos_token"] == "</longcat_s>" and tc["added_tokens_decoder"]["2"]["content"] == "</longcat_s>"
    back = load_tokenizer(tmp_path)
    assert (back.bos_id, back.eos_ids, back.pad_id) == (1, [2], 3)
    assert back.encode(TEXT[:500]) == tok.encode(TEXT[:500])


def test_special_tokens_from_transformers_files(tmp_path, tok):
    """AddedToken dicts in tokenizer_config.json; generation_config.json's eos list wins (what generate stops on)."""
    save_tokenizer(tok, tmp_path)
    tc = json.loads((tmp_path / "tokenizer_config.json").read_text())
    tc["eos_token"] = {"content": "</longcat_s>", "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False, "special": True}
    del tc["bos_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tc))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<longcat_s>"}))
    t = load_tokenizer(tmp_path)
    assert (t.bos_id, t.eos_ids) == (1, [2])
    save_generation_config(tmp_path, eos_token_id=[2, 3])
    assert load_tokenizer(tmp_path).eos_ids == [2, 3]


def test_tokenizer_errors(tmp_path, tok):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    save_tokenizer(tok, tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(TokenizerError, match="eos_token '<nope>' is not in"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 5}')
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot be read"):
        load_tokenizer(tmp_path)


# ------------------------------------------------------------------------------------------------- template ids
def test_template_eos_is_the_special_token(tok):
    ids = tok.encode(longcat_chat_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                          {"role": "user", "content": "c"}]))
    assert ids.count(2) == 1 and 1 not in ids  # one </longcat_s>, as one token; no bos


# ------------------------------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("text", ["The fox and the grapes.", "naïve café — 狐狸和葡萄 🦊🍇 end",
                                  TEXT[:300]])
def test_stream_decode_equals_full_decode(tok, text):
    ids = tok.encode(text)
    d = tok.stream()
    pieces = [d.put(i) for i in ids]
    assert "".join(pieces) + d.flush() == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)  # partial UTF-8 characters are held back, never printed broken
    if any(ord(c) > 127 for c in text):
        assert "" in pieces  # ... which really happened


def test_stream_decoder_uses_decode_stream_and_restarts_after_flush(tok):
    from tokenizers.decoders import DecodeStream

    d = tok.stream()
    assert isinstance(d._stream, DecodeStream)
    ids = tok.encode("狐狸")
    first = [d.put(i) for i in ids[:1]]
    assert d.flush() + "".join(first) == tok.decode(ids[:1])  # a cut character comes out at flush (as U+FFFD)
    assert "".join(d.put(i) for i in ids) + d.flush() == "狐狸"  # and the next text starts afresh


def test_stream_decode_random_ids_and_specials(tok):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        d = tok.stream()
        assert "".join(d.put(i) for i in ids) + d.flush() == tok.decode(ids)
    d = tok.stream()
    ids = tok.encode("Hello") + [2]
    assert "".join(d.put(i) for i in ids) + d.flush() == "Hello"  # eos is skipped


def test_transformers_reads_our_tokenizer_files_and_template(tmp_path, tok):
    """What we write is what transformers' AutoTokenizer understands: same ids, same specials, same chat string."""
    transformers = pytest.importorskip("transformers")
    save_tokenizer(tok, tmp_path, model_max_length=512, chat_template=LONGCAT_CHAT_TEMPLATE)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 3, 0)
    conv = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "A fable, please."}]
    for msgs in (conv, conv[1:], conv[1:2], conv[:2]):
        text = hf.apply_chat_template(msgs, tokenize=False)
        assert text == longcat_chat_prompt(msgs)
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def test_training_is_deterministic_across_processes(tok):
    """Rust hash maps are seeded per process: the trained tokenizer must not depend on that."""
    import os
    import subprocess
    import sys

    code = ("import sys; from longcat_ref.io.tokenizer import train_tokenizer; "
            "print(train_tokenizer([open(sys.argv[1], encoding='utf-8').read()], 400).tok.to_str(), end='')")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code, str(CORPUS)], capture_output=True, text=True, cwd=ROOT,
                             check=True, env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}).stdout
        assert out == tok.tok.to_str()


def test_add_bos_token_is_honoured(tmp_path):
    """The shipped trained model's tokenizer_config says add_bos_token: prompts then start with bos."""
    tok = load_tokenizer(TRAINED_DIR)
    assert tok.add_bos and tok.encode_prompt("[Round 0] USER:hi ASSISTANT:")[0] == tok.bos_id == 1
    assert tok.encode_prompt("x")[1:] == tok.encode("x")
    assert tok("x")["input_ids"] == tok.encode_prompt("x") and tok("x", add_special_tokens=False).input_ids[0] != 1


# ------------------------------------------------------------------------------------------------- like transformers
def test_exported_from_the_package():
    assert L.load_tokenizer is load_tokenizer and L.TokenizerError is TokenizerError
    assert isinstance(L.load_tokenizer(TRAINED_DIR), L.Tokenizer)


def test_call_single_and_batch_left_padded(tok):
    one = tok("The fox")
    assert one["input_ids"] == tok.encode("The fox") and one.attention_mask == [1] * len(one.input_ids)
    texts = ["The fox", "The crow and the pitcher of water", "A"]
    enc = tok(texts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (3, max(len(tok.encode(t)) for t in texts))
    for row, m, t in zip(ids.tolist(), mask.tolist(), texts):
        n = len(tok.encode(t))
        assert row[len(row) - n:] == tok.encode(t) and set(row[:len(row) - n]) <= {tok.pad_id}  # pads on the left
        assert m == [0] * (len(row) - n) + [1] * n
    right = tok(texts, padding=True, padding_side="right")
    assert right["input_ids"][2][0] == tok.encode("A")[0] and right["attention_mask"][2][-1] == 0
    assert tok(texts)["input_ids"] == [tok.encode(t) for t in texts]  # no padding asked: ragged lists
    assert tok("The fox", return_tensors="pt")["input_ids"].shape == (1, len(tok.encode("The fox")))


def test_call_errors_are_one_line(tok):
    for kwargs, words in ((dict(return_tensors="pt"), "padding=True"), (dict(return_tensors="np", padding=True), "'pt'"),
                          (dict(padding="max_length"), "padding="), (dict(padding=True, padding_side="up"), "left")):
        with pytest.raises(TokenizerError, match=words) as e:
            tok(["a", "bbb bbb"], **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(TokenizerError, match="string or a list of strings"):
        tok([1, 2])
    nopad = L.Tokenizer(tok.tok, bos_id=1, eos_ids=[2], pad_id=None)
    with pytest.raises(TokenizerError, match="no pad token"):
        nopad(["a", "bbb bbb"], padding=True)


def test_split_special_tokens(tok):
    assert 2 in tok.encode("hi</longcat_s>")
    plain = tok.encode("hi</longcat_s>", split_special_tokens=True)
    assert 2 not in plain and tok.decode(plain) == "hi</longcat_s>"
    assert tok("hi</longcat_s>", split_special_tokens=True, add_special_tokens=False).input_ids == plain


def test_decode_and_batch_decode_take_lists_and_tensors(tok):
    texts = ["The fox", "ate the grapes of the vine"]
    rows = [tok.encode(t) for t in texts]
    enc = tok(texts, padding=True, return_tensors="pt")
    assert tok.batch_decode(enc["input_ids"]) == texts  # pads are special: skipped
    assert tok.batch_decode(rows) == texts
    assert tok.decode(torch.tensor(rows[0])) == "The fox"
    assert tok.decode(enc["input_ids"][0], skip_special_tokens=False).endswith("<longcat_pad>The fox")
    with pytest.raises(TokenizerError, match="batch_decode"):
        tok.decode(enc["input_ids"])


def test_padded_batch_generates_what_each_prompt_does_alone():
    """text -> ids -> generate -> text for a left-padded batch: each row's new tokens equal its unpadded run."""
    model, tok = L.from_pretrained(TRAINED_DIR, dtype=torch.float32), load_tokenizer(TRAINED_DIR)
    prompts = [longcat_chat_prompt([{"role": "user", "content": q}])
               for q in ("What does the function os.path.join do?", "What is the json module for?")]
    enc = tok(prompts, padding=True, return_tensors="pt")
    assert enc["attention_mask"].min() == 0  # the rows really differ in length
    out = model.generate(enc["input_ids"], 8, attention_mask=enc["attention_mask"])
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:])
    for p, t in zip(prompts, texts):
        ids = tok(p, return_tensors="pt")["input_ids"]
        assert t == tok.decode(model.generate(ids, 8)[0, ids.shape[1]:])
