"""Checkpoints: read and write safetensors in the real layouts, tensor by tensor, never holding the model twice.

A checkpoint directory holds `config.json` and either one `model.safetensors` or shards listed in
`model.safetensors.index.json` ({"weight_map": {tensor name: shard file}}). The routed experts come in two layouts:

    per-expert (the original LongCat-Flash-Chat / GLM-4.7-Flash files; also what transformers' save_pretrained writes)
        model.layers.{L}.mlp.experts.{e}.gate_proj.weight   (I, H)
        model.layers.{L}.mlp.experts.{e}.up_proj.weight     (I, H)
        model.layers.{L}.mlp.experts.{e}.down_proj.weight   (H, I)
    fused (transformers' in-memory names, = ours)
        model.layers.{L}.mlp.experts.gate_up_proj           (E, 2I, H)   rows [gate_e ; up_e]
        model.layers.{L}.mlp.experts.down_proj              (E, H, I)

Every other tensor has transformers' name; only the router differs (`mlp.router.classifier.weight` in LongCat,
`mlp.gate.weight` in GLM; ours is `mlp.router.weight`).

How `from_pretrained` loads:
  1. read config.json (the original LongCat one has no `model_type`; config.py recognises it),
  2. build the model on the meta device (no memory), let a parallel plan shrink it to this process's shard,
  3. allocate it once, uninitialised, on the target device in the target dtype,
  4. fill it tensor by tensor from memory-mapped safetensors, reading only the slices this process owns
     (`shard_rule(name, global_shape) -> None | (dim, start, end)`), casting dtype on the way.
Peak memory = the model + one checkpoint tensor.

Strict accounting: every tensor of the model must be found with its exact shape. Known extras are reported and
skipped: the multi-token-prediction block (`model.mtp.*` in LongCat, `model.layers.{num_layers}.*` in GLM; read it
with `mtp_tensors`), the phantom zero-expert rows transformers 5.x writes, LongCat's unused router bias. Anything
else is an error. Every problem raises `CheckpointError` naming the file or tensor; no partial model is returned.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..model.config import ConfigError, ModelConfig, config_to_dict, load_config


class CheckpointError(RuntimeError):
    """A checkpoint directory we cannot load; the message names the file or tensor."""


# ------------------------------------------------------------------------------------------------- file index
def _check_safetensors(path: str) -> list[str]:
    """Validate a safetensors file's header against its size; return its tensor names.

    A truncated file would otherwise fail later, deep inside a memory-mapped read, or not at all.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated or not a safetensors file (shorter than its header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(f"{path}: truncated or corrupt (header says {n} bytes, file has {size})")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, IndexError):
        raise CheckpointError(f"{path}: corrupt safetensors header") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: truncated or corrupt: its tensors need {8 + n + end} bytes, "
                              f"the file has {size}")
    return [k for k in header if k != "__metadata__"]


def index_checkpoint(path: str) -> dict[str, str]:
    """Map every tensor name to the file that holds it (validating each file)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    index_file = os.path.join(path, "model.safetensors.index.json")
    files: dict[str, str] = {}
    if os.path.exists(index_file):
        try:
            with open(index_file) as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index_file}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        for s in shards:
            if not os.path.exists(os.path.join(path, s)):
                raise CheckpointError(f"{index_file} points at a missing shard: {s}")
        for s in shards:
            present = set(_check_safetensors(os.path.join(path, s)))
            for k, v in weight_map.items():
                if v == s and k not in present:
                    raise CheckpointError(f"{index_file} says {k} is in {s}, but that shard does not hold it")
            for k in present:
                files[k] = os.path.join(path, s)
    else:
        names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not names:
            raise CheckpointError(f"{path}: no *.safetensors files (and no model.safetensors.index.json)")
        for s in names:
            for k in _check_safetensors(os.path.join(path, s)):
                if k in files:
                    raise CheckpointError(f"{k} is in both {files[k]} and {s} (and there is no index to choose)")
                files[k] = os.path.join(path, s)
    return files


# ------------------------------------------------------------------------------------------------- name mapping
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
PHANTOM = "phantom zero-expert rows written by transformers 5.x"
MTP = "multi-token-prediction (MTP) block"


def checkpoint_name(cfg: ModelConfig, ours: str) -> str:
    """Our parameter name -> the checkpoint's (transformers') name, for non-expert tensors."""
    if cfg.is_longcat:
        return ours.replace("mlp.router.weight", "mlp.router.classifier.weight")
    return ours.replace("mlp.router.", "mlp.gate.")


def is_mtp(cfg: ModelConfig, key: str) -> bool:
    """LongCat stores its MTP block as model.mtp.*; GLM as one extra decoder layer model.layers.{num_layers}.*."""
    if key.startswith("model.mtp."):
        return True
    m = re.match(r"^model\.layers\.(\d+)\.", key)
    return bool(m) and not cfg.is_longcat and \
        cfg.num_layers <= int(m.group(1)) < cfg.num_layers + max(1, cfg.num_nextn_predict_layers)


def known_extra(cfg: ModelConfig, key: str) -> str | None:
    """Why a checkpoint tensor we don't load is fine to skip, or None if it is unexpected."""
    if is_mtp(cfg, key):
        return MTP
    m = _EXPERT.match(key)
    if m and int(m.group(2)) >= cfg.n_routed_experts and cfg.zero_expert_num \
            and int(m.group(2)) < cfg.num_router_experts and m.group(3) != "down_proj":
        return PHANTOM  # transformers sizes gate_up_proj for routed + zero experts and writes the extra rows
    if cfg.is_longcat and key.endswith("mlp.router.classifier.bias"):
        return "router bias (router_bias=true; transformers creates it but never applies it)"
    if key.endswith("rotary_emb.inv_freq"):
        return "rotary table (recomputed)"
    return None


@dataclass
class LoadReport:
    loaded: int = 0  # our tensors filled
    read: int = 0  # checkpoint tensors read
    bytes_read: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count of checkpoint tensors

    def skip(self, why: str, n: int = 1):
        self.skipped[why] = self.skipped.get(why, 0) + n

    def summary(self) -> str:
        s = f"loaded {self.loaded} tensors from {self.read} checkpoint tensors ({self.bytes_read / 2**20:.1f} MiB)"
        if self.skipped:
            s += "; skipped " + ", ".join(f"{n} x {r}" for r, n in sorted(self.skipped.items()))
        return s


class _Reader:
    """Lazily opened, memory-mapped safetensors files."""

    def __init__(self, files: dict[str, str]):
        self.files, self.handles = files, {}

    def slice(self, key: str):
        path = self.files[key]
        if path not in self.handles:
            try:
                self.handles[path] = safe_open(path, framework="pt")
            except Exception as e:  # noqa: BLE001 -- re-raised with the file's name
                raise CheckpointError(f"{path}: cannot open ({e})") from None
        return self.handles[path].get_slice(key)

    def close(self):
        self.handles.clear()


def _owned(shard_rule, name, shape):
    """shard_rule(name, global_shape) -> None (whole tensor) or (dim, start, end): the slice this process owns."""
    return None if shard_rule is None else shard_rule(name, shape)


def _progress_bar(total_bytes: int, progress):
    if progress is None:
        progress = total_bytes > 2**30 and sys.stderr.isatty()
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total_bytes, desc="loading", unit="B", unit_scale=True, file=sys.stderr)


def load_weights(model, cfg: ModelConfig, path: str, dtype, shard_rule=None, progress=None) -> LoadReport:
    """Fill `model` (already allocated, maybe sharded) from the checkpoint at `path`.

    shard_rule(name, global_shape) -> None | (dim, start, end) says which slice of each of our tensors (our names,
    global shapes) this process owns; the experts' rule must slice dim 0 (the expert axis).
    """
    files = index_checkpoint(path)
    reader = _Reader(files)
    from ..model.model import CausalLM

    with torch.device("meta"):
        reference = CausalLM(cfg)  # unsharded shapes, no memory
    global_shapes = {n: tuple(t.shape) for n, t in list(reference.named_parameters()) + list(reference.named_buffers())}
    targets = dict(model.named_parameters())
    targets.update({n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})

    used: set[str] = set()
    report = LoadReport()
    E, Z, I, H = cfg.n_routed_experts, cfg.zero_expert_num, cfg.expert_ffn_hidden_size, cfg.hidden_size

    def read(key, expected_shape, sel=None, accept_rows=None):
        """Read `key` (checking its full shape) restricted to sel = None or (dim, start, end).

        accept_rows: another acceptable size of dim 0 (transformers' phantom zero-expert rows)."""
        if key not in files:
            raise CheckpointError(f"missing tensor {key} (expected shape {list(expected_shape)}) in {path}")
        sl = reader.slice(key)
        found = tuple(sl.get_shape())
        ok = found == tuple(expected_shape) or (accept_rows and found == (accept_rows,) + tuple(expected_shape[1:]))
        if not ok:
            raise CheckpointError(f"tensor {key} in {files[key]} has shape {list(found)}, expected "
                                  f"{list(expected_shape)}")
        used.add(key)
        if sel is None:
            t = sl[:]
        else:
            dim, a, b = sel
            t = sl[tuple([slice(None)] * dim + [slice(a, b)])]
        report.read += 1
        report.bytes_read += t.numel() * t.element_size()
        if bar is not None:
            bar.update(t.numel() * t.element_size())
        return t

    total = sum(t.numel() * t.element_size() for t in targets.values())
    bar = _progress_bar(total, progress)
    try:
        with torch.no_grad():
            for name in sorted(targets):
                target, gshape = targets[name], global_shapes[name]
                sel = _owned(shard_rule, name, gshape)
                m = _FUSED.match(name)
                if m:  # routed experts: (E, 2I, H) / (E, H, I), maybe only experts [e0, e1) on this process
                    prefix, which = m.groups()
                    if sel is not None and sel[0] != 0:
                        raise CheckpointError(f"{name}: experts can only be sharded along the expert axis (dim 0)")
                    e0, e1 = (0, E) if sel is None else sel[1:]
                    if target.shape[0] != e1 - e0:
                        raise CheckpointError(f"{name}: this process holds {target.shape[0]} experts but the "
                                              f"sharding rule gives experts [{e0}, {e1}) (sharding rule mismatch)")
                    if name in files:  # fused layout (gate_up_proj may carry transformers' phantom rows)
                        phantom = E + Z if (which == "gate_up_proj" and Z) else None
                        target.copy_(read(name, gshape, (0, e0, e1), accept_rows=phantom))
                        if phantom and tuple(reader.slice(name).get_shape())[0] == phantom:
                            report.skip(PHANTOM)
                    else:  # per-expert layout: copy expert by expert straight into its slot
                        for e in range(e0, e1):
                            if which == "gate_up_proj":
                                target[e - e0, :I].copy_(read(f"{prefix}.{e}.gate_proj.weight", (I, H)))
                                target[e - e0, I:].copy_(read(f"{prefix}.{e}.up_proj.weight", (I, H)))
                            else:
                                target[e - e0].copy_(read(f"{prefix}.{e}.down_proj.weight", (H, I)))
                else:
                    t = read(checkpoint_name(cfg, name), gshape, sel)
                    if tuple(t.shape) != tuple(target.shape):
                        raise CheckpointError(f"{name}: read shape {list(t.shape)} but this process's tensor is "
                                              f"{list(target.shape)} (sharding rule mismatch)")
                    if name.endswith("e_score_correction_bias") and cfg.is_longcat:
                        t = t.to(dtype)  # transformers keeps LongCat's bias in the model dtype: round like it does
                    target.copy_(t)  # casts to the model dtype on the way
                report.loaded += 1
    finally:
        if bar is not None:
            bar.close()
        reader.close()

    for key in sorted(set(files) - used):
        m = _EXPERT.match(key)
        if m and shard_rule is not None and int(m.group(2)) < E:
            continue  # another process's expert
        why = known_extra(cfg, key)
        if why is None:
            raise CheckpointError(f"unexpected tensor {key} in {files[key]}: it is not part of a "
                                  f"{cfg.model_type} model with this config (wrong config.json?)")
        report.skip(why)
    return report


def build_empty(cfg: ModelConfig, dtype=torch.float32, device="cpu", parallel=None):
    """Construct on the meta device, optionally shard, then allocate once (uninitialised) on `device` in `dtype`.

    Buffers (the routers' correction bias) stay fp32; the loader rounds LongCat's through `dtype`.
    """
    from ..model.model import CausalLM

    with torch.device("meta"):
        model = CausalLM(cfg)
    if parallel is not None:
        parallel.shard(model)
    for p in model.parameters():
        p.data = p.data.to(dtype)  # still on the meta device: no memory
    model = model.to_empty(device=device)
    for b in model.buffers():
        b.zero_()
    return model


def read_config(path: str) -> ModelConfig:
    """config.json of a checkpoint directory; CheckpointError naming the file if it is missing or invalid."""
    file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not os.path.exists(file):
        raise CheckpointError(f"{path}: no config.json (is this a checkpoint directory?)")
    try:
        return load_config(file)
    except ConfigError as e:
        raise CheckpointError(f"{file}: {e}") from None


def from_pretrained(path, dtype=torch.bfloat16, device="cpu", parallel=None, progress=None, verbose=False):
    """Load a LongCat-Flash or GLM-4.7-Flash checkpoint directory -> CausalLM in eval mode.

    dtype: the model dtype (weights are cast while reading). parallel: a parallel context (parallel.py) whose
    `check(cfg)` validates the plan, `shard(model)` shrinks the meta model and `shard_rule` tells which slice of each
    tensor this process owns; None loads everything. progress: a tqdm bar (default: loads > 1 GiB on a terminal).
    The model's `load_report` says what was loaded and skipped.
    """
    path = os.fspath(path)
    cfg = read_config(path)
    if parallel is not None:
        parallel.check(cfg)  # fail before allocating anything
    index_checkpoint(path)  # fail on missing/corrupt files before allocating anything
    model = build_empty(cfg, dtype, device, parallel)
    report = load_weights(model, cfg, path, dtype, shard_rule=None if parallel is None else parallel.shard_rule,
                          progress=progress)
    model.load_report = report
    if verbose:
        print(f"[longcat_ref] {path}: {report.summary()}", file=sys.stderr)
    return model.eval()


def mtp_tensors(path, dtype=None) -> dict[str, torch.Tensor]:
    """The multi-token-prediction block the loader skips, by checkpoint name (for later use, e.g. speculative
    decoding): `model.mtp.*` (LongCat) or `model.layers.{num_layers}.*` (GLM). Empty if the checkpoint has none."""
    path = os.fspath(path)
    cfg = read_config(path)
    files = index_checkpoint(path)
    reader = _Reader(files)
    out = {}
    for k in sorted(files):
        if is_mtp(cfg, k):
            t = reader.slice(k)[:]
            out[k] = t if dtype is None else t.to(dtype)
    reader.close()
    return out


# ------------------------------------------------------------------------------------------------- writer
def checkpoint_tensors(model, layout: str = "per_expert") -> dict[str, torch.Tensor]:
    """Our state dict in checkpoint names. layout: 'per_expert' (original / save_pretrained) or 'fused'."""
    if layout not in ("per_expert", "fused"):
        raise ValueError(f"layout must be 'per_expert' or 'fused', got {layout!r}")
    cfg = model.config
    out = {}
    for name, t in model.state_dict().items():
        m = _FUSED.match(name)
        if m and layout == "per_expert":
            prefix, which = m.groups()
            for e in range(t.shape[0]):
                if which == "gate_up_proj":
                    g, u = t[e].chunk(2, dim=0)  # (I, H) each: rows [gate ; up]
                    out[f"{prefix}.{e}.gate_proj.weight"] = g.contiguous()
                    out[f"{prefix}.{e}.up_proj.weight"] = u.contiguous()
                else:
                    out[f"{prefix}.{e}.down_proj.weight"] = t[e].contiguous()
        else:
            out[checkpoint_name(cfg, name)] = t.contiguous()
    return out


def original_longcat_config(cfg: ModelConfig) -> dict:
    """config.json as the original LongCat-Flash-Chat remote code writes it: no `model_type`, `num_layers` counts
    logical layers, legacy `rope_theta`, the remote-code switches (mla_scale_*, zero_expert_type, router_bias, ...).

    Modelled on the remote-code config class (architecture facts 1.1); the real file was not retrievable.
    """
    if not cfg.is_longcat:
        raise ValueError("original_longcat_config is for LongCat-Flash configs")
    d = config_to_dict(cfg)
    d.pop("model_type")
    d.pop("rope_parameters")
    d.pop("num_key_value_heads")
    d.pop("head_dim")
    d.update(architectures=["LongcatFlashForCausalLM"], attention_method="MLA", rope_theta=cfg.rope_theta,
             mla_scale_q_lora=cfg.mla_scale_q_lora, mla_scale_kv_lora=cfg.mla_scale_kv_lora,
             zero_expert_type="identity", router_bias=False, norm_topk_prob=False,
             num_nextn_predict_layers=cfg.num_nextn_predict_layers or 1, torch_dtype="bfloat16")
    return d


def random_mtp_block(cfg: ModelConfig, seed: int = 0, dtype=torch.float32, std: float = 0.02) -> dict:
    """A random LongCat MTP block with the real checkpoint names and shapes (architecture facts 1.6): embedding,
    eh_proj, enorm/hnorm (note the `.m.`), one MLA + dense SwiGLU decoder block, final norm. No lm_head (shared)."""
    from ..model.experts import SwiGLU
    from ..model.mla import MLA

    H, V = cfg.hidden_size, cfg.vocab_size
    shapes = {"model.mtp.embed_tokens.weight": (V, H), "model.mtp.layers.0.eh_proj.weight": (H, 2 * H),
              "model.mtp.layers.0.enorm.m.weight": (H,), "model.mtp.layers.0.hnorm.m.weight": (H,),
              "model.mtp.layers.0.input_layernorm.weight": (H,),
              "model.mtp.layers.0.post_attention_layernorm.weight": (H,), "model.mtp.norm.weight": (H,)}
    with torch.device("meta"):
        attn, mlp = MLA(cfg, cache_idx=0), SwiGLU(H, cfg.ffn_hidden_size)
    shapes.update({f"model.mtp.layers.0.self_attn.{n}": tuple(p.shape) for n, p in attn.named_parameters()})
    shapes.update({f"model.mtp.layers.0.transformer_layer.mlp.{n}": tuple(p.shape) for n, p in mlp.named_parameters()})
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        v = 1.0 + 0.1 * torch.randn(s, generator=g) if len(s) == 1 else std * torch.randn(s, generator=g)
        out[k] = v.to(dtype)
    return out


def save_checkpoint(model, path, layout: str = "per_expert", max_shard_bytes: int | None = None,
                    original_config: bool = False, mtp: bool = False, dtype=None,
                    config_overrides: dict | None = None, drop_model_type: bool = False, extra=None):
    """Write config.json + safetensors (sharded with model.safetensors.index.json when max_shard_bytes is set).

    layout: 'per_expert' (the original files) or 'fused' (transformers' in-memory names).
    original_config: write the original LongCat config.json (no model_type; see `original_longcat_config`).
    mtp: add a random LongCat MTP block `model.mtp.*` with the real names (the loader skips it).
    dtype: the on-disk dtype (default: the model's). extra: more tensors to write as they are.
    drop_model_type: only remove `model_type` from the transformers-style config.
    """
    os.makedirs(path, exist_ok=True)
    cfg = model.config
    cfgd = original_longcat_config(cfg) if original_config else config_to_dict(cfg)
    cfgd.update(config_overrides or {})
    if drop_model_type:
        cfgd.pop("model_type", None)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfgd, f, indent=2)
    tensors = checkpoint_tensors(model, layout)
    if mtp:
        if not cfg.is_longcat:
            raise ValueError("mtp=True writes LongCat's model.mtp.* block; GLM's MTP is one more decoder layer")
        tensors.update(random_mtp_block(cfg, dtype=next(iter(tensors.values())).dtype))
    if dtype is not None:
        tensors = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in tensors.items()}
    tensors.update(extra or {})
    if not max_shard_bytes:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return path
    shards, cur, size = [], {}, 0
    for k, t in tensors.items():
        nb = t.numel() * t.element_size()
        if cur and size + nb > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = t
        size += nb
    shards.append(cur)
    weight_map = {}
    for i, sh in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in sh})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return path
