"""Mutants of ``utils/systolic.py``: skew, dataflow directions, output timing, cycle formula, tiling.

Last measured 2026-11-27 with ``tools/mutate.py systolic``: 10/10 killed."""

from mutate import Mutant

F = "utils/systolic.py"
TESTS = ["tests/test_systolic.py"]

MUTANTS = [
    Mutant(
        "no skew", F, "src = t - rows  # row k receives", "src = t + 0 * rows  # row k receives"
    ),
    Mutant(
        "activations not shifted right",
        F,
        "a_reg[:, 1:], valid[:, 1:] = a_reg[:, :-1].copy(), valid[:, :-1].copy()",
        "pass",
    ),
    Mutant("partial sums stay in place", F, "psum = above + a_reg * w", "psum = psum + a_reg * w"),
    Mutant(
        "output without column delay",
        F,
        "done = t - (k - 1) - np.arange(n)",
        "done = t - (k - 1) + 0 * np.arange(n)",
    ),
    Mutant("one cycle too few", F, "cycles = m + k + n - 2", "cycles = m + k + n - 3"),
    Mutant(
        "tiles overwrite along K", F, "c[:, n0 : n0 + cols] += part", "c[:, n0 : n0 + cols] = part"
    ),
    Mutant(
        "load cycles not counted",
        F,
        "load, compute, tiles = load + rows, compute + cyc, tiles + 1",
        "load, compute, tiles = load, compute + cyc, tiles + 1",
    ),
    Mutant(
        "formula uses full tile for edge tiles",
        F,
        "compute = sum(m + r + c - 2 for r in rs for c in cs)",
        "compute = sum(m + rows + cols - 2 for r in rs for c in cs)",
    ),
    Mutant(
        "utilization over compute cycles only",
        F,
        "return self.macs / (self.rows * self.cols * self.cycles)",
        "return self.macs / (self.rows * self.cols * self.compute_cycles)",
    ),
    Mutant(
        "shape check removed",
        F,
        "    if a.shape[1] != b.shape[0]:\n        raise",
        "    if False:\n        raise",
    ),
]
