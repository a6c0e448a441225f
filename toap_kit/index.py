"""The face index: binary face codes with their metadata, searched by Hamming distance, on a
backend chosen by a URI (FAISS in memory or in a file, Milvus Lite in a file, a Milvus server).

    >>> from toap_kit import index
    >>> ix = index.open_index("faiss", bits=32, engine="dlib_itq_32")      # in memory, exact
    >>> ix.add(codes, [{"source": "a.jpg", "identity": "Ann"}, ...])         # N x 32 in {-1, +1}
    >>> hits = ix.search(query_codes, k=10)                                  # Nq x 32
    >>> hits.distances, hits.ids, hits.meta                                  # Nq x k, Nq x k, [[dict]]

The same calls run on a laptop and on a cluster; only the URI changes (``open_index``):

=================================  =========================================================
URI                                backend
=================================  =========================================================
``faiss``                          FAISS in memory: exact ``IndexBinaryFlat`` (in an
                                   ``IndexBinaryIDMap``); ``save(path)`` writes it to a file
``faiss://PATH``, ``PATH.faiss``   the same in a file: opened when it exists, written back by
                                   ``save()`` (``faiss.write_index_binary`` + a JSON sidecar
                                   ``PATH.json`` with the metadata; never pickle)
``milvus://PATH.db``, ``PATH.db``  Milvus Lite, embedded (a folder at ``PATH.db``; nothing to
                                   start): persistent by itself
``http://HOST:19530`` (https,      a Milvus server, standalone or a cluster: ``BINARY_VECTOR``
tcp)                               with the ``HAMMING`` metric, ``BIN_FLAT`` index
=================================  =========================================================

Options go in the URI's query string or as keywords: ``?ivf=NLIST`` builds an inverted-file
index instead of the exact one (FAISS ``IndexBinaryIVF``, Milvus server ``BIN_IVF_FLAT``,
Milvus Lite ``IVF_FLAT``) for large sets, searched with ``nprobe`` lists (``?nprobe=N``,
default ``min(NLIST, 16)``); ``?collection=NAME`` (Milvus; default ``faces``). A server's
token comes from the ``token`` keyword or ``TOAP_MILVUS_TOKEN``.

**Codes.** ``N x bits`` in {-1, +1} (numpy or torch, any number type), or bit-packed ``uint8``
``N x bits/8`` in FAISS's layout (``retrieval.pack_codes``: bit j in byte j // 8, least
significant bit first). ``bits`` is a multiple of 8. Anything else is a ``ValueError`` that says
what was wrong.

**Milvus Lite has no binary vectors** ("uses Milvus type BinaryVector which MilvusLite does not
support"), so there a code is stored as a +-1 ``FLOAT_VECTOR`` searched with the inner product
(``IP``): for two codes of L bits, ip = L - 2 d, so d = (L - ip) / 2 is the Hamming distance
exactly (ip is a sum of +-1 terms, exact in float32 up to 2**24 bits) and ranking by descending
ip is ranking by ascending Hamming distance (``tests/test_index.py`` checks it against FAISS).

**Exactness and ties.** Every exact backend returns exact integer Hamming distances and the same
top k: the k smallest by (distance, id). Hamming distances tie constantly, and backends order a
tie however they like (and may cut a tie group at the k-th place differently), so ``search``
asks the backend for more than k (2k, at least k + 32, doubling while the last one returned is still
at the k-th distance), sorts by (distance, id) and cuts: among the items tied at the k-th
distance the lowest ids are kept, on every backend. The only exception is a Milvus server's
cap of ``MILVUS_MAX_LIMIT`` = 16,384 results a query: a tie group at the k-th distance reaching
past it is cut where the server cut it (logged as a warning). An IVF index is approximate:
the distances it returns are exact, but a near code in a list it did not probe is missed (and a
query may get fewer than k: id -1 and distance -1 there). None of the kit's metrics reads a
top-k: ``retrieval``'s tie-aware metrics take full rows of distances (every database item), so
they do not depend on which tied items a top-k keeps; a top-k is a listing (galleries,
``toap search``).

**What the index remembers**: ``bits``, the ``engine`` that made its codes (a zoo name, or None)
and when it was created (``info``); each row's metadata (a JSON object: ``source`` and
``identity`` by convention, anything else JSON can hold); and, for crawlers, a ledger of the
files already indexed (``add(..., file=(key, record))``, ``crawled(keys)``): adding a file's
faces again first removes the rows the file had (a changed file, or an add that was cut short),
so a rerun never duplicates a face. One writer at a time per index.

**A Milvus server for the tests** (``tests/test_index.py`` uses one when ``TOAP_MILVUS_URI`` is
set, and skips that test otherwise): Milvus standalone with its docker compose file,
``wget https://github.com/milvus-io/milvus/releases/download/v2.5.4/milvus-standalone-docker-compose.yml
-O docker-compose.yml && docker compose up -d``, then ``TOAP_MILVUS_URI=http://localhost:19530``.
"""
from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence
from urllib.parse import parse_qs

import numpy as np

__all__ = ["DEFAULT_COLLECTION", "FORMAT", "FaceIndex", "FaissIndex", "Hits", "MILVUS_MAX_LIMIT", "MilvusIndex",
           "as_codes", "open_index", "parse_uri"]

log = logging.getLogger(__name__)

FORMAT = "toap-face-index"
"""Name of the index format (in ``info``); its version is ``_VERSION``."""
_VERSION = 1
DEFAULT_COLLECTION = "faces"
"""Milvus collection of the face rows; the ledger is ``<collection>_files``."""
MILVUS_MAX_LIMIT = 16384
"""Most results a Milvus server returns for one query (its ``topk`` limit)."""
_SERVER_SCHEMES = ("http", "https", "tcp")
_INSERT_CHUNK = 10_000  # rows per Milvus insert (a gRPC message stays well under its size limit)
_QUERY_CHUNK = 256      # queries per Milvus search call
_SMALL_SEARCH = 10_000_000  # queries x rows under which FAISS searches on one thread
_NEXT_ID, _INFO = "/next_id", "/info"  # ledger keys of the index's own records (a relative path never starts with /)
_URI_HELP = ("'faiss' (in memory), 'faiss://PATH' or 'PATH.faiss' (a FAISS file), 'milvus://PATH.db' or 'PATH.db' "
             "(Milvus Lite), or 'http://HOST:19530' (a Milvus server)")


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
        json.dumps(m, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata of row {i} cannot be stored as JSON: {e}") from None
    return m


# ---------------------------------------------------------------- URIs
@dataclass(frozen=True)
class _Target:
    kind: str            # "faiss", "milvus-lite", "milvus-server"
    location: str | None  # a file path, a server URI, or None (in memory)
    options: dict


def parse_uri(uri: str) -> _Target:
    """Which backend ``uri`` names: ``(kind, location, options)`` with kind ``faiss``,
    ``milvus-lite`` or ``milvus-server`` (see the module docstring). Raises ``ValueError``."""
    if not isinstance(uri, (str, os.PathLike)) or not str(uri).strip():
        raise ValueError(f"index URI must be a non-empty string: {_URI_HELP}; got {uri!r}")
    uri = str(uri).strip()
    base, _, query = uri.partition("?")
    options = {}
    for key, values in parse_qs(query, keep_blank_values=True).items():
        if key not in ("ivf", "nprobe", "collection"):
            raise ValueError(f"unknown option {key!r} in index URI {uri!r} (known: ivf, nprobe, collection)")
        options[key] = values[-1]
    scheme, sep, rest = base.partition("://")
    scheme = scheme.lower() if sep else ""
    if base.lower() == "faiss" or scheme == "faiss":
        location = rest or None
        if location is not None and location.endswith(".db"):
            raise ValueError(f"{uri!r}: a .db path is a Milvus Lite index; write it without 'faiss://'")
        return _Target("faiss", location, options)
    if scheme == "milvus" or (not sep and base.lower() == "milvus"):
        if not rest:
            raise ValueError(f"{uri!r}: Milvus Lite needs a file path, e.g. 'milvus://outputs/faces.db' "
                             "(a server is 'http://HOST:19530')")
        if not rest.endswith(".db"):
            raise ValueError(f"{uri!r}: a Milvus Lite path must end in .db, e.g. 'milvus://outputs/faces.db'")
        return _Target("milvus-lite", rest, options)
    if scheme in _SERVER_SCHEMES:
        if not rest.split("/")[0]:
            raise ValueError(f"{uri!r}: no host in the server URI (e.g. 'http://localhost:19530')")
        return _Target("milvus-server", base, options)
    if sep:
        raise ValueError(f"unknown index URI scheme {scheme!r} in {uri!r}: use {_URI_HELP}")
    if base.endswith(".db"):
        return _Target("milvus-lite", base, options)
    if base.endswith(".faiss"):
        return _Target("faiss", base, options)
    raise ValueError(f"cannot tell which index {uri!r} is: use {_URI_HELP}")


def _int_option(options: dict, key: str, given) -> int | None:
    value = given if given is not None else options.get(key)
    if value is None:
        return None
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a positive integer, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value}")
    return value


def open_index(uri: str, bits: int | None = None, engine: str | None = None, *, ivf: int | None = None,
               nprobe: int | None = None, collection: str | None = None, token: str | None = None) -> FaceIndex:
    """Open the face index at ``uri``, or create it.

    Args:
        uri: which backend and where (module docstring): ``faiss``, ``faiss://PATH``,
            ``PATH.faiss``, ``milvus://PATH.db``, ``PATH.db``, ``http://HOST:19530``; options
            ``?ivf=NLIST&nprobe=N&collection=NAME``.
        bits: code length: needed to create an index; for an existing one it must match.
        engine: the zoo engine whose codes the index holds (recorded at creation; for an
            existing index it must match, so codes of two engines never mix).
        ivf: number of inverted lists (an approximate IVF index); None: exact.
        nprobe: lists an IVF search visits (default ``min(ivf, 16)``).
        collection: Milvus collection name (default ``DEFAULT_COLLECTION``).
        token: a Milvus server's token (default ``TOAP_MILVUS_TOKEN``).

    Raises:
        ValueError: a bad URI or option, ``bits`` or ``engine`` different from the index's.
        FileNotFoundError: no index there and no ``bits`` to create one.
    """
    target = parse_uri(uri)
    ivf = _int_option(target.options, "ivf", ivf)
    nprobe = _int_option(target.options, "nprobe", nprobe)
    if bits is not None:
        bits = _check_bits(bits)
    if target.kind == "faiss":
        return FaissIndex(target.location, bits, engine, ivf=ivf, nprobe=nprobe, uri=str(uri))
    name = collection or target.options.get("collection") or DEFAULT_COLLECTION
    return MilvusIndex(target.location, bits, engine, server=target.kind == "milvus-server", ivf=ivf,
                       nprobe=nprobe, collection=name, token=token, uri=str(uri))


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
    """Binary face codes with metadata, searched by Hamming distance (see the module docstring;
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
        if info.get("format") != FORMAT or not isinstance(info.get("bits"), int):
            raise ValueError(f"{self.uri}: not a toap face index (its info is {info!r})")
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
    def _delete(self, ids: list[int]) -> None: ...

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
                ``/``) and ``record`` (a JSON dict: size, mtime, ...) go into the ledger that
                ``crawled`` reads. Rows the key had before are removed first.
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
        if not isinstance(key, str) or not key or key.startswith("/"):
            raise ValueError(f"a file key must be a non-empty string not starting with '/', got {key!r}")
        record = _json_meta(record, 0)
        old = self._ledger_get([key]).get(key)
        if old and old.get("ids"):
            self._delete([int(i) for i in old["ids"]])
        ids = self._reserve(len(c))
        entry = {**record, "ids": ids.tolist(), "faces": len(c)}
        self._ledger_put({key: {**entry, "done": False}})  # an add cut short leaves this: the rerun cleans up
        for r in rows:
            r.setdefault("source", key)
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
        n = len(self)
        k = min(int(k), n)
        if k == 0 or len(q) == 0:
            return Hits(np.zeros((len(q), k), np.int32), np.zeros((len(q), k), np.int64), [[] for _ in q])
        cap = n if self._max_limit is None else min(n, self._max_limit)
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
            cut_short += int((settled & (limit >= cap) & (limit < n) & (d[:, -1] == d[:, k - 1])).sum())
            todo, limit = todo[~settled], min(cap, 2 * limit)
        if cut_short:
            log.warning("%d queries have a tie group at the k-th distance longer than the backend returns (%d): "
                        "it is cut where the backend cut it", cut_short, cap)
        meta = self._meta(int(x) for x in np.unique(out_i) if x >= 0)
        return Hits(out_d, out_i, [[dict(meta.get(int(x), {})) for x in row] for row in out_i])


# ---------------------------------------------------------------- FAISS
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
        self._adopt_info(doc.get("info", {}), bits, engine)
        if doc.get("index_sha256") != _sha256(self.path):
            raise ValueError(f"{self.path} and its sidecar {side.name} do not belong together (a save was cut "
                             "short, or one of them was replaced)")
        self._index = self._faiss.read_index_binary(str(self.path))
        self.exact = "ivf" not in self.info
        if ivf is not None and ivf != self.info.get("ivf"):
            raise ValueError(f"{self.path} was built with ivf={self.info.get('ivf')}, not {ivf}")
        if not self.exact:
            if nprobe:
                self.info["nprobe"] = nprobe
            self._index.nprobe = int(self.info["nprobe"])
        self._rows = {int(i): m for i, m in doc.get("meta", {}).items()}
        self._ledger = doc.get("ledger", {})
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

    def _delete(self, ids) -> None:
        if ids:
            self._index.remove_ids(np.asarray(ids, dtype=np.int64))
            for i in ids:
                self._rows.pop(int(i), None)

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


# ---------------------------------------------------------------- Milvus
def _quote(ids: Iterable[int]) -> str:
    return "[" + ",".join(str(int(i)) for i in ids) + "]"


class MilvusIndex(FaceIndex):
    """Milvus: Lite (embedded, ``server=False``, ``location`` a ``.db`` path) or a server.

    Rows live in the collection ``collection``: ``id`` (INT64, the row id), ``code``,
    ``source`` and ``identity`` (VARCHAR) and ``meta`` (JSON, the rest). On a server ``code`` is
    a ``BINARY_VECTOR`` under ``HAMMING`` (``BIN_FLAT``, or ``BIN_IVF_FLAT`` with ``ivf``); on
    Lite, a +-1 ``FLOAT_VECTOR`` under ``IP`` (``FLAT``, or ``IVF_FLAT``), d = (bits - ip) / 2.
    The ledger and the index's own records (``/info``, ``/next_id``) live in
    ``<collection>_files`` (a VARCHAR key, a JSON record, and the 2-d vector Milvus requires)."""

    def __init__(self, location: str, bits: int | None, engine: str | None, *, server: bool, ivf: int | None,
                 nprobe: int | None, collection: str, token: str | None, uri: str):
        from pymilvus import MilvusClient

        self.uri, self.server, self._coll, self._files = uri, server, collection, f"{collection}_files"
        if not collection.replace("_", "a").isalnum() or not collection[0].isalpha():
            raise ValueError(f"collection name must be letters, digits and _ starting with a letter, got {collection!r}")
        if server:
            self._max_limit = MILVUS_MAX_LIMIT
            kw = {"token": token or os.environ.get("TOAP_MILVUS_TOKEN", "")}
            target = location
        else:
            path = Path(location).expanduser().resolve()
            if not path.exists() and bits is None:
                raise FileNotFoundError(f"no index at {path}: give bits (and engine) to create one")
            path.parent.mkdir(parents=True, exist_ok=True)
            target, kw = str(path), {}
        self._client = MilvusClient(target, **kw)
        c = self._client
        if c.has_collection(self._coll):
            for name in (self._coll, self._files):
                c.load_collection(name)
            info = self._ledger_get([_INFO]).get(_INFO)
            if info is None:
                raise ValueError(f"{uri}: collection {collection!r} is not a toap face index (no {_INFO} record)")
            self._adopt_info(info, bits, engine)
            if ivf is not None and ivf != self.info.get("ivf"):
                raise ValueError(f"{uri} was built with ivf={self.info.get('ivf')}, not {ivf}")
            if nprobe:
                self.info["nprobe"] = nprobe
            self._next = self._find_next(int(self._ledger_get([_NEXT_ID]).get(_NEXT_ID, {}).get("value", 0)))
        else:
            if bits is None:
                raise FileNotFoundError(f"{uri}: no collection {collection!r}: give bits (and engine) to create one")
            if nprobe and not ivf:
                raise ValueError("nprobe is an option of an IVF index: give ivf=NLIST too")
            self.bits, self.engine = _check_bits(bits), engine
            self.info = self._new_info(self.bits, engine, "milvus-server" if server else "milvus-lite")
            if ivf:
                self.info.update(ivf=ivf, nprobe=nprobe or min(ivf, 16))
            self._create()
            self._next = 0
            self._ledger_put({_INFO: self.info, _NEXT_ID: {"value": 0}})
        self.exact = "ivf" not in self.info

    def _create(self) -> None:
        from pymilvus import DataType

        c, ivf = self._client, self.info.get("ivf")
        s = c.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("id", DataType.INT64, is_primary=True)
        if self.server:
            s.add_field("code", DataType.BINARY_VECTOR, dim=self.bits)
        else:
            s.add_field("code", DataType.FLOAT_VECTOR, dim=self.bits)
        s.add_field("source", DataType.VARCHAR, max_length=4096)
        s.add_field("identity", DataType.VARCHAR, max_length=1024)
        s.add_field("meta", DataType.JSON)
        p = c.prepare_index_params()
        kind = ("BIN_IVF_FLAT" if ivf else "BIN_FLAT") if self.server else ("IVF_FLAT" if ivf else "FLAT")
        p.add_index(field_name="code", index_type=kind, metric_type="HAMMING" if self.server else "IP",
                    params={"nlist": int(ivf)} if ivf else {})
        f = c.create_schema(auto_id=False, enable_dynamic_field=False)
        f.add_field("key", DataType.VARCHAR, is_primary=True, max_length=4096)
        f.add_field("record", DataType.JSON)
        f.add_field("v", DataType.FLOAT_VECTOR, dim=2)
        pf = c.prepare_index_params()
        pf.add_index(field_name="v", index_type="FLAT", metric_type="L2")
        for name, schema, params in ((self._coll, s, p), (self._files, f, pf)):
            c.create_collection(name, schema=schema, consistency_level="Strong")
            # Lite answers the wait for an index build with "Method not implemented" (logged by its
            # in-process gRPC server), and builds at once: no wait there
            c.create_index(name, params, sync=self.server)
            c.load_collection(name)

    def _find_next(self, recorded: int) -> int:
        """The next free row id: the recorded counter, past any row at or above it."""
        nxt = recorded
        while True:
            rows = self._client.query(self._coll, filter=f"id >= {nxt}", output_fields=["id"], limit=MILVUS_MAX_LIMIT)
            if not rows:
                return nxt
            nxt = max(int(r["id"]) for r in rows) + 1

    def __len__(self) -> int:
        if self.server:  # a server's row_count includes deleted rows until compaction
            rows = self._client.query(self._coll, filter="", output_fields=["count(*)"])
            return int(rows[0]["count(*)"])
        return int(self._client.get_collection_stats(self._coll)["row_count"])

    def _reserve(self, n: int) -> np.ndarray:
        ids = np.arange(self._next, self._next + n, dtype=np.int64)
        self._next += n
        if n:
            self._ledger_put({_NEXT_ID: {"value": self._next}})
        return ids

    def _vectors(self, codes: np.ndarray) -> list:
        if self.server:
            return [row.tobytes() for row in np.packbits(codes > 0, axis=1)]
        return codes.astype(np.float32).tolist()

    def _insert(self, codes, ids, meta) -> None:
        for j in range(0, len(codes), _INSERT_CHUNK):
            vec = self._vectors(codes[j:j + _INSERT_CHUNK])
            rows = [{"id": int(i), "code": v, "source": str(m.get("source") or ""),
                     "identity": str(m.get("identity") or ""),
                     "meta": {k: x for k, x in m.items() if k not in ("source", "identity")}}
                    for i, v, m in zip(ids[j:j + _INSERT_CHUNK], vec, meta[j:j + _INSERT_CHUNK])]
            self._client.insert(self._coll, rows)

    def _delete(self, ids) -> None:
        for j in range(0, len(ids), 1000):
            self._client.delete(self._coll, filter=f"id in {_quote(ids[j:j + 1000])}")

    def _raw_search(self, codes, limit):
        params = {"metric_type": "HAMMING" if self.server else "IP"}
        if not self.exact:
            params["params"] = {"nprobe": int(self.info["nprobe"])}
        ds, ids = [], []
        for j in range(0, len(codes), _QUERY_CHUNK):
            chunk = codes[j:j + _QUERY_CHUNK]
            res = self._client.search(self._coll, data=self._vectors(chunk), limit=limit, search_params=params,
                                      anns_field="code", output_fields=[])
            d = np.full((len(chunk), limit), 0.0)
            i = np.full((len(chunk), limit), -1, np.int64)
            for r, hits in enumerate(res):
                i[r, :len(hits)] = [h["id"] for h in hits]
                d[r, :len(hits)] = [h["distance"] for h in hits]
            if not self.server:  # inner product of +-1 vectors: d = (L - ip) / 2
                d = (self.bits - d) / 2
            if np.abs(d - np.rint(d)).max(initial=0) > 1e-3:
                raise RuntimeError(f"{self.uri}: the backend returned non-integer Hamming distances")
            ds.append(np.rint(d).astype(np.int64))
            ids.append(i)
        return np.concatenate(ds), np.concatenate(ids)

    def _meta(self, ids) -> dict[int, dict]:
        ids, out = list(ids), {}
        for j in range(0, len(ids), 1000):
            for r in self._client.get(self._coll, ids=ids[j:j + 1000], output_fields=["source", "identity", "meta"]):
                m = dict(r.get("meta") or {})
                for key in ("source", "identity"):
                    if r.get(key):
                        m[key] = r[key]
                out[int(r["id"])] = m
        return out

    def _ledger_get(self, keys) -> dict[str, dict]:
        if not keys:
            return {}
        rows = self._client.get(self._files, ids=list(keys), output_fields=["record"])
        return {r["key"]: r["record"] for r in rows}

    def _ledger_put(self, records) -> None:
        self._client.upsert(self._files, [{"key": k, "record": r, "v": [0.0, 0.0]} for k, r in records.items()])

    def save(self, path=None) -> None:
        """Flush what was added (Milvus persists by itself; ``path`` is not used)."""
        if path is not None:
            raise ValueError("a Milvus index lives at its URI: save() takes no path")
        self._client.flush(self._coll)
        self._client.flush(self._files)

    def close(self) -> None:
        try:
            self._client.close()
        except Exception as e:  # noqa: BLE001 - closing must not hide the real error
            log.debug("closing %s: %s", self.uri, e)
