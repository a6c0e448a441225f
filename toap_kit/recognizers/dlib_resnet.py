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

``RecognizerHash`` is a face search engine built on it, the kit's *real-recognizer victim*:
a fixed, differentiable face chip, the network, and an ITQ projection to ``bits`` pre-sign
outputs, with the same interface as ``HashNet`` (``forward``, ``encode``, ``bits``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import check_pixels as checked_pixels
from .hashing import ITQ
from .models import CodesMixin, check_pixels
from .teacher import DLIB_WEIGHTS, FACE_BOX, model_dir, shape_predictor

__all__ = ["CHIP_SIZE", "DLIB_CHIP_BOX", "DlibResNet", "RecognizerHash", "aligned_chips", "box_theta", "chip_in_frame",
           "face_chip", "landmark_thetas", "load_dlib_resnet", "read_dlib_params"]

CHIP_SIZE = 150
DLIB_CHIP_BOX = (0.0945, 0.1583, 0.9188, 0.9826)
"""Where dlib's landmark-aligned chip sits on average in the kit's face crops (mean over the
training faces: the chip box of the ``dlib_itq_*`` engines' cards)."""
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
    side), the geometry of ``recognizer.face_chip`` (the kit's engines)."""
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
