"""The torch port of dlib's face ResNet and the real-recognizer search engines in the zoo."""
import numpy as np
import pytest
import torch

from toap_kit import recognizers, teacher, zoo
from toap_kit.data import load_faceset, make_protocol, retrieval_sets, sha256_file
from toap_kit.retrieval import hamming_distance, mean_average_precision


@pytest.fixture(scope="module")
def net():
    return recognizers.load_dlib_resnet()


def test_port_equals_dlib_on_the_same_chips(net):
    dlib = pytest.importorskip("dlib")
    rec = teacher.Recognizer()
    crops = (load_faceset("lfw158", 112).images[:6] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    chips = [dlib.get_face_chip(np.ascontiguousarray(c), rec._landmarks(np.ascontiguousarray(c)), size=150)
             for c in crops]
    ref = np.stack([np.asarray(rec.net.compute_face_descriptor(c)) for c in chips])
    with torch.no_grad():
        out = net(torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float() / 255).numpy()
    assert np.abs(out - ref).max() < 1e-4
    assert np.abs(ref).max() > 0.1  # the comparison is not between two near-zero outputs


def test_port_is_frozen_and_differentiable_in_its_input(net):
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x = torch.rand(2, 3, 150, 150, requires_grad=True)
    net(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_reader_refuses_a_file_that_is_not_a_dlib_network(tmp_path):
    bad = tmp_path / "not_a_net.dat"
    bad.write_bytes(b"\x01\x05con_4" + b"\x01\x03" + bytes(40))
    with pytest.raises(ValueError, match="not_a_net.dat"):
        recognizers.load_dlib_resnet(bad)


def test_face_chip_crops_the_box_and_checks_it():
    x = torch.arange(64.0).view(1, 1, 8, 8).expand(1, 3, 8, 8) / 64
    same = recognizers.face_chip(x, (0, 0, 1, 1), size=8)
    assert torch.allclose(same, x, atol=1e-6)
    left = recognizers.face_chip(x, (0, 0, 0.5, 1), size=4)  # left half, every other row
    assert torch.allclose(left[0, 0], x[0, 0, ::2, :4] + (x[0, 0, 1::2, :4] - x[0, 0, ::2, :4]) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="x1 > x0"):
        recognizers.face_chip(x, (0.5, 0, 0.5, 1))
    with pytest.raises(ValueError, match="N x 3"):
        recognizers.face_chip(x[0], (0, 0, 1, 1))


@pytest.fixture(scope="module")
def small_sets():
    faces, dis = load_faceset("lfw158", 112), load_faceset("distractors", 112)
    return retrieval_sets(make_protocol(faces, len(dis)), faces, dis).subset(30, 300)


@pytest.mark.parametrize("name", [n for n in zoo.names() if zoo.card(n)["backbone"] == "dlib_resnet"])
def test_shipped_recognizer_engines_retrieve_well(name, small_sets):
    c = zoo.card(name)
    assert c["role"] == "victim"
    model = zoo.load(name)
    assert model.bits == c["bits"] and not model.training
    sets = small_sets
    q, db = model.encode(sets.query_images), model.encode(sets.db_images)
    assert set(q.unique().tolist()) <= {-1.0, 1.0}
    m = mean_average_precision(hamming_distance(q, db), sets.query_labels, sets.db_labels)
    assert m > 0.5, f"{name}: mAP@all {m:.3f} on a small open-set subset"


def test_recognizer_engine_save_load_round_trip(tmp_path, net):
    model = recognizers.RecognizerHash(16, (0.1, 0.15, 0.9, 0.95), net=net)
    model.fit_itq(torch.randn(200, 128), seed=0)
    info = {"role": "victim", "objective": "itq", "seed": 0,
            "network": {"sha256": sha256_file(teacher.model_dir() / teacher.DLIB_WEIGHTS)}}
    zoo.save(model, info, "tiny_real", folder=tmp_path)
    back = zoo.load("tiny_real", folder=tmp_path)
    assert back.chip_box == model.chip_box and back.bits == 16
    x = torch.rand(3, 3, 112, 112)
    assert torch.equal(back.encode(x), model.encode(x))
    assert not list(tmp_path.glob("*.tmp"))


def test_recognizer_engine_refuses_another_network(tmp_path, monkeypatch):
    name = next(n for n in zoo.names() if zoo.card(n)["backbone"] == "dlib_resnet")
    fake = tmp_path / teacher.DLIB_WEIGHTS
    fake.write_bytes(b"something else")
    monkeypatch.setattr(teacher, "model_dir", lambda: tmp_path)
    with pytest.raises(ValueError, match="sha256"):
        zoo.load(name)
