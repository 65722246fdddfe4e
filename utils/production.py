"""Production INT8 paths of PyTorch on the CPU, wrapped so lessons call one function.

* :func:`quantize_dynamic_int8` — dynamic quantization: INT8 weights, activations
  quantized on the fly per batch (``torch.ao.quantization.quantize_dynamic``);
  only ``nn.Linear`` (and RNN) layers.
* :func:`quantize_static_int8` — eager-mode static post-training quantization with
  the x86 backend (FBGEMM/oneDNN kernels, VNNI where the CPU has it): fuse
  conv-BN-ReLU, insert observers, calibrate on real batches, convert.

``torch.ao.quantization`` prints deprecation warnings in recent releases (its
successor is torchao's pt2e flow); they are silenced here so lessons stay clean.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from utils.validation import check_choice, check_int, check_module


class _Quantizable(nn.Module):
    """``QuantStub → model → DeQuantStub``: float in, float out, INT8 inside."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.model = model
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        return self.dequant(self.model(self.quant(x)))


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``nn.Linear`` layers use INT8 weights and dynamic INT8 activations."""
    check_module("model", model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model).eval().cpu(), {nn.Linear}, dtype=torch.qint8
        )


def quantize_static_int8(
    model: nn.Module,
    calibration: Iterable,
    *,
    backend: str = "x86",
    per_channel: bool = True,
    num_batches: int = 10,
) -> nn.Module:
    """Eager static INT8 post-training quantization of a course model (a copy; the input is untouched).

    Args:
        model: a float model with ``fuse_groups()`` (every ``utils.models`` model has it).
        calibration: an iterable of ``(x, y)`` batches (a DataLoader) used by the observers.
        backend: ``"x86"`` (default; per-channel weights) or ``"fbgemm"``/``"qnnpack"``.
        per_channel: per-channel weight scales (``False``: per-tensor weights).
        num_batches: calibration batches to use.

    Returns:
        The converted INT8 model (float input and output), in eval mode on the CPU.
    """
    check_module("model", model)
    check_choice("backend", backend, ("x86", "fbgemm", "qnnpack"))
    check_int("num_batches", num_batches, minimum=1)
    if not hasattr(model, "fuse_groups"):
        raise TypeError("model must define fuse_groups() (see utils.models)")
    aq = torch.ao.quantization
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = backend
        float_model = copy.deepcopy(model).eval().cpu()
        groups = float_model.fuse_groups()
        if groups:
            aq.fuse_modules(float_model, groups, inplace=True)
        wrapped = _Quantizable(float_model).eval()
        qconfig = aq.get_default_qconfig(backend)
        if not per_channel:
            qconfig = aq.QConfig(activation=qconfig.activation, weight=aq.default_weight_observer)
        wrapped.qconfig = qconfig
        aq.prepare(wrapped, inplace=True)
        with torch.inference_mode():
            for i, (x, *_rest) in enumerate(calibration):
                if i >= num_batches:
                    break
                wrapped(x.cpu())
        aq.convert(wrapped, inplace=True)
    return wrapped.eval()
