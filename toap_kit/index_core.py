"""The face index's core (see ``toap_kit.index``'s docstring, the one to read first): face codes
(``as_codes``: {-1, +1} or bit-packed, checked), the ``Hits`` of a search, and ``FaceIndex``, the
interface every backend implements (``add`` with the crawler's ledger, ``crawled``, the exact
top-k ``search`` with ties by lowest id, the crawler's ledger: ``crawled``, ``files``, ``forget``,
``update_file``), and ``shown``, a file name as text that any output can print. The backends are
``index_faiss`` and ``index_milvus``.
"""
from __future__ import annotations

import abc
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["FORMAT", "FaceIndex", "Hits", "as_codes", "shown"]

log = logging.getLogger(__name__)

FORMAT = "toap-face-index"
"""Name of the index format (in ``info``); its version is ``_VERSION``."""
_VERSION = 2  # 2: a Milvus ledger keys a file by the sha256 of its name (``index_milvus``); 1 is read and upgraded


def shown(name: str) -> str:
    """``name`` as text any output can print and any backend can store: a file name's bytes that
    are not UTF-8 (``os.fsdecode`` keeps them as lone surrogates, which a strict UTF-8 stream, a
    Milvus string and strict JSON all refuse) become ``\\xNN``; any other name is returned as it is."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------- codes
def as_codes(codes, bits: int | None = None, name: str = "codes") -> np.ndarray:
    """``N x bits`` int8 codes in {-1, +1} from ``codes``.

    Args:
        codes: ``N x bits`` (or one code of ``bits``) in {-1, +1}, numpy or torch, any number
            type; or bit-packed ``uint8`` ``N x bits/8`` (``retrieval.pack_codes``' layout).
        bits: the code length expected (None: any multiple of 8, read from ``codes``; packed
            codes then need it).
        name: what to call them in an error.

    Raises:
        ValueError: not 1-D/2-D, the wrong length, values other than -1 and +1 (NaN included),
            or uint8 codes that are not ``bits/8`` bytes a row.
    """
    if hasattr(codes, "detach"):
        codes = codes.detach().cpu().numpy()
    b = np.asarray(codes)
    if b.ndim == 1:
        b = b[None]
    if b.ndim != 2:
        raise ValueError(f"{name} must be N x bits (or one code), got shape {b.shape}")
    if b.dtype == np.uint8:
        if bits is None or b.shape[1] * 8 != bits:
            raise ValueError(f"{name} of dtype uint8 are read as bit-packed bytes, N x bits/8"
                             f"{f' = {bits // 8}' if bits else ' (give bits)'}, got {b.shape[1]} bytes a row; "
                             "pass {-1, +1} codes as int8 or float")
        return np.unpackbits(b, axis=1, bitorder="little").astype(np.int8) * 2 - 1
    if b.dtype == bool or not (np.issubdtype(b.dtype, np.integer) or np.issubdtype(b.dtype, np.floating)):
        raise ValueError(f"{name} must be numbers in {{-1, +1}}, got dtype {b.dtype}")
    if b.size and not np.isin(b, (-1, 1)).all():
        bad = np.unique(b[~np.isin(b, (-1, 1))])[:5]
        raise ValueError(f"{name} must hold only -1 and +1 (sign codes from .encode()), found {bad.tolist()}")
    if bits is not None and b.shape[1] != bits:
        raise ValueError(f"{name} have {b.shape[1]} bits, the index holds {bits}-bit codes")
    if b.shape[1] == 0 or b.shape[1] % 8:
        raise ValueError(f"code length must be a positive multiple of 8, got {b.shape[1]}")
    return b.astype(np.int8)


def _pack(codes: np.ndarray) -> np.ndarray:
    return np.packbits(codes > 0, axis=1, bitorder="little")


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits <= 0 or bits % 8:
        raise ValueError(f"bits must be a positive multiple of 8, got {bits!r}")
    return int(bits)


def _json_meta(m, i: int) -> dict:
    if m is None:
        return {}
    if not isinstance(m, Mapping):
        raise ValueError(f"metadata of row {i} must be a dict (or None), got {type(m).__name__}")
    m = dict(m)
    for key in ("source", "identity"):
        if m.get(key) is not None and not isinstance(m[key], str):
            raise ValueError(f"metadata {key!r} of row {i} must be a string, got {m[key]!r}")
    try:
        json.dumps(m, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"metadata of row {i} holds text that is not valid Unicode (a file name's undecodable "
                         "bytes?): pass names through index.shown()") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata of row {i} cannot be stored as JSON: {e}") from None
    return m


def _check_key(key) -> str:
    if not isinstance(key, str) or not key or key.startswith("/"):
        raise ValueError(f"a file key must be a non-empty string not starting with '/', got {key!r}")
    return key

# ---------------------------------------------------------------- the interface
@dataclass
class Hits:
    """Top-k of each query, sorted by (Hamming distance, id).

    Attributes:
        distances: ``Nq x k`` int32 exact Hamming distances (-1 where an IVF search found
            fewer than k).
        ids: ``Nq x k`` int64 row ids (-1 likewise).
        meta: ``Nq`` lists of ``k`` dicts: each row's metadata (``source``, ``identity``, ...;
            ``{}`` for a row without, and for a missing result).
    """

    distances: np.ndarray
    ids: np.ndarray
    meta: list[list[dict]]


class FaceIndex(abc.ABC):
    """Binary face codes with metadata, searched by Hamming distance (see ``toap_kit.index``;
    made by ``open_index``). ``len(index)`` is the number of rows.

    Attributes:
        uri: the URI it was opened with.
        bits: the code length.
        engine: the zoo engine whose codes it holds (None if not recorded).
        info: what the index records about itself (format, version, bits, engine, created,
            and the backend).
        exact: False for an IVF index.
    """

    uri: str
    bits: int
    engine: str | None
    info: dict
    exact: bool = True
    _max_limit: int | None = None  # most results the backend returns a query (None: no cap)

    def _new_info(self, bits: int, engine: str | None, backend: str) -> dict:
        return {"format": FORMAT, "version": _VERSION, "bits": bits, "engine": engine, "backend": backend,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def _adopt_info(self, info: dict, bits: int | None, engine: str | None) -> None:
        """Check a stored ``info`` against what the caller asked for, then take it."""
        if (not isinstance(info, dict) or info.get("format") != FORMAT or not isinstance(info.get("bits"), int)
                or not isinstance(info.get("version", 0), int)):
            raise ValueError(f"{self.uri}: not a toap face index (its info is {str(info)[:200]})")
        if info.get("version", 0) > _VERSION:
            raise ValueError(f"{self.uri}: index format version {info['version']} is newer than this kit's {_VERSION}")
        if bits is not None and bits != info["bits"]:
            raise ValueError(f"{self.uri} holds {info['bits']}-bit codes, not {bits}")
        if engine is not None and engine != info.get("engine"):
            raise ValueError(f"{self.uri} was built with engine {info.get('engine')!r}, not {engine!r}: "
                             "codes of two engines cannot be compared")
        self.info, self.bits, self.engine = dict(info), int(info["bits"]), info.get("engine")

    # -- what the backends implement
    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def _insert(self, codes: np.ndarray, ids: np.ndarray, meta: list[dict]) -> None: ...

    @abc.abstractmethod
    def _delete(self, ids: list[int]) -> int:
        """Remove the rows ``ids`` (those that exist); how many there were."""

    @abc.abstractmethod
    def _raw_search(self, codes: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """``(distances, ids)``, ``Nq x limit``, in any order within a query; -1 ids for none."""

    @abc.abstractmethod
    def _meta(self, ids: Iterable[int]) -> dict[int, dict]: ...

    @abc.abstractmethod
    def _ledger_get(self, keys: Sequence[str]) -> dict[str, dict]: ...

    @abc.abstractmethod
    def _ledger_put(self, records: dict[str, dict]) -> None: ...

    @abc.abstractmethod
    def _ledger_delete(self, keys: Sequence[str]) -> None: ...

    @abc.abstractmethod
    def _ledger_files(self) -> dict[str, dict]:
        """Every file's ledger record (finished or not), by its key."""

    @abc.abstractmethod
    def _reserve(self, n: int) -> np.ndarray: ...

    def save(self, path: str | os.PathLike | None = None) -> None:
        """Make what was added durable (Milvus: flush; FAISS: write the file, see ``FaissIndex``)."""

    def close(self) -> None:
        """Release the backend (a FAISS file index is *not* saved here: call ``save``)."""

    def __enter__(self) -> FaceIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "exact" if self.exact else "IVF"
        return f"<{type(self).__name__} {self.uri!r}: {len(self)} codes of {self.bits} bits, {kind}, engine {self.engine!r}>"

    # -- the interface
    def add(self, codes, meta: Sequence[Mapping | None] | None = None, *,
            file: tuple[str, Mapping] | None = None) -> np.ndarray:
        """Append codes with their metadata; returns their row ids (int64, ``N``).

        Args:
            codes: ``N x bits`` in {-1, +1}, or bit-packed uint8 ``N x bits/8`` (``as_codes``).
            meta: ``N`` dicts (or None each): ``source``, ``identity`` (strings) and anything
                JSON can hold (a face box, ...).
            file: ``(key, record)``: these rows are every face of one file (``N`` may be 0),
                ``key`` (e.g. its path relative to the crawled folder, never starting with
                ``/``; any name, undecodable bytes as ``os.fsdecode`` gives them included) and
                ``record`` (a JSON dict: size, mtime, ...) go into the ledger that ``crawled``
                reads. Rows the key had before are removed first. A row without a ``source``
                gets ``shown(key)``.
        """
        c = as_codes(codes, self.bits)
        meta = [None] * len(c) if meta is None else list(meta)
        if len(meta) != len(c):
            raise ValueError(f"{len(c)} codes but {len(meta)} metadata rows")
        rows = [_json_meta(m, i) for i, m in enumerate(meta)]
        if file is None:
            ids = self._reserve(len(c))
            if len(c):
                self._insert(c, ids, rows)
            return ids
        key, record = file
        _check_key(key)
        record = _json_meta(record, 0)
        old = self._ledger_get([key]).get(key)
        if old and old.get("ids"):
            self._delete([int(i) for i in old["ids"]])
        ids = self._reserve(len(c))
        entry = {**record, "ids": ids.tolist(), "faces": len(c)}
        self._ledger_put({key: {**entry, "done": False}})  # an add cut short leaves this: the rerun cleans up
        for r in rows:
            r.setdefault("source", shown(key))
        if len(c):
            self._insert(c, ids, rows)
        self._ledger_put({key: {**entry, "done": True}})
        return ids

    def crawled(self, keys: Sequence[str]) -> dict[str, dict]:
        """The ledger records of those ``keys`` whose add finished (``add(file=...)``): the
        record given then, plus ``ids`` and ``faces``."""
        keys = [k for k in keys if isinstance(k, str) and k and not k.startswith("/")]
        out = {}
        for j in range(0, len(keys), 1000):
            out.update({k: r for k, r in self._ledger_get(keys[j:j + 1000]).items() if r.get("done")})
        return out

    def files(self) -> dict[str, dict]:
        """Every file in the ledger (``add(file=...)``), finished or cut short, by its key."""
        return self._ledger_files()

    def update_file(self, key: str, record: Mapping) -> None:
        """Record new facts (``record``: size, mtime, ...) of a file already indexed whose faces
        are unchanged (its content was checked); ``ids`` and ``faces`` are kept. ``KeyError``
        if ``key`` was never added."""
        old = self._ledger_get([_check_key(key)]).get(key)
        if old is None:
            raise KeyError(key)
        record = {k: v for k, v in _json_meta(record, 0).items() if k not in ("ids", "faces", "done")}
        self._ledger_put({key: {**old, **record}})

    def forget(self, keys: Sequence[str]) -> int:
        """Remove files from the index: their rows and their ledger records (keys not in the
        ledger are passed over). Returns the number of rows removed."""
        keys, removed = [_check_key(k) for k in keys], 0
        for j in range(0, len(keys), 1000):
            found = self._ledger_get(keys[j:j + 1000])
            ids = [int(i) for r in found.values() for i in r.get("ids") or ()]
            removed += self._delete(ids)
            self._ledger_delete(list(found))
        return removed

    def search(self, queries, k: int = 10) -> Hits:
        """The ``k`` nearest rows of each query by Hamming distance (ties: lowest id first).

        Args:
            queries: ``Nq x bits`` in {-1, +1} (or packed, as for ``add``); one code is one query.
            k: how many (more than ``len(self)`` gives ``len(self)``).

        Returns:
            ``Hits`` with ``distances`` and ``ids`` ``Nq x k`` and each row's metadata.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if self._max_limit is not None and k > self._max_limit:
            raise ValueError(f"k must be at most {self._max_limit} on this backend, got {k}")
        q = as_codes(queries, self.bits, "queries")
        # the most one raw search returns: every row (FAISS), or Milvus's limit. Milvus's row count
        # costs as much as a search or more (a server's is a count(*) query), so it is not asked: a
        # query that gets fewer than k rows has them all (trimmed below)
        cap = len(self) if self._max_limit is None else self._max_limit
        k = min(int(k), cap)
        if k == 0 or len(q) == 0:
            return Hits(np.zeros((len(q), k), np.int32), np.zeros((len(q), k), np.int64), [[] for _ in q])
        out_d = np.full((len(q), k), -1, np.int32)
        out_i = np.full((len(q), k), -1, np.int64)
        todo, limit, cut_short = np.arange(len(q)), min(cap, max(2 * k, k + 32)), 0
        while len(todo):
            d, i = self._raw_search(q[todo], limit)
            d = np.where(i < 0, np.iinfo(np.int32).max, d).astype(np.int64)
            order = np.lexsort((i, d), axis=1)
            d, i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
            # settled: everything was fetched, or an item past the k-th is farther than it
            settled = (limit >= cap) | (d[:, -1] > d[:, k - 1]) | (i[:, -1] < 0)
            out_d[todo[settled]] = np.where(i[settled, :k] < 0, -1, d[settled, :k])
            out_i[todo[settled]] = i[settled, :k]
            if self._max_limit is not None:  # a full page at the limit: rows past it are not seen
                cut_short += int((settled & (limit >= cap) & (i[:, -1] >= 0) & (d[:, -1] == d[:, k - 1])).sum())
            todo, limit = todo[~settled], min(cap, 2 * limit)
        filled = int((out_i >= 0).sum(1).max())
        if filled < k:  # fewer rows than k: every query got all of them
            out_d, out_i = out_d[:, :filled], out_i[:, :filled]
        if cut_short:
            log.warning("%d queries have a tie group at the k-th distance longer than the backend returns (%d): "
                        "it is cut where the backend cut it", cut_short, cap)
        meta = self._meta(int(x) for x in np.unique(out_i) if x >= 0)
        return Hits(out_d, out_i, [[dict(meta.get(int(x), {})) for x in row] for row in out_i])
