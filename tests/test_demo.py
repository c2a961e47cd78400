"""`python -m longcat_ref.demo`: end to end (--json in a subprocess), streaming == final text, bad input."""

import json
import pathlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import longcat_ref as L
from longcat_ref.tools import demo
from longcat_ref.io.chat import longcat_chat_prompt
from longcat_ref.io.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    n = torch.get_num_threads()  # the demo sets 1 thread for tiny CPU models; don't leak that into other tests
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return demo.build_tiny_checkpoint(tmp_path_factory.mktemp("demo") / "tiny")


def run_main(capsys, *argv):
    rc = demo.main(list(argv))
    o = capsys.readouterr()
    return rc, o.out, o.err


def test_json_end_to_end_subprocess():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "longcat_ref.demo", "--json", "--max-new-tokens", "6",
                        "--system", "Be brief.", "--prompt", "Hi"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)  # exactly one JSON object on stdout
    assert r["prompt"] == "SYSTEM:Be brief. [Round 0] USER:Hi ASSISTANT:"
    assert 1 <= len(r["generated_ids"]) <= 6 and r["prompt_ids"]
    assert set(r["timings"]) >= {"load_s", "prefill_s", "decode_s", "decode_tokens_per_s"}
    assert r["experts"]["real_mean"] + r["experts"]["zero_mean"] == pytest.approx(r["experts"]["top_k"])
    assert r["kv_cache"]["bytes_per_token"] > 0


def test_json_matches_an_independent_computation(capsys, ckpt):
    """prompt ids = the template encoded by the checkpoint's tokenizer; greedy ids = model.generate directly."""
    rc, out, err = run_main(capsys, "--model", ckpt, "--json", "--temperature", "0", "--max-new-tokens", "12",
                            "--prompt", "Who helped the lion?", "--device", "cpu")  # the reference is fp32 CPU
    assert rc == 0, err
    r = json.loads(out)
    tok = load_tokenizer(ckpt)
    prompt = longcat_chat_prompt([{"role": "user", "content": "Who helped the lion?"}])
    assert r["prompt_ids"] == tok.encode(prompt)
    model = L.from_pretrained(ckpt, dtype=torch.float32)
    ref = model.generate(torch.tensor([r["prompt_ids"]]), 12, eos_token_id=[2])[0, len(r["prompt_ids"]):].tolist()
    assert r["generated_ids"] == ref
    assert r["text"] == tok.decode(ref)
    n_moe = sum(model.config.layer_is_moe)
    # one sample per (token, MoE layer) over the prompt and every generated token but the last
    assert r["experts"]["token_layer_samples"] == n_moe * (len(r["prompt_ids"]) + len(ref) - 1)


def test_streamed_text_equals_the_json_text(capsys, ckpt):
    args = ["--model", ckpt, "--max-new-tokens", "20", "--seed", "3", "--prompt", "Tell me about the crow."]
    rc, out, err = run_main(capsys, *args)
    assert rc == 0, err
    streamed = out.split("ASSISTANT: ", 1)[1].split("\n-- ", 1)[0]
    rc, js, err = run_main(capsys, *args, "--json")
    assert streamed == json.loads(js)["text"]
    for what in ("parameters", "activated parameters per token", "zero (identity) experts", "KV cache",
                 "tokens/s"):
        assert what in out, what


def test_default_run_says_what_happened(capsys):
    rc, out, err = run_main(capsys, "--max-new-tokens", "3")
    assert rc == 0, err
    assert "gibberish" in out and "[Round 0] USER:" not in out  # the note; the prompt is shown as the user turn
    if not demo.TRAINED_DIR.is_dir():
        assert "original layout" in out and "skipped" in out and "multi-token-prediction" in out


def test_stops_at_eos(capsys, ckpt, monkeypatch):
    """Make eos the model's favourite token: generation stops after it and the text excludes it."""
    model = L.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[2] = 10 * model.lm_head.weight.abs().max()  # every hidden state now prefers id 2 ...
        model.model.norm.weight.abs_()  # ... given positive final-norm features
    tok = load_tokenizer(ckpt)
    monkeypatch.setattr(demo, "load_model", lambda args, parallel=None: (model, tok, {"source": "x", "load_s": 0}))
    rc, out, err = run_main(capsys, "--json", "--temperature", "0")
    r = json.loads(out)
    assert rc == 0, err
    assert r["generated_ids"][-1] == 2 and r["stop_reason"] == "eos" and len(r["generated_ids"]) < 48
    assert "</longcat_s>" not in r["text"]


def test_interactive_keeps_history(capsys, ckpt, monkeypatch):
    import io

    prompts = []
    real = demo.run_turn

    def spy(model, tok, prompt, args, stream, **kw):
        prompts.append(prompt)
        return real(model, tok, prompt, args, stream, **kw)

    monkeypatch.setattr(demo, "run_turn", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nAnd the fox?\n\n"))
    rc, out, err = run_main(capsys, "--model", ckpt, "--interactive", "--max-new-tokens", "4", "--system", "S")
    assert rc == 0, err
    assert len(prompts) == 2 and out.count("USER> ") == 3
    assert prompts[0] == "SYSTEM:S [Round 0] USER:Hello ASSISTANT:"
    assert prompts[1].startswith("SYSTEM:S [Round 0] USER:Hello ASSISTANT:")
    assert prompts[1].endswith("</longcat_s> [Round 1] USER:And the fox? ASSISTANT:")


# ------------------------------------------------------------------------------------------------- bad input
def one_line_error(rc, err, code, *words):
    assert rc == code
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_missing_and_broken_model_dir(capsys, tmp_path, ckpt):
    rc, out, err = run_main(capsys, "--model", str(tmp_path / "nope"))
    one_line_error(rc, err, 1, "no such directory")
    rc, out, err = run_main(capsys, "--model", str(tmp_path))
    one_line_error(rc, err, 1, "no config.json")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in os.listdir(ckpt):
        (broken / f).write_bytes((Path(ckpt) / f).read_bytes())
    shard = sorted(f for f in os.listdir(broken) if f.endswith(".safetensors"))[0]
    (broken / shard).write_bytes((broken / shard).read_bytes()[:-10])
    rc, out, err = run_main(capsys, "--model", str(broken))
    one_line_error(rc, err, 1, shard, "truncated")
    (broken / shard).write_bytes((Path(ckpt) / shard).read_bytes())
    (broken / "tokenizer.json").unlink()
    rc, out, err = run_main(capsys, "--model", str(broken))
    one_line_error(rc, err, 1, "no tokenizer.json")


@pytest.mark.parametrize("argv,word", [(["--dtype", "float8"], "--dtype"), (["--top-p", "1.5"], "--top-p"),
                                       (["--temperature", "-1"], "--temperature"), (["--max-new-tokens", "0"], "--max"),
                                       (["--device", "warp9"], "--device"), (["--frobnicate"], "frobnicate")])
def test_bad_flag_values(capsys, argv, word):
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    err = capsys.readouterr().err
    one_line_error(e.value.code, err, 2, word)


def test_prompt_longer_than_the_context(capsys, ckpt):
    rc, out, err = run_main(capsys, "--model", ckpt, "--prompt", "fox " * 600)
    one_line_error(rc, err, 1, "max_position_embeddings", "512")
    rc, out, err = run_main(capsys, "--model", ckpt, "--json", "--interactive")
    one_line_error(rc, err, 1, "cannot be combined")


def test_help_explains_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    assert e.value.code == 0
    h = capsys.readouterr().out
    for flag in ("--model", "--prompt", "--system", "--max-new-tokens", "--temperature", "--top-p", "--seed",
                 "--dtype", "--device", "--interactive", "--json", "gibberish"):
        assert flag in h, flag


def test_demo_runs_unchanged_under_torchrun(ckpt):
    """torchrun --nproc-per-node 2 -m longcat_ref.demo: rank 0 prints one JSON object, tokens equal the 1-process run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "LONGCAT_DIST_TIMEOUT": "120"}
    args = ["-m", "longcat_ref.demo", "--model", str(ckpt), "--json", "--max-new-tokens", "6", "--temperature",
            "0.8", "--seed", "3", "--device", "cpu"]  # gloo on the CPU also where GPUs are visible
    one = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *args], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    r1, r2 = json.loads(one.stdout), json.loads(two.stdout)  # exactly one JSON object: only rank 0 printed
    assert r1["generated_ids"] == r2["generated_ids"] and r1["text"] == r2["text"]


def test_fast_flag_gives_the_same_greedy_reply(capsys, ckpt):
    args = ["--model", str(ckpt), "--json", "--max-new-tokens", "12", "--temperature", "0"]
    rc, plain, _ = run_main(capsys, *args)
    rc2, fast, _ = run_main(capsys, *args, "--fast")
    assert rc == rc2 == 0
    assert json.loads(plain)["generated_ids"] == json.loads(fast)["generated_ids"]


def test_show_routing_counts_each_generated_token(capsys, ckpt):
    """--show-routing: each generated token's real-expert count (summed over MoE layers) = an independent forward
    of prompt + reply; the last token is never fed back (None); the text is coloured and a legend printed."""
    args = ("--model", ckpt, "--temperature", "0", "--max-new-tokens", "6", "--show-routing")
    rc, js, err = run_main(capsys, *args, "--json")
    assert rc == 0, err
    r = json.loads(js)
    model = L.from_pretrained(ckpt, dtype=torch.float32)
    ids = torch.tensor([r["prompt_ids"] + r["generated_ids"]])
    with torch.no_grad():
        model(ids)
    real = sum((m.last_idx < model.config.n_routed_experts).sum(-1) for m in model.moe_blocks())  # (tokens,)
    n, g = len(r["prompt_ids"]), len(r["generated_ids"])
    assert r["routing"] == real[n:n + g - 1].tolist() + [None]
    rc, out, err = run_main(capsys, *args)
    assert rc == 0, err
    assert "\x1b[" in out and "-- routing: real FFN experts per token" in out


def test_fp8_keep_flag(capsys, ckpt, tmp_path):
    """--fp8 keep: an FP8 checkpoint stays FP8 in memory and gives the dequantized model's greedy reply (CPU: the
    products dequantize per call); a checkpoint that is not FP8 is a one-line error."""
    ckpt = pathlib.Path(ckpt)
    m = L.from_pretrained(ckpt, dtype=torch.float32)
    fp8_dir = tmp_path / "fp8"
    L.save_checkpoint(m, fp8_dir, quantize="fp8", fp8_block=(16, 16))
    for f in ckpt.iterdir():  # the tokenizer files
        if f.name.startswith("tokenizer") or f.name == "generation_config.json":
            (fp8_dir / f.name).write_bytes(f.read_bytes())
    args = ["--model", str(fp8_dir), "--json", "--max-new-tokens", "8", "--temperature", "0", "--device", "cpu"]
    rc, deq, err = run_main(capsys, *args)
    assert rc == 0, err
    rc, kept, err = run_main(capsys, *args, "--fp8", "keep")
    assert rc == 0, err
    assert json.loads(kept)["generated_ids"] == json.loads(deq)["generated_ids"]
    rc, _, err = run_main(capsys, "--model", str(ckpt), "--fp8", "keep", "--device", "cpu", "--prompt", "x")
    assert rc != 0 and "fp8='keep' needs an FP8 checkpoint" in err and err.strip().count("\n") == 0, err
