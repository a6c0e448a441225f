"""Face data: the shipped face sets, user image folders, and the open-set protocol.

Images are returned as float tensors ``N x 3 x S x S`` with pixels in [0, 1].

The shipped sets live in ``data/`` at the repository root (never in ``../shared``):

- ``lfw158``: 158 LFW people, 10-20 face crops each (112x112).
- ``distractors``: 2,000 LFW people with one image each (never queries).
- ``photos250``: 23 untouched 250x250 LFW photos of ``lfw158`` people.
- ``osn-samples``: one photo before/after Facebook, Weibo and WeChat.

Open-set protocol (the default): the 158 identities are split, deterministically, into
``n_train`` *training identities* (the only labelled faces a hash model, the CG or a
perturbation may see) and *evaluation identities*. For each evaluation identity the first
``n_queries`` images (by file name) are queries; its other images join the 2,000
distractors in the database. The closed-set variant instead queries with ``n_queries``
held-out images of each training identity against the training identities' other images
plus the distractors.
"""
from __future__ import annotations

import csv
from functools import lru_cache
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DATA_DIR",
    "FaceSet",
    "Protocol",
    "RetrievalSets",
    "crop_face",
    "face_box",
    "load_faceset",
    "load_folder",
    "load_image",
    "make_protocol",
    "make_sets",
    "retrieval_sets",
    "sha256_file",
    "split_queries",
]

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_image(path: str | Path, size: int | None = None) -> torch.Tensor:
    """Read one image file as a ``3 x H x W`` float tensor in [0, 1].

    Args:
        path: image file (anything Pillow reads).
        size: if given, resize to ``size x size`` (Lanczos, as the shipped crops were made).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be decoded as an image (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None:
                if size < 1:
                    raise ValueError(f"size must be >= 1, got {size}")
                im = im.resize((size, size), Image.LANCZOS)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


@dataclass
class FaceSet:
    """A labelled set of face images held in memory.

    Attributes:
        images: ``N x 3 x S x S`` float tensor in [0, 1].
        labels: ``N`` int64 tensor, index into ``identities``.
        identities: identity names.
        paths: file path of each image, relative to the set's root.
        root: the folder the paths are relative to.
    """

    images: torch.Tensor
    labels: torch.Tensor
    identities: list[str]
    paths: list[str]
    root: Path = field(default=DATA_DIR)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: Sequence[int] | torch.Tensor) -> "FaceSet":
        """The images at ``index`` (identity list kept, so labels stay comparable)."""
        index = torch.as_tensor(index, dtype=torch.long)
        return FaceSet(self.images[index], self.labels[index], self.identities,
                       [self.paths[i] for i in index.tolist()], self.root)

    def names(self) -> list[str]:
        """Identity name of every image."""
        return [self.identities[i] for i in self.labels.tolist()]


def _load_rows(root: Path, rows: list[tuple[str, str]], size: int) -> FaceSet:
    identities = sorted({ident for _, ident in rows})
    index = {name: i for i, name in enumerate(identities)}
    images = torch.empty(len(rows), 3, size, size)
    for i, (rel, _) in enumerate(rows):
        images[i] = load_image(root / rel, size)
    labels = torch.tensor([index[ident] for _, ident in rows], dtype=torch.long)
    return FaceSet(images, labels, identities, [rel for rel, _ in rows], root)


def load_faceset(name: str = "lfw158", size: int = 112, root: str | Path | None = None) -> FaceSet:
    """Load a shipped face set from its ``manifest.csv``.

    Args:
        name: ``"lfw158"``, ``"distractors"`` or ``"photos250"``.
        size: output side in pixels (images are resized to ``size x size``).
        root: data folder (default: the repository's ``data/``).
    """
    base = Path(root) if root is not None else DATA_DIR
    manifest = base / name / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"no manifest for face set {name!r}: {manifest}")
    with open(manifest, newline="") as f:
        rows = [(r["path"], r["identity"]) for r in csv.DictReader(f)]
    if not rows:
        raise ValueError(f"manifest {manifest} lists no images")
    return _load_rows(base / name, rows, size)


def load_folder(folder: str | Path, size: int = 112) -> FaceSet:
    """Load a user image folder laid out as ``<identity>/<image>``.

    Files whose suffix is not an image suffix are ignored; an unreadable image raises
    ``ValueError`` naming the file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    rows = [(str(p.relative_to(folder)), p.parent.name)
            for p in sorted(folder.glob("*/*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not rows:
        raise ValueError(f"no images found in {folder} (expected <identity>/<image> files)")
    return _load_rows(folder, rows, size)


@dataclass
class Protocol:
    """Index lists into the two shipped sets, describing one retrieval protocol.

    ``*_face`` indices point into ``lfw158``; ``database_distractors`` is always all of
    ``distractors``. ``train`` are the labelled faces models may learn from.
    """

    kind: str
    train_identities: list[str]
    eval_identities: list[str]
    train: list[int]
    queries: list[int]
    database_faces: list[int]
    n_distractors: int

    def describe(self) -> str:
        return (f"{self.kind}-set protocol: {len(self.train_identities)} training identities "
                f"({len(self.train)} training images), {len(self.queries)} queries, database of "
                f"{len(self.database_faces)} identity images + {self.n_distractors} distractors")


def make_protocol(faces: FaceSet, n_distractors: int = 2000, kind: str = "open",
                  n_train_identities: int = 100, n_queries: int = 3, seed: int = 0) -> Protocol:
    """Split ``faces`` (lfw158) by identity into a retrieval protocol.

    Args:
        faces: the labelled face set (every identity needs more than ``n_queries`` images).
        n_distractors: size of the distractor set that joins the database.
        kind: ``"open"`` (queries from unseen identities, the default) or ``"closed"``
            (queries are held-out images of the training identities).
        n_train_identities: how many identities are training identities.
        n_queries: images per identity used as queries (the first by file name).
        seed: seed of the identity permutation.

    The training images are the same in both kinds: all images of the training identities
    except their first ``n_queries`` (held out for the closed-set variant).
    """
    if kind not in ("open", "closed"):
        raise ValueError(f"kind must be 'open' or 'closed', got {kind!r}")
    n_ident = len(faces.identities)
    if not 0 < n_train_identities < n_ident:
        raise ValueError(f"n_train_identities must be in 1..{n_ident - 1}, got {n_train_identities}")
    perm = torch.randperm(n_ident, generator=torch.Generator().manual_seed(seed)).tolist()
    train_ids = sorted(perm[:n_train_identities])
    eval_ids = sorted(perm[n_train_identities:])
    held_out, train = split_queries(faces, train_ids, n_queries)
    queries, database = (split_queries(faces, eval_ids, n_queries) if kind == "open" else (held_out, train))
    return Protocol(kind, [faces.identities[t] for t in train_ids],
                    [faces.identities[t] for t in eval_ids], train, queries, database, n_distractors)


def split_queries(faces: FaceSet, identities: Sequence[int], n_queries: int = 3) -> tuple[list[int], list[int]]:
    """Indices of the first ``n_queries`` images (by file name) of each identity, and of the
    rest of their images. Every identity needs more than ``n_queries`` images."""
    order = sorted(range(len(faces)), key=lambda i: faces.paths[i])
    queries, rest = [], []
    for ident in identities:
        idx = [i for i in order if int(faces.labels[i]) == ident]
        if len(idx) <= n_queries:
            raise ValueError(f"identity {faces.identities[ident]} has {len(idx)} images, "
                             f"needs more than n_queries={n_queries}")
        queries += idx[:n_queries]
        rest += idx[n_queries:]
    return queries, rest


@dataclass
class RetrievalSets:
    """Queries and database of one protocol, as images and labels.

    Distractors get labels ``-1, -2, ...`` that match nothing; ``db_source`` tells, per
    database item, its index in ``lfw158`` (>= 0) or ``-1 - j`` for distractor ``j``.
    """

    query_images: torch.Tensor
    query_labels: torch.Tensor
    db_images: torch.Tensor
    db_labels: torch.Tensor
    db_source: torch.Tensor

    def subset(self, n_queries: int, n_distractors: int | None = None) -> "RetrievalSets":
        """A smaller version for fast runs: the first ``n_queries`` queries, and a database of
        their identities' photos plus the first ``n_distractors`` distractors (default: all).
        Other identities' photos are dropped, so the database setting protects only the kept
        people's photos."""
        if n_queries < 1:
            raise ValueError(f"n_queries must be >= 1, got {n_queries}")
        kept = self.query_labels[:n_queries]
        dis = self.db_source < 0
        if n_distractors is not None:
            dis &= torch.cumsum(dis.long(), 0) <= n_distractors
        db = dis | torch.isin(self.db_labels, kept)
        return RetrievalSets(self.query_images[:n_queries], kept, self.db_images[db], self.db_labels[db],
                             self.db_source[db])


def retrieval_sets(protocol: Protocol, faces: FaceSet, distractors: FaceSet) -> RetrievalSets:
    """Images and labels of ``protocol``'s queries and database (faces + all distractors)."""
    if len(distractors) != protocol.n_distractors:
        raise ValueError(f"protocol expects {protocol.n_distractors} distractors, got {len(distractors)}")
    return make_sets(faces, distractors, protocol.queries, protocol.database_faces)


def make_sets(faces: FaceSet, distractors: FaceSet, queries: Sequence[int], database: Sequence[int],
              n_distractors: int | None = None) -> RetrievalSets:
    """Queries ``faces[queries]`` against ``faces[database]`` plus the first
    ``n_distractors`` distractors (default: all)."""
    q = torch.as_tensor(queries, dtype=torch.long)
    d = torch.as_tensor(database, dtype=torch.long)
    n = len(distractors) if n_distractors is None else n_distractors
    return RetrievalSets(
        faces.images[q], faces.labels[q],
        torch.cat([faces.images[d], distractors.images[:n]]),
        torch.cat([faces.labels[d], -1 - torch.arange(n)]),
        torch.cat([d, -1 - torch.arange(n)]))


# The shipped crops relative to dlib's frontal-face detector box (measured on photos250):
# side = 1.32 x box width, centre 0.078 x box width above the box centre.
CROP_SCALE, CROP_SHIFT_UP = 1.32, 0.078


def face_box(image: torch.Tensor, detect_side: int = 500) -> tuple[int, int, int, bool]:
    """The square the kit's cropper cuts around the largest face of a ``3 x H x W`` [0, 1]
    photo (dlib's HOG detector box, scaled and shifted like the shipped crops). A photo whose
    long side exceeds ``detect_side`` is searched on a downscaled copy and the box mapped back.

    Returns ``(x0, y0, side, found)`` in pixels (the square may reach outside the photo);
    without a detected face the central square and ``found`` False.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a 3 x H x W image, got {tuple(image.shape)}")
    h, w = image.shape[1:]
    if min(h, w) < 16:
        raise ValueError(f"image too small to hold a face: {w}x{h}")
    f = min(1.0, detect_side / max(h, w))
    small = image if f == 1 else torch.nn.functional.interpolate(
        image[None], size=(max(1, round(h * f)), max(1, round(w * f))), mode="bilinear", antialias=True,
        align_corners=False)[0]
    arr = (small.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    boxes = _face_detector()(np.ascontiguousarray(arr), 1)
    if len(boxes):
        b = max(boxes, key=lambda b: b.area())
        bw = (b.right() - b.left()) / f
        side = CROP_SCALE * bw
        cx, cy = (b.left() + b.right()) / 2 / f, (b.top() + b.bottom()) / 2 / f - CROP_SHIFT_UP * bw
    else:
        side = min(h, w)
        cx, cy = w / 2, h / 2
    return int(round(cx - side / 2)), int(round(cy - side / 2)), int(round(side)), bool(len(boxes))


def crop_face(image: torch.Tensor, size: int = 112) -> tuple[torch.Tensor, bool]:
    """Detect the largest face in a ``3 x H x W`` [0, 1] photo and crop it like the shipped
    faces (``face_box``; borders padded by edge replication).

    Returns ``(3 x size x size crop, found)``; without a detected face the central square
    is used and ``found`` is False.
    """
    x0, y0, s, found = face_box(image)
    h, w = image.shape[1:]
    pad = max(0, -x0, -y0, x0 + s - w, y0 + s - h)
    padded = torch.nn.functional.pad(image[None], (pad,) * 4, mode="replicate")[0] if pad else image
    crop = padded[:, y0 + pad:y0 + pad + s, x0 + pad:x0 + pad + s]
    crop = torch.nn.functional.interpolate(crop[None], size=(size, size), mode="bicubic",
                                           align_corners=False, antialias=True)[0].clamp(0, 1)
    return crop, found


@lru_cache(maxsize=1)
def _face_detector():
    import dlib

    return dlib.get_frontal_face_detector()
