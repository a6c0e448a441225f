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

__all__ = ["Config", "cpu_threads", "device", "fast_mode", "setup", "seed_everything"]

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


def _physical_cores() -> int | None:
    """Physical CPU cores listed in ``/proc/cpuinfo`` (distinct physical and core ids; hyper-threads
    share a core), or None where that is not known."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores = set()
    for block in text.split("\n\n"):
        fields = dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in block.splitlines()))
        if "core id" in fields:
            cores.add((fields.get("physical id"), fields["core id"]))
    return len(cores) or None


def cpu_threads() -> int:
    """Torch CPU threads for one ``toap`` command (the CLI sets them; a library caller keeps
    torch's own choice, or sets its own).

    ``TOAP_THREADS`` if set (a whole number >= 1); else, if ``OMP_NUM_THREADS`` is set, what
    torch made of it; else the idle physical cores: the physical cores among the CPUs this
    process may use, less the CPUs other processes keep busy (the 1-minute load average,
    rounded), at least 1. Why: torch's threads of one operation wait for each other, so one
    thread that shares its core with another process slows them all. Measured (issue 28,
    ``--refine``, one 250x250 face, 100 steps, dlib's network loaded, on a 2-core machine whose
    load average was 6 to 7): 1 thread 4.5 and 4.8 s, 2 threads (torch's default there) 38.7 and
    109.2 s.

    Raises:
        ValueError: ``TOAP_THREADS`` is not a whole number >= 1.
    """
    given = os.environ.get("TOAP_THREADS", "").strip()
    if given:
        if not given.isdigit() or int(given) < 1:
            raise ValueError(f"TOAP_THREADS={given!r} is not a whole number >= 1")
        return int(given)
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = min(usable, _physical_cores() or usable)
    try:
        busy = round(os.getloadavg()[0])
    except OSError:  # no load average on this system
        busy = 0
    return max(1, cores - busy)


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


def fast_mode(fast: bool | None = None) -> bool:
    """``fast`` when given, else whether ``TOAP_FAST`` in the environment asks for fast mode."""
    if fast is not None:
        return fast
    return os.environ.get("TOAP_FAST", "0").lower() not in ("", "0", "false", "no")


def setup(seed: int = 0, fast: bool | None = None, threads: int | None = None) -> Config:
    """Seed everything, configure logging, and return the run's sizes.

    Args:
        seed: the one seed of the run.
        fast: force fast mode on/off; default: ``TOAP_FAST`` in the environment.
        threads: torch CPU threads (default: torch's choice).

    Raises:
        ValueError: a bad ``TOAP_DEVICE`` (``device``).
    """
    fast = fast_mode(fast)
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
