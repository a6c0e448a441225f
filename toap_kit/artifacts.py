"""Rebuild everything the repository ships, from scratch, with one seed: ``make artifacts``.

    python -m toap_kit.artifacts teacher   # dlib embeddings of the shipped faces (~9 min)
    python -m toap_kit.artifacts zoo       # train the hash-model zoo (see zoo.ZOO_SPECS), then
                                           # the shipped database's codes (engine.SHIPPED_CODES)
    python -m toap_kit.artifacts perturbations  # the shipped UAP baselines and TOAP ladder
    python -m toap_kit.artifacts cg        # pre-train the Compression Generator (~10 min, 1 core)
    python -m toap_kit.artifacts all
    python -m toap_kit.artifacts cards     # re-measure the zoo cards' clean mAP (no training)

Each step writes atomically and skips what is already there unless ``--force``, so an
interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

from . import attacks, engine, refine, teacher, toap, zoo
from .data import load_faceset, make_protocol
from .perturbation import PERTURBATION_DIR, Perturbation

log = logging.getLogger(__name__)


def build_teacher(force: bool = False) -> None:
    """Compute and cache the teacher's embeddings of ``lfw158`` and ``distractors``."""
    rec = None
    for name in ("lfw158", "distractors"):
        if not force and (teacher.TEACHER_DIR / f"{name}.json").is_file():
            log.info("teacher embeddings of %s exist, skipping", name)
            continue
        faces = load_faceset(name, 112)
        rec = rec or teacher.Recognizer()
        teacher.save_embeddings(name, faces.paths, rec.embed(faces.images))


CNN_SURROGATES = ("vgg_dpsh_32", "resnet_hashnet_32", "resnet_dpsh_16")
WITH_DLIB = CNN_SURROGATES + (toap.DLIB_SURROGATE,)
DLIB_WEIGHT = {toap.DLIB_SURROGATE: 2.0}  # the user's protection leans on the real recognizer

# name -> recipe. ``eps`` in 8-bit levels; toap recipes are TOAPConfig fields.
PERTURBATION_SPECS: dict[str, dict] = {
    "uap-mid-cnn": {"method": "uap", "eps": 8, "surrogates": CNN_SURROGATES, "steps": 150},
    "toap-mid-cnn": {"method": "toap", "eps": 8, "surrogates": CNN_SURROGATES, "psnr_floor": 32.5},
    "uap-mid": {"method": "uap", "eps": 8, "surrogates": WITH_DLIB, "steps": 150},
    # the user's ladder (issue 18): dlib-first, dlib's network carries the whole budget through the
    # descriptor objective of ``refine`` (landmark and engine chips, real JPEG and resize draws)
    # (1000 steps of 16 faces, cosine-decayed Adam; more down-sizing draws than the per-photo
    # default: a universal delta cannot adapt to each face, resampling is its weak spot)
    **{name: {"method": "dlib-first", "eps": eps, "surrogates": (toap.DLIB_DESCRIPTOR,), "psnr_floor": floor,
              "steps": 1000, "lr": 2e-3, "p_none": 0.15, "p_jpeg": 0.3, "p_resize": 0.3}
       for name, eps, floor in (("toap-mid", 8, 32.5), ("toap-low", 4, 36.0), ("toap-high", 12, 29.0))},
    # issue 29: the same recipe against two real networks, each leaving the third out (the
    # leave-one-network-out matrix, ``python -m toap_kit.networks``, judges them on it); 300 steps,
    # not 1000: a step against a pair with faceres takes about 2 s on 2 CPU cores (30+ min for 1000)
    **{f"ens-mid-{'-'.join(nets)}": {"method": "ensemble", "eps": 8, "against": nets,
                                     "surrogates": tuple(toap.own_descriptor(n) for n in nets), "psnr_floor": 32.5,
                                     "steps": 300, "lr": 2e-3, "p_none": 0.15, "p_jpeg": 0.3, "p_resize": 0.3}
       for nets in (("dlib", "mobileface"), ("dlib", "faceres"), ("mobileface", "faceres"))},
    # the previous ladder's recipe (TOAP with dlib's network as one of four surrogates), kept for
    # the comparison in the results and ``python -m toap_kit.artifacts perturbations --only toap-mid-mixed``
    "toap-mid-mixed": {"method": "toap", "eps": 8, "surrogates": WITH_DLIB, "psnr_floor": 32.5, "weights": DLIB_WEIGHT,
                       "rounds": 3, "steps_per_round": 60, "cg_steps": 10},
}


def perturbation_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """``(faces, labels, val_faces, description)``: what every perturbation may see: the
    open-set protocol's training identities (112x112) minus the zoo's 10 validation identities,
    whose faces check each TOAP round. The evaluation identities are never touched."""
    faces = load_faceset("lfw158", 112)
    proto = make_protocol(faces, 2000)
    val_ids = {faces.identities.index(n) for n in zoo.training_faces(32).val_names}
    train = [i for i in proto.train if int(faces.labels[i]) not in val_ids]
    val = [i for i in proto.train if int(faces.labels[i]) in val_ids]
    desc = (f"open-set protocol seed 0: {len(train)} faces of {len(proto.train_identities) - len(val_ids)} training "
            f"identities; {len(val)} faces of the zoo's 10 validation identities check each round")
    return faces.images[train], faces.labels[train], faces.images[val], desc


def make_perturbation(recipe: dict, seed: int = 0, progress: bool = True, data=None, **overrides) -> Perturbation:
    """Train one perturbation from a recipe (``PERTURBATION_SPECS`` entry; ``overrides``
    change TOAPConfig fields, e.g. the ablations' switches)."""
    x, y, val, desc = data or perturbation_data()
    eps = recipe["eps"] / 255
    names = list(recipe["surrogates"])
    if recipe["method"] == "uap":
        models = list(toap.load_surrogates(names).values())
        anchors = [attacks.anchor_codes(m, x, y) for m in models]
        t = time.perf_counter()
        delta = attacks.universal_perturbation(models, x, y, anchors, eps=eps, steps=recipe["steps"], seed=seed,
                                               progress=progress)
        return Perturbation(delta, eps, {"method": "uap", "objective": "margin_loss (margin 2) to identity anchor codes",
                                         "optimizer": "Adam lr 1e-3, batch 32", "steps": recipe["steps"],
                                         "surrogates": names, "data": desc, "seed": seed,
                                         "seconds": {"delta": round(time.perf_counter() - t, 1)}})
    config = {k: v for k, v in recipe.items() if k not in ("method", "eps", "surrogates", "against")}
    if recipe["method"] in ("dlib-first", "ensemble"):
        cfg = refine.RefineConfig(eps=eps, seed=seed, **{**config, **overrides})
        return refine.fit_universal(x, y, cfg, data=desc, progress=progress, against=recipe.get("against", ("dlib",)))
    attack = toap.TOAP(names, progress=progress, eps=eps, seed=seed, **{**config, **overrides})
    p = attack.fit(x, y, val_faces=val, data=desc)
    p.card["history_val"] = [dict(h) for h in attack.history if h["kind"] == "val"]
    return p


def build_perturbations(force: bool = False, only: list[str] | None = None, seed: int = 0) -> None:
    """Train every ``PERTURBATION_SPECS`` entry missing from data/perturbations (or all with
    ``force``); each is saved as soon as it is done, so a stopped run resumes."""
    data = None
    for name, recipe in PERTURBATION_SPECS.items():
        if only and name not in only:
            continue
        path = PERTURBATION_DIR / name
        if not force and path.with_suffix(".json").is_file():
            log.info("%s exists, skipping", name)
            continue
        data = data or perturbation_data()
        t = time.perf_counter()
        p = make_perturbation(recipe, seed, data=data)
        p.card["name"] = name
        p.save(path)
        log.info("%s: trained in %.0f s (%s)", name, time.perf_counter() - t, p.card.get("seconds"))


def build_cg(force: bool = False) -> None:
    """Pre-train the Compression Generator on the training faces (real-codec targets) and
    ship it in data/cg/ (see ``toap_kit.cg.build``)."""
    from . import cg

    cg.build(force=force)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m toap_kit.artifacts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["teacher", "zoo", "cg", "perturbations", "all", "cards"])
    p.add_argument("--force", action="store_true", help="rebuild even if the artifact exists")
    p.add_argument("--only", nargs="*", help="zoo, cards, perturbations: only these names")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.step in ("teacher", "all"):
        build_teacher(args.force)
    if args.step in ("zoo", "all"):
        zoo.build_zoo(force=args.force, only=args.only)
        engine.write_shipped_codes(args.only)  # the models changed: so did their database codes
    if args.step in ("cg", "all"):
        build_cg(args.force)
    if args.step in ("perturbations", "all"):
        build_perturbations(args.force, args.only)
    if args.step == "cards":
        zoo.remeasure_cards(args.only)


if __name__ == "__main__":
    main()
