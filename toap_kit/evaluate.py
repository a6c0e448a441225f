"""How well a protection works: retrieval before/after, in two threat settings.

- **query** setting: the protected photo is the query, the database is clean.
- **database** setting: the person's protected photos sit in the crawled database (the
  distractors, other people, stay clean); clean photos of the person are the queries.

A protection is any ``protect(images) -> images`` on ``N x 3 x H x W`` [0, 1] batches:
``Perturbation.apply`` for a universal one, or a per-image attack. ``post`` names the real
post-processing (``toap_kit.postprocess.apply`` spec) applied to the protected photos, as a
social network would, before the engine sees them. Always on the open-set protocol's
evaluation identities unless you pass other sets.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import kornia
import numpy as np
import torch

from . import postprocess, retrieval
from .data import RetrievalSets

__all__ = ["VARIATION_POSTS", "Evaluator", "ProtectionResult", "evaluate_protection", "precomputed", "psnr", "robustness_curve", "ssim",
           "transfer_matrix", "variation_pattern", "variation_table"]

Protect = Callable[[torch.Tensor], torch.Tensor]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR (dB) between two ``N x 3 x H x W`` [0, 1] batches (per-image PSNR from
    ``postprocess.psnr``, capped at 100 dB so identical images do not make the mean inf)."""
    return float(postprocess.psnr(a, b).clamp(max=100).mean())


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM (11x11 Gaussian window, kornia) between two ``N x 3 x H x W`` [0, 1] batches."""
    return float(kornia.metrics.ssim(a, b, window_size=11).mean())


@dataclass
class ProtectionResult:
    """Retrieval before/after protection, and what the protection costs in image quality."""

    setting: str
    post: str
    map_clean: float
    map_after: float
    map100_clean: float
    map100_after: float
    rel_drop: float            # (map_clean - map_after) / map_clean
    anti_retrieval: float      # share of queries with no same-identity item in the top 10
    bits_flipped: float        # share of the protected photos' bits that differ from clean
    psnr: float                # protected vs original (before post-processing), dB
    ssim: float
    linf: float                # max |protected - original|, pixel units of [0, 1]

    def as_dict(self) -> dict:
        return asdict(self)


def precomputed(original: torch.Tensor, protected: torch.Tensor) -> Protect:
    """A ``protect`` that returns already-made ``protected`` images for exactly ``original``
    (e.g. per-image PGD results reused across victims and post-processings)."""

    def protect(x: torch.Tensor) -> torch.Tensor:
        if x.shape != original.shape or not torch.equal(x, original):
            raise ValueError("precomputed protection called on other images than it was made for")
        return protected

    return protect


def _anti_retrieval(dist: np.ndarray, q_labels, db_labels, k: int = 10) -> float:
    """Share of queries with no relevant item in the top k (expected over tie orders)."""
    return float(1.0 - retrieval.found_at_k(dist, q_labels, db_labels, k).mean())


class Evaluator:
    """Protection measurements for one ``model`` on one ``sets``, computing each clean code
    set (database, queries, clean photos after a given post-processing) only once.

    Make a new one when the model's weights or the sets change.
    """

    def __init__(self, model: torch.nn.Module, sets: RetrievalSets):
        self.model, self.sets = model, sets
        self.own = sets.db_source >= 0  # the evaluation identities' photos; distractors stay clean
        self._cache: dict[tuple, torch.Tensor] = {}
        self._quality: dict[int, tuple[torch.Tensor, float, float]] = {}

    def _codes(self, key: tuple, images: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = self.model.encode(images())
        return self._cache[key]

    def __call__(self, protect: Protect, setting: str = "query", post: str = "none",
                 processed: torch.Tensor | None = None) -> ProtectionResult:
        """Retrieval before and after ``protect`` (then ``post``), in threat ``setting``.

        The clean baseline sees the same post-processing as the protected photos (a platform
        re-encodes every upload), so the drop measures the protection, not the codec.
        ``processed``: the protected images already sent through ``post`` (to share that work
        across several models' evaluators); PSNR/SSIM are computed once per protected tensor.
        """
        if setting not in ("query", "database"):
            raise ValueError(f"setting must be 'query' or 'database', got {setting!r}")
        sets, own = self.sets, self.own
        original = sets.query_images if setting == "query" else sets.db_images[own]
        protected = protect(original)
        if protected.shape != original.shape:
            raise ValueError(f"protect() changed the shape {tuple(original.shape)} -> {tuple(protected.shape)}")
        codes_clean = self._codes((setting, post), lambda: postprocess.apply(original, post))
        codes_prot = self.model.encode(postprocess.apply(protected, post) if processed is None else processed)
        if setting == "query":
            db = self._codes(("db",), lambda: sets.db_images)
            d_clean = retrieval.hamming_distance(codes_clean, db)
            d_after = retrieval.hamming_distance(codes_prot, db)
            labels = (sets.query_labels, sets.db_labels)
        else:
            q = self._codes(("queries",), lambda: sets.query_images)
            rest = self._codes(("rest",), lambda: sets.db_images[~own])
            d_clean = retrieval.hamming_distance(q, torch.cat([codes_clean, rest]))
            d_after = retrieval.hamming_distance(q, torch.cat([codes_prot, rest]))
            labels = (sets.query_labels, torch.cat([sets.db_labels[own], sets.db_labels[~own]]))
        before = retrieval.evaluate(d_clean, *labels)
        after = retrieval.evaluate(d_after, *labels)
        return ProtectionResult(
            setting, post, before.map_all, after.map_all, before.map_k, after.map_k,
            (before.map_all - after.map_all) / before.map_all, _anti_retrieval(d_after, *labels),
            float((codes_clean != codes_prot).float().mean()), *self._psnr_ssim(protected, original),
            float((protected - original).abs().max()))

    def _psnr_ssim(self, protected: torch.Tensor, original: torch.Tensor) -> tuple[float, float]:
        """PSNR and SSIM of ``protected`` vs ``original``, once per protected tensor."""
        key = id(protected)
        if key not in self._quality or self._quality[key][0] is not protected:
            self._quality[key] = (protected, psnr(protected, original), ssim(protected, original))
        return self._quality[key][1:]


def evaluate_protection(model: torch.nn.Module, protect: Protect, sets: RetrievalSets,
                        setting: str = "query", post: str = "none") -> ProtectionResult:
    """Retrieval of ``sets`` by ``model`` before and after ``protect`` (then ``post``); one
    call of an ``Evaluator`` (use one directly to measure several protections)."""
    return Evaluator(model, sets)(protect, setting, post)


def transfer_matrix(protections: dict[str, Protect], models: dict[str, torch.nn.Module],
                    sets: RetrievalSets, setting: str = "query", post: str = "none") -> np.ndarray:
    """Relative mAP drop, rows = protections (e.g. made on each surrogate), columns = models."""
    evaluators = [Evaluator(m, sets) for m in models.values()]
    return np.array([[ev(p, setting, post).rel_drop for ev in evaluators] for p in protections.values()])


def robustness_curve(model: torch.nn.Module, protect: Protect, sets: RetrievalSets,
                     posts: Sequence[str] = ("none", "jpeg:95", "jpeg:90", "jpeg:80", "jpeg:70",
                                             "jpeg:60", "jpeg:50", "jpeg:40", "jpeg:30",
                                             "resize:0.75", "resize:0.5"),
                     setting: str = "query") -> list[ProtectionResult]:
    """The protection's effect after each real post-processing in ``posts``."""
    ev = Evaluator(model, sets)
    return [ev(protect, setting, p) for p in posts]


VARIATION_POSTS = ("none", "jpeg:90", "jpeg:75", "jpeg:50", "jpeg:30", "resize:0.75", "resize:0.5", "blur:1.0")


def _pre_sign(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``model``'s pre-sign outputs ``u`` (``N x L``) of ``x``, in batches, in eval mode
    (the mode is restored), on the CPU."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x[i:i + batch_size]).cpu() for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def _sign(u: torch.Tensor) -> torch.Tensor:
    return torch.where(u >= 0, 1.0, -1.0)


def _pattern(u_c: torch.Tensor, u_a: torch.Tensor, u_cp: torch.Tensor, u_ap: torch.Tensor, post: str) -> dict:
    """The variation statistics from the pre-sign outputs of clean / adversarial images,
    without (``u_c``, ``u_a``) and with (``u_cp``, ``u_ap``) post-processing."""
    b_c, b_a, b_cp, b_ap = (_sign(u) for u in (u_c, u_a, u_cp, u_ap))
    flipped = b_a != b_c
    back = flipped & (b_ap == b_c)
    per_bit = back.float().sum(0) / flipped.float().sum(0)
    return {
        "post": post,
        "abs_u_clean": float(u_c.abs().mean()), "abs_u_clean_post": float(u_cp.abs().mean()),
        "abs_u_adv": float(u_a.abs().mean()), "abs_u_adv_post": float(u_ap.abs().mean()),
        "shrink_clean": float(u_cp.abs().mean() / u_c.abs().mean()),
        "shrink_adv": float(u_ap.abs().mean() / u_a.abs().mean()),
        "flipped": float(flipped.float().mean()),
        "flipped_post": float((b_ap != b_cp).float().mean()),
        "flip_back": float(back.sum() / flipped.sum().clamp_min(1)),
        "flip_back_per_bit": per_bit.tolist(),
        "clean_bits_changed_by_post": float((b_cp != b_c).float().mean()),
    }


@torch.no_grad()
def variation_pattern(model: torch.nn.Module, clean: torch.Tensor, adversarial: torch.Tensor,
                      post: str = "jpeg:75", batch_size: int = 64) -> dict:
    """What real post-processing does to a hash model's pre-sign outputs ``u``.

    Args:
        clean, adversarial: ``N x 3 x H x W`` [0, 1], the same faces without/with a perturbation.
        post: a ``postprocess.apply`` spec.
        batch_size: images per forward pass.

    Returns a dict of statistics:
        ``abs_u_clean``, ``abs_u_clean_post``, ``abs_u_adv``, ``abs_u_adv_post``: mean |u|;
        ``shrink_clean``, ``shrink_adv``: mean |u| after / before post-processing;
        ``flipped``: share of bits the perturbation flipped (vs clean codes, no post);
        ``flipped_post``: share still flipped after post-processing (vs clean codes after post);
        ``flip_back``: share of the flipped bits that return to the clean code after post;
        ``flip_back_per_bit``: the same per bit (list of length L; NaN where never flipped);
        ``clean_bits_changed_by_post``: share of clean bits that post-processing alone flips.
    """
    if clean.shape != adversarial.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and adversarial {tuple(adversarial.shape)} differ in shape")
    u = [_pre_sign(model, x, batch_size) for x in (clean, adversarial, postprocess.apply(clean, post),
                                                    postprocess.apply(adversarial, post))]
    return _pattern(*u, post)


@torch.no_grad()
def variation_table(model: torch.nn.Module, protections: dict[str, Protect], sets: RetrievalSets,
                    posts: Sequence[str] = VARIATION_POSTS, batch_size: int = 64) -> list[dict]:
    """The variation pattern and each protection's effect, side by side, per post-processing.

    Query setting: ``sets.query_images`` are protected by each of ``protections`` (name ->
    ``protect``), then each spec in ``posts`` (real codecs, ``postprocess.apply``) is applied to
    the clean and the protected queries; the database stays clean. Every forward pass is done
    once: the database codes and the clean queries' ``u`` (with and without each post) are
    shared by all protections.

    Returns one dict per (protection, spec), protections outer: ``protection`` (its name), the
    keys of :func:`variation_pattern`, and
        ``abs_u_change``: relative change of mean |u| of the protected queries, ``shrink_adv - 1``;
        ``rel_drop``: relative mAP@all drop after that post-processing (the clean baseline sees
        the same post-processing; equal to ``Evaluator(model, sets)(protect, "query", post).rel_drop``);
        ``drop_change``: ``rel_drop`` minus the protection's ``rel_drop`` without post-processing.
    """
    if not posts or not protections:
        raise ValueError("need at least one protection and one post-processing spec")
    x = sets.query_images
    db = _sign(_pre_sign(model, sets.db_images, batch_size))
    labels = (sets.query_labels, sets.db_labels)
    u_clean = {p: _pre_sign(model, postprocess.apply(x, p), batch_size) for p in dict.fromkeys(("none", *posts))}

    def map_all(u: torch.Tensor) -> float:
        return retrieval.mean_average_precision(retrieval.hamming_distance(_sign(u), db), *labels)

    map_clean = {p: map_all(u) for p, u in u_clean.items()}  # shared by every protection

    def drop(post: str, u_after: torch.Tensor) -> float:
        return (map_clean[post] - map_all(u_after)) / map_clean[post]

    rows = []
    for name, protect in protections.items():
        protected = protect(x)
        if protected.shape != x.shape:
            raise ValueError(f"protect() changed the shape {tuple(x.shape)} -> {tuple(protected.shape)}")
        u_prot = {p: _pre_sign(model, postprocess.apply(protected, p), batch_size) for p in u_clean}
        drop_none = drop("none", u_prot["none"])
        for post in posts:
            row = {"protection": name,
                   **_pattern(u_clean["none"], u_prot["none"], u_clean[post], u_prot[post], post)}
            row["abs_u_change"] = row["shrink_adv"] - 1
            row["rel_drop"] = drop(post, u_prot[post])
            row["drop_change"] = row["rel_drop"] - drop_none
            rows.append(row)
    return rows
