import pytest
import torch

from toap_kit import attacks, evaluate
from toap_kit.data import RetrievalSets
from toap_kit.models import build_model
from toap_kit.perturbation import Perturbation

EPS = 8 / 255


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return build_model("vgg", bits=16, input_size=32, width=8).eval()


@pytest.fixture()
def images():
    return torch.rand(6, 3, 40, 40, generator=torch.Generator().manual_seed(1))


def test_pgd_eps_ball_range_inputs_untouched_mode_restored(model, images):
    model.train()
    before = images.clone()
    delta = attacks.pgd(model, images, eps=EPS, alpha=2 / 255, steps=5)
    assert delta.shape == images.shape
    assert float(delta.abs().max()) <= EPS + 1e-7
    adv = images + delta
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    assert torch.equal(images, before), "input not modified"
    assert model.training, "model mode restored"
    # deterministic under the seed
    assert torch.equal(delta, attacks.pgd(model, images, eps=EPS, steps=5))


def test_pgd_flips_bits_of_a_shipped_model():
    from toap_kit import data, zoo

    m = zoo.load(zoo.surrogates()[0])
    faces = data.load_faceset("lfw158", 112).images[:8]
    clean = m.encode(faces)
    delta = attacks.pgd(m, faces, eps=EPS, alpha=1 / 255, steps=10)
    assert (m.encode(faces + delta) != clean).float().mean() > 0.2


def test_mode_restored_on_error(model, images):
    model.train()

    def broken(u, t):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        attacks.pgd(model, images, steps=1, objective=broken)
    assert model.training


def test_pgd_rejects_bad_input(model, images):
    with pytest.raises(ValueError, match="eps"):
        attacks.pgd(model, images, eps=8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attacks.pgd(model, images * 255)


def test_universal_perturbation_ball_determinism_and_mode(model, images):
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    anchors = [attacks.anchor_codes(model, images, labels)]
    assert set(anchors[0]) == {0, 1, 2}
    model.train()
    kw = dict(eps=EPS, steps=15, batch_size=4, lr=5e-3, size=48, seed=3, progress=False)
    d1 = attacks.universal_perturbation([model], images, labels, anchors, **kw)
    d2 = attacks.universal_perturbation([model], images, labels, anchors, **kw)
    assert d1.shape == (3, 48, 48) and float(d1.abs().max()) <= EPS + 1e-7
    assert torch.equal(d1, d2)
    assert model.training
    with pytest.raises(ValueError, match="anchor table"):
        attacks.universal_perturbation([model, model], images, labels, anchors, steps=1)


def test_margin_loss_zero_past_margin():
    t = torch.tensor([[1.0, -1.0]])
    assert attacks.margin_loss(torch.tensor([[-3.0, 3.0]]), t, margin=2) == 0
    assert attacks.margin_loss(torch.tensor([[3.0, -3.0]]), t, margin=2) == pytest.approx(5.0)


def test_perturbation_round_trip_and_tamper(tmp_path, images):
    delta = (torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1) * EPS
    p = Perturbation(delta, EPS, {"method": "test", "seed": 0})
    p.save(tmp_path / "p")
    q = Perturbation.load(tmp_path / "p")
    assert torch.equal(q.delta, p.delta) and q.eps == EPS and q.card["method"] == "test"
    out = q.apply(images)
    assert out.shape == images.shape and float((out - images).abs().max()) <= EPS + 1e-6
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    raw = bytearray((tmp_path / "p.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "p.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256"):
        Perturbation.load(tmp_path / "p")
    with pytest.raises(FileNotFoundError):
        Perturbation.load(tmp_path / "nothing")
    with pytest.raises(ValueError, match="exceeds eps"):
        Perturbation(delta * 2, EPS)


class ProjectionHash(torch.nn.Module):
    """A toy hash model with content-sensitive codes: random projection of 4x4 mean colours."""

    def __init__(self, bits=16):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(48, bits, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        f = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return (f - 0.5) @ self.w

    @torch.no_grad()
    def encode(self, x):
        return torch.where(self(x) >= 0, 1.0, -1.0)


def _toy_sets():
    # 2 identities, 1 query each; database: 2 photos each + 2 distractors
    g = torch.Generator().manual_seed(0)
    base = torch.rand(2, 3, 32, 32, generator=g)
    q = base.clone()
    db = torch.cat([base, base, torch.rand(2, 3, 32, 32, generator=g)])
    return RetrievalSets(q, torch.tensor([0, 1]), db, torch.tensor([0, 1, 0, 1, -1, -2]),
                         torch.tensor([0, 1, 2, 3, -1, -2]))


def test_evaluate_identity_protection_changes_nothing():
    model, sets = ProjectionHash(), _toy_sets()
    for setting in ("query", "database"):
        r = evaluate.evaluate_protection(model, lambda x: x.clone(), sets, setting)
        assert r.map_after == r.map_clean and r.rel_drop == 0 and r.bits_flipped == 0
        assert r.linf == 0 and r.ssim == pytest.approx(1.0)
    # queries identical to their database copies rank them first: mAP 1, none anti-retrieved
    assert r.map_clean == pytest.approx(1.0) and r.anti_retrieval == 0


def test_evaluate_a_protection_that_replaces_the_face():
    model, sets = ProjectionHash(), _toy_sets()
    noise = lambda x: torch.rand(x.shape, generator=torch.Generator().manual_seed(5))
    r = evaluate.evaluate_protection(model, noise, sets, "query")
    assert r.map_clean == pytest.approx(1.0) and r.map_after < 1 and r.bits_flipped > 0.2
    assert r.rel_drop == pytest.approx(1 - r.map_after) and r.psnr < 20
    with pytest.raises(ValueError, match="setting"):
        evaluate.evaluate_protection(model, noise, sets, "both")


def test_evaluator_reused_across_protections_matches_fresh_evaluations():
    model, sets = ProjectionHash(), _toy_sets()
    ev = evaluate.Evaluator(model, sets)
    protections = [lambda x: x.clone(), lambda x: (x + 0.3).clamp(0, 1), lambda x: 1 - x]
    for setting in ("query", "database"):
        for post in ("none", "jpeg:50"):
            for protect in protections:
                assert ev(protect, setting, post) == evaluate.evaluate_protection(model, protect, sets, setting, post)


def test_psnr_hand_computed():
    a = torch.zeros(1, 3, 4, 4)
    assert evaluate.psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-4)


def test_variation_pattern_fields(model, images):
    delta = attacks.pgd(model, images, eps=EPS, steps=5)
    stats = evaluate.variation_pattern(model, images, images + delta, post="jpeg:50")
    assert 0 <= stats["flip_back"] <= 1 and 0 <= stats["flipped"] <= 1
    assert len(stats["flip_back_per_bit"]) == 16
    assert stats["shrink_clean"] > 0
