"""The demo's error contract (issue 16 item 6): one line on stderr and a non-zero exit, never a traceback; and the
interactive demo's kept KV cache (issue 15 item 8). train and plan keep theirs too (checked in subprocesses)."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import longcat_ref as L
from longcat_ref.tools import demo
from test_demo import ckpt, keep_torch_threads, run_main  # noqa: F401 (shared fixtures and helper)

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(rc, err, *words):
    assert rc not in (0, None), err
    assert err.strip() and err.strip().count("\n") == 0 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def run_cli(*argv, stdin=subprocess.DEVNULL, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *argv], capture_output=True, cwd=ROOT, stdin=stdin, env=env, timeout=300)


def test_invalid_utf8_prompt_in_a_subprocess(ckpt):
    r = run_cli("-m", "longcat_ref.demo", "--model", ckpt, "--prompt", os.fsdecode(b"fox \xff\xfe"))
    one_line_error(r.returncode, r.stderr.decode(), "--prompt", "UTF-8")


def test_invalid_utf8_line_in_interactive_is_one_error_then_the_chat_goes_on(capsys, ckpt, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("fox \udcff\nHello\n\n"))
    rc, out, err = run_main(capsys, "--model", ckpt, "--interactive", "--max-new-tokens", "2")
    assert rc == 0 and "UTF-8" in err and err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert out.count("-- 2 tokens") + out.count("stopped at eos") >= 1  # the second line got its reply


@pytest.mark.parametrize("device", ["mps", "xpu", "cuda:7" if torch.cuda.is_available() else "cuda"])
def test_unavailable_device(capsys, device):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has mps")
    with pytest.raises(SystemExit) as e:
        demo.main(["--device", device])
    one_line_error(e.value.code, capsys.readouterr().err, "--device", "not available")


def test_closed_stdin_in_interactive(ckpt):
    r = subprocess.run(f"{sys.executable} -m longcat_ref.demo --model {ckpt} --interactive <&-", shell=True,
                       capture_output=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    one_line_error(r.returncode, r.stderr.decode(), "stdin", "closed")


def test_closed_stdin_object(capsys, ckpt, monkeypatch):
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stdin", closed)
    rc, out, err = run_main(capsys, "--model", ckpt, "--interactive")
    one_line_error(rc, err, "stdin", "closed")


def test_world_size_without_rank_does_not_raise_in_the_error_handler(capsys, ckpt, monkeypatch):
    """KeyError 'RANK' once came out of the error handler itself."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    rc, out, err = run_main(capsys, "--model", ckpt, "--max-new-tokens", "2")
    one_line_error(rc, err, "RANK")


def test_malformed_rank(capsys, ckpt, monkeypatch):
    monkeypatch.setenv("RANK", "x")
    rc, out, err = run_main(capsys, "--model", ckpt, "--max-new-tokens", "2")
    one_line_error(rc, err, "RANK", "'x'")


def test_bos_token_id_out_of_range(capsys, ckpt, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in os.listdir(ckpt):
        (bad / f).write_bytes((Path(ckpt) / f).read_bytes())
    gcfg = json.loads((bad / "generation_config.json").read_text())
    (bad / "generation_config.json").write_text(json.dumps({**gcfg, "bos_token_id": 10**6}))
    rc, out, err = run_main(capsys, "--model", str(bad), "--max-new-tokens", "2")
    one_line_error(rc, err, "bos_token_id")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "generation_config.json").write_text(json.dumps(gcfg))
    (bad / "config.json").write_text(json.dumps({**cfg, "bos_token_id": 10**6}))
    rc, out, err = run_main(capsys, "--model", str(bad), "--max-new-tokens", "2")
    one_line_error(rc, err, "bos_token_id")


def test_an_unexpected_exception_is_one_line(capsys, ckpt, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("first line\nsecond line")
    monkeypatch.setattr(demo, "run_turn", boom)
    rc, out, err = run_main(capsys, "--model", ckpt)
    one_line_error(rc, err, "RuntimeError", "first line | second line")


@pytest.mark.parametrize("argv, word", [
    (["-m", "longcat_ref.tools.train", "--batch-size", "0"], "--batch-size"),
    (["-m", "longcat_ref.tools.train", "--out", "/proc/no/such/dir"], "--out"),
    (["-m", "longcat_ref.runtime.plan", "--gpu-gib", "nan"], "--gpu-gib"),
    (["-m", "longcat_ref.runtime.plan", "--model", "/no/such/dir"], "/no/such/dir"),
    (["-m", "longcat_ref.tools.bench_experts", "--case", "nope"], "nope"),
    (["-m", "longcat_ref.tools.bench_experts", "--tokens", "4,x"], "--tokens"),
    (["-m", "longcat_ref.tools.tune_gemv", "--shapes", "q_a,nope"], "nope"),
])
def test_train_and_plan_keep_their_contract(argv, word):
    r = run_cli(*argv)
    one_line_error(r.returncode, r.stderr.decode(), word)


# ------------------------------------------------------------------------------------------------- the kept cache
def test_interactive_keeps_the_cache_and_gives_the_same_tokens(capsys, ckpt, monkeypatch):
    """Turn 2 prefills only what follows the prefix it shares with turn 1's prompt + reply, and its greedy reply
    equals the one from re-prefilling the whole history."""
    results = []
    real = demo.run_turn

    def spy(*a, **k):
        results.append(real(*a, **k))
        return results[-1]

    monkeypatch.setattr(demo, "run_turn", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nAnd the fox?\nMore.\n\n"))
    rc, out, err = run_main(capsys, "--model", ckpt, "--interactive", "--max-new-tokens", "6",
                            "--temperature", "0")
    assert rc == 0, err
    assert len(results) == 3
    assert results[0]["cached_tokens"] == 0
    model = L.from_pretrained(ckpt, dtype=torch.float32)
    for r in results[1:]:
        assert 0 < r["cached_tokens"] and r["prefill_tokens"] < len(r["prompt_ids"])
        assert r["cached_tokens"] + r["prefill_tokens"] == len(r["prompt_ids"])
        ids = torch.tensor([r["prompt_ids"]])
        again = model.generate(ids, r["max_new_tokens"], eos_token_id=[2])[0, ids.shape[1]:].tolist()
        assert r["generated_ids"] == again
    assert "kept in the cache" in out
