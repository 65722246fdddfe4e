"""Tests of utils.systolic: the weight-stationary systolic array equals A @ B, cycle counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.systolic import SystolicStats, systolic_cycles, systolic_matmul, systolic_tile


@pytest.mark.parametrize(
    "m, k, n, rows, cols",
    [(1, 1, 1, 1, 1), (5, 7, 3, 4, 2), (9, 13, 11, 4, 4), (3, 2, 5, 8, 8), (17, 5, 9, 3, 7)],
)
def test_systolic_equals_matmul_on_odd_sizes(m, k, n, rows, cols):
    rng = np.random.default_rng(m * 100 + k)
    a = rng.integers(-9, 10, (m, k))
    b = rng.integers(-9, 10, (k, n))
    c, stats = systolic_matmul(a, b, rows, cols)
    assert np.array_equal(c, a @ b)  # integers: exact
    assert stats == systolic_cycles(m, k, n, rows, cols)
    assert stats.tiles == -(-k // rows) * -(-n // cols)


def test_systolic_float_and_torch_input():
    a, b = torch.randn(6, 10), torch.randn(10, 4)
    c, _ = systolic_matmul(a, b, 4, 4)
    assert np.allclose(c, (a @ b).numpy(), atol=1e-5)


def test_one_tile_cycles_by_hand():
    # M = 4 rows through a 3×3 array: last output C[3, 2] leaves after cycle 3 + 2 + 2 = 7 -> 8 cycles
    out, cycles, active = systolic_tile(np.ones((4, 3)), np.ones((3, 3)), trace=True)
    assert cycles == 4 + 3 + 3 - 2 == 8
    assert np.array_equal(out, np.full((4, 3), 3.0))
    assert active.shape == (8, 3, 3)
    assert active.sum() == 4 * 3 * 3  # each MAC happens exactly once
    # the wavefront: at cycle 0 only PE (0, 0) works; at cycle 2 the anti-diagonal k + n = 2 too
    assert active[0].sum() == 1 and active[0, 0, 0]
    assert active[2, 2, 0] and active[2, 1, 1] and active[2, 0, 2]


def test_utilization_by_hand_and_growing_with_batch():
    # 1 tile 4×4, M = 1: 4 load + 1 + 4 + 4 - 2 = 11 cycles, 16 MACs on 16 PEs -> 1/11
    s = systolic_cycles(1, 4, 4, 4, 4)
    assert (s.load_cycles, s.compute_cycles, s.cycles) == (4, 7, 11)
    assert s.utilization == pytest.approx(16 / (16 * 11))
    utils_ = [systolic_cycles(m, 256, 256, 256, 256).utilization for m in (1, 16, 256, 4096)]
    assert utils_ == sorted(utils_) and utils_[-1] > 0.8 and utils_[0] < 0.01


def test_stats_properties():
    s = SystolicStats(2, 3, 4, 3, 4, 3, 7, 1)
    assert s.macs == 24 and s.cycles == 10


@pytest.mark.parametrize(
    "a, b, err, match",
    [
        (np.ones((2, 3)), np.ones((2, 3)), ValueError, "a's columns must equal b's rows"),
        (np.ones(3), np.ones((3, 1)), ValueError, "a must be a non-empty 2-D matrix"),
        (np.ones((1, 1)), np.array([["x"]]), TypeError, "b must hold real numbers"),
    ],
)
def test_bad_input(a, b, err, match):
    with pytest.raises(err, match=match):
        systolic_matmul(a, b)
    with pytest.raises(ValueError, match="rows must be >= 1"):
        systolic_matmul(np.ones((1, 1)), np.ones((1, 1)), rows=0)
