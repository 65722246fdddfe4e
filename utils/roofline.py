"""The roofline model (Williams, Waterman & Patterson, CACM 2009) of the machine we run on.

Attainable performance of a kernel with arithmetic intensity ``I`` (FLOPs per byte
moved to and from memory) is::

    P(I) = min(P_peak, I × B)

where ``P_peak`` is the peak compute (FLOP/s) and ``B`` the memory bandwidth
(bytes/s). Kernels left of the ridge point ``P_peak / B`` are memory-bound, those
right of it compute-bound. Both peaks are *measured* here: a large FP32 matrix
multiplication for ``P_peak`` and a large tensor copy for ``B``.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch

from utils.benchmark import num_threads, time_callable
from utils.validation import check_float, check_int, check_type


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


def measure_peak(
    matmul_size: int = 1024, copy_mb: int = 256, repeats: int = 10, threads: int | None = None
) -> MachinePeak:
    """Measure FP32 peak compute with an ``n×n`` matmul (``2n³`` FLOPs) and bandwidth with a copy.

    The copy of ``copy_mb`` MiB reads and writes every byte once, so it moves
    ``2 × copy_mb`` MiB; it must be larger than the last-level cache to measure DRAM.
    A second copy of 256 KiB, which stays in the CPU caches, measures the cache
    bandwidth: small models whose weights fit in cache can run above the DRAM roof.
    Medians over ``repeats`` runs after warm-up.
    """
    check_int("matmul_size", matmul_size, minimum=16)
    check_int("copy_mb", copy_mb, minimum=1)
    check_int("repeats", repeats, minimum=1)
    a = torch.randn(matmul_size, matmul_size)
    b = torch.randn(matmul_size, matmul_size)
    src = torch.empty(copy_mb * 2**20 // 4)
    dst = torch.empty_like(src)
    small_src = torch.empty(2**16)
    small_dst = torch.empty_like(small_src)
    with num_threads(threads) as used:
        mm = float(np.median(time_callable(lambda: a @ b, warmup=2, repeats=repeats)))
        cp = float(np.median(time_callable(lambda: dst.copy_(src), warmup=2, repeats=repeats)))
        small = float(
            np.median(
                time_callable(lambda: small_dst.copy_(small_src), warmup=10, repeats=10 * repeats)
            )
        )
    gflops = 2 * matmul_size**3 / (mm / 1000) / 1e9
    bandwidth = 2 * src.numel() * 4 / (cp / 1000) / 1e9
    cache_bw = 2 * small_src.numel() * 4 / (small / 1000) / 1e9
    return MachinePeak(gflops, bandwidth, used, cache_bw)


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
        ax.loglog(xs, cache_roof, color="black", lw=1, ls="--", label="roofline (cache)")
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
        f"Roofline: {peak.gflops:.0f} GFLOP/s peak, {peak.bandwidth_gbs:.1f} GB/s, {peak.threads} threads"
    )
    ax.legend(loc="lower right", fontsize=8)
    return fig
