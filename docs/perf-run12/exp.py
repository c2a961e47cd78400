"""perf-run12 experiments: the compiled decode step (`bench --only b1 --b1-variants compiled_decode`) with
programmatic dependent launch (PDL) switched on or off, for this process only. Not part of the package.

  --no-pdl        our Triton kernels launched plainly (kernels/support.USE_PDL = False): the step before PDL
  --inductor-pdl  inductor's generated Triton kernels with PDL too (torch._inductor.config.triton.enable_pdl)

usage: PYTHONPATH=. python docs/perf-run12/exp.py [--no-pdl] [--inductor-pdl] [--batch B] OUT.json
"""
import argparse
import sys

import torch

from longcat_ref.kernels import support
from longcat_ref.tools import bench

ap = argparse.ArgumentParser()
ap.add_argument("--no-pdl", action="store_true")
ap.add_argument("--inductor-pdl", action="store_true")
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("out")
a = ap.parse_args()
support.USE_PDL = not a.no_pdl
if a.inductor_pdl:
    torch._inductor.config.triton.enable_pdl = True
print(f"perf-run12: our kernels PDL={support.USE_PDL}, inductor PDL={torch._inductor.config.triton.enable_pdl}",
      flush=True)
argv = ["--only", "b1", "--b1-variants", "compiled_decode", "--b1-batch", str(a.batch), "--json", a.out]
sys.exit(bench.main(argv))
