"""perf-run13 experiments: the compiled decode step (`bench --only b1 --b1-variants compiled_decode`) with one piece
switched, for this process only. Not part of the package.

  --no-fused-uv   W_uv's per-head product as its own kernel after MLA's merge (mla.FUSED_UV_MAX_ROWS = 0: the
                  step before "fused_uv"); the package now does it inside the merge kernel for up to 4 query rows
  --uv-block-v N   the W_uv merge kernel's output channels per program (kernels/mla_decode.UV_BLOCK_V)
  --no-combo      without inductor's horizontal fusion of independent kernels (combo_kernels, now in
                  generate.DECODE_INDUCTOR_OPTIONS; call 2's `--combo` switched it on before it was the package's)
  --layer-only    the LongCat layer only (`bench --b1-layer-only`)

usage: PYTHONPATH=. python docs/perf-run13/exp.py [--no-fused-uv] [--uv-block-v N] [--no-combo] [--layer-only]
                                                  [--batch B] OUT.json
"""
import argparse
import sys

from longcat_ref.kernels import mla_decode
from longcat_ref.model import mla
from longcat_ref.tools import bench

ap = argparse.ArgumentParser()
ap.add_argument("--no-fused-uv", action="store_true")
ap.add_argument("--uv-block-v", type=int)
ap.add_argument("--no-combo", action="store_true")
ap.add_argument("--layer-only", action="store_true")
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("out")
a = ap.parse_args()
if a.no_fused_uv:
    mla.FUSED_UV_MAX_ROWS = 0
if a.no_combo:
    from longcat_ref.model import generate

    generate.DECODE_INDUCTOR_OPTIONS = {}
if a.uv_block_v:
    mla_decode.UV_BLOCK_V = a.uv_block_v
print(f"perf-run13: FUSED_UV_MAX_ROWS={mla.FUSED_UV_MAX_ROWS}, UV_BLOCK_V={mla_decode.UV_BLOCK_V}", flush=True)
argv = ["--only", "b1", "--b1-variants", "compiled_decode", "--b1-batch", str(a.batch), "--json", a.out]
sys.exit(bench.main(argv + (["--b1-layer-only"] if a.layer_only else [])))
