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
distance the lowest ids are kept, on every backend. The only exception is Milvus's (a server's
and Lite's) cap of ``MILVUS_MAX_LIMIT`` = 16,384 results a query: a tie group at the k-th distance reaching
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
so a rerun never duplicates a face; ``files()`` lists the ledger, ``forget(keys)`` removes files
(rows and records), ``update_file`` records new facts of an unchanged file. A key is any name
(apostrophes, newlines, bytes that are not UTF-8 as ``os.fsdecode`` gives them); metadata is
valid Unicode text (``shown(name)`` makes any name so).

**One writer at a time**: ``lock(uri)`` holds ``PATH.lock`` next to a file index (FAISS file or
Milvus Lite) with an exclusive ``fcntl.flock`` and writes the holder's pid into it; another
process is refused at once with ``IndexInUse`` ("index in use by another run (pid N)").
``lock(uri, write=False)`` is the reader's: shared on a FAISS file (searches run side by side,
never beside a crawl), exclusive on Milvus Lite (it cannot be opened by two processes at once).
The lock dies with its process, also under SIGKILL: a lock file left by a dead process (its pid
still in it) is simply taken over; the file stays, locking nothing, after a run. A server URI
has no lock file: a Milvus server takes concurrent clients. Several crawlers write to one
collection at once as shards (``toap crawl --shard i/n``: each its own files, by a hash of the
path, and its own block of row ids, ``MilvusIndex.use_shard``); two crawls of one shard, or two
unsharded crawls, into one collection are the user's to avoid. ``check_location(uri)`` says, before any work, why a file index cannot
be used there (a file where a folder must be, a plain file where Milvus Lite keeps a folder, a
folder that is not writable).

**A Milvus server for the tests**: ``tests/conftest.py`` starts one from the ``milvus`` wheel
(``toap_kit.milvus_server``, a dev extra) unless ``TOAP_MILVUS_URI`` names a server or cluster to
use instead; the test skips, with the reason, only where that binary cannot run.

**Where the code is**: this module reads URIs and opens an index (``parse_uri``, ``open_index``)
and names everything public; ``index_core`` holds the codes (``as_codes``), ``Hits`` and
``FaceIndex`` (``add``, ``crawled``, ``search``: the part every backend shares), and
``index_faiss`` and ``index_milvus`` the two backends (``FaissIndex``, ``MilvusIndex``).
"""
from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs

from .index_core import FORMAT, FaceIndex, Hits, _check_bits, as_codes, shown
from .index_faiss import FaissIndex
from .index_milvus import DEFAULT_COLLECTION, ID_BLOCK, MILVUS_MAX_LIMIT, MilvusIndex, check_collection, drop_index

__all__ = ["DEFAULT_COLLECTION", "FORMAT", "FaceIndex", "FaissIndex", "Hits", "ID_BLOCK", "IndexInUse", "MILVUS_MAX_LIMIT",
           "MilvusIndex", "as_codes", "check_location", "drop_index", "lock", "lock_path", "open_index", "parse_uri",
           "shown"]

log = logging.getLogger(__name__)

_SERVER_SCHEMES = ("http", "https", "tcp")
_URI_HELP = ("'faiss' (in memory), 'faiss://PATH' or 'PATH.faiss' (a FAISS file), 'milvus://PATH.db' or 'PATH.db' "
             "(Milvus Lite), or 'http://HOST:19530' (a Milvus server)")


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
    for key in ("ivf", "nprobe"):  # bad values are refused here, before anything is made at the location
        _int_option(options, key, None)
    if options.get("collection"):
        check_collection(options["collection"])
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


# ---------------------------------------------------------------- where a file index lives
def _file_location(uri: str) -> tuple[str, Path] | None:
    """``(kind, path)`` of a file index (FAISS file or Milvus Lite), None for memory or a server."""
    target = parse_uri(uri)
    if target.kind == "milvus-server" or target.location is None:
        return None
    return target.kind, Path(target.location).expanduser()


def _not_writable(folder: Path) -> str | None:
    """Why no file can be created in ``folder`` (a probe file made and removed), or None."""
    probe = folder / f".toap-probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as e:
        return e.strerror or str(e)
    return None


def check_location(uri: str, write: bool = True) -> None:
    """Check, before any work, that the file index at ``uri`` can be used: ``ValueError`` with
    one line naming the cause. Nothing to check for memory or a server.

    Args:
        uri: the index (``open_index``'s URIs).
        write: the index will be written (a crawl): it, or the folder it goes to, must be
            writable. Milvus Lite writes in its folder even to search, so it is checked anyway.

    Raises:
        ValueError: a file where a folder must be (the index's folder or one above it); a
            folder where a FAISS file must be; a plain file (text, empty, anything) where
            Milvus Lite keeps its folder, or a folder with other things in it; a folder that
            cannot be written (read-only, no permission).
    """
    found = _file_location(uri)
    if found is None:
        return
    kind, path = found
    what = "Milvus Lite index" if kind == "milvus-lite" else "FAISS index file"
    above = path.parent
    try:
        while not above.exists():
            above = above.parent
        if not above.is_dir():
            raise ValueError(f"cannot use {path} as an index: {above} is a file, not a folder")
        exists = os.path.lexists(path)
        is_dir = path.is_dir()
    except OSError as e:
        raise ValueError(f"cannot use {path} as an index: {e.strerror or e} ({e.filename or above})") from None
    if exists and kind == "faiss" and (is_dir or not path.is_file()):
        raise ValueError(f"{path} is {'a folder' if is_dir else 'not a regular file'}, not a {what}")
    if exists and kind == "milvus-lite":
        if not is_dir:
            desc = ("an empty file" if path.stat().st_size == 0 else "a plain file") if path.is_file() else "not a folder"
            raise ValueError(f"{path} is {desc}, not a {what} (Milvus Lite keeps its index in a folder of that "
                             "name): move it away or choose another name")
        inside = {p.name for p in path.iterdir()}
        if inside and not {"collections", "databases"} <= inside:
            raise ValueError(f"{path} is a folder that is not a {what} (no collections/ and databases/ in it): "
                             "choose another name")
    if write or kind == "milvus-lite":
        folder = path if exists and kind == "milvus-lite" else path.parent if path.parent.exists() else above
        why = _not_writable(folder)
        if why:
            raise ValueError(f"cannot write the {what} {path}: {folder} is not writable ({why})"
                             + ("; Milvus Lite writes in its folder even to search" if not write else ""))


def lock_path(uri: str) -> Path | None:
    """The lock file of the file index at ``uri`` (``PATH.lock``), None for memory or a server."""
    found = _file_location(uri)
    return None if found is None else found[1].with_name(found[1].name + ".lock")


class IndexInUse(RuntimeError):
    """Another process holds the index's lock (``lock``)."""


@contextmanager
def lock(uri: str, write: bool = True) -> Iterator[None]:
    """Hold the lock of the file index at ``uri`` while the block runs (module docstring): an
    exclusive ``flock`` on ``PATH.lock`` to write, or to open Milvus Lite at all; a shared one
    to read a FAISS file. Nothing for memory or a server. The index's folder must exist.

    Raises:
        IndexInUse: another process holds it ("index in use by another run (pid N)").
        ValueError: the lock file cannot be made (``check_location`` first says why).
    """
    found = _file_location(uri)
    if found is None:
        yield
        return
    kind, path = found
    exclusive = write or kind == "milvus-lite"
    lock_file = lock_path(uri)
    try:
        f = open(lock_file, "a+")
    except OSError as e:
        if exclusive:
            raise ValueError(f"cannot make the lock file {lock_file}: {e.strerror or e}") from None
        try:  # a reader in a read-only place: the lock file a writer left, if any
            f = open(lock_file)
        except OSError:
            log.debug("no lock file %s (%s): reading unguarded", lock_file, e.strerror)
            yield
            return
    with f:
        try:
            fcntl.flock(f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read(20).strip() or "unknown"
            raise IndexInUse(f"index in use by another run (pid {pid}): wait until it ends, then run again "
                             f"({path})") from None
        except OSError as e:  # a file system without locks (some network drives): go on, unguarded
            log.warning("cannot lock %s (%s): make sure no other run uses %s", lock_file, e.strerror, path)
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
        except OSError as e:  # a shared lock on a file another user owns
            log.debug("cannot write the pid into %s: %s", lock_file, e.strerror)
        yield  # the lock goes with the file's closing, or with the process
