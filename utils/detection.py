"""Object detection and semantic segmentation on scenes of MNIST digits (chapter 8).

* :class:`TinyDetector` — an anchor-free, CenterNet-style detector (Zhou, Wang &
  Krähenbühl, "Objects as Points", 2019): a small convolutional backbone at output
  stride ``R = 4`` and one head that predicts, per cell, a heatmap per class (object
  centres), the box size and the sub-cell offset of the centre. Trained with the
  paper's penalty-reduced focal loss (:func:`focal_loss`) plus L1 on size and offset
  (:func:`centernet_loss`); decoded by 3×3 peak picking and torchvision's NMS
  (:func:`decode_detections`).
* :class:`TinyUNet` — a small U-Net (Ronneberger, Fischer & Brox, 2015): an encoder,
  a decoder that upsamples and concatenates the encoder's features of the same
  resolution (skip connections), and a 1×1 classifier per pixel.
* Metrics: :func:`mean_average_precision` (COCO-style AP with 101 recall points,
  Lin et al. 2014; tested equal to torchmetrics/pycocotools) and :func:`mean_iou`
  (dataset-level confusion matrix; tested equal to torchmetrics).
* Compression: both networks quantize with the course's static INT8 path
  (:func:`quantize_int8` → :func:`utils.production.quantize_static_int8`), prune with
  :mod:`utils.pruning`'s channel groups (:func:`prune_scene_model`) and distil with a
  FitNets hint on the backbone features plus output KD (:func:`distill_detector`,
  :func:`distill_segmenter`) built from :mod:`utils.distillation`'s losses.

Trained models come from :func:`get_detector` / :func:`get_segmenter` (trained once,
cached by :func:`utils.cache.cached_state`). Scenes come from :mod:`utils.scenes`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image

from utils.cache import cached_state
from utils.config import get_device, get_profile, seed_everything
from utils.data import make_loader
from utils.distillation import (
    HintRegressor,
    capture_features,
    frozen,
    hint_loss,
    kd_loss,
    on_device,
)
from utils.production import quantize_static_int8
from utils.pruning import (
    ChannelGroup,
    channel_groups,
    kept_channels,
    l1_channel_importance,
    prune_group,
)
from utils.scenes import SceneSet, make_scenes, scene_loader
from utils.training import device_of, fit
from utils.validation import (
    check_choice,
    check_float,
    check_int,
    check_module,
    check_tensor,
    check_type,
)

VERSION = 1
"""Part of every cache key of this module: bump it when a model or a training recipe changes."""
SEGMENTER_VERSION = 2
"""Part of the segmenter's cache key only: bump it when :class:`TinyUNet` or its recipe changes
(2: decoder of ``c2`` channels, 8 epochs — the detector's cache stays valid)."""
STRIDE = 4
"""Output stride ``R`` of :class:`TinyDetector`: one heatmap cell per ``R × R`` pixels."""
NUM_DIGITS = 10
MODEL_NAMES = ("detector", "segmenter")
COCO_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
"""IoU thresholds of COCO's AP: 0.50, 0.55, …, 0.95."""
RECALL_POINTS = 101
"""COCO interpolates precision at 101 recall points 0, 0.01, …, 1."""
MAX_DETS_PER_CLASS = 100
"""COCO keeps the 100 highest-scoring detections of each image (per class)."""


# ---------------------------------------------------------------- checks


def check_images(images: Tensor, name: str = "images") -> None:
    """Raise unless ``images`` is a ``(n, 1, H, W)`` tensor (a batch of grey scenes)."""
    check_tensor(name, images)
    if images.dim() != 4:
        raise ValueError(
            f"{name} must have 4 dimensions (n, 1, H, W), got shape {tuple(images.shape)}"
        )
    if images.shape[1] != 1:
        raise ValueError(f"{name} must have 1 channel (grey scenes), got {images.shape[1]}")


def check_boxes(boxes: Tensor, name: str = "boxes") -> None:
    """Raise unless ``boxes`` is a finite ``(k, 4)`` float tensor of ``xyxy`` boxes with ``x2 ≥ x1``, ``y2 ≥ y1``."""
    check_tensor(name, boxes, finite=True, ndim=2)
    if boxes.shape[1] != 4:
        raise ValueError(
            f"{name} must have shape (k, 4) (x1, y1, x2, y2), got {tuple(boxes.shape)}"
        )
    if not boxes.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {boxes.dtype}")
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise ValueError(f"{name} must be xyxy with x2 >= x1 and y2 >= y1")


def _check_width(width: float) -> None:
    check_float("width", width, 0.0, min_inclusive=False)


def _widths(width: float, base: Sequence[int]) -> list[int]:
    return [max(2, round(c * width)) for c in base]


# ---------------------------------------------------------------- models


def _cbr(
    c_in: int, c_out: int, stride: int = 1, kernel: int = 3, dilation: int = 1
) -> list[nn.Module]:
    pad = dilation * (kernel // 2)
    return [
        nn.Conv2d(c_in, c_out, kernel, stride, pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


def _fuse_groups(module: nn.Module) -> list[list[str]]:
    """Conv-BN-ReLU, Conv-BN and Conv-ReLU runs of consecutive leaves (names for ``fuse_modules``)."""
    leaves = [(n, m) for n, m in module.named_modules() if not list(m.children())]
    groups, i = [], 0
    while i < len(leaves):
        if isinstance(leaves[i][1], nn.Conv2d):
            run = [leaves[i][0]]
            kinds = (nn.BatchNorm2d, nn.ReLU)
            for kind in kinds:
                j = i + len(run)
                if j < len(leaves) and isinstance(leaves[j][1], kind):
                    run.append(leaves[j][0])
            if len(run) > 1:
                groups.append(run)
            i += len(run)
        else:
            i += 1
    return groups


class _Chain(nn.Sequential):
    """``nn.Sequential`` that lists its fusable Conv-BN-ReLU runs (for static INT8)."""

    def fuse_groups(self) -> list[list[str]]:
        return _fuse_groups(self)


class TinyDetector(nn.Module):
    """CenterNet-style detector (Zhou et al. 2019) at output stride 4.

    ``net`` is one chain ``backbone → head``: the backbone (five 3×3 conv-BN-ReLU, two
    of stride 2, the last dilated) and a head (3×3 conv-ReLU, 1×1 conv) whose
    ``num_classes + 4`` output channels are split by :meth:`forward` into

    * ``"heatmap"``: ``(n, num_classes, H/4, W/4)`` logits ``z``; ``σ(z)`` peaks at object centres;
    * ``"size"``: ``(n, 2, H/4, W/4)`` box width and height in cells (pixels / 4);
    * ``"offset"``: ``(n, 2, H/4, W/4)`` centre minus its cell's corner, in cells.

    ``hint_layer`` names the backbone (the feature map FitNets distils).
    """

    hint_layer = "net.0"

    def __init__(self, num_classes: int = NUM_DIGITS, width: float = 1.0) -> None:
        super().__init__()
        check_int("num_classes", num_classes, minimum=1)
        _check_width(width)
        c1, c2, c3 = _widths(width, (16, 32, 48))
        self.num_classes = num_classes
        backbone = _Chain(
            *_cbr(1, c1, stride=2),
            *_cbr(c1, c2, stride=2),
            *_cbr(c2, c3),
            *_cbr(c3, c3),
            *_cbr(c3, c3, dilation=2),
        )
        head = _Chain(
            nn.Conv2d(c3, c3, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, num_classes + 4, 1),
        )
        with torch.no_grad():  # heatmap prior 0.1 (focal-loss init, CenterNet §4)
            head[-1].bias[:num_classes] = -2.19
        self.net = _Chain(backbone, head)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        check_images(images)
        out = self.net(images)
        c = self.num_classes
        return {"heatmap": out[:, :c], "size": out[:, c : c + 2], "offset": out[:, c + 2 : c + 4]}

    def fuse_groups(self) -> list[list[str]]:
        return [[f"net.{n}" for n in g] for g in self.net.fuse_groups()]

    def channel_groups(self) -> list[ChannelGroup]:
        """Prunable channel groups: the chain's (:func:`utils.pruning.channel_groups`)."""
        return channel_groups(self.net)


class TinyUNet(nn.Module):
    """A small U-Net (Ronneberger et al. 2015): per-pixel class logits ``(n, num_classes, H, W)``.

    Encoder: ``enc1`` (one stride-2 3×3 conv-BN-ReLU, H/2) and ``bottleneck`` (a stride-2
    conv and three 3×3 convs, the last dilated, H/4) — the same layers as the backbone of
    :class:`TinyDetector`, so :func:`init_from_detector` can start from a trained detector
    (transfer learning). Decoder: a 1×1 conv reduces the bottleneck's channels to ``c2``
    (32 at width 1), ×2 nearest upsampling, concatenation with ``enc1``'s map (the skip
    connection), two 3×3 convs of ``c2`` channels (``dec1``) and a 1×1 ``classifier`` with
    ``4 · num_classes`` channels that ``PixelShuffle`` (sub-pixel
    convolution, Shi et al. 2016) turns into logits at full resolution — no convolution runs
    at full resolution, where thin layers are slowest. The concatenation is a
    ``FloatFunctional`` so the eager static INT8 path quantizes it. Class 0 is the
    background, ``1 + d`` the digit ``d``. ``hint_layer`` names the bottleneck.
    """

    hint_layer = "bottleneck"

    def __init__(self, num_classes: int = NUM_DIGITS + 1, width: float = 1.0) -> None:
        super().__init__()
        check_int("num_classes", num_classes, minimum=2)
        _check_width(width)
        c1, c2, c3 = _widths(width, (16, 32, 48))
        self.enc1 = _Chain(*_cbr(1, c1, stride=2))
        self.bottleneck = _Chain(
            *_cbr(c1, c2, stride=2), *_cbr(c2, c3), *_cbr(c3, c3), *_cbr(c3, c3, dilation=2)
        )
        # the decoder carries which digit a pixel belongs to: with c1 = 16 channels (the first
        # design) a quarter of the digits' pixels got the wrong digit; c2 = 32 halves that
        self.up1 = _Chain(*_cbr(c3, c2, kernel=1))
        self.dec1 = _Chain(*_cbr(c1 + c2, c2), *_cbr(c2, c2))
        self.classifier = nn.Conv2d(c2, 4 * num_classes, 1)
        self.shuffle = nn.PixelShuffle(2)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.cat = torch.ao.nn.quantized.FloatFunctional()

    def forward(self, images: Tensor) -> Tensor:
        check_images(images)
        if images.shape[-1] % 4 or images.shape[-2] % 4:
            raise ValueError(
                f"images must have H and W divisible by 4, got {tuple(images.shape[-2:])}"
            )
        e1 = self.enc1(images)
        b = self.bottleneck(e1)
        d1 = self.dec1(self.cat.cat([e1, self.upsample(self.up1(b))], dim=1))
        return self.shuffle(self.classifier(d1))

    def fuse_groups(self) -> list[list[str]]:
        names = ("enc1", "bottleneck", "up1", "dec1")
        return [[f"{n}.{m}" for m in g] for n in names for g in getattr(self, n).fuse_groups()]

    def channel_groups(self) -> list[ChannelGroup]:
        """Channels that only one layer reads: inside ``bottleneck`` and ``dec1``, the output of
        ``bottleneck`` (read by the 1×1 conv) and of ``dec1`` (read by the classifier). The output
        of ``enc1`` and of the 1×1 conv are concatenated (and read twice) and stay whole."""
        groups = []
        for name, reader in (("bottleneck", self.up1[0]), ("dec1", self.classifier)):
            block = getattr(self, name)
            convs = list(range(0, len(block), 3))
            for i in convs:
                nxt = (block[i + 3], 1) if i + 3 < len(block) else (reader, 1)
                groups.append(ChannelGroup(f"{name}.{i}", [block[i]], [block[i + 1]], [], [nxt]))
        return groups


def init_from_detector(unet: TinyUNet, detector: TinyDetector) -> TinyUNet:
    """Copy the backbone of a (trained) ``detector`` into the encoder of ``unet`` (same widths); returns ``unet``.

    The backbone's first conv-BN-ReLU becomes ``enc1``, the rest ``bottleneck``: the U-Net starts
    from features that already tell the digits apart (transfer learning).
    """
    check_type("unet", unet, TinyUNet)
    check_type("detector", detector, TinyDetector)
    source = list(detector.net[0].state_dict().values())
    target = {
        **unet.enc1.state_dict(),
        **{f"b.{k}": v for k, v in unet.bottleneck.state_dict().items()},
    }
    if [tuple(v.shape) for v in source] != [tuple(v.shape) for v in target.values()]:
        raise ValueError(
            "detector and unet must have the same width (their encoders differ in shape)"
        )
    n1 = len(unet.enc1.state_dict())
    unet.enc1.load_state_dict(dict(zip(unet.enc1.state_dict(), source[:n1], strict=True)))
    unet.bottleneck.load_state_dict(
        dict(zip(unet.bottleneck.state_dict(), source[n1:], strict=True))
    )
    return unet


def build_scene_model(name: str, width: float = 1.0) -> nn.Module:
    """An untrained ``"detector"`` (:class:`TinyDetector`) or ``"segmenter"`` (:class:`TinyUNet`)."""
    check_choice("name", name, MODEL_NAMES)
    _check_width(width)
    return TinyDetector(width=width) if name == "detector" else TinyUNet(width=width)


# ---------------------------------------------------------------- CenterNet targets and loss


def centernet_targets(
    boxes: Tensor, labels: Tensor, *, size: int, num_classes: int = NUM_DIGITS, stride: int = STRIDE
) -> Tensor:
    """Dense training target ``(num_classes + 5, size/R, size/R)`` of one scene (Zhou et al. 2019, §3).

    Channels: ``[0, C)`` heatmap ``Y = max_k exp(−(x−p̃ₖ)²/2σx² − (y−p̃ₖ)²/2σy²)`` with the
    centre cell ``p̃ = ⌊p/R⌋`` and ``σ = (w/R, h/R)/6``; ``C, C+1`` box size ``(w, h)/R``;
    ``C+2, C+3`` offset ``p/R − p̃``; ``C+4`` 1 at the centre cells (where size and
    offset are supervised).
    """
    check_boxes(boxes)
    check_int("size", size, minimum=stride)
    check_int("stride", stride, minimum=1)
    cells = size // stride
    target = torch.zeros(num_classes + 5, cells, cells)
    ys, xs = torch.meshgrid(torch.arange(cells), torch.arange(cells), indexing="ij")
    for box, label in zip(boxes.float(), labels.tolist(), strict=True):
        w, h = (box[2] - box[0]) / stride, (box[3] - box[1]) / stride
        cx, cy = (box[0] + box[2]) / (2 * stride), (box[1] + box[3]) / (2 * stride)
        px, py = int(cx.clamp(0, cells - 1)), int(cy.clamp(0, cells - 1))
        sx, sy = max(w.item() / 6, 1 / 3), max(h.item() / 6, 1 / 3)
        g = torch.exp(-((xs - px) ** 2) / (2 * sx**2) - ((ys - py) ** 2) / (2 * sy**2))
        target[label] = torch.maximum(target[label], g)
        c = num_classes
        target[c : c + 2, py, px] = torch.stack([w, h])
        target[c + 2 : c + 4, py, px] = torch.stack([cx - px, cy - py])
        target[c + 4, py, px] = 1.0
    return target


def focal_loss(logits: Tensor, heatmap: Tensor, alpha: float = 2.0, beta: float = 4.0) -> Tensor:
    """Penalty-reduced pixel-wise focal loss (Zhou et al. 2019, eq. 1), normalised by the object count.

    ``L = −1/N Σ { (1−p)^α log p            if Y = 1
                  { (1−Y)^β p^α log(1−p)    otherwise``, with ``p = σ(logits)``.
    """
    p = torch.sigmoid(logits)
    pos = heatmap.eq(1.0)
    pos_term = (1 - p).pow(alpha) * F.logsigmoid(logits)
    neg_term = (1 - heatmap).pow(beta) * p.pow(alpha) * F.logsigmoid(-logits)
    n_pos = pos.sum().clamp(min=1)
    return -(pos_term[pos].sum() + neg_term[~pos].sum()) / n_pos


def centernet_loss(
    outputs: dict[str, Tensor],
    target: Tensor,
    *,
    size_weight: float = 0.1,
    offset_weight: float = 1.0,
) -> Tensor:
    """``L = L_k + λ_size L_size + λ_off L_off`` (Zhou et al. 2019, eq. 4; λ_size = 0.1, λ_off = 1).

    ``target`` is a batch of :func:`centernet_targets`; the L1 terms are averaged over centre cells.
    """
    c = outputs["heatmap"].shape[1]
    centers = target[:, c + 4 : c + 5]
    n = centers.sum().clamp(min=1)
    l_size = (
        F.l1_loss(outputs["size"], target[:, c : c + 2], reduction="none") * centers
    ).sum() / n
    l_off = (
        F.l1_loss(outputs["offset"], target[:, c + 2 : c + 4], reduction="none") * centers
    ).sum() / n
    return (
        focal_loss(outputs["heatmap"], target[:, :c]) + size_weight * l_size + offset_weight * l_off
    )


# ---------------------------------------------------------------- decoding


@torch.no_grad()
def decode_detections(
    outputs: dict[str, Tensor],
    *,
    score_threshold: float = 0.3,
    max_det: int = 20,
    nms_iou: float = 0.5,
    stride: int = STRIDE,
) -> list[dict[str, Tensor]]:
    """Boxes from CenterNet maps: peaks of ``σ(heatmap)`` that are the maximum of their 3×3
    neighbourhood (Zhou et al. 2019, §4), score ``≥ score_threshold``; box centre
    ``R·(cell + offset)``, size ``R·size``; then class-wise NMS (``torchvision.ops.batched_nms``)
    and the ``max_det`` best. Returns one ``dict(boxes (k, 4) xyxy pixels, scores (k,), labels (k,))`` per image.
    """
    check_type("outputs", outputs, dict)
    for key in ("heatmap", "size", "offset"):
        if key not in outputs:
            raise ValueError(
                f"outputs must have the keys heatmap, size, offset; {key!r} is missing"
            )
        check_tensor(f"outputs[{key!r}]", outputs[key], ndim=4)
    check_float("score_threshold", score_threshold, 0.0, 1.0)
    check_int("max_det", max_det, minimum=1)
    check_float("nms_iou", nms_iou, 0.0, 1.0)
    heat = torch.sigmoid(outputs["heatmap"].float())
    n, c, h, w = heat.shape
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    scores, idx = peaks.flatten(1).topk(min(MAX_DETS_PER_CLASS, c * h * w), dim=1)
    labels, cell = idx // (h * w), idx % (h * w)
    ys, xs = (cell // w).float(), (cell % w).float()
    size = outputs["size"].float().flatten(2).gather(2, cell[:, None].expand(n, 2, -1)).clamp(min=0)
    off = outputs["offset"].float().flatten(2).gather(2, cell[:, None].expand(n, 2, -1))
    cx, cy = (xs + off[:, 0]) * stride, (ys + off[:, 1]) * stride
    bw, bh = size[:, 0] * stride, size[:, 1] * stride
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=2)
    results = []
    for i in range(n):
        keep = scores[i] >= score_threshold
        b = clip_boxes_to_image(boxes[i][keep], (h * stride, w * stride))
        s, lab = scores[i][keep], labels[i][keep]
        kept = batched_nms(b, s, lab, nms_iou)[:max_det]
        results.append({"boxes": b[kept].cpu(), "scores": s[kept].cpu(), "labels": lab[kept].cpu()})
    return results


# ---------------------------------------------------------------- COCO-style mAP


def _check_entries(name: str, entries: object, keys: tuple[str, ...]) -> None:
    check_type(name, entries, (list, tuple))
    for i, e in enumerate(entries):
        check_type(f"{name}[{i}]", e, dict)
        missing = [k for k in keys if k not in e]
        if missing:
            raise ValueError(f"{name}[{i}] must have the keys {list(keys)}; missing {missing}")
        check_boxes(e["boxes"], f"{name}[{i}]['boxes']")
        k = e["boxes"].shape[0]
        for key in keys[1:]:
            check_tensor(f"{name}[{i}][{key!r}]", e[key], ndim=1)
            if e[key].shape[0] != k:
                raise ValueError(
                    f"{name}[{i}][{key!r}] has {e[key].shape[0]} entries but there are {k} boxes"
                )


def _match(ious: Tensor, threshold: float) -> np.ndarray:
    """Greedy COCO matching: each detection (best score first) takes the unmatched ground
    truth of highest IoU if that IoU ``≥ threshold``. Returns a true-positive flag per detection."""
    n_det, n_gt = ious.shape
    taken = np.zeros(n_gt, dtype=bool)
    tp = np.zeros(n_det, dtype=bool)
    iou = ious.numpy()
    for d in range(n_det):
        cand = np.where(taken, -1.0, iou[d])
        if n_gt and cand.max() >= threshold:
            g = int(cand.argmax())
            taken[g] = True
            tp[d] = True
    return tp


def average_precision(tp: np.ndarray, scores: np.ndarray, n_gt: int) -> float:
    """COCO AP of one class: precision made monotone (the envelope ``p(r) = max_{r' ≥ r} p(r')``),
    read at the 101 recall points ``r = 0, 0.01, …, 1`` (0 beyond the last recall reached) and averaged."""
    order = np.argsort(-scores, kind="mergesort")
    tp = tp[order]
    tp_sum, fp_sum = np.cumsum(tp), np.cumsum(~tp)
    recall = tp_sum / n_gt
    precision = tp_sum / np.maximum(tp_sum + fp_sum, np.finfo(np.float64).eps)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    points = np.linspace(0.0, 1.0, RECALL_POINTS)
    idx = np.searchsorted(recall, points, side="left")
    q = np.zeros(RECALL_POINTS)
    ok = idx < len(precision)
    q[ok] = precision[idx[ok]]
    return float(q.mean())


def mean_average_precision(
    predictions: Sequence[dict[str, Tensor]],
    targets: Sequence[dict[str, Tensor]],
    iou_thresholds: Sequence[float] | None = None,
) -> dict[str, float]:
    """COCO-style mean average precision (Lin et al. 2014), area range "all", 100 detections per image and class.

    For each class and IoU threshold ``t``: detections of all images sorted by score,
    each matched greedily to an unmatched ground truth of the same class and image with
    IoU ``≥ t`` (:func:`_match`); AP from the 101-point interpolated precision
    (:func:`average_precision`). ``map`` averages over classes and thresholds
    (default 0.50:0.05:0.95), ``map_50`` / ``map_75`` over classes at one threshold
    (``-1`` when that threshold is not evaluated). A class without ground truth is left
    out of the mean, as in pycocotools; with no ground truth at all every value is ``-1``
    (COCO's "undefined"); a class with ground truth but no detection has AP 0.

    Args:
        predictions: per image ``dict(boxes (k, 4) xyxy, scores (k,), labels (k,))``.
        targets: per image ``dict(boxes (m, 4) xyxy, labels (m,))``.
        iou_thresholds: IoU thresholds in ``(0, 1]``.
    """
    _check_entries("predictions", predictions, ("boxes", "scores", "labels"))
    _check_entries("targets", targets, ("boxes", "labels"))
    if len(predictions) != len(targets):
        raise ValueError(
            f"predictions and targets must list the same images, got {len(predictions)} and {len(targets)}"
        )
    thresholds = list(COCO_IOU_THRESHOLDS if iou_thresholds is None else iou_thresholds)
    if not thresholds:
        raise ValueError("iou_thresholds must not be empty")
    for t in thresholds:
        check_float("iou_thresholds[i]", t, 0.0, 1.0, min_inclusive=False)
    classes = sorted({int(c) for t in targets for c in t["labels"].tolist()})
    ap = np.full((len(thresholds), len(classes)), -1.0)
    for k, cls in enumerate(classes):
        n_gt = sum(int((t["labels"] == cls).sum()) for t in targets)
        flags: list[list[np.ndarray]] = [[] for _ in thresholds]
        scores: list[np.ndarray] = []
        for pred, tgt in zip(predictions, targets, strict=True):
            sel = (pred["labels"] == cls).nonzero()[:, 0]
            s = pred["scores"][sel].detach().cpu().double()
            order = torch.from_numpy(np.argsort(-s.numpy(), kind="mergesort"))[:MAX_DETS_PER_CLASS]
            det = pred["boxes"][sel][order].detach().cpu().double()
            gt = tgt["boxes"][tgt["labels"] == cls].detach().cpu().double()
            ious = box_iou(det, gt)
            for j, t in enumerate(thresholds):
                flags[j].append(_match(ious, min(t, 1 - 1e-10)))
            scores.append(s[order].numpy())
        all_scores = np.concatenate(scores)
        for j in range(len(thresholds)):
            ap[j, k] = average_precision(np.concatenate(flags[j]), all_scores, n_gt)

    def mean(values: np.ndarray) -> float:
        valid = values[values > -1]
        return float(valid.mean()) if valid.size else -1.0

    def at(t: float) -> float:
        hits = [j for j, u in enumerate(thresholds) if abs(u - t) < 1e-9]
        return mean(ap[hits[0]]) if hits else -1.0

    return {"map": mean(ap), "map_50": at(0.5), "map_75": at(0.75)}


# ---------------------------------------------------------------- mean IoU


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """``M[i, j]`` = pixels of true class ``i`` predicted as ``j`` (int64, ``num_classes × num_classes``)."""
    check_int("num_classes", num_classes, minimum=2)
    check_tensor("pred", pred)
    check_tensor("target", target)
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    for name, t in (("pred", pred), ("target", target)):
        if t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer class indices, got {t.dtype}")
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(
                f"{name} values must be in [0, {num_classes}), got [{t.min()}, {t.max()}]"
            )
    idx = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    return torch.bincount(idx.cpu(), minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_per_class(confusion: Tensor) -> Tensor:
    """``IoU_c = M_cc / (Σ_j M_cj + Σ_i M_ic − M_cc)``; NaN for a class absent from both prediction and target."""
    m = confusion.double()
    tp = m.diagonal()
    union = m.sum(0) + m.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def mean_iou(
    pred: Tensor, target: Tensor, num_classes: int, ignore_background: bool = False
) -> float:
    """Mean intersection over union of class maps, from one confusion matrix over all pixels.

    ``mIoU = mean_c IoU_c`` over the classes present in ``pred`` or ``target``; with
    ``ignore_background`` class 0 is left out of the mean (its pixels still count as
    false positives/negatives of the digit classes).
    """
    check_type("ignore_background", ignore_background, bool)
    ious = iou_per_class(confusion_matrix(pred, target, num_classes))
    if ignore_background:
        ious = ious[1:]
    present = ious[~ious.isnan()]
    return float(present.mean()) if present.numel() else float("nan")


# ---------------------------------------------------------------- evaluation


def _targets(scenes: SceneSet) -> list[dict[str, Tensor]]:
    return [{"boxes": b, "labels": lab} for b, lab in zip(scenes.boxes, scenes.labels, strict=True)]


@torch.inference_mode()
def predict_detections(
    model: nn.Module, scenes: SceneSet, *, score_threshold: float = 0.05, batch_size: int = 64
) -> list[dict[str, Tensor]]:
    """Decoded detections of ``model`` on every scene (model in eval mode; its mode is restored)."""
    check_module("model", model)
    check_type("scenes", scenes, SceneSet)
    device = device_of(model)
    was_training = model.training
    model.eval()
    out: list[dict[str, Tensor]] = []
    try:
        for images, *_ in scene_loader(scenes, batch_size):
            out += decode_detections(model(images.to(device)), score_threshold=score_threshold)
    finally:
        model.train(was_training)
    return out


def evaluate_detector(
    model: nn.Module, scenes: SceneSet, *, score_threshold: float = 0.05
) -> dict[str, float]:
    """``dict(map, map_50, map_75)`` of ``model`` on ``scenes`` (low score threshold, as COCO evaluations use)."""
    preds = predict_detections(model, scenes, score_threshold=score_threshold)
    return mean_average_precision(preds, _targets(scenes))


@torch.inference_mode()
def predict_masks(model: nn.Module, scenes: SceneSet, *, batch_size: int = 64) -> Tensor:
    """``(n, S, S)`` arg-max class of every pixel (model in eval mode; its mode is restored)."""
    check_module("model", model)
    check_type("scenes", scenes, SceneSet)
    device = device_of(model)
    was_training = model.training
    model.eval()
    try:
        return torch.cat(
            [model(x.to(device)).argmax(1).cpu() for x, *_ in scene_loader(scenes, batch_size)]
        )
    finally:
        model.train(was_training)


def evaluate_segmenter(model: nn.Module, scenes: SceneSet) -> dict[str, float]:
    """``dict(miou, miou_digits, pixel_accuracy)``: mIoU over all 11 classes, over the 10 digits only, and pixel accuracy."""
    pred = predict_masks(model, scenes)
    num_classes = NUM_DIGITS + 1
    return {
        "miou": mean_iou(pred, scenes.masks, num_classes),
        "miou_digits": mean_iou(pred, scenes.masks, num_classes, ignore_background=True),
        "pixel_accuracy": float((pred == scenes.masks).double().mean()),
    }


# ---------------------------------------------------------------- training and the cache


RECIPES = {
    "fast": {
        "scenes": 1500,
        "detector_epochs": 12,
        "segmenter_epochs": 8,
        "detector_distill_epochs": 12,
        "segmenter_distill_epochs": 3,
    },
    "full": {
        "scenes": 3500,
        "detector_epochs": 30,
        "segmenter_epochs": 20,
        "detector_distill_epochs": 30,
        "segmenter_distill_epochs": 8,
    },
}
"""Training data and epochs per profile (the profile is :func:`utils.config.get_profile`).

``*_distill_epochs`` are the epochs of :func:`utils.vision.compress_scene_model`'s feature
distillation. The pruned student starts from the teacher's weights, and each of its steps also
runs the teacher: the lightly pruned segmenter needs 3 epochs (its INT8 student then matched
its teacher's mIoU). The detector,
pruned by half, keeps all of them (with 6 or 8 its INT8 student lost about 2 points of mAP@0.5)."""
LR = {"detector": 3e-3, "segmenter": 1e-2}
"""Adam learning rate of each scene model (cosine-decayed by :func:`utils.training.fit`)."""
BACKGROUND_WEIGHT = 0.05
"""Weight of the background class in the segmenter's cross-entropy (digits: 1). Ink is about 4 %
of the pixels; with equal weights a small U-Net first learns "ink of some digit" and, on the
course's budget, never which digit (it predicts background everywhere)."""


def training_scenes(n: int | None = None) -> SceneSet:
    """The training scenes of the active profile (seed 0, train digits)."""
    return make_scenes(
        n if n is not None else RECIPES[get_profile().name]["scenes"], seed=0, split="train"
    )


def detector_dataset(scenes: SceneSet, num_classes: int = NUM_DIGITS) -> TensorDataset:
    """``(image, centernet target)`` pairs for :func:`utils.training.fit`."""
    check_type("scenes", scenes, SceneSet)
    size = scenes.images.shape[-1]
    targets = torch.stack(
        [
            centernet_targets(b, lab, size=size, num_classes=num_classes)
            for b, lab in zip(scenes.boxes, scenes.labels, strict=True)
        ]
    )
    return TensorDataset(scenes.images, targets)


def detection_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``compute_loss`` of :func:`utils.training.fit` for a detector: :func:`centernet_loss`."""
    return centernet_loss(model(x), y)


def scene_model_config(name: str, width: float = 1.0, *, seed: int = 0) -> dict:
    """The cache configuration of :func:`get_scene_model` (every field that changes the trained weights).

    Put it into the key of anything derived from a trained scene model (e.g. a distilled
    student), so that a new recipe (a bump of :data:`VERSION`) retrains that too.
    """
    check_choice("name", name, MODEL_NAMES)
    _check_width(width)
    check_int("seed", seed, minimum=0)
    recipe = RECIPES[get_profile().name]
    config = _train_config(name, float(width), recipe[f"{name}_epochs"], seed, LR[name])
    if name == "segmenter":
        config["background_weight"] = BACKGROUND_WEIGHT
        config["segmenter_version"] = SEGMENTER_VERSION
        config["encoder_from"] = scene_model_config("detector", width, seed=seed)
    return config


def segmentation_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``compute_loss`` of :func:`utils.training.fit` for a segmenter: :func:`weighted_cross_entropy`."""
    return weighted_cross_entropy(model(x), y)


def weighted_cross_entropy(logits: Tensor, masks: Tensor) -> Tensor:
    """Pixel cross-entropy with class weights ``(BACKGROUND_WEIGHT, 1, …, 1)``, normalised by the weight sum
    (``Σ_p w_{y_p} · CE_p / Σ_p w_{y_p}``, as ``F.cross_entropy(weight=…)`` does)."""
    weight = torch.ones(logits.shape[1], device=logits.device)
    weight[0] = BACKGROUND_WEIGHT
    return F.cross_entropy(logits, masks, weight=weight)


def _train_config(name: str, width: float, epochs: int, seed: int, lr: float) -> dict:
    profile = get_profile().name
    return {
        "model": name,
        "width": width,
        "scenes": RECIPES[profile]["scenes"],
        "epochs": epochs,
        "seed": seed,
        "lr": lr,
        "version": VERSION,
    }


def get_scene_model(
    name: str, width: float = 1.0, *, seed: int = 0, progress: bool = False
) -> nn.Module:
    """A trained ``"detector"`` or ``"segmenter"`` of ``width`` (trained once, then loaded from the cache).

    The segmenter's encoder starts from the trained detector's backbone (:func:`init_from_detector`),
    then the whole U-Net is trained with :func:`weighted_cross_entropy`.
    """
    check_choice("name", name, MODEL_NAMES)
    _check_width(width)
    check_int("seed", seed, minimum=0)
    config = scene_model_config(name, width, seed=seed)
    epochs, lr = config["epochs"], config["lr"]

    def build() -> nn.Module:
        seed_everything(seed)
        return build_scene_model(name, width)

    def train(model: nn.Module) -> None:
        scenes = training_scenes()
        if name == "detector":
            data, loss = detector_dataset(scenes), detection_loss
        else:
            init_from_detector(model, get_detector(width, seed=seed, progress=progress))
            data, loss = TensorDataset(scenes.images, scenes.masks), segmentation_loss
        loader = make_loader(data, 32, shuffle=True, seed=seed)
        fit(model, loader, epochs=epochs, lr=lr, compute_loss=loss, progress=progress, desc=name)

    model, _, _ = cached_state(f"scene-{name}-w{width:g}", config, build, train)
    return model


def get_detector(width: float = 1.0, **kwargs) -> TinyDetector:
    """A trained :class:`TinyDetector` (see :func:`get_scene_model`)."""
    return get_scene_model("detector", width, **kwargs)


def get_segmenter(width: float = 1.0, **kwargs) -> TinyUNet:
    """A trained :class:`TinyUNet` (see :func:`get_scene_model`)."""
    return get_scene_model("segmenter", width, **kwargs)


# ---------------------------------------------------------------- compression


def quantize_int8(model: nn.Module, scenes: SceneSet, *, num_batches: int = 4) -> nn.Module:
    """Static INT8 copy of a detector or segmenter through :func:`utils.production.quantize_static_int8`
    (x86 backend, per-channel weights), calibrated on ``num_batches`` batches of ``scenes``.

    For a :class:`TinyDetector` the chain ``net`` is quantized (its output tensor is split into
    the three maps in float), for a :class:`TinyUNet` the whole network.
    """
    check_type("model", model, (TinyDetector, TinyUNet))
    check_type("scenes", scenes, SceneSet)
    calibration = scene_loader(scenes, 32)
    if isinstance(model, TinyUNet):
        return quantize_static_int8(model, calibration, num_batches=num_batches)
    q = copy.deepcopy(model).cpu()
    q.net = quantize_static_int8(model.net, calibration, num_batches=num_batches)
    return q


def prune_scene_model(model: nn.Module, amount: float) -> nn.Module:
    """A thinner copy of a detector or segmenter: in every channel group of ``model.channel_groups()``
    keep the ``⌊C(1 − amount)⌋`` channels of largest L1 filter norm (Li et al. 2017) —
    :func:`utils.pruning.l1_channel_importance` and :func:`utils.pruning.prune_group`."""
    check_type("model", model, (TinyDetector, TinyUNet))
    check_float("amount", amount, 0.0, 1.0, max_inclusive=False)
    pruned = copy.deepcopy(model)
    for group in pruned.channel_groups():
        keep = torch.topk(
            l1_channel_importance(group), kept_channels(group.channels, amount)
        ).indices
        prune_group(group, keep)
    return pruned


# ---------------------------------------------------------------- distillation


def _binary_logits(z: Tensor) -> Tensor:
    """Per-cell sigmoid logits as two-class logits ``[0, z]`` (``softmax([0, z]) = (1 − σ(z), σ(z))``), flattened."""
    return torch.stack([torch.zeros_like(z), z], dim=-1).reshape(-1, 2)


def _pixel_logits(z: Tensor) -> Tensor:
    """``(n, K, H, W)`` → ``(n·H·W, K)``: one row of class logits per pixel."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def feature_distillation_step(
    student: nn.Module,
    teacher: nn.Module,
    regressor: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    temperature: float = 2.0,
    hint_weight: float = 1.0,
    kd_weight: float = 1.0,
) -> Tensor:
    """Distillation loss of one batch for a detector or a segmenter.

    ``L = L_task + β · hint(F_s, F_t) + γ · KD`` where ``hint`` is the FitNets loss
    (:func:`utils.distillation.hint_loss`, a learned 1×1 ``regressor``) between the
    models' ``hint_layer`` features and ``KD`` is :func:`utils.distillation.kd_loss`
    (Hinton et al. 2015, ``T²``-scaled) on the outputs: per heatmap cell as two-class
    logits for a detector, per pixel over the 11 classes for a segmenter. ``L_task``
    is :func:`centernet_loss` (detector) or :func:`weighted_cross_entropy` (segmenter).
    """
    with capture_features(teacher, [teacher.hint_layer]) as t_feat, torch.no_grad():
        t_out = teacher(x.to(device_of(teacher)))
    with capture_features(student, [student.hint_layer]) as s_feat:
        s_out = student(x)
    hint = hint_loss(s_feat[student.hint_layer], t_feat[teacher.hint_layer].to(x.device), regressor)
    if isinstance(student, TinyDetector):
        task = centernet_loss(s_out, y)
        soft = kd_loss(
            _binary_logits(s_out["heatmap"]),
            _binary_logits(t_out["heatmap"].to(x.device)),
            temperature,
        )
    else:
        task = weighted_cross_entropy(s_out, y)
        soft = kd_loss(_pixel_logits(s_out), _pixel_logits(t_out.to(x.device)), temperature)
    return task + hint_weight * hint + kd_weight * soft


def _distill(
    teacher: nn.Module,
    student: nn.Module,
    data: TensorDataset,
    epochs: int,
    *,
    lr: float,
    temperature: float,
    hint_weight: float,
    kd_weight: float,
    seed: int,
    progress: bool,
) -> list[dict[str, float]]:
    check_int("epochs", epochs, minimum=0)
    check_float("temperature", temperature, 0.0, min_inclusive=False)
    check_float("hint_weight", hint_weight, 0.0)
    check_float("kd_weight", kd_weight, 0.0)
    device = get_device()
    example = data.tensors[0][:1]
    with torch.no_grad(), frozen(teacher), capture_features(teacher, [teacher.hint_layer]) as tf:
        teacher(example.to(device_of(teacher)))  # frozen: eval mode here, the caller's mode after
    with torch.no_grad(), capture_features(student, [student.hint_layer]) as sf:
        was = student.training
        student.eval()(example.to(device_of(student)))
        student.train(was)
    regressor = HintRegressor(sf[student.hint_layer].shape[1], tf[teacher.hint_layer].shape[1]).to(
        device
    )

    def compute_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return feature_distillation_step(
            model,
            teacher,
            regressor,
            x,
            y,
            temperature=temperature,
            hint_weight=hint_weight,
            kd_weight=kd_weight,
        )

    with frozen(teacher), on_device(teacher, device):
        return fit(
            student,
            make_loader(data, 32, shuffle=True, seed=seed),
            epochs=epochs,
            lr=lr,
            compute_loss=compute_loss,
            params=list(student.parameters()) + list(regressor.parameters()),
            device=device,
            progress=progress,
            desc="distill",
        )


def distill_detector(
    teacher: TinyDetector,
    student: TinyDetector,
    scenes: SceneSet,
    epochs: int,
    *,
    lr: float = 3e-3,
    temperature: float = 2.0,
    hint_weight: float = 1.0,
    kd_weight: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Train ``student`` in place on ``scenes`` with :func:`feature_distillation_step`; the teacher is frozen."""
    check_type("teacher", teacher, TinyDetector)
    check_type("student", student, TinyDetector)
    check_type("scenes", scenes, SceneSet)
    return _distill(
        teacher,
        student,
        detector_dataset(scenes, student.num_classes),
        epochs,
        lr=lr,
        temperature=temperature,
        hint_weight=hint_weight,
        kd_weight=kd_weight,
        seed=seed,
        progress=progress,
    )


def distill_segmenter(
    teacher: TinyUNet,
    student: TinyUNet,
    scenes: SceneSet,
    epochs: int,
    *,
    lr: float = 3e-3,
    temperature: float = 2.0,
    hint_weight: float = 1.0,
    kd_weight: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Train ``student`` in place on ``scenes`` with :func:`feature_distillation_step`; the teacher is frozen."""
    check_type("teacher", teacher, TinyUNet)
    check_type("student", student, TinyUNet)
    check_type("scenes", scenes, SceneSet)
    return _distill(
        teacher,
        student,
        TensorDataset(scenes.images, scenes.masks),
        epochs,
        lr=lr,
        temperature=temperature,
        hint_weight=hint_weight,
        kd_weight=kd_weight,
        seed=seed,
        progress=progress,
    )
