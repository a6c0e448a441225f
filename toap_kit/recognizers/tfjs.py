"""A small reader of TensorFlow.js graph models: ``model.json`` + weight shards as a torch module.

A TF.js graph model (``"format": "graph-model"``) is a frozen TensorFlow ``GraphDef`` written as
JSON: every node has a name, an ``op``, its ``input`` node names and attributes; the weights are
``Const`` nodes whose values live, in the order of ``weightsManifest``, in little-endian binary
shards (float32, int32, or float32 stored as float16 / affine-quantised uint8 or uint16).

``TfjsGraph`` evaluates such a graph node by node in torch, so gradients flow through it (what an
attack needs). It knows only the ops of the face networks the kit reads (``OPS``); an unknown op
is refused when the graph is loaded, not half-way through a forward pass. Tensors keep
TensorFlow's NHWC layout between ops; only the convolutions permute to torch's NCHW and back.

Two traps, both tested: TensorFlow's ``SAME`` padding puts the odd pixel *after* the input
(``pad_before = total // 2``), which at stride 2 differs from a symmetric pad; and a graph's
useful output need not be a sink (``faceres``' descriptor feeds its age and gender heads), so
outputs are asked for by node name.
"""
from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["OPS", "TfjsGraph", "read_weights", "same_padding"]

_DTYPES = {"float32": np.float32, "int32": np.int32, "float16": np.float16, "uint8": np.uint8, "uint16": np.uint16}


def read_weights(manifest: list[dict], folder: str | Path) -> dict[str, np.ndarray]:
    """The named weight arrays of a TF.js ``weightsManifest``, read from its shards in ``folder``.

    Each group's shards are concatenated; its weights follow one another in manifest order.
    Quantised weights (``quantization: {dtype: float16}`` or ``{dtype: uint8|uint16, scale,
    min}``) come back in their original dtype (float32).
    """
    out: dict[str, np.ndarray] = {}
    for group in manifest:
        raw = b"".join((Path(folder) / p).read_bytes() for p in group["paths"])
        pos = 0
        for w in group["weights"]:
            q = w.get("quantization")
            stored = np.dtype(_DTYPES[q["dtype"] if q else w["dtype"]])
            n = int(np.prod(w["shape"], dtype=np.int64))
            if pos + n * stored.itemsize > len(raw):
                raise ValueError(f"weight {w['name']!r} runs past the end of its shards ({len(raw)} bytes)")
            a = np.frombuffer(raw, dtype=stored.newbyteorder("<"), count=n, offset=pos).reshape(w["shape"])
            pos += n * stored.itemsize
            if q and q["dtype"] in ("uint8", "uint16"):
                a = a.astype(np.float32) * np.float32(q["scale"]) + np.float32(q["min"])
            out[w["name"]] = a.astype(_DTYPES[w["dtype"]])
        if pos != len(raw):
            raise ValueError(f"shards {group['paths']} hold {len(raw)} bytes, the manifest describes {pos}")
    return out


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's ``SAME`` padding of one axis: ``(before, after)``, the odd pixel after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _attr(node: dict, key: str, default=None):
    """A node attribute as a Python value (strings base64-decoded, int lists as ints)."""
    a = node.get("attr", {}).get(key)
    if a is None:
        return default
    if "s" in a:
        return base64.b64decode(a["s"]).decode()
    if "list" in a:
        lst = a["list"]
        if "i" in lst:
            return [int(v) for v in lst["i"]]
        if "s" in lst:
            return [base64.b64decode(v).decode() for v in lst["s"]]
        return []
    for k, cast in (("i", int), ("f", float), ("b", bool)):
        if k in a:
            return cast(a[k])
    return default


def _conv(x: torch.Tensor, w: torch.Tensor, node: dict, depthwise: bool) -> torch.Tensor:
    """``Conv2D`` / ``DepthwiseConv2dNative`` on NHWC ``x``; ``w``: HWIO (HW C M for depthwise)."""
    if _attr(node, "data_format", "NHWC") != "NHWC":
        raise ValueError(f"{node['name']}: only NHWC convolutions are supported")
    _, sh, sw, _ = _attr(node, "strides", [1, 1, 1, 1])
    _, dh, dw, _ = _attr(node, "dilations", [1, 1, 1, 1])
    kh, kw = w.shape[:2]
    x = x.permute(0, 3, 1, 2)
    padding = _attr(node, "padding", "VALID")
    if padding == "SAME":
        (t, b), (l, r) = same_padding(x.shape[2], kh, sh, dh), same_padding(x.shape[3], kw, sw, dw)
        x = F.pad(x, (l, r, t, b))
    elif padding == "EXPLICIT":
        e = _attr(node, "explicit_paddings")  # NHWC pairs
        x = F.pad(x, (e[4], e[5], e[2], e[3]))
    elif padding != "VALID":
        raise ValueError(f"{node['name']}: padding {padding!r} is not supported")
    if depthwise:
        c, m = w.shape[2], w.shape[3]
        y = F.conv2d(x, w.permute(2, 3, 0, 1).reshape(c * m, 1, kh, kw), stride=(sh, sw), dilation=(dh, dw), groups=c)
    else:
        y = F.conv2d(x, w.permute(3, 2, 0, 1), stride=(sh, sw), dilation=(dh, dw))
    return y.permute(0, 2, 3, 1)


def _fused(y: torch.Tensor, node: dict, args: list[torch.Tensor]) -> torch.Tensor:
    """The ops fused after a convolution or matmul (``_Fused*``): BiasAdd, then an activation."""
    for op in _attr(node, "fused_ops", []):
        if op == "BiasAdd":
            y = y + args.pop(0)
        elif op == "Relu":
            y = F.relu(y)
        elif op == "Relu6":
            y = y.clamp(0, 6)
        elif op == "Prelu":
            alpha = args.pop(0)
            y = torch.where(y >= 0, y, alpha * y)
        else:
            raise ValueError(f"{node['name']}: fused op {op!r} is not supported")
    return y


def _pad(x: torch.Tensor, p: torch.Tensor, node: dict) -> torch.Tensor:
    pairs = p.to(torch.int64).tolist()  # one (before, after) per NHWC axis
    return F.pad(x, [v for pair in reversed(pairs) for v in pair])


def _reshape(x: torch.Tensor, shape: torch.Tensor, node: dict) -> torch.Tensor:
    s = shape.to(torch.int64).tolist()
    if s and s[0] not in (-1, x.shape[0]) and s[0] == 1:
        s[0] = x.shape[0]  # a batch of 1 frozen into the graph: keep the batch
    return x.reshape(s)


def _matmul(node: dict, a: torch.Tensor, b: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
    a = a.transpose(-1, -2) if _attr(node, "transpose_a", False) else a
    b = b.transpose(-1, -2) if _attr(node, "transpose_b", False) else b
    return _fused(a @ b, node, list(args))


OPS: dict[str, Callable] = {
    "Identity": lambda node, x: x,
    "Add": lambda node, a, b: a + b,
    "AddV2": lambda node, a, b: a + b,
    "BiasAdd": lambda node, a, b: a + b,
    "Sub": lambda node, a, b: a - b,
    "Mul": lambda node, a, b: a * b,
    "RealDiv": lambda node, a, b: a / b,
    "Maximum": lambda node, a, b: torch.maximum(a, b),
    "Minimum": lambda node, a, b: torch.minimum(a, b),
    "Relu": lambda node, x: F.relu(x),
    "Relu6": lambda node, x: x.clamp(0, 6),
    "Sigmoid": lambda node, x: torch.sigmoid(x),
    "Softmax": lambda node, x: torch.softmax(x, -1),
    "Pad": lambda node, x, p: _pad(x, p, node),
    "Reshape": lambda node, x, s: _reshape(x, s, node),
    "Mean": lambda node, x, axes: x.mean([int(a) for a in axes.reshape(-1).tolist()],
                                         keepdim=_attr(node, "keep_dims", False)),
    "MatMul": _matmul,
    "_FusedMatMul": _matmul,
    "Conv2D": lambda node, x, w: _conv(x, w, node, False),
    "DepthwiseConv2dNative": lambda node, x, w: _conv(x, w, node, True),
    "_FusedConv2D": lambda node, x, w, *args: _fused(_conv(x, w, node, False), node, list(args)),
    "FusedDepthwiseConv2dNative": lambda node, x, w, *args: _fused(_conv(x, w, node, True), node, list(args)),
}
"""Every op the reader evaluates: ``OPS[op](node, *inputs)`` on torch tensors (NHWC)."""


class TfjsGraph(nn.Module):
    """A TF.js graph model as a torch module: ``forward(x) -> {output name: tensor}``.

    Args:
        model_json: path of the graph model's ``model.json``; its shards are read beside it.
        outputs: the node names to return (default: the signature's outputs); a ``:0`` suffix
            is accepted.

    ``forward`` takes the graph's one input (NHWC float32, what the original graph takes) and
    returns the asked outputs. The weights are buffers (float32); the module has no parameters
    to train and is in eval mode.
    """

    def __init__(self, model_json: str | Path, outputs: list[str] | None = None):
        super().__init__()
        path = Path(model_json)
        spec = json.loads(path.read_text())
        if spec.get("format") != "graph-model":
            raise ValueError(f"{path}: not a TF.js graph model (format {spec.get('format')!r})")
        self.nodes = {n["name"]: n for n in spec["modelTopology"]["node"]}
        inputs = [n for n in self.nodes.values() if n["op"] == "Placeholder"]
        if len(inputs) != 1:
            raise ValueError(f"{path}: expected one input, found {len(inputs)}")
        self.input_name = inputs[0]["name"]
        wanted = outputs or list(spec.get("signature", {}).get("outputs", {}))
        self.outputs = [o.split(":")[0] for o in wanted]
        missing = [o for o in self.outputs if o not in self.nodes]
        if missing:
            raise ValueError(f"{path}: no node named {', '.join(missing)}")
        self.order = self._order()
        unknown = sorted({self.nodes[n]["op"] for n in self.order} - set(OPS) - {"Const", "Placeholder"})
        if unknown:
            raise ValueError(f"{path}: ops not supported by the reader: {', '.join(unknown)}")
        weights = read_weights(spec["weightsManifest"], path.parent)
        self._const = {}
        for i, name in enumerate(n for n in self.order if self.nodes[n]["op"] == "Const"):
            if name not in weights:
                raise ValueError(f"{path}: constant {name!r} has no weights in the manifest")
            key = f"c{i}"
            self.register_buffer(key, torch.from_numpy(np.ascontiguousarray(weights[name])))
            self._const[name] = key
        self.eval()

    def _order(self) -> list[str]:
        """The nodes the outputs depend on, each after its inputs (depth-first, no recursion)."""
        order, state = [], {}
        for out in self.outputs:
            stack = [(out, False)]
            while stack:
                name, done = stack.pop()
                if done:
                    if state.get(name) != 2:
                        state[name] = 2
                        order.append(name)
                    continue
                if state.get(name):
                    if state[name] == 1:
                        raise ValueError(f"the graph has a cycle through {name!r}")
                    continue
                state[name] = 1
                stack.append((name, True))
                for inp in reversed(self.nodes[name].get("input", [])):
                    src = inp.split(":")[0].lstrip("^")
                    if src not in self.nodes:
                        raise ValueError(f"node {name!r} reads {src!r}, which is not in the graph")
                    if state.get(src) != 2:
                        stack.append((src, False))
        return order

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the graph on its input ``x`` (NHWC float32, as the original graph takes it)."""
        values: dict[str, torch.Tensor] = {}
        for name in self.order:
            node = self.nodes[name]
            if node["op"] == "Placeholder":
                values[name] = x
            elif node["op"] == "Const":
                values[name] = getattr(self, self._const[name])
            else:
                args = [values[i.split(":")[0]] for i in node.get("input", []) if not i.startswith("^")]
                values[name] = OPS[node["op"]](node, *args)
        return {o: values[o] for o in self.outputs}
