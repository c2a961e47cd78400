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
`mlp.gate.weight` in GLM; ours is `mlp.router.weight`). FP8 block-scaled files (LongCat-Flash-Chat-FP8) are
dequantized on load (fp8.py).

How `from_pretrained` loads -- everything that can be checked is checked before any memory is allocated:
  1. resolve the path (a directory, or a Hugging Face hub id found in the local HF cache),
  2. read config.json (every field type- and range-checked, absurd sizes refused: config.py),
  3. read and check the safetensors header of every file (length, offsets, dtypes, shapes), check that the index
     and the shards agree and that every file is a regular file inside the checkpoint directory,
  4. check every tensor the model needs against the headers (present, shape, a float dtype or FP8 with a valid
     scale) and that every other tensor is a known extra,
  5. build the model on the meta device (no memory), let a parallel plan shrink it to this process's shard,
     allocate it once, uninitialised, on the target device in the target dtype (the LongCat router stays fp32),
  6. fill it tensor by tensor from memory-mapped safetensors, reading only the slices this process owns
     (`shard_rule(name, global_shape) -> None | (dim, start, end)`), casting (or dequantizing) on the way and
     checking each copied tensor is finite (no second pass over the files; `check_finite=False` skips it).
Peak memory = the model + one checkpoint tensor.

Strict accounting: every tensor of the model must be found with its exact shape. Known extras are reported and
skipped: the phantom zero-expert rows transformers 5.x writes, LongCat's unused router bias. Anything
else is an error. The multi-token-prediction block (`model.mtp.*` in LongCat, `model.layers.{num_layers}.*` in GLM)
is loaded into `model.mtp` (model/mtp.py) when complete, unless `mtp=False` (then reported and skipped; its raw
tensors: `mtp_tensors`). Every problem raises a one-line `CheckpointError` naming the file or tensor; no partial model is
returned.

Writing (`save_checkpoint`) is atomic for readers: new files are written under temporary names, the previous
checkpoint's index / model.safetensors (the "commit" files) are removed before anything is renamed into place, and
the new commit file is renamed in last; stale shards of an earlier save are then deleted. A save killed at any
point leaves either the old checkpoint, the new one, or a directory that refuses to load -- never a mix.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
import sys
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..model.config import ConfigError, ModelConfig, config_to_dict, load_config, read_json
from . import fp8 as _fp8
from ..model import quant as _quant


class CheckpointError(RuntimeError):
    """A checkpoint directory we cannot load; the message names the file or tensor."""


INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit
MAX_INDEX_BYTES = 256 * 2**20
TMP_MARK = ".tmp-save-"  # temporary files of a save in progress: ".{name}.tmp-save-{pid}"

# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U64": (torch.uint64, 8), "U32": (torch.uint32, 4), "U16": (torch.uint16, 2), "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it."""

    file: str  # path of the shard, as named in the checkpoint directory (for messages)
    dtype: str  # safetensors dtype name ("BF16", "F8_E4M3", ...)
    shape: tuple
    real: str = ""  # the checked real path (symlinks resolved): what is opened


# ------------------------------------------------------------------------------------------------- file checks
def _regular_file_inside(root: str, path: str, what: str) -> str:
    """`path` resolved (symlinks followed) -> its real path, if it is a regular file inside `root`; else raise.

    The error names the entry but says nothing about what is there (no sizes of files outside the checkpoint).
    """
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise CheckpointError(f"{what}: resolves outside the checkpoint directory; only files inside it are read")
    try:
        st = os.stat(real)
    except OSError:
        raise CheckpointError(f"{what}: no such file in the checkpoint directory") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{what}: not a regular file (a FIFO, device or directory is never read)")
    return real


def _confinement_root(path: str) -> str:
    """The directory every file must resolve into: the checkpoint directory, or for a Hugging Face cache snapshot
    (.../models--org--name/snapshots/<rev>/, whose files are symlinks into ../../blobs/) the repo's cache folder."""
    real = os.path.realpath(path)
    parent = os.path.dirname(real)
    if os.path.basename(parent) == "snapshots" and os.path.isdir(os.path.join(os.path.dirname(parent), "blobs")):
        return os.path.dirname(parent)
    return real


def read_header(path: str, shown: str | None = None) -> dict[str, TensorInfo]:
    """Read and check a safetensors file's header -> {tensor name: TensorInfo}, reading only the header.

    Checked: the 8-byte length (at most 100 MiB and inside the file), UTF-8 JSON object, every entry's dtype, shape
    (non-negative integers) and data_offsets (their length = numel x itemsize, contiguous from 0, ending exactly at
    the end of the file). A file that passes cannot make a later memory-mapped read fail or read out of bounds.
    """
    shown = shown or path  # the name in messages (a Hugging Face cache snapshot's link, not its blob)

    def bad(why):
        raise CheckpointError(f"{shown}: {why}")

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                bad("truncated or not a safetensors file (shorter than its header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                bad(f"truncated or corrupt (header says {n} bytes, file has {size})")
            if n > MAX_HEADER_BYTES:
                bad(f"corrupt safetensors header (its length {n} is above the format's {MAX_HEADER_BYTES} limit)")
            header = json.loads(f.read(n).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        bad("corrupt safetensors header")
    except OSError as e:
        raise CheckpointError(f"{shown}: cannot read ({e.strerror})") from None
    if not isinstance(header, dict):
        bad("corrupt safetensors header (not a JSON object)")
    out, spans = {}, []
    for k, v in header.items():
        if k == "__metadata__":
            continue
        if not k.isprintable():
            bad(f"corrupt safetensors header (tensor name {k[:100]!r} is not printable)")
        if not (isinstance(v, dict) and isinstance(v.get("dtype"), str) and isinstance(v.get("shape"), list)
                and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2):
            bad(f"corrupt safetensors header (entry {k!r} lacks dtype / shape / data_offsets)")
        if v["dtype"] not in DTYPES:
            bad(f"tensor {k} has dtype {v['dtype']!r}, which this package does not read ({sorted(DTYPES)})")
        shape, (a, b) = v["shape"], v["data_offsets"]
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape) or len(shape) > 8:
            bad(f"corrupt safetensors header (tensor {k} has shape {shape!r})"[:300])
        if not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in (a, b)):
            bad(f"corrupt safetensors header (tensor {k} has data_offsets {v['data_offsets']!r})"[:300])
        if b - a != math.prod(shape) * DTYPES[v["dtype"]][1]:
            bad(f"corrupt safetensors header (tensor {k}: {b - a} bytes for shape {shape} of {v['dtype']})")
        spans.append((a, b, k))
        out[k] = TensorInfo(shown, v["dtype"], tuple(shape), path)
    end = 0
    for a, b, k in sorted(spans):
        if a != end:
            bad(f"corrupt safetensors header (tensor {k} starts at byte {a}, expected {end}: overlap or gap)")
        end = b
    if 8 + n + end != size:
        bad(f"truncated or corrupt: its tensors need {8 + n + end} bytes, the file has {size}")
    return out


def _looks_like_model_tensor(key: str) -> bool:
    return key.startswith(("model.", "lm_head."))


def index_checkpoint(path: str) -> dict[str, TensorInfo]:
    """Map every tensor name to its TensorInfo (file, dtype, shape), checking every file's header first.

    With an index: every shard it names must be a regular file inside the directory; every tensor must be in
    exactly the shard the index names; a shard may hold no tensor the index does not give it; and a *.safetensors
    file the index does not list must not hold model tensors (a stale shard of an earlier save). Without an index:
    `model.safetensors`, and no other *.safetensors file holding model tensors.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    root = _confinement_root(path)
    index_file = os.path.join(path, INDEX)
    listed: dict[str, str] = {}  # shard file name -> its real path
    infos: dict[str, TensorInfo] = {}
    if os.path.lexists(index_file):
        _regular_file_inside(root, index_file, f"{path}: {INDEX}")
        try:
            weight_map = read_json(index_file, limit=MAX_INDEX_BYTES)["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v.isprintable() and k.isprintable()
                                                           for k, v in weight_map.items()):
                raise TypeError("weight_map must map printable tensor names to file names")
        except (ConfigError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        for s in sorted(set(weight_map.values())):
            if not os.path.lexists(os.path.join(path, s)) and not os.path.isabs(s) and ".." not in s.split("/"):
                raise CheckpointError(f"{index_file} points at a missing shard: {s}")
            listed[s] = _regular_file_inside(root, os.path.join(path, s), f"{index_file}: entry {s!r}")
        headers = {s: read_header(real, os.path.join(path, s)) for s, real in listed.items()}
        for k, s in weight_map.items():
            if k not in headers[s]:
                raise CheckpointError(f"{index_file} says {k} is in {s}, but that shard does not hold it")
        for s, header in headers.items():
            for k, info in header.items():
                owner = weight_map.get(k)
                if owner != s:
                    where = f"the index gives it to {owner}" if owner else "the index does not list it"
                    raise CheckpointError(f"{os.path.join(path, s)} holds {k}, but {where}: the index and the "
                                          "shards disagree (an interrupted save?); re-save the checkpoint")
                infos[k] = info
    else:
        single = os.path.join(path, SINGLE)
        if not os.path.lexists(single):
            raise CheckpointError(f"{path}: no {SINGLE} and no {INDEX} (no *.safetensors files to load)")
        listed[SINGLE] = _regular_file_inside(root, single, f"{path}: {SINGLE}")
        infos = read_header(listed[SINGLE], single)
    listed_real = set(listed.values())
    for f in sorted(os.listdir(path)):
        full = os.path.join(path, f)
        if not f.endswith(".safetensors") or os.path.realpath(full) in listed_real:
            continue
        try:
            real = _regular_file_inside(root, full, f"{path}: {f}")
        except CheckpointError:
            continue  # not a file we would ever read
        stray = [k for k in read_header(real, full) if _looks_like_model_tensor(k)]
        if stray:
            raise CheckpointError(f"{full} holds model tensors (e.g. {stray[0]}) but "
                                  f"{'the index does not list it' if listed.keys() - {SINGLE} else 'no index names it'}"
                                  ": a stale file of an earlier save? remove it or re-save the checkpoint")
    return infos


# ------------------------------------------------------------------------------------------------- name mapping
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
PHANTOM = "phantom zero-expert rows written by transformers 5.x"
MTP = "multi-token-prediction (MTP) block"
TIED = "lm_head.weight (tie_word_embeddings: equal to embed_tokens)"


def checkpoint_name(cfg: ModelConfig, ours: str) -> str:
    """Our parameter name -> the checkpoint's (transformers') name, for non-expert tensors."""
    if cfg.is_longcat:
        return ours.replace("mlp.router.weight", "mlp.router.classifier.weight")
    return ours.replace("mlp.router.", "mlp.gate.")


def is_mtp(cfg: ModelConfig, key: str) -> bool:
    """LongCat stores its MTP block as model.mtp.*; GLM as one extra decoder layer model.layers.{num_layers}.*
    (GLM-4.7-Flash: layer 47 with its own embed_tokens, shared_head.{head,norm}, eh_proj, enorm, hnorm)."""
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


def _global_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Our tensors the loader fills (parameters + the routers' correction bias) -> unsharded shapes (meta model)."""
    from ..model.model import CausalLM

    with torch.device("meta"):
        reference = CausalLM(cfg)
    named = list(reference.named_parameters()) + [(n, b) for n, b in reference.named_buffers()
                                                  if n.endswith("e_score_correction_bias")]
    return {n: tuple(t.shape) for n, t in named}


def expected_tensors(cfg: ModelConfig, infos: dict, shapes: dict) -> dict[str, tuple]:
    """The checkpoint tensors the model needs -> their full shapes, in whichever expert layout the file uses.

    The fused layout is used for a layer when its fused tensor is present; phantom rows are checked by the caller.
    With tie_word_embeddings, lm_head.weight is optional (checked equal to embed_tokens when present).
    """
    E, I, H = cfg.n_routed_experts, cfg.expert_ffn_hidden_size, cfg.hidden_size
    out = {}
    for name in shapes:
        m = _FUSED.match(name)
        if m and name not in infos:
            prefix, which = m.groups()
            for e in range(E):
                if which == "gate_up_proj":
                    out[f"{prefix}.{e}.gate_proj.weight"] = out[f"{prefix}.{e}.up_proj.weight"] = (I, H)
                else:
                    out[f"{prefix}.{e}.down_proj.weight"] = (H, I)
        elif not (name == "lm_head.weight" and cfg.tie_word_embeddings and name not in infos):
            out[checkpoint_name(cfg, name)] = shapes[name]
    return out


def _quant_block(raw_cfg: dict, file: str):
    try:
        return _fp8.parse_quantization_config(raw_cfg.get("quantization_config"))
    except _fp8.FP8Error as e:
        raise CheckpointError(f"{file}: {e}") from None


def preflight(cfg: ModelConfig, infos: dict, raw_cfg: dict, path: str) -> dict[str, tuple]:
    """Check every tensor against the headers before anything is allocated -> expected {key: shape}.

    Present with its exact shape (fused gate_up_proj may carry transformers' phantom zero-expert rows); a float
    dtype, or F8_E4M3 with a quantization_config and a `.weight_scale_inv` of shape ceil(out/bo) x ceil(in/bi);
    every other checkpoint tensor a known extra.
    """
    shapes = _global_shapes(cfg)
    expected = expected_tensors(cfg, infos, shapes)
    block = _quant_block(raw_cfg, os.path.join(path, "config.json"))
    phantom_rows = cfg.n_routed_experts + cfg.zero_expert_num
    used = set()
    for key, shape in expected.items():
        info = infos.get(key)
        if info is None:
            raise CheckpointError(f"missing tensor {key} (expected shape {list(shape)}) in {path}")
        ok = info.shape == shape or (key.endswith("experts.gate_up_proj") and cfg.zero_expert_num
                                     and info.shape == (phantom_rows,) + shape[1:])
        if not ok:
            raise CheckpointError(f"tensor {key} in {info.file} has shape {list(info.shape)}, expected {list(shape)}")
        used.add(key)
        if info.dtype in FLOAT_DTYPES:
            continue
        if info.dtype not in _fp8.FP8_DTYPES:
            kind = "bool" if info.dtype == "BOOL" else "integer"
            raise CheckpointError(f"tensor {key} in {info.file} has {kind} dtype {info.dtype}, but it is a float "
                                  "weight: the file is corrupt or not this model's (nothing is cast)")
        if block is None:
            raise CheckpointError(f"tensor {key} in {info.file} is {info.dtype} but config.json has no "
                                  "quantization_config (fp8, weight_block_size): cannot know its scales")
        if len(shape) != 2:
            raise CheckpointError(f"tensor {key} in {info.file} is {info.dtype} with {len(shape)} dims: only 2-D "
                                  "weights are block-quantized (use the per-expert layout)")
        sname = _fp8.scale_name(key)
        sinfo = infos.get(sname)
        if sinfo is None:
            raise CheckpointError(f"FP8 tensor {key} in {info.file} has no scale tensor {sname}: "
                                  "its values cannot be dequantized")
        want = _fp8.scale_shape(shape, block)
        if sinfo.shape != want or sinfo.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"scale {sname} of FP8 tensor {key} is {sinfo.dtype} {list(sinfo.shape)}, expected "
                                  f"float {list(want)} (ceil({shape[0]}/{block[0]}) x ceil({shape[1]}/{block[1]}))")
        used.add(sname)
    for key in sorted(set(infos) - used):
        if known_extra(cfg, key) is None:
            hint = (" (a scale for a weight that is not FP8)" if key.endswith(_fp8.SCALE_SUFFIX) else "")
            raise CheckpointError(f"unexpected tensor {key} in {infos[key].file}{hint}: it is not part of a "
                                  f"{cfg.model_type} model with this config (wrong config.json?)")
    return expected


@dataclass
class LoadReport:
    loaded: int = 0  # our tensors filled
    read: int = 0  # checkpoint tensors read
    bytes_read: int = 0
    dequantized: int = 0  # FP8 checkpoint tensors dequantized
    kept_fp8: int = 0  # FP8 checkpoint tensors kept in FP8 (fp8="keep"), with their scales
    skipped: dict = field(default_factory=dict)  # reason -> count of checkpoint tensors
    mtp_kept: int = 0  # checkpoint tensors of the MTP block loaded into `model.mtp` (not counted above)
    mtp_note: str | None = None  # why an incomplete MTP block was skipped

    def skip(self, why: str, n: int = 1):
        self.skipped[why] = self.skipped.get(why, 0) + n

    def summary(self) -> str:
        s = f"loaded {self.loaded} tensors from {self.read} checkpoint tensors ({self.bytes_read / 2**20:.1f} MiB)"
        if self.dequantized:
            s += f", {self.dequantized} dequantized from FP8"
        if self.kept_fp8:
            s += f", {self.kept_fp8} kept in FP8"
        if self.mtp_kept:
            s += f"; kept {self.mtp_kept} x {MTP}"
        if self.skipped:
            s += "; skipped " + ", ".join(f"{n} x {r}" for r, n in sorted(self.skipped.items()))
        return s


class _Reader:
    """Lazily opened, memory-mapped safetensors files."""

    def __init__(self, infos: dict[str, TensorInfo]):
        self.infos, self.handles = infos, {}

    def slice(self, key: str):
        path = self.infos[key].real
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


def _raw_config(path: str) -> dict:
    try:
        d = read_json(os.path.join(path, "config.json"))
    except (ConfigError, OSError) as e:
        raise CheckpointError(f"{os.path.join(path, 'config.json')}: {e}") from None
    return d if isinstance(d, dict) else {}


def load_weights(model, cfg: ModelConfig, path: str, dtype, shard_rule=None, progress=None, check_finite=True,
                 router_dtype=torch.float32, infos=None) -> LoadReport:
    """Fill `model` (already allocated, maybe sharded) from the checkpoint at `path`.

    shard_rule(name, global_shape) -> None | (dim, start, end) says which slice of each of our tensors (our names,
    global shapes) this process owns; the experts' rule must slice dim 0 (the expert axis).
    check_finite: refuse a tensor with NaN/Inf values (checked on the copy in memory, not by re-reading the file).
    router_dtype: None rounds LongCat's correction bias through `dtype`, as transformers does; else it is kept.
    """
    path = os.fspath(path)
    raw_cfg = _raw_config(path)
    if infos is None:  # from_pretrained passes the headers it has already checked
        infos = index_checkpoint(path)
        preflight(cfg, infos, raw_cfg, path)
    block = _quant_block(raw_cfg, path)
    reader = _Reader(infos)
    global_shapes = _global_shapes(cfg)
    targets = dict(model.named_parameters())
    targets.update({n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
    scales = {n: b for n, b in model.named_buffers() if n.endswith(_fp8.SCALE_SUFFIX)}  # kept FP8 (model/quant.py)
    tied = cfg.tie_word_embeddings

    used: set[str] = set()
    report = LoadReport()
    E, Z, I, H = cfg.n_routed_experts, cfg.zero_expert_num, cfg.expert_ffn_hidden_size, cfg.hidden_size

    def read(key, sel=None, keep_fp8=False):
        """Read checkpoint tensor `key` (shape already checked by preflight), restricted to sel = None or
        (dim, start, end); FP8 tensors are dequantized in fp32 and cast to `dtype`, or with keep_fp8 returned as
        (FP8 values, their scales), sliced in whole blocks."""
        info = infos[key]
        used.add(key)
        if keep_fp8:
            sname = _fp8.scale_name(key)
            used.add(sname)
            try:
                t = _fp8.read_blocks(reader.slice(key), reader.slice(sname), info.shape, block, sel, key)
            except _fp8.FP8Error as e:
                raise CheckpointError(str(e)) from None
            report.kept_fp8 += 1
            report.read += 1
            report.bytes_read += t[0].numel()
            if bar is not None:
                bar.update(t[0].numel())
            return t
        if info.dtype in _fp8.FP8_DTYPES:
            sname = _fp8.scale_name(key)
            used.add(sname)
            t = _fp8.read_dequantized(reader.slice(key), reader.slice(sname), info.shape, block, sel, dtype)
            report.dequantized += 1
        else:
            sl = reader.slice(key)
            if sel is None:
                t = sl[:]
            else:
                dim, a, b = sel
                t = sl[tuple([slice(None)] * dim + [slice(a, b)])]
        report.read += 1
        nbytes = t.numel() * DTYPES[info.dtype][1]
        report.bytes_read += nbytes
        if bar is not None:
            bar.update(nbytes)
        return t

    def copy(dst, t, key):
        if isinstance(t, tuple):  # kept FP8: (values, scales) into (weight, its scale buffer)
            (dst, sdst), (t, st) = dst, t
            copy(sdst, st, _fp8.scale_name(key))
            dst.copy_(t)
            if check_finite and bool(((dst.view(torch.uint8) & 0x7F) == 0x7F).any()):  # e4m3fn's NaN codes
                raise CheckpointError(f"tensor {key} in {infos[key].file} has NaN values: the weights are broken; "
                                      "pass check_finite=False to load them anyway")
            return
        dst.copy_(t)  # casts to the target's dtype on the way
        # A NaN/Inf anywhere makes the fp32 sum non-finite: one reduction over the copy in memory, no temporary
        # tensor, no second read of the file. Only then are the bad values counted.
        if check_finite and not math.isfinite(float(torch.sum(dst, dtype=torch.float32))):
            bad = int((~torch.isfinite(dst)).sum())
            if bad == 0:
                return  # finite values whose sum overflowed
            raise CheckpointError(f"tensor {key} in {infos[key].file} has {bad} non-finite values (NaN/Inf): the "
                                  "weights are broken; pass check_finite=False to load them anyway")

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
                    if target.dtype == torch.float8_e4m3fn:  # kept FP8, per-expert files: values and scales
                        sc = scales[f"{name}{_fp8.SCALE_SUFFIX}"]
                        nb_i = sc.shape[1] // 2  # gate_up's scale rows: gate's over up's
                        for e in range(e0, e1):
                            if which == "gate_up_proj":
                                g, u = f"{prefix}.{e}.gate_proj.weight", f"{prefix}.{e}.up_proj.weight"
                                copy((target[e - e0, :I], sc[e - e0, :nb_i]), read(g, keep_fp8=True), g)
                                copy((target[e - e0, I:], sc[e - e0, nb_i:]), read(u, keep_fp8=True), u)
                            else:
                                d = f"{prefix}.{e}.down_proj.weight"
                                copy((target[e - e0], sc[e - e0]), read(d, keep_fp8=True), d)
                    elif name in infos:  # fused layout (gate_up_proj may carry transformers' phantom rows)
                        copy(target, read(name, (0, e0, e1)), name)
                        if which == "gate_up_proj" and Z and infos[name].shape[0] == E + Z:
                            report.skip(PHANTOM)
                    else:  # per-expert layout: copy expert by expert straight into its slot
                        for e in range(e0, e1):
                            if which == "gate_up_proj":
                                g, u = f"{prefix}.{e}.gate_proj.weight", f"{prefix}.{e}.up_proj.weight"
                                copy(target[e - e0, :I], read(g), g)
                                copy(target[e - e0, I:], read(u), u)
                            else:
                                d = f"{prefix}.{e}.down_proj.weight"
                                copy(target[e - e0], read(d), d)
                elif name == "lm_head.weight" and tied:
                    continue  # tied to embed_tokens below
                elif target.dtype == torch.float8_e4m3fn:  # a kept-FP8 Linear weight and its scales
                    key = checkpoint_name(cfg, name)
                    sc = scales[f"{name}{_fp8.SCALE_SUFFIX}"]
                    t = read(key, sel, keep_fp8=True)
                    if tuple(t[0].shape) != tuple(target.shape) or tuple(t[1].shape) != tuple(sc.shape):
                        raise CheckpointError(f"{name}: read shape {list(t[0].shape)} but this process's tensor is "
                                              f"{list(target.shape)} (sharding rule mismatch)")
                    copy((target, sc), t, key)
                else:
                    key = checkpoint_name(cfg, name)
                    t = read(key, sel)
                    if tuple(t.shape) != tuple(target.shape):
                        raise CheckpointError(f"{name}: read shape {list(t.shape)} but this process's tensor is "
                                              f"{list(target.shape)} (sharding rule mismatch)")
                    if name.endswith("e_score_correction_bias") and cfg.is_longcat and router_dtype is None:
                        t = t.to(dtype)  # transformers keeps LongCat's bias in the model dtype: round like it does
                    copy(target, t, key)
                report.loaded += 1
            if tied:
                embed = model.model.embed_tokens.weight
                if "lm_head.weight" in infos:
                    head = read("lm_head.weight", _owned(shard_rule, "lm_head.weight", global_shapes["lm_head.weight"]))
                    if head.shape != embed.shape or not torch.equal(head.to(embed.dtype), embed):
                        raise CheckpointError(f"config.json says tie_word_embeddings=true, but lm_head.weight in "
                                              f"{infos['lm_head.weight'].file} differs from model.embed_tokens.weight;"
                                              " set tie_word_embeddings=false or drop lm_head.weight")
                    report.skip(TIED)
                model.lm_head.weight = embed  # one parameter, as tie_word_embeddings means
                report.loaded += 1
    finally:
        if bar is not None:
            bar.close()
        reader.close()

    for key in sorted(set(infos) - used):  # preflight accounted for every tensor: these are extras or not ours
        why = known_extra(cfg, key)
        if why is not None:
            report.skip(why)
        elif shard_rule is None:
            raise CheckpointError(f"unexpected tensor {key} in {infos[key].file}: it is not part of a "
                                  f"{cfg.model_type} model with this config (wrong config.json?)")
    return report


def build_empty(cfg: ModelConfig, dtype=torch.float32, device="cpu", parallel=None, router_dtype=torch.float32,
                fp8_block=None, fp8_names=None):
    """Construct on the meta device, optionally shard, then allocate once (uninitialised) on `device` in `dtype`.

    fp8_block: keep FP8 weights (model/quant.py) with this (bo, bi) block, for the modules fp8_names names
    (our weight names; None: every quantizable one).

    Buffers (the routers' correction bias) stay fp32. router_dtype (default fp32) is the dtype of LongCat's router
    weight, as vLLM and SGLang keep it (rounding it to bf16 flips expert choices); None: the model dtype, as
    transformers does. GLM's router weight follows `dtype` (it is bf16 on disk).
    """
    from ..model.model import CausalLM

    with torch.device("meta"):
        model = CausalLM(cfg)
    if parallel is not None:
        parallel.shard(model)
    if fp8_block is not None:
        _quant.convert_(model, fp8_block, fp8_names)
    for name, p in model.named_parameters():
        if p.dtype == torch.float8_e4m3fn:
            continue  # kept FP8
        keep = router_dtype is not None and cfg.is_longcat and name.endswith("mlp.router.weight")
        p.data = p.data.to(router_dtype if keep else dtype)  # still on the meta device: no memory
    model = model.to_empty(device=device)
    for b in model.buffers():
        b.zero_()
    return model


def fp8_weight_names(cfg: ModelConfig, infos: dict) -> set[str]:
    """Our names of the weights the checkpoint stores in FP8: `<module>.weight`, and an expert bank's
    `gate_up_proj` / `down_proj` when its experts' projections are FP8 (per-expert files)."""
    fp8 = {k for k, i in infos.items() if i.dtype in _fp8.FP8_DTYPES}
    names = set()
    for ours in _global_shapes(cfg):
        m = _FUSED.match(ours)
        if m:
            first = f"{m.group(1)}.0.{'gate_proj' if m.group(2) == 'gate_up_proj' else 'down_proj'}.weight"
            if first in fp8:
                names.add(ours)
        elif checkpoint_name(cfg, ours) in fp8:
            names.add(ours)
    return names


def read_config(path: str) -> ModelConfig:
    """config.json of a checkpoint directory; CheckpointError naming the file if it is missing or invalid."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not os.path.lexists(file):
        raise CheckpointError(f"{path}: no config.json (is this a checkpoint directory?)")
    try:
        _regular_file_inside(_confinement_root(path), file, file)
        return load_config(file)
    except ConfigError as e:
        raise CheckpointError(f"{file}: {e}") from None


# ------------------------------------------------------------------------------------------------- dtype, hub id
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
               "half": torch.float16, "float64": torch.float64, "double": torch.float64}


def read_generation_config(path: str, cfg: ModelConfig) -> dict:
    """generation_config.json (where transformers' generate reads its defaults) -> a dict, {} if the file is absent.

    Its bos / eos / pad token ids are checked (ints in [0, vocab_size); eos may be a list); generate() takes eos and
    pad from it by default. Other keys (temperature, top_p, ...) are kept for reference but not applied: generate's
    own defaults stay greedy unless asked (model/generate.py)."""
    file = os.path.join(path, "generation_config.json")
    if not os.path.exists(file):
        return {}
    try:
        d = read_json(file)
    except (ConfigError, OSError) as e:
        raise CheckpointError(f"{file}: {e}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(d).__name__}")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = d.get(key)
        ids = v if isinstance(v, list) and key == "eos_token_id" else [] if v is None else [v]
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < cfg.vocab_size for i in ids):
            raise CheckpointError(f"{file}: {key} must be null or an integer in [0, vocab_size={cfg.vocab_size})"
                                  f"{' or a list of them' if key == 'eos_token_id' else ''}, got {v!r}")
    return d


def resolve_dtype(dtype, device, infos=None, raw_cfg=None) -> torch.dtype:
    """from_pretrained's dtype argument -> a torch float dtype.

    None: follows the device (float32 on CPU, bfloat16 on CUDA). A torch dtype or its name ("bfloat16", "float32",
    "torch.float16", ...). "auto": the checkpoint's dtype -- config.json's `dtype` / `torch_dtype`, else the dtype of
    most of its float tensors (an FP8 checkpoint without either: bfloat16).
    """
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name == "auto":
            raw_cfg = raw_cfg or {}
            for k in ("dtype", "torch_dtype"):
                v = raw_cfg.get(k)
                if isinstance(v, str) and v.removeprefix("torch.") in DTYPE_NAMES:
                    return DTYPE_NAMES[v.removeprefix("torch.")]
            counts: dict = {}
            for info in (infos or {}).values():
                if info.dtype in FLOAT_DTYPES:
                    counts[info.dtype] = counts.get(info.dtype, 0) + math.prod(info.shape)
            return DTYPES[max(counts, key=counts.get)][0] if counts else torch.bfloat16
        if name not in DTYPE_NAMES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPE_NAMES)} or 'auto'")
        return DTYPE_NAMES[name]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
        raise ValueError(f"dtype must be a torch float dtype (float32, bfloat16, float16, float64), its name, or "
                         f"'auto'; got {dtype!r}")
    return dtype


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def resolve_path(path, revision=None, cache_dir=None, local_files_only=None) -> str:
    """A checkpoint directory, or a Hugging Face hub id ("org/name") -> a local directory.

    A hub id is looked up through huggingface_hub (when installed) in the local HF cache
    (cache_dir, default $HF_HUB_CACHE); with local_files_only (default: when HF_HUB_OFFLINE is set) nothing is
    downloaded.
    """
    path = os.fspath(path)
    if os.path.isdir(path) or not _HUB_ID.match(path) or os.path.exists(path):
        return path
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(f"{path}: no such checkpoint directory (a hub id needs huggingface_hub installed)") \
            from None
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    try:
        return huggingface_hub.snapshot_download(path, revision=revision, cache_dir=cache_dir,
                                                 local_files_only=local_files_only)
    except Exception as e:  # noqa: BLE001 -- huggingface_hub's errors, one line with the hub id
        where = "in the local Hugging Face cache" if local_files_only else "on the Hugging Face hub"
        raise CheckpointError(f"{path}: not a directory and not found {where} ({type(e).__name__}); download it "
                              "first (hf download) or pass a checkpoint directory") from None


def from_pretrained(path, dtype=None, device="cpu", parallel=None, progress=None, verbose=False, check_finite=True,
                    router_dtype=torch.float32, revision=None, cache_dir=None, local_files_only=None, mtp=None,
                    fp8="dequantize"):
    """Load a LongCat-Flash or GLM-4.7-Flash checkpoint -> CausalLM in eval mode.

    path: a checkpoint directory, or a Hugging Face hub id resolved from the local HF cache (`resolve_path`;
    revision / cache_dir / local_files_only as in huggingface_hub).
    dtype: the model dtype. Default None follows the device: float32 on CPU, bfloat16 on CUDA. Also a torch dtype,
    its name ("bfloat16", "float32", ...), or "auto" (the checkpoint's own dtype). Weights are cast while reading;
    FP8 block-scaled weights are dequantized (in fp32) into it, unless fp8="keep".
    fp8: what to do with an FP8 block-scaled checkpoint's weights. "dequantize" (default): into `dtype` on load,
    the readable path. "keep": hold them in FP8 with their scales (model/quant.py: half the memory; on CUDA the
    products run in Triton kernels that read FP8 in place); kv_b_proj and the MTP head are still dequantized.
    router_dtype: LongCat's router weight and correction bias stay fp32 whatever `dtype` is (as vLLM and SGLang
    keep them; GLM's correction bias is always fp32). None rounds them through `dtype`, as transformers does.
    parallel: a parallel context (parallel.py) whose `check(cfg)` validates the plan, `shard(model)` shrinks the meta
    model and `shard_rule` tells which slice of each tensor this process owns; None loads everything.
    check_finite: refuse NaN/Inf weights (checked while copying; no second pass over the files).
    progress: a tqdm bar (default: loads > 1 GiB on a terminal).
    mtp: the multi-token-prediction head (model/mtp.py) as `model.mtp`. None (default): kept if the checkpoint has
    a complete one (an incomplete block is skipped, `load_report.mtp_note` says why); True: required
    (CheckpointError if absent or incomplete); False: skipped and reported. It is replicated on every rank.
    Everything is checked before memory is allocated (see the module docstring). The model's `load_report` says what
    was loaded, dequantized and skipped; `model.generation_config` is generation_config.json as a dict ({} if none).
    """
    path = resolve_path(path, revision, cache_dir, local_files_only)
    cfg = read_config(path)
    raw_cfg = _raw_config(path)
    gen_cfg = read_generation_config(path, cfg)
    if parallel is not None:
        parallel.check(cfg)  # fail before allocating anything
    infos = index_checkpoint(path)  # every header, the index, the paths
    preflight(cfg, infos, raw_cfg, path)  # every tensor's presence, shape and dtype, every extra
    dtype = resolve_dtype(dtype, device, infos, raw_cfg)
    if router_dtype is not None:
        router_dtype = resolve_dtype(router_dtype, device)
    if fp8 not in ("dequantize", "keep"):
        raise ValueError(f"fp8 must be 'dequantize' or 'keep', got {fp8!r}")
    block = fp8_names = None
    if fp8 == "keep":
        block = _quant_block(raw_cfg, path)
        if block is None:
            raise CheckpointError(f"{path}: fp8='keep' needs an FP8 checkpoint (config.json has no "
                                  "quantization_config); load it without fp8=")
        fp8_names = fp8_weight_names(cfg, infos)
    model = build_empty(cfg, dtype, device, parallel, router_dtype=router_dtype, fp8_block=block,
                        fp8_names=fp8_names)
    report = load_weights(model, cfg, path, dtype, shard_rule=None if parallel is None else parallel.shard_rule,
                          progress=progress, check_finite=check_finite, router_dtype=router_dtype, infos=infos)
    if mtp not in (None, True, False):
        raise ValueError(f"mtp must be None (keep if present), True or False, got {mtp!r}")
    has_mtp = any(is_mtp(cfg, k) for k in infos)
    if mtp and not has_mtp:
        raise CheckpointError(f"{path}: mtp=True but the checkpoint has no multi-token-prediction tensors "
                              f"({mtp_prefix(cfg)}*)")
    if has_mtp and mtp is not False:
        try:
            model.mtp = load_mtp(cfg, path, infos, raw_cfg, dtype, device, check_finite)
            report.mtp_kept = report.skipped.pop(MTP, 0)
        except MTPIncomplete as e:  # a partial block: kept only on request (then the error is raised)
            if mtp:
                raise
            report.mtp_note = f"MTP block not kept: {e}"
    model.load_report = report
    model.generation_config = gen_cfg  # generate() takes its eos / pad ids by default
    if verbose:
        print(f"[longcat_ref] {path}: {report.summary()}", file=sys.stderr)
    return model.eval()


def mtp_tensors(path, dtype=None) -> dict[str, torch.Tensor]:
    """The multi-token-prediction block the loader skips, by checkpoint name (for later use, e.g. speculative
    decoding): `model.mtp.*` (LongCat) or `model.layers.{num_layers}.*` (GLM). Empty if the checkpoint has none.
    FP8 tensors come as stored (with their `.weight_scale_inv`)."""
    path = os.fspath(path)
    cfg = read_config(path)
    infos = index_checkpoint(path)
    reader = _Reader(infos)
    out = {}
    for k in sorted(infos):
        if is_mtp(cfg, k):
            t = reader.slice(k)[:]
            out[k] = t if dtype is None or not t.is_floating_point() or infos[k].dtype in _fp8.FP8_DTYPES \
                else t.to(dtype)
    reader.close()
    return out


def mtp_prefix(cfg: ModelConfig) -> str:
    """Where the MTP head lives in a checkpoint: `model.mtp.` (LongCat) or `model.layers.{num_layers}.` (GLM)."""
    return "model.mtp." if cfg.is_longcat else f"model.layers.{cfg.num_layers}."


def mtp_checkpoint_name(cfg: ModelConfig, ours: str) -> str:
    """A parameter name of `MTPHead` (model/mtp.py; `model.mtp.<ours>` in the model) -> the checkpoint's name.
    GLM's router is `mlp.gate` there, as in the main layers; fused expert names are split by the caller."""
    return checkpoint_name(cfg, mtp_prefix(cfg) + ours)


class MTPIncomplete(CheckpointError):
    """The checkpoint has MTP tensors, but not every tensor the head needs (from_pretrained(mtp=None) skips it)."""


def load_mtp(cfg: ModelConfig, path: str, infos: dict, raw_cfg: dict, dtype, device="cpu", check_finite=True):
    """Build the MTP head and fill it from the checkpoint's real names (per-expert or fused experts, FP8
    dequantized); every tensor of the head must be present with its exact shape. The correction bias stays fp32."""
    from ..model.mtp import MTPHead

    with torch.device("meta"):
        head = MTPHead(cfg)
    targets = dict(head.named_parameters())
    targets.update({n: b for n, b in head.named_buffers() if n.endswith("e_score_correction_bias")})
    E, I = cfg.n_routed_experts, cfg.expert_ffn_hidden_size

    def sources(name, shape):  # -> [(checkpoint key, rows of the target it fills or None, expected shape)]
        key = mtp_checkpoint_name(cfg, name)
        m = _FUSED.match(key)
        if key in infos or not m:
            return [(key, None, tuple(shape))]
        prefix, which = m.groups()
        if which == "gate_up_proj":
            return [(f"{prefix}.{e}.{w}.weight", (e, slice(j * I, (j + 1) * I)), (I, shape[2]))
                    for e in range(E) for j, w in enumerate(("gate_proj", "up_proj"))]
        return [(f"{prefix}.{e}.down_proj.weight", (e, slice(None)), tuple(shape[1:])) for e in range(E)]

    plan = {n: sources(n, t.shape) for n, t in targets.items()}
    for name, srcs in plan.items():  # every check before any allocation
        for key, _, shape in srcs:
            if key not in infos:
                raise MTPIncomplete(f"{path}: MTP tensor {key} is missing (the head needs it for {name}); "
                                      "pass mtp=False to skip the MTP block")
            got = tuple(infos[key].shape)
            if got != shape:
                raise CheckpointError(f"MTP tensor {key} in {infos[key].file} has shape {list(got)}, "
                                      f"expected {list(shape)}")
    head = head.to_empty(device=device)
    for n, p in head.named_parameters():
        p.data = p.data.to(dtype)
    block = _quant_block(raw_cfg, path)
    reader = _Reader(infos)
    try:
        with torch.no_grad():
            for name, srcs in plan.items():
                target = head.get_buffer(name) if name.endswith("correction_bias") else head.get_parameter(name)
                for key, where, shape in srcs:
                    info = infos[key]
                    if info.dtype in _fp8.FP8_DTYPES:
                        t = _fp8.read_dequantized(reader.slice(key), reader.slice(_fp8.scale_name(key)), info.shape,
                                                  block, None, dtype)
                    else:
                        t = reader.slice(key)[:]
                    dst = target if where is None else target[where[0], where[1]]
                    dst.copy_(t)
                    if check_finite and not bool(torch.isfinite(dst).all()):
                        raise CheckpointError(f"MTP tensor {key} in {info.file} has non-finite values (NaN/Inf)")
    finally:
        reader.close()
    for n, b in head.named_buffers():
        if n.endswith("e_score_correction_bias"):
            b.data = b.data.float()
    return head.eval()


# ------------------------------------------------------------------------------------------------- writer
def checkpoint_tensors(model, layout: str = "per_expert") -> dict[str, torch.Tensor]:
    """Our state dict in checkpoint names. layout: 'per_expert' (original / save_pretrained) or 'fused'.

    With tie_word_embeddings, lm_head.weight is not written (it must equal embed_tokens, as the loader ties them).
    """
    if layout not in ("per_expert", "fused"):
        raise ValueError(f"layout must be 'per_expert' or 'fused', got {layout!r}")
    cfg = model.config
    out = {}
    sd = model.state_dict()
    if cfg.tie_word_embeddings:
        head = sd.pop("lm_head.weight")
        if not torch.equal(head, sd["model.embed_tokens.weight"]):
            raise ValueError("tie_word_embeddings=true but lm_head.weight differs from model.embed_tokens.weight: "
                             "tie them (or set tie_word_embeddings=false) before saving")
    for name in [n for n in sd if n.startswith("mtp.")]:  # the MTP head (model/mtp.py) under its real names
        sd[mtp_prefix(cfg) + name.removeprefix("mtp.")] = sd.pop(name)
    for name, t in sd.items():
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
    """config.json as the published LongCat-Flash-Chat has it: `model_type: longcat_flash`, `num_layers` counting
    logical layers, legacy `rope_theta`, the remote-code switches (mla_scale_*, zero_expert_type, attention_method,
    ...), no `rope_parameters` / `head_dim` / `num_key_value_heads` (the key set of the MLX copy of the original;
    see shared/reference/real-checkpoints.md). `router_bias` and `norm_topk_prob` come from the remote-code class.
    """
    if not cfg.is_longcat:
        raise ValueError("original_longcat_config is for LongCat-Flash configs")
    d = config_to_dict(cfg)
    d.pop("rope_parameters")
    d.pop("num_key_value_heads")
    d.pop("head_dim")
    d.update(architectures=["LongcatFlashForCausalLM"], attention_method="MLA", rope_theta=cfg.rope_theta,
             mla_scale_q_lora=cfg.mla_scale_q_lora, mla_scale_kv_lora=cfg.mla_scale_kv_lora,
             zero_expert_type="identity", router_bias=False, norm_topk_prob=False, attention_dropout=0.0,
             use_cache=True, auto_map={"AutoConfig": "configuration_longcat_flash.LongcatFlashConfig"},
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


def random_glm_mtp_layer(cfg: ModelConfig, layout: str = "per_expert", seed: int = 0, dtype=torch.float32) -> dict:
    """A random GLM MTP layer `model.layers.{num_layers}.*` with the real names (MoE block, own embed_tokens and
    shared_head), written as `checkpoint_tensors` writes a model's own head."""
    from ..model.model import CausalLM
    from ..model.mtp import MTPHead, init_mtp

    with torch.device("meta"):
        shell = CausalLM(cfg)
    shell.mtp = init_mtp(MTPHead(cfg), seed=seed)
    return {k: t.to(dtype) if t.is_floating_point() and "correction_bias" not in k else t
            for k, t in checkpoint_tensors(_OnlyMTP(shell), layout).items()}


class _OnlyMTP:
    """A model view whose state dict is only its MTP head (for `random_glm_mtp_layer`)."""

    def __init__(self, model):
        import dataclasses

        self.config = dataclasses.replace(model.config, tie_word_embeddings=False)
        self._mtp = model.mtp

    def state_dict(self):
        return {f"mtp.{k}": v for k, v in self._mtp.state_dict().items()}


def _quantize_fp8(tensors: dict, block) -> dict:
    """Every quantizable weight X.weight -> F8_E4M3 X.weight + F32 X.weight_scale_inv (fp8.py)."""
    out = {}
    for k, t in tensors.items():
        if _fp8.quantizable(k, t):
            out[k], out[_fp8.scale_name(k)] = _fp8.quantize_blockwise(t, block)
        else:
            out[k] = t
    return out


def _write_file(path: str, write) -> str:
    """write(tmp_path) into a temporary file next to `path`, flushed to disk -> the temporary path."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{TMP_MARK}{os.getpid()}")
    write(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def _write_json(obj):
    def write(p):
        with open(p, "w") as f:
            json.dump(obj, f, indent=2)
    return write


def save_checkpoint(model, path, layout: str = "per_expert", max_shard_bytes: int | None = None,
                    original_config: bool = False, mtp: bool = False, dtype=None,
                    config_overrides: dict | None = None, drop_model_type: bool = False, extra=None,
                    quantize: str | None = None, fp8_block=(128, 128)):
    """Write config.json + safetensors (sharded with model.safetensors.index.json when max_shard_bytes is set).

    layout: 'per_expert' (the original files) or 'fused' (transformers' in-memory names).
    original_config: write the published LongCat-Flash-Chat config.json key set (see `original_longcat_config`).
    mtp: add a random MTP block with the real names (LongCat `model.mtp.*`, GLM `model.layers.{num_layers}.*`)
    when the model has no head of its own; a model with `model.mtp` always writes that head.
    dtype: the on-disk dtype (default: the model's). extra: more tensors to write as they are.
    drop_model_type: remove `model_type` from config.json (copies of the LongCat config that lost it still load).
    quantize="fp8": write an FP8 block-scaled checkpoint as LongCat-Flash-Chat-FP8 is laid out (fp8.py): every
    attention / FFN / expert Linear weight in F8_E4M3 with an F32 `.weight_scale_inv` per fp8_block (out x in)
    block, embeddings, lm_head, norms and router unquantized, and a `quantization_config` in config.json.

    The directory ends up holding exactly one checkpoint: the files of an earlier save (index, shards,
    model.safetensors) are replaced or removed. The write is atomic for readers (module docstring): the old commit
    file (index / model.safetensors) goes first, the new one comes last.
    """
    path = os.fspath(path)
    if quantize not in (None, "fp8"):
        raise ValueError(f"quantize must be None or 'fp8', got {quantize!r}")
    if quantize and layout != "per_expert":
        raise ValueError("FP8 checkpoints use the per-expert layout (2-D weights, one scale grid each)")
    os.makedirs(path, exist_ok=True)
    cfg = model.config
    cfgd = original_longcat_config(cfg) if original_config else config_to_dict(cfg)
    cfgd.update(config_overrides or {})
    if drop_model_type:
        cfgd.pop("model_type", None)
    tensors = checkpoint_tensors(model, layout)
    if mtp and getattr(model, "mtp", None) is None:
        dt = next(iter(tensors.values())).dtype
        if cfg.is_longcat:
            tensors.update(random_mtp_block(cfg, dtype=dt))
        else:
            tensors.update(random_glm_mtp_layer(cfg, layout, dtype=dt))
    if dtype is not None:
        tensors = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in tensors.items()}
    if quantize:
        tensors = _quantize_fp8(tensors, fp8_block)
        cfgd["quantization_config"] = _fp8.quantization_config(fp8_block)
    tensors.update(extra or {})

    # 1. leftovers of a save that was killed: temporary files only (never a file this save did not name)
    for f in os.listdir(path):
        if f.startswith(".") and TMP_MARK in f:
            os.unlink(os.path.join(path, f))
    # 2. every new file under a temporary name
    if not max_shard_bytes:
        shards = [(SINGLE, tensors)]
    else:
        groups, cur, size = [], {}, 0
        for k, t in tensors.items():
            nb = t.numel() * t.element_size()
            if cur and size + nb > max_shard_bytes:
                groups.append(cur)
                cur, size = {}, 0
            cur[k] = t
            size += nb
        groups.append(cur)
        shards = [(f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors", g) for i, g in enumerate(groups)]
    pending = []  # (temporary, final) in rename order; the commit file last
    for fname, group in shards:
        tmp = _write_file(os.path.join(path, fname),
                          lambda p, g=group: save_file(g, p, metadata={"format": "pt"}))
        pending.append((tmp, fname))
    pending.append((_write_file(os.path.join(path, "config.json"), _write_json(cfgd)), "config.json"))
    if max_shard_bytes:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": {k: f for f, g in shards for k in g}}
        pending.append((_write_file(os.path.join(path, INDEX), _write_json(index)), INDEX))
    else:
        pending.append(pending.pop(0))  # model.safetensors is the commit file: renamed last
    # 3. uncommit the old checkpoint: from here until the last rename the directory refuses to load
    for f in (INDEX, SINGLE):
        if os.path.lexists(os.path.join(path, f)):
            os.unlink(os.path.join(path, f))
    # 4. rename into place, the commit file last
    for tmp, fname in pending:
        os.replace(tmp, os.path.join(path, fname))
    # 5. stale shards of an earlier save (they would make the new index refuse to load)
    keep = {fname for _, fname in pending}
    for f in os.listdir(path):
        if f.endswith(".safetensors") and f not in keep and re.match(r"^model-\d+-of-\d+\.safetensors$", f):
            os.unlink(os.path.join(path, f))
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # directories cannot be fsynced on every platform
    return path
