"""Checkpoints: read and write safetensors in the real layouts, tensor by tensor, never holding the model twice.

Layouts we read (config.json + `model.safetensors` or shards listed in `model.safetensors.index.json`):

* per-expert (the original LongCat-Flash-Chat and GLM-4.7-Flash files, and what transformers' `save_pretrained`
  writes):  `model.layers.{L}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight`
* fused (transformers' in-memory names):  `model.layers.{L}.mlp.experts.gate_up_proj` (E, 2I, H) and `down_proj`

How `from_pretrained` loads: build the model on the meta device (no memory), optionally let a parallel plan shrink
it to this process's shard, allocate it once on the target device in the target dtype, then fill every tensor from
memory-mapped safetensors, reading only the slices this process owns. Strict accounting: every tensor of the model
must be found; known extras (the MTP block `model.mtp.*`, GLM's MTP layer, phantom zero-expert rows written by
transformers 5.x, the unused LongCat router bias) are reported and skipped; anything else is an error.
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

from .config import ModelConfig, config_to_dict, load_config


class CheckpointError(RuntimeError):
    """A checkpoint directory we cannot load; the message names the file or tensor."""


# ------------------------------------------------------------------------------------------------- file index
def _check_safetensors(path: str) -> list[str]:
    """Validate a safetensors file's header against its size (a truncated file would crash at mmap time)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated or not a safetensors file (shorter than its header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(f"{path}: truncated or corrupt (header length {n} > file size {size})")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: truncated or corrupt: tensors need {8 + n + end} bytes, file has {size}")
    return [k for k in header if k != "__metadata__"]


def index_checkpoint(path: str) -> dict[str, str]:
    """Map every tensor name to the file that holds it (validating each file)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    index_file = os.path.join(path, "model.safetensors.index.json")
    files: dict[str, str] = {}
    if os.path.exists(index_file):
        try:
            weight_map = json.load(open(index_file))["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index_file}: not a valid safetensors index ({e})") from None
        shards = sorted(set(weight_map.values()))
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
                files[k] = os.path.join(path, s)
    return files


# ------------------------------------------------------------------------------------------------- name mapping
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def checkpoint_name(cfg: ModelConfig, ours: str) -> str:
    """Our parameter name -> the checkpoint's (transformers') name, for non-expert tensors."""
    if cfg.is_longcat:
        return ours.replace("mlp.router.weight", "mlp.router.classifier.weight")
    return ours.replace("mlp.router.", "mlp.gate.")


def known_extra(cfg: ModelConfig, key: str) -> str | None:
    """Why a checkpoint tensor we don't load is fine to skip, or None if it is unexpected."""
    if key.startswith("model.mtp."):
        return "multi-token-prediction (MTP) block"
    m = re.match(r"^model\.layers\.(\d+)\.", key)
    if m and int(m.group(1)) >= cfg.num_layers and cfg.num_nextn_predict_layers:
        return "multi-token-prediction (MTP) layer"
    m = _EXPERT.match(key)
    if m and int(m.group(2)) >= cfg.n_routed_experts and cfg.zero_expert_num:
        return "phantom zero-expert rows written by transformers 5.x"
    if key.endswith("mlp.router.classifier.bias"):
        return "router bias (transformers never applies it)"
    if key.endswith("rotary_emb.inv_freq"):
        return "rotary table (recomputed)"
    return None


@dataclass
class LoadReport:
    loaded: int = 0
    bytes_read: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count

    def summary(self) -> str:
        s = f"loaded {self.loaded} tensors ({self.bytes_read / 2**20:.1f} MiB)"
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


def _owned(shard_rule, name, shape):
    """shard_rule(name, global_shape) -> None (whole tensor) or (dim, start, end): the slice this process owns."""
    return None if shard_rule is None else shard_rule(name, shape)


def load_weights(model, cfg: ModelConfig, path: str, dtype, shard_rule=None, progress=None) -> LoadReport:
    """Fill `model` (already allocated, maybe sharded) from the checkpoint at `path`."""
    files = index_checkpoint(path)
    reader = _Reader(files)
    with torch.device("meta"):
        from .model import CausalLM

        reference = CausalLM(cfg)  # unsharded shapes, no memory
    global_shapes = {n: tuple(t.shape) for n, t in list(reference.named_parameters()) + list(reference.named_buffers())}
    targets = dict(model.named_parameters())
    targets.update({n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})

    used: set[str] = set()
    report = LoadReport()

    def read(key, expected_shape, sel):
        """Read `key` (checking its full shape) restricted to sel = None or (dim, start, end)."""
        if key not in files:
            raise CheckpointError(f"missing tensor {key} (expected shape {list(expected_shape)}) in {path}")
        sl = reader.slice(key)
        found = tuple(sl.get_shape())
        if found != tuple(expected_shape):
            raise CheckpointError(f"tensor {key} has shape {list(found)}, expected {list(expected_shape)}")
        used.add(key)
        if sel is None:
            return sl[:]
        dim, a, b = sel
        idx = tuple([slice(None)] * dim + [slice(a, b)])
        return sl[idx]

    names = sorted(targets)
    it = names
    total_bytes = sum(t.numel() * t.element_size() for t in targets.values())
    if progress is None:
        progress = total_bytes > 2**30 and sys.stderr.isatty()
    if progress:
        from tqdm import tqdm

        it = tqdm(names, desc="loading", unit="tensor", file=sys.stderr)
    E, Z, I = cfg.n_routed_experts, cfg.zero_expert_num, cfg.expert_ffn_hidden_size
    with torch.no_grad():
        for name in it:
            target = targets[name]
            gshape = global_shapes[name]
            sel = _owned(shard_rule, name, gshape)
            m = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$", name)
            if m:
                prefix, which = m.groups()
                e0, e1 = (0, E) if sel is None else (sel[1], sel[2])
                assert sel is None or sel[0] == 0, "experts are sharded along the expert axis"
                if name in files:  # fused layout (maybe with transformers' phantom zero-expert rows)
                    fshape = tuple(reader.slice(name).get_shape())
                    expect = gshape if fshape[0] == E or not Z else (E + Z,) + gshape[1:]
                    t = read(name, expect, (0, e0, e1))
                    if fshape[0] != E:
                        report.skipped["phantom zero-expert rows written by transformers 5.x"] = \
                            report.skipped.get("phantom zero-expert rows written by transformers 5.x", 0) + 1
                else:  # per-expert layout
                    H = cfg.hidden_size
                    parts = []
                    for e in range(e0, e1):
                        if which == "gate_up_proj":
                            g = read(f"{prefix}.{e}.gate_proj.weight", (I, H), None)
                            u = read(f"{prefix}.{e}.up_proj.weight", (I, H), None)
                            parts.append(torch.cat([g, u], dim=0))  # (2I, H): [gate ; up]
                        else:
                            parts.append(read(f"{prefix}.{e}.down_proj.weight", (H, I), None))
                    t = torch.stack(parts)
            else:
                key = checkpoint_name(cfg, name)
                t = read(key, gshape, sel)
                if name.endswith("e_score_correction_bias") and cfg.is_longcat:
                    t = t.to(dtype)  # transformers stores LongCat's bias in the model dtype: round like it does
            if tuple(t.shape) != tuple(target.shape):
                raise CheckpointError(f"{name}: read shape {list(t.shape)} but this process's tensor is "
                                      f"{list(target.shape)} (sharding rule mismatch)")
            target.copy_(t.to(target.dtype))
            report.loaded += 1
            report.bytes_read += t.numel() * t.element_size()

    for key in sorted(set(files) - used):
        if _EXPERT.match(key) and shard_rule is not None and int(_EXPERT.match(key).group(2)) < E:
            continue  # another rank's expert
        why = known_extra(cfg, key)
        if why is None:
            raise CheckpointError(f"unexpected tensor {key} in {files[key]}: it is not part of a "
                                  f"{cfg.model_type} model with this config")
        report.skipped[why] = report.skipped.get(why, 0) + 1
    return report


def build_empty(cfg: ModelConfig, dtype=torch.float32, device="cpu", parallel=None):
    """Construct on the meta device, optionally shard, then allocate once (uninitialised) on `device` in `dtype`."""
    from .model import CausalLM

    with torch.device("meta"):
        model = CausalLM(cfg)
    if parallel is not None:
        parallel.shard(model)
    for n, p in model.named_parameters():
        p.data = p.data.to(dtype)  # still on meta: allocate in the target dtype only (never an fp32 copy)
    model = model.to_empty(device=device)
    # buffers: the router's correction bias stays fp32
    for n, b in model.named_buffers():
        b.zero_()
    return model


def from_pretrained(path, dtype=torch.bfloat16, device="cpu", parallel=None, progress=None, verbose=False):
    """Load a LongCat-Flash or GLM-4.7-Flash checkpoint directory -> CausalLM in eval mode.

    `parallel`: a parallel context (parallel.py) whose `shard` shrinks the model and whose `shard_rule` tells which
    slice of each tensor this process owns; None loads everything.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path}: no config.json (not a checkpoint directory?)")
    cfg = load_config(path)
    if parallel is not None:
        parallel.check(cfg)  # fail before loading anything
    model = build_empty(cfg, dtype, device, parallel)
    report = load_weights(model, cfg, path, dtype, shard_rule=None if parallel is None else parallel.shard_rule,
                          progress=progress)
    model.load_report = report
    if verbose:
        print(f"[longcat_ref] {path}: {report.summary()}", file=sys.stderr)
    return model.eval()


# ------------------------------------------------------------------------------------------------- writer
def checkpoint_tensors(model, layout: str = "per_expert") -> dict[str, torch.Tensor]:
    """Our state dict in checkpoint names. layout: 'per_expert' (original / save_pretrained) or 'fused'."""
    if layout not in ("per_expert", "fused"):
        raise ValueError(f"layout must be 'per_expert' or 'fused', got {layout!r}")
    cfg = model.config
    out = {}
    for name, t in model.state_dict().items():
        m = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$", name)
        if m and layout == "per_expert":
            prefix, which = m.groups()
            for e in range(t.shape[0]):
                if which == "gate_up_proj":
                    g, u = t[e].chunk(2, dim=0)
                    out[f"{prefix}.{e}.gate_proj.weight"] = g.contiguous()
                    out[f"{prefix}.{e}.up_proj.weight"] = u.contiguous()
                else:
                    out[f"{prefix}.{e}.down_proj.weight"] = t[e].contiguous()
        else:
            out[checkpoint_name(cfg, name)] = t.contiguous()
    return out


def save_checkpoint(model, path, layout: str = "per_expert", max_shard_bytes: int | None = None,
                    config_overrides: dict | None = None, drop_model_type: bool = False, extra=None):
    """Write config.json + safetensors (sharded with an index when max_shard_bytes is set).

    drop_model_type writes the original LongCat config (no `model_type`); extra: more tensors (e.g. an MTP block).
    """
    os.makedirs(path, exist_ok=True)
    cfgd = config_to_dict(model.config)
    cfgd.update(config_overrides or {})
    if drop_model_type:
        cfgd.pop("model_type")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfgd, f, indent=2)
    tensors = checkpoint_tensors(model, layout)
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
