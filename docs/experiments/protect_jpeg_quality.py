"""Issue 12 experiments: at which JPEG quality should ``toap protect`` write protected JPEGs, and
what does the feathered edge of its face mask cost?

1. Relative drop of tie-aware mAP@all (query setting) that ``toap-mid-mixed`` (the ladder's
``toap-mid`` when this was measured, issue 12) keeps on the two
real-recognizer engines after real JPEG q95/90/85/80/75 (applied to clean and protected queries
alike), against no re-encoding, on the open-set protocol's first 60 queries
(``sets.subset(60)``).
2. The same on ``dlib_itq_32`` with the delta faded out over the outer 0 / 5 / 10% of the face
   square (``protect.feather_mask``), with no re-encoding, JPEG q95 (4:2:0 and 4:4:4), and
   q95 followed by the Facebook profile (the platform's second encode).

About 15 minutes on 2 CPU cores.

    python docs/experiments/protect_jpeg_quality.py

Not part of the kit: the full results run (``make results``) measures the same perturbation on
every query; ``toap_kit.protect.DEFAULT_JPEG_QUALITY`` was chosen from this script's output.
"""
import torch

from toap_kit import evaluate, protect, zoo
from toap_kit.data import load_faceset, make_protocol, retrieval_sets
from toap_kit.perturbation import Perturbation


def main() -> None:
    torch.set_grad_enabled(False)
    faces, dis = load_faceset("lfw158", 112), load_faceset("distractors", 112)
    sets = retrieval_sets(make_protocol(faces, len(dis)), faces, dis).subset(60)
    p = Perturbation.load("toap-mid-mixed")
    print("| engine | post | mAP clean | mAP protected | relative drop |")
    print("|---|---|---|---|---|")
    for victim in ("dlib_itq_32", "dlib_itq_64"):
        ev = evaluate.Evaluator(zoo.load(victim), sets)
        for post in ("none", "jpeg:95", "jpeg:90", "jpeg:85", "jpeg:80", "jpeg:75"):
            r = ev(p.apply, "query", post)
            print(f"| {victim} | {post} | {r.map_clean:.4f} | {r.map_after:.4f} | {r.rel_drop:.3f} |", flush=True)
    ev = evaluate.Evaluator(zoo.load("dlib_itq_32"), sets)
    print("\n| feather | post | relative drop on dlib_itq_32 |")
    print("|---|---|---|")
    for width in (0.0, 0.05, 0.10):
        mask = torch.from_numpy(protect.feather_mask(112, width)) if width else torch.ones(112, 112)
        for post in ("none", "jpeg:95", "jpeg:95:444", "jpeg:95|facebook", "jpeg:95:444|facebook"):
            r = ev(lambda x: (x + p.delta * mask).clamp(0, 1), "query", post)
            print(f"| {width:.0%} | {post} | {r.rel_drop:.3f} |", flush=True)


if __name__ == "__main__":
    main()
