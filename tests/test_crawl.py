"""The crawler (``toap crawl``, ``toap search``; toap_kit.crawl, run by toap_kit.cli): every face
of a folder indexed with its source, a rerun that indexes nothing new, a changed file indexed
again without duplicates, and a search with another photo of a person that finds that person first."""
import json
import os
import shutil

import pytest
from PIL import Image

from toap_kit import cli, crawl
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
