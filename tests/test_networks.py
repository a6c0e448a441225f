"""Protection against networks it never ran (issue 29): engines on every real network, the
ensemble refinement, the leave-one-network-out tiers and the matrix's smoke run."""
from pathlib import Path

import numpy as np
import pytest
import torch

from toap_kit import cli, data, networks, recognizers, refine, toap, zoo
from toap_kit.perturbation import Perturbation
from toap_kit.recognizers import weights

NEEDS_WEIGHTS = pytest.mark.skipif(bool(weights.missing()), reason="TF.js networks not fetched: run `make install`")


@pytest.fixture(scope="module")
def faces():
    return data.load_faceset("lfw158", 112).images[:3]


def test_tiers_are_leave_one_network_out():
    dlib, faceres = toap.own_descriptor("dlib"), toap.own_descriptor("faceres")
    assert dlib == toap.DLIB_DESCRIPTOR
    assert toap.threat_tier([dlib], "faceres_itq_64") == "engine-blackbox"
    assert toap.threat_tier([dlib, faceres], "faceres_itq_64") == "engine-known-backbone"
    assert toap.threat_tier([faceres], "dlib_itq_32") == "engine-blackbox"
    assert toap.threat_tier([faceres], "mobilenet_csq_32") == "cnn-blackbox"  # the CNNs learned from dlib only
    assert toap.threat_tier([dlib], "mobilenet_csq_32") == "cnn-teacher-known"
    assert toap.threat_tier([toap.DLIB_SURROGATE], "dlib_itq_64") == "engine-known-backbone"
    # the older stand-in: CNN-made protections on dlib's engines, still labelled as such
    assert toap.stand_in(["vgg_dpsh_32"], "dlib_itq_32") and not toap.stand_in(["vgg_dpsh_32"], "faceres_itq_32")
    assert not toap.stand_in([faceres], "dlib_itq_32")
    assert {toap.engine_network(n) for n in networks.ENGINES} == set(recognizers.NAMES)
    assert toap.engine_network("vgg_dpsh_32") is None


def test_every_network_has_zoo_engines_with_cards():
    for name in networks.ENGINES:
        c = zoo.card(name)
        assert c["role"] == "victim" and c["objective"] == "itq" and "network" in c
        assert zoo.RECOGNIZER_BACKBONES[c["backbone"]] == toap.engine_network(name)
        if c["backbone"] != "dlib_resnet":
            assert c["network"]["files"] == weights.card()["networks"][toap.engine_network(name)]["files"]
            assert tuple(c["chip_box"]) == recognizers.SPECS[toap.engine_network(name)].chip_box


@NEEDS_WEIGHTS
def test_engines_refuse_other_network_files(monkeypatch):
    card = weights.card()
    card["networks"]["faceres"]["files"]["faceres.bin"] = "0" * 64
    monkeypatch.setattr(weights, "card", lambda: card)
    with pytest.raises(ValueError, match="not the ones faceres_itq_32 was fitted on"):
        zoo.load("faceres_itq_32")


def test_against_is_checked():
    assert refine.check_against("dlib, faceres") == ("dlib", "faceres")
    for bad in ((), ("dlib", "dlib"), ("arcface",), ""):
        with pytest.raises(ValueError, match="against must name"):
            refine.check_against(bad)


def test_chip_moved_between_frames_is_the_target_box():
    a, b = (0.0945, 0.1583, 0.9188, 0.9826), (0.035, -0.011, 0.965, 0.919)
    moved = recognizers.chip_in_frame(recognizers.box_theta(a, 2), a, b)
    torch.testing.assert_close(moved, recognizers.box_theta(b, 2), atol=1e-6, rtol=0)


@NEEDS_WEIGHTS
def test_landmark_chips_of_each_network_sit_near_its_fixed_chip(faces):
    """The landmark-aligned chip of MobileFace and faceres (dlib's landmarks, carried into each
    network's frame) lands near the fixed chip the network was measured with."""
    rec = refine.known_recognizer(against=("dlib", "mobileface", "faceres"))
    refs = refine._references(rec, faces, None)
    for net in ("mobileface", "faceres"):
        gap = (refs.thetas[net, True] - refs.thetas[net, False]).abs().amax()
        assert gap < 0.25, f"{net}: landmark chip {gap:.2f} from the fixed chip (in [-1, 1] units)"


@NEEDS_WEIGHTS
def test_ensemble_refinement_moves_every_network_it_is_made_against(faces):
    against = ("mobileface", "faceres")
    cfg = refine.RefineConfig(steps=40, seed=0)
    protected = refine.refine_faces(faces, config=cfg, against=against)
    noise = (faces + (protected - faces).flatten(1)[:, torch.randperm(faces[0].numel(),
                                                                        generator=torch.Generator().manual_seed(0))]
             .view_as(faces)).clamp(0, 1)  # the same pixels' changes, shuffled: same size, no direction
    with torch.no_grad():
        for n in against:
            net = recognizers.load(n)
            e0, e, en = net.embed(faces), net.embed(protected), net.embed(noise)
            moved = recognizers.descriptor_distance(net.spec, e, e0).mean()
            by_noise = recognizers.descriptor_distance(net.spec, en, e0).mean()
            assert moved > 3 * by_noise, f"{n}: moved {moved:.3f}, noise of the same size {by_noise:.3f}"
    assert float(((protected - faces).abs().amax())) <= cfg.eps + 1 / 255
    with pytest.raises(ValueError, match="the recognizer knows"):
        refine.refine_deltas(faces, steps=1, recognizer=refine.known_recognizer(), against=against)


def test_query_subset_spreads_queries_and_keeps_the_database():
    faces, dis = data.load_faceset("lfw158", 32), data.load_faceset("distractors", 32)
    sets = data.retrieval_sets(data.make_protocol(faces, len(dis)), faces, dis)
    sub = networks.query_subset(sets, 10)
    assert len(sub.query_images) == 10 and torch.equal(sub.db_labels, sets.db_labels)
    assert len(set(sub.query_labels.tolist())) >= 8
    with pytest.raises(ValueError):
        networks.query_subset(sets, 0)


@NEEDS_WEIGHTS
def test_fast_matrix_has_every_cell_with_its_tier(tmp_path):
    r = networks.run(fast=True, cache=tmp_path, progress=False)
    f = networks.FAST
    universal = ["toap-mid"] + [n for n in Perturbation.shipped() if n.startswith(networks.ENSEMBLE_PREFIX)]
    n_engines = len(f["engines"])
    query = [row for row in r["rows"] if row["setting"] == "query"]
    assert len(query) == (1 + len(universal) + len(f["against"])) * n_engines * len(f["posts"])
    database = [row for row in r["rows"] if row["setting"] == "database"]  # the universal deltas only
    assert len(database) == (1 + len(universal)) * n_engines * len(f["db_posts"])
    assert not any(row["perturbation"].startswith("refine[") for row in database)
    assert set(r["seconds"]) == {"setup", *networks.PARTS}
    # the per-photo table: every photo x (universal, each refinement) x engine, tiers by the networks used
    photos = {row["photo"] for row in r["per_photo"]}
    assert len(photos) == f["photos"]
    assert len(r["per_photo"]) == len(photos) * (1 + len(f["against"])) * n_engines
    for row in r["per_photo"]:
        nets = row.get("against", ["dlib"] if row["way"] == "universal" else None)
        assert row["tier"] == ("engine-known-backbone" if toap.engine_network(row["engine"]) in nets else "engine-blackbox")
        assert 0 <= row["hits_after"] <= 10 and 0 <= row["hits_before"] <= 10
    table = networks.photo_table(r)
    assert all(networks.name(a) in table for a in f["against"]) and f"/{len(photos)} out" in table
    # the limits: only held-out engines, each purifier
    assert {(row["perturbation"], row["victim"]) for row in r["limits"]} == {
        (networks.name(a), e) for a in f["against"] for e in f["engines"] if toap.engine_network(e) not in a}
    assert {row["engine"] for row in r["limits"]} == {f"purifies with {s}" for s in f["purifiers"]}
    assert "purifies with" in networks.limits_table(r)
    for row in r["rows"]:
        net = toap.engine_network(row["victim"])
        assert row["held_out"] == (net not in toap.surrogate_networks(row["surrogates"]))
        assert row["tier"] == ("engine-blackbox" if row["held_out"] else "engine-known-backbone")
        assert np.isfinite(row["rel_drop"]) and row["map_clean"] > 0
        if row["perturbation"].startswith("refine["):
            assert row["psnr"] >= refine.STRENGTHS["mid"][1] - 0.05
    table = networks.matrix(r, "jpeg:75")
    assert all(e in table for e in f["engines"]) and "held out" in table and "known" in table
    assert set(networks.summary(r)) == {row["perturbation"] for row in r["rows"]}
    again = networks.run(fast=True, cache=tmp_path, progress=False, parts=("matrix",))  # refinements read back
    assert [x["map_after"] for x in again["rows"]] == [x["map_after"] for x in r["rows"]]
    assert "per_photo" not in again and "limits" not in again
    with pytest.raises(ValueError, match="parts must be"):
        networks.run(fast=True, parts=("matrix", "nonsense"))


def cli_json(capsys, argv: list[str]) -> dict:
    import json

    code = cli.main(argv)
    assert code in (0, 3), capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@NEEDS_WEIGHTS
def test_protect_files_refines_against_the_chosen_networks(tmp_path, capsys):
    from toap_kit import batch, odd_inputs, protect

    src = tmp_path / "in"
    src.mkdir()
    odd_inputs.shipped_photo(3).save(src / "me.png")
    p = protect.load_perturbation()
    rows = batch.protect_files([src], tmp_path / "out", p, refine_steps=1, against=("mobileface",), progress=False)
    assert rows[0]["status"] == "protected" and rows[0]["settings"]["against"] == ["mobileface"]
    # toap verify reads the networks from the manifest: MobileFace's engines are known, faceres' held out
    assert cli._protection_for(Path(rows[0]["output"])) == ("toap-mid", ["mobileface"])
    out = cli_json(capsys, ["verify", str(src / "me.png"), rows[0]["output"], "--json",
                            "--engines", "mobileface_itq_32", "faceres_itq_32"])
    assert out["refined_against"] == ["mobileface"]
    assert {r["engine"]: r["tier"] for r in out["rows"]} == {"mobileface_itq_32": "engine-known-backbone",
                                                            "faceres_itq_32": "engine-blackbox"}
    plain = batch.protect_files([src], tmp_path / "plain", p, progress=False)
    assert "against" not in plain[0]["settings"]  # no refinement: no networks recorded
    with pytest.raises(protect.ProtectError, match="against must name"):
        batch.protect_files([src], tmp_path / "bad", p, refine_steps=1, against=("arcface",), progress=False)


def test_the_readme_states_the_shipped_matrix():
    """The README's leave-one-network-out block is ``networks.readme_block`` of the shipped
    results/networks.json (``python -m toap_kit.networks`` rewrites both)."""
    import json

    r = json.loads(networks.RESULT.read_text())
    assert not r["fast"] and r["queries"] == networks.N_QUERIES
    readme = (networks.RESULT.parents[1] / "README.md").read_text()
    assert networks.readme_block(r) in readme, "run `python -m toap_kit.networks` (or update_readme) again"
    held = [row for row in r["rows"] if row["held_out"]]
    assert held and all(row["tier"] == "engine-blackbox" for row in held)
    assert {row["victim"] for row in r["rows"]} == set(networks.ENGINES)
