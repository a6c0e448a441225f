"""Shipped tensors on disk: ``<name>.safetensors`` plus ``<name>.json``, a card that records the
tensor file's sha256.

Both files are written atomically (temporary file, then rename), so an interrupted save never
leaves a half-written artifact; a tensor file is loaded only if it matches its card's checksum.
The zoo, the Compression Generator and perturbations are stored this way (no pickle).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .data import sha256_file

__all__ = ["load_checked", "read_card", "save_with_card"]


def save_with_card(tensors: dict[str, torch.Tensor], card: dict, folder: str | Path,
                   name: str) -> tuple[Path, dict]:
    """Write ``folder/name.safetensors`` and ``folder/name.json`` (``card`` plus the tensor
    file's ``sha256``). Returns the tensor file and the card as written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{name}.safetensors"
    tmp = folder / f"{name}.safetensors.tmp"
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(weights)
    card = {**card, "sha256": sha256_file(weights)}
    tmp_card = folder / f"{name}.json.tmp"
    tmp_card.write_text(json.dumps(card, indent=1))
    tmp_card.replace(folder / f"{name}.json")
    return weights, card


def read_card(path: str | Path, required: tuple[str, ...] = ()) -> dict:
    """The JSON card at ``path`` as a dict holding at least the keys ``required``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a JSON object or lacks a required key (names the file).
    """
    path = Path(path)
    try:
        card = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"card {path} is not valid JSON ({e}): the file is damaged") from e
    if not isinstance(card, dict):
        raise ValueError(f"card {path} must hold a JSON object, got {type(card).__name__}")
    missing = [k for k in required if k not in card]
    if missing:
        raise ValueError(f"card {path} lacks the field(s) {missing}: the file is damaged or not a card")
    return card


def load_checked(weights: str | Path, sha256: str | None) -> dict[str, torch.Tensor]:
    """The tensors of ``weights`` if the file's sha256 is ``sha256`` (from its card); else
    ``ValueError`` naming the file: the card has no checksum, the file was changed or damaged,
    or it is not a safetensors file."""
    if not isinstance(sha256, str):
        raise ValueError(f"the card of {weights} has no sha256 checksum, refusing to load it")
    if sha256_file(weights) != sha256:
        raise ValueError(f"{weights} does not match the sha256 in its card: the file was changed "
                         "or damaged, refusing to load it")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read tensor file {weights}: {e}") from e
