"""The package layout shows the architecture: kernels/ <- model/ (the math) <- io/ <- runtime/ <- tools/, no cycles.

Every import of a package module is counted, at the top of a file or inside a function, absolute or relative.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "longcat_ref"
LAYERS = ["kernels", "model", "io", "runtime", "tools"]  # a module may import its own layer and the layers before it


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(("longcat_ref",) + p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def imports(name: str, path: pathlib.Path, known) -> set[str]:
    """Package modules `name` imports (anywhere in the file)."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:  # "longcat_ref.model.mla.MLA" -> "longcat_ref.model.mla"
                t = t.rpartition(".")[0]
            if t and t != name and t != "longcat_ref":
                found.add(t)
    return found


def layer_of(name: str) -> int | None:
    """Index into LAYERS; None for the package itself. Top-level modules other than __init__ (the
    `python -m longcat_ref.demo` entry point) are tools."""
    parts = name.split(".")
    if len(parts) == 1:
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else LAYERS.index("tools")


GRAPH = {n: imports(n, p, set(modules())) for n, p in modules().items()}


def test_every_module_sits_in_a_layer():
    for name in GRAPH:
        parts = name.split(".")
        assert len(parts) == 1 or parts[1] in LAYERS or parts[1] == "demo", f"{name} is outside the layers"


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_point_down_the_layers(name):
    mine = layer_of(name)
    for dep in GRAPH[name]:
        theirs = layer_of(dep)
        if mine is None or theirs is None:
            continue
        assert theirs <= mine, f"{name} ({LAYERS[mine]}) imports {dep} ({LAYERS[theirs]})"


def test_nothing_in_the_package_imports_the_tools():
    tools = {n for n in GRAPH if layer_of(n) == LAYERS.index("tools")}
    for name, deps in GRAPH.items():
        if name not in tools:
            assert not deps & tools, f"{name} imports {sorted(deps & tools)}"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(n, path):
        state[n] = 1
        for d in sorted(GRAPH.get(n, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[n] = 2

    for n in sorted(GRAPH):
        if n not in state:
            visit(n, [n])


def test_the_checker_sees_function_level_imports(tmp_path):
    """The checker itself can fail: an import inside a function body is found."""
    p = tmp_path / "x.py"
    p.write_text("def f():\n    from ..runtime.parallel import ParallelContext\n")
    assert imports("longcat_ref.model.x", p, set(modules())) == {"longcat_ref.runtime.parallel"}


def test_the_math_has_no_process_or_file_code():
    """The model math imports nothing from the package outside model/ (and no torch.distributed)."""
    for name, p in modules().items():
        if layer_of(name) == 0:
            assert "torch.distributed" not in p.read_text(), name


def test_the_package_works_without_triton():
    """Triton is optional (CUDA builds of torch bring it; CPU users may not have it): with it blocked, every kernel
    module still imports, each plain reference runs, each kernel entry point says in one line what it needs, and the
    model's default forms run."""
    import subprocess
    import sys

    code = """
import sys; sys.modules["triton"] = None
import torch
import longcat_ref as L
from longcat_ref.kernels import fp8_linear, gemv, grouped_gemm, mla_decode, moe_decode, rmsnorm, rope_cache, router, support
from longcat_ref.kernels import skinny_gemm
from longcat_ref.model.quant import quantize_blockwise
assert not support.have_triton()
w8, s = quantize_blockwise(torch.randn(32, 32), (16, 16))
x = torch.randn(2, 32)
calls = [
    (fp8_linear.fp8_linear_reference, fp8_linear.fp8_linear_kernel, (x, w8, s, (16, 16))),
    (moe_decode.fused_moe_reference, moe_decode.fused_moe,
     (torch.zeros(1, 8), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.long), torch.zeros(2, 8, 8), torch.zeros(2, 8, 4))),
    (mla_decode.mla_decode_reference, mla_decode.mla_decode,
     (torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16), torch.zeros(1, 4, 16), torch.zeros(1, 4, 16),
      torch.zeros(1, 1, 1, 4), 1.0)),
    (grouped_gemm.grouped_gemm_reference, grouped_gemm.grouped_gemm,
     (torch.ones(3, 8), torch.ones(2, 4, 8), torch.tensor([1, 3]))),
    (grouped_gemm.combine_slots_reference, grouped_gemm.combine_slots,
     (torch.ones(3, 8), torch.tensor([[0, -1], [2, 1]]), torch.ones(2, 2), torch.zeros(2, 8))),
    (router.route_reference, router.route, (torch.randn(2, 8), torch.zeros(8), 2, True, False, 1.0)),
    (gemv.gemv_reference, gemv.batched_gemv, (torch.randn(1, 2, 8), torch.randn(1, 3, 8))),
    (skinny_gemm.skinny_reference, skinny_gemm.batched_skinny_gemm, (torch.randn(1, 20, 8), torch.randn(1, 3, 8))),
    (rmsnorm.rmsnorm_reference, rmsnorm.rmsnorm, (torch.randn(2, 8), torch.ones(8), 1e-6)),
    (rope_cache.rope_cache_reference, rope_cache.rope_cache_write,
     (torch.randn(1, 1, 20), torch.randn(1, 1, 1, 8), torch.ones(16), 1e-6, torch.ones(1, 1, 4), torch.zeros(1, 1, 4),
      torch.zeros(1, 4, 16), torch.zeros(1, 4, 4), torch.tensor([2]), 4)),
]
for ref, kernel, args in calls:
    ref(*args)
    try:
        kernel(*args)
    except RuntimeError as e:
        assert "needs Triton" in str(e) and "\\n" not in str(e), e
    else:
        raise SystemExit(f"{kernel.__name__} ran without Triton")
m = L.init_weights(L.CausalLM(L.tiny_longcat()), seed=0).eval()
ids = torch.randint(4, 512, (1, 6))
with torch.no_grad():
    torch.testing.assert_close(m(ids, forms=L.DECODE), m(ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m(ids, forms=L.Forms(linear="triton")), m(ids), atol=1e-5, rtol=1e-5)  # plain here
    torch.testing.assert_close(m(ids, forms=L.Forms(linear="skinny")), m(ids), atol=1e-5, rtol=1e-5)  # plain here
    c = L.StaticCache.for_model(m.config, 1, 8)
    torch.testing.assert_close(m(ids, cache=c, forms=L.DECODE), m(ids), atol=1e-5, rtol=1e-5)  # rope "auto": plain
print("ok")
"""
    root = str(ROOT.parent)
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout[-1000:] + res.stderr[-2000:]
