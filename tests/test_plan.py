"""The memory planner: weight precision apart from KV / activation precision, defaults in --help, nonsense refused,
the --chunk hint."""

import math

import pytest

from longcat_ref.model.config import glm_4_7_flash
from longcat_ref.runtime import plan as P


def run(capsys, *argv):
    try:
        rc = P.main(list(argv))
    except SystemExit as e:  # argparse's own checks (types, choices)
        rc = e.code
    o = capsys.readouterr()
    return rc, o.out, o.err


def test_weight_precision_is_separate_from_kv_and_activations():
    cfg = glm_4_7_flash()
    bf16, fp8, int4 = (P.rank_memory(cfg, 1, weights=w) for w in ("bf16", "fp8", "int4"))
    assert bf16["kv_cache"] == fp8["kv_cache"] == int4["kv_cache"]  # the KV cache does not follow the weights
    assert bf16["activations"] == int4["activations"]
    e = bf16["weights"]["experts"]
    assert fp8["weights"]["experts"] == pytest.approx(e / 2 * (1 + 4 / 128**2), rel=1e-6)  # + fp32 block scales
    assert int4["weights"]["experts"] == pytest.approx(e / 4 * (1 + 4 / 128), rel=1e-6)  # + bf16 group scales
    assert int4["weights"]["embedding + lm_head"] == bf16["weights"]["embedding + lm_head"]  # kept unquantized
    assert P.rank_memory(cfg, 1, kv="fp8")["kv_cache"] == bf16["kv_cache"] // 2
    assert P.rank_memory(cfg, 1, activations="fp32")["activations"] > bf16["activations"]


def test_glm_in_4_bit_on_a_24_gib_gpu(capsys):
    rc, out, err = run(capsys, "--model", "glm", "--world-size", "1", "--gpu-gib", "24", "--weights", "int4",
                       "--context", "4096")
    assert rc == 0, err
    assert "weights int4, KV cache bf16, activations bf16," in out
    assert out.split("fits in 24.0 GiB?")[1].split()[0] == "yes"
    rc, out, _ = run(capsys, "--model", "glm", "--world-size", "1", "--gpu-gib", "24")  # bf16: ~56 GiB of weights
    assert out.split("fits in 24.0 GiB?")[1].split()[0] == "NO"


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        P.main(["--help"])
    out = capsys.readouterr().out
    for d in ("(default: 80.0)", "(default: bf16)", "(default: 8192)", "(default: [8, 16])"):
        assert d in out, d


@pytest.mark.parametrize("argv,words", [
    (["--gpu-gib", "nan"], "--gpu-gib"), (["--gpu-gib", "-1"], "--gpu-gib"), (["--gpu-gib", "0"], "--gpu-gib"),
    (["--gpu-gib", "inf"], "--gpu-gib"), (["--reserve-gib", "nan"], "--reserve-gib"),
    (["--reserve-gib", "-2"], "--reserve-gib"), (["--batch", "0"], "--batch"), (["--context", "-5"], "--context"),
    (["--chunk", "0"], "--chunk"), (["--world-size", "0"], "--world-size"),
    (["--context", "100", "--chunk", "200"], "longer than --context"), (["--weights", "int3"], "invalid choice"),
    (["--batch", "x"], "invalid int"),
])
def test_nonsense_is_refused_in_one_line(capsys, argv, words):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.strip().count("\n") == 0 and words in err, err


def test_hint_when_activations_dominate(capsys):
    rc, out, _ = run(capsys, "--model", "glm", "--world-size", "1", "--gpu-gib", "141", "--context", "65536")
    assert rc == 0 and "hint: activations are the largest part" in out and "--chunk" in out
    rc, out, _ = run(capsys, "--model", "glm", "--world-size", "1", "--gpu-gib", "141", "--context", "65536",
                     "--chunk", "2048")
    assert rc == 0 and "hint" not in out  # chunked: the weights dominate again
    assert not math.isnan(P.rank_memory(glm_4_7_flash(), 1)["total"])
