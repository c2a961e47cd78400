"""The PTX of one of our kernels compiled ahead of time for sm_90 (Hopper), without a GPU: Triton's own compiler
and the ptxas it ships. Run as a script in a process of its own (the tests call `kernel_ptx`), because the test
session runs Triton's CPU interpreter (TRITON_INTERPRET=1), whose kernels cannot be compiled:

    python tests/ptx.py mla_split PF_TILES [BLOCK_S]     the split kernel of kernels/mla_decode.py at GLM's bf16
                                                         sizes, with PDL -> its PTX on stdout
    python tests/ptx.py moe_gate_up PF [EARLY] | moe_down PF    kernels/moe_decode.py's two kernels at GLM's
                                                         sizes (4 routed slots + the shared one, bf16), with PDL
                                                         (EARLY: kernel 1's PRELOAD_SHARED, the one-token tile)
    python tests/ptx.py route_logits                     kernels/router.py's logits-and-selection kernel at
                                                         GLM's sizes (64 experts, H = 2048, bf16, one token)
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest


def kernel_ptx(*args) -> str:
    """For the tests (which run the interpreter): this script in a process of its own -> the PTX; skips the test
    where Triton cannot compile for sm_90 (no ptxas)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [env.get("PYTHONPATH")] if p])
    run = subprocess.run([sys.executable, str(Path(__file__).resolve()), *map(str, args)], capture_output=True,
                         text=True, env=env, timeout=300)
    if run.returncode and "ptxas" in run.stderr.lower():  # a Triton install without its CUDA tool chain
        pytest.skip("Triton cannot compile for sm_90 here: " + run.stderr.strip().splitlines()[-1])
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def before_wait(ptx: str) -> list[str]:
    """The PTX lines before the (one) dependent-launch wait."""
    lines = ptx.splitlines()
    waits = [i for i, line in enumerate(lines) if "griddepcontrol.wait" in line]
    assert len(waits) == 1, f"{len(waits)} griddepcontrol.wait"
    return lines[: waits[0]]


def triton_compile(src, target, options):
    from triton import compile as compile_

    return compile_(src, target=target, options=options)


def _compile_imports():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    return GPUTarget, ASTSource


def mla_split(pf_tiles: int, block_s: int = 32) -> str:
    from longcat_ref.kernels import mla_decode as K

    ptrs = {n: "*bf16" for n in ("Q_LAT", "Q_ROPE", "LATENT", "K_ROPE", "BIAS", "OUT")}
    ptrs.update({n: "*fp32" for n in ("M_PART", "L_PART", "ACC_PART")})
    consts = dict(RANK=512, ROPE=64, BLOCK_RANK=512, BLOCK_ROPE=64, BLOCK_R=16, BLOCK_S=block_s, DIRECT=False,
                  UPCAST=False, PDL=True, **K.prefetch_plan(512, 64, 2, True))
    consts["PF_TILES"] = pf_tiles
    return _compile(K._mla_split_kernel, ptrs, consts, floats=("scale",), num_warps=K.NUM_WARPS,
                    num_stages=K.NUM_STAGES)


def _compile(fn, ptrs: dict, consts: dict, floats=(), num_warps=4, num_stages=2) -> str:
    """PTX of jit function fn for sm_90: ptrs {name: "*bf16"...}, consts {name: value}, other arguments i32 (or
    fp32 for the names in floats)."""
    GPUTarget, ASTSource = _compile_imports()
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n in floats else "i32") for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton_compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages)).asm["ptx"]


def moe(which: str, pf: int, early: int = 0) -> str:
    from longcat_ref.kernels import moe_decode as K

    line = 64  # bf16: 64 values a 128-byte line
    common = dict(K=4, KS=5, SHARED=True, BO=1, BI=1, FP8=False, PDL=True, PF=bool(pf), LINE=line)
    if which == "gate_up":  # GLM-4.7-Flash: H = 2048, I = 1536
        ptrs = {n: "*bf16" for n in ("x_ptr", "gu_ptr", "act_ptr", "sg_ptr", "su_ptr")}
        ptrs.update(idx_ptr="*i64", gus_ptr="*fp32")
        tile = dict(BLOCK_I=1, BLOCK_H=2048) if early else dict(BLOCK_I=4, BLOCK_H=1024)  # EARLY: the 1-token tile
        return _compile(K._gate_up_act_kernel, ptrs, dict(common, **tile, PF_LINES=2048 // line, EARLY=bool(early)),
                        num_warps=1 if early else 4)
    ptrs = {n: "*bf16" for n in ("act_ptr", "d_ptr", "sd_ptr")}
    ptrs.update(w_ptr="*fp32", idx_ptr="*i64", ds_ptr="*fp32", part_ptr="*fp32")
    return _compile(K._down_kernel, ptrs, dict(common, BLOCK_O=2, BLOCK_K=512, PF_LINES=2048 // line))


def route_logits() -> str:
    from longcat_ref.kernels import router as K

    block_r, block_h = K.logits_tiles(64, 2048)
    ptrs = dict(X="*bf16", W="*bf16", L="*fp32", T="*i32", bias_ptr="*fp32", w_ptr="*fp32", idx_ptr="*i64")
    consts = dict(SOFTMAX=False, NORM=True, K=4, KP=4, BLOCK_E=64, BLOCK_M=1, BLOCK_R=block_r, BLOCK_H=block_h,
                  PDL=True)
    return _compile(K._route_logits_kernel, ptrs, consts, floats=("scaling",))


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("tests/ptx.py compiles kernels: run it without TRITON_INTERPRET=1")
    kernels = {"mla_split": mla_split, "moe_gate_up": lambda pf, early=0: moe("gate_up", pf, early),
               "moe_down": lambda pf: moe("down", pf), "route_logits": route_logits}
    if len(sys.argv) < 2 or sys.argv[1] not in kernels:
        sys.exit(f"usage: python tests/ptx.py {{{','.join(kernels)}}} ARGS...")
    print(kernels[sys.argv[1]](*(int(a) for a in sys.argv[2:])))
