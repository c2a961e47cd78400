"""perf-run12 experiments: the compiled decode step (`bench --only b1 --b1-variants compiled_decode`) with one piece
switched, for this process only. Not part of the package.

  --no-pdl        our Triton kernels launched plainly (kernels/support.USE_PDL = False): the step before PDL
  --inductor-pdl  inductor's generated Triton kernels with PDL too (torch._inductor.config.triton.enable_pdl)
  --moe-wide      the fused MoE kernels' tiles as before `tune_moe --narrow` (8 rows, 4 warps; the package now
                  runs one token in one-warp programs of 1 row x 2048 columns and 2 rows x 512)
  --moe-narrow-all  the narrow MoE programs for any number of tokens (call 6 ran it when the package's rule
                  was one GLM token only: it then switched LongCat-Flash's token to them)
  --layer-only    the LongCat layer only (`bench --b1-layer-only`)

(Call 2's `--fold-op`, W_uk's product as an einsum inside a custom op, is now the package's own `mla.fold_form`
"bmm", so the flag is gone: `git show ac9cb78:docs/perf-run12/exp.py` is the script that call ran.)

usage: PYTHONPATH=. python docs/perf-run12/exp.py [--no-pdl] [--inductor-pdl] [--moe-wide] [--moe-narrow-all]
                                                  [--layer-only] [--batch B] OUT.json
"""
import argparse
import sys

import torch

from longcat_ref.kernels import support
from longcat_ref.tools import bench

ap = argparse.ArgumentParser()
ap.add_argument("--no-pdl", action="store_true")
ap.add_argument("--inductor-pdl", action="store_true")
ap.add_argument("--moe-wide", action="store_true")
ap.add_argument("--moe-narrow-all", action="store_true")
ap.add_argument("--layer-only", action="store_true")
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("out")
a = ap.parse_args()
support.USE_PDL = not a.no_pdl
if a.inductor_pdl:
    torch._inductor.config.triton.enable_pdl = True
if a.moe_wide:
    from longcat_ref.kernels import moe_decode as D

    D.NARROW_TOKENS = 0  # the rule before: 8-row tiles, 4 warps
if a.moe_narrow_all:
    from longcat_ref.kernels import moe_decode as D

    D.NARROW_TOKENS = 1 << 20
print(f"perf-run12: our kernels PDL={support.USE_PDL}, inductor PDL={torch._inductor.config.triton.enable_pdl}",
      flush=True)
argv = ["--only", "b1", "--b1-variants", "compiled_decode", "--b1-batch", str(a.batch), "--json", a.out]
sys.exit(bench.main(argv + (["--b1-layer-only"] if a.layer_only else [])))
