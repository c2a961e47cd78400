"""Tokenizer training / loading / special tokens, the LongCat chat template (exact strings), streaming decode."""

import json
import random

import pytest

from longcat_ref.io.chat import chat_prompt, longcat_chat_prompt
from longcat_ref.tools.demo import CORPUS
from longcat_ref.io.tokenizer import (SPECIAL_TOKENS, TokenizerError, load_tokenizer, save_generation_config,
                                   save_tokenizer, train_tokenizer)

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


# ------------------------------------------------------------------------------------------------- chat template
def test_longcat_template_exact_strings():
    u = lambda c: {"role": "user", "content": c}  # noqa: E731
    a = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    s = {"role": "system", "content": "You are LongCat."}
    assert longcat_chat_prompt([u("Hi")]) == "[Round 0] USER:Hi ASSISTANT:"
    assert longcat_chat_prompt([s, u("Hi")]) == "SYSTEM:You are LongCat. [Round 0] USER:Hi ASSISTANT:"
    assert longcat_chat_prompt([s, u("Hi"), a("Hello!"), u("Who are you?"), a("A cat."), u("Bye")]) == (
        "SYSTEM:You are LongCat. [Round 0] USER:Hi ASSISTANT:Hello!</longcat_s> "
        "[Round 1] USER:Who are you? ASSISTANT:A cat.</longcat_s> [Round 2] USER:Bye ASSISTANT:")
    assert longcat_chat_prompt([u("q0"), a("r0"), u("q1")]) == \
        "[Round 0] USER:q0 ASSISTANT:r0</longcat_s> [Round 1] USER:q1 ASSISTANT:"
    for bad in ([], [a("x")], [u("x"), a("y")], [u("x"), u("y")], [s]):
        with pytest.raises(ValueError, match="roles"):
            longcat_chat_prompt(bad)
    assert chat_prompt("longcat_flash", [u("Hi")]) == "[Round 0] USER:Hi ASSISTANT:"
    assert chat_prompt("glm4_moe_lite", [s, u("[gMASK]<sop>hello")]) == "[gMASK]<sop>hello"  # raw


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
    pytest.importorskip("jinja2")
    from longcat_ref.io.chat import LONGCAT_CHAT_TEMPLATE

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

    # tokenizer.py has no package imports: load it alone (no torch import, fast)
    code = ("import importlib.util as u, sys; s = u.spec_from_file_location('t', sys.argv[1]); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); print(m.train_tokenizer([open(sys.argv[2], encoding='utf-8').read()], 400)"
            ".tok.to_str(), end='')")
    import longcat_ref.io.tokenizer as T

    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code, T.__file__, str(CORPUS)], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        assert out == tok.tok.to_str()


def test_add_bos_token_is_honoured(tmp_path):
    """The shipped trained model's tokenizer_config says add_bos_token: prompts then start with bos."""
    from longcat_ref.tools.demo import TRAINED_DIR
    from longcat_ref.io.tokenizer import load_tokenizer

    tok = load_tokenizer(TRAINED_DIR)
    assert tok.add_bos and tok.encode_prompt("[Round 0] USER:hi ASSISTANT:")[0] == tok.bos_id == 1
    assert tok.encode_prompt("x")[1:] == tok.encode("x")
