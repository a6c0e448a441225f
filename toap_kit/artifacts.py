"""Rebuild everything the repository ships, from scratch, with one seed: ``make artifacts``.

    python -m toap_kit.artifacts teacher   # dlib embeddings of the shipped faces (~9 min)
    python -m toap_kit.artifacts zoo       # train the hash-model zoo (see zoo.ZOO_SPECS)
    python -m toap_kit.artifacts uap       # the UAP baseline on the surrogate ensemble
    python -m toap_kit.artifacts cg        # pre-train the Compression Generator (~10 min, 1 core)
    python -m toap_kit.artifacts all
    python -m toap_kit.artifacts cards     # re-measure the zoo cards' clean mAP (no training)

Each step writes atomically and skips what is already there unless ``--force``, so an
interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import logging

from . import attacks, teacher, zoo
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


def build_uap(force: bool = False, eps: float = 8 / 255, steps: int = 150, seed: int = 0) -> None:
    """The UAP baseline: one delta (112x112) on the ensemble of surrogates, trained on the
    training identities' faces of the open-set protocol only."""
    path = PERTURBATION_DIR / "uap_surrogates_8"
    if not force and path.with_suffix(".json").is_file():
        log.info("%s exists, skipping", path.name)
        return
    faces = load_faceset("lfw158", 112)
    proto = make_protocol(faces, 2000)
    x, y = faces.images[proto.train], faces.labels[proto.train]
    names = zoo.surrogates()
    models = [zoo.load(n) for n in names]
    anchors = [attacks.anchor_codes(m, x, y) for m in models]
    delta = attacks.universal_perturbation(models, x, y, anchors, eps=eps, steps=steps, seed=seed)
    Perturbation(delta, eps, {"method": "uap", "objective": "margin_loss (margin 2) to identity anchor codes",
                              "optimizer": "Adam lr 1e-3, batch 32", "steps": steps,
                              "surrogates": names, "data": f"open-set protocol seed 0: {len(x)} training-identity faces",
                              "seed": seed}).save(path)


def build_cg(force: bool = False) -> None:
    """Pre-train the Compression Generator on the training faces (real-codec targets) and
    ship it in data/cg/ (see ``toap_kit.cg.build``)."""
    from . import cg

    cg.build(force=force)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m toap_kit.artifacts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["teacher", "zoo", "cg", "uap", "all", "cards"])
    p.add_argument("--force", action="store_true", help="rebuild even if the artifact exists")
    p.add_argument("--only", nargs="*", help="zoo, cards: only these model names")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.step in ("teacher", "all"):
        build_teacher(args.force)
    if args.step in ("zoo", "all"):
        zoo.build_zoo(force=args.force, only=args.only)
    if args.step in ("cg", "all"):
        build_cg(args.force)
    if args.step in ("uap", "all"):
        build_uap(args.force)
    if args.step == "cards":
        zoo.remeasure_cards(args.only)


if __name__ == "__main__":
    main()
