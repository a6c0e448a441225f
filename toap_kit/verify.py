"""Check what a platform's copy of a protected photo gives away: ``verify``.

    >>> from toap_kit import verify
    >>> rows = verify.verify(Image.open("me.jpg"), Image.open("from-facebook.jpg"), perturbation="toap-mid")
    >>> verify.verdict(rows)

Per engine (every zoo model, the real-recognizer engines ``dlib_itq_*`` included), with its
threat tier: the Hamming distance between the codes of the two faces, and whether the shipped
database still returns the person in the top 10 in both threat settings. The command line is
``toap verify`` (``toap_kit.cli``).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from . import zoo
from .engine import db_codes, model
from .perturbation import Perturbation
from .protect import ProtectError, _upright, face_crop

__all__ = ["verdict", "verify"]


def _rank(distances: np.ndarray, d: int, k: int) -> tuple[float, float]:
    """Tie-aware position of a new database item at Hamming distance ``d`` among ``distances``
    (the rest of the database): ``(probability it lands in the top k, expected rank)`` when
    ties are ordered at random (the kit's tie-aware metrics)."""
    less, equal = int((distances < d).sum()), int((distances == d).sum())
    return float(np.clip((k - less) / (equal + 1), 0, 1)), less + 1 + equal / 2


def _surrogates(perturbation: str | Perturbation | None) -> list[str] | None:
    """The surrogates on the perturbation's card (``Perturbation.load`` finds a path or a
    shipped name and checks it), or None without a perturbation."""
    if perturbation is None:
        return None
    if not isinstance(perturbation, Perturbation):
        try:
            perturbation = Perturbation.load(perturbation)
        except (FileNotFoundError, ValueError) as e:
            raise ProtectError(str(e)) from e
    return list(perturbation.card.get("surrogates", []))


def verify(original: Image.Image, uploaded: Image.Image, engines: list[str] | None = None,
           perturbation: str | Perturbation | None = None, *, k: int = 10) -> list[dict]:
    """Does a face search engine still find the person of ``original`` from ``uploaded``?

    The face of each photo is detected and cropped as the kit's engines do (``face_crop``:
    ``data.crop_face``'s square, largest face; without a face, the central square, and
    ``face_found_*`` is False). Per engine (default: every zoo model, the two
    real-recognizer engines ``dlib_itq_*`` included):

    - ``hamming``: Hamming distance between the codes of the two faces (of ``bits``);
    - query setting (the uploaded copy is what a stranger searches with): the original clean
      face is added to the shipped database (58 unseen people + 2,000 others) as a new
      identity; ``found_top10_query`` is True when the uploaded face's top-``k`` more likely
      than not (ties in random order: ``p_top10_query`` >= 0.5) contains it;
    - database setting (the uploaded copy is what a crawler stored): the uploaded face is
      added to the database and the original clean face is the query (``found_top10_database``).

    The database holds the very same photo, not another photo of the person: the easiest match
    there is, so "not found" is strong evidence and "found" may overstate what a search with
    another photo would give.

    Args:
        original, uploaded: PIL photos (EXIF orientation applied here).
        engines: zoo model names (default all).
        perturbation: name/path or ``Perturbation`` the photo was protected with, for each
            engine's threat tier (``toap.threat_tier`` on its card's surrogates); None: "unknown".
        k: the top-k size.

    Returns:
        One row per engine: ``engine, role, tier, bits, hamming, found_top10_query,
        p_top10_query, rank_query, found_top10_database, p_top10_database, rank_database,
        protected`` (not found in either setting), ``face_found_original``,
        ``face_found_uploaded``.

    Raises:
        ProtectError: unknown engine or perturbation, or a photo under 16 px a side.
    """
    from .toap import threat_tier  # imported here: toap pulls in the training stack

    models = zoo.names()
    names = list(engines) if engines else models
    unknown = [n for n in names if n not in models]
    if unknown:
        raise ProtectError(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(models)}")
    surrogates = _surrogates(perturbation)
    crops = []
    for what, im in (("original", original), ("uploaded", uploaded)):
        im = _upright(im, [])
        if min(im.size) < 16:
            raise ProtectError(f"the {what} photo is too small to hold a face: {im.size[0]}x{im.size[1]}")
        crops.append(face_crop(im))
    (a, found_a), (b, found_b) = crops
    rows = []
    for name in names:
        db = db_codes(name)  # shipped (``engine.SHIPPED_CODES``): instant
        with torch.no_grad():
            codes = model(name).encode(torch.stack([a, b])).numpy().astype(np.int8)
        bits = int(codes.shape[1])
        ham = int((codes[0] != codes[1]).sum())
        pq, rq = _rank((db != codes[1]).sum(1), ham, k)  # query setting: the uploaded face searches, original added
        pd, rd = _rank((db != codes[0]).sum(1), ham, k)  # database setting: the original searches, uploaded added
        rows.append({"engine": name, "role": zoo.card(name)["role"],
                     "tier": "unknown" if surrogates is None else threat_tier(surrogates, name),
                     "bits": bits, "hamming": ham,
                     "found_top10_query": pq >= 0.5, "p_top10_query": round(pq, 4), "rank_query": rq,
                     "found_top10_database": pd >= 0.5, "p_top10_database": round(pd, 4), "rank_database": rd,
                     "protected": pq < 0.5 and pd < 0.5, "face_found_original": found_a,
                     "face_found_uploaded": found_b})
    return rows


def verdict(rows: list[dict]) -> str:
    """One line: on how many engines the person is no longer in the top 10 in either setting."""
    if not rows:
        return "NO RESULT: no engine was checked."
    safe = [r for r in rows if r["protected"]]
    found = [f"{r['engine']} ({r['tier']})" for r in rows if not r["protected"]]
    if len(safe) == len(rows):
        return f"PROTECTED: none of the {len(rows)} engines returns this person in its top 10 in either setting."
    if not safe:
        return f"NOT PROTECTED: all {len(rows)} engines still return this person in their top 10."
    return (f"PARTLY PROTECTED: {len(safe)} of {len(rows)} engines no longer return this person in their top 10; "
            f"still found by {', '.join(found)}.")
