"""The variation pattern: what real post-processing does to pre-sign outputs, and to a drop."""
import math

import pytest
import torch

from toap_kit import evaluate, postprocess
from toap_kit.data import RetrievalSets
from toap_kit.models import CodesMixin

POSTS = ("none", "jpeg:50", "resize:0.5")


class BlockHash(CodesMixin, torch.nn.Module):
    """A toy hash model: a fixed random projection of 4x4 block mean colours."""

    def __init__(self, bits: int = 12):
        super().__init__()
        self.register_buffer("w", torch.randn(48, bits, generator=torch.Generator().manual_seed(3)))

    def forward(self, x):
        return (torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1) - 0.5) @ self.w


def _sets() -> RetrievalSets:
    # 3 identities: 2 queries each; database: 2 noisy copies each + 4 distractors
    g = torch.Generator().manual_seed(0)
    base = torch.rand(3, 3, 32, 32, generator=g)

    def near(n):
        return (base.repeat(n, 1, 1, 1) + 0.15 * torch.randn(3 * n, 3, 32, 32, generator=g)).clamp(0, 1)

    q_labels = torch.tensor([0, 1, 2] * 2)
    db = torch.cat([near(2), torch.rand(4, 3, 32, 32, generator=g)])
    db_labels = torch.tensor([0, 1, 2] * 2 + [-1, -2, -3, -4])
    return RetrievalSets(near(2), q_labels, db, db_labels, torch.tensor(list(range(6)) + [-1, -2, -3, -4]))


def _stripes(x):
    s = torch.zeros_like(x)
    s[..., ::8, :] = 0.3
    return (x + s).clamp(0, 1)


PROTECTIONS = {"stripes": _stripes, "inverted": lambda x: 1 - x}


def test_variation_table_matches_evaluator_and_variation_pattern():
    model, sets = BlockHash(), _sets()
    rows = evaluate.variation_table(model, PROTECTIONS, sets, POSTS)
    assert [(r["protection"], r["post"]) for r in rows] == [(p, s) for p in PROTECTIONS for s in POSTS]
    ev = evaluate.Evaluator(model, sets)
    drop_none = {r["protection"]: r["rel_drop"] for r in rows if r["post"] == "none"}
    for r in rows:
        protect = PROTECTIONS[r["protection"]]
        assert r["rel_drop"] == pytest.approx(ev(protect, "query", r["post"]).rel_drop, abs=1e-9)
        pattern = evaluate.variation_pattern(model, sets.query_images, protect(sets.query_images), r["post"])
        for key in ("abs_u_adv_post", "shrink_adv", "flipped", "flipped_post", "flip_back",
                    "clean_bits_changed_by_post"):
            assert r[key] == pytest.approx(pattern[key], abs=1e-6), key
        if r["post"] == "none":
            assert r["drop_change"] == 0 and r["flip_back"] == 0 and r["abs_u_change"] == 0
        assert r["drop_change"] == pytest.approx(r["rel_drop"] - drop_none[r["protection"]])
    # inverting a photo flips most bits and destroys retrieval; the stripes do less
    inverted = next(r for r in rows if r["protection"] == "inverted" and r["post"] == "none")
    stripes = next(r for r in rows if r["protection"] == "stripes" and r["post"] == "none")
    assert inverted["flipped"] > 0.5 and inverted["rel_drop"] > stripes["rel_drop"]


def test_variation_pattern_equals_a_from_scratch_count():
    model, sets = BlockHash(), _sets()
    x = sets.query_images
    adv = _stripes(x)
    with torch.no_grad():
        u_c, u_a = model(x), model(adv)
        u_cp, u_ap = model(postprocess.apply(x, "jpeg:30")), model(postprocess.apply(adv, "jpeg:30"))
    flipped = (u_a >= 0) != (u_c >= 0)
    back = flipped & ((u_ap >= 0) == (u_c >= 0))
    stats = evaluate.variation_pattern(model, x, adv, "jpeg:30")
    assert flipped.any(), "the toy perturbation flips some bits"
    assert stats["flip_back"] == pytest.approx(float(back.sum() / flipped.sum()))
    assert stats["shrink_adv"] == pytest.approx(float(u_ap.abs().mean() / u_a.abs().mean()), rel=1e-6)
    assert stats["shrink_clean"] == pytest.approx(float(u_cp.abs().mean() / u_c.abs().mean()), rel=1e-6)
    assert stats["clean_bits_changed_by_post"] == pytest.approx(float(((u_cp >= 0) != (u_c >= 0)).float().mean()))
    per_bit = stats["flip_back_per_bit"]
    for j in range(u_c.shape[1]):
        if flipped[:, j].any():
            assert per_bit[j] == pytest.approx(float(back[:, j].sum() / flipped[:, j].sum()))
        else:
            assert math.isnan(per_bit[j])


def test_variation_inputs_checked():
    model, sets = BlockHash(), _sets()
    with pytest.raises(ValueError, match="at least one"):
        evaluate.variation_table(model, PROTECTIONS, sets, ())
    with pytest.raises(ValueError, match="at least one"):
        evaluate.variation_table(model, {}, sets)
    with pytest.raises(ValueError, match="changed the shape"):
        evaluate.variation_table(model, {"crop": lambda x: x[..., :16, :16]}, sets, POSTS)
    with pytest.raises(ValueError, match="differ in shape"):
        evaluate.variation_pattern(model, sets.query_images, sets.query_images[:2])


def test_variation_pattern_restores_train_mode():
    model, sets = BlockHash().train(), _sets()
    evaluate.variation_table(model, PROTECTIONS, sets, ("none",))
    assert model.training
