"""Small deep-hash CNNs of three families: VGG-style, ResNet-style and MobileNet-style.

Every model takes ``N x 3 x H x W`` pixels in [0, 1] at any size >= 32 (resized inside to its
``input_size``), normalises inside (so attacks work on raw pixels), and returns ``N x bits``
pre-sign values ``u``. ``encode(x)`` gives the hash codes ``sign(u)`` in {-1, +1}
(``sign(0)`` counts as +1). An auxiliary ``embed`` head (``N x 128``) is trained while
distilling from the teacher; TOAP's feature term (``toap.feature_term``) reads it afterwards
as the surrogate's feature space (``forward_with_embedding``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BACKBONES", "CodesMixin", "HashNet", "build_model", "check_pixels"]

# Per-channel mean/std of the shipped face crops, RGB in [0, 1].
FACE_MEAN = (0.54, 0.42, 0.35)
FACE_STD = (0.26, 0.22, 0.21)


def _conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def vgg(width: int = 24) -> tuple[nn.Module, int]:
    """VGG-style: four stages of two 3x3 convs, max-pooling between them."""
    w = [width, 2 * width, 4 * width, 8 * width]
    layers: list[nn.Module] = []
    cin = 3
    for i, c in enumerate(w):
        layers += [_conv_bn(cin, c), _conv_bn(c, c)]
        if i < len(w) - 1:
            layers.append(nn.MaxPool2d(2))
        cin = c
    return nn.Sequential(*layers), w[-1]


class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, cout, stride),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


def resnet(width: int = 24) -> tuple[nn.Module, int]:
    """ResNet-style: a stem, then four stages of one basic residual block each."""
    w = [width, 2 * width, 4 * width, 8 * width]
    blocks: list[nn.Module] = [_conv_bn(3, width)]
    cin = width
    for i, c in enumerate(w):
        blocks.append(_Basic(cin, c, 1 if i == 0 else 2))
        cin = c
    return nn.Sequential(*blocks), w[-1]


def _dw_sep(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(_conv_bn(cin, cin, stride, groups=cin), _conv_bn(cin, cout, k=1))


def mobilenet(width: int = 32) -> tuple[nn.Module, int]:
    """MobileNet-style: a stem, then depthwise-separable convolutions."""
    w = width
    cfg = [(w, 1), (2 * w, 2), (2 * w, 1), (4 * w, 2), (4 * w, 1), (8 * w, 2), (8 * w, 1)]
    layers: list[nn.Module] = [_conv_bn(3, w)]
    cin = w
    for c, s in cfg:
        layers.append(_dw_sep(cin, c, s))
        cin = c
    return nn.Sequential(*layers), cin


BACKBONES = {"vgg": vgg, "resnet": resnet, "mobilenet": mobilenet}


def check_pixels(x: torch.Tensor) -> None:
    """``ValueError`` unless ``x`` is ``N x 3 x H x W`` with ``H, W >= 32`` (what every hash
    engine accepts)."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected N x 3 x H x W pixels, got shape {tuple(x.shape)}")
    if min(x.shape[-2:]) < 32:
        raise ValueError(f"images must be at least 32x32, got {tuple(x.shape[-2:])}")


class CodesMixin:
    """``encode`` for a module whose ``forward`` gives ``N x bits`` pre-sign outputs."""

    @torch.no_grad()
    def encode(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Hash codes in {-1, +1}, ``N x bits``, on the CPU, in eval mode (the mode is
        restored); batches of ``x`` are moved to the model's device."""
        was_training = self.training
        self.eval()
        dev = next(self.buffers()).device
        try:
            u = torch.cat([self(x[i:i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)])
        finally:
            self.train(was_training)
        return torch.where(u >= 0, 1.0, -1.0)


class HashNet(CodesMixin, nn.Module):
    """Backbone + global pooling + hash layer.

    Args:
        backbone: ``"vgg"``, ``"resnet"`` or ``"mobilenet"``.
        bits: code length L (16, 32 or 64 in the zoo).
        input_size: side the input is resized to (pixels).
        width: channel width of the first stage.
    """

    def __init__(self, backbone: str, bits: int, input_size: int = 48, width: int = 24):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {backbone!r}")
        if bits < 1:
            raise ValueError(f"bits must be >= 1, got {bits}")
        self.backbone_name, self.bits, self.input_size, self.width = backbone, bits, input_size, width
        self.features, dim = BACKBONES[backbone](width)
        self.hash = nn.Sequential(nn.Dropout(0.1), nn.Linear(dim, bits))
        self.embed_head = nn.Linear(dim, 128)
        self.register_buffer("mean", torch.tensor(FACE_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(FACE_STD).view(1, 3, 1, 1))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``N x D`` of [0, 1] pixels."""
        check_pixels(x)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-sign outputs ``u``, ``N x bits``, of pixels ``x`` in [0, 1]."""
        return self.hash(self.trunk(x))

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u, e)``: pre-sign outputs and the auxiliary 128-D embedding (distillation; TOAP's feature term)."""
        h = self.trunk(x)
        return self.hash(h), self.embed_head(h)


def build_model(backbone: str, bits: int, input_size: int = 48, width: int | None = None) -> HashNet:
    """A fresh hash model; ``width`` defaults to 24 (32 for MobileNet)."""
    if width is None:
        width = 32 if backbone == "mobilenet" else 24
    return HashNet(backbone, bits, input_size, width)
