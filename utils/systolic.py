"""A weight-stationary systolic array, cycle by cycle: the TPU's matrix unit (Jouppi et al. 2017).

The TPU's matrix multiply unit is a 256×256 grid of multiply-accumulate cells
(processing elements, PEs). In the *weight-stationary* dataflow each PE holds one
weight ``B[k, n]``; activations ``A[m, k]`` enter row ``k`` from the left, skewed by
one cycle per row, and move one PE to the right per cycle; partial sums move one
PE down per cycle. PE ``(k, n)`` at cycle ``t`` does::

    a_out = a_in                      (to the right)
    p_out = p_in + a_in · B[k, n]     (down)

so ``A[m, k]`` reaches column ``n`` at cycle ``m + k + n`` and ``C[m, n]`` leaves the
bottom of column ``n`` after cycle ``m + (K-1) + n``. One ``R × C`` tile of ``B``
therefore takes ``R`` cycles to load and ``M + R + C - 2`` cycles to stream ``M``
rows through, and a matrix larger than the array is cut into tiles whose partial
products are added (:func:`systolic_matmul`). Utilisation is useful MACs over
``PEs × cycles``: high when ``M`` is large enough to hide filling and draining the
array, low for a batch of one (the TPU paper's reason for its batch sizes).

Lesson 10 (§10.2) draws the dataflow (图20); the lab's exercise 2 asks for
:func:`systolic_tile`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from utils.validation import check_int, check_type


@dataclass(frozen=True)
class SystolicStats:
    """Cycle count and utilisation of one matrix product on a ``rows × cols`` array."""

    m: int
    k: int
    n: int
    rows: int
    cols: int
    load_cycles: int
    compute_cycles: int
    tiles: int

    @property
    def cycles(self) -> int:
        """All cycles: weight loads plus streaming (no overlap of the two)."""
        return self.load_cycles + self.compute_cycles

    @property
    def macs(self) -> int:
        """Useful multiply-accumulates ``M·K·N``."""
        return self.m * self.k * self.n

    @property
    def utilization(self) -> float:
        """``M·K·N / (rows · cols · cycles)``: the fraction of PE-cycles doing useful work."""
        return self.macs / (self.rows * self.cols * self.cycles)


def _as_matrix(name: str, x) -> np.ndarray:
    arr = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    if arr.ndim != 2 or 0 in arr.shape:
        raise ValueError(f"{name} must be a non-empty 2-D matrix, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.number) and not np.iscomplexobj(arr)):
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    return arr


def systolic_tile(a: np.ndarray, w: np.ndarray, trace: bool = False):
    """Stream ``a`` (``M × K``) through a ``K × N`` array holding ``w``, one cycle at a time.

    Returns ``(a @ w, cycles)`` with ``cycles = M + K + N - 2``, or with ``trace``
    also the ``(cycles, K, N)`` boolean array of the PEs that multiply a real input
    at each cycle (for drawing the wavefront).
    """
    m, k = a.shape
    n = w.shape[1]
    dtype = np.result_type(a.dtype, w.dtype)
    a_reg = np.zeros((k, n), dtype)  # activation held by each PE after this cycle
    valid = np.zeros((k, n), bool)  # whether that activation is a real input
    psum = np.zeros((k, n), dtype)  # partial sum leaving each PE downwards
    out = np.zeros((m, n), dtype)
    cycles = m + k + n - 2
    rows = np.arange(k)
    active = []
    for t in range(cycles):
        src = t - rows  # row k receives A[t - k, k] (the skew)
        ok = (src >= 0) & (src < m)
        a_reg[:, 1:], valid[:, 1:] = a_reg[:, :-1].copy(), valid[:, :-1].copy()
        a_reg[:, 0] = np.where(ok, a[np.clip(src, 0, m - 1), rows], 0)
        valid[:, 0] = ok
        above = np.vstack([np.zeros((1, n), dtype), psum[:-1]])
        psum = above + a_reg * w
        done = t - (k - 1) - np.arange(n)  # row m of C leaves column n at cycle m + K-1 + n
        cols = (done >= 0) & (done < m)
        out[done[cols], np.nonzero(cols)[0]] = psum[k - 1, cols]
        if trace:
            active.append(valid.copy())
    if trace:
        return out, cycles, np.stack(active)
    return out, cycles


def systolic_matmul(a, b, rows: int = 8, cols: int = 8) -> tuple[np.ndarray, SystolicStats]:
    """``A @ B`` on a ``rows × cols`` weight-stationary array, tile by tile; returns ``(C, stats)``.

    ``B`` (``K × N``) is cut into tiles of at most ``rows × cols``; each tile is loaded
    (``rows`` cycles, one row of weights per cycle) and all ``M`` rows of the
    matching slice of ``A`` are streamed through it (:func:`systolic_tile`); tiles
    along ``K`` add their partial products into ``C``.
    """
    check_int("rows", rows, minimum=1)
    check_int("cols", cols, minimum=1)
    a, b = _as_matrix("a", a), _as_matrix("b", b)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"a is {a.shape} and b is {b.shape}: a's columns must equal b's rows")
    m, k = a.shape
    n = b.shape[1]
    c = np.zeros((m, n), np.result_type(a.dtype, b.dtype))
    load = compute = tiles = 0
    for k0 in range(0, k, rows):
        for n0 in range(0, n, cols):
            part, cyc = systolic_tile(a[:, k0 : k0 + rows], b[k0 : k0 + rows, n0 : n0 + cols])
            c[:, n0 : n0 + cols] += part
            load, compute, tiles = load + rows, compute + cyc, tiles + 1
    return c, SystolicStats(m, k, n, rows, cols, load, compute, tiles)


def systolic_cycles(m: int, k: int, n: int, rows: int, cols: int) -> SystolicStats:
    """The same cycle count as :func:`systolic_matmul`, from the formula instead of a simulation.

    Per tile of ``r ≤ rows`` × ``c ≤ cols`` weights: ``rows`` load cycles and
    ``m + r + c - 2`` compute cycles.
    """
    for name, v in (("m", m), ("k", k), ("n", n), ("rows", rows), ("cols", cols)):
        check_int(name, v, minimum=1)
    rs = [min(rows, k - k0) for k0 in range(0, k, rows)]
    cs = [min(cols, n - n0) for n0 in range(0, n, cols)]
    compute = sum(m + r + c - 2 for r in rs for c in cs)
    tiles = len(rs) * len(cs)
    return SystolicStats(m, k, n, rows, cols, rows * tiles, compute, tiles)


def draw_dataflow(
    axes, m: int = 4, k: int = 3, n: int = 3, cycles: list[int] | None = None
) -> None:
    """Draw snapshots of the wavefront of an ``M × K`` by ``K × N`` product on ``axes`` (one per cycle).

    Each panel is the ``K × N`` array at one cycle: a filled cell multiplies a real
    input, its label ``a[m,k]`` says which (activations move right, partial sums down).
    """
    from matplotlib.patches import Rectangle

    check_type("axes", axes, (list, tuple, np.ndarray))
    a = np.arange(m * k).reshape(m, k) + 1
    _, total, active = systolic_tile(a, np.ones((k, n)), trace=True)
    cycles = list(range(min(len(axes), total))) if cycles is None else cycles
    for ax, t in zip(axes, cycles, strict=False):
        ax.set_xlim(-0.5, n - 0.5)
        ax.set_ylim(k - 0.5, -0.5)
        ax.set_aspect("equal")
        ax.set_xticks(range(n), [f"n={j}" for j in range(n)], fontsize=7)
        ax.set_yticks(range(k), [f"k={i}" for i in range(k)], fontsize=7)
        ax.grid(False)
        for i in range(k):
            for j in range(n):
                on = active[t, i, j]
                color = "#DD8452" if on else "#EEEEEE"
                ax.add_patch(Rectangle((j - 0.45, i - 0.45), 0.9, 0.9, color=color))
                if on:
                    ax.text(j, i, f"a[{t - i - j},{i}]", ha="center", va="center", fontsize=7)
        ax.set_xlabel("a moves right, psum moves down", fontsize=7)
        ax.set_title(f"cycle {t}", fontsize=9)
