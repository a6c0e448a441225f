"""Render the course: execute every notebook and write it, figures included, to static HTML.

    python docs/build_book.py [--out book] [--fast] [--only 01 02]
    python docs/build_book.py --times-table [--out book]

Each notebook in ``notebooks/`` is executed in order (at full size unless ``--fast``, which
sets ``TOAP_FAST=1`` as the tests do) and exported with nbconvert's HTML exporter to
``OUT/<name>.html``, figures embedded as PNG; ``OUT/index.html`` links every chapter with its
goals and its time. ``make book`` runs this at full size into ``book/``, which is committed.

- A cell tagged ``nbval-skip`` (or whose source starts with ``# NBVAL_SKIP``) is not run: it
  launches a live server (08's demo), which a static page cannot hold. The page shows the cell
  with a note saying so.
- Progress: a log line when each notebook starts and ends, a tqdm bar over its code cells, and
  a log line for every cell that took more than ``SLOW_CELL_S`` seconds (with its time).
- ``OUT/times.json`` records, per chapter, its seconds, the mode (full/fast) and each code
  cell's seconds (by index and cell id), with the date and the machine's cores; and the sha256
  of each source notebook (``source_hash``: its JSON without outputs), which every page also
  carries (``<meta name="toap-source-sha256">``): ``tests/test_book.py`` fails when a page is
  older than its notebook.
- ``--times-table`` prints the chapter times of ``OUT/times.json`` as a markdown table and as a
  README sentence (for the README's "Notebooks" section).
- Light pages: progress bars in cell outputs keep only their last state (``\\r``-rewritten
  lines), nbconvert's inline styles go to one shared ``OUT/style-*.css``, and every embedded
  PNG (figures, and those inside the widgets' saved state) is re-encoded with a 256-colour
  palette when that makes it smaller (``shrink_pngs``: about a third of the bytes).

Every file is written atomically, and a notebook that fails to run stops the build with its
error (the pages already written stay, and ``times.json`` keeps their entries).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import datetime
import hashlib
import io
import html
import json
import logging
import os
import platform
import re
import sys
import time
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter
from nbconvert.preprocessors import ExecutePreprocessor

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SLOW_CELL_S = 30.0
"""A code cell that runs longer than this gets its own log line with its time."""
SKIP_TAG, SKIP_COMMENT = "nbval-skip", "# NBVAL_SKIP"
SKIP_NOTE = ("Not run in the static page: this cell launches a live server (it is tagged nbval-skip). "
             "Run it yourself in the notebook (make lab).")
SOURCE_META = "toap-source-sha256"
log = logging.getLogger("book")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def source_hash(path: Path) -> str:
    """sha256 of notebook ``path`` as its source: its JSON with every output, execution count,
    execution timestamp, the kernel's language info and the widget state removed, keys sorted
    (the same for a committed notebook without outputs and for the same notebook after a run)."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    for key in ("language_info", "widgets"):  # written by a run or a save, not by the author
        nb.get("metadata", {}).pop(key, None)
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None
        cell.get("metadata", {}).pop("execution", None)
        if isinstance(cell.get("source"), list):
            cell["source"] = "".join(cell["source"])
    text = json.dumps(nb, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_PNG_B64 = re.compile(r"iVBORw0KGgo[A-Za-z0-9+/]{1000,}={0,2}")  # a base64 PNG (its magic) of > ~750 bytes


def _palette_png(match: re.Match) -> str:
    from PIL import Image

    try:
        raw = base64.b64decode(match.group(0))
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (binascii.Error, OSError, ValueError):
        return match.group(0)  # not a whole PNG after all: leave it as it was
    buf = io.BytesIO()
    img.convert("RGB").quantize(256).save(buf, "PNG", optimize=True)
    small = base64.b64encode(buf.getvalue()).decode("ascii")
    return small if len(small) < len(match.group(0)) else match.group(0)


def shrink_pngs(page: str) -> str:
    """``page`` with each base64 PNG in it (``data:`` URIs and JSON strings alike) re-encoded
    with an adaptive 256-colour palette (Floyd-Steinberg dithered, transparency flattened),
    where that is smaller; anything else is left as it is."""
    return _PNG_B64.sub(_palette_png, page)


def is_skipped(cell) -> bool:
    """A code cell nbval skips: tagged ``nbval-skip`` or starting with ``# NBVAL_SKIP``."""
    if cell.get("cell_type") != "code":
        return False
    source = cell.get("source", "")
    source = "".join(source) if isinstance(source, list) else source
    return SKIP_TAG in cell.get("metadata", {}).get("tags", []) or source.lstrip().startswith(SKIP_COMMENT)


def _squash_progress(text: str) -> str:
    """Each line's last ``\\r``-rewritten state (a tqdm bar's final line, not its every update)."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


class BookExecutor(ExecutePreprocessor):
    """``ExecutePreprocessor`` that leaves skipped cells unrun (with a note), times every code
    cell (``cell_seconds``: index -> seconds), logs slow cells and shows a tqdm bar over the cells."""

    def preprocess(self, nb, resources=None, km=None):
        from tqdm.auto import tqdm

        self.cell_seconds: dict[int, float] = {}
        self.skipped: list[int] = []
        self._name = Path(str((resources or {}).get("book_name", "notebook"))).stem
        n_code = sum(c.cell_type == "code" for c in nb.cells)
        with tqdm(total=n_code, desc=self._name, unit="cell", file=sys.stderr, mininterval=5,
                  dynamic_ncols=True) as self._bar:
            return super().preprocess(nb, resources, km)

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type != "code":
            return cell, resources
        if is_skipped(cell):
            self.skipped.append(index)
            cell.outputs = [nbformat.v4.new_output(
                "display_data", data={"text/plain": SKIP_NOTE, "text/html": f"<p><em>{html.escape(SKIP_NOTE)}</em></p>"})]
            cell.execution_count = None
            self._bar.update(1)
            return cell, resources
        t = time.perf_counter()
        cell, resources = super().preprocess_cell(cell, resources, index)
        seconds = time.perf_counter() - t
        self.cell_seconds[index] = seconds
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and "\r" in out.get("text", ""):
                out["text"] = _squash_progress(out["text"])
        if seconds > SLOW_CELL_S:
            self._bar.write(f"{time.strftime('%H:%M:%S')} {self._name}: cell {index} took {seconds:.0f} s")
        self._bar.update(1)
        return cell, resources


def _title_and_goals(nb: nbformat.NotebookNode) -> tuple[str, str]:
    """The first markdown cell's heading and the paragraph that follows it."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            lines = cell.source.strip().splitlines()
            title = lines[0].lstrip("# ").strip() if lines else ""
            rest = re.sub(r"\*\*?|`", "", " ".join(line.strip() for line in lines[1:] if line.strip()))
            return title, rest[:400] + ("..." if len(rest) > 400 else "")
    return "", ""


def _fmt_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


def _stamp(body: str, stem: str, digest: str, mode: str, seconds: float) -> str:
    """The exported page with its source's hash, mode and time in ``<head>`` (meta tags) and a
    note under the notebook's first heading's place (top of ``<body>``)."""
    meta = (f'<meta name="{SOURCE_META}" content="{digest}">\n'
            f'<meta name="toap-source" content="notebooks/{stem}.ipynb">\n'
            f'<meta name="toap-mode" content="{mode}">\n'
            f"<!-- rendered from notebooks/{stem}.ipynb sha256={digest} by docs/build_book.py -->\n")
    body = body.replace("<head>", "<head>\n" + meta, 1) if "<head>" in body else meta + body
    how = ("executed at full size in {t} by <code>make book</code>" if mode == "full" else
           "executed in fast mode (TOAP_FAST=1, the tests' sizes: its numbers differ from the README's "
           "full-size tables) in {t} by <code>docs/build_book.py --fast</code>; <code>make book</code> "
           "renders it at full size").format(t=_fmt_seconds(seconds))
    note = (f'<p style="font:13px sans-serif;color:#555;margin:1em 2em">'
            f'<a href="index.html">the course</a> &middot; {how}; run it yourself with <code>make lab</code></p>')
    return re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + note, body, count=1)


_STYLE = re.compile(r"<style[^>]*>.*?</style>\s*", re.S)


def _shared_css(body: str, out: Path) -> str:
    """The page with its inline ``<style>`` blocks (nbconvert's theme, about 260 KB a page) moved
    into one stylesheet beside it, ``OUT/style-<sha256[:10]>.css``, shared by every page with
    the same styles, and linked instead."""
    if "</head>" not in body:
        return body
    head, rest = body.split("</head>", 1)
    styles = _STYLE.findall(head)  # the theme's, not the <style scoped> of an output (a table)
    if not styles:
        return body
    css = "\n".join(re.sub(r"^<style[^>]*>|</style>\s*$", "", s.strip()) for s in styles) + "\n"
    name = f"style-{hashlib.sha256(css.encode('utf-8')).hexdigest()[:10]}.css"
    if not (out / name).is_file():
        _write(out / name, css)
    first = head.index(styles[0])
    head = _STYLE.sub("", head)
    return head[:first] + f'<link rel="stylesheet" href="{name}">\n' + head[first:] + "</head>" + rest


def _read_times(out: Path) -> dict:
    try:
        return json.loads((out / "times.json").read_text())
    except (OSError, ValueError):
        return {}


def build(out: Path, fast: bool, only: list[str] | None = None, timeout: int = 3600,
          notebooks: Path = NOTEBOOKS) -> list[tuple[str, float]]:
    """Execute and render the notebooks of ``notebooks`` into ``out``; returns ``(name, seconds)``
    per run. ``out/times.json`` keeps the entries of chapters not run this time (``only``)."""
    out.mkdir(parents=True, exist_ok=True)
    mode = "fast" if fast else "full"
    if fast:
        os.environ["TOAP_FAST"] = "1"
    else:
        os.environ.pop("TOAP_FAST", None)
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # PNG figures into the pages
    paths = sorted(notebooks.glob("*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.name.startswith(o) for o in only)]
        if not paths:
            raise SystemExit(f"no notebook in {notebooks} starts with {only}")
    record = _read_times(out)
    chapters = record.get("chapters", {})
    exporter = HTMLExporter()
    times = []
    for n, path in enumerate(paths, 1):
        digest = source_hash(path)
        nb = nbformat.read(path, as_version=4)
        log.info("[%d/%d] running %s (%s size)", n, len(paths), path.name, mode)
        ex = BookExecutor(timeout=timeout, kernel_name="python3")
        t = time.perf_counter()
        ex.preprocess(nb, {"metadata": {"path": str(notebooks)}, "book_name": path.name})
        seconds = time.perf_counter() - t
        times.append((path.stem, seconds))
        title = _title_and_goals(nb)[0] or path.stem
        body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": f"toap-kit: {title}"}})
        _write(out / f"{path.stem}.html", _stamp(_shared_css(shrink_pngs(body), out), path.stem, digest, mode, seconds))
        chapters[path.stem] = {
            "seconds": round(seconds, 1), "mode": mode, "sha256": digest,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "cells": [{"index": i, "id": nb.cells[i].get("id"), "seconds": round(s, 2)}
                      for i, s in sorted(ex.cell_seconds.items())],
            "skipped": [{"index": i, "id": nb.cells[i].get("id")} for i in ex.skipped]}
        record.update(mode=mode, date=datetime.datetime.now().isoformat(timespec="seconds"),
                      machine={"cores": os.cpu_count(), "platform": platform.platform(),
                               "python": platform.python_version()},
                      chapters=dict(sorted(chapters.items())))
        _write(out / "times.json", json.dumps(record, indent=1) + "\n")
        slow = sorted(ex.cell_seconds.items(), key=lambda kv: -kv[1])[:3]
        log.info("[%d/%d] %s: %s (slowest cells: %s)", n, len(paths), path.name, _fmt_seconds(seconds),
                 ", ".join(f"{i}: {s:.0f} s" for i, s in slow) or "none")
    entries = []
    for path in sorted(notebooks.glob("*.ipynb")):
        if (out / f"{path.stem}.html").is_file():
            title, goals = _title_and_goals(nbformat.read(path, as_version=4))
            ch = chapters.get(path.stem, {})
            when = (f" <small>({_fmt_seconds(ch['seconds'])} to run, {ch['mode']} size)</small>"
                    if "seconds" in ch else "")
            entries.append(f'<li><a href="{path.stem}.html">{html.escape(title or path.stem)}</a>{when}'
                           f'<p>{html.escape(goals)}</p></li>')
    total = sum(ch.get("seconds", 0) for ch in chapters.values())
    cores = record.get("machine", {}).get("cores")
    index = ("<!doctype html><html><head><meta charset='utf-8'><title>toap-kit: the course</title>"
             "<style>body{font-family:sans-serif;max-width:50em;margin:2em auto;line-height:1.4}"
             "li{margin-bottom:1em}p{margin:.2em 0;color:#444}small{color:#666}</style></head><body>"
             "<h1>toap-kit: the course</h1><p>Executed notebooks, "
             f"{'fast mode (TOAP_FAST=1)' if fast else 'full size'}, built {time.strftime('%Y-%m-%d %H:%M')}"
             f"{f' on {cores} CPU cores' if cores else ''}, {_fmt_seconds(total)} in all. "
             "Cells that launch a live server are shown, not run. "
             "Run the notebooks yourself with <code>make lab</code>.</p><ol>" + "".join(entries) + "</ol></body></html>")
    _write(out / "index.html", index)
    used = {m for page in out.glob("*.html") for m in re.findall(r'href="(style-[0-9a-f]+\.css)"', page.read_text())}
    for css in out.glob("style-*.css"):
        if css.name not in used:
            css.unlink()  # a stylesheet no page links any more (nbconvert's theme changed)
    return times


def times_table(out: Path = ROOT / "book") -> str:
    """The chapter times of ``out/times.json`` as a markdown table, then a one-line README
    sentence (the README's "Notebooks" section states it)."""
    record = _read_times(out)
    chapters = record.get("chapters", {})
    if not chapters:
        raise SystemExit(f"no chapter times in {out / 'times.json'}: run make book first")
    cores = record.get("machine", {}).get("cores", "?")
    lines = ["| chapter | mode | time | slowest cell |", "|---|---|---|---|"]
    for stem, ch in chapters.items():
        slow = max(ch.get("cells", []), key=lambda c: c["seconds"], default=None)
        slow_text = f"{slow['seconds']:.0f} s (cell {slow['index']})" if slow else "-"
        lines.append(f"| `{stem}` | {ch['mode']} | {_fmt_seconds(ch['seconds'])} | {slow_text} |")
    total = sum(ch["seconds"] for ch in chapters.values())
    modes = {ch["mode"] for ch in chapters.values()}
    mode = modes.pop() if len(modes) == 1 else "mixed"
    sentence = (f"{_fmt_seconds(total)} on {cores} CPU cores ({'full size' if mode == 'full' else mode + ' mode'}; "
                + ", ".join(f"{stem[:2]} {_fmt_seconds(ch['seconds'])}" for stem, ch in chapters.items()) + ")")
    return "\n".join(lines) + "\n\n" + sentence + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "book", help="output folder (default: book/)")
    p.add_argument("--fast", action="store_true", help="fast mode (TOAP_FAST=1), as in the tests")
    p.add_argument("--only", nargs="*", help="only notebooks whose name starts with these prefixes")
    p.add_argument("--times-table", action="store_true",
                   help="print OUT/times.json's chapter times as a markdown table and a README sentence; run nothing")
    args = p.parse_args()
    if args.times_table:
        print(times_table(args.out), end="")
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    times = build(args.out, args.fast, args.only)
    log.info("done: %s; total %s; open %s", ", ".join(f"{n} {_fmt_seconds(s)}" for n, s in times),
             _fmt_seconds(sum(s for _, s in times)), args.out / "index.html")


if __name__ == "__main__":
    main()
