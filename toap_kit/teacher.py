"""The real face recognizer: dlib's ResNet face descriptor (128-D), teacher and reference.

It is the kit's ceiling (how well a real recognizer retrieves these faces) and the teacher
that the small hash CNNs are distilled from. Its weights ship inside the PyPI packages
``dlib-bin`` and ``face-recognition-models`` (by D. King; 99.38% on LFW by its authors), so
nothing is downloaded. Embeddings of the shipped images are computed once by
``make artifacts`` and cached in ``data/teacher/`` with a checksum.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import DATA_DIR, sha256_file

__all__ = ["DLIB_WEIGHTS", "FACE_BOX", "TEACHER_DIR", "Recognizer", "load_embeddings", "model_dir", "save_embeddings",
           "shape_predictor"]

log = logging.getLogger(__name__)
TEACHER_DIR = DATA_DIR / "teacher"
# The shipped crops are a 1.2x box around an aligned face: this is the face box inside them,
# as a fraction of the side (measured best of a few candidates on the shipped crops).
FACE_BOX = (0.08, 0.08, 0.92, 0.92)
DLIB_WEIGHTS = "dlib_face_recognition_resnet_model_v1.dat"  # the network, in face-recognition-models


def model_dir() -> Path:
    """Folder of dlib's model files inside the installed ``face-recognition-models``."""
    # face_recognition_models/__init__.py imports pkg_resources; find its files without it.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise ImportError("the teacher needs the 'face-recognition-models' package "
                          "(pip install face-recognition-models dlib-bin)")
    return Path(spec.origin).parent / "models"


@lru_cache(maxsize=1)
def shape_predictor():
    """dlib's 5-point landmark predictor (from ``face-recognition-models``), loaded once."""
    import dlib  # imported here: only the landmark users need it

    return dlib.shape_predictor(str(model_dir() / "shape_predictor_5_face_landmarks.dat"))


class Recognizer:
    """dlib's face recognition ResNet on aligned face crops.

    ``embed(images)`` maps ``N x 3 x H x W`` [0, 1] crops (a face filling about 1/1.2 of the
    crop, as in the shipped sets) to ``N x 128`` float32 descriptors (unit-ish norm; compare
    with cosine or Euclidean distance). About 0.1 s per image on one CPU core.
    """

    def __init__(self, box: tuple[float, float, float, float] = FACE_BOX, chip_size: int = 150):
        import dlib  # imported here: only the teacher needs it

        d = model_dir()
        self._dlib = dlib
        self.box = box
        self.chip_size = chip_size
        self.shape = shape_predictor()
        self.net = dlib.face_recognition_model_v1(str(d / DLIB_WEIGHTS))

    def _landmarks(self, image: np.ndarray):
        h, w = image.shape[:2]
        x0, y0, x1, y1 = self.box
        rect = self._dlib.rectangle(int(x0 * w), int(y0 * h), int(x1 * w) - 1, int(y1 * h) - 1)
        return self.shape(image, rect)

    def embed_one(self, image: np.ndarray) -> np.ndarray:
        """Descriptor of one ``H x W x 3`` uint8 RGB crop, ``(128,)`` float32."""
        chip = self._dlib.get_face_chip(image, self._landmarks(image), size=self.chip_size)
        return np.asarray(self.net.compute_face_descriptor(chip), dtype=np.float32)

    def chip_box(self, image: np.ndarray) -> np.ndarray:
        """Where dlib's landmark-aligned chip lies in one ``H x W x 3`` uint8 RGB crop:
        ``(x0, y0, x1, y1)`` as fractions of the side (its small rotation is ignored)."""
        h, w = image.shape[:2]
        r = self._dlib.get_face_chip_details(self._landmarks(image), self.chip_size, 0.25).rect
        return np.array([r.left() / w, r.top() / h, r.right() / w, r.bottom() / h])

    def embed(self, images: torch.Tensor, progress: bool = True) -> np.ndarray:
        """Descriptors ``N x 128`` of ``N x 3 x H x W`` images in [0, 1]."""
        return np.array([self.embed_one(a) for a in _uint8_crops(images, "teacher", progress)], np.float32).reshape(-1, 128)

    def chip_boxes(self, images: torch.Tensor, progress: bool = True) -> np.ndarray:
        """``chip_box`` of each of ``N x 3 x H x W`` images in [0, 1]: ``N x 4``."""
        return np.array([self.chip_box(a) for a in _uint8_crops(images, "chip boxes", progress)]).reshape(-1, 4)


def _uint8_crops(images: torch.Tensor, desc: str, progress: bool) -> Iterator[np.ndarray]:
    """``H x W x 3`` uint8 RGB arrays (what dlib takes) of ``N x 3 x H x W`` [0, 1] images."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be N x 3 x H x W, got {tuple(images.shape)}")
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for a in tqdm(arr, desc=desc, disable=not progress):
        yield np.ascontiguousarray(a)


def save_embeddings(name: str, paths: list[str], emb: np.ndarray, folder: Path = TEACHER_DIR) -> Path:
    """Write embeddings of face set ``name`` as ``.npy`` plus a JSON card with its sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    npy = folder / f"{name}.npy"
    tmp = npy.with_suffix(".tmp.npy")
    np.save(tmp, emb.astype(np.float32))
    tmp.replace(npy)
    card = {"set": name, "model": "dlib_face_recognition_resnet_model_v1", "dim": int(emb.shape[1]),
            "box": list(FACE_BOX), "paths": paths, "sha256": sha256_file(npy)}
    (folder / f"{name}.json").write_text(json.dumps(card, indent=1))
    return npy


@lru_cache(maxsize=None)
def _load_cached(name: str, folder: str) -> tuple[np.ndarray, tuple[str, ...]]:
    npy = Path(folder) / f"{name}.npy"
    meta = Path(folder) / f"{name}.json"
    if not npy.is_file() or not meta.is_file():
        raise FileNotFoundError(f"no cached teacher embeddings for {name!r} in {folder}; "
                                "run `make artifacts`")
    card = json.loads(meta.read_text())
    if sha256_file(npy) != card["sha256"]:
        raise ValueError(f"{npy} does not match the sha256 in {meta}: the file was changed")
    return np.load(npy), tuple(card["paths"])


def load_embeddings(name: str, folder: Path = TEACHER_DIR) -> tuple[np.ndarray, list[str]]:
    """Cached teacher descriptors of a shipped face set: ``(N x 128 array, paths)``."""
    emb, paths = _load_cached(name, str(folder))
    return emb.copy(), list(paths)
