"""Real post-processing: what a social network does to a photo, through the real codecs.

Every operation takes a ``N x 3 x H x W`` float batch in [0, 1] (or one RGB PIL image) and
returns the same kind, computed by the real library (Pillow, OpenCV), through a round trip of
its encoded bytes for the codecs: never a simulation. Noise is drawn from a seed, so every
operation is deterministic.

Operations (``apply`` spec syntax in brackets, arguments positional after ``:``):

- ``jpeg`` (``"jpeg:75"``, ``"jpeg:75:444"``, ``"jpeg:92:420:p"``): Pillow/libjpeg, quality
  1..100, chroma ``444``/``422``/``420``, ``p`` = progressive;
- ``jpeg_cv2`` (``"jpeg_cv2:75:420"``): OpenCV's encoder, a second, independent one;
- ``webp`` (``"webp:75"``): Pillow/libwebp, lossy;
- ``resize`` (``"resize:0.5:bilinear"``): down by ``scale`` then back up to the input size;
- ``resize_max`` (``"resize_max:1080"``): Lanczos down-size so that the long side is at most
  ``max_side`` (never enlarges; changes the output size);
- ``blur`` (``"blur:1.0"``): Gaussian blur of standard deviation ``sigma`` pixels (OpenCV),
  ``0 < sigma <= BLUR_MAX_SIGMA``;
- ``noise`` (``"noise:0.02:7"``): additive Gaussian noise of std ``sigma`` in [0, 1] pixel
  units, seed ``7`` (an integer >= 0), then rounding to 8 bits;
- ``median`` (``"median:3"``): median filter of odd ``size`` in 3..``MEDIAN_MAX_SIZE`` (Pillow);
- ``crop`` (``"crop:0.9"``): central crop keeping ``fraction`` of each side, resized back
  (bicubic) to the input size;
- a platform profile by name (``"facebook"``, see ``profiles()``): resize to its maximum
  long side, then its encoder at its quality and chroma;
- sequences: ``"resize:0.5|jpeg:75"`` or a list of specs.

A spec can also be a record (``{"op": "jpeg", "quality": 75}``) or a ``Profile``;
``parse(spec)`` gives the canonical list of records, JSON-serialisable, so a random draw from
``OpSampler`` can be stored and replayed exactly with ``apply``. Every argument is checked when
the spec is parsed (a number where a number belongs, finite, in its range; a flag is one of
the listed words): a bad spec raises ``ValueError`` naming it, before any image is touched.

``straight_through(x, spec)`` runs the real operation forward and passes the gradient
through unchanged (identity) backward, for use inside losses.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import cv2
import numpy as np
import torch
from PIL import Image, ImageFilter

from .data import DATA_DIR, load_image

__all__ = ["BLUR_MAX_SIGMA", "MEDIAN_MAX_SIZE", "OPS", "OpSampler", "Profile", "StraightThrough", "apply", "blur", "calibrate_profiles", "crop",
           "from_pil", "jpeg", "jpeg_cv2", "median", "noise", "osn_sample", "parse", "profile", "profiles", "psnr", "resize",
           "resize_max", "straight_through", "to_pil", "webp"]

_SUBSAMPLING = {"444": 0, "422": 1, "420": 2}
_INTERP = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
           "lanczos": Image.LANCZOS, "area": Image.BOX}
_CV2_SAMPLING = {"444": "IMWRITE_JPEG_SAMPLING_FACTOR_444", "422": "IMWRITE_JPEG_SAMPLING_FACTOR_422",
                 "420": "IMWRITE_JPEG_SAMPLING_FACTOR_420"}
PROFILES_FILE = Path(__file__).resolve().parent / "profiles.json"
MIN_SIDE = 2
BLUR_MAX_SIGMA = 50.0
"""Largest blur sigma in pixels (kernel 301 x 301; about 3 s on a 2000 x 2000 photo)."""
MEDIAN_MAX_SIZE = 15
"""Largest median window: Pillow's median costs size**2 per pixel (15: 0.6 s on a 250 x 250
photo, 99: 20 s)."""
_FLAG_ON = ("p", "progressive", "true", "yes", "1")
_FLAG_OFF = ("baseline", "false", "no", "0")

Image_ = Union[torch.Tensor, Image.Image]
Spec = Union[str, dict, "Profile", Sequence[Any], None]


# ---------------------------------------------------------------- tensors <-> PIL
def _check(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a N x 3 x H x W tensor, got {getattr(x, 'shape', type(x))}")
    if min(x.shape[-2:]) < MIN_SIDE:
        raise ValueError(f"image too small: {x.shape[-1]}x{x.shape[-2]} pixels (W x H); "
                         f"post-processing needs at least {MIN_SIDE} pixels per side")
    if not x.is_floating_point():
        raise ValueError(f"expected a float tensor with pixels in [0, 1], got dtype {x.dtype}")


def to_pil(img: torch.Tensor) -> Image.Image:
    """``3 x H x W`` [0, 1] tensor to an RGB PIL image (rounded to 8 bits)."""
    arr = (img.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def from_pil(im: Image.Image) -> torch.Tensor:
    """RGB PIL image to a ``3 x H x W`` [0, 1] float tensor."""
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


def _map(x: Image_, fn: Callable[[Image.Image, int], Image.Image]) -> Image_:
    """Run ``fn(pil_image, index)`` on one PIL image or on every image of a batch."""
    if isinstance(x, Image.Image):
        if min(x.size) < MIN_SIDE:
            raise ValueError(f"image too small: {x.size[0]}x{x.size[1]} pixels; "
                             f"post-processing needs at least {MIN_SIDE} pixels per side")
        return fn(x.convert("RGB"), 0)
    _check(x)
    out = [from_pil(fn(to_pil(x[i]), i)) for i in range(len(x))]
    if not out:
        return x.clone()
    return torch.stack(out).to(x.device, x.dtype)


def _roundtrip(im: Image.Image, **save) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, **save)
    with Image.open(io.BytesIO(buf.getvalue())) as dec:
        return dec.convert("RGB")


# ---------------------------------------------------------------- checking arguments
def _number(v: Any, what: str, lo: float = -math.inf, hi: float = math.inf, integer: bool = False,
            lo_open: bool = False) -> Any:
    """``v`` (a number, or a number written as text) as a float (an int if ``integer``) in
    ``[lo, hi]`` (``(lo, hi]`` if ``lo_open``); else ``ValueError`` naming ``what`` and ``v``."""
    if integer:
        rule = f"an integer in {lo:g}..{hi:g}" if hi < math.inf else f"an integer >= {lo:g}"
    else:
        rule = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if isinstance(v, bool) or not isinstance(v, (int, float, str, np.integer, np.floating)):
        raise ValueError(f"{what} must be {rule}, got {v!r}")
    if isinstance(v, (int, np.integer)):
        n: Any = int(v)
    else:
        try:
            n = int(v) if integer and isinstance(v, str) and v.strip().lstrip("+-").isdigit() else float(v)
        except ValueError:
            raise ValueError(f"{what} must be {rule}, got {v!r}") from None
        if isinstance(n, float) and not math.isfinite(n):
            raise ValueError(f"{what} must be finite ({rule}), got {v!r}")
        if integer and isinstance(n, float):
            if not n.is_integer():
                raise ValueError(f"{what} must be {rule} (a whole number), got {v!r}")
            n = int(n)
    if not ((lo < n if lo_open else lo <= n) and n <= hi):
        raise ValueError(f"{what} must be {rule}, got {v!r}")
    return n


def _quality(q: Any, name: str = "quality") -> int:
    return _number(q, name, 1, 100, integer=True)


def _chroma(c: Any) -> str:
    if isinstance(c, bool) or not isinstance(c, (str, int)):
        raise ValueError(f"chroma subsampling must be one of {sorted(_SUBSAMPLING)}, got {c!r}")
    c = str(c).replace(":", "")
    if c not in _SUBSAMPLING:
        raise ValueError(f"chroma subsampling must be one of {sorted(_SUBSAMPLING)}, got {c!r}")
    return c


def _flag(v: Any, what: str = "progressive") -> bool:
    """A yes/no argument: a bool, 0/1, or one of the words ``_FLAG_ON`` / ``_FLAG_OFF``."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _FLAG_ON + _FLAG_OFF:
        return v.strip().lower() in _FLAG_ON
    raise ValueError(f"{what} must be one of {list(_FLAG_ON)} (on) or {list(_FLAG_OFF)} (off), got {v!r}")


def _scale(v: Any) -> float:
    return _number(v, "resize scale", 0, 1, lo_open=True)


def _max_side(v: Any) -> int:
    return _number(v, "max_side", MIN_SIDE, integer=True)


def _blur_sigma(v: Any) -> float:
    return _number(v, "blur sigma", 0, BLUR_MAX_SIGMA, lo_open=True)


def _noise_sigma(v: Any) -> float:
    return _number(v, "noise sigma", 0, 1)


def _seed(v: Any) -> int:
    return _number(v, "noise seed", 0, integer=True)


def _median_size(v: Any) -> int:
    try:
        n = _number(v, "median size", 3, MEDIAN_MAX_SIZE, integer=True)
    except ValueError:
        n = 0
    if n % 2 == 0:
        raise ValueError(f"median size must be an odd integer in 3..{MEDIAN_MAX_SIZE}, got {v!r}")
    return n


def _fraction(v: Any) -> float:
    return _number(v, "crop fraction", 0, 1, lo_open=True)


def _interp(name: Any) -> str:
    if not isinstance(name, str) or name not in _INTERP:
        raise ValueError(f"interpolation must be one of {sorted(_INTERP)}, got {name!r}")
    return name


# ---------------------------------------------------------------- the operations


def jpeg(x: Image_, quality: int = 75, subsampling: str = "420", progressive: bool = False) -> Image_:
    """Real JPEG through Pillow (libjpeg): encode at ``quality`` (1..100) with chroma
    ``subsampling`` (``"444"``, ``"422"``, ``"420"``), baseline or ``progressive``, and decode.

    Shape: ``N x 3 x H x W`` in [0, 1] -> same (or PIL -> PIL).
    """
    q, s, prog = _quality(quality), _chroma(subsampling), _flag(progressive)
    return _map(x, lambda im, i: _roundtrip(im, format="JPEG", quality=q, subsampling=_SUBSAMPLING[s],
                                            progressive=prog))


def jpeg_cv2(x: Image_, quality: int = 75, subsampling: str = "420") -> Image_:
    """Real JPEG through OpenCV's own encoder/decoder (independent of Pillow's settings).

    Shape: ``N x 3 x H x W`` in [0, 1] -> same (or PIL -> PIL).
    """
    q, s = _quality(quality), _chroma(subsampling)
    params = [cv2.IMWRITE_JPEG_QUALITY, q]
    if hasattr(cv2, _CV2_SAMPLING[s]):
        params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, getattr(cv2, _CV2_SAMPLING[s])]

    def run(im: Image.Image, i: int) -> Image.Image:
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(np.asarray(im)[:, :, ::-1]), params)
        if not ok:
            raise RuntimeError("OpenCV failed to encode the image as JPEG")
        return Image.fromarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1].copy())

    return _map(x, run)


def webp(x: Image_, quality: int = 75) -> Image_:
    """Real lossy WebP through Pillow (libwebp) at ``quality`` (1..100).

    Shape: ``N x 3 x H x W`` in [0, 1] -> same (or PIL -> PIL).
    """
    q = _quality(quality)
    return _map(x, lambda im, i: _roundtrip(im, format="WEBP", quality=q, method=4))


def resize(x: Image_, scale: float = 0.5, interpolation: str = "bilinear") -> Image_:
    """Down-then-up resize (Pillow): to ``scale`` (0 < scale <= 1) of each side, then back to
    the input size, both with ``interpolation``.

    Shape: ``N x 3 x H x W`` in [0, 1] -> same (or PIL -> PIL).
    """
    scale, mode = _scale(scale), _INTERP[_interp(interpolation)]

    def run(im: Image.Image, i: int) -> Image.Image:
        w, h = im.size
        small = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), mode)
        return small.resize((w, h), mode)

    return _map(x, run)


def resize_max(x: Image_, max_side: int = 1080) -> Image_:
    """Lanczos down-size so that the long side is at most ``max_side`` pixels, keeping the
    aspect ratio (what platforms do to large uploads); smaller images are returned unchanged.

    Shape: ``N x 3 x H x W`` -> ``N x 3 x H' x W'`` with ``max(H', W') <= max_side``.
    """
    m = _max_side(max_side)

    def run(im: Image.Image, i: int) -> Image.Image:
        w, h = im.size
        if max(w, h) <= m:
            return im.copy()
        r = m / max(w, h)
        return im.resize((max(1, round(w * r)), max(1, round(h * r))), Image.LANCZOS)

    return _map(x, run)


def blur(x: Image_, sigma: float = 1.0) -> Image_:
    """Gaussian blur with standard deviation ``sigma`` pixels (``0 < sigma <= BLUR_MAX_SIGMA``),
    kernel 2*ceil(3 sigma)+1, reflected borders (OpenCV ``GaussianBlur``).

    Shape: ``N x 3 x H x W`` in [0, 1] -> same (or PIL -> PIL).
    """
    sigma = _blur_sigma(sigma)
    k = 2 * math.ceil(3 * sigma) + 1
    return _map(x, lambda im, i: Image.fromarray(
        cv2.GaussianBlur(np.asarray(im), (k, k), sigma, borderType=cv2.BORDER_REFLECT_101)))


def noise(x: Image_, sigma: float = 0.02, seed: int = 0) -> Image_:
    """Additive Gaussian noise of standard deviation ``sigma`` (in [0, 1] pixel units), then
    clipping and rounding to 8 bits. Image ``i`` of a batch uses the seed ``(seed, i)``
    (``seed`` an integer >= 0).

    Shape: ``N x 3 x H x W`` in [0, 1] -> same (or PIL -> PIL).
    """
    sigma, seed = _noise_sigma(sigma), _seed(seed)

    def run(im: Image.Image, i: int) -> Image.Image:
        a = np.asarray(im, dtype=np.float64)
        a = a + np.random.default_rng([seed, i]).normal(0, sigma * 255, a.shape)
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))

    return _map(x, run)


def median(x: Image_, size: int = 3) -> Image_:
    """Median filter of odd window ``size`` (3..``MEDIAN_MAX_SIZE``) through Pillow.

    Shape: ``N x 3 x H x W`` in [0, 1] -> same (or PIL -> PIL).
    """
    size = _median_size(size)
    return _map(x, lambda im, i: im.filter(ImageFilter.MedianFilter(size)))


def crop(x: Image_, fraction: float = 0.9) -> Image_:
    """Central crop keeping ``fraction`` (0 < f <= 1) of each side, resized back (bicubic) to
    the input size (a platform's crop-and-resize, e.g. square thumbnails).

    Shape: ``N x 3 x H x W`` in [0, 1] -> same (or PIL -> PIL).
    """
    fraction = _fraction(fraction)

    def run(im: Image.Image, i: int) -> Image.Image:
        w, h = im.size
        cw, ch = max(1, round(w * fraction)), max(1, round(h * fraction))
        left, top = (w - cw) // 2, (h - ch) // 2
        return im.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BICUBIC)

    return _map(x, run)


# ---------------------------------------------------------------- platform profiles
@dataclass(frozen=True)
class Profile:
    """A platform's processing as data: resize to ``max_side`` (long side), then ``encoder``
    (``"pillow"`` or ``"opencv"``) JPEG at ``quality`` with ``chroma`` subsampling.

    ``calibrated`` tells whether the numbers were fitted on a real sample (``source`` says
    which, and what is assumed)."""

    name: str
    max_side: int
    encoder: str
    quality: int
    chroma: str
    progressive: bool
    calibrated: bool = False
    source: str = ""

    def __post_init__(self) -> None:
        if self.encoder not in ("pillow", "opencv"):
            raise ValueError(f"profile {self.name!r}: encoder must be 'pillow' or 'opencv', got {self.encoder!r}")
        try:
            _quality(self.quality)
            _chroma(self.chroma)
            _flag(self.progressive)
            _number(self.max_side, "max_side", 16, integer=True)
        except ValueError as e:
            raise ValueError(f"profile {self.name!r}: {e}") from e

    def ops(self) -> list[dict]:
        """The profile as a list of operation records."""
        enc = ({"op": "jpeg", "quality": self.quality, "subsampling": self.chroma, "progressive": self.progressive}
               if self.encoder == "pillow" else
               {"op": "jpeg_cv2", "quality": self.quality, "subsampling": self.chroma})
        return [{"op": "resize_max", "max_side": int(self.max_side)}, enc]


@lru_cache(maxsize=1)
def _load_profiles() -> dict[str, Profile]:
    raw = json.loads(PROFILES_FILE.read_text())["profiles"]
    return {p["name"]: Profile(**p) for p in raw}


def profiles() -> dict[str, Profile]:
    """The shipped platform profiles (``toap_kit/profiles.json``), by name."""
    return dict(_load_profiles())


def profile(x: Image_, which: str | Profile | dict) -> Image_:
    """Apply a platform profile (by name, ``Profile`` or record) with the real codec."""
    p = _as_profile(which)
    return apply(x, p.ops())


def _as_profile(which: str | Profile | dict) -> Profile:
    if isinstance(which, Profile):
        return which
    if isinstance(which, dict):
        try:
            return Profile(**{k: v for k, v in which.items() if k != "op"})
        except TypeError as e:
            raise ValueError(f"bad profile record {which!r}: {e}") from e
    table = _load_profiles()
    if not isinstance(which, str) or which not in table:
        raise ValueError(f"unknown platform profile {which!r}; known: {sorted(table)}")
    return table[which]


# ---------------------------------------------------------------- specs
@dataclass(frozen=True)
class _OpDef:
    fn: Callable[..., Image_]
    params: tuple[str, ...]
    cast: tuple[Callable[[Any], Any], ...]


OPS: dict[str, _OpDef] = {
    "jpeg": _OpDef(jpeg, ("quality", "subsampling", "progressive"), (_quality, _chroma, _flag)),
    "jpeg_cv2": _OpDef(jpeg_cv2, ("quality", "subsampling"), (_quality, _chroma)),
    "webp": _OpDef(webp, ("quality",), (_quality,)),
    "resize": _OpDef(resize, ("scale", "interpolation"), (_scale, _interp)),
    "resize_max": _OpDef(resize_max, ("max_side",), (_max_side,)),
    "blur": _OpDef(blur, ("sigma",), (_blur_sigma,)),
    "noise": _OpDef(noise, ("sigma", "seed"), (_noise_sigma, _seed)),
    "median": _OpDef(median, ("size",), (_median_size,)),
    "crop": _OpDef(crop, ("fraction",), (_fraction,)),
}
"""The real operations by name: function, positional parameter names of the spec string, and
the checker of each parameter (text or value in, checked value out, else ``ValueError``)."""


def _record(op: Any, args: dict, spec: Any) -> dict:
    """The canonical record of operation ``op`` with arguments ``args`` (each checked and
    converted by its ``OPS`` checker); ``ValueError`` naming ``spec`` if one is bad."""
    if not isinstance(op, str) or op not in OPS:
        raise ValueError(f"unknown operation {op!r} in {spec!r}; known: {sorted(OPS)} or 'profile'")
    d = OPS[op]
    unknown = set(args) - set(d.params)
    if unknown:
        raise ValueError(f"operation {op!r} has no parameter(s) {sorted(unknown)}; it takes {d.params}")
    try:
        return {"op": op, **{p: c(args[p]) for p, c in zip(d.params, d.cast) if p in args}}
    except ValueError as e:
        raise ValueError(f"post-processing spec {spec!r}: {e}") from e


def _records(ops: list[dict], spec: Any) -> list[dict]:
    return [_record(r["op"], {k: v for k, v in r.items() if k != "op"}, spec) for r in ops]


def _parse_one(spec: Any) -> list[dict]:
    if spec is None:
        return []
    if isinstance(spec, Profile):
        return _records(spec.ops(), spec)
    if isinstance(spec, dict):
        op = spec.get("op")
        if op == "profile":
            return _records(_as_profile(spec["name"] if "name" in spec and len(spec) <= 2 else spec).ops(), spec)
        return [_record(op, {k: v for k, v in spec.items() if k != "op"}, spec)]
    if isinstance(spec, str):
        if "|" in spec:
            return [r for part in spec.split("|") for r in _parse_one(part.strip())]
        s = spec.strip().lower()
        if s in ("", "none", "identity"):
            return []
        if s in _load_profiles():
            return _records(_load_profiles()[s].ops(), spec)
        name, *args = s.split(":")
        if name not in OPS:
            raise ValueError(f"unknown post-processing spec {spec!r}; try 'none', 'jpeg:75', 'jpeg:90:444', "
                             f"'resize:0.5', 'facebook', or one of {sorted(OPS)} / {sorted(_load_profiles())}")
        d = OPS[name]
        if len(args) > len(d.params):
            raise ValueError(f"spec {spec!r}: {name} takes at most {len(d.params)} arguments {d.params}")
        return [_record(name, dict(zip(d.params, args)), spec)]
    if isinstance(spec, (list, tuple)):
        return [r for part in spec for r in _parse_one(part)]
    raise ValueError(f"a post-processing spec is a string, record, Profile or list, got {type(spec).__name__}")


def parse(spec: Spec) -> list[dict]:
    """The canonical list of operation records of ``spec`` (JSON-serialisable; ``[]`` is the
    identity). Raises ``ValueError`` naming a bad spec."""
    return _parse_one(spec)


def apply(x: Image_, spec: Spec) -> Image_:
    """Apply the real operation(s) or platform profile given by ``spec`` (see the module
    docstring) to a ``N x 3 x H x W`` [0, 1] batch (or a PIL image); returns a new batch in
    [0, 1] (the input is not modified).

    >>> import torch
    >>> y = apply(torch.rand(2, 3, 32, 32), "jpeg:75")
    >>> y.shape, bool(y.min() >= 0 and y.max() <= 1)
    (torch.Size([2, 3, 32, 32]), True)
    """
    records = parse(spec)
    if isinstance(x, torch.Tensor):
        _check(x)
    out = x.clone() if isinstance(x, torch.Tensor) else x.copy()
    for r in records:
        d = OPS[r["op"]]
        out = d.fn(out, **{k: v for k, v in r.items() if k != "op"})
    return out


# ---------------------------------------------------------------- random draws for training
@dataclass
class OpSampler:
    """Random draws of real post-processing for training (the sampling is separate from the
    operations: a draw is a list of records that ``apply`` replays exactly).

    Each draw is: with probability ``p_resize`` a down-up resize (scale in ``scale_range``),
    with ``p_blur`` a blur (sigma in ``sigma_range``), with ``p_noise`` noise, then one codec:
    a platform profile with ``p_profile``, else WebP with ``p_webp``, else JPEG (Pillow, or
    OpenCV with ``p_cv2``) at a quality in ``quality_range`` and chroma from ``chromas``.
    """

    quality_range: tuple[int, int] = (30, 100)
    chromas: tuple[str, ...] = ("420", "444")
    p_progressive: float = 0.2
    p_cv2: float = 0.2
    p_webp: float = 0.1
    p_profile: float = 0.15
    p_resize: float = 0.2
    scale_range: tuple[float, float] = (0.5, 0.9)
    p_blur: float = 0.1
    sigma_range: tuple[float, float] = (0.3, 1.2)
    p_noise: float = 0.1
    noise_range: tuple[float, float] = (0.005, 0.02)
    profile_names: tuple[str, ...] = field(default_factory=lambda: tuple(sorted(_load_profiles())))

    def __post_init__(self) -> None:
        lo, hi = self.quality_range
        _quality(lo), _quality(hi)
        if lo > hi:
            raise ValueError(f"quality_range must be (low, high) with low <= high, got {self.quality_range}")
        for c in self.chromas:
            _chroma(c)

    def sample(self, rng: np.random.Generator | int) -> list[dict]:
        """One draw: a list of operation records (store it as JSON; replay with ``apply``)."""
        rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
        ops: list[dict] = []
        if rng.random() < self.p_resize:
            ops.append({"op": "resize", "scale": round(float(rng.uniform(*self.scale_range)), 3),
                        "interpolation": str(rng.choice(["bilinear", "bicubic", "area"]))})
        if rng.random() < self.p_blur:
            ops.append({"op": "blur", "sigma": round(float(rng.uniform(*self.sigma_range)), 3)})
        if rng.random() < self.p_noise:
            ops.append({"op": "noise", "sigma": round(float(rng.uniform(*self.noise_range)), 4),
                        "seed": int(rng.integers(2**31))})
        if self.profile_names and rng.random() < self.p_profile:
            ops += _load_profiles()[str(rng.choice(list(self.profile_names)))].ops()
        elif rng.random() < self.p_webp:
            ops.append({"op": "webp", "quality": int(rng.integers(self.quality_range[0], self.quality_range[1] + 1))})
        else:
            q = int(rng.integers(self.quality_range[0], self.quality_range[1] + 1))
            c = str(rng.choice(list(self.chromas)))
            if rng.random() < self.p_cv2:
                ops.append({"op": "jpeg_cv2", "quality": q, "subsampling": c})
            else:
                ops.append({"op": "jpeg", "quality": q, "subsampling": c,
                            "progressive": bool(rng.random() < self.p_progressive)})
        return ops


# ---------------------------------------------------------------- straight-through
class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: Any) -> torch.Tensor:  # type: ignore[override]
        return apply(x.detach(), spec)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def straight_through(x: torch.Tensor, spec: Spec) -> torch.Tensor:
    """The real operation forward, the identity gradient backward (BPDA): use a real codec
    inside a loss. The operation must keep the image size (not ``resize_max`` that shrinks).

    Shape: ``N x 3 x H x W`` in [0, 1] -> same.
    """
    _check(x)
    out = _StraightThrough.apply(x, parse(spec))
    if out.shape != x.shape:
        raise ValueError(f"straight_through needs a size-preserving operation; {spec!r} gave {tuple(out.shape)}")
    return out


class StraightThrough(torch.nn.Module):
    """``nn.Module`` form of ``straight_through`` with a fixed ``spec``."""

    def __init__(self, spec: Spec):
        super().__init__()
        self.records = parse(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return straight_through(x, self.records)


# ---------------------------------------------------------------- measuring
def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB between two [0, 1] batches, per image (``N``); ``inf`` where equal."""
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = (a.detach().double() - b.detach().double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse)).float()


def osn_sample() -> dict[str, torch.Tensor]:
    """The real calibration point: ``{"original", "facebook", "weibo", "wechat"}`` as
    ``1 x 3 x 568 x 757`` [0, 1] tensors (see data/README.md)."""
    folder = DATA_DIR / "osn-samples"
    return {name: load_image(folder / fname)[None]
            for name, fname in [("original", "test_01_original.tif"), ("facebook", "test_01_facebook.jpg"),
                                ("weibo", "test_01_weibo.jpg"), ("wechat", "test_01_wechat.jpg")]}


def calibrate_profiles() -> list[dict]:
    """For each platform with a real sample: PSNR (dB) of the profile applied to the original
    against the platform's real output, next to the PSNR of the untouched original against it."""
    s = osn_sample()
    rows = []
    for name in ("facebook", "weibo", "wechat"):
        sim = apply(s["original"], name)
        rows.append({"platform": name, "profile": asdict(_load_profiles()[name]),
                     "psnr_profile_vs_real": float(psnr(sim, s[name])[0]),
                     "psnr_original_vs_real": float(psnr(s["original"], s[name])[0])})
    return rows
