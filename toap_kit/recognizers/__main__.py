"""``python -m toap_kit.recognizers fetch | parity | bench``.

- ``fetch``: the TF.js networks' files from npm (``make install`` runs it; ``weights.fetch``).
- ``parity``: the torch reader against the recorded TF.js outputs; with ``--record`` (node and
  ``@tensorflow/tfjs`` needed, see ``reference.node_tfjs``) against TF.js run now, and records them.
- ``bench``: each recognizer on the open-set protocol (float descriptors by cosine, and ITQ codes
  of 32 and 64 bits, all tie-aware mAP@all), and the chip each network reads and its distance
  scale (``distance_scale``), both measured on training people only; writes
  ``results/recognizers.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import OUTPUT_DIR
from ..data import load_faceset, make_protocol
from ..hashing import ITQ
from ..retrieval import hamming_distance, mean_average_precision
from . import NAMES, SPECS, Recognizer, load

RESULTS = Path(__file__).resolve().parents[2] / "results" / "recognizers.json"
BITS = (32, 64)
# candidate chips (x0, y0, x1, y1) in the kit's crop: the whole crop, centred squares, and squares
# shifted up (the ArcFace template puts the eyes higher than the kit's crops do)
CHIPS = {"whole crop": (0.0, 0.0, 1.0, 1.0), "centre 85%": (0.075, 0.075, 0.925, 0.925),
         "centre 93%, up 4.6%": (0.035, -0.011, 0.965, 0.919), "centre 90%, up 7%": (0.05, -0.02, 0.95, 0.88),
         "dlib engines' chip": SPECS["dlib"].chip_box}


def _embed(net: Recognizer, images: torch.Tensor, desc: str, batch: int = 64) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([net.embed(images[i:i + batch]) for i in tqdm(range(0, len(images), batch), desc=desc,
                                                                       leave=False)]).numpy()


def _cos_map(q: np.ndarray, db: np.ndarray, q_lab: np.ndarray, db_lab: np.ndarray) -> float:
    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    return mean_average_precision(-unit(q) @ unit(db).T, q_lab, db_lab)


def distance_scale(name: str, e: np.ndarray, labels: np.ndarray, pairs: int = 20000, seed: int = 0) -> float:
    """Median distance between descriptors ``e`` of two faces of different people (``pairs``
    random pairs; unit-normalised first for a cosine network): ``SPECS[name].distance_scale``."""
    if SPECS[name].cosine:
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, len(e), pairs), rng.integers(0, len(e), pairs)
    other = labels[i] != labels[j]
    return round(float(np.median(np.linalg.norm(e[i[other]] - e[j[other]], axis=1))), 3)


LANDMARK_CHIP = "dlib's 5 landmarks, aligned"
"""The candidate chip cut where dlib's landmark alignment puts each face (``aligned_chips``),
carried into the network's frame (its chip box relative to dlib's), instead of one fixed box."""


def choose_chip(name: str, faces, train: np.ndarray, n_people: int = 30, seed: int = 0) -> dict[str, float]:
    """mAP@all (cosine, each face a query against the others) of ``name`` on ``n_people``
    training people under every candidate chip of ``CHIPS`` and ``LANDMARK_CHIP``: the choice
    never sees a victim."""
    labels = faces.labels.numpy()
    people = np.random.default_rng(seed).choice(np.unique(labels[train]), n_people, replace=False)
    sel = train[np.isin(labels[train], people)]
    net, lab = load(name), labels[sel]
    out = {}
    embeddings = {chip: _embed(Recognizer(replace(net.spec, chip_box=box, landmarks=False), net.net), faces.images[sel],
                               f"{name} {chip}")
                  for chip, box in CHIPS.items()}
    embeddings[LANDMARK_CHIP] = _embed(Recognizer(replace(net.spec, landmarks=True), net.net), faces.images[sel],
                                       f"{name} {LANDMARK_CHIP}")
    for chip, e in embeddings.items():
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        d = -e @ e.T
        aps = [mean_average_precision(d[i:i + 1, np.arange(len(e)) != i], lab[i:i + 1], lab[np.arange(len(e)) != i])
               for i in range(len(e))]
        out[chip] = round(float(np.mean(aps)), 4)
    return out


def bench(names: tuple[str, ...] = NAMES) -> dict:
    """Each recognizer on the open-set protocol (see the module docstring); descriptors cached
    in ``outputs/recognizers``."""
    faces, dis = load_faceset("lfw158", 112), load_faceset("distractors", 112)
    proto = make_protocol(faces, len(dis))
    cache = OUTPUT_DIR / "recognizers"
    cache.mkdir(parents=True, exist_ok=True)
    q_lab = faces.labels[proto.queries].numpy()
    db_lab = np.concatenate([faces.labels[proto.database_faces].numpy(), -1 - np.arange(len(dis))])
    rows = []
    for name in names:
        t0 = time.perf_counter()
        net = load(name)
        f = cache / f"{name}-{'-'.join(f'{v:g}' for v in net.chip_box)}{'-landmarks' if net.spec.landmarks else ''}.npz"
        if f.exists():
            with np.load(f) as z:
                e, d = z["faces"], z["distractors"]
        else:
            e, d = _embed(net, faces.images, f"{name} lfw158"), _embed(net, dis.images, f"{name} distractors")
            np.savez(f, faces=e, distractors=d)
        q, db = e[proto.queries], np.concatenate([e[proto.database_faces], d])
        row = {"name": name, "dim": net.dim, "input_size": net.input_size, "chip_box": list(net.chip_box),
               "landmarks": net.spec.landmarks,
               "float_map_all": round(_cos_map(q, db, q_lab, db_lab), 4)}
        row["distance_scale"] = distance_scale(name, e[proto.train], faces.labels[proto.train].numpy())
        fit_on = np.concatenate([e[proto.train], d])  # as the dlib engines: training faces + distractors
        for b in BITS:
            itq = ITQ(b, seed=0).fit(fit_on)
            row[f"itq{b}_map_all"] = round(mean_average_precision(hamming_distance(itq.encode(q), itq.encode(db)),
                                                                  q_lab, db_lab), 4)
        if name != "dlib":
            row["chip_choice"] = choose_chip(name, faces, np.array(proto.train))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
    return {"protocol": f"open-set, seed 0: {len(q_lab)} queries, database {len(db_lab)} faces",
            "metric": "tie-aware mAP@all", "rows": rows}


def table(r: dict) -> str:
    """The bench's table (markdown), as the README shows it."""
    lines = ["| recognizer | descriptor | chip | float (cosine) | ITQ 32 bits | ITQ 64 bits |", "|---|---|---|---|---|---|"]
    lines += [f"| {row['name']} | {row['dim']}-D | {row['input_size']} px{', landmark-aligned' if row.get('landmarks') else ''} | "
              f"{row['float_map_all']:.3f} | "
              f"{row['itq32_map_all']:.3f} | {row['itq64_map_all']:.3f} |" for row in r["rows"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m toap_kit.recognizers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="fetch the TF.js networks from npm (make install)")
    par = sub.add_parser("parity", help="the torch reader against TF.js")
    par.add_argument("--record", action="store_true", help="run TF.js now (node + @tensorflow/tfjs) and record it")
    be = sub.add_parser("bench", help="open-set retrieval of every recognizer; writes results/recognizers.json")
    be.add_argument("--only", nargs="+", choices=NAMES, help="only these recognizers (not written)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from . import reference, weights

    if args.command == "fetch":
        try:
            print(f"TF.js networks ready in {weights.fetch()}")
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    if args.command == "parity":
        errors = reference.record() if args.record else reference.check()
        for name, err in errors.items():
            print(f"{name}: largest difference {err:.2e} of the output's scale (tolerance {reference.TOLERANCE:g}) "
                  f"against TF.js {'run now' if args.record else 'as recorded'}")
        return 0 if max(errors.values()) <= reference.TOLERANCE else 1
    r = bench(tuple(args.only or NAMES))
    if not args.only:
        RESULTS.write_text(json.dumps(r, indent=1) + "\n")
    print(f"{r['protocol']}; {r['metric']}")
    print(table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
