"""Attacks on deep hashing: per-image PGD on hash codes and a universal perturbation (UAP).

All attacks work on pixels in [0, 1] and return the perturbation ``delta`` (``|delta|_inf <=
eps``, eps in pixel units of [0, 1], and ``x + delta`` in [0, 1]); they never modify their
inputs and restore every model's train/eval mode, also on error.

Objectives are pluggable: ``objective(u, target) -> loss`` (lower is better for the attacker)
where ``u`` are pre-sign outputs ``N x L`` and ``target`` the codes to move away from:

- ``away_loss``: HAG-style, minimise the agreement ``mean(tanh(beta u) * target)``;
- ``margin_loss``: push every bit past the wrong side of ``target`` by a margin ``m``,
  ``mean(relu(m + target * u))``, so the flip survives some shrinkage of ``u``.

The margin loss and the identity anchor codes (``anchor_codes``) are the kit's reading of
TOAP's robust objectives ([kit], see docs/method.md); the paper's abstract names neither.
The universal perturbation follows Moosavi-Dezfooli et al., "Universal adversarial
perturbations" (CVPR 2017), optimised directly with Adam on a loss over batches; averaging the
loss over several surrogates is the ensemble attack of Liu et al., "Delving into transferable
adversarial examples and black-box attacks" (ICLR 2017).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

__all__ = ["anchor_codes", "away_loss", "eval_mode", "margin_loss", "pgd", "universal_perturbation"]

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def away_loss(u: torch.Tensor, target: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Mean agreement of ``tanh(beta u)`` with the ``target`` codes (in [-1, 1])."""
    return (torch.tanh(beta * u) * target).mean()


def margin_loss(u: torch.Tensor, target: torch.Tensor, margin: float = 2.0) -> torch.Tensor:
    """Mean hinge ``relu(margin + target * u)`` over ``N x L`` pre-sign outputs ``u`` and codes
    ``target`` in {-1, +1}: zero once every bit sits ``margin`` past the wrong side of
    ``target``. A [kit] choice (docs/method.md)."""
    return torch.relu(margin + target * u).mean()


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode and restore each one's mode afterwards, also on error."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _check(x: torch.Tensor, eps: float) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected N x 3 x H x W pixels, got shape {tuple(x.shape)}")
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError("pixels must be in [0, 1]")
    if not 0 < eps <= 1:
        raise ValueError(f"eps must be in (0, 1] (pixel units of [0, 1], e.g. 8/255), got {eps}")


@torch.no_grad()
def anchor_codes(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 batch_size: int = 256) -> dict[int, torch.Tensor]:
    """Anchor code of each identity: ``sign`` of the sum of its images' codes (0 -> +1); the
    universal perturbation's per-identity target, a [kit] choice (docs/method.md).

    Returns ``{label: code}`` with codes of shape ``(L,)`` in {-1, +1}.
    """
    codes = model.encode(images, batch_size)
    out = {}
    for y in labels.unique().tolist():
        s = codes[labels == y].sum(0)
        out[y] = torch.where(s >= 0, 1.0, -1.0)
    return out


def pgd(model: nn.Module | Sequence[nn.Module], x: torch.Tensor, target: torch.Tensor | None = None,
        eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
        objective: Objective = away_loss, random_start: bool = True, seed: int = 0) -> torch.Tensor:
    """Per-image L-inf PGD on hash codes.

    Args:
        model: a hash model, or a list of them (the losses are averaged: an ensemble).
        x: ``N x 3 x H x W`` images in [0, 1] (not modified).
        target: codes ``N x L`` to move away from; default: each model's own codes of ``x``
            (HAG-style). With several models a target must match every model's length.
        eps, alpha: budget and step size, pixel units of [0, 1].
        steps: number of signed-gradient steps.
        objective: ``objective(u, target)``, minimised.
        random_start: start from uniform noise in the eps-ball (seeded).

    Returns:
        ``delta``, ``N x 3 x H x W``, with ``|delta|_inf <= eps`` and ``x + delta`` in [0, 1].
    """
    _check(x, eps)
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    x = x.detach()
    with eval_mode(*models):
        targets = [target if target is not None else m.encode(x) for m in models]
        gen = torch.Generator().manual_seed(seed)
        delta = ((torch.rand(x.shape, generator=gen) * 2 - 1) * eps if random_start
                 else torch.zeros_like(x))
        delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
        for _ in range(steps):
            loss = sum(objective(m(x + delta), t) for m, t in zip(models, targets)) / len(models)
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta -= alpha * grad.sign()
                delta.clamp_(-eps, eps)
                delta.copy_((x + delta).clamp(0, 1) - x)
    return delta.detach()


def universal_perturbation(models: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor,
                           anchors: Sequence[dict[int, torch.Tensor]], eps: float = 8 / 255,
                           steps: int = 300, batch_size: int = 32, lr: float = 1e-3,
                           objective: Objective = margin_loss, size: int | None = None, seed: int = 0,
                           progress: bool = True) -> torch.Tensor:
    """One ``delta`` for every face (the UAP baseline for hashing).

    Adam on ``delta`` over random batches of ``images``; the loss is ``objective`` between
    each model's ``u(x + delta)`` and the anchor code of each face's identity, averaged over
    ``models`` (one surrogate or an ensemble); ``delta`` is projected to the eps-ball after
    every step. Deterministic under ``seed``.

    Args:
        models: surrogate hash models (never victims).
        images: ``N x 3 x S x S`` training faces in [0, 1]; labels: ``N`` identity labels.
        anchors: per model, ``{label: anchor code}`` (see ``anchor_codes``).
        size: side of ``delta`` (default: the images' side); it is resized to each batch.

    Returns:
        ``delta``, ``3 x size x size``, ``|delta|_inf <= eps``.
    """
    _check(images, eps)
    if len(models) != len(anchors):
        raise ValueError(f"need one anchor table per model, got {len(anchors)} for {len(models)} models")
    side = size or images.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    delta = torch.zeros(1, 3, side, side, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    tables = [torch.stack([a[int(y)] for y in labels.tolist()]) for a in anchors]
    with eval_mode(*models):
        for _ in tqdm(range(steps), desc="UAP", disable=not progress):
            idx = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=gen)
            x = images[idx]
            d = delta if side == x.shape[-1] else nn.functional.interpolate(
                delta, size=x.shape[-2:], mode="bilinear", align_corners=False)
            xa = (x + d).clamp(0, 1)
            loss = sum(objective(m(xa), t[idx]) for m, t in zip(models, tables)) / len(models)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                delta.clamp_(-eps, eps)
    return delta.detach()[0]
