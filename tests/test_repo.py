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
