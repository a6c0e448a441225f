"""Render the course: execute every notebook and write it, figures included, to static HTML.

    python docs/build_book.py [--out book] [--fast] [--only 01 02]

Each notebook in ``notebooks/`` is executed in order (at full size unless ``--fast``, which
sets ``TOAP_FAST=1`` as the tests do) and exported with nbconvert's HTML exporter, figures
embedded, to ``OUT/<name>.html``; ``OUT/index.html`` links them with their goals. Every file is
written atomically, and a notebook that fails to run stops the build with its error (the
pages already written stay). ``make book`` runs this at full size.
"""
from __future__ import annotations

import argparse
import html
import logging
import os
import time
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter
from nbconvert.preprocessors import ExecutePreprocessor

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
log = logging.getLogger("book")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _title_and_goals(nb: nbformat.NotebookNode) -> tuple[str, str]:
    """The first markdown cell's heading and the paragraph that follows it."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            lines = cell.source.strip().splitlines()
            title = lines[0].lstrip("# ").strip() if lines else ""
            rest = " ".join(line.strip() for line in lines[1:] if line.strip())
            return title, rest[:400] + ("..." if len(rest) > 400 else "")
    return "", ""


def build(out: Path, fast: bool, only: list[str] | None = None, timeout: int = 3600,
          notebooks: Path = NOTEBOOKS) -> list[tuple[str, float]]:
    """Execute and render the notebooks of ``notebooks``; returns ``(name, seconds)`` per run."""
    out.mkdir(parents=True, exist_ok=True)
    if fast:
        os.environ["TOAP_FAST"] = "1"
    else:
        os.environ.pop("TOAP_FAST", None)
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # figures into the pages
    paths = sorted(notebooks.glob("*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.name.startswith(o) for o in only)]
        if not paths:
            raise SystemExit(f"no notebook in {notebooks} starts with {only}")
    exporter = HTMLExporter()
    times, entries = [], []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        log.info("running %s (%s size)", path.name, "fast" if fast else "full")
        t = time.perf_counter()
        ExecutePreprocessor(timeout=timeout, kernel_name="python3").preprocess(nb, {"metadata": {"path": str(notebooks)}})
        seconds = time.perf_counter() - t
        times.append((path.stem, seconds))
        body, _ = exporter.from_notebook_node(nb)
        _write(out / f"{path.stem}.html", body)
        log.info("%s: %.0f s", path.name, seconds)
    for path in sorted(notebooks.glob("*.ipynb")):
        if (out / f"{path.stem}.html").is_file():
            title, goals = _title_and_goals(nbformat.read(path, as_version=4))
            entries.append(f'<li><a href="{path.stem}.html">{html.escape(title or path.stem)}</a>'
                           f'<p>{html.escape(goals)}</p></li>')
    index = ("<!doctype html><html><head><meta charset='utf-8'><title>toap-kit: the course</title>"
             "<style>body{font-family:sans-serif;max-width:50em;margin:2em auto;line-height:1.4}"
             "li{margin-bottom:1em}p{margin:.2em 0;color:#444}</style></head><body>"
             "<h1>toap-kit: the course</h1><p>Executed notebooks, "
             f"{'fast mode (TOAP_FAST=1)' if fast else 'full size'}, built {time.strftime('%Y-%m-%d %H:%M')}. "
             "Run them yourself with <code>make lab</code>.</p><ol>" + "".join(entries) + "</ol></body></html>")
    _write(out / "index.html", index)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "book", help="output folder (default: book/)")
    p.add_argument("--fast", action="store_true", help="fast mode (TOAP_FAST=1), as in the tests")
    p.add_argument("--only", nargs="*", help="only notebooks whose name starts with these prefixes")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    times = build(args.out, args.fast, args.only)
    log.info("done: %s; total %.0f s; open %s", ", ".join(f"{n} {s:.0f} s" for n, s in times),
             sum(s for _, s in times), args.out / "index.html")


if __name__ == "__main__":
    main()
