"""``toap protect`` on files and folders (toap_kit.batch): formats and metadata, never
overwriting, resume, atomic writes, the lock, and the edges of issue 19 (irregular files, 16-bit
colour, unreadable folders and paths too long, resume by target, damaged manifests)."""
import fcntl
import json
import logging
import os
import shutil
import signal
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms

from toap_kit import batch, cli, data, odd_inputs, protect
from toap_kit.perturbation import Perturbation

EPS8 = 8  # toap-mid's eps, in 8-bit levels


@pytest.fixture(scope="module")
def pert() -> Perturbation:
    return protect.load_perturbation("toap-mid")


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return odd_inputs.shipped_photo(0)


@pytest.fixture
def no_hang():
    """Fail a test still running after 60 s (a read that never ends) instead of hanging the suite."""
    def ring(signum, frame):
        pytest.fail("still running after 60 s: something is reading without end")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a).astype(np.int64) - np.asarray(b).astype(np.int64)).max())


def _photos(folder: Path, n: int, first: int = 0) -> list[Path]:
    """``n`` shipped photos saved as JPEGs ``p0.jpg``... in ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"p{i}.jpg" for i in range(first, first + n)]
    for i, p in enumerate(paths):
        odd_inputs.shipped_photo(first + i).save(p, quality=95)
    return paths


# ---------------------------------------------------------------- files and folders
def _photo_with_metadata(path: Path, photo: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x013B] = "Jane Doe"
    exif[0x0112] = 1
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 24.0), 3: "E", 4: (2.0, 21.0, 3.0)}
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    photo.save(path, quality=95, exif=exif.tobytes(), icc_profile=icc)
    return icc


def test_gps_stripped_by_default_kept_on_request_icc_kept(photo, pert, tmp_path):
    src = tmp_path / "in" / "me.jpg"
    src.parent.mkdir()
    icc = _photo_with_metadata(src, photo)
    for keep in (False, True):
        rows = batch.protect_files([src], tmp_path / f"out{keep}", pert, keep_exif=keep, progress=False)
        assert rows[0]["status"] == "protected" and rows[0]["format"] == "JPEG"
        with Image.open(rows[0]["output"]) as out:
            exif = out.getexif()
            assert out.info.get("icc_profile") == icc
            assert bool(exif.get_ifd(0x8825)) == keep and (exif.get(0x013B) == "Jane Doe") == keep
            assert exif.get(0x0112, 1) == 1


def test_formats_names_and_folders_are_kept(photo, pert, tmp_path):
    src = tmp_path / "album"
    (src / "trip").mkdir(parents=True)
    photo.save(src / "a.png")
    photo.save(src / "trip" / "b.webp", quality=90)
    photo.save(src / "trip" / "c.tif")
    photo.convert("L").save(src / "grey.jpg", quality=95)
    (src / "notes.txt").write_text("not a photo")
    rows = batch.protect_files([src], tmp_path / "out", pert, progress=False)
    got = {Path(r["output"]).relative_to(tmp_path / "out").as_posix(): r["format"] for r in rows}
    assert got == {"a.png": "PNG", "grey.jpg": "JPEG", "trip/b.webp": "WEBP", "trip/c.tif": "TIFF"}
    with Image.open(tmp_path / "out" / "grey.jpg") as im:
        assert im.mode == "L"
    with Image.open(tmp_path / "out" / "a.png") as im:  # lossless: the eps bound holds in the file
        assert _diff(photo, im) <= EPS8


def test_outputs_never_overwrite_inputs(photo, pert, tmp_path):
    photo.save(tmp_path / "me.jpg", quality=95)
    before = data.sha256_file(tmp_path / "me.jpg")
    with pytest.raises(protect.ProtectError, match="overwrite the original"):
        batch.protect_files([tmp_path], tmp_path, pert, progress=False)
    with pytest.raises(protect.ProtectError, match="overwrite the original"):
        batch.protect_files([tmp_path / "me.jpg"], tmp_path, pert, progress=False)
    # an output folder inside the input folder is not scanned as input, twice over
    rows = batch.protect_files([tmp_path], tmp_path / "protected", pert, progress=False)
    rows2 = batch.protect_files([tmp_path], tmp_path / "protected", pert, progress=False)
    assert len(rows) == len(rows2) == 1 and rows2[0]["resumed"]
    assert data.sha256_file(tmp_path / "me.jpg") == before
    assert not (tmp_path / "protected" / "protected").exists()


def test_rerun_resumes_and_redoes_what_changed(photo, pert, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        odd_inputs.shipped_photo(i).save(src / f"p{i}.jpg", quality=95)
    out = tmp_path / "out"
    first = batch.protect_files([src], out, pert, progress=False)
    assert [r["status"] for r in first] == ["protected"] * 3 and not any(r["resumed"] for r in first)
    n_lines = len(batch.read_manifest(out / batch.MANIFEST))
    again = batch.protect_files([src], out, pert, progress=False)
    assert all(r["resumed"] for r in again) and len(batch.read_manifest(out / batch.MANIFEST)) == n_lines
    odd_inputs.shipped_photo(5).save(src / "p1.jpg", quality=95)  # a changed input is done again
    (out / "p2.jpg").unlink()  # so is a deleted output
    third = batch.protect_files([src], out, pert, progress=False)
    assert [r["resumed"] for r in third] == [True, False, False]
    stronger = batch.protect_files([src], out, protect.load_perturbation(strength="high"), progress=False)
    assert [r["resumed"] for r in stronger] == [False] * 3 and stronger[0]["strength"] == "high"
    row = stronger[0]
    for key in ("input", "output", "faces", "strength", "perturbation", "perturbation_sha256", "seconds"):
        assert row[key] is not None
    assert row["perturbation"] == "toap-high" and len(row["perturbation_sha256"]) == 64


def test_a_run_killed_while_writing_leaves_no_half_file(photo, pert, tmp_path, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        odd_inputs.shipped_photo(i).save(src / f"p{i}.jpg", quality=95)
    out = tmp_path / "out"
    real_save, calls = batch._save, []

    def dies_on_the_third(img, f, *args):
        calls.append(1)
        if len(calls) == 3:
            f.write(b"\xff\xd8\xff half a JPEG")
            raise KeyboardInterrupt  # Ctrl-C in the middle of writing
        real_save(img, f, *args)

    monkeypatch.setattr(batch, "_save", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        batch.protect_files([src], out, pert, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["p0.jpg", "p1.jpg", batch.MANIFEST]
    monkeypatch.setattr(batch, "_save", real_save)
    # what a SIGKILL during a write leaves: a temporary file and half a manifest line
    (out / f".p2.jpg{protect.TMP_TAG}4242").write_bytes(b"\xff\xd8 half")
    with open(out / batch.MANIFEST, "a") as f:
        f.write('{"input": "p2.jpg", "sta')
    rows = batch.protect_files([src], out, pert, progress=False)
    assert [r["resumed"] for r in rows] == [True, True, False, False]
    assert sorted(p.name for p in out.iterdir()) == [f"p{i}.jpg" for i in range(4)] + [batch.MANIFEST]
    for r in rows:
        with Image.open(r["output"]) as im:
            im.load()
        assert data.sha256_file(r["output"]) == r["output_sha256"]


def test_no_face_skip_or_copy_and_bad_files_do_not_stop_the_batch(photo, pert, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (300, 200), (120, 120, 120)).save(src / "a_wall.png")
    (src / "b_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 nothing else")
    photo.save(src / "c_me.jpg", quality=95)
    rows = batch.protect_files([src], tmp_path / "skip", pert, progress=False)
    assert [r["status"] for r in rows] == ["no-face", "error", "protected"]
    assert rows[1]["error"] and "\n" not in rows[1]["error"] and not rows[1]["crash"]
    assert not (tmp_path / "skip" / "a_wall.png").exists()
    rows = batch.protect_files([src], tmp_path / "copy", pert, no_face="copy", progress=False)
    assert [r["status"] for r in rows] == ["copied", "error", "protected"]
    with Image.open(tmp_path / "copy" / "a_wall.png") as im:
        assert _diff(im, Image.new("RGB", (300, 200), (120, 120, 120))) == 0
    text = batch.summarize(rows)
    assert "1 protected" in text and "1 failed" in text and "b_broken.jpg" in text
    written = [json.loads(line) for line in (tmp_path / "copy" / batch.MANIFEST).read_text().splitlines()]
    assert [r["status"] for r in written] == ["copied", "error", "protected"]


def test_jpeg_quality_is_measured_default_and_lower_warns(photo, pert, tmp_path, caplog):
    photo.save(tmp_path / "me.jpg", quality=95)
    rows = batch.protect_files([tmp_path / "me.jpg"], tmp_path / "out95", pert, progress=False)
    assert rows[0]["settings"]["jpeg_quality"] == protect.DEFAULT_JPEG_QUALITY == 95
    with caplog.at_level(logging.WARNING):
        batch.protect_files([tmp_path / "me.jpg"], tmp_path / "out80", pert, jpeg_quality=80, progress=False)
    assert "below 95" in caplog.text
    with pytest.raises(protect.ProtectError, match="1..100"):
        batch.protect_files([tmp_path / "me.jpg"], tmp_path / "x", pert, jpeg_quality=101, progress=False)


# ---------------------------------------------------------------- issue 19: the edges
def test_irregular_files_are_refused_before_reading(photo, pert, tmp_path, no_hang):
    src = tmp_path / "in"
    src.mkdir()
    photo.save(src / "a.jpg", quality=95)
    os.mkfifo(src / "fifo.jpg")
    (tmp_path / "x.jpg").symlink_to("/dev/zero")
    rows = batch.protect_files([Path("/dev/zero"), tmp_path / "x.jpg", src / "fifo.jpg"], tmp_path / "out1", pert,
                               progress=False)
    assert [r["status"] for r in rows] == ["error"] * 3 and [r["target"] for r in rows] == [None] * 3
    assert [r["error"] for r in rows] == ["not a regular file: a character device"] * 2 + [
        "not a regular file: a FIFO (named pipe)"]
    with pytest.raises(protect.ProtectError, match="FIFO"):
        protect.open_photo(src / "fifo.jpg")
    # inside a folder: counted, named in the summary and in the manifest
    rows = batch.protect_files([src], tmp_path / "out2", pert, progress=False)
    assert [(Path(r["input"]).name, r["status"]) for r in rows] == [("a.jpg", "protected"), ("fifo.jpg", "error")]
    text = batch.summarize(rows)
    assert text.startswith("1 photo and 1 other path") and f"failed: {src / 'fifo.jpg'}: not a regular file" in text
    assert [r["status"] for r in batch.read_manifest(tmp_path / "out2" / batch.MANIFEST)] == ["protected", "error"]


def test_16_bit_colour_written_as_8_bit_is_reported(photo, pert, tmp_path):
    rgb16 = np.asarray(photo).astype(np.uint16)[..., ::-1] * 257  # OpenCV writes BGR
    src = tmp_path / "in"
    src.mkdir()
    assert cv2.imwrite(str(src / "rgb16.png"), rgb16)
    assert cv2.imwrite(str(src / "rgba16.png"), np.dstack([rgb16, np.full(rgb16.shape[:2], 65535, np.uint16)]))
    assert cv2.imwrite(str(src / "rgb16.tif"), rgb16)
    Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257).save(src / "grey16.png")
    photo.save(src / "rgb8.png")
    rows = {Path(r["input"]).name: r for r in batch.protect_files([src], tmp_path / "out", pert, progress=False)}
    assert {n: r["bit_depth"] for n, r in rows.items()} == {"grey16.png": None, "rgb16.png": "16 -> 8",
                                                           "rgb16.tif": "16 -> 8", "rgb8.png": None,
                                                           "rgba16.png": "16 -> 8"}
    assert all(r["status"] == "protected" for r in rows.values())
    assert any("8 bits a channel" in n for n in rows["rgb16.png"]["notes"])
    with Image.open(tmp_path / "out" / "grey16.png") as im:
        assert im.mode == "I;16"  # 16-bit greyscale keeps its depth
    assert (tmp_path / "out" / "rgb16.png").read_bytes()[24] == 8  # the IHDR's bit depth, as reported
    text = batch.summarize(list(rows.values()))
    assert text.count("bit depth 16 -> 8: ") == 3 and str(src / "rgba16.png") in text
    written = batch.read_manifest(tmp_path / "out" / batch.MANIFEST)
    assert sorted(r["bit_depth"] or "" for r in written) == ["", "", "16 -> 8", "16 -> 8", "16 -> 8"]


def test_unreadable_folders_and_paths_too_long_are_counted_and_named(photo, pert, tmp_path, monkeypatch):
    src = tmp_path / "in"
    _photos(src, 3)
    _photos(src / "sub", 3, first=3)
    real_scandir = os.scandir

    def scandir(path=None):  # a folder the user may not read (root reads any, so it is injected here)
        if path is not None and os.fspath(path) == str(src / "sub"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path) if path is not None else real_scandir()

    monkeypatch.setattr(os, "scandir", scandir)
    rows = batch.protect_files([src], tmp_path / "out", pert, progress=False)
    monkeypatch.undo()
    assert [r["status"] for r in rows] == ["protected"] * 3 + ["error"]
    assert rows[-1]["input"] == str(src / "sub") and "cannot read this folder (Permission denied)" in rows[-1]["error"]
    text = batch.summarize(rows)
    assert text.startswith("3 photos and 1 other path") and f"failed: {src / 'sub'}: cannot read this folder" in text
    assert batch.read_manifest(tmp_path / "out" / batch.MANIFEST)[-1]["input"] == str(src / "sub")
    # a photo whose path is past the system's limit: its own error row, the run goes on
    limit = os.pathconf("/", "PC_PATH_MAX")
    deep = tmp_path / "deep"
    _photos(deep, 1)
    fd, folder = odd_inputs._deep_folder(deep, limit - 100)
    odd_inputs._write_at(fd, "q" * 200 + ".jpg", (deep / "p0.jpg").read_bytes())
    os.close(fd)
    rows = batch.protect_files([deep], tmp_path / "out-deep", pert, progress=False)
    assert [r["status"] for r in rows] == ["protected", "error"]
    assert rows[1]["input"] == f"{folder}/{'q' * 200}.jpg" and "File name too long" in rows[1]["error"]


def test_resume_is_keyed_by_the_target_inside_the_output_folder(pert, tmp_path, monkeypatch):
    _photos(tmp_path / "in", 2)
    monkeypatch.chdir(tmp_path)
    first = batch.protect_files([Path("in")], Path("out"), pert, progress=False)
    assert [r["target"] for r in first] == ["p0.jpg", "p1.jpg"]
    typed_otherwise = batch.protect_files([tmp_path / "in"], tmp_path / "out", pert, progress=False)
    assert all(r["resumed"] and r["status"] == "protected" for r in typed_otherwise)
    assert typed_otherwise[0]["output"] == str(tmp_path / "out" / "p0.jpg")
    shutil.move(tmp_path / "out", tmp_path / "moved")
    shutil.copytree(tmp_path / "moved", tmp_path / "copied")
    for out in ("moved", "copied"):
        rows = batch.protect_files([Path("in")], Path(out), pert, progress=False)
        assert all(r["resumed"] for r in rows), out
    assert cli._protection_for(tmp_path / "copied" / "p1.jpg") == ("toap-mid", [])  # toap verify finds the row
    # a manifest written before: outputs recorded as typed (absolute here); still resumed
    manifest = tmp_path / "copied" / batch.MANIFEST
    manifest.write_text("".join(json.dumps({**r, "target": str(tmp_path / "out" / r["target"])}) + "\n"
                                for r in batch.read_manifest(manifest)))
    assert all(r["resumed"] for r in batch.protect_files([Path("in")], Path("copied"), pert, progress=False))


def test_a_second_run_on_the_same_output_folder_is_refused(photo, pert, tmp_path, capsys):
    src = _photos(tmp_path / "in", 2)
    out = tmp_path / "out"
    out.mkdir()
    left = out / f".p0.jpg{protect.TMP_TAG}4242"  # the other run's file being written
    left.write_bytes(b"\xff\xd8 being written")
    with open(out / batch.MANIFEST, "ab") as other:  # another run holds the folder
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(protect.ProtectError, match="another toap protect is writing to"):
            batch.protect_files(src, out, pert, progress=False)
        assert cli.main(["protect", str(src[0]), "-o", str(out), "-q"]) == 1
        assert capsys.readouterr().err.startswith("toap: error: another toap protect is writing to")
        assert sorted(p.name for p in out.iterdir()) == sorted([left.name, batch.MANIFEST])  # nothing changed
        assert (out / batch.MANIFEST).read_bytes() == b""
    rows = batch.protect_files(src, out, pert, progress=False)  # the lock went with the other run
    assert [r["status"] for r in rows] == ["protected"] * 2 and not left.exists()


def test_a_rerun_recovers_from_interleaved_rows(pert, tmp_path):
    src = _photos(tmp_path / "in", 2)
    out = tmp_path / "out"
    first = batch.protect_files(src, out, pert, progress=False)
    for r in first:  # what two unlocked runs left: the good row, then a false error row of the same output
        batch._append(out / batch.MANIFEST, {**r, "status": "error", "output": None, "output_sha256": None,
                                             "error": "already exists and was not written by toap protect"})
    rows = batch.protect_files(src, out, pert, progress=False)
    assert all(r["resumed"] and r["status"] == "protected" for r in rows)
    # two runs with different perturbations, the later one's output on disk: still toap's own file
    high = protect.load_perturbation(strength="high")
    batch.protect_files(src, out, high, progress=False)
    rows = batch.protect_files(src, out, pert, progress=False)
    assert [r["status"] for r in rows] == ["protected"] * 2 and not any(r["resumed"] for r in rows)


def test_a_damaged_manifest_is_ignored_with_a_warning_never_rewritten(photo, pert, tmp_path, caplog):
    src = _photos(tmp_path / "in", 1)
    out = tmp_path / "out"
    out.mkdir()
    damage = (np.random.default_rng(0).bytes(2000) + b"\n[1, 2]\n42\n" + json.dumps({"target": 5}).encode() + b"\n"
              + json.dumps({"target": "p0.jpg", "status": "protected", "input_sha256": 7, "settings": "x",
                            "output_sha256": 5}).encode() + b"\n")
    (out / batch.MANIFEST).write_bytes(damage)
    with caplog.at_level(logging.WARNING, logger="toap_kit"):
        rows = batch.protect_files(src, out, pert, progress=False)
    assert [r["status"] for r in rows] == ["protected"]
    assert f"{out / batch.MANIFEST}:" in caplog.text and "not a manifest row" in caplog.text
    assert (out / batch.MANIFEST).read_bytes().startswith(damage)  # the user's bytes stay
    assert all(isinstance(r, dict) for r in batch.read_manifest(out / batch.MANIFEST))
    assert batch.protect_files(src, out, pert, progress=False)[0]["resumed"]
