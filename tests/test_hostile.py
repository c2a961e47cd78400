"""Hostile inputs to the loader and the config (issue 16): each case asserts the error class and that the one-line
message names the problem. Nothing wrong may load silently.

Sections: atomic saves (incl. a save killed at every step, and a real SIGKILL), index / shard agreement, confined
paths, headers checked before allocation, tensor values, tie_word_embeddings, config fields.
"""

import json
import math
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import longcat_ref as L
from longcat_ref.io import checkpoint as C
from longcat_ref.io.checkpoint import CheckpointError
from longcat_ref.model.config import MAX_LAYERS, ConfigError, config_from_dict, config_to_dict

IDS = torch.randint(4, 512, (1, 5), generator=torch.Generator().manual_seed(0))


def tiny(seed=1, kind="longcat", **kw):
    cfg = L.tiny_longcat(**kw) if kind == "longcat" else L.tiny_glm(**kw)
    return L.init_weights(L.CausalLM(cfg), seed=seed, std=0.08, bias_std=0.05).eval()


def same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def load(p, **kw):
    return L.from_pretrained(p, dtype=torch.float32, **kw)


def index_of(p):
    return json.loads((p / C.INDEX).read_text())


def write_index(p, idx):
    (p / C.INDEX).write_text(json.dumps(idx))


@pytest.fixture
def sharded(tmp_path):
    m = tiny()
    p = tmp_path / "ckpt"
    L.save_checkpoint(m, p, max_shard_bytes=60_000)
    return m, p


# ------------------------------------------------------------------------------------------------- atomic saves
@pytest.mark.parametrize("second", [None, 90_000, 60_000])
def test_save_over_an_older_sharded_checkpoint_loads_the_new_weights(tmp_path, second):
    old, new = tiny(1), tiny(2)
    L.save_checkpoint(old, tmp_path, max_shard_bytes=30_000)  # many shards
    n_old = len(list(tmp_path.glob("*.safetensors")))
    L.save_checkpoint(new, tmp_path, max_shard_bytes=second)  # one file, fewer shards, or a same-named re-save
    files = sorted(os.listdir(tmp_path))
    if second is None:
        assert files == ["config.json", "model.safetensors"]
    else:
        names = set(index_of(tmp_path)["weight_map"].values())
        assert set(files) == names | {"config.json", C.INDEX} and len(names) <= n_old
    assert same(load(tmp_path), new)


def test_save_single_then_sharded_removes_the_single_file(tmp_path):
    L.save_checkpoint(tiny(1), tmp_path)
    L.save_checkpoint(tiny(2), tmp_path, max_shard_bytes=60_000)
    assert "model.safetensors" not in os.listdir(tmp_path)
    assert same(load(tmp_path), tiny(2))


class Killed(BaseException):
    """Stands in for SIGKILL: nothing in save_checkpoint catches it, so no cleanup runs."""


@pytest.mark.parametrize("shards", [(60_000, 60_000), (30_000, None), (None, 60_000)])
def test_save_interrupted_at_every_step_never_loads_a_mix(tmp_path, monkeypatch, shards):
    """Stop the second save before its k-th file operation (write, rename, unlink), for every k: the directory
    then loads the old weights, the new weights, or raises CheckpointError -- never anything else."""
    old, new = tiny(1), tiny(2)
    outcomes = set()
    real = {"replace": os.replace, "unlink": os.unlink}
    real_write = C._write_file
    for k in range(100):
        d = tmp_path / f"k{k}"
        L.save_checkpoint(old, d, max_shard_bytes=shards[0])
        count = [0]

        def step():
            count[0] += 1
            if count[0] > k:
                raise Killed

        monkeypatch.setattr(os, "replace", lambda a, b: (step(), real["replace"](a, b)))
        monkeypatch.setattr(os, "unlink", lambda a: (step(), real["unlink"](a)))
        monkeypatch.setattr(C, "_write_file", lambda p, w: (step(), real_write(p, w))[1])
        try:
            L.save_checkpoint(new, d, max_shard_bytes=shards[1])
            finished = True
        except Killed:
            finished = False
        finally:
            monkeypatch.undo()
        try:
            got = load(d)
            outcome = "new" if same(got, new) else "old" if same(got, old) else "MIX"
        except CheckpointError:
            outcome = "refused"
        assert outcome != "MIX", f"stopped before step {k}"
        if finished:
            assert outcome == "new"
            break
        outcomes.add(outcome)
    assert finished and {"old", "refused"} <= outcomes
    # the next save cleans up after the interrupted one
    d = tmp_path / "k1"  # stopped after writing one temporary file
    assert any(C.TMP_MARK in f for f in os.listdir(d))
    L.save_checkpoint(new, d)
    assert not any(C.TMP_MARK in f for f in os.listdir(d)) and same(load(d), new)


def test_sigkill_mid_save(tmp_path):
    """A real process killed by SIGKILL in the middle of a sharded re-save: no mix, and the next save recovers."""
    old, new = tiny(1), tiny(2)
    d = tmp_path / "ckpt"
    L.save_checkpoint(old, d, max_shard_bytes=30_000)
    L.save_checkpoint(new, tmp_path / "new")
    script = textwrap.dedent(f"""
        import os, signal, torch
        import longcat_ref as L
        from longcat_ref.io.checkpoint import checkpoint_tensors
        real, n = os.replace, [0]
        def replace(a, b):
            n[0] += 1
            if n[0] == 4:  # after 3 shards are in place, before the index
                os.kill(os.getpid(), signal.SIGKILL)
            real(a, b)
        os.replace = replace
        m = L.from_pretrained({str(tmp_path / "new")!r}, dtype=torch.float32)
        L.save_checkpoint(m, {str(d)!r}, max_shard_bytes=30_000)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    with pytest.raises(CheckpointError, match="no model.safetensors and no model.safetensors.index.json"):
        load(d)  # the old index was removed first: refused, not a mix of old and new shards
    assert any(C.TMP_MARK in f for f in os.listdir(d))  # what the kill left
    L.save_checkpoint(new, d, max_shard_bytes=30_000)
    assert not any(C.TMP_MARK in f for f in os.listdir(d)) and same(load(d), new)


# ------------------------------------------------------------------------------------------------- index / shards
def test_tensor_duplicated_in_a_shard_the_index_does_not_name(sharded):
    _, p = sharded
    wm = index_of(p)["weight_map"]
    key = "lm_head.weight"
    other = next(s for s in sorted(set(wm.values())) if s != wm[key])
    t = load_file(p / other)
    t[key] = torch.zeros(512, 64)
    save_file(t, p / other)
    with pytest.raises(CheckpointError, match=rf"{other} holds lm_head\.weight, but the index gives it to {wm[key]}"):
        load(p)


def test_tensor_the_index_does_not_list(sharded):
    _, p = sharded
    idx = index_of(p)
    key = "model.norm.weight"
    idx["weight_map"].pop(key)
    write_index(p, idx)
    with pytest.raises(CheckpointError, match=r"holds model\.norm\.weight, but the index does not list it"):
        load(p)


def test_unlisted_shard_with_model_tensors(sharded):
    m, p = sharded
    save_file({"model.norm.weight": torch.ones(64)}, p / "model-00099-of-00099.safetensors")
    with pytest.raises(CheckpointError, match=r"model-00099-of-00099.safetensors holds model tensors .*the index does "
                                              "not list it"):
        load(p)
    (p / "model-00099-of-00099.safetensors").unlink()
    save_file({"something.else": torch.ones(2)}, p / "adapter.safetensors")  # not model tensors: fine
    assert same(load(p), m)


def test_no_index_and_a_stale_shard(tmp_path):
    m = tiny()
    L.save_checkpoint(m, tmp_path)
    save_file({"lm_head.weight": torch.zeros(512, 64)}, tmp_path / "model-00001-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors holds model tensors"):
        load(tmp_path)


# ------------------------------------------------------------------------------------------------- confined paths
def _point_entry(p, target):
    idx = index_of(p)
    first = sorted(set(idx["weight_map"].values()))[0]
    idx["weight_map"] = {k: (target if v == first else v) for k, v in idx["weight_map"].items()}
    write_index(p, idx)
    return first


def test_index_entry_outside_the_directory(sharded, tmp_path):
    _, p = sharded
    first = sorted(set(index_of(p)["weight_map"].values()))[0]
    (tmp_path / "x.safetensors").write_bytes((p / first).read_bytes())
    size = os.path.getsize(tmp_path / "x.safetensors")
    for entry in ["../x.safetensors", str(tmp_path / "x.safetensors"), "/dev/stdin", "/etc/passwd"]:
        L.save_checkpoint(tiny(), p, max_shard_bytes=60_000)
        _point_entry(p, entry)
        with pytest.raises(CheckpointError, match=r"entry .* resolves outside the checkpoint directory") as e:
            load(p)
        assert entry in str(e.value) and str(size) not in str(e.value)  # names the entry, leaks no size


def test_symlink_out_of_the_directory(sharded, tmp_path):
    _, p = sharded
    first = sorted(set(index_of(p)["weight_map"].values()))[0]
    os.replace(p / first, tmp_path / "moved.safetensors")
    os.symlink(tmp_path / "moved.safetensors", p / first)
    with pytest.raises(CheckpointError, match=f"entry '{first}': resolves outside the checkpoint directory"):
        load(p)
    os.unlink(p / first)  # a symlink that stays inside is fine
    os.replace(tmp_path / "moved.safetensors", p / "real.bin")
    os.symlink("real.bin", p / first)
    assert load(p).load_report.loaded > 0


def test_fifo_shard_and_fifo_config_do_not_hang(sharded):
    _, p = sharded
    first = _point_entry(p, "pipe.safetensors")
    os.mkfifo(p / "pipe.safetensors")
    t0 = time.time()
    with pytest.raises(CheckpointError, match="entry 'pipe.safetensors': not a regular file"):
        load(p)
    os.unlink(p / "config.json")
    os.mkfifo(p / "config.json")
    with pytest.raises(CheckpointError, match="config.json: not a regular file"):
        load(p)
    assert time.time() - t0 < 10 and first


def test_directory_as_a_shard(sharded):
    _, p = sharded
    _point_entry(p, "sub.safetensors")
    (p / "sub.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="not a regular file"):
        load(p)


# ------------------------------------------------------------------------------------------------- headers first
@pytest.fixture
def no_alloc(monkeypatch):
    """Fail the test if the loader gets as far as allocating the model."""
    def boom(*a, **k):
        raise AssertionError("the model was allocated before the checkpoint was checked")
    monkeypatch.setattr(C, "build_empty", boom)


def _header(path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write_header(path, header, body):
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _shard(p, key="lm_head.weight"):
    return p / index_of(p)["weight_map"][key]


def test_header_length_as_large_as_the_file(sharded, no_alloc):
    _, p = sharded
    f = _shard(p)
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(data)) + data[8:])  # the header would be the whole file
    with pytest.raises(CheckpointError, match=rf"{f.name}: truncated or corrupt \(header says {len(data)} bytes"):
        load(p)
    f.write_bytes(struct.pack("<Q", 2**63) + data[8:])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load(p)


@pytest.mark.parametrize("change,msg", [
    (lambda h: h["lm_head.weight"].__setitem__("dtype", "F7"), r"lm_head.weight has dtype 'F7'"),
    (lambda h: h["lm_head.weight"].__setitem__("shape", [512, -64]), r"tensor lm_head.weight has shape"),
    (lambda h: h["lm_head.weight"].__setitem__("shape", [512, 65]), r"lm_head.weight: \d+ bytes for shape"),
    (lambda h: h["lm_head.weight"]["data_offsets"].__setitem__(0, 4), r"lm_head.weight: \d+ bytes for shape"),
    (lambda h: h.__setitem__("lm_head.weight", "x"), r"entry 'lm_head.weight' lacks"),
    (lambda h: h.__setitem__("evil\nname", h.pop("lm_head.weight")), r"tensor name 'evil\\nname' is not printable"),
])
def test_corrupt_header_entries_are_found_before_allocating(sharded, no_alloc, change, msg):
    _, p = sharded
    f = _shard(p)
    header, body = _header(f)
    change(header)
    _write_header(f, header, body)
    with pytest.raises(CheckpointError, match=msg) as e:
        load(p)
    assert "\n" not in str(e.value)


def test_overlapping_offsets(tmp_path, no_alloc):
    m = tiny()
    L.save_checkpoint(m, tmp_path)
    f = tmp_path / "model.safetensors"
    header, body = _header(f)
    entries = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    (a0, b0), k0 = entries[0]
    (a1, b1), k1 = next(((o, k) for o, k in entries[1:] if o[1] - o[0] == b0 - a0), (None, None))
    header[k1]["data_offsets"] = [a0, b0]  # two tensors share bytes (and a hole is left)
    _write_header(f, header, body)
    with pytest.raises(CheckpointError, match="overlap or gap"):
        load(tmp_path)


def test_wrong_shape_found_before_allocating(sharded, no_alloc):
    _, p = sharded
    f = _shard(p, "model.norm.weight")
    t = load_file(f)
    t["model.norm.weight"] = torch.ones(63)
    save_file(t, f)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight .* has shape \[63\], expected \[64\]"):
        load(p)


# ------------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("dtype,kind", [(torch.int64, "integer dtype I64"), (torch.bool, "bool dtype BOOL"),
                                        (torch.uint8, "integer dtype U8")])
def test_integer_or_bool_tensor_for_a_float_weight(sharded, no_alloc, dtype, kind):
    _, p = sharded
    key = "model.layers.0.self_attn.0.o_proj.weight"
    f = _shard(p, key)
    t = load_file(f)
    t[key] = torch.ones_like(t[key]).to(dtype)
    save_file(t, f)
    with pytest.raises(CheckpointError, match=rf"tensor {key} in .* has {kind}, but it is a float weight"):
        load(p)


@pytest.mark.parametrize("key", ["model.layers.1.mlp.experts.3.up_proj.weight", "model.norm.weight"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_reported_at_copy_time(sharded, key, bad):
    m, p = sharded
    f = _shard(p, key)
    t = load_file(f)
    t[key].view(-1)[:3] = bad
    save_file(t, f)
    with pytest.raises(CheckpointError, match=rf"tensor {key} in .* has 3 non-finite values .*check_finite=False"):
        load(p)
    got = load(p, check_finite=False)  # the flag skips the check
    assert not torch.isfinite(got.state_dict()[key.replace(".3.up_proj.weight", ".gate_up_proj")
                                               if "experts" in key else key]).all()


def test_non_finite_check_reads_each_file_once(sharded, monkeypatch):
    """The check works on the copies in memory: each checkpoint tensor is read exactly once."""
    m, p = sharded
    reads = []
    real = C._Reader.slice
    monkeypatch.setattr(C._Reader, "slice", lambda self, k: (reads.append(k), real(self, k))[1])
    same(load(p), m)
    assert len(reads) == len(set(reads)) == len(C.index_checkpoint(p))


def test_tie_word_embeddings_is_honoured(tmp_path):
    m = tiny(tie_word_embeddings=True)
    with torch.no_grad():
        m.lm_head.weight = m.model.embed_tokens.weight  # tied model
    L.save_checkpoint(m, tmp_path)
    assert "lm_head.weight" not in C.index_checkpoint(tmp_path)  # written once, as transformers does
    got = load(tmp_path)
    assert got.lm_head.weight is got.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(got(IDS), m(IDS))


def test_tie_word_embeddings_with_a_different_lm_head(tmp_path):
    m = tiny()
    L.save_checkpoint(m, tmp_path, config_overrides={"tie_word_embeddings": True})
    with pytest.raises(CheckpointError, match="tie_word_embeddings=true, but lm_head.weight .* differs from "
                                              r"model\.embed_tokens\.weight"):
        load(tmp_path)
    untied = tiny(tie_word_embeddings=True)  # a model whose head was never tied cannot be saved as tied
    with pytest.raises(ValueError, match="tie_word_embeddings=true but lm_head.weight differs"):
        L.save_checkpoint(untied, tmp_path / "x")


# ------------------------------------------------------------------------------------------------- config fields
BASE = {k: v for k, v in config_to_dict(L.tiny_longcat()).items() if k != "num_key_value_heads"}


@pytest.mark.parametrize("field,value,msg", [
    ("hidden_size", "64", "hidden_size must be an integer, got '64'"),
    ("num_layers", None, "num_layers must be an integer, got None"),
    ("num_attention_heads", True, "num_attention_heads must be an integer, got True"),
    ("vocab_size", 512.0, "vocab_size must be an integer"),
    ("kv_lora_rank", 0, "kv_lora_rank must be >= 1, got 0"),
    ("n_routed_experts", -1, "n_routed_experts must be >= 0"),
    ("rms_norm_eps", -1e-5, "rms_norm_eps must be > 0"),
    ("rms_norm_eps", 2.0, r"rms_norm_eps must be in \(0, 1\)"),
    ("routed_scaling_factor", float("nan"), "routed_scaling_factor must be a finite number, got nan"),
    ("routed_scaling_factor", "6", "routed_scaling_factor must be a finite number"),
    ("rope_parameters", {"rope_theta": float("inf"), "rope_type": "default"}, "rope_theta must be a finite number"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false, got 'yes'"),
    ("attention_bias", 1, "attention_bias must be true or false"),
    ("bos_token_id", 512, r"bos_token_id must be null or an integer in \[0, vocab_size=512\), got 512"),
    ("pad_token_id", -1, "pad_token_id must be null or an integer"),
    ("eos_token_id", [2, "3"], "eos_token_id must be null, an integer or a list"),
    ("hidden_act", ["silu"], "hidden_act must be a string"),
    ("num_layers", MAX_LAYERS + 1, f"num_layers={MAX_LAYERS + 1} is more than {MAX_LAYERS}"),
    ("num_layers", 10**9, "num_layers=1000000000 is more than"),
    ("hidden_size", 2**40, "hidden_size=1099511627776 is larger than"),
    ("n_routed_experts", 10**9, "trillion parameters, more than the 5 trillion"),
    ("rope_parameters", [1], "rope_parameters must be an object or null"),
    ("frobnicate", 1, r"unknown config field\(s\) \['frobnicate'\] .*remove it from config.json"),
    ("topk_method", "greedy", r"topk_method='greedy' is not supported"),
    ("scoring_func", "sigmoid", r"scoring_func='sigmoid' is not supported for longcat_flash"),
])
def test_config_field_checks(field, value, msg):
    t0 = time.time()
    with pytest.raises(ConfigError, match=msg):
        config_from_dict({**BASE, field: value})
    assert time.time() - t0 < 1  # refused from arithmetic, nothing built


def test_glm_field_type_errors():
    base = config_to_dict(L.tiny_glm())
    base.pop("mlp_layer_types")
    with pytest.raises(ConfigError, match="first_k_dense_replace must be a non-negative integer"):
        config_from_dict({**base, "first_k_dense_replace": "1"})
    with pytest.raises(ConfigError, match="num_hidden_layers must be an integer"):
        config_from_dict({**base, "num_hidden_layers": "3", "first_k_dense_replace": 1})
    with pytest.raises(ConfigError, match="mlp_layer_types must be a list"):
        config_from_dict({**config_to_dict(L.tiny_glm()), "mlp_layer_types": "dense"})
    with pytest.raises(ConfigError, match="num_hidden_layers must be a non-negative integer"):
        config_from_dict({**BASE, "num_hidden_layers": "4"})  # LongCat's transformers-style key


@pytest.mark.parametrize("text,msg", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"model_type": "longcat_flash\xff"}', "not UTF-8"),
    (b"[1, 2]", "must hold a JSON object, got list"),
    (b"{not json", "not valid JSON"),
])
def test_config_file_checks(tmp_path, text, msg):
    (tmp_path / "config.json").write_bytes(text)
    with pytest.raises(CheckpointError, match=msg) as e:
        load(tmp_path)
    assert "\n" not in str(e.value)


def test_config_errors_come_before_reading_weights(tmp_path, no_alloc):
    L.save_checkpoint(tiny(), tmp_path, config_overrides={"num_layers": 10**9})
    with pytest.raises(CheckpointError, match="config.json: num_layers=1000000000 is more than 10000"):
        load(tmp_path)


def test_every_error_is_one_line(sharded):
    _, p = sharded
    f = _shard(p)
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(CheckpointError) as e:
        load(p)
    assert "\n" not in str(e.value) and f.name in str(e.value)
    assert math.isfinite(len(str(e.value)))
