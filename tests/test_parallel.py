"""Tensor + expert parallelism (parallel.py) on CPU with gloo: torchrun at world sizes 2, 4 (2 nodes x 2) and 16
(2 nodes x 8, c10d rendezvous on localhost). One torchrun job per world size checks everything at once
(tests/parallel_worker.py): logits equal to the single-process model (naive and absorbed MLA, and the fast path's
fixed-shape prefill + decode steps), greedy tokens equal (plain and generate(fast=True)),
sampled tokens identical on all ranks, each rank reading only its slices. The 4-rank job also kills a rank and
checks that the ranks on the other node raise instead of hanging.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import longcat_ref as L
from longcat_ref.runtime.parallel import ParallelContext, ParallelError
from parallel_worker import fast_logits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "parallel_worker.py")


def glm_cfg():
    # tiny_glm with sizes that divide 16: 16 heads, 16 experts, shared-expert width 32, dense width 128; also the
    # no-q-LoRA variant (a plain q_proj, column-parallel) and attention biases (o_proj's added once, after the sum)
    return L.tiny_glm(num_attention_heads=16, n_routed_experts=16, moe_topk=4, expert_ffn_hidden_size=32,
                      ffn_hidden_size=128, q_lora_rank=None, attention_bias=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Two tiny checkpoints + single-process reference outputs, shared by every world size."""
    d = tmp_path_factory.mktemp("parallel")
    ref = {}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 512, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    ids[1, :3], mask[1, :3] = 3, 0  # row 1 left-padded
    for kind, cfg in (("longcat", L.tiny_longcat()), ("glm", glm_cfg())):
        L.save_checkpoint(L.init_weights(L.CausalLM(cfg), seed=1, std=0.08, bias_std=0.05), d / kind)
        m = L.from_pretrained(d / kind, dtype=torch.float32)
        with torch.no_grad():
            logits = m(ids, attention_mask=mask)
        ref[kind] = dict(ids=ids, mask=mask, logits=logits, greedy=m.generate(ids, 8, attention_mask=mask),
                         fast_logits=fast_logits(m, ids, mask),
                         sampled=m.generate(ids, 8, attention_mask=mask, temperature=1.0, top_p=0.9, seed=0),
                         param_bytes=sum(p.numel() * p.element_size() for p in m.parameters()))
        # the same weights as an FP8 checkpoint (8 x 8 blocks: whole blocks on 2 ranks), kept FP8 by every rank
        L.save_checkpoint(m, d / f"{kind}-fp8", quantize="fp8", fp8_block=(8, 8))
        q = L.from_pretrained(d / f"{kind}-fp8", dtype=torch.float32, fp8="keep")
        with torch.no_grad():
            ref[kind]["fp8_logits"] = q(ids, attention_mask=mask)
        ref[kind]["fp8_fast_logits"] = fast_logits(q, ids, mask)
        ref[kind]["fp8_greedy"] = q.generate(ids, 8, attention_mask=mask)
    torch.save(ref, d / "ref.pt")
    return d, ref


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(d, nnodes, nproc, extra=(), timeout=240):
    """Start `nnodes` torchrun agents of `nproc` workers on localhost; return their exit codes and stderr."""
    out = d / "out"
    out.mkdir(exist_ok=True)
    for f in out.iterdir():
        f.unlink()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, LONGCAT_DIST_TIMEOUT="60")
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t",
           "--monitor-interval", "0.5", WORKER, str(d), *extra]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(nnodes)]
    logs, codes = [], []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
            codes.append(p.returncode)
    finally:
        for p in procs:  # only on a hang: the test fails below, don't leave workers behind
            if p.poll() is None:
                p.kill()
    results = {}
    for f in sorted(out.iterdir()):
        results[f.stem] = json.loads(f.read_text())
    return codes, "\n".join(logs), results


def failure(log: str) -> str:
    """What to show when an agent failed: the first worker traceback (the agents' own summary, printed last, names
    only exit codes) and the log's end."""
    i = log.find("Traceback")
    return (log[i:i + 4000] + "\n...\n" if i >= 0 else "") + log[-2000:]


def check_ranks(results, ref, world):
    for r in range(world):
        res = results.get(f"rank{r}")
        assert res is not None, f"rank {r} wrote no result"
        assert res["world"] == world
        for kind in ("longcat", "glm"):
            k = res[kind]
            assert k["max_diff_naive"] < 1e-5 and k["max_diff_absorbed"] < 1e-5, (r, kind, k)
            assert k["max_diff_fast"] < 1e-5, (r, kind, k)  # fast + parallel == single process
            assert k["greedy_equal"] and k["fast_greedy_equal"], (r, kind)
            assert k["sampled_same_on_all_ranks"], (r, kind)
            # each rank holds (and read) about 1/world of the model: replicated parts are small here
            assert k["param_bytes"] < ref[kind]["param_bytes"] * (1.0 / world + 0.35), (r, kind, k)
            assert k["bytes_read"] == k["state_bytes"], (r, kind, k)  # read exactly what it holds
            if world == 2:  # FP8 weights kept on every rank (RowParallelLinear through quant.linear, FP8 expert shards)
                assert k["fp8_tensors"] > 0, (r, kind, k)
                assert k["fp8_max_diff"] < 1e-5 and k["fp8_max_diff_fast"] < 1e-5, (r, kind, k)
                assert k["fp8_greedy_equal"], (r, kind)


@pytest.mark.parametrize("world", [2, 16])
def test_parallel_equals_single_process(workdir, world):
    d, ref = workdir
    nnodes, nproc = (1, 2) if world == 2 else (2, 8)
    codes, log, results = torchrun(d, nnodes, nproc)
    assert codes == [0] * nnodes, failure(log)
    check_ranks(results, ref, world)


def test_parallel_4_ranks_and_a_dead_rank(workdir):
    """2 nodes x 2 ranks: results equal; then rank 3 dies and the other node's ranks raise, not hang."""
    d, ref = workdir
    codes, log, results = torchrun(d, 2, 2, extra=["--die-rank", "3"])
    check_ranks(results, ref, 4)
    assert all(c != 0 for c in codes), (codes, log[-3000:])  # both agents report the failure
    dead_node = results["rank3"]["node"]
    others = [r for r in range(4) if results[f"rank{r}"]["node"] != dead_node]
    assert len(others) == 2
    for r in others:
        # Either the rank's all_reduce raised (it wrote death{r}.json with the error), or its torchrun agent saw the
        # failed rendezvous first and stopped it -- under CPU load either can win. What must never happen is a
        # successful all_reduce or a hang (torchrun() fails on its timeout).
        death = results.get(f"death{r}")
        assert death is None or death["error"], (r, death, log[-3000:])
    assert any(f"death{r}" in results for r in others) or "Signals.SIGTERM" in log or "SIGTERM" in log, log[-3000:]


def test_world_size_that_does_not_divide_fails_before_loading(tmp_path):
    cfg = L.tiny_longcat()  # 16 heads, 16 experts, vocab 512, dense width 128
    with pytest.raises(ParallelError, match=r"world size 3 does not divide num_attention_heads=16.*n_routed_experts"):
        ParallelContext(rank=0, world_size=3).check(cfg)
    # from_pretrained checks before reading: a directory with only config.json fails on the world size, not on the
    # missing weights
    L.save_checkpoint(L.CausalLM(cfg), tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ParallelError, match="world size 3"):
        L.from_pretrained(tmp_path, parallel=ParallelContext(rank=1, world_size=3))
    with pytest.raises(ParallelError, match="shared expert width=24"):  # tiny_glm: 4 heads, 8 experts, shared 24
        ParallelContext(rank=0, world_size=16).check(L.tiny_glm(num_attention_heads=16, n_routed_experts=16))


def test_world_size_one_is_the_plain_model():
    ctx = ParallelContext.from_env() if "WORLD_SIZE" not in os.environ else ParallelContext()
    assert ctx.world_size == 1
    m = L.CausalLM(L.tiny_longcat())
    before = [(n, p.shape) for n, p in m.named_parameters()]
    ctx.shard(m)
    assert [(n, p.shape) for n, p in m.named_parameters()] == before
    assert ctx.shard_rule("lm_head.weight", (512, 64)) is None


def test_shard_plan_on_meta():
    """The sharded shapes of rank 5 of 16 (no process group needed on the meta device)."""
    cfg = L.tiny_longcat()
    ctx = ParallelContext(rank=5, world_size=16)
    with torch.device("meta"):
        m = L.CausalLM(cfg)
    ctx.shard(m)
    sd = dict(m.named_parameters())
    assert sd["model.layers.0.self_attn.0.q_b_proj.weight"].shape == (1 * cfg.qk_head_dim, cfg.q_lora_rank)
    assert sd["model.layers.0.self_attn.1.o_proj.weight"].shape == (cfg.hidden_size, cfg.v_head_dim)
    assert sd["model.layers.1.mlp.experts.gate_up_proj"].shape[0] == 1
    assert m.model.layers[1].mlp.experts.first_expert == 5
    assert not m.model.layers[1].mlp.add_zero_experts  # identity experts only on rank 0
    assert ctx.shard_rule("model.embed_tokens.weight", (512, 64)) == (0, 160, 192)
    assert ctx.shard_rule("model.layers.0.mlps.1.down_proj.weight", (64, 128)) == (1, 40, 48)
    assert ctx.shard_rule("model.layers.0.self_attn.0.q_a_proj.weight", (32, 64)) is None


def test_trace_overlap_analysis(tmp_path):
    """bench_parallel's trace reader on a hand-made trace: the MoE all_reduce [10, 40) on its own stream overlaps
    mlp0 [12, 22) and attn1 [25, 30); the o_proj all_reduce [31, 33) is not the MoE's."""
    from longcat_ref.tools.bench_parallel import analyse_trace, timeline_png

    ev = [dict(cat="user_annotation", name=n, ts=a, dur=b - a, tid=1, ph="X")
          for n, a, b in (("L0.moe", 0, 3), ("L0.mlp0", 3, 4), ("L0.attn1", 4, 6), ("L0.mlp1", 6, 7),
                          ("L1.attn0", 8, 9))]
    kern = [(1, 1.0, 2, 10, "expert_gemm"), (2, 2.0, 9, 10, "ncclDevKernel_AllReduce_Sum_bf16"),
            (3, 2.5, 10, 40, "ncclDevKernel_AllReduce_Sum_bf16"), (4, 3.5, 12, 22, "gemm"), (5, 4.5, 25, 30, "gemm"),
            (6, 5.0, 31, 33, "ncclDevKernel_AllReduce_Sum_bf16"), (7, 6.5, 41, 45, "gemm"), (8, 8.5, 46, 47, "gemm")]
    streams = {2: 13, 3: 21, 6: 13}
    for c, launch_ts, a, b, name in kern:
        ev.append(dict(cat="cuda_runtime", name="cudaLaunchKernel", ts=launch_ts, dur=0.1, tid=1,
                       args={"correlation": c}))
        ev.append(dict(cat="kernel", name=name, ts=a, dur=b - a, args={"correlation": c, "stream": streams.get(c, 7)}))
    ev[7]["args"]["correlation"] = 99  # kernel 2's launch record is missing: it stays unlabelled
    import json

    path = str(tmp_path / "t.json")
    with open(path, "w") as f:
        json.dump({"traceEvents": ev}, f)
    ov = analyse_trace(path)
    rows = ov.pop("_rows")
    assert ov["moe_allreduce_kernels"] == 1 and ov["moe_allreduce_gpu_us"] == 30
    assert ov["overlapped_with_compute_us"] == 15 and ov["overlapped_fraction"] == 0.5
    assert ov["overlap_us_by_compute_label"] == {"attn1": 5, "mlp0": 10}
    assert timeline_png(rows, str(tmp_path / "t.png"), "test")


def test_plan_16_fits_8_does_not(capsys):
    from longcat_ref.runtime.plan import GiB, main, rank_memory

    cfg = L.longcat_flash_chat()
    r8, r16 = rank_memory(cfg, 8), rank_memory(cfg, 16)
    assert r8["weights_total"] > 80 * GiB > r16["total"]  # bf16 LongCat-Flash: 16 x 80 GiB yes, 8 x 80 GiB no
    assert r8["kv_cache"] == r16["kv_cache"] == 8192 * 64512  # the latent cache is replicated, not split
    assert main(["--world-size", "8", "16"]) == 0
    out = capsys.readouterr().out
    assert "NO" in out and "yes" in out
    assert main(["--model", "glm", "--world-size", "3"]) == 2  # 20 heads: no
    assert main(["--model", "/nonexistent"]) == 2
    assert "plan: error" in capsys.readouterr().err


def test_bench_parallel_fp8_smoke(tmp_path):
    """bench_parallel --fp8 builds its synthetic weights directly in FP8 on each rank (no bf16 copy) and runs the
    reference and the fast path on them; on 2 CPU ranks (gloo) both give the same greedy tokens. --spec times the
    speculative verify step on the same sharded model."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, LONGCAT_DIST_TIMEOUT="60")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "longcat_ref.tools.bench_parallel", "--tiny",
           "--fp8", "--fast", "--spec", "1", "--layers", "2", "--no-slope", "--no-profile", "--batches", "1",
           "--out", str(tmp_path)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["weights"].startswith("fp8") and r["world_size"] == 2 and r["layers"] == 2
    assert r["greedy_tokens_from_16_token_prompt"] == r["fast_greedy_tokens_from_16_token_prompt"]
    assert r["L2"]["decode_b1_tok_s"] > 0
    (spec,) = r["speculative"]  # --spec 1: the verify step of 2 tokens on the sharded FP8 model, and the head
    assert spec["k"] == 1 and spec["main_1_s"] > 0 and spec["main_2_s"] > 0 and spec["head_2_s"] > 0
