"""Training: the expert-bias PID controller, one optimizer step, bitwise reproducibility, the shipped tiny model."""

import json
import os

import pytest
import torch

import longcat_ref as L
from longcat_ref.tools import data as D
from longcat_ref.model.router import Router
from longcat_ref.io.chat import LONGCAT_CHAT_TEMPLATE
from longcat_ref.io.tokenizer import load_tokenizer
from longcat_ref.tools import train as T
from longcat_ref.tools.train import (DEFAULT_OUT, SHIPPED_DIR, ExpertBiasPID, TrainConfig, hidden_z_loss, lm_loss, main,
                                     make_optimizer, model_config, routing_stats, train, train_step)


def skewed_router(cfg, seed=0):
    """A router whose zero experts score +1 logit and whose first 4 FFN experts score +0.5 on typical inputs."""
    g = torch.Generator().manual_seed(seed)
    r = Router(cfg)
    mu = torch.randn(cfg.hidden_size, generator=g)
    with torch.no_grad():
        r.weight.normal_(0, 0.05, generator=g)
        u = mu / mu.norm() ** 2  # u . mu = 1
        r.weight[cfg.n_routed_experts:] += 1.0 * u
        r.weight[:4] += 0.5 * u
    return r, mu, g


def run_router(cfg, controller: bool, steps=250):
    tc = TrainConfig()
    r, mu, g = skewed_router(cfg)
    pid = ExpertBiasPID(r, cfg.n_routed_experts, tc.target_real_share, tc.kp, tc.ki, tc.kd)
    hist = []
    for _ in range(steps):
        _, idx = r(mu + torch.randn(512, cfg.hidden_size, generator=g))  # a fresh batch of 512 tokens
        hist.append(routing_stats(idx, cfg.n_routed_experts, cfg.num_router_experts))
        if controller:
            pid.update(idx)
    last = hist[-30:]
    return (sum(h["real_per_token"] for h in last) / len(last),
            sum(h["load_max_over_mean"] for h in last) / len(last), r)


def test_controller_reaches_budget_and_balances_a_skewed_router():
    cfg = model_config(256)  # 24 FFN + 12 zero experts, top-12; target 8 FFN experts per token
    target = TrainConfig().target_real_share * cfg.moe_topk
    real_off, load_off, _ = run_router(cfg, controller=False)
    real_on, load_on, r = run_router(cfg, controller=True)
    assert real_off < target - 2 and load_off > 2.5  # the skew is real: too few FFN experts, a few hogging
    assert abs(real_on - target) < 0.3, real_on  # held at the budget
    assert load_on < 1.5, load_on  # and the FFN experts share the load
    zero_bias = r.e_score_correction_bias[cfg.n_routed_experts:]
    assert torch.all(zero_bias == 0)  # zero experts' biases are never touched
    assert r.weight.grad is None  # selection only: no weight was changed through autograd


def test_hidden_z_loss_grows_with_massive_activations():
    h = torch.randn(2, 5, 64)
    spiky = h.clone()
    spiky[0, 0, 3] = 100.0
    assert hidden_z_loss([spiky]) > 10 * hidden_z_loss([h])


def tiny_setup(seed=0):
    cfg = L.tiny_longcat(vocab_size=64, max_position_embeddings=64)
    rows = torch.randint(4, 64, (32, 17), generator=torch.Generator().manual_seed(seed))
    return cfg, rows


def test_one_step_lowers_the_loss_on_a_fixed_batch():
    cfg, rows = tiny_setup()
    tc = TrainConfig(lr=1e-2, z_loss=1e-4)
    model = L.init_weights(L.CausalLM(cfg), seed=0).train()
    opt = make_optimizer(model, tc)
    batch = rows[:8]
    with torch.no_grad():
        before = lm_loss(model, batch, tc.z_loss, tc.balance)[0].item()
    train_step(model, opt, batch, tc, lr=tc.lr)
    with torch.no_grad():
        after = lm_loss(model, batch, tc.z_loss, tc.balance)[0].item()
    assert after < before - 1e-3, (before, after)


def test_same_seed_same_run_bitwise():
    cfg, rows = tiny_setup()
    tc = TrainConfig(steps=4, batch_size=4, warmup=2, eval_every=2, kp=0.05, ki=0.5)
    a = train(tc, cfg, rows, rows[:4], log=None)
    b = train(tc, cfg, rows, rows[:4], log=None)
    c = train(TrainConfig(**{**tc.__dict__, "seed": 1}), cfg, rows, rows[:4], log=None)
    assert a.metrics["loss"] == b.metrics["loss"] and a.metrics["val_loss"] == b.metrics["val_loss"]
    assert a.metrics["real_per_token"] == b.metrics["real_per_token"]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # weights and the controller's biases, bit for bit
    assert any(sa[k].abs().sum() > 0 for k in sa if k.endswith("e_score_correction_bias"))  # the controller acted
    assert c.metrics["loss"] != a.metrics["loss"]  # and the seed matters


def test_cli_rejects_bad_arguments(capsys):
    assert main(["--steps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--steps" in err[0]


def test_out_defaults_outside_the_package_and_the_shipped_model_needs_ship():
    assert DEFAULT_OUT == os.path.join("runs", "tiny-longcat") and not os.path.isabs(DEFAULT_OUT)
    assert T.resolve_out(None, ship=False) == DEFAULT_OUT
    assert T.resolve_out(None, ship=True) == SHIPPED_DIR
    with pytest.raises(ValueError, match="pass --ship"):
        T.resolve_out(SHIPPED_DIR, ship=False)
    with pytest.raises(ValueError, match="drop --out"):
        T.resolve_out("elsewhere", ship=True)


def test_output_paths_are_checked_before_training(tmp_path, capsys, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(T, "run_all", no_training)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "d.png").mkdir()
    for argv, words in ((["--out", str(a_file)], "not a directory"),
                        (["--out", str(a_file / "sub")], "cannot be created"),
                        (["--out", SHIPPED_DIR], "--ship"),
                        (["--out", str(tmp_path / "o"), "--plot", str(tmp_path / "fig.txt")], ".png"),
                        (["--out", str(tmp_path / "o"), "--plot", str(a_file / "fig.png")], "not a directory"),
                        (["--out", str(tmp_path / "o"), "--plot", str(tmp_path / "d.png")], "is a directory")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (argv, err)


def test_a_short_run_writes_a_loadable_checkpoint_with_normal_permissions(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--steps", "2", "--ablation-steps", "0", "--batch-size", "2", "--out", str(out)]) == 0
    mask = os.umask(0)
    os.umask(mask)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "metrics.json"):
        assert os.stat(out / f).st_mode & 0o777 == 0o666 & ~mask, f  # safetensors alone would write 0600
    tok = load_tokenizer(out)
    assert tok.chat_template == LONGCAT_CHAT_TEMPLATE and tok.add_bos
    # the same tokenizer files as the shipped model: one trainer, one template
    assert (out / "tokenizer.json").read_text() == open(os.path.join(SHIPPED_DIR, "tokenizer.json")).read()
    assert json.loads((out / "tokenizer_config.json").read_text()) == \
        json.load(open(os.path.join(SHIPPED_DIR, "tokenizer_config.json")))
    assert L.from_pretrained(out, dtype=torch.float32).config.vocab_size == tok.vocab_size


# ------------------------------------------------------------------------------------------------- shipped model
needs_asset = pytest.mark.skipif(not os.path.exists(os.path.join(SHIPPED_DIR, "config.json")),
                                 reason="no trained tiny model shipped (run python -m longcat_ref.tools.train)")


@needs_asset
def test_shipped_checkpoint_is_small_and_complete():
    files = set(os.listdir(SHIPPED_DIR))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "metrics.json"} <= files
    assert sum(os.path.getsize(os.path.join(SHIPPED_DIR, f)) for f in files) < 20 * 2**20
    tcfg = json.load(open(os.path.join(SHIPPED_DIR, "tokenizer_config.json")))
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["pad_token"]) == (D.BOS, D.EOS, D.PAD)


@needs_asset
def test_shipped_checkpoint_loads_generates_and_is_trained():
    from tokenizers import Tokenizer

    model = L.from_pretrained(SHIPPED_DIR, dtype=torch.float32)
    tok = Tokenizer.from_file(os.path.join(SHIPPED_DIR, "tokenizer.json"))
    assert [tok.token_to_id(t) for t in D.SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.get_vocab_size() == model.config.vocab_size
    # trained: far better than chance on held-out rounds (the last rows of the corpus stream)
    texts = D.corpus_texts()
    rows = D.split_rows(D.make_rows(D.encode_corpus(tok, texts), 128))[1][:4]
    with torch.no_grad():
        ce = lm_loss(model, rows)[1].item()
    assert ce < 0.6 * torch.log(torch.tensor(float(model.config.vocab_size))).item(), ce
    prompt = "[Round 0] USER:What does the function os.path.join do? ASSISTANT:"
    ids = torch.tensor([[1] + tok.encode(prompt, add_special_tokens=False).ids])
    out = model.generate(ids, max_new_tokens=24, eos_token_id=model.config.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    assert 0 < len(new) <= 24 and all(0 <= i < model.config.vocab_size for i in new)
    assert tok.decode(new, skip_special_tokens=True).strip()  # says something
