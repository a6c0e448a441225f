"""The shipped hash-model zoo: names, JSON cards, loading, and how the zoo is trained.

Each model is ``data/zoo/<name>.safetensors`` (weights) plus ``data/zoo/<name>.json`` (its
card: architecture, objective, bits, input size, training data, seed, measured clean mAP,
sha256 of the weights). Models have a fixed **role**: *surrogates* may be used to make a
perturbation; *victims* never are, and include a backbone (MobileNet) and an objective (CSQ)
that no surrogate has, so black-box transfer is measured honestly.

    >>> import toap_kit
    >>> toap_kit.zoo.names()[:2]
    ['vgg_dpsh_32', 'resnet_hashnet_32']
    >>> model = toap_kit.zoo.load("vgg_dpsh_32")   # model.encode(x) -> N x 32 codes in {-1,+1}
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import retrieval, teacher
from .data import DATA_DIR, load_faceset, make_protocol, make_sets, retrieval_sets, split_queries
from .hashing import TrainConfig, make_objective, train_hash_model
from .models import HashNet, build_model
from .store import load_checked, save_with_card

__all__ = ["ZOO_DIR", "ZOO_SPECS", "ModelSpec", "build_zoo", "card", "load", "names", "save",
           "surrogates", "victims"]

log = logging.getLogger(__name__)
ZOO_DIR = DATA_DIR / "zoo"
N_VAL_IDENTITIES = 10  # training identities held out of training, for early stopping


@dataclass(frozen=True)
class ModelSpec:
    """What to train: backbone x objective x bits, and the model's role."""

    name: str
    backbone: str
    objective: str
    bits: int
    role: str
    input_size: int = 48
    epochs: int = 30


# Trained on 2 CPU cores: the last two victims got 12 epochs instead of 30 to fit the budget
# (their cards record it); validation mAP was still rising when training stopped (README, Results).
ZOO_SPECS = [
    ModelSpec("vgg_dpsh_32", "vgg", "dpsh", 32, "surrogate"),
    ModelSpec("resnet_hashnet_32", "resnet", "hashnet", 32, "surrogate"),
    ModelSpec("resnet_dpsh_16", "resnet", "dpsh", 16, "surrogate"),
    ModelSpec("mobilenet_csq_32", "mobilenet", "csq", 32, "victim"),
    ModelSpec("vgg_csq_64", "vgg", "csq", 64, "victim", epochs=12),
    ModelSpec("mobilenet_hashnet_32", "mobilenet", "hashnet", 32, "victim", epochs=12),
]


def names(folder: Path = ZOO_DIR) -> list[str]:
    """Names of the shipped models, in zoo order (surrogates first)."""
    order = [s.name for s in ZOO_SPECS]
    have = {p.stem for p in folder.glob("*.json")}
    return [n for n in order if n in have] + sorted(have - set(order))


def card(name: str, folder: Path = ZOO_DIR) -> dict:
    """The JSON card of model ``name`` as a dict (includes ``role``)."""
    path = folder / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"no model {name!r} in the zoo; available: {names(folder)}")
    return json.loads(path.read_text())


def surrogates(folder: Path = ZOO_DIR) -> list[str]:
    """Models a protector may use."""
    return [n for n in names(folder) if card(n, folder)["role"] == "surrogate"]


def victims(folder: Path = ZOO_DIR) -> list[str]:
    """Models that are never used to make a perturbation (black-box evaluation only)."""
    return [n for n in names(folder) if card(n, folder)["role"] == "victim"]


def load(name: str, folder: Path = ZOO_DIR) -> HashNet:
    """Model ``name`` in eval mode, its weights checked against the card's sha256."""
    c = card(name, folder)
    model = HashNet(c["backbone"], c["bits"], c["input_size"], c["width"])
    model.load_state_dict(load_checked(folder / f"{name}.safetensors", c["sha256"]))
    return model.eval()


def save(model: HashNet, info: dict, name: str, folder: Path = ZOO_DIR) -> Path:
    """Write ``model`` as safetensors + JSON card (atomically, see ``toap_kit.store``)."""
    c = {"name": name, "backbone": model.backbone_name, "bits": model.bits,
         "input_size": model.input_size, "width": model.width, **info}
    return save_with_card(model.state_dict(), c, folder, name)[0]


def _map(model: HashNet, sets) -> float:
    q, d = model.encode(sets.query_images), model.encode(sets.db_images)
    return retrieval.mean_average_precision(retrieval.hamming_distance(q, d), sets.query_labels, sets.db_labels)


def train_one(spec: ModelSpec, config: TrainConfig, progress: bool = True) -> tuple[HashNet, dict]:
    """Train one zoo model on the open-set protocol's training faces (see ``build_zoo``)."""
    faces = load_faceset("lfw158", spec.input_size)
    distractors = load_faceset("distractors", spec.input_size)
    proto = make_protocol(faces, len(distractors))
    t_faces, t_paths = teacher.load_embeddings("lfw158")
    t_dis, d_paths = teacher.load_embeddings("distractors")
    if t_paths != faces.paths or d_paths != distractors.paths:
        raise ValueError("cached teacher embeddings do not match the shipped images; run `make artifacts`")
    # hold N_VAL_IDENTITIES training identities out, for early stopping only
    val_names = set(proto.train_identities[::len(proto.train_identities) // N_VAL_IDENTITIES][:N_VAL_IDENTITIES])
    val_ids = {faces.identities.index(n) for n in val_names}
    train_idx = [i for i in proto.train if int(faces.labels[i]) not in val_ids]
    images = torch.cat([faces.images[train_idx], distractors.images])
    labels = torch.cat([faces.labels[train_idx], torch.full((len(distractors),), -1)])
    t = np.concatenate([t_faces[train_idx], t_dis])
    t = torch.from_numpy(t - t.mean(0))
    # validation: the held-out identities' first 3 images query their others + 500 distractors
    val = make_sets(faces, distractors, *split_queries(faces, sorted(val_ids)), n_distractors=500)
    n_classes = len(faces.identities)
    torch.manual_seed(config.seed)
    model = build_model(spec.backbone, spec.bits, spec.input_size)
    objective = make_objective(spec.objective, spec.bits, n_classes)
    history = train_hash_model(model, images, labels, t, objective, config,
                               validate=lambda m: _map(m, val), progress=progress)
    sets = retrieval_sets(proto, faces, distractors)
    closed = retrieval_sets(make_protocol(faces, len(distractors), kind="closed"), faces, distractors)
    info = {"role": spec.role, "objective": spec.objective,
            "training_data": {"protocol": "open-set, seed 0", "labelled_images": len(train_idx),
                              "training_identities": len(proto.train_identities) - len(val_ids),
                              "validation_identities": sorted(val_names),
                              "unlabelled_distractors_for_distillation": len(distractors),
                              "teacher": "dlib_face_recognition_resnet_model_v1"},
            "train_config": asdict(config), "seed": config.seed,
            "epochs_run": len(history), "best_val_map": max(r["val"] for r in history),
            "clean_map_all": {"open": round(_map(model, sets), 4), "closed": round(_map(model, closed), 4)}}
    return model, info


def build_zoo(force: bool = False, only: list[str] | None = None, config: TrainConfig | None = None) -> None:
    """Train and save every model of ``ZOO_SPECS`` (skipping saved ones unless ``force``)."""
    config = config or TrainConfig()
    for spec in ZOO_SPECS:
        if only and spec.name not in only:
            continue
        if not force and (ZOO_DIR / f"{spec.name}.json").is_file():
            log.info("%s exists, skipping", spec.name)
            continue
        log.info("training %s", spec.name)
        model, info = train_one(spec, replace(config, epochs=spec.epochs))
        save(model, info, spec.name)
        log.info("%s: %s", spec.name, info["clean_map_all"])
