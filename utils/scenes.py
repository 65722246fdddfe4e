"""Scenes of real MNIST digits for detection and segmentation (chapter 8).

Each scene is a ``size × size`` grey image with 1 to ``max_digits`` real MNIST digits
(from the offline ``mnist5k`` set, :func:`utils.data.load_splits`), each rescaled by
a random factor in ``scale`` and pasted at a random place where it overlaps the
others little. A scene carries what a detector and a segmenter learn from:

* ``boxes``: the tight box of each digit's ink (pixels ``≥ INK``), ``xyxy`` in pixels
  (``x2``/``y2`` exclusive, as in COCO ``[x, y, w, h]`` with ``w = x2 − x1``);
* ``labels``: the digit classes ``0 … 9``;
* ``masks``: per pixel ``0`` = background, ``1 + class`` where that digit's ink is
  (a digit pasted later covers an earlier one).

Train scenes are built only from the train digits of the course split, test scenes
only from the test digits, so a test score measures digits the model never saw.
Scene ``i`` depends only on ``(seed, split, i)``: ``make_scenes(10)`` is the start of
``make_scenes(100)``. Used by :mod:`utils.detection` and lesson 08.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from utils.data import MNIST_MEAN, MNIST_STD, load_splits
from utils.validation import check_choice, check_float, check_int, check_type

SPLITS = ("train", "val", "test")
INK = 0.5
"""Pixel value (in ``[0, 1]``) from which a pixel counts as a digit's ink (box and mask)."""
MAX_OVERLAP = 0.2
"""Largest IoU a new digit's box may have with any box already in the scene."""
_TRIES = 30
_DIGIT = 28


@dataclass
class SceneSet:
    """Scenes with their boxes, labels and segmentation masks.

    Attributes:
        images: ``(n, 1, S, S)`` float in ``[0, 1]``.
        boxes: ``n`` tensors ``(k_i, 4)`` float, ``xyxy`` pixels.
        labels: ``n`` tensors ``(k_i,)`` long, digit classes ``0 … 9``.
        masks: ``(n, S, S)`` long, ``0`` background, ``1 + class`` on a digit's ink.
    """

    images: Tensor
    boxes: list[Tensor]
    labels: list[Tensor]
    masks: Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: slice | list[int]) -> SceneSet:
        """The scenes at ``index`` (a slice or a list of positions) as a new :class:`SceneSet`."""
        rows = range(len(self))[index] if isinstance(index, slice) else index
        rows = list(rows)
        return SceneSet(
            self.images[rows],
            [self.boxes[i] for i in rows],
            [self.labels[i] for i in rows],
            self.masks[rows],
        )


def _digits(split: str) -> tuple[Tensor, Tensor]:
    """The ``split`` digits of the course's ``mnist5k`` split, un-normalised to ``[0, 1]``."""
    data = getattr(load_splits("mnist5k", seed=0), split)
    x, y = data.tensors
    return (x * MNIST_STD + MNIST_MEAN).clamp(0.0, 1.0), y


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _scene(
    rng: np.random.Generator,
    digits: Tensor,
    classes: Tensor,
    size: int,
    max_digits: int,
    scale: tuple[float, float],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    image = torch.zeros(size, size)
    mask = torch.zeros(size, size, dtype=torch.long)
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    wanted = int(rng.integers(1, max_digits + 1))
    for _ in range(_TRIES):
        if len(boxes) == wanted:
            break
        idx = int(rng.integers(len(digits)))
        side = round(_DIGIT * float(rng.uniform(*scale)))
        patch = F.interpolate(
            digits[idx][None], size=(side, side), mode="bilinear", antialias=True
        )[0, 0].clamp(0.0, 1.0)
        x0, y0 = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
        ink = patch >= INK
        rows, cols = ink.any(1).nonzero()[:, 0], ink.any(0).nonzero()[:, 0]
        if len(rows) == 0:
            continue
        box = np.array(
            [
                x0 + cols[0].item(),
                y0 + rows[0].item(),
                x0 + cols[-1].item() + 1,
                y0 + rows[-1].item() + 1,
            ],
            dtype=np.float32,
        )
        if any(_box_iou(box, other) > MAX_OVERLAP for other in boxes):
            continue
        region = (slice(y0, y0 + side), slice(x0, x0 + side))
        image[region] = torch.maximum(image[region], patch)
        mask[region][ink] = 1 + int(classes[idx])
        boxes.append(box)
        labels.append(int(classes[idx]))
    return (
        image,
        torch.from_numpy(np.stack(boxes)) if boxes else torch.zeros(0, 4),
        torch.tensor(labels, dtype=torch.long),
        mask,
    )


def make_scenes(
    n: int,
    *,
    size: int = 64,
    max_digits: int = 3,
    scale: tuple[float, float] = (0.6, 1.2),
    seed: int = 0,
    split: str = "train",
) -> SceneSet:
    """``n`` deterministic scenes of real MNIST digits of the ``split`` (``"train"``, ``"val"``, ``"test"``).

    Args:
        n: number of scenes.
        size: side ``S`` of the square image in pixels (a digit at the largest scale must fit).
        max_digits: each scene has ``1 … max_digits`` digits (fewer when no free place is found).
        scale: range of the factor by which a 28×28 digit is resized.
        seed: seed of the scenes (scene ``i`` depends only on ``seed``, ``split`` and ``i``).
        split: which digits of the course split to use.
    """
    check_int("n", n, minimum=1)
    check_int("size", size, minimum=8)
    check_int("max_digits", max_digits, minimum=1, maximum=10)
    check_type("scale", scale, (tuple, list))
    if len(scale) != 2:
        raise ValueError(f"scale must be a (low, high) pair, got {scale!r}")
    check_float("scale[0]", scale[0], 0.0, min_inclusive=False)
    check_float("scale[1]", scale[1], scale[0])
    if round(_DIGIT * scale[1]) > size:
        raise ValueError(
            f"scale={tuple(scale)} makes digits up to {round(_DIGIT * scale[1])} px, larger than "
            f"size={size}; use a larger size or a smaller scale"
        )
    check_int("seed", seed, minimum=0)
    check_choice("split", split, SPLITS)
    digits, classes = _digits(split)
    stream = SPLITS.index(split)
    scenes = [
        _scene(
            np.random.default_rng([seed, stream, i]),
            digits,
            classes,
            size,
            max_digits,
            tuple(scale),
        )
        for i in range(n)
    ]
    images, boxes, labels, masks = zip(*scenes, strict=True)
    return SceneSet(torch.stack(images)[:, None], list(boxes), list(labels), torch.stack(masks))


class _SceneDataset(Dataset):
    def __init__(self, scenes: SceneSet) -> None:
        self.scenes = scenes

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        s = self.scenes
        return s.images[i], s.boxes[i], s.labels[i], s.masks[i]


def collate_scenes(batch: list) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
    """``(images, boxes, labels, masks)``: images and masks stacked, boxes and labels kept as lists."""
    images, boxes, labels, masks = zip(*batch, strict=True)
    return torch.stack(images), list(boxes), list(labels), torch.stack(masks)


def scene_loader(
    scenes: SceneSet, batch_size: int = 32, shuffle: bool = False, *, seed: int = 0
) -> DataLoader:
    """A DataLoader of ``(images, boxes, labels, masks)`` batches (see :func:`collate_scenes`).

    The images come first, so the loader also serves as calibration data of
    :func:`utils.production.quantize_static_int8`. With ``shuffle`` the order is fixed by ``seed``.
    """
    check_type("scenes", scenes, SceneSet)
    check_int("batch_size", batch_size, minimum=1)
    check_type("shuffle", shuffle, bool)
    check_int("seed", seed, minimum=0)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        _SceneDataset(scenes),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=collate_scenes,
    )
