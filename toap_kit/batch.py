"""Protect files and folders of photos into an output folder: resumable, atomic, one writer at a time.

    >>> from toap_kit import batch, protect
    >>> p = protect.load_perturbation(strength="mid")
    >>> rows = batch.protect_files([Path("photos")], Path("protected"), p)   # a folder, recursive
    >>> print(batch.summarize(rows, "protected"))

One photo is protected by ``protect.protect_image`` (read by ``protect.open_photo``, written in
its own format by ``protect._save``); this module does the rest, for ``toap protect``:

- **What is done**: files, and folders searched recursively (hidden files and folders and an
  output folder inside an input folder left out; links to files followed, links to folders
  not). Outputs keep the input's name and, for a folder, its sub-folders. Every path that is
  not protected gets a row with its reason and is named in ``summarize``: a FIFO, device or
  socket (never opened: reading one may never end), a link to nothing, a path too long for the
  system, a folder that cannot be listed (``os.walk`` would skip it silently), a file that
  cannot be decoded.
- **Never overwritten**: an input, or an existing file in the output folder that toap did not
  write (one whose sha256 matches no finished manifest row of that output).
- **Atomic writes**: a hidden temporary file (``protect.TMP_TAG``) in the same folder, its row
  appended to the manifest, then ``os.replace``: a killed run leaves no half file and no output
  without its row; the next run removes the temporary files.
- **The manifest** ``toap-manifest.jsonl`` in the output folder: one JSON object a line per
  photo (input, ``target`` = the output's path relative to the output folder, output, status,
  faces, strength, perturbation name and sha256, settings, sha256 of input and output, bit
  depth change, seconds, ...). Lines are only ever appended. A damaged manifest does not stop a
  run and is never rewritten: lines that are not JSON objects (random bytes, ``[1, 2]``, ``42``,
  half a line) are ignored with one warning, rows with fields of the wrong type match nothing.
- **Resume**: a photo is skipped when a finished row (``DONE``) of its target records the same
  input sha256, perturbation and settings and the output still has that row's sha256. The key
  is the target relative to the output folder, so the folder may be typed another way
  (``out`` or ``/home/me/out``), moved or copied. Rows of older manifests (the output's path as
  typed) are found by their path's ending.
- **One writer**: a run holds an exclusive ``fcntl.flock`` on the manifest; a second run on the
  same output folder is refused at once and changes nothing. The lock dies with the process
  (also under SIGKILL): nothing to clean up.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .config import device
from .data import IMAGE_SUFFIXES, sha256_file
from .perturbation import Perturbation
from .protect import (_WRITABLE, DEFAULT_JPEG_QUALITY, MIN_MEASURED_QUALITY, STRENGTHS, TMP_TAG, ProtectError,
                      _file_problem, _save, open_photo, protect_image)

__all__ = ["DONE", "MANIFEST", "protect_files", "read_manifest", "summarize"]

log = logging.getLogger(__name__)

MANIFEST = "toap-manifest.jsonl"
DONE = ("protected", "copied", "no-face")
"""Manifest statuses a rerun does not redo (``error`` rows are redone)."""
_SCAN_SUFFIXES = IMAGE_SUFFIXES | {".gif"}  # GIFs are scanned so that they are reported, not silently left out


class _Job(NamedTuple):
    """One path of a run: ``target`` is the output's path relative to the output folder (posix),
    None for a path that is not a photo file; ``error`` why it is not done, or None."""

    src: Path
    target: str | None
    error: str | None


def protect_files(inputs: Sequence[str | Path], out_dir: str | Path, perturbation: Perturbation, detect: bool = True,
                  no_face: str = "skip", jpeg_quality: int | None = None, keep_exif: bool = False,
                  progress: bool = True, refine_steps: int = 0, against: Sequence[str] = ("dlib",)) -> list[dict]:
    """Protect photos (files, or folders searched recursively) into ``out_dir``.

    Args:
        inputs: image files and folders; an output folder inside an input folder is not scanned.
        out_dir: where protected copies go, keeping names (and sub-folders of a folder input).
        perturbation: the perturbation to add (``protect.load_perturbation``).
        detect: detect faces; False: every image is one face (its central square).
        no_face: a photo without a face is left out (``"skip"``) or written unprotected
            (``"copy"``, through the same writer: orientation applied, metadata stripped).
        jpeg_quality: quality of JPEG outputs (default ``protect.DEFAULT_JPEG_QUALITY``; lower warns).
        keep_exif: write the original EXIF back (orientation set to 1); default: no EXIF.
        progress: show a tqdm progress bar (and one per photo for the refinement).
        refine_steps: 0: the universal delta; N > 0: every face refined for N steps against
            the networks ``against`` (``protect.protect_image``; a few seconds a face on a laptop).
        against: the refinement's networks (``recognizers.NAMES``; default dlib's); recorded in
            the rows' settings when ``refine_steps`` > 0.

    Returns:
        One manifest row per path of this run (``status``: ``protected``, ``copied``,
        ``no-face``, ``error``; ``resumed`` True for a photo done by an earlier run). Rows of
        new work are appended to ``out_dir / MANIFEST``. A bad file, an irregular file or an
        unreadable folder gets an ``error`` row (``target`` None when it is not a photo file)
        and the batch goes on; ``crash`` True marks an unexpected exception (a bug).

    Raises:
        ProtectError: the run cannot start (a bad ``TOAP_DEVICE``, output folder unusable, an
            output would overwrite an input, another run is writing to ``out_dir``, bad
            ``no_face`` or ``jpeg_quality``); nothing is read or written then.
    """
    try:
        device()  # a bad TOAP_DEVICE: refused here, not as an error on every photo
    except ValueError as e:
        raise ProtectError(str(e)) from None
    if no_face not in ("skip", "copy"):
        raise ProtectError(f"no_face must be 'skip' or 'copy', got {no_face!r}")
    quality = _check_quality(jpeg_quality)
    if isinstance(refine_steps, bool) or not isinstance(refine_steps, (int, np.integer)) or refine_steps < 0:
        raise ProtectError(f"refine steps must be a whole number >= 0, got {refine_steps!r}")
    against = _check_against(against) if refine_steps else ()  # the refinement's module loads only when asked for
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    jobs = _jobs(inputs, out_dir)
    for src, target, _ in jobs:
        if target is not None and (out_dir / target).resolve() == src.resolve():
            raise ProtectError(f"refusing to overwrite the original {src}: choose an output folder "
                               "other than the input's own folder")
    with _locked(out_dir):
        _clean_temps(out_dir)
        settings = {"detect": detect, "no_face": no_face, "jpeg_quality": quality, "keep_exif": keep_exif,
                    "refine_steps": int(refine_steps), **({"against": list(against)} if refine_steps else {})}
        run = _Run(out_dir, perturbation, _perturbation_info(perturbation), settings,
                   _index(read_manifest(out_dir / MANIFEST)), progress)
        with logging_redirect_tqdm():  # warnings print above the progress bar, not through it
            return [_protect_or_report(job, run)
                    for job in tqdm(jobs, desc="protect", unit="photo", disable=not progress)]


# ---------------------------------------------------------------- the run's set-up
def _check_against(against: Sequence[str]) -> tuple[str, ...]:
    from .refine import check_against  # the refinement's module: only its check, no network is loaded

    try:
        return check_against(against)
    except ValueError as e:
        raise ProtectError(str(e)) from None


def _check_quality(q: int | None) -> int:
    if q is None:
        return DEFAULT_JPEG_QUALITY
    if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or not 1 <= q <= 100:
        raise ProtectError(f"JPEG quality must be an integer in 1..100, got {q!r}")
    if q < DEFAULT_JPEG_QUALITY:
        log.warning("JPEG quality %d is below %d, the quality the kit measured to keep the protection%s",
                    q, DEFAULT_JPEG_QUALITY, "" if q >= MIN_MEASURED_QUALITY else
                    f" (and below {MIN_MEASURED_QUALITY}, the lowest it measured at all)")
    return int(q)


def _prepare_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and check that files can be written there (ProtectError if not)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ProtectError(f"output folder {out_dir} is an existing file")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".probe{TMP_TAG}{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ProtectError(f"cannot write to output folder {out_dir}: {e.strerror or e}") from None


@contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on ``out_dir``'s manifest (created if missing)
    while the block runs; ProtectError if another process holds it."""
    manifest = out_dir / MANIFEST
    if os.path.lexists(manifest) and _file_problem(manifest):
        raise ProtectError(f"{manifest} is not a regular file: move it away, toap protect keeps its record there")
    try:
        f = open(manifest, "ab")
    except OSError as e:
        raise ProtectError(f"cannot open {manifest}: {e.strerror or e}") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ProtectError(f"another toap protect is writing to {out_dir}: wait until it ends "
                               "(a rerun then resumes), or choose another output folder") from None
        except OSError as e:  # a file system without locks (some network drives): go on, unguarded
            log.warning("cannot lock %s (%s): make sure no other toap protect writes there", manifest, e.strerror)
        yield  # the lock goes with the file's closing, or with the process


def _clean_temps(out_dir: Path) -> int:
    """Remove temporary files a killed run left in ``out_dir``; returns how many."""
    n = 0
    for root, _, files in os.walk(out_dir):
        for name in files:
            if name.startswith(".") and TMP_TAG in name:
                Path(root, name).unlink(missing_ok=True)
                n += 1
    if n:
        log.info("removed %d temporary files left by an interrupted run in %s", n, out_dir)
    return n


def _perturbation_info(p: Perturbation) -> dict:
    """The perturbation's fields of a manifest row: name, sha256, strength (or None), eps."""
    name = p.card.get("name") or "custom"
    sha = p.card.get("sha256") or hashlib.sha256(p.delta.numpy().tobytes()).hexdigest()
    strength = next((s for s, n in STRENGTHS.items() if n == name), None)
    return {"perturbation": name, "perturbation_sha256": sha, "strength": strength,
            "eps_255": round(p.eps * 255, 3)}


# ---------------------------------------------------------------- what to do
def _scan(folder: Path, skip: Path) -> list[tuple[Path, str | None]]:
    """``(path, problem)`` for every image file under ``folder``, in walk order (sorted; hidden
    files and folders and ``skip`` left out; links to files followed, links to folders not).
    ``problem`` is None for a regular file, else why it is not read: not a regular file, a path
    too long for the system, or (with the folder as path) a folder that cannot be listed."""
    found: list[tuple[Path, str | None]] = []

    def unreadable(e: OSError) -> None:  # os.walk skips such a folder silently without this
        found.append((Path(e.filename), f"cannot read this folder ({e.strerror}): the photos in it, if any, "
                                        "are not protected"))

    for root, dirs, files in os.walk(folder, onerror=unreadable):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and here.joinpath(d).resolve() != skip)
        found += [(here / n, _file_problem(here / n)) for n in sorted(files)
                  if not n.startswith(".") and Path(n).suffix.lower() in _SCAN_SUFFIXES]
    return found


def _jobs(inputs: Iterable[str | Path], out_dir: Path) -> list[_Job]:
    """A ``_Job`` for every path: folders are scanned (not the output folder inside them); the
    same file twice is kept once; two inputs mapping to one output name: the later one gets an
    error."""
    out_resolved = out_dir.resolve()
    jobs: list[_Job] = []
    seen, taken = set(), {}
    for given in map(Path, inputs):
        if os.path.isdir(given):
            found = [(p, p.relative_to(given).as_posix(), why) for p, why in _scan(given, out_resolved)]
        else:
            found = [(given, given.name, _file_problem(given))]
        for src, target, why in found:
            if why:
                jobs.append(_Job(src, None, why))
                continue
            real = src.resolve()
            if real in seen:
                continue
            seen.add(real)
            if target in taken:
                jobs.append(_Job(src, target, f"output name clash: {taken[target]} is also written to "
                                              f"{out_dir / target}"))
                continue
            taken[target] = src
            jobs.append(_Job(src, target, None))
    return jobs


# ---------------------------------------------------------------- one photo of the run
@dataclass
class _Run:
    """What every photo of one ``protect_files`` call shares. With refinement, dlib's network is
    loaded once, on the first face (``refine.known_recognizer``): a photo without one loads nothing."""

    out_dir: Path
    perturbation: Perturbation
    info: dict  # ``_perturbation_info``
    settings: dict  # detect, no_face, jpeg_quality, keep_exif, refine_steps: recorded in every row
    earlier: dict[str, list[dict]]  # the manifest's finished rows (``_index``)
    progress: bool  # a tqdm bar for each photo's refinement

    @property
    def manifest(self) -> Path:
        return self.out_dir / MANIFEST


def _protect_or_report(job: _Job, run: _Run) -> dict:
    """One path of ``protect_files``: its manifest row; any failure becomes an ``error`` row."""
    t0 = time.perf_counter()
    row = {"input": str(job.src), "target": job.target, "output": None, "status": "error", "faces": 0,
           "boxes": [], **run.info, "settings": run.settings, "format": None, "bit_depth": None,
           "input_sha256": None, "output_sha256": None, "output_bytes": None, "seconds": None,
           "error": job.error, "notes": [], "crash": False, "resumed": False}
    if job.error is None:
        try:
            row = _protect_one(job, row, run, t0)
        except ProtectError as e:
            row.update(status="error", output=None, output_sha256=None, output_bytes=None, error=str(e))
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the batch
            log.exception("unexpected error on %s", job.src)
            row.update(status="error", output=None, output_sha256=None, output_bytes=None, crash=True,
                       error=f"internal error ({type(e).__name__}: {' '.join(str(e).split())})")
    if row["status"] == "error":
        row["seconds"] = round(time.perf_counter() - t0, 4)
        log.warning("%s: %s", job.src, row["error"])
        _append(run.manifest, row)
    return row


def _protect_one(job: _Job, row: dict, run: _Run, t0: float) -> dict:
    src, dst = job.src, run.out_dir / job.target
    try:
        row["input_sha256"] = sha256_file(src)
    except OSError as e:
        raise ProtectError(f"cannot read the file: {e.strerror or e}") from None
    try:
        out_sha = sha256_file(dst) if dst.is_file() else None
        exists = os.path.lexists(dst)
    except OSError as e:
        raise ProtectError(f"cannot read {dst}: {e.strerror or e}") from None
    earlier = _rows_for(run.earlier, job.target)
    done = _done_before(earlier, row, out_sha)
    if done is not None:
        output = None if done["status"] == "no-face" else str(dst)
        return {**done, "input": str(src), "target": job.target, "output": output, "resumed": True}
    if exists and (out_sha is None or all(r.get("output_sha256") != out_sha for r in earlier)):
        raise ProtectError(f"{dst} already exists and was not written by toap protect: not overwritten")
    img, source = open_photo(src)
    res = protect_image(img, run.perturbation, run.settings["detect"], run.settings["refine_steps"],
                        progress=run.progress, against=run.settings.get("against", ("dlib",)))
    row.update(format=_WRITABLE[source.format], bit_depth=source.bit_depth, faces=len(res.boxes),
               boxes=[list(b) for b in res.boxes], notes=source.notes + res.notes)
    if source.format == "MPO":
        row["notes"].append("multi-picture JPEG: the first picture was written")
    if run.settings["keep_exif"] and source.format == "BMP":
        row["notes"].append("BMP cannot store EXIF")
    if not res.faces_found and run.settings["no_face"] == "skip":
        row.update(status="no-face", seconds=round(time.perf_counter() - t0, 4))
        _append(run.manifest, row)
        return row
    row["status"] = "protected" if res.faces_found else "copied"
    row["output"] = str(dst)

    def record(sha: str, size: int) -> None:
        row.update(output_sha256=sha, output_bytes=size, seconds=round(time.perf_counter() - t0, 4))
        _append(run.manifest, row)  # before the final name: a kill leaves no output without its row

    quality, keep_exif = run.settings["jpeg_quality"], run.settings["keep_exif"]
    try:
        _write_atomic(dst, lambda f: _save(res.image, f, source, quality, keep_exif), record)
    except OSError as e:
        raise ProtectError(f"cannot write {dst}: {e.strerror or e}") from None
    return row


def _done_before(earlier: list[dict], row: dict, out_sha: str | None) -> dict | None:
    """The latest of ``earlier`` (finished rows of this target) that did this very work (same
    input, perturbation and settings) and whose result is still there (no face found, or the
    output has the sha256 it recorded), or None."""
    for prev in reversed(earlier):
        same = (prev.get("input_sha256") == row["input_sha256"] and prev.get("settings") == row["settings"]
                and prev.get("perturbation_sha256") == row["perturbation_sha256"])
        if same and (prev["status"] == "no-face" or (out_sha is not None and prev.get("output_sha256") == out_sha)):
            return prev
    return None


def _write_atomic(dst: Path, write: Callable[[object], None], before_replace: Callable[[str, int], None]) -> None:
    """Write ``dst`` through a temporary file in its folder, then ``os.replace``; a killed run
    leaves at most a hidden temporary file (removed by the next run). ``before_replace(sha256,
    size)`` runs once the bytes are on disk, before they get the final name."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}{TMP_TAG}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        before_replace(sha256_file(tmp), tmp.stat().st_size)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- the manifest
def read_manifest(path: str | Path) -> list[dict]:
    """The rows of a manifest (JSON lines), in order; ``[]`` if it is missing or not a regular file.

    Damage is ignored, never repaired: a line that is not a JSON object (half a line from a
    killed run, random bytes, ``[1, 2]``, ``42``) is left out with one warning naming the file
    and its lines. A row whose fields have the wrong type is returned as it is; a rerun matches
    nothing with it. ProtectError if the file cannot be read (permissions)."""
    path = Path(path)
    if _file_problem(path):
        return []
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise ProtectError(f"cannot read {path}: {e.strerror or e}") from None
    rows, bad = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(n)
    if bad:
        log.warning("%s: %d line%s not a manifest row (damaged, or cut short by a killed run), ignored: line %s",
                    path, len(bad), " is" if len(bad) == 1 else "s are", ", ".join(map(str, bad[:10]))
                    + (", ..." if len(bad) > 10 else ""))
    return rows


def _append(manifest: Path, row: dict) -> None:
    with open(manifest, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():  # a killed run may have left half a line: start a fresh one
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(row) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def _index(rows: list[dict]) -> dict[str, list[dict]]:
    """The finished rows (``DONE``) with a usable ``target``, by the target's file name, in order."""
    index: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("status") in DONE and isinstance(r.get("target"), str) and r["target"]:
            index.setdefault(PurePath(r["target"]).name, []).append(r)
    return index


def _rows_for(index: dict[str, list[dict]], target: str) -> list[dict]:
    """The finished rows of ``target`` (relative to the output folder): rows whose ``target`` is
    it, or ends with it (older manifests recorded the output's path as typed: ``out/a/b.jpg``)."""
    parts = PurePath(target).parts
    return [r for r in index.get(PurePath(target).name, []) if PurePath(r["target"]).parts[-len(parts):] == parts]


# ---------------------------------------------------------------- for people
def summarize(rows: list[dict], out_dir: str | Path | None = None) -> str:
    """One paragraph for people: counts per outcome, then each path not protected with its
    reason, each photo without a face, and each photo written with fewer bits than it had."""
    new = [r for r in rows if not r.get("resumed")]
    count = {s: sum(r["status"] == s for r in new) for s in ("protected", "copied", "no-face", "error")}
    faces = sum(r["faces"] for r in new if r["status"] == "protected")
    photos = sum(r["target"] is not None for r in rows)
    others = len(rows) - photos
    parts = [f"{count['protected']} protected ({faces} faces)"]
    if count["copied"]:
        parts.append(f"{count['copied']} copied without a face")
    if count["no-face"]:
        parts.append(f"{count['no-face']} left out (no face found)")
    if len(rows) > len(new):
        parts.append(f"{len(rows) - len(new)} already done by an earlier run")
    parts.append(f"{count['error']} failed")
    found = f"{photos} photo{'s' * (photos != 1)}"
    if others:
        found += f" and {others} other path{'s' * (others != 1)} (not a photo file, or not readable)"
    where = f"; output in {out_dir}" if out_dir else ""
    lines = [f"{found}: " + ", ".join(parts) + where]
    lines += [f"  failed: {r['input']}: {r['error']}" for r in rows if r["status"] == "error"]
    lines += [f"  no face: {r['input']}" for r in new if r["status"] == "no-face"]
    lines += [f"  bit depth {r['bit_depth']}: {r['input']}" for r in new if r.get("bit_depth")]
    return "\n".join(lines)
