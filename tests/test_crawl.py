"""The crawler (``toap crawl``, ``toap search``; toap_kit.crawl, run by toap_kit.cli): every face
of a folder indexed with its source, a rerun that indexes nothing new, a changed file indexed
again without duplicates, and a search with another photo of a person that finds that person first."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from PIL import Image

from toap_kit import cli, crawl, odd_calls, odd_crawl, odd_inputs
from toap_kit import index as X
from toap_kit.data import DATA_DIR

PEOPLE = ["Bill_Clinton", "George_W_Bush", "Halle_Berry", "Angelina_Jolie", "Hugo_Chavez"]
ENGINE = "dlib_itq_64"


@pytest.fixture
def photos(tmp_path):
    """The shipped 250 x 250 photo of five people, one folder each, plus a file that is not an
    image and a photo without a face."""
    root = tmp_path / "photos"
    for p in PEOPLE:
        (root / p).mkdir(parents=True)
        shutil.copy(DATA_DIR / "photos250" / p / "01.jpg", root / p / "01.jpg")
    (root / "broken.jpg").write_bytes(b"not a photo")
    Image.new("RGB", (200, 150), (120, 130, 140)).save(root / "wall.png")
    return root


@pytest.mark.parametrize("backend", ["milvus-lite", "faiss"])
def test_crawl_resume_and_search(backend, photos, tmp_path, capsys):
    uri = str(tmp_path / "faces.db") if backend == "milvus-lite" else f"faiss://{tmp_path / 'faces.faiss'}"
    rc = cli.main(["crawl", str(photos), "--index", uri, "--engine", ENGINE, "--label-from-folder", "--json"])
    first = json.loads(capsys.readouterr().out)
    assert rc == 1, "a file failed, so the exit code says so"
    assert first["photos"] == 7 and first["indexed"] == 6 and first["faces"] == 5 and first["skipped"] == 0
    assert first["no_face"] == ["wall.png"] and [f["path"] for f in first["failed"]] == ["broken.jpg"]
    assert "not an image file" in first["failed"][0]["reason"]
    assert first["rows"] == 5 and first["engine"] == ENGINE and first["bits"] == 64

    # the rerun reads nothing again (the broken file is retried and fails again)
    cli.main(["crawl", str(photos), "--index", uri, "--json"])
    again = json.loads(capsys.readouterr().out)
    assert again["indexed"] == 0 and again["skipped"] == 6 and again["rows"] == 5 and again["engine"] == ENGINE

    # a changed file is indexed again, its old face removed first
    f = photos / "Halle_Berry" / "01.jpg"
    Image.open(f).transpose(Image.FLIP_LEFT_RIGHT).save(f, quality=90)
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    cli.main(["crawl", str(photos), "--index", uri, "--label-from-folder", "--json"])
    third = json.loads(capsys.readouterr().out)
    assert third["indexed"] == 1 and third["skipped"] == 5 and third["rows"] == 5

    # another photo of each person (a 112 x 112 crop of another LFW photo) finds that person first
    for p in PEOPLE:
        r = crawl.search_photo(DATA_DIR / "lfw158" / p / "03.jpg", uri, k=3)
        best = r["faces"][0]["results"][0]
        assert r["faces"][0]["face_found"] and best["identity"] == p and best["source"] == f"{p}/01.jpg", (p, r)
        assert len(best["box"]) == 3 and 0 <= best["hamming"] <= 64
    assert cli.main(["search", str(DATA_DIR / "lfw158" / "Bill_Clinton" / "05.jpg"), "--index", uri, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["engine"] == ENGINE and len(out["faces"][0]["results"]) == 5  # k = 10 > 5 rows: every row
    assert out["faces"][0]["results"][0]["identity"] == "Bill_Clinton"
    assert cli.main(["search", str(DATA_DIR / "lfw158" / "Bill_Clinton" / "05.jpg"), "--index", uri]) == 0
    assert "Bill_Clinton/01.jpg" in capsys.readouterr().out.splitlines()[2]


def test_another_engine_is_refused(photos, tmp_path, capsys):
    uri = str(tmp_path / "faces.db")
    with X.open_index(uri, bits=64, engine=ENGINE):
        pass
    assert cli.main(["crawl", str(photos), "--index", uri, "--engine", "vgg_dpsh_32"]) == 1
    assert "built with engine 'dlib_itq_64', not 'vgg_dpsh_32'" in capsys.readouterr().err
    photo = str(photos / "Hugo_Chavez" / "01.jpg")
    assert cli.main(["search", photo, "--index", uri, "--engine", "vgg_dpsh_32"]) == 1
    assert "not 'vgg_dpsh_32'" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["crawl", "{photos}", "--index", "faiss"], "in-memory index keeps nothing"),
    (["crawl", "{photos}", "--index", "foo://x"], "unknown index URI scheme"),
    (["crawl", "{photos}", "--index", "{tmp}/x.db", "--engine", "nope"], "unknown engine 'nope'"),
    (["crawl", "{tmp}/missing", "--index", "{tmp}/x.db"], "not a folder"),
    (["search", "{photos}/Hugo_Chavez/01.jpg", "--index", "{tmp}/none.db"], "no face index at"),
    (["search", "{photos}/broken.jpg", "--index", "{tmp}/none.db"], "not an image file"),
])
def test_clear_errors(args, message, photos, tmp_path, capsys):
    args = [a.format(photos=photos, tmp=tmp_path) for a in args]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("toap: error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "none.db").exists()


# ---------------------------------------------------------------- issue 28: odd names, races, stale files, locations
ODD = {"O'Brien.jpg": 0, "Pat_O'Neil/01.jpg": 1, "back\\slash.jpg": 2, "new\nline.jpg": 3, 'dq".jpg': 4,
       "x'] or key like '%.jpg": 5, os.fsdecode(b"\xff\xfe.jpg"): 6, os.fsdecode(b"caf\xe9/01.jpg"): 7}


def _odd_folder(root):
    """A shipped photo (another person each) under every name of ``ODD``."""
    for name, i in ODD.items():
        path = os.path.join(os.fsencode(root), os.fsencode(name))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copy(odd_inputs.shipped_photos()[i], path)
    return root


@pytest.mark.parametrize("backend", ["milvus-lite", "faiss"])
def test_odd_names_are_indexed_each(backend, tmp_path, capsys):
    """Issue 28, item 2: on Milvus Lite one name with an apostrophe, a backslash or a newline (LFW
    has O'Brien-style names), or bytes that are not UTF-8, failed the ledger look-up of every file:
    nothing was indexed and every rerun failed alike. Now every file is indexed, found again by the
    rerun, and listed under a name any output can print."""
    photos = _odd_folder(tmp_path / "photos")
    uri = str(tmp_path / "faces.db") if backend == "milvus-lite" else f"faiss://{tmp_path / 'faces.faiss'}"
    assert cli.main(["crawl", str(photos), "--index", uri, "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["indexed"] == len(ODD) and first["faces"] == len(ODD) and first["failed"] == []
    assert cli.main(["crawl", str(photos), "--index", uri, "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["skipped"] == len(ODD) and again["indexed"] == 0 and again["rows"] == len(ODD)
    with X.open_index(uri) as ix:
        assert sorted(ix.files()) == sorted(ODD)
    shutil.copy(photos / "O'Brien.jpg", tmp_path / "query.jpg")
    assert cli.main(["search", str(tmp_path / "query.jpg"), "--index", uri, "--k", "1", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)["faces"][0]["results"][0]
    assert best["source"] == "O'Brien.jpg" and best["hamming"] == 0
    os.rename(os.path.join(os.fsencode(photos), b"\xff\xfe.jpg"), os.fsencode(tmp_path / "q\xe9.jpg"))
    assert cli.main(["search", str(tmp_path / "q\xe9.jpg"), "--index", uri, "--k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["faces"][0]["results"][0]["source"] == "\\xff\\xfe.jpg"


def _hold_lock(uri):
    """A child process that holds ``uri``'s lock until killed; returns it once it holds it."""
    code = ("import sys, time; from toap_kit import index\n"
            "with index.lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


@pytest.mark.parametrize("backend", ["milvus-lite", "faiss"])
def test_a_second_run_on_an_index_in_use_is_refused(backend, photos, tmp_path, capsys, monkeypatch):
    """Issue 28, item 3: two crawls into one FAISS file both exited 0 and the last save won (rows
    lost, no warning); on Milvus Lite the second died with a traceback. Now a crawl (or a search)
    into an index another process holds is refused at once, before any photo is read, naming that
    process; once it is gone (SIGKILL: its pid stays in the lock file), the lock is taken over."""
    uri = str(tmp_path / "faces.db") if backend == "milvus-lite" else f"faiss://{tmp_path / 'faces.faiss'}"
    lock_file = tmp_path / ("faces.db.lock" if backend == "milvus-lite" else "faces.faiss.lock")
    assert cli.main(["crawl", str(photos), "--index", uri, "--json"]) == 1  # broken.jpg fails, the rest is done
    capsys.readouterr()
    child = _hold_lock(uri)
    read = []
    monkeypatch.setattr(crawl, "_faces", lambda image: read.append(image))
    try:
        assert cli.main(["crawl", str(photos), "--index", uri]) == 1
        err = capsys.readouterr().err
        assert f"index in use by another run (pid {child.pid})" in err and len(err.splitlines()) == 1
        assert cli.main(["search", str(photos / "Hugo_Chavez" / "01.jpg"), "--index", uri]) == 1
        assert f"index in use by another run (pid {child.pid})" in capsys.readouterr().err
        assert read == []
    finally:
        child.kill()
        child.wait()
    assert lock_file.read_text().strip() == str(child.pid)  # left by a killed process: taken over
    monkeypatch.undo()
    assert cli.main(["crawl", str(photos), "--index", uri, "--json"]) == 1
    s = json.loads(capsys.readouterr().out)
    assert s["skipped"] == 6 and s["indexed"] == 0 and s["rows"] == 5


@pytest.mark.parametrize("backend", ["milvus-lite", "faiss"])
def test_files_gone_are_counted_and_pruned(backend, photos, tmp_path, capsys):
    """Issue 28, item 4: a deleted photo kept its rows (a search still returned it at distance 0)
    and the recrawl said nothing. Now the summary counts it as missing, and --prune removes its
    faces and its ledger record."""
    uri = str(tmp_path / "faces.db") if backend == "milvus-lite" else f"faiss://{tmp_path / 'faces.faiss'}"
    argv = ["crawl", str(photos), "--index", uri, "--json"]
    cli.main(argv)
    capsys.readouterr()
    gone = photos / "Halle_Berry" / "01.jpg"
    kept = tmp_path / "halle.jpg"
    shutil.move(gone, kept)
    cli.main(argv)
    s = json.loads(capsys.readouterr().out)
    assert s["missing"] == ["Halle_Berry/01.jpg"] and s["pruned"] == 0 and s["rows"] == 5
    cli.main(argv[:-1])
    assert "1 indexed files are gone" in capsys.readouterr().out
    cli.main([*argv, "--prune"])
    s = json.loads(capsys.readouterr().out)
    assert s["missing"] == ["Halle_Berry/01.jpg"] and s["pruned"] == 1 and s["pruned_faces"] == 1 and s["rows"] == 4
    cli.main(argv)
    assert json.loads(capsys.readouterr().out)["missing"] == []
    r = crawl.search_photo(kept, uri, k=4)
    assert all(h["source"] != "Halle_Berry/01.jpg" for h in r["faces"][0]["results"])
    with X.open_index(uri) as ix:
        assert "Halle_Berry/01.jpg" not in ix.files()


def test_a_file_rewritten_with_its_old_size_and_time_is_indexed_again(photos, tmp_path, capsys):
    """Issue 28, item 4: a photo rewritten with the same size and modification time kept its old
    codes although the ledger records its sha256. The change time moved, so its sha256 is compared:
    other bytes are indexed again; the same bytes (a touched file) are not read again."""
    uri = f"faiss://{tmp_path / 'faces.faiss'}"
    f = photos / "Halle_Berry" / "01.jpg"
    mine, other = odd_crawl.same_size(f.read_bytes(), (photos / "Hugo_Chavez" / "01.jpg").read_bytes())
    f.write_bytes(mine)
    argv = ["crawl", str(photos), "--index", uri, "--json"]
    cli.main(argv)
    capsys.readouterr()
    st = f.stat()
    time.sleep(0.05)
    f.write_bytes(other)  # another person, the same size, the old time put back
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    cli.main(argv)
    s = json.loads(capsys.readouterr().out)
    assert s["indexed"] == 1 and s["sha_checked"] == 1 and s["rows"] == 5
    r = crawl.search_photo(DATA_DIR / "lfw158" / "Hugo_Chavez" / "03.jpg", uri, k=2)
    assert {h["source"] for h in r["faces"][0]["results"]} == {"Hugo_Chavez/01.jpg", "Halle_Berry/01.jpg"}
    os.utime(f)  # touched: the same bytes
    cli.main(argv)
    s = json.loads(capsys.readouterr().out)
    assert s["indexed"] == 0 and s["sha_checked"] == 1 and s["skipped"] == 6
    cli.main(argv)
    s = json.loads(capsys.readouterr().out)
    assert s["sha_checked"] == 0 and s["skipped"] == 6  # the new times were recorded
    cli.main([*argv, "--verify-sha"])
    s = json.loads(capsys.readouterr().out)
    assert s["sha_checked"] == 6 and s["indexed"] == 0


@pytest.mark.parametrize("where, make, says", [
    ("afile/faces.faiss", lambda t: (t / "afile").write_text("x"), "is a file, not a folder"),
    ("afile/sub/faces.db", lambda t: (t / "afile").write_text("x"), "is a file, not a folder"),
    ("notes.db", lambda t: (t / "notes.db").write_text("my notes\n"), "is a plain file, not a Milvus Lite index"),
    ("empty.db", lambda t: (t / "empty.db").write_bytes(b""), "is an empty file, not a Milvus Lite index"),
    ("random.db", lambda t: (t / "random.db").write_bytes(os.urandom(4096)), "is a plain file, not a Milvus Lite"),
    ("mine.db", lambda t: ((t / "mine.db").mkdir(), (t / "mine.db" / "a.txt").write_text("x")),
     "is a folder that is not a Milvus Lite index"),
    ("adir.faiss", lambda t: (t / "adir.faiss").mkdir(), "is a folder, not a FAISS index file"),
])
def test_an_index_location_that_cannot_be_used_is_refused_first(where, make, says, photos, tmp_path, capsys,
                                                                 monkeypatch):
    """Issue 28, items 5 and 9: a Milvus Lite .db that is a plain file (text, empty, random bytes)
    gave a traceback ("Open local milvus failed"); a parent that is a file gave "[Errno 17] File
    exists". Now one line names the cause, before any photo is read, and nothing there changes."""
    make(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and photos not in p.parents}
    read = []
    monkeypatch.setattr(crawl, "_faces", lambda image: read.append(image))
    uri = str(tmp_path / where) if where.endswith(".db") else f"faiss://{tmp_path / where}"
    assert cli.main(["crawl", str(photos), "--index", uri]) == 1
    err = capsys.readouterr().err
    assert err.startswith("toap: error: ") and says in err and len(err.splitlines()) == 1, err
    assert read == []
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and photos not in p.parents} == before


def _run_restricted(*args):  # a child that obeys permissions, also as root
    if not odd_calls.permissions_hold():
        pytest.skip("permissions do not hold for a child here (root without setpriv)")
    return odd_calls.toap(*args)


def test_a_read_only_index_folder_is_refused_before_any_work(tmp_path):
    """Issue 28, item 5: a FAISS file in a read-only folder failed only after every photo was
    encoded; Milvus Lite there gave "Open local milvus failed". Now one line says the folder is not
    writable and exit 1, before any photo is read (the crawl prints no summary and takes a second)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(odd_inputs.shipped_photos()[0], photos / "a.jpg")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for uri in (f"faiss://{ro / 'faces.faiss'}", str(ro / "faces.db")):
            call = _run_restricted("crawl", photos, "--index", uri, "--no-progress")
            assert call.rc == 1 and call.out == "" and call.crash() is None, call
            assert call.err.startswith("toap: error: cannot write the") and "not writable (Permission denied)" in call.err
    finally:
        ro.chmod(0o755)
    assert list(ro.iterdir()) == []


def test_a_folder_that_cannot_be_listed_is_not_called_unprotected(tmp_path):
    """Issue 28, item 9: the crawl's line for a folder it may not list said its photos "are not
    protected" (toap protect's words); it says they are not indexed, and their indexed files are not
    counted as missing."""
    photos = tmp_path / "photos"
    (photos / "sealed").mkdir(parents=True)
    shutil.copy(odd_inputs.shipped_photos()[0], photos / "a.jpg")
    shutil.copy(odd_inputs.shipped_photos()[1], photos / "sealed" / "b.jpg")
    uri = f"faiss://{tmp_path / 'faces.faiss'}"
    assert _run_restricted("crawl", photos, "--index", uri, "--json").json()["indexed"] == 2
    (photos / "sealed").chmod(0)
    try:
        call = _run_restricted("crawl", photos, "--index", uri, "--json")
    finally:
        (photos / "sealed").chmod(0o755)
    s = call.json()
    assert call.rc == 1 and s["missing"] == [] and s["rows"] == 2, call
    assert s["failed"] == [{"path": "sealed", "reason": "cannot read this folder (Permission denied): the photos in "
                                                         "it, if any, are not indexed"}]


@pytest.mark.parametrize("damage, says", [
    ("array", "not a toap face index sidecar (a JSON list, not an object)"),
    ("bits", "holds 64-bit codes but its sidecar says 32"),
])
def test_a_damaged_faiss_index_is_named_by_crawl_and_search(damage, says, photos, tmp_path, capsys):
    """Issue 28, item 9: a sidecar that is a JSON array gave "AttributeError: 'list' object ...";
    a FAISS file of another bit width than its sidecar gave "AssertionError" on search while a
    crawl exited 0 after skipping everything. Both commands now say what is wrong."""
    path = tmp_path / "faces.faiss"
    cli.main(["crawl", str(photos / "Bill_Clinton"), "--index", f"faiss://{path}", "--engine", "dlib_itq_32"])
    side = tmp_path / "faces.faiss.json"
    if damage == "array":
        side.write_text(json.dumps([json.loads(side.read_text())]))
    else:
        cli.main(["crawl", str(photos / "Bill_Clinton"), "--index", f"faiss://{tmp_path / 'b.faiss'}", "--engine",
                  ENGINE])
        path.write_bytes((tmp_path / "b.faiss").read_bytes())
        doc = json.loads(side.read_text())
        side.write_text(json.dumps({**doc, "index_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}))
    capsys.readouterr()
    for argv in (["crawl", str(photos)], ["search", str(photos / "Hugo_Chavez" / "01.jpg")]):
        assert cli.main([*argv, "--index", f"faiss://{path}"]) == 1
        err = capsys.readouterr().err
        assert says in err and "Error:" not in err and len(err.splitlines()) == 1, err


def test_names_that_are_not_utf8_print_on_a_strict_utf8_stdout(tmp_path):
    """Issue 28, item 10: with a strict UTF-8 stdout (a desktop locale), ``toap search`` died with
    UnicodeEncodeError on a name whose bytes are not UTF-8. ``crawl`` and ``search`` print such
    names as \\xNN, and ``--json`` stays valid JSON."""
    photos = os.path.join(os.fsencode(tmp_path), b"photos")
    os.makedirs(os.path.join(photos, b"\xe9quipe"))
    shutil.copy(odd_inputs.shipped_photos()[0], os.path.join(photos, b"\xe9quipe", b"\xff.jpg"))
    open(os.path.join(photos, b"\xfe-broken.jpg"), "wb").write(b"not a photo")
    uri = f"faiss://{tmp_path / 'faces.faiss'}"
    call = odd_calls.toap("crawl", os.fsdecode(photos), "--index", uri, "--label-from-folder", "--no-progress")
    assert call.rc == 1 and call.crash() is None, call
    assert "failed: \\xfe-broken.jpg: not an image file" in call.out and "1 indexed now (1 faces)" in call.out
    query = os.path.join(photos, b"\xe9quipe", b"\xff.jpg")
    call = odd_calls.toap("search", os.fsdecode(query), "--index", uri)
    assert call.rc == 0 and call.crash() is None, call
    assert "\\xe9quipe/\\xff.jpg" in call.out.splitlines()[2] and "\\xe9quipe " in call.out.splitlines()[2]
    call = odd_calls.toap("search", os.fsdecode(query), "--index", uri, "--json")
    r = call.json()
    assert r["photo"].endswith("photos/\\xe9quipe/\\xff.jpg")
    assert r["faces"][0]["results"][0]["source"] == "\\xe9quipe/\\xff.jpg"


def test_a_search_while_a_crawl_makes_the_index_is_refused(tmp_path, capsys):
    """A search while the first crawl into a FAISS file is still running (the file not yet
    written) said "no face index at"; it says the index is in use."""
    uri = f"faiss://{tmp_path / 'new.faiss'}"
    child = _hold_lock(uri)
    try:
        assert cli.main(["search", str(DATA_DIR / "lfw158" / "Bill_Clinton" / "05.jpg"), "--index", uri]) == 1
        assert f"index in use by another run (pid {child.pid})" in capsys.readouterr().err
    finally:
        child.kill()
        child.wait()
    assert cli.main(["search", str(DATA_DIR / "lfw158" / "Bill_Clinton" / "05.jpg"), "--index", uri]) == 1
    assert "no face index at" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["ivf=zero", "nprobe=-1", "collection=a-b"])
def test_a_refused_uri_option_leaves_nothing(option, photos, tmp_path, capsys):
    """A bad option in the URI was only noticed when the index was opened, after the lock file
    was made next to it: it is refused first, and nothing is made there."""
    assert cli.main(["crawl", str(photos), "--index", f"{tmp_path}/idx/o.faiss?{option}"]) == 1
    assert option.split("=")[0] in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()


def test_the_crawl_corpus(tmp_path):
    """``crawl_bad_inputs`` (``odd_crawl.run_odd_crawl``; issue 28): over 100 odd names, odd files,
    bad URIs, index locations, two runs at once, a crawl killed half-way and stale files, through
    the real ``toap crawl``/``toap search`` in child processes with a strict UTF-8 stdout: no crash,
    no hang, nothing silently wrong, nothing unexpected, no original changed. The whole corpus:
    129 cases, 7.7 min on a 2-core machine shared with other work (load average 6-7)."""
    r = odd_crawl.run_odd_crawl(tmp_path / "corpus")
    wrong = [c for c in r["cases"] if c["outcome"] not in ("correct", "clear_error")]
    assert r["files"] >= 60 and wrong == [], wrong
    assert r["crashes"] == r["hangs"] == r["silently_wrong"] == r["unexpected"] == r["originals_modified"] == 0
    assert r["clear_errors"] + r["correct_results"] == r["files"]


def test_a_path_longer_than_the_system_takes_costs_one_line(photos, tmp_path, capsys):
    """A folder nested past the system's path limit stopped the whole crawl ("[Errno 36] File name
    too long"): it is one failed line, and every other photo is indexed."""
    fd, _ = odd_inputs._deep_folder(photos, 4200)
    odd_inputs._write_at(fd, "far.jpg", (photos / "Bill_Clinton" / "01.jpg").read_bytes())
    os.close(fd)
    assert cli.main(["crawl", str(photos), "--index", f"faiss://{tmp_path / 'f.faiss'}", "--json"]) == 1
    s = json.loads(capsys.readouterr().out)
    assert s["faces"] == 5 and any("File name too long" in f["reason"] for f in s["failed"]), s["failed"]


def test_prune_refuses_another_folder(photos, tmp_path, capsys):
    """--prune into an index built from another folder (here a sub-folder: every key differs) would
    remove every face of the index: it is refused, and nothing is pruned."""
    uri = f"faiss://{tmp_path / 'f.faiss'}"
    cli.main(["crawl", str(photos), "--index", uri, "--json"])
    capsys.readouterr()
    assert cli.main(["crawl", str(photos / "Hugo_Chavez"), "--index", uri, "--prune"]) == 1
    assert "none of the 6 files in the index is under" in capsys.readouterr().err
    with X.open_index(uri) as ix:
        assert len(ix) == 5 and len(ix.files()) == 6
