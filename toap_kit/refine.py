"""Protection against real recognizers: per-photo refinement, and universal deltas made the same way.

The universal perturbations of ``toap`` are made once for everybody (milliseconds a photo).
When the protector knows the recognizer a crawler runs (by default dlib's face network, the
backbone of the ``dlib_itq_*`` engines; threat tier ``engine-known-backbone``), it can do far
better by optimising against it directly, the idea of LowKey (Cherepanova et al., ICLR 2021)
and Fawkes (Shan et al., USENIX Security 2020) [kit: their idea, this objective]. LowKey's
answer to a crawler whose network nobody knows is an ensemble: ``against=("dlib", "faceres")``
optimises against several real networks at once (``recognizers.NAMES``), each seeing its own
chip, their distances averaged in dlib's units; ``networks`` measures what a network left out
keeps (tier ``engine-blackbox``):

- ``refine_faces``: one delta *per face*, a few seconds a face on a laptop;
- ``fit_universal``: one delta for everybody with the same objective (the shipped ``toap-low/
  mid/high``: "dlib-first" universal deltas).

The objective [kit], for each face ``x`` with its own delta ``d`` (``|d| <= eps``, feathered at
the square's edge as ``toap protect`` writes it, PSNR >= the strength's floor):

1. the protected face goes through one random draw of what a platform and a crawler do: 8-bit
   quantisation, then nothing, a real JPEG (quality 50-95, straight-through gradient), a
   down-sizing (scale 0.4-1.0, antialiased), or down-sizing then JPEG;
2. dlib's network sees it the way a crawler would: through the face's own chip, either the
   landmark-aligned chip of dlib's pipeline (5-point landmarks, ``get_face_chip``'s geometry)
   or the kit's engines' fixed chip, with a small random rotation, scale and shift (the crawler
   cuts the face again);
3. the loss pushes the 128-D descriptor ``e`` away from the clean face's ``e0`` (and, when
   identities are known, from the identity's mean), each distance capped at ``cap``, and flips
   the bits of the protector's *own* 48-bit hash layer on dlib's descriptor (an ITQ layer fitted
   on the shipped teacher descriptors of the training identities, ``toap.DLIB_DESCRIPTOR``;
   never a victim's):
   ``loss = -mean(min(|e - e0|, cap)) / cap + w_hash * mean(relu(margin + b0 * u / s))``.

    >>> from toap_kit import refine
    >>> protected = refine.refine_faces(faces, "mid")          # N x 3 x H x W in [0, 1]
"""
from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import postprocess, recognizers, teacher, zoo
from .config import OUTPUT_DIR
from .config import device as default_device
from .data import DATA_DIR, check_pixels, load_faceset, make_protocol
from .hashing import ITQ
from .perturbation import Perturbation, feather_mask
from .recognizers import box_theta, chip_in_frame, landmark_thetas
from .toap import own_descriptor

__all__ = ["Adam", "DEFAULT_STEPS", "STRENGTHS", "WORK_SIDE", "KnownRecognizer", "RefineConfig", "fit_universal",
           "check_against", "config_for", "known_recognizer", "refine_deltas", "refine_faces",
           "strength_config"]

log = logging.getLogger(__name__)

STRENGTHS = {"low": (4, 39.0), "mid": (8, 35.5), "high": (12, 32.0)}
"""Per-photo refinement: ``strength -> (eps in 8-bit levels, PSNR floor in dB)``."""
DEFAULT_STEPS = 100
WORK_SIDE = 160
"""``toap protect --refine`` refines each face square at this side (larger squares are resized;
the delta is scaled back up to the square, as a universal one is)."""
OWN_LAYER_CACHE = OUTPUT_DIR / "refine-cache"
"""Where the protector's own hash layer (``_own_layer``), fitted once per checkout, is kept (git-ignored)."""
_OWN_LAYER_VERSION = 1  # bump when the way the own layer is fitted changes: older cache files are not read


@dataclass(frozen=True)
class RefineConfig:
    """Every parameter of a refinement or a dlib-first universal run (recorded in a card).

    ``eps``: pixel units of [0, 1]; ``psnr_floor``: dB (the delta is scaled so that every face
    keeps at least this PSNR); ``lr``: Adam's step in pixel units; ``cap``: descriptor distance
    past which a face is pushed no further (dlib's same-person threshold is 0.6); draws:
    ``p_none``, ``p_jpeg``, ``p_resize`` (the rest: resize then JPEG); ``p_landmark``: share of
    steps that see the landmark-aligned chip (the rest: the engines' fixed chip).
    """

    eps: float = 8 / 255
    psnr_floor: float = 35.5
    steps: int = DEFAULT_STEPS
    lr: float = 1e-3
    batch_size: int = 16
    cap: float = 1.0
    w_hash: float = 0.5
    margin: float = 1.0
    w_identity: float = 1.0
    p_none: float = 0.2
    p_jpeg: float = 0.3
    p_resize: float = 0.25
    jpeg_range: tuple[int, int] = (50, 95)
    resize_range: tuple[float, float] = (0.4, 1.0)
    p_landmark: float = 0.5
    jitter_degrees: float = 3.0
    jitter_scale: float = 0.05
    jitter_shift: float = 0.03
    feather: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (0 < self.eps <= 1, f"eps must be in (0, 1] (pixel units), got {self.eps}"),
            (math.isfinite(self.psnr_floor) and self.psnr_floor > 0, f"psnr_floor must be > 0 dB, got {self.psnr_floor}"),
            (self.steps >= 0 and self.batch_size >= 1, "steps must be >= 0 and batch_size >= 1"),
            (self.lr > 0 and self.cap > 0, "lr and cap must be > 0"),
            (min(self.w_hash, self.w_identity, self.margin) >= 0, "w_hash, w_identity and margin must be >= 0"),
            (min(self.p_none, self.p_jpeg, self.p_resize) >= 0 and self.p_none + self.p_jpeg + self.p_resize <= 1,
             "p_none, p_jpeg, p_resize must be >= 0 and sum to at most 1"),
            (1 <= self.jpeg_range[0] <= self.jpeg_range[1] <= 100, f"jpeg_range must be in 1..100, got {self.jpeg_range}"),
            (0 < self.resize_range[0] <= self.resize_range[1] <= 1, f"resize_range must be in (0, 1], got {self.resize_range}"),
            (0 <= self.p_landmark <= 1, f"p_landmark must be in [0, 1], got {self.p_landmark}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def config_for(eps: float, steps: int | None = None, seed: int = 0) -> RefineConfig:
    """``RefineConfig`` for a budget ``eps`` (pixel units): a ``STRENGTHS`` level gets its PSNR
    floor; another eps the floor that keeps mid's ratio of RMS to eps."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"steps must be a whole number >= 0, got {steps!r}")
    if not 0 < eps <= 1:
        raise ValueError(f"eps must be in (0, 1] (pixel units), got {eps}")
    floors = {levels: floor for levels, floor in STRENGTHS.values()}
    levels = round(eps * 255, 3)
    mid_levels, mid_floor = STRENGTHS["mid"]
    floor = floors.get(levels, mid_floor + 20 * math.log10(mid_levels / (eps * 255)))
    return RefineConfig(eps=eps, psnr_floor=floor, steps=DEFAULT_STEPS if steps is None else steps, seed=seed)


def strength_config(strength: str = "mid", steps: int | None = None, seed: int = 0) -> RefineConfig:
    """``RefineConfig`` of a per-photo strength (``STRENGTHS``)."""
    if strength not in STRENGTHS:
        raise ValueError(f"unknown strength {strength!r}: choose one of {', '.join(STRENGTHS)}")
    return config_for(STRENGTHS[strength][0] / 255, steps, seed)


# ------------------------------------------------------------------ chips
def _jitter(theta: torch.Tensor, cfg: RefineConfig, gen: torch.Generator) -> torch.Tensor:
    """``theta`` after a random small similarity in chip coordinates (a crawler's re-crop)."""
    n = len(theta)
    u = (torch.rand(n, 4, generator=gen) * 2 - 1).to(theta.device)
    a = u[:, 0] * math.radians(cfg.jitter_degrees)
    s = 1 + u[:, 1] * cfg.jitter_scale
    j = torch.stack([torch.stack([s * a.cos(), -s * a.sin(), u[:, 2] * cfg.jitter_shift * 2], 1),
                     torch.stack([s * a.sin(), s * a.cos(), u[:, 3] * cfg.jitter_shift * 2], 1)], 1)
    return torch.cat([theta[:, :, :2] @ j[:, :, :2], theta[:, :, :2] @ j[:, :, 2:] + theta[:, :, 2:]], 2)


# ------------------------------------------------------------------ the known recognizer
@lru_cache(maxsize=1)
def _own_layer(bits: int = 48, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(center, projection)`` of the protector's own ITQ layer, fitted on the shipped teacher
    descriptors of the open-set protocol's training identities (no evaluation person).

    Fitting it reads every lfw158 face for the protocol and runs ITQ (3 to 10 s, most of a
    ``toap protect --refine`` process's start), so the result is kept in ``OWN_LAYER_CACHE``
    under a key of everything it depends on (the descriptors, their paths, the face set's
    manifest, ``bits``, ``seed``, ``_OWN_LAYER_VERSION``); an unreadable cache file is fitted again."""
    emb, paths = teacher.load_embeddings("lfw158")
    h = hashlib.sha256(f"{_OWN_LAYER_VERSION} {bits} {seed}\n".encode() + emb.tobytes() + "\n".join(paths).encode())
    h.update((DATA_DIR / "lfw158" / "manifest.csv").read_bytes())
    cached = OWN_LAYER_CACHE / f"own-layer-{h.hexdigest()[:16]}.npz"
    try:
        with np.load(cached, allow_pickle=False) as f:
            return torch.from_numpy(f["center"]).float(), torch.from_numpy(f["projection"]).float()
    except (OSError, ValueError, KeyError, EOFError):  # not cached yet, or a damaged file: fit it
        pass
    faces = load_faceset("lfw158", 32)
    if list(faces.paths) != list(paths):
        raise ValueError("data/teacher/lfw158 does not list the faces of data/lfw158 in order; run `make artifacts`")
    itq = ITQ(bits, seed=seed).fit(emb[make_protocol(faces).train])
    center, projection = itq.mean.astype(np.float32), (itq.pca @ itq.rotation).astype(np.float32)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp.npz")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, center=center, projection=projection)
        os.replace(tmp, cached)
    except OSError as e:  # a read-only checkout: fitted again next time
        tmp.unlink(missing_ok=True)
        log.warning("cannot cache the refinement's own layer in %s (%s)", OWN_LAYER_CACHE, e.strerror or e)
    return torch.from_numpy(center), torch.from_numpy(projection)


class KnownRecognizer:
    """The networks a protector knows and attacks (``against``, names of ``recognizers.NAMES``;
    default dlib's, the backbone of the kit's first real engines), frozen, on ``device``
    (default ``config.device()``): each network's chips and descriptors, and, when dlib's
    network is among them, the protector's own hash layer on its descriptor."""

    def __init__(self, device: torch.device | str | None = None, against: Sequence[str] = ("dlib",)):
        self.device = torch.device(device) if device else default_device()
        self.against = check_against(against)
        self.specs = {n: recognizers.SPECS[n] for n in self.against}
        nets = {n: recognizers.load(n).net for n in self.against}  # shared with the zoo's engines on the CPU
        self.nets = {n: net if self.device.type == "cpu" else copy.deepcopy(net).to(self.device) for n, net in nets.items()}
        if "dlib" in self.against:
            center, projection = _own_layer()
            self.center, self.projection = center.to(self.device), projection.to(self.device)
        # each network's fixed chip in the kit's crops: dlib's is its engines' (the face geometry of the crops)
        self.boxes = {n: tuple(zoo.card("dlib_itq_32")["chip_box"]) if n == "dlib" else self.specs[n].chip_box
                      for n in self.against}

    @property
    def surrogates(self) -> list[str]:
        """What a perturbation's card records as its surrogates: ``toap.own_descriptor`` of each network."""
        return [own_descriptor(n) for n in self.against]

    def embed(self, x: torch.Tensor, theta: torch.Tensor, landmark: bool, network: str = "dlib") -> torch.Tensor:
        """``N x dim`` descriptors by ``network`` of faces ``x`` (any side) cut through chips ``theta``."""
        size = self.specs[network].input_size
        grid = F.affine_grid(theta.to(x), [len(x), 3, size, size], align_corners=False)
        chips = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros" if landmark else "border",
                              align_corners=False)
        return self.nets[network](chips)

    def hash_outputs(self, e: torch.Tensor) -> torch.Tensor:
        """Pre-sign outputs of the protector's own 48-bit layer for dlib descriptors ``e``."""
        return (e - self.center) @ self.projection


def check_against(against: Sequence[str]) -> tuple[str, ...]:
    """``against`` as a tuple of distinct ``recognizers.NAMES`` (ValueError otherwise)."""
    if isinstance(against, str):
        against = tuple(a.strip() for a in against.split(","))
    against = tuple(against)
    unknown = [a for a in against if a not in recognizers.NAMES]
    if not against or unknown or len(set(against)) != len(against):
        raise ValueError(f"against must name distinct networks of {', '.join(recognizers.NAMES)}, got {against!r}")
    return against


@lru_cache(maxsize=4)
def _known_on(dev: torch.device, against: tuple[str, ...]) -> KnownRecognizer:
    return KnownRecognizer(dev, against)


def known_recognizer(device: torch.device | str | None = None, against: Sequence[str] = ("dlib",)) -> KnownRecognizer:
    """The process's ``KnownRecognizer`` of ``against`` on ``device`` (default ``config.device()``):
    loaded on the first call (the networks and the own layer, a few seconds), then reused. The
    refinement's default, so that ``toap protect --refine`` and the demo load it only once a
    face needs it (a photo without a face loads nothing), and once per process."""
    return _known_on(torch.device(device) if device else default_device(), check_against(against))


@dataclass
class _Refs:
    """What the loss compares against, per face: chips and clean references, per network and geometry."""

    thetas: dict[tuple[str, bool], torch.Tensor]  # (network, landmark?) -> N x 2 x 3
    e0: dict[tuple[str, bool], torch.Tensor]      # (network, landmark?) -> N x dim clean descriptors
    b0: dict[bool, torch.Tensor]                  # landmark? -> N x 48 clean own codes (dlib's network)
    scale: float                                  # mean |u| of the own layer on clean faces
    centres: dict[str, torch.Tensor] | None = None  # network -> N x dim identity means (landmark chips)


@torch.no_grad()
def _references(rec: KnownRecognizer, faces: torch.Tensor, labels: torch.Tensor | None, batch: int = 64) -> _Refs:
    dev, n = rec.device, len(faces)
    landmarks = landmark_thetas(faces).to(dev)
    dlib_box = rec.boxes.get("dlib", recognizers.SPECS["dlib"].chip_box)
    thetas = {}
    for net in rec.against:
        thetas[net, False] = box_theta(rec.boxes[net], n).to(dev)
        thetas[net, True] = landmarks if net == "dlib" else chip_in_frame(landmarks, dlib_box, rec.boxes[net])
    e0 = {k: torch.cat([rec.embed(faces[i:i + batch].to(dev), t[i:i + batch], k[1], k[0]) for i in range(0, n, batch)])
          for k, t in thetas.items()}
    b0, scale = {}, 1.0
    if "dlib" in rec.against:
        u = {k: rec.hash_outputs(e0["dlib", k]) for k in (True, False)}
        b0 = {k: torch.where(v >= 0, 1.0, -1.0) for k, v in u.items()}
        scale = float(torch.cat(list(u.values())).abs().mean())
    refs = _Refs(thetas, e0, b0, scale)
    if labels is not None:
        ids, inv = labels.unique(return_inverse=True)
        inv = inv.to(dev)
        count = torch.bincount(inv, minlength=len(ids))[:, None]
        refs.centres = {net: (torch.zeros(len(ids), e0[net, True].shape[1], device=dev).index_add_(0, inv, e0[net, True])
                              / count)[inv] for net in rec.against}
    return refs


def _draw(cfg: RefineConfig, rng: np.random.Generator) -> dict:
    """One random post-processing draw (the same for every face of a step)."""
    r = rng.random()
    kind = ("none" if r < cfg.p_none else "jpeg" if r < cfg.p_none + cfg.p_jpeg
            else "resize" if r < cfg.p_none + cfg.p_jpeg + cfg.p_resize else "resize+jpeg")
    return {"kind": kind, "quality": int(rng.integers(cfg.jpeg_range[0], cfg.jpeg_range[1] + 1)),
            "scale": float(rng.uniform(*cfg.resize_range)), "landmark": bool(rng.random() < cfg.p_landmark)}


def _quantize(x: torch.Tensor) -> torch.Tensor:
    """8-bit rounding forward, identity gradient backward."""
    return x + ((x * 255).round() / 255 - x).detach()


def _process(x: torch.Tensor, draw: dict) -> torch.Tensor:
    """Protected faces through ``draw``: 8 bits, then the draw (the chip is cut from the result,
    whatever its size, so a down-sized face is never scaled back up)."""
    x = _quantize(x)
    if "resize" in draw["kind"] and draw["scale"] < 1:
        side = max(postprocess.MIN_SIDE, round(x.shape[-1] * draw["scale"]))
        x = _quantize(F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True))
    if "jpeg" in draw["kind"]:
        x = postprocess.straight_through(x, f"jpeg:{draw['quality']}")
    return x


def _loss(rec: KnownRecognizer, cfg: RefineConfig, refs: _Refs, idx: torch.Tensor, xa: torch.Tensor, draw: dict,
          gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Summed loss of the faces ``idx`` (protected ``xa``) under ``draw`` (summed, so each face's
    gradient does not depend on the batch it is in), and its parts (means). With several
    networks the "away" terms are averaged over them, each distance in dlib's units
    (``recognizers.descriptor_distance``), each network's chip jittered on its own."""
    k = draw["landmark"]
    x = _process(xa, draw)
    away, dists = 0.0, []
    for net in rec.against:
        spec = rec.specs[net]
        e = rec.embed(x, _jitter(refs.thetas[net, k][idx], cfg, gen), k, net)
        dist = recognizers.descriptor_distance(spec, e, refs.e0[net, k][idx]).clamp(max=cfg.cap)
        away = away - dist / cfg.cap
        if refs.centres is not None and cfg.w_identity and k:
            away = away - cfg.w_identity * recognizers.descriptor_distance(
                spec, e, refs.centres[net][idx]).clamp(max=cfg.cap) / cfg.cap
        if net == "dlib":
            flips = torch.relu(cfg.margin + refs.b0[k][idx] * rec.hash_outputs(e) / refs.scale).mean(1)
        dists.append(dist.detach().mean())
    per_face = away / len(rec.against)
    parts = {"distance": float(torch.stack(dists).mean())}
    if "dlib" in rec.against:
        per_face = per_face + cfg.w_hash * flips
        parts["hash"] = float(flips.detach().mean())
    return per_face.sum(), parts


def _project(delta: torch.Tensor, mask: torch.Tensor, cfg: RefineConfig) -> None:
    """In place: ``|delta| <= eps``, then each face's written pattern ``mask * delta`` scaled
    down to RMS ``10^(-psnr_floor/20)`` where it is above it (so PSNR >= the floor)."""
    with torch.no_grad():
        delta.clamp_(-cfg.eps, cfg.eps)
        rms = (delta * mask).pow(2).mean(dim=(1, 2, 3)).sqrt()
        rms_max = 10 ** (-cfg.psnr_floor / 20)
        delta.mul_(torch.where(rms > rms_max, rms_max / rms.clamp_min(1e-12), torch.ones_like(rms))[:, None, None, None])


# ------------------------------------------------------------------ per photo
class Adam:
    """Adam (Kingma and Ba, ICLR 2015) on one tensor ``param``, computed as ``torch.optim.Adam``
    computes it on the CPU (equal to it, tested). Written out because the first ``torch.optim``
    optimizer of a process imports ``torch._dynamo``: 1-3 s of every ``toap protect --refine``."""

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.param, self.lr, (self.b1, self.b2), self.eps, self.t = param, lr, betas, eps, 0
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)

    @torch.no_grad()
    def step(self) -> None:
        """One update from ``param.grad`` (a missing gradient counts as zero)."""
        g = self.param.grad if self.param.grad is not None else torch.zeros_like(self.param)
        self.t += 1
        self.m.lerp_(g, 1 - self.b1)
        self.v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        denom = (self.v.sqrt() / (1 - self.b2 ** self.t) ** 0.5).add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-self.lr / (1 - self.b1 ** self.t))


def refine_deltas(faces: torch.Tensor, strength: str = "mid", steps: int | None = None, seed: int = 0,
                  progress: bool = False, config: RefineConfig | None = None,
                  recognizer: KnownRecognizer | None = None, init: torch.Tensor | None = None,
                  against: Sequence[str] | None = None) -> torch.Tensor:
    """Each face's own delta against the networks ``against`` (default dlib's; see the module
    docstring).

    Args:
        faces: ``N x 3 x H x W`` face crops in [0, 1] (the kit's crops, or the squares ``toap
            protect`` cuts: the face fills the middle as in ``data.crop_face``); square.
        strength: ``low``/``mid``/``high`` (``STRENGTHS``: eps 4/8/12 of 255, PSNR floors).
        steps: optimisation steps (default ``DEFAULT_STEPS``); 0 returns ``init`` (projected).
        seed: the run's seed (draws, jitter): the same inputs and seed give the same deltas.
        config: a full ``RefineConfig`` instead of ``strength``/``steps``/``seed``.
        recognizer: a loaded ``KnownRecognizer`` (its device and networks are used); default
            ``known_recognizer(against=against)``, loaded on first use.
        init: ``N x 3 x H x W`` starting deltas (e.g. a universal one); default zeros.
        against: the networks to protect against (``recognizers.NAMES``, e.g. ``("dlib",
            "faceres")``); default ``("dlib",)``, or the recognizer's.

    Returns:
        ``N x 3 x H x W`` float32 deltas on the CPU, already feathered (what is added):
        ``|delta| <= eps`` and ``PSNR(faces + delta, faces) >= psnr_floor`` before clipping.
    """
    faces = check_pixels(faces, "faces", ndim=(4,))
    if faces.shape[-1] != faces.shape[-2] or faces.shape[-1] < 32:
        raise ValueError(f"faces must be square crops of at least 32 px, got {tuple(faces.shape[-2:])}")
    cfg = config or strength_config(strength, steps, seed)
    rec = _recognizer_for(recognizer, against)
    dev, n, side = rec.device, len(faces), faces.shape[-1]
    mask = torch.from_numpy(feather_mask(side)).to(dev) if cfg.feather else torch.ones(side, side, device=dev)
    delta = (torch.zeros(n, 3, side, side) if init is None else init.detach().float().clone()).to(dev)
    if delta.shape != faces.shape:
        raise ValueError(f"init must have the faces' shape {tuple(faces.shape)}, got {tuple(delta.shape)}")
    _project(delta, mask, cfg)
    if n == 0 or cfg.steps == 0:
        return (delta * mask).cpu()
    gen, rng = torch.Generator().manual_seed(cfg.seed), np.random.default_rng(cfg.seed)
    x = faces.to(dev)
    refs = _references(rec, x, None)
    delta.requires_grad_(True)
    opt = Adam(delta, lr=cfg.lr)
    t0 = time.perf_counter()
    with torch.enable_grad(), tqdm(total=cfg.steps * math.ceil(n / cfg.batch_size), desc="refine", unit="step",
                                   disable=not progress) as bar:  # also under a caller's no_grad
        for _ in range(cfg.steps):
            draw = _draw(cfg, rng)
            delta.grad = None
            for i in range(0, n, cfg.batch_size):
                idx = torch.arange(i, min(n, i + cfg.batch_size))
                loss, _ = _loss(rec, cfg, refs, idx, (x[idx] + mask * delta[idx]).clamp(0, 1), draw, gen)
                loss.backward()
                bar.update(1)
            opt.step()
            _project(delta.data, mask, cfg)
    log.info("refined %d faces (%d steps) in %.1f s", n, cfg.steps, time.perf_counter() - t0)
    return (delta.detach() * mask).cpu()


def _recognizer_for(recognizer: KnownRecognizer | None, against: Sequence[str] | None) -> KnownRecognizer:
    """``recognizer`` (checked against ``against`` when both are given), else ``known_recognizer(against=...)``."""
    if recognizer is None:
        return known_recognizer(against=against or ("dlib",))
    if against is not None and check_against(against) != recognizer.against:
        raise ValueError(f"against={tuple(against)} but the recognizer knows {recognizer.against}")
    return recognizer


def refine_faces(faces: torch.Tensor, strength: str = "mid", steps: int | None = None, seed: int = 0,
                 progress: bool = False, **kwargs) -> torch.Tensor:
    """``faces`` (``N x 3 x H x W`` in [0, 1]) protected each by its own refined delta
    (``refine_deltas``, same arguments), clipped to [0, 1] and rounded to 8 bits (what a saved
    file holds), on the CPU."""
    d = refine_deltas(faces, strength, steps, seed, progress, **kwargs)
    return ((check_pixels(faces, "faces", ndim=(4,)) + d).clamp(0, 1) * 255).round() / 255


# ------------------------------------------------------------------ universal, dlib-first
def fit_universal(faces: torch.Tensor, labels: torch.Tensor, config: RefineConfig, data: str = "",
                  progress: bool = True, recognizer: KnownRecognizer | None = None,
                  against: Sequence[str] | None = None) -> Perturbation:
    """One universal delta (``3 x S x S`` for ``N x 3 x S x S`` training faces with identity
    ``labels``) with the same objective as ``refine_deltas``, each step on ``batch_size``
    random faces; no feather (``Perturbation.apply`` adds it to the whole crop, ``toap protect``
    feathers it). The PSNR floor holds for every face. ``against``/``recognizer``: the networks,
    as in ``refine_deltas``. Returns the ``Perturbation`` (method ``dlib-first`` against dlib
    alone, else ``ensemble``; surrogates ``toap.own_descriptor`` of each network)."""
    faces = check_pixels(faces, "faces", ndim=(4,))
    if labels.ndim != 1 or len(labels) != len(faces):
        raise ValueError(f"need one label per face, got {tuple(labels.shape)} for {len(faces)} faces")
    cfg = config
    rec = _recognizer_for(recognizer, against)
    dev, side = rec.device, faces.shape[-1]
    t0 = time.perf_counter()
    refs = _references(rec, faces, labels)
    x = faces.to(dev)
    gen, rng = torch.Generator().manual_seed(cfg.seed), np.random.default_rng(cfg.seed)
    ones = torch.ones(side, side, device=dev)
    delta = torch.zeros(1, 3, side, side, device=dev, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.steps))  # big steps first, fine ones last
    history = []
    with torch.enable_grad():  # also under a caller's no_grad
        for step in tqdm(range(cfg.steps), desc=f"universal against {'+'.join(rec.against)}", disable=not progress):
            idx = torch.randint(0, len(faces), (min(cfg.batch_size, len(faces)),), generator=gen)
            draw = _draw(cfg, rng)
            loss, parts = _loss(rec, cfg, refs, idx, (x[idx] + delta).clamp(0, 1), draw, gen)
            opt.zero_grad(set_to_none=True)
            (loss / len(idx)).backward()
            opt.step()
            sched.step()
            _project(delta.data, ones, cfg)
            if step % 50 == 0 or step == cfg.steps - 1:
                history.append({"step": step, **parts, "draw": draw["kind"]})
    seconds = round(time.perf_counter() - t0, 1)
    hash_part = " + own 48-bit layer flips on dlib's" if "dlib" in rec.against else ""
    card = {"method": "dlib-first" if rec.against == ("dlib",) else "ensemble", "surrogates": rec.surrogates,
            "against": list(rec.against), "config": asdict(cfg),
            "objective": f"descriptor distance from the clean face and its identity mean (capped, mean over networks){hash_part}",
            "data": data or f"{len(faces)} faces of {len(labels.unique())} identities", "n_faces": len(faces),
            "seed": cfg.seed, "seconds": {"delta": seconds}, "history": history, "device": str(dev)}
    return Perturbation(delta.detach()[0].cpu(), cfg.eps, card)
