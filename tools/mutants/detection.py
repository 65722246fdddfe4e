"""Mutants of utils/detection.py: CenterNet targets, loss and decoding, COCO mAP, mIoU, compression.

Run of 2026-11-27 (source as of commit 3544877): 23 of the first 24 killed; the
survivor "map_50 read at the wrong threshold" is now killed by the IoU-0.52 case of
test_map_per_class_mean_and_threshold_mean (checked by hand).
Later run of the last three on main (186d4e5): "pruning keeps the smallest L1 channels" killed,
both distillation mutants SURVIVED (the test summed hint and KD only as "loss > task"; the
teacher probe left it in eval mode, so dropping ``frozen`` changed nothing a test saw).
Now killed by test_feature_distillation_step_adds_weighted_hint_and_kd and by
test_distill_trains_the_student_only with a train-mode teacher. Full run on branch s3ch8
(commit 92eb290): 27/27 killed.
"""

from mutate import Mutant

TESTS = ["tests/test_detection.py"]
F = "utils/detection.py"
MUTANTS = [
    # COCO-style mAP
    Mutant(
        "IoU threshold > instead of >=",
        F,
        "cand.max() >= threshold",
        "cand.max() > threshold",
    ),
    Mutant(
        "precision envelope missing",
        F,
        "precision = np.maximum.accumulate(precision[::-1])[::-1]",
        "precision = precision",
    ),
    Mutant(
        "all-point AP instead of 101 recall points",
        F,
        "return float(q.mean())",
        "return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))",
    ),
    Mutant(
        "11 recall points (VOC 2007) instead of 101", F, "RECALL_POINTS = 101", "RECALL_POINTS = 11"
    ),
    Mutant(
        "recall points looked up on the right",
        F,
        'np.searchsorted(recall, points, side="left")',
        'np.searchsorted(recall, points, side="right")',
    ),
    Mutant(
        "a ground truth matched twice",
        F,
        "cand = np.where(taken, -1.0, iou[d])",
        "cand = iou[d]",
    ),
    Mutant(
        "first free ground truth above the threshold, not the best",
        F,
        "g = int(cand.argmax())",
        "g = int(np.flatnonzero(cand >= threshold)[0])",
    ),
    Mutant(
        "class ignored in matching",
        F,
        'sel = (pred["labels"] == cls).nonzero()[:, 0]',
        'sel = torch.arange(len(pred["labels"]))',
    ),
    Mutant(
        "detections ranked by ascending score",
        F,
        'order = np.argsort(-scores, kind="mergesort")',
        'order = np.argsort(scores, kind="mergesort")',
    ),
    Mutant(
        "classes without ground truth averaged in",
        F,
        'classes = sorted({int(c) for t in targets for c in t["labels"].tolist()})',
        'classes = sorted({int(c) for t in [*targets, *predictions] for c in t["labels"].tolist()})',
    ),
    Mutant(
        "map_50 read at the wrong threshold",
        F,
        'return {"map": mean(ap), "map_50": at(0.5), "map_75": at(0.75)}',
        'return {"map": mean(ap), "map_50": at(0.55), "map_75": at(0.75)}',
    ),
    Mutant(
        "x2 < x1 accepted",
        F,
        "if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():",
        "if (boxes[:, 3] < boxes[:, 1]).any():",
    ),
    # mIoU
    Mutant(
        "background counted in mIoU of digits", F, "        ious = ious[1:]", "        ious = ious"
    ),
    Mutant(
        "union without subtracting the intersection",
        F,
        "union = m.sum(0) + m.sum(1) - tp",
        "union = m.sum(0) + m.sum(1)",
    ),
    Mutant(
        "absent classes counted as IoU 0",
        F,
        'torch.full_like(tp, float("nan"))',
        "torch.zeros_like(tp)",
    ),
    # CenterNet
    Mutant(
        "NMS over all classes instead of per class",
        F,
        "kept = batched_nms(b, s, lab, nms_iou)[:max_det]",
        "kept = batched_nms(b, s, torch.zeros_like(lab), nms_iou)[:max_det]",
    ),
    Mutant(
        "no 3x3 peak picking",
        F,
        "peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)",
        "peaks = heat",
    ),
    Mutant(
        "offset ignored when decoding",
        F,
        "cx, cy = (xs + off[:, 0]) * stride, (ys + off[:, 1]) * stride",
        "cx, cy = xs * stride, ys * stride",
    ),
    Mutant(
        "max_det not applied",
        F,
        "kept = batched_nms(b, s, lab, nms_iou)[:max_det]",
        "kept = batched_nms(b, s, lab, nms_iou)",
    ),
    Mutant(
        "centre cell rounded instead of floored",
        F,
        "px, py = int(cx.clamp(0, cells - 1)), int(cy.clamp(0, cells - 1))",
        "px, py = round(float(cx.clamp(0, cells - 1))), round(float(cy.clamp(0, cells - 1)))",
    ),
    Mutant(
        "Gaussian sigma of width and height swapped",
        F,
        "sx, sy = max(w.item() / 6, 1 / 3), max(h.item() / 6, 1 / 3)",
        "sx, sy = max(h.item() / 6, 1 / 3), max(w.item() / 6, 1 / 3)",
    ),
    Mutant(
        "focal loss without the (1 - Y)^beta penalty reduction",
        F,
        "neg_term = (1 - heatmap).pow(beta) * p.pow(alpha)",
        "neg_term = p.pow(alpha)",
    ),
    Mutant(
        "focal loss not normalised by the object count",
        F,
        "n_pos = pos.sum().clamp(min=1)",
        "n_pos = torch.tensor(1.0)",
    ),
    Mutant(
        "size loss weight 1 instead of 0.1",
        F,
        "size_weight: float = 0.1",
        "size_weight: float = 1.0",
    ),
    # compression
    Mutant(
        "pruning keeps the smallest L1 channels",
        F,
        "l1_channel_importance(group), kept_channels(group.channels, amount)",
        "-l1_channel_importance(group), kept_channels(group.channels, amount)",
    ),
    Mutant(
        "distillation drops the output KD term",
        F,
        "return task + hint_weight * hint + kd_weight * soft",
        "return task + hint_weight * hint",
    ),
    Mutant(
        "distillation trains the teacher too",
        F,
        "    with frozen(teacher), on_device(teacher, device):\n        return fit(",
        "    with on_device(teacher, device):\n        return fit(",
    ),
]
