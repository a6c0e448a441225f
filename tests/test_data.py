import numpy as np
import pytest
import torch
from PIL import Image

from toap_kit import data


def test_shipped_sets_load_in_range(faces):
    assert faces.images.shape == (2537, 3, 48, 48)
    assert faces.images.dtype == torch.float32
    assert 0 <= faces.images.min() and faces.images.max() <= 1
    assert len(faces.identities) == 158
    dis = data.load_faceset("distractors", 32)
    assert len(dis) == 2000 == len(dis.identities)


def test_open_set_protocol_is_deterministic_and_disjoint(faces):
    p = data.make_protocol(faces)
    assert p == data.make_protocol(faces)
    assert len(p.train_identities) == 100 and len(p.eval_identities) == 58
    assert not set(p.train_identities) & set(p.eval_identities)
    names = faces.names()
    seen = {names[i] for i in p.train}
    assert seen <= set(p.train_identities)
    # no query or database face belongs to a person a model trains on
    assert not {names[i] for i in p.queries + p.database_faces} & seen
    assert len(p.queries) == 3 * 58
    assert not set(p.queries) & set(p.database_faces)
    assert data.make_protocol(faces, seed=1) != p


def test_closed_set_queries_are_held_out_images_of_training_identities(faces):
    p = data.make_protocol(faces, kind="closed")
    names = faces.names()
    assert {names[i] for i in p.queries} == set(p.train_identities)
    assert not set(p.queries) & set(p.train)
    assert set(p.database_faces) == set(p.train)
    with pytest.raises(ValueError, match="kind"):
        data.make_protocol(faces, kind="half-open")


def test_retrieval_sets_label_distractors_apart(faces):
    dis = data.load_faceset("distractors", 32)
    small = data.load_faceset("lfw158", 32)
    sets = data.retrieval_sets(data.make_protocol(small), small, dis)
    assert len(sets.db_images) == len(sets.db_labels) == 775 + 2000
    assert (sets.db_labels[-2000:] < 0).all() and len(set(sets.db_labels[-2000:].tolist())) == 2000
    assert not set(sets.query_labels.tolist()) & set(sets.db_labels[-2000:].tolist())

    small_sets = sets.subset(6)  # 3 queries per identity: two people
    assert torch.equal(small_sets.query_images, sets.query_images[:6])
    kept = set(small_sets.query_labels.tolist())
    assert len(kept) == 2
    own = small_sets.db_source >= 0
    assert set(small_sets.db_labels[own].tolist()) == kept
    assert int(own.sum()) == int(torch.isin(sets.db_labels, sets.query_labels[:6]).sum())
    assert int((~own).sum()) == 2000, "every distractor stays by default"
    fewer = sets.subset(6, n_distractors=100)
    assert torch.equal(fewer.db_source[fewer.db_source < 0], -1 - torch.arange(100))
    assert torch.equal(fewer.db_images[fewer.db_source >= 0], small_sets.db_images[own])
    with pytest.raises(ValueError, match="n_queries must be"):
        sets.subset(0)


def test_user_folder_loads_and_bad_files_are_named(tmp_path):
    for ident in ("ann", "bob"):
        (tmp_path / ident).mkdir()
        for k in range(2):
            Image.new("RGB", (60, 50), (k * 100, 20, 30)).save(tmp_path / ident / f"{k}.png")
    (tmp_path / "ann" / "notes.txt").write_text("not an image, ignored")
    fs = data.load_folder(tmp_path, size=40)
    assert fs.images.shape == (4, 3, 40, 40) and fs.identities == ["ann", "bob"]
    (tmp_path / "bob" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        data.load_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        data.load_image(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError):
        data.load_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        data.load_folder(tmp_path / "empty")


def test_crop_face_reproduces_the_shipped_crops():
    # a 250x250 LFW photo, detected and cropped, lands close to the shipped 112x112 crop
    psnrs = []
    for rel in ("Bill_Clinton/01.jpg", "Angelina_Jolie/01.jpg", "Hugo_Chavez/01.jpg"):
        photo = data.load_image(data.DATA_DIR / "photos250" / rel)
        crop, found = data.crop_face(photo)
        assert found and crop.shape == (3, 112, 112)
        ref = data.load_image(data.DATA_DIR / "lfw158" / rel)
        psnrs.append(float(-10 * torch.log10(((crop - ref) ** 2).mean())))
    assert np.mean(psnrs) > 18, psnrs


def test_crop_face_without_a_face_uses_the_centre():
    crop, found = data.crop_face(torch.full((3, 80, 120), 0.5))
    assert not found and crop.shape == (3, 112, 112)
    with pytest.raises(ValueError, match="too small"):
        data.crop_face(torch.rand(3, 8, 8))
