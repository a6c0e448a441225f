"""The kit's packaging: environment.yml agrees with pyproject.toml; the public API imports."""
import ast
import json
import re
import tomllib
from pathlib import Path

import toap_kit

ROOT = Path(__file__).resolve().parent.parent


def _pyproject_requirements() -> set[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(meta["dependencies"]) | set(meta["optional-dependencies"]["dev"])


def _environment_requirements() -> set[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip() == "- pip:")
    reqs = set()
    for line in lines[start + 1:]:
        m = re.match(r"^\s+- (.+)$", line)
        if not m:
            break
        if not m.group(1).startswith("-e"):
            reqs.add(m.group(1).strip())
    return reqs


def test_environment_yml_lists_the_pyproject_requirements():
    assert _environment_requirements() == _pyproject_requirements()
    assert "torch==2.13.0" in _pyproject_requirements()
    assert not any(r.startswith("torchvision") for r in _pyproject_requirements())


def test_public_api_names_exist():
    for name in toap_kit.__all__:
        assert hasattr(toap_kit, name), name


def test_every_toap_kit_name_the_notebooks_use_exists():
    """Notebooks call only the public API: every ``toap_kit.x`` / ``module.x`` they use exists."""
    mods = {m: getattr(toap_kit, m) for m in ("attacks", "cg", "data", "evaluate", "hashing", "models",
                                               "postprocess", "retrieval", "teacher", "zoo", "plots")}
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        src = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        tree = ast.parse(src)
        # a name the notebook assigns itself (e.g. a dict called ``models``) is not the module
        local = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id not in local:
                owner = node.value.id
                if owner == "toap_kit":
                    assert hasattr(toap_kit, node.attr), f"{nb.name}: toap_kit.{node.attr}"
                elif owner in mods:
                    assert hasattr(mods[owner], node.attr), f"{nb.name}: {owner}.{node.attr}"


def test_the_command_line_starts_without_the_plotting_and_training_stack():
    """``import toap_kit`` is lazy (PEP 562): ``toap`` imports what its commands use, not
    matplotlib, kornia or the CG (about a second of every ``toap`` process's start)."""
    import subprocess
    import sys

    code = "import sys, toap_kit.cli; print(sorted(m for m in ('matplotlib', 'kornia', 'toap_kit.cg') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]", out
