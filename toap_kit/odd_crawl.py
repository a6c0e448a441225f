"""A corpus of bad or odd inputs for ``toap crawl`` and ``toap search``, and its runner (issue 28).

``run_odd_crawl(folder)`` builds the cases under ``folder`` from the shipped 250x250 photos and
runs each through the real command line in child processes (``odd_calls.toap``: a strict UTF-8
stdout, a time limit a call; as root without the capabilities that pass over permissions):

- odd file names (apostrophes, a Milvus filter, newlines, tabs, bytes that are not UTF-8, very
  long, 40 folders deep, ...) on a FAISS file and on Milvus Lite: indexed, found at distance 0
  under their name, skipped by the rerun; a search by such a photo as text and as JSON;
- odd files in one crawl: empty, truncated, not images, bombs, GIFs, FIFOs, links (to nothing, to a
  photo, to its own folder), 16-bit, CMYK, EXIF-rotated, no face, two faces, hidden, unreadable,
  a folder that may not be listed, a path longer than the system takes;
- bad URIs and options; index locations that cannot be used (a file in the way, a plain file or
  the user's folder where Milvus Lite keeps its folder, read-only folders, damaged sidecars, a
  FAISS file of another bit width, another engine);
- two crawls at once, a search beside a crawl, a crawl killed half-way and rerun (both backends);
- stale files: deleted (counted, then pruned), renamed, rewritten with their old size and time,
  touched, behind a folder that may not be listed.

Each case is classified (``run_odd_crawl``'s docstring) and ``folder/inputs`` is checked byte for
byte afterwards. ``python -m toap_kit.bench protect`` reports the counts as ``crawl_bad_inputs``.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .data import sha256_file
from .index_core import shown
from .odd_calls import CALL_LIMIT_S, Call, Child, finish, permissions_hold, refusal, spawn, toap, unfinished
from .odd_inputs import _bomb_png, _deep_folder, _encoded, _originals, _write_at, shipped_photo
from .protect import _ORIENTATION

__all__ = ["FILES", "NAMES", "run_odd_crawl", "same_size"]

log = logging.getLogger(__name__)

_IN_PROCESS = threading.RLock()  # the runner's own index and detector calls, one at a time


def _faces_of(path: str | os.PathLike, engine_name: str) -> "np.ndarray":
    """The codes of every face of a photo, as the crawler makes them (in this process)."""
    from . import crawl, protect

    with _IN_PROCESS:
        return crawl._encode(engine_name, crawl._faces(protect.open_photo(path)[0])[0])


def _top(uri: str, photo: str | os.PathLike) -> list[tuple[str, int]]:
    """``(source, hamming)`` of the best hit of each face of ``photo`` in the index at ``uri``."""
    from . import index

    with _IN_PROCESS, index.open_index(uri) as ix:
        codes = _faces_of(photo, ix.engine)
        hits = ix.search(codes, 1) if len(codes) else None
    return [] if hits is None else [(m[0].get("source"), int(d[0])) for m, d in zip(hits.meta, hits.distances)]


def _ledger(uri: str) -> dict[str, dict]:
    """The index's ledger (``FaceIndex.files``), read in this process."""
    from . import index

    with _IN_PROCESS, index.open_index(uri) as ix:
        return ix.files()


def _write(path: bytes | str | os.PathLike, content: bytes | Image.Image | Callable[[bytes], object]) -> None:
    """Make ``path`` (bytes: any name) with ``content``: bytes, an image (saved by its suffix), or
    a function that makes it (a FIFO, a link)."""
    path = os.fsencode(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if callable(content):
        content(path)
    elif isinstance(content, Image.Image):
        content.save(os.fsdecode(path))
    else:
        with open(path, "wb") as f:
            f.write(content)


def _jpeg(i: int, size: int | None = None) -> bytes:
    """Shipped photo ``i`` (resized to ``size x size`` if given) as JPEG bytes."""
    buf = io.BytesIO()
    shipped_photo(i, size).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def same_size(a: bytes, b: bytes) -> tuple[bytes, bytes]:
    """Two JPEGs of one size: the shorter padded with zeros after its end marker."""
    n = max(len(a), len(b))
    return a + bytes(n - len(a)), b + bytes(n - len(b))


# ---------------------------------------------------------------- the cases
NAMES = [("an apostrophe (O'Brien)", b"O'Brien.jpg"), ("an apostrophe in a folder name", b"Pat_O'Neil/01.jpg"),
         ("a backslash", b"back\\slash.jpg"), ("a newline", b"new\nline.jpg"), ("a carriage return", b"cr\rname.jpg"),
         ("a tab", b"tab\tname.jpg"), ("double quotes", b'double"quote.jpg'),
         ("a Milvus filter in the name", b"x'] or key like '%.jpg"), ("bytes that are not UTF-8", b"\xff\xfe.jpg"),
         ("a Latin-1 name", b"caf\xe9.jpg"), ("a folder whose name is not UTF-8", b"\xc3\x28dir/01.jpg"),
         ("Chinese folder and name", "张三/李四.jpg".encode()), ("an emoji", "smile \U0001f600.jpg".encode()),
         ("a combining accent", "e\u0301.jpg".encode()), ("a name of 250 bytes", b"n" * 246 + b".jpg"),
         ("a path 40 folders deep", b"d/" * 40 + b"deep.jpg"), ("a leading dash", b"-rf.jpg"),
         ("spaces around the name", b"  spaced  .jpg"), ("format characters", b"%s %d {} %n.jpg"),
         ("glob characters", b"[*?].jpg"), ("an upper-case suffix", b"UPPER.JPG"),
         ("a .jpeg name with dots", b"a.b.c.jpeg")]
"""Odd file names (as bytes), each given another shipped photo (another person)."""


class _Corpus:
    """The folders of one run and its report: ``inputs`` (never changed by any case), ``work``
    (folders the cases change: stale files, read-only folders), ``indexes``."""

    def __init__(self, root: Path, limit_s: float):
        self.root, self.limit_s = root, limit_s
        self.inputs, self.work, self.indexes = root / "inputs", root / "work", root / "indexes"
        for d in (self.inputs, self.work, self.indexes):
            d.mkdir(parents=True, exist_ok=True)
        self.report: list[dict] = []
        self.perms = permissions_hold()
        self._lock = threading.Lock()

    def call(self, *args) -> Call:
        """``toap ARGS`` under the run's time limit."""
        call = toap(*args, limit_s=self.limit_s)
        log.info("%.1f s: toap %s", call.seconds, " ".join(shown(a) for a in call.args)[:200])
        return call

    def add(self, case: str, outcome: str, detail: str) -> None:
        with self._lock:
            self.report.append({"case": case, "outcome": outcome, "detail": " ".join(str(detail).split())[:300]})

    def refused(self, case: str, says: str, *args) -> Call:
        call = self.call(*args)
        self.add(case, *refusal(call, says))
        return call


def _uri(c: _Corpus, name: str, backend: str) -> str:
    return str(c.indexes / f"{name}.db") if backend == "milvus-lite" else f"faiss://{c.indexes / name}.faiss"


def _tag(backend: str) -> str:
    return " (Milvus Lite)" if backend == "milvus-lite" else " (FAISS file)"


def _make_inputs(c: _Corpus) -> None:
    """The folders no case may change: ``names`` (``NAMES``), ``files`` (odd files), ``one`` (one
    photo), ``planted`` (what a user keeps where an index would go)."""
    for i, (_, raw) in enumerate(NAMES):
        _write(os.path.join(os.fsencode(c.inputs / "names"), raw), _jpeg(i % 23))
    f = c.inputs / "files"
    face = shipped_photo(0)
    two = Image.new("RGB", (500, 250), (128, 128, 128))
    two.paste(face, (0, 0))
    two.paste(shipped_photo(5, 160), (300, 45))
    rgb16 = np.asarray(face).astype(np.uint16) * 257
    exif = Image.Exif()
    exif[_ORIENTATION] = 6  # displayed turned 90 degrees clockwise
    rotated = io.BytesIO()
    face.transpose(Image.Transpose.ROTATE_90).save(rotated, "JPEG", quality=92, exif=exif.tobytes())
    frames = [shipped_photo(i, 120) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    jpg = _jpeg(1)
    for name, content in {"empty.jpg": b"", "truncated.jpg": jpg[:len(jpg) * 2 // 5], "notes.png": b"hello\n",
                          "soi.jpg": b"\xff\xd8", "bomb.png": _bomb_png(), "anim.gif": gif.getvalue(),
                          "wall.png": Image.new("RGB", (200, 150), (120, 130, 140)),
                          "dot.png": Image.new("RGB", (1, 1), (90, 60, 40)), "pipe.jpg": os.mkfifo,
                          "dangling.jpg": lambda p: os.symlink(b"nowhere.jpg", p), "real.jpg": _jpeg(2),
                          "link.jpg": lambda p: os.symlink(b"real.jpg", p), "loop": lambda p: os.symlink(b".", p),
                          "folder.jpg/in.jpg": _jpeg(3), "grey16.png": Image.fromarray(rgb16[..., 0]),
                          "rgb16.png": _encoded(rgb16, ".png"), "rotated.jpg": rotated.getvalue(), "two.jpg": two,
                          ".hidden.jpg": _jpeg(6),
                          ".private/p.jpg": _jpeg(7), "locked.jpg": _jpeg(8), "sealed/s.jpg": _jpeg(9),
                          "not-utf8-\udcfe.jpg": b"not a photo"}.items():
        _write(f / name, content)
    shipped_photo(4).convert("CMYK").save(f / "cmyk.jpg", quality=92)
    fd, _ = _deep_folder(f, 4200)  # a path longer than the system takes
    _write_at(fd, "far.jpg", jpg)
    os.close(fd)
    (f / "locked.jpg").chmod(0)
    (f / "sealed").chmod(0)
    _write(c.inputs / "one" / "a.jpg", _jpeg(10))
    p = c.inputs / "planted"
    for name, content in {"afile": b"a file, not a folder\n", "notes.db": b"my notes\n", "empty.db": b"",
                          "random.db": np.random.default_rng(0).bytes(4096), "mine.db/todo.txt": b"milk\n",
                          "adir.faiss/keep.txt": b"mine\n"}.items():
        _write(p / name, content)


FILES = [  # (case, name under inputs/files, expected: "indexed N" | "failed" | "no_face" | "left_out", says)
    ("an empty file", "empty.jpg", "failed", "empty file"),
    ("a truncated JPEG", "truncated.jpg", "failed", "truncated"),
    ("text named .png", "notes.png", "failed", "not an image file"),
    ("a JPEG start marker only", "soi.jpg", "failed", "not an image file"),
    ("a decompression-bomb header", "bomb.png", "failed", "decompression bomb"),
    ("an animated GIF", "anim.gif", "failed", "animated images are not supported"),
    ("a photo without a face", "wall.png", "no_face", None),
    ("a 1x1 image", "dot.png", "no_face", None),
    ("a FIFO named .jpg", "pipe.jpg", "failed", "not a regular file"),
    ("a link to nothing", "dangling.jpg", "failed", "link to nothing"),
    ("a photo", "real.jpg", "indexed 1", None),
    ("a link to a photo", "link.jpg", "indexed 1", None),
    ("a link to its own folder (not followed)", "loop", "left_out", None),
    ("a folder named like a photo", "folder.jpg/in.jpg", "indexed 1", None),
    ("a 16-bit greyscale PNG", "grey16.png", "indexed 1", None),
    ("a 16-bit RGB PNG", "rgb16.png", "indexed 1", None),
    ("a CMYK JPEG", "cmyk.jpg", "indexed 1", None),
    ("an EXIF-rotated JPEG", "rotated.jpg", "indexed 1", None),
    ("two faces of two sizes", "two.jpg", "indexed 2", None),
    ("a hidden file", ".hidden.jpg", "left_out", None),
    ("a photo in a hidden folder", ".private/p.jpg", "left_out", None),
    ("a file that may not be read", "locked.jpg", "failed", "Permission denied"),
    ("a folder that may not be listed", "sealed", "failed", "are not indexed"),
    ("a broken file whose name is not UTF-8", "not-utf8-\udcfe.jpg", "failed", "not an image file"),
    ("a path longer than the system takes", None, "failed", "File name too long"),
]


def _files(c: _Corpus) -> None:
    """Every odd file of ``FILES`` in one crawl (FAISS), judged one by one; the rerun's text summary
    on a strict UTF-8 stdout."""
    folder, uri = c.inputs / "files", _uri(c, "files", "faiss")
    first = c.call("crawl", folder, "--index", uri, "--json")
    broken = unfinished(first)
    if broken:
        for case, *_ in FILES:
            c.add(case, *broken)
    else:
        s, ledger = first.json(), _ledger(uri)
        failed = {f["path"]: f["reason"] for f in s["failed"]}
        for case, name, want, says in FILES:
            if name is None:  # the deep path: the one failed path under d.../
                name = next((p for p in failed if p.startswith("d" * 250)), "d" * 250)
            if not c.perms and name in ("locked.jpg", "sealed"):  # root passes over permissions here
                want, name = "indexed 1", "sealed/s.jpg" if name == "sealed" else name
            key, shown_name = name, shown(name)
            rec, reason = ledger.get(key), failed.get(shown_name)
            if want == "failed":
                if rec is not None:
                    c.add(case, "silently_wrong", f"indexed ({rec.get('faces')} faces) instead of failing")
                elif reason and "internal error" in reason:
                    c.add(case, "crash", reason)
                elif reason and (says is None or says in reason) and "\n" not in reason:
                    c.add(case, "clear_error", f"{shown_name}: {reason}")
                else:
                    c.add(case, "unexpected", f"reason {reason!r} (should say {says!r})")
            elif reason is not None:
                c.add(case, "crash" if "internal error" in reason else "unexpected", f"failed: {reason}")
            elif want == "left_out":
                seen = [k for k in [*ledger, *s["no_face"]] if k == key or k.startswith(key + "/")]
                c.add(case, *(("unexpected", f"read: {seen}") if seen else ("correct", "left out, nothing said")))
            elif want == "no_face":
                ok = shown_name in s["no_face"] and rec is not None and rec.get("faces") == 0
                c.add(case, *(("correct", "no face") if ok else ("silently_wrong", f"recorded as {rec}")))
            else:
                n = int(want.split()[1])
                ok = rec is not None and rec.get("faces") == n
                c.add(case, *(("correct", f"{n} face(s)") if ok else ("silently_wrong", f"recorded as {rec}")))
    again = c.call("crawl", folder, "--index", uri, "--no-progress")
    case = "the rerun's summary on a strict UTF-8 stdout (a failed name not UTF-8)"
    broken = unfinished(again)
    if broken:
        c.add(case, *broken)
    elif "failed: not-utf8-\\xfe.jpg: not an image file" in again.out:
        c.add(case, "correct", again.out.splitlines()[0][:200])
    else:
        c.add(case, "unexpected", again.out[:200])


def _uris(c: _Corpus) -> None:
    """Bad URIs and options: each refused in one line."""
    one, idx = c.inputs / "one", c.indexes
    photo = one / "a.jpg"
    for case, says, args in [
        ("an in-memory index for a crawl", "in-memory index keeps nothing", ["crawl", one, "--index", "faiss"]),
        ("an unknown URI scheme", "unknown index URI scheme", ["crawl", one, "--index", "foo://x"]),
        ("a path of no known kind", "cannot tell which index", ["crawl", one, "--index", idx / "faces.txt"]),
        ("a Milvus Lite path without .db", "must end in .db", ["crawl", one, "--index", "milvus://x.sqlite"]),
        ("a server URI without a host", "no host", ["crawl", one, "--index", "http://"]),
        ("an unknown URI option", "unknown option", ["crawl", one, "--index", f"faiss://{idx}/o.faiss?shards=2"]),
        ("an IVF size that is not a number", "ivf must be a positive integer",
         ["crawl", one, "--index", f"{idx}/o.faiss?ivf=zero"]),
        ("a collection name with a dash", "collection name", ["crawl", one, "--index", f"{idx}/o.db?collection=a-b"]),
        ("a server that does not answer", "cannot reach the Milvus server",
         ["crawl", one, "--index", "http://127.0.0.1:9"]),
        ("an empty index URI", "--index", ["crawl", one, "--index", ""]),
        ("an unknown engine", "unknown engine", ["crawl", one, "--index", f"{idx}/e.db", "--engine", "nope"]),
        ("a folder that does not exist", "not a folder", ["crawl", c.inputs / "nowhere", "--index", f"{idx}/n.db"]),
        ("search: no index there", "no face index at", ["search", photo, "--index", f"{idx}/none.db"]),
        ("search: a photo that is not an image", "not an image file",
         ["search", c.inputs / "files" / "notes.png", "--index", f"{idx}/none.db"]),
        ("search: --k 0", "--k", ["search", photo, "--index", f"{idx}/none.db", "--k", "0"]),
    ]:
        c.refused(case, says, *args)
    left = [p.name for p in idx.iterdir() if p.name.split(".")[0] in ("none", "o", "e", "n", "faces")]
    if left:
        c.add("refused URIs leave nothing behind", "silently_wrong", f"left {left}")
    else:
        c.add("refused URIs leave nothing behind", "correct", "no index made")


def _locations(c: _Corpus) -> None:
    """Index locations that cannot be used, and damaged indexes: refused in one line."""
    from . import crawl

    one, planted = c.inputs / "one", c.inputs / "planted"
    photo = one / "a.jpg"
    for case, says, where in [
        ("a FAISS index under a file", "is a file, not a folder", f"faiss://{planted}/afile/faces.faiss"),
        ("a Milvus Lite index under a file", "is a file, not a folder", f"{planted}/afile/sub/faces.db"),
        ("a text file at the Milvus Lite path", "is a plain file, not a Milvus Lite index", f"{planted}/notes.db"),
        ("an empty file at the Milvus Lite path", "is an empty file, not a Milvus Lite index", f"{planted}/empty.db"),
        ("random bytes at the Milvus Lite path", "is a plain file, not a Milvus Lite index", f"{planted}/random.db"),
        ("a folder of the user's at the Milvus Lite path", "is a folder that is not a Milvus Lite index",
         f"{planted}/mine.db"),
        ("a folder at the FAISS path", "is a folder, not a FAISS index file", f"faiss://{planted}/adir.faiss"),
    ]:
        c.refused(case, says, "crawl", one, "--index", where)
    c.refused("search: a text file at the Milvus Lite path", "is a plain file", "search", photo, "--index",
              f"{planted}/notes.db")
    dmg = c.work / "damaged"
    with _IN_PROCESS:
        for name, engine_name in (("array", None), ("bits", None), ("wide", "dlib_itq_64"), ("alone", None)):
            crawl.crawl_folder(one, f"faiss://{dmg}/{name}.faiss", engine_name, progress=False)
    side = dmg / "array.faiss.json"
    side.write_text(json.dumps([json.loads(side.read_text())]))
    (dmg / "bits.faiss").write_bytes((dmg / "wide.faiss").read_bytes())
    doc = json.loads((dmg / "bits.faiss.json").read_text())
    doc["index_sha256"] = sha256_file(dmg / "bits.faiss")
    (dmg / "bits.faiss.json").write_text(json.dumps(doc))
    (dmg / "alone.faiss.json").unlink()
    for case, says, args in [
        ("a sidecar that is a JSON array: crawl", "not a toap face index sidecar", ["crawl", one]),
        ("a sidecar that is a JSON array: search", "not a toap face index sidecar", ["search", photo]),
    ]:
        c.refused(case, says, *args, "--index", f"faiss://{dmg}/array.faiss")
    for case, says, args in [
        ("a FAISS file of another bit width than its sidecar: crawl", "holds 64-bit codes", ["crawl", one]),
        ("a FAISS file of another bit width than its sidecar: search", "holds 64-bit codes", ["search", photo]),
    ]:
        c.refused(case, says, *args, "--index", f"faiss://{dmg}/bits.faiss")
    c.refused("a FAISS file without its sidecar", "has no sidecar", "crawl", one, "--index", f"faiss://{dmg}/alone.faiss")
    c.refused("an index built with another engine", "built with engine 'dlib_itq_64'", "crawl", one, "--index",
              f"faiss://{dmg}/wide.faiss", "--engine", "dlib_itq_32")
    if not c.perms:
        log.info("permissions do not hold for a child here: the read-only cases are left out")
        return
    ro = c.work / "read-only"
    with _IN_PROCESS:
        for uri in (f"faiss://{ro}/old.faiss", f"{ro}/old.db"):
            crawl.crawl_folder(one, uri, progress=False)
    for p in (ro / "old.db", ro):
        p.chmod(0o555)
    for case, says, args in [
        ("a new FAISS file in a read-only folder", "is not writable", ["crawl", one, "--index", f"faiss://{ro}/n.faiss"]),
        ("a new Milvus Lite index in a read-only folder", "is not writable", ["crawl", one, "--index", f"{ro}/n.db"]),
        ("a crawl into a FAISS file in a read-only folder", "is not writable",
         ["crawl", one, "--index", f"faiss://{ro}/old.faiss"]),
        ("a search of Milvus Lite in a read-only folder", "Milvus Lite writes in its folder even to search",
         ["search", photo, "--index", f"{ro}/old.db"]),
    ]:
        c.refused(case, says, *args)
    call = c.call("search", photo, "--index", f"faiss://{ro}/old.faiss", "--json")
    case = "a search of a FAISS file in a read-only folder"
    broken = unfinished(call)
    hit = (call.json() or {}).get("faces", [{}])[0].get("results", [{}])[0] if not broken else {}
    if broken:
        c.add(case, *broken)
    elif call.rc == 0 and hit.get("source") == "a.jpg" and hit.get("hamming") == 0:
        c.add(case, "correct", "found at distance 0")
    else:
        c.add(case, "unexpected", f"exit {call.rc}: {call.error_line()[:200]}")


def _wait_for_lock(child: Child, lock_file: Path, limit_s: float) -> bool:
    """Wait until ``child`` holds the lock (its pid in ``lock_file``) or ends; True if it holds it."""
    while child.process.poll() is None and time.perf_counter() - child.started < limit_s:
        try:
            if lock_file.read_text().strip() == str(child.pid):
                return True
        except OSError:
            pass
        time.sleep(0.02)
    return False


def _remove_index(path: Path) -> None:
    """Remove a FAISS file (and its sidecar) or a Milvus Lite folder (its lock file stays)."""
    if path.is_dir():
        shutil.rmtree(path)
    for p in (path, Path(f"{path}.json")):
        p.unlink(missing_ok=True)


def _races(c: _Corpus, backend: str) -> None:
    """Two crawls at once, a search beside a crawl, a crawl killed half-way: the second run is
    refused naming the first, no row is lost or doubled, the rerun after a kill resumes."""
    crowd = c.work / f"crowd-{backend}"
    for i in range(24):
        _write(crowd / f"p{i:02d}.jpg", _jpeg(i % 23, 1000))
    tag, uri = _tag(backend), _uri(c, f"race-{backend}", backend)
    path = Path(uri.removeprefix("faiss://"))
    lock_file = path.with_name(path.name + ".lock")

    def beside(case: str, second: list, then: Callable[[dict], str | None]) -> float:
        """Run ``second`` while a crawl of the crowd holds the index; the crawl's seconds after it took the lock."""
        first = spawn("crawl", crowd, "--index", uri, "--json")
        held = _wait_for_lock(first, lock_file, c.limit_s)
        t_held = time.perf_counter()
        other = c.call(*second)
        done = finish(first, c.limit_s)
        work = first.started + done.seconds - t_held
        broken = unfinished(done) or (unfinished(other) if other.rc == 0 else None)
        if broken:
            c.add(case, *broken)
            return work
        problem = then(done.json())
        if problem:
            c.add(case, "silently_wrong", problem)
        elif other.rc == 0:
            c.add(case, "correct", f"the runs did not overlap (the first {'ended first' if held else 'never held it'})")
        else:
            c.add(case, *refusal(other, f"index in use by another run (pid {first.pid})"))
        return work

    def all_rows(s: dict) -> str | None:
        return None if s["rows"] == 24 else f"{s['rows']} rows for 24 faces"

    work = beside(f"two crawls at once{tag}", ["crawl", crowd, "--index", uri, "--json"], all_rows)
    _remove_index(path)
    beside(f"a search beside a crawl{tag}", ["search", crowd / "p00.jpg", "--index", uri], all_rows)
    # killed half-way (by the time a whole crawl took), then the rerun
    case = f"a crawl killed half-way, then rerun{tag}"
    _remove_index(path)
    first = spawn("crawl", crowd, "--index", uri, "--json")
    if _wait_for_lock(first, lock_file, c.limit_s):
        t0 = time.perf_counter()
        while first.process.poll() is None and time.perf_counter() - t0 < work / 2:
            time.sleep(0.05)
    first.process.send_signal(signal.SIGKILL)
    finish(first, c.limit_s)
    again = c.call("crawl", crowd, "--index", uri, "--json")
    broken = unfinished(again)
    if broken:
        c.add(case, *broken)
        return
    s = again.json()
    if s["rows"] != 24 or s["indexed"] + s["skipped"] != 24:
        c.add(case, "silently_wrong", f"{s['rows']} rows for 24 faces after the rerun ({s['indexed']} read again)")
    else:
        c.add(case, "correct", f"the rerun took the dead run's lock and read {s['indexed']} of 24 photos again")


def _stale(c: _Corpus, backend: str) -> None:
    """Files deleted, renamed, rewritten with their old size and time, touched, hidden behind a
    folder that may not be listed: counted, pruned, indexed again, or left alone as they should."""
    tag, uri = _tag(backend), _uri(c, f"stale-{backend}", backend)
    folder = c.work / f"stale-{backend}"
    photos = {f"p{i}.jpg": _jpeg(11 + i) for i in range(5)}
    photos["sub/p5.jpg"] = _jpeg(16)
    mine, other = same_size(photos["p2.jpg"], _jpeg(17))
    photos["p2.jpg"] = mine
    for name, content in photos.items():
        _write(folder / name, content)
    keep = c.work / f"stale-{backend}-p0.jpg"
    keep.write_bytes(photos["p0.jpg"])

    def crawl_again(case: str, *extra: str) -> dict | None:
        call = c.call("crawl", folder, "--index", uri, "--json", *extra)
        broken = unfinished(call)
        if broken:
            c.add(case, *broken)
            return None
        return call.json()

    if crawl_again(f"the first crawl of the stale folder{tag}") is None:
        return
    (folder / "p0.jpg").unlink()
    case = f"a deleted photo is counted as missing{tag}"
    s = crawl_again(case)
    if s is not None:
        ok = s["missing"] == ["p0.jpg"] and s["rows"] == 6 and s["pruned"] == 0
        c.add(case, *(("correct", "1 missing, its face kept") if ok else ("silently_wrong", f"missing {s['missing']}, "
                                                                                              f"rows {s['rows']}")))
    case = f"--prune removes a deleted photo's faces{tag}"
    s = crawl_again(case, "--prune")
    if s is not None:
        top = _top(uri, keep)
        ok = s["pruned"] == 1 and s["rows"] == 5 and top and top[0][0] != "p0.jpg"
        c.add(case, *(("correct", f"pruned; its face now finds {top}") if ok else
                      ("silently_wrong", f"pruned {s['pruned']}, rows {s['rows']}, its face finds {top}")))
    (folder / "p1.jpg").rename(folder / "p1-renamed.jpg")
    case = f"a renamed photo{tag}"
    s = crawl_again(case)
    if s is not None:
        ok = s["missing"] == ["p1.jpg"] and s["indexed"] == 1
        c.add(case, *(("correct", "the old name missing, the new one indexed") if ok else
                      ("silently_wrong", f"missing {s['missing']}, indexed {s['indexed']}")))
    p2 = folder / "p2.jpg"
    st = p2.stat()
    time.sleep(0.02)
    p2.write_bytes(other)
    os.utime(p2, ns=(st.st_atime_ns, st.st_mtime_ns))
    case = f"a photo rewritten with its old size and time{tag}"
    s = crawl_again(case)
    if s is not None:
        top = _top(uri, p2)
        ok = s["indexed"] == 1 and top == [("p2.jpg", 0)]
        c.add(case, *(("correct", "indexed again, its new face found") if ok else
                      ("silently_wrong", f"indexed {s['indexed']}, its new face finds {top}")))
    os.utime(folder / "p3.jpg")
    case = f"a touched photo is not read again{tag}"
    s = crawl_again(case)
    if s is not None:
        ok = s["indexed"] == 0 and s["sha_checked"] == 1
        c.add(case, *(("correct", "its sha256 compared, not read again") if ok else
                      ("unexpected", f"indexed {s['indexed']}, sha256 compared {s['sha_checked']}")))
    case = f"--verify-sha compares every photo{tag}"
    s = crawl_again(case, "--verify-sha")
    if s is not None:
        ok = s["indexed"] == 0 and s["sha_checked"] == 5
        c.add(case, *(("correct", "5 compared, none read again") if ok else
                      ("unexpected", f"indexed {s['indexed']}, sha256 compared {s['sha_checked']}")))
    if not c.perms:
        return
    (folder / "sub").chmod(0)
    case = f"a photo behind a folder that may not be listed is not missing{tag}"
    try:
        s = crawl_again(case)
    finally:
        (folder / "sub").chmod(0o755)
    if s is not None:
        ok = "sub/p5.jpg" not in s["missing"] and any(f["path"] == "sub" and "are not indexed" in f["reason"]
                                                      for f in s["failed"])
        c.add(case, *(("correct", "not missing, its folder reported") if ok else
                      ("silently_wrong", f"missing {s['missing']}, failed {s['failed']}")))


def _names(c: _Corpus, backend: str) -> None:
    """Every name of ``NAMES`` crawled, found at distance 0 under its name, skipped by the rerun;
    a search by a photo whose name is not UTF-8, as text and as JSON."""
    folder, tag, uri = c.inputs / "names", _tag(backend), _uri(c, "names", backend)
    first = c.call("crawl", folder, "--index", uri, "--json")
    again = c.call("crawl", folder, "--index", uri, "--json")
    broken = unfinished(first) or unfinished(again)
    if broken:
        for label, _ in NAMES:
            c.add(f"a name with {label}{tag}", *broken)
        return
    s1, s2, ledger = first.json(), again.json(), _ledger(uri)
    failed = {f["path"]: f["reason"] for f in s1["failed"]}
    for label, raw in NAMES:
        case, key = f"a name with {label}{tag}", os.fsdecode(raw)
        rec = ledger.get(key)
        top = _top(uri, os.fsdecode(os.path.join(os.fsencode(folder), raw))) if rec else []
        if shown(key) in failed:
            c.add(case, "crash" if "internal error" in failed[shown(key)] else "unexpected",
                  f"failed: {failed[shown(key)]}")
        elif rec is None or rec.get("faces") != 1 or top != [(shown(key), 0)]:
            c.add(case, "silently_wrong", f"recorded as {rec}, its face finds {top}")
        elif s2["indexed"] or s2["skipped"] != len(NAMES):
            c.add(case, "unexpected", f"the rerun read {s2['indexed']} files again")
        else:
            c.add(case, "correct", f"indexed as {shown(key)!r}, found at distance 0, skipped by the rerun")
    query = os.path.join(os.fsencode(folder), b"\xff\xfe.jpg")
    text = c.call("search", query, "--index", uri)
    case = f"search by a photo named in bytes that are not UTF-8, strict UTF-8 stdout{tag}"
    broken = unfinished(text)
    if broken:
        c.add(case, *broken)
    else:
        ok = text.rc == 0 and "\\xff\\xfe.jpg" in text.out
        c.add(case, *(("correct", text.out.splitlines()[2][:200]) if ok else ("unexpected", text.out[:200])))
    call = c.call("search", query, "--index", uri, "--json")
    case = f"the same search as --json{tag}"
    broken = unfinished(call)
    r = call.json() or {}
    hits = [h for f in r.get("faces", []) for h in f["results"]]
    if broken:
        c.add(case, *broken)
    elif r.get("photo", "").endswith("\\xff\\xfe.jpg") and hits and hits[0]["source"] == "\\xff\\xfe.jpg":
        c.add(case, "correct", "valid JSON, the name as \\xff\\xfe.jpg")
    else:
        c.add(case, "unexpected", call.out[:200])


# ---------------------------------------------------------------- the runner
def run_odd_crawl(folder: str | Path, limit_s: float = CALL_LIMIT_S, workers: int = 2) -> dict:
    """Build the corpus under ``folder`` and run every case through ``toap crawl``/``toap search``
    in child processes (``workers`` groups of cases side by side), each call under ``limit_s``.

    Returns ``{files, clear_errors, correct_results, crashes, hangs, silently_wrong, unexpected,
    originals_modified, seconds, cases}``: ``files`` the number of cases, each counted once in one
    of the next six: a *clear error* is an expected refusal (exit 1, or 2 for bad arguments, one
    line on stderr saying what the case expects) or an expected failed file with a one-line
    reason; a *correct result* is what the case expects (indexed with its faces and found under
    its name, counted missing, pruned, indexed again, ...); a *crash* is a traceback, an internal
    error, a UnicodeError or a death by signal; a *hang* a call killed at ``limit_s``; *silently
    wrong* a wrong result that claims success (a file not indexed or not found, rows lost, a second
    crawl not refused, a refusal due that did not come); *unexpected* any other wrong result.
    ``originals_modified`` counts files under ``folder/inputs`` whose bytes changed, that are gone,
    or that appeared; ``cases`` one row each (``case``, ``outcome``, ``detail``).
    """
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    c = _Corpus(Path(folder), limit_s)
    _make_inputs(c)
    before = _originals(c.inputs)
    groups = [lambda: _races(c, "faiss"), lambda: _names(c, "milvus-lite"), lambda: _races(c, "milvus-lite"),
              lambda: _names(c, "faiss"), lambda: _files(c), lambda: _stale(c, "faiss"), lambda: _uris(c),
              lambda: _stale(c, "milvus-lite"), lambda: _locations(c)]
    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for job in [pool.submit(g) for g in groups]:
                job.result()
    finally:
        for p in (c.inputs / "files" / "locked.jpg", c.inputs / "files" / "sealed", c.work / "read-only",
                  c.work / "read-only" / "old.db"):
            if p.exists():
                p.chmod(0o755 if p.is_dir() else 0o644)
    after = _originals(c.inputs)
    modified = sum(before[p] != after.get(p) for p in before) + len(set(after) - set(before))
    counts = {"files": len(c.report), "clear_errors": 0, "correct_results": 0, "crashes": 0, "hangs": 0,
              "silently_wrong": 0, "unexpected": 0}
    key = {"clear_error": "clear_errors", "correct": "correct_results", "crash": "crashes", "hang": "hangs",
           "silently_wrong": "silently_wrong"}
    for row in c.report:
        counts[key.get(row["outcome"], "unexpected")] += 1
    return {**counts, "originals_modified": modified, "seconds": round(time.perf_counter() - t0, 1),
            "cases": sorted(c.report, key=lambda r: r["case"])}
