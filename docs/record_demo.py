"""A recorded run of the live demo, for a class where the demo server is slow or down.

    python docs/record_demo.py [--out outputs/demo-recording] [--no-refine]

Runs the steps of the guide's demo script (``docs/teaching.md``, section 3: the photos, engine,
strength and simulated upload that ``teaching_numbers.demo_plan`` picks from
``results/toap.json``) through the function the page's *Protect and search* button calls,
``demo.protect_and_search``, with no server and no browser. For each step it writes one PNG
(the original photo, the protected upload, the change amplified, both top-10 lists with each
result marked as the person (green) or not (red), the verdict and the times) and an
``index.html`` that shows them in order with nothing loaded from outside: open it on the
classroom's machine instead of the live page. ``--no-refine`` leaves out the steps with the
per-photo refinement (they load dlib's network and take a few seconds a photo).

What the recording shows is one run of the page, so its whole counts can differ from the
per-photo table's tie-aware expectations exactly as the live page's do (the guide says why).
Files are written atomically; the folder is made if missing.
"""
from __future__ import annotations

import argparse
import html
import logging
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "docs"))

import teaching_numbers  # noqa: E402
from toap_kit import demo  # noqa: E402
from toap_kit.engine import Engine  # noqa: E402
from toap_kit.postprocess import to_pil  # noqa: E402

log = logging.getLogger("record_demo")
THUMB, PHOTO = 96, 250
"""Pixel sides of a result thumbnail and of a photo in the sheet."""


@dataclass(frozen=True)
class Step:
    title: str
    photo: str
    refine: bool


def steps(plan: dict, refine: bool = True) -> list[Step]:
    """The demo script's steps (``teaching_numbers.demo_block``), as photos and ways."""
    ok, bad = plan["success"], plan["failure"]
    out = [Step("Step 1: a face the protection hides (refined for this photo)", ok, True),
           Step("Step 2: the same face, one pattern for everyone (universal)", ok, False),
           Step("Step 3: where the protection fails (universal)", bad, False),
           Step("Step 3, continued: the same face refined", bad, True)]
    return [s for s in out if refine or not s.refine]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one size only
        return ImageFont.load_default()


def _fit(img: Image.Image, side: int) -> Image.Image:
    img = img.convert("RGB")
    img.thumbnail((side, side))
    return img


def sheet(engine: Engine, res: demo.DemoResult, title: str) -> Image.Image:
    """One step as a picture: photos, both top-10 lists (green: the person, red: someone else)
    and the verdict."""
    k = len(res.before.indices)
    width = max(3 * (PHOTO + 20), k * (THUMB + 8)) + 40
    height = 60 + PHOTO + 50 + 2 * (THUMB + 60) + 100
    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)
    big, small = _font(20), _font(14)
    draw.text((20, 15), title, fill="black", font=big)
    y = 55
    for i, (name, img) in enumerate((("original", res.original), (f"protected, after {res.upload}", res.uploaded),
                                     ("the change, amplified", res.amplified))):
        x = 20 + i * (PHOTO + 20)
        page.paste(_fit(img, PHOTO), (x, y + 20))
        draw.text((x, y), name, fill="black", font=small)
    y += PHOTO + 40
    for label, found in (("top 10 of the original", res.before), ("top 10 of the protected upload", res.after)):
        hits = sum(bool(c) for c in (found.correct or []))
        draw.text((20, y), f"{label}: {hits} of the person's photos", fill="black", font=small)
        for r, j in enumerate(found.indices):
            x = 20 + r * (THUMB + 8)
            thumb = _fit(to_pil(engine.sets.db_images[j]), THUMB)
            mark = None if found.correct is None else ("#1a9641" if found.correct[r] else "#d7191c")
            if mark:
                draw.rectangle((x - 3, y + 17, x + THUMB + 2, y + 22 + THUMB), outline=mark, width=3)
            page.paste(thumb, (x, y + 20))
            draw.text((x, y + 25 + THUMB), f"{r + 1}. d={found.distances[r]}", fill="black", font=small)
        y += THUMB + 60
    took = ", ".join(f"{name} {s:.1f} s" for name, s in res.timings.items())
    lines = [(line, "black") for line in textwrap.wrap(res.verdict, 120)]
    lines += [(f"engine {res.engine_name} ({res.tier}); strength {res.strength}; PSNR {res.psnr:.1f} dB, "
               f"SSIM {res.ssim:.3f}", "#444"), (f"times: {took}", "#444")]
    for i, (line, colour) in enumerate(lines):
        draw.text((20, y + 22 * i), line, fill=colour, font=small)
    return page


def _write_png(img: Image.Image, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, "PNG")
    tmp.replace(path)


def record(out: Path, refine: bool = True, engine: Engine | None = None, result: dict | None = None) -> list[Path]:
    """Run the demo script's steps and write one PNG each and ``index.html`` into ``out``;
    returns the PNGs' paths."""
    plan = teaching_numbers.demo_plan(teaching_numbers.load_result() if result is None else result)
    engine = engine or Engine(models=[plan["engine"]])
    photos = {ex.identity: ex for ex in demo.examples(engine) if ex.kind == "photo"}
    out.mkdir(parents=True, exist_ok=True)
    written, items = [], []
    for n, step in enumerate(steps(plan, refine), 1):
        if step.photo not in photos:
            raise ValueError(f"{step.photo!r} is not a shipped example photo: results/toap.json and the demo disagree")
        log.info("%s: %s", step.title, step.photo)
        res = demo.protect_and_search(engine, demo.example_photo(engine, photos[step.photo]), plan["strength"],
                                      plan["engine"], plan["profile"], identity=step.photo, refine=step.refine)
        path = out / f"step-{n}.png"
        _write_png(sheet(engine, res, f"{step.title}: {step.photo.replace('_', ' ')}"), path)
        written.append(path)
        items.append(f"<h2>{html.escape(step.title)}</h2><p>{html.escape(res.verdict)}</p>"
                     f'<img src="{path.name}" alt="{html.escape(step.title)}" style="max-width:100%">')
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>toap-kit: the demo, recorded</title>"
            "<style>body{font-family:sans-serif;max-width:80em;margin:2em auto}</style></head><body>"
            "<h1>The demo, recorded</h1><p>One run of the demo's steps (docs/teaching.md, section 3), made with "
            "<code>python docs/record_demo.py</code> through the function the live page calls; green marks a "
            "photo of the person, red someone else.</p>" + "".join(items) + "</body></html>\n")
    tmp = out / "index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out / "index.html")
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo-recording", help="output folder")
    p.add_argument("--no-refine", action="store_true", help="leave out the refined steps (no dlib refinement)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    paths = record(args.out, refine=not args.no_refine)
    log.info("wrote %d steps; open %s", len(paths), args.out / "index.html")


if __name__ == "__main__":
    main()
