"""The MTP head and speculative decoding (model/mtp.py, model/speculative.py): the head equals its formula, its
weights load and save under the real names, greedy speculative decoding gives plain greedy's tokens on every tiny
config (plain and fast paths, k = 1..3, under torchrun), and speculative sampling keeps the target distribution
(a chi-square test that a broken acceptance rule fails)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import longcat_ref as L
from longcat_ref.io.checkpoint import MTP, CheckpointError, index_checkpoint
from longcat_ref.model import speculative
from longcat_ref.model.mtp import MTPHead, init_mtp
from longcat_ref.model.speculative import Speculation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CONFIGS = {
    "longcat": lambda **kw: L.tiny_longcat(**kw),
    "glm": lambda **kw: L.tiny_glm(**kw),
    "longcat-no-zero-experts": lambda **kw: L.tiny_longcat(zero_expert_num=0, **kw),
    "longcat-no-q-lora": lambda **kw: L.tiny_longcat(q_lora_rank=None, **kw),
    "glm-no-q-lora-bias": lambda **kw: L.tiny_glm(q_lora_rank=None, attention_bias=True, **kw),
}


def tiny(kind="longcat", seed=1, std=0.08, head_std=0.08, **kw):
    cfg = CONFIGS[kind](**kw)
    m = L.init_weights(L.CausalLM(cfg), seed=seed, std=std, bias_std=0.05).eval()
    m.mtp = init_mtp(MTPHead(cfg), seed=seed + 1, std=head_std).eval()
    return m


class RepeatHead(MTPHead):
    """The real head (its cache and all) plus a strong vote for repeating token t+1: tiny random models repeat
    tokens often, so drafts are sometimes accepted and sometimes not -- every roll-back path runs."""

    def forward(self, next_ids, *a, **kw):
        logits, state = super().forward(next_ids, *a, **kw)
        return logits + 40.0 * F.one_hot(next_ids, logits.shape[-1]).to(logits.dtype), state


def repeat_head(m, seed=2):
    h = RepeatHead(m.config)
    h.load_state_dict(m.mtp.state_dict())
    m.mtp = h.eval()
    return m


def rms(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# ------------------------------------------------------------------------------------------------- the head
@pytest.mark.parametrize("kind", ["longcat", "glm"])
def test_head_equals_its_formula(kind):
    """The head's forward against the formula written out here on its raw weights (one MLA written out with the
    naive attention over the latent, the dense SwiGLU or the MoE called as modules -- tests/test_core.py proves
    those)."""
    m = tiny(kind, head_std=0.2)
    cfg, head = m.config, m.mtp
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, cfg.vocab_size, (2, 6), generator=g)
    hidden = torch.randn(2, 6, cfg.hidden_size, generator=g)
    pos = torch.arange(6)[None].expand(2, 6)
    with torch.no_grad():
        got, state = head(ids, hidden, pos, lm_head=m.lm_head)
        sd = {k: v for k, v in head.state_dict().items()}
        pre = "layers.0." if cfg.is_longcat else ""
        w = lambda n: sd[pre + n]
        eps = cfg.rms_norm_eps
        e = sd["embed_tokens.weight"][ids]
        if not cfg.is_longcat:
            e = torch.where((pos == 0)[..., None], 0.0, e)
        en = w("enorm.m.weight" if cfg.is_longcat else "enorm.weight")
        hn = w("hnorm.m.weight" if cfg.is_longcat else "hnorm.weight")
        x = torch.cat([rms(e, en, eps), rms(hidden, hn, eps)], -1) @ w("eh_proj.weight").T
        # MLA, naive, causal
        a_in = rms(x, w("input_layernorm.weight"), eps)
        attn = head.parts()[4]
        from longcat_ref.model.rope import rope_cos_sin
        cos, sin = rope_cos_sin(pos, cfg.qk_rope_head_dim, cfg.rope_theta, x.dtype)
        causal = torch.full((6, 6), torch.finfo(x.dtype).min).triu(1)
        x = x + attn(a_in, cos, sin, mask=causal[None, None])
        f_in = rms(x, w("post_attention_layernorm.weight"), eps)
        if cfg.is_longcat:
            p = "transformer_layer.mlp."
            x = x + F.silu(f_in @ w(p + "gate_proj.weight").T) * (f_in @ w(p + "up_proj.weight").T) \
                @ w(p + "down_proj.weight").T
            x = rms(x, sd["norm.weight"], eps)
            ref = x @ m.lm_head.weight.T
        else:
            x = x + head.mlp(f_in)
            ref = rms(x, sd["shared_head.norm.weight"], eps) @ sd["shared_head.head.weight"].T
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, x, rtol=1e-5, atol=1e-5)


def test_hnorm_reads_the_final_normed_hidden_state():
    """The speculative loop feeds hnorm the main model's output after its final norm (vLLM: the target model's
    forward returns norm(h)); feeding the pre-norm state would give different drafts."""
    m = tiny("longcat")
    ids = torch.randint(4, 512, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, hs = m(ids, output_hidden_states=True)
        pos = torch.arange(8)[None]
        nxt = torch.cat([ids[:, 1:], ids[:, :1]], 1)
        post, _ = m.mtp(nxt, m.model.norm(hs[-1]), pos, lm_head=m.lm_head)
        pre, _ = m.mtp(nxt, hs[-1], pos, lm_head=m.lm_head)
        st = speculative._State(m, 1, torch.ones(1, 8, dtype=torch.long), 1, False, 32)
        st.n = 0
        _, hidden = st.main(ids, L.REFERENCE, name="prefill")
        loop, _ = st.draft(nxt, hidden, L.REFERENCE, name="prefill")
    torch.testing.assert_close(loop, post)
    assert (pre - post).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("kind", ["longcat", "glm"])
def test_mtp_weights_load_and_save_under_real_names(tmp_path, kind):
    m = tiny(kind)
    cfg = m.config
    L.save_checkpoint(m, tmp_path / "a", max_shard_bytes=60_000)
    names = set(index_checkpoint(tmp_path / "a"))
    real = (["model.mtp.layers.0.eh_proj.weight", "model.mtp.layers.0.enorm.m.weight", "model.mtp.norm.weight",
             "model.mtp.layers.0.transformer_layer.mlp.down_proj.weight", "model.mtp.embed_tokens.weight",
             "model.mtp.layers.0.self_attn.kv_b_proj.weight"] if cfg.is_longcat else
            [f"model.layers.{cfg.num_layers}.{n}" for n in
             ("eh_proj.weight", "enorm.weight", "hnorm.weight", "embed_tokens.weight", "shared_head.head.weight",
              "shared_head.norm.weight", "mlp.gate.weight", "mlp.gate.e_score_correction_bias",
              "mlp.experts.0.gate_proj.weight", "mlp.shared_experts.up_proj.weight", "self_attn.o_proj.weight")])
    assert set(real) <= names
    back = L.from_pretrained(tmp_path / "a")
    n_mtp = sum(1 for k in names if k.startswith("model.mtp.") or k.startswith(f"model.layers.{cfg.num_layers}."))
    assert back.load_report.mtp_kept == n_mtp and MTP not in back.load_report.skipped
    assert "kept" in back.load_report.summary()
    for (a, x), (b, y) in zip(m.mtp.state_dict().items(), back.mtp.state_dict().items()):
        assert a == b and torch.equal(x, y), a
    skipped = L.from_pretrained(tmp_path / "a", mtp=False)
    assert getattr(skipped, "mtp", None) is None and skipped.load_report.skipped == {MTP: n_mtp}
    # a model without a head writes none; mtp=True then refuses to load it; save(mtp=True) writes a random one
    plain = L.init_weights(L.CausalLM(cfg), seed=1)
    L.save_checkpoint(plain, tmp_path / "b")
    assert getattr(L.from_pretrained(tmp_path / "b"), "mtp", None) is None
    with pytest.raises(CheckpointError, match="no multi-token-prediction"):
        L.from_pretrained(tmp_path / "b", mtp=True)
    L.save_checkpoint(plain, tmp_path / "c", mtp=True)
    assert isinstance(L.from_pretrained(tmp_path / "c", mtp=True).mtp, MTPHead)
    with pytest.raises(ValueError, match="mtp must be"):
        L.from_pretrained(tmp_path / "c", mtp="yes")


def test_missing_or_misshaped_mtp_tensor_is_one_line_error(tmp_path):
    m = tiny("glm")
    L.save_checkpoint(m, tmp_path)
    from safetensors.torch import load_file, save_file
    f = tmp_path / "model.safetensors"
    t = load_file(f)
    key = f"model.layers.{m.config.num_layers}.eh_proj.weight"
    t[key] = t[key][:, :10].contiguous()
    save_file(t, f)
    with pytest.raises(CheckpointError, match="eh_proj.weight.*shape") as e:
        L.from_pretrained(tmp_path)
    assert "\n" not in str(e.value)
    assert getattr(L.from_pretrained(tmp_path, mtp=False), "mtp", None) is None  # skipping it still works


def test_fp8_checkpoint_mtp_is_dequantized(tmp_path):
    m = tiny("longcat")
    L.save_checkpoint(m, tmp_path, quantize="fp8", fp8_block=(16, 16))
    back = L.from_pretrained(tmp_path)
    w0 = m.mtp.layers[0].eh_proj.weight
    w1 = back.mtp.layers[0].eh_proj.weight
    assert not torch.equal(w0, w1) and (w0 - w1).abs().max() < 0.05 * w0.abs().max()


# ------------------------------------------------------------------------------------------------- greedy exact
@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("fast", [False, True])
def test_greedy_speculative_equals_plain_greedy(kind, fast):
    """Every tiny config, both paths, k = 1..3, with a random head (drafts mostly rejected) and a repeating head
    (a mix of accepted and rejected drafts, rows diverging); a left-padded batch and stop tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 512, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 0
    for head in ("random", "repeat"):
        m = tiny(kind)
        if head == "repeat":
            repeat_head(m)
        ref = m.generate(ids, 16, attention_mask=mask, fast=fast)
        for k in (1, 2, 3):
            spec = Speculation(k=k)
            out = m.generate(ids, 16, attention_mask=mask, fast=fast, speculative=spec)
            assert torch.equal(out, ref), (head, k, out, ref)
            assert spec.steps > 0 and spec.drafted > 0
            if head == "repeat" and k == 1:
                assert 0 < spec.accepted < spec.drafted, spec  # both branches ran
        stop = int(ref[1, 7 + 3])  # a token row 1 emits: rows stop at different steps
        ref = m.generate(ids, 16, attention_mask=mask, eos_token_id=stop, fast=fast)
        out = m.generate(ids, 16, attention_mask=mask, eos_token_id=stop, fast=fast, speculative=2)
        assert torch.equal(out, ref), (head, out, ref)


def test_speculative_streams_every_token_and_counts():
    m = repeat_head(tiny("longcat"))
    ids = torch.randint(4, 512, (1, 5), generator=torch.Generator().manual_seed(1))
    seen = []
    spec = Speculation(k=2)
    out = m.generate(ids, 12, speculative=spec, on_token=lambda t: seen.append(int(t[0])))
    assert seen == out[0, 5:].tolist()
    assert spec.new_tokens == 12 - 1 or spec.new_tokens >= 11  # the prefill's token is not a verify step's
    assert 1.0 <= spec.tokens_per_step <= 3.0 and 0.0 <= spec.acceptance_rate <= 1.0
    d = spec.as_dict()
    assert set(d) >= {"acceptance_rate", "tokens_per_step", "acceptance_at"} and len(d["acceptance_at"]) == 2


def test_dynamic_cache_crop():
    c = L.DynamicCache(2)
    for _ in range(2):
        c.update(0, torch.ones(1, 3, 4), torch.ones(1, 3, 2))
        c.update(1, torch.ones(1, 3, 4), torch.ones(1, 3, 2))
    c.crop(4)
    assert c.length == 4 and c.latent[1].shape == (1, 4, 4) and c.k_rope[0].shape == (1, 4, 2)


def test_bad_speculative_arguments_are_one_line_errors():
    m = tiny("longcat")
    ids = torch.randint(4, 512, (1, 4))
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match="speculative"):
            m.generate(ids, 3, speculative=bad)
    with pytest.raises(ValueError, match="compile"):
        m.generate(ids, 3, speculative=True, fast=True, compile=True)
    with pytest.raises(ValueError, match="cache_len"):
        m.generate(ids, 30, speculative=True, fast=True, cache_len=8)
    plain = L.init_weights(L.CausalLM(L.tiny_longcat()))
    with pytest.raises(ValueError, match="MTP head"):
        plain.generate(ids, 3, speculative=True)
    assert torch.equal(m.generate(ids, 0, speculative=True), ids)


# ------------------------------------------------------------------------------------------------- sampling
def chi_square_p(counts: torch.Tensor, expected: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's chi-square p-value, cells with expected < min_expected pooled into one."""
    small = expected < min_expected
    o = torch.cat([counts[~small], counts[small].sum()[None]])
    e = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = e > 0
    o, e = o[keep], e[keep]
    stat = ((o - e) ** 2 / e).sum()
    df = o.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat.double() / 2))


def exact_joint(m, prompt, n, temperature, top_p):
    """P(x_1..x_n | prompt) for every sequence, by enumeration: (V,) * n as a flat (V**n,) tensor."""
    V = m.config.vocab_size
    seqs = torch.cartesian_prod(*[torch.arange(V)] * n).view(-1, n) if n > 1 else torch.arange(V)[:, None]
    ids = torch.cat([prompt.expand(seqs.shape[0], -1), seqs], 1)
    with torch.no_grad():
        logits = m(ids)[:, prompt.shape[1] - 1:-1]  # (V**n, n, V): the distribution of each x_i
    p = speculative.probs(logits, temperature, top_p)
    return p.gather(-1, seqs[..., None])[..., 0].prod(-1)  # (V**n,)


def sample_counts(m, prompt, n, N, temperature, top_p, k, seed):
    V = m.config.vocab_size
    out = m.generate(prompt.expand(N, -1), n, temperature=temperature, top_p=top_p, seed=seed, speculative=k)
    flat = (out[:, prompt.shape[1]:] * V ** torch.arange(n - 1, -1, -1)).sum(-1)
    return torch.bincount(flat, minlength=V ** n).double()


@pytest.mark.parametrize("k,temperature,top_p", [(1, 1.0, 1.0), (2, 0.8, 0.9)])
def test_speculative_sampling_keeps_the_target_distribution(k, temperature, top_p):
    """20,000 seeded draws of 3 tokens on an 8-token vocabulary (512 sequences): the joint frequencies match the
    model's exact joint probabilities (chi-square); the same test rejects an always-accept rule (which samples
    the draft's distribution instead)."""
    m = tiny("longcat", vocab_size=8, std=0.5, head_std=0.5, eos_token_id=None, pad_token_id=None, bos_token_id=None)
    prompt = torch.tensor([[1, 5, 2, 7]])
    N, n = 20_000, 3
    expected = exact_joint(m, prompt, n, temperature, top_p) * N
    counts = sample_counts(m, prompt, n, N, temperature, top_p, k, seed=0)
    assert counts.sum() == N
    assert chi_square_p(counts, expected) > 1e-3
    spec = Speculation(k=k)
    m.generate(prompt.expand(200, -1), n, temperature=temperature, top_p=top_p, seed=1, speculative=spec)
    assert 0.05 < spec.acceptance_rate < 0.95  # drafts both accepted and rejected: the test has teeth


def test_broken_acceptance_rule_fails_the_chi_square(monkeypatch):
    m = tiny("longcat", vocab_size=8, std=0.5, head_std=0.5, eos_token_id=None, pad_token_id=None, bos_token_id=None)
    prompt = torch.tensor([[1, 5, 2, 7]])
    N, n = 20_000, 3
    expected = exact_joint(m, prompt, n, 1.0, 1.0) * N

    def always_accept(p, q, drafts, generator=None):  # the bug: never reject, bonus from p_k
        b, k = drafts.shape
        return torch.full((b,), k), torch.multinomial(p[:, k], 1, generator=generator)[:, 0]

    monkeypatch.setattr(speculative, "accept", always_accept)
    counts = sample_counts(m, prompt, n, N, 1.0, 1.0, 1, seed=0)
    assert chi_square_p(counts, expected) < 1e-6


# ------------------------------------------------------------------------------------------------- torchrun
def test_speculative_under_torchrun_world_2(tmp_path):
    """Sharded model (TP/EP at world size 2, gloo), replicated head: greedy speculative == single-process greedy,
    plain and fast; seeded speculative sampling identical on both ranks."""
    ref = {}
    for kind in ("longcat", "glm"):
        m = repeat_head(tiny(kind))
        L.save_checkpoint(m, tmp_path / kind)
        m = L.from_pretrained(tmp_path / kind)
        m.mtp = repeat_head(m).mtp
        ids = torch.randint(4, 512, (2, 6), generator=torch.Generator().manual_seed(0))
        ref[kind] = {"ids": ids.tolist(), "greedy": m.generate(ids, 10).tolist()}
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, LONGCAT_DIST_TIMEOUT="60")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "spec",
           os.path.join(ROOT, "tests", "spec_worker.py"), str(tmp_path)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for r in range(2):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        for kind in ("longcat", "glm"):
            assert res[kind]["greedy_equal"] and res[kind]["fast_greedy_equal"], (r, kind, res)
            assert res[kind]["sampled"] == json.loads((tmp_path / "rank0.json").read_text())[kind]["sampled"]
        assert res["longcat"]["accepted"] > 0, (r, res)  # drafts were accepted there: the roll-back paths ran


# ------------------------------------------------------------------------------------------------- GPU
@CUDA
@pytest.mark.parametrize("kind", ["longcat", "glm"])
def test_cuda_graph_speculative_equals_plain_greedy(kind):
    """fast=True on a GPU replays the verify and head steps as CUDA graphs: still plain greedy's tokens."""
    m = repeat_head(tiny(kind)).cuda()
    ids = torch.randint(4, 512, (2, 7), generator=torch.Generator().manual_seed(0)).cuda()
    ref = m.generate(ids, 24, fast=True)
    for k in (1, 2):
        spec = Speculation(k=k)
        assert torch.equal(m.generate(ids, 24, fast=True, speculative=spec), ref)
        new = ref[:, 7:]
        if not bool((new[:, 1:] == new[:, :-1]).any()):  # the head drafts "repeat": no repeat, nothing to accept
            assert spec.accepted == 0, spec
        elif kind == "longcat":  # (an H200 run: tiny GLM accepted 0 of 46 drafts here, tokens equal)
            assert spec.accepted > 0, spec


# ------------------------------------------------------------------------------------------------- demo, training
def test_demo_speculative_json_same_tokens(capsys):
    from longcat_ref.tools import demo

    args = ["--json", "--temperature", "0", "--max-new-tokens", "12"]
    assert demo.main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert demo.main(args + ["--speculative", "2"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["generated_ids"] == plain["generated_ids"]
    assert 0.0 <= spec["acceptance_rate"] <= 1.0 and spec["speculative"]["k"] == 2 and "acceptance_rate" not in plain


def test_train_head_learns_and_ships_into_a_checkpoint(tmp_path):
    from longcat_ref.tools.train_mtp import mtp_batch_loss, ship, teacher_forced_acceptance, train_head

    m = L.init_weights(L.CausalLM(L.tiny_longcat(vocab_size=64)), seed=0, std=0.3).eval()
    rows = torch.randint(4, 64, (16, 17), generator=torch.Generator().manual_seed(0))
    losses = train_head(m, rows, steps=30, batch=8, lr=1e-2, log=lambda *a: None)
    assert losses[-1] < losses[0]
    assert all(not p.requires_grad for p in m.parameters())
    acc = teacher_forced_acceptance(m, rows)
    assert 0.0 <= acc["acceptance_greedy_k1"] <= 1.0 and acc["positions"] == 16 * 15
    head = m.mtp
    del m.mtp
    L.save_checkpoint(m, tmp_path)  # a checkpoint without a head, then the head added in place
    m.mtp = head
    ship(m, str(tmp_path))
    back = L.from_pretrained(tmp_path, mtp=True)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), back.mtp.state_dict().values()))
    assert torch.isfinite(mtp_batch_loss(back, rows[:2]))
