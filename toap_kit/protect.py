"""Protect one photo: find every face, add a shipped perturbation, keep the file's format.

    >>> from PIL import Image
    >>> from toap_kit import protect
    >>> from toap_kit.perturbation import Perturbation
    >>> p = Perturbation.load(protect.STRENGTHS["mid"])              # "toap-mid", eps 8/255
    >>> out = protect.protect_image(Image.open("me.jpg"), p)         # every face, full resolution
    >>> out.boxes                                                    # [(x0, y0, side), ...]

Files and folders (resumable batches, the manifest) are ``toap_kit.batch``; the command line is
``toap protect`` (``toap_kit.cli``); ``toap_kit.verify`` checks a platform's copy,
``toap_kit.odd_inputs`` holds the bad-input corpus.

**How one photo is protected** (``protect_image``):

1. EXIF orientation is applied to the pixels (a phone photo is protected upright).
2. Every face is found with the kit's detector (dlib's HOG detector, as ``data.crop_face``
   uses it) on a copy whose long side is at most ``DETECT_SIDE`` = 500 px; each detector box is
   mapped back to the photo and turned into the square the kit's cropper cuts
   (``data.CROP_SCALE``, ``data.CROP_SHIFT_UP``): the square a face search engine would see.
   (On a bigger photo the copy is made by Pillow, which is fast at 12 megapixels.)
   Smallest face found: dlib's window is 80 px and the copy is upsampled 2x, so a face whose
   detector box is about 40 px *on the copy* (about 8% of the long side of a big photo, 40 px
   on a photo of at most 500 px) or larger; smaller faces are not protected (reported as no
   face). Squares under ``MIN_FACE_SIDE`` = 16 px are ignored.
   ``detect=False`` takes the image as one face: its central square (the square the cropper
   falls back to without a face; the whole image for a square face crop).
3. The universal perturbation (``3 x 112 x 112``, pixel units of [0, 1]) is resized
   (bilinear) to each square, multiplied by a feathered mask (1 inside, a raised cosine to 0
   over the outer ``FEATHER`` = 10% of the square, so there is no seam) and added to the colour
   channels at the photo's full resolution. The result is clipped to [0, 1] *and* to the
   eps-ball around the original pixels (faces whose squares overlap never add up beyond eps),
   then rounded: ``|protected - original| <= eps`` holds exactly on the stored pixels.
   Pixels outside the squares, and the alpha channel, are untouched.
4. With ``refine_steps`` (``toap protect --refine``), step 3 adds each face's own delta instead:
   the face squares (of any sizes) are cut (as the cropper cuts them), each resized to
   ``refine.WORK_SIDE``, and refined together against dlib's network from the universal delta
   (``refine.refine_deltas``: already feathered, within the same eps, under the refinement's
   PSNR floor), each resized back to its square; the same clipping and rounding follow.

Measured for this module (issue 12; ``docs/experiments/protect_jpeg_quality.py`` prints these
numbers), with ``evaluate.Evaluator`` on the open-set protocol's
first 60 queries (``sets.subset(60)``: their 20 people's photos + 2,000 distractors), query
setting, ``toap-mid-mixed`` (the ladder's ``toap-mid`` then), relative drop of tie-aware mAP@all, e.g.
``Evaluator(zoo.load("dlib_itq_32"), sets)(protect, "query", "jpeg:95")``: the 10% feather
costs no protection on ``dlib_itq_32`` (0.357 without feather, 0.340 with; 0.360 / 0.373 after
JPEG q95; 5% feather: 0.357 / 0.365: all within the noise of 60 queries).

**Image modes** (the output keeps the mode): ``RGB``/``RGBA`` as above; greyscale ``L``/``LA``
and 16-bit ``I;16``/``I`` get what "protect in RGB, convert back" gives, i.e. the luma-weighted
sum of the delta's channels (ITU-R 601 weights, what Pillow's ``convert("L")`` uses; still
within eps); ``CMYK`` gets ``-delta`` on C, M and Y (with K = 0, Pillow's CMYK -> RGB is
R = 255 - C), K untouched; palette images (``P``, ``PA``) come back as ``RGB``/``RGBA`` (256 colours cannot hold
the perturbation), bilevel ``1`` as ``L``. Other modes (``F``, ``YCbCr``, ``LAB``, ...) are
refused with a clear message.

**A photo file** (``open_photo`` reads it, ``_save`` writes the protected copy): the output keeps
the input's format, read from the content (a PNG named ``.jpg`` stays a PNG):

- JPEG at ``DEFAULT_JPEG_QUALITY`` = 95, chroma 4:4:4. Measured (``toap-mid-mixed``, 60 open-set queries,
  query setting, relative mAP drop, JPEG applied to clean and protected alike):
  ``dlib_itq_32`` none 0.357, q95 0.360, q90 0.380, q85 0.416, q80 0.410, q75 0.402;
  ``dlib_itq_64`` none 0.313, q95 0.307, q90 0.327, q85 0.359, q80 0.332, q75 0.312; our q95
  then Facebook's profile: 0.344 (4:2:0) and 0.386 (4:4:4). The protection survives 75..95;
  95 is chosen for the photo's own quality and because the platform re-encodes once more. A
  lower quality is allowed with a warning (below 75 it was not measured).
- PNG, TIFF (lossless compression kept, else deflate), BMP: lossless. WebP: lossless.
- GIF (256 colours) and animated or multi-page images are refused with a clear message.
- Metadata: EXIF orientation is applied to the pixels; by default no EXIF at all is written
  (GPS, camera serial, owner, dates: gone), nor XMP, comments or PNG text; the ICC colour
  profile and the DPI are kept. ``keep_exif=True`` writes the original EXIF back with the
  orientation set to 1 (the pixels are already upright).
- Bit depth: Pillow reads 16-bit RGB and RGBA (PNG, TIFF) as 8 bits a channel, so such a photo is
  written with 8 bits a channel; ``open_photo`` reads the depth stored in the file (PNG's IHDR,
  TIFF's BitsPerSample) and reports the change (``_Source.bit_depth`` = ``"16 -> 8"``, a note).
  16-bit greyscale is kept.
- Only regular files are read: a FIFO, a device (``/dev/zero``), a socket, or a link to one is
  refused before a byte is read (reading one may never end).

"""
from __future__ import annotations

import math
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .data import CROP_SCALE, CROP_SHIFT_UP, _face_detector
from .perturbation import FEATHER, Perturbation, feather_mask

__all__ = ["DEFAULT_JPEG_QUALITY", "DEFAULT_STRENGTH", "DETECT_SIDE", "FEATHER", "MAX_PIXELS", "MIN_FACE_SIDE",
           "MIN_MEASURED_QUALITY", "ProtectError", "ProtectedPhoto", "STRENGTHS", "TMP_TAG", "face_boxes",
           "face_crop", "feather_mask", "load_perturbation", "open_photo", "protect_image"]

STRENGTHS = {"low": "toap-low", "mid": "toap-mid", "high": "toap-high"}
"""``-m low|mid|high``: the shipped TOAP perturbations at eps 4, 8 and 12 over 255."""
DEFAULT_STRENGTH = "mid"
DEFAULT_JPEG_QUALITY = 95
"""JPEG quality of protected JPEGs (measured: see the module docstring)."""
MIN_MEASURED_QUALITY = 75
"""Lowest JPEG quality at which the kit measured the protection (below it: not measured)."""
DETECT_SIDE = 500
"""Faces are detected on a copy whose long side is at most this many pixels (as ``data.face_box``)."""
MIN_FACE_SIDE = 16
"""Face squares smaller than this (pixels of the photo) are not protected."""
MAX_PIXELS = 100_000_000
"""Photos with more pixels are refused (a decompression bomb: a small file that decodes to GBs)."""
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, Pillow's RGB -> L
TMP_TAG = ".toap-tmp-"
"""In the name of every temporary file the kit writes before an atomic rename (``.NAME.toap-tmp-PID``)."""
_WRITABLE = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WEBP", "TIFF": "TIFF", "BMP": "BMP"}
_LOSSLESS_TIFF = {"raw", "tiff_lzw", "tiff_deflate", "tiff_adobe_deflate", "packbits"}
_ORIENTATION = 0x0112
_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class ProtectError(ValueError):
    """A clear, one-line reason why a photo (or a whole run) cannot be protected."""


@dataclass
class ProtectedPhoto:
    """What ``protect_image`` returns.

    Attributes:
        image: the protected photo, upright (EXIF orientation applied), same size and mode as
            the input after that (palette images come back as RGB/RGBA, 1-bit as L); its
            ``info`` holds only the ICC profile and DPI (no EXIF, XMP or text).
        boxes: ``(x0, y0, side)`` of each protected face square in the photo's pixels, largest
            first (a square may reach outside the photo; only its inside is changed).
        faces_found: at least one face square was protected (always True with ``detect=False``,
            where the central square is taken as the face).
        notes: anything worth telling the user (mode changed, EXIF unreadable, ...).
    """

    image: Image.Image
    boxes: list[tuple[int, int, int]]
    faces_found: bool
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- one photo
def _8bit(image: Image.Image) -> Image.Image:
    """``image`` in a mode Pillow resizes and turns into RGB (16-bit: its top byte)."""
    if image.mode.startswith("I"):
        return Image.fromarray((np.asarray(image).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8))
    return image if image.mode in ("RGB", "RGBA", "L", "LA", "CMYK") else image.convert("RGB")


def _detection_rgb(image: Image.Image, detect_side: int) -> tuple[np.ndarray, float]:
    """``(H' x W' x 3 uint8 copy for the detector, scale f)``, long side at most ``detect_side``."""
    w, h = image.size
    f = min(1.0, detect_side / max(w, h))
    im = _8bit(image)
    if f < 1:
        im = im.resize((max(1, round(w * f)), max(1, round(h * f))), Image.BILINEAR, reducing_gap=3.0)
    return np.ascontiguousarray(np.asarray(im.convert("RGB"))), f


def face_boxes(image: Image.Image, detect_side: int = DETECT_SIDE) -> list[tuple[int, int, int]]:
    """Every face of ``image`` (any PIL mode, upright) as the square the kit's cropper cuts:
    ``[(x0, y0, side), ...]`` in the photo's pixels, largest first (``data.face_box`` gives only
    the largest; on a photo of at most ``detect_side`` px they agree exactly; on a bigger one the
    detection copy is made by Pillow, not torch, which is much faster on 12 megapixels and now
    and then moves a box by one detector step).

    The detector runs on a copy whose long side is at most ``detect_side`` px, upsampled 2x
    (dlib's second argument 1, as ``data.face_box``); boxes are mapped back. Photos under 16 px
    a side give ``[]``.
    """
    w, h = image.size
    if min(w, h) < 16:
        return []
    arr, f = _detection_rgb(image, detect_side)
    boxes = []
    for b in sorted(_face_detector()(arr, 1), key=lambda b: -b.area()):
        bw = (b.right() - b.left()) / f
        side = CROP_SCALE * bw
        cx, cy = (b.left() + b.right()) / 2 / f, (b.top() + b.bottom()) / 2 / f - CROP_SHIFT_UP * bw
        box = (int(round(cx - side / 2)), int(round(cy - side / 2)), int(round(side)))
        if box[2] >= MIN_FACE_SIDE:
            boxes.append(box)
    return boxes


def _upright(image: Image.Image, notes: list[str]) -> Image.Image:
    """A copy of ``image`` with its EXIF orientation applied to the pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # Pillow only warns on a corrupt EXIF block
            return ImageOps.exif_transpose(image)
    except Exception as e:  # noqa: BLE001 - a broken EXIF block must not stop the protection
        notes.append(f"EXIF orientation unreadable ({type(e).__name__}): pixels kept as stored")
        return image.copy()


def _working(image: Image.Image, notes: list[str]) -> tuple[Image.Image, str, float]:
    """``(image in a mode we can protect, kind, full scale)``; kind is ``rgb``, ``grey`` or ``cmyk``."""
    mode = image.mode
    if mode in ("P", "PA"):
        alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if alpha else "RGB")
        notes.append(f"palette image written as {image.mode} (a 256-colour palette cannot hold the perturbation)")
    elif mode == "1":
        image = image.convert("L")
        notes.append("1-bit image written as 8-bit greyscale (L)")
    mode = image.mode
    if mode in ("RGB", "RGBA", "RGBX"):
        return image, "rgb", 255.0
    if mode in ("L", "LA"):
        return image, "grey", 255.0
    if mode in ("I;16", "I;16L", "I;16B", "I"):
        return image, "grey", 65535.0
    if mode == "CMYK":
        return image, "cmyk", 255.0
    raise ProtectError(f"unsupported image mode {mode!r} (supported: RGB, RGBA, L, LA, 16-bit grey, CMYK, palette)")


def _central_square(w: int, h: int) -> tuple[int, int, int]:
    """The square ``data.face_box`` falls back to without a face (same rounding)."""
    s = min(w, h)
    return int(round(w / 2 - s / 2)), int(round(h / 2 - s / 2)), s


def _patch(perturbation: Perturbation, side: int) -> np.ndarray:
    """``side x side x 3`` float32: the delta resized to the square, times the feather mask.

    Enlarging uses OpenCV's bilinear resize, the same half-pixel bilinear maths as
    ``Perturbation.resized`` (which it matches to 1e-4 of a grey level) and ten times faster on
    a 12-megapixel photo's face; shrinking uses ``Perturbation.resized`` (antialiased). Both are
    convex combinations of the delta's values, so the eps-ball holds."""
    if side > max(perturbation.delta.shape[-2:]):
        d = cv2.resize(np.ascontiguousarray(perturbation.delta.permute(1, 2, 0).numpy()), (side, side),
                       interpolation=cv2.INTER_LINEAR)
    else:
        d = perturbation.resized(side, side).permute(1, 2, 0).numpy()
    return d * feather_mask(side)[:, :, None]


def _square(rgb: Image.Image, box: tuple[int, int, int]) -> np.ndarray:
    """``side x side x 3`` uint8: the face square ``box = (x0, y0, side)`` of an RGB photo,
    edge-replicated where it leaves the photo (as ``data.crop_face`` cuts it)."""
    x0, y0, s = box
    w, h = rgb.size
    inside = np.asarray(rgb.crop((max(0, x0), max(0, y0), min(w, x0 + s), min(h, y0 + s))))
    pads = ((max(0, -y0), max(0, y0 + s - h)), (max(0, -x0), max(0, x0 + s - w)), (0, 0))
    return np.pad(inside, pads, mode="edge") if any(sum(p) for p in pads) else inside


def _resized(t: torch.Tensor, side: int) -> torch.Tensor:
    """``N x 3 x S x S`` resized to ``side`` (bilinear; antialiased when shrinking)."""
    if t.shape[-1] == side:
        return t
    return torch.nn.functional.interpolate(t, size=(side, side), mode="bilinear", align_corners=False,
                                           antialias=side < t.shape[-1])


def _refined_patches(image: Image.Image, boxes: list[tuple[int, int, int]], perturbation: Perturbation, steps: int,
                     seed: int, recognizer, progress: bool, against: Sequence[str] = ("dlib",)) -> list[np.ndarray]:
    """Each face square's own refined delta (``side x side x 3``, feathered, pixel units): each
    square (of any size: a group photo's faces differ) is resized on its own to
    ``refine.WORK_SIDE``, all are refined together from the universal delta (``refine_deltas``
    batches them), then each delta is resized back to its square. Only one full-size square is
    held as floats at a time."""
    from . import refine  # the refinement loads dlib's network: only when asked for

    if not boxes:
        return []
    rgb = _8bit(image).convert("RGB")
    side = refine.WORK_SIDE
    faces = torch.cat([_resized(torch.tensor(_square(rgb, b)).permute(2, 0, 1)[None].float() / 255, side)
                       for b in boxes]).clamp(0, 1)
    config = refine.config_for(perturbation.eps, steps, seed)
    init = perturbation.resized(side, side)[None].expand(len(boxes), -1, -1, -1)
    deltas = refine.refine_deltas(faces, config=config, recognizer=recognizer, init=init, progress=progress,
                                  against=against)
    out = []
    for d, (_, _, s) in zip(deltas, boxes):
        big = (cv2.resize(np.ascontiguousarray(d.permute(1, 2, 0).numpy()), (s, s), interpolation=cv2.INTER_LINEAR)
               if s > side else _resized(d[None], s)[0].permute(1, 2, 0).numpy())
        out.append(np.clip(big, -perturbation.eps, perturbation.eps))
    return out


def protect_image(image: Image.Image, perturbation: Perturbation, detect: bool = True, refine_steps: int = 0,
                  seed: int = 0, recognizer=None, progress: bool = False,
                  against: Sequence[str] = ("dlib",)) -> ProtectedPhoto:
    """Add ``perturbation`` to every face of ``image`` at its full resolution.

    Args:
        image: a PIL photo, any size (see the module docstring for the modes); not modified.
        perturbation: the universal delta (pixel units of [0, 1], ``|delta| <= eps``).
        detect: find the faces (dlib's HOG detector); False: the central square is the face.
        refine_steps: 0: the universal delta; N > 0: each face gets its own delta, refined for
            N steps against the networks ``against`` (``refine.refine_deltas``, same eps as
            ``perturbation``, the refinement's PSNR floor, started from the universal delta).
        seed: the refinement's seed; ``recognizer``: a loaded ``refine.KnownRecognizer`` to reuse
            (of the same networks); ``progress``: a tqdm bar for the refinement.
        against: the refinement's networks (``recognizers.NAMES``; default dlib's).

    Returns:
        ``ProtectedPhoto``; without a face, its image is the upright photo unchanged and
        ``faces_found`` is False. ``|image - upright input| <= eps`` (pixel units) everywhere.

    Raises:
        ProtectError: an image mode that cannot carry the perturbation.
    """
    notes: list[str] = []
    icc, dpi = image.info.get("icc_profile"), image.info.get("dpi")
    out, kind, scale = _working(_upright(image, notes), notes)
    w, h = out.size
    boxes = face_boxes(out) if detect else [_central_square(w, h)]
    rects = [(max(0, x0), max(0, y0), min(w, x0 + s), min(h, y0 + s)) for x0, y0, s in boxes]
    originals = [np.asarray(out.crop(r)) for r in rects]  # before any square changes (squares may overlap)
    lim = math.floor(perturbation.eps * scale + 1e-6)  # the eps-ball in stored integer levels
    patches = (_refined_patches(out, boxes, perturbation, refine_steps, seed, recognizer, progress, against)
               if refine_steps
               else [_patch(perturbation, s) for _, _, s in boxes])
    for (x0, y0, s), r, before, patch in zip(boxes, rects, originals, patches):
        if r[0] >= r[2] or r[1] >= r[3]:
            continue
        p = patch[r[1] - y0:r[3] - y0, r[0] - x0:r[2] - x0]
        if kind == "grey":
            p = p @ LUMA  # what "protect in RGB, convert back to L" adds
        step = np.clip(np.rint(p * (-scale if kind == "cmyk" else scale)), -lim, lim).astype(np.int32)
        b = before.astype(np.int32).reshape(before.shape[0], before.shape[1], -1)
        now = np.asarray(out.crop(r)).astype(np.int32).reshape(b.shape)  # other squares may overlap
        if kind == "grey":
            now[..., 0] += step
        else:  # rgb; cmyk gets -delta on C, M, Y (C = 255 - R: a brighter red is less cyan)
            now[..., :3] += step
        np.clip(now, b - lim, b + lim, out=now)  # overlapping squares never add up beyond eps
        np.clip(now, 0, int(scale), out=now)
        new = now.astype(before.dtype).reshape(before.shape)
        out.paste(Image.frombytes(out.mode, (r[2] - r[0], r[3] - r[1]), new.tobytes()), r[:2])
    out.info = {k: v for k, v in (("icc_profile", icc), ("dpi", dpi)) if v is not None}
    return ProtectedPhoto(out, boxes, bool(boxes), notes)


# ---------------------------------------------------------------- files
@dataclass
class _Source:
    """What the writer needs to know about the file a photo came from."""

    format: str
    icc_profile: bytes | None
    exif: Image.Exif | None
    dpi: tuple | None
    compression: str | None
    notes: list[str] = field(default_factory=list)  # what Pillow warned about while reading
    bit_depth: str | None = None  # "16 -> 8": the file stores 16-bit colour, Pillow gave 8 bits a channel


def _file_problem(path: Path) -> str | None:
    """Why ``path`` (a link followed) is not a file to read, or None for a regular file. Nothing
    is opened: reading a FIFO or ``/dev/zero`` never ends."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "no such file or folder" + (" (a link to nothing)" if path.is_symlink() else "")
    except OSError as e:  # a path too long for the system, a loop of links, a folder we may not enter, ...
        return f"cannot read it: {e.strerror or e}"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not an image file"
    kind = next((name for is_kind, name in _NOT_REGULAR if is_kind(mode)), "an unknown kind of file")
    return f"not a regular file: {kind}"


def _stored_bits(path: Path, im: Image.Image) -> int:
    """Bits per channel the file stores (PNG's IHDR, TIFF's BitsPerSample; 8 for other formats)."""
    if im.format == "PNG":
        with open(path, "rb") as f:
            head = f.read(26)  # signature (8), IHDR length and type (8), width, height (8), bit depth (1)
        return head[24] if len(head) == 26 and head[12:16] == b"IHDR" else 8
    if im.format == "TIFF":
        bits = im.tag_v2.get(258, 8)
        return max((b for b in (bits if isinstance(bits, tuple) else (bits,)) if isinstance(b, int)), default=8)
    return 8


def open_photo(path: str | Path) -> tuple[Image.Image, _Source]:
    """Read an image file fully (first frame of an MPO), checking everything that can be wrong.

    A 16-bit colour file (PNG, TIFF) comes back with 8 bits a channel, as Pillow reads it; the
    ``_Source`` says so (``bit_depth`` ``"16 -> 8"`` and a note).

    Raises:
        ProtectError: missing file, a folder, not a regular file (FIFO, device, socket: refused
            before reading), empty, not an image, truncated or corrupt, animated or multi-page,
            GIF, a format that cannot be written back, or more than ``MAX_PIXELS`` pixels (the
            message says which).
    """
    path = Path(path)
    problem = _file_problem(path)
    if problem:
        raise ProtectError(problem)
    try:
        if path.stat().st_size == 0:
            raise ProtectError("empty file (0 bytes)")
        with warnings.catch_warnings(record=True) as caught:  # e.g. a corrupt EXIF block: a note, not noise
            warnings.simplefilter("always")
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS is our limit
            with Image.open(path) as im:
                fmt = im.format or "?"
                frames = getattr(im, "n_frames", 1)
                if frames > 1 and fmt == "TIFF":
                    raise ProtectError(f"multi-page TIFFs are not supported ({frames} pages): save each page apart")
                if frames > 1 and fmt != "MPO":  # MPO: a phone's JPEG with a preview picture; the first is kept
                    raise ProtectError(f"animated images are not supported ({frames} frames in this {fmt}): "
                                       "export the frame you want as PNG or JPEG")
                if fmt == "GIF":
                    raise ProtectError("GIF stores at most 256 colours, too few to carry the protection: "
                                       "convert it to PNG first")
                if fmt not in _WRITABLE:
                    raise ProtectError(f"unsupported image format {fmt} (supported: JPEG, PNG, WebP, TIFF, BMP)")
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ProtectError(f"image too large: {w}x{h} = {w * h / 1e6:.0f} megapixels "
                                       f"(limit {MAX_PIXELS / 1e6:.0f}; a decompression bomb?)")
                im.load()
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("error", UserWarning)  # Pillow warns on a corrupt EXIF block
                        exif = im.getexif()
                except Exception:  # noqa: BLE001 - an unreadable EXIF block is dropped, not fatal
                    exif = None
                src = _Source(fmt, im.info.get("icc_profile"), exif, im.info.get("dpi"), im.info.get("compression"))
                bits = _stored_bits(path, im)
            src.notes = sorted({f"Pillow: {' '.join(str(w.message).split())}" for w in caught})
            if bits > 8 and not im.mode.startswith("I"):  # 16-bit greyscale (I;16) keeps its depth
                src.bit_depth = f"{bits} -> 8"
                src.notes.append(f"{bits}-bit {im.mode} written with 8 bits a channel (Pillow reads "
                                 f"{bits}-bit colour as 8 bits)")
            return im, src
    except ProtectError:
        raise
    except Image.DecompressionBombError as e:
        raise ProtectError(f"image too large (a decompression bomb?): {e}") from None
    except UnidentifiedImageError:
        raise ProtectError("not an image file Pillow can read (unknown format or corrupt header)") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ProtectError(f"cannot decode the image: {msg}") from None


def _save(img: Image.Image, f, src: _Source, jpeg_quality: int, keep_exif: bool) -> None:
    """Encode ``img`` into the open binary file ``f`` in the source's format."""
    fmt = _WRITABLE[src.format]
    kw: dict = {}
    if src.icc_profile and fmt != "BMP":
        kw["icc_profile"] = src.icc_profile
    if src.dpi and fmt != "WEBP":
        kw["dpi"] = src.dpi
    if keep_exif and src.exif is not None and len(src.exif) and fmt != "BMP":
        exif = Image.Exif()
        exif.load(src.exif.tobytes())
        if _ORIENTATION in exif:
            exif[_ORIENTATION] = 1
        kw["exif"] = exif.tobytes()
    if fmt == "JPEG":
        kw.update(quality=jpeg_quality, subsampling=0)
    elif fmt == "WEBP":
        kw.update(lossless=True)
    elif fmt == "TIFF":
        kw["compression"] = src.compression if src.compression in _LOSSLESS_TIFF else "tiff_deflate"
    img.save(f, format=fmt, **kw)


def load_perturbation(name_or_path: str | Path | None = None, strength: str | None = None) -> Perturbation:
    """The perturbation for ``strength`` (low/mid/high) or ``name_or_path`` (a shipped name or a
    file); default: ``DEFAULT_STRENGTH``. Raises ``ProtectError`` with the choices."""
    if name_or_path is not None and strength is not None:
        raise ProtectError("give either a strength (-m) or a perturbation, not both")
    if name_or_path is None:
        strength = strength or DEFAULT_STRENGTH
        if strength not in STRENGTHS:
            raise ProtectError(f"unknown strength {strength!r}: choose low, mid or high")
        name_or_path = STRENGTHS[strength]
    try:
        return Perturbation.load(name_or_path)
    except FileNotFoundError:
        raise ProtectError(f"no perturbation {str(name_or_path)!r} "
                           f"(shipped: {', '.join(Perturbation.shipped())})") from None
    except (ValueError, OSError, KeyError) as e:
        raise ProtectError(f"perturbation {str(name_or_path)!r} cannot be used: {e}") from None


def face_crop(image: Image.Image, size: int = 112) -> tuple[torch.Tensor, bool]:
    """``data.crop_face`` for a PIL photo of any size, fast: the largest face's square
    (``face_boxes``; without a face the central square), edge-replicated where it leaves the
    photo, resized (bicubic, antialiased) to ``3 x size x size`` in [0, 1]. Only the square is
    converted to floats, so a 12-megapixel photo costs little more than its detection."""
    rgb = _8bit(image).convert("RGB")
    boxes = face_boxes(rgb)
    square = _square(rgb, boxes[0] if boxes else _central_square(*rgb.size))
    t = torch.from_numpy(np.array(square, dtype=np.float32)).permute(2, 0, 1).div_(255)
    crop = torch.nn.functional.interpolate(t[None], size=(size, size), mode="bicubic", align_corners=False,
                                           antialias=True)[0].clamp(0, 1)
    return crop, bool(boxes)
