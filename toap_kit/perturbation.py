"""A universal perturbation as a versioned artifact: ``delta`` + a JSON card.

    >>> p = Perturbation.load("uap-mid-cnn")     # a shipped one, by name
    >>> protected = p.apply(photos)                    # N x 3 x H x W in [0, 1], any size

Files: ``<path>.safetensors`` (the tensor) and ``<path>.json`` (method, eps, size, surrogates,
data split, seed, sha256 of the tensor file). Loading checks the checksum and the eps-ball and
refuses a changed file with a clear error. The same class holds TOAP's result.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import DATA_DIR, check_pixels
from .store import load_checked, read_card, save_with_card

__all__ = ["FEATHER", "PERTURBATION_DIR", "Perturbation", "feather_mask"]

PERTURBATION_DIR = DATA_DIR / "perturbations"
FORMAT_VERSION = 1
FEATHER = 0.10
"""Share of a face square's side over which a perturbation fades out at its edges (``toap protect``)."""


def feather_mask(side: int, width: float = FEATHER) -> np.ndarray:
    """``side x side`` float32 mask in [0, 1]: 1 inside, a raised cosine down towards 0 over the
    outer ``width`` share of the side (at least one pixel)."""
    i = np.arange(side, dtype=np.float32)
    d = np.minimum(i + 0.5, side - i - 0.5)  # distance of each pixel centre to the nearest edge
    r = max(1.0, width * side)
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.clip(d / r, 0, 1))
    return np.outer(ramp, ramp).astype(np.float32)


class Perturbation:
    """One universal ``delta`` (``3 x S x S``, ``|delta|_inf <= eps``) and its card.

    Args:
        delta: the perturbation, pixel units of [0, 1].
        eps: its L-inf budget (pixel units of [0, 1]).
        card: provenance (method, surrogates, data split, seed, ...).
    """

    def __init__(self, delta: torch.Tensor, eps: float, card: dict | None = None):
        if not isinstance(delta, torch.Tensor) or not delta.is_floating_point():
            raise TypeError(f"delta must be a float tensor, got {getattr(delta, 'dtype', type(delta).__name__)}")
        if delta.ndim != 3 or delta.shape[0] != 3:
            raise ValueError(f"delta must be 3 x H x W, got {tuple(delta.shape)}")
        if not 0 < eps <= 1:  # also rejects NaN
            raise ValueError(f"eps must be in (0, 1], got {eps}")
        if not bool(torch.isfinite(delta).all()):
            raise ValueError("delta has NaN or infinite values")
        if float(delta.abs().max()) > eps + 1e-6:
            raise ValueError(f"|delta|_inf = {float(delta.abs().max()):.5f} exceeds eps = {eps:.5f}")
        self.delta = delta.detach().clone().float()
        self.eps = float(eps)
        self.card = dict(card or {})

    def resized(self, height: int, width: int) -> torch.Tensor:
        """``delta`` resized to ``3 x height x width`` (bilinear: a convex combination, so the
        eps-ball still holds)."""
        if (height, width) == tuple(self.delta.shape[-2:]):
            return self.delta
        smaller = height < self.delta.shape[-2] or width < self.delta.shape[-1]
        return F.interpolate(self.delta[None], size=(height, width), mode="bilinear",
                             align_corners=False, antialias=smaller)[0]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Protected images ``clamp(x + delta, 0, 1)`` for ``N x 3 x H x W`` (or ``3 x H x W``)
        float images in [0, 1] of any size, as float32; ``x`` is not modified.

        Raises:
            TypeError, ValueError: ``x`` is not finite float pixels in [0, 1] (``check_pixels``).
        """
        x = check_pixels(x, "x")
        return (x + self.resized(*x.shape[-2:]).to(x.device)).clamp(0, 1)

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` and ``<path>.json`` atomically; returns the tensor file."""
        base = Path(path).with_suffix("")
        card = {**self.card, "format_version": FORMAT_VERSION, "eps": self.eps,
                "size": list(self.delta.shape[-2:])}
        tensor_file, self.card = save_with_card({"delta": self.delta}, card, base.parent, base.name)
        return tensor_file

    @staticmethod
    def shipped() -> list[str]:
        """Names of the shipped perturbations (``data/perturbations``), for ``load(name)``."""
        return sorted(p.stem for p in PERTURBATION_DIR.glob("*.json"))

    @classmethod
    def load(cls, path_or_name: str | Path) -> "Perturbation":
        """Load from a path (with or without suffix) or the name of a shipped perturbation.

        A bare name (no folder, no suffix, e.g. ``"toap-mid"``) that is not a file here is
        looked up in the shipped ones; a path is only ever that path.

        Raises:
            FileNotFoundError: no such perturbation (the message names the path).
            ValueError: a damaged card or tensor file, a tensor that does not match the card's
                sha256, or one that breaks its eps-ball (the message names the file).
        """
        path = Path(path_or_name)
        bare = isinstance(path_or_name, str) and path.name == path_or_name and not path.suffix
        if bare and not path.with_suffix(".json").is_file() and (PERTURBATION_DIR / path.name).with_suffix(".json").is_file():
            path = PERTURBATION_DIR / path.name
        card_file, tensor_file = path.with_suffix(".json"), path.with_suffix(".safetensors")
        if not card_file.is_file() or not tensor_file.is_file():
            raise FileNotFoundError(f"no perturbation at {path} (needs {card_file.name} and {tensor_file.name}; "
                                    f"shipped, by bare name: {cls.shipped()})")
        card = read_card(card_file, required=("eps", "sha256"))
        tensors = load_checked(tensor_file, card["sha256"])
        if "delta" not in tensors:
            raise ValueError(f"{tensor_file} holds no 'delta' tensor (it has {sorted(tensors)})")
        try:
            return cls(tensors["delta"], card["eps"], card)
        except (TypeError, ValueError) as e:
            raise ValueError(f"perturbation {path} is invalid: {e}") from e

    def __repr__(self) -> str:
        return (f"Perturbation(method={self.card.get('method')!r}, eps={self.eps * 255:.1f}/255, "
                f"size={tuple(self.delta.shape[-2:])})")
