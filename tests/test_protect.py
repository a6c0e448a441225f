"""``toap protect`` / ``toap verify``: one photo (toap_kit.protect), the command (toap_kit.cli)
and the corpus of bad and odd inputs; files and folders (toap_kit.batch) are tests/test_batch.py."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from toap_kit import batch, cli, data, odd_inputs, protect, verify
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
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["me.jpg", batch.MANIFEST]
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
    assert r["files"] >= 65 and r["clear_errors"] + r["correct_results"] == r["files"]
    assert r["crashes"] == r["hangs"] == r["silently_wrong"] == r["unexpected"] == r["originals_modified"] == 0
    outcome = {c["case"]: c["outcome"] for c in r["cases"]}
    for name in ("empty file", "truncated JPEG", "random bytes named .jpg", "decompression-bomb header",
                 "animated GIF", "missing path", "output folder = input folder", "FIFO given as the input file",
                 "loop of links named .jpg", "manifest is a FIFO"):
        assert outcome[name] == "clear_error", name
    for name in ("PNG named .jpg", "CMYK JPEG", "16-bit greyscale PNG", "16-bit RGB PNG", "16-bit RGBA PNG",
                 "palette PNG with transparency", "RGBA PNG", "EXIF-rotated JPEG", "WebP", "TIFF",
                 "many faces (2x2 collage)", "batch killed half-way and rerun",
                 "output folder inside the input folder, run twice", "FIFO inside a folder",
                 "photo path too long for the system", "folder path too long to list",
                 "output folder moved, then rerun",
                 "same folders typed two ways (relative, then absolute)", "two concurrent runs on one output folder",
                 "manifest of random bytes", "manifest of a line 42"):
        assert outcome[name] == "correct", name
