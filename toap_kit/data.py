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
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DATA_DIR",
    "FaceSet",
    "PIXEL_TOL",
    "Protocol",
    "RetrievalSets",
    "check_pixels",
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


PIXEL_TOL = 1e-6
"""Slack allowed by ``check_pixels`` outside [0, 1] (float rounding)."""


def check_pixels(x: torch.Tensor, name: str = "image", ndim: tuple[int, ...] = (3, 4)) -> torch.Tensor:
    """Check that ``x`` holds pixels the kit can use; return it as float32.

    ``x`` must be a floating-point tensor of shape ``3 x H x W`` or ``N x 3 x H x W`` (the
    ranks allowed by ``ndim``) with finite values in [0, 1] (up to ``PIXEL_TOL``). Other float
    dtypes (float64, float16) are converted to float32; ``x`` itself is never modified.

    Raises:
        TypeError: ``x`` is not a tensor, or not floating point (uint8: divide by 255 first).
        ValueError: wrong shape, NaN or infinite values, or values outside [0, 1]; the message
            names ``name``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of pixels in [0, 1], got {type(x).__name__}")
    if not x.is_floating_point():
        hint = " (uint8 pixels: use x.float() / 255)" if x.dtype == torch.uint8 else ""
        raise TypeError(f"{name} must be a float tensor with pixels in [0, 1], got dtype {x.dtype}{hint}")
    shapes = " or ".join("3 x H x W" if n == 3 else "N x 3 x H x W" for n in ndim)
    if x.ndim not in ndim or x.shape[-3] != 3:
        raise ValueError(f"{name} must be {shapes}, got shape {tuple(x.shape)}")
    x = x.float()
    if x.numel() == 0:
        return x
    v = x.detach()
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} has {int((~torch.isfinite(v)).sum())} NaN or infinite values")
    lo, hi = float(v.min()), float(v.max())
    if lo < -PIXEL_TOL or hi > 1 + PIXEL_TOL:
        raise ValueError(f"{name} must have pixels in [0, 1], got values in [{lo:.4g}, {hi:.4g}]"
                         + (" (0..255 pixels: divide by 255)" if hi > 1.5 else ""))
    return x


_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, EOFError,
                  struct.error)


def _float_pixels(a: np.ndarray) -> np.ndarray:
    """``a`` (float pixels, expected in [0, 1]) checked and clipped to [0, 1], as float32."""
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError("the image has NaN or infinite pixels")
    if a.size and (a.min() < -PIXEL_TOL or a.max() > 1 + PIXEL_TOL):
        raise ValueError(f"float pixels must be in [0, 1], found [{a.min():.4g}, {a.max():.4g}] "
                         "(rescale the image to [0, 1] first)")
    return np.clip(a, 0, 1)


def _rgb(a: np.ndarray) -> np.ndarray:
    """``H x W`` (grey) or ``H x W x C`` pixels as ``H x W x 3`` (alpha dropped)."""
    if a.ndim == 2:
        return np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim == 3 and a.shape[2] in (1, 3, 4):
        return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a[:, :, :3]
    raise ValueError(f"unsupported pixel layout {a.shape}")


def _pil_pixels(im: Image.Image) -> np.ndarray:
    """``H x W x 3`` pixels of a PIL image: uint8 for 8-bit images (Pillow's RGB conversion),
    float32 in [0, 1] for 16-bit (``I;16*``: divided by 65535; 32-bit ``I`` must hold 16-bit
    values) and float (``F``: must already be in [0, 1]) images. Pillow reads 16-bit RGB PNGs
    as 8-bit RGB (the top byte), which is the same scale."""
    if im.mode == "F":
        return _rgb(_float_pixels(np.asarray(im)))
    if im.mode.startswith("I"):
        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"integer pixels outside the 16-bit range 0..65535: [{a.min()}, {a.max()}]")
        return _rgb((a / 65535.0).astype(np.float32))
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _cv2_pixels(path: Path) -> np.ndarray | None:
    """OpenCV's reading of a file Pillow cannot open (e.g. a float RGB TIFF), as
    ``_pil_pixels`` gives it; ``None`` if OpenCV cannot read it either. EXIF is not applied."""
    import cv2

    a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if a is None:
        return None
    if a.ndim == 3:
        a = a[:, :, ::-1] if a.shape[2] == 3 else (a[:, :, [2, 1, 0, 3]] if a.shape[2] == 4 else a)
    if a.dtype == np.uint8:
        return np.ascontiguousarray(_rgb(a))
    if a.dtype == np.uint16:
        return _rgb(a.astype(np.float32) / 65535)
    if a.dtype in (np.float32, np.float64):
        return _rgb(_float_pixels(a))
    raise ValueError(f"unsupported pixel type {a.dtype}")


def _decode(path: Path) -> np.ndarray:
    """The pixels of image file ``path`` upright (EXIF orientation applied), as ``_pil_pixels``
    gives them. Pillow's decompression-bomb warning (more than ``Image.MAX_IMAGE_PIXELS``
    pixels) is an error here."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                return _pil_pixels(ImageOps.exif_transpose(im))
        except UnidentifiedImageError:
            a = _cv2_pixels(path) if path.suffix.lower() in (".tif", ".tiff") else None
            if a is None:
                raise
            return a


def load_image(path: str | Path, size: int | None = None) -> torch.Tensor:
    """Read one image file as a ``3 x H x W`` float tensor in [0, 1].

    The EXIF orientation is applied (a phone photo comes out upright). 8-bit images are read
    by Pillow; 16-bit images are scaled by 1/65535; float images (``F`` TIFFs, and float RGB
    TIFFs through OpenCV) must already hold values in [0, 1].

    Args:
        path: image file (anything Pillow reads, plus the TIFFs OpenCV reads).
        size: if given, resize to ``size x size`` (Lanczos, as the shipped crops were made).

    Raises:
        FileNotFoundError: the file does not exist.
        IsADirectoryError: ``path`` is a directory.
        ValueError: the file cannot be decoded as an image, is larger than
            ``PIL.Image.MAX_IMAGE_PIXELS``, or holds NaN or out-of-range float pixels (the
            message names it).
    """
    path = Path(path)
    if size is not None and (isinstance(size, bool) or int(size) != size or size < 1):
        raise ValueError(f"size must be an integer >= 1, got {size!r}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        arr = _decode(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"image {path} is too large to load: {e} (PIL.Image.MAX_IMAGE_PIXELS "
                         "sets the limit)") from e
    except _DECODE_ERRORS as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    if arr.dtype == np.uint8:
        if size is not None:
            arr = np.asarray(Image.fromarray(arr).resize((int(size), int(size)), Image.LANCZOS))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    if size is not None:  # float pixels: resize each channel as a float image
        arr = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(arr[:, :, c])).resize(
            (int(size), int(size)), Image.LANCZOS)) for c in range(3)], axis=2).clip(0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1).contiguous()


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

    Files whose suffix is not an image suffix, and folders, are ignored; an unreadable image
    raises ``ValueError`` naming the file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    rows = [(str(p.relative_to(folder)), p.parent.name)
            for p in sorted(folder.glob("*/*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
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

    Raises:
        TypeError, ValueError: ``image`` is not float pixels in [0, 1] (``check_pixels``) or is
            smaller than 16 pixels.
    """
    image = check_pixels(image, "image", ndim=(3,))
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
    is used and ``found`` is False. Bad pixels raise as in ``face_box``.
    """
    image = check_pixels(image, "image", ndim=(3,))
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
