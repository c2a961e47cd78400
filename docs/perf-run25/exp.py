"""perf-run25: the GLM MoE layer with its glue folded into our kernels (fold.py), checked and timed.

    TRITON_INTERPRET=1 python docs/perf-run25/exp.py cpu          the kernels against their references, and the
                                                                 tiny GLM's decode step folded against unfolded
    python docs/perf-run25/exp.py gpu                            the same on CUDA (PDL on)
    python docs/perf-run25/exp.py ab OUT.json [ROUNDS]           GLM-4.7-Flash's compiled batch-1 step (bench's
                                                                 row, synthetic weights, ctx 128): shipped, folded,
                                                                 folded + moe_decode.PRELOAD_SHARED; ROUNDS rounds
                                                                 (2), one process
    python docs/perf-run25/exp.py e2e OUT.json                   bench's end-to-end batch-1 rows (ours fast_compile
                                                                 and transformers' best setting, one process) with
                                                                 ours folded (+ PRELOAD_SHARED with `e2e_preload`)
"""

import json
import sys
import time

import torch

sys.path.insert(0, "docs/perf-run25")
import fold  # noqa: E402

from longcat_ref.model import generate  # noqa: E402

STAMP = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__)


def check(device="cpu"):
    from longcat_ref.model.cache import StaticCache
    from longcat_ref.model.config import tiny_glm
    from longcat_ref.model.forms import Forms
    from longcat_ref.model.model import CausalLM, init_weights

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        M, H, E = 3, 80, 24
        x, a = torch.randn(M, H, generator=g).to(dtype), torch.randn(M, H, generator=g).to(dtype)
        w, nw = (0.1 * torch.randn(E, H, generator=g)).to(dtype), (1 + 0.1 * torch.randn(H, generator=g)).to(dtype)
        x, a, w, nw = (t.to(device) for t in (x, a, w, nw))
        got = torch.ops.perf_run25.addnorm_logits(x, a, w, nw, 1e-5)
        want = fold.addnorm_logits_reference(x, a, w, nw, 1e-5)
        for gg, ww, what in zip(got, want, ("logits", "x + a", "norm")):
            torch.testing.assert_close(gg.float(), ww.float(), atol=tol, rtol=tol, msg=what)
        part = torch.randn(M, 5, H, generator=g).to(device)
        torch.testing.assert_close(torch.ops.perf_run25.add_slots(part, x).float(),
                                   fold.add_slots_reference(part, x).float(), atol=tol, rtol=tol)
        print(f"exp {device}: kernels equal to their references ({dtype})")
    # the tiny GLM's decode step: the same forms, folded and not
    forms = Forms(attention="fused_uv", experts="fused", router="fused", linear="prefetch", rope="fused_uk")
    for dtype in (torch.float32, torch.bfloat16):
        model = init_weights(CausalLM(tiny_glm()), seed=1).to(device=device, dtype=dtype).eval()
        b, S, steps = 2, 16, 3
        ids = torch.randint(4, model.config.vocab_size, (b, steps), generator=g)
        out, fold.FOLDED[0] = {}, 0
        for folded in (False, True):
            if folded:
                fold.install(model)
            cache = StaticCache.for_model(model.config, b, S, model.dtype, device)
            logits = []
            with torch.no_grad():
                for i in range(steps):
                    mask = torch.zeros(b, S, dtype=torch.long, device=device)
                    mask[:, : i + 1] = 1
                    logits.append(model(ids[:, i: i + 1].to(device), attention_mask=mask, cache=cache,
                                        cache_position=torch.tensor([i], device=device), forms=forms)[:, -1].float())
            out[folded] = torch.stack(logits)
            if folded:
                fold.uninstall(model)
        diff = float((out[True] - out[False]).abs().max())
        print(f"exp {device}: tiny GLM {dtype}, {steps} decode steps, folded vs not: logits max |diff| {diff:.2e}")
        print(f"exp {device}: {fold.FOLDED[0]} layer calls ran folded")
        assert fold.FOLDED[0] == steps * 2, fold.FOLDED[0]  # the two MoE layers, every step
        assert diff < (1e-5 if dtype == torch.float32 else 5e-2), diff
        assert out[True].abs().max() > 0


def ab(path, rounds=2):
    from longcat_ref.tools import bench

    device, dtype = "cuda", torch.bfloat16
    ceil = bench.machine_ceilings(device)
    res = dict(STAMP, machine=ceil, rows=[])
    with torch.device("meta"):
        glm = bench.CausalLM(bench.glm_4_7_flash()).to(dtype)
    glm = glm.to_empty(device=device).eval().requires_grad_(False)
    bench.synth_(glm)
    ids = torch.randint(4, glm.config.vocab_size, (1,), device=device, generator=torch.Generator(device).manual_seed(1))
    logits, kernel_stats, name = {}, bench.kernel_stats, [None]

    def stats_and_logits(dec):
        out = kernel_stats(dec)
        bench.fill_context(dec, 128)
        logits[name[0]] = dec.step(ids).float()
        return out

    bench.kernel_stats = stats_and_logits
    from longcat_ref.kernels import moe_decode

    for r in range(rounds):
        for folded, preload in ((False, False), (True, False), (True, True)):
            (fold.install if folded else fold.uninstall)(glm)
            moe_decode.PRELOAD_SHARED = preload
            name[0] = f"glm fold={int(folded)} preload={int(preload)} round={r}"
            generate._COMPILED.clear()
            torch._dynamo.reset()
            print(f"perf-run25 ab: {name[0]}", flush=True)
            bench.b1_rows(glm, name[0], 128, device, ceil, res["rows"], ["compiled_decode"])
            res["rows"][-1]["settings"] = dict(fold=folded, preload_shared=preload)
            first = next(iter(logits.values()))
            res["logits_vs_first"] = {k: dict(max_abs=float((v - first).abs().max()),
                                              rel_norm=float((v - first).norm() / first.norm()),
                                              argmax_equal=bool(torch.equal(v.argmax(-1), first.argmax(-1))))
                                      for k, v in logits.items()}
            print(f"perf-run25 ab: logits vs the first row: {res['logits_vs_first']}", flush=True)
            json.dump(res, open(path, "w"), indent=1)
    fold.uninstall(glm)
    moe_decode.PRELOAD_SHARED = False


def e2e(path, preload=False, extra=()):
    from longcat_ref.kernels import moe_decode
    from longcat_ref.tools import bench

    made = bench.glm_models

    def folded_models(*a, **kw):
        hf, ours, rest = made(*a, **kw)
        fold.install(ours)
        return hf, ours, rest

    bench.glm_models = folded_models
    moe_decode.PRELOAD_SHARED = preload
    print(f"perf-run25 e2e: ours folded, PRELOAD_SHARED={preload}", flush=True)
    return bench.main(["--only", "e2e", "--batches", "1", "--e2e-variants", "fast_compile,hf", "--json", path,
                       *extra])


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] in ("cpu", "gpu"):
        check("cpu" if sys.argv[1] == "cpu" else "cuda")
    elif len(sys.argv) >= 3 and sys.argv[1] == "ab":
        ab(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2)
    elif len(sys.argv) >= 3 and sys.argv[1] in ("e2e", "e2e_preload"):
        sys.exit(e2e(sys.argv[2], sys.argv[1] == "e2e_preload", sys.argv[3:]))
    else:
        sys.exit(__doc__)
