import importlib.util
from pathlib import Path

import nbformat
import pytest

spec = importlib.util.spec_from_file_location("build_book", Path(__file__).parents[1] / "docs" / "build_book.py")
book = importlib.util.module_from_spec(spec)
spec.loader.exec_module(book)


def _notebook(path: Path, title: str, code: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {title}\n\n**Goals.** learn {title}."), nbformat.v4.new_code_cell(code)]
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


def test_book_stops_on_a_failing_notebook(tmp_path):
    src = tmp_path / "nb"
    src.mkdir()
    _notebook(src / "00_bad.ipynb", "Bad", "assert False, 'claim not met'")
    with pytest.raises(Exception, match="claim not met"):
        book.build(tmp_path / "out", fast=True, notebooks=src)
    assert not (tmp_path / "out" / "00_bad.html").exists()
