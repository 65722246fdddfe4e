"""Tests of utils.detection: CenterNet targets/decoding, COCO mAP, mIoU, models, compression."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from utils import detection as D
from utils.scenes import make_scenes


def _box(*xyxy: float) -> torch.Tensor:
    return torch.tensor([xyxy], dtype=torch.float32)


def _pred(boxes, scores, labels) -> dict:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def _gt(boxes, labels) -> dict:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


# ---------------------------------------------------------------- models


def test_detector_output_maps():
    model = D.TinyDetector(width=0.5).eval()
    out = model(torch.rand(2, 1, 64, 64))
    assert set(out) == {"heatmap", "size", "offset"}
    assert out["heatmap"].shape == (2, 10, 16, 16)
    assert out["size"].shape == out["offset"].shape == (2, 2, 16, 16)
    prior = torch.sigmoid(out["heatmap"]).mean()  # focal-loss prior init: σ(−2.19) ≈ 0.1
    assert 0.03 < prior < 0.3


def test_unet_output_and_width():
    model = D.TinyUNet().eval()
    assert model(torch.rand(2, 1, 64, 64)).shape == (2, 11, 64, 64)
    small = D.TinyUNet(width=0.5)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(small) < count(model) / 2.5
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.rand(1, 1, 62, 62))


@pytest.mark.parametrize("cls", [D.TinyDetector, D.TinyUNet])
def test_models_reject_bad_images(cls):
    model = cls()
    with pytest.raises(ValueError, match="images must have 4 dimensions"):
        model(torch.rand(1, 64, 64))
    with pytest.raises(ValueError, match="images must have 1 channel"):
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        model([[0.0]])


def test_bad_model_name_and_width():
    with pytest.raises(ValueError, match="name must be one of"):
        D.build_scene_model("yolo")
    with pytest.raises(ValueError, match="name must be one of"):
        D.get_scene_model("yolo")
    for width in (0.0, -1.0):
        with pytest.raises(ValueError, match="width must be > 0"):
            D.build_scene_model("detector", width)
        with pytest.raises(ValueError, match="width must be > 0"):
            D.get_detector(width)
        with pytest.raises(ValueError, match="width must be > 0"):
            D.TinyUNet(width=width)


def test_init_from_detector_copies_the_backbone():
    det, unet = D.TinyDetector(), D.TinyUNet()
    D.init_from_detector(unet, det)
    assert torch.equal(unet.enc1[0].weight, det.net[0][0].weight)
    assert torch.equal(unet.bottleneck[1].running_mean, det.net[0][4].running_mean)
    assert torch.equal(unet.bottleneck[9].weight, det.net[0][12].weight)
    with pytest.raises(ValueError, match="same width"):
        D.init_from_detector(D.TinyUNet(width=0.5), det)
    with pytest.raises(TypeError, match="detector must be TinyDetector"):
        D.init_from_detector(unet, unet)


def test_fuse_groups_name_conv_bn_relu_runs():
    det, unet = D.TinyDetector(), D.TinyUNet()
    assert det.fuse_groups()[0] == ["net.0.0", "net.0.1", "net.0.2"]
    assert det.fuse_groups()[-1] == ["net.1.0", "net.1.1"]  # head conv + ReLU
    assert ["bottleneck.3", "bottleneck.4", "bottleneck.5"] in unet.fuse_groups()
    modules = dict(unet.named_modules())
    for group in [*unet.fuse_groups(), *det.fuse_groups()]:
        assert isinstance(modules.get(group[0], dict(det.named_modules()).get(group[0])), nn.Conv2d)


# ---------------------------------------------------------------- CenterNet targets, loss, decoding


def test_centernet_targets_hand_checked():
    boxes = torch.tensor([[8.0, 8.0, 24.0, 24.0], [30.0, 9.0, 48.0, 23.0]])
    t = D.centernet_targets(boxes, torch.tensor([3, 7]), size=64)
    assert t.shape == (15, 16, 16)
    assert (
        t[3, 4, 4] == 1 and t[7, 4, 9] == 1
    )  # centres (16, 16)/4 and (39, 16)/4 → cells (4, 4), (9, 4)
    assert t[3].max() == 1 and t[3, 4, 5] < 1 and t[3, 4, 6] < t[3, 4, 5]
    assert t[:10].sum(0)[t[14] == 1].tolist() == [1.0, 1.0]
    assert t[10:12, 4, 4].tolist() == [4.0, 4.0]  # 16 px / 4
    assert t[10:12, 4, 9].tolist() == [4.5, 3.5]
    assert t[12:14, 4, 4].tolist() == [0.0, 0.0]
    assert t[12:14, 4, 9].tolist() == pytest.approx([0.75, 0.0])
    assert t[14].sum() == 2
    sigma = 4.0 / 6  # σ = (w/R)/6
    assert t[3, 4, 5].item() == pytest.approx(math.exp(-1 / (2 * sigma**2)), rel=1e-5)
    sx, sy = 4.5 / 6, 3.5 / 6  # the 18 × 14 box: σ per axis
    assert t[7, 4, 10].item() == pytest.approx(math.exp(-1 / (2 * sx**2)), rel=1e-5)
    assert t[7, 5, 9].item() == pytest.approx(math.exp(-1 / (2 * sy**2)), rel=1e-5)


def test_focal_loss_matches_the_formula():
    logits = torch.tensor([[[[2.0, -1.0, 0.5]]]])
    heat = torch.tensor([[[[1.0, 0.5, 0.0]]]])
    p = torch.sigmoid(logits)[0, 0, 0]
    expected = -(
        (1 - p[0]) ** 2 * torch.log(p[0])
        + (1 - 0.5) ** 4 * p[1] ** 2 * torch.log(1 - p[1])
        + p[2] ** 2 * torch.log(1 - p[2])
    )
    assert D.focal_loss(logits, heat).item() == pytest.approx(expected.item(), rel=1e-5)
    two = torch.cat([heat, heat], 1), torch.cat([logits, logits], 1)
    assert D.focal_loss(two[1], two[0]).item() == pytest.approx(expected.item(), rel=1e-5)  # / N


def test_centernet_loss_weights():
    target = D.centernet_targets(_box(8, 8, 24, 24), torch.tensor([3]), size=64)[None]
    heat = torch.full((1, 10, 16, 16), -5.0)
    zero = torch.zeros(1, 2, 16, 16)
    base = D.centernet_loss({"heatmap": heat, "size": target[:, 10:12], "offset": zero}, target)
    off_size = D.centernet_loss(
        {"heatmap": heat, "size": target[:, 10:12] + 1, "offset": zero}, target
    )
    off_offset = D.centernet_loss(
        {"heatmap": heat, "size": target[:, 10:12], "offset": zero + 1}, target
    )
    # |Δ| = (1, 1) at the one centre: L1 norm 2, weighted 0.1 (size) and 1 (offset)
    assert off_size.item() == pytest.approx(base.item() + 0.2, abs=1e-5)
    assert off_offset.item() == pytest.approx(base.item() + 2.0, abs=1e-5)


def _perfect_outputs(scenes) -> dict:
    t = torch.stack(
        [
            D.centernet_targets(b, lab, size=64)
            for b, lab in zip(scenes.boxes, scenes.labels, strict=True)
        ]
    )
    heat = torch.logit(t[:, :10].clamp(1e-4, 1 - 1e-4))
    return {"heatmap": heat, "size": t[:, 10:12], "offset": t[:, 12:14]}


def test_decode_recovers_the_targets():
    scenes = make_scenes(12, seed=5)
    dets = D.decode_detections(_perfect_outputs(scenes), score_threshold=0.99)
    for det, boxes, labels in zip(dets, scenes.boxes, scenes.labels, strict=True):
        order = torch.argsort(det["labels"] * 1000 + det["boxes"][:, 0])
        ref = torch.argsort(labels * 1000 + boxes[:, 0])
        assert torch.equal(det["labels"][order], labels[ref])
        torch.testing.assert_close(det["boxes"][order], boxes[ref], atol=1e-3, rtol=0)
    targets = [
        {"boxes": b, "labels": lab} for b, lab in zip(scenes.boxes, scenes.labels, strict=True)
    ]
    assert D.mean_average_precision(dets, targets)["map"] == pytest.approx(1.0)


def _maps(peaks: list[tuple[int, int, int, float]], width: float = 2.5) -> dict:
    heat = torch.full((1, 10, 16, 16), -10.0)
    for c, y, x, z in peaks:
        heat[0, c, y, x] = z
    size = torch.zeros(1, 2, 16, 16)
    size[0, 0], size[0, 1] = width, 3.0
    offset = torch.zeros(1, 2, 16, 16)
    offset[0, 0], offset[0, 1] = 0.5, 0.25
    return {"heatmap": heat, "size": size, "offset": offset}


def test_decode_one_peak_by_hand():
    (det,) = D.decode_detections(_maps([(2, 3, 5, 3.0)]))
    # centre = 4 · (5 + 0.5, 3 + 0.25) = (22, 13); size = 4 · (2.5, 3) = (10, 12)
    torch.testing.assert_close(det["boxes"], _box(17, 7, 27, 19))
    assert det["labels"].tolist() == [2]
    assert det["scores"].tolist() == pytest.approx([torch.sigmoid(torch.tensor(3.0)).item()])


def test_decode_peaks_threshold_and_nms():
    # a 3×3 neighbour of the same class is not a peak; the threshold drops a weak peak
    (det,) = D.decode_detections(_maps([(2, 3, 5, 3.0), (2, 3, 6, 2.0), (4, 10, 10, -2.0)]))
    assert det["labels"].tolist() == [2]
    (det,) = D.decode_detections(_maps([(4, 10, 10, -2.0)]), score_threshold=0.1)
    assert det["labels"].tolist() == [4]
    # two cells (8 px) apart, 20 px wide: both are peaks and their boxes overlap with IoU 12/28;
    # same class → NMS keeps the stronger, other class → both stay (class-wise NMS)
    two = [(2, 3, 5, 3.0), (2, 3, 7, 2.0)]
    same = D.decode_detections(_maps(two, width=5.0), nms_iou=0.4)[0]
    other = D.decode_detections(_maps([two[0], (6, 3, 7, 2.0)], width=5.0), nms_iou=0.4)[0]
    assert same["labels"].tolist() == [2] and same["scores"].item() > 0.9
    assert sorted(other["labels"].tolist()) == [2, 6]
    assert len(D.decode_detections(_maps(two, width=5.0), nms_iou=0.45)[0]["labels"]) == 2


def test_decode_max_det_and_bad_input():
    peaks = [(c, 2 + 3 * (c % 4), 2 + 3 * (c // 4), 1.0 + c) for c in range(10)]
    (det,) = D.decode_detections(_maps(peaks), max_det=4)
    assert det["labels"].tolist() == [9, 8, 7, 6]
    with pytest.raises(ValueError, match="'offset' is missing"):
        D.decode_detections({"heatmap": torch.zeros(1, 10, 4, 4), "size": torch.zeros(1, 2, 4, 4)})
    with pytest.raises(ValueError, match="max_det must be >= 1"):
        D.decode_detections(_maps([]), max_det=0)


# ---------------------------------------------------------------- mAP


def test_map_perfect_empty_and_undefined():
    gt = [_gt([[0, 0, 10, 10], [20, 20, 30, 40]], [1, 2])]
    perfect = [_pred([[0, 0, 10, 10], [20, 20, 30, 40]], [0.9, 0.8], [1, 2])]
    assert D.mean_average_precision(perfect, gt) == {"map": 1.0, "map_50": 1.0, "map_75": 1.0}
    empty = [_pred([], [], [])]
    assert D.mean_average_precision(empty, gt) == {"map": 0.0, "map_50": 0.0, "map_75": 0.0}
    no_gt = [_gt([], [])]
    assert D.mean_average_precision(perfect, no_gt)["map"] == -1.0  # COCO: undefined
    assert D.mean_average_precision([], [])["map"] == -1.0


def test_map_hand_checked_cases():
    gt = [_gt([[0, 0, 10, 10]], [1])]
    # a false positive ranked above the true positive: precision 1/2 at recall 1; the envelope
    # gives 1/2 at every recall point (without it recall 0 would read precision 0)
    fp_first = [_pred([[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8], [1, 1])]
    assert D.mean_average_precision(fp_first, gt, [0.5])["map"] == pytest.approx(0.5)
    # IoU exactly 0.5 counts as a match at threshold 0.5 (COCO: IoU ≥ t)
    half = [_pred([[0, 0, 10, 5]], [0.9], [1])]
    assert D.mean_average_precision(half, gt, [0.5])["map"] == pytest.approx(1.0)
    assert D.mean_average_precision(half, gt, [0.55])["map"] == 0.0
    # two detections of one object: the second is a false positive
    twice = [_pred([[0, 0, 10, 10], [0, 0, 10, 9]], [0.9, 0.8], [1, 1]), _pred([], [], [])]
    gt2 = [*gt, _gt([[0, 0, 10, 10]], [1])]
    # recall 1/2 at precision 1, then precision falls: 51 of 101 recall points reach 1
    assert D.mean_average_precision(twice, gt2, [0.5])["map"] == pytest.approx(51 / 101)
    # the right box with the wrong class is no match
    wrong = [_pred([[0, 0, 10, 10]], [0.9], [2])]
    assert D.mean_average_precision(wrong, gt, [0.5])["map"] == 0.0
    # a detection matches the object of highest IoU that is still free
    gt_two = [_gt([[0, 0, 10, 10], [0, 0, 10, 12]], [1, 1])]
    dets = [_pred([[0, 0, 10, 11], [0, 0, 10, 10]], [0.9, 0.8], [1, 1])]
    assert D.mean_average_precision(dets, gt_two, [0.9])["map"] == pytest.approx(1.0)


def test_map_101_point_interpolation_not_all_points():
    # 3 objects; ranked TP, FP, TP: (r, p) = (1/3, 1), (1/3, 1/2), (2/3, 2/3)
    gt = [_gt([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], [0, 0, 0])]
    pred = [_pred([[0, 0, 10, 10], [60, 60, 62, 62], [20, 0, 30, 10]], [0.9, 0.8, 0.7], [0, 0, 0])]
    got = D.mean_average_precision(pred, gt, [0.5])["map"]
    assert got == pytest.approx(
        (34 * 1.0 + 33 * 2 / 3) / 101, abs=1e-9
    )  # all-point AP would be 5/9
    assert abs(got - 5 / 9) > 1e-4


def test_map_per_class_mean_and_threshold_mean():
    gt = [_gt([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 5])]
    pred = [_pred([[0, 0, 10, 10]], [0.9], [0])]  # class 5 missed: AP 0
    assert D.mean_average_precision(pred, gt)["map"] == pytest.approx(0.5)
    shifted = [
        _pred([[0, 0, 10, 8]], [0.9], [0])
    ]  # IoU 0.8: matched at 0.50…0.80 (7 of 10 thresholds)
    res = D.mean_average_precision(shifted, [_gt([[0, 0, 10, 10]], [0])])
    assert res["map"] == pytest.approx(0.7) and res["map_50"] == 1.0 and res["map_75"] == 1.0
    assert D.mean_average_precision(shifted, [_gt([[0, 0, 10, 10]], [0])], [0.5])["map_75"] == -1.0
    loose = [_pred([[0, 0, 10, 5.2]], [0.9], [0])]  # IoU 0.52: a match at 0.50 only
    res = D.mean_average_precision(loose, [_gt([[0, 0, 10, 10]], [0])])
    assert res["map_50"] == 1.0 and res["map_75"] == 0.0 and res["map"] == pytest.approx(0.1)


def _random_case(seed: int, images: int = 25):
    g = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for _ in range(images):
        k = int(torch.randint(0, 5, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * 50
        wh = 5 + torch.rand(k, 2, generator=g) * 20
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(0, 4, (k,), generator=g)
        targets.append({"boxes": boxes, "labels": labels})
        # jittered copies of most objects, some wrong classes, plus random false positives
        keep = torch.rand(k, generator=g) < 0.8
        jitter = boxes[keep] + torch.randn(int(keep.sum()), 4, generator=g) * 1.0
        jitter[:, 2:] = torch.maximum(jitter[:, 2:], jitter[:, :2] + 1)
        plabels = labels[keep].clone()
        flip = torch.rand(len(plabels), generator=g) < 0.15
        plabels[flip] = torch.randint(0, 4, (int(flip.sum()),), generator=g)
        m = int(torch.randint(0, 3, (1,), generator=g))
        fxy = torch.rand(m, 2, generator=g) * 50
        fboxes = torch.cat([fxy, fxy + 5 + torch.rand(m, 2, generator=g) * 20], 1)
        preds.append(
            {
                "boxes": torch.cat([jitter, fboxes]),
                "scores": torch.rand(len(jitter) + m, generator=g),
                "labels": torch.cat([plabels, torch.randint(0, 5, (m,), generator=g)]),
            }
        )
    return preds, targets


@pytest.mark.parametrize("seed", [0, 1])
def test_map_equals_torchmetrics(seed):
    from torchmetrics.detection import MeanAveragePrecision

    preds, targets = _random_case(seed)
    ours = D.mean_average_precision(preds, targets)
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
    metric.update(preds, targets)
    ref = metric.compute()
    for key in ("map", "map_50", "map_75"):
        assert ours[key] == pytest.approx(ref[key].item(), abs=1e-4)
    assert (
        0.2 < ours["map"] < 0.9 and ours["map_50"] > ours["map_75"]
    )  # a case with partial matches, not a trivial 0 or 1


def test_map_bad_input():
    gt = [_gt([[0, 0, 10, 10]], [1])]
    with pytest.raises(ValueError, match="x2 >= x1"):
        D.mean_average_precision([_pred([[10, 0, 0, 10]], [0.9], [1])], gt)
    with pytest.raises(ValueError, match="x2 >= x1"):
        D.mean_average_precision([_pred([], [], [])], [_gt([[0, 5, 10, 0]], [1])])
    with pytest.raises(ValueError, match="same images"):
        D.mean_average_precision([], gt)
    with pytest.raises(ValueError, match="missing \\['scores'\\]"):
        D.mean_average_precision([_gt([[0, 0, 1, 1]], [1])], gt)
    with pytest.raises(ValueError, match="has 2 entries but there are 1 boxes"):
        D.mean_average_precision([_pred([[0, 0, 1, 1]], [0.5, 0.4], [1])], gt)
    with pytest.raises(ValueError, match=r"iou_thresholds\[i\] must be <= 1"):
        D.mean_average_precision(gt and [_pred([], [], [])], gt, [1.5])
    with pytest.raises(ValueError, match="shape \\(k, 4\\)"):
        D.check_boxes(torch.zeros(2, 5))


# ---------------------------------------------------------------- mIoU


def test_mean_iou_hand_checked():
    pred = torch.tensor([0, 1, 1, 2, 2, 0])
    target = torch.tensor([0, 1, 2, 2, 2, 0])
    # IoU: class 0 = 2/2, class 1 = 1/2, class 2 = 2/3; classes 3, 4 absent → left out
    assert D.mean_iou(pred, target, 5) == pytest.approx((1 + 0.5 + 2 / 3) / 3)
    assert D.mean_iou(pred, target, 5, ignore_background=True) == pytest.approx((0.5 + 2 / 3) / 2)
    cm = D.confusion_matrix(pred, target, 3)
    assert cm.tolist() == [[2, 0, 0], [0, 1, 0], [0, 1, 2]]


@pytest.mark.parametrize("ignore_background", [False, True])
def test_mean_iou_equals_torchmetrics(ignore_background):
    from torchmetrics.classification import MulticlassJaccardIndex

    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 11, (4, 32, 32), generator=g)
    target[target > 8] = 0  # classes 9, 10 absent
    pred = torch.where(
        torch.rand(4, 32, 32, generator=g) < 0.7,
        target,
        torch.randint(0, 11, (4, 32, 32), generator=g),
    )
    per_class = MulticlassJaccardIndex(num_classes=11, average="none")(pred, target)
    present = torch.tensor([bool((pred == c).any() or (target == c).any()) for c in range(11)])
    if ignore_background:
        present[0] = False
    ref = per_class[present].mean().item()
    assert D.mean_iou(pred, target, 11, ignore_background=ignore_background) == pytest.approx(
        ref, abs=1e-6
    )
    if not ignore_background:
        macro = MulticlassJaccardIndex(num_classes=11, average="macro")(pred, target).item()
        assert D.mean_iou(pred, target, 11) == pytest.approx(macro, abs=1e-6)


def test_mean_iou_bad_input():
    a = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="same shape"):
        D.mean_iou(a, torch.zeros(2, 5, dtype=torch.long), 3)
    with pytest.raises(TypeError, match="integer class indices"):
        D.mean_iou(a.float(), a, 3)
    with pytest.raises(ValueError, match=r"target values must be in \[0, 3\)"):
        D.mean_iou(a, a + 3, 3)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        D.mean_iou(a, a, 1)


# ---------------------------------------------------------------- evaluation, compression, distillation


@pytest.fixture(scope="module")
def tiny_scenes():
    return make_scenes(24, seed=7, split="val")


def test_evaluate_untrained_models_run(tiny_scenes):
    det = D.evaluate_detector(D.TinyDetector(width=0.25), tiny_scenes)
    assert set(det) == {"map", "map_50", "map_75"} and 0.0 <= det["map_50"] < 0.2
    seg = D.evaluate_segmenter(D.TinyUNet(width=0.25), tiny_scenes)
    assert set(seg) == {"miou", "miou_digits", "pixel_accuracy"}
    assert 0.0 <= seg["miou"] <= 1.0


def test_evaluate_segmenter_counts_background_in_miou(tiny_scenes):
    class Oracle(nn.Module):
        """Logits that predict the true mask, except digit pixels → background in the first scene."""

        def __init__(self, masks):
            super().__init__()
            self.masks, self.i = masks, 0

        def forward(self, x):
            m = self.masks[self.i : self.i + len(x)].clone()
            self.i += len(x)
            return nn.functional.one_hot(m, 11).permute(0, 3, 1, 2).float()

    perfect = D.evaluate_segmenter(Oracle(tiny_scenes.masks), tiny_scenes)
    assert perfect == {"miou": 1.0, "miou_digits": 1.0, "pixel_accuracy": 1.0}
    masks = tiny_scenes.masks.clone()
    masks[masks > 0] = 0  # predicts background everywhere
    res = D.evaluate_segmenter(Oracle(masks), tiny_scenes)
    bg = (tiny_scenes.masks == 0).double().mean().item()
    present = len(tiny_scenes.masks.unique())
    assert res["miou_digits"] == 0.0
    assert res["miou"] == pytest.approx(bg / present)
    assert res["pixel_accuracy"] == pytest.approx(bg)


@pytest.mark.parametrize("cls", [D.TinyDetector, D.TinyUNet])
def test_prune_scene_model_shrinks_and_runs(cls):
    model = cls().eval()
    pruned = D.prune_scene_model(model, 0.5)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(pruned) < 0.6 * count(model)
    assert count(model) == count(cls())  # the input is untouched
    x = torch.rand(2, 1, 64, 64)
    ref, out = model(x), pruned(x)
    if cls is D.TinyDetector:
        assert out["heatmap"].shape == ref["heatmap"].shape
    else:
        assert out.shape == ref.shape
    with pytest.raises(ValueError, match="amount must be < 1"):
        D.prune_scene_model(model, 1.0)
    with pytest.raises(TypeError, match="model must be TinyDetector or TinyUNet"):
        D.prune_scene_model(nn.Linear(2, 2), 0.5)


def test_prune_keeps_the_largest_l1_channels():
    unet = D.TinyUNet()
    with torch.no_grad():
        w = unet.bottleneck[0].weight
        w.mul_(0.01)
        w[11], w[3], w[7] = -3.0, 2.0, 1.0  # the largest L1 norms, one of them negative
        unet.bottleneck[1].running_var.copy_(torch.arange(32.0))
    pruned = D.prune_scene_model(unet, 0.9)  # 32 channels → ⌊3.2⌋ = 3 kept, in their order
    b, p = unet.bottleneck, pruned.bottleneck
    torch.testing.assert_close(p[0].weight, b[0].weight[[3, 7, 11]])
    torch.testing.assert_close(p[1].running_var, torch.tensor([3.0, 7.0, 11.0]))
    assert p[3].in_channels == 3  # the reader of the pruned channels keeps the same three


@pytest.mark.parametrize("cls", [D.TinyDetector, D.TinyUNet])
def test_quantize_int8_runs_and_stays_close(cls, tiny_scenes):
    torch.manual_seed(0)
    model = cls(width=0.5).eval()
    q = D.quantize_int8(model, tiny_scenes, num_batches=1)
    x = tiny_scenes.images[:4]
    with torch.no_grad():
        ref, out = model(x), q(x)
    if cls is D.TinyDetector:
        ref, out = ref["heatmap"], out["heatmap"]
        assert any("quantized" in type(m).__module__ for m in q.net.modules())
    else:
        assert any("quantized" in type(m).__module__ for m in q.modules())
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


def test_feature_distillation_step_is_the_task_loss_for_a_copy():
    teacher = D.TinyDetector(width=0.5).eval()
    student = copy.deepcopy(teacher)
    c = student.net[0][-2].num_features
    reg = nn.Conv2d(c, c, 1)
    with torch.no_grad():
        reg.weight.copy_(torch.eye(c)[:, :, None, None])
        reg.bias.zero_()
    regressor = nn.Sequential(reg)
    scenes = make_scenes(4, seed=1)
    x, y = D.detector_dataset(scenes).tensors
    task = D.centernet_loss(student(x), y)
    loss = D.feature_distillation_step(
        student, teacher, regressor, x, y, hint_weight=3.0, kd_weight=2.0
    )
    assert loss.item() == pytest.approx(task.item(), abs=1e-5)  # hint 0 and KD 0 for an exact copy
    other = D.TinyDetector(width=0.5)
    loss2 = D.feature_distillation_step(
        other, teacher, regressor, x, y, hint_weight=3.0, kd_weight=2.0
    )
    assert loss2.item() > D.centernet_loss(other(x), y).item() + 1e-3
    loss2.backward()
    assert reg.weight.grad is not None and teacher.net[0][0].weight.grad is None


@pytest.mark.parametrize("task", ["detector", "segmenter"])
def test_feature_distillation_step_adds_weighted_hint_and_kd(task):
    """``L = L_task + β·hint + γ·KD``, each term recomputed from utils.distillation's losses."""
    from utils.distillation import hint_loss, kd_loss

    torch.manual_seed(0)
    teacher = D.build_scene_model(task, 0.5).eval()
    student = D.build_scene_model(task, 0.25).eval()
    scenes = make_scenes(4, seed=1)
    if task == "detector":
        with torch.no_grad():  # untrained heatmaps all sit at the prior: make the teacher's differ
            teacher.net[1][-1].bias[: D.NUM_DIGITS] = torch.linspace(-2.0, 2.0, D.NUM_DIGITS)
        x, y = D.detector_dataset(scenes).tensors
        s_feat, t_feat = student.net[0](x), teacher.net[0](x)
        s_out, t_out = student(x)["heatmap"], teacher(x)["heatmap"]
        task_loss = D.centernet_loss(student(x), y)
        zero = torch.zeros_like
        kd = kd_loss(  # per cell: two-class logits [0, z]
            torch.stack([zero(s_out), s_out], -1).reshape(-1, 2),
            torch.stack([zero(t_out), t_out], -1).reshape(-1, 2),
            3.0,
        )
    else:
        x, y = scenes.images, scenes.masks
        s_feat = student.bottleneck(student.enc1(x))
        t_feat = teacher.bottleneck(teacher.enc1(x))
        s_out, t_out = student(x), teacher(x)
        task_loss = D.weighted_cross_entropy(s_out, y)
        kd = kd_loss(  # per pixel over the 11 classes
            s_out.permute(0, 2, 3, 1).reshape(-1, 11),
            t_out.permute(0, 2, 3, 1).reshape(-1, 11),
            3.0,
        )
    regressor = nn.Conv2d(s_feat.shape[1], t_feat.shape[1], 1)
    hint = hint_loss(s_feat, t_feat, regressor)
    loss = D.feature_distillation_step(
        student, teacher, regressor, x, y, temperature=3.0, hint_weight=0.7, kd_weight=1.9
    )
    expected = task_loss + 0.7 * hint + 1.9 * kd
    assert hint.item() > 1e-3 and kd.item() > 1e-3  # both terms matter in this check
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("task", ["detector", "segmenter"])
def test_distill_trains_the_student_only(task, one_thread):
    torch.manual_seed(0)
    teacher = D.build_scene_model(task, 0.5)  # in train mode: distillation must freeze it, BN too
    student = D.build_scene_model(task, 0.25)
    before_t = copy.deepcopy(teacher.state_dict())
    before_s = copy.deepcopy(student.state_dict())
    scenes = make_scenes(16, seed=2)
    fn = D.distill_detector if task == "detector" else D.distill_segmenter
    history = fn(teacher, student, scenes, 1)
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"])
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before_t.items())
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())  # restored
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in before_s.items())
    with pytest.raises(TypeError, match="student must be"):
        fn(teacher, nn.Linear(2, 2), scenes, 1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fn(teacher, student, scenes, 1, temperature=0.0)


def test_weighted_cross_entropy_down_weights_background():
    logits = torch.zeros(1, 11, 1, 2)
    logits[0, 0, 0, 0] = 2.0  # pixel 0: background, confident; pixel 1: digit 3, uniform logits
    masks = torch.tensor([[[0, 4]]])
    ce = nn.functional.cross_entropy(logits, masks, reduction="none")[0, 0]
    w = D.BACKGROUND_WEIGHT
    expected = (w * ce[0] + ce[1]) / (w + 1)
    assert D.weighted_cross_entropy(logits, masks).item() == pytest.approx(
        expected.item(), rel=1e-6
    )
    assert 0 < w < 0.5


def test_scene_model_config_is_the_cache_key():
    det, seg = D.scene_model_config("detector"), D.scene_model_config("segmenter", 0.5, seed=1)
    assert (
        det["model"] == "detector" and det["lr"] == D.LR["detector"] and det["version"] == D.VERSION
    )
    assert (
        seg["width"] == 0.5 and seg["seed"] == 1 and seg["background_weight"] == D.BACKGROUND_WEIGHT
    )
    assert det["epochs"] == D.RECIPES["fast"]["detector_epochs"]
    assert seg["epochs"] == D.RECIPES["fast"]["segmenter_epochs"]
    # a new U-Net retrains the segmenter only; its encoder's source (the detector) is in its key
    assert seg["segmenter_version"] == D.SEGMENTER_VERSION and "segmenter_version" not in det
    assert seg["encoder_from"] == D.scene_model_config("detector", 0.5, seed=1)
    with pytest.raises(ValueError, match="name must be one of"):
        D.scene_model_config("classifier")


def test_int8_detector_keeps_map50_within_two_points():
    """The trained detector (cached; trained once if missing) survives static INT8 on held-out scenes."""
    model = D.get_detector()
    test = make_scenes(100, seed=11, split="test")
    fp32 = D.evaluate_detector(model, test)["map_50"]
    int8 = D.evaluate_detector(D.quantize_int8(model, D.training_scenes(200)), test)["map_50"]
    assert fp32 >= 0.75, f"the trained detector should reach mAP@0.5 >= 0.75, got {fp32:.3f}"
    assert int8 >= fp32 - 0.02, (
        f"INT8 mAP@0.5 {int8:.3f} is more than 2 points below FP32 {fp32:.3f}"
    )
