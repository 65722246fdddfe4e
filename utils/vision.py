"""Vision models of chapter 8: ResNet-18 and MobileNetV2 adapted to small images, their blocks, their cost.

Lesson 08 (sections 8.1–8.2) and lab 08 (exercise 1) teach what is here:

* :class:`ResNet18` — torchvision's ResNet-18 topology (He et al., CVPR 2016: four
  stages of two basic blocks, 64·w … 512·w channels) adapted to 28×28 digits the way
  CIFAR ResNets are: a 3×3 stride-1 stem, no max-pool, one input channel, a width
  multiplier ``w``. It is built from :class:`utils.models.BasicBlock` as a
  :class:`utils.models.SmallResNet`, so channel pruning (``utils.pruning``), static
  INT8 (``utils.production``) and the pipeline (``utils.pipeline.accelerate``) work
  on it unchanged; ``tests/test_vision.py`` checks that at ``w = 1`` it has exactly the
  parameters and MACs of the adapted ``torchvision.models.resnet18``.
* :func:`mobilenet_v2` — ``torchvision.models.MobileNetV2`` (Sandler et al., CVPR 2018)
  with a stride-1 stem on one channel and a total stride of 8 instead of 32.
* :class:`DepthwiseSeparableConv` (Howard et al. 2017) and torchvision's
  :class:`InvertedResidual`, with the hand formulas of their MACs
  (:func:`conv_macs`, :func:`separable_macs`, :func:`inverted_residual_macs`) that the
  tests compare with ``utils.benchmark.count_macs`` and ``FlopCounterMode``.
* :func:`resize_images` / :class:`Resize` — input-resolution scaling.
* :func:`get_classifier` — a model trained once on MNIST-5k and cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.mobilenetv2 import InvertedResidual, MobileNetV2

from utils.cache import cached_state
from utils.config import get_profile, seed_everything
from utils.data import load_splits, make_loader
from utils.models import BasicBlock, ConvBNReLU, SmallResNet
from utils.training import fit
from utils.validation import check_choice, check_float, check_int, check_tensor, check_type

VISION_MODELS = ("resnet18", "mobilenet_v2")
"""Names accepted by :func:`build_vision_model` and :func:`get_classifier`."""

VISION_VERSION = 1
"""Bump when a training recipe of :func:`get_classifier` changes (it keys the cache)."""

EPOCHS = {"fast": 3, "full": 10}
"""Training epochs of :func:`get_classifier` per profile (fast: ≤ about a minute per model on one core)."""

RESNET18_WIDTHS = (64, 128, 256, 512)
# torchvision's MobileNetV2 setting (t, c, n, s) with the strides of a 28×28 input:
# the stem and the 24-channel stage keep stride 1, so the last maps are 4×4, not 1×1.
SMALL_MOBILENET_V2 = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1]]
SMALL_MOBILENET_V2 += [[6, 160, 3, 2], [6, 320, 1, 1]]


def scale_channels(channels: int, width: float) -> int:
    """``max(4, round(channels · width))``: a width multiplier's channel count (MobileNet's α)."""
    check_int("channels", channels, minimum=1)
    check_float("width", width, 0.0, min_inclusive=False)
    return max(4, int(round(channels * width)))


def check_images(images: Tensor, channels: int | None = None) -> None:
    """Raise unless ``images`` is a batch ``(N, C, H, W)`` (with ``C == channels`` when given)."""
    check_tensor("images", images)
    if images.dim() != 4:
        raise ValueError(
            f"images must be a batch of shape (N, C, H, W), got shape {tuple(images.shape)}"
        )
    if channels is not None and images.shape[1] != channels:
        raise ValueError(
            f"images must have {channels} channel(s), got {images.shape[1]} "
            f"(shape {tuple(images.shape)})"
        )


# ----------------------------------------------------------------- models
class ResNet18(SmallResNet):
    """ResNet-18 for small images: 3×3 stride-1 stem, no max-pool, stages of 2 blocks, width ``w``.

    Channels ``(64, 128, 256, 512)·w`` (:func:`scale_channels`), strides 1, 2, 2, 2
    (28×28 → 4×4), global average pooling and one linear layer (He et al. 2016,
    CIFAR-style stem). Inherits ``forward`` and ``fuse_groups`` from
    :class:`utils.models.SmallResNet`, so the course's pruning and INT8 apply.
    """

    def __init__(self, width: float = 1.0, in_channels: int = 1, num_classes: int = 10) -> None:
        nn.Module.__init__(self)
        check_float("width", width, 0.0, 4.0, min_inclusive=False)
        check_int("in_channels", in_channels, minimum=1)
        check_int("num_classes", num_classes, minimum=2)
        widths = [scale_channels(c, width) for c in RESNET18_WIDTHS]
        self.in_channels = in_channels
        self.stem = ConvBNReLU(in_channels, widths[0])
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for b in range(2):
                layers.append(BasicBlock(cin, w, stride=2 if (i > 0 and b == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        return super().forward(x)


def mobilenet_v2(width: float = 1.0, in_channels: int = 1, num_classes: int = 10) -> MobileNetV2:
    """``torchvision.models.MobileNetV2`` for 28×28 inputs (Sandler et al. 2018).

    The stem becomes a 3×3 stride-1 convolution on ``in_channels`` and the setting
    :data:`SMALL_MOBILENET_V2` drops two of the five stride-2 steps; everything else
    (inverted residuals with linear bottlenecks, ReLU6, ``width_mult``) is torchvision's.
    """
    check_float("width", width, 0.0, 4.0, min_inclusive=False)
    check_int("in_channels", in_channels, minimum=1)
    check_int("num_classes", num_classes, minimum=2)
    model = MobileNetV2(
        num_classes=num_classes,
        width_mult=width,
        inverted_residual_setting=SMALL_MOBILENET_V2,
        dropout=0.0,
    )
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, 1, 1, bias=False)
    return model


def build_vision_model(
    name: str, width: float = 1.0, in_channels: int = 1, num_classes: int = 10
) -> nn.Module:
    """An untrained model of :data:`VISION_MODELS` by name, at width multiplier ``width``."""
    check_choice("name", name, VISION_MODELS)
    if name == "resnet18":
        return ResNet18(width, in_channels, num_classes)
    return mobilenet_v2(width, in_channels, num_classes)


# ----------------------------------------------------------------- blocks and their cost
class DepthwiseSeparableConv(nn.Sequential):
    """Depthwise ``k×k`` conv (one filter per channel) → BN → ReLU, then pointwise 1×1 → BN → ReLU.

    Replaces a standard ``k×k`` convolution ``cin → cout`` (Howard et al. 2017, MobileNet);
    its MACs are :func:`separable_macs`.
    """

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> None:
        check_int("cin", cin, minimum=1)
        check_int("cout", cout, minimum=1)
        check_int("kernel", kernel, minimum=1)
        check_int("stride", stride, minimum=1)
        super().__init__(ConvBNReLU(cin, cin, kernel, stride, groups=cin), ConvBNReLU(cin, cout, 1))


def conv_macs(cin: int, cout: int, kernel: int, out_h: int, out_w: int, groups: int = 1) -> int:
    """MACs of a ``k×k`` convolution: ``H_out · W_out · C_out · (C_in / groups) · k²``."""
    for name, v in (("cin", cin), ("cout", cout), ("kernel", kernel), ("groups", groups)):
        check_int(name, v, minimum=1)
    check_int("out_h", out_h, minimum=1)
    check_int("out_w", out_w, minimum=1)
    if cin % groups or cout % groups:
        raise ValueError(f"groups={groups} must divide cin={cin} and cout={cout}")
    return out_h * out_w * cout * (cin // groups) * kernel * kernel


def separable_macs(cin: int, cout: int, kernel: int, out_h: int, out_w: int) -> int:
    """MACs of :class:`DepthwiseSeparableConv`: ``H·W·C_in·k²`` (depthwise) + ``H·W·C_in·C_out`` (pointwise).

    Its ratio to a standard convolution is ``1/C_out + 1/k²`` (Howard et al. 2017, eq. 5).
    """
    depthwise = conv_macs(cin, cin, kernel, out_h, out_w, groups=cin)
    return depthwise + conv_macs(cin, cout, 1, out_h, out_w)


def inverted_residual_macs(
    cin: int, cout: int, stride: int, expand: int, in_h: int, in_w: int
) -> int:
    """MACs of a MobileNetV2 inverted residual (Sandler et al. 2018, Table 1).

    Hidden width ``t·C_in``: expansion 1×1 ``H·W·C_in·t·C_in`` (absent when ``t = 1``),
    depthwise 3×3 ``H'·W'·t·C_in·9``, linear projection 1×1 ``H'·W'·t·C_in·C_out``,
    where ``H' = ⌈H / s⌉`` (padding 1).
    """
    check_int("stride", stride, minimum=1, maximum=2)
    check_int("expand", expand, minimum=1)
    hidden = cin * expand
    out_h, out_w = -(-in_h // stride), -(-in_w // stride)
    total = conv_macs(cin, hidden, 1, in_h, in_w) if expand != 1 else 0
    total += conv_macs(hidden, hidden, 3, out_h, out_w, groups=hidden)
    return total + conv_macs(hidden, cout, 1, out_h, out_w)


# ----------------------------------------------------------------- resolution
def resize_images(images: Tensor, size: int) -> Tensor:
    """Bilinear resize (with anti-aliasing when shrinking) of a batch ``(N, C, H, W)`` to ``size×size``."""
    check_images(images)
    check_int("size", size, minimum=4)
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    shrink = size < min(images.shape[-2:])
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=shrink)


class Resize(nn.Module):
    """``resize_images(x, size)`` as a layer: put it in front of a model to run it at ``size×size``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        check_int("size", size, minimum=4)
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        return resize_images(x, self.size)


def at_resolution(model: nn.Module, size: int) -> nn.Sequential:
    """``Resize(size) → model``: input-resolution scaling of a trained model, without retraining."""
    return nn.Sequential(Resize(size), model)


def latency_grid(
    names: tuple[str, ...] = VISION_MODELS,
    widths: tuple[float, ...] = (0.25, 0.5, 1.0),
    sizes: tuple[int, ...] = (14, 28, 56),
    *,
    batch_size: int = 1,
    rounds: int = 3,
    repeats: int = 3,
    threads: int | None = None,
):
    """Latency of every ``(model, width)`` at every input size ``size×size`` (图15's data), as a DataFrame.

    Latency does not depend on the weights, so the models are untrained. At each
    size all variants are timed interleaved (:func:`utils.benchmark.measure_latency_interleaved`,
    the course's one policy). Columns: ``model, width, size, macs, latency_ms, p10_ms,
    p90_ms, noisy, threads``.
    """
    import pandas as pd

    from utils.benchmark import count_macs, measure_latency_interleaved

    check_type("names", names, (tuple, list))
    for name in names:
        check_choice("names[i]", name, VISION_MODELS)
    check_type("widths", widths, (tuple, list))
    check_type("sizes", sizes, (tuple, list))
    if not names or not widths or not sizes:
        raise ValueError("names, widths and sizes must not be empty")
    for s in sizes:
        check_int("sizes[i]", s, minimum=8)
    check_int("batch_size", batch_size, minimum=1)
    models = {(n, w): build_vision_model(n, w).eval() for n in names for w in widths}
    rows = []
    for size in sizes:
        x = torch.randn(batch_size, 1, size, size)
        lats = measure_latency_interleaved(
            {f"{n}@{w}": m for (n, w), m in models.items()},
            x,
            rounds=rounds,
            repeats=repeats,
            warmup=2,
            threads=threads,
        )
        for (n, w), m in models.items():
            lat = lats[f"{n}@{w}"]
            rows.append(
                {
                    "model": n,
                    "width": w,
                    "size": size,
                    "macs": count_macs(m, x[:1]),
                    "latency_ms": lat.median_ms,
                    "p10_ms": lat.p10_ms,
                    "p90_ms": lat.p90_ms,
                    "noisy": lat.noisy,
                    "threads": lat.threads,
                }
            )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------- trained classifiers
def classifier_config(name: str, width: float, *, seed: int = 0, epochs: int | None = None) -> dict:
    """Everything that determines the weights of :func:`get_classifier` (the cache key)."""
    check_choice("name", name, VISION_MODELS)
    check_float("width", width, 0.0, 4.0, min_inclusive=False)
    check_int("seed", seed, minimum=0)
    if epochs is None:
        epochs = EPOCHS[get_profile().name]
    check_int("epochs", epochs, minimum=0)
    return {
        "model": name,
        "width": width,
        "dataset": "mnist5k",
        "seed": seed,
        "epochs": epochs,
        "lr": 3e-3,
        "batch_size": 64,
        "version": VISION_VERSION,
    }


def get_classifier(
    name: str = "resnet18", width: float = 0.25, *, seed: int = 0, epochs: int | None = None
) -> nn.Module:
    """A :func:`build_vision_model` trained on MNIST-5k with Adam, cached (CPU, eval mode).

    ``epochs`` defaults to :data:`EPOCHS` of the active profile; the first call trains
    (through :func:`utils.training.fit`), later calls load ``<cache>/vision-…pt``.
    """
    config = classifier_config(name, width, seed=seed, epochs=epochs)
    splits = load_splits("mnist5k", seed=seed)

    def build() -> nn.Module:
        seed_everything(seed)
        return build_vision_model(name, width, splits.input_shape[0], splits.num_classes)

    def train(model: nn.Module) -> None:
        loader = make_loader(splits.train, config["batch_size"], shuffle=True, seed=seed)
        fit(model, loader, epochs=config["epochs"], lr=config["lr"], progress=False, desc=name)

    model, _, _ = cached_state(f"vision-{name}", config, build, train)
    return model


SCENE_STAGES = ("fp32", "int8", "pruned", "distilled", "combined")
"""Stages of :func:`compress_scene_model`, in order."""


def compress_scene_model(
    name: str, *, amount: float = 0.5, epochs: int | None = None, seed: int = 0
) -> dict[str, nn.Module]:
    """Chapter 8's acceleration of the detector or segmenter of ``utils.detection``, stage by stage.

    ``fp32``: the trained model (``get_scene_model(name)``); ``int8``: its static INT8
    copy; ``pruned``: ``prune_scene_model(fp32, amount)`` (L1 channel pruning, no
    training); ``distilled``: the pruned network trained by feature distillation from
    ``fp32`` (``distill_detector`` / ``distill_segmenter``: FitNets hint + output KD)
    for ``epochs`` (default: ``RECIPES[profile][f"{name}_distill_epochs"]`` of ``utils.detection``),
    cached; ``combined``: the distilled network in static INT8. All on the CPU, eval mode.
    """
    from utils import detection as D

    check_choice("name", name, D.MODEL_NAMES)
    check_float("amount", amount, 0.0, 1.0, max_inclusive=False)
    check_int("seed", seed, minimum=0)
    recipe = D.RECIPES[get_profile().name]
    epochs = recipe[f"{name}_distill_epochs"] if epochs is None else epochs
    check_int("epochs", epochs, minimum=0)
    teacher = D.get_scene_model(name, seed=seed).cpu().eval()
    distill_fn = D.distill_detector if name == "detector" else D.distill_segmenter
    key = {
        "teacher": D.scene_model_config(name, seed=seed),  # a new teacher recipe re-distils
        "amount": amount,
        "epochs": epochs,
        "seed": seed,
        "version": VISION_VERSION,
    }

    def build() -> nn.Module:
        return D.prune_scene_model(teacher, amount)

    def train(student: nn.Module) -> None:
        distill_fn(teacher, student, D.training_scenes(), epochs, seed=seed)

    distilled, _, _ = cached_state(f"ch08-{name}-distilled", key, build, train)
    calibration = D.training_scenes()
    return {
        "fp32": teacher,
        "int8": D.quantize_int8(teacher, calibration).eval(),
        "pruned": build().eval(),
        "distilled": distilled.cpu().eval(),
        "combined": D.quantize_int8(distilled, calibration).eval(),
    }


@torch.inference_mode()
def predict(model: nn.Module, images: Tensor) -> Tensor:
    """Class indices ``argmax model(images)`` of a batch ``(N, C, H, W)`` (on the model's device)."""
    check_type("model", model, nn.Module)
    check_images(images)
    device = next(model.parameters(), torch.empty(0)).device
    return model.eval()(images.to(device)).argmax(1).cpu()


__all__ = [
    "VISION_MODELS",
    "VISION_VERSION",
    "EPOCHS",
    "InvertedResidual",
    "DepthwiseSeparableConv",
    "ResNet18",
    "mobilenet_v2",
    "build_vision_model",
    "scale_channels",
    "check_images",
    "conv_macs",
    "separable_macs",
    "inverted_residual_macs",
    "resize_images",
    "Resize",
    "at_resolution",
    "latency_grid",
    "classifier_config",
    "SCENE_STAGES",
    "compress_scene_model",
    "get_classifier",
    "predict",
]
