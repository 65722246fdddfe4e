"""Tests of utils.scenes: deterministic scenes of real MNIST digits with boxes, labels and masks."""

from __future__ import annotations

import pytest
import torch

from utils.scenes import INK, MAX_OVERLAP, SceneSet, _digits, make_scenes, scene_loader


@pytest.fixture(scope="module")
def scenes() -> SceneSet:
    return make_scenes(40, seed=3)


def test_shapes_and_ranges(scenes):
    assert scenes.images.shape == (40, 1, 64, 64) and scenes.images.dtype == torch.float32
    assert scenes.masks.shape == (40, 64, 64) and scenes.masks.dtype == torch.long
    assert 0.0 <= scenes.images.min() and scenes.images.max() <= 1.0
    assert len(scenes) == len(scenes.boxes) == len(scenes.labels) == 40
    for boxes, labels, mask in zip(scenes.boxes, scenes.labels, scenes.masks, strict=True):
        assert boxes.dtype == torch.float32 and boxes.shape == (len(labels), 4)
        assert labels.dtype == torch.long and 1 <= len(labels) <= 3
        assert ((labels >= 0) & (labels <= 9)).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert boxes.min() >= 0 and boxes.max() <= 64
        assert set(mask.unique().tolist()) <= {0, *(1 + labels).tolist()}


def test_ink_and_mask_agree(scenes):
    """Digits are combined by maximum: a pixel is ink exactly where some digit's mask is."""
    assert torch.equal(scenes.images[:, 0] >= INK, scenes.masks > 0)


def test_more_digits_appear_up_to_max(scenes):
    counts = {len(lab) for lab in scenes.labels}
    assert counts == {1, 2, 3}
    assert {len(lab) for lab in make_scenes(30, max_digits=1).labels} == {1}


def test_box_is_the_tight_box_of_the_ink_and_the_mask():
    s = make_scenes(20, max_digits=1, seed=1)
    for box, label, mask, image in zip(s.boxes, s.labels, s.masks, s.images, strict=True):
        ys, xs = (mask > 0).nonzero(as_tuple=True)
        assert box[0].tolist() == [
            xs.min().item(),
            ys.min().item(),
            xs.max().item() + 1,
            ys.max().item() + 1,
        ]
        assert (mask[mask > 0] == 1 + label[0]).all()
        assert torch.equal(mask > 0, image[0] >= INK)  # one digit: mask = its ink


def test_mask_pixels_lie_inside_a_box_of_their_class(scenes):
    for boxes, labels, mask in zip(scenes.boxes, scenes.labels, scenes.masks, strict=True):
        for cls in mask.unique().tolist():
            if cls == 0:
                continue
            ys, xs = (mask == cls).nonzero(as_tuple=True)
            inside = torch.zeros_like(xs, dtype=torch.bool)
            for b in boxes[labels == cls - 1]:
                inside |= (xs >= b[0]) & (xs < b[2]) & (ys >= b[1]) & (ys < b[3])
            assert inside.all()


def test_boxes_overlap_little(scenes):
    from torchvision.ops import box_iou

    for boxes in scenes.boxes:
        iou = box_iou(boxes, boxes) - torch.eye(len(boxes))
        assert iou.max() <= MAX_OVERLAP + 1e-6


def test_deterministic_and_prefix_stable(scenes):
    again = make_scenes(40, seed=3)
    assert torch.equal(again.images, scenes.images) and torch.equal(again.masks, scenes.masks)
    assert all(torch.equal(a, b) for a, b in zip(again.boxes, scenes.boxes, strict=True))
    head = make_scenes(5, seed=3)
    assert torch.equal(head.images, scenes.images[:5])
    assert not torch.equal(make_scenes(5, seed=4).images, head.images)


def _windows(image: torch.Tensor) -> torch.Tensor:
    return image.unfold(1, 28, 1).unfold(2, 28, 1).reshape(-1, 28, 28)


@pytest.mark.parametrize("split", ["train", "test"])
def test_scenes_use_only_their_split_digits(split):
    """At scale 1 a scene holds one unresized digit: it must be a digit of its own split."""
    own, _ = _digits(split)
    other, _ = _digits("test" if split == "train" else "train")
    s = make_scenes(6, max_digits=1, scale=(1.0, 1.0), seed=2, split=split)
    for image in s.images:
        win = _windows(image)
        d_own = torch.cdist(win.flatten(1), own.flatten(1)).min()
        d_other = torch.cdist(win.flatten(1), other.flatten(1)).min()
        assert d_own < 0.05 < d_other  # (cdist rounds: 0 comes out as ~4e-3)


def test_subset(scenes):
    sub = scenes.subset([2, 5])
    assert torch.equal(sub.images, scenes.images[[2, 5]])
    assert torch.equal(sub.boxes[1], scenes.boxes[5]) and torch.equal(
        sub.labels[0], scenes.labels[2]
    )
    assert len(scenes.subset(slice(0, 7))) == 7


def test_scene_loader_batches(scenes):
    images, boxes, labels, masks = next(iter(scene_loader(scenes, 8)))
    assert images.shape == (8, 1, 64, 64) and masks.shape == (8, 64, 64)
    assert isinstance(boxes, list) and len(boxes) == 8 and torch.equal(boxes[3], scenes.boxes[3])
    assert isinstance(labels, list) and torch.equal(labels[7], scenes.labels[7])
    first = [next(iter(scene_loader(scenes, 8, shuffle=True, seed=1)))[0] for _ in range(2)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], images)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n": 0}, ValueError, "n must be >= 1"),
        ({"n": 2.0}, TypeError, "n must be an int"),
        ({"n": 2, "split": "dev"}, ValueError, "split must be one of"),
        ({"n": 2, "scale": (1.2, 0.6)}, ValueError, r"scale\[1\] must be >= 1.2"),
        ({"n": 2, "scale": (0.0, 1.0)}, ValueError, r"scale\[0\] must be > 0"),
        ({"n": 2, "scale": (0.5,)}, ValueError, "scale must be a"),
        ({"n": 2, "size": 32, "scale": (1.0, 1.5)}, ValueError, "larger than size=32"),
        ({"n": 2, "max_digits": 0}, ValueError, "max_digits must be >= 1"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_scenes(**kwargs)


def test_scene_loader_bad_arguments(scenes):
    with pytest.raises(TypeError, match="scenes must be SceneSet"):
        scene_loader([1, 2], 4)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        scene_loader(scenes, 0)
