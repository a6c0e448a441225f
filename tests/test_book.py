"""The rendered course (``make book``, ``docs/build_book.py``): the builder on tiny notebooks
(execution, skipped cells, times, source hashes), and the committed ``book/`` checked against the
notebooks it was rendered from (every chapter there, none older than its notebook, no live
server embedded, a few MB in all)."""
import importlib.util
import json
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("build_book", ROOT / "docs" / "build_book.py")
book = importlib.util.module_from_spec(spec)
spec.loader.exec_module(book)

BOOK, NOTEBOOKS = ROOT / "book", ROOT / "notebooks"
BOOK_BUDGET_MB = 15
"""The committed book's size budget (pages, figures, times.json), in MB."""


def _notebook(path: Path, title: str, *codes: str, tags: dict[int, list[str]] | None = None) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {title}\n\n**Goals.** learn {title}.")]
    for i, code in enumerate(codes):
        cell = nbformat.v4.new_code_cell(code)
        if tags and i in tags:
            cell.metadata["tags"] = tags[i]
        nb.cells.append(cell)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch):
    # build() sets TOAP_FAST and MPLBACKEND for its kernels: put them back after each test
    monkeypatch.setenv("TOAP_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")


def test_book_executes_renders_and_indexes(tmp_path):
    src = tmp_path / "nb"
    src.mkdir()
    _notebook(src / "00_first.ipynb", "00 · First", "import os\nprint('fast=' + os.environ.get('TOAP_FAST', 'unset'))")
    _notebook(src / "01_second.ipynb", "01 · Second", "print(6 * 7)")
    times = book.build(tmp_path / "out", fast=True, notebooks=src)
    assert [n for n, _ in times] == ["00_first", "01_second"]
    page = (tmp_path / "out" / "00_first.html").read_text()
    assert "fast=1" in page  # executed, in fast mode, output rendered
    assert "42" in (tmp_path / "out" / "01_second.html").read_text()
    index = (tmp_path / "out" / "index.html").read_text()
    assert 'href="00_first.html"' in index and "01 · Second" in index and "learn 01" in index
    assert "to run, fast size" in index  # each chapter with its time


def test_skipped_cells_are_shown_not_run_and_times_and_hashes_are_recorded(tmp_path):
    """A cell tagged nbval-skip (08's demo launch) or starting with ``# NBVAL_SKIP`` is not run
    (both would raise here), the page says so; times.json holds each chapter's and each cell's
    seconds, the mode and the source hash, which the page carries too."""
    src = tmp_path / "nb"
    src.mkdir()
    _notebook(src / "00_demo.ipynb", "00 · Demo", "print('ran ' + str(6 * 7))",
              "raise RuntimeError('a live server would start here')",
              "# NBVAL_SKIP\nraise RuntimeError('this one too')", tags={1: ["nbval-skip"]})
    out = tmp_path / "out"
    book.build(out, fast=True, notebooks=src)
    page = (out / "00_demo.html").read_text()
    assert "ran 42" in page and page.count("Not run in the static page") == 2
    assert page.count("a live server would start here") == 1, "shown once (its source), never run (no traceback)"
    digest = book.source_hash(src / "00_demo.ipynb")
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert _page_hash(page) == digest
    rec = json.loads((out / "times.json").read_text())
    assert rec["mode"] == "fast" and rec["machine"]["cores"] >= 1 and rec["date"]
    ch = rec["chapters"]["00_demo"]
    assert ch["sha256"] == digest and ch["mode"] == "fast" and ch["seconds"] > 0
    assert [c["index"] for c in ch["cells"]] == [1] and ch["cells"][0]["seconds"] >= 0
    assert [c["index"] for c in ch["skipped"]] == [2, 3]
    nb = nbformat.read(src / "00_demo.ipynb", as_version=4)
    assert ch["cells"][0]["id"] == nb.cells[1].id
    css = [f.name for f in out.glob("style-*.css")]
    assert len(css) == 1 and f'href="{css[0]}"' in page and "<style" not in page.split("</head>")[0]
    assert "<title>toap-kit: 00 · Demo</title>" in page
    table = book.times_table(out)
    assert "| `00_demo` | fast |" in table and "00 " in table.splitlines()[-1]


def test_the_source_hash_ignores_outputs_but_not_sources(tmp_path):
    path = tmp_path / "00_x.ipynb"
    _notebook(path, "X", "print(1)")
    before = book.source_hash(path)
    nb = nbformat.read(path, as_version=4)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nb.cells[1].execution_count = 3
    nbformat.write(nb, path)
    assert book.source_hash(path) == before, "outputs and counts are not the source"
    nb.cells[1].source = "print(2)"
    nbformat.write(nb, path)
    assert book.source_hash(path) != before, "a changed cell is a changed source"


def test_progress_bars_keep_their_last_state():
    assert book._squash_progress("a 10%\r a 50%\r a 100%\nnext\n") == " a 100%\nnext\n"


def test_book_stops_on_a_failing_notebook(tmp_path):
    src = tmp_path / "nb"
    src.mkdir()
    _notebook(src / "00_bad.ipynb", "Bad", "assert False, 'claim not met'")
    with pytest.raises(Exception, match="claim not met"):
        book.build(tmp_path / "out", fast=True, notebooks=src)
    assert not (tmp_path / "out" / "00_bad.html").exists()


# ---------------------------------------------------------------- the committed book/
def _page_hash(page: str) -> str | None:
    m = re.search(rf'<meta name="{book.SOURCE_META}" content="([0-9a-f]{{64}})">', page)
    return m.group(1) if m else None


def _chapters() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def _record() -> dict:
    path = BOOK / "times.json"
    assert path.is_file(), "book/times.json is missing: run make book"
    return json.loads(path.read_text())


def test_the_book_has_every_chapter():
    """``book/`` is committed (``make book``): one page per notebook and the index linking them."""
    missing = [f"book/{p.stem}.html" for p in _chapters() if not (BOOK / f"{p.stem}.html").is_file()]
    assert not missing, f"the rendered course lacks {missing}: run make book"
    assert (BOOK / "index.html").is_file(), "book/index.html is missing: run make book"
    index = (BOOK / "index.html").read_text()
    assert all(f'href="{p.stem}.html"' in index for p in _chapters()), "book/index.html must link every chapter"


def test_no_page_is_older_than_its_notebook():
    """Each page carries the sha256 of the notebook it was rendered from (``source_hash``), and so
    does ``book/times.json``: a notebook edited since fails here until the book is rendered again."""
    stale = []
    record = _record()
    for p in _chapters():
        page = BOOK / f"{p.stem}.html"
        if not page.is_file():
            stale.append(f"book/{p.stem}.html is missing: run make book")
            continue
        now = book.source_hash(p)
        if _page_hash(page.read_text()) != now or record["chapters"].get(p.stem, {}).get("sha256") != now:
            stale.append(f"book/{p.stem}.html is older than notebooks/{p.stem}.ipynb: run make book")
    assert not stale, "\n".join(stale)


def test_the_book_says_its_size_and_is_timed():
    """Every chapter is timed, cell by cell, and its page says at which size it was executed
    (``make book``: full size; ``--fast``: CI's sizes), so that no reader takes a fast-mode
    number for a full-size one."""
    record = _record()
    for p in _chapters():
        ch = record["chapters"].get(p.stem)
        assert ch and ch["mode"] in ("full", "fast"), f"book/{p.stem}.html has no recorded size: run make book"
        assert ch["seconds"] > 0 and ch["cells"], ch
        page = (BOOK / f"{p.stem}.html").read_text()
        assert f'<meta name="toap-mode" content="{ch["mode"]}">' in page, f"book/{p.stem}.html does not say its size"
        said = "executed at full size" if ch["mode"] == "full" else "executed in fast mode (TOAP_FAST=1"
        assert said in page, f"book/{p.stem}.html does not tell the reader its size"


def test_the_readme_states_the_books_times():
    """The README's Notebooks section states the chapter times of ``book/times.json`` in the words
    ``docs/build_book.py --times-table`` prints, so a re-rendered book with old times in the README
    fails here."""
    sentence = book.times_table(BOOK).strip().splitlines()[-1]
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert " ".join(sentence.split()) in readme, (
        f"README.md does not state the book's times; put this line in its Notebooks section "
        f"(python docs/build_book.py --out book --times-table):\n{sentence}")


def test_the_book_embeds_no_live_server_and_stays_light():
    """No page holds a live demo (an iframe on 127.0.0.1 / localhost: 08's launch cell is not run),
    and the whole book stays within its budget (PNG figures)."""
    live = re.compile(r"<iframe[^>]*(127\.0\.0\.1|localhost|0\.0\.0\.0)", re.I)
    pages = sorted(BOOK.glob("*.html"))
    assert pages, "no book/: run make book"
    assert not [p.name for p in pages if live.search(p.read_text())], "a page embeds a live server"
    size = sum(f.stat().st_size for f in BOOK.rglob("*") if f.is_file()) / 1e6
    assert size <= BOOK_BUDGET_MB, f"book/ is {size:.1f} MB, over its {BOOK_BUDGET_MB} MB budget"


def test_pngs_are_shrunk_with_a_palette_and_nothing_else_changes():
    import base64
    import io

    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:240, 0:320]
    rgb = np.stack([xx * 255 / 319, yy * 255 / 239, (xx + yy) * 255 / 558], -1)
    rgb = (rgb + np.random.default_rng(0).normal(0, 6, rgb.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    broken = "iVBORw0KGgo" + "A" * 1200  # PNG magic, not a PNG
    page = (f'<p>text</p><img src="data:image/png;base64,{b64}"/>'
            f'<script>{{"image/png": "{b64}\\n", "x": "{broken}"}}</script>')
    small = book.shrink_pngs(page)
    assert len(small) < 0.8 * len(page)
    found = re.findall(r"iVBORw0KGgo[A-Za-z0-9+/]+={0,2}", small)
    assert len(found) == 3 and found[2] == broken  # both PNGs re-encoded, the broken one as it was
    for b in found[:2]:
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")).astype(int)
        assert img.shape == rgb.shape and np.abs(img - rgb).mean() < 8
    assert small.startswith('<p>text</p><img src="data:image/png;base64,') and '\\n", "x": ' in small
