"""perf-run11 experiment: GLM-4.7-Flash's compiled batch-1 step with MLA's per-head products (W_uk folded into the
query, W_uv into the output) forced to one form, the rest as `compiled_decode`. Not part of the package: it swaps
`MLA.fold_query` / `MLA.unfold_output` for this process only, to learn whether a cuBLAS bmm beats inductor's
reduction there (tools/tune_gemv.py in isolation: W_uk cuBLAS 3.84 us, inductor 5.90 us).

usage: python docs/perf-run11/fold_forms.py FOLD UNFOLD OUT.json    (FOLD, UNFOLD: plain | gemv | auto)
"""
import sys

from longcat_ref.model import mla as M
from longcat_ref.tools import bench

fold, unfold, out = sys.argv[1:4]
f, u = M.MLA.fold_query, M.MLA.unfold_output
if fold != "auto":
    M.MLA.fold_query = staticmethod(lambda q, w, linear="plain": f(q, w, fold))
if unfold != "auto":
    M.MLA.unfold_output = staticmethod(lambda o, w, linear="plain": u(o, w, unfold))
sys.exit(bench.main(["--only", "b1", "--b1-variants", "compiled_decode", "--json", out]))
