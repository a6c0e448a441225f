"""Differentiable post-processing: smooth stand-ins for the real operations of ``postprocess``,
for use inside losses (gradients flow to the input).

- ``jpeg``: kornia's differentiable JPEG (``kornia.enhance.jpeg_codec_differentiable``,
  Reich, Debus, Wachter, WACV 2024; its cubic soft rounding ``r + (v - r)^3`` is Shin &
  Song's, "JPEG-resistant adversarial images", NIPS 2017 workshop), always 4:2:0 chroma;
  kornia soft-clips to 0..255, so the output is clamped to [0, 1] here; kornia pads sizes
  that are not multiples of 16 itself.
- ``resize``: down-then-up resize (kornia, antialiased on the way down).
- ``blur``: Gaussian blur (kornia).
- ``noise``: additive Gaussian noise from a seeded generator.
- ``apply(x, spec)``: the differentiable counterpart of a ``postprocess`` spec where one
  exists (jpeg, jpeg_cv2 and profiles -> kornia JPEG at that quality; resize; blur; noise).

Every function takes ``N x 3 x H x W`` float in [0, 1] and returns the same shape in [0, 1].
"""
from __future__ import annotations

import math

import kornia
import torch

from . import postprocess

__all__ = ["apply", "blur", "jpeg", "noise", "quality_tensor", "resize"]


def _check(x: torch.Tensor) -> None:
    postprocess._check(x)


def quality_tensor(x: torch.Tensor, quality: float | torch.Tensor) -> torch.Tensor:
    """JPEG quality as a tensor of 1 or ``N`` values in 1..100 (``ValueError`` otherwise)."""
    q = torch.as_tensor(quality, dtype=x.dtype, device=x.device).reshape(-1)
    if q.numel() not in (1, len(x)):
        raise ValueError(f"quality needs 1 or N={len(x)} values, got {q.numel()}")
    if bool(((q < 1) | (q > 100)).any()):
        raise ValueError(f"JPEG quality must be in 1..100, got {q.tolist()}")
    return q


def jpeg(x: torch.Tensor, quality: float | torch.Tensor = 75) -> torch.Tensor:
    """Kornia's differentiable JPEG (4:2:0, standard tables scaled for ``quality`` 1..100,
    one value or one per image), clamped to [0, 1].

    Shape: ``N x 3 x H x W`` in [0, 1] -> same.
    """
    _check(x)
    q = quality_tensor(x, quality)
    return kornia.enhance.jpeg_codec_differentiable(x, q).clamp(0, 1)


def resize(x: torch.Tensor, scale: float = 0.5, interpolation: str = "bilinear") -> torch.Tensor:
    """Differentiable down-then-up resize: to ``scale`` (0 < scale <= 1) of each side with
    antialiasing, then back to the input size.

    Shape: ``N x 3 x H x W`` in [0, 1] -> same.
    """
    _check(x)
    scale = float(scale)
    if not 0 < scale <= 1:
        raise ValueError(f"resize scale must be in (0, 1], got {scale}")
    if interpolation not in ("bilinear", "bicubic", "nearest", "area"):
        raise ValueError(f"interpolation must be bilinear, bicubic, nearest or area, got {interpolation!r}")
    if scale == 1:
        return x
    mode = "bilinear" if interpolation == "area" else interpolation
    h, w = x.shape[-2:]
    small = kornia.geometry.transform.resize(x, (max(1, round(h * scale)), max(1, round(w * scale))),
                                             interpolation=mode, antialias=True)
    return kornia.geometry.transform.resize(small, (h, w), interpolation=mode).clamp(0, 1)


def blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Differentiable Gaussian blur of standard deviation ``sigma`` (> 0) pixels, kernel
    2*ceil(3 sigma)+1, reflected borders (kornia).

    Shape: ``N x 3 x H x W`` in [0, 1] -> same.
    """
    _check(x)
    sigma = float(sigma)
    if not sigma > 0:
        raise ValueError(f"blur sigma must be > 0, got {sigma}")
    k = 2 * math.ceil(3 * sigma) + 1
    return kornia.filters.gaussian_blur2d(x, (k, k), (sigma, sigma), border_type="reflect")


def noise(x: torch.Tensor, sigma: float = 0.02, seed: int = 0) -> torch.Tensor:
    """Additive Gaussian noise of std ``sigma`` ([0, 1] pixel units) from a seeded generator,
    clamped to [0, 1] (no rounding, so the gradient is the identity inside the range).

    Shape: ``N x 3 x H x W`` in [0, 1] -> same.
    """
    _check(x)
    if not 0 <= float(sigma) <= 1:
        raise ValueError(f"noise sigma must be in [0, 1], got {sigma}")
    g = torch.Generator().manual_seed(int(seed))
    return (x + float(sigma) * torch.randn(x.shape, generator=g).to(x)).clamp(0, 1)


def apply(x: torch.Tensor, spec: postprocess.Spec) -> torch.Tensor:
    """The differentiable counterpart of a real ``postprocess`` spec. JPEG (either encoder,
    any chroma) and platform profiles become kornia's 4:2:0 JPEG at the same quality;
    ``resize_max`` is skipped when it would not shrink the image; ``webp``, ``median`` and
    ``crop`` have no counterpart here and raise ``ValueError``.

    Shape: ``N x 3 x H x W`` in [0, 1] -> same.
    """
    _check(x)
    for r in postprocess.parse(spec):
        op = r["op"]
        if op in ("jpeg", "jpeg_cv2"):
            x = jpeg(x, r.get("quality", 75))
        elif op == "resize":
            x = resize(x, r.get("scale", 0.5), r.get("interpolation", "bilinear"))
        elif op == "resize_max":
            if max(x.shape[-2:]) > r["max_side"]:
                raise ValueError(f"resize_max:{r['max_side']} would shrink a {tuple(x.shape[-2:])} image; "
                                 "no differentiable counterpart that changes the size")
        elif op == "blur":
            x = blur(x, r.get("sigma", 1.0))
        elif op == "noise":
            x = noise(x, r.get("sigma", 0.02), r.get("seed", 0))
        else:
            raise ValueError(f"no differentiable counterpart of {op!r}; use postprocess.straight_through")
    return x
