"""FP8 block-scaled checkpoints (DeepSeek-V3 style, as in LongCat-Flash-Chat-FP8): read by dequantizing on load.

On disk, each quantized Linear weight W (out, in) is stored as

    X.weight            F8_E4M3  (out, in)
    X.weight_scale_inv  F32      (ceil(out / bo), ceil(in / bi))      one scale per bo x bi block (128 x 128)

and config.json carries `quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
"weight_block_size": [bo, bi]}`. The real weight is the FP8 value times its block's scale ("scale_inv" is the name
DeepSeek gave it: the inverse of the quantization scale, i.e. the dequantization multiplier):

    W[r, c] = float(W8[r, c]) * S[r // bo, c // bi]                     computed in fp32, then cast

The last block of a row or column may be partial (out or in not a multiple of 128): its scale covers what is there.
Embeddings, lm_head, norms and the router stay unquantized (bf16 / fp32) in these files.

A slice of a weight (tensor parallelism) is read in whole blocks: the blocks that cover [start, end) are read and
dequantized, then cropped, so a shard boundary that cuts a block still gets the right scale.

`quantize_blockwise` is the writer's side (tests write their own tiny FP8 checkpoints through `save_checkpoint`);
it and `dequantize` live with the in-memory FP8 form (model/quant.py, kernels/fp8_linear.py). `read_blocks` reads
a weight as stored, for `from_pretrained(..., fp8="keep")`.
"""

from __future__ import annotations

import math

import torch

from ..kernels.fp8_linear import dequantize  # noqa: F401 (the formula's one home; re-exported)
from ..model.quant import FP8_MAX, quantize_blockwise  # noqa: F401 (the per-block absmax rule; re-exported)

FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn}  # safetensors dtype name -> torch dtype (E5M2 is not used by these)
SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv


class FP8Error(ValueError):
    """A quantization_config this package cannot dequantize (the loader re-raises it as CheckpointError)."""


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


def parse_quantization_config(qc) -> tuple[int, int] | None:
    """config.json's quantization_config -> the (bo, bi) weight block, or None when there is none."""
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise FP8Error(f"quantization_config must be an object, got {qc!r}"[:200])
    if qc.get("quant_method") != "fp8":
        raise FP8Error(f"quantization_config.quant_method={qc.get('quant_method')!r} is not supported (only 'fp8')")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise FP8Error(f"quantization_config.fmt={qc.get('fmt')!r} is not supported (only 'e4m3')")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise FP8Error(f"quantization_config.activation_scheme={qc.get('activation_scheme')!r} is not supported "
                       "(only 'dynamic': activations are not quantized when dequantizing on load)")
    block = qc.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and 0 < b <= 2**16 for b in block)):
        raise FP8Error(f"quantization_config.weight_block_size must be two positive integers, got {block!r}"[:200])
    return int(block[0]), int(block[1])


def quantization_config(block=(128, 128)) -> dict:
    """The quantization_config the writer puts into config.json."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}


def scale_shape(shape, block) -> tuple[int, int]:
    """(out, in) weight -> (ceil(out / bo), ceil(in / bi)) scales."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def read_dequantized(w_slice, s_slice, shape, block, sel, dtype) -> torch.Tensor:
    """Dequantize a (maybe sliced) FP8 weight from safetensors slices.

    w_slice / s_slice: safetensors `get_slice` handles of X.weight and X.weight_scale_inv; shape: the weight's full
    (out, in); sel: None (all of it) or (dim, start, end). The blocks covering [start, end) along `dim` are read
    whole and dequantized, then cropped to [start, end).
    """
    if sel is None:
        return dequantize(w_slice[:], s_slice[:], block, dtype)
    dim, a, b = sel
    bs = block[dim]
    b0, b1 = a // bs, math.ceil(b / bs)  # blocks covering [a, b)
    lo, hi = b0 * bs, min(b1 * bs, shape[dim])  # element range of those blocks
    pick_w = [slice(None), slice(None)]
    pick_s = [slice(None), slice(None)]
    pick_w[dim], pick_s[dim] = slice(lo, hi), slice(b0, b1)
    w = dequantize(w_slice[tuple(pick_w)], s_slice[tuple(pick_s)], block, dtype)  # the covering blocks
    crop = [slice(None), slice(None)]
    crop[dim] = slice(a - lo, b - lo)
    return w[tuple(crop)].contiguous()


def quantizable(name: str, t: torch.Tensor) -> bool:
    """Which checkpoint tensors the writer quantizes: the 2-D Linear weights of attention, FFNs and experts.

    Not the embeddings, lm_head, norms or the router (`mlp.router.classifier` / `mlp.gate`), as in the real files.
    """
    return t.dim() == 2 and (name.endswith("_proj.weight") or name.endswith("kv_a_proj_with_mqa.weight"))


def read_blocks(w_slice, s_slice, shape, block, sel, name: str):
    """A (maybe sliced) FP8 weight kept as stored: -> (FP8 values, fp32 scales) of [start, end) along `dim`.

    Kept weights are sliced only at block boundaries (a shard that cut a block would need half of its scale
    grid's row); the end may be the weight's own end (a partial last block).
    """
    if sel is None:
        return w_slice[:], s_slice[:].float()
    dim, a, b = sel
    bs = block[dim]
    if a % bs or (b % bs and b != shape[dim]):
        raise FP8Error(f"{name}: this process's slice [{a}, {b}) of dim {dim} cuts a {bs}-wide FP8 block; keep FP8 "
                       "weights only with a world size whose shards are whole blocks, or load with fp8='dequantize'")
    pick_w = [slice(None), slice(None)]
    pick_s = [slice(None), slice(None)]
    pick_w[dim], pick_s[dim] = slice(a, b), slice(a // bs, math.ceil(b / bs))
    return w_slice[tuple(pick_w)], s_slice[tuple(pick_s)].float()
