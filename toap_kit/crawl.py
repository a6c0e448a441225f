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
time and sha256) in the same ``add`` as its faces. A rerun skips every file already indexed and
unchanged; a changed file is indexed again, its old faces removed first, so a face is never
duplicated. A FAISS file index is saved every ``save_every`` files and at the end, also after
Ctrl-C. The index keys files by their path relative to the folder: crawl one folder tree into
one index.

**The summary** (``crawl_folder``'s return, ``crawl_summary`` for people, ``toap crawl --json``):
photos found, files indexed now and faces added, files skipped (already indexed), files without
a face, files that failed (each with its reason), rows in the index, seconds.

``search_photo`` searches the index with every face of a photo (cut and encoded the same way, by
the index's engine) and lists each face's top k by Hamming distance, ties by row id.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import batch, protect
from . import index as face_index
from .data import sha256_file

__all__ = ["crawl_folder", "crawl_summary", "search_photo"]

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


def _check_engine(name: str) -> str:
    from . import zoo

    if name not in zoo.names():
        raise protect.ProtectError(f"unknown engine {name!r}; choose from {', '.join(zoo.names())}")
    return name


def _open_for_crawl(uri: str, engine_name: str | None) -> face_index.FaceIndex:
    """The index at ``uri`` (its engine checked against ``engine_name``), or a new one."""
    from .engine import DEFAULT_ENGINE, model

    target = _index_call(face_index.parse_uri, uri)
    if target.kind == "faiss" and target.location is None:
        raise protect.ProtectError(f"--index {uri}: an in-memory index keeps nothing after the crawl; give a file "
                                   "(faiss://PATH or PATH.db) or a server")
    try:
        return _index_call(face_index.open_index, uri, engine=engine_name and _check_engine(engine_name))
    except FileNotFoundError:
        name = _check_engine(engine_name or DEFAULT_ENGINE)
        return _index_call(face_index.open_index, uri, bits=model(name).bits, engine=name)


def _index_call(f, uri: str, **kw):
    """``f(uri, **kw)`` with the index's ValueErrors (a bad URI, another engine) as one plain line."""
    try:
        return f(uri, **kw)
    except protect.ProtectError:
        raise
    except ValueError as e:
        raise protect.ProtectError(str(e) if str(uri) in str(e) else f"--index {uri}: {e}") from None


def crawl_folder(folder: str | Path, index_uri: str, engine_name: str | None = None, *,
                 label_from_folder: bool = False, progress: bool = True, save_every: int = 50) -> dict:
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

    Returns:
        The summary: ``folder, index, engine, bits, photos`` (image files found), ``indexed``
        (files read now), ``faces`` (added now), ``no_face`` (paths of files without a face),
        ``skipped`` (already indexed, unchanged), ``failed`` (``[{"path", "reason"}]``),
        ``rows`` (faces in the index now), ``seconds``.

    Raises:
        ProtectError: ``folder`` is not a folder, an unknown engine, an in-memory index.
        ValueError: a bad URI, or an index built with another engine.
    """
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    t0 = time.perf_counter()
    folder = Path(folder)
    if not folder.is_dir():
        raise protect.ProtectError(f"{folder}: not a folder")
    ix = _open_for_crawl(index_uri, engine_name)
    summary = {"folder": str(folder), "index": str(index_uri), "engine": ix.engine, "bits": ix.bits, "photos": 0,
               "indexed": 0, "faces": 0, "no_face": [], "skipped": 0, "failed": []}
    try:
        target = face_index.parse_uri(index_uri)
        skip = Path(target.location).resolve() if target.location and target.kind != "milvus-server" else Path("/")
        found = batch._scan(folder, skip)
        todo = []
        for path, problem in found:
            rel = path.relative_to(folder).as_posix()
            if problem:
                summary["failed"].append({"path": rel, "reason": problem})
                continue
            summary["photos"] += 1
            try:
                st = path.stat()
            except OSError as e:
                summary["failed"].append({"path": rel, "reason": f"cannot read it: {e.strerror or e}"})
                continue
            todo.append((path, rel, {"size": st.st_size, "mtime_ns": st.st_mtime_ns}))
        done = ix.crawled([rel for _, rel, _ in todo])
        fresh = []
        for path, rel, rec in todo:
            old = done.get(rel)
            if old and old.get("size") == rec["size"] and old.get("mtime_ns") == rec["mtime_ns"]:
                summary["skipped"] += 1
            else:
                fresh.append((path, rel, rec))
        log.info("%s: %d photos, %d already indexed, %d to read", folder, summary["photos"], summary["skipped"],
                 len(fresh))
        since_save = 0
        with logging_redirect_tqdm(), tqdm(fresh, desc="crawl", unit="photo", disable=not progress,
                                           file=sys.stderr) as bar:
            for path, rel, rec in bar:
                try:
                    image = protect.open_photo(path)[0]
                    crops, boxes = _faces(image)
                    codes = _encode(ix.engine, crops)
                    identity = Path(os.path.abspath(path)).parent.name if label_from_folder else None
                    meta = [{"source": rel, "identity": identity, "box": list(b), "face": j, "faces": len(boxes)}
                            for j, b in enumerate(boxes)]
                    ix.add(codes, meta, file=(rel, {**rec, "sha256": sha256_file(path)}))
                except protect.ProtectError as e:
                    summary["failed"].append({"path": rel, "reason": str(e)})
                    continue
                except (OSError, ValueError, RuntimeError) as e:
                    summary["failed"].append({"path": rel, "reason": f"{type(e).__name__}: {e}"})
                    continue
                summary["indexed"] += 1
                summary["faces"] += len(boxes)
                if not boxes:
                    summary["no_face"].append(rel)
                since_save += 1
                if isinstance(ix, face_index.FaissIndex) and since_save >= save_every:
                    ix.save()
                    since_save = 0
    finally:
        ix.save()  # also after Ctrl-C: what was indexed is kept, the rerun resumes
        summary["rows"] = len(ix)
        ix.close()
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def crawl_summary(s: dict) -> str:
    """The crawl's summary for people."""
    lines = [f"{s['photos']} photos under {s['folder']}: {s['indexed']} indexed now ({s['faces']} faces), "
             f"{s['skipped']} already indexed, {len(s['no_face'])} without a face, {len(s['failed'])} failed; "
             f"index {s['index']}: {s['rows']} faces, engine {s['engine']} ({s['bits']} bits); {s['seconds']} s"]
    lines += [f"  failed: {f['path']}: {f['reason']}" for f in s["failed"]]
    lines += [f"  no face: {p}" for p in s["no_face"]]
    return "\n".join(lines)


def search_photo(photo: str | Path, index_uri: str, k: int = 10, engine_name: str | None = None) -> dict:
    """Search the face index at ``index_uri`` with every face of ``photo`` (``toap search``).

    The faces are found and cut as ``crawl_folder`` cuts them (without a face, the photo's central
    square is searched and ``face_found`` is False) and encoded by the index's engine.

    Returns:
        ``{"photo", "index", "engine", "bits", "rows", "faces": [{"box", "face_found",
        "results": [{"rank", "id", "hamming", "source", "identity", "box"}, ...]}, ...]}``;
        results sorted by Hamming distance, ties by row id (the order the faces were indexed).

    Raises:
        ProtectError: an unreadable photo, an index whose engine is not in the zoo, or an
            ``engine_name`` other than the index's.
        FileNotFoundError: no index at ``index_uri``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise protect.ProtectError(f"--k must be a positive whole number, got {k!r}")
    _index_call(face_index.parse_uri, index_uri)  # a bad URI before any work
    try:
        image = protect.open_photo(photo)[0]
    except protect.ProtectError as e:
        raise protect.ProtectError(f"{photo}: {e}") from None
    try:
        ix = _index_call(face_index.open_index, index_uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"no face index at {index_uri}: build one with `toap crawl FOLDER --index "
                                f"{index_uri}`") from None
    with ix:
        if engine_name is not None and engine_name != ix.engine:
            raise protect.ProtectError(f"{index_uri} was built with engine {ix.engine!r}, not {engine_name!r}: "
                                       "codes of two engines cannot be compared")
        if ix.engine is None:
            raise protect.ProtectError(f"{index_uri} does not record its engine: it cannot encode a photo for it")
        _check_engine(ix.engine)
        crops, boxes = _faces(image)
        found = bool(boxes)
        if not found:
            crop, _ = protect.face_crop(protect._upright(image, []))
            crops, boxes = crop[None], [protect._central_square(*image.size)]
        hits = ix.search(_encode(ix.engine, crops), k)
        faces = []
        for j, box in enumerate(boxes):
            results = [{"rank": r + 1, "id": int(i), "hamming": int(d), "source": m.get("source"),
                        "identity": m.get("identity"), "box": m.get("box")}
                       for r, (i, d, m) in enumerate(zip(hits.ids[j], hits.distances[j], hits.meta[j])) if i >= 0]
            faces.append({"box": list(box), "face_found": found, "results": results})
        return {"photo": str(photo), "index": str(index_uri), "engine": ix.engine, "bits": ix.bits, "rows": len(ix),
                "faces": faces}
