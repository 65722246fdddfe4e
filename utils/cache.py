"""Train once, reuse everywhere: a cache of trained models keyed by their configuration.

A baseline that several lessons need (say, LeNet-5 on MNIST-5k) is trained the
first time any notebook asks for it and loaded from ``<cache>/<name>-<key>.pt``
afterwards. The key is a hash of the full configuration (model, data, seed,
epochs, …), so a change of any of them trains a new model instead of reusing a
stale one. Files are read with ``torch.load(weights_only=True)`` (no pickled code
runs) and a missing, truncated or mismatching file is simply retrained.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils.config import cache_dir, get_profile, seed_everything
from utils.data import load_splits, make_loader
from utils.models import build_model
from utils.training import evaluate, fit
from utils.validation import check_choice, check_float, check_int, check_module, check_type

CACHE_VERSION = 1


def config_key(config: dict[str, Any]) -> str:
    """Stable 12-hex-digit hash of a JSON-serialisable configuration."""
    check_type("config", config, dict)
    text = json.dumps({"v": CACHE_VERSION, **config}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cached_state(
    name: str,
    config: dict[str, Any],
    build: Callable[[], nn.Module],
    train: Callable[[nn.Module], None],
) -> tuple[nn.Module, Path, bool]:
    """Return ``(model, path, trained_now)``: loaded from the cache or built, trained and saved.

    Args:
        name: readable prefix of the file name.
        config: everything that determines the trained weights.
        build: returns a fresh, untrained model.
        train: trains that model in place.
    """
    check_type("name", name, str)
    if not name or any(c in name for c in "/\\:") or name.startswith("."):
        raise ValueError(
            f"name must be a non-empty file-name prefix without / \\ : or a leading dot, got {name!r}"
        )
    check_type("config", config, dict)
    if not callable(build):
        raise TypeError(f"build must be a callable returning a model, got {type(build).__name__}")
    if not callable(train):
        raise TypeError(f"train must be a callable that trains a model, got {type(train).__name__}")
    path = cache_dir() / f"{name}-{config_key(config)}.pt"
    model = build()
    if path.exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            model.eval()
            return model, path, False
        except Exception:  # corrupt, truncated or from another architecture: retrain
            path.unlink(missing_ok=True)
            model = build()
    # A first run trains for a while: say what, and that it happens once (issue: silent minutes).
    print(f"training {name} (first run only; cached as {path.name} in {path.parent})", flush=True)
    start = time.perf_counter()
    train(model)
    model.eval().cpu()
    print(f"trained {name} in {time.perf_counter() - start:.0f} s; later runs load it", flush=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache file
    return model, path, True


def baseline_config(
    model: str,
    dataset: str = "mnist5k",
    *,
    seed: int = 0,
    epochs: int | None = None,
    train_fraction: float = 1.0,
    lr: float = 1e-3,
    **model_kwargs: Any,
) -> dict[str, Any]:
    """The configuration of a course baseline; ``epochs`` defaults to the profile's.

    Every argument that changes the trained weights is a field, so two baselines
    share a cache file only when they would train identically.
    """
    from utils.data import OFFLINE_DATASETS
    from utils.models import MODEL_NAMES

    check_choice("model", model, MODEL_NAMES)
    check_choice("dataset", dataset, OFFLINE_DATASETS)
    check_int("seed", seed, minimum=0)
    if epochs is not None:
        check_int("epochs", epochs, minimum=0)
    check_float("train_fraction", train_fraction, 0.0, 1.0, min_inclusive=False)
    check_float("lr", lr, 0.0, min_inclusive=False)
    return {
        "model": model,
        "dataset": dataset,
        "seed": seed,
        "epochs": epochs if epochs is not None else get_profile().epochs,
        "train_fraction": train_fraction,
        "lr": lr,
        "model_kwargs": model_kwargs,
    }


def load_baseline(
    model: str = "lenet5",
    dataset: str = "mnist5k",
    *,
    seed: int = 0,
    epochs: int | None = None,
    train_fraction: float = 1.0,
    lr: float = 1e-3,
    progress: bool = True,
    **model_kwargs: Any,
) -> nn.Module:
    """A trained course model (in eval mode, on the CPU), trained at most once per configuration.

    Args:
        model: one of ``utils.models.MODEL_NAMES``.
        dataset: ``"mnist5k"`` or ``"digits"``.
        seed: seed of the data split, the initialisation and the data order.
        epochs: training epochs (default: the active profile's ``epochs``).
        train_fraction: fraction of the training split used.
        lr: Adam learning rate.
        progress: show a progress bar while training (only on the first run; it closes when done).
        model_kwargs: extra arguments of the model (e.g. ``width_mult=0.5``).
    """
    config = baseline_config(
        model,
        dataset,
        seed=seed,
        epochs=epochs,
        train_fraction=train_fraction,
        lr=lr,
        **model_kwargs,
    )
    splits = load_splits(dataset, seed=seed, train_fraction=train_fraction)
    size = splits.input_shape[-1]

    def build() -> nn.Module:
        seed_everything(seed)
        return build_model(model, splits.input_shape[0], splits.num_classes, size, **model_kwargs)

    def train(m: nn.Module) -> None:
        loader = make_loader(splits.train, 64, shuffle=True, seed=seed)
        fit(m, loader, epochs=config["epochs"], lr=lr, progress=progress, desc=model)

    net, _, _ = cached_state(f"{model}-{dataset}", config, build, train)
    return net


def baseline_accuracy(
    model: nn.Module, dataset: str = "mnist5k", *, seed: int = 0, split: str = "test"
) -> float:
    """Accuracy (%) of ``model`` on the ``split`` (``"val"`` or ``"test"``) of ``dataset``."""
    check_module("model", model)
    check_choice("split", split, ("val", "test"))
    s = load_splits(dataset, seed=seed)
    return evaluate(model, make_loader(getattr(s, split), 256))["accuracy"]
