"""Hamming retrieval and its metrics: distance, ranking, mAP, precision@k, PR curve, index.

Codes are ``N x L`` arrays/tensors with entries in {-1, +1}. The Hamming distance between two
codes is ``(L - b1 . b2) / 2``.

**Tie rule.** Hamming distances tie constantly (64 bits have only 65 values). Breaking ties by
database index would make every metric depend on how the database happens to be stored (the
kit stores the evaluation people's photos before the distractors, which flatters mAP by up to
a third). So every metric here is *tie-aware* by default: AP, AP@k, P@k and the
found-in-top-k rate are their exact expectations over every order of tied distances
(McSherry & Najork, ECIR 2008); ``ties="index"`` gives the index-broken value for comparison.
Listings (``rank``, ``HammingIndex.search``) sort by distance and then by database index.

**Queries without a relevant item** (no database image of the query's identity) are skipped
and counted, never averaged in as 0; ``RetrievalResult.n_skipped`` says how many.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "HammingIndex",
    "RetrievalResult",
    "TIES",
    "evaluate",
    "found_at_k",
    "hamming_distance",
    "mean_average_precision",
    "pack_codes",
    "pr_curve",
    "precision_at_k",
    "rank",
]


def _np(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _check_codes(b: np.ndarray, name: str) -> np.ndarray:
    if b.ndim != 2:
        raise ValueError(f"{name} must be N x L, got shape {b.shape}")
    if not np.isin(b, (-1, 1)).all():
        raise ValueError(f"{name} must hold only -1 and +1 (use sign codes from .encode())")
    return b.astype(np.float32)


def hamming_distance(q, db) -> np.ndarray:
    """Hamming distances ``Nq x Ndb`` (int32) between {-1,+1} codes ``Nq x L`` and ``Ndb x L``."""
    q, db = _check_codes(_np(q), "query codes"), _check_codes(_np(db), "database codes")
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"code lengths differ: {q.shape[1]} vs {db.shape[1]}")
    return np.rint((q.shape[1] - q @ db.T) / 2).astype(np.int32)


def rank(dist: np.ndarray) -> np.ndarray:
    """Database indices sorted by distance per query; ties broken by database index.

    A deterministic order for *listing* results (galleries, top-k lists). No metric depends
    on it unless asked to with ``ties="index"``.
    """
    return np.argsort(_np(dist), axis=1, kind="stable")


TIES = ("expected", "index")


class _Ranked:
    """The queries' rankings, cut into groups of tied distances.

    For each query (with a relevant item) and each place p of its sorted database: p's group
    starts after ``s`` items and ends before place ``e``; ``R`` relevant items lie ahead of the
    group and ``r`` inside it. With ``ties="index"`` every item is a group of its own, so the
    database order decides.
    """

    def __init__(self, dist, q_labels, db_labels, ties: str):
        if ties not in TIES:
            raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
        q_labels, db_labels, dist = _np(q_labels), _np(db_labels), _np(dist)
        if dist.shape != (len(q_labels), len(db_labels)):
            raise ValueError(f"distance matrix {dist.shape} does not match "
                             f"{len(q_labels)} queries x {len(db_labels)} database items")
        relevant = db_labels[None, :] == q_labels[:, None]
        keep = relevant.any(axis=1)
        self.n_queries, self.n_skipped = len(relevant), int((~keep).sum())
        if not keep.any():
            raise ValueError("no query has a relevant database item: mAP is undefined")
        order = rank(dist[keep])
        d = np.take_along_axis(dist[keep], order, 1)
        rel = np.take_along_axis(relevant[keep], order, 1)
        nq, self.m = d.shape
        place = np.broadcast_to(np.arange(self.m), d.shape)
        first = np.ones(d.shape, bool)
        if ties == "expected":
            first[:, 1:] = d[:, 1:] != d[:, :-1]
        last = np.ones(d.shape, bool)
        last[:, :-1] = first[:, 1:]
        self.first = first
        self.s = np.maximum.accumulate(np.where(first, place, 0), axis=1)
        self.e = np.minimum.accumulate(np.where(last, place, self.m - 1)[:, ::-1], axis=1)[:, ::-1] + 1
        cum = np.concatenate([np.zeros((nq, 1), np.int64), np.cumsum(rel, axis=1)], axis=1)
        self.R = np.take_along_axis(cum, self.s, 1)
        self.r = np.take_along_axis(cum, self.e, 1) - self.R
        self.n_relevant = cum[:, -1]
        self._H = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, self.m + 1))])
        self._logfact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, self.m + 1)))])

    def _precision_sum(self, s, n, R, r, t) -> np.ndarray:
        """Expected sum of the precisions at the relevant items on the first ``t`` places of a
        randomly ordered group of ``n`` items (``r`` relevant) ranked after ``s`` items that hold
        ``R`` relevant ones. A relevant item is on place i with probability r/n and then has on
        average (i-1)(r-1)/(n-1) relevant group mates ahead of it: the sum over i = 1..t of
        (r/n) (R + 1 + (i-1)(r-1)/(n-1)) / (s+i), written with harmonic numbers."""
        h1 = self._H[s + t] - self._H[s]  # sum of 1/(s+i)
        h2 = t - (s + 1) * h1              # sum of (i-1)/(s+i)
        f = np.where(n > 1, (r - 1) / np.maximum(n - 1, 1), 0.0)
        return r / n * ((R + 1) * h1 + f * h2)

    def _whole_groups(self, before) -> np.ndarray:
        """Expected precision sum of the groups that end at or before place ``before``."""
        s, e = self.s, self.e
        ps = self._precision_sum(s, e - s, self.R, self.r, e - s)
        return np.where(self.first & (e <= before), ps, 0.0).sum(1)

    def _cut(self, k: int):
        """The group holding place k (1-based): its start, size, relevant ahead and inside, its
        places inside the top k, and P(j of its relevant items are inside), j = 0..k."""
        s, e, R, r = (a[:, k - 1] for a in (self.s, self.e, self.R, self.r))
        n, t = e - s, k - s
        j = np.arange(k + 1)[None, :]
        s_, n_, R_, r_, t_ = (a[:, None] for a in (s, n, R, r, t))
        ok = (j >= r_ - (n_ - t_)) & (j <= np.minimum(r_, t_))
        lf = self._logfact

        def lcomb(a, b):
            return lf[np.clip(a, 0, None)] - lf[np.clip(b, 0, None)] - lf[np.clip(a - b, 0, None)]

        p = np.where(ok, np.exp(lcomb(r_, j) + lcomb(n_ - r_, t_ - j) - lcomb(n_, t_)), 0.0)
        return s_, n_, R_, r_, t_, j, p

    def average_precision(self, k: int | None = None) -> np.ndarray:
        """Expected AP per query; with ``k`` the hashing literature's AP@k (mean precision at
        the relevant items within the top k, 0 if there are none)."""
        if k is None or k >= self.m:
            return self._whole_groups(self.m) / self.n_relevant
        # AP@k divides by the relevant items inside the top k, and the group holding place k
        # may be cut there: condition on how many of its relevant items fall inside (j).
        s, n, R, r, t, j, p = self._cut(k)
        ahead = self._whole_groups(s)[:, None]
        within = self._precision_sum(s, t, R, j, t)  # j relevant spread over its t places
        ratio = np.where(R + j > 0, (ahead + within) / np.maximum(R + j, 1), 0.0)
        return (p * ratio).sum(1)

    def precision_at(self, k: int) -> np.ndarray:
        """Expected share of relevant items among the top k, per query."""
        s, n, R, r, t, _, _ = self._cut(k)
        return ((R + r * t / n) / k)[:, 0]

    def found_at(self, k: int) -> np.ndarray:
        """Probability that the top k hold at least one relevant item, per query."""
        s, n, R, r, t, j, p = self._cut(k)
        return np.where(R[:, 0] > 0, 1.0, 1.0 - p[:, 0])


def _check_k(k, m: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"{name} must be a positive integer, got {k!r}")
    return min(int(k), m)


@dataclass
class RetrievalResult:
    """mAP@all, mAP@k, precision@k, and how many queries had no relevant item."""

    map_all: float
    map_k: float
    precision_k: float
    k: int
    n_queries: int
    n_skipped: int


def mean_average_precision(dist, q_labels, db_labels, k: int | None = None, ties: str = "expected") -> float:
    """mAP over the queries with at least one relevant database item.

    Args:
        dist: ``Nq x Ndb`` distances (Hamming or any other; smaller is closer).
        q_labels, db_labels: identity labels; relevant = same label.
        k: ``None`` for mAP@all, else mAP@k (AP over the relevant items in the top k).
        ties: ``"expected"`` (default): each AP is its exact expectation over every order of
            tied distances (McSherry & Najork, ECIR 2008), so the result does not depend on how
            the database is stored. ``"index"``: ties broken by database index, for comparison.
    """
    ranked = _Ranked(dist, q_labels, db_labels, ties)
    return float(ranked.average_precision(None if k is None else _check_k(k, ranked.m)).mean())


def precision_at_k(dist, q_labels, db_labels, k: int = 10, ties: str = "expected") -> float:
    """Mean share of relevant items among the top k, over queries with a relevant item
    (``ties`` as in :func:`mean_average_precision`)."""
    ranked = _Ranked(dist, q_labels, db_labels, ties)
    return float(ranked.precision_at(_check_k(k, ranked.m)).mean())


def found_at_k(dist, q_labels, db_labels, k: int = 10, ties: str = "expected") -> np.ndarray:
    """Per query with a relevant item: the probability that its top k hold one (0 or 1 with
    ``ties="index"``). One minus its mean is the anti-retrieval rate."""
    ranked = _Ranked(dist, q_labels, db_labels, ties)
    return ranked.found_at(_check_k(k, ranked.m))


def evaluate(dist, q_labels, db_labels, k: int = 100, p_k: int = 10, ties: str = "expected") -> RetrievalResult:
    """mAP@all, mAP@k and precision@p_k in one pass (skipped queries counted; ``ties`` as in
    :func:`mean_average_precision`)."""
    ranked = _Ranked(dist, q_labels, db_labels, ties)
    return RetrievalResult(float(ranked.average_precision(None).mean()),
                           float(ranked.average_precision(_check_k(k, ranked.m)).mean()),
                           float(ranked.precision_at(_check_k(p_k, ranked.m, "p_k")).mean()),
                           k, ranked.n_queries, ranked.n_skipped)


def pr_curve(dist, q_labels, db_labels) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at every Hamming radius r = 0..L (or every distinct distance).

    Returns ``(precision, recall)`` arrays, averaged over queries with a relevant item;
    a radius that retrieves nothing for a query counts as precision 1 for it. A radius keeps
    or drops a whole group of tied items, so the curve needs no tie rule: it is the same for
    every order of the database.
    """
    dist = _np(dist)
    q_labels, db_labels = _np(q_labels), _np(db_labels)
    rel = db_labels[None, :] == q_labels[:, None]
    keep = rel.any(axis=1)
    dist, rel = dist[keep], rel[keep]
    radii = np.unique(dist)
    prec, rec = [], []
    for r in radii:
        hit = dist <= r
        n_hit = hit.sum(axis=1)
        tp = (hit & rel).sum(axis=1)
        prec.append(np.where(n_hit > 0, tp / np.maximum(n_hit, 1), 1.0).mean())
        rec.append((tp / rel.sum(axis=1)).mean())
    return np.array(prec), np.array(rec)


def pack_codes(codes) -> np.ndarray:
    """Pack {-1,+1} codes ``N x L`` (L a multiple of 8) into ``N x L/8`` uint8 for FAISS.

    Bit order: bit j of the code (``+1`` -> 1) goes to byte ``j // 8``, bit position
    ``j % 8`` counted from the least significant bit (``np.packbits(bitorder="little")``),
    which is the layout FAISS's binary indexes read.
    """
    b = _check_codes(_np(codes), "codes")
    if b.shape[1] % 8:
        raise ValueError(f"code length must be a multiple of 8 for FAISS, got {b.shape[1]}")
    return np.packbits(b > 0, axis=1, bitorder="little")


class HammingIndex:
    """Exact Hamming search over {-1,+1} codes, on FAISS ``IndexBinaryFlat`` or numpy.

    ``search(q, k)`` returns ``(distances, indices)``, each ``Nq x k``, sorted by distance.
    Distances are exact in both backends. FAISS may order equal distances differently, so
    results are re-sorted by (distance, index); the membership of a tie group cut by ``k`` is
    whatever FAISS returned. The numpy backend is the reference. This is a listing for
    search and galleries: no metric of the kit is computed from it (they are tie-aware).
    The face index of the engine and of ``toap crawl`` (metadata, files, Milvus, ties cut by
    lowest id on every backend) is ``toap_kit.index``; this class stays the course's small one.
    """

    def __init__(self, bits: int, backend: str = "faiss"):
        if backend not in ("faiss", "numpy"):
            raise ValueError(f"backend must be 'faiss' or 'numpy', got {backend!r}")
        if bits % 8:
            raise ValueError(f"bits must be a multiple of 8, got {bits}")
        self.bits, self.backend = bits, backend
        self._codes = np.zeros((0, bits), np.float32)
        if backend == "faiss":
            import faiss

            self._index = faiss.IndexBinaryFlat(bits)

    @property
    def ntotal(self) -> int:
        return len(self._codes) if self.backend == "numpy" else self._index.ntotal

    def add(self, codes) -> None:
        """Append {-1,+1} codes ``N x bits`` to the index."""
        b = _check_codes(_np(codes), "codes")
        if b.shape[1] != self.bits:
            raise ValueError(f"codes have {b.shape[1]} bits, index has {self.bits}")
        if self.backend == "faiss":
            self._index.add(pack_codes(b))
        else:
            self._codes = np.concatenate([self._codes, b])

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest codes of each query: ``(distances, indices)``, ``Nq x k``."""
        if not 1 <= k <= self.ntotal:
            raise ValueError(f"k must be in 1..{self.ntotal}, got {k}")
        q = _check_codes(_np(queries), "queries")
        if self.backend == "faiss":
            d, i = self._index.search(pack_codes(q), k)
            order = np.lexsort((i, d), axis=1)
            return np.take_along_axis(d, order, 1).astype(np.int32), np.take_along_axis(i, order, 1)
        ds, ids = [], []
        for j in range(0, len(q), 16):  # chunks keep the distance matrix small
            d = hamming_distance(q[j:j + 16], self._codes)
            i = np.argsort(d, axis=1, kind="stable")[:, :k]
            ds.append(np.take_along_axis(d, i, 1))
            ids.append(i)
        return np.concatenate(ds), np.concatenate(ids)
