"""The results run's pieces (toap_kit.results): photo protection, engines, tiers, rows, the journal, the files."""
from __future__ import annotations

import math

import torch

from toap_kit import data, defences, photos, postprocess, results, toap, zoo
from toap_kit.perturbation import Perturbation


def _pert(eps=8 / 255, surrogates=("vgg_dpsh_32",), name="toap-mid"):
    delta = eps * torch.sign(torch.randn(3, 112, 112, generator=torch.Generator().manual_seed(0)))
    return Perturbation(delta, eps, {"method": "toap", "surrogates": list(surrogates), "name": name})


def test_protect_photo_touches_only_the_face_box():
    photo = torch.rand(3, 300, 200, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    out = photos.protect_photo(photo, _pert(), (150, 250, 80))  # box partly outside the photo
    changed = (out != photo).any(0)
    assert changed[250:, 150:].float().mean() > 0.9 and not changed[:250].any() and not changed[:, :150].any()
    assert float((out - photo).abs().max()) <= 8 / 255 + 1e-6 and tuple(out.shape) == (3, 300, 200)
    assert torch.equal(photo, photo.clone())  # the input is not modified
    x0, y0, s, found = data.face_box(data.load_faceset("photos250", 250).images[0])
    assert found and 60 < s < 250


def test_shared_networks_give_the_same_codes():
    """Engines on one network share it; engines on another network keep theirs (issue 29: every
    engine used to get the first engine's network)."""
    faces = data.load_faceset("lfw158", 112).images[:6]
    names = ("dlib_itq_32", "dlib_itq_64", "mobileface_itq_32", "mobileface_itq_64")
    plain = {n: zoo.load(n).encode(faces) for n in names}
    shared = results.load_victims(names)
    assert shared["dlib_itq_32"].net is shared["dlib_itq_64"].net
    assert shared["mobileface_itq_32"].net is shared["mobileface_itq_64"].net is not shared["dlib_itq_32"].net
    for n, m in shared.items():
        assert torch.equal(m.encode(faces), plain[n])


def test_purified_engine_hashes_the_purified_image():
    m = zoo.load("vgg_dpsh_32")
    x = data.load_faceset("lfw158", 112).images[:4]
    assert torch.equal(defences.Purified(m, "jpeg:50").encode(x), m.encode(postprocess.apply(x, "jpeg:50")))


def test_rows_name_their_tier():
    r = results._row(_pert(surrogates=["vgg_dpsh_32", toap.DLIB_SURROGATE]), "toap-mid", "dlib_itq_64", "query",
                     "jpeg:75", 0.5, 0.1, 33.0, 0.95)
    assert r["tier"] == "engine-known-backbone" and r["role"] == "victim" and math.isclose(r["rel_drop"], 0.8)
    assert set(r) >= {"method", "perturbation", "eps", "surrogates", "victim", "role", "tier", "setting", "post",
                      "map_clean", "map_after", "rel_drop", "psnr", "ssim"}
    assert results._row(None, "noise", "mobilenet_csq_32", "query", "none", 0.1, 0.1, 30, 0.8,
                        method="noise")["tier"] == "cnn-blackbox"


def _fake(drops: dict) -> dict:
    rows = []
    for (pname, victim, post), d in drops.items():
        surr = ["vgg_dpsh_32"] + ([toap.DLIB_SURROGATE] if pname in ("toap-mid", "uap-mid") else [])
        rows.append(results._row(_pert(surrogates=surr, name=pname), pname, victim, "query", post, 0.5, 0.5 * (1 - d),
                                 33.0, 0.95))
    return {"rows": rows, "fast": True, "protocol": "p", "seconds": 60, "limits": [], "tradeoff": []}


def test_write_outputs(tmp_path):
    r = _fake({("toap-mid-cnn", "mobilenet_csq_32", "jpeg:75"): 0.7, ("uap-mid-cnn", "dlib_itq_64", "none"): 0.2})
    r["tradeoff"] = [{**x, "eps_levels": 8} for x in r["rows"]]
    files = results.write(r, tmp_path)
    assert all(f.is_file() and f.stat().st_size > 0 for f in files)
    assert not list(tmp_path.glob("*.tmp"))
    assert (tmp_path / "toap.csv").read_text().splitlines()[0].startswith("method,perturbation,eps,surrogates,victim")


def test_fast_bench_keeps_the_json_contract(tmp_path):
    """``python -m toap_kit.bench toap --json`` in fast mode (a smoke run of every part at a tiny
    size: it checks the pipeline and the contract, not the claims). No time limit: a slow or
    busy machine must not fail it (issue 28, item 12: it ran past a 1800 s limit)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "TOAP_FAST": "1"}
    run = subprocess.run([sys.executable, "-m", "toap_kit.bench", "toap", "--json"], capture_output=True, text=True,
                         env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    r = json.loads(run.stdout)
    assert r["fast"] and r["parts"] == list(results.PARTS)
    keys = {"method", "perturbation", "eps", "surrogates", "victim", "role", "tier", "setting", "post", "map_clean",
            "map_after", "rel_drop", "psnr", "ssim"}
    assert r["rows"] and all(keys <= set(row) for row in r["rows"])
    assert {row["tier"] for row in r["rows"]} <= set(toap.TIERS)
    assert {"noise", "pgd", "uap", "toap", *results.ABLATIONS} <= {row["method"] for row in r["rows"]}
    assert any(row["post"].startswith("photo:") for row in r["rows"]) and r["limits"] and r["tradeoff"]
    assert all(0 < row["eps"] <= 1 and math.isfinite(row["map_clean"]) for row in r["rows"])


def test_grid_journal_resumes_without_measuring_again(tmp_path):
    faces, dis = data.load_faceset("lfw158", 112), data.load_faceset("distractors", 112)
    sets = data.retrieval_sets(data.make_protocol(faces, len(dis)), faces, dis).subset(6, 40)
    victims = {"mobilenet_csq_32": zoo.load("mobilenet_csq_32")}
    p = _pert()
    journal = tmp_path / "journal.jsonl"
    args = (victims, sets, ("none", "jpeg:75"), ("none",), ("none",), 8 / 255)
    first = results.grid({"toap-mid": ("toap", p.apply, p, ["vgg_dpsh_32"])}, *args, journal=journal)
    assert len(first) == 3 and len(journal.read_text().splitlines()) == 3  # one line per item x victim

    def never(x):
        raise AssertionError("a journalled item was measured again")

    again = results.grid({"toap-mid": ("toap", never, p, ["vgg_dpsh_32"])}, *args, journal=journal)
    assert again == first
    more = {**victims, "vgg_csq_64": zoo.load("vgg_csq_64")}  # another victim: only its rows are measured
    wider = results.grid({"toap-mid": ("toap", p.apply, p, ["vgg_dpsh_32"])}, more, *args[1:], journal=journal)
    assert [r for r in wider if r["victim"] == "mobilenet_csq_32"] == first
    assert len(wider) == 6 and len(journal.read_text().splitlines()) == 6
    with open(journal, "a") as f:
        f.write('{"key": "half a line')  # a run killed while writing
    other = _pert(eps=4 / 255)  # another perturbation (another sha256) is measured, not read back
    rows = results.grid({"toap-mid": ("toap", other.apply, other, ["vgg_dpsh_32"])}, *args, journal=journal)
    assert len(rows) == 3 and rows != first


def test_rows_of_unchanged_inputs_are_reused_under_a_new_name(tmp_path):
    faces, dis = data.load_faceset("lfw158", 112), data.load_faceset("distractors", 112)
    sets = data.retrieval_sets(data.make_protocol(faces, len(dis)), faces, dis).subset(6, 40)
    victims = {"mobilenet_csq_32": zoo.load("mobilenet_csq_32")}
    p = _pert()
    p.save(tmp_path / "renamed")  # the card now holds the tensor file's sha256
    p = Perturbation.load(tmp_path / "renamed")
    args = (victims, sets, ("none", "jpeg:75"), ("none",), ("none",), 8 / 255)
    measured = results.grid({"old-name": ("toap", p.apply, p, ["vgg_dpsh_32"])}, *args)
    previous = {"fast": False, "rows": measured, "perturbations": {"old-name": p.card}}
    journal = tmp_path / "journal.jsonl"

    def never(x):
        raise AssertionError("a reused row was measured again")

    n = results.reuse_rows(previous, {"new-name": ("toap", never, p, ["vgg_dpsh_32"])}, list(victims), sets, journal, "")
    assert n == 3
    rows = results.grid({"new-name": ("toap", never, p, ["vgg_dpsh_32"])}, *args, journal=journal)
    assert [r["perturbation"] for r in rows] == ["new-name"] * 3
    assert [r["rel_drop"] for r in rows] == [r["rel_drop"] for r in measured]
    other = _pert(eps=4 / 255)  # another tensor (another file sha256): nothing is reused for it
    other.save(tmp_path / "other")
    other = Perturbation.load(tmp_path / "other")
    assert results.reuse_rows(previous, {"x": ("toap", never, other, [])}, list(victims), sets, journal, "") == 0
    assert results.reuse_rows({**previous, "fast": True}, {"y": ("toap", never, p, [])}, list(victims), sets,
                              journal, "") == 0
