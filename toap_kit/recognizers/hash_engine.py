"""``RecognizerHash``: a face search engine on a real recognizer, the kit's real-engine victims.

A fixed (or landmark-aligned) face chip, the recognizer's network, and an ITQ projection to
``bits`` pre-sign outputs, with the same interface as ``models.HashNet`` (``forward``,
``encode``, ``bits``). The zoo's ``dlib_itq_*``, ``mobileface_itq_*`` and ``faceres_itq_*``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..hashing import ITQ
from ..models import CodesMixin, check_pixels
from .chips import aligned_chips, face_chip
from .dlib_resnet import load_dlib_resnet

__all__ = ["RecognizerHash"]


class RecognizerHash(CodesMixin, nn.Module):
    """A hash search engine on a real recognizer: ``face_chip`` -> descriptor network -> ITQ.

    Args:
        bits: code length.
        chip_box: the face chip inside the kit's face crops (see ``teacher.Recognizer.chip_box``).
        input_size: side of the face crops it is meant for (the kit's crops: 112); inputs of
            any size >= 32 work, the chip is resampled from them.
        net: the descriptor network: ``N x 3 x S x S`` chips in [0, 1] -> ``N x net.dim``, with
            attributes ``name``, ``dim`` and ``input_size`` (``S``): ``DlibResNet`` (the default,
            ``load_dlib_resnet()``) or the ``net`` of a ``recognizers.load(name)``.
        aligned: cut the chip where dlib's 5 landmarks put each face (``aligned_chips``), not
            at the fixed box.

    ``forward(x)`` gives ``N x bits`` pre-sign outputs ``(net(chip(x)) - center) @ projection``;
    ``encode`` their signs. ``center`` and ``projection`` are fitted by ``fit_itq``.
    ``backbone_name``: ``dlib_resnet`` for dlib's network (the class's), else the network's name.
    """

    backbone_name = "dlib_resnet"

    def __init__(self, bits: int, chip_box: Sequence[float], input_size: int = 112, net: nn.Module | None = None,
                 aligned: bool = False):
        super().__init__()
        self.aligned = aligned
        self.net = net or load_dlib_resnet()
        dim = self.net.dim
        if bits < 1 or bits > dim:
            raise ValueError(f"bits must be in 1..{dim} (the descriptor has {dim} dimensions), got {bits}")
        self.bits, self.input_size, self.chip_box = bits, input_size, tuple(float(v) for v in chip_box)
        self.network = self.net.name
        if self.network != "dlib":
            self.backbone_name = self.network
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("projection", torch.zeros(dim, bits))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The network's ``N x dim`` descriptors of ``N x 3 x H x W`` [0, 1] face crops."""
        check_pixels(x)
        cut = aligned_chips if self.aligned else face_chip
        return self.net(cut(x, self.chip_box, self.net.input_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-sign outputs ``u``, ``N x bits``, of pixels ``x`` in [0, 1]."""
        return (self.embed(x) - self.center) @ self.projection

    def fit_itq(self, descriptors: torch.Tensor, seed: int = 0) -> "RecognizerHash":
        """Fit the hash layer by ITQ (``hashing.ITQ``) on ``N x dim`` descriptors."""
        itq = ITQ(self.bits, seed=seed).fit(descriptors.float().numpy())
        self.center.copy_(torch.from_numpy(itq.mean))
        self.projection.copy_(torch.from_numpy(itq.pca @ itq.rotation))
        return self

    def head(self) -> dict[str, torch.Tensor]:
        """The fitted tensors (what the zoo stores; the network comes from its package)."""
        return {"center": self.center, "projection": self.projection}
