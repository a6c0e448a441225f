"""Figures: face grids, retrieval galleries, PR curves, distance histograms, perturbations
(matplotlib; each returns the Figure)."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["face_grid", "hamming_histogram", "perturbation_figure", "pr_figure", "retrieval_gallery"]


def _hwc(img: torch.Tensor) -> np.ndarray:
    return img.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def face_grid(images: torch.Tensor, titles: Sequence[str] | None = None, ncols: int = 8,
              size: float = 1.4, title: str | None = None) -> plt.Figure:
    """A grid of ``N x 3 x H x W`` [0, 1] images with optional titles, and the figure's ``title``
    (laid out with the grid, above the images' titles)."""
    n = len(images)
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * (size + 0.25)), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(_hwc(images[k]))
            if titles is not None:
                ax.set_title(titles[k], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def retrieval_gallery(query: torch.Tensor, db_images: torch.Tensor, order: Sequence[int],
                      distances: Sequence[float], correct: Sequence[bool], title: str = "",
                      size: float = 1.3) -> plt.Figure:
    """Query then its top-k results with their distances; green frame = same identity,
    red = another person."""
    k = len(order)
    fig, axes = plt.subplots(1, k + 1, figsize=((k + 1) * size, size + 0.5))
    axes[0].imshow(_hwc(query))
    axes[0].set_title("query", fontsize=8)
    for ax, i, d, ok in zip(axes[1:], order, distances, correct):
        ax.imshow(_hwc(db_images[i]))
        ax.set_title(f"d={d:g}", fontsize=8, color="green" if ok else "red")
        for s in ax.spines.values():
            s.set_edgecolor("green" if ok else "red")
            s.set_linewidth(3)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def pr_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str | None = None) -> plt.Figure:
    """Precision-recall curves, one per name: ``{name: (precision, recall)}``, under ``title``."""
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    if title:
        ax.set_title(title, fontsize=9)
    for name, (p, r) in curves.items():
        ax.plot(r, p, marker=".", label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def hamming_histogram(dist, same, bits: int | None = None, title: str = "") -> plt.Figure:
    """Histogram of distances ``dist`` (any shape) split by the boolean ``same`` (same shape):
    pairs of the same person against pairs of different people, each normalised to 1."""
    dist, same = np.asarray(dist).ravel(), np.asarray(same, bool).ravel()
    if dist.shape != same.shape:
        raise ValueError(f"dist and same must have the same number of entries, got {dist.size} and {same.size}")
    top = bits if bits is not None else int(np.ceil(dist.max()))
    bins = np.arange(-0.5, top + 1.5)
    fig, ax = plt.subplots(figsize=(5, 3))
    for mask, label, color in ((same, "same person", "tab:green"), (~same, "different people", "tab:red")):
        if mask.any():
            ax.hist(dist[mask], bins=bins, density=True, alpha=0.55, color=color, label=f"{label} ({mask.sum()} pairs)")
    ax.set_xlabel("Hamming distance" if bits is not None else "distance")
    ax.set_ylabel("share of pairs")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def perturbation_figure(delta: torch.Tensor, eps: float, face: torch.Tensor | None = None,
                        size: float = 2.2, title: str | None = None) -> plt.Figure:
    """A perturbation ``3 x H x W`` (pixel units, ``|delta| <= eps``) shown amplified to the full
    range (``0.5 + delta / (2 eps)``: grey = 0); with ``face`` (``3 x H' x W'``, [0, 1]), also the
    face and ``face + delta`` (delta resized bilinearly to the face if sizes differ). ``title``:
    the figure's title (say which perturbation it is)."""
    if delta.ndim != 3 or delta.shape[0] != 3:
        raise ValueError(f"delta must be 3 x H x W, got {tuple(delta.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    panels = [(0.5 + delta / (2 * eps), f"delta x {1 / (2 * eps):.0f} (grey = 0)")]
    if face is not None:
        d = delta if face.shape == delta.shape else torch.nn.functional.interpolate(
            delta[None], size=tuple(face.shape[-2:]), mode="bilinear", align_corners=False)[0]
        panels = [(face, "face")] + panels + [((face + d).clamp(0, 1), "face + delta")]
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * size, size + 0.3), squeeze=False)
    for ax, (img, label) in zip(axes[0], panels):
        ax.imshow(_hwc(img))
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
