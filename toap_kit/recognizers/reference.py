"""Is the torch reader of a TF.js graph the graph? Parity against TensorFlow.js itself.

``parity_inputs(side)`` are two fixed NHWC inputs in 0..255: a shipped face photo and seeded
noise. ``tfjs_outputs`` runs the original graph on them with pure-JS ``@tensorflow/tfjs`` in node
(``tfjs_reference.js`` beside this file); ``record`` stores those outputs in
``data/recognizers/parity.safetensors`` so that ``check`` can compare the torch reader with them
on a machine without node. ``python -m toap_kit.recognizers parity`` runs both.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..data import DATA_DIR, load_image
from . import SPECS
from .tfjs import TfjsGraph
from .weights import model_files

__all__ = ["PARITY_FILE", "TOLERANCE", "check", "node_tfjs", "parity_inputs", "record", "tfjs_outputs"]

PARITY_FILE = DATA_DIR / "recognizers" / "parity.safetensors"
TOLERANCE = 1e-4
"""Largest absolute difference allowed between the reader and TF.js, relative to the output's
largest magnitude (at least 1)."""
_SCRIPT = Path(__file__).with_name("tfjs_reference.js")
TFJS_NETWORKS = tuple(n for n, s in SPECS.items() if s.output)


def parity_inputs(side: int) -> np.ndarray:
    """``2 x side x side x 3`` float32 in 0..255: the first shipped 250x250 photo resized, and
    noise from ``numpy.random.default_rng(0)``."""
    photo = sorted((DATA_DIR / "photos250").rglob("*.jpg"))[0]
    face = load_image(photo, side).permute(1, 2, 0).numpy() * 255
    noise = np.random.default_rng(0).random((side, side, 3)) * 255
    return np.stack([face, noise]).astype(np.float32)


def node_tfjs() -> str | None:
    """Why TF.js cannot run here (no node, or ``@tensorflow/tfjs`` not resolvable through
    ``NODE_PATH``), or None when it can."""
    if shutil.which("node") is None:
        return "node is not installed"
    ok = subprocess.run(["node", "-e", "require.resolve('@tensorflow/tfjs')"], capture_output=True, env=os.environ)
    if ok.returncode:
        return ("@tensorflow/tfjs is not resolvable: `npm install --prefix DIR @tensorflow/tfjs@4.22.0` and set "
                "NODE_PATH=DIR/node_modules")
    return None


def tfjs_outputs(network: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """The original graph's descriptor of NHWC ``x`` (0..255 as the graph takes it), run by TF.js."""
    why = node_tfjs()
    if why:
        raise RuntimeError(f"TF.js cannot run: {why}")
    output = SPECS[network].output
    with tempfile.TemporaryDirectory(prefix="toap-tfjs-") as tmp:
        inp, out = Path(tmp) / "x.f32", Path(tmp) / "y.json"
        np.ascontiguousarray(x, dtype="<f4").tofile(inp)
        n, h, w, _ = x.shape
        run = subprocess.run(["node", str(_SCRIPT), str(model_files(network)), str(inp), str(n), str(h), str(w),
                              output, str(out)], capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"TF.js failed on {network}: {run.stderr.strip()[-500:]}")
        res = json.loads(out.read_text())
    return {output: np.array(res[output]["data"], np.float32).reshape(res[output]["shape"])}


def _torch_outputs(network: str, x: np.ndarray) -> np.ndarray:
    spec = SPECS[network]
    with torch.no_grad():
        return TfjsGraph(model_files(network), [spec.output])(torch.from_numpy(x))[spec.output].numpy()


def _error(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / max(1.0, float(np.abs(ref).max())))


def record() -> dict[str, float]:
    """Run TF.js on ``parity_inputs`` for every TF.js network, store its outputs in
    ``PARITY_FILE`` and return the reader's error against them (relative, see ``TOLERANCE``)."""
    refs, errors = {}, {}
    for name in TFJS_NETWORKS:
        x = parity_inputs(SPECS[name].input_size)
        ref = tfjs_outputs(name, x)[SPECS[name].output]
        refs[name] = torch.from_numpy(ref)
        errors[name] = _error(_torch_outputs(name, x), ref)
    tmp = PARITY_FILE.with_suffix(".tmp")
    save_file(refs, str(tmp), metadata={"tfjs": "@tensorflow/tfjs 4.22.0, cpu backend"})
    tmp.replace(PARITY_FILE)
    return errors


def check() -> dict[str, float]:
    """The reader's error (relative, see ``TOLERANCE``) against the recorded TF.js outputs."""
    refs = load_file(str(PARITY_FILE))
    return {name: _error(_torch_outputs(name, parity_inputs(SPECS[name].input_size)), refs[name].numpy())
            for name in TFJS_NETWORKS}
