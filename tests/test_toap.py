"""TOAP (toap_kit.toap): parameter checks, tiers, the objectives, and a small real fit."""
from __future__ import annotations

import pytest
import torch

from toap_kit import cg, recognizers, toap, zoo
from toap_kit.data import load_faceset, make_protocol
from toap_kit.perturbation import Perturbation


@pytest.fixture(scope="module")
def faces():
    f = load_faceset("lfw158", 112)
    train = make_protocol(f).train
    return f.images[train[:48]], f.labels[train[:48]]


@pytest.fixture(scope="module")
def vgg():
    return zoo.load("vgg_dpsh_32")


@pytest.mark.parametrize("bad", [{"eps": 0}, {"eps": 2.0}, {"margin": -1}, {"p_none": 0.5, "p_real": 0.4, "p_cg": 0.3},
                                 {"cg": False, "alternate": True}, {"batch_size": 1}, {"recrop": 0.7},
                                 {"psnr_floor": float("nan")}, {"resize_range": (0.9, 0.5)}, {"w_feature": -1}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        toap.TOAPConfig(**bad)


def test_constructor_checks(vgg):
    with pytest.raises(ValueError, match="surrogate"):
        toap.TOAP([])
    with pytest.raises(ValueError, match="victims are never used"):
        toap.load_surrogates(["mobilenet_csq_32"])
    with pytest.raises(ValueError, match="weights"):
        toap.TOAP({"vgg_dpsh_32": vgg}, weights={"resnet_dpsh_16": 2.0})


def test_threat_tiers():
    cnn = ["vgg_dpsh_32", "resnet_hashnet_32", "resnet_dpsh_16"]
    assert toap.threat_tier(cnn, "vgg_dpsh_32") == "whitebox"
    assert toap.threat_tier(cnn, "mobilenet_csq_32") == "cnn-blackbox"
    assert toap.threat_tier(cnn, "dlib_itq_64") == "engine-blackbox"
    assert toap.threat_tier(cnn + [toap.DLIB_SURROGATE], "dlib_itq_32") == "engine-known-backbone"
    assert toap.threat_tier(cnn + [toap.DLIB_SURROGATE], "mobilenet_csq_32") == "cnn-teacher-known"
    assert toap.threat_tier([], "dlib_itq_32") == "engine-blackbox"


def test_objectives_by_hand():
    c = torch.tensor([[1.0, -1.0]])
    # both bits 2 units past the wrong side: margin 1 is met -> 0; on the right side -> margin + |u|
    assert float(toap.margin_term(torch.tensor([[-2.0, 2.0]]), c, 1.0, 1.0)) == 0
    assert float(toap.margin_term(torch.tensor([[1.0, -1.0]]), c, 1.0, 1.0)) == pytest.approx(2.0)
    assert float(toap.margin_term(torch.tensor([[2.0, -2.0]]), c, 2.0, 1.0)) == pytest.approx(2.0)  # scale
    u = torch.randn(5, 8)
    assert float(toap.consistency_term(u, u, 1.0)) == pytest.approx(0, abs=1e-6)
    assert float(toap.consistency_term(u, -u, 1.0)) > 0.1
    e = torch.randn(4, 16)
    assert float(toap.feature_term(e, e)) == pytest.approx(1.0)
    assert float(toap.feature_term(-e, e)) == pytest.approx(-1.0)


def test_fit_small(faces, vgg):
    x, y = faces
    vgg.train()
    start = {k: v.clone() for k, v in cg.load().state_dict().items()}
    kw = dict(rounds=2, steps_per_round=3, batch_size=4, cg_steps=2, seed=3, progress=False)
    attack = toap.TOAP({"vgg_dpsh_32": vgg}, **kw)
    p = attack.fit(x, y, val_faces=x[:8], data="test split")
    assert isinstance(p, Perturbation) and tuple(p.delta.shape) == (3, 112, 112)
    assert float(p.delta.abs().max()) <= p.eps + 1e-7
    assert float(p.delta.pow(2).mean().sqrt()) <= 10 ** (-attack.config.psnr_floor / 20) + 1e-6
    assert p.card["surrogates"] == ["vgg_dpsh_32"] and p.card["config"]["rounds"] == 2 and p.card["data"] == "test split"
    assert vgg.training and all(q.requires_grad for q in vgg.parameters())  # modes restored
    kinds = [h["kind"] for h in attack.history]
    assert kinds.count("step") == 6 and kinds.count("val") == 2 and kinds.count("cg") == 1
    with pytest.raises(TypeError):
        attack.history[0]["kind"] = "x"  # read-only
    assert attack.cg is not None and any(not torch.equal(v, start[k]) for k, v in attack.cg.state_dict().items())
    assert all(torch.equal(v, start[k]) for k, v in cg.load().state_dict().items())  # the shipped CG is untouched
    again = toap.TOAP({"vgg_dpsh_32": vgg}, **kw).fit(x, y, val_faces=x[:8], data="test split")
    assert torch.equal(again.delta, p.delta)  # deterministic under the seed
    vgg.eval()


def test_fit_flips_bits_beyond_noise(faces, vgg):
    """30 white-box steps flip clearly more of the surrogate's bits than sign noise of the
    same eps does (a fit that learned nothing fails this)."""
    x, y = faces
    p = toap.TOAP({"vgg_dpsh_32": vgg}, rounds=1, steps_per_round=30, batch_size=8, cg=False, alternate=False,
                  meta=False, diversity=False, progress=False).fit(x, y)
    clean = vgg.encode(x)
    flipped = float((vgg.encode(p.apply(x)) != clean).float().mean())
    noise = (x + p.eps * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))).clamp(0, 1)
    assert flipped > 2 * float((vgg.encode(noise) != clean).float().mean()) and flipped > 0.15


def test_shipped_perturbations_and_their_tiers():
    names = Perturbation.shipped()
    assert {"uap-mid-cnn", "toap-mid-cnn"} <= set(names)
    for n in names:
        p = Perturbation.load(n)
        own = {toap.own_descriptor(n) for n in recognizers.NAMES}  # a real network's descriptor (the ensembles)
        assert p.card["surrogates"] and all(s in zoo.surrogates() or s in toap.KNOWN_BACKBONE or s in own
                                            for s in p.card["surrogates"])
    assert toap.threat_tier(Perturbation.load("toap-mid-cnn").card["surrogates"], "dlib_itq_64") == "engine-blackbox"
    if "toap-mid" in names:
        assert toap.threat_tier(Perturbation.load("toap-mid").card["surrogates"], "dlib_itq_64") == "engine-known-backbone"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (TOAP.fit's CPU path is tested above)")
def test_fit_on_cuda_returns_a_cpu_perturbation_and_leaves_the_models_where_they_were():
    from toap_kit import data as data_

    faces = data_.load_faceset("lfw158", 112)
    x, y = faces.images[:16], faces.labels[:16]
    models = {"vgg_dpsh_32": zoo.load("vgg_dpsh_32")}
    attack = toap.TOAP(models, progress=False, device="cuda", rounds=1, steps_per_round=2, batch_size=4, cg=False,
                       alternate=False, meta=False)
    p = attack.fit(x, y)
    assert p.delta.device.type == "cpu" and p.card["device"].startswith("cuda")
    assert next(models["vgg_dpsh_32"].parameters()).device.type == "cpu"


def test_one_tier_vocabulary():
    """Issue 20: the five tier ids, their labels and one-line words come from one place."""
    assert tuple(toap.TIER_LABELS) == tuple(toap.TIER_WORDS) == toap.TIERS
    assert len(set(toap.TIER_LABELS.values())) == len(toap.TIERS)
    assert all(isinstance(w, str) and w for w in toap.TIER_WORDS.values())
    assert {toap.threat_tier(s, v) for s, v in ((["vgg_dpsh_32"], "vgg_dpsh_32"), (["vgg_dpsh_32"], "vgg_csq_64"),
                                                 (["vgg_dpsh_32"], "dlib_itq_32"), ([toap.DLIB_SURROGATE], "dlib_itq_64"),
                                                 ([toap.DLIB_DESCRIPTOR], "vgg_csq_64"))} == set(toap.TIERS)


def test_meta_gradient_is_the_train_gradient_plus_the_test_gradient_after_one_clipped_sign_step():
    gen = torch.Generator().manual_seed(0)
    delta = 0.03 * torch.randn(1, 3, 4, 4, generator=gen)
    a, b = torch.randn(1, 3, 4, 4, generator=gen), torch.randn(1, 3, 4, 4, generator=gen)
    seen = {}

    def test_loss(d):
        seen["at"] = d.detach().clone()
        return (b * d.pow(3)).sum()

    before = delta.clone()
    g = toap.meta_gradient(delta, lambda d: (d - a).pow(2).sum(), test_loss, inner_alpha=0.05, eps=0.04)
    g_train = 2 * (delta - a)
    inner = (delta - 0.05 * g_train.sign()).clamp(-0.04, 0.04)
    assert torch.equal(delta, before) and torch.allclose(seen["at"], inner)  # the test loss is read at delta'
    assert torch.allclose(g, g_train + 3 * b * inner.pow(2), atol=1e-6)
    assert (inner.abs() == 0.04).any(), "the case reaches the clip"
