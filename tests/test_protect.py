"""``toap protect`` / ``toap verify``: the library (toap_kit.protect), the command (toap_kit.cli)
and the corpus of bad and odd inputs."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from toap_kit import cli, data, odd_inputs, protect, verify
from toap_kit.perturbation import Perturbation
from toap_kit.postprocess import from_pil

EPS8 = 8  # toap-mid's eps, in 8-bit levels


@pytest.fixture(scope="module")
def pert() -> Perturbation:
    return protect.load_perturbation("toap-mid")


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return odd_inputs.shipped_photo(0)


def _diff(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.abs(np.asarray(a).astype(np.int64) - np.asarray(b).astype(np.int64))


def _outside(shape, boxes) -> np.ndarray:
    mask = np.ones(shape[:2], bool)
    for x0, y0, s in boxes:
        mask[max(0, y0):y0 + s, max(0, x0):x0 + s] = False
    return mask


# ---------------------------------------------------------------- one photo
def test_face_boxes_agree_with_the_kit_cropper():
    for path in odd_inputs.shipped_photos()[:4]:
        with Image.open(path) as im:
            boxes = protect.face_boxes(im)
        x0, y0, s, found = data.face_box(data.load_image(path))
        assert found and boxes[0] == (x0, y0, s)


def test_face_crop_is_the_kit_crop(photo):
    crop, found = protect.face_crop(photo)
    ref, ref_found = data.crop_face(data.load_image(odd_inputs.shipped_photos()[0]))
    assert found and ref_found and crop.shape == (3, 112, 112)
    assert (crop - ref).abs().max() < 1e-4
    big = photo.resize((1000, 1000), Image.BICUBIC)  # detected on a 500 px copy, as the kit does
    crop, found = protect.face_crop(big)
    assert found and (crop - data.crop_face(from_pil(big))[0]).abs().max() < 1e-4
    flat_crop, found = protect.face_crop(Image.new("RGB", (90, 60), (10, 20, 30)))
    assert not found and torch.allclose(flat_crop[:, 0, 0], torch.tensor([10, 20, 30]) / 255, atol=1e-3)


def test_feather_mask_is_smooth_and_in_range():
    m = protect.feather_mask(112)
    assert m.shape == (112, 112) and m.min() > 0 and m.max() == pytest.approx(1)
    assert m[56, 56] == 1 and m[0, 56] < 0.05 and np.allclose(m, m.T) and np.allclose(m, m[::-1])
    assert np.abs(np.diff(m[56])).max() < 0.2  # no seam
    assert protect.feather_mask(1).shape == (1, 1)


def test_protect_image_keeps_eps_and_leaves_the_rest(photo, pert):
    res = protect.protect_image(photo, pert)
    assert res.faces_found and len(res.boxes) == 1
    assert res.image.size == photo.size and res.image.mode == "RGB"
    d = _diff(photo, res.image)
    assert d.max() <= EPS8 and d.max() >= EPS8 - 1  # the budget is used, never exceeded
    assert (d[_outside(d.shape, res.boxes)] == 0).all()
    assert np.asarray(photo).sum() == np.asarray(odd_inputs.shipped_photo(0)).sum()  # input untouched


def test_every_face_of_a_group_photo_is_protected(pert):
    group = Image.new("RGB", (500, 500))
    for i in range(4):
        group.paste(odd_inputs.shipped_photo(i + 1), ((i % 2) * 250, (i // 2) * 250))
    res = protect.protect_image(group, pert)
    assert len(res.boxes) >= 3
    d = _diff(group, res.image)
    assert d.max() <= EPS8 and (d[_outside(d.shape, res.boxes)] == 0).all()
    for x0, y0, s in res.boxes:  # each square got its perturbation
        assert d[max(0, y0):y0 + s, max(0, x0):x0 + s].mean() > 1


def test_overlapping_squares_stay_within_eps(pert, monkeypatch):
    photo = odd_inputs.shipped_photo(3)
    monkeypatch.setattr(protect, "face_boxes", lambda im: [(40, 40, 150), (60, 50, 140), (-30, -20, 120)])
    res = protect.protect_image(photo, pert)
    assert _diff(photo, res.image).max() <= EPS8


def test_no_detect_protects_the_central_square(pert):
    im = odd_inputs.shipped_photo(1).crop((0, 0, 250, 200))
    res = protect.protect_image(im, pert, detect=False)
    assert res.boxes == [(25, 0, 200)] and res.faces_found
    face = odd_inputs.shipped_photo(1).resize((112, 112))
    assert protect.protect_image(face, pert, detect=False).boxes == [(0, 0, 112)]


def test_no_face_gives_the_photo_back(pert):
    flat = Image.new("RGB", (300, 200), (120, 120, 120))
    res = protect.protect_image(flat, pert)
    assert not res.faces_found and res.boxes == [] and _diff(flat, res.image).max() == 0


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "I;16"])
def test_modes_are_kept(photo, pert, mode):
    if mode == "I;16":
        im, levels = Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257), 65535
    else:
        im, levels = photo.convert(mode), 255
    if mode in ("RGBA", "LA"):
        im.putalpha(Image.linear_gradient("L").resize(im.size))
    res = protect.protect_image(im, pert)
    assert res.image.mode == mode and res.image.size == im.size and res.faces_found
    d = _diff(im, res.image).reshape(im.size[1], im.size[0], -1)
    assert d.max() <= np.floor(pert.eps * levels + 1e-6) and d.max() > 0
    assert (d[_outside(d.shape, res.boxes)] == 0).all()
    if mode in ("RGBA", "LA"):
        assert (d[..., -1] == 0).all()  # alpha untouched


def test_palette_with_transparency_comes_back_rgba(photo, pert):
    pal = photo.convert("P", palette=Image.ADAPTIVE, colors=64)
    pal.info["transparency"] = 0
    res = protect.protect_image(pal, pert)
    assert res.image.mode == "RGBA" and res.notes


def test_exif_rotation_is_applied(photo, pert, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    photo.crop((0, 35, 250, 215)).transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as im:
        assert im.size == (180, 250)
        res = protect.protect_image(im, pert)
    assert res.image.size == (250, 180) and res.faces_found
    assert "exif" not in res.image.info


# ---------------------------------------------------------------- files
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
        rows = protect.protect_files([src], tmp_path / f"out{keep}", pert, keep_exif=keep, progress=False)
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
    rows = protect.protect_files([src], tmp_path / "out", pert, progress=False)
    got = {Path(r["output"]).relative_to(tmp_path / "out").as_posix(): r["format"] for r in rows}
    assert got == {"a.png": "PNG", "grey.jpg": "JPEG", "trip/b.webp": "WEBP", "trip/c.tif": "TIFF"}
    with Image.open(tmp_path / "out" / "grey.jpg") as im:
        assert im.mode == "L"
    with Image.open(tmp_path / "out" / "a.png") as im:  # lossless: the eps bound holds in the file
        assert _diff(photo, im).max() <= EPS8


def test_outputs_never_overwrite_inputs(photo, pert, tmp_path):
    photo.save(tmp_path / "me.jpg", quality=95)
    before = data.sha256_file(tmp_path / "me.jpg")
    with pytest.raises(protect.ProtectError, match="overwrite the original"):
        protect.protect_files([tmp_path], tmp_path, pert, progress=False)
    with pytest.raises(protect.ProtectError, match="overwrite the original"):
        protect.protect_files([tmp_path / "me.jpg"], tmp_path, pert, progress=False)
    # an output folder inside the input folder is not scanned as input, twice over
    rows = protect.protect_files([tmp_path], tmp_path / "protected", pert, progress=False)
    rows2 = protect.protect_files([tmp_path], tmp_path / "protected", pert, progress=False)
    assert len(rows) == len(rows2) == 1 and rows2[0]["resumed"]
    assert data.sha256_file(tmp_path / "me.jpg") == before
    assert not (tmp_path / "protected" / "protected").exists()


def test_rerun_resumes_and_redoes_what_changed(photo, pert, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        odd_inputs.shipped_photo(i).save(src / f"p{i}.jpg", quality=95)
    out = tmp_path / "out"
    first = protect.protect_files([src], out, pert, progress=False)
    assert [r["status"] for r in first] == ["protected"] * 3 and not any(r["resumed"] for r in first)
    n_lines = len(protect.read_manifest(out / protect.MANIFEST))
    again = protect.protect_files([src], out, pert, progress=False)
    assert all(r["resumed"] for r in again) and len(protect.read_manifest(out / protect.MANIFEST)) == n_lines
    odd_inputs.shipped_photo(5).save(src / "p1.jpg", quality=95)  # a changed input is done again
    (out / "p2.jpg").unlink()  # so is a deleted output
    third = protect.protect_files([src], out, pert, progress=False)
    assert [r["resumed"] for r in third] == [True, False, False]
    stronger = protect.protect_files([src], out, protect.load_perturbation(strength="high"), progress=False)
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
    real_save, calls = protect._save, []

    def dies_on_the_third(img, f, *args):
        calls.append(1)
        if len(calls) == 3:
            f.write(b"\xff\xd8\xff half a JPEG")
            raise KeyboardInterrupt  # Ctrl-C in the middle of writing
        real_save(img, f, *args)

    monkeypatch.setattr(protect, "_save", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        protect.protect_files([src], out, pert, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["p0.jpg", "p1.jpg", protect.MANIFEST]
    monkeypatch.setattr(protect, "_save", real_save)
    # what a SIGKILL during a write leaves: a temporary file and half a manifest line
    (out / f".p2.jpg{protect.TMP_TAG}4242").write_bytes(b"\xff\xd8 half")
    with open(out / protect.MANIFEST, "a") as f:
        f.write('{"input": "p2.jpg", "sta')
    rows = protect.protect_files([src], out, pert, progress=False)
    assert [r["resumed"] for r in rows] == [True, True, False, False]
    assert sorted(p.name for p in out.iterdir()) == [f"p{i}.jpg" for i in range(4)] + [protect.MANIFEST]
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
    rows = protect.protect_files([src], tmp_path / "skip", pert, progress=False)
    assert [r["status"] for r in rows] == ["no-face", "error", "protected"]
    assert rows[1]["error"] and "\n" not in rows[1]["error"] and not rows[1]["crash"]
    assert not (tmp_path / "skip" / "a_wall.png").exists()
    rows = protect.protect_files([src], tmp_path / "copy", pert, no_face="copy", progress=False)
    assert [r["status"] for r in rows] == ["copied", "error", "protected"]
    with Image.open(tmp_path / "copy" / "a_wall.png") as im:
        assert _diff(im, Image.new("RGB", (300, 200), (120, 120, 120))).max() == 0
    text = protect.summarize(rows)
    assert "1 protected" in text and "1 failed" in text and "b_broken.jpg" in text
    written = [json.loads(line) for line in (tmp_path / "copy" / protect.MANIFEST).read_text().splitlines()]
    assert [r["status"] for r in written] == ["copied", "error", "protected"]


def test_jpeg_quality_is_measured_default_and_lower_warns(photo, pert, tmp_path, caplog):
    photo.save(tmp_path / "me.jpg", quality=95)
    rows = protect.protect_files([tmp_path / "me.jpg"], tmp_path / "out95", pert, progress=False)
    assert rows[0]["settings"]["jpeg_quality"] == protect.DEFAULT_JPEG_QUALITY == 95
    with caplog.at_level(logging.WARNING):
        protect.protect_files([tmp_path / "me.jpg"], tmp_path / "out80", pert, jpeg_quality=80, progress=False)
    assert "below 95" in caplog.text
    with pytest.raises(protect.ProtectError, match="1..100"):
        protect.protect_files([tmp_path / "me.jpg"], tmp_path / "x", pert, jpeg_quality=101, progress=False)


# ---------------------------------------------------------------- the command
def test_cli_protect_exit_codes_and_one_line_errors(photo, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    photo.save(src / "me.jpg", quality=95)
    assert cli.main(["protect", str(src / "me.jpg"), "-o", str(tmp_path / "out"), "-m", "low", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "toap-low" in out and "1 protected" in out
    assert (tmp_path / "out" / "me.jpg").is_file()
    # -d/--directory as in Fawkes
    assert cli.main(["protect", "-d", str(src), "-o", str(tmp_path / "out2"), "-q"]) == 0
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["me.jpg", protect.MANIFEST]
    # runtime problems: exit 1, one line on stderr, no traceback
    for argv in (["protect", str(src), "-o", str(src)],
                 ["protect", str(src), "-o", str(src / "me.jpg")],
                 ["protect", str(src), "-o", str(tmp_path / "o3"), "--perturbation", "nope"]):
        capsys.readouterr()
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("toap: error: ") and err.count("\n") == 1 and "Traceback" not in err
    # a batch with a bad file: the others are done, exit 1, the summary names it
    (src / "bad.jpg").write_bytes(b"garbage")
    assert cli.main(["protect", str(src / "me.jpg"), str(src / "bad.jpg"), "-o", str(tmp_path / "o5"),
                     "--no-progress"]) == 1
    assert "bad.jpg" in capsys.readouterr().out and (tmp_path / "o5" / "me.jpg").is_file()
    # bad arguments: exit 2, one line
    for argv in (["protect", str(src)], ["protect", str(src), "-o", "x", "-m", "ultra"], ["protect", "-o", "x"],
                 ["nope"], []):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error" in err


def test_console_script(photo, tmp_path):
    photo.save(tmp_path / "me.jpg", quality=95)
    exe = Path(sys.executable).parent / "toap"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "toap_kit.cli"]
    ok = subprocess.run(cmd + ["protect", str(tmp_path / "me.jpg"), "-o", str(tmp_path / "out"), "--no-progress"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "1 protected" in ok.stdout and (tmp_path / "out" / "me.jpg").is_file()
    bad = subprocess.run(cmd + ["protect", str(tmp_path / "me.jpg")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


# ---------------------------------------------------------------- verify
def test_verify_clean_copy_is_found_with_tiers(photo, pert):
    rows = verify.verify(photo, photo.copy(), engines=["vgg_dpsh_32", "mobilenet_csq_32"], perturbation="toap-mid")
    assert [r["engine"] for r in rows] == ["vgg_dpsh_32", "mobilenet_csq_32"]
    for r in rows:
        assert r["hamming"] == 0 and r["found_top10_query"] and r["found_top10_database"] and not r["protected"]
        assert r["bits"] == 32 and r["face_found_original"] and r["face_found_uploaded"]
    assert [r["tier"] for r in rows] == ["cnn-teacher-known", "cnn-teacher-known"]  # toap-mid is made on dlib alone
    assert verify.verdict(rows).startswith("NOT PROTECTED")
    assert verify.verify(photo, photo, engines=["vgg_dpsh_32"])[0]["tier"] == "unknown"
    protected = protect.protect_image(photo, pert, detect=True).image
    rows = verify.verify(photo, protected, engines=["vgg_dpsh_32"], perturbation=pert)
    assert rows[0]["hamming"] > 0
    assert verify.verdict([{**rows[0], "protected": True}]).startswith("PROTECTED")
    with pytest.raises(protect.ProtectError, match="unknown engine"):
        verify.verify(photo, photo, engines=["nope"])


def test_rank_is_tie_aware():
    assert verify._rank(np.array([0, 1, 1, 5]), 0, 10) == (1.0, 1.5)
    p, rank = verify._rank(np.array([3] * 30), 3, 10)
    assert p == pytest.approx(10 / 31) and rank == 16
    assert verify._rank(np.array([1] * 12), 2, 10)[0] == 0


def test_cli_verify_json_and_simulate(photo, pert, tmp_path, capsys):
    photo.save(tmp_path / "me.jpg", quality=95)
    assert cli.main(["protect", str(tmp_path / "me.jpg"), "-o", str(tmp_path / "out"), "-q"]) == 0
    assert cli.main(["verify", str(tmp_path / "me.jpg"), str(tmp_path / "out" / "me.jpg"), "--simulate",
                     "facebook", "--engines", "vgg_dpsh_32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["perturbation"] == "toap-mid"  # read from the manifest next to the protected copy
    assert res["simulate"] == "facebook" and res["rows"][0]["tier"] == "cnn-teacher-known"
    assert res["verdict"].split(":")[0] in ("PROTECTED", "NOT PROTECTED", "PARTLY PROTECTED")
    assert cli.main(["verify", str(tmp_path / "me.jpg"), str(tmp_path / "me.jpg"), "--engines", "vgg_dpsh_32"]) == 0
    text = capsys.readouterr().out
    assert "vgg_dpsh_32" in text and "0/32" in text and text.strip().splitlines()[-1].startswith("NOT PROTECTED")
    assert cli.main(["verify", str(tmp_path / "me.jpg"), str(tmp_path / "nope.jpg")]) == 1
    assert capsys.readouterr().err.startswith(f"toap: error: {tmp_path / 'nope.jpg'}: no such file")
    assert cli.main(["verify", str(tmp_path / "me.jpg"), str(tmp_path / "me.jpg"), "--simulate", "myspace"]) == 1
    assert "--simulate myspace" in capsys.readouterr().err


# ---------------------------------------------------------------- the corpus
def test_odd_inputs_corpus(tmp_path):
    r = odd_inputs.run_odd_inputs(tmp_path)
    bad = [c for c in r["cases"] if c["outcome"] not in ("clear_error", "correct")]
    assert not bad, bad
    assert r["files"] >= 40 and r["crashes"] == 0 and r["originals_modified"] == 0 and r["unexpected"] == 0
    assert r["clear_errors"] + r["correct_results"] == r["files"]
    outcome = {c["case"]: c["outcome"] for c in r["cases"]}
    for name in ("empty file", "truncated JPEG", "random bytes named .jpg", "decompression-bomb header",
                 "animated GIF", "missing path", "output folder = input folder"):
        assert outcome[name] == "clear_error", name
    for name in ("PNG named .jpg", "CMYK JPEG", "16-bit greyscale PNG", "palette PNG with transparency", "RGBA PNG",
                 "EXIF-rotated JPEG", "WebP", "TIFF", "many faces (2x2 collage)", "batch killed half-way and rerun",
                 "output folder inside the input folder, run twice"):
        assert outcome[name] == "correct", name
