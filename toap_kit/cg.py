"""The Compression Generator (CG): a learned, differentiable imitation of real post-processing.

TOAP [paper] trains its perturbation against a "local and global" Compression Generator.
The kit's reading [kit] (see docs/method.md):

- **local branch** (``LocalBranch``): JPEG-like block processing -- RGB -> YCbCr, chroma
  subsampling (4:2:0, 4:2:2 or none), 8x8 DCT, quantisation by a *learnable* table that
  starts at the standard IJG table for the requested quality (a learnable log-correction at
  11 anchor qualities 0, 10, ..., 100, interpolated in between), soft rounding (a learnable
  mix between kornia's cubic rounding and a hard round with a straight-through gradient), and
  the inverse. At initialisation it equals kornia's differentiable JPEG for 4:2:0.
- **global branch** (``GlobalBranch``): a small residual CNN for whole-image effects,
  ``z + a * tanh(g(z, x, c))`` with small ``a``, where ``z`` is the local branch's output,
  ``x`` its input (the kit lets ``g`` see what the codec was given, so it can learn where the
  real codec's rounding lands) and ``c`` the same conditions (quality, chroma, resize scale)
  as constant input maps. Its last layer starts at zero, so the CG
  starts out as the local branch alone.

``CompressionGenerator(x, quality, chroma, scale)``: ``N x 3 x H x W`` in [0, 1] -> same.
Pre-training (``pretrain``) imitates the real codecs: targets come from Pillow/OpenCV
(``postprocess``), never from the CG, on clean and randomly perturbed training faces.
``mitigation_loss`` / ``finetune_to_remove`` are the entry point for TOAP's alternation: the
CG learns to restore the clean codes of ``x + delta`` while a fidelity term keeps it
imitating the real codecs. ``load()`` gives the shipped pre-trained CG (``data/cg/``).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import kornia
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import diffproc, postprocess
from .data import DATA_DIR, load_faceset, make_protocol
from .store import load_checked, save_with_card

__all__ = ["BENCH_SETTINGS", "CG_DIR", "CGTrainConfig", "CompressionGenerator", "GlobalBranch", "LocalBranch",
           "block_dct", "build", "calibrate_local", "card", "condition_of", "fidelity", "finetune_to_remove", "heldout_faces",
           "load", "measure_fidelity", "mitigation_loss", "perturb_randomly", "pretrain", "save", "training_faces"]

log = logging.getLogger(__name__)
CG_DIR = DATA_DIR / "cg"
CHROMAS = ("444", "422", "420")

# IJG standard tables (ITU-T T.81, Annex K), as libjpeg and kornia use them.
_QT_Y = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float32)
_QT_C = torch.full((8, 8), 99.0)
_QT_C[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]],
                             dtype=torch.float32)


def _dct_matrix() -> torch.Tensor:
    """Orthonormal 8-point DCT-II matrix C (rows = frequencies): X = C x C^T."""
    n = torch.arange(8, dtype=torch.float64)
    c = torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16) * 0.5
    c[0] /= math.sqrt(2)
    return c.float()


def _poly_floor(x: torch.Tensor) -> torch.Tensor:
    f = x.floor()
    return f + (x - 0.5 - f) ** 3


def _soft_clip(x: torch.Tensor, lo: float, hi: float, scale: float = 0.02) -> torch.Tensor:
    x = torch.where(x > hi, -scale * (torch.exp(-(x - hi).clamp(min=0)) - 1.0) + hi, x)
    return torch.where(x < lo, scale * (torch.exp((x - lo).clamp(max=0)) - 1.0) + lo, x)


def _quality_scale(q: torch.Tensor) -> torch.Tensor:
    q = torch.where(q == 0, torch.ones_like(q), q)
    return _poly_floor(torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q))


def _blocks(c: torch.Tensor) -> torch.Tensor:
    """``N x H x W`` (H, W multiples of 8) -> ``N x B x 8 x 8``."""
    n, h, w = c.shape
    return c.reshape(n, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4).reshape(n, -1, 8, 8)


def _unblocks(b: torch.Tensor, h: int, w: int) -> torch.Tensor:
    n = b.shape[0]
    return b.reshape(n, h // 8, w // 8, 8, 8).permute(0, 1, 3, 2, 4).reshape(n, h, w)


def block_dct(plane: torch.Tensor, shift: float = 128.0) -> torch.Tensor:
    """JPEG's 8x8 block DCT of one image plane, as the local branch computes it.

    Args:
        plane: ``N x H x W`` (H, W multiples of 8), e.g. luma in 0..255; a perturbation's
            luma (no offset) with ``shift=0``.
        shift: level shift subtracted before the transform (JPEG: 128 for 8-bit samples).

    Returns ``N x B x 8 x 8`` orthonormal DCT-II coefficients, blocks in row-major order
    (B = H/8 * W/8), frequencies (vertical, horizontal) from the top-left.
    """
    if plane.ndim != 3 or plane.shape[-2] % 8 or plane.shape[-1] % 8:
        raise ValueError(f"block_dct needs N x H x W with H, W multiples of 8, got {tuple(plane.shape)}")
    d = _dct_matrix().to(plane)
    return d @ (_blocks(plane) - shift) @ d.T


def _as_quality(x: torch.Tensor, quality: float | torch.Tensor) -> torch.Tensor:
    """One quality per image (``N``), checked by ``diffproc``."""
    return diffproc.quality_tensor(x, quality).expand(len(x))


class LocalBranch(nn.Module):
    """JPEG-like block processing with learnable quantisation tables and rounding.

    Shape: ``N x 3 x H x W`` in [0, 1] -> same (not clamped; ``CompressionGenerator`` clamps).
    """

    ANCHORS = 11  # qualities 0, 10, ..., 100

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("qt_y", _QT_Y.clone())
        self.register_buffer("qt_c", _QT_C.clone())
        self.register_buffer("dct", _dct_matrix())
        # log-corrections of the tables: per chroma mode (444, 422, 420) x anchor quality
        self.log_qt_y = nn.Parameter(torch.zeros(len(CHROMAS), self.ANCHORS, 8, 8))
        self.log_qt_c = nn.Parameter(torch.zeros(len(CHROMAS), self.ANCHORS, 8, 8))
        # rounding: 0 = hard round with an identity gradient, 1 = kornia's cubic rounding
        # r + (v - r)^3 (forward and gradient), up to 4 = softer than kornia's
        self.soft_mix = nn.Parameter(torch.ones(()))
        # chroma down-sampling: 0 = kornia's antialiased bilinear, 1 = libjpeg's 2x2 box average
        self.chroma_box = nn.Parameter(torch.zeros(()))

    def tables(self, quality: torch.Tensor, chroma: str = "420") -> tuple[torch.Tensor, torch.Tensor]:
        """Luma and chroma quantisation tables for each quality (``N`` -> ``N x 8 x 8`` each)."""
        k = CHROMAS.index(postprocess._chroma(chroma))
        pos = (quality / 100 * (self.ANCHORS - 1)).clamp(0, self.ANCHORS - 1)
        lo = pos.floor().long().clamp(max=self.ANCHORS - 2)
        w = (pos - lo.to(pos))[:, None, None]
        out = []
        for base, corr in ((self.qt_y, self.log_qt_y), (self.qt_c, self.log_qt_c)):
            std = _poly_floor(_soft_clip((base[None] * _quality_scale(quality)[:, None, None] + 50) / 100, 1, 255))
            c = corr[k, lo] * (1 - w) + corr[k, lo + 1] * w
            out.append(std * torch.exp(c))
        return out[0], out[1]

    def _round(self, v: torch.Tensor) -> torch.Tensor:
        t = self.soft_mix.clamp(0, 4)
        r = v.round()
        return r + t * (v - r) ** 3 + (1 - t).clamp(min=0) * (v - v.detach())

    def _code(self, c: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        h, w = c.shape[-2:]
        d = self.dct
        coef = d @ (_blocks(c) - 128.0) @ d.T
        coef = self._round(coef / table[:, None]) * table[:, None]
        return _unblocks(d.T @ coef @ d + 128.0, h, w)

    def forward(self, x: torch.Tensor, quality: float | torch.Tensor, chroma: str = "420") -> torch.Tensor:
        postprocess._check(x)
        q, chroma = _as_quality(x, quality), postprocess._chroma(chroma)
        h, w = x.shape[-2:]
        ph, pw = (-h) % 16, (-w) % 16
        xp = F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x
        H, W = xp.shape[-2:]
        ycc = kornia.color.rgb_to_ycbcr(xp) * 255.0
        ty, tc = self.tables(q, chroma)
        y = self._code(ycc[:, 0], ty)
        cc = ycc[:, 1:]
        if chroma != "444":
            size = (H // 2, W // 2) if chroma == "420" else (H, W // 2)
            m = self.chroma_box.clamp(0, 1)
            smooth = kornia.geometry.transform.resize(cc, size, interpolation="bilinear", antialias=True)
            cc = (1 - m) * smooth + m * F.adaptive_avg_pool2d(cc, size)
        cc = torch.stack([self._code(cc[:, 0], tc), self._code(cc[:, 1], tc)], 1)
        if chroma != "444":
            cc = kornia.geometry.transform.resize(cc, (H, W), interpolation="bilinear")
        out = kornia.color.ycbcr_to_rgb(torch.cat([y[:, None], cc], 1) / 255.0)
        return out[..., :h, :w]


class GlobalBranch(nn.Module):
    """Small residual image-to-image CNN: ``z + a * tanh(g(z, x, c))``; ``z`` = local branch
    output, ``x`` = its input, ``c`` = condition maps (quality/100, chroma one-hot, resize
    scale). Starts as the identity on ``z`` (last layer zero).

    Shape: ``N x 3 x H x W`` -> same.
    """

    N_COND = 5

    def __init__(self, width: int = 16, blocks: int = 2, a: float = 0.1) -> None:
        super().__init__()
        if not 0 < a <= 0.5:
            raise ValueError(f"global branch amplitude a must be in (0, 0.5], got {a}")
        self.a, self.width, self.n_blocks = float(a), int(width), int(blocks)
        self.inp = nn.Conv2d(6 + self.N_COND, width, 3, padding=1, padding_mode="replicate")
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, padding_mode="replicate"), nn.LeakyReLU(0.1),
            nn.Conv2d(width, width, 3, padding=1, padding_mode="replicate")) for _ in range(blocks))
        self.out = nn.Conv2d(width, 3, 3, padding=1, padding_mode="replicate")
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        c = cond[:, :, None, None].expand(-1, -1, *z.shape[-2:])
        h = F.leaky_relu(self.inp(torch.cat([z * 2 - 1, (z - x) * 10, c], 1)))
        for b in self.blocks:
            h = F.leaky_relu(h + b(h), 0.1)
        return z + self.a * torch.tanh(self.out(h))


def _cond(x: torch.Tensor, q: torch.Tensor, chroma: str, scale: float) -> torch.Tensor:
    one_hot = torch.zeros(len(x), 3, dtype=x.dtype, device=x.device)
    one_hot[:, CHROMAS.index(chroma)] = 1
    s = torch.full((len(x), 1), float(scale), dtype=x.dtype, device=x.device)
    return torch.cat([(q / 100)[:, None], one_hot, s], 1)


class CompressionGenerator(nn.Module):
    """The CG: optional differentiable down-up resize (``scale`` < 1), the local JPEG-like
    branch, the global residual branch, clamp to [0, 1].

    >>> import torch
    >>> cg = CompressionGenerator()
    >>> cg(torch.rand(2, 3, 32, 32), quality=75, chroma="420").shape
    torch.Size([2, 3, 32, 32])
    """

    def __init__(self, width: int = 16, blocks: int = 2, a: float = 0.1) -> None:
        super().__init__()
        self.local = LocalBranch()
        self.glob = GlobalBranch(width, blocks, a)

    def config(self) -> dict:
        return {"width": self.glob.width, "blocks": self.glob.n_blocks, "a": self.glob.a}

    def forward(self, x: torch.Tensor, quality: float | torch.Tensor = 75, chroma: str = "420",
                scale: float = 1.0) -> torch.Tensor:
        postprocess._check(x)
        q, chroma = _as_quality(x, quality), postprocess._chroma(chroma)
        if scale != 1.0:
            x = diffproc.resize(x, scale)
        z = self.local(x, q, chroma)
        return self.glob(z, x, _cond(x, q, chroma, scale)).clamp(0, 1)

    def simulate(self, x: torch.Tensor, spec: postprocess.Spec) -> torch.Tensor:
        """The CG's imitation of the real ``postprocess`` spec (a JPEG, a profile, or a resize
        followed by a JPEG): ``condition_of(spec)`` gives the conditions."""
        return self(x, **condition_of(spec))


def condition_of(spec: postprocess.Spec) -> dict:
    """The CG conditions ``{quality, chroma, scale}`` of a real spec: one JPEG (Pillow or
    OpenCV) or platform profile, optionally preceded by a down-up ``resize`` (a
    ``resize_max`` that does not shrink 112-pixel faces is ignored)."""
    cond = {"quality": 100.0, "chroma": "444", "scale": 1.0}
    seen_codec = False
    for r in postprocess.parse(spec):
        if r["op"] in ("jpeg", "jpeg_cv2") and not seen_codec:
            cond["quality"] = float(r.get("quality", 75))
            cond["chroma"] = str(r.get("subsampling", "420"))
            seen_codec = True
        elif r["op"] == "resize" and not seen_codec:
            cond["scale"] = float(r.get("scale", 0.5))
        elif r["op"] == "resize_max":
            continue
        else:
            raise ValueError(f"the CG has no condition for {r} in {spec!r} (it imitates resize + one JPEG)")
    return cond


# ---------------------------------------------------------------- pre-training
@dataclass
class CGTrainConfig:
    """Pre-training sizes. ``eps`` bounds the random perturbations (pixel units of [0, 1])."""

    steps: int = 2000
    batch_size: int = 32
    crop: int = 48           # train on random crops aligned to the 16-pixel JPEG grid (0 = whole)
    lr: float = 1e-3         # global branch
    local_lr_factor: float = 0.0  # x lr for the local branch's tables (see ``pretrain``)
    calibrate: bool = True        # grid-search the local rounding / chroma filter first
    quality_range: tuple[int, int] = (30, 100)
    p_perturbed: float = 0.5
    eps: float = 8 / 255
    p_resize: float = 0.15
    p_cv2: float = 0.15
    seed: int = 0


def perturb_randomly(x: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    """``x`` plus a random perturbation with ``|delta|_inf <= eps``: per image one of sign
    noise, uniform noise, or smooth (upsampled) noise; clamped to [0, 1]."""
    if not 0 <= eps <= 1:
        raise ValueError(f"eps must be in [0, 1], got {eps}")
    n, _, h, w = x.shape
    kind = torch.randint(0, 3, (n,), generator=generator)
    u = torch.rand(x.shape, generator=generator) * 2 - 1
    smooth = F.interpolate(torch.rand(n, 3, max(2, h // 8), max(2, w // 8), generator=generator) * 2 - 1,
                           size=(h, w), mode="bilinear", align_corners=False)
    delta = torch.where(kind[:, None, None, None] == 0, u.sign(), torch.where(kind[:, None, None, None] == 1, u, smooth))
    return (x + eps * delta.to(x)).clamp(0, 1)


def _draw(rng: np.random.Generator, cfg: CGTrainConfig) -> list[dict]:
    """One training draw: optional down-up resize, then a JPEG (Pillow or OpenCV)."""
    ops: list[dict] = []
    if rng.random() < cfg.p_resize:
        ops.append({"op": "resize", "scale": round(float(rng.uniform(0.5, 0.9)), 2), "interpolation": "bilinear"})
    q = int(rng.integers(cfg.quality_range[0], cfg.quality_range[1] + 1))
    c = str(rng.choice(["420", "444", "422"], p=[0.5, 0.4, 0.1]))
    if rng.random() < cfg.p_cv2:
        ops.append({"op": "jpeg_cv2", "quality": q, "subsampling": c})
    else:
        ops.append({"op": "jpeg", "quality": q, "subsampling": c, "progressive": bool(rng.random() < 0.3)})
    return ops


@torch.no_grad()
def calibrate_local(cg: CompressionGenerator, images: torch.Tensor, eps: float = 8 / 255, seed: int = 0,
                    soft_mixes: Sequence[float] = (0.5, 1.0, 1.5, 2.0),
                    chroma_boxes: Sequence[float] = (0.0, 0.5, 1.0),
                    qualities: Sequence[int] = (30, 50, 70, 85, 95, 100)) -> dict:
    """Set the local branch's rounding softness and chroma down-sampling filter by grid search:
    the pair with the smallest mean log squared error to the real codec (Pillow JPEG at
    ``qualities``, 4:2:0 and 4:4:4) on ``images`` (training faces; half randomly perturbed).

    Why not gradient descent: through the soft rounding, the gradient of these parameters
    does not tell how the *real* rounding error moves, and in the kit's runs it made them worse."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([images, perturb_randomly(images, eps, g)])
    settings = [(q, c) for q in qualities for c in ("420", "444")]
    targets = {s: postprocess.jpeg(x, s[0], s[1]) for s in settings}
    best, scores = None, {}
    for t in soft_mixes:
        for b in chroma_boxes:
            cg.local.soft_mix.fill_(t)
            cg.local.chroma_box.fill_(b)
            err = [((cg.local(x, q, c).clamp(0, 1) - targets[(q, c)]).pow(2).flatten(1).mean(1) * 255 ** 2)
                   .clamp(min=1e-3).log().mean() for q, c in settings]
            scores[(t, b)] = float(torch.stack(err).mean())
            if best is None or scores[(t, b)] < scores[best]:
                best = (t, b)
    cg.local.soft_mix.fill_(best[0])
    cg.local.chroma_box.fill_(best[1])
    log.info("local branch calibrated: soft_mix %.2f, chroma_box %.2f", *best)
    return {"soft_mix": best[0], "chroma_box": best[1], "scores": {f"{k[0]},{k[1]}": v for k, v in scores.items()}}


def fidelity(cg: CompressionGenerator, x: torch.Tensor, spec: postprocess.Spec,
             target: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of the CG's imitation of ``spec`` to the real operation's output
    (computed with the real library unless ``target`` is given), in squared 8-bit levels."""
    if target is None:
        target = postprocess.apply(x.detach(), spec)
    return F.mse_loss(cg.simulate(x, spec), target) * 255.0 ** 2


def pretrain(cg: CompressionGenerator, images: torch.Tensor, config: CGTrainConfig | None = None,
             progress: bool = False) -> list[dict]:
    """Train ``cg`` to imitate the real codecs on ``images`` (``N x 3 x H x W`` in [0, 1]:
    training faces only). Each step draws a batch, perturbs part of it randomly within
    ``eps``, draws one real operation (``_draw``), makes the target with the real library,
    and minimises the mean log squared error per image (so every quality counts, as in PSNR).
    Returns the history (mean squared error in 8-bit levels per step)."""
    cfg = config or CGTrainConfig()
    if len(images) < cfg.batch_size:
        raise ValueError(f"need at least batch_size={cfg.batch_size} images, got {len(images)}")
    if cfg.calibrate:
        calibrate_local(cg, images[:32], eps=cfg.eps, seed=cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    groups = [{"params": cg.glob.parameters(), "lr": cfg.lr}]
    if cfg.local_lr_factor > 0:
        groups.append({"params": cg.local.parameters(), "lr": cfg.local_lr_factor * cfg.lr})
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.steps))
    was_training = cg.training
    cg.train()
    history = []
    for step in tqdm(range(cfg.steps), disable=not progress, desc="CG pre-training"):
        x = images[torch.randperm(len(images), generator=g)[:cfg.batch_size]]
        if cfg.crop and cfg.crop < min(x.shape[-2:]):
            oy, ox = (16 * int(torch.randint(0, (s - cfg.crop) // 16 + 1, (1,), generator=g))
                      for s in x.shape[-2:])
            x = x[..., oy:oy + cfg.crop, ox:ox + cfg.crop]
        mask = (torch.rand(len(x), generator=g) < cfg.p_perturbed)[:, None, None, None]
        x = torch.where(mask, perturb_randomly(x, cfg.eps, g), x)
        spec = _draw(rng, cfg)
        target = postprocess.apply(x, spec)
        per_image = (cg.simulate(x, spec) - target).pow(2).flatten(1).mean(1) * 255.0 ** 2
        loss = per_image.clamp(min=1e-3).log().mean()  # log-MSE: every quality counts (like PSNR)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        history.append({"step": step, "loss": float(per_image.detach().mean()), "spec": spec})
    cg.train(was_training)
    return history


# ---------------------------------------------------------------- removal (TOAP's alternation)
def mitigation_loss(cg: CompressionGenerator, models: Sequence[nn.Module], x: torch.Tensor, delta: torch.Tensor,
                    spec: postprocess.Spec, lam: float = 0.05, beta: float = 1.0) -> tuple[torch.Tensor, dict]:
    """The CG phase objective of TOAP's alternation [kit]: restore the clean codes of
    ``x + delta`` through the CG, while staying faithful to the real codec.

    ``restore`` = mean over models and bits of ``1 - b * tanh(beta * u)``, where
    ``b = sign(f(x))`` are the clean codes and ``u = f(CG(x + delta))`` (0 when every bit is
    restored with margin, 2 when all are flipped); ``fidelity`` = squared error (8-bit levels)
    of the CG's imitation of ``spec`` to the real codec, on ``x`` and on ``x + delta``.
    Returns ``(restore + lam * fidelity, parts)``.

    Args:
        models: hash models ``f`` (``N x 3 x H x W`` in [0, 1] -> ``N x bits``); not updated.
        x: clean images ``N x 3 x H x W`` in [0, 1]; delta: perturbation, broadcastable.
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    xa = (x + delta).clamp(0, 1).detach()
    sim = cg.simulate(xa, spec)
    restore = x.new_zeros(())
    for m in models:
        with torch.no_grad():
            b = torch.sign(m(x))
        restore = restore + (1 - b * torch.tanh(beta * m(sim))).mean()
    restore = restore / max(1, len(models))
    both = torch.cat([x.detach(), xa])
    fid = fidelity(cg, both, spec)
    return restore + lam * fid, {"restore": float(restore.detach()), "fidelity": float(fid.detach())}


def finetune_to_remove(cg: CompressionGenerator, models: Sequence[nn.Module], x: torch.Tensor, delta: torch.Tensor,
                       specs: Iterable[postprocess.Spec] | Callable[[int], postprocess.Spec], steps: int = 10,
                       lr: float = 1e-3, lam: float = 0.05, batch_size: int = 16, seed: int = 0) -> list[dict]:
    """Fine-tune ``cg`` for ``steps`` steps to remove ``delta`` (``mitigation_loss``); the
    models are frozen (their mode and ``requires_grad`` are restored). ``specs`` is a list of
    real specs cycled through, or a function ``step -> spec``. Returns the history."""
    spec_at = specs if callable(specs) else (lambda i, s=list(specs): s[i % len(s)])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(cg.parameters(), lr=lr)
    states = [(m.training, [p.requires_grad for p in m.parameters()]) for m in models]
    for m in models:
        m.eval()
        m.requires_grad_(False)
    history = []
    try:
        for step in range(steps):
            idx = torch.randperm(len(x), generator=g)[:batch_size]
            d = delta if delta.shape[0] != len(x) else delta[idx]
            loss, parts = mitigation_loss(cg, models, x[idx], d, spec_at(step), lam)
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append({"step": step, "loss": float(loss.detach()), **parts})
    finally:
        for m, (tr, rg) in zip(models, states):
            m.train(tr)
            for p, r in zip(m.parameters(), rg):
                p.requires_grad_(r)
    return history


# ---------------------------------------------------------------- shipping
def save(cg: CompressionGenerator, info: dict, name: str = "cg", folder: Path = CG_DIR) -> Path:
    """Write ``cg`` as safetensors + JSON card (atomically, see ``toap_kit.store``)."""
    return save_with_card(cg.state_dict(), {"name": name, "config": cg.config(), **info}, folder, name)[0]


def card(name: str = "cg", folder: Path = CG_DIR) -> dict:
    """The JSON card of the shipped CG."""
    path = Path(folder) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no CG card at {path}; build it with `python -m toap_kit.artifacts cg`")
    return json.loads(path.read_text())


def load(name: str = "cg", folder: Path = CG_DIR) -> CompressionGenerator:
    """The shipped pre-trained CG in eval mode, its weights checked against the card's sha256."""
    c = card(name, folder)
    cg = CompressionGenerator(**c["config"])
    cg.load_state_dict(load_checked(Path(folder) / f"{name}.safetensors", c["sha256"]))
    return cg.eval()


# ---------------------------------------------------------------- measuring
BENCH_SETTINGS = tuple(f"jpeg:{q}" for q in range(50, 100, 5)) + ("facebook", "weibo", "wechat", "instagram", "twitter")


def _agree(codes: list[torch.Tensor], ref: list[torch.Tensor]) -> float | None:
    """Share of equal bits between two lists of per-model codes, mean over the models."""
    if not codes:
        return None
    return float(np.mean([float((a == b).float().mean()) for a, b in zip(codes, ref)]))


@torch.no_grad()
def measure_fidelity(cg: CompressionGenerator, x: torch.Tensor, settings: Sequence[str] = BENCH_SETTINGS,
                     models: Sequence[nn.Module] = (), batch_size: int = 64) -> list[dict]:
    """How well the CG imitates the real codecs on faces ``x`` (``N x 3 x H x W`` in [0, 1]),
    against kornia's differentiable JPEG and against doing nothing (identity).

    Per setting (a real ``postprocess`` spec): mean PSNR (dB) of CG(x), diffjpeg(x) and x to
    real(x); and, with hash ``models``, the share of bits (mean over models) on which the
    codes of CG(x) / diffjpeg(x) / x agree with the codes of real(x).
    """
    was = cg.training
    cg.eval()

    def codes(t: torch.Tensor) -> list[torch.Tensor]:
        return [m.encode(t) for m in models]

    x_codes = codes(x)
    rows = []
    for spec in settings:
        real = postprocess.apply(x, spec)
        sim = torch.cat([cg.simulate(x[i:i + batch_size], spec) for i in range(0, len(x), batch_size)])
        dj = diffproc.apply(x, spec)
        real_codes = codes(real)
        rows.append({"setting": spec,
                     "psnr_cg": float(postprocess.psnr(sim, real).mean()),
                     "psnr_diffjpeg": float(postprocess.psnr(dj, real).mean()),
                     "psnr_identity": float(postprocess.psnr(x, real).clamp(max=100).mean()),
                     "bits_agree_cg": _agree(codes(sim), real_codes),
                     "bits_agree_diffjpeg": _agree(codes(dj), real_codes),
                     "bits_agree_identity": _agree(x_codes, real_codes)})
    cg.train(was)
    return rows


def heldout_faces(size: int = 112, n: int = 300) -> torch.Tensor:
    """``n`` faces of the open-set protocol's *evaluation* identities (queries and database,
    evenly spaced), never seen by the CG's pre-training: ``n x 3 x size x size`` in [0, 1]."""
    faces = load_faceset("lfw158", size)
    proto = make_protocol(faces)
    idx = sorted(proto.queries + proto.database_faces)
    if n and n < len(idx):
        idx = [idx[int(i)] for i in np.linspace(0, len(idx) - 1, n)]
    return faces.images[idx]


def training_faces(size: int = 112, distractors: int = 0) -> torch.Tensor:
    """The open-set protocol's training-identity faces (plus the first ``distractors``
    distractor faces): what the CG may be pre-trained on."""
    faces = load_faceset("lfw158", size)
    x = faces.images[make_protocol(faces).train]
    if distractors:
        x = torch.cat([x, load_faceset("distractors", size).images[:distractors]])
    return x


def build(force: bool = False, config: CGTrainConfig | None = None, folder: Path = CG_DIR,
          progress: bool = True) -> Path:
    """Pre-train the CG from scratch on the training faces (+ 1,000 distractors) and ship it
    as ``data/cg/cg.safetensors`` + ``cg.json`` (skipped if present unless ``force``)."""
    weights = Path(folder) / "cg.safetensors"
    if weights.is_file() and (Path(folder) / "cg.json").is_file() and not force:
        log.info("%s exists, skipping", weights)
        return weights
    cfg = config or CGTrainConfig()
    torch.manual_seed(cfg.seed)
    x = training_faces(112, distractors=1000)
    cg = CompressionGenerator()
    t0 = time.time()
    history = pretrain(cg, x, cfg, progress=progress)
    minutes = (time.time() - t0) / 60
    rows = measure_fidelity(cg, heldout_faces(112, 100), ("jpeg:50", "jpeg:75", "jpeg:95", "facebook", "weibo"))
    info = {"what": "Compression Generator (local JPEG-like branch + global residual CNN), pre-trained "
                    "to imitate Pillow/OpenCV JPEG (targets from the real codecs)",
            "train_config": asdict(cfg),
            "training_data": {"protocol": "open-set, seed 0", "images": len(x),
                              "faces": "training-identity faces of lfw158 + first 1000 distractors, 112x112",
                              "perturbed": f"share {cfg.p_perturbed}, random, |delta|_inf <= {cfg.eps:.5f}"},
            "local_branch": {"soft_mix": cg.local.soft_mix.item(), "chroma_box": cg.local.chroma_box.item()},
            "final_train_mse_8bit": float(np.mean([h["loss"] for h in history[-100:]])),
            "train_minutes": round(minutes, 2), "torch_threads": torch.get_num_threads(),
            "heldout_psnr": {r["setting"]: {"cg": round(r["psnr_cg"], 3), "diffjpeg": round(r["psnr_diffjpeg"], 3)}
                             for r in rows},
            "seed": cfg.seed}
    return save(cg, info, "cg", folder)
