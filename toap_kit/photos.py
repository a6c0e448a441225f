"""Protection on whole photos, as a user posts them and as the demo shows them.

The grid of ``results`` measures face crops; here a perturbation goes onto the face of a whole
photo and the photo goes through a platform's pipeline:

- ``protect_photo``: a universal delta resized to the face box of a photo and added there;
- ``example_photos``: the shipped 250x250 photos of evaluation identities (people no model,
  CG or perturbation has seen), the demo's examples;
- ``per_photo``: the demo's table, each example photo x strength x {universal, refined} x
  engine: how many of the person's photos the engine's top 10 holds before and after the
  profile (``results.run``'s ``per_photo`` part, ``networks.run``'s ``photos`` part).
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import data, evaluate, postprocess, protect, refine, retrieval, toap
from .perturbation import Perturbation

__all__ = ["example_photos", "identity_labels", "per_photo", "protect_photo"]


def protect_photo(photo: torch.Tensor, perturbation: Perturbation, box: tuple[int, int, int]) -> torch.Tensor:
    """``photo`` (``3 x H x W`` in [0, 1]) with ``perturbation`` resized to the face ``box``
    ``(x0, y0, side)`` (the square the kit's cropper cuts) and added there, at the photo's
    resolution; the rest of the photo is untouched."""
    x0, y0, s = box
    d = perturbation.resized(s, s)
    out = photo.clone()
    h, w = photo.shape[1:]
    ya, yb, xa, xb = max(0, y0), min(h, y0 + s), max(0, x0), min(w, x0 + s)
    out[:, ya:yb, xa:xb] = (out[:, ya:yb, xa:xb] + d[:, ya - y0:yb - y0, xa - x0:xb - x0]).clamp(0, 1)
    return out


def identity_labels(lfw_identities: Sequence[str] | None) -> dict[str, int]:
    """lfw158's label of each identity name; ``lfw_identities``: its identity list (None: read
    from the face set, which loads every image)."""
    ids = lfw_identities if lfw_identities is not None else data.load_faceset("lfw158", 32).identities
    return {n: i for i, n in enumerate(ids)}


def example_photos(eval_identities: Sequence[str]) -> tuple[list[torch.Tensor], list[str]]:
    """The shipped 250x250 photos of evaluation identities."""
    faces = data.load_faceset("photos250", 250)
    keep = [i for i, n in enumerate(faces.names()) if n in set(eval_identities)]
    return [faces.images[i] for i in keep], [faces.names()[i] for i in keep]


def per_photo(engines: dict[str, nn.Module], sets: data.RetrievalSets, identities: list[str],
              strengths: Sequence[str] = tuple(protect.STRENGTHS), refine_steps: int | None = None,
              profile: str = "facebook", k: int = 10, lfw_identities: Sequence[str] | None = None,
              against: Sequence[Sequence[str]] = (("dlib",),),
              db_codes: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """What the demo shows, for every shipped example photo (the 250x250 photos of evaluation
    identities): for each strength x {universal, refined} x engine, how many of the person's
    photos the engine's top ``k`` holds (tie-aware expectation) for the original and for the
    protected photo, both after ``profile`` (the demo's pipeline: ``protect.protect_image`` on the
    whole photo, the profile, ``protect.face_crop``). ``lfw_identities``: see ``identity_labels``.
    ``against``: the refinement's sets of networks, one refined row per set (its ``against``
    field); ``db_codes``: the engines' codes of ``sets.db_images`` when already known."""
    photos, names = example_photos(identities)
    label_of = identity_labels(lfw_identities)
    recs = ({tuple(a): refine.KnownRecognizer(against=a) for a in map(refine.check_against, against)}
            if refine_steps is not None else {})
    db_codes = {n: db_codes[n] if db_codes and n in db_codes else m.encode(sets.db_images) for n, m in engines.items()}
    rows = []

    def hits(codes: torch.Tensor, vn: str, label: int) -> float:
        dist = retrieval.hamming_distance(codes, db_codes[vn])
        return k * retrieval.precision_at_k(dist, torch.tensor([label]), sets.db_labels, k)

    for ph, name in tqdm(list(zip(photos, names)), desc="per-photo table"):
        if not bool((sets.db_labels == label_of[name]).any()):  # a smaller (fast) database without this person
            continue
        pil = postprocess.to_pil(ph)
        clean = protect.face_crop(postprocess.apply(pil, profile), 112)[0][None]
        for strength in strengths:
            pert = Perturbation.load(protect.STRENGTHS[strength])
            ways = [("universal", 0, None)] + [("refined", refine_steps or refine.DEFAULT_STEPS, a) for a in recs]
            for way, steps, nets in ways:
                t = time.perf_counter()
                out = protect.protect_image(pil, pert, refine_steps=steps, recognizer=recs.get(nets),
                                            against=nets or ("dlib",))
                seconds = time.perf_counter() - t
                crop = protect.face_crop(postprocess.apply(out.image, profile), 112)[0][None]
                x0, y0, side = out.boxes[0] if out.boxes else (0, 0, min(pil.size))
                box = (max(0, x0), max(0, y0), min(pil.width, x0 + side), min(pil.height, y0 + side))
                q, q0 = (postprocess.from_pil(im.crop(box))[None] for im in (out.image, pil))  # the largest face's square
                for vn, m in engines.items():
                    surrogates = (pert.card["surrogates"] if nets is None else [toap.own_descriptor(n) for n in nets])
                    rows.append({"photo": name, "strength": strength, "way": way, "engine": vn, "profile": profile,
                                 "perturbation": protect.STRENGTHS[strength],  # the universal delta (the start)
                                 **({"against": list(nets)} if nets else {}),
                                 "tier": toap.threat_tier(surrogates, vn),
                                 "hits_before": hits(m.encode(clean), vn, label_of[name]),
                                 "hits_after": hits(m.encode(crop), vn, label_of[name]),
                                 "psnr": evaluate.psnr(q, q0), "seconds": seconds})
    return rows
