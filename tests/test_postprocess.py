"""Real post-processing (toap_kit.postprocess) and its differentiable counterparts (diffproc)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from toap_kit import diffproc, postprocess as P

SPECS = ["none", "jpeg:75", "jpeg:75:444", "jpeg:92:420:p", "jpeg:60:422", "jpeg_cv2:80", "jpeg_cv2:80:444",
         "webp:70", "resize:0.5", "resize:0.75:bicubic", "blur:1.0", "noise:0.02:3", "median:3", "crop:0.8",
         "facebook", "weibo", "wechat", "instagram", "twitter", "resize:0.5|jpeg:75"]


@pytest.fixture(scope="module")
def x():
    return torch.rand(2, 3, 17, 23, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("spec", SPECS)
def test_every_operation_keeps_shape_range_dtype_and_input(x, spec):
    before = x.clone()
    y = P.apply(x, spec)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    assert torch.equal(x, before)
    # the real library's output: 8-bit values
    if spec != "none":  # "none" is the exact identity (no 8-bit rounding)
        assert torch.allclose(y * 255, (y * 255).round(), atol=1e-4)
    assert torch.equal(P.apply(x, spec), y)  # deterministic


@pytest.mark.parametrize("spec", ["jpeg:1", "jpeg:100", "jpeg:1:444", "jpeg:100:420", "webp:1", "webp:100",
                                  "jpeg_cv2:1", "jpeg_cv2:100"])
@pytest.mark.parametrize("size", [(17, 23), (112, 112)])
def test_quality_extremes_and_odd_sizes(spec, size):
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1))
    y = P.apply(x, spec)
    assert y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1


def test_quality_100_is_close_and_quality_1_is_far():
    x = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(2)) * 0.5 + 0.25
    assert float(P.psnr(P.jpeg(x, 100, "444"), x)) > float(P.psnr(P.jpeg(x, 1, "444"), x)) + 10


def test_legacy_spec_syntax_and_public_names():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    assert torch.equal(P.apply(x, "none"), x)
    assert torch.equal(P.apply(x, "jpeg:75"), P.jpeg(x, 75))
    assert torch.equal(P.apply(x, "jpeg:75:444"), P.jpeg(x, 75, "444"))
    assert torch.equal(P.apply(x, "JPEG:75"), P.jpeg(x, 75))
    assert torch.equal(P.from_pil(P.to_pil(x[0])), x[0].mul(255).round().div(255))


def test_records_profiles_and_names_agree():
    x = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(4))
    fb = P.profiles()["facebook"]
    by_name, by_profile = P.apply(x, "facebook"), P.apply(x, fb)
    assert torch.equal(by_name, by_profile)
    assert torch.equal(by_name, P.apply(x, {"op": "profile", "name": "facebook"}))
    assert torch.equal(by_name, P.jpeg(x, fb.quality, fb.chroma, fb.progressive))
    assert torch.equal(P.apply(x, {"op": "jpeg", "quality": 75}), P.jpeg(x, 75))
    assert torch.equal(P.apply(x, ["resize:0.5", "jpeg:75"]), P.apply(x, "resize:0.5|jpeg:75"))


def test_pil_images_in_pil_images_out():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (23, 17, 3), dtype=np.uint8))
    for spec in ["jpeg:75", "blur:1", "median:3", "facebook", "noise:0.05"]:
        out = P.apply(im, spec)
        assert isinstance(out, Image.Image) and out.size == im.size and out.mode == "RGB"
    assert np.array_equal(np.asarray(P.apply(im, "jpeg:75")), np.asarray(P.jpeg(P.from_pil(im)[None], 75)[0]
                                                                          .mul(255).round().byte().permute(1, 2, 0)))


def test_resize_max_shrinks_only_large_images():
    x = torch.rand(1, 3, 60, 90)
    assert P.apply(x, "resize_max:45").shape == (1, 3, 30, 45)
    assert torch.equal(P.apply(x, "resize_max:100"), x.mul(255).round().div(255))


@pytest.mark.parametrize("bad, match", [
    ("jpeg:0", "1..100"), ("jpeg:101", "1..100"), ("jpeg:75:411", "chroma"), ("webp:0", "1..100"),
    ("resize:0", "scale"), ("resize:1.5", "scale"), ("blur:0", "sigma"), ("median:4", "odd"),
    ("crop:0", "fraction"), ("myspace", "unknown"), ("jpeg:75:420:p:9", "at most"), ("resize:0.5:magic", "interpolation"),
    ({"op": "jpeg", "qualiti": 75}, "no parameter"), (42, "spec is a string"),
])
def test_bad_specs_raise_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        P.apply(torch.rand(1, 3, 16, 16), bad)


def test_one_pixel_images_are_rejected():
    with pytest.raises(ValueError, match="too small"):
        P.apply(torch.rand(1, 3, 1, 1), "jpeg:75")
    with pytest.raises(ValueError, match="too small"):
        P.apply(Image.new("RGB", (1, 1)), "jpeg:75")
    with pytest.raises(ValueError, match="too small"):
        diffproc.jpeg(torch.rand(1, 3, 1, 5), 75)
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        P.apply(torch.rand(3, 16, 16), "jpeg:75")


def test_noise_is_deterministic_under_its_seed():
    x = torch.full((2, 3, 16, 16), 0.5)
    a, b, c = P.noise(x, 0.05, seed=1), P.noise(x, 0.05, seed=1), P.noise(x, 0.05, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # images of a batch get different noise


def test_a_stored_draw_replays_exactly():
    sampler = P.OpSampler(p_resize=0.5, p_blur=0.5, p_noise=0.5)
    draws = [sampler.sample(np.random.default_rng(s)) for s in range(20)]
    assert draws == [sampler.sample(s) for s in range(20)]  # same seed, same draw
    assert len({json.dumps(d) for d in draws}) > 10
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    for d in draws[:6]:
        stored = json.loads(json.dumps(d))
        assert torch.equal(P.apply(x, stored), P.apply(x, d))
    with pytest.raises(ValueError, match="quality_range"):
        P.OpSampler(quality_range=(90, 50))


def test_profile_records_are_valid():
    profs = P.profiles()
    assert {"facebook", "weibo", "wechat", "instagram", "twitter"} <= set(profs)
    for name, p in profs.items():
        assert p.name == name and p.source and p.encoder in ("pillow", "opencv")
        assert 1 <= p.quality <= 100 and p.chroma in ("444", "422", "420") and p.max_side >= 16
        assert p.calibrated == (name in ("facebook", "weibo", "wechat"))
    with pytest.raises(ValueError, match="encoder"):
        P.Profile("x", 1080, "gimp", 80, "420", False)


def test_calibrated_profiles_land_close_to_the_real_platform_output():
    rows = {r["platform"]: r for r in P.calibrate_profiles()}
    # measured: facebook 46.2 dB, weibo 34.0 dB, wechat 42.8 dB (see profiles.json)
    assert rows["facebook"]["psnr_profile_vs_real"] > 45
    assert rows["wechat"]["psnr_profile_vs_real"] > 42
    assert rows["weibo"]["psnr_profile_vs_real"] > 33.5
    for r in rows.values():
        assert r["psnr_profile_vs_real"] > r["psnr_original_vs_real"]


def test_straight_through_is_real_forward_identity_backward():
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(6), requires_grad=True)
    y = P.straight_through(x, "jpeg:50")
    assert torch.equal(y.detach(), P.jpeg(x.detach(), 50))
    w = torch.randn_like(x)
    (y * w).sum().backward()
    assert torch.equal(x.grad, w)
    m = P.StraightThrough("facebook")
    assert torch.equal(m(x).detach(), P.apply(x.detach(), "facebook"))
    with pytest.raises(ValueError, match="size-preserving"):
        P.straight_through(x, "resize_max:10")


@pytest.mark.parametrize("size", [(17, 23), (112, 112)])
@pytest.mark.parametrize("spec", ["jpeg:1", "jpeg:100", "jpeg:75", "resize:0.5", "blur:1.0", "noise:0.02", "facebook"])
def test_differentiable_ops_have_finite_gradients(size, spec):
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(7), requires_grad=True)
    y = diffproc.apply(x, spec)
    assert y.shape == x.shape and float(y.detach().min()) >= 0 and float(y.detach().max()) <= 1
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0


def test_differentiable_jpeg_is_kornia_clamped_and_close_to_real():
    import kornia

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    q = torch.tensor([75.0])
    assert torch.equal(diffproc.jpeg(x, 75), kornia.enhance.jpeg_codec_differentiable(x, q).clamp(0, 1))
    faces = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear")  # smooth image
    assert float(P.psnr(diffproc.jpeg(faces, 90), P.jpeg(faces, 90)).mean()) > 30
    with pytest.raises(ValueError, match="1..100"):
        diffproc.jpeg(x, 0)
    with pytest.raises(ValueError, match="no differentiable counterpart"):
        diffproc.apply(x, "median:3")
