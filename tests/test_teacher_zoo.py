import json
import shutil

import numpy as np
import pytest
import torch

from toap_kit import data, teacher, zoo


def test_cached_teacher_embeddings_match_a_fresh_run():
    emb, paths = teacher.load_embeddings("lfw158")
    assert emb.shape == (2537, 128) and len(paths) == 2537
    faces = data.load_faceset("lfw158", 112)
    pick = [0, 500, 2000]
    assert [faces.paths[i] for i in pick] == [paths[i] for i in pick]
    fresh = teacher.Recognizer().embed(faces.images[pick], progress=False)
    np.testing.assert_allclose(fresh, emb[pick], atol=2e-3)


def test_teacher_cache_refuses_a_tampered_file(tmp_path):
    for suffix in (".npy", ".json"):
        shutil.copy(teacher.TEACHER_DIR / f"distractors{suffix}", tmp_path / f"distractors{suffix}")
    arr = np.load(tmp_path / "distractors.npy")
    arr[0, 0] += 1
    np.save(tmp_path / "distractors.npy", arr)
    with pytest.raises(ValueError, match="sha256"):
        teacher.load_embeddings("distractors", folder=tmp_path)


def test_zoo_has_surrogates_and_victims_with_disjoint_families():
    names = zoo.names()
    assert len(names) >= 6
    cards = {n: zoo.card(n) for n in names}
    for c in cards.values():
        for key in ("role", "backbone", "objective", "bits", "input_size", "seed", "sha256",
                    "training_data", "clean_map_all"):
            assert key in c
    sur = [c for c in cards.values() if c["role"] == "surrogate"]
    vic = [c for c in cards.values() if c["role"] == "victim"]
    assert sur and vic and set(zoo.surrogates()) | set(zoo.victims()) == set(names)
    assert {c["backbone"] for c in vic} - {c["backbone"] for c in sur}, "a victim backbone no surrogate has"
    assert {c["objective"] for c in vic} - {c["objective"] for c in sur}, "a victim objective no surrogate has"
    assert {16, 32, 64} <= {c["bits"] for c in cards.values()}


def test_zoo_load_encodes_any_size_and_matches_its_card():
    name = zoo.names()[0]
    model = zoo.load(name)
    assert not model.training and model.bits == zoo.card(name)["bits"]
    for size in (32, 112, 150):
        codes = model.encode(torch.rand(2, 3, size, size))
        assert codes.shape == (2, model.bits) and set(codes.unique().tolist()) <= {-1.0, 1.0}
    with pytest.raises(KeyError, match="no model"):
        zoo.card("not_a_model")


def test_zoo_refuses_tampered_weights(tmp_path):
    name = zoo.names()[0]
    for suffix in (".safetensors", ".json"):
        shutil.copy(zoo.ZOO_DIR / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    with open(tmp_path / f"{name}.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="sha256"):
        zoo.load(name, folder=tmp_path)


def test_zoo_save_load_round_trip(tmp_path):
    from toap_kit.models import build_model

    m = build_model("mobilenet", bits=16, input_size=32, width=8).eval()
    zoo.save(m, {"role": "victim", "objective": "csq", "seed": 0}, "tiny", folder=tmp_path)
    card = json.loads((tmp_path / "tiny.json").read_text())
    assert card["bits"] == 16 and card["role"] == "victim"
    back = zoo.load("tiny", folder=tmp_path)
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(back.encode(x), m.encode(x))
    assert not list(tmp_path.glob("*.tmp"))


def test_training_faces_hold_out_validation_and_evaluation_people():
    d = zoo.training_faces(32)
    faces = data.load_faceset("lfw158", 32)
    proto = data.make_protocol(faces)
    seen = {faces.identities[i] for i in d.labels[d.labels >= 0].unique().tolist()}
    assert len(seen) == d.n_identities == len(proto.train_identities) - len(d.val_names)
    assert not seen & set(proto.eval_identities) and not seen & set(d.val_names)
    assert {faces.identities[i] for i in d.val.query_labels.unique().tolist()} == set(d.val_names)
    assert int((d.labels == -1).sum()) == 2000 and len(d.images) == len(d.labels) == len(d.teacher)
    assert d.teacher.mean(0).abs().max() < 1e-5  # centred


def test_clean_map_reproduces_the_card():
    sets = zoo.protocol_sets(48)
    name = "vgg_dpsh_32"
    got = {k: round(zoo.clean_map(zoo.load(name), s), 4) for k, s in sets.items()}
    assert got == zoo.card(name)["clean_map_all"]


def test_student_views_experiment_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "docs" / "experiments" / "student_views.py"
    out = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, check=True,
                         cwd=tmp_path).stdout
    rows = [line.split("|")[2:-1] for line in out.splitlines() if line.startswith("| shipped") or line.startswith("| +")]
    assert len(rows) == 2 and all(0 <= float(v) <= 1 for r in rows for v in r)
