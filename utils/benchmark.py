"""Measuring a model: latency, throughput, size on disk, parameters, non-zeros, MACs.

Latency is measured the way the course teaches it: the model in eval mode under
``torch.inference_mode``, a few untimed warm-up runs (lazy initialisation, caches,
allocator), then ``repeats`` timed runs with ``time.perf_counter`` (CUDA
synchronised), reported as the median and the 10th/90th percentiles, together
with the batch size and the number of threads used. Numbers are returned, the
caller decides how to show them.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from utils.validation import check_int, check_module, check_tensor, check_type


@dataclass(frozen=True)
class Latency:
    """Latency of one forward pass, in milliseconds, over ``repeats`` timed runs."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    batch_size: int
    threads: int
    repeats: int

    @property
    def throughput(self) -> float:
        """Samples per second at this batch size: ``batch_size / median``."""
        return 1000.0 * self.batch_size / self.median_ms

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "throughput": self.throughput}


@contextmanager
def num_threads(threads: int | None):
    """Temporarily set ``torch.set_num_threads`` (``None`` leaves it unchanged)."""
    old = torch.get_num_threads()
    if threads is not None:
        check_int("threads", threads, minimum=1)
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(
    fn: Callable[[], Any], *, warmup: int = 5, repeats: int = 20, device: torch.device | None = None
) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then return ``repeats`` wall times in ms."""
    if not callable(fn):
        raise TypeError("fn must be callable")
    check_int("warmup", warmup, minimum=0)
    check_int("repeats", repeats, minimum=1)
    device = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(1000.0 * (time.perf_counter() - start))
    return times


def summarize(times_ms: Sequence[float], batch_size: int, threads: int) -> Latency:
    """Median and 10th/90th percentiles of a list of timings."""
    if len(times_ms) == 0:
        raise ValueError("times_ms must not be empty")
    ordered = sorted(times_ms)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return Latency(
        statistics.median(ordered), pct(0.1), pct(0.9), batch_size, threads, len(ordered)
    )


def measure_latency(
    model: nn.Module | Callable[[Tensor], Any],
    example: Tensor,
    *,
    warmup: int = 5,
    repeats: int = 20,
    threads: int | None = None,
) -> Latency:
    """Latency of ``model(example)``: warm-up, then the median of ``repeats`` timed runs.

    ``model`` may be a module (put in eval mode) or any callable taking the tensor
    (an ONNX Runtime session wrapper, a compiled function, …). ``threads`` sets
    ``torch.set_num_threads`` for the measurement only.
    """
    check_tensor("example", example)
    if not callable(model):
        raise TypeError("model must be an nn.Module or a callable")
    if isinstance(model, nn.Module):
        try:
            model.eval()
        except NotImplementedError:  # torch.export'ed graphs (pt2e) have no train/eval switch
            pass
    device = example.device
    with num_threads(threads) as used, torch.inference_mode():
        times = time_callable(lambda: model(example), warmup=warmup, repeats=repeats, device=device)
    return summarize(times, example.shape[0], used)


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


def count_nonzero(model: nn.Module) -> int:
    """Number of non-zero parameter elements (a pruned mask's zeros do not count)."""
    check_module("model", model)
    total = 0
    for name, p in model.named_parameters():
        if name.endswith("_orig"):  # torch.nn.utils.prune: count the masked weight instead
            continue
        total += int((p != 0).sum())
    for mod in model.modules():
        for bname, _buf in mod.named_buffers(recurse=False):
            if bname.endswith("_mask"):
                total += int((getattr(mod, bname[: -len("_mask")]) != 0).sum())
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
    return isinstance(mod, nn.Conv2d) or (_is_quantized_module(mod) and hasattr(mod, "kernel_size"))


def _is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or (_is_quantized_module(mod) and hasattr(mod, "in_features"))


def _layer_macs(mod: nn.Module, inp: Tensor, out: Tensor) -> int:
    if _is_conv(mod):
        k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
        return int(out.numel() * k)
    if _is_linear(mod):
        return int(out.numel() * mod.in_features)
    return 0


def count_macs(model: nn.Module, example: Tensor) -> int:
    """Multiply-accumulates of one forward pass of ``example`` through Conv2d and Linear layers.

    A convolution costs ``out_elements × (k_h·k_w·C_in/groups)`` MACs, a linear layer
    ``out_elements × in_features``; FLOPs ≈ 2 × MACs. Other layers (BN, ReLU,
    pooling) are cheap in comparison and not counted, as in most papers.
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
    """Per-layer MACs, parameters and bytes moved (FP32) for Conv2d/Linear leaves, as a DataFrame.

    Columns: ``layer, type, out_shape, macs, params, weight_bytes, act_bytes,
    intensity`` where ``act_bytes`` counts the input read and the output written
    and ``intensity = 2·macs / (weight_bytes + act_bytes)`` (FLOPs per byte, the
    roofline's x axis).
    """
    import pandas as pd

    check_module("model", model)
    check_tensor("example", example)
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
    """One row of a comparison table: size, parameters, non-zeros, MACs, latency per batch size, accuracy.

    Args:
        input_shape: shape of one sample, e.g. ``(1, 28, 28)``.
        loader: when given, test accuracy (%) on it is added.
        batch_sizes: a latency column ``latency_b{n}_ms`` for each.
    """
    from utils.training import evaluate

    check_module("model", model)
    check_type("input_shape", input_shape, (tuple, list, torch.Size))
    device = next(model.parameters(), torch.empty(0)).device
    row: dict[str, float] = {
        "size_kb": state_dict_bytes(model) / 1024,
        "params": count_parameters(model),
        "nonzero": count_nonzero(model),
    }
    if macs:
        try:
            row["macs"] = count_macs(model, torch.zeros(1, *input_shape, device=device))
        except Exception:  # e.g. a quantized model expecting other inputs
            row["macs"] = float("nan")
    for n in batch_sizes:
        check_int("batch size", n, minimum=1)
        x = torch.randn(n, *input_shape, device=device)
        lat = measure_latency(model, x, warmup=warmup, repeats=repeats, threads=threads)
        row[f"latency_b{n}_ms"] = lat.median_ms
        row["threads"] = lat.threads
    if loader is not None:
        row["accuracy"] = evaluate(model, loader)["accuracy"]
    return row


def layer_latency(
    model: nn.Module, example: Tensor, *, warmup: int = 3, repeats: int = 10
) -> dict[str, float]:
    """Median latency (ms) of every Conv2d/Linear layer, each timed alone on the input it sees.

    The inputs are captured with forward hooks during one pass of ``example``; then
    each layer is timed in isolation. The sum is a little less than the model's
    latency: the gap is the cheap layers (BN, ReLU, pooling) and framework overhead.
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
    out = {}
    with torch.inference_mode():
        for name, m in mods.items():
            times = time_callable(
                lambda m=m, x=inputs[name]: m(x),
                warmup=warmup,
                repeats=repeats,
                device=example.device,
            )
            out[name] = statistics.median(times)
    return out


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
    comparison. Here every round runs each variant ``repeats`` times, and each
    variant's median is taken over all its ``rounds × repeats`` timings. Runs under
    ``torch.inference_mode`` (wrap a callable in ``torch.inference_mode(False)`` to
    time it with autograd on).
    """
    check_type("models", models, dict)
    if not models or not all(callable(m) for m in models.values()):
        raise ValueError("models must be a non-empty dict of callables")
    check_tensor("example", example)
    check_int("rounds", rounds, minimum=1)
    check_int("repeats", repeats, minimum=1)
    for m in models.values():
        if isinstance(m, nn.Module):
            m.eval()
    times: dict[str, list[float]] = {name: [] for name in models}
    with num_threads(threads) as used, torch.inference_mode():
        for m in models.values():
            time_callable(lambda m=m: m(example), warmup=warmup, repeats=1, device=example.device)
        for _ in range(rounds):
            for name, m in models.items():
                times[name] += time_callable(
                    lambda m=m: m(example), warmup=0, repeats=repeats, device=example.device
                )
    return {name: summarize(t, example.shape[0], used) for name, t in times.items()}
