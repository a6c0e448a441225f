"""A corpus of bad or odd inputs for ``toap protect``, and its runner (issues 12 and 19).

``odd_inputs(folder)`` builds the cases (empty, truncated, mislabelled, bombs, odd modes and bit
depths, EXIF-rotated, animated, no face, many faces, FIFOs and devices, paths too long for the
system, damaged manifests, an output folder moved or typed another way, a batch killed half-way,
two runs at once, ...), each with what a correct run gives; ``run_odd_inputs(folder)`` runs
``batch.protect_files`` on each, under a time limit, and counts clear errors, correct results,
crashes, hangs, silently wrong results and originals modified (sha256 before and after). The
tests and ``python -m toap_kit.bench protect`` use them.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
from PIL import Image

from .batch import MANIFEST, _append, protect_files, read_manifest
from .data import DATA_DIR, sha256_file
from .perturbation import Perturbation
from .protect import _ORIENTATION, TMP_TAG, ProtectError, load_perturbation

__all__ = ["CASE_LIMIT_S", "OddInput", "odd_inputs", "run_odd_inputs", "shipped_photo", "shipped_photos"]

log = logging.getLogger(__name__)

CASE_LIMIT_S = 120
"""A case still running after this many seconds is a hang (cases with a child process: 5x)."""
_CHILD = ("killed", "concurrent")  # cases that run ``toap protect`` in a child process
_RERUN = ("twice", "moved", "two-ways", "interleaved", "old-rows")  # cases run twice, the rerun must resume


@dataclass
class OddInput:
    """One bad or odd input: what to pass to ``protect_files`` and what a correct run gives.

    ``expect``: ``"refused"`` (the run stops with a ``ProtectError``), ``"error"`` (every row
    is an ``error`` row with a one-line reason), or the statuses of the rows in order
    (``"protected"``, ``"no-face"``, ...; ``""`` for none). ``says``: what every error row or
    the refusal must say. ``check(rows, out_dir)`` returns what is wrong with a correct-looking
    result, or None. ``special``: ``"killed"`` (a child run, SIGKILL half-way, rerun here),
    ``"concurrent"`` (a second run while a child writes: refused; then a rerun resumes), or a
    case run twice whose rerun must resume every photo: ``"twice"``, ``"moved"`` (the output
    folder moved in between), ``"two-ways"`` (relative paths, then absolute), ``"interleaved"``
    (an error row of each output appended in between, as two unlocked runs once left),
    ``"old-rows"`` (the manifest rewritten as older versions wrote it: outputs as typed).
    """

    name: str
    inputs: list[Path]
    expect: str
    out_dir: Path
    kwargs: dict = field(default_factory=dict)
    check: Callable[[list[dict], Path], str | None] | None = None
    special: str | None = None
    says: str | None = None


def shipped_photos() -> list[Path]:
    """The shipped full 250x250 photos (``data/photos250``), in a fixed order."""
    return sorted((DATA_DIR / "photos250").glob("*/*.jpg"))


def shipped_photo(i: int = 0, size: int | None = None) -> Image.Image:
    """Shipped photo ``i`` as RGB (resized, bicubic, to ``size x size`` if given)."""
    with Image.open(shipped_photos()[i]) as im:
        im = im.convert("RGB")
    return im if size is None else im.resize((size, size), Image.BICUBIC)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(side: int = 30_000) -> bytes:
    """A 100-byte PNG whose header claims ``side x side`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def _encoded(array: np.ndarray, ext: str) -> bytes:
    """``H x W x C`` RGB(A) uint16 pixels encoded by OpenCV (Pillow cannot write 16-bit colour)."""
    order = [2, 1, 0, 3][:array.shape[2]]  # OpenCV stores BGR(A)
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(array[..., order]))
    assert ok, ext
    return buf.tobytes()


def _deep_folder(top: Path, length: int) -> tuple[int, str]:
    """Nested folders of 250-character names under ``top`` until the path is ``length``
    characters long (made through ``dir_fd``, so a path longer than the system's limit can be
    made); returns an open descriptor of the deepest folder and its path."""
    path, fd = str(top), os.open(top, os.O_RDONLY)
    while len(path) < length:
        name = "d" * max(1, min(250, length - len(path) - 1))
        try:
            os.mkdir(name, dir_fd=fd)
        except FileExistsError:
            pass
        deeper = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd, path = deeper, f"{path}/{name}"
    return fd, path


def _write_at(fd: int, name: str, content: bytes) -> None:
    """Write ``content`` to the file ``name`` in the folder open as ``fd``."""
    f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=fd)
    try:
        os.write(f, content)
    finally:
        os.close(f)


def _out_file(rows: list[dict], i: int = 0) -> Path:
    return Path(rows[i]["output"])


def _check_open(rows, want_mode=None, want_format=None, want_size=None) -> str | None:
    for r in rows:
        if r["output"] is None:
            continue
        with Image.open(r["output"]) as im:
            im.load()
            if want_mode and im.mode != want_mode:
                return f"mode {im.mode}, expected {want_mode}"
            if want_format and im.format != want_format:
                return f"format {im.format}, expected {want_format}"
            if want_size and im.size != want_size:
                return f"size {im.size}, expected {want_size}"
    return None


def _depth_reported(mode: str, fmt: str) -> Callable[[list[dict], Path], str | None]:
    """A check: a 16-bit colour photo written with 8 bits a channel says so (row and note)."""
    def check(rows: list[dict], out_dir: Path) -> str | None:
        r = rows[0]
        if r.get("bit_depth") != "16 -> 8" or not any("8 bits a channel" in n for n in r["notes"]):
            return f"16-bit input written as 8-bit without saying so (bit_depth {r.get('bit_depth')!r})"
        return _check_open(rows, mode, fmt)
    return check


def _manifest_kept(planted: bytes) -> Callable[[list[dict], Path], str | None]:
    """A check: the damaged manifest's bytes are still there, the new rows after them."""
    def check(rows: list[dict], out_dir: Path) -> str | None:
        data = (out_dir / MANIFEST).read_bytes()
        if not data.startswith(planted):
            return "the damaged manifest was rewritten"
        return None if read_manifest(out_dir / MANIFEST) else "no rows after the damage"
    return check


def odd_inputs(folder: str | Path) -> list[OddInput]:
    """Build the corpus of bad and odd inputs under ``folder/inputs`` (outputs go to
    ``folder/out/<case>``); about 75 cases from the shipped photos. Nothing is downloaded."""
    folder = Path(folder)
    inp, out = folder / "inputs", folder / "out"
    inp.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    face = shipped_photo(0)
    jpg = io.BytesIO()
    face.save(jpg, "JPEG", quality=95)
    jpg_bytes = jpg.getvalue()
    cases: list[OddInput] = []

    def case(name: str, files: dict[str, bytes | Image.Image | tuple | Callable[[Path], object]] | None, expect: str,
             inputs=None, as_folder: bool = False, **kw):
        slug = re.sub(r"[^\w.-]+", "_", name)
        d = inp / slug
        d.mkdir(parents=True, exist_ok=True)
        paths = []
        for fname, content in (files or {}).items():
            p = d / fname
            p.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                p.write_bytes(content)
            elif isinstance(content, Image.Image):
                content.save(p)
            elif isinstance(content, tuple):  # (image, save kwargs)
                content[0].save(p, **content[1])
            else:  # makes a special file (FIFO, link) at the path
                if os.path.lexists(p):
                    p.unlink()
                content(p)
            paths.append(p)
        given = [d] if as_folder else inputs if inputs is not None else paths
        cases.append(OddInput(name, given, expect, kw.pop("out_dir", out / slug), **kw))
        return d

    def out_with(name: str, files: dict[str, bytes | Callable[[Path], object]]) -> Path:
        """The output folder ``out/<name>`` holding ``files`` before the run."""
        o = out / re.sub(r"[^\w.-]+", "_", name)
        o.mkdir(exist_ok=True)
        for fname, content in files.items():
            if isinstance(content, bytes):
                (o / fname).write_bytes(content)
            elif not os.path.lexists(o / fname):
                content(o / fname)
        return o

    # -- not images, or broken ones
    case("empty file", {"empty.jpg": b""}, "error")
    case("truncated JPEG", {"truncated.jpg": jpg_bytes[: len(jpg_bytes) * 2 // 5]}, "error")
    case("random bytes named .jpg", {"random.jpg": np.random.default_rng(0).bytes(5000)}, "error")
    case("text file", {"notes.txt": b"not a photo\n"}, "error")
    case("text file named .jpg", {"notes.jpg": b"hello, I am text\n" * 20}, "error")
    case("HTML named .png", {"page.png": b"<!doctype html><html><body>404</body></html>"}, "error")
    case("JPEG start marker only", {"soi.jpg": b"\xff\xd8"}, "error")
    case("PNG signature only", {"sig.png": b"\x89PNG\r\n\x1a\n"}, "error")
    case("decompression-bomb header", {"bomb.png": _bomb_png()}, "error")
    case("missing path", None, "error", inputs=[inp / "does-not-exist.jpg"])
    frames = [shipped_photo(i, 120) for i in range(3)]
    case("animated GIF", {"anim.gif": (frames[0], {"save_all": True, "append_images": frames[1:], "duration": 100})},
         "error")
    case("single-frame GIF", {"still.gif": face.convert("P")}, "error")
    case("multi-page TIFF", {"pages.tif": (frames[0], {"save_all": True, "append_images": frames[1:]})}, "error")
    # -- odd but valid photos
    case("PNG named .jpg", {"really_png.jpg": (face, {"format": "PNG"})}, "protected",
         check=lambda rows, o: _check_open(rows, "RGB", "PNG"))
    case("1x1 pixel", {"dot.png": Image.new("RGB", (1, 1), (90, 60, 40))}, "no-face")
    case("1x1 pixel, no detection", {"dot.png": Image.new("RGB", (1, 1), (90, 60, 40))}, "protected",
         kwargs={"detect": False}, check=lambda rows, o: _check_open(rows, "RGB", "PNG", (1, 1)))
    case("CMYK JPEG", {"cmyk.jpg": (face.convert("CMYK"), {"quality": 95})}, "protected",
         check=lambda rows, o: _check_open(rows, "CMYK", "JPEG"))
    grey16 = Image.fromarray((np.asarray(face.convert("L")).astype(np.uint16) * 257))
    case("16-bit greyscale PNG", {"grey16.png": grey16}, "protected",
         check=lambda rows, o: _check_open(rows, "I;16", "PNG") or (rows[0].get("bit_depth") and "depth said lowered"))
    rgb16 = np.asarray(face).astype(np.uint16) * 257
    rgba16 = np.dstack([rgb16, np.full(rgb16.shape[:2], 40000, np.uint16)])
    case("16-bit RGB PNG", {"rgb16.png": _encoded(rgb16, ".png")}, "protected", check=_depth_reported("RGB", "PNG"))
    case("16-bit RGBA PNG", {"rgba16.png": _encoded(rgba16, ".png")}, "protected",
         check=_depth_reported("RGBA", "PNG"))
    case("16-bit RGB TIFF", {"rgb16.tif": _encoded(rgb16, ".tif")}, "protected", check=_depth_reported("RGB", "TIFF"))
    pal = face.convert("P", palette=Image.ADAPTIVE, colors=64)
    pal.info["transparency"] = 0
    case("palette PNG with transparency", {"palette.png": (pal, {"transparency": 0})}, "protected",
         check=lambda rows, o: _check_open(rows, "RGBA", "PNG"))
    rgba = face.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(face.size))

    def alpha_kept(rows, o, src=rgba):
        if _check_open(rows, "RGBA", "PNG"):
            return _check_open(rows, "RGBA", "PNG")
        with Image.open(_out_file(rows)) as im:
            return None if np.array_equal(np.asarray(im)[..., 3], np.asarray(src)[..., 3]) else "alpha changed"

    case("RGBA PNG", {"rgba.png": rgba}, "protected", check=alpha_kept)
    la = face.convert("LA")
    case("greyscale with alpha (LA) PNG", {"la.png": la}, "protected", check=lambda rows, o: _check_open(rows, "LA"))
    case("greyscale JPEG", {"grey.jpg": (face.convert("L"), {"quality": 95})}, "protected",
         check=lambda rows, o: _check_open(rows, "L", "JPEG"))
    exif = Image.Exif()
    exif[_ORIENTATION] = 6  # display = stored pixels turned 90 degrees clockwise
    w, h = 250, 180
    wide = face.crop((0, 35, 250, 215))

    def upright_and_no_tag(rows, o):
        bad = _check_open(rows, "RGB", "JPEG", (w, h))
        if bad:
            return bad
        with Image.open(_out_file(rows)) as im:
            return "orientation tag left in" if im.getexif().get(_ORIENTATION, 1) != 1 else None

    case("EXIF-rotated JPEG", {"rotated.jpg": (wide.transpose(Image.Transpose.ROTATE_90),
                                               {"quality": 95, "exif": exif.tobytes()})},
         "protected", check=upright_and_no_tag)
    gps = Image.Exif()
    gps[0x013B] = "Jane Doe"  # Artist
    gps[0x0110] = "Phone 12"  # Model
    gps[0x8825] = {1: "N", 2: (48.0, 51.0, 24.0), 3: "E", 4: (2.0, 21.0, 3.0)}

    def no_gps(rows, o):
        with Image.open(_out_file(rows)) as im:
            e = im.getexif()
            return "EXIF kept" if (e.get_ifd(0x8825) or 0x013B in e) else None

    case("JPEG with GPS and owner EXIF", {"gps.jpg": (face, {"quality": 95, "exif": gps.tobytes()})}, "protected",
         check=no_gps)
    try:
        from PIL import ImageCms

        icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    except Exception:  # noqa: BLE001 - Pillow without littlecms: a fake profile is fine for the check
        icc = b"\x00" * 128

    def icc_kept(rows, o):
        with Image.open(_out_file(rows)) as im:
            return None if im.info.get("icc_profile") == icc else "ICC profile lost"

    case("JPEG with ICC profile", {"icc.jpg": (face, {"quality": 95, "icc_profile": icc})}, "protected", check=icc_kept)
    case("progressive JPEG", {"prog.jpg": (face, {"quality": 90, "progressive": True})}, "protected")
    case("WebP", {"face.webp": (face, {"quality": 90})}, "protected",
         check=lambda rows, o: _check_open(rows, "RGB", "WEBP"))
    case("TIFF", {"face.tif": (face, {"compression": "tiff_lzw"})}, "protected",
         check=lambda rows, o: _check_open(rows, "RGB", "TIFF"))
    case("BMP", {"face.bmp": face}, "protected", check=lambda rows, o: _check_open(rows, "RGB", "BMP"))
    odd_name = "Ünïcode name with spaces.JPG"
    case("upper-case suffix, unicode and spaces in the name", {odd_name: (face, {"format": "JPEG", "quality": 95})},
         "protected", check=lambda rows, o: None if _out_file(rows).name == odd_name else "name changed")
    broken_exif = jpg_bytes[:2] + b"\xff\xe1\x00\x10Exif\x00\x00II*\x00\xff\xff" + jpg_bytes[2:]
    case("corrupt EXIF block", {"badexif.jpg": broken_exif}, "protected")
    # -- faces: none, many, tiny
    case("no face (flat grey)", {"grey.png": Image.new("RGB", (400, 300), (128, 128, 128))}, "no-face")

    def copied(rows, o):
        return _check_open(rows, "RGB", "PNG", (400, 300))

    case("no face, --no-face copy", {"grey.png": Image.new("RGB", (400, 300), (128, 128, 128))}, "copied",
         kwargs={"no_face": "copy"}, check=copied)
    case("panorama 4000x150, no face", {"pano.jpg": (Image.new("RGB", (4000, 150), (30, 90, 160)), {"quality": 90})},
         "no-face")
    collage = Image.new("RGB", (500, 500))
    for i in range(4):
        collage.paste(shipped_photo(i + 1), ((i % 2) * 250, (i // 2) * 250))

    def many(rows, o):
        return None if rows[0]["faces"] >= 3 else f"only {rows[0]['faces']} faces of 4 protected"

    case("many faces (2x2 collage)", {"group.jpg": (collage, {"quality": 95})}, "protected", check=many)
    tiny = Image.new("RGB", (640, 480), (120, 110, 100))
    tiny.paste(shipped_photo(5, 40), (300, 220))
    case("tiny face (below the detector's minimum)", {"tiny.jpg": (tiny, {"quality": 95})}, "no-face")
    small = Image.new("RGB", (640, 480), (120, 110, 100))
    small.paste(shipped_photo(5, 200), (220, 140))
    case("small face in a larger photo", {"small.jpg": (small, {"quality": 95})}, "protected")
    # -- folders and paths
    d = case("folder named like a photo", {"album.jpg/face.jpg": (face, {"quality": 95}),
                                           "album.jpg/readme.txt": b"text"}, "protected")
    cases[-1].inputs = [d]
    d = case("folder with no images", {"docs/readme.txt": b"text", "docs/data.csv": b"1,2"}, "")
    cases[-1].inputs = [d]
    d = case("hidden file in a folder", {".hidden.jpg": (face, {"quality": 95}), "seen.jpg": (face, {"quality": 95})},
             "protected")
    cases[-1].inputs = [d]
    p = case("same file given twice", {"face.jpg": (face, {"quality": 95})}, "protected")
    cases[-1].inputs = [p / "face.jpg", p / "face.jpg"]
    p = case("two inputs with the same name", {"a/face.jpg": (face, {"quality": 95}),
                                               "b/face.jpg": (shipped_photo(2), {"quality": 95})}, "protected,error")
    link_dir = inp / "symlink_to_a_photo"
    link_dir.mkdir(exist_ok=True)
    link = link_dir / "link.jpg"
    if not link.exists():
        try:
            link.symlink_to(cases[-1].inputs[0])
        except OSError:
            shutil.copyfile(cases[-1].inputs[0], link)
    cases.append(OddInput("symlink to a photo", [link], "protected", out / "symlink"))
    afile = inp / "output_is_a_file.txt"
    afile.write_bytes(b"I am a file")
    case("output folder is an existing file", {"face.jpg": (face, {"quality": 95})}, "refused", out_dir=afile)
    case("output folder below a file", {"face.jpg": (face, {"quality": 95})}, "refused", out_dir=afile / "sub")
    p = case("output folder = input folder", {"face.jpg": (face, {"quality": 95})}, "refused")
    cases[-1].inputs, cases[-1].out_dir = [p], p
    p = case("output file next to the input (same folder)", {"face.jpg": (face, {"quality": 95})}, "refused")
    cases[-1].out_dir = p
    if os.geteuid() != 0:  # root writes anywhere: the permission case means nothing then
        ro = out / "read_only"
        ro.mkdir(exist_ok=True)
        ro.chmod(0o500)
        case("unwritable output folder", {"face.jpg": (face, {"quality": 95})}, "refused", out_dir=ro)
    p = case("output folder inside the input folder, run twice", {"face.jpg": (face, {"quality": 95})}, "protected")
    cases[-1].inputs, cases[-1].out_dir = [p], p / "protected"
    cases[-1].special = "twice"
    taken = out / "existing_output"
    taken.mkdir(exist_ok=True)
    (taken / "face.jpg").write_bytes(b"someone else's file")
    case("existing file in the output folder not written by toap", {"face.jpg": (face, {"quality": 95})}, "error",
         out_dir=taken)
    case("JPEG quality 0 asked", {"face.jpg": (face, {"quality": 95})}, "refused", kwargs={"jpeg_quality": 0})
    case("unknown --no-face choice", {"face.jpg": (face, {"quality": 95})}, "refused", kwargs={"no_face": "maybe"})
    one = {"face.jpg": (face, {"quality": 95})}
    # -- not regular files: refused before a byte is read (reading one never ends)
    case("FIFO given as the input file", {"fifo.jpg": os.mkfifo}, "error", says="FIFO")
    case("FIFO inside a folder", {"a_face.jpg": (face, {"quality": 95}), "fifo.jpg": os.mkfifo}, "protected,error",
         as_folder=True, says="FIFO")
    if os.path.exists("/dev/zero"):
        case("link named x.jpg to /dev/zero", {"x.jpg": lambda p: p.symlink_to("/dev/zero")}, "error",
             says="character device")
        case("the device /dev/zero given as a photo", None, "error", inputs=[Path("/dev/zero")],
             says="character device")
    case("link to nothing named .jpg", {"gone.jpg": lambda p: p.symlink_to(p.parent / "nothing-here.jpg")}, "error",
         says="link to nothing")
    case("loop of links named .jpg", {"a.jpg": lambda p: p.symlink_to(p.parent / "b.jpg"),
                                      "b.jpg": lambda p: p.symlink_to(p.parent / "a.jpg")}, "error",
         says="symbolic links")
    case("FIFO where an output goes", one, "error", out_dir=out_with("fifo where an output goes",
                                                                      {"face.jpg": os.mkfifo}),
         says="not written by toap")
    # -- paths the system cannot open, folders it cannot list
    limit = os.pathconf("/", "PC_PATH_MAX")
    for name, length, says in (("photo path too long for the system", limit - 100, "too long"),
                               ("folder path too long to list", limit + 10, "cannot read this folder")):
        d = case(name, {"a_face.jpg": (face, {"quality": 95})}, "protected,error", as_folder=True, says=says)
        fd, _ = _deep_folder(d, length)  # the first is listable, its photo's own path is past the limit
        _write_at(fd, "p" * 200 + ".jpg", jpg_bytes)
        os.close(fd)
    if os.geteuid() != 0:  # root reads any folder
        d = case("unreadable sub-folder", {"a_face.jpg": (face, {"quality": 95}), "locked/b_face.jpg": jpg_bytes},
                 "protected,error", as_folder=True, says="cannot read this folder")
        (d / "locked").chmod(0)
    # -- the output folder and its manifest: moved, typed two ways, shared, damaged
    two = {"a.jpg": (face, {"quality": 95}), "b.jpg": (shipped_photo(2), {"quality": 95})}
    case("output folder moved, then rerun", two, "protected,protected", special="moved")
    d = case("same folders typed two ways (relative, then absolute)", two, "protected,protected", special="two-ways")
    cases[-1].inputs, cases[-1].out_dir = [Path(os.path.relpath(d))], Path(os.path.relpath(cases[-1].out_dir))
    case("rerun after two runs left an error row for each output", two, "protected,protected", special="interleaved")
    case("rerun with a manifest of an older version (outputs as typed)", two, "protected,protected",
         special="old-rows")
    wrong_types = [{"target": 5}, {"target": "face.jpg", "status": "protected", "input_sha256": 7, "settings": "x",
                                   "output_sha256": 5}]
    for name, damage in (("random bytes", np.random.default_rng(1).bytes(3000)), ("a line [1, 2]", b"[1, 2]\n"),
                         ("a line 42", b"42\n"),
                         ("rows with fields of the wrong type", "".join(json.dumps(r) + "\n" for r in wrong_types)
                          .encode())):
        case(f"manifest of {name}", one, "protected", special="twice", check=_manifest_kept(damage),
             out_dir=out_with(f"manifest of {name}", {MANIFEST: damage}))
    for kind, make in (("a FIFO", os.mkfifo), ("a folder", Path.mkdir)):
        case(f"manifest is {kind}", one, "refused", out_dir=out_with(f"manifest is {kind}", {MANIFEST: make}),
             says="keeps its record there")
    row = {"target": "face.jpg", "status": "protected", "output_sha256": "0" * 64, "input_sha256": "1" * 64}
    case("output replaced after its manifest row", one, "error", says="not written by toap",
         out_dir=out_with("output replaced", {"face.jpg": b"the user's own file", MANIFEST: json.dumps(row).encode()}))
    given = out_with("output folder given as an input", {"face.jpg": jpg_bytes})
    case("output folder given as an input", None, "refused", inputs=[given], out_dir=given,
         says="overwrite the original")
    # -- odd names and links inside folders
    case("newline in the file name", {"new\nline.jpg": (face, {"quality": 95})}, "protected",
         check=lambda rows, o: None if _out_file(rows).name == "new\nline.jpg" else "name changed")
    case("link to its own parent inside the input folder", {**one, "up": lambda p: p.symlink_to(p.parent)},
         "protected", as_folder=True)
    # -- runs in a child process
    big = {f"p{i:02d}.jpg": (shipped_photo(i % 23).resize((900, 900), Image.BICUBIC), {"quality": 92}) for i in range(16)}
    case("two concurrent runs on one output folder", big, ",".join(["protected"] * 16), as_folder=True,
         special="concurrent", says="another toap protect is writing")
    case("batch killed half-way and rerun", big, "protected", as_folder=True, special="killed")
    return cases


def _originals(folder: Path) -> dict[str, str]:
    """sha256 of every regular file under ``folder`` that can be read (links not followed;
    FIFOs and paths too long for the system passed over)."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            if os.path.isfile(p) and not os.path.islink(p):
                try:
                    found[p] = sha256_file(p)
                except OSError:
                    pass
    return found


def _child(case: OddInput) -> subprocess.Popen:
    """``toap protect`` on ``case`` in a child process (one thread, quiet)."""
    cmd = [sys.executable, "-m", "toap_kit.cli", "protect", *map(str, case.inputs), "-o", str(case.out_dir),
           "--no-progress", "--quiet"]
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _wait_for(child: subprocess.Popen, done: Callable[[], bool], timeout: float) -> None:
    """Wait until ``done()``, the child's end, or ``timeout`` seconds, whichever comes first."""
    t0 = time.time()
    while child.poll() is None and not done() and time.time() - t0 < timeout:
        time.sleep(0.01)


def _outputs_match(out_dir: Path, rows: list[dict]) -> str | None:
    """What is wrong with ``out_dir`` after a full run (a file without its manifest row, a
    temporary file left, a photo not protected), or None."""
    outs = sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    if any(TMP_TAG in p.name for p in outs):
        return "temporary files left after the rerun"
    if len(outs) != len(rows) or any(r["status"] != "protected" for r in rows):
        return f"{len(outs)} outputs for {len(rows)} photos, statuses {sorted({r['status'] for r in rows})}"
    done = {r["target"]: r for r in read_manifest(out_dir / MANIFEST) if r.get("status") == "protected"}
    for p in outs:
        row = done.get(p.relative_to(out_dir).as_posix())
        if row is None or sha256_file(p) != row["output_sha256"]:
            return f"{p.name} has no matching manifest row"
        with Image.open(p) as im:
            im.load()
    return None


def _killed_run(case: OddInput, timeout: float = 300) -> tuple[list[dict], str | None]:
    """Start ``toap protect`` in a child process, SIGKILL it once two photos are done, add what a
    kill during a write leaves (a half temporary file, half a manifest line) if it left none,
    rerun in this process with the child's (default) perturbation, and check the result.
    Returns the rerun's rows and what is wrong."""
    manifest = case.out_dir / MANIFEST
    child = _child(case)
    try:
        _wait_for(child, lambda: len(read_manifest(manifest)) >= 2, timeout)
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
        child.wait()
    killed = child.returncode == -signal.SIGKILL
    first = read_manifest(manifest)
    if killed:  # what a kill in the middle of a write leaves
        (case.out_dir / f".p15.jpg{TMP_TAG}99999").write_bytes(b"\xff\xd8\xff\xe0half a jpeg")
        with open(manifest, "ab") as f:
            f.write(b'{"input": "half a line')
    rows = protect_files(case.inputs, case.out_dir, load_perturbation(), progress=False)
    problem = _outputs_match(case.out_dir, rows)
    if problem is None and killed and not any(r["resumed"] for r in rows):
        problem = "the rerun redid every photo"
    log.info("killed run: %d rows before the kill, %d resumed", len(first), sum(r["resumed"] for r in rows))
    return rows, problem


def _concurrent_run(case: OddInput, timeout: float = 300) -> tuple[list[dict], str | None]:
    """Start ``toap protect`` in a child process; once it holds the output folder (its first row
    is being written), run the same here: it must be refused with ``case.says``; once the child
    is done, a rerun must resume every photo. Returns the rows of the run here (or of the rerun)
    and what is wrong."""
    manifest, perturbation = case.out_dir / MANIFEST, load_perturbation()  # the child's default
    child = _child(case)
    try:
        _wait_for(child, lambda: os.path.isfile(manifest) and os.path.getsize(manifest) > 0, timeout)
        if child.poll() is not None:
            return [], f"the first run ended (exit {child.returncode}) before the second started"
        try:
            rows = protect_files(case.inputs, case.out_dir, perturbation, progress=False)
            return rows, "the second run was not refused"
        except ProtectError as e:
            if case.says not in str(e):
                return [], f"the second run was refused, but not for the lock: {e}"
        child.wait(timeout)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if child.returncode != 0:
        return [], f"the first run failed (exit {child.returncode})"
    rows = protect_files(case.inputs, case.out_dir, perturbation, progress=False)
    if not all(r["resumed"] for r in rows):
        return [{**r, "status": "redone"} for r in rows], "the rerun after both runs did not resume every photo"
    return rows, _outputs_match(case.out_dir, rows)


def _protect(c: OddInput, perturbation: Perturbation) -> tuple[list[dict], Path]:
    """Run case ``c`` (twice for a rerun case, with its change in between): the rows of the last
    run, with status ``redone`` if a rerun did not resume every photo, and the output folder."""
    rows = protect_files(c.inputs, c.out_dir, perturbation, progress=False, **c.kwargs)
    if c.special not in _RERUN:
        return rows, c.out_dir
    inputs, out_dir, manifest = c.inputs, c.out_dir, c.out_dir / MANIFEST
    if c.special == "moved":
        out_dir = c.out_dir.with_name(c.out_dir.name + "_moved")
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.move(c.out_dir, out_dir)
    elif c.special == "two-ways":
        inputs, out_dir = [Path(os.path.abspath(p)) for p in inputs], Path(os.path.abspath(out_dir))
    elif c.special == "interleaved":  # what two runs at once left before the lock: a later error row
        for r in rows:
            _append(manifest, {**r, "status": "error", "output": None, "output_sha256": None,
                               "error": f"{r['output']} already exists and was not written by toap protect"})
    elif c.special == "old-rows":  # older versions recorded the output's path as typed
        old = [{**r, "target": r["output"]} for r in read_manifest(manifest)]
        manifest.write_text("".join(json.dumps(r) + "\n" for r in old))
    again = protect_files(inputs, out_dir, perturbation, progress=False, **c.kwargs)
    if len(again) != len(rows) or not all(r["resumed"] for r in again):
        again = [{**r, "status": "redone"} for r in again]
    return again, out_dir


def _judge(c: OddInput, rows: list[dict], out_dir: Path) -> tuple[str, str]:
    """``(outcome, detail)`` of a case that ran to its end."""
    statuses = ",".join(r["status"] for r in rows)
    crashed = [r for r in rows if r.get("crash")]
    errors = [r["error"] for r in rows if r["status"] == "error"]
    if crashed:
        return "crash", crashed[0]["error"]
    if c.expect == "refused":
        return "unexpected", f"not refused: {statuses}"
    if c.expect == "error":
        if not rows or statuses != ",".join(["error"] * len(rows)):
            return "unexpected", statuses or "nothing"
    elif statuses != c.expect:
        return "unexpected", f"{statuses or 'nothing'} (expected {c.expect or 'nothing'})"
    unclear = [e for e in errors if not e or "\n" in e or (c.says and c.says not in e)]
    if unclear:
        return "unexpected", f"unclear error: {unclear[0]!r}" + (f" (should say {c.says!r})" if c.says else "")
    problem = c.check(rows, out_dir) if c.check else None
    if problem:
        return "unexpected", problem
    if c.expect == "error":
        return "clear_error", errors[0]
    return "correct", (statuses or "nothing to do") + (f" ({errors[0]})" if errors else "")


class _Hang(BaseException):
    """A case ran past its time limit (a BaseException: the batch's own error handling must not
    catch it)."""


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise ``_Hang`` in the block after ``seconds`` (SIGALRM; in the main thread only, elsewhere
    no limit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ring(signum, frame):
        raise _Hang(f"still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_odd_inputs(folder: str | Path, perturbation: Perturbation | None = None, limit_s: float = CASE_LIMIT_S) -> dict:
    """Build ``odd_inputs(folder)``, protect each case under a time limit, and count the outcomes.

    Returns ``{files, clear_errors, correct_results, crashes, hangs, silently_wrong, unexpected,
    originals_modified, cases}``: ``files`` the number of cases, each counted once in one of the
    next six: a *clear error* is an expected refusal or error row with a one-line reason saying
    what the case expects; a *correct result* matches the expected statuses and passes the case's
    check; a *crash* is an unexpected exception (escaping, or caught in the batch); a *hang* ran
    past ``limit_s`` seconds (5x for a case with a child process); *silently wrong* is a wrong
    result whose rows claim success (``protected``, ``copied`` or ``resumed``: a wrong output, or
    success where an error or a refusal was due); *unexpected* any other wrong result (an error
    where success was due, an unclear message). ``originals_modified`` counts input files whose
    sha256 changed; ``cases`` one row each.
    """
    folder = Path(folder)
    perturbation = perturbation or load_perturbation()
    cases = odd_inputs(folder)
    before = _originals(folder / "inputs")
    planted = {str(p): sha256_file(p) for p in (folder / "out" / "existing_output").glob("*")}
    counts = {"files": len(cases), "clear_errors": 0, "correct_results": 0, "crashes": 0, "hangs": 0,
              "silently_wrong": 0, "unexpected": 0}
    report = []
    package = logging.getLogger("toap_kit")
    level = package.level
    package.setLevel(logging.ERROR)  # the corpus is made of failures: their warnings are expected
    try:
        for c in cases:
            report.append(_run_case(c, perturbation, counts, limit_s * (5 if c.special in _CHILD else 1)))
    finally:
        package.setLevel(level)
    after = _originals(folder / "inputs")
    modified = sum(before[p] != after.get(p) for p in before)
    modified += sum(sha256_file(p) != s for p, s in planted.items())
    return {**counts, "originals_modified": modified, "cases": report}


def _run_case(c: OddInput, perturbation: Perturbation, counts: dict, limit_s: float) -> dict:
    """Run one corpus case, count its outcome in ``counts``, and return its report row."""
    rows: list[dict] = []
    try:
        with _time_limit(limit_s):
            if c.special in _CHILD:
                rows, problem = (_killed_run if c.special == "killed" else _concurrent_run)(c)
                done = {"killed": "resumed after SIGKILL", "concurrent": "the second run refused, the rerun resumed"}
                outcome, detail = ("correct", done[c.special]) if problem is None else ("unexpected", problem)
            else:
                rows, out_dir = _protect(c, perturbation)
                outcome, detail = _judge(c, rows, out_dir)
    except _Hang as e:
        outcome, detail = "hang", str(e)
    except ProtectError as e:
        clear = c.expect == "refused" and "\n" not in str(e) and (c.says is None or c.says in str(e))
        outcome, detail = ("clear_error" if clear else "unexpected"), str(e)
    except Exception as e:  # noqa: BLE001 - counted, that is the point
        outcome, detail = "crash", f"{type(e).__name__}: {e}"
    if outcome == "unexpected" and any(r["status"] in ("protected", "copied") or r.get("resumed") for r in rows):
        outcome = "silently_wrong"
    key = {"clear_error": "clear_errors", "correct": "correct_results", "crash": "crashes", "hang": "hangs",
           "silently_wrong": "silently_wrong"}.get(outcome, "unexpected")
    counts[key] += 1
    return {"case": c.name, "outcome": outcome, "detail": detail}
