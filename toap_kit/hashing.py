"""Hash objectives, teacher distillation, ITQ, and the one trainer for every hash model.

Objectives take pre-sign outputs ``u`` (``N x L``) and identity labels (``N``; ``-1`` marks an
unlabelled face, which the supervised objectives ignore):

- ``dpsh_loss``: DPSH pairwise likelihood (Li et al., IJCAI 2016) plus quantisation.
- ``HashNetLoss``: HashNet's weighted pairwise loss on ``tanh(beta u)`` with continuation
  (``beta`` grows during training; Cao et al., ICCV 2017).
- ``CSQLoss``: central similarity, one Hadamard hash centre per identity (Yuan et al., CVPR 2020).
- ``distill_loss``: make the student's metric the teacher's: cosine between the student's
  auxiliary embedding and the teacher's, and matching of the pairwise cosine similarities of
  ``tanh(u)`` to the teacher's. Needs no labels, so every face a model may see counts.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import device as config_device

__all__ = [
    "CSQLoss",
    "HashNetLoss",
    "ITQ",
    "OBJECTIVES",
    "TrainConfig",
    "augment",
    "distill_loss",
    "dpsh_loss",
    "make_objective",
    "train_hash_model",
]

log = logging.getLogger(__name__)


def _pairs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarity ``s_ij`` (1 same identity, 0 not) and mask of labelled pairs i != j."""
    lab = labels[:, None] >= 0
    mask = lab & lab.T & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return (labels[:, None] == labels[None, :]).float(), mask


def dpsh_loss(u: torch.Tensor, labels: torch.Tensor, eta: float = 0.1) -> torch.Tensor:
    """DPSH: ``-sum log p(s_ij | u_i, u_j)`` with ``theta = u_i.u_j / 2``, plus
    ``eta * ||u - sign(u)||^2``."""
    s, mask = _pairs(labels)
    theta = 0.5 * u @ u.T
    nll = F.softplus(theta) - s * theta
    pair = nll[mask].mean() if mask.any() else u.sum() * 0
    return pair + eta * (u - u.detach().sign()).pow(2).mean()


class HashNetLoss:
    """HashNet: weighted pairwise cross-entropy on ``tanh(beta u)``, positive and negative
    pairs re-weighted to balance, ``beta`` raised by continuation via ``set_progress``."""

    def __init__(self, alpha: float = 10.0, beta_max: float = 4.0):
        self.alpha, self.beta_max, self.beta = alpha, beta_max, 1.0

    def set_progress(self, p: float) -> None:
        """``p`` in [0, 1]: share of training done."""
        self.beta = 1.0 + (self.beta_max - 1.0) * p

    def __call__(self, u: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s, mask = _pairs(labels)
        if not mask.any():
            return u.sum() * 0
        h = torch.tanh(self.beta * u)
        ip = self.alpha * (h @ h.T) / u.shape[1]
        nll = F.softplus(ip) - s * ip
        pos, neg = (s > 0) & mask, (s == 0) & mask
        w = torch.zeros_like(s)
        n = mask.sum()
        if pos.any():
            w[pos] = n / pos.sum()
        if neg.any():
            w[neg] = n / neg.sum()
        return (w * nll)[mask].mean()


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


class CSQLoss:
    """CSQ: pull ``tanh(u)`` of identity y to its hash centre ``c_y`` (rows of a Hadamard
    matrix, with their negations when more centres are needed, else random), plus
    quantisation ``lam * (|tanh u| - 1)^2``."""

    def __init__(self, bits: int, n_classes: int, lam: float = 1e-4, seed: int = 0):
        h = _hadamard(bits)
        if bits & (bits - 1) == 0 and n_classes <= 2 * bits:
            centres = torch.cat([h, -h])[:n_classes]
        else:
            g = torch.Generator().manual_seed(seed)
            centres = torch.where(torch.rand(n_classes, bits, generator=g) > 0.5, 1.0, -1.0)
        self.centres, self.lam = centres, lam

    def __call__(self, u: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        lab = labels >= 0
        if not lab.any():
            return u.sum() * 0
        h = torch.tanh(u[lab])
        target = (self.centres.to(u.device)[labels[lab]] + 1) / 2
        centre = F.binary_cross_entropy((h + 1) / 2, target, reduction="mean")
        return centre + self.lam * (h.abs() - 1).pow(2).mean()


OBJECTIVES = ("dpsh", "hashnet", "csq")


def make_objective(name: str, bits: int, n_classes: int) -> Callable:
    """The hash objective ``name`` (one of ``OBJECTIVES``) as ``loss(u, labels)``."""
    if name == "dpsh":
        return dpsh_loss
    if name == "hashnet":
        return HashNetLoss()
    if name == "csq":
        return CSQLoss(bits, n_classes)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {name!r}")


def distill_loss(u: torch.Tensor, emb: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Teacher distillation: ``(1 - cos(emb, teacher)).mean()`` plus the mean squared
    difference between the pairwise cosine similarities of ``tanh(u)`` and of the teacher.

    ``u`` is ``N x L`` pre-sign outputs, ``emb`` the student's ``N x D`` auxiliary embedding,
    ``teacher`` ``N x D`` centred teacher embeddings. The value lies in [0, 6]: the cosine
    term in [0, 2], the pairwise term in [0, 4]. A scalar tensor, differentiable in ``u``
    and ``emb``.
    """
    cos = 1 - F.cosine_similarity(emb, teacher, dim=1).mean()
    t = F.normalize(teacher, dim=1)
    h = F.normalize(torch.tanh(u), dim=1)
    return cos + (h @ h.T - t @ t.T).pow(2).mean()


def augment(x: torch.Tensor, gen: torch.Generator, shift: int = 3) -> torch.Tensor:
    """Random flip, shift by up to ``shift`` pixels (replicate padding) and brightness /
    contrast jitter of a ``N x 3 x S x S`` [0, 1] batch."""
    n, _, s, _ = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    p = F.pad(x, (shift,) * 4, mode="replicate")
    out = torch.empty_like(x)
    off = torch.randint(0, 2 * shift + 1, (n, 2), generator=gen).tolist()
    for i, (dy, dx) in enumerate(off):
        out[i] = p[i, :, dy:dy + s, dx:dx + s]
    b = 1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    c = 1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    m = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - m) * c + m * b).clamp(0, 1)


class ITQ:
    """Iterative quantisation (Gong & Lazebnik, CVPR 2011): PCA to ``bits`` dimensions,
    ``V = (x - mean) @ pca``, then a rotation ``R`` that minimises ``||B - V R||_F^2`` over
    codes ``B`` in {-1, +1} and orthogonal ``R``, alternating ``B = sign(V R)`` and the
    orthogonal Procrustes step (SVD of ``B^T V``) for ``iters`` rounds from a random rotation
    drawn with ``seed``. Used to hash the teacher's float embeddings (notebook 01 rebuilds it)."""

    def __init__(self, bits: int, iters: int = 50, seed: int = 0):
        self.bits, self.iters, self.seed = bits, iters, seed

    def fit(self, x: np.ndarray) -> "ITQ":
        """Fit on ``N x D`` float features (``bits <= D``)."""
        if self.bits > x.shape[1]:
            raise ValueError(f"bits={self.bits} exceeds feature dimension {x.shape[1]}")
        self.mean = x.mean(0)
        _, _, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        self.pca = vt[: self.bits].T
        v = (x - self.mean) @ self.pca
        rng = np.random.default_rng(self.seed)
        r, _ = np.linalg.qr(rng.standard_normal((self.bits, self.bits)))
        for _ in range(self.iters):
            b = np.where(v @ r >= 0, 1.0, -1.0)
            u, _, wt = np.linalg.svd(b.T @ v)
            r = (u @ wt).T
        self.rotation = r
        return self

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Codes in {-1, +1}, ``N x bits``."""
        return np.where((x - self.mean) @ self.pca @ self.rotation >= 0, 1.0, -1.0).astype(np.float32)


@dataclass
class TrainConfig:
    """Sizes of one training run."""

    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 5e-4
    distill_weight: float = 1.0
    hash_weight: float = 0.3
    patience: int = 8
    identities_per_batch: int = 4  # labelled part of a batch: P identities x K images
    images_per_identity: int = 4
    seed: int = 0


def _batches(labels: torch.Tensor, config: TrainConfig, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch of batches: P identities x K images each (so every batch holds positive
    pairs), the rest of the batch filled with unlabelled faces. Every labelled image is
    drawn about once per epoch."""
    lab = labels >= 0
    unl = torch.nonzero(~lab).flatten()
    unl = unl[torch.randperm(len(unl), generator=gen)]
    groups: list[torch.Tensor] = []
    for c in labels[lab].unique():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        groups += [idx[i:i + config.images_per_identity] for i in range(0, len(idx), config.images_per_identity)]
    order = torch.randperm(len(groups), generator=gen).tolist()
    p = config.identities_per_batch
    if groups:
        n_unl = max(config.batch_size - p * config.images_per_identity, 0)
        n_batches = -(-len(groups) // p)
    else:  # nothing labelled: plain batches of unlabelled faces
        n_unl = config.batch_size
        n_batches = -(-len(unl) // n_unl)
    batches = []
    for b in range(n_batches):
        part = [groups[g] for g in order[b * p:(b + 1) * p]]
        if len(unl):
            part.append(unl[torch.arange(b * n_unl, (b + 1) * n_unl) % len(unl)])
        batches.append(torch.cat(part))
    return batches


def train_hash_model(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     teacher: torch.Tensor | None, objective: Callable, config: TrainConfig,
                     validate: Callable[[torch.nn.Module], float] | None = None,
                     progress: bool = True, device: str | torch.device | None = None) -> list[dict]:
    """Train ``model`` in place; returns the per-epoch history.

    Args:
        model: a ``HashNet``.
        images: ``N x 3 x S x S`` [0, 1] training faces (``S`` = the model's input size).
        labels: ``N`` identity labels, ``-1`` for unlabelled faces.
        teacher: ``N x D`` centred teacher embeddings, or ``None`` to train on labels alone.
        objective: ``loss(u, labels)``; its ``set_progress(p)`` is called if it has one.
        config: epochs, batch size, learning rate, loss weights, early-stopping patience, seed.
        validate: ``model -> score`` (higher is better, e.g. validation mAP); with it the best
            epoch's weights are kept and training stops after ``patience`` epochs without gain.
        device: where to train (default: ``config.device()``); the data stay on the
            CPU, batches are moved, and the model returns to its own device at the end.

    AdamW with a one-cycle learning-rate schedule; batches by ``_batches``; augmentation
    by ``augment``.
    """
    if len(images) != len(labels) or (teacher is not None and len(teacher) != len(images)):
        raise ValueError("images, labels and teacher embeddings must have the same length")
    device = torch.device(device) if device else config_device()
    home = next(model.parameters()).device
    model.to(device)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = len(_batches(labels, config, torch.Generator().manual_seed(0)))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.epochs * steps_per_epoch,
                                                pct_start=0.15)
    history: list[dict] = []
    best, best_state, since_best = -math.inf, None, 0
    bar = tqdm(range(config.epochs), desc="train", disable=not progress)
    for epoch in bar:
        if hasattr(objective, "set_progress"):
            objective.set_progress(epoch / max(config.epochs - 1, 1))
        model.train()
        total, seen = 0.0, 0
        for idx in _batches(labels, config, gen):
            if len(idx) < 2:
                continue
            x = augment(images[idx], gen).to(device)
            u, emb = model.forward_with_embedding(x)
            loss = config.hash_weight * objective(u, labels[idx].to(device))
            if teacher is not None:
                loss = loss + config.distill_weight * distill_loss(u, emb, teacher[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        row = {"epoch": epoch, "loss": total / seen}
        if validate is not None:
            row["val"] = float(validate(model))
            if row["val"] > best:
                best, since_best = row["val"], 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                since_best += 1
        history.append(row)
        bar.set_postfix({k: round(v, 4) for k, v in row.items() if k != "epoch"})
        log.info("epoch %d %s", epoch, row)
        if validate is not None and since_best >= config.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.to(home).eval()
    return history
