"""The search engine over the shipped database (toap_kit.engine): shipped codes that match the
models, a first ``verify`` that encodes nothing, and a package without import circles."""
import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import toap_kit
from toap_kit import engine, odd_inputs, protect, verify, zoo


def test_shipped_codes_cover_every_model_with_its_current_key():
    card, tensors = engine._shipped()
    assert card, f"{engine.SHIPPED_CODES} is missing or damaged: run `python -m toap_kit.engine`"
    for name in zoo.names():
        assert card["keys"].get(name) == engine.database_key(name), (
            f"the shipped codes of {name} are stale: run `python -m toap_kit.engine --only {name}`")
        codes = engine.db_codes(name)
        assert codes.shape == (card["rows"], zoo.card(name)["bits"]) and set(np.unique(codes)) == {-1, 1}


@pytest.mark.parametrize("name", zoo.names())
def test_shipped_codes_are_the_models_codes(name):
    """A random sample of the database, encoded now by the model, against the shipped rows."""
    sets = engine._database()[0]
    rows = np.random.default_rng(0).choice(len(sets.db_images), 48, replace=False)
    with torch.no_grad():
        now = engine.model(name).encode(sets.db_images[rows]).numpy().astype(np.int8)
    shipped = engine.db_codes(name)[rows]
    assert (now != shipped).mean() <= 0.005, f"{name}: {(now != shipped).mean():.1%} of the bits differ"


def test_a_first_verify_encodes_nothing(monkeypatch):
    """Issue 19, 7: a first ``verify`` over every engine reads the shipped codes (it used to
    encode 2,775 faces per engine: minutes on a fresh clone)."""
    monkeypatch.setattr(engine, "_encode", lambda name: pytest.fail(f"{name}'s database was encoded"))
    photo = odd_inputs.shipped_photo(3)
    protected = protect.protect_image(photo, protect.load_perturbation()).image
    rows = verify.verify(photo, protected, perturbation="toap-mid")
    assert [r["engine"] for r in rows] == zoo.names()


def test_a_stale_model_is_encoded_alone_and_cached(monkeypatch, tmp_path):
    monkeypatch.setattr(engine, "CACHE_DIR", tmp_path)
    real_key = engine.database_key
    monkeypatch.setattr(engine, "database_key", lambda n: "retrained" if n == "vgg_dpsh_32" else real_key(n))
    encoded = []
    monkeypatch.setattr(engine, "_encode", lambda n: encoded.append(n) or np.ones((5, 32), np.int8))
    assert engine.db_codes("vgg_dpsh_32").shape == (5, 32)
    assert engine.db_codes("vgg_dpsh_32").shape == (5, 32)  # the second time from the cache
    engine.db_codes("mobilenet_csq_32")
    assert encoded == ["vgg_dpsh_32"] and [p.name for p in tmp_path.glob("*.npy")] == ["vgg_dpsh_32-retrained.npy"]


def _imports(path: Path, package: str) -> set[str]:
    """The package's own modules that ``path`` imports (module level and inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package + "."):
            out.add(node.module.split(".")[1])
    return out


def test_the_package_has_no_import_circle():
    """Issue 19, 12: ``verify`` and ``demo`` imported each other; no module may reach itself."""
    root = Path(toap_kit.__file__).parent
    graph = {p.stem: _imports(p, "toap_kit") - {p.stem} for p in root.glob("*.py") if p.stem != "__init__"}
    assert "demo" not in graph["verify"]

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph.get(start, ()))
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph.get(m, ())
        return seen

    circles = sorted(m for m in graph if m in reach(m))
    assert not circles, f"modules that import themselves through others: {circles}"
