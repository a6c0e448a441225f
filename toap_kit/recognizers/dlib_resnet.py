"""dlib's face recognition ResNet in PyTorch: a real recognizer that gradients flow through.

``toap_kit.teacher`` runs dlib's own C++ network to cache the embeddings of the shipped faces.
This module reads the *same* weights, from the installed ``face-recognition-models`` package
(nothing is downloaded), into an equivalent torch network. On the same 150x150 face chips
its 128-D outputs equal dlib's to about 1e-6 (``tests/test_recognizer.py``), and it runs on
batches: about 120 chips/s on 2 CPU cores, against 10/s for dlib one image at a time.

The network (dlib's ``dnn_face_recognition_ex.cpp``): a 7x7 stride-2 convolution and a 3x3
stride-2 max-pool; 14 residual blocks of two 3x3 convolutions, in stages of 32, 64, 128,
256 and 256 channels. The first block of each later stage has stride 2 and no padding, and
its shortcut is a 2x2 average pool; where the two branches differ in channels or size, the
smaller one is zero-padded (at the end, as dlib adds them). Then global average pooling and a
128-D linear layer without bias. dlib's batch norms are frozen into per-channel affine layers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..teacher import DLIB_WEIGHTS, model_dir

__all__ = ["CHIP_SIZE", "DlibResNet", "load_dlib_resnet", "read_dlib_params"]

CHIP_SIZE = 150
# dlib's input layer subtracts these 0-255 channel means and divides by 256
DLIB_RGB_MEAN = (122.782, 117.001, 104.298)
# (channels, blocks, first block halves the resolution) of each stage
STAGES = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))


def read_dlib_params(path: str | Path) -> list[tuple[str, np.ndarray]]:
    """The learned tensors of a serialised dlib network, input to output: ``("con", flat
    filters then biases)``, ``("affine", gamma then beta)`` and ``("fc", inputs x outputs)``.

    dlib writes each layer as its name (a length-prefixed string such as ``con_4``) followed
    by its parameter tensor: a compact-int header (version 2, then 4 dimensions) and the
    values as little-endian float32. Only the layer kinds above carry weights in this network.
    """
    path = Path(path)
    raw = path.read_bytes()

    def cint(p: int) -> tuple[int, int]:  # dlib's compact integer: size byte (sign in bit 7), then LE bytes
        n = raw[p] & 0x0F
        v = int.from_bytes(raw[p + 1:p + 1 + n], "little")
        return (-v if raw[p] & 0x80 else v), p + 1 + n

    marks = {b"con_4": "con", b"affine_": "affine", b"fc_2": "fc"}
    out: list[tuple[str, np.ndarray]] = []
    p = 0
    while True:
        hits = [(q, m) for m in marks if (q := raw.find(bytes([1, len(m)]) + m, p)) >= 0]
        if not hits:
            break
        q, mark = min(hits)
        p = q + 2 + len(mark)
        if mark == b"fc_2":  # fc layers write num_outputs and num_inputs before the tensor
            p = cint(cint(p)[1])[1]
        version, p = cint(p)
        dims = []
        for _ in range(4):
            d, p = cint(p)
            dims.append(d)
        n = int(np.prod(dims))
        if version != 2 or n <= 0 or p + 4 * n > len(raw):
            raise ValueError(f"{path}: unexpected tensor after {mark.decode()} at byte {q}; "
                             "not a dlib network this reader knows")
        out.append((marks[mark], np.frombuffer(raw, "<f4", n, p).reshape(dims[0], -1).copy()))
        p += 4 * n
    return out


def _pad_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b``, the smaller one zero-padded (channels, then rows and columns at the end)."""
    c, h, w = (max(x, y) for x, y in zip(a.shape[1:], b.shape[1:]))

    def grow(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return grow(a) + grow(b)


class _Affine(nn.Module):
    """A frozen batch norm: per-channel ``gamma * x + beta``."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(cin, cout, 3, 2 if down else 1, 0 if down else 1)
        self.aff1 = _Affine(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.aff2 = _Affine(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.aff2(self.conv2(F.relu(self.aff1(self.conv1(x)))))
        return F.relu(_pad_add(y, F.avg_pool2d(x, 2) if self.down else x))


class DlibResNet(nn.Module):
    """dlib's face descriptor network (29 convolutions): ``N x 3 x 150 x 150`` aligned face
    chips in [0, 1] to ``N x 128`` descriptors (same-person pairs are within about 0.6)."""

    name, dim, input_size = "dlib", 128, CHIP_SIZE  # as every descriptor network of ``recognizers``

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 7, 2, 0)
        self.aff = _Affine(32)
        blocks, cin = [], 32
        for c, n, down in STAGES:
            for i in range(n):
                blocks.append(_Block(cin, c, down and i == 0))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(256, 128, bias=False)
        self.register_buffer("rgb_mean", torch.tensor(DLIB_RGB_MEAN).view(1, 3, 1, 1) / 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.rgb_mean) * (255 / 256)
        x = F.max_pool2d(F.relu(self.aff(self.conv(x))), 3, 2)
        return self.fc(self.blocks(x).mean((2, 3)))


def load_dlib_resnet(path: str | Path | None = None) -> DlibResNet:
    """dlib's network with its weights (default: from the installed ``face-recognition-models``),
    in eval mode, parameters frozen."""
    path = Path(path) if path else model_dir() / DLIB_WEIGHTS
    params = read_dlib_params(path)
    net = DlibResNet()
    convs = [net.conv] + [c for b in net.blocks for c in (b.conv1, b.conv2)]
    affines = [net.aff] + [a for b in net.blocks for a in (b.aff1, b.aff2)]
    got = {k: [a for kind, a in params if kind == k] for k in ("con", "affine", "fc")}
    if (len(got["con"]), len(got["affine"]), len(got["fc"])) != (len(convs), len(affines), 1):
        raise ValueError(f"{path}: expected {len(convs)} convolutions, {len(affines)} affine layers and one "
                         f"fc layer, found {len(got['con'])}, {len(got['affine'])}, {len(got['fc'])}")
    with torch.no_grad():
        for conv, a in zip(convs, got["con"]):
            w = torch.from_numpy(a.ravel())
            if w.numel() != conv.weight.numel() + conv.bias.numel():
                raise ValueError(f"{path}: a convolution has {w.numel()} values, expected "
                                 f"{conv.weight.numel() + conv.bias.numel()}")
            conv.weight.copy_(w[:conv.weight.numel()].view_as(conv.weight))
            conv.bias.copy_(w[conv.weight.numel():])
        for aff, a in zip(affines, got["affine"]):
            g, b = torch.from_numpy(a.ravel()).chunk(2)
            aff.weight.copy_(g)
            aff.bias.copy_(b)
        net.fc.weight.copy_(torch.from_numpy(got["fc"][0]).T)
    return net.requires_grad_(False).eval()
