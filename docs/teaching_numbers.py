"""The numbers the instructor's guide (``docs/teaching.md``) states, and its generated blocks.

    python docs/teaching_numbers.py            # print every number the guide uses, with its source
    python docs/teaching_numbers.py --update   # rewrite the guide's generated blocks from them
    python docs/teaching_numbers.py --check    # list what in the guide is not theirs (exit 1 if any)

Sources, nothing measured here:

- ``results/toap.json`` (``make results``), read through ``toap_kit.report``: the levels per
  threat tier the README's opening states (``report.claims``), and the demo's per-photo table
  (its ``per_photo`` rows, the table ``report`` writes into the README, and
  ``report.per_photo_sentence``), from which the live demo script is written: which photo,
  engine, strength and upload to show, what the audience will see, and the honest sentence for
  each case where the protection fails;
- ``book/times.json`` (``make book``, ``docs/build_book.py``): each chapter's and each code
  cell's measured seconds, for the lecture's live cells (found by chapter and cell id) and for
  what grading a student's submission costs;
- the notebooks' nbgrader metadata: the checked exercises (grade ids, points) for the lab, and
  their check cells: ``WRONG_ANSWERS`` are common wrong answers, each with the words of the
  message its check gives (``tests/test_teaching.py`` runs each wrong answer through the check
  cell and finds those words in the failure).

The guide holds one block per source between ``<!-- teaching_numbers: NAME begin ... -->``
and ``<!-- teaching_numbers: NAME end -->`` (``BLOCKS``); ``tests/test_teaching.py`` checks each
block against ``render`` (the lecture's only when ``book/times.json`` exists), that the demo
script states no number outside its block, and that the guide states no percentage or dB
outside the blocks: a number changed by hand fails.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toap_kit import report, toap  # noqa: E402
from toap_kit.engine import DEFAULT_ENGINE  # noqa: E402
from toap_kit.results import RESULTS_DIR  # noqa: E402

GUIDE = ROOT / "docs" / "teaching.md"
TIMES = ROOT / "book" / "times.json"
NOTEBOOKS = ROOT / "notebooks"
BLOCKS = ("levels", "lecture", "lab", "wrong", "grading", "demo")
DEMO_HEADING = "## 3. A 10-minute live demo"
DEMO_STRENGTH, DEMO_UPLOAD = "mid", "facebook"

LECTURE = (
    # (minutes into the lecture, chapter prefix, cell id, what it shows)
    (2, "00", "aba2698a", "the five threat tiers in plain words (`toap.TIER_LABELS`, `TIER_WORDS`)"),
    (6, "01", "1438bd6b", "sign codes and Hamming distance on a hand-made example"),
    (10, "01", "11b20d32", "why ties must not be broken by storage order: one mAP, three values"),
    (14, "02", "cadf378a", "PGD as the loop its equation describes, on eight faces"),
    (17, "02", "05a8b2da", "the perturbation, amplified"),
    (20, "03", "38a50f0b", "the shipped universal perturbation (one pattern for every face)"),
    (23, "04", "7ec356e1", "JPEG quantisation against the perturbation's own DCT coefficients"),
    (26, "05", "nb05-slider", "the Compression Generator against the real codec, quality by quality (the slider)"),
    (30, "06", "nb06-algo", "Algorithm 1, line by line (markdown: nothing to run)"),
    (37, "06", "nb06-check", "`toap_from_scratch` gives `TOAP.fit`'s delta (a tiny run, every part on)"),
    (41, "07", "682f6308", "the demo's per-photo table, read from `results/toap.json`"),
    (45, "08", "nb08-03", "one real photo protected at mid strength"),
    (47, "08", "nb08-09", "its simulated Facebook upload verified engine by engine, with each tier"),
)
"""The lecture's live cells, in order. Each chapter is run up to just before its last live cell
ahead of the lecture (that time is in the block, from ``book/times.json``); a markdown cell is
shown, not run."""
LECTURE_MIN = 50

LAB = (("01", 2), ("02", 2), ("04", 1), ("06", 2), ("08", 1))
"""The lab: the first N checked exercises of each chapter, in this order (retrieval, attack,
post-processing, TOAP, protection); the rest are homework."""
LAB_MIN = 120
LAB_PLAN = (("start: everyone opens `student/` and runs one check cell (its \"not solved yet\")", 10),
            ("with the chapter's page (`book/`) open beside it", 10),
            ("after each chapter's exercises: one right answer, and the check's words for a common wrong one "
             "(the next table)", 4),
            ("the homework list, and how it is graded", 10))
"""Minutes of the lab: the start, each exercise, each chapter's review, the close (``lab_block``
adds them up and refuses a plan over ``LAB_MIN``)."""
CLASS_SIZE = 30
"""The class the grading cost is given for."""

WRONG_ANSWERS = (
    # (grade id, the wrong answer in words, its code, words of the check's message)
    ("nb01-ex6-hamming-packed", "counts the bytes that differ, not the bits",
     "import numpy as np\ndef hamming_packed(q, db):\n    return (q[:, None, :] != db[None, :, :]).sum(axis=2)",
     "Hint: XOR the bytes, then count the ones of every byte and add them over the code"),
    ("nb01-ex7-precision-at-k", "sorts by distance and takes the first k (ties broken by position)",
     "import numpy as np\ndef expected_precision_at_k(dist_row, relevant, k):\n"
     "    return float(relevant[np.argsort(dist_row, kind='stable')][:k].mean())",
     "each tied relevant item is in with probability (k - s) / n"),
    ("nb02-ex6-fgsm", "returns `-eps * sign(grad)` without keeping `x + delta` in [0, 1]",
     "import torch\ndef fgsm(model, x, eps, beta=1.0):\n    b = model.encode(x)\n"
     "    x0 = x.detach().clone().requires_grad_(True)\n    (g,) = torch.autograd.grad((torch.tanh(beta * model(x0)) * b).mean(), x0)\n"
     "    return (-eps * g.sign()).detach()",
     "x + delta leaves [0, 1]. Hint: clip x - eps * sign(grad) to [0, 1], then subtract x"),
    ("nb02-ex7-pgd-step", "steps up the gradient (`delta + alpha * sign(grad)`)",
     "def pgd_step(x, delta, grad, eps, alpha):\n    step = (delta + alpha * grad.sign()).clamp(-eps, eps)\n"
     "    return (x + step).clamp(0, 1) - x",
     "(delta - alpha * sign(grad), down the gradient), then project"),
    ("nb04-ex6-ycbcr-420", "subsamples chroma by taking every other pixel",
     "import torch\ndef ycbcr_420(img):\n    r, g, b = (img * 255).unbind(1)\n    y = 0.299 * r + 0.587 * g + 0.114 * b\n"
     "    c = torch.stack([0.564 * (b - y) + 128, 0.713 * (r - y) + 128], 1)\n    return y, c[..., ::2, ::2]",
     "Hint: the mean of each 2 x 2 block (not every other pixel)"),
    ("nb04-ex6-ycbcr-420", "centres chroma on kornia's 127.5 instead of libjpeg's 128",
     "import torch, torch.nn.functional as F\ndef ycbcr_420(img):\n    r, g, b = (img * 255).unbind(1)\n"
     "    y = 0.299 * r + 0.587 * g + 0.114 * b\n"
     "    c = torch.stack([0.564 * (b - y) + 127.5, 0.713 * (r - y) + 127.5], 1)\n    return y, F.avg_pool2d(c, 2)",
     "chroma is 0.5 below libjpeg's: its offset is 128 levels, not kornia's 127.5"),
    ("nb06-ex6-meta-gradient", "returns the meta-train gradient alone",
     "import torch\ndef meta_gradient(delta, train_loss, test_loss, inner_alpha, eps):\n"
     "    d = delta.detach().requires_grad_(True)\n    (g,) = torch.autograd.grad(train_loss(d), d)\n    return g",
     "returns the meta-train gradient alone: add the held-out gradient at delta'"),
    ("nb06-ex6-meta-gradient", "forgets to clip the inner step to the eps-ball",
     "import torch\ndef meta_gradient(delta, train_loss, test_loss, inner_alpha, eps):\n"
     "    d = delta.detach().requires_grad_(True)\n    (g,) = torch.autograd.grad(train_loss(d), d)\n"
     "    inner = (d.detach() - inner_alpha * g.sign()).requires_grad_(True)\n"
     "    (g_te,) = torch.autograd.grad(test_loss(inner), inner)\n    return g + g_te",
     "forgets to clip delta' to [-eps, eps]"),
    ("nb06-ex7-project", "scales to the floor's RMS first and clips second",
     "def project(delta, eps, psnr_floor):\n    rms, rms_max = float(delta.pow(2).mean().sqrt()), 10 ** (-psnr_floor / 20)\n"
     "    d = delta * (rms_max / rms) if rms > rms_max else delta.clone()\n    return d.clamp(-eps, eps)",
     "then take the RMS of the clipped delta, and scale only when it is above 10^(-floor/20)"),
    ("nb06-ex7-project", "clips in place (`delta.clamp_`)",
     "def project(delta, eps, psnr_floor):\n    d = delta.clamp_(-eps, eps)\n"
     "    rms, rms_max = float(d.pow(2).mean().sqrt()), 10 ** (-psnr_floor / 20)\n"
     "    return d * (rms_max / rms) if rms > rms_max else d",
     "`project` changed its argument; work on a copy (`delta.clamp(...)` makes one)"),
    ("nb06-ex8-draw-kind", "picks the CG even when there is none",
     "def draw_kind(r, C, has_cg=True):\n    if not C.diversity or r < C.p_none:\n        return 'none'\n"
     "    if r < C.p_none + C.p_real:\n        return 'real'\n    return 'cg' if r < C.p_none + C.p_real + C.p_cg else 'diff'",
     "the CG only when there is one; nothing at all when diversity is off"),
    ("nb06-ex8-draw-kind", "tests `r <= p_none`",
     "def draw_kind(r, C, has_cg=True):\n    if not C.diversity or r <= C.p_none:\n        return 'none'\n"
     "    if r < C.p_none + C.p_real:\n        return 'real'\n"
     "    return 'cg' if r < C.p_none + C.p_real + C.p_cg and has_cg else 'diff'",
     "r equal to p_none is already past 'none': the test is r < p_none"),
    ("nb08-ex6-feathered-patch", "leaves the colour axis first (3 x side x side)",
     "import numpy as np\nfrom toap_kit import protect\ndef feathered_patch(pert, side):\n"
     "    return (pert.resized(side, side).numpy() * protect.feather_mask(side)[None]).astype(np.float32)",
     "Hint: `.permute(1, 2, 0)` puts colour last"),
    ("nb08-ex6-feathered-patch", "forgets the feathered mask",
     "import numpy as np\ndef feathered_patch(pert, side):\n"
     "    return pert.resized(side, side).permute(1, 2, 0).numpy().astype(np.float32)",
     "Hint: resize the whole delta to side x side, then multiply every colour"),
)
"""Common wrong answers of the lab's exercises: what the student did, a function that does just
that, and words of the message the exercise's check cell then gives (a test runs each)."""

LEVEL_KEYS = (
    ("query | engine-known-backbone | refine-mid | jpeg:75", "engine-known-backbone", "each face refined (`toap protect --refine`)"),
    ("query | engine-known-backbone | toap-mid | jpeg:75", "engine-known-backbone", "the universal `toap-mid`"),
    ("query | engine-known-backbone | toap-mid | resize:0.5", "engine-known-backbone", "`toap-mid` after a down-up resize by 0.5"),
    ("query | engine-blackbox | toap-mid-cnn | jpeg:75", "engine-blackbox", "`toap-mid-cnn` (TOAP made on small CNNs)"),
    ("query | engine-blackbox | uap-mid-cnn | jpeg:75", "engine-blackbox", "a plain universal perturbation, same CNNs"),
    ("query | cnn-blackbox | toap-mid-cnn | jpeg:75", "cnn-blackbox", "`toap-mid-cnn` (the paper's setting)"),
    ("query | cnn-blackbox | toap-mid-cnn | resize:0.5", "cnn-blackbox", "`toap-mid-cnn` after a down-up resize by 0.5"),
    ("query | whitebox | toap-mid-cnn | jpeg:75", "whitebox", "`toap-mid-cnn` on its own surrogates (not a protection)"),
    ("limits: toap-mid against a fine-tuned hash layer, jpeg:75", "engine-known-backbone",
     "`toap-mid` once the engine owner fine-tunes the hash layer on protected faces"),
)
"""The levels the guide quotes, by ``report.claims`` key: the README opening's."""


# ---------------------------------------------------------------- sources
def load_result(path: Path = RESULTS_DIR / "toap.json") -> dict:
    return json.loads(Path(path).read_text())


def load_times(path: Path = TIMES) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _chapter(prefix: str, notebooks: Path = NOTEBOOKS) -> Path:
    found = sorted(notebooks.glob(f"{prefix}*.ipynb"))
    if len(found) != 1:
        raise ValueError(f"no single notebook starts with {prefix!r} in {notebooks}")
    return found[0]


def exercises(notebooks: Path = NOTEBOOKS) -> list[dict]:
    """The checked exercises, in reading order: chapter, grade id, its check's grade id and
    points, and the task's title (the bold opening of the markdown cell before the solution)."""
    out = []
    for path in sorted(notebooks.glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        for i, cell in enumerate(cells):
            meta = cell.get("metadata", {}).get("nbgrader", {})
            if not meta.get("solution") or meta.get("grade"):
                continue
            check = cells[i + 1]["metadata"].get("nbgrader", {}) if i + 1 < len(cells) else {}
            task = next((c for c in reversed(cells[:i]) if c["cell_type"] == "markdown"), None)
            text = "".join(task["source"]) if task else ""
            m = re.match(r"\*\*(.+?)\*\*", text.strip())
            title = re.sub(r"^Exercise \d+ \(checked\):\s*", "", m.group(1)).rstrip(".") if m else meta["grade_id"]
            out.append({"chapter": path.stem, "grade_id": meta["grade_id"], "check": check.get("grade_id"),
                        "points": check.get("points", 0), "title": title})
    return out


# ---------------------------------------------------------------- the blocks
def markers(name: str) -> tuple[str, str]:
    if name not in BLOCKS:
        raise ValueError(f"unknown block {name!r}; choose from {BLOCKS}")
    return (f"<!-- teaching_numbers: {name} begin (generated by python docs/teaching_numbers.py --update) -->",
            f"<!-- teaching_numbers: {name} end -->")


def _wrap(name: str, body: str) -> str:
    begin, end = markers(name)
    return f"{begin}\n\n{body.strip()}\n\n{end}"


def levels_block(result: dict) -> str:
    claims = report.claims(result)
    lines = ["| threat tier | what | share of mAP@all removed |", "|---|---|---|"]
    for key, tier, what in LEVEL_KEYS:
        lines.append(f"| {toap.TIER_LABELS[tier]} | {what} | {claims[key]} |")
    kept = claims["engine-blackbox: retrieval quality kept (toap-mid-cnn, jpeg:75)"]
    lines += ["", f"Query setting, eps 8/255, after JPEG q75 unless named (`results/toap.json`, as in the README's "
              f"opening). An engine on a network the protector never ran keeps {kept} of its retrieval quality."]
    return _wrap("levels", "\n".join(lines))


def _fmt_s(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else (f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min")


def lecture_block(times: dict | None, notebooks: Path = NOTEBOOKS) -> str:
    lines = ["| minute | chapter | cell (id) | shows | cell time | chapter up to it |", "|---|---|---|---|---|---|"]
    minutes = [m for m, *_ in LECTURE]
    if minutes != sorted(minutes) or minutes[-1] >= LECTURE_MIN:
        raise ValueError(f"LECTURE's minutes must rise and end before minute {LECTURE_MIN}: {minutes}")
    prep: dict[str, float] = {}
    for minute, prefix, cid, what in LECTURE:
        path = _chapter(prefix, notebooks)
        cells = json.loads(path.read_text())["cells"]
        ids = [c.get("id") for c in cells]
        if cid not in ids:
            raise ValueError(f"the lecture's cell {cid!r} is no longer in {path.name}: update LECTURE")
        index = ids.index(cid)
        ch = (times or {}).get("chapters", {}).get(path.stem)
        cell = next((c for c in (ch or {}).get("cells", []) if c.get("id") == cid), None)
        markdown = cells[index]["cell_type"] == "markdown"
        if ch and (cell or markdown):
            before = sum(c["seconds"] for c in ch["cells"] if c["index"] < index)
            took, upto = ("markdown, not run" if markdown else _fmt_s(cell["seconds"])), _fmt_s(before)
            prep[path.stem] = max(prep.get(path.stem, 0.0), before)
        else:
            took = upto = "not measured"
        lines.append(f"| {minute} | {path.stem[:2]} | {index} (`{cid}`) | {what} | {took} | {upto} |")
    if times and times.get("chapters"):
        mode = {ch["mode"] for ch in times["chapters"].values()}
        cores = times.get("machine", {}).get("cores", "?")
        lines += ["", f"Times: `book/times.json` ({'/'.join(sorted(mode))} size, {cores} CPU cores, "
                  f"{times.get('date', '?')[:10]}). *Chapter up to it*: the chapter's cells above the live one, to run "
                  f"before the lecture: {_fmt_s(sum(prep.values()))} in all, each chapter up to its last live cell "
                  f"(the longest: {max(prep, key=prep.get)[:2]}, {_fmt_s(max(prep.values()))})."]
    else:
        lines += ["", "Times: not measured yet (`book/times.json` is written by `make book`; then run "
                  "`python docs/teaching_numbers.py --update`)."]
    return _wrap("lecture", "\n".join(lines))


def lab_split(exs: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(lab, homework)``: the first N checked exercises of each of ``LAB``'s chapters, in its
    order, and the rest in reading order."""
    want = dict(LAB)
    taken = {c: 0 for c in want}
    lab, rest = [], []
    for ex in exs:
        prefix = ex["chapter"][:2]
        if prefix in taken and taken[prefix] < want[prefix]:
            taken[prefix] += 1
            lab.append(ex)
        else:
            rest.append(ex)
    order = [c for c, _ in LAB]
    lab.sort(key=lambda e: order.index(e["chapter"][:2]))
    return lab, rest


def lab_block(exs: list[dict]) -> str:
    lines = ["| order | chapter | exercise (grade id) | task | part |", "|---|---|---|---|---|"]
    lab, rest = lab_split(exs)
    for n, ex in enumerate(lab + rest, 1):
        part = "lab" if n <= len(lab) else "homework"
        lines.append(f"| {n} | {ex['chapter'][:2]} | `{ex['grade_id']}` | {ex['title']} | {part} |")
    by_chapter = {}
    for ex in exs:
        by_chapter[ex["chapter"][:2]] = by_chapter.get(ex["chapter"][:2], 0) + 1
    short = [c for c, n in LAB if by_chapter.get(c, 0) < n]
    chapters = len({e["chapter"] for e in lab})
    (start, s_min), (each, e_min), (review, r_min), (close, c_min) = LAB_PLAN
    plan = [(start, s_min), (f"{len(lab)} exercises, about {e_min} min each, {each}", len(lab) * e_min),
            (f"{chapters} class reviews, about {r_min} min each, {review}", chapters * r_min), (close, c_min)]
    total = sum(m for _, m in plan)
    if total > LAB_MIN:
        raise ValueError(f"the lab's plan takes {total} min, over its {LAB_MIN}: take fewer exercises (LAB)")
    lines += ["", f"{len(exs)} checked exercises in {len(by_chapter)} chapters (one point each); the lab takes "
              f"{len(lab)} of them." + (f" Chapters {', '.join(short)} have fewer than LAB asks so far." if short else ""),
              "", "| the lab's time | minutes |", "|---|---|"]
    lines += [f"| {what} | {m} |" for what, m in plan] + [f"| **total** (the lab's {LAB_MIN}) | {total} |"]
    return _wrap("lab", "\n".join(lines))


def _check_cells(notebooks: Path = NOTEBOOKS) -> dict[str, str]:
    """Each exercise's check cell source, by the exercise's grade id."""
    out = {}
    for path in sorted(notebooks.glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        for i, cell in enumerate(cells):
            meta = cell.get("metadata", {}).get("nbgrader", {})
            if meta.get("solution") and not meta.get("grade") and i + 1 < len(cells):
                out[meta["grade_id"]] = "".join(cells[i + 1]["source"])
    return out


def wrong_block(notebooks: Path = NOTEBOOKS) -> str:
    """The common wrong answers (``WRONG_ANSWERS``), each with the words its check gives; a
    quoted message not in its check cell is refused (the test also runs each answer)."""
    checks = _check_cells(notebooks)
    lines = ["| exercise | the wrong answer | the check says (its words) |", "|---|---|---|"]
    for gid, what, _code, said in WRONG_ANSWERS:
        if said not in checks.get(gid, ""):
            raise ValueError(f"{gid}'s check cell no longer says {said!r}: update WRONG_ANSWERS")
        if "|" in said:
            raise ValueError(f"{said!r}: a | would split the table's row")
        lines.append(f"| `{gid}` | {what} | \"...{said}\" |")
    stub = "is not solved yet: replace `raise NotImplementedError()`"
    lines += ["", f"Any exercise left as handed out: \"exercise `NAME` {stub} ...\"; an answer that raises: "
              "\"`NAME(ARGUMENTS)` raised ERROR: ...\", naming the call (`toap_kit.exercises.solved`)."]
    return _wrap("wrong", "\n".join(lines))


def grading_block(times: dict | None, exs: list[dict]) -> str:
    """What grading one student's submission costs: every chapter with a checked exercise runs
    whole (``book/times.json``'s full-size times), and for a class of ``CLASS_SIZE``."""
    per = {}
    for ex in exs:
        per[ex["chapter"]] = per.get(ex["chapter"], 0) + 1
    chapters = (times or {}).get("chapters", {})
    lines = ["| chapter | checked exercises | full size, the whole chapter |", "|---|---|---|"]
    measured, missing = 0.0, []
    for stem, n in per.items():
        ch = chapters.get(stem)
        if ch and ch.get("mode") == "full":
            measured += ch["seconds"]
            lines.append(f"| {stem[:2]} | {n} | {_fmt_s(ch['seconds'])} |")
        else:
            missing.append(stem[:2])
            lines.append(f"| {stem[:2]} | {n} | not measured |")
    cores = (times or {}).get("machine", {}).get("cores", "?")
    when = (times or {}).get("date", "?")[:10]
    lines += [f"| **one student** | {sum(per.values())} | {_fmt_s(measured)} |", "",
              f"Full-size times: `book/times.json` ({cores} CPU cores, {when})"
              + (f"; {'chapters' if len(missing) > 1 else 'chapter'} {', '.join(missing)} "
                 f"{'are' if len(missing) > 1 else 'is'} not in it yet" if missing else "")
              + f". A class of {CLASS_SIZE} at full size: {measured * CLASS_SIZE / 3600:.1f} h of one such machine."]
    return _wrap("grading", "\n".join(lines))


def _rows(result: dict, **match) -> list[dict]:
    return [r for r in result.get("per_photo", []) if all(r[k] == v for k, v in match.items())]


def _name(photo: str) -> str:
    return photo.replace("_", " ")


def _pair(r: dict) -> str:
    return f"{r['hits_before']:.1f} -> {r['hits_after']:.1f}"


def demo_plan(result: dict, engine: str = DEFAULT_ENGINE, strength: str = DEMO_STRENGTH) -> dict:
    """Which photos the demo shows, chosen from the per-photo rows by rule (so a new ``make
    results`` gives a script that still holds): the *success* photo is the one the engine finds
    most before protection among those the refinement takes out of its top 10 at ``strength``;
    the *failure* photo is the one the universal pattern at ``strength`` leaves most in the top 10."""
    uni = {r["photo"]: r for r in _rows(result, engine=engine, strength=strength, way="universal")}
    ref = {r["photo"]: r for r in _rows(result, engine=engine, strength=strength, way="refined")}
    if not uni or not ref:
        raise ValueError(f"results/toap.json has no per-photo rows for {engine} at {strength}: run make results")
    pool = [p for p in ref if ref[p]["hits_after"] < report.GONE_BELOW] or list(ref)
    success = max(pool, key=lambda p: (ref[p]["hits_before"], -uni[p]["hits_after"], p))
    failure = max(uni, key=lambda p: (uni[p]["hits_after"], p))
    fails = [r for r in result["per_photo"] if r["hits_after"] >= report.GONE_BELOW]
    return {"engine": engine, "strength": strength, "profile": ref[success]["profile"], "success": success,
            "failure": failure, "uni": uni, "ref": ref, "fails": fails,
            "photos": sorted({r["photo"] for r in result["per_photo"]}),
            "refine_s": [r["seconds"] for r in ref.values()]}


def demo_block(result: dict) -> str:
    p = demo_plan(result)
    eng, st, prof, ok, bad = p["engine"], p["strength"], p["profile"], p["success"], p["failure"]
    uni, ref = p["uni"], p["ref"]
    claims = report.claims(result)
    n_ref = sum(r["hits_after"] < report.GONE_BELOW for r in ref.values())
    n_uni = sum(r["hits_after"] < report.GONE_BELOW for r in uni.values())
    n = len(ref)
    lo, hi = min(p["refine_s"]), max(p["refine_s"])
    kb, eb = toap.TIER_LABELS["engine-known-backbone"], toap.TIER_LABELS["engine-blackbox"]
    kept = claims["engine-blackbox: retrieval quality kept (toap-mid-cnn, jpeg:75)"]
    fails_mid = [r for r in p["fails"] if r["strength"] == st]
    fails_other = [r for r in p["fails"] if r["strength"] != st]
    steps = [
        "**Before the audience arrives.** `make demo`, open http://127.0.0.1:7860, and run one protection "
        "(any photo) so that dlib's network is loaded: the first refinement also loads it. Keep "
        "`results/toap.md`'s per-photo table open in a second tab.",
        "",
        f"**Step 1 (2 min): a face the protection hides.** Click the thumbnail of **{_name(ok)}**. Strength "
        f"**{st}**, *refine for this photo* **on**, engine **{eng}** (the dropdown names its tier: *{kb}*), "
        f"simulate upload **{prof}**, then *Protect and search*. The refinement takes a few seconds "
        f"({lo:.1f}-{hi:.1f} s a photo in `make results`). The audience sees the original's top 10 with photos "
        f"of {_name(ok)} marked, and the protected upload's without them: {_pair(ref[ok])} in the per-photo "
        "table (the person's photos in the top 10, tie-aware expectation); the verdict line says NOT FOUND.",
        "",
        f"**Step 2 (2 min): the same face, one pattern for everyone.** Untick *refine for this photo* (the "
        f"universal `toap-{st}`) and run again: {_pair(uni[ok])} on {eng}. "
        + ("The universal pattern takes this face out too." if uni[ok]["hits_after"] < report.GONE_BELOW else
           "The person is still in the top 10: the universal pattern weakened the search, it did not hide the face."),
        "",
        f"**Step 3 (2 min): where the protection fails.** Click **{_name(bad)}**, universal, same settings: "
        f"{_pair(uni[bad])} on {eng}. Say the honest sentence: *\"For {_name(bad)} the universal pattern at "
        f"{st} strength {'barely changed' if uni[bad]['hits_after'] >= 0.8 * uni[bad]['hits_before'] else 'did not end'} "
        f"the search: {eng} still returns {uni[bad]['hits_after']:.1f} of the person's photos in its top 10, "
        f"against {uni[bad]['hits_before']:.1f} before. One pattern for every face does not fit every face.\"* "
        f"Tick *refine* again: {_pair(ref[bad])}.",
        "",
        f"**Step 4 (2 min): what the protector knew.** Open the engine dropdown and read the tiers aloud: both "
        f"dlib engines are *{kb}* (dlib's network is public, and the demo's strengths and the refinement were made "
        f"on it); the small CNNs are *{toap.TIER_LABELS['cnn-teacher-known']}* (distilled from dlib, so they prove "
        f"no transfer). No choice on the page is *{eb}*: that case is told, not shown. Say: *\"Against an engine "
        f"on a network I never ran, TOAP made on small CNNs leaves the search {kept} of its quality.\"* One photo "
        "on the screen is one draw; the README's opening gives the measured means.",
        "",
        f"**Step 5 (2 min): the whole table, honestly.** {report.per_photo_sentence(result, eng, st)} Over both "
        f"dlib engines at {st} strength, {claims['per photo, mid: refined pairs out of the top 10']} of {2 * n} "
        f"photo x engine pairs leave the top 10 refined and {claims['per photo, mid: universal pairs out of the top 10']} "
        f"of {2 * n} with the universal pattern. Close with the README's sentence: the protection weakens a "
        "search; it does not hide a face.",
        "",
        "**Cases where the protection fails** (the per-photo table's rows still found after the "
        f"{prof} profile; the honest sentence for each is *\"still found: the protection weakened this search, it "
        "did not hide this face\"*):",
        "",
        "| photo | strength | way | engine | in the top 10, original -> protected |",
        "|---|---|---|---|---|",
    ]
    for r in fails_mid:
        steps.append(f"| {_name(r['photo'])} | {r['strength']} | {r['way']} | {r['engine']} | {_pair(r)} |")
    other = {s: [r for r in fails_other if r["strength"] == s] for s in dict.fromkeys(r["strength"] for r in fails_other)}
    steps += ["", "At the other strengths: " + "; ".join(
        f"{s}, {len(rs)} row{'s' * (len(rs) != 1)} still found ({sum(r['way'] == 'refined' for r in rs)} of them refined)"
        for s, rs in other.items()) + " (`results/toap.md`, per photo)." if other else "At the other strengths none is found.",
        "", f"At {st} strength {n_uni} of {n} photos leave {eng}'s top 10 with the universal pattern and "
              f"{n_ref} of {n} refined. The page lists its top 10 by distance, ties by database index, so it can show a "
              "whole count where the table gives the tie-aware expectation (a count between the two whole numbers "
              "around it)."]
    return _wrap("demo", "\n".join(steps))


def render(result: dict | None = None, times: dict | None = None, notebooks: Path = NOTEBOOKS) -> dict[str, str]:
    """Every block of the guide (``BLOCKS``), rendered from the sources."""
    result = load_result() if result is None else result
    exs = exercises(notebooks)
    return {"levels": levels_block(result), "lecture": lecture_block(times, notebooks), "lab": lab_block(exs),
            "wrong": wrong_block(notebooks), "grading": grading_block(times, exs), "demo": demo_block(result)}


# ---------------------------------------------------------------- checking and updating the guide
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*")
_MEASURED = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?\s?(?:%|dB\b)")


def _section(text: str, heading: str) -> str:
    lines = text.split("\n")
    if heading not in lines:
        return ""
    out = []
    for line in lines[lines.index(heading) + 1:]:
        if line.startswith("## "):
            break
        out.append(line)
    return "\n".join(out)


def check(text: str, blocks: dict[str, str], skip: tuple[str, ...] = ()) -> list[str]:
    """What in guide ``text`` is not the sources': a block missing or different from its rendering
    (except those in ``skip``), a number in the demo script outside its block, a percentage or dB
    value anywhere outside the blocks."""
    problems, rest = [], text
    for name, block in blocks.items():
        begin, end = markers(name)
        if text.count(begin) != 1 or text.count(end) != 1:
            problems.append(f"teaching.md block {name!r}: its markers are missing or repeated")
            continue
        have = begin + text.split(begin, 1)[1].split(end, 1)[0] + end
        if name not in skip and have != block:
            diff = [(i, a, b) for i, (a, b) in enumerate(zip(have.splitlines(), block.splitlines()), 1) if a != b]
            where = (f"line {diff[0][0]}: {diff[0][1]!r} should read {diff[0][2]!r}" if diff
                     else f"{len(have.splitlines())} lines, should be {len(block.splitlines())}")
            problems.append(f"teaching.md block {name!r} is not the sources' (run python docs/teaching_numbers.py "
                            f"--update): {where}")
        rest = rest.replace(have, f"{begin}{end}")
    if DEMO_HEADING not in text.split("\n"):
        problems.append(f"teaching.md has no line {DEMO_HEADING!r}")
    for m in _NUMBER.finditer(_section(rest, DEMO_HEADING).replace(markers("demo")[0], "").replace(markers("demo")[1], "")):
        problems.append(f"the demo script states {m.group(0)!r} outside its generated block: put it in "
                        "docs/teaching_numbers.py's demo_block or drop it")
    for m in _MEASURED.finditer(rest):
        problems.append(f"teaching.md states {m.group(0)!r} outside the generated blocks: generate it "
                        "(docs/teaching_numbers.py) or drop it")
    return problems


def update(path: Path = GUIDE, blocks: dict[str, str] | None = None) -> bool:
    """Rewrite the guide's generated blocks (atomically); False if it has none of them."""
    blocks = render(times=load_times()) if blocks is None else blocks
    text, found = path.read_text(), False
    for name, block in blocks.items():
        begin, end = markers(name)
        if begin in text and end in text:
            head, tail = text.split(begin, 1)
            text, found = head + block + tail.split(end, 1)[1], True
    if found:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return found


def numbers(result: dict | None = None, times: dict | None = None) -> str:
    """Every number the guide uses, as printed by the command: the blocks' contents, and the
    per-photo rows and chapter times they come from."""
    result = load_result() if result is None else result
    blocks = render(result, times)
    lines = ["# levels per threat tier (results/toap.json via toap_kit.report.claims)", blocks["levels"], "",
             "# the demo's per-photo rows (results/toap.json 'per_photo')",
             "photo | strength | way | engine | profile | hits_before -> hits_after | seconds"]
    for r in result.get("per_photo", []):
        lines.append(f"{r['photo']} | {r['strength']} | {r['way']} | {r['engine']} | {r['profile']} | "
                     f"{_pair(r)} | {r['seconds']:.1f}")
    lines += ["", "# the demo script", blocks["demo"], "", "# the lecture's live cells (book/times.json)",
              blocks["lecture"], ""]
    if times and times.get("chapters"):
        lines.append("# chapter times (book/times.json)")
        lines += [f"{stem} | {ch['mode']} | {_fmt_s(ch['seconds'])}" for stem, ch in times["chapters"].items()]
        lines.append("")
    lines += ["# the checked exercises (the notebooks' nbgrader metadata)", blocks["lab"], "",
              "# common wrong answers and their checks' words (WRONG_ANSWERS, the check cells)", blocks["wrong"], "",
              "# grading cost (book/times.json)", blocks["grading"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--update", action="store_true", help="rewrite docs/teaching.md's generated blocks")
    p.add_argument("--check", action="store_true", help="list what in docs/teaching.md is not the sources'")
    args = p.parse_args()
    times = load_times()
    if args.update:
        print("updated" if update(blocks=render(times=times)) else f"no generated block in {GUIDE}")
    elif args.check:
        problems = check(GUIDE.read_text(), render(times=times), skip=() if times else ("lecture",))
        print("\n".join(problems) or "docs/teaching.md: every block current")
        sys.exit(1 if problems else 0)
    else:
        print(numbers(times=times), end="")


if __name__ == "__main__":
    main()
