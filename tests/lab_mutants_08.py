"""Mutants of lab 08 (solutions/08_cv.ipynb): plausible wrong answers its checks must catch."""

from __future__ import annotations

from lab_mutants import LabMutant

LAB = "08_cv"

_IOU = "return inter / (area_a[:, None] + area_b[None, :] - inter)"

MUTANTS = [
    LabMutant(
        "standard conv MACs without the kernel area",
        "def separable_block(",
        "return out_h * out_w * cout * cin * kernel * kernel",
        "return out_h * out_w * cout * cin",
    ),
    LabMutant(
        "separable MACs forget the pointwise conv",
        "def separable_block(",
        "return out_h * out_w * cin * kernel * kernel + out_h * out_w * cin * cout",
        "return out_h * out_w * cin * kernel * kernel",
    ),
    LabMutant(
        "depthwise part counted like a full conv (× C_out)",
        "def separable_block(",
        "return out_h * out_w * cin * kernel * kernel + out_h * out_w * cin * cout",
        "return out_h * out_w * cin * cout * kernel * kernel + out_h * out_w * cin * cout",
    ),
    LabMutant(
        "calls the reference (utils.vision.separable_macs)",
        "def separable_block(",
        "return out_h * out_w * cin * kernel * kernel + out_h * out_w * cin * cout",
        "return vision.separable_macs(cin, cout, kernel, out_h, out_w)",
    ),
    LabMutant(
        "depthwise conv without groups (a full 3×3 conv)",
        "def separable_block(",
        "nn.Conv2d(cin, cin, kernel, stride, kernel // 2, groups=cin, bias=False)",
        "nn.Conv2d(cin, cin, kernel, stride, kernel // 2, bias=False)",
    ),
    LabMutant(
        "stride on the pointwise conv instead of the depthwise one",
        "def separable_block(",
        "nn.Conv2d(cin, cout, 1, bias=False)",
        "nn.Conv2d(cin, cout, 1, stride, bias=False)",
    ),
    LabMutant(
        "no padding on the depthwise conv",
        "def separable_block(",
        "nn.Conv2d(cin, cin, kernel, stride, kernel // 2, groups=cin, bias=False)",
        "nn.Conv2d(cin, cin, kernel, stride, 0, groups=cin, bias=False)",
    ),
    LabMutant(
        "union forgets to subtract the intersection",
        "def box_iou(",
        _IOU,
        "return inter / (area_a[:, None] + area_b[None, :])",
    ),
    LabMutant(
        "intersection not clamped at 0",
        "def box_iou(",
        "wh = (bottom_right - top_left).clamp(min=0)",
        "wh = bottom_right - top_left",
    ),
    LabMutant(
        "min and max of the corners swapped",
        "def box_iou(",
        "top_left = torch.maximum(a[:, None, :2], b[None, :, :2])",
        "top_left = torch.minimum(a[:, None, :2], b[None, :, :2])",
    ),
    LabMutant(
        "calls the reference (torchvision.ops.box_iou)",
        "def box_iou(",
        _IOU,
        "return torchvision.ops.box_iou(a, b)",
    ),
    LabMutant(
        "AP without the precision envelope",
        "def box_iou(",
        "envelope = precision.flip(0).cummax(0).values.flip(0)",
        "envelope = precision",
    ),
    LabMutant(
        "11-point instead of 101-point interpolation",
        "def box_iou(",
        "points = torch.linspace(0, 1, 101, dtype=torch.float64)",
        "points = torch.linspace(0, 1, 11, dtype=torch.float64)",
    ),
    LabMutant(
        "recall divided by the predictions, not the true boxes",
        "def box_iou(",
        "recall = tps / num_gt",
        "recall = tps / len(tp)",
    ),
    LabMutant(
        "a true box can be matched twice",
        "def box_iou(",
        "ious = box_iou(box[None], gts[i])[0].masked_fill(used[i], -1.0)",
        "ious = box_iou(box[None], gts[i])[0]",
    ),
    LabMutant(
        "predictions sorted by ascending score",
        "def box_iou(",
        "found.sort(key=lambda item: -item[0])",
        "found.sort(key=lambda item: item[0])",
    ),
    LabMutant(
        "predicted class ignored",
        "def box_iou(",
        "            if int(lab) == c\n",
        "",
    ),
    LabMutant(
        "IoU threshold 0.75 instead of 0.5",
        "def box_iou(",
        "hit = bool(ious[best] >= 0.5)",
        "hit = bool(ious[best] >= 0.75)",
    ),
    LabMutant(
        "budget limit is strict (<)",
        "def pick_under_budget(",
        "and lat.median_ms <= limit",
        "and lat.median_ms < limit",
    ),
    LabMutant(
        "noisy measurements trusted",
        "def pick_under_budget(",
        "if name != baseline and not lat.noisy and lat.median_ms <= limit",
        "if name != baseline and lat.median_ms <= limit",
    ),
    LabMutant(
        "picks the fastest, not the best quality",
        "def pick_under_budget(",
        "return max(inside, key=lambda name: quality[name])",
        "return min(inside, key=lambda name: latencies[name].median_ms)",
    ),
    LabMutant(
        "the baseline counts as a candidate",
        "def pick_under_budget(",
        "if name != baseline and not lat.noisy and lat.median_ms <= limit",
        "if not lat.noisy and lat.median_ms <= limit",
    ),
    LabMutant(
        "falls back to the baseline when nothing fits",
        "def pick_under_budget(",
        "        return None\n",
        "        return baseline\n",
    ),
]
