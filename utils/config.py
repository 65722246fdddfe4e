"""Run-time settings read in one place: the profile, the device, seeds, the cache folder.

The profile switch is the environment variable ``COURSE_PROFILE``:

* ``fast`` (default) — small data and few epochs, so each lesson runs in about a
  minute on a 2-core CPU;
* ``full`` — all of the offline data and more epochs, for instructors.

Lessons never read the variable themselves; they call :func:`get_profile` and use
the numbers of the returned :class:`Profile`.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.validation import check_choice, check_int

PROFILE_ENV = "COURSE_PROFILE"
CACHE_ENV = "COURSE_CACHE_DIR"


@dataclass(frozen=True)
class Profile:
    """Sizes that trade run time for fidelity.

    Attributes:
        name: ``"fast"`` or ``"full"``.
        epochs: epochs for a baseline model.
        finetune_epochs: epochs for fine-tuning after compression.
        train_fraction: fraction of the training split used.
        repeats: timed repeats in latency measurements.
    """

    name: str
    epochs: int
    finetune_epochs: int
    train_fraction: float
    repeats: int


PROFILES: dict[str, Profile] = {
    "fast": Profile("fast", epochs=8, finetune_epochs=2, train_fraction=1.0, repeats=20),
    "full": Profile("full", epochs=20, finetune_epochs=5, train_fraction=1.0, repeats=100),
}


def get_profile(name: str | None = None) -> Profile:
    """Return the active profile: ``name`` if given, else ``$COURSE_PROFILE``, else ``fast``."""
    chosen = name if name is not None else os.environ.get(PROFILE_ENV, "fast")
    check_choice("profile", chosen, PROFILES)
    return PROFILES[chosen]


def get_device(prefer: str | None = None) -> torch.device:
    """Pick the device: ``prefer`` if given (``"cpu"``/``"cuda"``), else CUDA when present, else CPU."""
    if prefer is not None:
        check_choice("prefer", prefer, ("cpu", "cuda"))
        if prefer == "cuda" and not torch.cuda.is_available():
            raise ValueError("prefer='cuda' but no CUDA device is available; use 'cpu'")
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and PyTorch; return a ``torch.Generator`` seeded the same way."""
    check_int("seed", seed, minimum=0)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def cache_dir() -> Path:
    """Folder for trained models and measurements: ``$COURSE_CACHE_DIR`` or ``<repo>/.cache``."""
    default = Path(__file__).resolve().parent.parent / ".cache"
    path = Path(os.environ.get(CACHE_ENV, default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def num_threads() -> int:
    """Threads PyTorch uses for intra-op parallelism right now."""
    return torch.get_num_threads()
