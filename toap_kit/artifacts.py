"""Rebuild everything the repository ships, from scratch, with one seed: ``make artifacts``.

    python -m toap_kit.artifacts teacher   # dlib embeddings of the shipped faces (~9 min)
    python -m toap_kit.artifacts zoo       # train the hash-model zoo (see zoo.ZOO_SPECS)
    python -m toap_kit.artifacts all

Each step writes atomically and skips what is already there unless ``--force``, so an
interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import logging

from . import teacher, zoo
from .data import load_faceset

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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m toap_kit.artifacts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["teacher", "zoo", "all"])
    p.add_argument("--force", action="store_true", help="rebuild even if the artifact exists")
    p.add_argument("--only", nargs="*", help="zoo: train only these model names")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.step in ("teacher", "all"):
        build_teacher(args.force)
    if args.step in ("zoo", "all"):
        zoo.build_zoo(force=args.force, only=args.only)


if __name__ == "__main__":
    main()
