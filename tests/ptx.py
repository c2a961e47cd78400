"""The PTX of one of our kernels compiled ahead of time for sm_90 (Hopper), without a GPU: Triton's own compiler
and the ptxas it ships. Run as a script in a process of its own, because the test session runs Triton's CPU
interpreter (TRITON_INTERPRET=1), whose kernels cannot be compiled:

    python tests/ptx.py mla_split PF_TILES [BLOCK_S]     the split kernel of kernels/mla_decode.py at GLM's bf16
                                                         sizes, with PDL -> its PTX on stdout
"""

import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("tests/ptx.py compiles kernels: run it without TRITON_INTERPRET=1")

from triton import compile as triton_compile  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


def mla_split(pf_tiles: int, block_s: int = 32) -> str:
    from longcat_ref.kernels import mla_decode as K

    fp32 = {"M_PART", "L_PART", "ACC_PART"}
    ptrs = {"Q_LAT", "Q_ROPE", "LATENT", "K_ROPE", "BIAS", "OUT"} | fp32
    consts = dict(RANK=512, ROPE=64, BLOCK_RANK=512, BLOCK_ROPE=64, BLOCK_R=16, BLOCK_S=block_s, DIRECT=False,
                  UPCAST=False, PDL=True, **K.prefetch_plan(512, 64, 2, True))
    consts["PF_TILES"] = pf_tiles
    sig = {n: "constexpr" if n in consts else ("*fp32" if n in fp32 else "*bf16") if n in ptrs else
           "fp32" if n == "scale" else "i32" for n in K._mla_split_kernel.arg_names}
    src = ASTSource(fn=K._mla_split_kernel, signature=sig, constexprs=consts)
    out = triton_compile(src, target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=K.NUM_WARPS, num_stages=K.NUM_STAGES))
    return out.asm["ptx"]


if __name__ == "__main__":
    kernels = {"mla_split": mla_split}
    if len(sys.argv) < 2 or sys.argv[1] not in kernels:
        sys.exit(f"usage: python tests/ptx.py {{{','.join(kernels)}}} ARGS...")
    print(kernels[sys.argv[1]](*(int(a) for a in sys.argv[2:])))
