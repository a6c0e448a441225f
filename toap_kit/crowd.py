"""A crowd of simulated strangers in the dlib engines' own descriptor space (issue 21, item 3).

LFW has 2,000 one-photo distractors; a crawler's database holds millions of faces. Beyond the
real 2,000, this module simulates strangers where the engines see faces: dlib's 128-D
descriptor. A distribution is fitted to the real distractors' descriptors, new descriptors are
sampled from it, and each dlib engine hashes them with its *own* hash layer, exactly as it
hashes a real face's descriptor: ``sign((d - center) @ projection)`` with the zoo model's
ITQ ``center`` and ``projection`` (``recognizers.RecognizerHash.forward``).

    >>> from toap_kit import crowd
    >>> codes = crowd.simulate_codes("dlib_itq_32", 1_000_000, seed=0)  # 1e6 x 32 int8 in {-1, +1}
    >>> report = crowd.validate("dlib_itq_32")                          # real vs simulated 2,000

**The real descriptors** (``real_descriptors``): not the teacher's cached embeddings in
``data/teacher/`` (dlib's C++ network on landmark-aligned chips), which the engines never hash,
but the engines' own: the PyTorch port's descriptors of the zoo card's fixed ``chip_box``, of the
2,000 shipped distractor faces and the 174 protocol queries, encoded with
``RecognizerHash.embed`` on first use (one to two minutes on 2 loaded cores) and cached in
``CACHE_DIR`` (git-ignored) under a key of the network's sha256, the chip box and the face sets'
manifests. Hashed by an engine's layer they give back its shipped ``engine.db_codes`` (tested).

**The descriptor model** (``MODELS``): ``"gaussian"``, one full-covariance Gaussian;
``"gmm"``, a mixture of ``GMM_COMPONENTS`` full-covariance Gaussians fitted by EM, covariances
shrunk towards their diagonal so that 2,000 points can carry 128-D covariances.
``DEFAULT_MODEL`` is the one that matched the validation better (``--compare``). Draws are used
as they come: dlib's descriptors are not unit vectors (norms about 1.4), so there is no sphere
to project on; ``validate`` compares the norms. No smoothed bootstrap (real descriptors plus
noise): a million draws would be 500 noisy copies of each real stranger, near-twins no real
crowd has.

**Simulation** (``simulate_codes``): chunk ``i`` of ``CHUNK`` rows comes from generator
``(seed, i)``, so a row depends only on ``(seed, model, row)``: the first ``m`` rows of a crowd
of ``n`` are the crowd of ``m`` (crowds grow by adding strangers), both engines hash the same
simulated people, and a million rows need one chunk of float32 memory. Deterministic on one
machine; another BLAS may round the fit differently and flip a few codes.

**Validation** (``validate``; ``python -m toap_kit.crowd --validate [--engine NAME] [--json]``):
2,000 simulated strangers against the real 2,000 under the engine's codes: bit balance,
pairwise and query-to-stranger Hamming histograms (total variation distance, TV), the
nearest-neighbour distances, and the clean tie-aware mAP@all and P@10 of the protocol's 174
queries against the evaluation people's 775 real photos plus the real 2,000 or the simulated
2,000 in their place. Uniform random codes go through the same checks, to show what a broken
crowd looks like (it passes bit balance, and fails the rest).

What the simulation can and cannot show
---------------------------------------
It **can** show, as far as the validation holds at 2,000, how a growing crowd of strangers,
drawn as the engine's own codes of faces like the LFW distractors, pushes a clean or protected
query's true matches down the ranking (mAP, P@10, the rank of the first true match from 2,000
to a million strangers), for each dlib engine with its own hash layer.

It **cannot** show:

- strangers who look like the person (near-duplicates, relatives, lookalikes, the same person
  under another name) beyond what a smooth fitted distribution implies. The nearest strangers
  decide a ranking, and the fit's tail is an extrapolation from 2,000 faces: at 2,000 the
  simulated strangers already sit a little farther from the queries than the real ones (the
  clean mAP is a little higher with them, see ``--validate``), so the simulated crowd likely
  understates what a million real strangers would do;
- photos: the simulated strangers are descriptors, not images, so no perturbation, codec,
  resize or face chip applies to them and none can be shown; they only fill the database.
  Protection is applied to the query person's photos, never to the crowd;
- other populations, cameras or platforms than LFW's 2002-2004 news photos of mostly adult
  male public figures, nor a crawler that keeps several photos per stranger (each simulated
  row is a different person);
- other engines: the small CNNs hash pixels, and pixels are not simulated;
- a million-face truth from a 2,000-face check: the validation sees the bulk and the nearest
  of 2,000 strangers, not the one-in-a-million tail.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from . import engine, retrieval, zoo
from .config import OUTPUT_DIR
from .data import DATA_DIR, FaceSet, load_faceset, load_image, make_protocol

__all__ = ["CACHE_DIR", "CHUNK", "DEFAULT_MODEL", "ENGINES", "GMM_COMPONENTS", "MODELS", "DescriptorModel",
           "RealDescriptors", "compare_models", "fit_model", "hash_descriptors", "real_descriptors", "simulate_codes",
           "simulate_descriptors", "validate"]

log = logging.getLogger(__name__)

ENGINES = ("dlib_itq_32", "dlib_itq_64")
"""The engines whose codes come from a descriptor that can be simulated."""
MODELS = ("gaussian", "gmm")
DEFAULT_MODEL = "gmm"
GMM_COMPONENTS = 4
CHUNK = 65_536
"""Rows drawn per generator: the crowd is the same for every ``n`` (see ``simulate_codes``)."""
CACHE_DIR = OUTPUT_DIR / "crowd"
_SHRINK = 0.1  # GMM covariances: (1 - s) * covariance + s * its diagonal
_STATS = (("mean", np.mean), ("std", np.std))


def _check_engine(name: str) -> str:
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES} (a dlib engine: only they hash a descriptor), got {name!r}")
    return name


def _check_count(n, what: str = "n", low: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < low:
        raise ValueError(f"{what} must be a whole number >= {low}, got {n!r}")
    return int(n)


def _check_model(kind: str) -> str:
    if kind not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {kind!r}")
    return kind


@dataclass(frozen=True)
class RealDescriptors:
    """The engines' own descriptors of the open-set protocol's real faces.

    Attributes:
        distractors: ``2000 x 128`` float32, rows in the database's distractor order.
        queries: ``174 x 128`` float32, the protocol's queries in ``engine.Engine`` order.
        query_labels: ``174`` int64 identity labels (index into lfw158's identities).
        face_labels: ``775`` int64 labels of the evaluation people's database photos (the first
            775 rows of ``engine.db_codes``).
    """

    distractors: np.ndarray
    queries: np.ndarray
    query_labels: np.ndarray
    face_labels: np.ndarray


def _lfw_without_pixels() -> FaceSet:
    """lfw158's labels and paths (what ``make_protocol`` reads) without loading its pixels."""
    with open(DATA_DIR / "lfw158" / "manifest.csv", newline="") as f:
        rows = [(r["path"], r["identity"]) for r in csv.DictReader(f)]
    identities = sorted({i for _, i in rows})
    index = {n: k for k, n in enumerate(identities)}
    return FaceSet(torch.empty(len(rows), 3, 0, 0), torch.tensor([index[i] for _, i in rows]), identities,
                   [p for p, _ in rows], DATA_DIR / "lfw158")


def _descriptor_key(name: str) -> str:
    card = zoo.card(name)
    h = hashlib.sha256(f"{card['network']['sha256']} {card['chip_box']} {engine.DISPLAY} open-set seed 0".encode())
    for face_set in ("lfw158", "distractors"):
        h.update((DATA_DIR / face_set / "manifest.csv").read_bytes())
    return h.hexdigest()[:16]


@lru_cache(maxsize=None)
def real_descriptors(engine_name: str = ENGINES[0]) -> RealDescriptors:
    """The descriptors engine ``engine_name`` hashes, of the real distractors and queries: from
    ``CACHE_DIR`` when cached under this network, chip box and data, else encoded now with the
    engine's ``embed`` (one to two minutes) and cached. Both dlib engines share network and
    chip, so they share one file. The arrays are read-only (shared by every caller)."""
    _check_engine(engine_name)
    f = CACHE_DIR / f"descriptors-{_descriptor_key(engine_name)}.npz"
    if f.is_file():
        try:
            with np.load(f, allow_pickle=False) as z:
                real = RealDescriptors(*(z[k] for k in ("distractors", "queries", "query_labels", "face_labels")))
            if real.distractors.shape[1:] != (128,) or real.queries.shape != (len(real.query_labels), 128):
                raise ValueError(f"shapes {real.distractors.shape}, {real.queries.shape}")
            return _read_only(real)
        except (OSError, ValueError, KeyError) as e:
            log.warning("ignoring a broken descriptor cache %s: %s", f, e)
    faces = _lfw_without_pixels()
    proto = make_protocol(faces, 2000)
    log.info("encoding the 2,000 distractors and %d queries with %s's network (cached in %s)",
             len(proto.queries), engine_name, CACHE_DIR)
    m = engine.model(engine_name)

    def embed(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([m.embed(x[i:i + 256]).numpy() for i in range(0, len(x), 256)])

    queries = torch.stack([load_image(faces.root / faces.paths[i], engine.DISPLAY) for i in proto.queries])
    real = RealDescriptors(embed(load_faceset("distractors", engine.DISPLAY).images), embed(queries),
                           faces.labels[proto.queries].numpy(), faces.labels[proto.database_faces].numpy())
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f".{f.name}.tmp-{os.getpid()}.npz")
        np.savez(tmp, distractors=real.distractors, queries=real.queries, query_labels=real.query_labels,
                 face_labels=real.face_labels)
        os.replace(tmp, f)
    except OSError as e:
        log.warning("cannot cache the descriptors in %s: %s", f.parent, e)
    return _read_only(real)


def _read_only(real: RealDescriptors) -> RealDescriptors:
    for a in vars(real).values():  # shared by every caller (cached): nobody may change them
        a.setflags(write=False)
    return real


def hash_descriptors(descriptors: np.ndarray | torch.Tensor, engine_name: str) -> np.ndarray:
    """Codes ``N x bits`` int8 in {-1, +1} of ``N x 128`` descriptors under the engine's own hash
    layer: ``sign((d - center) @ projection)`` in float32, zero to +1, as ``RecognizerHash`` does."""
    m = engine.model(_check_engine(engine_name))
    d = (descriptors.detach().float().cpu() if isinstance(descriptors, torch.Tensor)
         else torch.from_numpy(np.array(descriptors, np.float32)))  # a copy: the cached arrays are read-only
    if d.ndim != 2 or d.shape[1] != 128 or not torch.isfinite(d).all():
        raise ValueError(f"descriptors must be finite N x 128, got shape {tuple(d.shape)}")
    with torch.no_grad():
        u = (d - m.center) @ m.projection
    return np.where(u.numpy() >= 0, 1, -1).astype(np.int8)


class DescriptorModel:
    """A distribution over descriptors: a mixture of ``k`` full-covariance Gaussians (``k = 1``:
    one Gaussian, its maximum-likelihood fit; ``k > 1``: at most ``iters`` EM rounds from a
    k-means++ start drawn with ``seed``, until the mean log-likelihood gains < 1e-3, covariances
    shrunk: ``(1 - shrink) C + shrink diag(C)``). In torch float64, which keeps to
    ``torch.set_num_threads`` (numpy's OpenBLAS threads thrash on loaded shared cores).

    After ``fit(x)``: ``weights`` (k), ``means`` (k x D), ``chol`` (k x D x D Cholesky factors),
    ``log_likelihood`` (mean per descriptor, on ``x``).
    """

    def __init__(self, k: int = 1, shrink: float = _SHRINK, seed: int = 0, iters: int = 100):
        self.k, self.seed, self.iters = _check_count(k, "k"), int(seed), _check_count(iters, "iters", 0)
        if not 0 <= shrink <= 1:
            raise ValueError(f"shrink must be in [0, 1], got {shrink!r}")
        self.shrink = float(shrink)

    def _set(self, resp: torch.Tensor, x: torch.Tensor) -> None:
        nk = resp.sum(0) + 1e-10
        self.weights, self.means = nk / nk.sum(), (resp.T @ x) / nk[:, None]
        c = x[None] - self.means[:, None]                                   # k x N x D
        cov = torch.einsum("kn,knd,kne->kde", resp.T, c, c) / nk[:, None, None]
        if self.k > 1:
            cov = (1 - self.shrink) * cov + self.shrink * torch.diag_embed(torch.diagonal(cov, dim1=1, dim2=2))
        self.chol = torch.linalg.cholesky(cov + 1e-8 * torch.eye(x.shape[1], dtype=x.dtype))

    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``N x k``: log of weight times density."""
        z = torch.linalg.solve_triangular(self.chol, (x[None] - self.means[:, None]).transpose(1, 2), upper=False)
        logdet = 2 * torch.log(torch.diagonal(self.chol, dim1=1, dim2=2)).sum(1)
        return (self.weights.log() - 0.5 * (logdet + x.shape[1] * np.log(2 * np.pi)))[None] - 0.5 * (z ** 2).sum(1).T

    def fit(self, x: np.ndarray | torch.Tensor) -> "DescriptorModel":
        """Fit on ``N x D`` descriptors (finite, ``N > D``)."""
        x = x.detach().double().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, np.float64))
        if x.ndim != 2 or len(x) <= x.shape[1] or not torch.isfinite(x).all():
            raise ValueError(f"need finite N x D descriptors with N > D, got shape {tuple(x.shape)}")
        rng = np.random.default_rng(self.seed)
        centres = x[[int(rng.integers(len(x)))]]
        while len(centres) < self.k:  # k-means++: the next centre far from the chosen ones
            d2 = torch.cdist(x, centres).min(1).values.square().numpy()
            centres = torch.cat([centres, x[[int(rng.choice(len(x), p=d2 / d2.sum()))]]])
        self._set(torch.eye(self.k, dtype=x.dtype)[torch.cdist(x, centres).argmin(1)], x)
        lp = self._log_prob(x)
        ll = float(torch.logsumexp(lp, 1).mean())
        for _ in range(self.iters if self.k > 1 else 0):  # EM until the mean log-likelihood gains < 1e-3
            self._set(torch.softmax(lp, 1), x)
            lp = self._log_prob(x)
            ll, last = float(torch.logsumexp(lp, 1).mean()), ll
            if ll - last < 1e-3:
                break
        self.log_likelihood = ll
        return self

    def sample(self, n: int, seed: tuple[int, ...]) -> np.ndarray:
        """``n x D`` float32 draws; components from generator ``(*seed, 0)``, normals from
        ``(*seed, 1)``, so the first rows of a larger draw are the smaller draw."""
        n = _check_count(n)
        p = self.weights.numpy()
        comp = np.random.default_rng([*seed, 0]).choice(self.k, size=n, p=p / p.sum())
        z = np.random.default_rng([*seed, 1]).standard_normal((n, self.means.shape[1]), dtype=np.float32)
        z = torch.from_numpy(z)
        out = torch.empty_like(z)
        for j in range(self.k):
            rows = torch.from_numpy(comp == j)
            out[rows] = self.means[j].float() + z[rows] @ self.chol[j].float().T
        return out.numpy()


def fit_model(model: str = DEFAULT_MODEL, engine_name: str = ENGINES[0]) -> DescriptorModel:
    """``model`` (one of ``MODELS``) fitted, seed 0, to the real distractors' descriptors in
    ``engine_name``'s descriptor space; fitted once per process and descriptor space."""
    return _fit(_check_model(model), _descriptor_key(_check_engine(engine_name)))


@lru_cache(maxsize=None)
def _fit(model: str, key: str) -> DescriptorModel:
    space = next(e for e in ENGINES if _descriptor_key(e) == key)  # the first engine of this descriptor space
    return DescriptorModel(1 if model == "gaussian" else GMM_COMPONENTS).fit(real_descriptors(space).distractors)


def simulate_descriptors(n: int, seed: int = 0, model: str = DEFAULT_MODEL, start: int = 0,
                         engine_name: str = ENGINES[0]):
    """Yield ``(row, chunk)``: the simulated descriptors ``row .. row + len(chunk)`` (float32
    ``<= CHUNK x 128``) of rows ``start .. n - 1``, in the descriptor space of ``engine_name``
    (both dlib engines share it); chunk ``i`` is drawn from generator ``(seed, i)``, so a row's
    descriptor depends only on ``(seed, model, row)``."""
    n, start, seed = _check_count(n), _check_count(start, "start", 0), _check_count(seed, "seed", 0)
    fitted = fit_model(model, engine_name)
    for i in range(start // CHUNK, -(-n // CHUNK)):
        chunk = fitted.sample(min(CHUNK, n - i * CHUNK), (seed, i))
        lo = max(start - i * CHUNK, 0)
        yield i * CHUNK + lo, chunk[lo:]


def simulate_codes(engine_name: str, n: int, seed: int = 0, model: str = DEFAULT_MODEL) -> np.ndarray:
    """``n x bits`` int8 codes in {-1, +1} of ``n`` simulated strangers, hashed by engine
    ``engine_name``'s own layer (``hash_descriptors``). Deterministic in ``(seed, model)``;
    the first ``m`` rows do not depend on ``n``. ``python -m toap_kit.crowd --time N`` times it."""
    _check_engine(engine_name)
    n = _check_count(n)
    bits = int(zoo.card(engine_name)["bits"])
    out = np.empty((n, bits), np.int8)
    t0 = time.perf_counter()
    for row, chunk in simulate_descriptors(n, seed, model, engine_name=engine_name):
        out[row:row + len(chunk)] = hash_descriptors(chunk, engine_name)
    log.info("simulated %d strangers for %s in %.1f s", n, engine_name, time.perf_counter() - t0)
    return out


def _pairs(c: np.ndarray) -> np.ndarray:
    """Hamming distances of every pair ``i < j`` of codes ``c``."""
    return retrieval.hamming_distance(c, c)[np.triu_indices(len(c), 1)]


def _nn_within(c: np.ndarray) -> np.ndarray:
    """Each code's distance to its nearest other code."""
    d = retrieval.hamming_distance(c, c)
    np.fill_diagonal(d, c.shape[1] + 1)
    return d.min(1)


def _compare(dist: dict[str, np.ndarray], bits: int, floor: tuple | None = None) -> dict:
    """Histograms over ``0 .. bits``, means and stds of each crowd's distances, the total
    variation distance (TV: 0 same histogram, 1 disjoint) of each to the real one, and the TV
    between ``floor``'s two halves of the real distances."""
    def hist(d):
        return np.bincount(np.asarray(d).ravel(), minlength=bits + 1) / np.asarray(d).size

    h = {k: hist(d) for k, d in dist.items()}
    out = {**{k: [round(float(v), 5) for v in hk] for k, hk in h.items()},
           **{f"{s}_{k}": round(float(f(d)), 4) for k, d in dist.items() for s, f in _STATS},
           **{f"tv_{k}": round(float(0.5 * np.abs(h[k] - h["real"]).sum()), 4) for k in dist if k != "real"}}
    if floor is not None:
        out["floor"] = round(float(0.5 * np.abs(hist(floor[0]) - hist(floor[1])).sum()), 4)
    return out


def validate(engine_name: str = ENGINES[0], seed: int = 0, model: str = DEFAULT_MODEL) -> dict:
    """Real 2,000 distractors vs 2,000 simulated ones (and 2,000 uniform random codes, a crowd
    that knows nothing of faces), under engine ``engine_name``'s codes.

    Returns a dict with, besides the settings: histograms as lists over Hamming distances
    ``0 .. bits``, ``mean_*``/``std_*`` of the distances, ``tv_simulated``/``tv_uniform``: total
    variation distance to the real histogram, ``floor``: the TV between the real 2,000's two
    halves (1,000 each, a sampling-noise yardstick), under the keys

    - ``bit_balance``: mean of each bit per crowd, the largest ``|mean|`` (``max_abs_*``) and the
      mean / largest absolute difference to the real crowd's (``mean_abs_diff_*``, ``max_abs_diff_*``);
    - ``pairwise``: the distances between the 2,000 strangers of each crowd;
    - ``query_to_crowd``: the 174 queries' distances to each crowd's strangers;
    - ``nearest``: ``query``, each query's distance to its nearest stranger; ``within``, each
      stranger's to its nearest other stranger;
    - ``norms``: mean and std of the descriptors' norms, real and simulated;
    - ``retrieval``: tie-aware ``map_all`` and ``p_10`` of the open-set queries against the
      evaluation people's 775 real photos alone (``none``) and with each crowd of 2,000.
    """
    _check_engine(engine_name)
    seed = _check_count(seed, "seed", 0)
    real, db = real_descriptors(engine_name), engine.db_codes(engine_name)
    n_faces, n, bits = len(real.face_labels), len(real.distractors), db.shape[1]
    if len(db) != n_faces + n:
        raise ValueError(f"engine.db_codes({engine_name!r}) has {len(db)} rows, expected {n_faces} + {n}")
    sim = np.concatenate([c for _, c in simulate_descriptors(n, seed, model, engine_name=engine_name)])
    uniform = np.where(np.random.default_rng([seed, 1 << 20]).random((n, bits)) < 0.5, -1, 1).astype(np.int8)
    crowds = {"real": db[n_faces:], "simulated": hash_descriptors(sim, engine_name), "uniform": uniform}
    queries, half = hash_descriptors(real.queries, engine_name), n // 2
    q_dist = {k: retrieval.hamming_distance(queries, c) for k, c in crowds.items()}
    means = {k: c.mean(0) for k, c in crowds.items()}
    out: dict = {"engine": engine_name, "bits": bits, "model": model, "seed": seed, "n": n, "queries": len(queries),
                 "database_faces": n_faces, "bit_balance": {
                     **{k: [round(float(v), 4) for v in m] for k, m in means.items()},
                     **{f"max_abs_{k}": round(float(np.abs(m).max()), 4) for k, m in means.items()},
                     **{f"{s}_abs_diff_{k}": round(float(f(np.abs(means[k] - means["real"]))), 4)
                        for k in ("simulated", "uniform") for s, f in (("mean", np.mean), ("max", np.max))}},
                 "pairwise": _compare({k: _pairs(c) for k, c in crowds.items()}, bits,
                                      (_pairs(crowds["real"][:half]), _pairs(crowds["real"][half:]))),
                 "query_to_crowd": _compare(q_dist, bits, (q_dist["real"][:, :half], q_dist["real"][:, half:])),
                 "nearest": {"query": _compare({k: d.min(1) for k, d in q_dist.items()}, bits),
                             "within": _compare({k: _nn_within(c) for k, c in crowds.items()}, bits)},
                 "norms": {f"{s}_{k}": round(float(f(np.linalg.norm(d, axis=1))), 4) for k, d in
                           (("real", real.distractors), ("simulated", sim)) for s, f in _STATS}}
    faces = retrieval.hamming_distance(queries, db[:n_faces])
    out["retrieval"] = {"none": _scores(faces, real.query_labels, real.face_labels)}
    labels = np.concatenate([real.face_labels, -1 - np.arange(n)])
    for k, d in q_dist.items():
        out["retrieval"][k] = _scores(np.concatenate([faces, d], axis=1), real.query_labels, labels)
    return out


def _scores(dist: np.ndarray, q_labels: np.ndarray, db_labels: np.ndarray) -> dict:
    r = retrieval.evaluate(dist, q_labels, db_labels, k=100, p_k=10)
    return {"map_all": round(r.map_all, 4), "p_10": round(r.precision_k, 4)}


def _table(r: dict) -> str:
    """The validation as a markdown table: real | simulated | uniform random codes."""
    def row(name, vals):
        return f"| {name} | " + " | ".join("" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
                                          for v in vals) + " |"

    bb, ret, nn, crowds = r["bit_balance"], r["retrieval"], r["nearest"], ("real", "simulated", "uniform")
    lines = [f"{r['engine']} ({r['bits']} bits), model {r['model']}, seed {r['seed']}: {r['n']} real vs simulated vs "
             f"uniform random strangers; {r['queries']} queries, {r['database_faces']} photos of the evaluation people",
             "| check | real | simulated | uniform |", "|---|---|---|---|",
             row("bit balance: largest abs mean of a bit", [bb[f"max_abs_{k}"] for k in crowds]),
             row("bit balance: mean abs difference to real",
                 [None, bb["mean_abs_diff_simulated"], bb["mean_abs_diff_uniform"]])]
    for h, label in ((r["pairwise"], "pairwise Hamming"), (r["query_to_crowd"], "query-to-stranger Hamming"),
                     (nn["query"], "nearest stranger to a query"), (nn["within"], "nearest other stranger")):
        floor = f" (real halves: {h['floor']:.4f})" if "floor" in h else ""
        lines += [row(f"{label}: mean (std)", [f"{h['mean_' + k]:.2f} ({h['std_' + k]:.2f})" for k in crowds]),
                  row(f"{label}: TV to real{floor}", [None, h["tv_simulated"], h["tv_uniform"]])]
    no = r["norms"]
    lines.append(row("descriptor norm: mean (std)", [f"{no['mean_real']:.3f} ({no['std_real']:.3f})",
                                                     f"{no['mean_simulated']:.3f} ({no['std_simulated']:.3f})", "-"]))
    for m, label in (("map_all", "mAP@all"), ("p_10", "P@10")):
        lines.append(row(f"{label} (no strangers: {ret['none'][m]:.4f})", [ret[k][m] for k in crowds]))
    return "\n".join(lines)


_COMPARED = ("retrieval.simulated.map_all", "retrieval.simulated.p_10", "pairwise.tv_simulated",
             "query_to_crowd.tv_simulated", "nearest.query.tv_simulated", "nearest.within.tv_simulated",
             "bit_balance.mean_abs_diff_simulated")


def _at(r: dict, dotted: str):
    for part in dotted.split("."):
        r = r[part]
    return r


def compare_models(engine_name: str, seeds: int = 3) -> list[dict]:
    """Each of ``MODELS`` validated with seeds ``0 .. seeds - 1``: mean and std of the
    ``_COMPARED`` numbers, beside the real crowd's mAP@all and P@10."""
    rows = []
    for model in MODELS:
        rs = [validate(engine_name, s, model) for s in range(_check_count(seeds, "seeds"))]
        got = {k: [_at(r, k) for r in rs] for k in _COMPARED}
        real = rs[0]["retrieval"]["real"]
        rows.append({"engine": engine_name, "model": model, "seeds": len(rs), "real_map_all": real["map_all"],
                     "real_p_10": real["p_10"],
                     **{f"{k.replace('.simulated', '').replace('retrieval.', '')}_{s}": round(float(f(v)), 4)
                        for k, v in got.items() for s, f in _STATS}})
    return rows


def main(argv: list[str] | None = None) -> None:
    """``python -m toap_kit.crowd --validate [--engine NAME] [--model M] [--seed S] [--json]``,
    ``--compare [--seeds K]`` (every model on each engine) or ``--time N`` (simulate N strangers)."""
    from .config import setup

    p = argparse.ArgumentParser(description="the simulated crowd of strangers: validate it against the real "
                                            "2,000 distractors, compare the descriptor models, time it")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--validate", action="store_true", help="real vs simulated 2,000 (a table; --json for all)")
    what.add_argument("--compare", action="store_true", help=f"the models {MODELS}, seeds 0 .. SEEDS-1")
    what.add_argument("--time", type=int, metavar="N", help="seconds to simulate N strangers")
    p.add_argument("--engine", choices=ENGINES, help="one engine (default: both)")
    p.add_argument("--model", choices=MODELS, default=DEFAULT_MODEL)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=3, help="--compare: seeds per model")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    args = p.parse_args(argv)
    setup(0)
    engines = [args.engine] if args.engine else list(ENGINES)
    if args.validate:
        rows = [validate(e, args.seed, args.model) for e in engines]
    elif args.compare:
        rows = [r for e in engines for r in compare_models(e, args.seeds)]
    else:
        rows = []
        for e in engines:
            fit_model(args.model, e)  # descriptors and fit outside the timing
            t0 = time.perf_counter()
            codes = simulate_codes(e, _check_count(args.time, "--time"), args.seed, args.model)
            rows.append({"engine": e, "n": len(codes), "seconds": round(time.perf_counter() - t0, 2),
                         "codes_mb": round(codes.nbytes / 2**20, 1)})
    if args.json:
        print(json.dumps(rows, indent=1))
    elif args.validate:
        print("\n\n".join(_table(r) for r in rows))
    else:
        print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
        print("\n".join("| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows))


if __name__ == "__main__":
    main()
