"""Backend × operator/scheme compatibility, tried rather than claimed (chapter 9, 表17).

Each cell of the matrix builds a one-operator model (:data:`OPERATORS`), runs it through one
backend and scheme (:data:`CELLS`) on this machine and records what happened:

* ``"works"`` — the backend ran it and the output agrees with FP32 eager
  (relative error ≤ :data:`TOLERANCE` of the scheme); for INT8 the operator itself ran in an
  integer kernel (a quantized module in PyTorch, a ``QLinear*``/``*Integer`` node in ONNX Runtime's
  optimized graph);
* ``"falls back to float"`` — it ran, but the operator stayed a float operator between
  quantize/dequantize steps (or stayed an ``nn`` float module);
* ``"fails: <error>"`` — the error message the backend raised (first line, shortened);
* ``"wrong: rel err …"`` — it ran but the output is off by more than the tolerance.

:func:`run_matrix` caches the table under a key of the library versions, so the lesson
pays for the exports once per environment.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import io
import json
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from utils.validation import check_choice

TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2, "int8": 0.1, "int4": 0.3}
LIBRARIES = ("torch", "onnxruntime", "openvino", "apache-tvm", "executorch", "torchao")


class _Attention(nn.Module):
    """Single-head scaled dot-product self-attention over ``(N, T, D)``."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        return self.out(att @ v)


@dataclass(frozen=True)
class Operator:
    """A one-operator model, its example input, and (for dynamic shapes) a second input shape."""

    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    other_shape: tuple[int, ...] | None = None


OPERATORS: dict[str, Operator] = {
    "conv 3×3": Operator(lambda: nn.Conv2d(8, 16, 3, padding=1), (2, 8, 12, 12)),
    "depthwise conv": Operator(lambda: nn.Conv2d(16, 16, 3, padding=1, groups=16), (2, 16, 12, 12)),
    "linear": Operator(lambda: nn.Linear(64, 64), (2, 64)),
    "LayerNorm": Operator(lambda: nn.LayerNorm(64), (2, 64)),
    "GELU": Operator(nn.GELU, (2, 64)),
    "attention": Operator(_Attention, (2, 8, 32)),
    "dynamic shape (seq 8 → 13)": Operator(lambda: nn.Linear(32, 32), (2, 8, 32), (2, 13, 32)),
}


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return "fails: " + (text if len(text) <= 90 else text[:87] + "…")


def _rel_err(out: Tensor, ref: Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm().clamp(min=1e-12))


def _judge(out: Tensor, ref: Tensor, scheme: str, integer_kernel: bool | None = None) -> str:
    err = _rel_err(out, ref)
    if err > TOLERANCE[scheme]:
        return f"wrong: rel err {err:.2g}"
    if integer_kernel is False:
        return "falls back to float"
    return "works"


def _inputs(op: Operator, seed: int = 0) -> tuple[Tensor, Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(op.shape, generator=g)
    other = torch.randn(op.other_shape, generator=g) if op.other_shape else None
    return x, other


def _run_both(
    fn: Callable[[Tensor], Tensor], model: nn.Module, op: Operator, scheme: str, kernel=None
):
    x, other = _inputs(op)
    with torch.no_grad():
        status = _judge(torch.as_tensor(fn(x)), model(x), scheme, kernel)
        if other is not None and not status.startswith("wrong"):
            status = _judge(torch.as_tensor(fn(other)), model(other), scheme, kernel)
    return status


# --------------------------------------------------------------------------- PyTorch cells
def _torch_dtype(dtype: torch.dtype, scheme: str):
    def cell(model: nn.Module, op: Operator) -> str:
        m = copy.deepcopy(model).to(dtype)
        return _run_both(lambda x: m(x.to(dtype)).float(), model, op, scheme)

    return cell


class _Stubbed(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        aq = torch.ao.quantization
        self.quant, self.model, self.dequant = aq.QuantStub(), model, aq.DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        return self.dequant(self.model(self.quant(x)))


def _torch_static(engine: str, per_channel: bool):
    def cell(model: nn.Module, op: Operator) -> str:
        if engine not in torch.backends.quantized.supported_engines:
            return f"fails: engine {engine!r} not built into this torch"
        aq = torch.ao.quantization
        previous = torch.backends.quantized.engine
        try:
            torch.backends.quantized.engine = engine
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wrapped = _Stubbed(copy.deepcopy(model)).eval()
                qc = aq.get_default_qconfig(engine)
                if not per_channel:
                    qc = aq.QConfig(activation=qc.activation, weight=aq.default_weight_observer)
                wrapped.qconfig = qc
                aq.prepare(wrapped, inplace=True)
                with torch.no_grad():
                    for t in _inputs(op):  # calibrate on the inputs it is judged on
                        if t is not None:
                            wrapped(t)
                aq.convert(wrapped, inplace=True)
            # between the stubs every op receives quantized tensors: an op without a
            # QuantizedCPU kernel raises (attention's bmm), so running means integer kernels
            return _run_both(wrapped, model, op, "int8")
        except Exception as err:  # noqa: BLE001 - the cell reports any failure
            return _short(err)
        finally:
            torch.backends.quantized.engine = previous

    return cell


def _torch_dynamic(model: nn.Module, op: Operator) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(
            nn.Sequential(copy.deepcopy(model)).eval(), {nn.Linear}, torch.qint8
        )  # wrapped: quantize_dynamic swaps children, never the root module
    # dynamic INT8 covers Linear layers only: it works when every Linear became an INT8 one
    # and no other float layer with weights (Conv, LayerNorm) is left
    mods = list(q.modules())
    dynamic = [m for m in mods if type(m).__module__.startswith("torch.ao.nn.quantized.dynamic")]
    float_left = [m for m in mods if type(m) in (nn.Linear, nn.Conv2d, nn.LayerNorm)]
    kernel = bool(dynamic) and not float_left
    return _run_both(q, model, op, "int8", kernel)


def _torchao_int4(model: nn.Module, op: Operator) -> str:
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    m = nn.Sequential(copy.deepcopy(model)).eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        quantize_(m, Int4WeightOnlyConfig(group_size=32))
    changed = any(type(p).__name__ != "Parameter" for p in m.parameters())
    return _run_both(m, model, op, "int4", changed)


# --------------------------------------------------------------------------- exported backends
def _ort_integer_kernel(onnx_path: Path) -> bool:
    """True when ONNX Runtime's optimized graph runs the operator in an integer kernel."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    out = onnx_path.with_name("runtime.onnx")
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    compute = {"Conv", "MatMul", "Gemm", "LayerNormalization", "Gelu", "FastGelu", "Erf", "Softmax"}
    floats = ops & compute
    integer = {
        o for o in ops if o.startswith("QLinear") or o.endswith("Integer") or o.startswith("Q")
    }
    return bool(integer - {"QuantizeLinear"}) and not floats


def _ov_has_fake_quantize(xml: Path) -> bool:
    """True when NNCF put a ``FakeQuantize`` into the OpenVINO model (the CPU plugin then runs
    the operator after it in INT8); none means the operator stays FP32."""
    import openvino as ov

    return any(
        op.get_type_name() == "FakeQuantize" for op in ov.Core().read_model(str(xml)).get_ops()
    )


def _exported(backend: str, scheme: str):
    def cell(model: nn.Module, op: Operator) -> str:
        from utils.deploy import BackendUnavailable, export_runners

        x, other = _inputs(op)
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runner = export_runners(
                model, x, backends=[backend], calib=x if scheme == "int8" else None, workdir=tmp
            )[backend]
            if isinstance(runner, BackendUnavailable):
                return f"fails: not available here ({runner.reason})"
            kernel = None
            if backend == "onnxrt-int8":
                kernel = _ort_integer_kernel(Path(tmp) / "model-int8.onnx")
            if backend == "openvino-int8":
                kernel = _ov_has_fake_quantize(Path(tmp) / "openvino-int8.xml")
            fn = runner.fn  # the backend itself, without the Runner's shape check
            return _run_both(
                lambda t: torch.as_tensor(_first(fn(t.contiguous()))), model, op, scheme, kernel
            )

    return cell


def _first(out):
    if isinstance(out, (list, tuple)):
        out = out[0]
    return out if isinstance(out, Tensor) else torch.from_numpy(__import__("numpy").asarray(out))


CELLS: dict[str, Callable[[nn.Module, Operator], str]] = {
    "PyTorch FP16": _torch_dtype(torch.float16, "fp16"),
    "PyTorch BF16": _torch_dtype(torch.bfloat16, "bf16"),
    "PyTorch INT8 x86 per-tensor": _torch_static("x86", False),
    "PyTorch INT8 x86 per-channel": _torch_static("x86", True),
    "PyTorch INT8 oneDNN": _torch_static("onednn", True),
    "PyTorch INT8 QNNPACK": _torch_static("qnnpack", False),
    "PyTorch INT8 dynamic": _torch_dynamic,
    "torchao INT4 weight-only": _torchao_int4,
    "ONNX Runtime FP32": _exported("onnxrt-all", "fp32"),
    "ONNX Runtime INT8 (QDQ, per-channel)": _exported("onnxrt-int8", "int8"),
    "OpenVINO FP32": _exported("openvino", "fp32"),
    "OpenVINO INT8 (NNCF)": _exported("openvino-int8", "int8"),
    "TVM FP32": _exported("tvm", "fp32"),
    "ExecuTorch FP32 (XNNPACK)": _exported("executorch", "fp32"),
}


FAST_CELLS: tuple[str, ...] = (
    "PyTorch FP16",
    "PyTorch INT8 x86 per-tensor",
    "PyTorch INT8 x86 per-channel",
    "PyTorch INT8 QNNPACK",
    "PyTorch INT8 dynamic",
    "ONNX Runtime INT8 (QDQ, per-channel)",
    "OpenVINO INT8 (NNCF)",
)
"""A representative subset of :data:`CELLS` for the fast profile: every PyTorch INT8 engine
family (x86 per-tensor/per-channel, QNNPACK, dynamic) plus one INT8 path each of ONNX Runtime
and OpenVINO. The exported backends cost seconds per cell; the full profile runs all of CELLS."""


def run_cell(operator: str, cell: str) -> str:
    """Run one cell: build the operator, push it through the backend/scheme, report the outcome."""
    check_choice("operator", operator, OPERATORS)
    check_choice("cell", cell, CELLS)
    op = OPERATORS[operator]
    torch.manual_seed(0)
    model = op.build().eval()
    try:
        return CELLS[cell](model, op)
    except Exception as err:  # noqa: BLE001 - the cell reports any failure
        return _short(err)


def library_versions() -> dict[str, str]:
    """Installed versions of :data:`LIBRARIES` (``"missing"`` when not installed)."""
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = "missing"
    return out


def run_matrix(
    operators: list[str] | None = None,
    cells: list[str] | None = None,
    *,
    cache: bool = True,
) -> dict[str, dict[str, str]]:
    """``{operator: {cell: outcome}}`` for every pair, cached per library versions and CPU.

    Args:
        operators: names from :data:`OPERATORS` (default: all).
        cells: names from :data:`CELLS` (default: all).
        cache: reuse (and write) ``<cache_dir>/compat-<key>.json``.
    """
    from utils.benchmark import cpu_features
    from utils.cache import config_key
    from utils.config import cache_dir

    ops = list(OPERATORS) if operators is None else list(operators)
    cols = list(CELLS) if cells is None else list(cells)
    for o in ops:
        check_choice("operator", o, OPERATORS)
    for c in cols:
        check_choice("cell", c, CELLS)
    key = config_key(
        {"versions": library_versions(), "cpu": cpu_features(), "ops": ops, "cells": cols, "v": 2}
    )
    path = cache_dir() / f"compat-{key}.json"
    if cache and path.exists():
        return json.loads(path.read_text())
    table = {o: {c: run_cell(o, c) for c in cols} for o in ops}
    if cache:
        path.write_text(json.dumps(table, ensure_ascii=False, indent=1))
    return table


def outcome_kind(outcome: str) -> str:
    """``"works"``, ``"falls back to float"``, ``"fails"`` or ``"wrong"`` for an outcome string."""
    if not isinstance(outcome, str):
        raise TypeError(f"outcome must be a str, got {type(outcome).__name__}")
    for kind in ("works", "falls back to float", "fails", "wrong"):
        if outcome.startswith(kind):
            return kind
    raise ValueError(
        f"outcome must start with works/falls back to float/fails/wrong, got {outcome!r}"
    )
