"""Fused GPU kernels (Triton), each beside the plain-PyTorch reference it is tested equal to.

The package's readable forms (model/) are the definition; a kernel here is a faster way to compute one of them on
a GPU, chosen explicitly by the caller (`Forms(attention="fused", experts="fused", router="fused", rope="fused",
norm="fused")`, or "auto" as in `DECODE` and `PREFILL`; FP8 weights kept by `from_pretrained(..., fp8="keep")`),
never by hidden global state.
Each file holds one kernel family:

    fp8_linear.py   block-scaled FP8 weight x bf16 activation matmul (DeepSeek-V3 / LongCat-Flash-Chat-FP8 layout)
    moe_decode.py   the routed experts of a few decode tokens in two kernels, reading the chosen experts in place
    mla_decode.py   absorbed-MLA decode attention over the latent cache, split over the context (flash-decoding)
    grouped_gemm.py a grouped GEMM over expert groups (prefill) that reads FP8 expert banks in place
    router.py       the router's scores, biased top-k and weights for a few decode tokens, one program per token
    gemv.py         a split-K GEMV for the projections of a few tokens (opt-in: measured slower than inductor's)
    skinny_gemm.py  a split-K tensor-core GEMM for the projections of a decode batch of 5-64 tokens (opt-in)
    prefetch_gemv.py  a whole-row GEMV whose weight is loaded before the PDL wait, optionally with RMSNorm first
                    (opt-in, not yet measured)
    rope_cache.py   MLA's latent RMSNorm, RoPE of q and k and the cache write of a decode step, one program a token
    rmsnorm.py      RMSNorm, one program a row (a prefill's norms; inside torch.compile inductor fuses them)

The CPU keeps the plain path. Triton's interpreter (`TRITON_INTERPRET=1`, set before the first import of a kernel
module) runs the same kernels on the CPU, slowly: that is how tests/test_kernel_*.py and tests/test_fp8_keep.py
check them without a GPU and how notebook 14 builds one step by step.
"""
