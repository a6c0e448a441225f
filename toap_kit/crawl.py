"""The crawler and its search (``toap crawl``, ``toap search``): the threat TOAP protects against,
built small. See ``toap_kit.index``'s docstring for the face index itself.

    >>> from toap_kit import crawl
    >>> s = crawl.crawl_folder("photos/", "outputs/faces.db", "dlib_itq_32", label_from_folder=True)
    >>> print(crawl.crawl_summary(s))
    >>> r = crawl.search_photo("someone.jpg", "outputs/faces.db", k=10)

``crawl_folder`` walks a folder of photos (recursively, hidden files left out), finds every face
with the kit's detector, cuts it as the kit's engines see it, encodes it with a zoo engine and
inserts it into a face index on any backend of ``toap_kit.index`` with its source file (relative
to the folder), box and, with ``label_from_folder``, the identity named by its folder. The index
records its engine and code length: a crawl or search with another engine is refused.

**Resumable.** Each file goes into the index's ledger (its relative path, size, modification
and change time, and sha256) in the same ``add`` as its faces. A rerun skips every file already
indexed and unchanged; a changed file is indexed again, its old faces removed first, so a face is
never duplicated. A FAISS file index is saved every ``save_every`` files and at the end, also after
Ctrl-C. The index keys files by their path relative to the folder: crawl one folder tree into
one index.

**When a file counts as unchanged** (the sha256 is read only where it can tell something):

- size, modification time and change time (``st_ctime``, which no program can set back) as
  recorded: unchanged, trusted without reading it;
- the same size but another modification or change time (touched, copied with its times,
  rewritten in place with its old modification time put back, its folder moved): its sha256
  is compared with the recorded one: the same bytes are skipped (the ledger takes the new
  times), other bytes are indexed again;
- another size: indexed again.

``verify_sha`` (``toap crawl --verify-sha``) compares the sha256 of every indexed file.

**Files that are gone.** A file in the ledger that the walk no longer finds (deleted, renamed,
hidden) is *missing*: the summary always counts them, and its faces stay in the index (a search
still returns them) until a crawl with ``prune`` (``--prune``) removes their rows and ledger
records. A file under a folder that could not be listed is not counted as missing. ``prune``
refuses, changing nothing, when no indexed file is under the folder any more while it holds
photos (most likely another folder than the one the index was built from).

**One crawl at a time.** The crawl holds the index's lock (``index.lock``: ``PATH.lock`` next to
a FAISS file or Milvus Lite folder) from before it opens the index to the end; a second crawl,
or a search, into the same index is refused at once with "index in use by another run (pid N)".
A Milvus server has no lock file (two crawls into one collection are the user's to avoid).

**Several crawlers, one server** (``shard=(i, n)``, ``toap crawl --shard i/n``): crawler ``i``
of ``n`` reads only the files whose path (relative to the folder) hashes to ``i``
(``in_shard``), reports and prunes only those, and takes its row ids from its own block
(``index.MilvusIndex.use_shard``), so ``n`` processes, on one machine or several, crawl one
folder tree into one collection at once and together index what one crawl would. Only for a
Milvus server (a FAISS file or Milvus Lite has one writer), into an index that exists (one
crawl without ``--shard`` makes it: the shards could otherwise race to create it).

**Checked before any work** (``index.check_location``): a folder or file in the way of the index,
a plain file where Milvus Lite keeps its folder, a folder that cannot be written: one line, and
no photo is read.

**Names.** Any file name is indexed (apostrophes, newlines, bytes that are not UTF-8). The summary,
the search results and the index's ``source`` give names as ``index.shown`` prints them (bytes
that are not UTF-8 as ``\\xNN``), so every output can print them and ``--json`` is valid JSON.

**The summary** (``crawl_folder``'s return, ``crawl_summary`` for people, ``toap crawl --json``):
photos found, files indexed now and faces added, files skipped (already indexed), sha256s
compared, files without a face, files that failed (each with its reason), indexed files missing
(and pruned), rows in the index, seconds.

``search_photo`` searches the index with every face of a photo (cut and encoded the same way, by
the index's engine) and lists each face's top k by Hamming distance, ties by row id.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import batch, protect
from . import index as face_index
from .data import sha256_file
from .index import shown

__all__ = ["crawl_folder", "crawl_summary", "in_shard", "search_photo"]

log = logging.getLogger(__name__)


def _faces(image) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Every face of a PIL photo as the kit's engines see it: ``N x 3 x 112 x 112`` in [0, 1] and
    the boxes ``[(x0, y0, side), ...]`` (largest first; ``protect.face_boxes``), each square cut
    and resized as ``protect.face_crop`` cuts the largest one."""
    from .engine import DISPLAY

    rgb = protect._8bit(protect._upright(image, [])).convert("RGB")
    boxes = protect.face_boxes(rgb)
    crops = []
    for box in boxes:
        t = torch.from_numpy(np.array(protect._square(rgb, box), dtype=np.float32)).permute(2, 0, 1).div_(255)
        crops.append(torch.nn.functional.interpolate(t[None], size=(DISPLAY, DISPLAY), mode="bicubic",
                                                     align_corners=False, antialias=True)[0].clamp(0, 1))
    return (torch.stack(crops) if crops else torch.zeros(0, 3, DISPLAY, DISPLAY)), boxes


def _encode(engine_name: str, crops: torch.Tensor) -> np.ndarray:
    from .engine import model

    if not len(crops):
        return np.zeros((0, model(engine_name).bits), np.int8)
    with torch.no_grad():
        return model(engine_name).encode(crops).numpy().astype(np.int8)


def in_shard(key: str, shard: tuple[int, int] | None) -> bool:
    """Whether the file ``key`` (its path relative to the crawled folder) is shard ``(i, n)``'s:
    the first 8 bytes of the sha256 of its name, modulo ``n``, are ``i`` (every key, for None)."""
    if shard is None:
        return True
    i, n = shard
    return int.from_bytes(hashlib.sha256(os.fsencode(key)).digest()[:8], "big") % n == i


def _check_shard(shard: tuple[int, int] | None, uri: str) -> None:
    if shard is None:
        return
    whole = isinstance(shard, tuple) and len(shard) == 2 and all(type(v) is int for v in shard)
    if not whole or not 0 <= shard[0] < shard[1] <= 1024:
        raise protect.ProtectError(f"--shard must be I/N with 0 <= I < N <= 1024, got {shard!r}")
    if _index_call(face_index.parse_uri, uri).kind != "milvus-server":
        raise protect.ProtectError(f"--shard: {shown(str(uri))} is not a Milvus server; only a server "
                                   "(http://HOST:19530) takes several crawlers at once (a FAISS file or Milvus "
                                   "Lite index has one writer)")


def _check_engine(name: str) -> str:
    from . import zoo

    if name not in zoo.names():
        raise protect.ProtectError(f"unknown engine {name!r}; choose from {', '.join(zoo.names())}")
    return name


def _open_for_crawl(uri: str, engine_name: str | None, shard: tuple[int, int] | None = None) -> face_index.FaceIndex:
    """The index at ``uri`` (its engine checked against ``engine_name``), or a new one; with
    ``shard``, an existing one taking ids from the shard's block."""
    from .engine import DEFAULT_ENGINE, model

    try:
        ix = _index_call(face_index.open_index, uri, engine=engine_name and _check_engine(engine_name))
    except FileNotFoundError:
        if shard is not None:
            raise protect.ProtectError(f"--shard: no face index at {shown(str(uri))} yet: make it with one crawl "
                                       "without --shard (of an empty folder, say), then start the shards") from None
        name = _check_engine(engine_name or DEFAULT_ENGINE)
        return _index_call(face_index.open_index, uri, bits=model(name).bits, engine=name)
    if shard is not None:
        ix.use_shard(shard[0])
    return ix


def _index_call(f, uri: str, **kw):
    """``f(uri, **kw)`` with the index's ValueErrors (a bad URI, another engine, a bad location)
    as one plain line."""
    try:
        return f(uri, **kw)
    except protect.ProtectError:
        raise
    except ValueError as e:
        raise protect.ProtectError(str(e) if str(uri) in str(e) else f"--index {shown(str(uri))}: {e}") from None


def _checked_location(uri: str, write: bool) -> None:
    """``index.check_location`` with its refusal (which names the path) as one plain line."""
    try:
        face_index.check_location(uri, write)
    except ValueError as e:
        raise protect.ProtectError(shown(str(e))) from None


@contextmanager
def _held(uri: str, write: bool) -> Iterator[None]:
    """``index.lock(uri, write)`` with its refusal as one plain line."""
    held = ExitStack()
    try:
        held.enter_context(face_index.lock(uri, write))
    except face_index.IndexInUse as e:
        raise protect.ProtectError(str(e)) from None
    except ValueError as e:
        raise protect.ProtectError(f"--index {shown(str(uri))}: {e}") from None
    with held:
        yield


def _prepare_location(uri: str) -> None:
    """Refuse an index that cannot be kept (in memory) or written (``index.check_location``),
    then make its folder: before any photo is read."""
    target = _index_call(face_index.parse_uri, uri)
    if target.kind == "faiss" and target.location is None:
        raise protect.ProtectError(f"--index {uri}: an in-memory index keeps nothing after the crawl; give a file "
                                   "(faiss://PATH or PATH.db) or a server")
    _checked_location(uri, write=True)
    if target.kind != "milvus-server":
        folder = Path(target.location).expanduser().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise protect.ProtectError(f"--index {shown(str(uri))}: cannot make the folder {shown(str(folder))}: "
                                       f"{e.strerror or e}") from None


def _scanned(folder: Path, index_uri: str,
             shard: tuple[int, int] | None = None) -> tuple[list[tuple[Path, str]], list[dict], set[str], list[str]]:
    """``batch._scan`` of ``folder`` (the index's own folder left out): ``(photos, failed,
    present, unreadable)``: the image files to read as ``(path, key)`` (key: the path relative to
    ``folder``), a ``failed`` row for every path that cannot be read, the keys of every path found
    (read or not), and the keys of folders that could not be listed (every shard's). With
    ``shard``, only the files of that shard (``in_shard``)."""
    target = face_index.parse_uri(index_uri)
    skip = Path(target.location).resolve() if target.location and target.kind != "milvus-server" else Path("/")
    photos, failed, present, unreadable = [], [], set(), []
    for path, problem in batch._scan(folder, skip):
        rel = path.relative_to(folder).as_posix()
        folder_problem = problem is not None and problem.startswith("cannot read this folder")
        if not folder_problem and not in_shard(rel, shard):
            continue
        present.add(rel)
        if problem is None:
            photos.append((path, rel))
            continue
        if folder_problem:  # batch's words are for toap protect: this is a crawl
            unreadable.append(rel)
            problem = problem.replace("are not protected", "are not indexed")
        failed.append({"path": shown(rel), "reason": shown(problem)})
    return photos, failed, present, unreadable


def _missing(ix: face_index.FaceIndex, folder: Path, present: set[str], unreadable: list[str],
             shard: tuple[int, int] | None = None) -> tuple[list[str], int]:
    """Keys of the files in the index's ledger (of ``shard``'s, with one) that are gone from
    ``folder`` (not found by the scan, not under a folder that could not be listed, and no longer
    there at all), and how many files the ledger holds (of the shard's)."""
    known, gone = [k for k in ix.files() if in_shard(k, shard)], []
    for key in known:
        if key in present or any(u == "." or key.startswith(u + "/") for u in unreadable):
            continue
        if not os.path.lexists(folder / key):
            gone.append(key)
    return sorted(gone), len(known)


def crawl_folder(folder: str | Path, index_uri: str, engine_name: str | None = None, *,
                 label_from_folder: bool = False, progress: bool = True, save_every: int = 50,
                 prune: bool = False, verify_sha: bool = False, shard: tuple[int, int] | None = None) -> dict:
    """Index every face of every photo under ``folder`` (``toap crawl``).

    Args:
        folder: a folder of photos, searched recursively (hidden files and folders left out, as
            ``toap protect`` does).
        index_uri: the face index (``index.open_index``; created when missing, never in memory).
        engine_name: the zoo engine that encodes the faces (default: the index's; for a new
            index ``engine.DEFAULT_ENGINE``); another engine than the index's is refused.
        label_from_folder: record each face's ``identity`` as its photo's folder name.
        progress: a tqdm bar on stderr.
        save_every: a FAISS file index is written after this many files (and at the end).
        prune: remove the rows and ledger records of indexed files that are gone from ``folder``.
        verify_sha: compare the sha256 of every indexed file, not only of those whose
            modification or change time moved (module docstring).
        shard: ``(i, n)``: crawler ``i`` of ``n`` into one Milvus server (module docstring).

    Returns:
        The summary: ``folder, index, engine, bits, photos`` (image files found), ``indexed``
        (files read now), ``faces`` (added now), ``no_face`` (paths of files without a face),
        ``skipped`` (already indexed, unchanged), ``sha_checked`` (of those and the changed
        ones: files whose sha256 was compared), ``failed`` (``[{"path", "reason"}]``),
        ``missing`` (paths of indexed files gone from ``folder``), ``pruned`` (how many of
        them were removed, with ``pruned_faces`` faces), ``rows`` (faces in the index now),
        ``seconds``, ``shard`` (``"i/n"``, or None). Paths are relative to ``folder``, as
        ``index.shown`` prints them; with a shard, every count is of its files.

    Raises:
        ProtectError: ``folder`` is not a folder, an unknown engine, an in-memory index, a bad
            URI, an index built with another engine, an index location that cannot be used
            (``index.check_location``), an index another run holds (``index.lock``), a bad
            ``shard``, a shard of a FAISS or Milvus Lite index or of an index not made yet.
    """
    t0 = time.perf_counter()
    folder = Path(folder)
    if not folder.is_dir():
        raise protect.ProtectError(f"{shown(str(folder))}: not a folder")
    if engine_name is not None:
        _check_engine(engine_name)
    _check_shard(shard, index_uri)
    _prepare_location(index_uri)
    with _held(index_uri, write=True):
        ix = _open_for_crawl(index_uri, engine_name, shard)
        try:
            summary = _crawl(ix, folder, index_uri, label_from_folder, progress, save_every, prune, verify_sha, shard)
        finally:
            ix.save()  # also after Ctrl-C: what was indexed is kept, the rerun resumes
            rows = len(ix)
            ix.close()
    summary["rows"] = rows
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def _crawl(ix: face_index.FaceIndex, folder: Path, index_uri: str, label_from_folder: bool, progress: bool,
           save_every: int, prune: bool, verify_sha: bool, shard: tuple[int, int] | None = None) -> dict:
    """``crawl_folder``'s work on the open, locked index ``ix``: its summary without rows and seconds."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    summary = {"folder": shown(str(folder)), "index": shown(str(index_uri)), "engine": ix.engine, "bits": ix.bits,
               "photos": 0, "indexed": 0, "faces": 0, "no_face": [], "skipped": 0, "sha_checked": 0, "failed": [],
               "missing": [], "pruned": 0, "pruned_faces": 0, "shard": f"{shard[0]}/{shard[1]}" if shard else None}
    photos, summary["failed"], present, unreadable = _scanned(folder, index_uri, shard)
    missing, known = _missing(ix, folder, present, unreadable, shard)
    summary["missing"] = [shown(k) for k in missing]
    if prune and missing and len(missing) == known and photos:
        raise protect.ProtectError(f"--prune: none of the {known} files in the index is under {shown(str(folder))}, "
                                   f"which holds {len(photos)} photos: is it the folder the index was built from? "
                                   "Nothing was pruned")
    if prune and missing:
        summary["pruned_faces"] = ix.forget(missing)
        summary["pruned"] = len(missing)
        log.info("pruned %d files gone from %s (%d faces)", len(missing), folder, summary["pruned_faces"])
    summary["photos"] = len(photos)
    done = ix.crawled([rel for _, rel in photos])
    todo = []
    for path, rel in photos:
        try:
            st = path.stat()
        except OSError as e:
            summary["failed"].append({"path": shown(rel), "reason": f"cannot read it: {e.strerror or e}"})
            continue
        rec = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
        old = done.get(rel)
        if old and not verify_sha and all(old.get(k) == rec[k] for k in rec):
            summary["skipped"] += 1  # size, modification and change time as recorded: trusted
        else:
            todo.append((path, rel, rec, old if old and old.get("size") == rec["size"] else None))
    log.info("%s: %d photos, %d already indexed, %d to check or read", folder, summary["photos"], summary["skipped"],
             len(todo))
    since_save = 0
    with logging_redirect_tqdm(), tqdm(todo, desc="crawl", unit="photo", disable=not progress,
                                       file=sys.stderr) as bar:
        for path, rel, rec, old in bar:
            try:
                sha = sha256_file(path)
                if old is not None:
                    summary["sha_checked"] += 1
                    if old.get("sha256") == sha:  # the same bytes: new times only
                        ix.update_file(rel, {**rec, "sha256": sha})
                        summary["skipped"] += 1
                        continue
                image = protect.open_photo(path)[0]
                crops, boxes = _faces(image)
                codes = _encode(ix.engine, crops)
                identity = shown(Path(os.path.abspath(path)).parent.name) if label_from_folder else None
                meta = [{"source": shown(rel), "identity": identity, "box": list(b), "face": j, "faces": len(boxes)}
                        for j, b in enumerate(boxes)]
                ix.add(codes, meta, file=(rel, {**rec, "sha256": sha}))
            except protect.ProtectError as e:
                summary["failed"].append({"path": shown(rel), "reason": shown(str(e))})
                continue
            except OSError as e:
                summary["failed"].append({"path": shown(rel), "reason": shown(f"cannot read it: {e.strerror or e}")})
                continue
            except (ValueError, RuntimeError) as e:
                summary["failed"].append({"path": shown(rel), "reason": shown(f"{type(e).__name__}: {e}")})
                continue
            except Exception as e:  # noqa: BLE001 - one bad file must not stop the crawl
                log.debug("unexpected error on %s", shown(rel), exc_info=True)
                summary["failed"].append({"path": shown(rel), "reason": shown(f"internal error ({type(e).__name__}: "
                                                                              f"{' '.join(str(e).split())})")})
                continue
            summary["indexed"] += 1
            summary["faces"] += len(boxes)
            if not boxes:
                summary["no_face"].append(shown(rel))
            since_save += 1
            if isinstance(ix, face_index.FaissIndex) and since_save >= save_every:
                ix.save()
                since_save = 0
    return summary


def crawl_summary(s: dict) -> str:
    """The crawl's summary for people."""
    gone = len(s["missing"])
    lines = [f"{s['photos']} photos under {s['folder']}{' in shard ' + s['shard'] if s.get('shard') else ''}: "
             f"{s['indexed']} indexed now ({s['faces']} faces), "
             f"{s['skipped']} already indexed, {len(s['no_face'])} without a face, {len(s['failed'])} failed, "
             f"{gone} indexed files missing; index {s['index']}: {s['rows']} faces, engine {s['engine']} "
             f"({s['bits']} bits); {s['seconds']} s"]
    lines += [f"  failed: {f['path']}: {f['reason']}" for f in s["failed"]]
    lines += [f"  no face: {p}" for p in s["no_face"]]
    if gone:
        what = (f"their {s['pruned_faces']} faces were removed (--prune)" if s["pruned"] else
                "their faces are still in the index and found by a search: --prune removes them")
        lines.append(f"  {gone} indexed files are gone from {s['folder']}: {what}")
        lines += [f"  missing: {p}" for p in s["missing"][:20]]
        if gone > 20:
            lines.append(f"  ... and {gone - 20} more (--json lists them all)")
    return "\n".join(lines)


def search_photo(photo: str | Path, index_uri: str, k: int = 10, engine_name: str | None = None) -> dict:
    """Search the face index at ``index_uri`` with every face of ``photo`` (``toap search``).

    The faces are found and cut as ``crawl_folder`` cuts them (without a face, the photo's central
    square is searched and ``face_found`` is False) and encoded by the index's engine. The index
    is read under ``index.lock(index_uri, write=False)``: a search beside a crawl into the same
    index is refused.

    Returns:
        ``{"photo", "index", "engine", "bits", "rows", "faces": [{"box", "face_found",
        "results": [{"rank", "id", "hamming", "source", "identity", "box"}, ...]}, ...]}``;
        results sorted by Hamming distance, ties by row id (the order the faces were indexed);
        names as ``index.shown`` prints them.

    Raises:
        ProtectError: an unreadable photo, a bad URI or index location, an index another run
            holds, an index whose engine is not in the zoo, or an ``engine_name`` other than the
            index's.
        FileNotFoundError: no index at ``index_uri``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise protect.ProtectError(f"--k must be a positive whole number, got {k!r}")
    target = _index_call(face_index.parse_uri, index_uri)  # a bad URI before any work
    try:
        image = protect.open_photo(photo)[0]
    except protect.ProtectError as e:
        raise protect.ProtectError(f"{shown(str(photo))}: {e}") from None
    missing = FileNotFoundError(f"no face index at {shown(str(index_uri))}: build one with `toap crawl FOLDER "
                                f"--index {shown(str(index_uri))}`")
    if target.kind != "milvus-server" and target.location is not None:
        if not os.path.lexists(Path(target.location).expanduser()):
            if os.path.lexists(face_index.lock_path(index_uri)):  # a crawl may be making it: say so
                with _held(index_uri, write=False):
                    pass
            raise missing
        _checked_location(index_uri, write=False)
    with _held(index_uri, write=False):
        try:
            ix = _index_call(face_index.open_index, index_uri)
        except FileNotFoundError:
            raise missing from None
        with ix:
            return _search(ix, image, photo, index_uri, k, engine_name)


def _search(ix: face_index.FaceIndex, image, photo, index_uri: str, k: int, engine_name: str | None) -> dict:
    """``search_photo`` on the open index ``ix``."""
    if engine_name is not None and engine_name != ix.engine:
        raise protect.ProtectError(f"{shown(str(index_uri))} was built with engine {ix.engine!r}, not "
                                   f"{engine_name!r}: codes of two engines cannot be compared")
    if ix.engine is None:
        raise protect.ProtectError(f"{shown(str(index_uri))} does not record its engine: it cannot encode a photo "
                                   "for it")
    _check_engine(ix.engine)
    crops, boxes = _faces(image)
    found = bool(boxes)
    if not found:
        crop, _ = protect.face_crop(protect._upright(image, []))
        crops, boxes = crop[None], [protect._central_square(*image.size)]
    hits = ix.search(_encode(ix.engine, crops), k)

    def text(x):
        return shown(x) if isinstance(x, str) else x

    faces = []
    for j, box in enumerate(boxes):
        results = [{"rank": r + 1, "id": int(i), "hamming": int(d), "source": text(m.get("source")),
                    "identity": text(m.get("identity")), "box": m.get("box")}
                   for r, (i, d, m) in enumerate(zip(hits.ids[j], hits.distances[j], hits.meta[j])) if i >= 0]
        faces.append({"box": list(box), "face_found": found, "results": results})
    return {"photo": shown(str(photo)), "index": shown(str(index_uri)), "engine": ix.engine, "bits": ix.bits,
            "rows": len(ix), "faces": faces}
