"""The words and tables made from a results run (toap_kit.report): targets, toap.md, the
per-photo sentence, the README's generated blocks and their check."""
from __future__ import annotations

import copy
import json
import math

from test_results import _fake
from toap_kit import report, results, toap


def test_targets_are_computed_not_assumed():
    good = _fake({("toap-mid-cnn", "mobilenet_csq_32", "jpeg:75"): 0.7, ("uap-mid-cnn", "mobilenet_csq_32", "jpeg:75"): 0.3,
                  ("toap-mid-cnn", "mobilenet_csq_32", "none"): 0.8, ("uap-mid-cnn", "mobilenet_csq_32", "none"): 0.6})
    t = {x["target"]: x for x in report.targets(good)}
    key = "cnn-blackbox: mean victim mAP after JPEG q75, x clean (toap-mid-cnn)"
    assert t[key]["met"] and math.isclose(t[key]["measured"], 0.3)
    assert t["cnn-blackbox: TOAP - UAP relative drop, JPEG q75"]["met"]
    # the UAP loses 0.3 to JPEG q75, TOAP 0.1 <= 0.15: met; make TOAP lose 0.2 and it is not
    rob = [x for x in t.values() if x["target"].startswith("robustness: toap-mid-cnn")]
    assert len(rob) == 1 and rob[0]["met"]
    bad = _fake({("toap-mid-cnn", "mobilenet_csq_32", "jpeg:75"): 0.6, ("uap-mid-cnn", "mobilenet_csq_32", "jpeg:75"): 0.3,
                 ("toap-mid-cnn", "mobilenet_csq_32", "none"): 0.8, ("uap-mid-cnn", "mobilenet_csq_32", "none"): 0.6})
    t = {x["target"]: x for x in report.targets(bad)}
    assert not t[key]["met"] and not [x for x in t.values() if x["target"].startswith("robustness")][0]["met"]
    md = report.markdown(bad)
    assert "cnn-blackbox" in md and "**no**" in md


def test_the_tables_are_written_next_to_the_results(tmp_path):
    r = _fake({("toap-mid-cnn", "mobilenet_csq_32", "jpeg:75"): 0.7, ("uap-mid-cnn", "dlib_itq_64", "none"): 0.2})
    path = report.write_markdown(r, tmp_path)
    assert path == tmp_path / "toap.md" and path.read_text() == report.markdown(r)
    assert not list(tmp_path.glob("*.tmp"))
    # toap-mid-cnn has no row without post-processing: its quality cells say so instead of "nan"
    line = next(x for x in path.read_text().splitlines() if x.startswith("| cnn-blackbox | toap-mid-cnn |"))
    assert line.endswith("| - | - |") and "nan" not in line


def test_issue_18_targets_and_the_per_photo_sentence_come_from_the_rows():
    drops = {(results.REFINED, v, post): d for v in ("dlib_itq_32", "dlib_itq_64")
             for post, d in (("none", 0.99), ("jpeg:75", 0.97), ("facebook", 0.96), ("resize:0.5", 0.80))}
    r = _fake(drops)
    for row in r["rows"]:  # the refinement has no card: its rows name dlib's descriptor objective
        row.update(method="refine", surrogates=[toap.DLIB_DESCRIPTOR], tier="engine-known-backbone", psnr=35.4, ssim=0.95)
    t = {x["target"]: x for x in report.targets_known(r)}
    name = f"engine-known-backbone: worst dlib engine, {{}} ({results.REFINED}, issue 18)"
    assert t[name.format("jpeg:75")]["met"] and math.isclose(t[name.format("facebook")]["measured"], 0.96)
    assert not t[name.format("resize:0.5")]["met"], "0.80 < 0.85"
    assert t[f"quality: PSNR of {results.REFINED} (dB, issue 18)"]["met"]
    assert report.per_photo_sentence(r) == ""  # no per-photo table
    r["per_photo"] = [{"photo": p, "strength": "mid", "way": w, "engine": "dlib_itq_32", "profile": "facebook",
                       "hits_before": 5.0, "hits_after": a} for p, w, a in
                      (("A", "universal", 2.0), ("A", "refined", 0.0), ("B", "universal", 0.0), ("B", "refined", 0.0))]
    s = report.per_photo_sentence(r)
    assert "2 of 2 originals" in s and "1 of 2 leave its top 10 with the universal" in s and "2 of 2 with the per-photo" in s
    t = {x["target"]: x for x in report.targets_known(r)}
    assert next(x for k, x in t.items() if k.startswith("every shipped example photo"))["met"]
    assert "per photo" in report.markdown(r)


def test_the_readmes_results_block_is_the_shipped_results():
    """The README's query table, per-photo table and demo sentence are generated from
    results/toap.json (``make results`` rewrites them): a number changed by hand fails here."""
    readme = (results.RESULTS_DIR.parent / "README.md").read_text()
    shipped = json.loads((results.RESULTS_DIR / "toap.json").read_text())
    assert report.readme_block(shipped) in readme


def _shipped() -> tuple[str, dict]:
    return ((results.RESULTS_DIR.parent / "README.md").read_text(),
            json.loads((results.RESULTS_DIR / "toap.json").read_text()))


def test_the_readme_states_only_what_the_shipped_results_measured():
    """Issue 20: every generated block (the opening's levels per tier, the shipped perturbations,
    the results table, the results read tier by tier with the targets) is results/toap.json's, no
    measured number sits outside them in the README's TOAP sections, and every qualitative
    sentence of the generated prose still holds."""
    readme, shipped = _shipped()
    assert report.check_readme(readme, shipped) == []
    ledger = report.claims(shipped)
    key = "query | engine-known-backbone | toap-mid | jpeg:75"
    assert ledger[key] == f"{100 * results._mean(shipped['rows'], perturbation='toap-mid', post='jpeg:75', tier='engine-known-backbone', setting='query'):.1f}%"
    assert ledger[key] in readme.split("## Two commands")[0], "the opening states the known-backbone level"
    for tier in toap.TIERS:  # the opening names every tier by its label
        assert f"**{toap.TIER_LABELS[tier]}**" in readme.split("## Two commands")[0]


def test_a_planted_change_in_the_readme_fails_the_check():
    """The issue's "done when": a number changed by hand in the README's TOAP prose, a measured
    number added outside the generated blocks, or a result that no longer supports a sentence,
    each makes the check (and so `make test`) fail, with a message that says where."""
    readme, shipped = _shipped()
    begin, end = report.readme_markers("reading")
    block = readme.split(begin, 1)[1].split(end, 1)[0]
    value = report.claims(shipped)["query | cnn-blackbox | toap-mid-cnn | jpeg:75"]  # e.g. "49.4%"
    assert value in block
    planted = readme.replace(block, block.replace(value, "59.4%" if value != "59.4%" else "49.4%", 1))
    problems = report.check_readme(planted, shipped)
    assert len(problems) == 1 and "'reading'" in problems[0] and "should read" in problems[0], problems

    begin, end = report.readme_markers("summary")
    block = readme.split(begin, 1)[1].split(end, 1)[0]
    planted = readme.replace(block, block.replace("%", "0%", 1))
    assert any("'summary'" in p for p in report.check_readme(planted, shipped))

    anchor = "Figures: `results/robustness.png`"  # static prose of the TOAP section
    planted = readme.replace(anchor, "TOAP removes 95% of every engine's retrieval. " + anchor)
    problems = report.check_readme(planted, shipped)
    assert len(problems) == 1 and "'95%'" in problems[0] and "outside the generated blocks" in problems[0], problems
    planted = readme.replace("unfindable, least of all", "unfindable (a 12.5 dB cost), least of all")  # the opening
    assert any("'12.5 dB'" in p for p in report.check_readme(planted, shipped))
    planted = readme.replace(report.readme_markers("ships")[1], "")  # a block's end marker lost
    assert any("'ships'" in p and "markers" in p for p in report.check_readme(planted, shipped))


def test_a_result_that_no_longer_supports_a_sentence_is_reported(tmp_path):
    """New results rewrite the numbers (``update_readme``) but not the words around them: a
    sentence the new rows contradict is reported until someone rewrites it."""
    readme, shipped = _shipped()
    changed = copy.deepcopy(shipped)
    for r in changed["rows"]:  # suppose TOAP survived the down-up resize on the small CNNs
        if r["perturbation"] == "toap-mid-cnn" and r["post"] == "resize:0.5" and r["tier"] == "cnn-blackbox":
            r["rel_drop"] = 0.45
    problems = report.check_readme(readme, changed)
    assert any("'reading'" in p for p in problems), "the numbers differ from the README's"
    assert any("erases both" in p and "no longer supports" in p for p in problems), problems
    path = tmp_path / "README.md"
    path.write_text(readme)
    assert report.update_readme(changed, path)
    after = path.read_text()
    assert "45.0%" in after and readme.split("## Two commands")[1].split("## The protocol")[0] in after
    assert [p for p in report.check_readme(after, changed)] == \
        [p for p in problems if "no longer supports" in p], "after the update only the stale sentence is left"


def test_a_partial_run_leaves_the_readme_as_it_was(tmp_path):
    readme, shipped = _shipped()
    path = tmp_path / "README.md"
    path.write_text(readme)
    assert not report.update_readme({**shipped, "limits": []}, path)  # e.g. `--parts grid`: no limits measured
    assert path.read_text() == readme


# ---------------------------------------------------------------- issue 31, item 4: one story
def _span(values: list[float]) -> str:
    lo, hi = (f"{100 * v:.1f}" for v in (min(values), max(values)))
    return (lo if lo == hi else f"{lo}-{hi}") + "%"


def _block_text(readme: str, name: str) -> str:
    begin, end = report.readme_markers(name)
    return " ".join(readme.split(begin, 1)[1].split(end, 1)[0].split())


def test_the_fine_tuned_limit_is_one_labelled_number():
    """The opening and the results reading state the same number for an engine owner who
    fine-tunes the hash layer on protected faces (toap-mid, the limits' rows after JPEG q75),
    labelled so; the rows without post-processing are a second, labelled number."""
    readme, shipped = _shipped()
    rows = [r for r in shipped["limits"] if r["perturbation"] == "toap-mid" and r["engine"].startswith("hash layer")]
    q75 = _span([r["rel_drop"] for r in rows if r["post"] == "jpeg:75"])
    none = _span([r["rel_drop"] for r in rows if r["post"] == "none"])
    assert q75 != none, "the test needs the two numbers to differ"
    assert f"takes it to {q75} after JPEG q75" in _block_text(readme, "summary")
    reading = _block_text(readme, "reading")
    assert f"protected training faces to {q75} after JPEG q75 ({none} without post-processing)" in reading
    teaching = (results.RESULTS_DIR.parent / "docs" / "teaching.md").read_text()
    assert f"fine-tunes the hash layer on protected faces | {q75} |" in teaching and "after JPEG q75 unless named" in teaching


def test_the_engine_blackbox_gap_is_said_of_the_face_crops_and_the_photo_path_apart():
    """TOAP and the UAP are close on the real engine black-box after post-processing of the face
    crop, not on the whole-photo path (photo:facebook 34.7% vs 16.6% when written): the README
    says which, with both numbers, from results/toap.json."""
    readme, shipped = _shipped()
    eb = {"tier": "engine-blackbox", "setting": "query"}
    posts = {r["post"] for r in shipped["rows"] if r["tier"] == "engine-blackbox" and r["setting"] == "query"}
    crop = [p for p in posts if not p.startswith("photo:")]
    gap = max(abs(results._mean(shipped["rows"], perturbation="toap-mid-cnn", post=p, **eb)
                  - results._mean(shipped["rows"], perturbation="uap-mid-cnn", post=p, **eb)) for p in crop)
    t_fb, u_fb = (results._mean(shipped["rows"], perturbation=n, post="photo:facebook", **eb) for n in ("toap-mid-cnn", "uap-mid-cnn"))
    assert abs(t_fb - u_fb) > gap, "the photo path is the exception the sentence must name"
    reading = _block_text(readme, "reading")
    sentence = reading.split("- *real engine black-box*:", 1)[1].split("- ", 1)[0]
    assert f"at most {100 * gap:.1f} points apart after any of them" in sentence and "face crop" in sentence
    assert f"after Facebook's {100 * t_fb:.1f}% vs {100 * u_fb:.1f}%" in sentence
    assert "after any post-processing" not in sentence


def test_leaving_the_top_10_is_defined_where_it_is_first_counted():
    """"leaves the top 10" means fewer than ``report.GONE_BELOW`` of the person's photos expected
    in it (tie-aware): the README says so in the sentence that first counts photos that way, and
    its counts are the per-photo rows counted with that threshold."""
    readme, shipped = _shipped()
    opening = readme.split("## Two commands")[0]
    first = opening.index("leave the engine's top 10")
    bullet = opening[opening.rfind("\n- ", 0, first):opening.find("\n- ", first)]
    assert f"fewer than {report.GONE_BELOW:g} of the person's photos" in " ".join(bullet.split())
    mid = [r for r in shipped["per_photo"] if r["strength"] == "mid"]
    for way, words in (("refined", "leave the engine's top 10 refined"), ("universal", "with the universal pattern")):
        rows = [r for r in mid if r["way"] == way]
        n = sum(r["hits_after"] < report.GONE_BELOW for r in rows)
        assert f"{n} of {len(rows)}" in " ".join(bullet.split()), (way, words)
    closest = max((r for r in mid if 0 < r["hits_after"] < report.GONE_BELOW), key=lambda r: r["hits_after"], default=None)
    if closest:
        assert f"{closest['hits_before']:.1f} -> {closest['hits_after']:.1f}" in bullet, "the example is the closest call"
