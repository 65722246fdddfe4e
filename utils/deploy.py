"""Deployment: one model exported to many inference backends, each checked against PyTorch.

Chapter 6 (推理加速的实现与工具) loops over backends instead of repeating code:

>>> runners = export_runners(model, example, backends=["eager", "onnxrt-all"], calib=calib)
>>> for name, r in runners.items():
...     row = check_agreement(r, runners["eager"], inputs, labels) if isinstance(r, Runner) else r

* :data:`BACKENDS` names every backend the course knows, with its precision and
  what it does. :func:`export_runners` builds a :class:`Runner` for each one that
  works here and a :class:`BackendUnavailable` (backend, reason) for each one that
  is not installed or not supported on this platform, so a table can show a
  "not available" row that says what is missing.
* Every :class:`Runner` has the same call signature, ``runner(x) -> logits``
  (a float32 CPU tensor), so :func:`utils.benchmark.benchmark_models` times all of
  them under the one measurement policy.
* :func:`check_agreement` compares a runner with PyTorch eager on the same
  inputs: FP32 backends must agree to :data:`FP32_ATOL` (max abs diff of the
  logits); INT8 backends must agree on ≥ :data:`INT8_MIN_AGREEMENT` of the
  predictions and lose at most :data:`INT8_MAX_ACC_DROP` accuracy points. A
  backend that fails is reported as failing (``passed=False``), never hidden.
* Graph optimisation made visible: :func:`ort_op_counts` counts the operators of
  the ONNX graph after each ONNX Runtime optimisation level; :func:`fuse_conv_bn_fx`
  is the same idea written as a small FX pass (Conv+BN folding, Conv+ReLU fusion,
  no-op removal), equal in output to the model and to ``torch.ao``'s ``fuse_modules``.

Backends import lazily: a missing package is a :class:`BackendUnavailable`, never an
import error of this module.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.metadata
import importlib.util
import io
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, fx, nn
from torch.utils.data import DataLoader

from utils.benchmark import default_threads
from utils.validation import (
    check_choice,
    check_float,
    check_int,
    check_module,
    check_tensor,
    check_type,
)

FP32_ATOL = 1e-3  # max abs diff of logits an FP32 backend may show against eager
INT8_MIN_AGREEMENT = 0.99  # fraction of predictions an INT8 backend must share with eager
INT8_MAX_ACC_DROP = 1.0  # accuracy points an INT8 backend may lose against eager
ORT_LEVELS = ("disable", "basic", "extended", "all")


# ----------------------------------------------------------------- errors and the runner
class BackendUnavailable(RuntimeError):
    """A backend that is not installed or not supported here; the lesson shows it as a row.

    Attributes:
        backend: the name in :data:`BACKENDS`.
        reason: what is missing, e.g. ``"needs tensorrt and an NVIDIA GPU (found no CUDA device)"``.
    """

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"backend {backend!r} is not available: {reason}")
        self.backend, self.reason = backend, reason


class ExportError(RuntimeError):
    """A model that a backend's exporter or compiler could not convert (the cause is chained)."""

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"backend {backend!r} could not export the model: {reason}")
        self.backend, self.reason = backend, reason


@dataclass
class Runner:
    """One exported model: ``runner(x)`` returns float32 logits on the CPU for a batch ``x``.

    Attributes:
        name: the backend's name in :data:`BACKENDS`.
        fn: maps a CPU float32 batch to logits (any array-like).
        input_shape: the ``(C, H, W)`` the model was exported for; the batch size is free.
        precision: ``"fp32"`` or ``"int8"`` (decides the check of :func:`check_agreement`).
        file_bytes: size of the serialised artefact (``None`` when there is none, e.g. eager).
        version: the library and its version that runs it.
        notes: what was done (optimisation level, quantisation scheme, target, …).
        graph_ops: operator counts of the graph that runs, when the backend exposes them.
    """

    name: str
    fn: Callable[[Tensor], Any]
    input_shape: tuple[int, ...]
    precision: str = "fp32"
    file_bytes: int | None = None
    version: str = ""
    notes: str = ""
    graph_ops: dict[str, int] | None = None

    def __call__(self, x: Tensor) -> Tensor:
        check_tensor("x", x)
        if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"x must have shape (batch, {', '.join(map(str, self.input_shape))}) for backend "
                f"{self.name!r}, got {tuple(x.shape)}"
            )
        out = self.fn(x.detach().to("cpu", torch.float32).contiguous())
        if isinstance(out, (list, tuple)):
            out = out[0]
        if not isinstance(out, Tensor):
            out = torch.from_numpy(np.asarray(out))
        return out.detach().to("cpu", torch.float32)


# ----------------------------------------------------------------- calibration data
def _batches(data: Tensor | DataLoader, batch_size: int = 32) -> Iterator[Tensor]:
    """Input batches of a tensor (split along dim 0) or of a loader (first item of each batch)."""
    if isinstance(data, Tensor):
        yield from data.split(batch_size)
    else:
        for batch in data:
            yield batch[0] if isinstance(batch, (list, tuple)) else batch


def calibration_batches(calib: Tensor | DataLoader, *, max_batches: int = 8) -> list[Tensor]:
    """The first ``max_batches`` input batches of ``calib`` as float32 CPU tensors (each different)."""
    check_type("calib", calib, (Tensor, DataLoader))
    check_int("max_batches", max_batches, minimum=1)
    out = []
    for i, xb in enumerate(_batches(calib)):
        if i >= max_batches:
            break
        if len(xb):
            out.append(xb.detach().to("cpu", torch.float32).contiguous())
    if not out:
        raise ValueError("calib must hold at least one batch of real inputs")
    return out


class OrtCalibrationReader:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over real input batches.

    ``get_next()`` returns ``{input_name: batch}`` for each batch once, then ``None``;
    the static quantizer records the activation ranges of these batches
    (min-max observers) to fix each activation's scale and zero point.
    """

    def __init__(self, input_name: str, batches: Sequence[Tensor]) -> None:
        self.input_name = input_name
        self.batches = [b.numpy() for b in batches]
        self._it = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._it = iter(self.batches)


# ----------------------------------------------------------------- artefacts
@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Only errors of the logger ``name`` (``""``: the root logger) inside the block."""
    import logging

    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _version(package: str) -> str:
    try:
        return f"{package} {importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return package


def _require(backend: str, module: str, package: str | None = None) -> Any:
    """Import ``module`` or raise :class:`BackendUnavailable` naming the package to install."""
    if importlib.util.find_spec(module) is None:
        raise BackendUnavailable(backend, f"needs the Python package {package or module!r}")
    try:
        return importlib.import_module(module)
    except Exception as err:  # installed but broken on this platform
        raise BackendUnavailable(backend, f"{module} fails to import: {err}") from err


@dataclass
class _Context:
    """What the builders share: the model, an example, calibration batches, a work folder."""

    model: nn.Module
    example: Tensor
    input_shape: tuple[int, ...]
    calib: list[Tensor] | None
    workdir: Path
    cache: dict[str, Any] = field(default_factory=dict)

    def need_calib(self, backend: str) -> list[Tensor]:
        if self.calib is None:
            raise ValueError(
                f"calib (real input data) is required for the INT8 backend {backend!r}"
            )
        return self.calib

    def exported(self) -> torch.export.ExportedProgram:
        """``torch.export`` program with a dynamic batch dimension (built once)."""
        if "export" not in self.cache:
            ex2 = torch.cat([self.example[:1]] * 2)  # batch 2: a batch of 1 would be specialised
            batch = torch.export.Dim("batch", min=1, max=1024)
            try:
                self.cache["export"] = torch.export.export(
                    self.model, (ex2,), dynamic_shapes=({0: batch},)
                )
            except Exception as err:
                raise ExportError("export", f"torch.export failed: {err}") from err
        return self.cache["export"]

    def onnx_path(self, backend: str) -> Path:
        """The model as ONNX (``torch.onnx.export(dynamo=True)``, dynamic batch), written once."""
        path = self.workdir / "model.onnx"
        if "onnx" not in self.cache:
            _require(backend, "onnxscript")
            ex2 = torch.cat([self.example[:1]] * 2)
            batch = torch.export.Dim("batch", min=1, max=1024)
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")
                    program = torch.onnx.export(
                        self.model,
                        (ex2,),
                        dynamo=True,
                        optimize=True,  # onnxscript's optimiser: constant folding, BN into Conv
                        dynamic_shapes=({0: batch},),
                        verbose=False,
                    )
                program.save(str(path))
            except Exception as err:
                raise ExportError(backend, f"torch.onnx.export failed: {err}") from err
            self.cache["onnx"] = path
        return path


def _file_bytes(*paths: Path) -> int:
    return sum(os.path.getsize(p) for p in paths)


# ----------------------------------------------------------------- PyTorch backends
def _eager(ctx: _Context) -> Runner:
    model = ctx.model
    return Runner(
        "eager",
        model,
        ctx.input_shape,
        file_bytes=_state_bytes(model),
        version=f"torch {torch.__version__}",
        notes="PyTorch eager, eval mode",
    )


def _state_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def _compile(ctx: _Context) -> Runner:
    """``torch.compile`` with inductor: TorchDynamo captures the graph, inductor generates C++."""
    import shutil

    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None:
        raise BackendUnavailable(
            "compile", "inductor on CPU needs a C++ compiler (g++), none found"
        )
    compiled = torch.compile(ctx.model, backend="inductor", dynamic=False)
    try:
        with torch.inference_mode():
            compiled(ctx.example)  # compile now, so a failure shows here and not in a timing
    except Exception as err:
        raise ExportError("compile", f"torch.compile failed: {err}") from err
    return Runner(
        "compile",
        compiled,
        ctx.input_shape,
        version=f"torch {torch.__version__}",
        notes="torch.compile(backend='inductor'); recompiles once per new batch size",
    )


def _export(ctx: _Context) -> Runner:
    ep = ctx.exported()
    path = ctx.workdir / "model.pt2"
    torch.export.save(ep, str(path))
    ops = Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function")
    return Runner(
        "export",
        ep.module(),
        ctx.input_shape,
        file_bytes=_file_bytes(path),
        version=f"torch {torch.__version__}",
        notes="torch.export program (ATen graph, dynamic batch), run by its GraphModule",
        graph_ops=dict(ops),
    )


# ----------------------------------------------------------------- ONNX Runtime
def onnx_op_counts(path: str | Path) -> dict[str, int]:
    """Operator counts (``op_type`` → count) of the main graph of an ONNX file."""
    onnx = importlib.import_module("onnx")
    return dict(Counter(n.op_type for n in onnx.load(str(path)).graph.node))


def _ort_session(onnx_path: Path, level: str, optimized_path: Path | None = None):
    ort = importlib.import_module("onnxruntime")
    check_choice("level", level, ORT_LEVELS)
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.log_severity_level = 3  # no warning about hardware-specific graphs at level "all"
    so.intra_op_num_threads = default_threads()  # the benchmark policy's thread count
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])


def _ort_fn(session) -> Callable[[Tensor], np.ndarray]:
    name = session.get_inputs()[0].name

    def run(x: Tensor) -> np.ndarray:
        return session.run(None, {name: x.numpy()})[0]

    return run


def ort_op_counts(onnx_path: str | Path) -> dict[str, dict[str, int]]:
    """Operator counts of an ONNX graph as ONNX Runtime optimises it at each level.

    ``disable`` is the exported graph; ``basic`` adds constant folding and removes
    redundant nodes (e.g. BatchNormalization folded into the preceding Conv);
    ``extended`` fuses patterns such as Conv+Relu into ``FusedConv``; ``all`` adds
    layout optimisations (NCHWc blocked layout, ``ReorderInput/Output``).
    """
    check_type("onnx_path", onnx_path, (str, Path))
    _require("onnxrt", "onnxruntime")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for level in ORT_LEVELS:
            opt = Path(tmp) / f"{level}.onnx"
            _ort_session(Path(onnx_path), level, opt)
            out[level] = onnx_op_counts(opt)
    return out


def _onnxrt(level: str) -> Callable[[_Context], Runner]:
    def build(ctx: _Context) -> Runner:
        name = f"onnxrt-{level}"
        _require(name, "onnxruntime")
        src = ctx.onnx_path(name)
        opt = ctx.workdir / f"ort-{level}.onnx"
        session = _ort_session(src, level, opt)
        return Runner(
            name,
            _ort_fn(session),
            ctx.input_shape,
            file_bytes=_file_bytes(src),
            version=_version("onnxruntime"),
            notes=f"ONNX Runtime CPU, graph optimisation level {level!r}",
            graph_ops=onnx_op_counts(opt),
        )

    return build


def _onnxrt_int8(ctx: _Context) -> Runner:
    """ONNX Runtime static INT8 in QDQ format: per-channel INT8 weights, calibrated activations."""
    name = "onnxrt-int8"
    _require(name, "onnxruntime")
    q = importlib.import_module("onnxruntime.quantization")
    calib = ctx.need_calib(name)
    folded = ctx.workdir / "ort-basic-for-int8.onnx"
    _ort_session(ctx.onnx_path(name), "basic", folded)  # BN folded into Conv before quantising
    out = ctx.workdir / "model-int8.onnx"
    input_name = _ort_session(folded, "disable").get_inputs()[0].name
    with _quiet_logger(""):  # the quantizer's advice to pre-process goes to the root logger
        q.quantize_static(
            str(folded),
            str(out),
            OrtCalibrationReader(input_name, calib),
            quant_format=q.QuantFormat.QDQ,
            per_channel=True,
            weight_type=q.QuantType.QInt8,
            activation_type=q.QuantType.QUInt8,
            calibrate_method=q.CalibrationMethod.MinMax,
        )
    session = _ort_session(out, "all")
    return Runner(
        name,
        _ort_fn(session),
        ctx.input_shape,
        precision="int8",
        file_bytes=_file_bytes(out),
        version=_version("onnxruntime"),
        notes=f"static QDQ, per-channel INT8 weights, UINT8 activations, min-max over {len(calib)} real batches",
        graph_ops=onnx_op_counts(out),
    )


# ----------------------------------------------------------------- OpenVINO
def _ov_runner(name: str, ov: Any, model: Any, ctx: _Context, precision: str, notes: str) -> Runner:
    xml = ctx.workdir / f"{name}.xml"
    ov.save_model(model, str(xml), compress_to_fp16=False)
    compiled = ov.Core().compile_model(
        model,
        "CPU",
        {"INFERENCE_NUM_THREADS": default_threads(), "INFERENCE_PRECISION_HINT": "f32"},
    )

    def run(x: Tensor) -> np.ndarray:
        return compiled(x.numpy())[0]

    ops = Counter(op.get_type_name() for op in compiled.get_runtime_model().get_ops())
    return Runner(
        name,
        run,
        ctx.input_shape,
        precision=precision,
        file_bytes=_file_bytes(xml, xml.with_suffix(".bin")),
        version=f"openvino {ov.__version__.split('-')[0]}",
        notes=notes,
        graph_ops=dict(ops),
    )


def _openvino(ctx: _Context) -> Runner:
    ov = _require("openvino", "openvino")
    model = ov.convert_model(str(ctx.onnx_path("openvino")))
    return _ov_runner(
        "openvino", ov, model, ctx, "fp32", "OpenVINO CPU plugin, FP32, from the ONNX file"
    )


def _openvino_int8(ctx: _Context) -> Runner:
    """OpenVINO INT8 by NNCF post-training quantisation (calibrated on real batches)."""
    name = "openvino-int8"
    ov = _require(name, "openvino")
    nncf = _require(name, "nncf")
    calib = ctx.need_calib(name)
    model = ov.convert_model(str(ctx.onnx_path(name)))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        qmodel = nncf.quantize(
            model,
            nncf.Dataset([b.numpy() for b in calib]),
            subset_size=len(calib),  # NNCF counts dataset items, here batches
            preset=nncf.QuantizationPreset.MIXED,  # symmetric weights, asymmetric activations
            fast_bias_correction=False,  # full bias correction: SmallResNet 96.5 % -> 99.7 % agreement
        )
    return _ov_runner(
        name,
        ov,
        qmodel,
        ctx,
        "int8",
        f"NNCF post-training INT8 (mixed preset, bias correction), {len(calib)} real calibration batches",
    )


# ----------------------------------------------------------------- TVM
def set_tvm_threads(threads: int) -> int:
    """Size TVM's (process-wide) CPU thread pool to ``threads``; return the count it reports.

    TVM's runtime otherwise starts one worker per physical core; the course's
    measurement policy fixes the count (:func:`utils.benchmark.default_threads`).
    """
    check_int("threads", threads, minimum=1)
    tvm = importlib.import_module("tvm")
    tvm.get_global_func("runtime.config_threadpool")(0, threads)  # mode 0: big cores first
    return int(tvm.get_global_func("runtime.NumThreads")())


def tvm_mcpu(features: dict[str, bool]) -> str:
    """The LLVM ``-mcpu`` that lets TVM use this CPU's vector units (``cpu_features()`` names).

    ``skylake-avx512`` with AVX-512 (plus ``cascadelake`` for AVX-512 VNNI's INT8 dot
    products), ``haswell`` with AVX2 and FMA, else generic ``x86-64`` (SSE2 only);
    ``""`` on an Arm CPU (NEON): LLVM's default for the host.
    """
    check_type("features", features, dict)
    if features.get("NEON"):
        return ""
    if features.get("AVX-512 VNNI"):
        return "cascadelake"
    if features.get("AVX-512"):
        return "skylake-avx512"
    if features.get("AVX2") and features.get("FMA"):
        return "haswell"
    return "x86-64"


def _tvm(ctx: _Context) -> Runner:
    """Apache TVM Relax: import the ``torch.export`` program, compile for this CPU with LLVM."""
    tvm = _require("tvm", "tvm", "apache-tvm")
    from utils.benchmark import cpu_features

    relax = importlib.import_module("tvm.relax")
    frontend = importlib.import_module("tvm.relax.frontend.torch")
    mcpu = tvm_mcpu(cpu_features())
    target = tvm.target.Target({"kind": "llvm", **({"mcpu": mcpu} if mcpu else {})})
    threads = set_tvm_threads(default_threads())  # the benchmark policy's thread count
    to_tvm = tvm.runtime.tensor if hasattr(tvm.runtime, "tensor") else tvm.nd.array
    model, vms = ctx.model, {}

    def compiled(batch: int) -> Any:
        """The VM for one batch size: TVM compiles static shapes, so once per new batch size."""
        if batch not in vms:
            example = torch.zeros(batch, *ctx.input_shape)
            try:
                ep = torch.export.export(model, (example,))
                mod = frontend.from_exported_program(ep, keep_params_as_input=False)
                vms[batch] = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
            except Exception as err:
                raise ExportError("tvm", f"TVM Relax import/compile failed: {err}") from err
        return vms[batch]

    compiled(ctx.example.shape[0])  # compile now, so a failure shows here and not in a timing

    def run(x: Tensor) -> np.ndarray:
        out = compiled(x.shape[0])["main"](to_tvm(x.numpy()))
        out = out[0] if not hasattr(out, "numpy") else out
        return out.numpy()

    return Runner(
        "tvm",
        run,
        ctx.input_shape,
        version=f"apache-tvm {tvm.__version__}",
        notes=f"Relax default pipeline, target llvm -mcpu={mcpu or 'host'}, untuned, {threads} thread(s); "
        "compiled once per batch size",
    )


# ----------------------------------------------------------------- ExecuTorch
@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence what native code writes to file descriptor 2 (and torch's pytree notice)."""
    import logging

    pytree_log = logging.getLogger("torch.utils._pytree")
    level, saved = pytree_log.level, os.dup(2)
    pytree_log.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        pytree_log.setLevel(level)


def set_executorch_threads(threads: int) -> int:
    """Size ExecuTorch's (process-wide) thread pool, which XNNPACK runs on; return its size.

    The pool starts with one thread per CPU; the course's measurement policy fixes
    the count (:func:`utils.benchmark.default_threads`).
    """
    check_int("threads", threads, minimum=1)
    lib = importlib.import_module("executorch.extension.pybindings.portable_lib")
    if lib._threadpool_get_thread_count() != threads:
        lib._unsafe_reset_threadpool(threads)
    return int(lib._threadpool_get_thread_count())


def _executorch(ctx: _Context) -> Runner:
    """ExecuTorch: the ``torch.export`` program lowered to XNNPACK, run by its Python runtime."""
    name = "executorch"
    _require(name, "executorch")
    try:
        with _quiet_native_stderr():  # its CPU probes and pool reset log to file descriptor 2
            xnn = importlib.import_module(
                "executorch.backends.xnnpack.partition.xnnpack_partitioner"
            )
            exir = importlib.import_module("executorch.exir")
            runtime = importlib.import_module("executorch.runtime").Runtime.get()
            threads = set_executorch_threads(default_threads())  # the policy's thread count
    except Exception as err:
        raise BackendUnavailable(
            name, f"executorch is installed but its XNNPACK/runtime fail: {err}"
        ) from err
    model, methods, sizes = ctx.model, {}, {}

    def method(batch: int) -> Any:
        """The loaded program for one batch size (ExecuTorch plans memory for static shapes)."""
        if batch not in methods:
            example = torch.zeros(batch, *ctx.input_shape)
            try:
                ep = torch.export.export(model, (example,))
                program = exir.to_edge_transform_and_lower(
                    ep, partitioner=[xnn.XnnpackPartitioner()]
                ).to_executorch()
            except Exception as err:
                raise ExportError(name, f"lowering to XNNPACK failed: {err}") from err
            path = ctx.workdir / f"model-b{batch}.pte"
            path.write_bytes(program.buffer)
            sizes[batch] = _file_bytes(path)
            methods[batch] = runtime.load_program(str(path)).load_method("forward")
        return methods[batch]

    with _quiet_native_stderr():  # XNNPACK probes the CPU on first use
        method(ctx.example.shape[0])  # lower now, so a failure shows here and not in a timing

    def run(x: Tensor) -> Tensor:
        return method(x.shape[0]).execute([x])[0]

    return Runner(
        name,
        run,
        ctx.input_shape,
        file_bytes=next(iter(sizes.values())),
        version=_version("executorch"),
        notes="torch.export → edge dialect → XNNPACK delegate (.pte), Python runtime, "
        f"{threads} thread(s); lowered once per batch size",
    )


def coreml_convert(model: nn.Module, example: Tensor, path: str | Path) -> int:
    """Convert ``model`` to a Core ML ML program (``.mlpackage``) with coremltools; its bytes.

    ``torch.export`` → ATen dialect (``run_decompositions``) → ``coremltools.convert``.
    Converting works on Linux; running the result (``MLModel.predict``) needs Apple's
    Core ML framework, which only macOS has.
    """
    check_module("model", model)
    check_tensor("example", example)
    with _quiet_logger("coremltools"):  # it warns about untested torch/sklearn versions
        ct = _require("coreml", "coremltools")
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            net = copy.deepcopy(model).eval()
            ep = torch.export.export(net, (example,)).run_decompositions({})
            ct.convert(ep, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17).save(
                str(path)
            )
    except Exception as err:
        raise ExportError("coreml", f"coremltools could not convert the model: {err}") from err
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _coreml(ctx: _Context) -> Runner:
    import platform

    if platform.system() == "Darwin":
        _require("coreml", "coremltools")
        raise BackendUnavailable(
            "coreml", "coremltools is installed, but the course has no macOS runner for it yet"
        )
    if importlib.util.find_spec("coremltools") is None:
        raise BackendUnavailable(
            "coreml", "needs macOS (Core ML runs only on Apple's framework) and coremltools"
        )
    version = _version("coremltools")
    try:
        size = coreml_convert(ctx.model, ctx.example, ctx.workdir / "model.mlpackage")
        converted = f"{version} converts the model here (ML program, {size / 1024:.0f} KB)"
    except ExportError as err:
        converted = f"{version} fails to convert it here ({str(err.reason).splitlines()[0]})"
    raise BackendUnavailable(
        "coreml",
        f"needs macOS: {converted}, but MLModel.predict runs only on Apple's Core ML "
        "framework (the Linux wheel has no coremltools.libcoremlpython)",
    )


# ----------------------------------------------------------------- not on this platform
def _missing(name: str, module: str, reason: str) -> Callable[[_Context], Runner]:
    """A backend this course cannot run here: raises :class:`BackendUnavailable` with ``reason``."""

    def build(ctx: _Context) -> Runner:
        if importlib.util.find_spec(module) is None:
            raise BackendUnavailable(name, reason)
        raise BackendUnavailable(
            name, f"{module} is installed, but the course has no runner for it yet"
        )

    return build


def _tensorrt(ctx: _Context) -> Runner:
    if not torch.cuda.is_available():
        raise BackendUnavailable(
            "tensorrt", "needs an NVIDIA GPU with CUDA (none found) and the tensorrt package"
        )
    _require("tensorrt", "tensorrt")
    raise BackendUnavailable(
        "tensorrt", "tensorrt is installed, but the course has no runner for it yet"
    )


@dataclass(frozen=True)
class Backend:
    """An entry of :data:`BACKENDS`: how to build its runner, its precision, what it is."""

    build: Callable[[_Context], Runner]
    precision: str
    description: str


BACKENDS: dict[str, Backend] = {
    "eager": Backend(_eager, "fp32", "PyTorch eager"),
    "compile": Backend(_compile, "fp32", "torch.compile (inductor, CPU)"),
    "export": Backend(_export, "fp32", "torch.export program"),
    **{
        f"onnxrt-{lvl}": Backend(_onnxrt(lvl), "fp32", f"ONNX Runtime, optimisation level {lvl}")
        for lvl in ORT_LEVELS
    },
    "onnxrt-int8": Backend(_onnxrt_int8, "int8", "ONNX Runtime static INT8 (QDQ)"),
    "openvino": Backend(_openvino, "fp32", "OpenVINO FP32"),
    "openvino-int8": Backend(_openvino_int8, "int8", "OpenVINO INT8 (NNCF PTQ)"),
    "tvm": Backend(_tvm, "fp32", "Apache TVM (Relax, LLVM for this CPU)"),
    "executorch": Backend(_executorch, "fp32", "ExecuTorch (XNNPACK delegate)"),
    "litert": Backend(
        _missing(
            "litert",
            "ai_edge_torch",
            "needs the converter 'ai-edge-torch' (litert-torch) and the runtime 'ai-edge-litert'; "
            "the converter pulls jax and transformers and pins older pydantic/typing_extensions, "
            "so the course environment does not install it",
        ),
        "fp32",
        "LiteRT / TensorFlow Lite",
    ),
    "coreml": Backend(_coreml, "fp32", "Core ML (macOS only)"),
    "tensorrt": Backend(_tensorrt, "fp32", "TensorRT (NVIDIA GPU)"),
}


def export_runners(
    model: nn.Module,
    example: Tensor,
    *,
    backends: Iterable[str] | None = None,
    calib: Tensor | DataLoader | None = None,
    workdir: str | Path | None = None,
) -> dict[str, Runner | BackendUnavailable]:
    """Export ``model`` to each backend and return a runner (or why not) per backend name.

    Args:
        model: the model (a deep copy in eval mode is exported; the original is untouched).
        example: an input batch ``(N, C, H, W)``; fixes the input shape (any batch size
            works later; ``tvm`` compiles once more for each new batch size).
        backends: names from :data:`BACKENDS` (default: all of them, in that order).
        calib: real input data for the INT8 backends (a tensor or a loader of ``(x, y)``);
            required when an INT8 backend is asked for.
        workdir: folder for the exported files (default: a fresh temporary folder).

    Returns:
        ``{name: Runner}`` for each backend that works here and
        ``{name: BackendUnavailable}`` for each one that is not installed or not supported.

    Raises:
        ValueError: unknown backend name, missing ``calib``, an input of the wrong rank.
        ExportError: a backend's exporter or compiler failed on this model.
    """
    check_module("model", model)
    check_tensor("example", example, finite=True)
    if example.dim() < 2:
        raise ValueError(
            f"example must be a batch (N, ...) with N >= 1, got shape {tuple(example.shape)}"
        )
    names = list(BACKENDS) if backends is None else list(backends)
    if isinstance(backends, str):
        raise TypeError(
            f"backends must be a list of names from {list(BACKENDS)}, got the string {backends!r}"
        )
    for n in names:
        check_choice("backend", n, BACKENDS)
    if calib is not None:
        check_type("calib", calib, (Tensor, DataLoader))
    if any(BACKENDS[n].precision == "int8" for n in names) and calib is None:
        int8 = [n for n in names if BACKENDS[n].precision == "int8"]
        raise ValueError(f"calib (real input data) is required for the INT8 backends {int8}")
    net = copy.deepcopy(model).cpu().eval()
    example = example.detach().cpu().float()
    with torch.no_grad():
        try:
            net(example)
        except Exception as err:
            raise ValueError(
                f"example of shape {tuple(example.shape)} does not fit the model: {err}"
            ) from err
    shape = tuple(example.shape[1:])
    folder = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="deploy-"))
    folder.mkdir(parents=True, exist_ok=True)
    ctx = _Context(
        net,
        example,
        shape,
        calibration_batches(calib) if calib is not None else None,
        folder,
    )
    out: dict[str, Runner | BackendUnavailable] = {}
    for n in names:
        try:
            out[n] = BACKENDS[n].build(ctx)
        except BackendUnavailable as err:
            out[n] = err
    return out


# ----------------------------------------------------------------- agreement with eager
def _predict(fn: Callable[[Tensor], Tensor], batches: list[Tensor]) -> Tensor:
    with torch.inference_mode():
        return torch.cat([torch.as_tensor(fn(b)).float().cpu() for b in batches])


def check_agreement(
    runner: Runner,
    reference: Callable[[Tensor], Tensor],
    inputs: Tensor | DataLoader,
    labels: Tensor | None = None,
    *,
    atol: float = FP32_ATOL,
    min_agreement: float = INT8_MIN_AGREEMENT,
    max_acc_drop: float = INT8_MAX_ACC_DROP,
) -> dict[str, Any]:
    """Compare a runner's logits with a reference (PyTorch eager) on the same inputs.

    Returns ``max_abs_diff`` (max |logits − reference logits|), ``agreement`` (fraction
    of inputs whose arg-max prediction is the same), ``accuracy``/``reference_accuracy``
    and ``accuracy_delta`` (points, runner − reference; NaN without labels), the
    ``criterion`` used and ``passed``:

    * FP32 runner: ``max_abs_diff <= atol``.
    * INT8 runner: ``agreement >= min_agreement`` and, with labels,
      ``accuracy_delta >= -max_acc_drop``.

    ``inputs`` is a tensor (with ``labels`` optional) or a loader of ``(x, y)``
    (labels taken from it).
    """
    check_type("runner", runner, Runner)
    if not callable(reference):
        raise TypeError("reference must be callable (e.g. the eager Runner or the model)")
    check_type("inputs", inputs, (Tensor, DataLoader))
    check_float("atol", atol, 0.0)
    check_float("min_agreement", min_agreement, 0.0, 1.0)
    check_float("max_acc_drop", max_acc_drop, 0.0)
    if isinstance(inputs, DataLoader):
        if labels is not None:
            raise ValueError(
                "labels must be None when inputs is a DataLoader (labels come from it)"
            )
        xs, ys = [], []
        for xb, yb in inputs:
            xs.append(xb)
            ys.append(yb)
        batches, labels = [x.float() for x in xs], torch.cat(ys)
    else:
        check_tensor("inputs", inputs, finite=True)
        batches = list(inputs.float().split(32))
        if labels is not None:
            check_tensor("labels", labels, ndim=1)
            if len(labels) != len(inputs):
                raise ValueError(
                    f"labels must have {len(inputs)} entries (one per input), got {len(labels)}"
                )
    if isinstance(reference, nn.Module):
        reference.eval()
    got, ref = _predict(runner, batches), _predict(reference, batches)
    if got.shape != ref.shape:
        raise ValueError(
            f"runner gives logits of shape {tuple(got.shape)}, reference {tuple(ref.shape)}"
        )
    pred, ref_pred = got.argmax(1), ref.argmax(1)
    result: dict[str, Any] = {
        "backend": runner.name,
        "precision": runner.precision,
        "max_abs_diff": (got - ref).abs().max().item(),
        "agreement": (pred == ref_pred).sum().item() / len(pred),
        "accuracy": float("nan"),
        "reference_accuracy": float("nan"),
        "accuracy_delta": float("nan"),
    }
    if labels is not None:
        result["accuracy"] = 100.0 * (pred == labels).sum().item() / len(labels)
        result["reference_accuracy"] = 100.0 * (ref_pred == labels).sum().item() / len(labels)
        result["accuracy_delta"] = result["accuracy"] - result["reference_accuracy"]
    if runner.precision == "int8":
        result["criterion"] = (
            f"agreement >= {min_agreement:.0%}, accuracy drop <= {max_acc_drop} points"
        )
        ok = result["agreement"] >= min_agreement
        if labels is not None:
            ok = ok and result["accuracy_delta"] >= -max_acc_drop
    else:
        result["criterion"] = f"max |logit diff| <= {atol:g}"
        ok = result["max_abs_diff"] <= atol
    result["passed"] = bool(ok)
    return result


# ----------------------------------------------------------------- an FX fusion pass
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A Conv2d equal to ``bn(conv(x))`` in eval mode (BN folding, Jacob et al. 2018, §3.2).

    With ``s = γ / sqrt(σ² + ε)`` per output channel: ``W' = W · s`` and
    ``b' = (b − μ) · s + β`` (``b = 0`` when the conv has no bias).
    """
    check_type("conv", conv, nn.Conv2d)
    check_type("bn", bn, nn.BatchNorm2d)
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn must track running statistics (track_running_stats=True) to be folded")
    fused = copy.deepcopy(conv)
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.weight = nn.Parameter(conv.weight.detach() * scale.reshape(-1, 1, 1, 1))
    fused.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias.detach())
    return fused


_NOOP_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout)


def fx_op_counts(gm: fx.GraphModule) -> dict[str, int]:
    """Counts of a traced graph's nodes: module nodes by class name, functions by name."""
    check_type("gm", gm, fx.GraphModule)
    mods = dict(gm.named_modules())
    names = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            names.append(type(mods[n.target]).__name__)
        elif n.op in ("call_function", "call_method"):
            names.append(getattr(n.target, "__name__", str(n.target)))
    return dict(Counter(names))


def _only_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def fuse_conv_bn_fx(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` with FX and fuse it for inference: what a deployment compiler does first.

    1. Conv2d → BatchNorm2d becomes one Conv2d (:func:`fold_conv_bn`) when the conv
       feeds only the BN.
    2. Conv2d → ReLU becomes ``torch.ao.nn.intrinsic.ConvReLU2d`` (one module, as
       ``torch.ao.quantization.fuse_modules`` builds).
    3. No-op modules (``Identity``, dropout in eval mode) are removed.

    The result is equal in output to ``model.eval()`` (up to float rounding) and to
    ``fuse_modules(model, model.fuse_groups())``. The model is copied and put in eval
    mode (BN folding uses the running statistics, valid for inference only).
    """
    check_module("model", model)
    net = copy.deepcopy(model).eval()
    try:
        gm = fx.symbolic_trace(net)
    except Exception as err:
        raise ValueError(
            f"model cannot be traced by torch.fx (data-dependent control flow?): {err}"
        ) from err
    mods = dict(gm.named_modules())
    intrinsic = importlib.import_module("torch.ao.nn.intrinsic")
    _fuse_pairs(  # 1. Conv + BN
        gm, mods, nn.BatchNorm2d, lambda m: isinstance(m, nn.Conv2d), fold_conv_bn
    )
    _fuse_pairs(  # 2. Conv + ReLU (a plain Conv2d only)
        gm,
        mods,
        nn.ReLU,
        lambda m: type(m) is nn.Conv2d,
        lambda conv, _relu: intrinsic.ConvReLU2d(conv, nn.ReLU()),
    )
    for node in list(gm.graph.nodes):  # 3. no-ops
        if node.op == "call_module" and isinstance(mods[node.target], _NOOP_MODULES):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def _fuse_pairs(
    gm: fx.GraphModule,
    mods: dict[str, nn.Module],
    second: type[nn.Module],
    first_matches: Callable[[nn.Module], bool],
    fuse: Callable[[nn.Module, nn.Module], nn.Module],
) -> None:
    """Fuse every module pair ``first → second`` of ``gm`` where ``first`` feeds only ``second``.

    ``fuse(first, second)`` takes the place of ``first`` and the ``second`` node is removed;
    ``mods`` (``dict(gm.named_modules())``) is kept up to date.
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(mods[node.target], second):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and _only_user(src)):
            continue
        if not first_matches(mods[src.target]):
            continue
        fused = fuse(mods[src.target], mods[node.target])
        _set_module(gm, src.target, fused)
        mods[src.target] = fused
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
