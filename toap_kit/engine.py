"""The face search engine over the shipped database: what ``verify`` and the demo search.

The database is the open-set protocol's database (``data.make_protocol`` with seed 0): the
photos of the evaluation identities, whom no shipped model, Compression Generator or
perturbation ever saw, plus 2,000 one-photo distractors, all as ``DISPLAY`` x ``DISPLAY``
face crops. Under each zoo model it is a table of binary codes searched by Hamming distance
through the kit's face index (``index.open_index("faiss")``: in memory, exact; every exact
backend of ``toap_kit.index`` gives the same top k, ties broken by database row, lowest first;
``toap crawl`` builds a persistent index of your own photos).

    >>> from toap_kit import engine
    >>> codes = engine.db_codes("dlib_itq_32")            # 2775 x 32 int8 in {-1, +1}: instant
    >>> eng = engine.Engine()                             # the faces too (for galleries)
    >>> eng.search(face, "dlib_itq_32").names             # top 10 identities for a 3 x 112 x 112 face

**Where the database codes come from** (``db_codes``): encoding 2,775 faces takes about a
minute per dlib engine on 2 cores, so the codes of every zoo model are shipped in
``SHIPPED_CODES`` (bit-packed, about 100 KB; ``python -m toap_kit.engine`` rewrites them and
``make artifacts`` calls it; a test re-encodes a sample with the models and compares). Each
model's codes carry a key, the sha256 of the model's card checksum and of the face sets'
manifests: a retrained model or changed data never reads stale codes. Without shipped codes for
a model (or with a stale key) they are encoded once, only for the model asked, and cached in
``CACHE_DIR`` (git-ignored ``outputs/``).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from . import index as face_index
from . import zoo
from .config import OUTPUT_DIR
from .data import DATA_DIR, check_pixels, load_faceset, make_protocol, retrieval_sets
from .store import load_checked, read_card, save_with_card

__all__ = ["CACHE_DIR", "DEFAULT_ENGINE", "DISPLAY", "Engine", "SHIPPED_CODES", "SearchResult", "database_key",
           "db_codes", "model", "write_shipped_codes"]

log = logging.getLogger(__name__)

DISPLAY = 112
"""Side of the face crops the engines encode (and the demo's galleries show)."""
DEFAULT_ENGINE = "dlib_itq_32"
"""The engine shown first: a hash layer on a real face recognizer (dlib's ResNet)."""
SHIPPED_CODES = DATA_DIR / "engine" / "db_codes.safetensors"
"""Every zoo model's codes of the shipped database, bit-packed; its card ``db_codes.json``
holds each model's ``database_key``."""
CACHE_DIR = OUTPUT_DIR / "verify-cache"
"""Codes encoded on this machine (a model without shipped codes), one ``.npy`` per model and key."""
_FACE_SETS = ("lfw158", "distractors")


@lru_cache(maxsize=None)
def model(name: str) -> torch.nn.Module:
    """Zoo model ``name`` (eval mode), loaded once per process."""
    return zoo.load(name)


def database_key(name: str) -> str:
    """16 hex digits naming the codes of the shipped database under model ``name``: a hash of
    the model card's sha256, ``DISPLAY``, the protocol and the face sets' manifests."""
    h = hashlib.sha256(f"{zoo.card(name)['sha256']} {DISPLAY} open-set seed 0".encode())
    for face_set in _FACE_SETS:
        h.update((DATA_DIR / face_set / "manifest.csv").read_bytes())
    return h.hexdigest()[:16]


@lru_cache(maxsize=1)
def _database() -> tuple:
    """``(sets, query_names, db_names)`` of the open-set database (loads 2,775 + 174 faces)."""
    faces = load_faceset(_FACE_SETS[0], DISPLAY)
    dis = load_faceset(_FACE_SETS[1], DISPLAY)
    sets = retrieval_sets(make_protocol(faces, len(dis)), faces, dis)
    names = faces.names()
    query_names = [faces.identities[int(i)] for i in sets.query_labels]
    db_names = [names[int(s)] if s >= 0 else dis.identities[int(-1 - s)] for s in sets.db_source]
    return sets, query_names, db_names


def _encode(name: str) -> np.ndarray:
    """``N x bits`` int8 codes of the database under model ``name`` (slow: loads and encodes)."""
    with torch.no_grad():
        return model(name).encode(_database()[0].db_images).numpy().astype(np.int8)


@lru_cache(maxsize=1)
def _shipped() -> tuple[dict, dict[str, torch.Tensor]]:
    """The shipped codes' card and tensors (empty when the file is missing or damaged)."""
    card_file = SHIPPED_CODES.with_suffix(".json")
    if not card_file.is_file():
        return {}, {}
    try:
        card = read_card(card_file, ("keys", "sha256"))
        return card, load_checked(SHIPPED_CODES, card["sha256"])
    except (OSError, ValueError) as e:
        log.warning("ignoring the shipped database codes: %s", e)
        return {}, {}


def _unpack(packed: torch.Tensor, bits: int) -> np.ndarray:
    return np.unpackbits(packed.numpy(), axis=1, count=bits).astype(np.int8) * 2 - 1


def db_codes(name: str) -> np.ndarray:
    """``N x bits`` int8 codes in {-1, +1} of the shipped database under zoo model ``name``,
    rows in the order of ``Engine.sets.db_images``: the shipped codes when their key is the
    model's ``database_key``, else ``CACHE_DIR``'s, else encoded now (only this model) and
    cached there."""
    key = database_key(name)
    card, tensors = _shipped()
    if card.get("keys", {}).get(name) == key and name in tensors:
        return _unpack(tensors[name], int(card["bits"][name]))
    f = CACHE_DIR / f"{name}-{key}.npy"
    if f.is_file():
        try:
            return np.load(f, allow_pickle=False)
        except (OSError, ValueError) as e:
            log.warning("ignoring a broken cache file %s: %s", f, e)
    log.info("encoding the shipped database with %s (no shipped codes for this model; cached in %s)", name, CACHE_DIR)
    codes = _encode(name)
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f".{f.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as fh:
            np.save(fh, codes, allow_pickle=False)
        os.replace(tmp, f)
    except OSError as e:
        log.warning("cannot cache the database codes in %s: %s", f.parent, e)
    return codes


def write_shipped_codes(names: list[str] | None = None) -> Path:
    """Encode the database under every zoo model (or ``names``, keeping the others' shipped
    codes) and write ``SHIPPED_CODES`` and its card atomically. Returns the tensor file."""
    card, tensors = _shipped()
    keys, bits = dict(card.get("keys", {})), dict(card.get("bits", {}))
    tensors = {n: t for n, t in tensors.items() if n in zoo.names()}
    for name in names or zoo.names():
        codes = _encode(name)
        tensors[name] = torch.from_numpy(np.packbits(codes > 0, axis=1))
        keys[name], bits[name] = database_key(name), int(codes.shape[1])
        log.info("encoded the database with %s: %d x %d bits", name, *codes.shape)
    card = {"what": "codes of the open-set database (data.make_protocol seed 0: evaluation identities' photos "
                    "+ 2,000 distractors) under each zoo model, np.packbits of code > 0 per row",
            "rows": int(len(_database()[0].db_images)), "keys": keys, "bits": bits,
            "made_by": "python -m toap_kit.engine"}
    path, _ = save_with_card(tensors, card, SHIPPED_CODES.parent, SHIPPED_CODES.stem)
    _shipped.cache_clear()
    return path


@dataclass
class SearchResult:
    """Top-k of one query: database indices, Hamming distances, identity names, and whether
    each is the query's identity (``None`` for an uploaded photo of unknown identity)."""

    indices: list[int]
    distances: list[int]
    names: list[str]
    correct: list[bool] | None


class Engine:
    """A face search engine over the open-set database, one code table per model.

    Args:
        models: zoo model names to offer (default: every zoo model).
        default: the model shown first (default: ``DEFAULT_ENGINE`` if offered, else the one
            with the best clean mAP).

    Attributes:
        sets: the ``data.RetrievalSets`` (``sets.db_images``: ``N x 3 x 112 x 112`` in [0, 1]);
        query_names, db_names: the identity of each query and database face.
    """

    def __init__(self, models: list[str] | None = None, default: str | None = None):
        self.sets, self.query_names, self.db_names = _database()
        known = zoo.names()
        if not known:
            raise FileNotFoundError("no models in data/zoo: run `make artifacts`")
        unknown = [m for m in models or [] if m not in known]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; choose from {known}")
        self.models = list(models) if models else known
        if default is None:
            default = DEFAULT_ENGINE if DEFAULT_ENGINE in self.models else max(
                self.models, key=lambda n: zoo.card(n)["clean_map_all"]["open"])
        if default not in self.models:
            raise ValueError(f"default model {default!r} is not among {self.models}")
        self.default_model = default

    @lru_cache(maxsize=None)
    def _model_and_index(self, name: str) -> tuple[torch.nn.Module, face_index.FaceIndex]:
        """Model ``name`` and the database's codes under it in an in-memory exact index (row id =
        row of ``sets.db_images``; metadata: the identity)."""
        m = model(name)
        ix = face_index.open_index("faiss", bits=m.bits, engine=name)
        ix.add(db_codes(name), [{"identity": n} for n in self.db_names])
        return m, ix

    def search(self, image: torch.Tensor, model_name: str, k: int = 10,
               identity: str | None = None) -> SearchResult:
        """Top-``k`` database faces for one ``3 x H x W`` [0, 1] face crop (float64 is
        converted; uint8, NaN or out-of-range pixels raise, see ``data.check_pixels``)."""
        if model_name not in self.models:
            raise ValueError(f"unknown model {model_name!r}; choose one of {self.models}")
        image = check_pixels(image, "query image", ndim=(3,))
        m, index = self._model_and_index(model_name)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(index):
            raise ValueError(f"k must be in 1..{len(index)}, got {k!r}")
        with torch.no_grad():
            hits = index.search(m.encode(image[None]), k)
        i, d = hits.ids[0], hits.distances[0]
        names = [self.db_names[j] for j in i]
        correct = None if identity is None else [n == identity for n in names]
        return SearchResult(i.tolist(), d.tolist(), names, correct)

    def query(self, n: int) -> tuple[torch.Tensor, str]:
        """Shipped query ``n`` (an integer; ``2.0`` is accepted, ``2.5`` is not): its image
        and identity."""
        whole = isinstance(n, (int, np.integer)) or (isinstance(n, (float, np.floating)) and float(n).is_integer())
        if isinstance(n, bool) or not whole:
            raise ValueError(f"query number must be a whole number, got {n!r}")
        n = int(n)
        if not 0 <= n < len(self.query_names):
            raise IndexError(f"query index must be in 0..{len(self.query_names) - 1}, got {n}")
        return self.sets.query_images[n], self.query_names[n]


def main(argv: list[str] | None = None) -> None:
    """``python -m toap_kit.engine [--only NAME ...]``: rewrite the shipped database codes."""
    from .config import setup

    p = argparse.ArgumentParser(description="encode the shipped database under the zoo models into "
                                            f"{SHIPPED_CODES.relative_to(DATA_DIR.parent)}")
    p.add_argument("--only", nargs="*", help="only these models (the others' codes are kept)")
    args = p.parse_args(argv)
    setup(0)
    write_shipped_codes(args.only)


if __name__ == "__main__":
    main()
