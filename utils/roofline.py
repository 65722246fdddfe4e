"""The roofline model (Williams, Waterman & Patterson, CACM 2009) of the machine we run on.

Attainable performance of a kernel with arithmetic intensity ``I`` (FLOPs per byte
moved to and from memory) is::

    P(I) = min(P_peak, I × B)

where ``P_peak`` is the peak compute (FLOP/s) and ``B`` the memory bandwidth
(bytes/s). Kernels left of the ridge point ``P_peak / B`` are memory-bound, those
right of it compute-bound. Both peaks are *measured* here, best of ``repeats``
(a peak is the best the machine does, not its typical speed), with the threads
of the course's measurement policy (:func:`utils.benchmark.default_threads`), the
same threads as the layers plotted under them: a large FP32 matrix
multiplication for ``P_peak``, a copy larger than the caches for the DRAM
bandwidth and copies that stay in cache for the cache roof.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch

from utils.benchmark import calls_per_timing, num_threads, time_callable
from utils.validation import check_float, check_int, check_type

#: Working sets (KiB per tensor) of the copies that measure the cache roof; the best counts.
CACHE_COPY_KIB = (64, 256, 1024)
#: Each timed block of a copy lasts at least this long, so that call overhead does not count.
COPY_BLOCK_MS = 5.0


@dataclass(frozen=True)
class MachinePeak:
    """Measured peak compute (GFLOP/s), memory bandwidth (GB/s) and the threads used."""

    gflops: float
    bandwidth_gbs: float
    threads: int
    cache_bandwidth_gbs: float | None = None

    @property
    def ridge_point(self) -> float:
        """Arithmetic intensity (FLOP/byte) where the memory roof meets the compute roof."""
        return self.gflops / self.bandwidth_gbs


def copy_bandwidth_gbs(numel: int, repeats: int = 10) -> float:
    """Best-of-``repeats`` bandwidth (GB/s) of ``dst.copy_(src)`` for FP32 tensors of ``numel``.

    A copy reads and writes every byte once: ``2 × 4 × numel`` bytes per call. Each
    timing is a block of calls lasting at least :data:`COPY_BLOCK_MS`.
    """
    check_int("numel", numel, minimum=1)
    check_int("repeats", repeats, minimum=1)
    src = torch.rand(numel)
    dst = torch.empty_like(src)
    warm = time_callable(lambda: dst.copy_(src), warmup=2, repeats=3)
    number = calls_per_timing(min(warm), COPY_BLOCK_MS)
    best_ms = min(time_callable(lambda: dst.copy_(src), warmup=0, repeats=repeats, number=number))
    return 2 * 4 * numel / (best_ms / 1000) / 1e9


def measure_peak(
    matmul_size: int = 1024, copy_mb: int = 256, repeats: int = 10, threads: int | None = None
) -> MachinePeak:
    """Measure FP32 peak compute with an ``n×n`` matmul (``2n³`` FLOPs) and bandwidth with copies.

    The copy of ``copy_mb`` MiB must be larger than the last-level cache to measure
    DRAM. Copies of :data:`CACHE_COPY_KIB` KiB stay in the CPU caches; the best of
    them is the cache roof (small models whose weights fit in cache run above the
    DRAM roof). Every figure is the best of ``repeats`` timings after warm-up, with
    ``threads`` (default :func:`utils.benchmark.default_threads`).
    """
    check_int("matmul_size", matmul_size, minimum=16)
    check_int("copy_mb", copy_mb, minimum=1)
    check_int("repeats", repeats, minimum=1)
    a = torch.randn(matmul_size, matmul_size)
    b = torch.randn(matmul_size, matmul_size)
    with num_threads(threads) as used:
        mm = min(time_callable(lambda: a @ b, warmup=2, repeats=repeats))
        bandwidth = copy_bandwidth_gbs(copy_mb * 2**20 // 4, repeats)
        cache_bw = max(copy_bandwidth_gbs(kib * 1024 // 4, repeats) for kib in CACHE_COPY_KIB)
    gflops = 2 * matmul_size**3 / (mm / 1000) / 1e9
    return MachinePeak(gflops, bandwidth, used, cache_bw)


def roof_gflops(peak: MachinePeak, intensity: float) -> float:
    """The highest roof at ``intensity``: ``min(compute, intensity × max(DRAM, cache) bandwidth)``."""
    check_type("peak", peak, MachinePeak)
    check_float("intensity", intensity, 0.0)
    bandwidth = max(peak.bandwidth_gbs, peak.cache_bandwidth_gbs or 0.0)
    return min(peak.gflops, intensity * bandwidth)


def points_above_roof(
    peak: MachinePeak, points: dict[str, tuple[float, float]], margin: float = 0.1
) -> dict[str, float]:
    """The points that exceed the highest roof by more than ``margin``: ``{label: achieved / roof}``.

    A measured point above every roof means a measurement went wrong (peaks
    measured with other threads than the layers, a MAC count too high, a timing
    too short); a lesson asserts that this returns ``{}``.
    """
    check_type("points", points, dict)
    check_float("margin", margin, 0.0)
    out = {}
    for label, (intensity, achieved) in points.items():
        roof = roof_gflops(peak, intensity)
        if achieved > roof * (1 + margin):
            out[label] = achieved / roof if roof > 0 else float("inf")
    return out


def attainable_gflops(peak: MachinePeak, intensity: float) -> float:
    """``min(peak compute, intensity × bandwidth)`` in GFLOP/s."""
    check_type("peak", peak, MachinePeak)
    check_float("intensity", intensity, 0.0)
    return min(peak.gflops, intensity * peak.bandwidth_gbs)


def plot_roofline(peak: MachinePeak, points: dict[str, tuple[float, float]] | None = None):
    """Draw the roofline and optional ``{label: (intensity, achieved GFLOP/s)}`` points; return the figure.

    With a measured cache bandwidth, a dashed second roof shows the limit for
    working sets that stay in cache.
    """
    check_type("peak", peak, MachinePeak)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = np.logspace(-2, 3, 200)
    ax.loglog(
        xs, [attainable_gflops(peak, x) for x in xs], color="black", lw=2, label="roofline (DRAM)"
    )
    if peak.cache_bandwidth_gbs:
        cache_roof = [min(peak.gflops, x * peak.cache_bandwidth_gbs) for x in xs]
        ax.loglog(
            xs,
            cache_roof,
            color="black",
            lw=1,
            ls="--",
            label=f"roofline (cache, {peak.cache_bandwidth_gbs:.3g} GB/s)",
        )
    ax.axvline(peak.ridge_point, color="gray", ls=":", lw=1)
    ax.text(
        peak.ridge_point * 1.1,
        peak.gflops * 0.05,
        f"ridge {peak.ridge_point:.1f} FLOP/B",
        color="gray",
    )
    for label, (x, y) in (points or {}).items():
        ax.scatter([x], [y], s=40, zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("performance (GFLOP/s)")
    ax.set_title(
        f"Roofline: {peak.gflops:.3g} GFLOP/s peak, {peak.bandwidth_gbs:.3g} GB/s, {peak.threads} thread{'s' if peak.threads != 1 else ''}"
    )
    ax.legend(loc="lower right", fontsize=8)
    return fig
