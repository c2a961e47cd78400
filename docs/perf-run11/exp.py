"""perf-run11 experiments: the compiled decode step (`bench --only b1 --b1-variants compiled_decode`) with one piece
swapped for this process only. Not part of the package; each swap is what a change to the package would do.

  --fold opaque                  W_uk's product as torch.einsum inside a custom op (inductor cannot restride or
                                 copy its inputs: is the copy before cuBLAS's bmm inductor's?)
  --fold / --unfold plain|gemv   MLA's per-head products (W_uk folded into the query, W_uv into the output) in one
                                 form, whatever `linear` says (tools/tune_gemv.py in isolation: W_uk through cuBLAS
                                 3.84 us, inductor 5.90 us)
  --mla-min-tiles N              kernels/mla_decode.split_plan: no context chunk shorter than N tiles of 32 slots
                                 (fewer chunks at short contexts; 1 chunk = no combine kernel)
  --combine-block-c C            kernels/mla_decode's merge kernel: C channels per program (the package: 64)

usage: python docs/perf-run11/exp.py [--fold F] [--unfold U] [--mla-min-tiles N] [--combine-block-c C]
                                    [--batch B] [--layer-only] OUT.json
"""
import argparse
import math
import sys

from longcat_ref.kernels import mla_decode as K
from longcat_ref.model import mla as M
from longcat_ref.tools import bench

ap = argparse.ArgumentParser()
ap.add_argument("--fold", default=None)
ap.add_argument("--unfold", default=None)
ap.add_argument("--mla-min-tiles", type=int, default=None)
ap.add_argument("--combine-block-c", type=int, default=None)
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--layer-only", action="store_true")
ap.add_argument("out")
a = ap.parse_args()
f, u, plan = M.MLA.fold_query, M.MLA.unfold_output, K.split_plan
if a.fold == "opaque":
    import torch

    @torch.library.custom_op("perf11::fold", mutates_args=())
    def fold_op(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bhtd,hdr->bhtr", q, w).contiguous()

    @fold_op.register_fake
    def _(q, w):
        return q.new_empty(q.shape[:-1] + (w.shape[-1],))

    M.MLA.fold_query = staticmethod(lambda q, w, linear="plain": fold_op(q, w))
elif a.fold:
    M.MLA.fold_query = staticmethod(lambda q, w, linear="plain": f(q, w, a.fold))
if a.unfold:
    M.MLA.unfold_output = staticmethod(lambda o, w, linear="plain": u(o, w, a.unfold))
if a.mla_min_tiles:
    def split_plan(b, rows, S, block_s, n_sm=132, splits=None):
        n, per = plan(b, rows, S, block_s, n_sm, splits)
        tiles = math.ceil(S / block_s)
        per = max(per, min(a.mla_min_tiles, tiles))
        return math.ceil(tiles / per), per
    K.split_plan = split_plan
if a.combine_block_c:
    K.COMBINE_BLOCK_C = a.combine_block_c
argv = ["--only", "b1", "--b1-variants", "compiled_decode", "--b1-batch", str(a.batch), "--json", a.out]
sys.exit(bench.main(argv + (["--b1-layer-only"] if a.layer_only else [])))
