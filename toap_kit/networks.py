"""Leave-one-network-out: protections made against some real networks, judged on engines on all.

A real crawler runs a face network of its own. The kit has three independent ones
(``recognizers``: dlib's ResNet, MobileFace, faceres) and hash engines on each (``zoo``:
``<network>_itq_32`` and ``_64``). Here each protection is made against a set of networks
(``refine.refine_faces(..., against=...)``, or a universal delta: ``toap-mid`` on dlib's, the
``ens-mid-*`` on two networks) and judged on every engine:
on an engine whose network the protection never used the tier is *real engine black-box*
(``toap.threat_tier``), the question a user asks ("what about a crawler I never ran?").

    python -m toap_kit.networks [--fast] [--parts matrix,photos,limits]
                                              # -> results/networks.json, the README block, tables

Protocol: the open-set protocol's evaluation identities (no model, CG or perturbation saw
them); ``N_QUERIES`` queries spread over the query list (``query_subset``) against the whole
database (their people's photos and the other evaluation people's, plus the 2,000
distractors); query setting (the protected photo is the query), and the database setting for
the universal deltas (``run``); real codecs (``POSTS``);
tie-aware mAP@all; each row names its tier. The refinements run at mid strength (eps 8/255,
PSNR >= 35.5 dB) from zero, cached and resumable (``results.refined``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import data, defences, engine, evaluate, perturbation, photos, refine, results, toap, zoo
from .config import OUTPUT_DIR, fast_mode
from .recognizers import NAMES

__all__ = ["AGAINST", "DB_POSTS", "ENGINES", "ENSEMBLE_PREFIX", "N_QUERIES", "PARTS", "POSTS", "PURIFIERS", "README_BEGIN", "README_END",
           "RESULT", "TARGETS", "held_out_sentence", "limits", "limits_table", "matrix", "photo_table", "query_subset",
           "readme_block", "run", "summary", "targets", "update_readme"]

log = logging.getLogger(__name__)
RESULT = results.RESULTS_DIR / "networks.json"
AGAINST = (("dlib",), ("mobileface", "faceres"), ("dlib", "faceres"), ("dlib", "mobileface"))
"""The refinements: dlib's alone (``toap protect --refine``; faceres and MobileFace held out) and
every pair, each leaving the third network out."""
ENGINES = tuple(f"{n}_itq_{b}" for n in NAMES for b in (32, 64))
POSTS = ("none", "jpeg:75", "facebook", "resize:0.5")
DB_POSTS = ("jpeg:75",)
"""The database setting's post: each post re-encodes the whole protected database on every
network (minutes for each post and protection on 2 cores), so only the headline JPEG q75."""
N_QUERIES = 40
ENSEMBLE_PREFIX = "ens-"
"""The shipped universal deltas made against a set of networks (``artifacts.PERTURBATION_SPECS``)."""
FAST = {"queries": 4, "distractors": 20, "steps": 2, "against": (("dlib",), ("mobileface", "faceres")),
        "engines": ("dlib_itq_32", "mobileface_itq_32", "faceres_itq_32"), "posts": ("none", "jpeg:75"),
        "db_posts": ("none",), "photos": 2, "purifiers": ("jpeg:50",)}
"""A fast run (``TOAP_FAST=1``): a smoke run of every step at a tiny size, not the claims."""


def query_subset(sets: data.RetrievalSets, n: int) -> data.RetrievalSets:
    """``sets`` with ``n`` queries spread evenly over its query list (so over its people), the
    database unchanged."""
    if not 1 <= n <= len(sets.query_images):
        raise ValueError(f"n must be in 1..{len(sets.query_images)}, got {n}")
    idx = torch.from_numpy(np.linspace(0, len(sets.query_images) - 1, n).round().astype(np.int64))
    return data.RetrievalSets(sets.query_images[idx], sets.query_labels[idx], sets.db_images, sets.db_labels,
                              sets.db_source)


PARTS = ("matrix", "photos", "limits")
PURIFIERS = ("jpeg:50", "median:3", "resize:0.5")
"""The honest limits' defences: an engine that purifies every image (database and queries) before hashing."""


def run(fast: bool | None = None, cache: Path | None = None, progress: bool = True,
        parts: Sequence[str] = PARTS) -> dict:
    """The parts of the study (see the module docstring), each with its wall time in ``seconds``;
    ``fast`` (default: ``TOAP_FAST``) is a smoke run at ``FAST`` sizes.

    - ``matrix``: every protection x engine x post; query setting for all, database setting (every
      photo of the evaluation people protected) for the universal deltas, whose protection costs
      milliseconds (refining the 775 database faces against a pair would take hours here);
    - ``photos``: the demo's per-photo table (``photos.per_photo``) on every engine, at mid
      strength, universal and refined against each of ``AGAINST``, after Facebook's profile;
    - ``limits``: each refinement's held-out engines when they purify every image (``PURIFIERS``),
      on the matrix's refined queries (cached).
    """
    fast = fast_mode(fast)
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ValueError(f"parts must be some of {PARTS}, got {tuple(parts)}")
    t0 = time.perf_counter()
    faces, dis = data.load_faceset("lfw158", 112), data.load_faceset("distractors", 112)
    proto = data.make_protocol(faces, len(dis))
    full = data.retrieval_sets(proto, faces, dis)
    sets = full.subset(FAST["queries"], FAST["distractors"]) if fast else query_subset(full, N_QUERIES)
    against_sets = FAST["against"] if fast else AGAINST
    engines = results.load_victims(FAST["engines"] if fast else ENGINES)
    steps = FAST["steps"] if fast else None
    cache = cache or OUTPUT_DIR / ("networks-fast" if fast else "networks") / "refined"
    eps = 8 / 255
    seconds: dict[str, float] = {}
    # the full run searches the shipped database: its codes are shipped (engine.db_codes), not encoded again
    db = None if fast else {n: torch.from_numpy(engine.db_codes(n)).float() for n in engines}

    def refiner(against: tuple[str, ...]):
        def protect(x: torch.Tensor) -> torch.Tensor:
            t = time.perf_counter()
            out = results.refined(x, steps, cache, progress, start=None, against=against)
            seconds[name(against)] = round((time.perf_counter() - t) / len(x), 2)
            return out
        return protect

    def noise(x: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(len(x))
        return (x + eps * torch.where(torch.rand(x.shape, generator=gen) < 0.5, -1.0, 1.0)).clamp(0, 1)

    universal: dict[str, tuple] = {"noise": ("noise", noise, None, [])}
    for n in ["toap-mid"] + [n for n in perturbation.Perturbation.shipped() if n.startswith(ENSEMBLE_PREFIX)]:
        p = perturbation.Perturbation.load(n)  # the universal deltas: dlib's, and each pair's
        universal[n] = (p.card["method"], p.apply, p, list(p.card["surrogates"]))
    refinements = {name(a): ("refine", refiner(a), None, [toap.own_descriptor(n) for n in a]) for a in against_sets}
    out = {"fast": fast, "protocol": proto.describe(), "queries": len(sets.query_images),
           "database": len(sets.db_images), "eps": eps, "refine_steps": steps or refine.DEFAULT_STEPS,
           "torch_threads": torch.get_num_threads(), "seconds": {"setup": round(time.perf_counter() - t0, 1)}}
    t0 = time.perf_counter()
    if "matrix" in parts:
        posts = FAST["posts"] if fast else POSTS
        rows = results.grid(universal, engines, sets, posts, FAST["db_posts"] if fast else DB_POSTS, (), eps, db_codes=db)
        rows += results.grid(refinements, engines, sets, posts, (), (), eps, db_codes=db)
        for r in rows:
            r["held_out"] = toap.engine_network(r["victim"]) not in toap.surrogate_networks(r["surrogates"])
        out["rows"] = rows
        out["refine_seconds_per_face"] = seconds  # this run's wall time (a chunk read from the cache takes ~0)
        out["seconds"]["matrix"], t0 = round(time.perf_counter() - t0, 1), time.perf_counter()
    if "photos" in parts:
        people, photo_sets = proto.eval_identities, full
        if fast:  # the first photos' people and a few distractors
            people = photos.example_photos(people)[1][:FAST["photos"]]  # the example photos' people
            mine = torch.isin(full.db_labels, torch.tensor([faces.identities.index(n) for n in people]))
            dis = (full.db_source < 0) & (torch.cumsum((full.db_source < 0).long(), 0) <= FAST["distractors"])
            keep = mine | dis
            photo_sets = data.RetrievalSets(full.query_images[:0], full.query_labels[:0], full.db_images[keep],
                                            full.db_labels[keep], full.db_source[keep])
        out["per_photo"] = photos.per_photo(engines, photo_sets, people, ("mid",), refine_steps=steps or 0,
                                             lfw_identities=faces.identities, against=against_sets,
                                             db_codes=None if fast else db)
        out["seconds"]["photos"], t0 = round(time.perf_counter() - t0, 1), time.perf_counter()
    if "limits" in parts:
        out["limits"] = limits(refinements, engines, sets, FAST["purifiers"] if fast else PURIFIERS)
        out["seconds"]["limits"] = round(time.perf_counter() - t0, 1)
    return out


def limits(refinements: dict[str, tuple], engines: dict, sets: data.RetrievalSets,
           purifiers: Sequence[str] = PURIFIERS) -> list[dict]:
    """Each refinement (``run``'s entries) against its held-out engines (the widest codes among
    ``engines``) when each engine purifies every image before hashing (``defences.Purified``),
    query setting, no post: the honest limits of a protection against a network it never used."""
    rows, purified = [], {}  # (engine, purifier) -> its Evaluator: the purified database encoded once
    bits = max(zoo.card(vn)["bits"] for vn in engines)
    for pname, (method, protect, _, surrogates) in refinements.items():
        protected = protect(sets.query_images)
        used = toap.surrogate_networks(surrogates)
        for vn, m in engines.items():
            if toap.engine_network(vn) in used or zoo.card(vn)["bits"] != bits:
                continue
            for spec in purifiers:
                if (vn, spec) not in purified:
                    purified[vn, spec] = evaluate.Evaluator(defences.Purified(m, spec), sets)
                r = purified[vn, spec](lambda _x: protected, "query", "none")
                rows.append({"perturbation": pname, "method": method, "surrogates": surrogates, "victim": vn,
                             "tier": toap.threat_tier(surrogates, vn), "engine": f"purifies with {spec}",
                             "map_clean": r.map_clean, "map_after": r.map_after,
                             "rel_drop": (r.map_clean - r.map_after) / r.map_clean if r.map_clean > 0 else float("nan")})
    return rows


def name(against: Sequence[str]) -> str:
    """A refinement's row name: ``refine[dlib+faceres]``."""
    return f"refine[{'+'.join(against)}]"


def matrix(result: dict, post: str = "jpeg:75", bits: int = 64, setting: str = "query") -> str:
    """The leave-one-network-out matrix (markdown): one row per protection, one column per
    network's engine at ``bits`` (or the run's smallest), each cell the retrieval removed
    (relative mAP@all drop) after ``post`` in ``setting`` and the tier's short mark."""
    rows = [r for r in result["rows"] if r["post"] == post and r["setting"] == setting]
    have = sorted({zoo.card(r["victim"])["bits"] for r in rows})
    bits = bits if bits in have else have[0]
    cols = [e for e in ENGINES if e.endswith(f"_{bits}") and any(r["victim"] == e for r in rows)]
    head = f"after {post}" + ("" if setting == "query" else f", {setting} setting")
    out = [f"| protection ({head}) | PSNR | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for p in dict.fromkeys(r["perturbation"] for r in rows):
        cells = []
        for e in cols:
            r = next(r for r in rows if r["perturbation"] == p and r["victim"] == e)
            mark = "held out" if r["tier"] == "engine-blackbox" else "known"
            cells.append(f"{r['rel_drop']:.0%} ({mark})")
        psnr = next(r["psnr"] for r in rows if r["perturbation"] == p)
        out.append(f"| {p} | {psnr:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def summary(result: dict, posts: Sequence[str] = ("jpeg:75", "facebook", "resize:0.5")) -> dict[str, dict]:
    """Per refinement: the worst (smallest) retrieval removed on an engine whose network it never
    used, after each of ``posts`` (the issue's target measure), and its known-network best."""
    out: dict[str, dict] = {}
    for p in dict.fromkeys(r["perturbation"] for r in result["rows"]):
        rs = [r for r in result["rows"] if r["perturbation"] == p and r["setting"] == "query"]
        entry = {}
        for post in posts:
            held = [r["rel_drop"] for r in rs if r["post"] == post and r["held_out"]]
            known = [r["rel_drop"] for r in rs if r["post"] == post and not r["held_out"]]
            entry[post] = {"held_out_worst": round(min(held), 4) if held else None,
                           "known_worst": round(min(known), 4) if known else None}
        out[p] = entry
    return out


TARGETS = {"refine": (("jpeg:75", "facebook"), 0.80), "refine-resize": (("resize:0.5",), 0.65),
           "universal": (("jpeg:75", "facebook"), 0.50), "known": (("jpeg:75", "facebook"), 0.95)}
"""Issue 29's targets, on the worst engine of the 64-bit ones: a refinement against two networks
removes >= 80% on the network it never used after JPEG q75 and after Facebook (>= 65% after a
resize by 0.5), a universal delta against two >= 50%, and a refinement keeps >= 95% on a network
it used."""


def targets(result: dict, bits: int = 64) -> list[dict]:
    """Each protection against two networks (refined, universal) x target (``TARGETS``): the
    worst retrieval removed on a ``bits``-bit engine whose network it never used (or, for
    ``known``, one it used), after each post of the target, the PSNR, and whether it is met."""
    out = []
    for p in dict.fromkeys(r["perturbation"] for r in result["rows"]):
        rs = [r for r in result["rows"] if r["perturbation"] == p and zoo.card(r["victim"])["bits"] == bits
              and r["setting"] == "query"]
        if not rs or len(toap.surrogate_networks(rs[0]["surrogates"])) != 2:
            continue
        kind = "refine" if p.startswith("refine[") else "universal"
        for target in ((kind, "refine-resize", "known") if kind == "refine" else (kind,)):
            posts, goal = TARGETS[target]
            held = target != "known"
            got = [r["rel_drop"] for r in rs if r["post"] in posts and r["held_out"] == held]
            if got:
                out.append({"protection": p, "target": target, "posts": list(posts), "worst": round(min(got), 4),
                            "goal": goal, "met": min(got) >= goal, "psnr": round(rs[0]["psnr"], 1)})
    return out


def held_out_sentence(result: dict, post: str = "jpeg:75", bits: int = 64) -> str:
    """What a network the protection never used keeps, in one sentence (the demo's intro): the
    refinement against dlib alone, and the best pair's worst held-out engine, after ``post``."""
    rows = [r for r in result["rows"] if r["post"] == post and r["held_out"] and zoo.card(r["victim"])["bits"] == bits
            and r["setting"] == "query"]
    if not rows:
        return ""
    alone = [r["rel_drop"] for r in rows if r["perturbation"] == name(("dlib",))]
    pairs = {r["perturbation"]: min(x["rel_drop"] for x in rows if x["perturbation"] == r["perturbation"])
             for r in rows if r["perturbation"].startswith("refine[") and "+" in r["perturbation"]}
    words = [f"on engines built on networks it never used, a photo refined against dlib's network alone loses "
             f"{min(alone):.0%}-{max(alone):.0%} of its retrieval after {post}"] if alone else []
    if pairs:
        best = max(pairs, key=pairs.get)
        nets = best[len("refine["):-1].replace("+", ",")
        words.append(f"refined against two networks (`--against {nets}`), at least {pairs[best]:.0%} on the third")
    return ("Measured (`python -m toap_kit.networks`, " + str(result["queries"]) + " faces): " + "; ".join(words) + "."
            if words else "")


def _protection(row: dict) -> str:
    """A per-photo row's protection: the universal delta's name or the refinement's row name."""
    return name(row["against"]) if row["way"] == "refined" else row["perturbation"]


def photo_table(result: dict) -> str:
    """The per-photo table on every engine (markdown): per protection x engine, how many of the
    example photos leave the engine's top 10 after the profile (their person's photos in it fall
    below ``report.GONE_BELOW``, tie-aware) and the mean count before -> after."""
    from .report import GONE_BELOW

    rows = result["per_photo"]
    engines = [e for e in ENGINES if any(r["engine"] == e for r in rows)]
    n = len({r["photo"] for r in rows})
    out = [f"| protection (after {rows[0]['profile']}; {n} photos) | " + " | ".join(engines) + " |",
           "|---|" + "---|" * len(engines)]
    for p in dict.fromkeys(map(_protection, rows)):
        cells = []
        for e in engines:
            rs = [r for r in rows if _protection(r) == p and r["engine"] == e]
            gone = sum(r["hits_after"] < GONE_BELOW for r in rs)
            mark = "held out" if rs[0]["tier"] == "engine-blackbox" else "known"
            cells.append(f"{gone}/{len(rs)} out ({np.mean([r['hits_before'] for r in rs]):.1f} -> "
                         f"{np.mean([r['hits_after'] for r in rs]):.1f}; {mark})")
        out.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def limits_table(result: dict) -> str:
    """The honest limits (markdown): each refinement on its held-out engines when they purify
    every image first, against the same engine without the defence (after no post)."""
    plain = {(r["perturbation"], r["victim"]): r["rel_drop"] for r in result["rows"]
             if r["setting"] == "query" and r["post"] == "none"}
    specs = list(dict.fromkeys(r["engine"] for r in result["limits"]))
    out = ["| protection | held-out engine | no defence | " + " | ".join(specs) + " |",
           "|---|---|---|" + "---|" * len(specs)]
    for p, vn in dict.fromkeys((r["perturbation"], r["victim"]) for r in result["limits"]):
        got = {r["engine"]: r["rel_drop"] for r in result["limits"] if r["perturbation"] == p and r["victim"] == vn}
        out.append(f"| {p} | {vn} | {plain[p, vn]:.0%} | " + " | ".join(f"{got[x]:.0%}" for x in specs) + " |")
    return "\n".join(out)


README_BEGIN = "<!-- networks: begin (generated from results/networks.json by toap_kit.networks.update_readme) -->"
README_END = "<!-- networks: end -->"


def readme_block(result: dict) -> str:
    """The README's leave-one-network-out block: the matrices and the targets (markdown)."""
    bits = max({zoo.card(r["victim"])["bits"] for r in result["rows"]} & {32, 64})
    lines = [README_BEGIN, "",
             f"{result['queries']} queries of people no model saw, against a database of {result['database']} "
             f"faces; query setting; each cell the retrieval removed (relative drop of tie-aware mAP@all) on the "
             f"{bits}-bit engine of each network; *held out*: the protection never used that network. Refinements: "
             f"mid strength (eps 8/255, PSNR >= 35.5 dB), {result['refine_steps']} steps from zero.", ""]
    for post in ("jpeg:75", "facebook", "resize:0.5"):
        if any(r["post"] == post for r in result["rows"]):
            lines += [matrix(result, post, bits), ""]
    if any(r["setting"] == "database" and r["post"] == "jpeg:75" for r in result["rows"]):
        lines += ["Database setting (every photo of the evaluation people protected before it is crawled, the query "
                  "clean; the universal deltas only: refining the 775 database faces against a pair would take hours "
                  "on 2 cores):", "", matrix(result, "jpeg:75", bits, "database"), ""]
    if result.get("per_photo"):
        lines += ["The demo's example photos, whole photo protected as the demo does (`protect.protect_image`), "
                  "after Facebook's profile: how many leave each engine's top 10:", "", photo_table(result), ""]
    if result.get("limits"):
        lines += ["Honest limits: the held-out engines when they purify every image (database and query) before "
                  "hashing, query setting, no post:", "", limits_table(result), ""]
    lines += ["| protection | target | worst engine, after | removed | goal | met |", "|---|---|---|---|---|---|"]
    for t in targets(result, bits):
        where = "held-out network" if t["target"] != "known" else "known network"
        lines.append(f"| {t['protection']} (PSNR {t['psnr']}) | {t['target']} | {where}, {' / '.join(t['posts'])} | "
                     f"{t['worst']:.1%} | >= {t['goal']:.0%} | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines + ["", README_END])


def update_readme(result: dict, path: Path = results.RESULTS_DIR.parent / "README.md") -> bool:
    """Replace the README's block (``README_BEGIN`` ... ``README_END``) with ``readme_block``
    (atomically); False when the README has no such block."""
    return results.replace_block(path, README_BEGIN, README_END, readme_block(result))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m toap_kit.networks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fast", action="store_true", help="a smoke run at a tiny size (not written to results/)")
    p.add_argument("--parts", type=lambda v: tuple(v.split(",")), default=PARTS,
                   help=f"comma-separated parts to (re)measure, the others kept from {RESULT.name} (default: all of {','.join(PARTS)})")
    args = p.parse_args(argv)
    if set(args.parts) - set(PARTS):
        p.error(f"--parts: choose from {','.join(PARTS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    r = run(fast=args.fast or None, parts=args.parts)
    if not r["fast"]:
        if set(args.parts) != set(PARTS):  # a partial run: the other parts stay as last measured
            old = json.loads(RESULT.read_text())
            r = {**old, **r, "seconds": {**old["seconds"], **r["seconds"]}}
        results._atomic(RESULT, json.dumps(r, indent=1) + "\n")
        update_readme(r)
    print(f"{r['queries']} queries of people no model saw, database {r['database']} faces; relative mAP@all drop")
    for post in sorted({x["post"] for x in r.get("rows", [])}, key=POSTS.index):
        print(matrix(r, post))
        print()
    if r.get("per_photo"):
        print(photo_table(r))
    if r.get("limits"):
        print(limits_table(r))
    return 0

if __name__ == "__main__":
    sys.exit(main())
