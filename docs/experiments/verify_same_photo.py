"""Issue 28, item 7: the numbers behind ``toap_kit.verify.SAME_PHOTO_MIN``.

``toap verify`` gives a verdict only when the uploaded copy is the same photo as the original
(``verify.same_photo``: correlation of blurred 32x32 grey thumbnails, the copy matched with
central crops of the original). This prints that similarity's range for

- the same photo, protected: the 23 shipped photos (250x250; 4 of them upscaled to 2600x2600,
  past every platform's size limit; 4 as 1600x900 photos with the face in the middle) and the
  real OSN sample (757x568), each protected with toap-low/mid/high and, for the first
  ``REFINED`` bases, refined (100 steps from toap-mid), written as ``toap protect`` writes
  (JPEG q95), then every platform profile, JPEG q50, WebP q75, a blur, resizing to 1/2 and 1/4;
  the same at 30% and at 10% of the contrast (``ImageEnhance.Contrast``); the real Facebook/Weibo/WeChat copies of the OSN sample;
- the same, centrally cropped (80%, 90%; a wide photo cut to a square or to 4:5);
- not the same photo: the photo or its protected Facebook copy rotated or mirrored; another
  person (the shipped photos pairwise, the LFW crops of 60 people pairwise); another photo of
  the same person (the LFW crops of the shipped photos' people pairwise, and each shipped photo
  against them).

About 10 minutes on 2 idle CPU cores (most of it the refinement).

    python docs/experiments/verify_same_photo.py [REFINED]
"""
import itertools
import sys
import time

import numpy as np
from PIL import Image, ImageEnhance

from toap_kit import postprocess, protect, refine, verify
from toap_kit.data import DATA_DIR
from toap_kit.odd_inputs import shipped_photos
from toap_kit.perturbation import Perturbation

REFINED = int(sys.argv[1]) if len(sys.argv) > 1 else 4
PROFILES = ["none", *postprocess.profiles(), "jpeg:50", "webp:75", "blur:1.0", "resize:0.5", "resize:0.25"]


def wide(photo: Image.Image, width: int = 1600, height: int = 900) -> Image.Image:
    canvas = photo.resize((width, height), Image.BICUBIC)
    canvas.paste(photo.resize((height, height), Image.BICUBIC), ((width - height) // 2, 0))
    return canvas


def central(im: Image.Image, aspect: float) -> Image.Image:
    w, h = im.size
    bw, bh = (round(h * aspect), h) if w / h > aspect else (w, round(w / aspect))
    return im.crop(((w - bw) // 2, (h - bh) // 2, (w - bw) // 2 + bw, (h - bh) // 2 + bh))


def main() -> None:
    t0 = time.perf_counter()
    scores: dict[str, list[float]] = {}

    def add(what: str, a: Image.Image, b: Image.Image) -> None:
        scores.setdefault(what, []).append(verify.same_photo(a, b)["similarity"])

    photos = [Image.open(p).convert("RGB") for p in shipped_photos()]
    names = [p.parent.name for p in shipped_photos()]
    osn = {k: postprocess.to_pil(v[0]) for k, v in postprocess.osn_sample().items()}
    for k in ("facebook", "weibo", "wechat"):
        add("same: real Facebook/Weibo/WeChat copies", osn["original"], osn[k])
    perts = {s: Perturbation.load(protect.STRENGTHS[s]) for s in protect.STRENGTHS}
    bases = [ph for ph in photos] + [ph.resize((2600, 2600), Image.BICUBIC) for ph in photos[:4]]
    bases += [wide(ph) for ph in photos[4:8]] + [osn["original"]]
    rec = refine.KnownRecognizer() if REFINED else None
    for i, base in enumerate(bases):
        for dim in (1.0, 0.3, 0.1):
            orig = ImageEnhance.Contrast(base).enhance(dim) if dim < 1 else base
            tag = f" ({dim:.0%} of the contrast)" if dim < 1 else ""
            outs = {s: protect.protect_image(orig, p).image for s, p in perts.items()}
            if i < REFINED and dim == 1:
                outs["refined"] = protect.protect_image(orig, perts["mid"], refine_steps=refine.DEFAULT_STEPS,
                                                        recognizer=rec).image
            for out in outs.values():
                out = postprocess.apply(out, "jpeg:95")  # as toap protect writes it
                for prof in PROFILES:
                    add(f"same: protected, platform/codec{tag}", orig, out if prof == "none" else postprocess.apply(out, prof))
                for prof in ("crop:0.9", "crop:0.8"):
                    add(f"same: protected, central crop{tag}", orig, postprocess.apply(out, prof))
                if base.width != base.height:
                    for aspect in (1.0, 0.8):
                        add(f"same: protected, central crop{tag}", orig,
                            postprocess.apply(central(out, aspect), "instagram"))
        prot = postprocess.apply(protect.protect_image(base, perts["mid"]).image, "facebook")
        for im in (base, prot):
            for turn, what in ((Image.Transpose.ROTATE_180, "rotated 180"), (Image.Transpose.ROTATE_90, "rotated 90"),
                               (Image.Transpose.FLIP_LEFT_RIGHT, "mirrored left-right"),
                               (Image.Transpose.FLIP_TOP_BOTTOM, "mirrored top-bottom")):
                add(f"not: {what}", base, im.transpose(turn))
    print(f"positives and turns: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    for a, b in itertools.combinations(photos, 2):
        add("not: another person (shipped photos)", a, b)
    for ph in photos:
        add("not: another person (OSN sample vs shipped photo)", osn["original"], ph)
    lfw = DATA_DIR / "lfw158"
    for name, ph in zip(names, photos):
        crops = [Image.open(c).convert("RGB") for c in sorted((lfw / name).glob("*.jpg"))]
        for c in crops:
            add("not: the same person, shipped photo vs LFW crop", ph, c)
        for a, b in itertools.combinations(crops, 2):
            add("not: the same person, another photo (LFW crops)", a, b)
    firsts = [Image.open(sorted(p.glob("*.jpg"))[0]).convert("RGB")
              for p in sorted(p for p in lfw.iterdir() if p.is_dir())[:60]]
    for a, b in itertools.combinations(firsts, 2):
        add("not: another person (LFW crops)", a, b)
    flat = Image.new("RGB", (300, 200), (90, 120, 40))
    add("same: a flat photo, JPEG q75", flat, postprocess.apply(flat, "jpeg:75"))
    big = wide(photos[0], 4000, 3000)
    big_copy = postprocess.apply(big, "jpeg:90")
    t = time.perf_counter()
    for _ in range(3):
        verify.same_photo(big, big_copy)
    ms = (time.perf_counter() - t) / 3 * 1000
    print(f"threshold SAME_PHOTO_MIN = {verify.SAME_PHOTO_MIN}; {time.perf_counter() - t0:.0f} s in all; "
          f"same_photo on a 12-megapixel pair: {ms:.0f} ms")
    print(f"| {'pair':58} | {'n':>5} | {'min':>7} | {'median':>7} | {'max':>7} | {'>= threshold':>12} |")
    for what, xs in sorted(scores.items(), key=lambda kv: (not kv[0].startswith("same"), kv[0])):
        xs = np.array(xs)
        print(f"| {what:58} | {len(xs):5} | {xs.min():7.4f} | {np.median(xs):7.4f} | {xs.max():7.4f} | "
              f"{int((xs >= verify.SAME_PHOTO_MIN).sum()):12} |")


if __name__ == "__main__":
    main()
