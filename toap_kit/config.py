"""One switch sizes everything: ``toap_kit.setup(seed=0)`` returns the run's ``Config``.

Fast mode (``TOAP_FAST=1`` in the environment, as ``make test`` and CI set it) shrinks every
size so that each notebook runs in a few minutes on 2 CPU cores; without it a reader gets the
full run. Notebooks read sizes only from the returned config.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Config", "device", "setup", "seed_everything"]

OUTPUT_DIR = Path(__file__).resolve().parent.parent / "outputs"


def device() -> torch.device:
    """The one device switch: ``TOAP_DEVICE`` if set (``cpu``, ``cuda``, ``cuda:1``, ``mps``),
    else CUDA when present, else the CPU. Everything heavy (``toap``, ``refine``, ``artifacts``,
    ``results``) runs its networks there; every test runs on the CPU. Every entry point (the
    ``toap`` commands, ``batch.protect_files``, the demo's ``build_demo``, ``setup``) calls it
    first, so that a bad value is refused once, before any work.

    Raises:
        ValueError: (one line, naming the value) not a torch device, a device type the kit does
            not run on, ``cuda`` without a CUDA device, ``cuda:N`` with N at or past
            ``torch.cuda.device_count()``, ``mps`` where Metal is not available.
    """
    want = os.environ.get("TOAP_DEVICE", "").strip()
    if not want:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(want)
    except RuntimeError:
        raise ValueError(f"TOAP_DEVICE={want!r} is not a torch device (try cpu or cuda)") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"TOAP_DEVICE={want!r}: the kit runs on cpu, cuda or mps, not {dev.type}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"TOAP_DEVICE={want!r} but torch sees no CUDA device here (try cpu)")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"TOAP_DEVICE={want!r} but torch sees only {n} CUDA device{'s' * (n != 1)} here "
                             f"(cuda:0{f' to cuda:{n - 1}' if n > 1 else ''})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"TOAP_DEVICE={want!r} but Metal (mps) is not available here (try cpu)")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Config:
    """Sizes of a run. ``fast`` is read from ``TOAP_FAST``; ``out`` is a git-ignored folder
    for anything a notebook writes."""

    seed: int
    fast: bool
    train_epochs: int        # epochs of a model trained live in a notebook
    n_train_images: int      # training faces used live in a notebook (0 = all)
    n_eval_queries: int      # evaluation queries (0 = all)
    n_distractors: int       # distractors in an evaluation database (0 = all 2,000)
    attack_steps: int        # PGD / universal-perturbation steps
    out: Path = OUTPUT_DIR


def setup(seed: int = 0, fast: bool | None = None, threads: int | None = None) -> Config:
    """Seed everything, configure logging, and return the run's sizes.

    Args:
        seed: the one seed of the run.
        fast: force fast mode on/off; default: ``TOAP_FAST`` in the environment.
        threads: torch CPU threads (default: torch's choice).

    Raises:
        ValueError: a bad ``TOAP_DEVICE`` (``device``).
    """
    if fast is None:
        fast = os.environ.get("TOAP_FAST", "0").lower() not in ("", "0", "false", "no")
    device()  # a bad TOAP_DEVICE is refused here, before the run's work
    seed_everything(seed)
    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    OUTPUT_DIR.mkdir(exist_ok=True)
    if fast:
        return Config(seed, True, train_epochs=3, n_train_images=600, n_eval_queries=60, n_distractors=500,
                      attack_steps=10)
    return Config(seed, False, train_epochs=15, n_train_images=0, n_eval_queries=0, n_distractors=0,
                  attack_steps=50)
