import numpy as np
import pytest
import torch

from toap_kit import hashing
from toap_kit.models import BACKBONES, build_model


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_model_shapes_any_input_size_and_codes(backbone):
    torch.manual_seed(0)
    m = build_model(backbone, bits=16, input_size=32)
    for size in (32, 57, 112):
        u = m(torch.rand(2, 3, size, size))
        assert u.shape == (2, 16) and torch.isfinite(u).all()
    m.train()
    codes = m.encode(torch.rand(3, 3, 40, 40))
    assert set(codes.unique().tolist()) <= {-1.0, 1.0}
    assert m.training, "encode() restores the model's mode"


def test_model_rejects_bad_input():
    m = build_model("vgg", bits=8, input_size=32)
    with pytest.raises(ValueError, match="at least 32x32"):
        m(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        m(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="backbone"):
        build_model("transformer", bits=8)


def test_objectives_finite_gradients_and_ignore_unlabelled():
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, -1, -1])
    for name in hashing.OBJECTIVES:
        loss_fn = hashing.make_objective(name, bits=16, n_classes=4)
        u = torch.randn(6, 16, requires_grad=True)
        loss = loss_fn(u, labels)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(u.grad).all(), name
        # unlabelled rows get no gradient from the supervised pair / centre terms
        u2 = u.detach().clone().requires_grad_()
        if name != "dpsh":  # DPSH's quantisation term touches every row by design
            loss_fn(u2, labels).backward()
            assert u2.grad[4:].abs().sum() == 0, name
    with pytest.raises(ValueError, match="objective"):
        hashing.make_objective("triplet", 16, 4)


def test_dpsh_prefers_codes_that_agree_with_labels():
    labels = torch.tensor([0, 0, 1, 1])
    good = torch.tensor([[3.0, 3], [3, 3], [-3, -3], [-3, -3]])
    assert hashing.dpsh_loss(good, labels) < hashing.dpsh_loss(good.flip(0)[[0, 2, 1, 3]], labels)


def test_csq_centres_are_distinct_and_balanced():
    loss = hashing.CSQLoss(bits=32, n_classes=60)
    c = loss.centres
    assert c.shape == (60, 32)
    assert len({tuple(r.tolist()) for r in c}) == 60


def test_itq_codes_and_quantisation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 24)).astype(np.float32)
    itq = hashing.ITQ(8).fit(x)
    b = itq.encode(x)
    assert b.shape == (300, 8) and set(np.unique(b)) <= {-1.0, 1.0}
    with pytest.raises(ValueError, match="exceeds"):
        hashing.ITQ(32).fit(x)
    # the rotation is orthogonal, and the iterations lower the quantisation error ||B - VR||^2
    # below that of the random rotation they start from
    assert np.allclose(itq.rotation.T @ itq.rotation, np.eye(8), atol=1e-6)
    v = (x - itq.mean) @ itq.pca

    def error(r):
        return np.square(np.where(v @ r >= 0, 1.0, -1.0) - v @ r).sum()

    start = hashing.ITQ(8, iters=0).fit(x).rotation
    assert error(itq.rotation) < error(start)


def test_distill_loss_zero_when_student_copies_teacher_and_bounded():
    torch.manual_seed(0)
    t = torch.randn(6, 16)
    # tanh is linear near 0, so small u = t/1000 has the teacher's pairwise cosines
    assert float(hashing.distill_loss(t * 1e-3, t * 3, t)) < 1e-5
    assert float(hashing.distill_loss(t * 50, t * 3, t)) > 1e-3  # tanh(50 t) ~ sign(t): other cosines
    u, e = torch.randn(6, 8), torch.randn(6, 16)
    value = float(hashing.distill_loss(u, e, t))
    assert 0 < value <= 6


def test_trainer_learns_a_toy_problem_and_is_deterministic():
    # two "identities": dark and bright images; a few epochs must separate their codes
    g = torch.Generator().manual_seed(0)
    dark = torch.rand(24, 3, 32, 32, generator=g) * 0.3
    bright = 0.7 + torch.rand(24, 3, 32, 32, generator=g) * 0.3
    x = torch.cat([dark, bright])
    y = torch.cat([torch.zeros(24), torch.ones(24)]).long()
    cfg = hashing.TrainConfig(epochs=8, batch_size=16, identities_per_batch=2, images_per_identity=8,
                              lr=1e-2, seed=0)

    def fit():
        torch.manual_seed(0)
        m = build_model("vgg", bits=8, input_size=32, width=8)
        hist = hashing.train_hash_model(m, x, y, None, hashing.dpsh_loss, cfg, progress=False)
        return m, hist

    m1, h1 = fit()
    m2, h2 = fit()
    assert [r["loss"] for r in h1] == [r["loss"] for r in h2], "same seed, same run"
    codes = m1.encode(x)
    same = (codes[:24] @ codes[:24].T).mean()
    cross = (codes[:24] @ codes[24:].T).mean()
    assert same > cross
    assert not m1.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trainer_on_cuda_returns_a_cpu_model_that_encodes_cpu_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 32, 32, generator=g)
    y = torch.arange(4).repeat_interleave(4)
    m = build_model("resnet", bits=8, input_size=32, width=8)
    cfg = hashing.TrainConfig(epochs=1, batch_size=8, identities_per_batch=2, images_per_identity=4)
    hashing.train_hash_model(m, x, y, torch.randn(16, 128), hashing.dpsh_loss, cfg, progress=False,
                             validate=lambda net: float(net.encode(x).mean()), device="cuda")
    assert next(m.parameters()).device.type == "cpu"
    assert m.encode(x).shape == (16, 8)


def test_batches_hold_positive_pairs_and_cover_labelled_images():
    labels = torch.cat([torch.arange(10).repeat_interleave(6), torch.full((50,), -1)])
    cfg = hashing.TrainConfig(batch_size=32, identities_per_batch=4, images_per_identity=3)
    batches = hashing._batches(labels, cfg, torch.Generator().manual_seed(0))
    covered = torch.cat(batches)
    assert set(torch.nonzero(labels >= 0).flatten().tolist()) <= set(covered.tolist())
    for b in batches:
        lab = labels[b][labels[b] >= 0]
        assert len(lab) > len(lab.unique()), "each batch has same-identity pairs"
