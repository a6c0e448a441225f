"""The demo: protect a face photo with TOAP and see what a deep-hash face search engine finds
before and after.

The engine's database is the open-set protocol's database (the evaluation identities' photos
plus 2,000 distractors): people no shipped model, Compression Generator or perturbation ever
saw. The page (``build_demo``) opens on the first shipped example with both result galleries
filled, and its intro states the measured per-photo result (``report.per_photo_sentence`` of
the shipped ``results/toap.json``).

Plain functions, tested without a browser:

- the search engine itself (database, models, shipped codes) is ``engine.Engine``;
  ``Engine.search(face, model)`` gives the top 10.
- ``protect_and_search(engine, photo, strength, engine_name, upload, refine=False)``: search
  with the original's largest face; protect every face (``protect.protect_image``; ``refine``:
  each face refined against dlib's network, ``refine.DEFAULT_STEPS`` steps, the page's
  default); pass the protected
  photo through a simulated upload (``postprocess.apply``: ``"none"``, ``"jpeg:75"`` or a
  platform profile); crop its face again and search. Returns a ``DemoResult``.
- ``search_shipped`` / ``search_upload``: the plain search of the "Search only" tab
  (``search_upload`` takes a file, read by the kit's checked loader ``protect.open_photo``).

``build_demo()`` only wires these to Gradio widgets; ``demo_app.py`` launches it. Under load:
the page's jobs wait in a bounded queue (``QUEUE_SIZE``), one protection at a time
(``PROTECT_JOBS``); every file the page serves is written once into its request's own folder
(``ResultFolder``) and served from there, deleted after ``KEEP_RESULTS_S`` (the uploads in
Gradio's cache too: ``delete_cache``) and all of it when the server stops.
"""

import json
import logging
import os
import re
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import postprocess, protect as protect_module, refine as refine_module
from .config import device
from .data import crop_face
from .engine import DEFAULT_ENGINE, DISPLAY, Engine, SearchResult
from .evaluate import ssim as ssim_of
from .odd_inputs import shipped_photos
from .perturbation import Perturbation
from .postprocess import from_pil, to_pil
from .protect import (DEFAULT_JPEG_QUALITY, STRENGTHS, TMP_TAG, ProtectError, _upright, face_crop,
                      load_perturbation, open_photo, protect_image)
from .toap import DLIB_DESCRIPTOR, TIER_WORDS, threat_tier

__all__ = ["DemoResult", "Example", "KEEP_RESULTS_S", "MAX_UPLOAD", "PROTECT_JOBS", "QUEUE_SIZE", "ResultFolder",
           "build_demo", "engine_label", "examples", "example_photo", "protect_and_search",
           "save_protected", "search_shipped", "search_upload", "upload_spec"]

UPLOAD_MAX_SIDE = 2000  # the plain search shrinks uploads to this long side first (12 MP: 0.8 s, not 2 s)
SHOW_SIDE = 512  # long side of the photos the page shows (the download keeps the full resolution)
MAX_UPLOAD = "20mb"  # Gradio's max_file_size at launch (demo_app.py)
KEEP_RESULTS_S = 3600
"""Seconds the page keeps a request's files (its results, and the uploads in Gradio's cache); all
are deleted when the server stops."""
PROTECT_JOBS = 1
"""Protections running at once. One: torch already spreads one job over every core (2 on the
machine the kit targets), so a second in parallel finishes no sooner, and it doubles the peak
memory (a photo near ``protect.MAX_PIXELS`` takes GBs)."""
QUEUE_SIZE = 32
"""Jobs the page's queue holds; beyond it a user is told the queue is full. At 1 to 3 s a refined
protection on 2 cores, the last waits about a minute."""
NO_FACE = "No face was detected: the centre of the photo was used."
NO_FACE_PROTECT = ("No face was found in this photo, so there is nothing to protect. The detector finds "
                   "faces seen from the front, about 40 pixels wide or more (on a photo larger than "
                   "500 pixels: about 8% of its long side or more).")
UPLOADS = ("none", "JPEG", *postprocess.profiles())
"""Choices of the "simulate upload" control: nothing, JPEG at the slider's quality, each platform."""
log = logging.getLogger(__name__)


# ---------------------------------------------------------------- shipped examples
@dataclass(frozen=True)
class Example:
    """A shipped example: a full 250x250 photo (``kind="photo"``, index into
    ``odd_inputs.shipped_photos()``) or a 112x112 query face crop (``kind="face"``, index into
    the engine's queries), of an evaluation identity (the database holds other photos of them)."""

    kind: str
    index: int
    identity: str

    @property
    def label(self) -> str:
        return f"{self.identity.replace('_', ' ')} ({'photo' if self.kind == 'photo' else 'face crop'})"


def examples(engine: Engine) -> list[Example]:
    """The shipped photos of evaluation identities (first), then each evaluation identity's
    first query face."""
    people = set(engine.query_names)
    out = [Example("photo", i, p.parent.name) for i, p in enumerate(shipped_photos()) if p.parent.name in people]
    first = {}
    for n, name in enumerate(engine.query_names):
        first.setdefault(name, n)
    return out + [Example("face", n, name) for name, n in first.items()]


def example_photo(engine: Engine, ex: Example) -> Image.Image:
    """The RGB image of a shipped example (250x250 photo or 112x112 face crop)."""
    if ex.kind == "photo":
        with Image.open(shipped_photos()[ex.index]) as im:
            return im.convert("RGB")
    return to_pil(engine.query(ex.index)[0])


# ---------------------------------------------------------------- protect and search
@dataclass
class DemoResult:
    """What ``protect_and_search`` returns.

    Attributes:
        original, protected, uploaded: RGB photos: upright original, protected (same size, full
            resolution), and the protected one after the simulated upload (may be smaller).
        amplified: the change ``protected - original`` shown as ``0.5 + 0.5 * change / eps``
            (grey = unchanged), same size as ``original``.
        psnr, ssim: image quality of ``protected`` against ``original`` over the largest
            protected face's square (dB; SSIM in [-1, 1], 1 = identical).
        before, after: top-k for the original's face and for the uploaded copy's face; their
            ``correct`` marks say whether each result is ``target``.
        target: the identity that decides the verdict: the photo's own when known, else the one
            the original's top-k holds most (``identity_known`` says which).
        hits_before, hits_after: photos of ``target`` in each top-k; ``found`` = hits_after > 0.
        verdict: one line, found / not found in the top k.
        faces: face squares protected (largest first); ``notes``: what the user should know.
        timings: seconds per step, in order; ``refined``: each face got its own refined delta.
    """

    original: Image.Image
    protected: Image.Image
    uploaded: Image.Image
    amplified: Image.Image
    psnr: float
    ssim: float
    before: SearchResult
    after: SearchResult
    before_face: Image.Image
    after_face: Image.Image
    target: str
    identity_known: bool
    hits_before: int
    hits_after: int
    found: bool
    verdict: str
    engine_name: str
    tier: str
    strength: str
    upload: str
    faces: list[tuple[int, int, int]]
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    refined: bool = False


@lru_cache(maxsize=None)
def _perturbation(strength: str) -> Perturbation:
    return load_perturbation(strength=strength)


def measured_sentence() -> str:
    """The per-photo result the intro states, and what a network the protection never used
    keeps, read from the shipped results (``make results``, ``python -m toap_kit.networks``)."""
    from .networks import RESULT, held_out_sentence
    from .report import per_photo_sentence
    from .results import RESULTS_DIR

    out = []
    for path, say in ((RESULTS_DIR / "toap.json", lambda r: per_photo_sentence(r, DEFAULT_ENGINE)),
                      (RESULT, held_out_sentence)):
        try:
            out.append(say(json.loads(path.read_text())))
        except (OSError, ValueError, KeyError):
            pass
    return " ".join(x for x in out if x)


def _tier(engine_name: str, strength: str, refine: bool) -> str:
    surrogates = [DLIB_DESCRIPTOR] if refine else _perturbation(strength).card.get("surrogates", [])
    return threat_tier(surrogates, engine_name)


def engine_label(engine_name: str, strength: str = "mid", refine: bool = False) -> str:
    """Dropdown label: the engine with its threat tier for ``strength``'s perturbation (or the
    refinement), e.g. ``"dlib_itq_32 — engine-known-backbone (protector used dlib's network, ...)"``."""
    tier = _tier(engine_name, strength, refine)
    return f"{engine_name} — {tier} ({TIER_WORDS[tier]})"


def upload_spec(choice: str, quality: float = 75) -> str:
    """``postprocess.apply`` spec of a "simulate upload" choice: ``"none"``, ``"JPEG"`` (at
    ``quality``, 1..100) or a platform profile name."""
    if choice in (None, "", "none"):
        return "none"
    if choice == "JPEG":
        return f"jpeg:{int(round(float(quality)))}"
    if choice in postprocess.profiles():
        return choice
    raise ValueError(f"unknown upload {choice!r}; choose one of {list(UPLOADS)}")


def _upright_rgb(photo: Image.Image) -> Image.Image:
    """``photo`` upright (EXIF orientation applied) in RGB; refuses what cannot hold a face and
    photos above ``protect.MAX_PIXELS``."""
    if not isinstance(photo, Image.Image):
        raise ValueError(f"expected a PIL image, got {type(photo).__name__}")
    w, h = photo.size
    limit = protect_module.MAX_PIXELS
    if w * h > limit:
        raise ProtectError(f"image too large: {w}x{h} (limit {limit / 1e6:.0f} megapixels)")
    if min(w, h) < 16:
        raise ProtectError(f"photo too small to hold a face: {w}x{h} pixels")
    return _upright(photo, []).convert("RGB")  # a broken EXIF block: pixels kept as stored


def _crop_as_is(image: Image.Image) -> torch.Tensor:
    """A face crop searched as it is: its central square resized to ``DISPLAY`` (bicubic)."""
    s = min(image.size)
    x0, y0 = (image.width - s) // 2, (image.height - s) // 2
    square = image.crop((x0, y0, x0 + s, y0 + s))
    return from_pil(square if s == DISPLAY else square.resize((DISPLAY, DISPLAY), Image.BICUBIC))


def _most_retrieved(names: list[str]) -> str:
    """The name found most often in a top-k (ties: the one ranked first)."""
    return max(names, key=lambda n: (names.count(n), -names.index(n)))


def _amplified(original: Image.Image, protected: Image.Image, eps: float) -> Image.Image:
    """``0.5 + 0.5 * (protected - original) / eps`` as an RGB image: grey where unchanged."""
    diff = np.asarray(protected, dtype=np.float32) - np.asarray(original, dtype=np.float32)
    return Image.fromarray(np.clip(127.5 + 127.5 * diff / (eps * 255), 0, 255).round().astype(np.uint8))


def _quality(original: Image.Image, protected: Image.Image, box: tuple[int, int, int]) -> tuple[float, float]:
    """(PSNR dB, SSIM) of the face square ``box`` (clipped to the photo)."""
    x0, y0, s = box
    r = (max(0, x0), max(0, y0), min(original.width, x0 + s), min(original.height, y0 + s))
    a, b = from_pil(original.crop(r))[None], from_pil(protected.crop(r))[None]
    return float(postprocess.psnr(a, b).clamp(max=100)), float(ssim_of(a, b))


def _verdict(engine_name: str, who: str, hits_before: int, hits_after: int, upload: str, k: int) -> str:
    how = "the protected photo" + ("" if upload == "none" else f" after the simulated upload ({upload})")
    if hits_after == 0 and hits_before == 0:
        return (f"NOT FOUND in the top {k}, but not thanks to the protection: {engine_name} did not find "
                f"{who} before protection either.")
    if hits_after == 0:
        return (f"NOT FOUND in the top {k}: for {how}, {engine_name} returns no photo of {who} "
                f"(before protection: {hits_before} of {k}).")
    return (f"FOUND in the top {k}: for {how}, {engine_name} still returns {hits_after} photo"
            f"{'s' * (hits_after != 1)} of {who} (before protection: {hits_before} of {k}).")


def protect_and_search(engine: Engine, photo: Image.Image, strength: str = "mid", engine_name: str | None = None,
                       upload: str = "none", identity: str | None = None, face_crop_input: bool = False,
                       k: int = 10, refine: bool = False, progress=None) -> DemoResult:
    """Search with a photo, protect it, simulate its upload, search again.

    Args:
        engine: the search engine (database and models).
        photo: a PIL photo of any size (EXIF orientation applied; converted to RGB); not modified.
        strength: ``low``, ``mid`` or ``high`` (``protect.STRENGTHS``: eps 4, 8, 12 of 255).
        engine_name: the zoo model searched (default: ``engine.default_model``).
        upload: what the platform does to the protected photo: a ``postprocess.apply`` spec
            (``"none"``, ``"jpeg:75"``, ``"facebook"``, ...; see ``upload_spec``).
        identity: the photo's identity when known (a shipped example): results are marked
            right/wrong against it; None: against the person the original retrieved most.
        face_crop_input: the photo is already a face crop (a shipped query face): it is
            protected and searched as a whole (no face detection).
        k: results per search.
        refine: refine each face's own delta against dlib's network (``refine.DEFAULT_STEPS``
            steps from the strength's universal delta: a few seconds a face on 2 cores).
        progress: passed to the refinement's tqdm (the page gives Gradio's progress tracker).

    Returns:
        ``DemoResult`` (photos, quality, both top-k lists, verdict, timings).

    Raises:
        ProtectError: no face found, a photo too small or too large, unknown strength.
        ValueError: unknown engine or upload spec, not a PIL image.
    """
    engine_name = engine_name or engine.default_model
    if engine_name not in engine.models:
        raise ValueError(f"unknown engine {engine_name!r}; choose one of {engine.models}")
    postprocess.parse(upload)  # a bad spec fails here, before any work
    pert = _perturbation(strength)  # ProtectError naming the choices for an unknown strength
    timings: dict[str, float] = {}
    t = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[step] = now - t
        t = now

    original = _upright_rgb(photo)
    if face_crop_input:
        before_crop, found = _crop_as_is(original), True
    else:
        before_crop, found = face_crop(original, DISPLAY)
    if not found:
        raise ProtectError(NO_FACE_PROTECT)
    lap("find the face")
    before = engine.search(before_crop, engine_name, k, identity)
    lap("search before")
    prot = protect_image(original, pert, detect=not face_crop_input,
                         refine_steps=refine_module.DEFAULT_STEPS if refine else 0,
                         progress=bool(progress))  # dlib's network: loaded once per process (refine.known_recognizer)
    if not prot.faces_found:  # the crop-level detector found one, the photo-level did not: rare
        raise ProtectError(NO_FACE_PROTECT)
    lap("refine and protect" if refine else "protect")
    uploaded = postprocess.apply(prot.image, upload)
    lap("simulate upload")
    notes = list(prot.notes)
    if face_crop_input:
        after_crop = _crop_as_is(uploaded)
    else:
        after_crop, found_after = face_crop(uploaded, DISPLAY)
        if not found_after:
            notes.append("no face was detected on the uploaded copy: the centre was searched "
                         "(an engine that cannot detect the face cannot search with it either)")
    after = engine.search(after_crop, engine_name, k)
    lap("search after")
    psnr, ssim = _quality(original, prot.image, prot.boxes[0])
    amplified = _amplified(original, prot.image, pert.eps)
    lap("measure")

    target = identity or _most_retrieved(before.names)
    before = replace(before, correct=[n == target for n in before.names])
    after = replace(after, correct=[n == target for n in after.names])
    hits_before, hits_after = sum(before.correct), sum(after.correct)
    who = target.replace("_", " ")
    if identity is None:
        who = f"{who} (the person the original retrieved most; this photo's identity is unknown)"
    if len(prot.boxes) > 1:
        notes.insert(0, f"{len(prot.boxes)} faces found: all protected; the largest was searched")
    return DemoResult(original, prot.image, uploaded, amplified, psnr, ssim, before, after, to_pil(before_crop),
                      to_pil(after_crop), target, identity is not None, hits_before, hits_after, hits_after > 0,
                      _verdict(engine_name, who, hits_before, hits_after, upload, k), engine_name,
                      _tier(engine_name, strength, refine), strength, upload, list(prot.boxes), notes, timings,
                      refine)


def save_protected(image: Image.Image, folder: str | Path, stem: str = "photo") -> Path:
    """Write ``image`` (full resolution) as ``<stem>-protected.jpg`` (JPEG at
    ``protect.DEFAULT_JPEG_QUALITY``, chroma 4:4:4, no metadata) into ``folder``, atomically
    (a temporary file, then ``os.replace``). Returns the path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:80] or "photo"
    dst = folder / f"{stem}-protected.jpg"
    tmp = folder / f".{dst.name}{TMP_TAG}{os.getpid()}"
    try:
        image.convert("RGB").save(tmp, "JPEG", quality=DEFAULT_JPEG_QUALITY, subsampling=0)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


# ---------------------------------------------------------------- the plain search ("Search only" tab)
def _gallery(engine: Engine, res: SearchResult) -> list[tuple[Image.Image, str]]:
    out = []
    for rank, (j, d, name) in enumerate(zip(res.indices, res.distances, res.names)):
        mark = "" if res.correct is None else ("✔ " if res.correct[rank] else "✘ ")
        out.append((to_pil(engine.sets.db_images[j]), f"{mark}{rank + 1}. {name.replace('_', ' ')}  d={d}"))
    return out


def _summary(res: SearchResult, name: str | None, model: str) -> str:
    if res.correct is None:
        return (f"**{model}**: top-10 for the uploaded face (its identity is unknown, so matches "
                "are not marked).")
    hits = sum(res.correct)
    return (f"**{model}**: {hits} of the top 10 are {name.replace('_', ' ')} "
            f"(the database holds other photos of this person).")


def search_shipped(engine: Engine, n: int, model_name: str):
    """Callback: shipped query ``n`` -> (query image, top-10 gallery, summary markdown)."""
    image, name = engine.query(n)
    res = engine.search(image, model_name, identity=name)
    return to_pil(image), _gallery(engine, res), _summary(res, name, model_name)


def search_upload(engine: Engine, photo: str | Path | Image.Image | None, model_name: str):
    """Callback: an uploaded photo, a file (read by ``protect.open_photo``) or a PIL image
    (turned upright by its EXIF orientation, shrunk to a long side of ``UPLOAD_MAX_SIDE``, face
    detected and cropped) -> (crop, gallery, summary).

    Raises:
        ProtectError: a file that is empty, not an image, truncated, animated, ...; a photo above
            ``protect.MAX_PIXELS`` or too small to hold a face (one line: why).
        ValueError: no photo, or neither a file path nor a PIL image.
    """
    if photo is None:
        raise ValueError("no photo: upload a photo with a face first")
    if isinstance(photo, (str, Path)):
        photo, _ = open_photo(photo)
    photo = _upright_rgb(photo)
    if max(photo.size) > UPLOAD_MAX_SIDE:
        r = UPLOAD_MAX_SIDE / max(photo.size)
        photo = photo.resize((max(1, round(photo.width * r)), max(1, round(photo.height * r))),
                             Image.LANCZOS, reducing_gap=3.0)
    crop, found = crop_face(from_pil(photo), DISPLAY)
    res = engine.search(crop, model_name)
    note = "" if found else " " + NO_FACE
    return to_pil(crop), _gallery(engine, res), _summary(res, None, model_name) + note


# ---------------------------------------------------------------- the page
class ResultFolder:
    """The page's own temporary folder (``toap-demo-*``; ``build_demo`` has Gradio serve its
    files as they are, no copy in Gradio's cache). Each request writes its files into a new
    subfolder (``new_request``), so no file the page serves is ever rewritten while it is being
    sent; request folders older than ``KEEP_RESULTS_S`` are deleted at each new request, and the
    whole folder when this object is garbage-collected or the process exits."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="toap-demo-"))
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)

    def new_request(self) -> Path:
        """A new, empty folder for one request's files (old requests' folders are pruned first)."""
        self.prune()
        return Path(tempfile.mkdtemp(prefix="request-", dir=self.path))

    def prune(self, max_age_s: float = KEEP_RESULTS_S) -> int:
        """Delete the request folders last written more than ``max_age_s`` seconds ago; returns
        how many."""
        cutoff, n = time.time() - max_age_s, 0
        for d in list(self.path.glob("request-*")):
            try:
                if d.stat().st_mtime < cutoff:
                    shutil.rmtree(d)
                    n += 1
            except FileNotFoundError:  # another request pruned it first
                continue
        return n

    def remove(self) -> None:
        """Delete the whole folder now (it is also deleted at exit)."""
        self._finalizer()


def _file(image: Image.Image, folder: Path, name: str, fmt: str = "png") -> str:
    """Write ``image`` as ``folder/name.fmt`` (a new file, in a request's own folder) and return
    its path: Gradio serves it as it is. (Given the image itself, Gradio would write it under a
    hash of its bytes, a file that a concurrent request for the same photo rewrites while it
    is being sent.)"""
    path = folder / f"{name}.{fmt}"
    image.save(path, fmt.upper())
    return str(path)


def _gallery_files(gallery: list[tuple[Image.Image, str]], folder: Path, name: str) -> list[tuple[str, str]]:
    """``gallery`` with each image written by ``_file`` (WebP, as Gradio's galleries show them)."""
    return [(_file(im, folder, f"{name}-{i:02d}", "webp"), caption) for i, (im, caption) in enumerate(gallery)]


def _shown(image: Image.Image, side: int = SHOW_SIDE) -> Image.Image:
    """A copy of ``image`` whose long side is at most ``side`` (for the page only)."""
    if max(image.size) <= side:
        return image
    im = image.copy()
    im.thumbnail((side, side), Image.LANCZOS)
    return im


def _metrics(res: DemoResult) -> str:
    """The markdown under the photos: quality, faces, notes, time per step."""
    steps = " · ".join(f"{s} {v:.2f} s" for s, v in res.timings.items())
    lines = [f"**Quality** (largest face's square): PSNR {res.psnr:.1f} dB, SSIM {res.ssim:.3f} · "
             f"strength **{res.strength}** (eps {round(_perturbation(res.strength).eps * 255)}/255, "
             f"{'refined for this photo' if res.refined else 'universal'}) · "
             f"engine **{res.engine_name}**: *{res.tier}* · upload: **{res.upload}** · "
             f"photo {res.original.width}x{res.original.height}, {len(res.faces)} face"
             f"{'s' * (len(res.faces) != 1)} protected",
             f"**Time per step**: {steps} (total {sum(res.timings.values()):.2f} s)"]
    lines += [f"*Note:* {n}" for n in res.notes]
    return "\n\n".join(lines)


def build_demo(engine: Engine | None = None, results: ResultFolder | None = None):
    """The Gradio Blocks of the demo (``demo_app.py`` launches it), opening on the first example,
    with its queue set (``QUEUE_SIZE``, ``PROTECT_JOBS``).

    Args:
        engine: the search engine (default: ``Engine()``, every zoo model); only its
            ``default_model`` is loaded before the page opens.
        results: where each request writes the files it serves (default: a new
            ``ResultFolder``, deleted with the page or at exit).

    Raises:
        ValueError: a bad ``TOAP_DEVICE`` (``config.device``), before anything is loaded (the
            refinement, on by default, would fail on every photo).
    """
    import gradio as gr

    device()
    engine = engine or Engine()
    log.info("loading the database codes of %s (the page's first search then answers at once)", engine.default_model)
    engine._model_and_index(engine.default_model)
    exs = examples(engine)
    results = results or ResultFolder()
    gr.set_static_paths([results.path])  # served from there, never copied into Gradio's cache
    (results.path / "examples").mkdir(exist_ok=True)
    thumbs = [(_file(example_photo(engine, e).resize((96, 96), Image.BICUBIC), results.path / "examples",
                     f"{i:03d}", "webp"), e.label) for i, e in enumerate(exs)]

    def engine_choices(strength: str, refine: bool = True) -> list[tuple[str, str]]:
        return [(engine_label(m, strength, refine), m) for m in engine.models]

    def outputs(res: DemoResult, stem: str) -> tuple:
        folder = results.new_request()
        dst = save_protected(res.protected, folder, stem)
        mark = "✘" if res.found else ("✔" if res.hits_before else "·")  # ✔: the protection took the person out
        verdict = f"### {mark} {res.verdict}"
        return (_file(_shown(res.original), folder, "original"), _file(_shown(res.protected), folder, "protected"),
                _file(_shown(res.amplified), folder, "change"), verdict, _metrics(res),
                _gallery_files(_gallery(engine, res.before), folder, "before"),
                _gallery_files(_gallery(engine, res.after), folder, "after"), str(dst))

    def run(path, ex_index, strength: str, engine_name: str, upload: str, quality: float, refine: bool,
            progress=gr.Progress(track_tqdm=True)) -> tuple:
        """The page's main callback: an uploaded file (else the picked example) -> every output."""
        try:
            spec = upload_spec(upload, quality)
            if path:
                photo, _ = open_photo(path)
                res = protect_and_search(engine, photo, strength, engine_name, spec, refine=bool(refine),
                                         progress=refine)
                stem = Path(path).stem
            elif ex_index is not None:
                ex = exs[int(ex_index)]
                res = protect_and_search(engine, example_photo(engine, ex), strength, engine_name, spec,
                                         identity=ex.identity, face_crop_input=ex.kind == "face",
                                         refine=bool(refine), progress=refine)
                stem = ex.identity
            else:
                raise gr.Error("Upload a photo, or pick a shipped example, first.")
        except ProtectError as e:
            raise gr.Error(f"This photo cannot be protected: {e}") from e
        except (TypeError, ValueError, IndexError) as e:
            raise gr.Error(str(e)) from e
        if len(res.faces) > 1:
            gr.Info(res.notes[0])
        return outputs(res, stem)

    def pick(evt: gr.SelectData, strength: str, engine_name: str, upload: str, quality: float, refine: bool):
        return (None, evt.index, *run(None, evt.index, strength, engine_name, upload, quality, refine))

    def restrength(path, ex_index, strength: str, engine_name: str, upload: str, quality: float, refine: bool):
        return (gr.update(choices=engine_choices(strength, refine), value=engine_name),
                *run(path, ex_index, strength, engine_name, upload, quality, refine))

    # the plain search tab (no protection)
    def searched(query: Image.Image, gallery: list, summary: str) -> tuple:
        folder = results.new_request()
        return _file(query, folder, "query"), _gallery_files(gallery, folder, "result"), summary

    def run_shipped(n: int, model_name: str):
        try:
            return searched(*search_shipped(engine, n, model_name))
        except (IndexError, ValueError) as e:
            raise gr.Error(str(e)) from e

    def run_upload(photo, model_name: str):
        """An uploaded file's path -> the top 10; a bad file's one-line reason
        (``protect.open_photo``) as a ``gr.Error``."""
        if not photo:
            raise gr.Error("Upload a photo with a face first.")
        try:
            out = search_upload(engine, photo, model_name)
        except (TypeError, ValueError) as e:  # ProtectError included
            raise gr.Error(f"This photo cannot be searched: {e}") from e
        if NO_FACE in out[2]:
            gr.Warning(NO_FACE)
        return searched(*out)

    n_people = len(set(engine.query_names))
    measured = measured_sentence()
    # the uploads (in Gradio's cache) go after the same time, and all when the server stops;
    # a privacy tool sends nothing home: Gradio's usage analytics are off
    with gr.Blocks(title="toap-kit: protect your photos from face search", analytics_enabled=False,
                   delete_cache=(KEEP_RESULTS_S // 6, KEEP_RESULTS_S)) as demo:
        gr.Markdown(
            "# Protect your photos from face search engines\n"
            "A face search engine turns a face into a binary hash code and returns the database faces "
            f"with the nearest codes. This one's database holds photos of {n_people} people no model "
            "here was trained on, plus 2,000 others. The kit adds a small perturbation to every face so "
            "that the engine finds the person less often, even after a platform re-compresses the photo: "
            "one universal pattern (TOAP's idea, Lv et al., arXiv 2412.09692; milliseconds a photo), or, "
            "with *refine for this photo*, each face's own pattern optimised against dlib's face network, "
            "the backbone of two of the six real engines here (a few seconds a face; the other four run "
            "MobileFace and faceres, networks the protection never used). "
            + (measured + " " if measured else "")
            + "The protection weakens a search; it guarantees nothing, least of all against an engine "
            "built on another network.")
        with gr.Tab("Protect"):
            with gr.Row():
                with gr.Column(scale=1, min_width=320):
                    photo_in = gr.File(label=f"your photo (JPEG, PNG, WebP; at most {MAX_UPLOAD[:-2]} MB)",
                                       file_types=["image"], type="filepath", elem_id="photo-upload")
                    picker = gr.Gallery(thumbs, label="or pick a shipped example (click one)", columns=4,
                                        height=230, allow_preview=False, elem_id="examples")
                    strength_in = gr.Radio(list(STRENGTHS), value="mid", label="strength (eps 4, 8, 12 of 255)")
                    refine_in = gr.Checkbox(value=True, label="refine for this photo (against dlib's network; "
                                            "a few seconds a face)", elem_id="refine")
                    engine_in = gr.Dropdown(engine_choices("mid"), value=engine.default_model,
                                            label="face search engine (and what the protector knew about it)")
                    upload_in = gr.Dropdown(list(UPLOADS), value="facebook", label="simulate upload")
                    quality_in = gr.Slider(30, 100, value=75, step=1, label="JPEG quality (for upload = JPEG)")
                    go = gr.Button("Protect and search", variant="primary", elem_id="protect-button")
                    example_state = gr.State(0)
                with gr.Column(scale=2):
                    verdict = gr.Markdown(elem_id="verdict")
                    with gr.Row():
                        shown_orig = gr.Image(label="original", height=260)
                        shown_prot = gr.Image(label="protected", height=260)
                        shown_amp = gr.Image(label="the change, amplified (grey = none)", height=260)
                    metrics = gr.Markdown()
                    download = gr.DownloadButton("Download the protected photo (full resolution, JPEG q95)",
                                                 elem_id="download")
                    before = gr.Gallery(label="before: top 10 for the original photo (✔ same person)", columns=5,
                                        height=330, elem_id="before-gallery")
                    after = gr.Gallery(label="after: top 10 for the protected photo, after the simulated upload",
                                       columns=5, height=330, elem_id="after-gallery")
            controls = [strength_in, engine_in, upload_in, quality_in, refine_in]
            outs = [shown_orig, shown_prot, shown_amp, verdict, metrics, before, after, download]
            # every event that protects shares one concurrency group of PROTECT_JOBS
            protects = {"concurrency_id": "protect", "concurrency_limit": PROTECT_JOBS}
            go.click(run, [photo_in, example_state, *controls], outs, api_name="protect", **protects)
            # a new upload replaces the example
            photo_in.upload(lambda: None, None, example_state, api_visibility="private")
            picker.select(pick, controls, [photo_in, example_state, *outs], api_visibility="private", **protects)
            for c in (strength_in, refine_in):
                c.input(restrength, [photo_in, example_state, *controls], [engine_in, *outs], api_visibility="private",
                        **protects)
            for c in (engine_in, upload_in):
                c.input(run, [photo_in, example_state, *controls], outs, api_visibility="private", **protects)
            quality_in.release(run, [photo_in, example_state, *controls], outs, api_visibility="private", **protects)
            demo.load(run, [photo_in, example_state, *controls], outs, api_visibility="private", **protects)
        with gr.Tab("Search only"):
            with gr.Row():
                model_dd = gr.Dropdown(engine.models, value=engine.default_model, label="hash model")
                query_no = gr.Number(value=0, precision=0, label="shipped query #", minimum=0,
                                     maximum=len(engine.query_names) - 1)
            with gr.Row():
                with gr.Column(scale=1):
                    # a file, decoded by the kit's checked loader (not by Gradio): a bad one gets its reason
                    upload = gr.File(label="upload a face photo", file_types=["image"], type="filepath")
                    upload_btn = gr.Button("Search with the uploaded photo")
                with gr.Column(scale=2):
                    shown = gr.Image(label="query as searched", height=160)
                    summary = gr.Markdown()
                    top10 = gr.Gallery(label="top-10 (✔ same person, ✘ someone else)", columns=5, height=340)
            souts = [shown, top10, summary]
            searches = {"concurrency_id": "search"}  # one search at a time (default_concurrency_limit)
            query_no.change(run_shipped, [query_no, model_dd], souts, api_name="search_shipped", **searches)
            model_dd.change(run_shipped, [query_no, model_dd], souts, api_visibility="private", **searches)
            upload_btn.click(run_upload, [upload, model_dd], souts, api_name="search_upload", **searches)
            demo.load(run_shipped, [query_no, model_dd], souts, api_visibility="private", **searches)
    # parallel users wait in a bounded queue instead of failing; memory stays that of a job or two
    return demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
