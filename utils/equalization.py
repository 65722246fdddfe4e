"""Making a network easier to quantize without changing its float function.

Chapter 9 (推理加速技术的挑战与解决方案), sections 9.2 and 9.3; lab 09.

* **SmoothQuant** (Xiao et al., ICML 2023): a few input channels ``j`` of a ``Linear`` carry
  outliers, so a per-tensor activation scale wastes the INT8 grid on them. Because
  ``X W^T = (X diag(s)^-1) (W diag(s))^T`` exactly, the outliers move into the weights with

      s_j = max|X_j|^α / max|W_{:,j}|^(1-α)        (their eq. 4, α = migration strength)

  In a pre-LN block the ``1/s`` folds into the LayerNorm's ``γ, β`` (:func:`fold_smoothing`);
  in MiniLM's post-LN blocks the LayerNorm output also feeds the residual, so
  :func:`smooth_linears` keeps the ``1/s`` as the first step of the layer (where a deployed
  kernel merges it into the activation quantizer's multiplier).
* **Cross-layer equalization** (Nagel et al., ICCV 2019, "Data-free quantization"): for
  ``y = W2 · relu(W1 x + b1)`` and ``s > 0``, ``relu(z / s) = relu(z) / s``, so dividing output
  channel ``i`` of layer 1 by ``s_i`` and multiplying input channel ``i`` of layer 2 by ``s_i``
  leaves ``y`` unchanged. Their optimum equalizes the two ranges ``r1_i / s_i = s_i r2_i``:

      s_i = sqrt(r1_i / r2_i)                     (their eq. 9: s_i = (1/r2_i) sqrt(r1_i r2_i))

* **Bias correction** (Nagel et al. 2019, §4.2, empirical variant): quantization error
  ``ε = W̃ − W`` shifts a layer's mean output by ``ε E[x]``; subtracting it from the bias removes
  that bias. ``E[x]`` per input channel comes from a few calibration batches.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.validation import check_float, check_module, check_tensor, check_type

_MIN_RANGE = 1e-5  # ranges below this count as this, so a dead channel never divides by zero


# --------------------------------------------------------------------------------------
# Measuring ranges
# --------------------------------------------------------------------------------------


def channel_absmax(x: Tensor, dim: int = -1) -> Tensor:
    """``max |x|`` per channel along ``dim``, over every other dimension (a 1-D tensor)."""
    check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim() - 1}] for x of rank {x.dim()}")
    return x.detach().abs().movedim(dim, 0).reshape(x.shape[dim], -1).amax(1)


def weight_input_absmax(weight: Tensor) -> Tensor:
    """``max |W_{:,j}|`` per input channel ``j`` of a Linear (out, in) or Conv (out, in, kh, kw)."""
    check_tensor("weight", weight)
    if weight.dim() < 2:
        raise ValueError(f"weight must be (out, in, ...), got shape {tuple(weight.shape)}")
    return channel_absmax(weight, dim=1)


def input_ranges(
    model: nn.Module, run: Callable[[nn.Module], object], layer_types: tuple = (nn.Linear,)
) -> dict[str, Tensor]:
    """Per-input-channel ``max |X_j|`` of every ``layer_types`` layer of ``model`` while ``run(model)``
    feeds it the calibration data (forward pre-hooks; the last dimension is the channel for a
    Linear, dimension 1 for a Conv2d)."""
    check_module("model", model)
    if not callable(run):
        raise TypeError(f"run must be a callable run(model), got {type(run).__name__}")
    ranges: dict[str, Tensor] = {}

    def hook(name: str, layer: nn.Module):
        def record(_mod: nn.Module, inputs: tuple) -> None:
            dim = 1 if isinstance(layer, nn.Conv2d) else -1
            r = channel_absmax(inputs[0], dim).cpu()
            ranges[name] = torch.maximum(ranges[name], r) if name in ranges else r

        return record

    handles = [
        m.register_forward_pre_hook(hook(n, m))
        for n, m in model.named_modules()
        if isinstance(m, layer_types)
    ]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in handles:
            h.remove()
    if not ranges:
        raise ValueError(f"run(model) reached no layer of type {[t.__name__ for t in layer_types]}")
    return ranges


# --------------------------------------------------------------------------------------
# SmoothQuant
# --------------------------------------------------------------------------------------


def smoothing_scales(act_absmax: Tensor, weight_absmax: Tensor, alpha: float = 0.5) -> Tensor:
    """SmoothQuant's per-channel scales ``s_j = max|X_j|^α / max|W_j|^(1−α)`` (Xiao et al. 2023, eq. 4).

    ``α = 0`` leaves activations alone (``s = 1/max|W|^1`` only rescales), ``α = 1`` moves all
    of the range into the weights; ranges below 1e-5 are raised to it.
    """
    check_tensor("act_absmax", act_absmax, finite=True, ndim=1)
    check_tensor("weight_absmax", weight_absmax, finite=True, ndim=1)
    check_float("alpha", alpha, 0.0, 1.0)
    if act_absmax.shape != weight_absmax.shape:
        raise ValueError(
            f"act_absmax {tuple(act_absmax.shape)} and weight_absmax "
            f"{tuple(weight_absmax.shape)} must have one entry per input channel"
        )
    if (act_absmax < 0).any() or (weight_absmax < 0).any():
        raise ValueError("act_absmax and weight_absmax are ranges and must be >= 0")
    a = act_absmax.detach().float().clamp(min=_MIN_RANGE)
    w = weight_absmax.detach().float().clamp(min=_MIN_RANGE)
    return a.pow(alpha) / w.pow(1.0 - alpha)


def _check_linears(linears: Sequence[nn.Linear], scales: Tensor) -> None:
    if not linears:
        raise ValueError("linears must name at least one nn.Linear")
    for i, lin in enumerate(linears):
        check_type(f"linears[{i}]", lin, nn.Linear)
        if lin.in_features != scales.numel():
            raise ValueError(
                f"linears[{i}] has {lin.in_features} input features but scales has {scales.numel()}"
            )
    check_tensor("scales", scales, finite=True, ndim=1)
    if (scales <= 0).any():
        raise ValueError("scales must be > 0 (a sign flip or zero would change the function)")


@torch.no_grad()
def fold_smoothing(norm: nn.LayerNorm, linears: Sequence[nn.Linear], scales: Tensor) -> None:
    """Fold SmoothQuant scales in place: ``γ ← γ / s``, ``β ← β / s`` and ``W_{:,j} ← W_{:,j} s_j``
    for every ``Linear`` that reads the LayerNorm (a pre-LN block). The float function is unchanged."""
    check_type("norm", norm, nn.LayerNorm)
    check_tensor("scales", scales, finite=True, ndim=1)
    if norm.weight is None or norm.weight.numel() != scales.numel():
        raise ValueError(
            "norm must have an elementwise affine weight with one entry per channel of scales"
        )
    _check_linears(linears, scales)
    s = scales.detach().to(norm.weight)
    norm.weight.div_(s)
    if norm.bias is not None:
        norm.bias.div_(s)
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight))


class InputScaledLinear(nn.Module):
    """``linear(x · (1/s))`` with ``linear.weight`` already multiplied by ``s`` per input channel.

    Equal to the original layer in float. Quantizing the wrapped ``linear`` (its input is
    ``x / s``) is SmoothQuant where the ``1/s`` cannot fold into a LayerNorm.
    """

    def __init__(self, linear: nn.Linear, scales: Tensor) -> None:
        super().__init__()
        check_type("linear", linear, nn.Linear)
        _check_linears([linear], scales)
        s = scales.detach().float().to(linear.weight.device)
        self.register_buffer("inv_scale", 1.0 / s)
        self.linear = linear
        with torch.no_grad():
            linear.weight.mul_(s.to(linear.weight))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x * self.inv_scale.to(x.dtype))


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def smooth_linears(
    model: nn.Module,
    groups: Sequence[Sequence[str]],
    act_ranges: dict[str, Tensor],
    alpha: float = 0.5,
) -> nn.Module:
    """A copy of ``model`` where each group of ``Linear`` layers that read the same input is
    smoothed with one set of scales (:func:`smoothing_scales` from the group's largest weights,
    e.g. ``[query, key, value]``) and wrapped in :class:`InputScaledLinear`."""
    check_module("model", model)
    check_type("act_ranges", act_ranges, dict)
    check_float("alpha", alpha, 0.0, 1.0)
    if not groups:
        raise ValueError("groups must list at least one group of Linear layer names")
    model = copy.deepcopy(model)
    for group in groups:
        if isinstance(group, str) or not group:
            raise TypeError(f"each group must be a non-empty list of layer names, got {group!r}")
        missing = [n for n in group if n not in act_ranges]
        if missing:
            raise ValueError(f"act_ranges has no range for {missing}: run input_ranges first")
        layers = [model.get_submodule(n) for n in group]
        for n, lin in zip(group, layers, strict=True):
            check_type(f"layer {n!r}", lin, nn.Linear)
        w = torch.stack([weight_input_absmax(lin.weight).cpu() for lin in layers]).amax(0)
        s = smoothing_scales(act_ranges[group[0]], w, alpha)
        for n, lin in zip(group, layers, strict=True):
            parent, child = _parent(model, n)
            setattr(parent, child, InputScaledLinear(lin, s))
    return model


def minilm_smoothing_groups(model: nn.Module) -> list[list[str]]:
    """The LayerNorm-fed ``Linear`` groups of a BERT encoder: ``[query, key, value]`` and the FFN's
    first layer (``intermediate.dense``) of every block."""
    check_module("model", model)
    layers = model.get_submodule("encoder.layer")
    groups = []
    for i in range(len(layers)):
        p = f"encoder.layer.{i}."
        groups.append([p + f"attention.self.{k}" for k in ("query", "key", "value")])
        groups.append([p + "intermediate.dense"])
    return groups


# --------------------------------------------------------------------------------------
# Cross-layer equalization and bias correction (Nagel et al. 2019)
# --------------------------------------------------------------------------------------


def equalization_scales(r1: Tensor, r2: Tensor) -> Tensor:
    """Nagel et al.'s optimal scales ``s_i = sqrt(r1_i / r2_i)``: afterwards both layers' ranges
    of channel ``i`` equal ``sqrt(r1_i r2_i)``. Ranges below 1e-5 are raised to it."""
    check_tensor("r1", r1, finite=True, ndim=1)
    check_tensor("r2", r2, finite=True, ndim=1)
    if r1.shape != r2.shape:
        raise ValueError(f"r1 {tuple(r1.shape)} and r2 {tuple(r2.shape)} must match")
    if (r1 < 0).any() or (r2 < 0).any():
        raise ValueError("r1 and r2 are ranges and must be >= 0")
    return torch.sqrt(r1.clamp(min=_MIN_RANGE) / r2.clamp(min=_MIN_RANGE))


def _input_view(conv: nn.Conv2d) -> Tensor:
    """Conv weight as (in_channels_of_the_block, ...): depthwise reads channel ``i`` with filter ``i``."""
    w = conv.weight
    if conv.groups == 1:
        return w.transpose(0, 1)
    if conv.groups == conv.in_channels == conv.out_channels:
        return w
    raise ValueError(
        f"grouped convolutions other than depthwise are not supported (groups={conv.groups})"
    )


@torch.no_grad()
def equalize_pair(conv1: nn.Conv2d, conv2: nn.Conv2d) -> Tensor:
    """Equalize ``conv2 ∘ relu ∘ conv1`` in place and return the scales ``s``.

    ``W1[i] ← W1[i] / s_i``, ``b1[i] ← b1[i] / s_i`` and input channel ``i`` of ``W2`` times ``s_i``
    (for a depthwise ``conv2`` that is its filter ``i``), with :func:`equalization_scales` of the
    per-channel ranges ``r1_i = max|W1[i]|`` and ``r2_i = max|W2[:, i]|``.
    """
    check_type("conv1", conv1, nn.Conv2d)
    check_type("conv2", conv2, nn.Conv2d)
    if conv1.out_channels != conv2.in_channels:
        raise ValueError(
            f"conv1.out_channels ({conv1.out_channels}) must equal conv2.in_channels ({conv2.in_channels})"
        )
    v2 = _input_view(conv2)
    _input_view(conv1)  # the same support check for conv1
    r1 = channel_absmax(conv1.weight, dim=0)
    r2 = channel_absmax(v2, dim=0)
    s = equalization_scales(r1, r2)
    shape1 = (-1,) + (1,) * (conv1.weight.dim() - 1)
    conv1.weight.div_(s.reshape(shape1))
    if conv1.bias is not None:
        conv1.bias.div_(s)
    if conv2.groups == 1:
        conv2.weight.mul_(s.reshape(1, -1, 1, 1))
    else:
        conv2.weight.mul_(s.reshape(-1, 1, 1, 1))
    return s


def relu_conv_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Names of ``(conv1, conv2)`` pairs that CLE may equalize: in the module order of ``model``,
    a ``Conv2d`` followed only by ``BatchNorm2d``/``Identity``/``ReLU`` (one ReLU) and then the
    next ``Conv2d`` — the chain of a MobileNet-style ``nn.Sequential``. Fold BN first."""
    check_module("model", model)
    pairs, prev, between = [], None, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if prev is not None and between.count("relu") == 1 and "other" not in between:
                pairs.append((prev, name))
            prev, between = name, []
        elif isinstance(m, nn.ReLU):
            between.append("relu")
        elif isinstance(m, nn.BatchNorm2d):
            between.append("bn")
        elif len(m._modules) == 0 and not isinstance(m, nn.Identity):
            between.append("other")
    return pairs


def equalize_model(model: nn.Module, iterations: int = 1) -> nn.Module:
    """A copy of a BN-folded ``model`` with every :func:`relu_conv_pairs` pair equalized,
    ``iterations`` sweeps (Nagel et al. iterate until the scales converge)."""
    check_module("model", model)
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise ValueError(
            "model still has BatchNorm2d layers: fold them first (utils.quantization.fold_model_bn)"
        )
    model = copy.deepcopy(model).eval()
    pairs = relu_conv_pairs(model)
    if not pairs:
        raise ValueError("model has no Conv2d → ReLU → Conv2d pair to equalize")
    for _ in range(iterations):
        for a, b in pairs:
            equalize_pair(model.get_submodule(a), model.get_submodule(b))
    return model


def _mean_input(layer: nn.Module, x: Tensor) -> Tensor:
    dim = 1 if isinstance(layer, nn.Conv2d) else -1
    return x.detach().movedim(dim, -1).reshape(-1, x.shape[dim]).mean(0)


def bias_shift(layer: nn.Module, weight_error: Tensor, mean_input: Tensor) -> Tensor:
    """The mean output shift ``ε E[x]`` per output channel of a Linear/Conv2d whose weight is off
    by ``weight_error`` (a Conv's kernel sums ``E[x_j]`` over its taps; padding is ignored)."""
    check_type("layer", layer, (nn.Linear, nn.Conv2d))
    check_tensor("weight_error", weight_error, finite=True)
    check_tensor("mean_input", mean_input, finite=True, ndim=1)
    if weight_error.shape != layer.weight.shape:
        raise ValueError(
            f"weight_error {tuple(weight_error.shape)} must match the weight {tuple(layer.weight.shape)}"
        )
    if isinstance(layer, nn.Linear):
        return weight_error @ mean_input
    k = layer.weight.shape[2:]
    field = mean_input.reshape(1, -1, 1, 1).expand(1, -1, *k)
    return F.conv2d(field, weight_error, groups=layer.groups).reshape(-1)


@torch.no_grad()
def correct_bias(qmodel: nn.Module, batches, num_batches: int = 4) -> nn.Module:
    """Empirical bias correction (Nagel et al. 2019, §4.2) of a fake-quantized model in place:
    for every ``FakeQuantLayer``, ``b ← b − (W̃ − W) E[x]`` with ``E[x]`` its mean input over
    ``num_batches`` of ``(x, …)``. Returns the model."""
    from utils.quantization import FakeQuantLayer

    check_module("qmodel", qmodel)
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, FakeQuantLayer)}
    if not layers:
        raise ValueError("qmodel has no FakeQuantLayer: call prepare_fake_quant first")
    sums: dict[str, Tensor] = {}
    counts = dict.fromkeys(layers, 0)

    def hook(name: str):
        def record(mod: nn.Module, inputs: tuple) -> None:
            m = _mean_input(mod.layer, inputs[0])
            sums[name] = sums[name] + m if name in sums else m
            counts[name] += 1

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    was_training = qmodel.training
    qmodel.eval()
    device = next(qmodel.parameters()).device
    try:
        for i, (x, *_rest) in enumerate(batches):
            if i >= num_batches:
                break
            qmodel(x.to(device))
    finally:
        for h in handles:
            h.remove()
    if not sums:
        raise ValueError("batches yielded no batch")
    for name, fq in layers.items():
        lin = fq.layer
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.weight.shape[0], device=lin.weight.device))
        error = fq.quantized_weight() - lin.weight
        lin.bias.sub_(bias_shift(lin, error, sums[name] / counts[name]))
    qmodel.train(was_training)
    return qmodel
