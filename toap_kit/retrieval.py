"""Hamming retrieval and its metrics: distance, ranking, mAP, precision@k, PR curve, index.

Codes are ``N x L`` arrays/tensors with entries in {-1, +1}. The Hamming distance between two
codes is ``(L - b1 . b2) / 2``.

**Tie rule.** Hamming distances tie constantly (64 bits have only 65 values), and mAP depends
on how ties are ordered. Everywhere in the kit a ranking sorts by distance and breaks ties by
database index (a stable sort), so results are reproducible and independent of the engine.

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
    "evaluate",
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
    """Database indices sorted by distance per query; ties broken by database index."""
    return np.argsort(_np(dist), axis=1, kind="stable")


def _relevance(dist, q_labels, db_labels) -> np.ndarray:
    q_labels, db_labels = _np(q_labels), _np(db_labels)
    dist = _np(dist)
    if dist.shape != (len(q_labels), len(db_labels)):
        raise ValueError(f"distance matrix {dist.shape} does not match "
                         f"{len(q_labels)} queries x {len(db_labels)} database items")
    order = rank(dist)
    return db_labels[order] == q_labels[:, None]


@dataclass
class RetrievalResult:
    """mAP@all, mAP@k, precision@k, and how many queries had no relevant item."""

    map_all: float
    map_k: float
    precision_k: float
    k: int
    n_queries: int
    n_skipped: int


def _average_precision(rel: np.ndarray, k: int | None) -> np.ndarray:
    """AP of each row of a boolean relevance matrix (ranked). With ``k`` the hashing
    literature's AP@k: mean precision at the relevant items within the top k (0 if none)."""
    if k is not None:
        rel = rel[:, :k]
    hits = np.cumsum(rel, axis=1)
    prec = hits / np.arange(1, rel.shape[1] + 1)
    n_rel = rel.sum(axis=1)
    return np.where(n_rel > 0, (prec * rel).sum(axis=1) / np.maximum(n_rel, 1), 0.0)


def mean_average_precision(dist, q_labels, db_labels, k: int | None = None) -> float:
    """mAP over queries with at least one relevant database item (see the module's tie rule).

    Args:
        dist: ``Nq x Ndb`` distances (Hamming or any other; smaller is closer).
        q_labels, db_labels: identity labels; relevant = same label.
        k: ``None`` for mAP@all, else mAP@k (AP over the relevant items in the top k).
    """
    rel = _relevance(dist, q_labels, db_labels)
    keep = rel.any(axis=1)
    if not keep.any():
        raise ValueError("no query has a relevant database item: mAP is undefined")
    return float(_average_precision(rel[keep], k).mean())


def precision_at_k(dist, q_labels, db_labels, k: int = 10) -> float:
    """Mean share of relevant items among the top k, over queries with a relevant item."""
    rel = _relevance(dist, q_labels, db_labels)
    keep = rel.any(axis=1)
    return float(rel[keep, :k].mean())


def evaluate(dist, q_labels, db_labels, k: int = 100, p_k: int = 10) -> RetrievalResult:
    """mAP@all, mAP@k and precision@p_k in one pass (skipped queries counted)."""
    rel = _relevance(dist, q_labels, db_labels)
    keep = rel.any(axis=1)
    if not keep.any():
        raise ValueError("no query has a relevant database item: mAP is undefined")
    r = rel[keep]
    return RetrievalResult(float(_average_precision(r, None).mean()), float(_average_precision(r, k).mean()),
                           float(r[:, :p_k].mean()), k, len(rel), int((~keep).sum()))


def pr_curve(dist, q_labels, db_labels) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at every Hamming radius r = 0..L (or every distinct distance).

    Returns ``(precision, recall)`` arrays, averaged over queries with a relevant item;
    a radius that retrieves nothing for a query counts as precision 1 for it.
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
    Distances are exact in both backends. FAISS may order equal distances differently from
    the kit's tie rule, so results are re-sorted by (distance, index); the membership of a tie
    group cut by ``k`` is whatever FAISS returned. The numpy backend is the reference.
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
