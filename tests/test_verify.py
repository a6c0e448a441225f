"""``toap verify`` gives a verdict only on a pair that shows the same photo (toap_kit.verify's
photo check; issue 28, item 7). The engines' rows are tests/test_protect.py."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from toap_kit import cli, odd_inputs, postprocess, protect, verify
from toap_kit.data import DATA_DIR

ENGINE = ["--engines", "vgg_dpsh_32"]  # one cheap engine: the photo check does not depend on it


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return odd_inputs.shipped_photo(0)


@pytest.fixture(scope="module")
def protected(photo) -> Image.Image:
    return protect.protect_image(photo, protect.load_perturbation("toap-high")).image  # the largest eps


def _wide(photo: Image.Image) -> Image.Image:
    """A 1600x900 photo with the face in the middle (as bench._photo makes them)."""
    canvas = photo.resize((1600, 900), Image.BICUBIC)
    canvas.paste(photo.resize((900, 900), Image.BICUBIC), (350, 0))
    return canvas


@pytest.mark.parametrize("profile", ["jpeg:95", *postprocess.profiles(), "resize:0.25", "jpeg:50", "crop:0.8"])
def test_a_protected_copy_after_a_platform_is_the_same_photo(photo, protected, profile):
    check = verify.same_photo(photo, postprocess.apply(protected, profile))
    assert check["same_photo"] and check["similarity"] >= verify.SAME_PHOTO_MIN and check["turned"] is None


def test_a_square_thumbnail_of_a_wide_photo_is_the_same_photo(photo):
    wide = _wide(photo)
    wide_protected = protect.protect_image(wide, protect.load_perturbation("toap-mid")).image
    square = postprocess.apply(wide_protected.crop((350, 0, 1250, 900)).resize((400, 400), Image.BICUBIC), "facebook")
    assert verify.same_photo(wide, square)["same_photo"]
    assert not verify.same_photo(wide, wide_protected.crop((0, 0, 900, 900)))["same_photo"]  # not a central crop


@pytest.mark.parametrize("turn, words", [(Image.Transpose.ROTATE_180, "rotated 180 degrees"),
                                         (Image.Transpose.ROTATE_90, "rotated 90 degrees counter-clockwise"),
                                         (Image.Transpose.FLIP_LEFT_RIGHT, "mirrored left to right"),
                                         (Image.Transpose.FLIP_TOP_BOTTOM, "mirrored top to bottom")])
def test_a_turned_or_mirrored_copy_is_not_the_same_photo(photo, protected, turn, words):
    for im in (photo, postprocess.apply(protected, "facebook")):
        check = verify.same_photo(photo, im.transpose(turn))
        assert not check["same_photo"] and check["similarity"] < verify.SAME_PHOTO_MIN
        assert check["turned"] == words


def test_another_person_or_another_photo_is_not_the_same_photo(photo):
    others = [odd_inputs.shipped_photo(i) for i in range(1, 6)]
    bill = Image.open(DATA_DIR / "lfw158" / "Bill_Clinton" / "01.jpg").convert("RGB")
    own = sorted((DATA_DIR / "lfw158" / odd_inputs.shipped_photos()[0].parent.name).glob("*.jpg"))
    for im in [*others, bill, *(Image.open(p).convert("RGB") for p in own)]:  # another person; the same person
        check = verify.same_photo(photo, im)
        assert not check["same_photo"] and check["turned"] is None


def test_verdict_is_not_comparable_without_the_same_photo(photo):
    rows = verify.verify(photo, photo.transpose(Image.Transpose.ROTATE_180), engines=["vgg_dpsh_32"])
    assert rows[0]["same_photo"] is False and rows[0]["photo_similarity"] < verify.SAME_PHOTO_MIN
    v = verify.verdict([{**r, "protected": True} for r in rows])  # whatever the engines say
    assert v.startswith("NOT COMPARABLE: the two photos do not show the same photo") and "180 degrees" in v
    same = verify.verify(photo, photo, engines=["vgg_dpsh_32"])
    assert same[0]["same_photo"] is True and verify.verdict(same).startswith("NOT PROTECTED")


def _verify_json(capsys, original, uploaded, *more) -> tuple[int, dict]:
    code = cli.main(["verify", str(original), str(uploaded), *ENGINE, "--json", *more])
    return code, json.loads(capsys.readouterr().out)


def test_cli_two_people_is_not_comparable(photo, tmp_path, capsys):
    """``toap verify a.jpg Bill_Clinton/01.jpg`` said "PROTECTED: none of the 8 engines..."."""
    photo.save(tmp_path / "a.jpg", quality=95)
    code, res = _verify_json(capsys, tmp_path / "a.jpg", DATA_DIR / "lfw158" / "Bill_Clinton" / "01.jpg")
    assert code == 3 and res["verdict"].startswith("NOT COMPARABLE")
    assert res["photo_check"]["same_photo"] is False
    assert res["photo_check"]["similarity"] < res["photo_check"]["threshold"] == verify.SAME_PHOTO_MIN
    assert cli.main(["verify", str(tmp_path / "a.jpg"), str(DATA_DIR / "lfw158" / "Bill_Clinton" / "01.jpg"),
                     *ENGINE]) == 3
    out = capsys.readouterr().out
    assert "photo check: NOT the same photo" in out and out.strip().splitlines()[-1].startswith("NOT COMPARABLE")


def test_cli_rotated_original_is_not_comparable(photo, tmp_path, capsys):
    """The unprotected original rotated 180 degrees said "PROTECTED"."""
    photo.save(tmp_path / "a.jpg", quality=95)
    photo.transpose(Image.Transpose.ROTATE_180).save(tmp_path / "turned.jpg", quality=95)
    code, res = _verify_json(capsys, tmp_path / "a.jpg", tmp_path / "turned.jpg")
    assert code == 3 and res["verdict"].startswith("NOT COMPARABLE") and "rotated 180 degrees" in res["verdict"]
    assert res["photo_check"]["turned"] == "rotated 180 degrees"


def test_cli_protected_copy_through_a_platform_gets_its_verdict(photo, tmp_path, capsys):
    photo.save(tmp_path / "me.jpg", quality=95)
    assert cli.main(["protect", str(tmp_path / "me.jpg"), "-o", str(tmp_path / "out"), "-q"]) == 0
    for extra in (["--simulate", "facebook"], ["--simulate", "instagram"]):
        code, res = _verify_json(capsys, tmp_path / "me.jpg", tmp_path / "out" / "me.jpg", *extra)
        assert code == 0 and res["photo_check"]["same_photo"] is True
        assert res["verdict"].split(":")[0] in ("PROTECTED", "NOT PROTECTED", "PARTLY PROTECTED")
    postprocess.apply(Image.open(tmp_path / "out" / "me.jpg"), "wechat").save(tmp_path / "served.jpg", quality=90)
    code, res = _verify_json(capsys, tmp_path / "me.jpg", tmp_path / "served.jpg")  # a copy downloaded back
    assert code == 0 and res["photo_check"]["similarity"] >= verify.SAME_PHOTO_MIN
