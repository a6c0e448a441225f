"""Per-photo refinement and the dlib-first universal delta (toap_kit.refine), the device switch,
and the refinement through ``toap protect --refine``."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from toap_kit import batch, cli, config, postprocess, protect, recognizers, refine, toap, zoo
from toap_kit.data import DATA_DIR, load_faceset, make_protocol
from toap_kit.perturbation import feather_mask
from toap_kit.recognizers import RecognizerHash

PHOTO = DATA_DIR / "photos250" / "George_W_Bush" / "01.jpg"


@pytest.fixture(scope="module")
def faces():
    f = load_faceset("lfw158", 112)
    ev = make_protocol(f).queries[:4]  # evaluation identities: no model or perturbation saw them
    return f.images[ev]


@pytest.fixture(scope="module")
def rec():
    return refine.KnownRecognizer("cpu")


def test_landmark_chip_reproduces_dlibs_own_chip(faces):
    import dlib

    from toap_kit import teacher

    thetas = recognizers.landmark_thetas(faces)
    grid = torch.nn.functional.affine_grid(thetas, [len(faces), 3, 150, 150], align_corners=False)
    ours = torch.nn.functional.grid_sample(faces * 255, grid, align_corners=False, padding_mode="zeros")
    r = teacher.Recognizer()
    for i, x in enumerate(faces):
        img = np.ascontiguousarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        chip = dlib.get_face_chip(img, r._landmarks(img), size=150, padding=0.25).astype(np.float32)
        diff = np.abs(ours[i].permute(1, 2, 0).numpy() - chip)
        assert np.median(diff) < 1.0 and diff.mean() < 2.0, (i, diff.mean())  # dlib truncates, we interpolate


def test_refined_deltas_keep_the_budget_the_floor_and_the_feather(faces, rec):
    d = refine.refine_deltas(faces, "mid", steps=3, recognizer=rec)
    cfg = refine.strength_config("mid")
    assert d.shape == faces.shape and float(d.abs().max()) <= cfg.eps + 1e-6
    rms = d.pow(2).mean(dim=(1, 2, 3)).sqrt()
    assert bool((rms <= 10 ** (-cfg.psnr_floor / 20) + 1e-6).all()) and float(rms.min()) > 0
    assert float(d[..., 0, :].abs().max()) < 0.1 * cfg.eps, "the feathered edge adds almost nothing"
    out = refine.refine_faces(faces, "mid", steps=3, recognizer=rec)
    assert torch.equal(out, ((faces + d).clamp(0, 1) * 255).round() / 255)
    assert float(postprocess.psnr(out, faces).min()) > cfg.psnr_floor - 0.5  # 8-bit rounding costs a little


def test_refinement_is_deterministic_per_seed(faces, rec):
    a = refine.refine_deltas(faces[:2], "low", steps=2, seed=3, recognizer=rec)
    b = refine.refine_deltas(faces[:2], "low", steps=2, seed=3, recognizer=rec)
    c = refine.refine_deltas(faces[:2], "low", steps=2, seed=4, recognizer=rec)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_refinement_moves_dlibs_descriptor_and_the_engines_codes(faces, rec):
    """A guard, not a benchmark: 40 steps move each descriptor far more than random noise of
    the same budget does (toward dlib's same-person distance, 0.6), and flip far more of
    dlib_itq_64's bits (a victim the refinement never used) than that noise."""
    x = faces[:2]
    prot = refine.refine_faces(x, "mid", steps=40, recognizer=rec)
    gen = torch.Generator().manual_seed(0)
    noise = (x + 8 / 255 * torch.where(torch.rand(x.shape, generator=gen) < 0.5, -1.0, 1.0)).clamp(0, 1)
    with torch.no_grad():
        th = recognizers.landmark_thetas(x)
        e0 = rec.embed(x, th, True)
        dist, noise_dist = ((rec.embed(y, th, True) - e0).norm(dim=1) for y in (prot, noise))
    assert bool((dist > 0.45).all() and (dist > 3 * noise_dist).all()), (dist, noise_dist)
    engine = zoo.load("dlib_itq_64")
    assert isinstance(engine, RecognizerHash)
    flips = float((engine.encode(prot) != engine.encode(x)).float().mean())
    noise_flips = float((engine.encode(noise) != engine.encode(x)).float().mean())
    assert flips > 0.2 and flips > 3 * noise_flips, (flips, noise_flips)


def test_bad_inputs_get_clear_errors(faces, rec):
    with pytest.raises(ValueError, match="unknown strength"):
        refine.strength_config("max")
    with pytest.raises(ValueError, match="steps must be"):
        refine.refine_deltas(faces, steps=-1, recognizer=rec)
    with pytest.raises(ValueError, match="square"):
        refine.refine_deltas(faces[:, :, :100], recognizer=rec)
    with pytest.raises(TypeError, match="uint8"):
        refine.refine_deltas((faces * 255).to(torch.uint8), recognizer=rec)
    with pytest.raises(ValueError, match="p_none"):
        refine.RefineConfig(p_none=0.9, p_jpeg=0.5)
    with pytest.raises(ValueError, match="init must have"):
        refine.refine_deltas(faces, steps=1, recognizer=rec, init=torch.zeros(1, 3, 112, 112))
    assert refine.refine_deltas(faces[:0], steps=1, recognizer=rec).shape == (0, 3, 112, 112)


def test_config_for_an_eps_between_the_strengths():
    assert refine.config_for(8 / 255).psnr_floor == refine.STRENGTHS["mid"][1]
    assert refine.config_for(16 / 255).psnr_floor == pytest.approx(refine.STRENGTHS["mid"][1] - 20 * np.log10(2))


def test_the_refinement_and_the_dlib_first_ladder_are_known_backbone():
    assert toap.threat_tier([toap.DLIB_DESCRIPTOR], "dlib_itq_32") == "engine-known-backbone"
    assert toap.threat_tier([toap.DLIB_DESCRIPTOR], "vgg_csq_64") == "cnn-teacher-known"
    for name in protect.STRENGTHS.values():
        card = protect.load_perturbation(name).card
        assert card["method"] == "dlib-first" and card["surrogates"] == [toap.DLIB_DESCRIPTOR]


def test_fit_universal_makes_one_delta_for_everybody(faces, rec):
    cfg = refine.RefineConfig(eps=4 / 255, psnr_floor=38.0, steps=3, batch_size=2)
    p = refine.fit_universal(faces, torch.tensor([0, 0, 1, 1]), cfg, progress=False, recognizer=rec)
    assert p.delta.shape == (3, 112, 112) and p.eps == cfg.eps and float(p.delta.abs().max()) <= cfg.eps + 1e-6
    assert float(p.delta.pow(2).mean().sqrt()) <= 10 ** (-38 / 20) + 1e-6
    assert p.card["method"] == "dlib-first" and p.card["config"]["steps"] == 3
    with pytest.raises(ValueError, match="one label per face"):
        refine.fit_universal(faces, torch.tensor([0]), cfg, recognizer=rec)


def test_device_switch(monkeypatch):
    monkeypatch.setenv("TOAP_DEVICE", "cpu")
    assert config.device() == torch.device("cpu")
    monkeypatch.setenv("TOAP_DEVICE", "warp-drive")
    with pytest.raises(ValueError, match="not a torch device"):
        config.device()
    if not torch.cuda.is_available():
        monkeypatch.setenv("TOAP_DEVICE", "cuda")
        with pytest.raises(ValueError, match="no CUDA"):
            config.device()
        monkeypatch.delenv("TOAP_DEVICE")
        assert config.device() == torch.device("cpu")


# a bad TOAP_DEVICE on this (CPU) machine: (value, CUDA devices torch pretends to see, the reason given)
BAD_DEVICES = [("bogus", 0, "is not a torch device"), ("cuda", 0, "no CUDA device"),
               ("cuda:1", 0, "no CUDA device"), ("cuda:7", 1, "only 1 CUDA device here"),
               ("cuda:2", 2, "only 2 CUDA devices here"), ("meta", 0, "runs on cpu, cuda or mps")]


def _pretend_cuda(monkeypatch, value: str, n_cuda: int) -> None:
    monkeypatch.setenv("TOAP_DEVICE", value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n_cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n_cuda)


@pytest.mark.parametrize("value, n_cuda, reason", BAD_DEVICES)
def test_a_bad_device_is_refused_with_its_reason(monkeypatch, value, n_cuda, reason):
    _pretend_cuda(monkeypatch, value, n_cuda)
    with pytest.raises(ValueError, match=reason):
        config.device()
    with pytest.raises(ValueError, match=reason):
        config.setup(0)  # every notebook's first call
    monkeypatch.setenv("TOAP_DEVICE", "cuda:0")
    if n_cuda:
        assert config.device() == torch.device("cuda:0")


def _no_photo_read(*args, **kwargs):
    raise AssertionError("a photo was read although TOAP_DEVICE is bad")


@pytest.mark.parametrize("value, n_cuda, reason", BAD_DEVICES[::2])
@pytest.mark.parametrize("command", ["protect --refine", "protect", "verify", "crawl", "search"])
def test_every_command_refuses_a_bad_device_up_front(tmp_path, capsys, monkeypatch, command, value, n_cuda,
                                                     reason):
    """Issue 28 item 6: once, before any photo is read, one line and exit 1 (with or without
    --refine; it was an internal error with a traceback per photo, or silently ignored)."""
    from toap_kit import crawl

    photo = tmp_path / "me.jpg"
    Image.open(PHOTO).save(photo)
    monkeypatch.setattr(protect, "open_photo", _no_photo_read)
    monkeypatch.setattr(crawl, "crawl_folder", _no_photo_read)
    monkeypatch.setattr(crawl, "search_photo", _no_photo_read)
    _pretend_cuda(monkeypatch, value, n_cuda)
    out, index = tmp_path / "out", f"faiss://{tmp_path / 'faces.faiss'}"
    argv = {"protect --refine": ["protect", str(photo), "-o", str(out), "--refine", "1"],
            "protect": ["protect", str(photo), "-o", str(out)], "verify": ["verify", str(photo), str(photo)],
            "crawl": ["crawl", str(tmp_path), "--index", index], "search": ["search", str(photo), "--index", index]}
    assert cli.main(argv[command] + ["--no-progress"] * command.startswith("protect")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"toap: error: TOAP_DEVICE={value!r}") and reason in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["me.jpg"]


def test_cpu_threads_follow_the_environment_and_the_idle_cores(monkeypatch):
    """Issue 28 item 11: torch's default (every CPU) made --refine 8-20x slower on a busy 2-core
    machine; a command uses the idle physical cores (TOAP_THREADS or OMP_NUM_THREADS decide when set)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("TOAP_THREADS", "3")
    assert config.cpu_threads() == 3
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv("TOAP_THREADS", bad)
        with pytest.raises(ValueError, match=f"TOAP_THREADS={bad!r}"):
            config.cpu_threads()
    monkeypatch.delenv("TOAP_THREADS")
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(config, "_physical_cores", lambda: 4)  # 4 cores, 2 hyper-threads each
    for load, threads in ((0.0, 4), (0.4, 4), (1.2, 3), (3.0, 1), (9.5, 1)):
        monkeypatch.setattr(config.os, "getloadavg", lambda: (load, 0.0, 0.0))
        assert config.cpu_threads() == threads, f"load {load}"
    monkeypatch.setattr(config, "_physical_cores", lambda: None)  # not known: the usable CPUs
    monkeypatch.setattr(config.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert config.cpu_threads() == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert config.cpu_threads() == torch.get_num_threads()  # torch read OMP_NUM_THREADS itself


def test_a_command_runs_on_the_chosen_threads_and_leaves_torch_as_it_was(tmp_path, capsys, monkeypatch):
    before = torch.get_num_threads()
    seen = []

    def opened(path):
        seen.append(torch.get_num_threads())
        raise protect.ProtectError("stop here")

    monkeypatch.setattr(batch, "open_photo", opened)
    photo = tmp_path / "me.jpg"
    Image.open(PHOTO).save(photo)
    want = 1 if before > 1 else 2
    monkeypatch.setenv("TOAP_THREADS", str(want))
    assert cli.main(["protect", str(photo), "-o", str(tmp_path / "out"), "--no-progress"]) == 1
    assert seen == [want] and torch.get_num_threads() == before
    capsys.readouterr()
    monkeypatch.setenv("TOAP_THREADS", "many")
    assert cli.main(["protect", str(photo), "-o", str(tmp_path / "out2"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err == "toap: error: TOAP_THREADS='many' is not a whole number >= 1\n" and len(seen) == 1
    assert not (tmp_path / "out2").exists()


def test_protect_files_and_the_demo_refuse_a_bad_device_up_front(tmp_path, monkeypatch):
    from toap_kit import demo

    photo = tmp_path / "me.jpg"
    Image.open(PHOTO).save(photo)
    monkeypatch.setattr(batch, "open_photo", _no_photo_read)
    _pretend_cuda(monkeypatch, "cuda:7", 1)
    with pytest.raises(protect.ProtectError, match="only 1 CUDA device"):
        batch.protect_files([photo], tmp_path / "out", protect.load_perturbation(), refine_steps=0, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="only 1 CUDA device"):
        demo.build_demo(engine=_StubEngine())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (the CPU path is tested above)")
def test_refinement_on_cuda_matches_the_cpu_budget(faces):
    d = refine.refine_deltas(faces[:2], "mid", steps=2, recognizer=refine.KnownRecognizer("cuda"))
    assert d.device.type == "cpu" and float(d.abs().max()) <= 8 / 255 + 1e-6


# ------------------------------------------------------------------ through toap protect
def test_protect_image_refines_every_face_within_eps(rec):
    photo = Image.open(PHOTO).convert("RGB")
    p = protect.load_perturbation("toap-mid")
    universal = protect.protect_image(photo, p)
    refined = protect.protect_image(photo, p, refine_steps=3, recognizer=rec)
    assert refined.boxes == universal.boxes and refined.faces_found
    a, u, r = (np.asarray(im, np.int16) for im in (photo, universal.image, refined.image))
    assert np.abs(r - a).max() <= 8 and (r != u).any()
    x0, y0, s = refined.boxes[0]
    outside = np.ones(a.shape[:2], bool)
    outside[max(0, y0):y0 + s, max(0, x0):x0 + s] = False
    assert (r[outside] == a[outside]).all(), "pixels outside the face squares are untouched"
    assert feather_mask(s)[0, 0] < 0.05


def test_cli_refine_writes_resumes_and_records_its_steps(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.open(PHOTO).save(src / "me.jpg")
    out = tmp_path / "out"
    assert cli.main(["protect", str(src), "-o", str(out), "--refine", "2", "--no-progress"]) == 0
    assert "refined for 2 steps" in capsys.readouterr().out
    row = json.loads((out / batch.MANIFEST).read_text().splitlines()[-1])
    assert row["status"] == "protected" and row["settings"]["refine_steps"] == 2
    assert cli.main(["protect", str(src), "-o", str(out), "--refine", "2", "--no-progress"]) == 0
    assert "already done by an earlier run" in capsys.readouterr().out  # bad STEPS: tests/test_cli_args.py


def test_refine_loads_dlibs_network_only_once_a_face_needs_it(tmp_path, monkeypatch, capsys):
    """Issue 28 item 11: a photo without a face costs no network load (it took 20 s); a folder
    loads it once, on its first face."""
    loads = []
    real = recognizers.load
    monkeypatch.setattr(recognizers, "load", lambda name: loads.append(name) or real(name))
    refine._known_on.cache_clear()  # loaded by an earlier test of this process: load afresh
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (300, 200), (120, 120, 120)).save(src / "a-wall.png")
    args = ["--refine", "1", "--no-progress"]
    assert cli.main(["protect", str(src / "a-wall.png"), "-o", str(tmp_path / "out1"), *args]) == 0
    assert "left out (no face found)" in capsys.readouterr().out
    assert loads == [], "a photo without a face loaded dlib's network"
    for name in ("b-me.jpg", "c-me-too.jpg"):
        Image.open(PHOTO).save(src / name)
    assert cli.main(["protect", str(src), "-o", str(tmp_path / "out2"), *args]) == 0
    assert "2 protected (2 faces)" in capsys.readouterr().out
    assert loads == ["dlib"], "loaded once for the folder"


def test_the_own_layer_is_fitted_once_and_then_read_back(tmp_path, monkeypatch):
    """Issue 28 item 11: fitting it (every lfw158 face read, ITQ) was most of a --refine
    process's start; the cached layer is the fitted one, and a damaged cache file is fitted again."""
    monkeypatch.setattr(refine, "OWN_LAYER_CACHE", tmp_path / "cache")
    refine._own_layer.cache_clear()
    fitted = refine._own_layer()
    (cached,) = (tmp_path / "cache").iterdir()
    refine._own_layer.cache_clear()
    monkeypatch.setattr(refine, "load_faceset", lambda *a, **k: pytest.fail("fitted again although cached"))
    assert all(torch.equal(a, b) for a, b in zip(refine._own_layer(), fitted))
    monkeypatch.undo()
    monkeypatch.setattr(refine, "OWN_LAYER_CACHE", tmp_path / "cache")
    cached.write_bytes(b"not an npz file")
    refine._own_layer.cache_clear()
    assert all(torch.equal(a, b) for a, b in zip(refine._own_layer(), fitted))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cached.name]
    refine._own_layer.cache_clear()  # later tests read the real cache again


def test_refinement_works_under_a_callers_no_grad(faces, rec):
    with torch.no_grad():
        d = refine.refine_deltas(faces[:1], "mid", steps=2, recognizer=rec)
        p = refine.fit_universal(faces[:2], torch.tensor([0, 1]), refine.RefineConfig(steps=2, batch_size=2),
                                 progress=False, recognizer=rec)
    assert float(d.abs().max()) > 0 and float(p.delta.abs().max()) > 0


# ------------------------------------------------------------------ group photos (issue 28 item 1)
def _group(sizes: list[int], cols: int, cell: int) -> Image.Image:
    """Shipped faces (the middle 150 px of each 250 px photo) pasted at ``sizes`` into a grid."""
    from toap_kit.odd_inputs import shipped_photo, shipped_photos

    canvas = Image.new("RGB", (cols * cell, -(-len(sizes) // cols) * cell), (90, 100, 110))
    for i, s in enumerate(sizes):
        face = shipped_photo(i % len(shipped_photos())).crop((50, 50, 200, 200)).resize((s, s), Image.BICUBIC)
        canvas.paste(face, ((i % cols) * cell + (cell - s) // 2, (i // cols) * cell + (cell - s) // 2))
    return canvas


GROUPS = {1: ([150], 1, 170), 2: ([150, 100], 2, 160), 3: ([160, 120, 90], 3, 170),
          30: ([60 + 2 * (i % 20) for i in range(30)], 6, 100)}


@pytest.mark.parametrize("n", sorted(GROUPS))
def test_group_photos_with_faces_of_any_sizes_are_refined(n, rec):
    photo = _group(*GROUPS[n])
    boxes = protect.face_boxes(photo)
    assert len(boxes) == n, "the detector finds every pasted face"
    assert len({s for _, _, s in boxes}) >= min(n, 3), "the squares differ in size"
    p = protect.load_perturbation("toap-mid")
    res = protect.protect_image(photo, p, refine_steps=1, recognizer=rec)
    assert res.boxes == boxes and res.faces_found
    universal = np.asarray(protect.protect_image(photo, p).image, np.int16)
    a, r = np.asarray(photo, np.int16), np.asarray(res.image, np.int16)
    d = np.abs(r - a)
    assert d.max() <= 8, "|delta| <= eps"
    outside = np.ones(a.shape[:2], bool)
    for x0, y0, s in boxes:
        square = (slice(max(0, y0), y0 + s), slice(max(0, x0), x0 + s))
        outside[square] = False
        assert d[square].mean() > 1, f"the face square {(x0, y0, s)} is protected"
        assert (r[square] != universal[square]).any(), f"the face square {(x0, y0, s)} got its own delta"
    assert (d[outside] == 0).all()


class _StubEngine:
    """The demo's search engine reduced to one fixed answer (loading the real one's 2,775 faces
    takes a minute): the test below is about the demo's protection step."""

    models, default_model = ["vgg_csq_64"], "vgg_csq_64"

    def search(self, image, model_name, k=10, identity=None):
        from toap_kit.engine import SearchResult

        return SearchResult([0], [0], ["Somebody"], None)


def test_the_demo_refines_a_group_photo(rec, monkeypatch):
    from toap_kit import demo

    monkeypatch.setattr(refine, "DEFAULT_STEPS", 1)  # the demo's steps, read at call time: kept cheap
    monkeypatch.setattr(refine, "known_recognizer", lambda device=None, against=("dlib",): rec)
    photo = _group(*GROUPS[3])
    res = demo.protect_and_search(_StubEngine(), photo, "mid", "vgg_csq_64", "none", refine=True)
    assert res.refined and len(res.faces) == 3 and res.notes[0].startswith("3 faces found: all protected")
    assert np.abs(np.asarray(res.protected, np.int16) - np.asarray(photo, np.int16)).max() <= 8


def test_the_refinements_adam_is_torchs_adam():
    torch.manual_seed(0)
    a = torch.randn(2, 3, 8, 8, requires_grad=True)
    b, start = a.detach().clone().requires_grad_(True), a.detach().clone()
    ours, theirs = refine.Adam(a, lr=0.01), torch.optim.Adam([b], lr=0.01)
    for t in range(20):
        g = torch.randn_like(a) * (t + 1)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert (a - b).abs().max() <= 1e-7 and (a - start).abs().max() > 0.1  # the same steps, and they moved it
