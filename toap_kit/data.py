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
    "load_faceset",
    "load_folder",
    "load_image",
    "make_protocol",
    "retrieval_sets",
    "sha256_file",
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
    by_id: dict[int, list[int]] = {}
    for i in sorted(range(len(faces)), key=lambda i: faces.paths[i]):
        by_id.setdefault(int(faces.labels[i]), []).append(i)
    for ident, idx in by_id.items():
        if len(idx) <= n_queries:
            raise ValueError(f"identity {faces.identities[ident]} has {len(idx)} images, "
                             f"needs more than n_queries={n_queries}")
    train = [i for t in train_ids for i in by_id[t][n_queries:]]
    source = eval_ids if kind == "open" else train_ids
    queries = [i for t in source for i in by_id[t][:n_queries]]
    database = [i for t in source for i in by_id[t][n_queries:]]
    return Protocol(kind, [faces.identities[t] for t in train_ids],
                    [faces.identities[t] for t in eval_ids], train, queries, database, n_distractors)


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


def retrieval_sets(protocol: Protocol, faces: FaceSet, distractors: FaceSet) -> RetrievalSets:
    """Images and labels of ``protocol``'s queries and database (faces + all distractors)."""
    if len(distractors) != protocol.n_distractors:
        raise ValueError(f"protocol expects {protocol.n_distractors} distractors, got {len(distractors)}")
    q = torch.as_tensor(protocol.queries)
    d = torch.as_tensor(protocol.database_faces)
    n = len(distractors)
    return RetrievalSets(
        faces.images[q], faces.labels[q],
        torch.cat([faces.images[d], distractors.images]),
        torch.cat([faces.labels[d], -1 - torch.arange(n)]),
        torch.cat([d, -1 - torch.arange(n)]))
