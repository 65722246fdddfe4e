"""Mixed precision chosen by sensitivity under a size budget.

Chapter 9 (推理加速技术的挑战与解决方案), section 9.3. Not every layer tolerates few bits
(first/last layers, depthwise convolutions, the FFN of a transformer): a per-layer
sensitivity scan quantizes one layer at a time and measures the metric's drop
(as in HAWQ's ordering, Dong et al. 2019, with the measured drop in place of the Hessian
trace), then :func:`choose_bits` gives the most sensitive layers more bits while the
weights fit a byte budget.

Size counts weight bits only: ``Σ_layers numel(W_l) · b_l / 8`` bytes (biases, scales and
the float layers' other tensors are the same in every choice).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from utils.quantization import FakeQuantLayer, qrange
from utils.validation import check_float, check_int, check_module, check_type

QUANTIZABLE = (nn.Conv2d, nn.Linear)


def quantizable_layers(model: nn.Module, skip: Sequence[str] = ()) -> dict[str, nn.Module]:
    """Every ``Conv2d``/``Linear`` of ``model`` by name, in module order, except those in ``skip``;
    a layer already wrapped in ``FakeQuantLayer`` is listed under the wrapper's name."""
    check_module("model", model)
    out: dict[str, nn.Module] = {}
    inside: set[int] = set()
    for n, m in model.named_modules():
        if isinstance(m, FakeQuantLayer):
            inside.add(id(m.layer))
            if n not in skip:
                out[n] = m.layer
        elif isinstance(m, QUANTIZABLE) and id(m) not in inside and n not in skip:
            out[n] = m
    return out


def _swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = parent._modules[child]
    parent._modules[child] = new
    return old


@contextmanager
def quantized_layers(
    model: nn.Module, bits: dict[str, int], *, act_bits: int | None = None, per_channel: bool = True
) -> Iterator[nn.Module]:
    """Temporarily wrap the named layers of ``model`` in ``FakeQuantLayer`` with ``bits[name]``
    weight bits (dynamic activation quantization when ``act_bits`` is given); restored on exit."""
    check_module("model", model)
    check_type("bits", bits, dict)
    layers = quantizable_layers(model)
    for name, b in bits.items():
        if name not in layers:
            raise ValueError(f"bits names {name!r}, which is not a Conv2d/Linear of the model")
        qrange(b, True)
    swapped = {}
    try:
        for name, b in bits.items():
            fq = FakeQuantLayer(
                layers[name],
                weight_bits=b,
                act_bits=act_bits,
                per_channel=per_channel,
                mode="dynamic",
            )
            swapped[name] = _swap(model, name, fq)
        yield model
    finally:
        for name, old in swapped.items():
            _swap(model, name, old)


def layer_sensitivity(
    model: nn.Module,
    metric: Callable[[nn.Module], float],
    *,
    bits: int = 4,
    layers: Sequence[str] | None = None,
    per_channel: bool = True,
) -> dict[str, float]:
    """Drop of ``metric`` (higher is better) when only one layer's weights are quantized to
    ``bits``: ``metric(float) − metric(layer l at bits)``, for each layer ``l``."""
    check_module("model", model)
    if not callable(metric):
        raise TypeError(
            f"metric must be a callable metric(model) -> float, got {type(metric).__name__}"
        )
    qrange(bits, True)
    names = list(quantizable_layers(model)) if layers is None else list(layers)
    if not names:
        raise ValueError("no layer to scan")
    base = float(metric(model))
    out = {}
    for name in names:
        with quantized_layers(model, {name: bits}, per_channel=per_channel) as q:
            out[name] = base - float(metric(q))
    return out


def weight_bytes(model: nn.Module, bits: dict[str, int], default_bits: int = 32) -> float:
    """``Σ numel(W_l) · b_l / 8`` over the quantizable layers (``default_bits`` for those not in ``bits``)."""
    check_int("default_bits", default_bits, minimum=1, maximum=32)
    layers = quantizable_layers(model)
    for name in bits:
        if name not in layers:
            raise ValueError(f"bits names {name!r}, which is not a Conv2d/Linear of the model")
    return sum(m.weight.numel() * bits.get(n, default_bits) for n, m in layers.items()) / 8


def choose_bits(
    model: nn.Module,
    sensitivity: dict[str, float],
    budget_bytes: float,
    *,
    low: int = 4,
    high: int = 8,
) -> dict[str, int]:
    """Bits per layer: start every scanned layer at ``low`` and give ``high`` to layers in order of
    sensitivity per extra byte (most sensitive first), skipping any that would exceed
    ``budget_bytes`` of weights (layers not in ``sensitivity`` count at 32 bits)."""
    check_type("sensitivity", sensitivity, dict)
    check_float("budget_bytes", budget_bytes, 0.0, min_inclusive=False)
    qrange(low, True)
    qrange(high, True)
    if high <= low:
        raise ValueError(f"high ({high}) must be more bits than low ({low})")
    layers = quantizable_layers(model)
    bits = dict.fromkeys(sensitivity, low)
    if weight_bytes(model, bits) > budget_bytes:
        raise ValueError(
            f"budget_bytes={budget_bytes:.0f} is below the all-{low}-bit size "
            f"{weight_bytes(model, bits):.0f}"
        )

    def gain(name: str) -> float:
        return sensitivity[name] / layers[name].weight.numel()

    for name in sorted(sensitivity, key=gain, reverse=True):
        trial = {**bits, name: high}
        if weight_bytes(model, trial) <= budget_bytes:
            bits = trial
    return bits


def precision_curve(
    model: nn.Module,
    metric: Callable[[nn.Module], float],
    order: Sequence[str],
    *,
    low: int = 4,
    high: int = 8,
    act_bits: int | None = None,
) -> list[tuple[int, float, float]]:
    """``(k, weight bytes, metric)`` with every layer of ``order`` at ``low`` bits except the first
    ``k``, which get ``high`` (k = 0 … len(order)): accuracy recovered as precision is added back."""
    check_module("model", model)
    if not order:
        raise ValueError("order must list at least one layer")
    rows = []
    for k in range(len(order) + 1):
        bits = {n: (high if i < k else low) for i, n in enumerate(order)}
        with quantized_layers(model, bits, act_bits=act_bits) as q:
            rows.append((k, weight_bytes(model, bits), float(metric(q))))
    return rows
