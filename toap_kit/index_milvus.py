"""The Milvus backend of the face index (see ``toap_kit.index``'s docstring): ``MilvusIndex`` on
Milvus Lite (embedded, a ``.db`` path; codes as +-1 float vectors under the inner product) or on
a Milvus server (binary vectors under ``HAMMING``).

**The ledger never puts a file name into a filter.** Milvus looks keys up through an expression
(``key in ['...']``) in which an apostrophe, a backslash or a newline of a name breaks the
expression (LFW has O'Brien-style names), and a name whose bytes are not UTF-8 cannot be sent at
all. So a file's ledger row is keyed by ``/f/`` + the sha256 (hex) of its name's bytes (UTF-8,
undecodable bytes as they were: ``surrogateescape``), and the name itself is kept in the record
(``_key``: ``shown(name)``, and ``_key_bytes``, its bytes in hex, where that is not the name).
An index of format version 1 (names as keys) is upgraded when it is opened.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .index_core import _VERSION, FaceIndex, _check_bits, shown

__all__ = ["DEFAULT_COLLECTION", "ID_BLOCK", "MILVUS_MAX_LIMIT", "MilvusIndex", "drop_index"]

log = logging.getLogger(__name__)

DEFAULT_COLLECTION = "faces"
"""Milvus collection of the face rows; the ledger is ``<collection>_files``."""
MILVUS_MAX_LIMIT = 16384
"""Most results a Milvus server returns for one query (its ``topk`` limit)."""
ID_BLOCK = 1 << 40
"""Row ids come in blocks of this many: a crawler takes new ids from block 0, shard ``i`` of
``toap crawl --shard i/n`` from block ``i + 1`` (``use_shard``), each with its own counter, so
crawlers writing to one server at once never take the same id."""
_INSERT_CHUNK = 10_000  # rows per Milvus insert (a gRPC message stays well under its size limit)
_QUERY_CHUNK = 256      # queries per Milvus search call
_NEXT_ID, _INFO = "/next_id", "/info"  # ledger keys of the index's own records (a relative path never starts with /)
_READ = {"consistency_level": "Session"}  # a server's searches: read-your-writes, no wait for the next time tick
_FILE = "/f/"  # a file's ledger key: this + the sha256 of its name (``_row_key``)
_NAME, _NAME_BYTES = "_key", "_key_bytes"  # the name, in a file's ledger record
_VARCHAR_MAX = 4096  # bytes of a row's ``source`` (the schema's max_length)


_LITE_OPEN: dict[str, int] = {}  # Milvus Lite folders open in this process: how many indexes each


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence a logger for the block (Milvus Lite logs a traceback where we raise one line)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _release_lite(path: str) -> None:
    """One index of the Milvus Lite folder ``path`` closed: with the last, stop the server Milvus
    Lite keeps in this process for it (until then no other process can open that folder)."""
    _LITE_OPEN[path] = _LITE_OPEN.get(path, 1) - 1
    if _LITE_OPEN[path] > 0:
        return
    del _LITE_OPEN[path]
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:  # another Milvus Lite: it keeps its server until the process ends
        return
    server_manager_instance.release_server(path)


def check_collection(name: str) -> str:
    """``name`` if it can name a Milvus collection (letters, digits and _, starting with a letter)."""
    if not isinstance(name, str) or not name.replace("_", "a").isalnum() or not name[0].isalpha():
        raise ValueError(f"collection name must be letters, digits and _ starting with a letter, got {name!r}")
    return name


def drop_index(uri: str, collection: str, token: str | None = None) -> None:
    """Remove the face index ``collection`` (its rows and its ledger, ``<collection>_files``)
    from the Milvus server at ``uri``; nothing there is nothing to do."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri, token=token or os.environ.get("TOAP_MILVUS_TOKEN", ""))
    try:
        for name in (check_collection(collection), f"{collection}_files"):
            client.drop_collection(name)
    finally:
        client.close()


def _row_key(key: str) -> str:
    """The ledger row's primary key of ``key``: the index's own records as they are, a file by
    the sha256 of its name (hex digits and ``/f/``: safe in any Milvus expression)."""
    if key.startswith("/"):
        return key
    return _FILE + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def _named(key: str, record: dict) -> dict:
    """``record`` with the file's name in it (``_NAME``; ``_NAME_BYTES`` where the name has
    bytes that are not UTF-8)."""
    if key.startswith("/"):
        return record
    text = shown(key)
    return {**record, _NAME: text, **({_NAME_BYTES: key.encode("utf-8", "surrogateescape").hex()} if text != key else {})}


def _unnamed(record: dict) -> tuple[str | None, dict]:
    """``(name, record)`` of a stored ledger record (the name None for the index's own records)."""
    record = dict(record)
    name, raw = record.pop(_NAME, None), record.pop(_NAME_BYTES, None)
    return (bytes.fromhex(raw).decode("utf-8", "surrogateescape") if raw else name), record


def _quote(ids: Iterable[int]) -> str:
    return "[" + ",".join(str(int(i)) for i in ids) + "]"


class MilvusIndex(FaceIndex):
    """Milvus: Lite (embedded, ``server=False``, ``location`` a ``.db`` path) or a server.

    Rows live in the collection ``collection``: ``id`` (INT64, the row id), ``code``,
    ``source`` and ``identity`` (VARCHAR) and ``meta`` (JSON, the rest). On a server ``code`` is
    a ``BINARY_VECTOR`` under ``HAMMING`` (``BIN_FLAT``, or ``BIN_IVF_FLAT`` with ``ivf``); on
    Lite, a +-1 ``FLOAT_VECTOR`` under ``IP`` (``FLAT``, or ``IVF_FLAT``), d = (bits - ip) / 2.
    The ledger and the index's own records (``/info``, ``/next_id``) live in
    ``<collection>_files`` (a VARCHAR key, a JSON record, and the 2-d vector Milvus requires).
    Collections are created with Strong consistency; a server's searches, their metadata and its
    row count read with Session consistency instead (this process's own writes, and all that the opening's
    Strong reads waited for), since Strong waits for the server's next time tick (200 ms by
    default) on every call."""

    def __init__(self, location: str, bits: int | None, engine: str | None, *, server: bool, ivf: int | None,
                 nprobe: int | None, collection: str, token: str | None, uri: str):
        from pymilvus import MilvusClient

        self.uri, self.server, self._coll, self._files = uri, server, check_collection(collection), f"{collection}_files"
        # Milvus (Lite too) returns at most this many results a query; ``search`` then needs no row count,
        # which costs as much as a search (Lite: 69 ms at 100k rows, measured; a server: a count(*) query)
        self._max_limit = MILVUS_MAX_LIMIT
        if server:
            kw = {"token": token or os.environ.get("TOAP_MILVUS_TOKEN", "")}
            target = location
        else:
            path = Path(location).expanduser().resolve()
            if not path.exists() and bits is None:
                raise FileNotFoundError(f"no index at {path}: give bits (and engine) to create one")
            path.parent.mkdir(parents=True, exist_ok=True)
            target, kw = str(path), {}
        from pymilvus.exceptions import MilvusException

        self._lite = None
        self._block, self._next_key = 0, _NEXT_ID  # where new ids come from (``use_shard``)
        self._written: dict[str, dict | None] = {}  # a server: the ledger records this index wrote (None: deleted)
        try:
            with _quiet("milvus_lite"):
                self._client = MilvusClient(target, **kw)
        except MilvusException as e:
            if server:
                raise ConnectionError(f"cannot reach the Milvus server at {location}: {e.message}") from None
            raise ConnectionError(f"cannot open the Milvus Lite index {target} ({e.message}): another program may "
                                  "be using it, or it is damaged") from None
        if not server:
            self._lite = target
            _LITE_OPEN[target] = _LITE_OPEN.get(target, 0) + 1
        try:
            self._open(bits, engine, ivf, nprobe, collection)
        except MilvusException as e:
            self.close()
            raise ConnectionError(f"{uri}: Milvus refused to open the index: {e.message}") from None
        except BaseException:
            self.close()
            raise

    def _open(self, bits: int | None, engine: str | None, ivf: int | None, nprobe: int | None,
              collection: str) -> None:
        """Adopt the collection's index, or create one."""
        server, uri, c = self.server, self.uri, self._client
        exists = c.has_collection(self._coll)
        if exists:
            for name in (self._coll, self._files):
                c.load_collection(name)
            info = self._ledger_get([_INFO]).get(_INFO)
            if info is None:
                raise ValueError(f"{uri}: collection {collection!r} is not a toap face index (no {_INFO} record)")
            self._adopt_info(info, bits, engine)
            if self.info.get("version", 0) < 2:
                self._upgrade_ledger()
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

    def _upgrade_ledger(self) -> None:
        """Format version 1 keyed a file's ledger row by its name: re-key every such row (``_row_key``)."""
        n = 0
        while True:
            rows = self._client.query(self._files, filter='not (key like "/%")', output_fields=["key", "record"],
                                      limit=MILVUS_MAX_LIMIT)
            if not rows:
                break
            self._ledger_put({r["key"]: r["record"] for r in rows})
            self._client.delete(self._files, ids=[r["key"] for r in rows])  # v1 names are safe in a filter
            n += len(rows)
        self.info["version"] = _VERSION
        self._ledger_put({_INFO: self.info})
        log.info("%s: ledger of %d files upgraded to format version %d", self.uri, n, _VERSION)

    def _create(self) -> None:
        from pymilvus import DataType

        c, ivf = self._client, self.info.get("ivf")
        s = c.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("id", DataType.INT64, is_primary=True)
        if self.server:
            s.add_field("code", DataType.BINARY_VECTOR, dim=self.bits)
        else:
            s.add_field("code", DataType.FLOAT_VECTOR, dim=self.bits)
        s.add_field("source", DataType.VARCHAR, max_length=_VARCHAR_MAX)
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
        """The next free row id of the current id block: the recorded counter, past any row of
        the block at or above it."""
        nxt, end = max(recorded, self._block * ID_BLOCK), (self._block + 1) * ID_BLOCK
        while True:
            rows = self._client.query(self._coll, filter=f"id >= {nxt} and id < {end}", output_fields=["id"],
                                      limit=MILVUS_MAX_LIMIT)
            if not rows:
                return nxt
            nxt = max(int(r["id"]) for r in rows) + 1

    def __len__(self) -> int:
        if self.server:  # a server's row_count includes deleted rows until compaction
            rows = self._client.query(self._coll, filter="", output_fields=["count(*)"], **_READ)
            return int(rows[0]["count(*)"])
        return int(self._client.get_collection_stats(self._coll)["row_count"])

    def use_shard(self, i: int) -> None:
        """Take new row ids from shard ``i``'s own block and counter (``ID_BLOCK``): for one of
        several crawlers writing to this server at once (``toap crawl --shard i/n``)."""
        if not self.server:
            raise ValueError(f"{self.uri}: only a Milvus server takes several crawlers at once")
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < (1 << 62) // ID_BLOCK - 1:
            raise ValueError(f"shard must be an integer in 0..{(1 << 62) // ID_BLOCK - 2}, got {i!r}")
        self._block, self._next_key = i + 1, f"{_NEXT_ID}/{i}"
        self._next = self._find_next(int(self._ledger_get([self._next_key]).get(self._next_key, {}).get("value", 0)))

    def _reserve(self, n: int) -> np.ndarray:
        if self._next + n > (self._block + 1) * ID_BLOCK:
            raise RuntimeError(f"{self.uri}: id block {self._block} is full")
        ids = np.arange(self._next, self._next + n, dtype=np.int64)
        self._next += n
        if n:
            self._ledger_put({self._next_key: {"value": self._next}})
        return ids

    def _vectors(self, codes: np.ndarray) -> list:
        if self.server:
            return [row.tobytes() for row in np.packbits(codes > 0, axis=1)]
        return codes.astype(np.float32).tolist()

    def _insert(self, codes, ids, meta) -> None:
        for m in meta:
            for key, most in (("source", _VARCHAR_MAX), ("identity", 1024)):
                if len(str(m.get(key) or "").encode()) > most:
                    raise ValueError(f"a row's {key} is longer than Milvus stores ({most} bytes): {str(m[key])[:80]}...")
        for j in range(0, len(codes), _INSERT_CHUNK):
            vec = self._vectors(codes[j:j + _INSERT_CHUNK])
            rows = [{"id": int(i), "code": v, "source": str(m.get("source") or ""),
                     "identity": str(m.get("identity") or ""),
                     "meta": {k: x for k, x in m.items() if k not in ("source", "identity")}}
                    for i, v, m in zip(ids[j:j + _INSERT_CHUNK], vec, meta[j:j + _INSERT_CHUNK])]
            self._client.insert(self._coll, rows)

    def _delete(self, ids) -> int:
        # a server: the rows present are counted with Strong consistency (rows another crawler, or an
        # earlier run, inserted count too), and a Strong read after the deletes waits until they show:
        # a delete does not move this client's Session timestamp, so later reads could still see the rows
        strong, removed = {"consistency_level": "Strong"} if self.server else {}, 0
        for j in range(0, len(ids), 1000):
            chunk = _quote(ids[j:j + 1000])
            removed += int(self._client.query(self._coll, filter=f"id in {chunk}", output_fields=["count(*)"],
                                              **strong)[0]["count(*)"])
            self._client.delete(self._coll, filter=f"id in {chunk}")
        if self.server and ids:
            self._client.query(self._coll, filter=f"id in {_quote(ids[:1])}", output_fields=["id"], **strong)
        return removed

    def _raw_search(self, codes, limit):
        params = {"metric_type": "HAMMING" if self.server else "IP"}
        if not self.exact:
            params["params"] = {"nprobe": int(self.info["nprobe"])}
        ds, ids = [], []
        for j in range(0, len(codes), _QUERY_CHUNK):
            chunk = codes[j:j + _QUERY_CHUNK]
            res = self._client.search(self._coll, data=self._vectors(chunk), limit=limit, search_params=params,
                                      anns_field="code", output_fields=[], **(_READ if self.server else {}))
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
            for r in self._client.get(self._coll, ids=ids[j:j + 1000], output_fields=["source", "identity", "meta"],
                                      **(_READ if self.server else {})):
                m = dict(r.get("meta") or {})
                for key in ("source", "identity"):
                    if r.get(key):
                        m[key] = r[key]
                out[int(r["id"])] = m
        return out

    def _ledger_get(self, keys) -> dict[str, dict]:
        if not keys:
            return {}
        out = {}
        if self.server:
            # The records this index wrote are its own (a file's record comes from one crawler: its shard);
            # other files' records, from earlier runs, are read without waiting for this client's writes to
            # show (Eventually). The ledger's collection is Strong: a read waited for the server's next time
            # tick, and after each write a Session read waits for it too, about 340 and 200 ms, most of a
            # crawled face's time (measured). The index's own records (info, id counters; read when it is
            # opened) stay Strong: another process may have written them a moment ago
            out = {k: self._written[k] for k in keys if k in self._written and self._written[k] is not None}
            wanted = {_row_key(k): k for k in keys if k not in self._written}
            own = any(k.startswith("/") for k in wanted.values())
            level = {"consistency_level": "Strong" if own else "Eventually"}
        else:
            wanted, level = {_row_key(k): k for k in keys}, {}
        if wanted:
            rows = self._client.get(self._files, ids=list(wanted), output_fields=["record"], **level)
            out.update({wanted[r["key"]]: _unnamed(r["record"])[1] for r in rows if r["key"] in wanted})
        return out

    def _ledger_put(self, records) -> None:
        self._client.upsert(self._files, [{"key": _row_key(k), "record": _named(k, r), "v": [0.0, 0.0]}
                                          for k, r in records.items()])
        if self.server:
            self._written.update({k: json.loads(json.dumps(r)) for k, r in records.items()})

    def _ledger_delete(self, keys) -> None:
        for j in range(0, len(keys), 1000):
            self._client.delete(self._files, ids=[_row_key(k) for k in keys[j:j + 1000]])
        if self.server:
            self._written.update(dict.fromkeys(keys))

    def _ledger_files(self, prefix: str = _FILE) -> dict[str, dict]:
        # a query returns at most MILVUS_MAX_LIMIT rows: a full prefix is split by its next hex digit
        rows = self._client.query(self._files, filter=f'key like "{prefix}%"', output_fields=["record"],
                                  limit=MILVUS_MAX_LIMIT, **(_READ if self.server else {}))
        if len(rows) >= MILVUS_MAX_LIMIT:
            return {k: r for h in "0123456789abcdef" for k, r in self._ledger_files(prefix + h).items()}
        return dict(_unnamed(r["record"]) for r in rows)

    def save(self, path=None) -> None:
        """Flush what was added (Milvus persists by itself; ``path`` is not used)."""
        if path is not None:
            raise ValueError("a Milvus index lives at its URI: save() takes no path")
        self._client.flush(self._coll)
        self._client.flush(self._files)

    def close(self) -> None:
        """Close the client; the last index of a Milvus Lite folder in this process also stops
        the server Milvus Lite runs for it, so that another process can open the folder."""
        try:
            self._client.close()
        except Exception as e:  # noqa: BLE001 - closing must not hide the real error
            log.debug("closing %s: %s", self.uri, e)
        if self._lite is not None:
            lite, self._lite = self._lite, None
            _release_lite(lite)
