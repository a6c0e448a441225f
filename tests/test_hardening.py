"""Odd and bad inputs at the kit's entry points (issue 12, section 6): each class of failure the
user study found is either handled correctly or refused with a clear error naming the culprit."""
import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from toap_kit import data, demo, postprocess as P, store, zoo
from toap_kit.engine import DISPLAY, Engine
from toap_kit.perturbation import Perturbation

EPS = 8 / 255


@pytest.fixture(scope="module")
def engine():
    return Engine()


@pytest.fixture(scope="module")
def small_model(engine):
    return engine.models[0]  # a small hash CNN: encoding its database takes seconds


# ------------------------------------------------------------------ images read from files
def test_16_bit_png_is_scaled_not_saturated(tmp_path):
    grey = np.array([[0, 16384, 32768, 65535]] * 4, dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    x = data.load_image(tmp_path / "grey16.png")
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0], torch.tensor(grey[0] / 65535, dtype=torch.float32).expand(3, 4), atol=1e-6)
    mid = data.load_image(tmp_path / "grey16.png", size=8)
    assert mid.shape == (3, 8, 8) and 0 <= float(mid.min()) and float(mid.max()) <= 1
    assert 0.3 < float(mid.mean()) < 0.6, "a mid-grey 16-bit image must not load as white"

    rgb = np.zeros((6, 6, 3), np.uint16)
    rgb[..., 0], rgb[..., 1] = 65535, 32768  # R full, G half, B zero
    assert cv2.imwrite(str(tmp_path / "rgb16.png"), rgb[:, :, ::-1].copy())
    y = data.load_image(tmp_path / "rgb16.png")
    assert torch.allclose(y.mean((1, 2)), torch.tensor([1.0, 0.5, 0.0]), atol=1 / 255)


def test_float_tiff_in_unit_range_loads_and_others_are_refused(tmp_path):
    f = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(f).save(tmp_path / "unit.tif")
    assert Image.open(tmp_path / "unit.tif").mode == "F"
    x = data.load_image(tmp_path / "unit.tif")
    assert torch.allclose(x[1], torch.from_numpy(f), atol=1e-6), "a [0, 1] float TIFF must not load black"
    assert data.load_image(tmp_path / "unit.tif", size=4).shape == (3, 4, 4)

    Image.fromarray(f * 255).save(tmp_path / "bytes.tif")
    with pytest.raises(ValueError, match=r"bytes\.tif.*\[0, 1\]"):
        data.load_image(tmp_path / "bytes.tif")
    g = f.copy()
    g[2, 3] = np.nan
    Image.fromarray(g).save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match=r"nan\.tif.*NaN"):
        data.load_image(tmp_path / "nan.tif")

    # a float RGB TIFF Pillow cannot open is read through OpenCV
    rgb = np.stack([f, 1 - f, np.full_like(f, 0.25)], axis=2)
    assert cv2.imwrite(str(tmp_path / "rgbf.tif"), rgb[:, :, ::-1].copy())
    z = data.load_image(tmp_path / "rgbf.tif")
    assert torch.allclose(z, torch.from_numpy(rgb).permute(2, 0, 1), atol=1e-6)


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high: left half red, right half blue
    a[:, :20, 0], a[:, 20:, 2] = 255, 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display", what phones write for portrait shots
    (tmp_path / "ann").mkdir()
    Image.fromarray(a).save(tmp_path / "ann" / "phone.jpg", exif=exif, quality=95, subsampling=0)
    x = data.load_image(tmp_path / "ann" / "phone.jpg")
    assert x.shape == (3, 40, 20), "the photo must come out upright (portrait)"
    assert float(x[0, :20].mean()) > 0.9 and float(x[2, 20:].mean()) > 0.9  # red on top, blue below
    fs = data.load_folder(tmp_path, size=16)
    assert float(fs.images[0, 0, :8].mean()) > 0.9 and float(fs.images[0, 2, 8:].mean()) > 0.9


def test_decompression_bomb_is_a_value_error_naming_the_file(tmp_path, monkeypatch):
    (tmp_path / "bob").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "bob" / "warn.png")  # 1,600 px: Pillow warns
    Image.new("RGB", (50, 50)).save(tmp_path / "huge.png")  # 2,500 px: Pillow refuses
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"huge\.png.*too large"):
        data.load_image(tmp_path / "huge.png")
    with pytest.raises(ValueError, match=r"warn\.png.*too large"):
        data.load_image(tmp_path / "bob" / "warn.png")
    with pytest.raises(ValueError, match=r"warn\.png"):
        data.load_folder(tmp_path)


def test_a_directory_named_like_an_image_is_called_a_directory(tmp_path):
    (tmp_path / "x.jpg").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        data.load_image(tmp_path / "x.jpg")
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "folder.jpg").mkdir()
    Image.new("RGB", (30, 30), (200, 10, 10)).save(tmp_path / "ann" / "0.png")
    fs = data.load_folder(tmp_path, size=16)
    assert fs.paths == ["ann/0.png"], "folders are not images"


# ------------------------------------------------------------------ pixels handed over as tensors
BAD_PIXELS = [
    (torch.full((3, 32, 32), float("nan")), ValueError, "NaN"),
    (torch.full((3, 32, 32), float("inf")), ValueError, "NaN or infinite"),
    (torch.full((3, 32, 32), 1.5), ValueError, r"\[0, 1\]"),
    (torch.full((3, 32, 32), -0.1), ValueError, r"\[0, 1\]"),
    (torch.full((3, 32, 32), 128.0), ValueError, "divide by 255"),
    (torch.full((3, 32, 32), 128, dtype=torch.uint8), TypeError, "uint8"),
    (torch.rand(4, 32, 32), ValueError, "3 x H x W"),
    (np.random.rand(3, 32, 32), TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("bad, error, match", BAD_PIXELS)
def test_check_pixels_refuses_bad_pixels(bad, error, match):
    with pytest.raises(error, match=match):
        data.check_pixels(bad, "photo")


def test_check_pixels_converts_float64_and_keeps_good_pixels():
    x = torch.rand(3, 8, 8, dtype=torch.float64)
    y = data.check_pixels(x)
    assert y.dtype == torch.float32 and torch.allclose(y.double(), x, atol=1e-7)
    z = torch.rand(2, 3, 8, 8)
    assert data.check_pixels(z) is z  # float32 in range: the same tensor, not a copy
    edge = torch.ones(3, 8, 8) + 1e-7  # rounding slack is tolerated
    assert data.check_pixels(edge) is edge
    with pytest.raises(ValueError, match="3 x H x W"):
        data.check_pixels(z, ndim=(3,))


@pytest.mark.parametrize("bad, error, match", BAD_PIXELS[:6])
def test_entry_points_refuse_bad_pixels(bad, error, match, engine, small_model):
    p = Perturbation(torch.zeros(3, 32, 32), EPS)
    for call in (p.apply, data.crop_face, data.face_box, lambda im: engine.search(im, small_model)):
        with pytest.raises(error, match=match):
            call(bad)
    with pytest.raises(error, match=match):
        p.apply(bad[None])


def test_float64_query_is_searched_like_float32(engine, small_model):
    image, name = engine.query(5)
    a = engine.search(image, small_model, identity=name)
    b = engine.search(image.double(), small_model, identity=name)
    assert a == b


def test_perturbation_refuses_a_non_finite_delta():
    for bad in (float("nan"), float("inf")):
        delta = torch.zeros(3, 16, 16)
        delta[1, 2, 3] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            Perturbation(delta, EPS)
    with pytest.raises(ValueError, match="eps"):
        Perturbation(torch.zeros(3, 16, 16), float("nan"))
    with pytest.raises(TypeError, match="float"):
        Perturbation(torch.zeros(3, 16, 16, dtype=torch.uint8), EPS)


# ------------------------------------------------------------------ perturbation and zoo files
def test_a_mistyped_perturbation_path_is_not_replaced_by_the_shipped_one(tmp_path):
    assert "toap-mid" in Perturbation.shipped()
    assert Perturbation.load("toap-mid").card["eps"] > 0  # a bare name: the shipped one
    for wrong in (tmp_path / "toap-mid", str(tmp_path / "toap-mid"), "toap-mid.json", "somewhere/toap-mid"):
        with pytest.raises(FileNotFoundError, match="toap-mid"):
            Perturbation.load(wrong)


def _saved(tmp_path) -> Perturbation:
    p = Perturbation(torch.zeros(3, 8, 8), EPS, {"method": "test"})
    p.save(tmp_path / "p")
    return p


def test_broken_perturbation_files_are_named(tmp_path):
    _saved(tmp_path)
    card = json.loads((tmp_path / "p.json").read_text())
    (tmp_path / "p.json").write_text('{"eps": 0.03, "sha256": ')
    with pytest.raises(ValueError, match=r"p\.json.*not valid JSON"):
        Perturbation.load(tmp_path / "p")
    (tmp_path / "p.json").write_text(json.dumps({k: v for k, v in card.items() if k != "eps"}))
    with pytest.raises(ValueError, match=r"p\.json.*eps"):
        Perturbation.load(tmp_path / "p")
    (tmp_path / "p.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"p\.json.*JSON object"):
        Perturbation.load(tmp_path / "p")
    # a tensor file that is not safetensors, with a card that matches its bytes
    (tmp_path / "p.safetensors").write_bytes(b"not a safetensors file at all")
    (tmp_path / "p.json").write_text(json.dumps({**card, "sha256": data.sha256_file(tmp_path / "p.safetensors")}))
    with pytest.raises(ValueError, match=r"p\.safetensors"):
        Perturbation.load(tmp_path / "p")
    with pytest.raises(ValueError, match=r"p\.safetensors.*no sha256"):
        store.load_checked(tmp_path / "p.safetensors", None)


def test_broken_zoo_cards_are_named(tmp_path):
    (tmp_path / "m.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"m\.json"):
        zoo.card("m", tmp_path)
    (tmp_path / "m.json").write_text(json.dumps({"role": "victim", "backbone": "vgg"}))
    with pytest.raises(ValueError, match=r"m\.json.*sha256"):
        zoo.load("m", tmp_path)


# ------------------------------------------------------------------ post-processing specs
def test_flags_accept_only_known_words():
    assert P.parse("jpeg:75:420:p")[0]["progressive"] is True
    assert P.parse("jpeg:75:420:baseline")[0]["progressive"] is False
    assert P.parse({"op": "jpeg", "progressive": 0})[0]["progressive"] is False
    for bad in ("jpeg:75:420:maybe", {"op": "jpeg", "quality": 75, "progressive": "maybe"}):
        with pytest.raises(ValueError, match=r"maybe.*progressive must be one of|progressive must be one of.*maybe"):
            P.parse(bad)


@pytest.mark.parametrize("bad, match", [
    ("blur:inf", "finite"), ("blur:nan", "finite"), ("jpeg:1e999", "finite"), ("noise:0.01:-1", "seed"),
    ("noise:0.01:1.5", "seed"), ("resize:-1", "scale"), ("resize_max:-1", "max_side"),
    ("resize_max:1080.5", "whole number"), ("median:3.5", "odd"), ("crop:nan", "fraction"),
    ({"op": "jpeg", "quality": None}, "quality"), ({"op": "jpeg", "quality": "high"}, "quality"),
    ({"op": "jpeg", "subsampling": None}, "chroma"), ({"op": "noise", "sigma": 0.01, "seed": None}, "seed"),
    ({"op": "blur", "sigma": "wide"}, "sigma"), ({"op": "resize", "scale": None}, "scale"),
    ({"op": "resize", "interpolation": None}, "interpolation"), ({"op": "median", "size": True}, "odd"),
    ({"op": None}, "unknown operation"), ({"op": "profile", "name": "fb", "max_side": None}, "profile"),
    ({"op": "profile", "name": "x", "max_side": None, "encoder": "pillow", "quality": 80, "chroma": "420",
      "progressive": None}, "progressive"),
])
def test_bad_arguments_and_records_are_value_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        P.parse(bad)
    with pytest.raises(ValueError, match=match):
        P.apply(torch.rand(1, 3, 16, 16), bad)


def test_the_operations_themselves_check_their_arguments():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="finite"):
        P.blur(x, float("inf"))
    with pytest.raises(ValueError, match="seed"):
        P.noise(x, 0.01, seed=-1)
    with pytest.raises(ValueError, match="progressive"):
        P.jpeg(x, 75, "420", progressive="maybe")
    big_seed = 2**70 + 1  # integers are kept exactly (no float round trip)
    assert P.parse({"op": "noise", "seed": big_seed})[0]["seed"] == big_seed
    assert P.parse(f"noise:0.01:{big_seed}")[0]["seed"] == big_seed


def test_huge_kernels_are_refused_at_once_and_the_largest_allowed_run():
    x = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    for bad in ("blur:100000", f"blur:{P.BLUR_MAX_SIGMA * 1.01}", "median:1001", "median:99",
                f"median:{P.MEDIAN_MAX_SIZE + 2}"):
        t = time.perf_counter()
        with pytest.raises(ValueError, match="sigma|median size"):
            P.apply(x, bad)
        assert time.perf_counter() - t < 1, f"{bad} must be refused, not run"
    for ok in (f"blur:{P.BLUR_MAX_SIGMA}", f"median:{P.MEDIAN_MAX_SIZE}"):
        y = P.apply(x, ok)
        assert y.shape == x.shape and not torch.equal(y, x)


# ------------------------------------------------------------------ the demo
def test_query_numbers_must_be_whole(engine, small_model):
    image, name = engine.query(2.0)
    assert torch.equal(image, engine.query(2)[0]) and name == engine.query(np.int64(2))[1]
    for bad in (2.5, float("nan"), True, "2", None):
        with pytest.raises(ValueError, match="whole number"):
            engine.query(bad)
    with pytest.raises(ValueError, match="whole number"):
        demo.search_shipped(engine, 2.5, small_model)


def test_upload_without_a_photo_says_so(engine, small_model):
    with pytest.raises(ValueError, match="no photo"):
        demo.search_upload(engine, None, small_model)
    with pytest.raises(ValueError, match="PIL image"):
        demo.search_upload(engine, np.zeros((64, 64, 3), np.uint8), small_model)


def test_large_uploads_are_shrunk_before_cropping(engine, small_model, monkeypatch):
    seen = []

    def spy(image, size=112):
        seen.append(tuple(image.shape))
        return data.crop_face(image, size)

    monkeypatch.setattr(demo, "crop_face", spy)
    photo = Image.open(data.DATA_DIR / "photos250" / "Bill_Clinton" / "01.jpg").convert("RGB")
    big = photo.resize((4000, 3000), Image.BICUBIC)  # 12 MP
    shown, gallery, summary = demo.search_upload(engine, big, small_model)
    assert seen[-1] == (3, 1500, 2000) and max(seen[-1]) <= demo.UPLOAD_MAX_SIDE
    assert shown.size == (DISPLAY, DISPLAY) and len(gallery) == 10
    assert demo.NO_FACE not in summary, "the face must still be found after shrinking"
    demo.search_upload(engine, photo, small_model)
    assert seen[-1] == (3, 250, 250), "small photos are not resized"


def test_gradio_callbacks_turn_bad_uploads_into_readable_errors(engine, small_model, monkeypatch):
    import gradio as gr

    monkeypatch.setattr(engine, "default_model", small_model)  # build_demo encodes only this one
    app = demo.build_demo(engine)
    fns = {f.api_name: f.fn for f in app.fns.values() if f.api_name}
    with pytest.raises(gr.Error, match="Upload a photo"):
        fns["search_upload"](None, small_model)
    with pytest.raises(gr.Error, match="cannot be searched.*too small"):
        fns["search_upload"](Image.new("RGB", (8, 8)), small_model)
    with pytest.raises(gr.Error, match="whole number"):
        fns["search_shipped"](2.5, small_model)


def test_demo_app_launches_without_sharing_and_with_an_upload_limit(monkeypatch):
    import inspect

    import gradio as gr

    assert {"share", "max_file_size"} <= set(inspect.signature(gr.Blocks.launch).parameters)
    calls = []

    class FakeApp:
        def launch(self, **kwargs):
            cache = Path(os.environ["GRADIO_TEMP_DIR"])  # Gradio's cache: the server's own folder
            assert cache.is_dir() and cache.name.startswith("toap-demo-gradio-")
            (cache / "upload.jpg").write_bytes(b"x")
            calls.append({**kwargs, "cache": cache})

        def close(self):
            calls.append("closed")

    monkeypatch.setattr(demo, "build_demo", lambda: FakeApp())
    monkeypatch.setattr(sys, "argv", ["demo_app.py", "--port", "7999"])
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    on_term = signal.getsignal(signal.SIGTERM)
    try:
        runpy.run_path(str(data.DATA_DIR.parent / "demo_app.py"), run_name="__main__")
        # SIGTERM stops it like Ctrl-C, so that Gradio and the page delete their files (issue 19, item 11)
        assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, on_term)
    assert calls[0]["share"] is False and calls[0]["server_port"] == 7999
    assert calls[0]["max_file_size"] == demo.MAX_UPLOAD == "20mb"
    assert calls[1:] == ["closed"], "closed once launch returns, so that Gradio deletes its files"
    # its own cache folder is deleted whole at exit, with the empty files Gradio leaves per upload
    assert not calls[0]["cache"].exists() and "GRADIO_TEMP_DIR" not in os.environ


def test_demo_server_answers_parallel_requests_and_leaves_no_file():
    """The real server (``demo_app.py``) under 2 parallel *Protect and search* requests through
    gradio_client: none fails (each request writes its own files; issue 19, item 10), and once it
    is stopped with SIGTERM nothing is left in its temporary folder: results, uploads and the
    empty files Gradio's upload parser leaves (item 11)."""
    from toap_kit import bench

    r = bench.bench_demo_load(requests=2)
    assert r["failed"] == 0, r["errors"]
    assert r["stopped_with"] == 0, "the server stops cleanly on SIGTERM"
    assert r["leftover_files"] == 0, f"files left after the server stopped: {r['leftover_where']}"
