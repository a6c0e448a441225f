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
