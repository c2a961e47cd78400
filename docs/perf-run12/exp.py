"""perf-run12 experiments: the compiled decode step (`bench --only b1 --b1-variants compiled_decode`) with
programmatic dependent launch (PDL) switched on or off, for this process only. Not part of the package.

  --no-pdl        our Triton kernels launched plainly (kernels/support.USE_PDL = False): the step before PDL
  --inductor-pdl  inductor's generated Triton kernels with PDL too (torch._inductor.config.triton.enable_pdl)
  --moe-narrow    the fused MoE kernels' 16-bit tiles from `tune_moe --narrow`: kernel 1 one row of 2048 columns
                  per program, one warp; kernel 2 two rows of 512, one warp (the package: 8 rows, 4 warps)
  --fold-op       W_uk's product (folded into the query) as torch.einsum inside a custom op (perf-run11 call 7's
                  "opaque" fold: inductor no longer copies the strided W_uk slice before cuBLAS's bmm)

usage: PYTHONPATH=. python docs/perf-run12/exp.py [--no-pdl] [--inductor-pdl] [--moe-narrow] [--fold-op] [--batch B] OUT.json
"""
import argparse
import sys

import torch

from longcat_ref.kernels import support
from longcat_ref.tools import bench

ap = argparse.ArgumentParser()
ap.add_argument("--no-pdl", action="store_true")
ap.add_argument("--inductor-pdl", action="store_true")
ap.add_argument("--fold-op", action="store_true")
ap.add_argument("--moe-narrow", action="store_true")
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("out")
a = ap.parse_args()
support.USE_PDL = not a.no_pdl
if a.inductor_pdl:
    torch._inductor.config.triton.enable_pdl = True
if a.fold_op:
    from longcat_ref.model import mla as M

    @torch.library.custom_op("perf12::fold", mutates_args=())
    def fold_op(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bhtd,hdr->bhtr", q, w).contiguous()

    @fold_op.register_fake
    def _(q, w):
        return q.new_empty(q.shape[:-1] + (w.shape[-1],))

    plain = M.MLA.fold_query
    M.MLA.fold_query = staticmethod(lambda q, w, linear="plain": fold_op(q, w) if linear == "plain"
                                    else plain(q, w, linear))
if a.moe_narrow:
    from longcat_ref.kernels import moe_decode as D

    launch = D._launch

    def narrow(x, w, idx, gate_up, down, *args, tiles=None, warps=None, **kw):
        if tiles is None and gate_up.dtype != torch.float8_e4m3fn and down.dtype != torch.float8_e4m3fn:
            tiles, warps = (1, min(2048, D._next_pow2(x.shape[1])), 2, 512), (1, 1)
        return launch(x, w, idx, gate_up, down, *args, tiles=tiles, warps=warps, **kw)

    D._launch = narrow
print(f"perf-run12: our kernels PDL={support.USE_PDL}, inductor PDL={torch._inductor.config.triton.enable_pdl}",
      flush=True)
argv = ["--only", "b1", "--b1-variants", "compiled_decode", "--b1-batch", str(a.batch), "--json", a.out]
sys.exit(bench.main(argv))
