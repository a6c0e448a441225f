"""Render the course: execute every notebook and write it, figures included, to static HTML.

    python docs/build_book.py [--out book] [--fast] [--only 01 02]
    python docs/build_book.py --refresh [--out book]      # rewrite the rendered pages, run nothing
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

- Offline: a page loads nothing from outside the book (a classroom has no internet). nbconvert's
  template loads MathJax 2.7.7 and require.js from cdnjs, the widgets' renderer from unpkg and
  mermaid from cdnjs; ``offline`` rewrites each page to load ``OUT/vendor/`` instead: MathJax
  2.7.7 (the version the template is written for, so formulas render as they did online) cut to
  what its ``TeX-AMS_CHTML-full`` configuration loads (the combined config, the CommonHTML output
  and its TeX fonts as woff, the TeX extensions, the element and localisation files: about
  1.5 MB of the package's 71 MB), and ``@jupyter-widgets/html-manager``'s self-contained
  ``embed.js`` (the saved sliders, progress bars and interact outputs; it needs no require.js,
  which goes); mermaid is dropped from pages without a diagram (none has one). ``vendor`` fetches
  both once with ``npm pack`` (a package registry, as pip), checks each tarball against its
  pinned sha512 (``VENDOR``), unpacks only those files and records their sha256 in
  ``OUT/vendor/vendor.json``; a book folder other than ``book/`` copies the committed
  ``book/vendor/``. Why not pre-render the formulas at build time (MathJax in node, SVG in the
  page)? It needs node and a MathJax 3 install at every build, re-implements the template's
  ``$``-delimiter rules outside the browser, and grows every page; the shipped MathJax is the
  template's own renderer, a fixed 1.5 MB shared by every page, and the widgets need their
  renderer anyway.
- Stamp: each page says, at its top, how and when it was executed, and its notebook's source
  hash (first 12 hex digits; the whole one is in ``<meta name="toap-source-sha256">``).
- ``--refresh`` rewrites the pages already in ``OUT`` without executing anything (a full-size
  render runs every chapter again: ``times.json`` has their times): each page is made offline and restamped, and the index is
  written again. A page whose notebook changed in its markdown cells only (every code cell's
  source as on the page, the same cells in the same order) gets those cells re-rendered by
  nbconvert from the notebook and takes the new source hash, its stamp saying when the text was
  re-rendered; a page whose code changed is left as it is, with a warning naming the
  ``--only`` run it needs (``tests/test_book.py`` keeps failing on it).
- Index: each chapter's goals in full, as the notebook states them (the **Goals.** paragraph and
  the list it introduces; citations in parentheses are left to the page), formulas included.

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
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from fnmatch import fnmatch
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter
from nbconvert.preprocessors import ExecutePreprocessor
from nbclient.output_widget import OutputWidget

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SLOW_CELL_S = 30.0
"""A code cell that runs longer than this gets its own log line with its time."""
SKIP_TAG, SKIP_COMMENT = "nbval-skip", "# NBVAL_SKIP"
SKIP_NOTE = ("Not run in the static page: this cell launches a live server (it is tagged nbval-skip). "
             "Run it yourself in the notebook (make lab).")
SOURCE_META = "toap-source-sha256"
STAMP_CLASS = "toap-stamp"
log = logging.getLogger("book")

VENDOR_DIR = "vendor"
MATHJAX_CONFIG = "TeX-AMS_CHTML-full,Safe"
"""The MathJax configuration nbconvert's template asks for; the vendored files are what it loads."""
VENDOR: dict[str, dict] = {
    "mathjax": {
        "package": "mathjax", "version": "2.7.7", "folder": "mathjax-2.7.7",
        "integrity": "sha512-OOl0B2/0tSJAtAZarXnQuLDBLgTNRqiI9VqHTQzPsxf4okT2iIpDrvaklK9x2QEMD1sDj4yRn11Ygci41DxMAQ==",
        "files": ("LICENSE", "MathJax.js", "config/TeX-AMS_CHTML-full.js", "config/Safe.js", "extensions/*.js",
                  "extensions/TeX/*.js", "jax/input/TeX/*.js", "jax/element/mml/*.js", "jax/element/mml/optable/*.js",
                  "jax/output/CommonHTML/*.js", "jax/output/CommonHTML/autoload/*.js",
                  "jax/output/CommonHTML/fonts/TeX/*.js", "fonts/HTML-CSS/TeX/woff/*.woff", "localization/en/*.js"),
    },
    "widgets": {
        "package": "@jupyter-widgets/html-manager", "version": "1.0.15", "folder": "html-manager-1.0.15",
        "integrity": "sha512-5thBIV6ymNgmPVOHvzx+gGy8ZSKmSazhtGw4/c4xJDVzRhG9PTeQsRjF3FUTopvFi//SABeNz1yp47bCrJ3CQA==",
        "files": ("package.json", "dist/embed.js", "dist/embed.js.LICENSE.txt", "dist/*.woff2"),
    },
}
"""What the pages load, from npm (``vendor``): package, version, the tarball's sha512 (npm's
``integrity``), the folder under ``OUT/vendor/`` and the files kept (globs, ``*`` within one folder)."""
MATHJAX_SRC = f"{VENDOR_DIR}/{VENDOR['mathjax']['folder']}/MathJax.js?config={MATHJAX_CONFIG}"
WIDGETS_SRC = f"{VENDOR_DIR}/{VENDOR['widgets']['folder']}/dist/embed.js"


def _write(path: Path, text: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- the vendored files (offline pages)
def _kept(name: str, globs: tuple[str, ...]) -> bool:
    """Whether package path ``name`` matches one of ``globs`` (``*`` never crosses a ``/``)."""
    parts = name.split("/")
    return any(len(g.split("/")) == len(parts) and all(fnmatch(a, b) for a, b in zip(parts, g.split("/")))
               for g in globs)


def _vendor_manifest(out: Path) -> dict:
    try:
        return json.loads((out / VENDOR_DIR / "vendor.json").read_text())
    except (OSError, ValueError):
        return {}


def vendor_missing(out: Path) -> list[str]:
    """What of ``OUT/vendor/`` is missing or differs from ``vendor.json`` and ``VENDOR`` (empty:
    every page's local MathJax and widget renderer are there)."""
    manifest, bad = _vendor_manifest(out), []
    for key, spec in VENDOR.items():
        entry = manifest.get(key, {})
        if any(entry.get(k) != spec[k] for k in ("package", "version", "integrity", "folder")) or not entry.get("files"):
            bad.append(f"{key}: not in {VENDOR_DIR}/vendor.json as {spec['package']}@{spec['version']}")
            continue
        folder = out / VENDOR_DIR / spec["folder"]
        for name, digest in entry["files"].items():
            path = folder / name
            if not path.is_file() or _sha256(path.read_bytes()) != digest:
                bad.append(f"{VENDOR_DIR}/{spec['folder']}/{name}")
    return bad


def _npm_pack(spec: dict, tmp: Path, npm: str) -> Path:
    """``npm pack`` ``spec``'s package into ``tmp``, checked against its pinned sha512."""
    if shutil.which(npm) is None:
        raise RuntimeError(f"`{npm}` is not installed and {VENDOR_DIR}/ is incomplete: install Node.js's npm "
                           "(Debian: apt-get install npm) to fetch MathJax and the widgets' renderer once")
    name = f"{spec['package']}@{spec['version']}"
    log.info("npm pack %s", name)
    run = subprocess.run([npm, "pack", name, "--pack-destination", str(tmp), "--silent"], capture_output=True,
                         text=True, env={**os.environ, "npm_config_update_notifier": "false"})
    tgz = list(tmp.glob("*.tgz"))
    if run.returncode or len(tgz) != 1:
        raise RuntimeError(f"npm pack {name} failed: {(run.stderr or run.stdout).strip()[-500:]}")
    got = "sha512-" + base64.b64encode(hashlib.sha512(tgz[0].read_bytes()).digest()).decode("ascii")
    if got != spec["integrity"]:
        raise RuntimeError(f"{tgz[0].name}: sha512 {got} is not the pinned {spec['integrity']} (VENDOR)")
    return tgz[0]


def vendor(out: Path, npm: str = "npm", source: Path | None = None) -> Path:
    """Put the files the pages load (``VENDOR``) into ``OUT/vendor/``, each package in its folder,
    with ``vendor.json`` (package, version, sha512, each file's sha256). Nothing to do when they
    are there; else copied from ``source`` (default: the committed ``book/``) when it has them,
    else fetched with ``npm pack`` and checked. Folders of other versions are removed."""
    root = out / VENDOR_DIR
    if not vendor_missing(out):
        return root
    source = ROOT / "book" if source is None else source
    root.mkdir(parents=True, exist_ok=True)
    if source.resolve() != out.resolve() and (source / VENDOR_DIR).is_dir() and not vendor_missing(source):
        part = out / (VENDOR_DIR + ".part")
        shutil.rmtree(part, ignore_errors=True)
        shutil.copytree(source / VENDOR_DIR, part)
        shutil.rmtree(root)
        part.rename(root)
        return root
    manifest = {}
    for key, spec in VENDOR.items():
        folder = root / spec["folder"]
        with tempfile.TemporaryDirectory(prefix="toap-book-npm-") as tmp:
            tgz = _npm_pack(spec, Path(tmp), npm)
            part = folder.with_name(folder.name + ".part")
            shutil.rmtree(part, ignore_errors=True)
            files = {}
            with tarfile.open(tgz) as tar:
                for member in tar.getmembers():
                    name = member.name.removeprefix("package/")
                    if not member.isfile() or ".." in name.split("/") or not _kept(name, spec["files"]):
                        continue
                    data = tar.extractfile(member).read()
                    (part / name).parent.mkdir(parents=True, exist_ok=True)
                    (part / name).write_bytes(data)
                    files[name] = _sha256(data)
            missing = [g for g in spec["files"] if not any(_kept(n, (g,)) for n in files)]
            if missing:
                raise RuntimeError(f"{spec['package']}@{spec['version']} has nothing for {missing}")
            if folder.exists():
                shutil.rmtree(folder)
            part.rename(folder)
        manifest[key] = {k: spec[k] for k in ("package", "version", "integrity", "folder")}
        manifest[key]["files"] = dict(sorted(files.items()))
    for stale in root.iterdir():
        if stale.is_dir() and stale.name not in {s["folder"] for s in VENDOR.values()}:
            shutil.rmtree(stale)
    _write(root / "vendor.json", json.dumps(manifest, indent=1) + "\n")
    return root


_REQUIRE = re.compile(r'<script src="(?:https?:)?//[^"]*/require(?:\.min)?\.js"></script>\s*')
_WIDGETS = re.compile(r"<script>\s*\(function\(\) \{\s*function addWidgetsRenderer\(\).*?</script>\s*", re.S)
_MATHJAX = re.compile(r'<script src="(?:https?:)?//[^"]*/mathjax/[^"]*/(?:latest|MathJax)\.js\?config=([^"]*)">\s*</script>')
_MERMAID = re.compile(r'<script type="module">(?:(?!</script>).)*?mermaid(?:(?!</script>).)*</script>\s*', re.S)


def offline(page: str) -> str:
    """``page`` (an nbconvert page) loading only files of the book: MathJax from
    ``vendor/`` (``MATHJAX_SRC``), the widgets' renderer from ``vendor/`` (``WIDGETS_SRC``; none
    where the page has no widget), no require.js, no mermaid loader where the page has no diagram.
    Idempotent; a page that still loads something from outside is logged (``external_loads``)."""
    def mathjax(m: re.Match) -> str:
        if m.group(1) != MATHJAX_CONFIG:
            raise ValueError(f"the page asks MathJax for config={m.group(1)}; {VENDOR_DIR}/ holds {MATHJAX_CONFIG}")
        return f'<script src="{MATHJAX_SRC}"></script>'

    page = _REQUIRE.sub("", page)
    widgets = 'application/vnd.jupyter.widget-view+json' in page
    page = _WIDGETS.sub(lambda m: f'<script defer src="{WIDGETS_SRC}"></script>\n' if widgets else "", page, count=1)
    page = _MATHJAX.sub(mathjax, page, count=1)
    if 'class="jp-Mermaid"' not in page:
        page = _MERMAID.sub("", page, count=1)
    outside = external_loads(page)
    if outside:
        log.error("the page still loads from outside the book: %s", ", ".join(outside))
    return page


_LOADS = re.compile(r"<(?:script|link|img|iframe|source|audio|video|embed|object)\b[^>]*?\s(?:src|href|data)\s*=\s*"
                    r"[\"']?((?:https?:)?//[^\"'\s>]+)", re.I)
_INLINE = re.compile(r"<(script|style)\b([^>]*)>(.*?)</\1>", re.S | re.I)
_DATA_TYPES = ("application/vnd.jupyter.widget-state+json", "application/vnd.jupyter.widget-view+json",
               "application/json", "math/tex", "text/x-mathjax-config")


def external_loads(page: str) -> list[str]:
    """The URLs outside the book that ``page`` would load: in a ``src``/``href``/``data`` of a
    tag that loads (script, link, img, iframe, ...), or written in an inline script or style
    (``import("https://...")``, ``url(https://...)``); the saved widget state and math are data,
    not code, and are not read. A link in the text (``<a href>``) loads nothing and is not listed."""
    found = [m.group(1) for m in _LOADS.finditer(page)]
    for m in _INLINE.finditer(page):
        kind = re.search(r'type="([^"]*)"', m.group(2))
        if kind and kind.group(1).split(";")[0] in _DATA_TYPES:
            continue
        code = re.sub(r"/\*.*?\*/", "", m.group(3), flags=re.S)  # comments load nothing
        if m.group(1).lower() == "style":
            found += re.findall(r"(?:@import\s*(?:url\()?|url\()\s*[\"']?((?:https?:)?//[^\"')\s;]+)", code)
        else:
            code = re.sub(r"(?<![:\"'\\\w])//[^\n]*", "", code)
            found += re.findall(r"(?:https?:)?//[\w-]+(?:\.[\w-]+)+[^\s\"'<>)`]*", code)
    return list(dict.fromkeys(found))


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


class _PageOutputWidget(OutputWidget):
    """nbclient's stand-in for an ``ipywidgets.Output`` that keeps the outputs for the page
    without echoing them to the kernel. nbclient's own sends the widget's whole state back on
    the shell channel at every output, unawaited, while it waits on that channel for the
    cell's reply; a large figure in an interactive output (07's explorer) then stalls the
    build for good (jupyter/nbclient#312). A static page needs only the recorded
    ``widget_state``, which ``output`` still keeps."""

    def sync_state(self) -> None:
        pass


class BookExecutor(ExecutePreprocessor):
    """``ExecutePreprocessor`` that leaves skipped cells unrun (with a note), times every code
    cell (``cell_seconds``: index -> seconds), logs slow cells, shows a tqdm bar over the cells
    and records ``Output`` widgets with ``_PageOutputWidget``."""

    def on_comm_open_jupyter_widget(self, msg):
        self.widget_registry["@jupyter-widgets/output"] = {"OutputModel": _PageOutputWidget}
        return super().on_comm_open_jupyter_widget(msg)

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


_CITATION = re.compile(r"\s*\((?:[^()]|\([^()]*\))*?(?:arXiv|\b(?:19|20)\d\d\b)(?:[^()]|\([^()]*\))*\)")
"""A parenthesis that cites a paper (it names arXiv or a year): the page keeps it, the index does not."""


def _blocks(text: str) -> list[str]:
    """Markdown ``text`` split into blocks at blank lines."""
    return [b for b in re.split(r"\n\s*\n", text) if b.strip()]


def _title_and_goals(nb: nbformat.NotebookNode) -> tuple[str, str]:
    """The first markdown cell's heading, and its goals as markdown: from the paragraph that
    opens with **Goals.** (else the first one) through the numbered list it introduces. A
    paragraph ending in a full stop ends the goals unless a list or a code block follows its
    colon or its "This notebook"; citations in parentheses are dropped (the page has them)."""
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        lines = cell.source.strip().splitlines()
        title = lines[0].lstrip("# ").strip() if lines else ""
        blocks = _blocks("\n".join(lines[1:]))
        start = next((i for i, b in enumerate(blocks) if b.lstrip().startswith("**Goals")), 0)
        taken: list[str] = []
        for block in blocks[start:]:
            taken.append(block)
            if re.search(r"^\s*1\. ", block, re.M):
                break  # the numbered list of goals: the end of them
            listed = all(re.match(r"\s*(?:[-*] |\d+\. |    )", line) or not line.strip() for line in block.splitlines())
            if not listed and block.rstrip().endswith((".", ".)")):
                break  # a whole paragraph that introduces nothing
        goals = _CITATION.sub("", "\n\n".join(taken)).strip()
        return title, goals
    return "", ""


def _fmt_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


def _fmt_date(iso: str) -> str:
    """``2026-12-06T01:47:12`` -> ``2026-12-06 01:47``."""
    return iso[:16].replace("T", " ")


def _stamp(body: str, stem: str, digest: str, mode: str, seconds: float, date: str,
           refreshed: str | None = None) -> str:
    """The exported page with its source's hash, mode and render date in ``<head>`` (meta tags)
    and a visible note at the top of ``<body>``: how and when it was executed, the notebook and
    the first 12 hex digits of its source hash (and when its text was re-rendered, if it was)."""
    meta = (f'<meta name="{SOURCE_META}" content="{digest}">\n'
            f'<meta name="toap-source" content="notebooks/{stem}.ipynb">\n'
            f'<meta name="toap-mode" content="{mode}">\n'
            f'<meta name="toap-rendered" content="{date}">\n'
            + (f'<meta name="toap-text-refreshed" content="{refreshed}">\n' if refreshed else "")
            + f"<!-- rendered from notebooks/{stem}.ipynb sha256={digest} by docs/build_book.py -->\n")
    body = body.replace("<head>", "<head>\n" + meta, 1) if "<head>" in body else meta + body
    how = ("executed at full size in {t} by <code>make book</code>" if mode == "full" else
           "executed in fast mode (TOAP_FAST=1, the tests' sizes: its numbers differ from the README's "
           "full-size tables) in {t} by <code>docs/build_book.py --fast</code>; <code>make book</code> "
           "renders it at full size").format(t=_fmt_seconds(seconds))
    again = (f"; text re-rendered on {_fmt_date(refreshed)} from the notebook, whose code cells had not changed "
             "(<code>docs/build_book.py --refresh</code>)" if refreshed else "")
    note = (f'<p class="{STAMP_CLASS}" style="font:13px sans-serif;color:#555;margin:1em 2em">'
            f'<a href="index.html">the course</a> &middot; {how}, on {_fmt_date(date)}; source '
            f'<code>notebooks/{stem}.ipynb</code>, sha256 <code>{digest[:12]}</code>{again}; '
            "run it yourself with <code>make lab</code></p>")
    return re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + note, body, count=1)


_OLD_STAMP = re.compile(r'(<body[^>]*>)<p (?:class="toap-stamp" )?style="font:13px sans-serif;color:#555;'
                        r'margin:1em 2em">.*?</p>', re.S)


def _unstamp(page: str) -> str:
    """``page`` without what ``_stamp`` (this one or an earlier one) added."""
    page = re.sub(r'<head>\n(?:<meta name="toap-[\w-]+" content="[^"]*">\n)+'
                  r"(?:<!-- rendered from notebooks/\S+ sha256=[0-9a-f]+ by docs/build_book.py -->\n)?", "<head>", page, count=1)
    return _OLD_STAMP.sub(lambda m: m.group(1), page, count=1)


def page_meta(page: str, name: str) -> str | None:
    """The content of the page's ``<meta name=NAME>``."""
    m = re.search(rf'<meta name="{re.escape(name)}" content="([^"]*)">', page)
    return m.group(1) if m else None


# ---------------------------------------------------------------- re-rendering a page's text
_CELL = re.compile(r'<div class="jp-Cell [^"]*" id="cell-id=([^"]+)">')
_CODE = re.compile(r'<div class="jp-InputArea jp-Cell-inputArea">.*?<pre>(.*?)</pre>', re.S)


def _split_cells(page: str) -> tuple[str, list[tuple[str, str]], str] | None:
    """``(head, [(cell id, its HTML), ...], tail)`` of an nbconvert page (``head + cells + tail``
    is the page), or None if it has no ``<main>`` of cells with ids."""
    start, end = page.find("<main>"), page.rfind("</main>")
    if start < 0 or end < start:
        return None
    found = list(_CELL.finditer(page, start, end))
    if not found:
        return None
    cells = [(m.group(1), page[m.start():(found[i + 1].start() if i + 1 < len(found) else end)])
             for i, m in enumerate(found)]
    return page[:found[0].start()], cells, page[end:]


def _page_code(html_cell: str) -> str | None:
    m = _CODE.search(html_cell)
    return html.unescape(re.sub(r"<[^>]+>", "", m.group(1))) if m else None


def refresh_text(page: str, nb: nbformat.NotebookNode, exporter: HTMLExporter | None = None) -> str | None:
    """``page`` with its markdown cells re-rendered from notebook ``nb`` (nbconvert, one cell at a
    time), or None when that would not give the page of ``nb``: cells added, removed or
    reordered, or a code cell whose source differs from the page's (its outputs would be stale)."""
    split = _split_cells(page)
    if split is None:
        return None
    head, cells, tail = split
    if [c.get("id") for c in nb.cells] != [cid for cid, _ in cells]:
        return None
    exporter = exporter or HTMLExporter()
    out = []
    for cell, (cid, old) in zip(nb.cells, cells):
        if cell.cell_type == "code":
            if (_page_code(old) or "").strip("\n") != cell.source.strip("\n"):
                return None
            out.append(old)
            continue
        one = nbformat.v4.new_notebook(metadata=nb.metadata, cells=[cell])
        rendered = _split_cells(exporter.from_notebook_node(one)[0])
        if rendered is None or len(rendered[1]) != 1:
            return None
        new = rendered[1][0][1]
        out.append(new.rstrip() + old[len(old.rstrip()):])
    title = _title_and_goals(nb)[0]
    head = re.sub(r"<title>[^<]*</title>", lambda m: f"<title>toap-kit: {html.escape(title, quote=False)}</title>",
                  head, count=1) if title else head
    return head + "".join(out) + tail


# ---------------------------------------------------------------- the index
def write_index(out: Path, notebooks: Path, record: dict) -> None:
    """``OUT/index.html``: every rendered chapter with its goals (``_title_and_goals``, rendered
    with the pages' MathJax) and its time, and how and when the book was rendered."""
    from nbconvert.filters.markdown_mistune import markdown2html_mistune

    chapters = record.get("chapters", {})
    entries = []
    for path in sorted(notebooks.glob("*.ipynb")):
        if (out / f"{path.stem}.html").is_file():
            title, goals = _title_and_goals(nbformat.read(path, as_version=4))
            ch = chapters.get(path.stem, {})
            when = (f" <small>({_fmt_seconds(ch['seconds'])} to run, {ch['mode']} size)</small>"
                    if "seconds" in ch else "")
            entries.append(f'<li><a href="{path.stem}.html">{html.escape(title or path.stem)}</a>{when}'
                           f'<div class="goals">{markdown2html_mistune(goals)}</div></li>\n')
    total = sum(ch.get("seconds", 0) for ch in chapters.values())
    cores = record.get("machine", {}).get("cores")
    modes = {ch.get("mode") for ch in chapters.values()}
    size = {"full": "full size", "fast": "fast mode (TOAP_FAST=1)"}.get(modes.pop(), "") if len(modes) == 1 else \
        "mixed sizes (each chapter says its own)"
    when = f", last executed {_fmt_date(record['date'])}" if record.get("date") else ""
    index = ("<!doctype html><html><head><meta charset='utf-8'><title>toap-kit: the course</title>"
             "<style>body{font-family:sans-serif;max-width:50em;margin:2em auto;line-height:1.4}"
             "body>ol>li{margin-bottom:1em}.goals{color:#444}.goals p,.goals ol,.goals ul,.goals pre{margin:.2em 0}"
             ".goals li{margin:0}"
             "small{color:#666}</style>\n"
             "<script type=\"text/x-mathjax-config\">MathJax.Hub.Config({tex2jax: {inlineMath: [['$','$'], "
             "['\\\\(','\\\\)']], processEscapes: true}, messageStyle: 'none'});</script>\n"
             f'<script src="{MATHJAX_SRC}"></script>\n</head><body>'
             f"<h1>toap-kit: the course</h1><p>Executed notebooks, {size}{when}"
             f"{f' on {cores} CPU cores' if cores else ''}, {_fmt_seconds(total)} in all. "
             "Cells that launch a live server are shown, not run. Every page works offline. "
             "Run the notebooks yourself with <code>make lab</code>.</p><ol>\n" + "".join(entries)
             + "</ol></body></html>\n")
    _write(out / "index.html", index)


def _prune_css(out: Path) -> None:
    used = {m for page in out.glob("*.html") for m in re.findall(r'href="(style-[0-9a-f]+\.css)"', page.read_text())}
    for css in out.glob("style-*.css"):
        if css.name not in used:
            css.unlink()  # a stylesheet no page links any more (nbconvert's theme changed)


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
    vendor(out)  # before the hour of execution: fails at once without npm when book/vendor/ is incomplete
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
        date = datetime.datetime.now().isoformat(timespec="seconds")
        page = offline(_shared_css(shrink_pngs(body), out))
        _write(out / f"{path.stem}.html", _stamp(page, path.stem, digest, mode, seconds, date))
        chapters[path.stem] = {
            "seconds": round(seconds, 1), "mode": mode, "sha256": digest, "date": date,
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
    record["chapters"] = dict(sorted(chapters.items()))
    write_index(out, notebooks, record)
    _prune_css(out)
    return times


def refresh(out: Path = ROOT / "book", notebooks: Path = NOTEBOOKS) -> dict[str, str]:
    """Rewrite the pages already rendered in ``out`` without executing anything: each made offline
    (``offline``, with ``vendor``) and stamped again (its source hash, mode, time and render date
    kept from the page and ``times.json``); a page whose notebook changed in its markdown cells
    only gets them re-rendered (``refresh_text``) and the new source hash, in the page and in
    ``times.json``; then the index. Returns, per chapter, what was done ("restamped",
    "text re-rendered", or "stale: ..." for a page whose code changed, which is left unchanged)."""
    vendor(out)
    exporter = HTMLExporter()
    done: dict[str, str] = {}
    refreshed_now: dict[str, dict] = {}
    chapters = _read_times(out).get("chapters", {})
    for path in sorted(notebooks.glob("*.ipynb")):
        page_path = out / f"{path.stem}.html"
        if not page_path.is_file():
            continue
        page = page_path.read_text(encoding="utf-8")
        ch = chapters.get(path.stem, {})
        digest, mode = page_meta(page, SOURCE_META), page_meta(page, "toap-mode") or ch.get("mode", "full")
        date = page_meta(page, "toap-rendered") or ch.get("date") or ""
        refreshed = page_meta(page, "toap-text-refreshed") or ch.get("text_refreshed")
        if digest is None:
            done[path.stem] = "stale: the page has no source hash; run make book"
            log.warning("%s: %s", page_path.name, done[path.stem])
            continue
        now = source_hash(path)
        if digest != now:
            text = refresh_text(page, nbformat.read(path, as_version=4), exporter)
            if text is None:
                done[path.stem] = (f"stale: notebooks/{path.name}'s code or cells changed since the page was "
                                   f"rendered; run python docs/build_book.py --only {path.stem[:2]} (or make book)")
                log.warning("%s: %s", page_path.name, done[path.stem])
                continue
            page, digest = text, now
            refreshed = datetime.datetime.now().isoformat(timespec="seconds")
            refreshed_now[path.stem] = {"sha256": now, "text_refreshed": refreshed}
            done[path.stem] = "text re-rendered"
        else:
            done[path.stem] = "restamped"
        page = _stamp(offline(_unstamp(page)), path.stem, digest, mode, ch.get("seconds", 0.0), date, refreshed)
        _write(page_path, page)
        log.info("%s: %s", page_path.name, done[path.stem])
    record = _read_times(out)  # read again just before writing: another build may have added a chapter
    for stem, update in refreshed_now.items():
        record.setdefault("chapters", {}).setdefault(stem, {}).update(update)
    if refreshed_now:
        _write(out / "times.json", json.dumps(record, indent=1) + "\n")
    write_index(out, notebooks, record)
    _prune_css(out)
    return done


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
    p.add_argument("--refresh", action="store_true",
                   help="rewrite the pages in OUT without running them: offline, stamped, markdown-only changes "
                        "re-rendered, the index again")
    args = p.parse_args()
    if args.times_table:
        print(times_table(args.out), end="")
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.refresh:
        done = refresh(args.out)
        stale = [f"{stem}: {what}" for stem, what in done.items() if what.startswith("stale")]
        log.info("refreshed %d pages; %s", len(done), "; ".join(stale) or "none stale")
        if stale:
            raise SystemExit(1)
        return
    times = build(args.out, args.fast, args.only)
    log.info("done: %s; total %s; open %s", ", ".join(f"{n} {_fmt_seconds(s)}" for n, s in times),
             _fmt_seconds(sum(s for _, s in times)), args.out / "index.html")


if __name__ == "__main__":
    main()
