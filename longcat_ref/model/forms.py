"""The forms of one forward: which of the equivalent ways to compute attention and the experts a call uses.

Every module with two or more forms takes the choice as an argument of its forward; `CausalLM.forward(...,
forms=...)` passes one `Forms` down to all of them. Nothing is switched on modules beforehand, so the code that
calls the model shows which form runs. tests/test_core.py and tests/test_fast.py prove the forms equal.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION_FORMS = ("naive", "absorbed", "sdpa", "fused", "fused_uv", "auto")  # mla.py ("fused", "fused_uv":
#   kernels/mla_decode.py)
EXPERT_FORMS = ("loop", "grouped", "grouped_triton", "gather", "gemv", "fused", "auto")  # experts.py ("fused":
#   kernels/moe_decode.py; "grouped_triton": the grouped form's GEMMs in kernels/grouped_gemm.py)
ROUTER_FORMS = ("plain", "fused", "fused_logits", "auto")  # router.py ("fused": kernels/router.py; "fused_logits":
#   its logits too, in the same kernel)
LINEAR_FORMS = ("plain", "gemv", "triton", "skinny", "prefetch", "auto")  # linear.py (the dense projections:
#   "gemv" inside torch.compile; "triton": kernels/gemv.py on CUDA; "skinny": kernels/skinny_gemm.py on CUDA;
#   "prefetch": "auto", with kernels/prefetch_gemv.py for the projections it fits on CUDA)
ROPE_FORMS = ("plain", "fused", "fused_uk", "auto")  # mla.py, between the projections and the attention
#   ("fused": kernels/rope_cache.py; with attention "sdpa" kernels/rope_qk.py; "fused_uk": rope_cache.py with W_uk's
#   product in the same launch)
SHORTCUT_FORMS = ("inline", "stream", "auto")  # model.py, LongCat-Flash's layer: where its shortcut MoE runs
NORM_FORMS = ("plain", "fused", "auto")  # norm.py, every RMSNorm of the layers and the final one ("fused":
#   kernels/rmsnorm.py)


@dataclass(frozen=True)
class Forms:
    """Which of the equivalent forms one forward uses. The default is the readable reference; tests prove the
    others equal to it (fp32, 1e-5)."""

    attention: str = "naive"  # "naive" | "absorbed" (attend over the latent) | "sdpa" (naive through SDPA)
    #                           | "fused" (absorbed, its attention in one Triton kernel: CUDA)
    #                           | "fused_uv" (fused, W_uv's product in the kernel's merge step)
    #                           | "auto" (fused_uv / fused for a few query tokens on CUDA, else absorbed)
    experts: str = "loop"  # "loop" | "grouped" | "grouped_triton" | "gather" | "gemv" | "fused" (Triton: CUDA)
    #                        | "auto" (the fast one for each call)
    router: str = "plain"  # "plain" (softmax/sigmoid, torch.topk, gather) | "fused" (the selection in one Triton
    #                        kernel) | "fused_logits" (fused, the logits in the same kernel, for up to 4 tokens;
    #                        opt-in, measured slower) | "auto" (fused for a few tokens and up to 256 experts on
    #                        CUDA, else plain)
    linear: str = "plain"  # "plain" (cuBLAS) | "gemv" (multiply-and-sum, for torch.compile to fuse) | "triton"
    #                        (the split-K GEMV kernel for up to 16 tokens: CUDA) | "skinny" (the split-K tensor-core
    #                        kernel for up to 64 tokens: CUDA) | "prefetch" ("auto", and the whole-row GEMV
    #                        kernel, its weight loaded before the PDL wait, where it fits: CUDA; opt-in,
    #                        unmeasured) | "auto" (gemv for a few tokens and weights up to
    #                        16M elements while compiling, else plain; the router's logits on CUDA in a 16-bit
    #                        model: a 16-bit product with fp32 output)
    rope: str = "plain"  # MLA's latent norm, RoPE of q and k and the cache write: "plain" (norm.py, rope.py,
    #                      cache.py) | "fused" (one Triton kernel: a static cache; with attention "sdpa" RoPE and
    #                      the query / key assembly in two, any cache) | "fused_uk" (fused, and W_uk's product for
    #                      the absorbed forms in the same kernel) | "auto" (fused on CUDA for "sdpa" and for a few
    #                      query tokens with a static cache, fused_uk for up to mla.FOLD_IN_ROPE_MAX_ROWS query
    #                      tokens of the batch where the attention is absorbed, else plain)
    shortcut: str = "inline"  # LongCat-Flash's MoE on the shortcut (model.py, overlap.py): "inline" (on the
    #                           current stream, in the order the layer is written) | "stream" (on a side CUDA
    #                           stream, concurrent with mlp0, attn1 and mlp1) | "auto" (stream on CUDA outside
    #                           torch.compile, else inline). GLM's layers have no shortcut: they ignore it
    norm: str = "plain"  # the RMSNorms (norm.py): "plain" (fp32 torch ops) | "fused" (one Triton kernel: CUDA) |
    #                      "auto" (fused on CUDA outside torch.compile, else plain)

    def __post_init__(self):
        if self.attention not in ATTENTION_FORMS:
            raise ValueError(f"attention form {self.attention!r} is not one of {ATTENTION_FORMS}")
        if self.experts not in EXPERT_FORMS:
            raise ValueError(f"experts form {self.experts!r} is not one of {EXPERT_FORMS}")
        if self.router not in ROUTER_FORMS:
            raise ValueError(f"router form {self.router!r} is not one of {ROUTER_FORMS}")
        if self.linear not in LINEAR_FORMS:
            raise ValueError(f"linear form {self.linear!r} is not one of {LINEAR_FORMS}")
        if self.rope not in ROPE_FORMS:
            raise ValueError(f"rope form {self.rope!r} is not one of {ROPE_FORMS}")
        if self.shortcut not in SHORTCUT_FORMS:
            raise ValueError(f"shortcut form {self.shortcut!r} is not one of {SHORTCUT_FORMS}")
        if self.norm not in NORM_FORMS:
            raise ValueError(f"norm form {self.norm!r} is not one of {NORM_FORMS}")


REFERENCE = Forms()  # what the notebooks teach, and what transformers computes
PREFILL = Forms(attention="sdpa", experts="auto", linear="auto", rope="auto", norm="auto")  # many tokens: flash
#   attention, grouped expert GEMMs; on CUDA the norms in one kernel each, RoPE and SDPA's query / key assembly in
#   kernels/rope_qk.py, the router's logits as a 16-bit product with fp32 output (router.py); the projections
#   through cuBLAS (linear "auto" is "plain" for many tokens). The shortcut MoE inline: on its side stream it
#   measured no faster on one H200, docs/perf-run14
DECODE = Forms(attention="auto", experts="auto", router="auto", linear="auto", rope="auto")  # a few tokens:
#   attend over the latent, gathered experts, on CUDA each of the four in its Triton kernel (kernels/mla_decode.py,
#   moe_decode.py, router.py, rope_cache.py: for up to 4 query tokens with W_uk's query fold in the same launch);
#   inside torch.compile the projections as multiply-and-sum, which inductor fuses, or on sm_90+ GPUs in
#   kernels/prefetch_gemv.py, the weight loaded before the dependent-launch wait (linear.py, `takes_prefetch`)
