"""Figures: face grids, retrieval galleries, PR curves (matplotlib; returns the Figure)."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["face_grid", "pr_figure", "retrieval_gallery"]


def _hwc(img: torch.Tensor) -> np.ndarray:
    return img.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def face_grid(images: torch.Tensor, titles: Sequence[str] | None = None, ncols: int = 8,
              size: float = 1.4) -> plt.Figure:
    """A grid of ``N x 3 x H x W`` [0, 1] images with optional titles."""
    n = len(images)
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * (size + 0.25)), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(_hwc(images[k]))
            if titles is not None:
                ax.set_title(titles[k], fontsize=7)
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


def pr_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> plt.Figure:
    """Precision-recall curves, one per name: ``{name: (precision, recall)}``."""
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
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
