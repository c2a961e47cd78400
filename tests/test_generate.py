"""generate()'s transformers-named options (do_sample, top_k, top_p, temperature, repetition_penalty, stop_strings,
pad_token_id, max_length, streamer, eos from the checkpoint), each equal on the plain and the fast path, and its
refusal of bad arguments by name (issue 15 item 1, issue 16 item 5)."""

import json

import numpy as np
import pytest
import torch

import longcat_ref as L
from longcat_ref.io.checkpoint import CheckpointError
from longcat_ref.io.streaming import TextIteratorStreamer, stream
from longcat_ref.model.generate import repetition_penalized, sample_next
from longcat_ref.runtime.parallel import VocabParallelEmbedding
from longcat_ref.tools.demo import TRAINED_DIR


def tiny(kind="longcat", **kw):
    cfg = L.tiny_longcat(**kw) if kind == "longcat" else L.tiny_glm(**kw)
    return L.init_weights(L.CausalLM(cfg), seed=1, std=0.08, bias_std=0.05).eval()


@pytest.fixture(scope="module")
def m():
    return tiny()


@pytest.fixture(scope="module")
def trained():
    return L.from_pretrained(TRAINED_DIR, dtype=torch.float32), L.load_tokenizer(TRAINED_DIR)


IDS = torch.tensor([[5, 17, 99, 300, 42, 7], [8, 9, 10, 11, 12, 13]])
NEVER = dict(eos_token_id=[])


def new_tokens(out, s=IDS.shape[1]):
    return out[:, s:]


# ------------------------------------------------------------------------------------------------- stopping
def test_eos_defaults_to_the_models_own_and_empty_list_never_stops(m):
    free = m.generate(IDS[:1], 12, **NEVER)
    assert free.shape[1] == IDS.shape[1] + 12
    t = int(free[0, IDS.shape[1] + 3])  # a token greedy emits at step 3 (maybe earlier too)
    first = new_tokens(free)[0].tolist().index(t)
    m2 = tiny(eos_token_id=t)  # same weights, eos in config.json
    assert m2.generate(IDS[:1], 12).shape[1] == IDS.shape[1] + first + 1
    assert m2.generate(IDS[:1], 12, **NEVER).shape[1] == IDS.shape[1] + 12
    m2.generation_config = {"eos_token_id": [free[0, IDS.shape[1] + 11].item()]}  # generation_config wins
    stop = new_tokens(free)[0].tolist().index(free[0, IDS.shape[1] + 11].item())
    assert m2.generate(IDS[:1], 12).shape[1] == IDS.shape[1] + stop + 1


def test_loader_reads_generation_config(tmp_path, m):
    L.save_checkpoint(m, tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9], "pad_token_id": 3}))
    loaded = L.from_pretrained(tmp_path)
    assert loaded.generation_config["eos_token_id"] == [7, 9]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 99999]}))
    with pytest.raises(CheckpointError, match="eos_token_id"):
        L.from_pretrained(tmp_path)
    (tmp_path / "generation_config.json").unlink()
    assert L.from_pretrained(tmp_path).generation_config == {}


@pytest.mark.parametrize("eos", [np.int64(0), torch.tensor(0), np.array([0]), torch.tensor([0]), [np.int32(0)]])
def test_eos_as_numpy_or_tensor_is_accepted(m, eos):
    t = int(m.generate(IDS[:1], 1, **NEVER)[0, -1])
    as_int = m.generate(IDS[:1], 6, eos_token_id=t)
    e = type(eos)(t) if isinstance(eos, np.integer) else (torch.tensor(t) if isinstance(eos, torch.Tensor)
                                                          and eos.dim() == 0 else [t])
    assert torch.equal(m.generate(IDS[:1], 6, eos_token_id=e), as_int)
    assert as_int.shape[1] == IDS.shape[1] + 1


def test_pad_token_id_fills_finished_rows(m):
    free = m.generate(IDS, 6, **NEVER)
    t = int(free[0, IDS.shape[1]])  # row 0 stops at once
    if t in free[1, IDS.shape[1]:].tolist():
        pytest.skip("both rows emit the same token")
    out = m.generate(IDS, 6, eos_token_id=t, pad_token_id=11)
    assert out[0, IDS.shape[1] + 1:].tolist() == [11] * 5
    assert torch.equal(out[1], free[1])


def test_max_length_counts_the_prompt(m):
    s = IDS.shape[1]
    assert torch.equal(m.generate(IDS, max_length=s + 5, **NEVER), m.generate(IDS, 5, **NEVER))
    assert m.generate(IDS, 3, max_length=s + 9, **NEVER).shape[1] == s + 3  # max_new_tokens wins, as in HF
    with pytest.raises(ValueError, match="max_length"):
        m.generate(IDS, max_length=s)
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate(IDS)


def test_stop_strings_need_a_tokenizer_and_stop_the_row(trained):
    model, tok = trained
    ids = tok("def main():", return_tensors="pt")["input_ids"]
    s = ids.shape[1]
    free = model.generate(ids, 24, **NEVER)
    text = tok.decode(free[0, s:])
    target = text.strip()[4:8]
    assert len(target) == 4, text
    for fast in (False, True):
        out = model.generate(ids, 24, stop_strings=[target, "\x00never"], tokenizer=tok, fast=fast, **NEVER)
        got = tok.decode(out[0, s:])
        assert target in got and target not in tok.decode(out[0, s:-1]), (got, text)
        assert torch.equal(out[0], free[0, :out.shape[1]])
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(ids, 4, stop_strings=target)


# ------------------------------------------------------------------------------------------------- choosing tokens
def test_do_sample_false_is_greedy_whatever_the_temperature(m):
    greedy = m.generate(IDS, 8, **NEVER)
    assert torch.equal(m.generate(IDS, 8, do_sample=False, temperature=0.9, top_k=3, seed=0, **NEVER), greedy)
    sampled = m.generate(IDS, 8, temperature=1.5, seed=0, **NEVER)  # the old convention: temperature > 0 samples
    assert torch.equal(m.generate(IDS, 8, do_sample=True, temperature=1.5, seed=0, **NEVER), sampled)
    assert not torch.equal(sampled, greedy)
    assert torch.equal(m.generate(IDS, 8, do_sample=True, seed=0, **NEVER),  # temperature None = 1.0
                       m.generate(IDS, 8, do_sample=True, temperature=1.0, seed=0, **NEVER))
    with pytest.raises(ValueError, match="temperature"):
        m.generate(IDS, 8, do_sample=True, temperature=0)


def test_top_k_1_is_greedy(m):
    greedy = m.generate(IDS, 10, **NEVER)
    for seed in range(3):
        assert torch.equal(m.generate(IDS, 10, do_sample=True, temperature=2.0, top_k=1, seed=seed, **NEVER), greedy)


def test_top_k_draws_only_the_k_largest():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    top = logits.topk(5, dim=-1).indices
    g = torch.Generator().manual_seed(1)
    drawn = torch.stack([sample_next(logits, 5.0, 1.0, g, top_k=5) for _ in range(200)], 1)  # (4, 200)
    assert all(set(drawn[i].tolist()) <= set(top[i].tolist()) for i in range(4))
    assert len(set(drawn[0].tolist())) > 1  # not greedy: a high temperature spreads the draws over the 5
    wide = torch.stack([sample_next(logits, 5.0, 1.0, g) for _ in range(200)], 1)
    assert any(not set(wide[i].tolist()) <= set(top[i].tolist()) for i in range(4))  # the test can fail


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    g = torch.Generator().manual_seed(0)
    logits, seq = torch.randn(2, 40, generator=g), torch.randint(0, 40, (2, 9), generator=g)
    want = RepetitionPenaltyLogitsProcessor(1.3)(seq, logits.clone())
    assert torch.equal(repetition_penalized(logits, seq, 1.3), want)
    assert not torch.equal(want, logits)


def test_repetition_penalty_changes_greedy(m):
    ids = torch.tensor([[5, 5, 5, 5, 5, 5]])
    a, b = m.generate(ids, 12, **NEVER), m.generate(ids, 12, repetition_penalty=5.0, **NEVER)
    assert not torch.equal(a, b)
    assert len(set(b[0, 6:].tolist())) >= len(set(a[0, 6:].tolist()))


OPTIONS = [dict(), dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.8, seed=4),
           dict(temperature=1.2, top_p=0.9, seed=2), dict(repetition_penalty=1.8),
           dict(do_sample=True, top_k=1, seed=0), dict(max_length=14), dict(pad_token_id=9, eos_token_id=None)]


@pytest.mark.parametrize("kind", ["longcat", "glm"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "greedy")
def test_every_option_gives_the_same_tokens_with_fast(kind, opts):
    model = tiny(kind)
    opts = {"max_new_tokens": None if "max_length" in opts else 8, "eos_token_id": [], **opts}
    mask = torch.ones_like(IDS)
    mask[1, :2] = 0
    plain = model.generate(IDS, attention_mask=mask, **opts)
    assert torch.equal(model.generate(IDS, attention_mask=mask, fast=True, **opts), plain)


# ------------------------------------------------------------------------------------------------- streaming
def test_streamers(trained):
    model, tok = trained
    ids = tok("import os", return_tensors="pt")["input_ids"]
    out = model.generate(ids, 16, **NEVER)
    want = tok.decode(out[0, ids.shape[1]:])
    assert "".join(stream(model, tok, ids, max_new_tokens=16, **NEVER)) == want

    class Recorder:
        def __init__(self):
            self.calls = []

        def put(self, v):
            self.calls.append(v.tolist())

        def end(self):
            self.calls.append("end")
    r = Recorder()
    model.generate(ids, 3, streamer=r, fast=True, **NEVER)
    assert r.calls == [ids.tolist(), *[[t] for t in out[0, ids.shape[1]:ids.shape[1] + 3].tolist()], "end"]
    with pytest.raises(ValueError, match="streamer"):
        model.generate(ids, 3, streamer=object())
    with pytest.raises(ValueError, match="one sequence"):
        model.generate(IDS, 3, streamer=TextIteratorStreamer(tok))


def test_past_key_values_prefills_only_the_new_tokens(m):
    cache = L.DynamicCache.for_model(m.config)
    first = m.generate(IDS[:1], 5, past_key_values=cache, **NEVER)
    assert cache.length == first.shape[1] - 1
    longer = torch.cat([first, torch.tensor([[33, 44, 55]])], dim=1)
    assert torch.equal(m.generate(longer, 6, past_key_values=cache, **NEVER), m.generate(longer, 6, **NEVER))
    with pytest.raises(ValueError, match="past_key_values"):
        m.generate(longer, 2, past_key_values=cache, fast=True)


# ------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kw, name", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"), (dict(max_new_tokens="3"), "max_new_tokens"),
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=-1.0), "temperature"), (dict(top_p=float("nan")), "top_p"),
    (dict(top_p=float("inf")), "top_p"), (dict(top_p=0.0), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(top_k=1.5), "top_k"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"), (dict(eos_token_id=512), "eos_token_id"),
    (dict(eos_token_id="2"), "eos_token_id"), (dict(pad_token_id=-1), "pad_token_id"),
    (dict(do_sample="yes"), "do_sample"), (dict(stop_strings=[""]), "stop_strings"),
    (dict(attention_mask=torch.ones(2, 3)), "attention_mask"),
    (dict(attention_mask=torch.full((2, 6), 2)), "attention_mask"),
])
@pytest.mark.parametrize("fast", [False, True])
def test_bad_arguments_are_refused_by_name(m, kw, name, fast):
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises(ValueError, match=name):
        m.generate(IDS, fast=fast, **kw)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("bad", [-1, 512])
def test_ids_outside_the_vocabulary_are_refused(m, bad, fast):
    ids = IDS.clone()
    ids[1, 3] = bad
    with pytest.raises(ValueError, match="input_ids.*vocab_size=512"):
        m.generate(ids, 3, fast=fast)


def test_numpy_max_new_tokens_is_accepted(m):
    assert torch.equal(m.generate(IDS, np.int64(3), **NEVER), m.generate(IDS, 3, **NEVER))


@pytest.mark.parametrize("fast", [False, True])
def test_right_padding_is_refused(m, fast):
    mask = torch.ones_like(IDS)
    mask[0, -2:] = 0
    with pytest.raises(ValueError, match="right padding"):
        m.generate(IDS, 3, attention_mask=mask, fast=fast)


def test_vocab_parallel_embedding_refuses_ids_no_rank_owns():
    """Under tensor parallelism an id >= vocab_size is in no rank's rows: it used to become a zero vector."""
    emb = VocabParallelEmbedding(4, 8, start=4, group=None, vocab_size=8)
    with pytest.raises(ValueError, match="vocab_size=8"):
        emb(torch.tensor([[1, 8]]))
    with pytest.raises(ValueError, match="vocab_size=8"):
        emb(torch.tensor([[-1, 2]]))
