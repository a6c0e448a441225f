"""The crawler's throughput into a Milvus server: one crawler, or several shards at once
(``python -m toap_kit.bench scale --parts crawl``; issue 30, item 3).

The photos: ``copies`` copies of each of the kit's 23 shipped 250 x 250 LFW photos
(``data/photos250``: one face each), every copy in a folder of its own, so that each file is a
path of its own to the crawler (the bytes, and the work on them, are those of real photos).

- **Where the time goes** (``phases``), in this process on every photo: ``read`` (open and
  decode, ``protect.open_photo``), ``detect`` (find and cut every face, ``crawl._faces``),
  ``encode`` (the engine's codes, ``crawl._encode``) and ``insert`` (``index.add`` with the
  file's ledger record, into a fresh collection): seconds in all and milliseconds a face.
- **Wall time** (``runs``): for each number of shards ``S``, a fresh collection made by one
  ``toap crawl`` of an empty folder, then ``S`` processes ``toap crawl FOLDER --shard i/S`` started
  at once; from the start to the last exit, process start-up (Python, torch, the engine) included:
  faces a second. ``startup_s``: the seconds the empty crawl reports (``crawl_folder``'s: opening
  the index and loading the engine; the imports before it come on top), what every process pays
  before its first photo.

Each process uses torch's default threads (the machine's cores): on a machine with fewer cores
than shards, the shards share them.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import crawl, engine, protect
from . import index as face_index
from .data import DATA_DIR

__all__ = ["bench_crawl"]


def _photos(folder: Path, copies: int) -> list[Path]:
    """``copies`` copies of each shipped 250 x 250 photo under ``folder/<copy>/<person>.jpg``."""
    shipped = sorted((DATA_DIR / "photos250").glob("*/*.jpg"))
    out = []
    for c in range(copies):
        (folder / f"{c:03d}").mkdir(parents=True)
        for p in shipped:
            out.append(folder / f"{c:03d}" / f"{p.parent.name}.jpg")
            shutil.copyfile(p, out[-1])
    return out


def _phases(photos: list[Path], folder: Path, uri: str, engine_name: str) -> dict:
    """Seconds spent reading, detecting, encoding and inserting every photo, in this process."""
    seconds = {"read": 0.0, "detect": 0.0, "encode": 0.0, "insert": 0.0}
    crawl._encode(engine_name, crawl._faces(protect.open_photo(photos[0])[0])[0])  # the engine loaded first
    faces = 0
    with face_index.open_index(uri, bits=engine.model(engine_name).bits, engine=engine_name) as ix:
        for path in photos:
            t0 = time.perf_counter()
            image = protect.open_photo(path)[0]
            t1 = time.perf_counter()
            crops, boxes = crawl._faces(image)
            t2 = time.perf_counter()
            codes = crawl._encode(engine_name, crops)
            t3 = time.perf_counter()
            ix.add(codes, [{"box": list(b)} for b in boxes], file=(path.relative_to(folder).as_posix(), {}))
            t4 = time.perf_counter()
            for key, a, b in (("read", t0, t1), ("detect", t1, t2), ("encode", t2, t3), ("insert", t3, t4)):
                seconds[key] += b - a
            faces += len(boxes)
    return {"faces": faces, **{f"{k}_s": round(v, 2) for k, v in seconds.items()},
            **{f"{k}_ms_per_face": round(1000 * v / max(faces, 1), 1) for k, v in seconds.items()}}


def _toap(*args: str) -> list[str]:
    return [sys.executable, "-m", "toap_kit.cli", *args]


def _sharded(folder: Path, empty: Path, uri: str, engine_name: str, shards: int) -> dict:
    """The wall time of ``shards`` crawlers started at once into a fresh collection at ``uri``."""
    made = subprocess.run(_toap("crawl", str(empty), "--index", uri, "--engine", engine_name, "--json"),
                          capture_output=True, text=True, check=True)
    startup = json.loads(made.stdout)["seconds"]
    t = time.perf_counter()
    procs = [subprocess.Popen(_toap("crawl", str(folder), "--index", uri, "--shard", f"{i}/{shards}", "--json",
                                    "--no-progress"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(shards)]
    outs = [p.communicate() for p in procs]
    wall = time.perf_counter() - t
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"a shard's crawl failed (exit {p.returncode}): {err.strip()[-500:]}")
    summaries = [json.loads(out) for out, _ in outs]
    faces = sum(s["faces"] for s in summaries)
    return {"shards": shards, "photos": sum(s["photos"] for s in summaries), "faces": faces,
            "wall_s": round(wall, 2), "faces_per_s": round(faces / wall, 2),
            "shard_seconds": [s["seconds"] for s in summaries], "startup_s": startup}


def bench_crawl(copies: int = 20, shards=(1, 2), milvus=None, engine_name: str = engine.DEFAULT_ENGINE) -> dict:
    """The crawl part (module docstring): ``{"photos", "faces", "engine", "server", "phases",
    "runs", "startup_s"}``. ``milvus``: a ``milvus_server.LocalServer`` or a URI; None: a local
    server started for the part and removed after it."""
    from . import milvus_server

    with contextlib.ExitStack() as stack:
        server = milvus if milvus is not None else stack.enter_context(milvus_server.start())
        base = server if isinstance(server, str) else server.uri
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="toap-bench-crawl-")))
        folder, empty = tmp / "photos", tmp / "empty"
        empty.mkdir()
        photos = _photos(folder, copies)
        names = [f"toap_bench_crawl_{k}" for k in ("phases", *(f"s{s}" for s in shards))]
        for n in names:
            stack.callback(face_index.drop_index, base, n)
        phases = _phases(photos, folder, f"{base}?collection={names[0]}", engine_name)
        runs = [_sharded(folder, empty, f"{base}?collection={n}", engine_name, s) for n, s in zip(names[1:], shards)]
    return {"photos": len(photos), "faces": phases.pop("faces"), "engine": engine_name, "cpus": os.cpu_count(),
            "copies": copies, "phases": phases, "runs": runs,
            "startup_s": min(r["startup_s"] for r in runs) if runs else None}

