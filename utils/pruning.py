"""Pruning: zeros in a weight matrix (unstructured, N:M) versus a network that is really smaller.

* **Unstructured magnitude pruning** (Han et al., "Learning both Weights and
  Connections for Efficient Neural Networks", NeurIPS 2015): drop the weights of
  smallest ``|w|``, layer by layer or with one global threshold. Masks are applied
  as a reparametrisation ``weight = original ⊙ mask`` (``torch.nn.utils.parametrize``),
  like ``torch.nn.utils.prune``, so they compose with training; :func:`make_permanent`
  removes the reparametrisation like ``prune.remove``.
* **N:M sparsity** (Mishra et al., "Accelerating Sparse Deep Neural Networks", 2021):
  keep the ``N`` largest of every ``M`` consecutive weights (2:4 on NVIDIA Ampere).
* **Gradual pruning** with the cubic schedule of Zhu & Gupta ("To prune, or not to
  prune", 2017) as an ``after_step`` hook of :func:`utils.training.fit`, and a
  per-layer **sensitivity scan** (Han et al. 2015, Li et al. 2017).
* **Structured channel pruning** that physically removes filters and fixes every
  dependent layer (conv → BN → next conv or linear, depthwise convs, residual
  stages whose widths must match), ranked by the filters' L1 norm (Li et al.,
  "Pruning Filters for Efficient ConvNets", ICLR 2017) or the first-order Taylor
  criterion (Molchanov et al., "Importance Estimation for Neural Network Pruning",
  CVPR 2019). The result is a plain, smaller ``nn.Module``.
* **Iterative Taylor pruning** (Molchanov et al., "Pruning Convolutional Neural
  Networks for Resource Efficient Inference", ICLR 2017): rank feature maps by
  ``|mean(activation × gradient)|`` with per-layer L2 normalisation, remove the
  lowest, fine-tune a few steps, repeat (:func:`iterative_taylor_prune`).
* **Sparse storage accounting**: bytes of dense, CSR, bitmask and N:M formats.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader

from utils.training import device_of
from utils.validation import (
    check_choice,
    check_float,
    check_int,
    check_module,
    check_tensor,
    check_type,
)

PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)
STORAGE_FORMATS = ("dense", "csr", "bitmask", "nm")


# --------------------------------------------------------------------------- checks


def _check_amount(amount: float) -> None:
    check_float("amount", amount, 0.0, 1.0, max_inclusive=False)


def _n_to_prune(amount: float, numel: int) -> int:
    """``round(amount · numel)`` weights, as ``torch.nn.utils.prune`` counts them."""
    return int(round(amount * numel))


# ----------------------------------------------------------- unstructured: tensors


def magnitude_mask(weight: Tensor, amount: float) -> Tensor:
    """Mask that zeroes the ``k = round(amount · n)`` weights of smallest magnitude.

    ``M_i = 0`` if ``|w_i|`` is among the ``k`` smallest of the tensor, else 1
    (Han et al. 2015). Equals ``torch.nn.utils.prune.l1_unstructured``'s mask; the
    sparsity is exactly ``k / n``.
    """
    check_tensor("weight", weight)
    _check_amount(amount)
    mask = torch.ones_like(weight)
    k = _n_to_prune(amount, weight.numel())
    if k > 0:
        idx = torch.topk(weight.detach().abs().reshape(-1), k, largest=False).indices
        mask.view(-1)[idx] = 0
    return mask


def global_threshold(weights: Sequence[Tensor], amount: float) -> float:
    """The magnitude ``t`` below which a global pruning of ``amount`` removes weights.

    ``t`` is the ``k``-th smallest ``|w|`` over all tensors, ``k = round(amount · N)``;
    weights with ``|w| > t`` survive (ties at ``t`` aside). ``0.0`` when ``k = 0``.
    """
    flat = _flatten_all(weights)
    _check_amount(amount)
    k = _n_to_prune(amount, flat.numel())
    return 0.0 if k == 0 else float(torch.kthvalue(flat, k).values)


def _flatten_all(weights: Sequence[Tensor]) -> Tensor:
    check_type("weights", weights, (list, tuple))
    if len(weights) == 0:
        raise ValueError("weights must hold at least one tensor")
    for i, w in enumerate(weights):
        check_tensor(f"weights[{i}]", w)
    return torch.cat([w.detach().abs().reshape(-1) for w in weights])


def global_magnitude_masks(weights: Sequence[Tensor], amount: float) -> list[Tensor]:
    """Masks of one global magnitude pruning over several tensors.

    All ``|w|`` are ranked together and the ``round(amount · N)`` smallest are
    zeroed, so layers with small weights lose more (Han et al. 2015). Equals
    ``prune.global_unstructured(..., pruning_method=prune.L1Unstructured)``.
    """
    flat = _flatten_all(weights)
    _check_amount(amount)
    mask = torch.ones_like(flat)
    k = _n_to_prune(amount, flat.numel())
    if k > 0:
        mask[torch.topk(flat, k, largest=False).indices] = 0
    out, start = [], 0
    for w in weights:
        out.append(mask[start : start + w.numel()].view_as(w).to(w.dtype))
        start += w.numel()
    return out


def _check_nm(n: int, m: int) -> None:
    check_int("m", m, minimum=1)
    check_int("n", n, minimum=1)
    if n > m:
        raise ValueError(f"n must be <= m (keep n of every m weights), got n={n}, m={m}")


def nm_mask(weight: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """N:M mask: in every group of ``m`` consecutive *input channels* keep the ``n`` largest ``|w|``.

    Groups run along dimension 1 (the input channels), in the layout the hardware
    uses: for a ``Linear`` weight ``[out, in]`` each row is cut into groups of ``m``
    consecutive inputs; for a conv weight ``[K, C, R, S]`` a group is ``m``
    consecutive input channels ``c … c+m−1`` at one fixed filter position
    ``(k, r, s)``, as NVIDIA's ASP (``apex.contrib.sparsity``) prunes for 2:4 sparse
    tensor cores (Mishra et al. 2021). So ``C`` must be a multiple of ``m``, and the
    sparsity is exactly ``1 − n/m``.
    """
    check_tensor("weight", weight)
    _check_nm(n, m)
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dimensions, got shape {tuple(weight.shape)}")
    if weight.shape[1] % m:
        raise ValueError(
            f"the input dimension (weight.shape[1] = {weight.shape[1]}) must be a multiple of m={m}"
        )
    channels_last = weight.detach().movedim(1, -1)  # [K, R, S, C]: groups of m along C
    groups = channels_last.abs().reshape(-1, m)
    keep = torch.topk(groups, n, dim=1).indices
    mask = torch.zeros_like(groups).scatter_(1, keep, 1.0)
    return mask.reshape(channels_last.shape).movedim(-1, 1).to(weight.dtype)


# ------------------------------------------------------------ masks on a model


class WeightMask(nn.Module):
    """Parametrisation ``weight = original ⊙ mask``; the mask is a buffer (saved in ``state_dict``)."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().clone())

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask


def prunable_layers(model: nn.Module, layers: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """``{name: module}`` of the ``Conv2d``/``Linear`` layers of ``model`` (or of the named ``layers``).

    Raises ``TypeError`` when a named layer is of another type, ``ValueError`` when
    a name does not exist.
    """
    check_module("model", model)
    modules = dict(model.named_modules())
    if isinstance(layers, str):
        raise TypeError(f"layers must be a list of layer names, got the string {layers!r}")
    if layers is None:
        return {k: v for k, v in modules.items() if isinstance(v, PRUNABLE_TYPES)}
    out = {}
    for name in layers:
        check_type("layers[...]", name, str)
        if name not in modules:
            raise ValueError(f"layers: {name!r} is not a module of the model")
        if not isinstance(modules[name], PRUNABLE_TYPES):
            raise TypeError(
                f"layers: {name!r} is a {type(modules[name]).__name__}; "
                "only Conv2d and Linear layers can be pruned"
            )
        out[name] = modules[name]
    return out


def _mask_param(module: nn.Module) -> WeightMask | None:
    if parametrize.is_parametrized(module, "weight"):
        for p in module.parametrizations.weight:
            if isinstance(p, WeightMask):
                return p
    return None


def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> nn.Module:
    """Attach ``masks`` (``{layer name: mask}``) as ``weight = original ⊙ mask``, in place.

    A layer that already has a mask gets the new one (masks computed on the
    effective weights already include the old zeros). Gradients reach only the
    kept weights, so training keeps the pruned ones at zero.
    """
    check_type("masks", masks, dict)
    layers = prunable_layers(model, masks.keys())
    for name, mask in masks.items():
        module = layers[name]
        check_tensor(f"masks[{name!r}]", mask)
        if mask.shape != module.weight.shape:
            raise ValueError(
                f"masks[{name!r}] has shape {tuple(mask.shape)}, "
                f"the weight has {tuple(module.weight.shape)}"
            )
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"masks[{name!r}] must hold only 0 and 1")
        mask = mask.to(module.weight.device, module.weight.dtype)
        existing = _mask_param(module)
        if existing is not None:
            existing.mask.copy_(mask)
        else:
            parametrize.register_parametrization(module, "weight", WeightMask(mask))
    return model


def get_masks(model: nn.Module) -> dict[str, Tensor]:
    """The masks currently attached to ``model``'s layers."""
    check_module("model", model)
    return {n: p.mask for n, m in model.named_modules() if (p := _mask_param(m)) is not None}


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every mask into its weight and drop the reparametrisation, like ``prune.remove``.

    Afterwards ``layer.weight`` is a plain parameter holding ``original ⊙ mask``.
    """
    check_module("model", model)
    for module in model.modules():
        if _mask_param(module) is not None:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def magnitude_prune(
    model: nn.Module, amount: float, *, scope: str = "layer", layers: Iterable[str] | None = None
) -> dict[str, Tensor]:
    """Prune ``model`` in place by weight magnitude and return the masks.

    Args:
        amount: fraction of weights to remove, in ``[0, 1)``.
        scope: ``"layer"`` — every layer loses ``amount`` of its weights;
            ``"global"`` — one threshold over all layers (:func:`global_magnitude_masks`).
        layers: names of ``Conv2d``/``Linear`` layers (default: all of them).
    """
    _check_amount(amount)
    check_choice("scope", scope, ("layer", "global"))
    chosen = prunable_layers(model, layers)
    if not chosen:
        raise ValueError("the model has no Conv2d or Linear layer to prune")
    weights = [m.weight.detach() for m in chosen.values()]
    if scope == "layer":
        new = [magnitude_mask(w, amount) for w in weights]
    else:
        new = global_magnitude_masks(weights, amount)
    masks = dict(zip(chosen, new, strict=True))
    apply_masks(model, masks)
    return masks


def nm_prune(model: nn.Module, n: int = 2, m: int = 4) -> dict[str, Tensor]:
    """Apply :func:`nm_mask` in place to every layer whose input channels are a multiple of ``m``."""
    check_module("model", model)
    _check_nm(n, m)
    masks = {}
    for name, module in prunable_layers(model).items():
        if module.weight.shape[1] % m == 0:
            masks[name] = nm_mask(module.weight.detach(), n, m)
    apply_masks(model, masks)
    return masks


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of zeros among the (effective) weights of the ``Conv2d``/``Linear`` layers."""
    layers = prunable_layers(model)
    total = sum(m.weight.numel() for m in layers.values())
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    return zeros / max(total, 1)


# ----------------------------------------------------------- schedules and scans


def cubic_sparsity(step: int, total_steps: int, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017) gradual schedule ``s_t = s_f + (s_i − s_f)(1 − t/T)³`` for ``0 ≤ t ≤ T``.

    Prunes fast at first, when there are many redundant weights, then slowly;
    ``s_t = s_f`` for ``t ≥ T``.
    """
    check_int("step", step, minimum=0)
    check_int("total_steps", total_steps, minimum=1)
    check_float("final", final, 0.0, 1.0, max_inclusive=False)
    check_float("initial", initial, 0.0, final)
    frac = min(step, total_steps) / total_steps
    return final + (initial - final) * (1.0 - frac) ** 3


class GradualPruning:
    """``after_step`` hook of :func:`utils.training.fit` for gradual magnitude pruning.

    Every ``every`` optimiser steps the model is re-pruned to ``cubic_sparsity(step,
    total_steps, final)`` (Zhu & Gupta 2017); between updates the masks keep the
    pruned weights at zero while the rest keep training.
    """

    def __init__(
        self, final: float, total_steps: int, *, every: int = 10, scope: str = "global"
    ) -> None:
        check_float("final", final, 0.0, 1.0, max_inclusive=False)
        check_int("total_steps", total_steps, minimum=1)
        check_int("every", every, minimum=1)
        check_choice("scope", scope, ("layer", "global"))
        self.final, self.total_steps, self.every, self.scope = final, total_steps, every, scope
        self.step = 0
        self.history: list[tuple[int, float]] = []

    def __call__(self, model: nn.Module) -> None:
        self.step += 1
        if self.step % self.every and self.step != self.total_steps:
            return
        if self.history and self.history[-1][1] >= self.final:
            return
        target = cubic_sparsity(self.step, self.total_steps, self.final)
        with torch.no_grad():
            magnitude_prune(model, target, scope=self.scope)
        self.history.append((self.step, target))


def sensitivity_scan(
    model: nn.Module,
    evaluate_fn: Callable[[nn.Module], float],
    sparsities: Sequence[float],
    layers: Iterable[str] | None = None,
) -> list[dict[str, float | str]]:
    """Prune one layer at a time by magnitude and record ``evaluate_fn(model)``.

    A layer that already carries a pruning mask is pruned through that mask (its
    effective weights ``original ⊙ mask`` are ranked, the old zeros stay zero), so
    ``sparsity`` is the layer's total fraction of zeros; an unmasked layer's weight
    is pruned directly. Returns rows ``{"layer", "sparsity", "metric"}``; every
    weight and mask is restored after each evaluation (Han et al. 2015 use such
    scans to pick per-layer rates).
    """
    check_module("model", model)
    if not callable(evaluate_fn):
        raise TypeError("evaluate_fn must be callable: model -> float")
    check_type("sparsities", sparsities, (list, tuple))
    for s in sparsities:
        check_float("sparsities[...]", s, 0.0, 1.0, max_inclusive=False)
    rows: list[dict[str, float | str]] = []
    for name, module in prunable_layers(model, layers).items():
        masked = _mask_param(module)
        # the tensor to overwrite: the mask of a masked layer, else the weight itself
        target = masked.mask if masked is not None else module.weight
        saved = target.detach().clone()
        effective = module.weight.detach().clone()
        for s in sparsities:
            with torch.no_grad():
                target.mul_(magnitude_mask(effective, s))
            rows.append({"layer": name, "sparsity": float(s), "metric": float(evaluate_fn(model))})
            with torch.no_grad():
                target.copy_(saved)
    return rows


# ------------------------------------------------------------------ storage cost


def sparse_storage_bytes(
    weight: Tensor,
    fmt: str = "csr",
    *,
    value_bytes: int = 4,
    index_bytes: int = 4,
    m: int = 4,
) -> int:
    """Bytes to store ``weight`` (viewed as ``rows × cols``) in a sparse format.

    * ``dense``: ``n · value_bytes``;
    * ``csr``: ``nnz · (value_bytes + index_bytes) + (rows + 1) · index_bytes``
      (values, column indices, row pointers);
    * ``bitmask``: ``nnz · value_bytes + ⌈n / 8⌉`` (one bit per position);
    * ``nm``: ``nnz · value_bytes + ⌈nnz · ⌈log2 m⌉ / 8⌉`` (a position index per kept
      value, as in 2:4 sparse tensor cores' metadata).
    """
    check_tensor("weight", weight)
    check_choice("fmt", fmt, STORAGE_FORMATS)
    check_int("value_bytes", value_bytes, minimum=1)
    check_int("index_bytes", index_bytes, minimum=1)
    check_int("m", m, minimum=2)
    n = weight.numel()
    nnz = int((weight != 0).sum())
    rows = weight.shape[0] if weight.dim() > 0 else 1
    if fmt == "dense":
        return n * value_bytes
    if fmt == "csr":
        return nnz * (value_bytes + index_bytes) + (rows + 1) * index_bytes
    if fmt == "bitmask":
        return nnz * value_bytes + math.ceil(n / 8)
    return nnz * value_bytes + math.ceil(nnz * math.ceil(math.log2(m)) / 8)


def model_storage_bytes(model: nn.Module, fmt: str = "csr", **kwargs: int) -> int:
    """Bytes of all parameters: ``Conv2d``/``Linear`` weights in ``fmt``, everything else dense FP32."""
    check_module("model", model)
    layers = prunable_layers(model)
    weight_ids = {id(m.weight) for m in layers.values()}
    total = sum(sparse_storage_bytes(m.weight.detach(), fmt, **kwargs) for m in layers.values())
    for p in model.parameters():
        if id(p) not in weight_ids and p.numel() and not _is_mask_original(model, p):
            total += p.numel() * p.element_size()
    return total


def _is_mask_original(model: nn.Module, p: Tensor) -> bool:
    return any(
        _mask_param(m) is not None and m.parametrizations.weight.original is p
        for m in model.modules()
    )


# -------------------------------------------------------- structured: channels


@dataclass
class ChannelGroup:
    """Layers that share one set of channels and must be pruned together.

    Attributes:
        name: readable name (the first producer's).
        producers: ``Conv2d``/``Linear`` layers whose *output* channels these are
            (several in a residual stage: their outputs are added).
        norms: ``BatchNorm`` layers on these channels.
        depthwise: depthwise convolutions that carry the channels through.
        consumers: ``(layer, features_per_channel)``: layers whose *input* are these
            channels (a ``Linear`` after ``Flatten`` reads ``H·W`` features per channel).
    """

    name: str
    producers: list[nn.Module] = field(default_factory=list)
    norms: list[nn.Module] = field(default_factory=list)
    depthwise: list[nn.Conv2d] = field(default_factory=list)
    consumers: list[tuple[nn.Module, int]] = field(default_factory=list)

    @property
    def channels(self) -> int:
        p = self.producers[0]
        return p.out_channels if isinstance(p, nn.Conv2d) else p.out_features


_PASSTHROUGH = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Identity,
    nn.Dropout,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _chain_groups(model: nn.Module) -> list[ChannelGroup]:
    """Groups of a network whose leaf layers run one after the other in registration order."""
    groups: list[ChannelGroup] = []
    current: ChannelGroup | None = None
    names = {m: n for n, m in model.named_modules()}
    for leaf in (m for m in model.modules() if not list(m.children())):
        if _is_depthwise(leaf):
            if current is None:
                raise ValueError("a depthwise convolution on the input channels cannot be pruned")
            current.depthwise.append(leaf)
        elif isinstance(leaf, PRUNABLE_TYPES):
            if isinstance(leaf, nn.Conv2d) and leaf.groups != 1:
                raise TypeError(
                    f"grouped convolution {names[leaf]!r} (groups={leaf.groups}) is not supported"
                )
            if current is not None:
                per = 1
                if isinstance(leaf, nn.Linear):
                    if leaf.in_features % current.channels:
                        raise ValueError(
                            f"{names[leaf]!r}: in_features is not a multiple of the channels"
                        )
                    per = leaf.in_features // current.channels
                current.consumers.append((leaf, per))
                groups.append(current)
            current = ChannelGroup(names[leaf], [leaf])
        elif isinstance(leaf, (nn.BatchNorm2d, nn.BatchNorm1d)):
            if current is None:
                raise ValueError("a BatchNorm on the input channels cannot be pruned")
            current.norms.append(leaf)
        elif not isinstance(leaf, _PASSTHROUGH):
            raise TypeError(
                f"unknown layer type {type(leaf).__name__} ({names[leaf]!r}); supported: "
                "Conv2d, Linear, BatchNorm, depthwise Conv2d, activations, pooling, Flatten, Dropout"
            )
    return groups  # the last producer (the classifier) has no consumer and is not pruned


def _resnet_groups(model: nn.Module) -> list[ChannelGroup]:
    """Groups of a :class:`utils.models.SmallResNet`: one per block interior, one per residual stage."""
    stem_conv, stem_bn = model.stem[0], model.stem[1]
    stage = ChannelGroup("stem", [stem_conv], [stem_bn])
    groups: list[ChannelGroup] = []
    for i, block in enumerate(model.layers):
        stage.consumers.append((block.conv1, 1))
        groups.append(
            ChannelGroup(f"layers.{i}.conv1", [block.conv1], [block.bn1], [], [(block.conv2, 1)])
        )
        if len(block.shortcut) == 0:  # identity: the output joins the running stage
            stage.producers.append(block.conv2)
            stage.norms.append(block.bn2)
        else:
            stage.consumers.append((block.shortcut[0], 1))
            groups.append(stage)
            stage = ChannelGroup(
                f"layers.{i}.conv2",
                [block.conv2, block.shortcut[0]],
                [block.bn2, block.shortcut[1]],
            )
    stage.consumers.append((model.fc, 1))
    groups.append(stage)
    return groups


def channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """The prunable channel groups of a course model or an ``nn.Sequential`` chain.

    Supported: ``nn.Sequential`` (nested) of Conv2d/Linear/BatchNorm/activation/pooling/
    Flatten layers, :class:`~utils.models.LeNet300100`, :class:`~utils.models.LeNet5`,
    :class:`~utils.models.SmallMobileNet` (chains) and :class:`~utils.models.SmallResNet`
    (residual stages are coupled so that added tensors keep matching widths).
    """
    from utils.models import LeNet5, LeNet300100, SmallMobileNet, SmallResNet

    check_module("model", model)
    if isinstance(model, SmallResNet):
        return _resnet_groups(model)
    if isinstance(model, (nn.Sequential, LeNet300100, LeNet5, SmallMobileNet)):
        return _chain_groups(model)
    raise TypeError(
        f"channel pruning does not know the structure of {type(model).__name__}; supported: "
        "nn.Sequential, LeNet300100, LeNet5, SmallMobileNet, SmallResNet"
    )


def _set(module: nn.Module, name: str, value: Tensor | None) -> None:
    if value is not None:
        setattr(module, name, nn.Parameter(value.detach().clone(), requires_grad=True))


def _check_keep(keep: Tensor | Sequence[int], channels: int, device: torch.device) -> Tensor:
    """``keep`` as a sorted long tensor on ``device``; integers in ``[0, channels)``, distinct."""
    if isinstance(keep, Tensor):
        if keep.dtype == torch.bool or keep.is_floating_point() or keep.is_complex():
            raise TypeError(f"keep must hold integer channel indices, got a {keep.dtype} tensor")
    elif isinstance(keep, np.ndarray):
        if not np.issubdtype(keep.dtype, np.integer):
            raise TypeError(f"keep must hold integer channel indices, got a {keep.dtype} array")
    else:
        check_type("keep", keep, (list, tuple, range))
        for k in keep:
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
                raise TypeError(
                    f"keep must hold integer channel indices, got {k!r} ({type(k).__name__})"
                )
    keep = torch.as_tensor(keep, dtype=torch.long, device=device).reshape(-1)
    if keep.numel() == 0:
        raise ValueError("keep is empty: a pruned width of 0 would disconnect the network")
    if keep.min() < 0 or keep.max() >= channels:
        raise ValueError(f"keep indices must be in [0, {channels}), got {keep.tolist()}")
    if keep.unique().numel() != keep.numel():
        raise ValueError("keep indices must be distinct")
    return keep.sort().values


def prune_conv_out(conv: nn.Module, keep: Tensor | Sequence[int]) -> None:
    """Keep output channels ``keep`` of a (non-depthwise) ``Conv2d`` or output features of a ``Linear``, in place."""
    check_type("conv", conv, PRUNABLE_TYPES)
    keep = _check_keep(keep, conv.weight.shape[0], conv.weight.device)
    conv.weight = nn.Parameter(conv.weight.detach()[keep].clone())
    if conv.bias is not None:
        _set(conv, "bias", conv.bias.detach()[keep])
    if isinstance(conv, nn.Conv2d):
        conv.out_channels = len(keep)
    else:
        conv.out_features = len(keep)


def prune_bn(bn: nn.Module, keep: Tensor | Sequence[int]) -> None:
    """Keep channels ``keep`` of a BatchNorm layer (affine parameters and running statistics), in place."""
    check_type("bn", bn, (nn.BatchNorm1d, nn.BatchNorm2d))
    keep = _check_keep(keep, bn.num_features, device_of(bn))
    if bn.affine:
        _set(bn, "weight", bn.weight.detach()[keep])
        _set(bn, "bias", bn.bias.detach()[keep])
    if bn.track_running_stats:
        bn.running_mean = bn.running_mean[keep.to(bn.running_mean.device)].clone()
        bn.running_var = bn.running_var[keep.to(bn.running_var.device)].clone()
    bn.num_features = len(keep)


def prune_depthwise(conv: nn.Conv2d, keep: Tensor | Sequence[int]) -> None:
    """Keep channels ``keep`` of a depthwise convolution (its groups shrink with them), in place."""
    if not _is_depthwise(conv):
        raise TypeError(
            "conv must be a depthwise Conv2d (groups == in_channels == out_channels > 1)"
        )
    prune_conv_out(conv, keep)
    conv.in_channels = conv.groups = conv.out_channels


def prune_in(layer: nn.Module, keep: Tensor | Sequence[int], per_channel: int = 1) -> None:
    """Keep input channels ``keep`` of a ``Conv2d``, or of a ``Linear`` that reads ``per_channel`` features per channel.

    For a ``Linear`` after ``Flatten`` of ``C×H×W`` maps, channel ``c`` owns the
    columns ``c·H·W … (c+1)·H·W − 1``.
    """
    check_type("layer", layer, PRUNABLE_TYPES)
    check_int("per_channel", per_channel, minimum=1)
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise TypeError(
                "prune_in needs an ungrouped Conv2d; use prune_depthwise for depthwise ones"
            )
        keep = _check_keep(keep, layer.in_channels, layer.weight.device)
        layer.weight = nn.Parameter(layer.weight.detach()[:, keep].clone())
        layer.in_channels = len(keep)
    else:
        if layer.in_features % per_channel:
            raise ValueError(
                f"in_features={layer.in_features} is not a multiple of per_channel={per_channel}"
            )
        keep = _check_keep(keep, layer.in_features // per_channel, layer.weight.device)
        cols = (
            keep[:, None] * per_channel + torch.arange(per_channel, device=keep.device)
        ).reshape(-1)
        layer.weight = nn.Parameter(layer.weight.detach()[:, cols].clone())
        layer.in_features = len(cols)


def prune_group(group: ChannelGroup, keep: Tensor | Sequence[int]) -> None:
    """Physically keep only channels ``keep`` in every layer of ``group`` (in place)."""
    check_type("group", group, ChannelGroup)
    keep = _check_keep(keep, group.channels, group.producers[0].weight.device)
    layers = [*group.producers, *group.norms, *group.depthwise, *(c for c, _ in group.consumers)]
    if any(parametrize.is_parametrized(layer) for layer in layers):
        raise ValueError("remove the masks first (make_permanent) before channel pruning")
    for layer in group.producers:
        prune_conv_out(layer, keep)
    for bn in group.norms:
        prune_bn(bn, keep)
    for dw in group.depthwise:
        prune_depthwise(dw, keep)
    for layer, per in group.consumers:
        prune_in(layer, keep, per)


def l1_channel_importance(group: ChannelGroup) -> Tensor:
    """``I_c = Σ_producers ‖W_c‖₁``: the L1 norm of each output filter (Li et al. 2017), summed over coupled layers."""
    check_type("group", group, ChannelGroup)
    return sum(p.weight.detach().abs().reshape(group.channels, -1).sum(1) for p in group.producers)


def _check_groups(groups: Sequence[ChannelGroup]) -> None:
    check_type("groups", groups, (list, tuple))
    for i, g in enumerate(groups):
        check_type(f"groups[{i}]", g, ChannelGroup)


def _group_params(group: ChannelGroup) -> list[Tensor]:
    out = []
    for layer in [*group.producers, *group.norms, *group.depthwise]:
        out += [t for t in (layer.weight, layer.bias) if t is not None]
    return out


def taylor_channel_importance(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    loader: DataLoader,
    *,
    num_batches: int = 8,
    loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None,
) -> list[Tensor]:
    """First-order Taylor importance ``I_c = Σ_batches (Σ_{w ∈ c} g_w · w)²`` (Molchanov et al. 2019).

    ``Σ g·w`` approximates the change of the loss when channel ``c`` is removed
    (all its parameters set to zero: filters, biases, BN scale and shift of the
    coupled layers); its square is accumulated over ``num_batches`` mini-batches.
    """
    from utils.training import cross_entropy_loss

    check_module("model", model)
    _check_groups(groups)
    check_type("loader", loader, DataLoader)
    check_int("num_batches", num_batches, minimum=1)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError("loss_fn must be callable: (model, x, y) -> loss")
    loss_fn = loss_fn or cross_entropy_loss
    device = device_of(model)
    scores = [torch.zeros(g.channels, device=device) for g in groups]
    was_training = model.training
    model.eval()  # BN uses its running statistics, as at inference
    for b, (x, y) in enumerate(loader):
        if b == num_batches:
            break
        model.zero_grad(set_to_none=True)
        loss_fn(model, x.to(device), y.to(device)).backward()
        with torch.no_grad():
            for g, score in zip(groups, scores, strict=True):
                contrib = sum(
                    (t.grad * t).reshape(g.channels, -1).sum(1)
                    for t in _group_params(g)
                    if t.grad is not None
                )
                score += contrib**2
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return scores


def kept_channels(channels: int, amount: float) -> int:
    """Channels left after removing ``amount`` of them: ``⌊C · (1 − amount)⌋`` (torch-pruning's rule).

    Raises ``ValueError`` when that is 0 (a layer of width 0 disconnects the network).
    """
    check_int("channels", channels, minimum=1)
    _check_amount(amount)
    n = int(channels * (1.0 - amount) + 1e-9)
    if n == 0:
        raise ValueError(
            f"amount={amount} would prune all {channels} channels of a layer (width 0); use a smaller amount"
        )
    return n


def prune_channels(
    model: nn.Module,
    amount: float,
    *,
    criterion: str = "l1",
    loader: DataLoader | None = None,
    num_batches: int = 8,
    seed: int = 0,
) -> nn.Module:
    """A smaller copy of ``model`` with ``amount`` of the channels of every group removed.

    Args:
        amount: fraction of channels removed in each group (``⌊C(1−amount)⌋`` kept).
        criterion: ``"l1"`` (filter norm, Li et al. 2017), ``"taylor"`` (first-order
            Taylor, Molchanov et al. 2019; needs ``loader``) or ``"random"`` (a control).
        seed: seed of the ``"random"`` criterion.

    Returns:
        A plain ``nn.Module`` of the same class with thinner layers (no masks);
        ``model`` is untouched.
    """
    check_module("model", model)
    _check_amount(amount)
    check_choice("criterion", criterion, ("l1", "taylor", "random"))
    check_int("num_batches", num_batches, minimum=1)
    check_int("seed", seed, minimum=0)
    if criterion == "taylor" and loader is None:
        raise ValueError("criterion='taylor' needs a loader of training batches")
    if get_masks(model):
        raise ValueError("the model carries pruning masks; call make_permanent first")
    pruned = copy.deepcopy(model)
    groups = channel_groups(pruned)
    if criterion == "l1":
        scores = [l1_channel_importance(g) for g in groups]
    elif criterion == "taylor":
        scores = taylor_channel_importance(pruned, groups, loader, num_batches=num_batches)
    else:
        gen = torch.Generator().manual_seed(seed)
        scores = [torch.rand(g.channels, generator=gen).to(device_of(pruned)) for g in groups]
    keeps = [
        torch.topk(s, kept_channels(g.channels, amount)).indices
        for g, s in zip(groups, scores, strict=True)
    ]
    for g, keep in zip(groups, keeps, strict=True):
        prune_group(g, keep)
    return pruned


# ------------------------------------------------------ iterative Taylor pruning


def _activation_module(group: ChannelGroup) -> nn.Module:
    """The layer whose output holds the group's feature maps: its first BatchNorm, else the producer."""
    if len(group.producers) != 1:
        raise ValueError(
            f"group {group.name!r} has {len(group.producers)} coupled producers (a residual "
            "stage); activation-based Taylor pruning supports chains (one producer per group)"
        )
    return group.norms[0] if group.norms else group.producers[0]


def taylor_activation_importance(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    loader: DataLoader,
    *,
    num_batches: int = 4,
    loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None,
) -> list[Tensor]:
    """Molchanov et al. (ICLR 2017) criterion of every feature map, L2-normalised per layer.

    For feature map ``k`` with activation ``z_k`` (``M`` positions) and example ``t``,
    ``Θ_t(z_k) = |(1/M) Σ_m z_{k,m} · ∂L/∂z_{k,m}|`` (eq. 8: the first-order Taylor
    estimate of the change of the loss when ``z_k`` is set to zero). It is averaged
    over the examples of each mini-batch and over ``num_batches`` mini-batches, then
    normalised per layer, ``Θ̂_k = Θ_k / ‖Θ‖₂`` (§2.2), so layers can be ranked together.
    The activation is read at the group's first BatchNorm output (else the producer's);
    for a following ReLU this equals the product at the ReLU's output, because
    ``∂L/∂z = 0`` where the ReLU is off. Scores are on the model's device.
    """
    from utils.training import cross_entropy_loss

    check_module("model", model)
    _check_groups(groups)
    check_type("loader", loader, DataLoader)
    check_int("num_batches", num_batches, minimum=1)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError("loss_fn must be callable: (model, x, y) -> loss")
    loss_fn = loss_fn or cross_entropy_loss
    device = device_of(model)
    targets = [_activation_module(g) for g in groups]
    acts: dict[int, Tensor] = {}

    def keep(i: int) -> Callable:
        def hook(_module: nn.Module, _inputs: object, out: Tensor) -> None:
            out.retain_grad()
            acts[i] = out

        return hook

    handles = [t.register_forward_hook(keep(i)) for i, t in enumerate(targets)]
    scores = [torch.zeros(g.channels, device=device) for g in groups]
    was_training, seen = model.training, 0
    model.eval()  # BN uses its running statistics, as at inference
    try:
        for b, (x, y) in enumerate(loader):
            if b == num_batches:
                break
            model.zero_grad(set_to_none=True)
            loss_fn(model, x.to(device), y.to(device)).backward()
            with torch.no_grad():
                for i, score in enumerate(scores):
                    a = acts[i]
                    per_map = (a * a.grad).reshape(a.shape[0], a.shape[1], -1).mean(2)
                    score += per_map.abs().mean(0)
            seen += 1
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if seen == 0:
        raise ValueError("loader yielded no batches")
    out = []
    for score in scores:
        score = score / seen
        norm = torch.linalg.vector_norm(score)
        out.append(score / norm if norm > 0 else score)
    return out


def _take_batches(loader: DataLoader, n: int) -> DataLoader:
    """The next ``n`` mini-batches of ``loader`` (restarting it if needed) as a loader of their own."""
    from torch.utils.data import TensorDataset

    from utils.data import make_loader

    xs: list[Tensor] = []
    ys: list[Tensor] = []
    while len(xs) < n:
        for x, y in loader:
            xs.append(x)
            ys.append(y)
            if len(xs) == n:
                break
        if not xs:
            raise ValueError("loader yielded no batches")
    return make_loader(TensorDataset(torch.cat(xs), torch.cat(ys)), xs[0].shape[0])


def iterative_taylor_prune(
    model: nn.Module,
    loader: DataLoader,
    amount: float,
    *,
    channels_per_step: int = 1,
    num_batches: int = 4,
    finetune_steps: int = 10,
    lr: float = 1e-3,
    loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None,
    seed: int = 0,
) -> tuple[nn.Module, list[dict[str, float | int | str]]]:
    """Iterative Taylor pruning of Molchanov et al. (ICLR 2017) on a copy of ``model``.

    Until ``round(amount · C)`` of the ``C`` prunable channels are gone, repeat:
    (a) score every feature map with :func:`taylor_activation_importance` over
    ``num_batches`` mini-batches; (b) remove the ``channels_per_step`` lowest scores
    of all layers together, for real (:func:`prune_group`; a layer keeps at least
    one channel); (c) fine-tune ``finetune_steps`` optimiser steps with
    :func:`utils.training.fit` on the model's device.

    Returns:
        ``(pruned model, history)``: a plain, thinner model in eval mode and one row
        per removed channel ``{"step", "layer", "channel", "score"}`` (``channel`` is
        the index in the original model). Deterministic for a ``seed`` and a loader
        in the same state.
    """
    from utils.config import seed_everything
    from utils.training import fit

    check_module("model", model)
    check_type("loader", loader, DataLoader)
    _check_amount(amount)
    check_int("channels_per_step", channels_per_step, minimum=1)
    check_int("num_batches", num_batches, minimum=1)
    check_int("finetune_steps", finetune_steps, minimum=0)
    check_float("lr", lr, 0.0, min_inclusive=False)
    check_int("seed", seed, minimum=0)
    if get_masks(model):
        raise ValueError("the model carries pruning masks; call make_permanent first")
    seed_everything(seed)
    pruned = copy.deepcopy(model)
    device = device_of(pruned)
    origin = {g.name: list(range(g.channels)) for g in channel_groups(pruned)}
    goal = round(amount * sum(len(v) for v in origin.values()))
    history: list[dict[str, float | int | str]] = []
    step = 0
    while len(history) < goal:
        step += 1
        groups = channel_groups(pruned)
        scores = taylor_activation_importance(
            pruned, groups, loader, num_batches=num_batches, loss_fn=loss_fn
        )
        ranked = sorted(
            (float(s[c]), gi, c)
            for gi, (g, s) in enumerate(zip(groups, scores, strict=True))
            for c in range(g.channels)
        )
        drop: dict[int, list[int]] = {}
        for score, gi, c in ranked:
            if len(history) == goal or sum(len(v) for v in drop.values()) == channels_per_step:
                break
            if len(drop.get(gi, [])) + 1 >= groups[gi].channels:
                continue  # keep at least one channel per layer
            drop.setdefault(gi, []).append(c)
            name = groups[gi].name
            history.append(
                {"step": step, "layer": name, "channel": origin[name][c], "score": score}
            )
        if not drop:
            raise ValueError(f"amount={amount} would leave a layer with no channel")
        for gi, cs in drop.items():
            g = groups[gi]
            keep = [c for c in range(g.channels) if c not in cs]
            prune_group(g, keep)
            origin[g.name] = [origin[g.name][c] for c in keep]
        if finetune_steps:
            batches = _take_batches(loader, finetune_steps)
            fit(
                pruned,
                batches,
                epochs=1,
                lr=lr,
                compute_loss=loss_fn,
                device=device,
                progress=False,
                desc=f"taylor {step}",
            )
    return pruned.eval(), history


# ------------------------------------------------------------- fine-tuning, cached


def cached_finetune(
    name: str,
    config: dict,
    build: Callable[[], nn.Module],
    train_loader: DataLoader,
    *,
    epochs: int,
    lr: float = 5e-4,
    hook_factory: Callable[[], Callable[[nn.Module], None]] | None = None,
) -> nn.Module:
    """Fine-tune the pruned model ``build()`` with :func:`utils.training.fit`, once per ``config``.

    ``build`` returns the pruned model deterministically; the weights that are
    exactly zero in it stay zero during fine-tuning (they are masked). With
    ``hook_factory`` (e.g. ``lambda: GradualPruning(0.9, steps)``) a fresh
    ``after_step`` hook prunes during training. The trained model is cached by
    :func:`utils.cache.cached_state` and returned as a plain model (masks folded in).
    """
    from utils.cache import cached_state
    from utils.config import seed_everything
    from utils.training import fit

    check_type("name", name, str)
    check_type("config", config, dict)
    check_int("epochs", epochs, minimum=0)
    check_float("lr", lr, 0.0, min_inclusive=False)
    if not callable(build):
        raise TypeError("build must be a callable returning the pruned model")
    if hook_factory is not None and not callable(hook_factory):
        raise TypeError("hook_factory must be a callable returning an after_step hook")
    # version 2: N:M masks group along the input channels (nm_mask's hardware layout)
    full = {**config, "epochs": epochs, "lr": lr, "pruning_version": 2}

    def plain() -> nn.Module:
        return make_permanent(build())

    def train(model: nn.Module) -> None:
        zeros = {
            n: (m.weight != 0).to(m.weight.dtype)
            for n, m in prunable_layers(model).items()
            if bool((m.weight == 0).any())
        }
        apply_masks(model, zeros)
        seed_everything(0)
        hook = hook_factory() if hook_factory is not None else None
        fit(model, train_loader, epochs=epochs, lr=lr, after_step=hook, progress=False, desc=name)
        make_permanent(model)

    model, _, _ = cached_state(name, full, plain, train)
    return model
