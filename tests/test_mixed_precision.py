"""Tests of utils.mixed_precision (sensitivity scan, bits under a budget) and
utils.calibration_free (ZeroQ synthetic calibration inputs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from utils.calibration_free import bn_statistics_loss, distill_inputs
from utils.mixed_precision import (
    choose_bits,
    layer_sensitivity,
    precision_curve,
    quantizable_layers,
    quantized_layers,
    weight_bytes,
)
from utils.quantization import FakeQuantLayer


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def test_quantized_layers_wraps_then_restores():
    model = mlp()
    x = torch.randn(16, 8)
    ref = model(x)
    with quantized_layers(model, {"0": 2}) as q:
        assert isinstance(q[0], FakeQuantLayer) and q[0].weight_bits == 2
        assert isinstance(q[2], nn.Linear)
        assert not torch.allclose(q(x), ref)
    assert isinstance(model[0], nn.Linear) and torch.equal(model(x), ref)
    with pytest.raises(ValueError, match="not a Conv2d/Linear"):
        with quantized_layers(model, {"1": 4}):
            pass
    with pytest.raises(ValueError):
        with quantized_layers(model, {"0": 1}):
            pass


def test_quantizable_layers_skips_wrapped_copies():
    model = mlp()
    assert list(quantizable_layers(model)) == ["0", "2"]
    assert list(quantizable_layers(model, skip=("2",))) == ["0"]
    with quantized_layers(model, {"0": 4}) as q:
        assert list(quantizable_layers(q)) == ["0", "2"]


def test_layer_sensitivity_is_the_metric_drop():
    model = mlp()
    x = torch.randn(64, 8)
    ref = model(x).detach()

    def metric(m: nn.Module) -> float:
        return -float((m(x) - ref).pow(2).mean().detach())

    sens = layer_sensitivity(model, metric, bits=2)
    assert set(sens) == {"0", "2"} and all(v > 0 for v in sens.values())
    base = metric(model)
    with quantized_layers(model, {"2": 2}) as q:
        assert sens["2"] == pytest.approx(base - metric(q))
    # more bits, less damage
    sens8 = layer_sensitivity(model, metric, bits=8)
    assert all(sens8[k] < sens[k] for k in sens)
    with pytest.raises(TypeError, match="metric must be"):
        layer_sensitivity(model, 3)


def test_weight_bytes_hand_checked():
    model = mlp()  # weights: 8*32 = 256 and 32*4 = 128
    assert weight_bytes(model, {}) == (256 + 128) * 4
    assert weight_bytes(model, {"0": 4, "2": 8}) == 256 * 4 / 8 + 128
    with pytest.raises(ValueError, match="not a Conv2d/Linear"):
        weight_bytes(model, {"x": 4})


def test_choose_bits_respects_the_budget_and_the_order():
    model = mlp()
    sens = {"0": 1.0, "2": 5.0}
    low_size = weight_bytes(model, {"0": 4, "2": 4})  # 192 bytes
    assert choose_bits(model, sens, low_size) == {"0": 4, "2": 4}
    # room for one layer at 8 bits: layer "2" (more sensitive per byte) gets it
    budget = weight_bytes(model, {"0": 4, "2": 8})
    assert choose_bits(model, sens, budget) == {"0": 4, "2": 8}
    # layer "0" more sensitive per byte, but it does not fit: "2" still goes up
    assert choose_bits(model, {"0": 100.0, "2": 1.0}, budget) == {"0": 4, "2": 8}
    assert choose_bits(model, sens, 1e9) == {"0": 8, "2": 8}
    with pytest.raises(ValueError, match="below the all-4-bit size"):
        choose_bits(model, sens, low_size - 1)
    with pytest.raises(ValueError, match="more bits"):
        choose_bits(model, sens, budget, low=8, high=4)


def test_precision_curve_recovers_quality():
    model = mlp()
    x = torch.randn(64, 8)
    ref = model(x).detach()

    def metric(m: nn.Module) -> float:
        return -float((m(x) - ref).pow(2).mean().detach())

    curve = precision_curve(model, metric, ["2", "0"], low=2, high=8)
    assert [k for k, _, _ in curve] == [0, 1, 2]
    assert curve[0][1] < curve[1][1] < curve[2][1]
    assert curve[2][2] > curve[0][2]
    with pytest.raises(ValueError, match="at least one"):
        precision_curve(model, metric, [])


# ------------------------------------------------------------------ ZeroQ
def bn_net() -> nn.Sequential:
    """A conv/BN net whose running statistics come from 'real' data x ~ N(0.5, 2²)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
    )
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    net.train()
    with torch.no_grad():
        for _ in range(5):
            net(torch.randn(64, 1, 12, 12) * 2 + 0.5)
    return net.eval()


def test_bn_statistics_loss_hand_checked_and_zero_at_the_statistics():
    bn = nn.BatchNorm2d(1, eps=0.0).eval()
    x = torch.tensor([1.0, 3.0]).reshape(2, 1, 1, 1)  # mean 2, std 1; running mean 0, var 1
    assert bn_statistics_loss(nn.Sequential(bn), x).item() == pytest.approx(2.0)
    bn.running_mean.fill_(2.0)
    assert bn_statistics_loss(nn.Sequential(bn), x).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        bn_statistics_loss(nn.Sequential(nn.Linear(2, 2)), torch.ones(1, 2))


def test_distill_inputs_matches_bn_statistics():
    net = bn_net()
    before = bn_statistics_loss(
        net, torch.randn(32, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    )
    x = distill_inputs(net, (1, 12, 12), num=32, steps=150, lr=0.1)
    assert x.shape == (32, 1, 12, 12) and not x.requires_grad
    assert bn_statistics_loss(net, x) < before / 3
    assert not net.training and all(p.requires_grad for p in net.parameters())
    with pytest.raises(ValueError, match="shape must be"):
        distill_inputs(net, (1, 0, 12))
    with pytest.raises(ValueError, match="num"):
        distill_inputs(net, (1, 12, 12), num=1)


def test_distill_inputs_stay_inside_bounds():
    net = bn_net()  # 'real' data N(0.5, 2²): unconstrained inputs spread far beyond [-1, 2]
    free = distill_inputs(net, (1, 12, 12), num=32, steps=50, lr=0.1)
    assert free.min() < -1 or free.max() > 2
    x = distill_inputs(net, (1, 12, 12), num=32, steps=50, lr=0.1, bounds=(-1.0, 2.0))
    assert x.min() >= -1.0 and x.max() <= 2.0
    start = torch.randn(32, 1, 12, 12, generator=torch.Generator().manual_seed(0)).clamp(-1, 2)
    assert bn_statistics_loss(net, x) < bn_statistics_loss(net, start)  # still optimised
    x0 = distill_inputs(net, (1, 12, 12), num=32, steps=0, bounds=(-1.0, 2.0))
    assert torch.equal(x0, start), "the start must be the clamped normal sample"
    with pytest.raises(ValueError, match="bounds must satisfy lo < hi"):
        distill_inputs(net, (1, 12, 12), bounds=(2.0, -1.0))
    with pytest.raises(ValueError, match="bounds must be None or a tuple"):
        distill_inputs(net, (1, 12, 12), bounds=(0.0,))


def test_choose_bits_ranks_by_sensitivity_per_byte():
    model = mlp()  # layer "0": 256 weights, layer "2": 128 weights
    budget = weight_bytes(model, {"0": 8, "2": 4})  # room for "0" or "2" at 8 bits, not both
    # "0" has the larger drop, "2" the larger drop per weight: "2" is upgraded first, "0" no longer fits
    assert choose_bits(model, {"0": 3.0, "2": 2.0}, budget) == {"0": 4, "2": 8}
    assert choose_bits(model, {"0": 3.0, "2": 1.0}, budget) == {"0": 8, "2": 4}


def test_bn_statistics_loss_std_term_hand_checked():
    bn = nn.BatchNorm2d(1, eps=0.0).eval()
    bn.running_mean.fill_(2.0)
    bn.running_var.fill_(4.0)  # running std 2; the batch [1, 3] has mean 2, std 1
    x = torch.tensor([1.0, 3.0]).reshape(2, 1, 1, 1)
    assert bn_statistics_loss(nn.Sequential(bn), x).item() == pytest.approx(1.0)
