"""Repository invariants: pyproject and environment.yml list the same packages; the README's commands exist."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    want = {_name(r) for r in py["dependencies"] + py["optional-dependencies"]["dev"]}
    env = (ROOT / "environment.yml").read_text()
    lines = env.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == "- pip:")
    pip_lines = [ln.strip()[2:] for ln in lines[start + 1:] if ln.strip().startswith("- ")]
    got = {_name(r) for r in pip_lines if not r.startswith("-e")}
    assert got == want, f"environment.yml {sorted(got ^ want)} differ from pyproject.toml"
    # pinned versions agree too
    pins_py = {_name(r): r for r in py["optional-dependencies"]["dev"] if "==" in r}
    for n, r in pins_py.items():
        assert r in env, f"{r} pinned in pyproject.toml but not in environment.yml"


def test_readme_opens_with_the_two_commands():
    head = (ROOT / "README.md").read_text().split("\n")[:25]
    text = "\n".join(head)
    assert "make demo" in text and "make test" in text
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_license_and_python_versions():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    proj = py["project"]
    assert proj["license"] == "MIT" and proj["license-files"] == ["LICENSE"]  # SPDX, no TOML table
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert proj["requires-python"] == ">=3.11"  # = the lowest Python .ci/lowest-python finds and tests
    assert "python=3.11" in (ROOT / "environment.yml").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".ci/lowest-python" in ci and "requires-python" in (ROOT / ".ci" / "lowest-python").read_text()


def test_make_lab_allows_root_and_passes_args():
    import subprocess

    out = subprocess.run(["make", "-n", "lab", "ARGS=--no-browser --port 8899"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if "jupyter lab" in ln)
    assert "--no-browser --port 8899" in line
    import os

    assert ("--allow-root" in line) == (os.getuid() == 0)


def test_wheel_has_assets_and_subpackages_and_builds_without_warnings(tmp_path):
    """A plain `pip install .` gets the shipped model and every subpackage; setuptools has nothing to complain about."""
    import subprocess
    import sys
    import zipfile

    p = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-v",
                        "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    log = p.stdout + p.stderr
    noisy = [ln for ln in log.splitlines() if re.search(r"Warning|deprecated|!!", ln) and "byte-compil" not in ln]
    assert not noisy, noisy[:10]
    (whl,) = tmp_path.glob("longcat_ref-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for sub in ("model", "io", "runtime", "tools"):
        assert f"longcat_ref/{sub}/__init__.py" in names, sub
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "metrics.json"):
        assert f"longcat_ref/assets/tiny-longcat/{f}" in names, f
    assert {"longcat_ref/assets/demo_corpus.txt", "longcat_ref/assets/stdlib_chat.txt"} <= names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert not any("/tests/" in n or n.startswith(("tests/", "notebooks/", "docs/")) for n in names)
