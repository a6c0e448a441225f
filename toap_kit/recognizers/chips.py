"""Where a recognizer's face chip is cut from the kit's face crops, differentiably.

Two geometries: a fixed box (``face_chip``, ``box_theta``: fractions of the crop's side, the
kit's ``dlib_itq_*`` engines) and dlib's 5-landmark alignment (``landmark_thetas``,
``aligned_chips``: the chip dlib's own pipeline cuts, reproduced to about half a grey level).
``chip_in_frame`` carries one network's chip into another's frame, so each network of
``recognizers`` sees the crop it was trained on.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data import check_pixels as checked_pixels
from ..teacher import FACE_BOX, shape_predictor
from .dlib_resnet import CHIP_SIZE

__all__ = ["DLIB_CHIP_BOX", "aligned_chips", "box_theta", "chip_in_frame", "face_chip", "landmark_thetas"]

DLIB_CHIP_BOX = (0.0945, 0.1583, 0.9188, 0.9826)
"""Where dlib's landmark-aligned chip sits on average in the kit's face crops (mean over the
training faces: the chip box of the ``dlib_itq_*`` engines' cards)."""


def face_chip(x: torch.Tensor, box: Sequence[float], size: int = CHIP_SIZE) -> torch.Tensor:
    """Differentiable crop of ``box = (x0, y0, x1, y1)`` (fractions of the side; may reach
    outside [0, 1], borders are repeated) from ``N x 3 x H x W`` [0, 1] images, resampled
    bilinearly to ``N x 3 x size x size``."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected N x 3 x H x W pixels, got shape {tuple(x.shape)}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {tuple(box)}")
    theta = torch.tensor([[x1 - x0, 0.0, x0 + x1 - 1], [0.0, y1 - y0, y0 + y1 - 1]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(len(x), 2, 3), [len(x), 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def landmark_thetas(faces: torch.Tensor, size: int = CHIP_SIZE, padding: float = 0.25) -> torch.Tensor:
    """Where dlib's pipeline cuts its face chip in each face crop, as ``N x 2 x 3`` affine
    matrices for ``F.affine_grid(..., align_corners=False)``.

    dlib finds 5 landmarks (inside the kit's face box ``teacher.FACE_BOX`` of the crop), then
    ``get_face_chip_details`` gives a rectangle and an angle: the chip is that rectangle,
    rotated about its centre, sampled at ``size x size``. Sampling the crop through these
    matrices (zeros outside, as dlib) reproduces ``dlib.get_face_chip`` to about half a grey
    level, and is differentiable. ``faces``: ``N x 3 x H x W`` in [0, 1].
    """
    import dlib

    faces = checked_pixels(faces, "faces", ndim=(4,))
    predictor, (bx0, by0, bx1, by1) = shape_predictor(), FACE_BOX
    arr = (faces.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for a in arr:
        h, w = a.shape[:2]
        shape = predictor(np.ascontiguousarray(a), dlib.rectangle(int(bx0 * w), int(by0 * h), int(bx1 * w) - 1, int(by1 * h) - 1))
        d = dlib.get_face_chip_details(shape, size, padding)
        r, cos, sin = d.rect, math.cos(d.angle), math.sin(d.angle)
        rot = np.array([[cos, -sin], [sin, cos]])
        c = np.array([(r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2])
        ex = rot @ np.array([r.right() - r.left(), 0.0]) / (size - 1)  # one chip column, in crop pixels
        ey = rot @ np.array([0.0, r.bottom() - r.top()]) / (size - 1)
        # chip pixel (u, v) in [-1, 1] (align_corners=False) -> crop pixel c + u*size/2*ex + v*size/2*ey
        m = np.stack([ex * size / 2, ey * size / 2, c + 0.5], 1) * (2 / np.array([[w], [h]]))
        m[:, 2] -= 1
        out.append(m)
    return torch.tensor(np.array(out), dtype=torch.float32).reshape(-1, 2, 3)


def box_theta(box, n: int) -> torch.Tensor:
    """``N x 2 x 3`` matrices of the fixed chip ``box = (x0, y0, x1, y1)`` (fractions of the
    side), the geometry of ``face_chip`` (the kit's engines)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return torch.tensor([[x1 - x0, 0.0, x0 + x1 - 1], [0.0, y1 - y0, y0 + y1 - 1]]).expand(n, 2, 3).clone()


def chip_in_frame(theta: torch.Tensor, box_from, box_to) -> torch.Tensor:
    """``N x 2 x 3`` chips ``theta`` cut in the frame of the fixed chip ``box_from``, moved to
    where ``box_to`` sits relative to it: ``theta o B_from^-1 o B_to`` (each network's chip
    from dlib's landmark-aligned one, whose mean frame is ``DLIB_CHIP_BOX``)."""
    b_from, b_to = box_theta(box_from, 1)[0].double(), box_theta(box_to, 1)[0].double()
    rel = torch.linalg.solve(b_from[:, :2], torch.cat([b_to[:, :2], (b_to[:, 2] - b_from[:, 2])[:, None]], 1))
    t = theta.double()
    return torch.cat([t[:, :, :2] @ rel[:, :2], t[:, :, :2] @ rel[:, 2:] + t[:, :, 2:]], 2).float()


def aligned_chips(x: torch.Tensor, box: Sequence[float], size: int) -> torch.Tensor:
    """``N x 3 x size x size`` chips of ``N x 3 x H x W`` [0, 1] face crops cut by dlib's 5
    landmarks (``landmark_thetas``), carried into the frame of ``box`` (where the chip sits
    relative to dlib's mean chip ``DLIB_CHIP_BOX``). Differentiable in ``x``; the landmarks
    are found on ``x`` as given (not differentiated)."""
    theta = chip_in_frame(landmark_thetas(x), DLIB_CHIP_BOX, box).to(x)
    grid = F.affine_grid(theta, [len(x), 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
