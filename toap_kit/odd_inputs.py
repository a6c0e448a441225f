"""A corpus of bad or odd inputs for ``toap protect``, and its runner (issue 12).

``odd_inputs(folder)`` builds the files (empty, truncated, mislabelled, bombs, odd modes,
EXIF-rotated, animated, no face, many faces, a batch killed half-way, ...), each with what a
correct run gives; ``run_odd_inputs(folder)`` runs ``protect.protect_files`` on each and counts
clear errors, correct results, crashes and originals modified (sha256 before and after). The
tests and ``python -m toap_kit.bench protect`` use them.
"""
from __future__ import annotations

import io
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image

from .data import DATA_DIR, sha256_file
from .perturbation import Perturbation
from .protect import (_ORIENTATION, MANIFEST, TMP_TAG, ProtectError, load_perturbation, protect_files,
                      read_manifest)

__all__ = ["OddInput", "odd_inputs", "run_odd_inputs", "shipped_photo", "shipped_photos"]

log = logging.getLogger(__name__)


@dataclass
class OddInput:
    """One bad or odd input: what to pass to ``protect_files`` and what a correct run gives.

    ``expect``: ``"refused"`` (the run stops with a ``ProtectError``), ``"error"`` (every row
    is an ``error`` row with a one-line reason), or the statuses of the rows in order
    (``"protected"``, ``"no-face"``, ...; ``""`` for none). ``check(rows, out_dir)`` returns
    what is wrong with a correct-looking result, or None.
    """

    name: str
    inputs: list[Path]
    expect: str
    out_dir: Path
    kwargs: dict = field(default_factory=dict)
    check: Callable[[list[dict], Path], str | None] | None = None
    special: str | None = None  # "killed": run, SIGKILL half-way, rerun


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


def odd_inputs(folder: str | Path) -> list[OddInput]:
    """Build the corpus of bad and odd inputs under ``folder/inputs`` (outputs go to
    ``folder/out/<case>``); about 50 cases from the shipped photos. Nothing is downloaded."""
    folder = Path(folder)
    inp, out = folder / "inputs", folder / "out"
    inp.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    face = shipped_photo(0)
    jpg = io.BytesIO()
    face.save(jpg, "JPEG", quality=95)
    jpg_bytes = jpg.getvalue()
    cases: list[OddInput] = []

    def case(name: str, files: dict[str, bytes | Image.Image | tuple] | None, expect: str, inputs=None, **kw):
        d = inp / name.replace(" ", "_")
        d.mkdir(parents=True, exist_ok=True)
        paths = []
        for fname, content in (files or {}).items():
            p = d / fname
            p.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                p.write_bytes(content)
            elif isinstance(content, Image.Image):
                content.save(p)
            else:  # (image, save kwargs)
                content[0].save(p, **content[1])
            paths.append(p)
        cases.append(OddInput(name, inputs if inputs is not None else paths, expect,
                              kw.pop("out_dir", out / name.replace(" ", "_")), **kw))
        return d

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
         check=lambda rows, o: _check_open(rows, "I;16", "PNG"))
    _, buf = cv2.imencode(".png", (np.asarray(face)[:, :, ::-1].astype(np.uint16) * 257))
    case("16-bit RGB PNG", {"rgb16.png": buf.tobytes()}, "protected",
         check=lambda rows, o: _check_open(rows, None, "PNG"))
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
    big = {f"p{i:02d}.jpg": (shipped_photo(i % 23).resize((900, 900), Image.BICUBIC), {"quality": 92}) for i in range(16)}
    d = case("batch killed half-way and rerun", big, "protected")
    cases[-1].inputs, cases[-1].special = [d], "killed"
    return cases


def _originals(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (links not followed)."""
    return {str(p): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def _killed_run(case: OddInput, timeout: float = 300) -> str | None:
    """Start ``toap protect`` in a child process, SIGKILL it once two photos are done, add what a
    kill during a write leaves (a half temporary file, half a manifest line) if it left none,
    rerun in this process, and check the result. Returns what is wrong, or None."""
    manifest = case.out_dir / MANIFEST
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "toap_kit.cli", "protect", *map(str, case.inputs), "-o", str(case.out_dir),
           "--no-progress", "--quiet"]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while child.poll() is None and time.time() - t0 < timeout:
        if len(read_manifest(manifest)) >= 2:
            break
        time.sleep(0.01)
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
    outs = sorted(p for p in case.out_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    if any(TMP_TAG in p.name for p in outs):
        return "temporary files left after the rerun"
    if len(outs) != len(rows) or any(r["status"] != "protected" for r in rows):
        return f"{len(outs)} outputs for {len(rows)} photos, statuses {sorted({r['status'] for r in rows})}"
    done = {r["output"]: r for r in read_manifest(manifest) if r.get("status") == "protected"}
    for p in outs:
        if str(p) not in done or sha256_file(p) != done[str(p)]["output_sha256"]:
            return f"{p.name} has no matching manifest row"
        with Image.open(p) as im:
            im.load()
    if killed and not any(r["resumed"] for r in rows):
        return "the rerun redid every photo"
    log.info("killed run: %d rows before the kill, %d resumed", len(first), sum(r["resumed"] for r in rows))
    return None


def run_odd_inputs(folder: str | Path, perturbation: Perturbation | None = None) -> dict:
    """Build ``odd_inputs(folder)``, protect each case, and count the outcomes.

    Returns ``{files, clear_errors, correct_results, crashes, unexpected, originals_modified,
    cases}``: ``files`` the number of cases; a *clear error* is an expected refusal or error
    row with a one-line reason; a *correct result* matches the expected statuses and passes the
    case's check; a *crash* is an unexpected exception (escaping, or caught in the batch);
    ``originals_modified`` counts input files whose sha256 changed; ``cases`` one row each.
    """
    folder = Path(folder)
    perturbation = perturbation or load_perturbation()
    cases = odd_inputs(folder)
    before = _originals(folder / "inputs")
    planted = {str(p): sha256_file(p) for p in (folder / "out" / "existing_output").glob("*")}
    counts = {"files": len(cases), "clear_errors": 0, "correct_results": 0, "crashes": 0, "unexpected": 0}
    report = []
    level = log.level
    log.setLevel(logging.ERROR)  # the corpus is made of failures: their warnings are expected
    try:
        for c in cases:
            report.append(_run_case(c, perturbation, counts))
    finally:
        log.setLevel(level)
    after = _originals(folder / "inputs")
    modified = sum(before[p] != after.get(p) for p in before)
    modified += sum(sha256_file(p) != s for p, s in planted.items())
    return {**counts, "originals_modified": modified, "cases": report}


def _run_case(c: OddInput, perturbation: Perturbation, counts: dict) -> dict:
    """Run one corpus case, count its outcome in ``counts``, and return its report row."""
    outcome, detail = "unexpected", ""
    try:
        if c.special == "killed":
            problem = _killed_run(c)
            outcome, detail = ("correct", "resumed after SIGKILL") if problem is None else ("unexpected", problem)
        else:
            rows = protect_files(c.inputs, c.out_dir, perturbation, progress=False, **c.kwargs)
            if c.special == "twice":  # the second run must find its own output done, not scan it
                rows2 = protect_files(c.inputs, c.out_dir, perturbation, progress=False, **c.kwargs)
                if len(rows2) != len(rows) or not all(r["resumed"] for r in rows2):
                    rows = [{**r, "status": "redone-or-rescanned"} for r in rows2]
            statuses = ",".join(r["status"] for r in rows)
            crashed = [r for r in rows if r.get("crash")]
            if crashed:
                outcome, detail = "crash", crashed[0]["error"]
            elif c.expect == "error":
                ok = rows and all(r["status"] == "error" and r["error"] and "\n" not in r["error"] for r in rows)
                outcome, detail = ("clear_error", rows[0]["error"]) if ok else ("unexpected", statuses)
            elif c.expect == "refused":
                outcome, detail = "unexpected", f"not refused: {statuses}"
            elif statuses != c.expect:
                outcome, detail = "unexpected", f"{statuses or 'nothing'} (expected {c.expect or 'nothing'})"
            else:
                problem = c.check(rows, c.out_dir) if c.check else None
                outcome, detail = (("correct", statuses or "nothing to do") if problem is None
                                   else ("unexpected", problem))
                errors = [r["error"] for r in rows if r["status"] == "error"]
                if errors and problem is None:
                    detail += f" ({errors[0]})"
    except ProtectError as e:
        clear = c.expect == "refused" and "\n" not in str(e)
        outcome, detail = ("clear_error" if clear else "unexpected"), str(e)
    except Exception as e:  # noqa: BLE001 - counted, that is the point
        outcome, detail = "crash", f"{type(e).__name__}: {e}"
    key = {"clear_error": "clear_errors", "correct": "correct_results", "crash": "crashes"}.get(outcome, "unexpected")
    counts[key] += 1
    return {"case": c.name, "outcome": outcome, "detail": detail}
