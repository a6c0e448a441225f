"""The face index (toap_kit.index): every exact backend gives the same top k, ties included;
Milvus Lite's +-1 float vectors under IP rank exactly by Hamming distance; persist and reopen;
clear errors. Milvus Lite runs here (it writes under tmp_path); a Milvus server too: the session
starts one from the ``milvus`` wheel (``conftest.milvus_server``), or ``TOAP_MILVUS_URI`` names one."""
import contextlib
import hashlib
import json
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from toap_kit import engine, protect, retrieval
from toap_kit import index as X

BITS, N = 16, 1500  # 16 bits: every distance is shared by dozens of codes, so tie groups cut at k abound


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    db = rng.choice(np.array([-1, 1], np.int8), size=(N, BITS))
    q = rng.choice(np.array([-1, 1], np.int8), size=(12, BITS))
    meta = [{"source": f"photos/{i}.jpg", "identity": f"person_{i % 40}", "box": [i, 2 * i, 30]} for i in range(N)]
    return db, q, meta


def _reference(db, q, k):
    """Top k by (Hamming distance, row): the numpy definition every backend must meet."""
    d = retrieval.hamming_distance(q, db)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), order


def _filled(uri, data, **kw):
    db, _, meta = data
    ix = X.open_index(uri, bits=BITS, engine="test", **kw)
    ix.add(db[:700], meta[:700])
    ix.add(retrieval.pack_codes(db[700:]), meta[700:])  # packed codes are codes too
    return ix


def _check_same_as_reference(ix, data):
    db, q, meta = data
    for k in (1, 10, 100):
        hits = ix.search(q, k)
        d, i = _reference(db, q, k)
        assert hits.distances.dtype == np.int32 and hits.ids.shape == (len(q), k)
        # the brief's tie-aware statement: the same distance multiset, the same ids below the k-th distance
        for row in range(len(q)):
            assert sorted(hits.distances[row]) == sorted(d[row])
            kth = d[row, -1]
            assert set(hits.ids[row][hits.distances[row] < kth]) == set(i[row][d[row] < kth])
        # and the kit's stronger rule: ties broken by lowest id, so identical everywhere
        np.testing.assert_array_equal(hits.distances, d)
        np.testing.assert_array_equal(hits.ids, i)
        assert hits.meta[0][0] == meta[i[0, 0]]


def test_ties_are_cut_at_k_here(data):
    """The test means something: at k = 10 and 100 the k-th distance is shared past k (most queries)."""
    db, q, _ = data
    dist = retrieval.hamming_distance(q, db)
    for k in (10, 100):
        kth = np.sort(dist, axis=1)[:, k - 1]
        assert ((dist <= kth[:, None]).sum(1) > k).sum() >= 10, "too few tie groups cut at k to test"


@pytest.mark.parametrize("uri", ["faiss", "milvus-lite", "faiss-ivf-all-lists"])
def test_backends_give_the_reference_top_k(uri, data, tmp_path):
    if uri == "milvus-lite":
        ix = _filled(str(tmp_path / "faces.db"), data)
    elif uri == "faiss-ivf-all-lists":  # IVF probing every list is exact
        ix = _filled("faiss?ivf=8&nprobe=8", data)
        assert not ix.exact
    else:
        ix = _filled(uri, data)
    with ix:
        assert len(ix) == N and ix.bits == BITS and ix.engine == "test"
        _check_same_as_reference(ix, data)


def test_milvus_lite_inner_product_is_hamming(data, tmp_path):
    """Lite has no binary vectors: +-1 floats under IP, d = (L - ip) / 2, over the whole database."""
    db, q, _ = data
    with X.open_index(str(tmp_path / "ip.db"), bits=BITS) as ix:
        ix.add(db)
        d, i = ix._raw_search(q.astype(np.int8), N)  # every row, in the backend's own order
        assert (i >= 0).all()
        full = retrieval.hamming_distance(q, db)
        np.testing.assert_array_equal(d, np.take_along_axis(full, i, 1))
        assert (np.diff(d, axis=1) >= 0).all(), "descending inner product is ascending Hamming distance"


def test_the_engine_database_same_as_the_hamming_index():
    """The engine searches through the index now: on the shipped database codes, the top k equal
    retrieval.HammingIndex's (FAISS and the numpy reference), so verify and the demo are unchanged."""
    codes = engine.db_codes("dlib_itq_32")
    q = codes[::60]
    ix = X.open_index("faiss", bits=32, engine="dlib_itq_32")
    ix.add(codes)
    for backend in ("faiss", "numpy"):
        old = retrieval.HammingIndex(32, backend)
        old.add(codes)
        for k in (1, 10, 100):
            d, i = old.search(q, k)
            hits = ix.search(q, k)
            np.testing.assert_array_equal(hits.distances, d)
            np.testing.assert_array_equal(hits.ids, i)


def test_faiss_file_persists_and_reopens(data, tmp_path):
    db, q, meta = data
    path = tmp_path / "sub" / "faces.faiss"
    ix = _filled(f"faiss://{path}", data)
    ix.add(db[:3], file=("a/x.jpg", {"size": 3}))
    ix.save()
    before = ix.search(q, 10)
    assert path.is_file() and (tmp_path / "sub" / "faces.faiss.json").is_file()
    for uri in (f"faiss://{path}", str(path)):
        again = X.open_index(uri)
        assert len(again) == N + 3 and again.bits == BITS and again.engine == "test"
        after = again.search(q, 10)
        np.testing.assert_array_equal(after.ids, before.ids)
        assert after.meta == before.meta
        assert again.crawled(["a/x.jpg", "nope"])["a/x.jpg"]["faces"] == 3
    # an in-memory index saved to a path, then opened from it
    mem = X.open_index("faiss", bits=BITS)
    mem.add(db[:5])
    mem.save(tmp_path / "m.faiss")
    assert len(X.open_index(str(tmp_path / "m.faiss"))) == 5
    # a sidecar from another save is refused
    side = tmp_path / "sub" / "faces.faiss.json"
    doc = json.loads(side.read_text())
    doc["index_sha256"] = "0" * 64
    side.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="do not belong together"):
        X.open_index(str(path))


def test_milvus_lite_persists_and_reopens(data, tmp_path):
    db, q, meta = data
    uri = f"milvus://{tmp_path / 'faces.db'}"
    ix = _filled(uri, data)
    before = ix.search(q, 10)
    ix.save()
    ix.close()
    with X.open_index(uri, engine="test") as again:
        assert len(again) == N and again.bits == BITS
        after = again.search(q, 10)
        np.testing.assert_array_equal(after.ids, before.ids)
        np.testing.assert_array_equal(after.distances, before.distances)
        assert after.meta == before.meta
        ids = again.add(db[:2])  # ids go on after the reopen
        assert ids.tolist() == [N, N + 1]


@pytest.mark.parametrize("backend", ["faiss", "milvus-lite"])
def test_a_file_added_again_replaces_its_rows(backend, data, tmp_path):
    """add(file=...): a changed file's old faces go, and an add cut short (rows in, ledger not
    finished) is cleaned up by the next add of that file: a rerun never duplicates faces."""
    db, q, _ = data
    uri = "faiss" if backend == "faiss" else str(tmp_path / "f.db")
    with X.open_index(uri, bits=BITS, engine="test") as ix:
        _replaces_a_files_rows(ix, db)


@pytest.mark.parametrize("backend", ["faiss", "milvus-lite"])
def test_k_past_the_rows_gives_every_row(backend, data, tmp_path):
    """k larger than the index: every row, none from an empty index, deleted rows not counted."""
    uri = "faiss" if backend == "faiss" else str(tmp_path / "f.db")
    with X.open_index(uri, bits=BITS, engine="test") as ix:
        _k_past_the_rows(ix, data[0])


def test_k_past_the_rows_on_a_milvus_server(data, milvus_uri):
    """The same on a server, whose search does not ask for the row count (a count(*) query)."""
    with _server_collection(milvus_uri) as name, X.open_index(milvus_uri, bits=BITS, engine="test",
                                                               collection=name) as ix:
        _k_past_the_rows(ix, data[0])


def _k_past_the_rows(ix, db) -> None:
    empty = ix.search(db[:2], 5)
    assert empty.ids.shape == empty.distances.shape == (2, 0) and empty.meta == [[], []]
    ix.add(db[:3])
    ix.add(db[3:5], file=("p/a.jpg", {"size": 1}))
    last = ix.add(db[5:6], file=("p/a.jpg", {"size": 2}))  # the file's 2 rows replaced by 1: 4 rows
    hits = ix.search(db[:2], 10)
    assert len(ix) == 4 and hits.ids.shape == (2, 4)
    assert sorted(hits.ids[0].tolist()) == sorted(hits.ids[1].tolist()) == [0, 1, 2, int(last[0])]
    assert hits.distances[0, 0] == 0 and hits.ids[0, 0] == 0


def _replaces_a_files_rows(ix, db) -> None:
    ix.add(db[:10])
    first = ix.add(db[10:13], file=("p/a.jpg", {"size": 1}))
    assert len(ix) == 13 and ix.crawled(["p/a.jpg"])["p/a.jpg"]["ids"] == first.tolist()
    second = ix.add(db[20:22], [{"box": [1, 2, 3]}] * 2, file=("p/a.jpg", {"size": 2}))
    assert len(ix) == 12 and ix.crawled(["p/a.jpg"])["p/a.jpg"]["size"] == 2
    hits = ix.search(db[20], 1)
    assert hits.ids[0, 0] == second[0] and hits.meta[0][0] == {"source": "p/a.jpg", "box": [1, 2, 3]}
    # cut short: reserved, recorded as not done, rows inserted, then the process died
    ids = ix._reserve(2)
    ix._ledger_put({"p/b.jpg": {"size": 5, "ids": ids.tolist(), "done": False}})
    ix._insert(db[30:32].astype(np.int8), ids, [{}, {}])
    assert ix.crawled(["p/b.jpg"]) == {} and len(ix) == 14
    ix.add(db[30:32], file=("p/b.jpg", {"size": 5}))
    assert len(ix) == 14 and "p/b.jpg" in ix.crawled(["p/b.jpg"])
    ix.add(np.zeros((0, BITS)), file=("p/noface.jpg", {"size": 9}))  # a photo without a face is recorded
    assert ix.crawled(["p/noface.jpg"])["p/noface.jpg"]["faces"] == 0 and len(ix) == 14


@pytest.mark.parametrize("uri, match", [
    ("", "non-empty"), ("foo://bar", "unknown index URI scheme"), ("faces.txt", "cannot tell"),
    ("milvus", "needs a file path"), ("milvus://faces.sqlite", "must end in .db"), ("http://", "no host"),
    ("faiss?shards=2", "unknown option"), ("faiss://x.db", "Milvus Lite"),
])
def test_bad_uris(uri, match):
    with pytest.raises(ValueError, match=match):
        X.open_index(uri, bits=16)


def test_uri_kinds():
    assert X.parse_uri("faiss").kind == "faiss" and X.parse_uri("faiss").location is None
    assert X.parse_uri("faiss://out/a.faiss").location == "out/a.faiss"
    assert X.parse_uri("faiss:///abs/a.faiss").location == "/abs/a.faiss"
    assert X.parse_uri("out/a.faiss?ivf=64").options == {"ivf": "64"}
    assert X.parse_uri("outputs/faces.db").kind == "milvus-lite"
    assert X.parse_uri("milvus://outputs/faces.db").location == "outputs/faces.db"
    t = X.parse_uri("http://localhost:19530?collection=crawl")
    assert t.kind == "milvus-server" and t.location == "http://localhost:19530" and t.options == {"collection": "crawl"}


def test_bad_codes_and_arguments(data, tmp_path):
    db, q, _ = data
    ix = X.open_index("faiss", bits=BITS, engine="test")
    with pytest.raises(ValueError, match="have 32 bits, the index holds 16"):
        ix.add(np.ones((2, 32)))
    with pytest.raises(ValueError, match="only -1 and \\+1"):
        ix.add(np.zeros((2, BITS)))
    with pytest.raises(ValueError, match="only -1 and \\+1"):
        ix.add(np.full((2, BITS), np.nan))
    with pytest.raises(ValueError, match="bit-packed"):
        ix.add(np.ones((2, 3), np.uint8))
    with pytest.raises(ValueError, match="N x bits"):
        ix.add(np.ones((2, 2, BITS)))
    with pytest.raises(ValueError, match="2 codes but 1 metadata"):
        ix.add(db[:2], [{}])
    with pytest.raises(ValueError, match="'source' of row 0 must be a string"):
        ix.add(db[:1], [{"source": 3}])
    with pytest.raises(ValueError, match="JSON"):
        ix.add(db[:1], [{"x": object()}])
    with pytest.raises(ValueError, match="file key"):
        ix.add(db[:1], file=("/next_id", {}))
    ix.add(db[:20])
    with pytest.raises(ValueError, match="queries have 8 bits"):
        ix.search(np.ones((1, 8)), 5)
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be"):
            ix.search(q, k)
    assert ix.search(q, 1000).ids.shape == (len(q), 20)  # k past the end: every row
    packed = retrieval.pack_codes(q)
    np.testing.assert_array_equal(ix.search(packed, 5).ids, ix.search(q, 5).ids)
    for bits in (0, 12, "16"):
        with pytest.raises(ValueError, match="bits"):
            X.open_index("faiss", bits=bits)
    with pytest.raises(ValueError, match="nprobe"):
        X.open_index("faiss", bits=BITS, nprobe=4)
    with pytest.raises(ValueError, match="ivf must be a positive integer"):
        X.open_index("faiss?ivf=zero", bits=BITS)
    ivf = X.open_index("faiss", bits=BITS, ivf=64)
    with pytest.raises(ValueError, match="at least 64 codes"):
        ivf.add(db[:10])


def test_reopen_with_other_bits_or_engine_is_refused(data, tmp_path):
    db, _, _ = data
    for uri in (f"faiss://{tmp_path / 'a.faiss'}", str(tmp_path / "a.db")):
        ix = X.open_index(uri, bits=BITS, engine="dlib_itq_32")
        ix.add(db[:5])
        ix.save()
        ix.close()
        with pytest.raises(ValueError, match="holds 16-bit codes, not 32"):
            X.open_index(uri, bits=32)
        with pytest.raises(ValueError, match="built with engine 'dlib_itq_32', not 'vgg_dpsh_32'"):
            X.open_index(uri, engine="vgg_dpsh_32")
    with pytest.raises(FileNotFoundError, match="give bits"):
        X.open_index(str(tmp_path / "missing.db"))
    assert not (tmp_path / "missing.db").exists(), "opening a missing index to search must not create it"
    with pytest.raises(FileNotFoundError, match="give bits"):
        X.open_index(f"faiss://{tmp_path / 'missing.faiss'}")


def test_a_milvus_server(data, milvus_uri):
    """BINARY_VECTOR + HAMMING on a real server (the session's, ``conftest.milvus_server``: one
    started from the ``milvus`` wheel, or ``TOAP_MILVUS_URI``): the same top k as the reference,
    and again after a reopen, with ids going on."""
    db, q, _ = data
    with _server_collection(milvus_uri) as name:
        ix = _filled(milvus_uri, data, collection=name)
        try:
            assert X.parse_uri(milvus_uri).kind == "milvus-server" and len(ix) == N
            _check_same_as_reference(ix, data)
            ix.save()
        finally:
            ix.close()
        with X.open_index(f"{milvus_uri}?collection={name}", engine="test") as again:
            assert len(again) == N and again.bits == BITS and again.exact
            _check_same_as_reference(again, data)
            assert again.add(db[:2]).tolist() == [N, N + 1]


# ---------------------------------------------------------------- a Milvus server (issue 30, item 1)
@contextlib.contextmanager
def _server_collection(uri):
    """A fresh collection name on the server at ``uri``, dropped afterwards (with its ledger), so a
    run against an external server (``TOAP_MILVUS_URI``) leaves nothing there."""
    name = f"toap_test_{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        X.drop_index(uri, name)


def test_a_milvus_server_replaces_a_files_rows(data, milvus_uri):
    """The crawler's ledger on a server: a file added again loses its old rows, an add cut short
    is cleaned up by the next add of that file, a photo without a face is recorded."""
    db, _, _ = data
    with _server_collection(milvus_uri) as name, X.open_index(milvus_uri, bits=BITS, engine="test",
                                                               collection=name) as ix:
        _replaces_a_files_rows(ix, db)


def test_a_milvus_server_forgets_at_once(data, milvus_uri):
    """forget() in a client that wrote nothing yet (a later crawl's): the rows it removed are
    counted, and this client's next reads no longer see them (a delete does not move a client's
    Session timestamp; before the fix it counted 0 and the rows stayed visible for a while)."""
    db, _, _ = data
    with _server_collection(milvus_uri) as name:
        with X.open_index(milvus_uri, bits=BITS, engine="test", collection=name) as ix:
            ix.add(db[:3])
            gone = ix.add(db[3:5], file=("p/a.jpg", {"size": 1}))
        with X.open_index(milvus_uri, collection=name) as ix:
            assert ix.forget(["p/a.jpg", "p/never.jpg"]) == 2
            assert len(ix) == 3 and not set(gone.tolist()) & set(ix.search(db[3:5], 10).ids.ravel().tolist())


def test_a_milvus_server_ivf_probing_every_list_is_exact(data, milvus_uri):
    """BIN_IVF_FLAT on the server: approximate in general, the reference top k when nprobe = nlist."""
    with _server_collection(milvus_uri) as name:
        with _filled(f"{milvus_uri}?ivf=8&nprobe=8", data, collection=name) as ix:
            assert not ix.exact and ix.info["ivf"] == 8 and ix.info["nprobe"] == 8
            ix.save()
            _check_same_as_reference(ix, data)


def test_crawl_and_search_on_a_milvus_server(milvus_uri, tmp_path, capsys):
    """``toap crawl --index http://HOST:PORT?collection=...`` then ``toap search`` on the server:
    each person's other photo finds that person first; a rerun reads nothing again."""
    from toap_kit import cli
    from toap_kit.data import DATA_DIR

    people = ["Bill_Clinton", "Halle_Berry", "Hugo_Chavez"]
    for p in people:
        (tmp_path / "photos" / p).mkdir(parents=True)
        shutil.copy(DATA_DIR / "photos250" / p / "01.jpg", tmp_path / "photos" / p / "01.jpg")
    with _server_collection(milvus_uri) as name:
        uri = f"{milvus_uri}?collection={name}"
        argv = ["crawl", str(tmp_path / "photos"), "--index", uri, "--engine", "dlib_itq_64", "--json"]
        assert cli.main([*argv, "--label-from-folder"]) == 0
        first = json.loads(capsys.readouterr().out)
        assert first["indexed"] == 3 and first["faces"] == 3 and first["rows"] == 3 and first["bits"] == 64
        assert cli.main(argv) == 0
        again = json.loads(capsys.readouterr().out)
        assert again["indexed"] == 0 and again["skipped"] == 3 and again["rows"] == 3
        for p in people:
            assert cli.main(["search", str(DATA_DIR / "lfw158" / p / "03.jpg"), "--index", uri, "--k", "2",
                             "--json"]) == 0
            best = json.loads(capsys.readouterr().out)["faces"][0]["results"][0]
            assert best["identity"] == p and best["source"] == f"{p}/01.jpg", (p, best)


def test_shards_crawl_one_server_at_once(milvus_uri, tmp_path):
    """``toap crawl --shard i/n``: two crawlers at once into one collection index what one crawl
    would, each its own files (by path hash) with ids from its own block; a shard reports and
    prunes only its files; an unsharded crawl afterwards finds everything indexed."""
    import threading

    from toap_kit import crawl
    from toap_kit.data import DATA_DIR

    people = ["Bill_Clinton", "Halle_Berry", "Hugo_Chavez", "Salma_Hayek", "Richard_Gere", "Laura_Bush"]
    photos = tmp_path / "photos"
    for p in people:
        (photos / p).mkdir(parents=True)
        shutil.copy(DATA_DIR / "photos250" / p / "01.jpg", photos / p / "01.jpg")
    keys = {f"{p}/01.jpg" for p in people}
    mine = {i: {k for k in keys if crawl.in_shard(k, (i, 2))} for i in range(2)}
    assert mine[0] and mine[1] and mine[0] | mine[1] == keys and not mine[0] & mine[1]
    with _server_collection(milvus_uri) as name:
        uri = f"{milvus_uri}?collection={name}"
        with pytest.raises(protect.ProtectError, match="no face index at .* yet"):
            crawl.crawl_folder(photos, uri, "dlib_itq_64", shard=(0, 2), progress=False)
        with pytest.raises(protect.ProtectError, match="not a Milvus server"):
            crawl.crawl_folder(photos, str(tmp_path / "f.db"), "dlib_itq_64", shard=(0, 2), progress=False)
        with pytest.raises(protect.ProtectError, match="I/N"):
            crawl.crawl_folder(photos, uri, "dlib_itq_64", shard=(2, 2), progress=False)
        (tmp_path / "empty").mkdir()
        crawl.crawl_folder(tmp_path / "empty", uri, "dlib_itq_64", progress=False)  # makes the index
        out: dict = {}
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, crawl.crawl_folder(
            photos, uri, shard=(i, 2), progress=False))) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(2):
            assert out[i]["shard"] == f"{i}/2" and out[i]["photos"] == out[i]["indexed"] == len(mine[i])
            assert out[i]["missing"] == [] and out[i]["failed"] == []
        with X.open_index(uri) as ix:
            assert len(ix) == len(keys)
            for i in range(2):
                ids = [j for r in ix.crawled(sorted(mine[i])).values() for j in r["ids"]]
                assert len(ids) == len(mine[i]) and all(j // X.ID_BLOCK == i + 1 for j in ids), (i, ids)
        again = crawl.crawl_folder(photos, uri, shard=(0, 2), progress=False)
        assert again["indexed"] == 0 and again["skipped"] == len(mine[0]) and again["missing"] == []
        gone = sorted(mine[1])[0]
        (photos / gone).unlink()
        kept = crawl.crawl_folder(photos, uri, shard=(0, 2), prune=True, progress=False)
        assert kept["missing"] == [] and kept["pruned"] == 0
        pruned = crawl.crawl_folder(photos, uri, shard=(1, 2), prune=True, progress=False)
        assert pruned["missing"] == [gone] and pruned["pruned_faces"] == 1 and pruned["rows"] == len(keys) - 1, {k: pruned[k] for k in ("missing", "pruned", "pruned_faces", "rows")}
        whole = crawl.crawl_folder(photos, uri, progress=False)
        assert whole["indexed"] == 0 and whole["skipped"] == len(keys) - 1 and whole["rows"] == len(keys) - 1


def test_a_local_milvus_server_stops_and_leaves_nothing():
    """``milvus_server.start`` / ``stop``: a second server beside the session's gets its own port;
    after ``stop`` its process is gone, its port closed and its folder removed."""
    import psutil

    from toap_kit import milvus_server as ms

    try:
        server = ms.start()
    except ms.ServerUnavailable as e:
        pytest.skip(f"no Milvus server: {e}")
    pid, folder, port = server.pid, server.folder, server.port
    with server:
        assert psutil.pid_exists(pid) and folder.is_dir() and (folder / "bin" / "milvus").is_file()
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) == 0
    assert server.process is None and not folder.exists()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the server's port still answers"
    server.stop()  # twice is harmless


def test_no_milvus_package_is_a_clear_reason(monkeypatch):
    """Without the ``milvus`` package, ``start`` says what to install (the tests skip with it)
    and leaves no folder behind."""
    import tempfile

    from toap_kit import milvus_server as ms

    before = set(Path(tempfile.gettempdir()).glob("toap-milvus-*"))
    monkeypatch.setitem(sys.modules, "milvus", None)  # import milvus -> ImportError
    with pytest.raises(ms.ServerUnavailable, match="pip install milvus"):
        ms.start()
    assert set(Path(tempfile.gettempdir()).glob("toap-milvus-*")) == before


# ---------------------------------------------------------------- odd file names, the ledger's upkeep (issue 28)
ODD_KEYS = ["O'Brien.jpg", "Pat_O'Neil/02.jpg", "back\\slash.jpg", "new\nline.jpg", 'double"quote.jpg',
            "tab\tand ' \" \\ all.jpg", "\udcff\udcfe.jpg", "caf\u00e9/\u5f20\u4e09.jpg", "x" * 250 + ".jpg",
            "a/" * 100 + "deep.jpg", "ok.jpg"]


@pytest.mark.parametrize("backend", ["faiss", "milvus-lite"])
def test_the_ledger_takes_any_file_name(backend, data, tmp_path):
    """Issue 28, item 2: Milvus Lite's ledger look-up built a filter from the names (``key in
    ['O'Brien.jpg']``): an apostrophe, backslash or newline broke it, a name with bytes that are
    not UTF-8 could not be sent. Every name goes in, is found again (also after a reopen), is
    listed exactly by ``files`` and can be forgotten; its rows' ``source`` is printable text."""
    db, _, _ = data
    uri = f"faiss://{tmp_path / 'f.faiss'}" if backend == "faiss" else str(tmp_path / "f.db")
    with X.open_index(uri, bits=BITS, engine="test") as ix:
        for j, key in enumerate(ODD_KEYS):
            ix.add(db[2 * j:2 * j + 2], file=(key, {"size": j}))
        ix.save()
    with X.open_index(uri) as ix:
        found = ix.crawled(ODD_KEYS + ["missing.jpg"])
        assert sorted(found) == sorted(ODD_KEYS) and [found[k]["size"] for k in ODD_KEYS] == list(range(len(ODD_KEYS)))
        assert sorted(ix.files()) == sorted(ODD_KEYS) and len(ix) == 2 * len(ODD_KEYS)
        hits = ix.search(db[12], 1)  # the first code of "\udcff\udcfe.jpg"
        assert hits.meta[0][0]["source"] == "\\xff\\xfe.jpg" == X.shown("\udcff\udcfe.jpg")
        ix.add(db[40:41], file=("O'Brien.jpg", {"size": 99}))  # added again: its two old rows go
        assert len(ix) == 2 * len(ODD_KEYS) - 1 and ix.crawled(["O'Brien.jpg"])["O'Brien.jpg"]["faces"] == 1
        ix.update_file("new\nline.jpg", {"size": 7, "ids": [123]})  # new facts; ids and faces kept
        rec = ix.crawled(["new\nline.jpg"])["new\nline.jpg"]
        assert rec["size"] == 7 and rec["faces"] == 2 and rec["ids"] == [6, 7]
        assert ix.forget(["back\\slash.jpg", "\udcff\udcfe.jpg", "never.jpg"]) == 4
        assert len(ix) == 2 * len(ODD_KEYS) - 5 and "back\\slash.jpg" not in ix.files()
        assert set(ix.files()) == set(ODD_KEYS) - {"back\\slash.jpg", "\udcff\udcfe.jpg"}
        ix.save()
    with pytest.raises(ValueError, match="not valid Unicode"):
        X.open_index("faiss", bits=BITS).add(db[:1], [{"source": "\udcff.jpg"}])


def test_a_version_1_milvus_ledger_is_upgraded(data, tmp_path):
    """Version 1 kept a Milvus ledger under the names themselves: reopened, its files are found by
    name and a file added again still loses its old rows."""
    db, _, _ = data
    uri = str(tmp_path / "old.db")
    with X.open_index(uri, bits=BITS, engine="test") as ix:  # what version 1 wrote
        ids = ix._reserve(2)
        ix._insert(db[:2], ids, [{"source": "a/b.jpg"}] * 2)
        old = {"info": {**ix.info, "version": 1}, "a/b.jpg": {"size": 3, "ids": ids.tolist(), "faces": 2, "done": True}}
        ix._client.upsert(ix._files, [{"key": k if k != "info" else "/info", "record": r, "v": [0.0, 0.0]}
                                      for k, r in old.items()])
    with X.open_index(uri, engine="test") as ix:
        assert ix.info["version"] == 2 and ix.crawled(["a/b.jpg"])["a/b.jpg"]["size"] == 3
        assert list(ix.files()) == ["a/b.jpg"]
        ix.add(db[5:6], file=("a/b.jpg", {"size": 4}))
        assert len(ix) == 1


def _faiss_file(tmp_path, bits=BITS, name="s.faiss"):
    path = tmp_path / name
    with X.open_index(f"faiss://{path}", bits=bits, engine="test") as ix:
        ix.add(np.ones((3, bits), np.int8), file=("a.jpg", {"size": 1}))
        ix.save()
    return path, tmp_path / f"{name}.json"


@pytest.mark.parametrize("damage, says", [
    (lambda doc: [doc], "not a toap face index sidecar"),
    (lambda doc: {**doc, "info": ["x"]}, "not a toap face index"),
    (lambda doc: {**doc, "meta": [1, 2]}, "damaged sidecar"),
    (lambda doc: {**doc, "ledger": "x"}, "damaged sidecar"),
    (lambda doc: {**doc, "ntotal": "3"}, "damaged sidecar"),
])
def test_a_damaged_faiss_sidecar_is_named(damage, says, tmp_path):
    """Issue 28, item 9: a sidecar that is a JSON array gave "AttributeError: 'list' object ...";
    every damaged sidecar is a ValueError naming it."""
    path, side = _faiss_file(tmp_path)
    side.write_text(json.dumps(damage(json.loads(side.read_text()))))
    with pytest.raises(ValueError, match=says):
        X.open_index(str(path))


def test_a_faiss_file_of_another_bit_width_than_its_sidecar(tmp_path):
    """Issue 28, item 9: a FAISS file of 64-bit codes under a sidecar that says 16 gave
    "AssertionError" on search (and a crawl skipped everything): refused on open, saying both."""
    path16, side16 = _faiss_file(tmp_path)
    path64, _ = _faiss_file(tmp_path, 64, "b.faiss")
    doc = json.loads(side16.read_text())
    path16.write_bytes(path64.read_bytes())
    doc["index_sha256"] = hashlib.sha256(path16.read_bytes()).hexdigest()
    side16.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="holds 64-bit codes but its sidecar says 16"):
        X.open_index(str(path16))
    path16.write_bytes(b"not a faiss index at all")
    doc["index_sha256"] = hashlib.sha256(path16.read_bytes()).hexdigest()
    side16.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="not a FAISS binary index"):
        X.open_index(str(path16))


def test_a_milvus_server_search_reads_its_own_writes_without_waiting(data, milvus_uri, monkeypatch):
    """A server search, its metadata and the row count ask for Session consistency (a delete, rare,
    asks for Strong): the writer reads its own writes (a face just added is found, one just replaced is gone) without Strong's wait for the
    server's next time tick on every call (about 200 ms a call on Milvus 2.3's defaults, measured:
    a top-10 took 400-800 ms instead of a few ms)."""
    db, _, _ = data
    with _server_collection(milvus_uri) as name, X.open_index(milvus_uri, bits=BITS, engine="test",
                                                               collection=name) as ix:
        levels = []
        for method in ("search", "get", "query"):
            def spy(collection, *a, _real=getattr(ix._client, method), **kw):
                if collection == name:
                    levels.append(kw.get("consistency_level"))
                return _real(collection, *a, **kw)
            monkeypatch.setattr(ix._client, method, spy)
        old = ix.add(db[:1], file=("p/a.jpg", {"size": 1}))
        hits = ix.search(db[0], 1)
        assert hits.ids[0, 0] == old[0] and hits.meta[0][0]["source"] == "p/a.jpg"
        new = ix.add(db[1:2], file=("p/a.jpg", {"size": 2}))
        hits = ix.search(db[1], 5)
        assert hits.ids[0, 0] == new[0] and old[0] not in hits.ids[0] and len(ix) == 1
        # search and get, twice (no count), and len: Session; Strong only where the replaced row is
        # deleted (counted first, then waited for, so that this client's next reads do not see it)
        assert levels == ["Session"] * 2 + ["Strong"] * 2 + ["Session"] * 3, levels


def test_a_closed_milvus_lite_index_is_free_for_another_process(data, tmp_path):
    """Milvus Lite keeps a server per folder in the process that opened it, and it held the
    folder's lock after ``close()``: another process could not open the index ("Open local milvus
    failed") until this one ended. ``close()`` of the last index of a folder stops that server, also
    when the open itself was refused."""
    db, _, _ = data
    uri = str(tmp_path / "f.db")
    with X.open_index(uri, bits=BITS, engine="test") as ix:
        ix.add(db[:7])
    with pytest.raises(ValueError, match="holds 16-bit codes, not 32"):
        X.open_index(uri, bits=32)
    a, b = X.open_index(uri), X.open_index(uri)  # two of one folder: the first close leaves the second working
    a.close()
    assert len(b) == 7
    b.close()
    code = "import sys; from toap_kit import index; print(len(index.open_index(sys.argv[1])))"
    child = subprocess.run([sys.executable, "-c", code, uri], capture_output=True, text=True)
    assert child.returncode == 0 and child.stdout.strip() == "7", child.stderr[-500:]
