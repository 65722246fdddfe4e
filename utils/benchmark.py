"""Measuring a model: latency, throughput, size on disk, parameters, non-zeros, MACs.

This module is the course's one measurement policy; every timing of every table
and figure goes through it:

* **Threads chosen in one place.** :func:`default_threads` (``$COURSE_THREADS``,
  else half of the CPUs this process may use) is used by every measurement that
  is not given ``threads=``, and :func:`measurement_conditions` states it with
  the device, the CPU model, its detected ISA extensions and the torch version.
* **Warm-up, then repeats.** The model runs in eval mode under
  ``torch.inference_mode``; untimed warm-up runs absorb lazy initialisation,
  caches and the allocator; each timing is one block of calls long enough
  (≥ :data:`MIN_BLOCK_MS`) for the clock's resolution and the per-call jitter not
  to matter (as ``torch.utils.benchmark``'s ``blocked_autorange``), with CUDA
  synchronised.
* **Variants interleaved.** :func:`measure_latency_interleaved` and
  :func:`benchmark_models` time the variants of one comparison in turns, so that
  a drift of the machine's speed hits all of them alike.
* **Spread reported, noise guarded.** A :class:`Latency` holds the median and the
  10th/90th percentiles. A measurement whose spread ``p90/p10`` exceeds
  :data:`NOISE_MAX_SPREAD`, or whose first and second halves disagree by more
  than :data:`NOISE_MAX_DRIFT`, is re-measured up to :data:`NOISE_RETRIES` times
  and then returned with ``noisy=True``; :func:`ratio_text` refuses to state a
  ratio from it.

Numbers are returned; the caller decides how to show them.
"""

from __future__ import annotations

import io
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from utils.validation import check_float, check_int, check_module, check_tensor, check_type

THREADS_ENV = "COURSE_THREADS"
NOISE_MAX_SPREAD = 2.0  # p90 / p10 above this: too wide to compare anything
NOISE_MAX_DRIFT = 1.5  # median of one half of the timings / the other half above this: unstable
NOISE_RETRIES = 2  # re-measurements before a measurement is marked noisy
MIN_BLOCK_MS = 1.0  # each timing is a block of calls at least this long

#: The clock every timing reads (a module attribute so that tests can replace it).
clock: Callable[[], float] = time.perf_counter


# ----------------------------------------------------------------- conditions
def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_threads() -> int:
    """The number of threads every measurement uses unless given ``threads=``.

    ``$COURSE_THREADS`` when set, else half of the usable CPUs (at least 1). Half,
    because on SMT machines two logical CPUs share one core, and because a small
    machine is shared with the notebook server, the OS and often other work: on
    a 2-core machine two busy threads are *oversubscribed* — whenever another
    process takes a core, one thread waits and every parallel kernel waits for it,
    so one timing takes 0.2 ms and the next 100 ms. One thread per free core keeps
    timings stable; state the count next to every number (:func:`measurement_conditions`).
    """
    value = os.environ.get(THREADS_ENV)
    if value is None or value.strip() == "":
        return max(1, _usable_cpus() // 2)
    try:
        threads = int(value)
    except ValueError:
        raise ValueError(f"${THREADS_ENV} must be a positive integer, got {value!r}") from None
    if threads < 1:
        raise ValueError(f"${THREADS_ENV} must be a positive integer, got {value!r}")
    return threads


#: ISA extensions :func:`cpu_features` reports: ``name → /proc/cpuinfo flag``.
CPU_FLAGS = {
    "AVX2": "avx2",
    "FMA": "fma",
    "AVX-512": "avx512f",
    "AVX-512 VNNI": "avx512_vnni",
    "AVX-512 BF16": "avx512_bf16",
    "AVX-VNNI": "avx_vnni",
    "AMX-INT8": "amx_int8",
    "AMX-BF16": "amx_bf16",
    "NEON": "asimd",
}


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """``(CPU model name, set of flags)`` read from ``/proc/cpuinfo`` (empty where absent)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware") and value.strip():
                    model = value.strip()
                elif key in ("flags", "features"):
                    flags |= set(value.split())
    except OSError:
        pass
    return model, frozenset(flags)


def cpu_features() -> dict[str, bool]:
    """Which of the ISA extensions in :data:`CPU_FLAGS` this CPU has, detected at run time.

    Read from the kernel's CPU flags (``/proc/cpuinfo``); where they are not
    available, from PyTorch's own dispatch level (``torch.backends.cpu.get_cpu_capability``).
    """
    _, flags = _cpuinfo()
    if not flags:
        capability = torch.backends.cpu.get_cpu_capability()
        flags = {"avx2", "fma"} if capability.startswith("AVX") else set()
        flags |= {"avx512f"} if capability.startswith("AVX512") else set()
    return {name: flag in flags for name, flag in CPU_FLAGS.items()}


def measurement_conditions(
    device: torch.device | str | None = None, threads: int | None = None
) -> str:
    """One line that states how the numbers above it were measured.

    Threads (``threads`` or :func:`default_threads`) and usable CPUs, the device
    (CUDA device name when on a GPU), the CPU model and its detected ISA
    extensions, and the torch version; print it under every table of timings.
    """
    threads = default_threads() if threads is None else threads
    check_int("threads", threads, minimum=1)
    if device is not None:
        check_type("device", device, (torch.device, str))
    device = torch.device(device if device is not None else "cpu")
    model, _ = _cpuinfo()
    isa = ", ".join(name for name, present in cpu_features().items() if present) or "no SIMD"
    where = "CPU"
    if device.type == "cuda":
        where = f"GPU {torch.cuda.get_device_name(device)}"
    return (
        f"测量条件：{where}，{threads} 个线程（本机可用 {_usable_cpus()} 个逻辑 CPU），"
        f"CPU {model}（{isa}），torch {torch.__version__}"
    )


# ----------------------------------------------------------------- latency
@dataclass(frozen=True)
class Latency:
    """Latency of one forward pass, in milliseconds, over ``repeats`` timings.

    ``noisy`` is set when the noise guard still found the measurement unstable
    after ``attempts`` tries; a ratio computed from it is not to be trusted.
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    batch_size: int
    threads: int
    repeats: int
    noisy: bool = False
    attempts: int = 1

    @property
    def throughput(self) -> float:
        """Samples per second at this batch size: ``batch_size / median``."""
        return 1000.0 * self.batch_size / self.median_ms

    @property
    def spread(self) -> float:
        """``p90 / p10``: 1.0 for perfectly repeatable timings (``inf`` when p10 is 0)."""
        return self.p90_ms / self.p10_ms if self.p10_ms > 0 else math.inf

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "throughput": self.throughput, "spread": self.spread}


@contextmanager
def num_threads(threads: int | None):
    """Temporarily set ``torch.set_num_threads`` (``None``: :func:`default_threads`)."""
    if threads is None:
        threads = default_threads()
    check_int("threads", threads, minimum=1)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(
    fn: Callable[[], Any],
    *,
    warmup: int = 5,
    repeats: int = 20,
    device: torch.device | None = None,
    number: int = 1,
) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then return ``repeats`` timings in ms.

    Each timing is the mean time of one call over a block of ``number`` calls.
    """
    if not callable(fn):
        raise TypeError("fn must be callable")
    check_int("warmup", warmup, minimum=0)
    check_int("repeats", repeats, minimum=1)
    check_int("number", number, minimum=1)
    device = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = clock()
        for _ in range(number):
            fn()
        _sync(device)
        times.append(1000.0 * (clock() - start) / number)
    return times


def calls_per_timing(call_ms: float, min_block_ms: float = MIN_BLOCK_MS) -> int:
    """Calls per timed block so that a block lasts at least ``min_block_ms``: ``⌈min_block / call⌉``.

    At most 1000 calls; a ratio within 1e-9 of an integer is that integer (clock rounding).
    """
    check_float("call_ms", call_ms, 0.0)
    check_float("min_block_ms", min_block_ms, 0.0, min_inclusive=False)
    if call_ms == 0:
        return 1000
    return max(1, min(1000, math.ceil(min_block_ms / call_ms - 1e-9)))


def _percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-quantile of sorted values, nearest rank: ``ordered[round(q·(n-1))]``."""
    return ordered[int(round(q * (len(ordered) - 1)))]


def summarize(times_ms: Sequence[float], batch_size: int, threads: int) -> Latency:
    """Median and 10th/90th percentiles (nearest rank) of a list of timings."""
    if len(times_ms) == 0:
        raise ValueError("times_ms must not be empty")
    if min(times_ms) < 0:
        raise ValueError("times_ms must not contain negative timings")
    ordered = sorted(times_ms)
    return Latency(
        statistics.median(ordered),
        _percentile(ordered, 0.1),
        _percentile(ordered, 0.9),
        batch_size,
        threads,
        len(ordered),
    )


def instability(times_ms: Sequence[float]) -> str | None:
    """Why a list of timings (in the order taken) is unstable, or ``None`` when it is not.

    Unstable: the spread ``p90/p10`` exceeds :data:`NOISE_MAX_SPREAD` (the pattern
    of an oversubscribed machine: a p10 of 0.2 ms under a median of 100 ms), or
    the medians of the first and the second half of the timings — two
    measurements of the same thing — differ by more than :data:`NOISE_MAX_DRIFT`×.
    """
    lat = summarize(times_ms, 1, 1)
    if lat.spread > NOISE_MAX_SPREAD:
        return f"spread p90/p10 = {lat.spread:.2g} > {NOISE_MAX_SPREAD}"
    half = len(times_ms) // 2
    if half >= 2:
        first = statistics.median(times_ms[:half])
        second = statistics.median(times_ms[half:])
        drift = max(first, second) / min(first, second) if min(first, second) > 0 else math.inf
        if drift > NOISE_MAX_DRIFT:
            return f"two halves disagree {drift:.2g}× > {NOISE_MAX_DRIFT}"
    return None


def _eval(model: Any) -> None:
    if isinstance(model, nn.Module):
        try:
            model.eval()
        except NotImplementedError:  # torch.export'ed graphs (pt2e) have no train/eval switch
            pass


def measure_latency(
    model: nn.Module | Callable[[Tensor], Any],
    example: Tensor,
    *,
    warmup: int = 5,
    repeats: int = 20,
    threads: int | None = None,
) -> Latency:
    """Latency of ``model(example)`` under the course's measurement policy (see the module doc).

    ``model`` may be a module (put in eval mode) or any callable taking the tensor
    (an ONNX Runtime session wrapper, a compiled function, …). ``threads``
    (default :func:`default_threads`) sets ``torch.set_num_threads`` for the
    measurement only. An unstable measurement (:func:`instability`) is repeated
    up to :data:`NOISE_RETRIES` times; if none is stable, the one with the smallest
    spread is returned with ``noisy=True``.
    """
    check_tensor("example", example)
    if not callable(model):
        raise TypeError("model must be an nn.Module or a callable")
    check_int("warmup", warmup, minimum=0)
    check_int("repeats", repeats, minimum=1)
    _eval(model)
    return measure_latency_interleaved(
        {"model": model}, example, rounds=1, repeats=repeats, warmup=warmup, threads=threads
    )["model"]


def measure_latency_interleaved(
    models: dict[str, Callable[[Tensor], Any]],
    example: Tensor,
    *,
    rounds: int = 10,
    repeats: int = 5,
    warmup: int = 5,
    threads: int | None = None,
) -> dict[str, Latency]:
    """Latency of several variants measured in turns, so machine drift hits them all alike.

    On a shared or thermally throttled machine the speed of the CPU drifts over
    seconds; timing variant A fully, then variant B, folds that drift into the
    comparison. Here each variant is warmed up (``warmup`` calls, which also size
    its timed blocks, :func:`calls_per_timing`), then every round takes
    ``repeats`` timings of each variant in the order of ``models``; each
    variant's statistics are over its ``rounds × repeats`` timings. When any
    variant is unstable (:func:`instability`) all are re-measured together, up to
    :data:`NOISE_RETRIES` times; a variant never stable is marked ``noisy``.
    Runs under ``torch.inference_mode`` with ``threads`` (default
    :func:`default_threads`).
    """
    check_type("models", models, dict)
    if not models or not all(callable(m) for m in models.values()):
        raise ValueError("models must be a non-empty dict of callables")
    check_tensor("example", example)
    check_int("rounds", rounds, minimum=1)
    check_int("repeats", repeats, minimum=1)
    check_int("warmup", warmup, minimum=0)
    for m in models.values():
        _eval(m)
    device = example.device
    best: dict[str, Latency] = {}
    with num_threads(threads) as used, torch.inference_mode():
        number = {}
        for name, m in models.items():
            warm = time_callable(
                lambda m=m: m(example), warmup=0, repeats=max(1, warmup), device=device
            )
            number[name] = calls_per_timing(statistics.median(warm))
        for attempt in range(1, NOISE_RETRIES + 2):
            times: dict[str, list[float]] = {name: [] for name in models}
            for _ in range(rounds):
                for name, m in models.items():
                    times[name] += time_callable(
                        lambda m=m: m(example),
                        warmup=0,
                        repeats=repeats,
                        device=device,
                        number=number[name],
                    )
            for name, t in times.items():
                lat = summarize(t, example.shape[0], used)
                lat = replace(lat, noisy=instability(t) is not None, attempts=attempt)
                old = best.get(name)
                if old is None or (old.noisy and (not lat.noisy or lat.spread < old.spread)):
                    best[name] = lat
            if not any(lat.noisy for lat in best.values()):
                break
    return {name: replace(lat, attempts=attempt) for name, lat in best.items()}


def speedup(base: Latency, other: Latency) -> float:
    """How many times faster ``other`` is than ``base``: ``base.median / other.median``."""
    check_type("base", base, Latency)
    check_type("other", other, Latency)
    if other.median_ms <= 0:
        raise ValueError("other.median_ms must be > 0")
    return base.median_ms / other.median_ms


def format_ratio(ratio: float) -> str:
    """``31×``, ``2.7×``, ``0.63×``: two significant digits below 10, none above."""
    check_float("ratio", ratio, 0.0, min_inclusive=False)
    if ratio >= 10:
        return f"{ratio:.0f}×"
    if ratio >= 1:
        return f"{ratio:.1f}×"
    return f"{ratio:.2f}×"


def ratio_text(base: Latency, other: Latency) -> str:
    """The speed-up of ``other`` over ``base`` as words for generated prose.

    ``"2.7×"``; ``"≈1×（差异在噪声内）"`` when the p10–p90 intervals overlap (the
    difference is within the noise); the ratio followed by ``"(noisy)"`` when
    either measurement is noisy, so no sentence states it as a fact.
    """
    ratio = speedup(base, other)
    if base.noisy or other.noisy:
        return f"{format_ratio(ratio)} (noisy)"
    if base.p10_ms <= other.p90_ms and other.p10_ms <= base.p90_ms:
        return "≈1×（差异在噪声内）"
    return format_ratio(ratio)


# ----------------------------------------------------------------- size and counts
def state_dict_bytes(model: nn.Module) -> int:
    """Size of the model on disk: bytes of ``torch.save(model.state_dict())``."""
    check_module("model", model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (trainable or not); quantized weights count too."""
    check_module("model", model)
    total = sum(p.numel() for p in model.parameters())
    return total + sum(t.numel() for t in _packed_weights(model))


def _effective_weights(model: nn.Module) -> list[Tensor]:
    """Every parameter as the forward pass sees it: masked weights, not the originals behind masks.

    ``torch.nn.utils.parametrize`` (``utils.pruning``'s masks) stores the original
    as ``parametrizations.<name>.original`` and computes ``<name>``;
    ``torch.nn.utils.prune`` stores ``<name>_orig`` and a ``<name>_mask`` buffer.
    For both, the effective ``<name>`` is read from the module instead.
    """
    out = []
    for mod in model.modules():
        if isinstance(mod, torch.nn.utils.parametrize.ParametrizationList):
            continue  # its ``original`` is reached through the owning module below
        params = dict(mod.named_parameters(recurse=False))
        for name in getattr(mod, "parametrizations", {}):
            out.append(getattr(mod, name).detach())
        for name, p in params.items():
            if name.endswith("_orig") and hasattr(mod, name[: -len("_orig")] + "_mask"):
                out.append(getattr(mod, name[: -len("_orig")]).detach())
            else:
                out.append(p.detach())
    return out


def count_nonzero(model: nn.Module) -> int:
    """Number of non-zero parameter elements, counted on the effective (masked) weights.

    A pruning mask's zeros do not count, whether the mask is ``utils.pruning``'s
    parametrisation or ``torch.nn.utils.prune``'s ``weight_mask``; quantized
    weights count by their integer values.
    """
    check_module("model", model)
    total = sum(int(t.ne(0).sum()) for t in _effective_weights(model))
    total += sum(
        int((t.int_repr() if t.is_quantized else t).ne(0).sum()) for t in _packed_weights(model)
    )
    return total


def _is_quantized_module(mod: nn.Module) -> bool:
    return ".quantized" in type(mod).__module__


def _packed_weights(model: nn.Module) -> list[Tensor]:
    """Weights and biases of quantized modules, which are packed, not ``nn.Parameter``s."""
    out = []
    for mod in model.modules():
        if not _is_quantized_module(mod):
            continue
        for attr in ("weight", "bias"):
            fn = getattr(mod, attr, None)
            if callable(fn) and not isinstance(fn, nn.Module):
                try:
                    t = fn()
                except Exception:
                    continue
                if isinstance(t, Tensor):
                    out.append(t)
    return out


def _is_conv(mod: nn.Module) -> bool:
    """Any convolution, 1-3D, plain or transposed, float or quantized."""
    return isinstance(mod, nn.modules.conv._ConvNd) or (
        _is_quantized_module(mod) and hasattr(mod, "kernel_size")
    )


def _is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or (_is_quantized_module(mod) and hasattr(mod, "in_features"))


#: Layers with weights whose MACs the hooks cannot count: refused rather than counted as 0.
UNCOUNTED_LAYERS = (nn.RNNBase, nn.MultiheadAttention, nn.Bilinear)


def _layer_macs(mod: nn.Module, inp: Tensor, out: Tensor) -> int:
    """MACs of one layer: ``out × C_in/groups × Πk`` (conv), ``in × C_out/groups × Πk`` (transposed)."""
    if _is_conv(mod):
        kernel = math.prod(mod.kernel_size)
        if "Transpose" in type(mod).__name__:
            return int(inp.numel() * kernel * (mod.out_channels // mod.groups))
        return int(out.numel() * kernel * (mod.in_channels // mod.groups))
    if _is_linear(mod):
        return int(out.numel() * mod.in_features)
    return 0


def count_macs(model: nn.Module, example: Tensor) -> int:
    """Multiply-accumulates of one forward pass of ``example`` through its convolutions and linear layers.

    A convolution (1-3D) costs ``out_elements × (Πk · C_in/groups)`` MACs, a
    transposed convolution ``in_elements × (Πk · C_out/groups)``, a linear layer
    ``out_elements × in_features``; FLOPs ≈ 2 × MACs (as
    ``torch.utils.flop_counter.FlopCounterMode`` counts them). Other layers (BN,
    ReLU, pooling) are cheap in comparison and not counted, as in most papers.
    Layers with weights it cannot count (RNNs, ``nn.MultiheadAttention``,
    ``nn.Bilinear``) raise ``ValueError`` instead of being counted as 0.
    """
    return int(layer_table(model, example)["macs"].sum())


def _forward_with_hooks(model: nn.Module, example: Tensor, hooks: list) -> None:
    """One eval-mode forward pass that fires ``hooks``; the hooks are removed and the mode restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


def layer_table(model: nn.Module, example: Tensor):
    """Per-layer MACs, parameters and bytes moved (FP32) for convolution/linear leaves, as a DataFrame.

    Columns: ``layer, type, out_shape, macs, params, weight_bytes, act_bytes,
    intensity`` where ``act_bytes`` counts the input read and the output written
    and ``intensity = 2·macs / (weight_bytes + act_bytes)`` (FLOPs per byte, the
    roofline's x axis).
    """
    import pandas as pd

    check_module("model", model)
    check_tensor("example", example)
    for name, mod in model.named_modules():
        if isinstance(mod, UNCOUNTED_LAYERS):
            raise ValueError(
                f"model contains {type(mod).__name__} at {name!r}, whose MACs cannot be counted "
                "by layer hooks; only convolution and linear layers are counted"
            )
    rows: list[dict[str, Any]] = []
    hooks = []
    for name, mod in model.named_modules():
        if _is_conv(mod) or _is_linear(mod):

            def hook(m: nn.Module, inputs: tuple, out: Tensor, name: str = name) -> None:
                x = inputs[0]
                n_w = sum(p.numel() for p in m.parameters(recurse=False))
                n_w += sum(t.numel() for t in _packed_weights(m) if _is_quantized_module(m))
                w_bytes = n_w * 4
                a_bytes = (x.numel() + out.numel()) * 4
                macs = _layer_macs(m, x, out)
                rows.append(
                    {
                        "layer": name,
                        "type": type(m).__name__,
                        "out_shape": tuple(out.shape),
                        "macs": macs,
                        "params": w_bytes // 4,
                        "weight_bytes": w_bytes,
                        "act_bytes": a_bytes,
                        "intensity": 2 * macs / (w_bytes + a_bytes),
                    }
                )

            hooks.append(mod.register_forward_hook(hook))
    _forward_with_hooks(model, example, hooks)
    return pd.DataFrame(
        rows,
        columns=[
            "layer",
            "type",
            "out_shape",
            "macs",
            "params",
            "weight_bytes",
            "act_bytes",
            "intensity",
        ],
    )


# ----------------------------------------------------------------- tables
class _CallableModule(nn.Module):
    """Wraps a plain callable so that ``utils.training.evaluate`` can run it."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def _device_of(models: dict[str, Any]) -> torch.device:
    for m in models.values():
        if isinstance(m, nn.Module):
            for p in m.parameters():
                return p.device
    return torch.device("cpu")


def _static_columns(name: str, model: Any, input_shape: Sequence[int], macs: bool, device) -> dict:
    """Size, parameters, non-zeros and MACs of one variant (NaN for a plain callable)."""
    if not isinstance(model, nn.Module):
        row = dict.fromkeys(("size_kb", "params", "nonzero"), float("nan"))
        return {**row, "macs": float("nan")} if macs else row
    row: dict[str, float] = {
        "size_kb": state_dict_bytes(model) / 1024,
        "params": count_parameters(model),
        "nonzero": count_nonzero(model),
    }
    if macs:
        try:
            row["macs"] = count_macs(model, torch.zeros(1, *input_shape, device=device))
        except Exception as err:  # e.g. a quantized model that expects other inputs
            warnings.warn(f"MACs of {name!r} not counted: {err}", stacklevel=3)
            row["macs"] = float("nan")
    return row


def benchmark_models(
    models: dict[str, nn.Module | Callable[[Tensor], Any]],
    input_shape: Sequence[int],
    *,
    loader: DataLoader | None = None,
    batch_sizes: Sequence[int] = (1, 32),
    threads: int | None = None,
    macs: bool = True,
    baseline: str | None = None,
    rounds: int = 10,
    repeats: int = 5,
    warmup: int = 5,
):
    """A comparison table of variants under one measurement policy, as a DataFrame (index = name).

    Columns: ``size_kb, params, nonzero, macs`` (NaN for a plain callable), then for
    each batch size ``n``: ``latency_b{n}_ms`` (median), ``p10_b{n}_ms``,
    ``p90_b{n}_ms``, ``speedup_b{n}`` (``baseline``'s median / this median;
    ``baseline`` defaults to the first variant) and ``noisy_b{n}``; ``accuracy`` (%)
    when a ``loader`` is given; ``threads``. All variants of one batch size are
    timed interleaved (:func:`measure_latency_interleaved`) on random inputs of
    shape ``(n, *input_shape)``.
    """
    import pandas as pd

    from utils.training import evaluate

    check_type("models", models, dict)
    if not models or not all(callable(m) for m in models.values()):
        raise ValueError("models must be a non-empty dict of nn.Modules or callables")
    check_type("input_shape", input_shape, (tuple, list, torch.Size))
    check_type("batch_sizes", batch_sizes, (tuple, list))
    if not batch_sizes:
        raise ValueError("batch_sizes must not be empty")
    for n in batch_sizes:
        check_int("batch size", n, minimum=1)
    if loader is not None:
        check_type("loader", loader, DataLoader)
    baseline = next(iter(models)) if baseline is None else baseline
    if baseline not in models:
        raise ValueError(f"baseline must be one of {list(models)}, got {baseline!r}")
    device = _device_of(models)
    rows = {name: _static_columns(name, m, input_shape, macs, device) for name, m in models.items()}
    for n in batch_sizes:
        x = torch.randn(n, *input_shape, device=device)
        lats = measure_latency_interleaved(
            models, x, rounds=rounds, repeats=repeats, warmup=warmup, threads=threads
        )
        for name, lat in lats.items():
            rows[name][f"latency_b{n}_ms"] = lat.median_ms
            rows[name][f"p10_b{n}_ms"] = lat.p10_ms
            rows[name][f"p90_b{n}_ms"] = lat.p90_ms
            rows[name][f"speedup_b{n}"] = speedup(lats[baseline], lat)
            rows[name][f"noisy_b{n}"] = lat.noisy
            rows[name]["threads"] = lat.threads
    if loader is not None:
        for name, m in models.items():
            module = m if isinstance(m, nn.Module) else _CallableModule(m)
            rows[name]["accuracy"] = evaluate(module, loader, device)["accuracy"]
    df = pd.DataFrame.from_dict(rows, orient="index")
    threads_col = df.pop("threads")
    df["threads"] = threads_col
    return df


def latency_of(table, name: str, batch_size: int) -> Latency:
    """Row ``name`` of a :func:`benchmark_models` table at ``batch_size`` as a :class:`Latency`.

    Lessons feed it to :func:`ratio_text` so that a sentence about a table's speed-up
    uses the same median, spread and noise flag as the table itself.
    """
    check_type("name", name, str)
    check_int("batch_size", batch_size, minimum=1)
    if name not in table.index:
        raise ValueError(
            f"name must be a row of the table, one of {list(table.index)}, got {name!r}"
        )
    column = f"latency_b{batch_size}_ms"
    if column not in table.columns:
        sizes = [
            c[len("latency_b") : -len("_ms")] for c in table.columns if c.startswith("latency_b")
        ]
        raise ValueError(
            f"batch_size must be one the table was timed at ({sizes}), got {batch_size}"
        )
    row = table.loc[name]
    return Latency(
        float(row[column]),
        float(row[f"p10_b{batch_size}_ms"]),
        float(row[f"p90_b{batch_size}_ms"]),
        batch_size,
        int(row["threads"]),
        1,
        noisy=bool(row[f"noisy_b{batch_size}"]),
    )


def benchmark_model(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    loader: DataLoader | None = None,
    batch_sizes: Sequence[int] = (1, 32),
    repeats: int = 20,
    warmup: int = 5,
    threads: int | None = None,
    macs: bool = True,
) -> dict[str, float]:
    """One row of a comparison table for one model, under the same policy as :func:`benchmark_models`.

    Keys: ``size_kb, params, nonzero, macs``, per batch size ``n``
    ``latency_b{n}_ms, p10_b{n}_ms, p90_b{n}_ms, noisy_b{n}``, ``accuracy`` (%)
    when a ``loader`` is given, and ``threads``. To compare variants, time them
    together with :func:`benchmark_models` (interleaved) instead of calling this twice.
    """
    check_module("model", model)
    check_int("repeats", repeats, minimum=1)
    df = benchmark_models(
        {"model": model},
        input_shape,
        loader=loader,
        batch_sizes=batch_sizes,
        threads=threads,
        macs=macs,
        rounds=1,
        repeats=repeats,
        warmup=warmup,
    )
    row = df.loc["model"].to_dict()
    return {k: v for k, v in row.items() if not k.startswith("speedup_")}


def layer_latency(
    model: nn.Module,
    example: Tensor,
    *,
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
) -> dict[str, float]:
    """Median latency (ms) of every convolution/linear layer, each timed alone on the input it sees.

    The inputs are captured with forward hooks during one pass of ``example``; then
    each layer is timed in isolation with ``threads`` (default
    :func:`default_threads`, the same as :func:`utils.roofline.measure_peak`). The
    sum is a little less than the model's latency: the gap is the cheap layers
    (BN, ReLU, pooling) and framework overhead.
    """
    check_module("model", model)
    check_tensor("example", example)
    inputs: dict[str, Tensor] = {}
    mods = {n: m for n, m in model.named_modules() if _is_conv(m) or _is_linear(m)}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: inputs.__setitem__(n, i[0].detach()))
        for n, m in mods.items()
    ]
    _forward_with_hooks(model, example, hooks)
    if not mods:
        return {}
    lats = measure_latency_interleaved(
        {name: (lambda _x, m=m, x=inputs[name]: m(x)) for name, m in mods.items()},
        example,
        rounds=repeats,
        repeats=1,
        warmup=warmup,
        threads=threads,
    )
    return {name: lat.median_ms for name, lat in lats.items()}
