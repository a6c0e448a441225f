"""The FAISS backend of the face index (see ``toap_kit.index``'s docstring): ``FaissIndex``, exact
(``IndexBinaryFlat``) or IVF, in memory or in a file with its JSON sidecar, written atomically.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from .index_core import FaceIndex, _check_bits, _pack

__all__ = ["FaissIndex"]

log = logging.getLogger(__name__)

_SMALL_SEARCH = 10_000_000  # queries x rows under which FAISS searches on one thread


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class FaissIndex(FaceIndex):
    """FAISS: an exact ``IndexBinaryFlat`` (ids kept by an ``IndexBinaryIDMap``) or, with
    ``ivf``, an ``IndexBinaryIVF`` (trained on its first ``add``, which must hold at least
    ``ivf`` codes; FAISS wants about 39 per list). In memory; with a ``path``, opened from it
    when it exists, and ``save()`` writes the index (``faiss.write_index_binary``) and the
    sidecar ``PATH.json`` (info, metadata, ledger, the index file's sha256: a sidecar that does
    not belong to the index file is refused on open). Each write is atomic (a temporary file,
    then a rename)."""

    def __init__(self, path: str | None, bits: int | None, engine: str | None, *, ivf: int | None = None,
                 nprobe: int | None = None, uri: str = "faiss"):
        import faiss

        self._faiss, self.uri = faiss, uri
        self.path = Path(path).expanduser() if path else None
        self._rows: dict[int, dict] = {}
        self._ledger: dict[str, dict] = {}
        self._next = 0
        if self.path is not None and self.path.exists():
            self._load(bits, engine, ivf, nprobe)
            return
        if bits is None:
            raise FileNotFoundError(f"no index at {self.path}: give bits (and engine) to create one")
        if nprobe and not ivf:
            raise ValueError("nprobe is an option of an IVF index: give ivf=NLIST too")
        self.bits = _check_bits(bits)
        self.engine = engine
        self.info = self._new_info(bits, engine, "faiss")
        if ivf:
            self.info.update(ivf=ivf, nprobe=nprobe or min(ivf, 16))
            self._index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(bits), bits, ivf)
            self._index.nprobe = self.info["nprobe"]
        else:
            self._index = faiss.IndexBinaryIDMap(faiss.IndexBinaryFlat(bits))
        self.exact = not ivf

    def _sidecar(self, path: Path) -> Path:
        return path.with_name(path.name + ".json")

    def _load(self, bits, engine, ivf, nprobe) -> None:
        side = self._sidecar(self.path)
        if not side.is_file():
            raise ValueError(f"{self.path} has no sidecar {side.name}: not an index written by toap_kit.index")
        try:
            doc = json.loads(side.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{side}: unreadable sidecar: {e}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{side}: not a toap face index sidecar (a JSON {type(doc).__name__}, not an object)")
        self._adopt_info(doc.get("info", {}), bits, engine)
        wrong = [k for k, kind in (("meta", dict), ("ledger", dict), ("ntotal", int), ("next_id", int))
                 if not isinstance(doc.get(k, {} if kind is dict else 0), kind) or isinstance(doc.get(k), bool)]
        if wrong:
            raise ValueError(f"{side}: damaged sidecar ({', '.join(wrong)} of the wrong type): save the index again "
                             "or crawl into a new one")
        if doc.get("index_sha256") != _sha256(self.path):
            raise ValueError(f"{self.path} and its sidecar {side.name} do not belong together (a save was cut "
                             "short, or one of them was replaced)")
        try:
            self._index = self._faiss.read_index_binary(str(self.path))
        except RuntimeError as e:
            raise ValueError(f"{self.path}: not a FAISS binary index ({str(e).strip().splitlines()[-1][:200]})") from None
        if self._index.d != self.bits:
            raise ValueError(f"{self.path} holds {self._index.d}-bit codes but its sidecar says {self.bits}: "
                             "they do not belong together")
        self.exact = "ivf" not in self.info
        if ivf is not None and ivf != self.info.get("ivf"):
            raise ValueError(f"{self.path} was built with ivf={self.info.get('ivf')}, not {ivf}")
        if not self.exact:
            if nprobe:
                self.info["nprobe"] = nprobe
            self._index.nprobe = int(self.info["nprobe"])
        try:
            self._rows = {int(i): dict(m) for i, m in doc.get("meta", {}).items()}
            self._ledger = {str(k): dict(r) for k, r in doc.get("ledger", {}).items()}
        except (TypeError, ValueError):
            raise ValueError(f"{side}: damaged sidecar (rows or ledger records of the wrong type)") from None
        self._next = int(doc.get("next_id", self._index.ntotal))
        if self._index.ntotal != doc.get("ntotal"):
            raise ValueError(f"{self.path}: the sidecar counts {doc.get('ntotal')} rows, the index {self._index.ntotal}")

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def _reserve(self, n: int) -> np.ndarray:
        ids = np.arange(self._next, self._next + n, dtype=np.int64)
        self._next += n
        return ids

    def _insert(self, codes, ids, meta) -> None:
        packed = _pack(codes)
        if not self._index.is_trained:
            nlist = self._index.nlist
            if len(packed) < nlist:
                raise ValueError(f"an IVF index with {nlist} lists is trained on its first add: give at least "
                                 f"{nlist} codes at once (about {39 * nlist} for good lists), got {len(packed)}")
            log.info("training the IVF index (%d lists) on %d codes", nlist, len(packed))
            self._index.train(packed)
        self._index.add_with_ids(packed, ids)
        self._rows.update({int(i): m for i, m in zip(ids, meta) if m})

    def _delete(self, ids) -> int:
        if not ids:
            return 0
        removed = int(self._index.remove_ids(np.asarray(ids, dtype=np.int64)))
        for i in ids:
            self._rows.pop(int(i), None)
        return removed

    def _raw_search(self, codes, limit):
        # A small search runs on one thread: OpenMP's start-up and spin-waits cost ~100 ms a call on a
        # loaded 2-core machine against < 1 ms of work (the setting is the calling thread's own)
        small = len(codes) * len(self) <= _SMALL_SEARCH
        threads = self._faiss.omp_get_max_threads()
        if small:
            self._faiss.omp_set_num_threads(1)
        try:
            return self._index.search(_pack(codes), limit)
        finally:
            if small:
                self._faiss.omp_set_num_threads(threads)

    def _meta(self, ids) -> dict[int, dict]:
        return {i: self._rows[i] for i in ids if i in self._rows}

    def _ledger_get(self, keys) -> dict[str, dict]:
        return {k: self._ledger[k] for k in keys if k in self._ledger}

    def _ledger_put(self, records) -> None:
        self._ledger.update(records)

    def _ledger_delete(self, keys) -> None:
        for k in keys:
            self._ledger.pop(k, None)

    def _ledger_files(self) -> dict[str, dict]:
        return dict(self._ledger)

    def save(self, path: str | os.PathLike | None = None) -> None:
        """Write the index to ``path`` (default: the path it was opened with) and the sidecar
        ``path.json``, each atomically (the sidecar last: it names the index file's sha256)."""
        path = Path(path).expanduser() if path is not None else self.path
        if path is None:
            raise ValueError("an in-memory index has no file: save(PATH), or open 'faiss://PATH'")
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, lambda tmp: self._faiss.write_index_binary(self._index, str(tmp)))
        doc = {"info": self.info, "ntotal": len(self), "next_id": self._next, "index_sha256": _sha256(path),
               "meta": {str(i): m for i, m in self._rows.items()}, "ledger": self._ledger}
        _write_atomic(self._sidecar(path), lambda tmp: tmp.write_text(json.dumps(doc, separators=(",", ":"))))
        if self.path is None:
            self.path = path
