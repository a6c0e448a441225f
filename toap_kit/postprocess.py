"""Real post-processing: what a social network does to a photo, through the real codecs.

Every operation takes a ``N x 3 x H x W`` batch in [0, 1] and returns one, by a round trip
through the real library's encoded bytes (never a simulation).

``apply(x, spec)`` takes a spec string: ``"none"``, ``"jpeg:75"`` (Pillow, 4:2:0) or
``"jpeg:75:444"`` (chroma subsampling ``444``, ``422`` or ``420``).
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

__all__ = ["apply", "jpeg", "to_pil", "from_pil"]

_SUBSAMPLING = {"444": 0, "422": 1, "420": 2}


def _check(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a N x 3 x H x W tensor, got {getattr(x, 'shape', type(x))}")


def to_pil(img: torch.Tensor) -> Image.Image:
    """``3 x H x W`` [0, 1] tensor to an RGB PIL image (rounded to 8 bits)."""
    arr = (img.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def from_pil(im: Image.Image) -> torch.Tensor:
    """RGB PIL image to a ``3 x H x W`` [0, 1] float tensor."""
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


def jpeg(x: torch.Tensor, quality: int = 75, subsampling: str = "420") -> torch.Tensor:
    """Real JPEG through Pillow: encode each image at ``quality`` (1..100) with chroma
    ``subsampling`` (``"444"``, ``"422"``, ``"420"``) and decode."""
    _check(x)
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    if subsampling not in _SUBSAMPLING:
        raise ValueError(f"subsampling must be one of {sorted(_SUBSAMPLING)}, got {subsampling!r}")
    out = torch.empty_like(x)
    for i in range(len(x)):
        buf = io.BytesIO()
        to_pil(x[i]).save(buf, format="JPEG", quality=int(quality), subsampling=_SUBSAMPLING[subsampling])
        out[i] = from_pil(Image.open(io.BytesIO(buf.getvalue()))).to(x.device, x.dtype)
    return out


def apply(x: torch.Tensor, spec: str) -> torch.Tensor:
    """Apply the real operation named by ``spec`` (see the module docstring)."""
    _check(x)
    parts = spec.lower().split(":")
    if parts[0] == "none":
        return x.clone()
    if parts[0] == "jpeg" and len(parts) in (2, 3):
        return jpeg(x, int(parts[1]), parts[2] if len(parts) == 3 else "420")
    raise ValueError(f"unknown post-processing spec {spec!r}; try 'none', 'jpeg:75' or 'jpeg:90:444'")
