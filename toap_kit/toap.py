"""TOAP: one universal perturbation that is robust, transferable and universal (Lv et al.,
"Three-in-one", arXiv 2412.09692). docs/method.md says what is the paper's and what is the kit's.

The four parts [paper], each read concretely by the kit [kit]:

1. **Robust objectives** from the variation pattern of the hash outputs after post-processing
   (notebook 03 measures it: real JPEG from q90 to q30 barely moves a universal perturbation's
   pre-sign outputs ``|u|`` and flips back few of its flipped bits; a down-up resize by 0.5 is
   what weakens it, bringing more bits back):
   - ``margin``: every bit of ``u / s`` (``s`` = the surrogate's mean |u| on clean faces) sits
     ``margin`` past the wrong side of the identity's anchor code, so a post-processing has to
     move ``u`` by more than the margin to bring a bit back;
   - ``consistency``: the per-bit Bernoulli of ``sigmoid(2 u / s)`` after the Compression
     Generator matches the one before it (KL), so what the CG does to the face keeps the bits;
   - ``feature``: cosine similarity of each surrogate's embedding (the small CNNs' distilled
     128-D head; dlib's 128-D descriptor where the dlib port is a surrogate) to the clean one's.
2. **Expectation over post-processing and input diversity**: each side of each step sees one
   random draw: nothing, a real codec through the straight-through wrapper (``postprocess``'s
   ``OpSampler``: JPEG, WebP, profiles, resize, blur, noise), the CG's imitation of a JPEG, or a
   differentiable down-up resize + JPEG; with a random re-crop (scale and shift, as a crawler's
   face cropper cuts the face again).
3. **Meta-learning over surrogates** (first-order, MGAA-like): the step's held-out surrogate
   rotates; a sign step on the others (meta-train, one draw) gives ``delta'``; the held-out
   surrogate's gradient at ``delta'`` (meta-test, another draw) is added to the meta-train one.
4. **Alternation with the CG**: rounds of (a) ``steps_per_round`` steps on ``delta``, the CG
   frozen; (b) ``cg_steps`` steps fine-tuning a copy of the CG to restore the codes of
   ``x + delta`` (``cg.finetune_to_remove``) while its fidelity term keeps it an imitation of
   the real codecs. The CG is a training tool only: it never evaluates anything.

Image quality: after every step ``delta`` is projected on the eps-ball and then scaled into the
ball of RMS ``10^(-psnr_floor/20)``, so every protected face has PSNR >= ``psnr_floor``.

    >>> toap = TOAP(["vgg_dpsh_32", "resnet_hashnet_32", "resnet_dpsh_16"], eps=8 / 255)
    >>> p = toap.fit(faces, labels)          # a Perturbation; p.card records everything
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import attacks, cg as cg_module, diffproc, postprocess, zoo
from .config import device as default_device
from .data import load_faceset, make_protocol
from .perturbation import Perturbation
from .recognizers import RecognizerHash

__all__ = ["own_descriptor", "surrogate_networks", "engine_network", "stand_in", "DLIB_DESCRIPTOR", "DLIB_SURROGATE", "KNOWN_BACKBONE", "TIERS", "TIER_LABELS", "TIER_WORDS", "TOAP", "TOAPConfig", "consistency_term", "dlib_surrogate", "feature_term",
           "load_surrogates", "margin_term", "meta_gradient", "threat_tier"]

log = logging.getLogger(__name__)

DLIB_SURROGATE = "dlib_own_itq_48"
"""The protector's own hash engine on dlib's network: ITQ at 48 bits (seed 1) fitted on the
training identities' faces only; never a victim's hash layer (those are 32 and 64 bits, seed 0,
fitted with the distractors too)."""



def own_descriptor(network: str) -> str:
    """The surrogate name of a protector's own use of a real network's descriptor
    (``toap_kit.refine``, ``recognizers.NAMES``): ``<network>_own_descriptor``."""
    return f"{network}_own_descriptor"


DLIB_DESCRIPTOR = own_descriptor("dlib")
"""The protector's own use of dlib's network in ``toap_kit.refine``: the 128-D descriptor of the
face's own landmark-aligned chip and a 48-bit ITQ layer fitted (seed 1) on the shipped teacher
descriptors of the training identities; never a victim's hash layer."""
KNOWN_BACKBONE = (DLIB_SURROGATE, DLIB_DESCRIPTOR)
"""Surrogate names through which a protector uses dlib's network (the first engines' backbone)."""


def surrogate_networks(surrogates: Sequence[str]) -> set[str]:
    """The real networks a protection used: dlib's through ``KNOWN_BACKBONE``, any network
    through its ``own_descriptor``."""
    return {"dlib" for s in surrogates if s in KNOWN_BACKBONE} | {
        s.removesuffix("_own_descriptor") for s in surrogates if s.endswith("_own_descriptor")}


def engine_network(victim: str) -> str | None:
    """The real network under a zoo engine (``dlib``, ``mobileface``, ``faceres``), or None for
    a small CNN. Read from the zoo card; a name outside the zoo by its prefix ``<network>_itq_``."""
    if victim in zoo.names():
        return zoo.RECOGNIZER_BACKBONES.get(zoo.card(victim)["backbone"])
    net = victim.split("_itq_")[0] if "_itq_" in victim else None
    return net if net in zoo.RECOGNIZER_BACKBONES.values() else None

TIERS = ("whitebox", "cnn-blackbox", "engine-blackbox", "engine-known-backbone", "cnn-teacher-known")
"""The five threat tiers, from ``threat_tier``; every protection number the kit prints names one."""
TIER_LABELS = MappingProxyType({
    "whitebox": "white-box",
    "cnn-blackbox": "black-box small CNN",
    "engine-blackbox": "real engine black-box",
    "engine-known-backbone": "real engine, known backbone",
    "cnn-teacher-known": "small CNN, teacher known",
})
"""A short label per tier, for prose, tables and figures (the notebooks, the README, the demo)."""
TIER_WORDS = MappingProxyType({
    "whitebox": "the protector attacked this very engine",
    "cnn-blackbox": "never seen: the protector used no network this CNN learned from",
    "engine-blackbox": "never seen, nor its network",
    "engine-known-backbone": "protector used this engine's network, not its hash layer",
    "cnn-teacher-known": "protector used dlib's network, this CNN's teacher",
})
"""What the protector knew about an engine, in one line per tier (the demo shows it beside each
engine): a real network is used by a protector only through its own hash layer or descriptor
objective (``surrogate_networks``), never through an engine's hash layer."""


def threat_tier(surrogates: Sequence[str], victim: str) -> str:
    """What the protector knew about ``victim`` (docs/method.md, issues 11 and 29):

    - ``whitebox``: the victim is one of the surrogates;
    - ``engine-blackbox``: an engine on a real network (``engine_network``) the protection never
      used (leave-one-network-out; for dlib's engines and protections made on the small CNNs,
      which learned from dlib's network, the kit's older stand-in: ``stand_in``);
    - ``engine-known-backbone``: an engine on a real network the protection used through its own
      hash layer or descriptor objective (``surrogate_networks``; never the victim's hash layer);
    - ``cnn-blackbox``: a small-CNN victim, and dlib's network (their teacher) was never used;
    - ``cnn-teacher-known``: a small-CNN victim, dlib's network among the surrogates (the small
      CNNs were distilled from it, so this proves no transfer).
    """
    if victim in surrogates:
        return "whitebox"
    used, network = surrogate_networks(surrogates), engine_network(victim)
    if network:
        return "engine-known-backbone" if network in used else "engine-blackbox"
    return "cnn-teacher-known" if "dlib" in used else "cnn-blackbox"


def stand_in(surrogates: Sequence[str], victim: str) -> bool:
    """True for the older stand-in of the real-engine black-box tier: a protection made on
    small CNNs only (distilled from dlib's network), judged on an engine on dlib's network."""
    return (threat_tier(surrogates, victim) == "engine-blackbox" and engine_network(victim) == "dlib"
            and not surrogate_networks(surrogates))


def dlib_surrogate(bits: int = 48, seed: int = 1, progress: bool = False) -> RecognizerHash:
    """``DLIB_SURROGATE``: the dlib port with an ITQ layer of ``bits`` fitted (``seed``) on the
    open-set protocol's training-identity faces only. The chip box is the zoo engines' (it is the
    face geometry of the kit's crops, not a hash layer). About 15 s on 2 cores."""
    faces = load_faceset("lfw158", 112)
    x = faces.images[make_protocol(faces).train]
    model = RecognizerHash(bits, zoo.card("dlib_itq_32")["chip_box"], 112)
    with torch.no_grad():
        desc = torch.cat([model.embed(x[i:i + 128]) for i in
                          tqdm(range(0, len(x), 128), desc="dlib descriptors", disable=not progress)])
    return model.fit_itq(desc, seed=seed).eval()


def load_surrogates(names: Sequence[str]) -> dict[str, nn.Module]:
    """Surrogate models by name: zoo surrogates and ``DLIB_SURROGATE`` (a zoo *victim* is refused)."""
    out: dict[str, nn.Module] = {}
    for n in names:
        if n == DLIB_SURROGATE:
            out[n] = dlib_surrogate()
        elif n in zoo.surrogates():
            out[n] = zoo.load(n)
        else:
            raise ValueError(f"{n!r} is not a surrogate (zoo surrogates: {zoo.surrogates()} and {DLIB_SURROGATE!r}); "
                             "victims are never used to make a perturbation")
    return out


def margin_term(u: torch.Tensor, anchors: torch.Tensor, scale: float, margin: float = 1.0) -> torch.Tensor:
    """Robust objective (a) [kit]: mean ``relu(margin + c * u / scale)`` over ``N x L`` pre-sign
    outputs ``u`` and anchor codes ``c`` in {-1, +1}; zero once every bit sits ``margin`` (in
    units of ``scale``, the model's mean |u| on clean faces) past the wrong side of ``c``."""
    return torch.relu(margin + anchors * u / scale).mean()


def consistency_term(u_plain: torch.Tensor, u_processed: torch.Tensor, scale: float) -> torch.Tensor:
    """Robust objective (b) [kit]: mean KL between the per-bit Bernoulli ``sigmoid(2 u / scale)``
    of the protected faces (``u_plain``, held fixed) and of the same faces after the CG
    (``u_processed``); 0 when the CG leaves every bit's distribution as it was."""
    p = torch.sigmoid(2 * u_plain / scale).detach()
    q = torch.sigmoid(2 * u_processed / scale).clamp(1e-6, 1 - 1e-6)
    kl = p * (torch.log(p.clamp_min(1e-6)) - torch.log(q)) + (1 - p) * (torch.log((1 - p).clamp_min(1e-6)) - torch.log(1 - q))
    return kl.mean()


def feature_term(e: torch.Tensor, e_clean: torch.Tensor) -> torch.Tensor:
    """Robust objective (c) [kit]: mean cosine similarity of the protected faces' embeddings
    ``e`` (``N x D``) to the clean ones' ``e_clean`` (minimised: in [-1, 1])."""
    return F.cosine_similarity(e, e_clean.detach(), dim=1).mean()


def meta_gradient(delta: torch.Tensor, train_loss: Callable[[torch.Tensor], torch.Tensor],
                  test_loss: Callable[[torch.Tensor], torch.Tensor], inner_alpha: float, eps: float) -> torch.Tensor:
    """Meta-learning over surrogates [paper idea; kit's first-order, MGAA-like reading]: Algorithm 1,
    lines 10-12. ``g`` = the gradient of ``train_loss`` (the meta-train surrogates' mean loss) at
    ``delta``; ``delta'`` = one sign step of ``inner_alpha`` down ``g``, clipped to ``[-eps, eps]``;
    returns ``g + g'``, ``g'`` the gradient of ``test_loss`` (the held-out surrogate's) at ``delta'``.
    ``delta``: ``1 x 3 x S x S`` (left unchanged); the losses map such a tensor to a scalar."""
    d = delta.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(train_loss(d), d)
    inner = (d.detach() - inner_alpha * g.sign()).clamp(-eps, eps).requires_grad_(True)
    (g_test,) = torch.autograd.grad(test_loss(inner), inner)
    return g + g_test


def _outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, e)``: pre-sign outputs and an embedding (the feature term's space)."""
    if isinstance(model, RecognizerHash):
        e = model.embed(x)
        return (e - model.center) @ model.projection, e
    return model.forward_with_embedding(x)


@dataclass(frozen=True)
class TOAPConfig:
    """Every parameter of a TOAP run (recorded in the perturbation's card).

    Sizes: ``rounds`` x (``steps_per_round`` delta steps + ``cg_steps`` CG steps).
    ``eps``, ``inner_alpha``: pixel units of [0, 1]. Switches: ``meta``, ``cg`` (use the CG
    at all), ``alternate`` (fine-tune it between rounds), ``robust`` (margin + consistency +
    feature terms; off: HAG's away loss only), ``diversity`` (random post-processing and
    re-crops; off: clean faces only).
    """

    eps: float = 8 / 255
    size: int = 112
    rounds: int = 4
    steps_per_round: int = 75
    batch_size: int = 16
    lr: float = 2e-3
    inner_alpha: float = 2 / 255
    margin: float = 1.0
    w_margin: float = 1.0
    w_consistency: float = 0.5
    w_feature: float = 1.0
    psnr_floor: float = 32.5
    meta: bool = True
    cg: bool = True
    alternate: bool = True
    robust: bool = True
    diversity: bool = True
    cg_steps: int = 20
    cg_lam: float = 0.05
    p_none: float = 0.15
    p_real: float = 0.35
    p_cg: float = 0.25
    recrop: float = 0.06
    resize_range: tuple[float, float] = (0.4, 0.95)
    weights: Mapping[str, float] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (0 < self.eps <= 1, f"eps must be in (0, 1] (pixel units, e.g. 8/255), got {self.eps}"),
            (self.size >= 16, f"size must be >= 16 pixels, got {self.size}"),
            (self.rounds >= 1 and self.steps_per_round >= 1, "rounds and steps_per_round must be >= 1"),
            (self.batch_size >= 2, f"batch_size must be >= 2, got {self.batch_size}"),
            (self.lr > 0 and self.inner_alpha >= 0, "lr must be > 0 and inner_alpha >= 0"),
            (self.margin >= 0, f"margin must be >= 0, got {self.margin}"),
            (min(self.w_margin, self.w_consistency, self.w_feature) >= 0, "loss weights must be >= 0"),
            (math.isfinite(self.psnr_floor) and self.psnr_floor > 0, f"psnr_floor must be a positive number of dB, got {self.psnr_floor}"),
            (self.cg_steps >= 0 and self.cg_lam >= 0, "cg_steps and cg_lam must be >= 0"),
            (min(self.p_none, self.p_real, self.p_cg) >= 0 and self.p_none + self.p_real + self.p_cg <= 1,
             "p_none, p_real, p_cg must be >= 0 and sum to at most 1 (the rest: differentiable resize + JPEG)"),
            (0 <= self.recrop < 0.5, f"recrop must be in [0, 0.5), got {self.recrop}"),
            (0 < self.resize_range[0] <= self.resize_range[1] <= 1, f"resize_range must be in (0, 1], got {self.resize_range}"),
            (all(w >= 0 for w in self.weights.values()), "surrogate weights must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.alternate and not self.cg:
            raise ValueError("alternate=True needs cg=True (the alternation fine-tunes the CG)")

    @property
    def steps(self) -> int:
        return self.rounds * self.steps_per_round


class TOAP:
    """The TOAP attack: ``TOAP(surrogates, **config).fit(faces, labels) -> Perturbation``.

    Args:
        surrogates: names (zoo surrogates, ``DLIB_SURROGATE``) or ``{name: model}``.
        cg_model: the Compression Generator to start from (default: the shipped one); a copy
            is fine-tuned, the given one is never changed (``cg=False`` trains without a CG).
        progress: show a tqdm bar.
        device: where ``fit`` runs the surrogates, the CG and the delta (default
            ``config.device()``: CUDA when present, ``TOAP_DEVICE`` to force); the models are
            moved back where they were afterwards, and the result is on the CPU.
        **config: ``TOAPConfig`` fields (checked: ``ValueError`` on a bad value).
    """

    def __init__(self, surrogates: Sequence[str] | Mapping[str, nn.Module],
                 cg_model: cg_module.CompressionGenerator | None = None, progress: bool = True,
                 device: torch.device | str | None = None, **config):
        self.config = TOAPConfig(**config)
        self.device = torch.device(device) if device else default_device()
        if not surrogates:
            raise ValueError("need at least one surrogate")
        self.models = dict(surrogates) if isinstance(surrogates, Mapping) else load_surrogates(surrogates)
        unknown = set(self.config.weights) - set(self.models)
        if unknown:
            raise ValueError(f"weights for models that are not surrogates here: {sorted(unknown)}")
        self._cg_start = cg_model
        self.progress = progress
        self._history: list[Mapping] = []
        self.cg: cg_module.CompressionGenerator | None = None

    @property
    def history(self) -> tuple[Mapping, ...]:
        """Read-only rows: ``{"kind": "step", ...loss terms}`` and ``{"kind": "val", ...}`` per round
        (bits flipped vs the clean codes on the validation faces, per real post-processing)."""
        return tuple(self._history)

    # ------------------------------------------------------------ the pieces
    def _draw(self, rng: np.random.Generator) -> dict:
        """One post-processing draw for one side of a step."""
        c = self.config
        if not c.diversity:
            return {"kind": "none"}
        r = rng.random()
        geo = ({"scale": float(rng.uniform(1 - c.recrop, 1 + c.recrop)),
                "shift": rng.uniform(-c.recrop / 2, c.recrop / 2, 2).tolist()} if c.recrop and rng.random() < 0.5 else None)
        if r < c.p_none:
            d = {"kind": "none"}
        elif r < c.p_none + c.p_real:
            d = {"kind": "real", "spec": self._sampler.sample(rng)}
        elif r < c.p_none + c.p_real + c.p_cg and self.cg is not None:
            d = {"kind": "cg", "quality": float(rng.integers(40, 96)), "chroma": str(rng.choice(["420", "444"])),
                 "scale": float(rng.uniform(*c.resize_range)) if rng.random() < 0.3 else 1.0}
        else:
            d = {"kind": "diff", "scale": float(rng.uniform(*c.resize_range)), "quality": float(rng.integers(50, 96))}
        d["geo"] = geo
        return d

    @staticmethod
    def _recrop(x: torch.Tensor, geo: dict | None) -> torch.Tensor:
        if geo is None:
            return x
        s, (tx, ty) = geo["scale"], geo["shift"]
        theta = torch.tensor([[s, 0.0, tx], [0.0, s, ty]], dtype=x.dtype, device=x.device).expand(len(x), 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _process(self, x: torch.Tensor, draw: dict) -> torch.Tensor:
        """``x`` (protected faces, differentiable) through ``draw``."""
        x = self._recrop(x, draw["geo"]) if "geo" in draw else x
        kind = draw["kind"]
        if kind == "real":
            return postprocess.straight_through(x, draw["spec"])
        if kind == "cg":
            return self.cg(x, draw["quality"], draw["chroma"], draw["scale"])
        if kind == "diff":
            return diffproc.jpeg(diffproc.resize(x, draw["scale"]), draw["quality"])
        return x

    def _loss(self, name: str, x: torch.Tensor, xa: torch.Tensor, y: torch.Tensor, draw: dict) -> tuple[torch.Tensor, dict]:
        """Loss of surrogate ``name`` on clean ``x`` / protected ``xa`` (labels ``y``) under ``draw``."""
        c, m = self.config, self.models[name]
        anchors = self._anchors[name][y]
        u, e = _outputs(m, self._process(xa, draw))
        s = self._scale[name]
        parts: dict[str, torch.Tensor] = {}
        if c.robust:
            parts["margin"] = c.w_margin * margin_term(u, anchors, s, c.margin)
            if c.w_feature:
                with torch.no_grad():
                    _, e_clean = _outputs(m, self._recrop(x, draw.get("geo")))
                parts["feature"] = c.w_feature * feature_term(e, e_clean)
            if c.w_consistency and draw["kind"] == "cg":
                u_plain, _ = _outputs(m, self._recrop(xa, draw.get("geo")))
                parts["consistency"] = c.w_consistency * consistency_term(u_plain, u, s)
        else:
            parts["away"] = attacks.away_loss(u / s, anchors)
        w = c.weights.get(name, 1.0)
        return w * sum(parts.values()), {k: float(v.detach()) for k, v in parts.items()}

    def _project(self, delta: torch.Tensor) -> None:
        c = self.config
        with torch.no_grad():
            delta.clamp_(-c.eps, c.eps)
            rms = float(delta.pow(2).mean().sqrt())
            if rms > self._rms_max:
                delta.mul_(self._rms_max / rms)

    def _protected(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        d = delta if delta.shape[-1] == x.shape[-1] else F.interpolate(delta, size=x.shape[-2:], mode="bilinear",
                                                                        align_corners=False)
        return (x + d).clamp(0, 1)

    @torch.no_grad()
    def _validate(self, x: torch.Tensor, delta: torch.Tensor, round_: int) -> dict:
        row: dict = {"kind": "val", "round": round_}
        xa = self._protected(x, delta)
        for post in ("none", "jpeg:75", "resize:0.5"):
            flips = []
            for m in self.models.values():
                b_clean = m.encode(postprocess.apply(x, post))
                b_prot = m.encode(postprocess.apply(xa, post))
                flips.append(float((b_clean != b_prot).float().mean()))
            row[f"flipped_{post}"] = float(np.mean(flips))
        row["psnr"] = float(postprocess.psnr(xa, x).mean())
        return row

    # ------------------------------------------------------------ fit
    def fit(self, faces: torch.Tensor, labels: torch.Tensor, val_faces: torch.Tensor | None = None,
            data: str = "") -> Perturbation:
        """Optimise one ``delta`` on ``faces`` (``N x 3 x S x S`` in [0, 1]) with identity
        ``labels`` (``N``); ``val_faces`` (other people, optional) are checked after every round.
        ``data`` describes the split for the card. Returns the ``Perturbation`` (``3 x size x
        size``, ``|delta|_inf <= eps``); ``self.cg`` is the fine-tuned CG copy (or ``None``)."""
        c = self.config
        attacks._check(faces, c.eps)
        if labels.ndim != 1 or len(labels) != len(faces):
            raise ValueError(f"need one label per face, got {tuple(labels.shape)} for {len(faces)} faces")
        if val_faces is not None:
            attacks._check(val_faces, c.eps)
        names = list(self.models)
        models = list(self.models.values())
        t0 = time.perf_counter()
        torch.manual_seed(c.seed)
        rng = np.random.default_rng(c.seed)
        gen = torch.Generator().manual_seed(c.seed)
        self._sampler = postprocess.OpSampler(quality_range=(40, 95), p_resize=0.3, scale_range=c.resize_range)
        self._rms_max = 10 ** (-c.psnr_floor / 20)
        self._history = []
        dev = self.device
        if c.cg:
            self.cg = copy.deepcopy(self._cg_start if self._cg_start is not None else cg_module.load()).eval().to(dev)
        else:
            self.cg = None
        label_ids = {int(v): i for i, v in enumerate(labels.unique().tolist())}
        y_all = torch.tensor([label_ids[int(v)] for v in labels])
        timings: dict[str, float] = {"setup": 0.0, "delta": 0.0, "cg": 0.0, "validate": 0.0}
        homes = [next(iter([*m.parameters(), *m.buffers()]), torch.empty(0)).device for m in models]
        with attacks.eval_mode(*models, *([self.cg] if self.cg is not None else [])):
            grads = [p.requires_grad for m in models for p in m.parameters()]
            for m in models:
                m.requires_grad_(False).to(dev)
            x_all = faces.to(dev)
            if self.cg is not None:
                self.cg.requires_grad_(False)
            try:
                self._anchors, self._scale = {}, {}
                for n, m in self.models.items():
                    table = attacks.anchor_codes(m, faces, labels)
                    self._anchors[n] = torch.stack([table[int(v)] for v in labels.unique().tolist()]).to(dev)
                    with torch.no_grad():
                        self._scale[n] = float(torch.cat([m(x_all[i:i + 128]) for i in range(0, len(faces), 128)]).abs().mean())
                timings["setup"] = time.perf_counter() - t0
                delta = torch.zeros(1, 3, c.size, c.size, device=dev, requires_grad=True)
                opt = torch.optim.Adam([delta], lr=c.lr)
                bar = tqdm(total=c.steps, desc="TOAP", disable=not self.progress)
                for r in range(c.rounds):
                    t = time.perf_counter()
                    for s in range(c.steps_per_round):
                        step = r * c.steps_per_round + s
                        idx = torch.randint(0, len(faces), (min(c.batch_size, len(faces)),), generator=gen)
                        x, y = x_all[idx], y_all[idx].to(dev)
                        row = self._step(delta, opt, x, y, names, step, rng)
                        self._history.append(MappingProxyType({"kind": "step", "round": r, "step": step, **row}))
                        bar.update(1)
                    timings["delta"] += time.perf_counter() - t
                    if c.cg and c.alternate and c.cg_steps and r < c.rounds - 1:
                        t = time.perf_counter()
                        self._finetune_cg(x_all, delta.detach(), rng, r)
                        timings["cg"] += time.perf_counter() - t
                    if val_faces is not None:
                        t = time.perf_counter()
                        self._history.append(MappingProxyType(self._validate(val_faces, delta.detach().cpu(), r)))
                        timings["validate"] += time.perf_counter() - t
                bar.close()
            finally:
                i = 0
                for m, home in zip(models, homes):
                    m.to(home)
                    for p in m.parameters():
                        p.requires_grad_(grads[i])
                        i += 1
                if self.cg is not None:
                    self.cg.cpu()
        timings = {k: round(v, 1) for k, v in timings.items()}
        log.info("TOAP done in %.0f s (%s)", time.perf_counter() - t0, timings)
        card = {"method": "toap", "surrogates": names, "config": {**asdict(c), "weights": dict(c.weights)},
                "cg": cg_module.card()["sha256"] if c.cg and self._cg_start is None else ("given" if c.cg else None),
                "data": data or f"{len(faces)} faces of {len(label_ids)} identities", "n_faces": len(faces),
                "seed": c.seed, "seconds": timings, "device": str(dev)}
        return Perturbation(delta.detach()[0].cpu(), c.eps, card)

    def _step(self, delta: torch.Tensor, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              names: list[str], step: int, rng: np.random.Generator) -> dict:
        """One outer step (meta or plain) on ``delta``; returns the loss terms."""
        c = self.config
        meta = c.meta and len(names) > 1
        held = names[step % len(names)] if meta else None
        train = [n for n in names if n != held]
        draw = self._draw(rng)
        test_draw = self._draw(rng) if meta else None  # the meta-test's own draw (line 12)
        row: dict = {"draw": draw["kind"]}

        def train_loss(d: torch.Tensor) -> torch.Tensor:
            xa = self._protected(x, d)
            total, parts = 0.0, {}
            for n in train:
                loss, p = self._loss(n, x, xa, y, draw)
                total = total + loss / len(train)
                for k, v in p.items():
                    parts[k] = parts.get(k, 0.0) + v / len(train)
            row.update(train_loss=float(total.detach()), **parts)
            return total

        def test_loss(d: torch.Tensor) -> torch.Tensor:
            test, _ = self._loss(held, x, self._protected(x, d), y, test_draw)
            row.update(held_out=held, test_loss=float(test.detach()))
            return test

        if meta:
            g = meta_gradient(delta, train_loss, test_loss, c.inner_alpha, c.eps)
        else:
            (g,) = torch.autograd.grad(train_loss(delta), delta)
        opt.zero_grad(set_to_none=True)
        delta.grad = g
        opt.step()
        self._project(delta)
        return row

    def _finetune_cg(self, faces: torch.Tensor, delta: torch.Tensor, rng: np.random.Generator, round_: int) -> None:
        """CG phase: a few steps restoring the codes of ``faces + delta`` through the CG, with
        its fidelity to the real codecs (``cg.finetune_to_remove``); the surrogates are frozen.
        The dlib port is left out of this phase (its cost; the small CNNs carry the signal)."""
        c = self.config
        cheap = [m for m in self.models.values() if not isinstance(m, RecognizerHash)] or list(self.models.values())
        specs = [f"jpeg:{int(q)}:{ch}" for q, ch in zip(rng.integers(40, 96, c.cg_steps), rng.choice(["420", "444"], c.cg_steps))]
        d = F.interpolate(delta, size=faces.shape[-2:], mode="bilinear", align_corners=False) if delta.shape[-1] != faces.shape[-1] else delta
        self.cg.requires_grad_(True)
        self.cg.train()
        try:
            hist = cg_module.finetune_to_remove(self.cg, cheap, faces, d, specs, steps=c.cg_steps, lam=c.cg_lam,
                                                batch_size=c.batch_size, seed=c.seed + round_)
        finally:
            self.cg.requires_grad_(False)
            self.cg.eval()
        self._history.append(MappingProxyType({"kind": "cg", "round": round_, "restore_first": hist[0]["restore"],
                                               "restore_last": hist[-1]["restore"],
                                               "fidelity_last": hist[-1]["fidelity"]}))
