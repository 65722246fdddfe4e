"""Tests of utils.quantization: against PyTorch's production kernels and hand-worked cases."""

from __future__ import annotations

import warnings

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from utils.models import LeNet5, LeNet300100, SmallResNet
from utils.quantization import (
    EntropyObserver,
    IntegerLinear,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    calc_qparams,
    calibrate,
    convert_integer_only,
    dequantize,
    fake_quantize,
    fold_bn,
    kl_threshold,
    kmeans_quantize,
    make_observer,
    prepare_fake_quant,
    qrange,
    quantization_error,
    quantize,
    quantize_multiplier,
    requantize,
)

# ---------------------------------------------------------------- hand-checked cases


def test_qrange_signed_and_unsigned():
    assert qrange(8, True) == (-128, 127)
    assert qrange(8, False) == (0, 255)
    assert qrange(2, True) == (-2, 1)
    assert qrange(16, False) == (0, 65535)


def test_two_bit_unsigned_affine_by_hand():
    # range [-1, 2] on 4 levels: S = 3/3 = 1, Z = 0 - round(-1/1) = 1
    s, z = calc_qparams(-1.0, 2.0, bits=2, signed=False)
    assert float(s) == 1.0 and int(z) == 1
    x = torch.tensor([-1.0, -0.4, 0.5, 1.5, 2.0, 3.7, -5.0])
    # x/S = -1, -0.4, 0.5, 1.5, 2, 3.7, -5 -> round half to even: -1, 0, 0, 2, 2, 4, -5
    # -> + Z: 0, 1, 1, 3, 3, 5, -4 -> clamp to [0, 3]
    q = quantize(x, s, z, bits=2, signed=False)
    assert q.tolist() == [0, 1, 1, 3, 3, 3, 0]
    assert dequantize(q, s, z).tolist() == [-1.0, 0.0, 0.0, 2.0, 2.0, 2.0, -1.0]


def test_two_bit_signed_symmetric_by_hand():
    # max |x| = 1.5 -> S = 1.5 / ((1 - (-2)) / 2) = 1.0, Z = 0; grid {-2, -1, 0, 1}
    s, z = calc_qparams(-1.5, 0.5, bits=2, signed=True, symmetric=True)
    assert float(s) == 1.0 and int(z) == 0
    q = quantize(torch.tensor([-1.5, -0.5, 0.5, 1.5, 2.5]), s, z, bits=2, signed=True)
    assert q.tolist() == [-2, 0, 0, 1, 1]


def test_per_channel_by_hand():
    x = torch.tensor([[0.0, 1.0, 2.0], [0.0, -4.0, 4.0]])
    s, z = calc_qparams(x.min(1).values, x.max(1).values, bits=2, signed=True, symmetric=True)
    # channel 0: S = 2/1.5, channel 1: S = 4/1.5
    assert torch.allclose(s, torch.tensor([2 / 1.5, 4 / 1.5]))
    q = quantize(x, s, z, bits=2, signed=True, axis=0)
    # ch0: 0, 0.75->1, 1.5->2 (even) clamp 1 ; ch1: 0, -1.5->-2, 1.5->2 clamp 1
    assert q.tolist() == [[0, 1, 1], [0, -2, 1]]


def test_range_always_contains_zero():
    s, z = calc_qparams(2.0, 6.0, bits=8, signed=False)
    assert int(z) == 0 and torch.isclose(s, torch.tensor(6 / 255))
    s, z = calc_qparams(-6.0, -2.0, bits=8, signed=False)
    assert int(z) == 255
    q0 = quantize(torch.tensor([0.0]), s, z, bits=8, signed=False)
    assert dequantize(q0, s, z).item() == 0.0  # zero is exactly representable


def test_all_zero_range_gives_unit_scale():
    # a zero range (a pruned channel) gets S = 1, not float eps: b / S stays representable
    s, z = calc_qparams(0.0, 0.0)
    assert float(s) == 1.0 and int(z) == -128
    q = quantize(torch.zeros(3), s, z)
    assert q.tolist() == [-128, -128, -128] and dequantize(q, s, z).tolist() == [0.0, 0.0, 0.0]
    s, z = calc_qparams(torch.tensor([0.0, -1.0]), torch.tensor([0.0, 1.0]), 8, True, True)
    assert s.tolist() == [1.0, pytest.approx(1 / 127.5)] and z.tolist() == [0, 0]
    s, z = calc_qparams(0.0, 0.0, 8, False, True)
    assert float(s) == 1.0 and int(z) == 128
    # a tiny but non-zero range keeps PyTorch's eps floor
    s, _ = calc_qparams(0.0, 1e-30)
    assert float(s) == torch.finfo(torch.float32).eps


# ---------------------------------------------------------------- against PyTorch


@pytest.mark.parametrize(
    "signed,symmetric", [(True, True), (True, False), (False, False), (False, True)]
)
def test_qparams_match_torch_observer(signed, symmetric):
    x = torch.randn(1000) * 2 + 0.3
    dtype = torch.qint8 if signed else torch.quint8
    scheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.ao.quantization.MinMaxObserver(dtype=dtype, qscheme=scheme)
        ref(x)
        rs, rz = ref.calculate_qparams()
    obs = MinMaxObserver(8, signed=signed, symmetric=symmetric)
    obs.update(x)
    s, z = obs.qparams()
    assert torch.allclose(s, rs.reshape(()), rtol=1e-6) and int(z) == int(rz)


def test_per_channel_qparams_match_torch_observer():
    w = torch.randn(6, 3, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.ao.quantization.PerChannelMinMaxObserver(
            ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric
        )
        ref(w)
        rs, rz = ref.calculate_qparams()
    obs = MinMaxObserver(8, signed=True, symmetric=True, axis=0)
    obs.update(w)
    s, z = obs.qparams()
    assert torch.allclose(s, rs) and torch.equal(z, rz.to(torch.int64))


@pytest.mark.parametrize("seed", range(5))
def test_fake_quantize_per_tensor_bit_exact(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(10_000, generator=g) * 4
    scale, zp = (
        float(torch.rand(1, generator=g)) * 0.05 + 1e-3,
        int(torch.randint(-20, 20, (1,), generator=g)),
    )
    # include exact ties (k + 0.5) * scale where round-half-to-even matters
    x[:100] = (torch.arange(100) - 50 + 0.5) * scale
    ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, -128, 127)
    ours = fake_quantize(x, scale, zp, bits=8, signed=True)
    assert torch.equal(ours, ref)
    ref_u = torch.fake_quantize_per_tensor_affine(x, scale, zp + 128, 0, 255)
    assert torch.equal(fake_quantize(x, scale, zp + 128, bits=8, signed=False), ref_u)


@pytest.mark.parametrize("axis", [0, 1])
def test_fake_quantize_per_channel_bit_exact(axis):
    x = torch.randn(8, 5, 4, 4) * 3
    n = x.shape[axis]
    scale = torch.rand(n) * 0.05 + 1e-3
    zp = torch.randint(-10, 10, (n,))
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp.int(), axis, -128, 127)
    assert torch.equal(fake_quantize(x, scale, zp, 8, True, axis=axis), ref)


def test_quantize_matches_torch_quantize_per_channel():
    w = torch.randn(4, 10)
    s = w.abs().amax(1) / 127.5
    z = torch.zeros(4, dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.quantize_per_channel(w, s.double(), z, 0, torch.qint8).int_repr()
    assert torch.equal(quantize(w, s, z, axis=0), ref.int())


def test_fake_quantize_ste_gradient_matches_torch():
    x = (torch.randn(500) * 3).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    fake_quantize(x, 0.02, 3).sum().backward()
    torch.fake_quantize_per_tensor_affine(x2, 0.02, 3, -128, 127).sum().backward()
    assert torch.equal(x.grad, x2.grad)
    assert 0 < x.grad.sum() < 500  # clipped values get no gradient


# ---------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 16),
    signed=st.booleans(),
    symmetric=st.booleans(),
    lo=st.floats(-100, 0),
    width=st.floats(1e-3, 200),
    seed=st.integers(0, 1000),
)
def test_round_trip_error_at_most_half_a_step(bits, signed, symmetric, lo, width, seed):
    hi = lo + width
    s, z = calc_qparams(lo, hi, bits, signed, symmetric)
    qmin, qmax = qrange(bits, signed)
    # the interval the grid covers (it contains [lo, hi] for affine; symmetric may cut one side)
    rep_lo, rep_hi = float(s) * (qmin - int(z)), float(s) * (qmax - int(z))
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2000, generator=g) * (hi - lo) + lo
    x = x[(x >= rep_lo) & (x <= rep_hi)]
    err = (dequantize(quantize(x, s, z, bits, signed), s, z) - x).abs()
    # half a step, up to float32 rounding of x itself (a few ulps of the largest |x|)
    tol = float(s) / 2 * (1 + 1e-4) + 8 * torch.finfo(torch.float32).eps * max(abs(lo), abs(hi))
    assert bool((err <= tol).all())


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 16), signed=st.booleans(), seed=st.integers(0, 1000))
def test_quantize_stays_in_range(bits, signed, seed):
    x = torch.randn(300, generator=torch.Generator().manual_seed(seed)) * 100
    s, z = calc_qparams(-1.0, 1.0, bits, signed)
    q = quantize(x, s, z, bits, signed)
    qmin, qmax = qrange(bits, signed)
    assert q.min() >= qmin and q.max() <= qmax


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="bits"):
        quantize(x, 0.1, 0, bits=1)
    with pytest.raises(ValueError, match="bits"):
        calc_qparams(-1.0, 1.0, bits=17)
    with pytest.raises(TypeError, match="bits"):
        qrange(8.0)
    with pytest.raises(ValueError, match="scale"):
        quantize(x, 0.0, 0)
    with pytest.raises(ValueError, match="scale"):
        dequantize(torch.zeros(3, dtype=torch.int32), -1.0, 0)
    with pytest.raises(ValueError, match="finite"):
        quantize(torch.tensor([float("nan")]), 0.1, 0)
    with pytest.raises(ValueError, match="finite"):
        quantize(x, float("inf"), 0)
    with pytest.raises(ValueError, match="min_val"):
        calc_qparams(float("nan"), 1.0)
    with pytest.raises(ValueError, match="min_val must be <="):
        calc_qparams(2.0, 1.0)
    with pytest.raises(ValueError, match="axis"):
        quantize(x, torch.ones(4), torch.zeros(4, dtype=torch.int64), axis=1)  # x.shape[1] = 3
    with pytest.raises(ValueError, match="per-channel"):
        quantize(x, torch.ones(3), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="axis"):
        quantize(x, torch.ones(3), torch.zeros(3, dtype=torch.int64), axis=5)
    with pytest.raises(TypeError, match="x"):
        quantize([1.0], 0.1, 0)
    with pytest.raises(TypeError, match="zero_point"):
        quantize(x, 0.1, 0.5)
    with pytest.raises(ValueError, match="name"):
        make_observer("median")
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(percentile=101.0)
    with pytest.raises(RuntimeError, match="no data"):
        MinMaxObserver().qparams()
    with pytest.raises(ValueError, match="m must be > 0"):
        quantize_multiplier(0.0)
    with pytest.raises(TypeError, match="conv"):
        fold_bn(nn.Linear(2, 2), nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match="num_features"):
        fold_bn(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="bits"):
        kmeans_quantize(torch.randn(10), bits=0)
    with pytest.raises(ValueError, match="FakeQuantLayer"):
        calibrate(nn.Sequential(nn.ReLU()), [(x, None)])


# ---------------------------------------------------------------- observers


def test_observers_clip_outliers():
    x = torch.randn(20_000)
    x[0] = 100.0
    mm = MinMaxObserver(8)
    mm.update(x)
    assert float(mm.range()[1]) == 100.0
    for obs in (PercentileObserver(8), EntropyObserver(8), MSEObserver(4)):
        obs.update(x)
        assert float(obs.range()[1]) < 50.0, type(obs).__name__  # the outlier is clipped
    # at 4 bits the MSE-optimal clip lowers the total error, and much more that of the bulk
    mm4, mse4 = MinMaxObserver(4), MSEObserver(4)
    mm4.update(x), mse4.update(x)
    e_mm = quantization_error(x, fake_quantize(x, *mm4.qparams(), 4, False))
    e_mse = quantization_error(x, fake_quantize(x, *mse4.qparams(), 4, False))
    assert e_mse < e_mm
    # at 8 bits keeping one outlier of 100 costs less than clipping it: MSE keeps the range
    mse8 = MSEObserver(8)
    mse8.update(x)
    assert float(mse8.range()[1]) > 90.0


def test_moving_average_observer_by_hand_and_against_torch():
    # c = 0.25 (not 0.5, which hides a swapped formula): m <- m + c (batch - m)
    obs = MovingAverageMinMaxObserver(8, averaging_constant=0.25)
    obs.update(torch.tensor([-2.0, 2.0]))  # first batch: taken as is
    obs.update(torch.tensor([0.0, 4.0]))  # -2 + 0.25 * 2 = -1.5 ; 2 + 0.25 * 2 = 2.5
    lo, hi = obs.range()
    assert float(lo) == -1.5 and float(hi) == 2.5
    obs.update(torch.tensor([-3.5, 6.5]))  # -1.5 + 0.25 * (-2) = -2 ; 2.5 + 0.25 * 4 = 3.5
    assert [float(t) for t in obs.range()] == [-2.0, 3.5]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.ao.quantization.MovingAverageMinMaxObserver(averaging_constant=0.25)
    for b in ([-2.0, 2.0], [0.0, 4.0], [-3.5, 6.5]):
        ref(torch.tensor(b))
    assert float(ref.min_val) == -2.0 and float(ref.max_val) == 3.5


def test_percentile_observer_per_channel():
    x = torch.stack([torch.linspace(0, 1, 10001), torch.linspace(-10, 10, 10001)])
    obs = PercentileObserver(8, percentile=90.0, axis=0)
    obs.update(x)
    lo, hi = obs.range()
    assert torch.allclose(hi, torch.tensor([0.9, 8.0]), atol=1e-3)
    assert torch.allclose(lo, torch.tensor([0.1, -8.0]), atol=1e-3)


def test_kl_threshold_uniform_keeps_full_range():
    t = kl_threshold(torch.rand(50_000) * 2 - 1, bits=8)
    assert 0.9 < t <= 1.0


# ---------------------------------------------------------------- BN folding


def test_fold_bn_equals_conv_then_bn_and_torch_fusion():
    conv, bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    conv.eval(), bn.eval()
    x = torch.randn(2, 3, 10, 10)
    folded = fold_bn(conv, bn)
    assert torch.allclose(folded(x), bn(conv(x)), atol=1e-5)
    ref = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
    assert torch.allclose(folded.weight, ref.weight, atol=1e-6)
    assert torch.allclose(folded.bias, ref.bias, atol=1e-6)
    no_bias = nn.Conv2d(3, 8, 3, bias=False).eval()
    assert torch.allclose(fold_bn(no_bias, bn)(x), bn(no_bias(x)), atol=1e-5)


# ---------------------------------------------------------------- integer-only inference


def test_quantize_multiplier_by_hand():
    m0, n = quantize_multiplier(torch.tensor([0.5, 0.75, 0.1]))
    assert m0.tolist()[:2] == [2**30, 3 * 2**29] and n.tolist()[:2] == [0, 0]
    assert n.tolist()[2] == 3  # 0.1 = 0.8 * 2^-3
    approx = m0.double() * 2.0 ** (-31 - n.double())
    assert torch.allclose(approx, torch.tensor([0.5, 0.75, 0.1], dtype=torch.float64), rtol=1e-9)


def test_requantize_by_hand():
    m0, n = quantize_multiplier(0.25)  # acc * 0.25
    assert (int(m0), int(n)) == (2**30, 1)
    acc = torch.tensor([[10, 6, -6, -10, 2, -2, 3, -3, 2000, -2000]], dtype=torch.int32)
    # ties round half away from zero (gemmlowp's RoundingDivideByPOT):
    # 2.5 -> 3, 1.5 -> 2, -1.5 -> -2, -2.5 -> -3, 0.5 -> 1, -0.5 -> -1; 0.75 -> 1, -0.75 -> -1
    want = [3, 2, -2, -3, 1, -1, 1, -1, 255, -128]
    assert requantize(acc, m0, n, 0, -128, 255).tolist() == [want]
    assert requantize(acc, m0, n, 10, 0, 255).tolist() == [[13, 12, 8, 7, 11, 9, 11, 9, 255, 0]]
    # a multiplier >= 1 (n < 0): acc * 3 exactly
    m0, n = quantize_multiplier(3.0)
    assert int(n) == -2 and requantize(acc, m0, n, 0, -(2**20), 2**20).tolist() == [
        [30, 18, -18, -30, 6, -6, 9, -9, 6000, -6000]
    ]
    # per channel: M = 0.5 on channel 0, 0.125 on channel 1
    m0, n = quantize_multiplier(torch.tensor([0.5, 0.125]))
    acc = torch.tensor([[[5, -5], [12, -12]]], dtype=torch.int32)  # (1, 2 channels, 2)
    assert requantize(acc, m0, n, 0, -100, 100).tolist() == [[[3, -3], [2, -2]]]


def _round_half_away(num: int, den: int) -> int:
    """Exact ``round(num / den)``, ties away from zero, in Python integers."""
    mag = (2 * abs(num) + den) // (2 * den)
    return mag if num >= 0 else -mag


@settings(max_examples=80, deadline=None)
@given(
    acc=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=20),
    m=st.floats(2.0**-30, 100.0),
    zero_point=st.integers(-10, 10),
)
def test_requantize_equals_exact_integer_rounding(acc, m, zero_point):
    m0, n = quantize_multiplier(m)
    total = 31 + int(n)
    out = requantize(torch.tensor([acc], dtype=torch.int32), m0, n, zero_point, -(2**31), 2**31 - 1)
    want = [
        min(max(_round_half_away(a * int(m0), 2**total) + zero_point, -(2**31)), 2**31 - 1)
        for a in acc
    ]
    assert out.tolist() == [want]


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_integer_layer_within_one_step_of_float(kind):
    torch.manual_seed(0)
    layer = nn.Linear(16, 8) if kind == "linear" else nn.Conv2d(3, 4, 3, stride=2, padding=1)
    x = torch.randn(5, 16) if kind == "linear" else torch.randn(2, 3, 9, 9)
    in_q = calc_qparams(x.min(), x.max(), 8, False)
    with torch.no_grad():
        y = layer(x)
    out_q = calc_qparams(y.min(), y.max(), 8, False)
    int_layer = IntegerLinear(layer, in_q, out_q)
    q_x = quantize(x, *in_q, 8, False)
    q_y = int_layer(q_x)
    assert q_y.dtype == torch.int32
    # float reference on the same quantized input and weights: the integer result is within one step
    x_hat = dequantize(q_x, *in_q)
    zeros = torch.zeros(int_layer.q_w.shape[0], dtype=torch.int64)
    w_hat = dequantize(int_layer.q_w, int_layer.s_w, zeros, axis=0)
    with torch.no_grad():
        ref = F_layer(layer, x_hat, w_hat)
    q_ref = (ref.double() / float(out_q[0]) + int(out_q[1])).clamp(0, 255)
    # the integer result is the float one rounded: half a step, plus the bias rounding
    # (half a step of S_x S_w, i.e. M / 2 output steps) and the fixed-point M (2^-30 relative)
    m = float(in_q[0]) * int_layer.s_w.double().max() / float(out_q[0])
    assert (q_y.double() - q_ref).abs().max() <= 0.5 + m / 2 + 1e-6
    assert (q_y.double() - q_ref.round()).abs().max() <= 1  # and never more than one step
    # so the distance to the true float layer is that plus the input and weight rounding
    y_hat = dequantize(q_y, *out_q).double()
    bound = float(out_q[0]) * (0.5 + m / 2 + 1e-6) + (ref - y).abs().max().double()
    assert (y_hat - y.double()).abs().max() <= bound


def F_layer(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.nn.functional.linear(x, w, layer.bias)
    return layer._conv_forward(x, w, layer.bias)


def test_integer_accumulator_is_exact():
    layer = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(1, 2, 6, 6)
    in_q = calc_qparams(x.min(), x.max(), 8, False)
    int_layer = IntegerLinear(layer, in_q, (torch.tensor(0.1), torch.tensor(0)))
    q_x = quantize(x, *in_q, 8, False)
    acc = int_layer.accumulate(q_x)
    # the same sum in float64 (exact for these magnitudes)
    ref = torch.nn.functional.conv2d(
        (q_x - int(in_q[1])).double(), int_layer.q_w.double(), padding=1
    )
    ref = ref + int_layer.q_b.double().reshape(1, -1, 1, 1)
    assert acc.dtype == torch.int32 and torch.equal(acc.double(), ref)


def _toy_loader(n: int = 64, size: int = 28) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, size, size, generator=g)
    return DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch_size=32)


@pytest.mark.parametrize("model_cls", [LeNet5, LeNet300100])
def test_convert_integer_only_tracks_float_model(model_cls):
    torch.manual_seed(0)
    model = model_cls().eval()
    loader = _toy_loader()
    int_model = convert_integer_only(model, loader, num_batches=2)
    x = next(iter(loader))[0]
    with torch.no_grad():
        ref, out = model(x), int_model(x)
    assert (
        int_model.forward_int(
            quantize(x, int_model.in_scale, int_model.in_zero_point, 8, False)
        ).dtype
        == torch.int32
    )
    assert quantization_error(ref, out) < 0.05
    assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.8


def test_convert_integer_only_folds_bn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 3)
    )
    model[1].running_mean.uniform_(-0.5, 0.5)
    model.eval()
    loader = _toy_loader()
    out = convert_integer_only(model, loader, 2)
    x = next(iter(loader))[0]
    with torch.no_grad():
        assert quantization_error(model(x), out(x)) < 0.05


def test_convert_integer_only_rejects_non_chains():
    with pytest.raises(ValueError, match="supports"):
        convert_integer_only(SmallResNet().eval(), _toy_loader(), 1)


# ---------------------------------------------------------------- fake-quant models


def test_prepare_fake_quant_at_16_bits_matches_float():
    torch.manual_seed(0)
    model = LeNet5().eval()
    loader = _toy_loader()
    fq = calibrate(prepare_fake_quant(model, weight_bits=16, act_bits=16), loader, 2)
    x = next(iter(loader))[0]
    with torch.no_grad():
        assert quantization_error(model(x), fq(x)) < 1e-3
    low = calibrate(prepare_fake_quant(model, weight_bits=2, act_bits=2), loader, 2)
    with torch.no_grad():
        assert quantization_error(model(x), low(x)) > 0.1


def test_fake_quant_model_trains_through_ste():
    model = prepare_fake_quant(LeNet300100(), weight_bits=4, act_bits=4)
    loader = _toy_loader(32)
    calibrate(model, loader, 1)
    x = next(iter(loader))[0]
    model(x).sum().backward()
    assert model.fc1.layer.weight.grad is not None and model.fc1.layer.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- k-means


def test_kmeans_by_hand_reseeds_empty_cluster():
    w = torch.tensor([0.0, 0.1, 0.9, 1.0, 5.0, 5.2])
    codebook, idx = kmeans_quantize(w, bits=2)
    # init 0, 1.733, 3.467, 5.2 -> clusters {0, 0.1}, {0.9, 1.0}, {}, {5.0, 5.2}; the empty
    # one is re-seeded with the weight farthest from its centroid (0.9, 0.833 from 1.733),
    # so 0.9 and 1.0 get a centroid each: {0, 0.1} -> 0.05, {0.9}, {1.0}, {5.0, 5.2} -> 5.1
    assert torch.allclose(codebook, torch.tensor([0.05, 0.9, 1.0, 5.1]))
    assert idx.tolist() == [0, 0, 1, 2, 3, 3]
    # Lloyd by hand: init 0, 1, 2, 3 -> {0, 0.4} -> 0.2, {1.4}, {2}, {3}; then stable
    cb, ix = kmeans_quantize(torch.tensor([0.0, 0.4, 1.4, 2.0, 3.0]), bits=2)
    assert torch.allclose(cb, torch.tensor([0.2, 1.4, 2.0, 3.0])) and ix.tolist() == [0, 0, 1, 2, 3]
    # fewer distinct weights than 2^bits: unused centroids are dropped
    cb, ix = kmeans_quantize(torch.tensor([1.0, 1.0, 3.0]), bits=3)
    assert cb.tolist() == [1.0, 3.0] and ix.tolist() == [0, 0, 1]
    for bits in (1, 2, 3, 5):
        cb, ix = kmeans_quantize(torch.randn(40, 30), bits)
        assert len(cb) <= 2**bits and ix.shape == (40, 30) and int(ix.max()) < len(cb)
        assert torch.equal(cb, cb.sort().values)


@pytest.mark.parametrize("dist", ["normal", "laplace"])
def test_kmeans_matches_sklearn_from_the_same_start(dist):
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(1)
    w = torch.randn(4000, generator=g)
    if dist == "laplace":  # heavy tails leave clusters empty at the linear start
        w = torch.sign(w) * -torch.log(torch.rand(4000, generator=g))
    bits = 5
    init = torch.linspace(float(w.min()), float(w.max()), 2**bits).double().numpy()
    km = KMeans(2**bits, init=init.reshape(-1, 1), n_init=1, max_iter=300, tol=1e-4)
    km.fit(w.double().numpy().reshape(-1, 1))
    cb, idx = kmeans_quantize(w, bits)
    ours = float(((cb[idx] - w).double() ** 2).mean())
    theirs = km.inertia_ / len(w)
    assert ours <= theirs * 1.01, (ours, theirs)
    assert len(cb) == 2**bits  # no cluster left empty


def test_quantize_multiplier_keeps_31_bits():
    m = 0.0123456789012345  # needs more than float32's 24 bits
    m0, n = quantize_multiplier(m)
    assert abs(int(m0) * 2.0 ** (-31 - int(n)) - m) / m < 2**-30


def test_integer_only_agrees_with_pytorch_x86_int8():
    from utils.production import quantize_static_int8

    torch.manual_seed(0)
    model = LeNet5().eval()
    loader = _toy_loader(128)
    ours = convert_integer_only(model, loader, num_batches=4)
    prod = quantize_static_int8(model, loader, num_batches=4)
    x = next(iter(loader))[0]
    with torch.no_grad():
        a, b, ref = ours(x), prod(x), model(x)
    assert quantization_error(b, a) < 0.05  # the two INT8 paths compute nearly the same logits
    assert quantization_error(ref, b) < 0.05
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.9


# ---------------------------------------------------------------- issue 9 regressions


def test_integer_linear_keeps_the_bias_of_an_all_zero_row():
    # a pruned output channel: weight row 2 is zero, its output is the bias alone (3.0)
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    with torch.no_grad():
        layer.weight[2] = 0.0
        layer.bias[2] = 3.0
    x = torch.randn(16, 8)
    in_q = calc_qparams(x.min(), x.max(), 8, False)
    with torch.no_grad():
        y = layer(x)
    out_q = calc_qparams(y.min(), y.max(), 8, False)
    int_layer = IntegerLinear(layer, in_q, out_q)
    assert float(int_layer.s_w[2]) == 1.0  # a zero range gets S_w = 1, not eps
    assert int(int_layer.q_b[2]) == round(3.0 / float(in_q[0]))
    out = dequantize(int_layer(quantize(x, *in_q, 8, False)), *out_q)
    assert (out[:, 2] - 3.0).abs().max() <= float(out_q[0]) / 2 + 1e-6


def test_integer_linear_raises_tiny_weight_scales_to_keep_the_bias_in_int32():
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1e-30, -1e-30, 0.0, 0.0], [0.5, -1.0, 0.25, 0.0]]))
        layer.bias.copy_(torch.tensor([3.0, 0.5]))
    x = torch.rand(10, 4)
    in_q = calc_qparams(x.min(), x.max(), 8, False)
    out_q = calc_qparams(-2.0, 4.0, 8, False)
    int_layer = IntegerLinear(layer, in_q, out_q)
    # S_w,0 = max(eps, |b| / (S_x 2^30)) so that |q_b| <= 2^30; row 1 keeps its min-max scale
    want = max(torch.finfo(torch.float32).eps, 3.0 / (float(in_q[0]) * 2**30))
    assert float(int_layer.s_w[0]) == pytest.approx(want, rel=1e-6)
    assert float(int_layer.s_w[1]) == pytest.approx(1.0 / 127.5, rel=1e-6)
    assert abs(int(int_layer.q_b[0])) <= 2**30
    with torch.no_grad():
        ref = layer(x)
    out = dequantize(int_layer(quantize(x, *in_q, 8, False)), *out_q)
    assert (out[:, 0] - 3.0).abs().max() <= float(out_q[0])
    assert (out - ref).abs().max() <= 3 * float(out_q[0])


def test_convert_integer_only_on_a_pruned_model():
    # chapter 5 combines structured pruning with integer quantization
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = LeNet300100().eval()
    with torch.no_grad():
        for lin in (model.fc1, model.fc2):
            lin.bias.uniform_(2.0, 3.0)  # pruned rows still output their bias
    for lin in (model.fc1, model.fc2):
        prune.ln_structured(lin, "weight", amount=0.5, n=1, dim=0)
    with pytest.raises(ValueError, match=r"fc1.weight_orig.*prune.remove"):
        convert_integer_only(model, [(torch.rand(2, 1, 28, 28), None)], 1)
    for lin in (model.fc1, model.fc2):
        prune.remove(lin, "weight")  # make it permanent before deployment
    assert int((model.fc1.weight.abs().sum(1) == 0).sum()) == 150
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))  # pixels in [0, 1]
    int_model = convert_integer_only(model, [(x, None)], num_batches=1)
    with torch.no_grad():
        ref, out = model(x), int_model(x)
    assert quantization_error(ref, out) < 0.05
    assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.8


def test_sample_observers_keep_a_uniform_sample_of_the_whole_stream():
    # 20 batches, batch i holds only the value i: a uniform sample keeps ~1/20 of each
    obs = PercentileObserver(8, max_samples=2000)
    for i in range(20):
        obs.update(torch.full((1000,), float(i)))
    counts = torch.bincount(obs.samples.flatten().long(), minlength=20)
    assert counts.sum() == 2000 and counts.min() >= 60 and counts.max() <= 140, counts.tolist()


@pytest.mark.parametrize("cls", [PercentileObserver, MSEObserver, EntropyObserver])
def test_sample_observers_on_a_stream_whose_batches_differ(cls):
    # the first 2 of 20 batches are 10x wider: their tail sets the 99th percentile of all data
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(20_000, generator=g) * (10 if i < 2 else 1) for i in range(20)]
    everything = torch.cat(batches)
    obs = cls(8, max_samples=20_000)
    for b in batches:
        obs.update(b)
    assert obs.samples.shape == (1, 20_000)
    wide = (obs.samples.abs() > 5).float().mean()  # share of wide-batch tail values kept
    assert abs(float(wide) - float((everything.abs() > 5).float().mean())) < 0.01
    if cls is PercentileObserver:
        p99 = PercentileObserver(8, percentile=99.0, max_samples=20_000)
        for b in batches:
            p99.update(b)
        want = float(torch.quantile(everything, 0.99))  # 12.9
        assert abs(float(p99.range()[1]) - want) < 0.1 * want


def _kl_threshold_brute_force(values: torch.Tensor, bits: int, bins: int) -> float:
    """The reference algorithm written out bin by bin (Migacz 2017; MXNet's
    ``_get_optimal_threshold`` on |x|): fold the outliers into the last bin, mark the
    non-empty bins of that P, merge into 2^(b-1) levels, expand over P's non-empty
    bins, smooth both by 1e-4, KL(P || Q), keep the first minimum."""
    import math

    a = values.abs().double().numpy()
    hist, edges = np.histogram(a, bins=bins, range=(0.0, float(a.max())))
    levels = 2 ** (bits - 1)

    def smooth(d):
        zeros = sum(1 for v in d if v == 0)
        nonzeros = len(d) - zeros
        eps1 = 1e-4 * zeros / nonzeros
        return [v + 1e-4 if v == 0 else v - eps1 for v in d]

    best, best_i = math.inf, None
    for i in range(levels, bins + 1):
        p = [float(h) for h in hist[:i]]
        p[-1] += float(hist[i:].sum())
        merged_width = i // levels
        q = [0.0] * i
        for j in range(levels):
            start = j * merged_width
            stop = i if j == levels - 1 else start + merged_width
            total = float(sum(hist[start:stop]))
            nonempty = sum(1 for k in range(start, stop) if p[k] != 0)
            for k in range(start, stop):
                q[k] = total / nonempty if p[k] != 0 else 0.0
        if not any(q):
            continue
        p, q = smooth(p), smooth(q)
        sp, sq = sum(p), sum(q)
        kl = sum((pk / sp) * math.log((pk / sp) / (qk / sq)) for pk, qk in zip(p, q, strict=True))
        if kl < best:
            best, best_i = kl, i
    return float(edges[best_i])


@pytest.mark.parametrize("dist", ["laplace", "normal", "bimodal"])
def test_kl_threshold_equals_brute_force_reference(dist):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20_000, generator=g)
    if dist == "laplace":
        x = torch.sign(x) * -torch.log(torch.rand(20_000, generator=g))
    elif dist == "bimodal":
        x = x * 0.3 + torch.where(torch.rand(20_000, generator=g) < 0.5, -2.0, 2.0)
    t = kl_threshold(x, bits=6, bins=256)
    assert t == pytest.approx(_kl_threshold_brute_force(x, bits=6, bins=256), rel=1e-12)


@pytest.mark.parametrize("dist", ["laplace", "normal"])
def test_kl_threshold_clips_laplace_and_gaussian_tails(dist):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(100_000, generator=g)
    if dist == "laplace":
        x = torch.sign(x) * -torch.log(torch.rand(100_000, generator=g))
    amax = float(x.abs().max())
    # the entropy observer clips too (it is not min-max): [-T, T] with T = kl_threshold
    obs = EntropyObserver(8, signed=True, symmetric=True)
    obs.update(x)
    t8 = float(obs.range()[1])
    assert float(obs.range()[0]) == -t8
    t4 = kl_threshold(x, bits=4)
    assert t8 < 0.95 * amax and t4 < 0.8 * amax and t4 < t8, (t8, t4, amax)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fake_quantize_half_precision_bit_exact_with_torch(dtype):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(50_000, generator=g) * 3).to(dtype)
    for scale, zp in ((0.0123, 3), (0.37, -7), (1 / 3, 0)):
        ref = torch.fake_quantize_per_tensor_affine(x.float(), scale, zp, -128, 127).to(dtype)
        out = fake_quantize(x, scale, zp)
        assert out.dtype == dtype and torch.equal(out, ref)
    xs = x.reshape(50, 1000)
    s, z = torch.rand(50, generator=g) * 0.05 + 1e-3, torch.randint(-5, 5, (50,), generator=g)
    ref = torch.fake_quantize_per_channel_affine(xs.float(), s, z.int(), 0, -128, 127).to(dtype)
    assert torch.equal(fake_quantize(xs, s, z, axis=0), ref)
    xg = x[:100].clone().requires_grad_()
    fake_quantize(xg, 0.0123, 3).float().sum().backward()
    assert xg.grad.dtype == dtype


def test_zero_point_outside_the_integer_range_is_rejected():
    x = torch.randn(10)
    with pytest.raises(RuntimeError):  # PyTorch rejects it too
        torch.fake_quantize_per_tensor_affine(x, 0.1, -500, -128, 127)
    for fn in (quantize, fake_quantize):
        with pytest.raises(ValueError, match=r"zero_point must lie in \[q_min, q_max\]"):
            fn(x, 0.1, -500, 8, False)
        with pytest.raises(ValueError, match="zero_point"):
            fn(x, 0.1, 128, 8, True)  # one past q_max
        with pytest.raises(ValueError, match="zero_point"):
            fn(x, 0.1, -129, 8, True)  # one below q_min
        with pytest.raises(ValueError, match="zero_point"):
            fn(x, 0.1, 4, 2, False)  # [0, 3] at 2 bits
        with pytest.raises(ValueError, match="zero_point"):
            fn(torch.randn(2, 3), torch.ones(2), torch.tensor([0, 300]), 8, False, axis=0)
        # the end points themselves are fine
        fn(x, 0.1, 127, 8, True), fn(x, 0.1, -128, 8, True), fn(x, 0.1, 3, 2, False)
    q = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="zero_point"):
        dequantize(q, 0.1, 256, bits=8, signed=False)
    with pytest.raises(ValueError, match="zero_point"):
        dequantize(q, 0.1, -1, bits=8, signed=False)
    with pytest.raises(ValueError, match="zero_point"):
        dequantize(q, 0.1, 70_000)  # outside every supported range
    with pytest.raises(ValueError, match="q must lie"):
        dequantize(torch.tensor([0, 300]), 0.1, 0, bits=8, signed=False)
    assert dequantize(q, 0.5, 255, bits=8, signed=False).tolist() == [-127.5, -125.0]


@pytest.mark.parametrize(
    "obs",
    [
        MinMaxObserver(8),
        MovingAverageMinMaxObserver(8),
        PercentileObserver(8),
        MSEObserver(8),
        EntropyObserver(8),
    ],
    ids=lambda o: type(o).__name__,
)
def test_observers_reject_empty_input(obs):
    with pytest.raises(ValueError, match="x must be non-empty"):
        obs.update(torch.zeros(0))
    with pytest.raises(ValueError, match="x must be non-empty"):
        obs.update(torch.zeros(3, 0))
    with pytest.raises(RuntimeError, match="no data"):
        obs.range()
    obs.update(torch.tensor([-1.0, 2.0]))
    assert [float(t) for t in obs.range()][1] > 0


def test_observer_rejects_a_changing_channel_count():
    obs = MinMaxObserver(8, axis=0)
    obs.update(torch.randn(3, 4))
    with pytest.raises(ValueError, match="channels"):
        obs.update(torch.randn(5, 4))
    obs.update(torch.randn(3, 7))  # more values per channel is fine


def test_more_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="values must be non-empty"):
        kl_threshold(torch.zeros(0))
    with pytest.raises(ValueError, match="stride"):
        kl_threshold(x, stride=0)
    with pytest.raises(ValueError, match="bins"):
        kl_threshold(x, bins=8)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        quantize(torch.ones(3, dtype=torch.int32), 0.1, 0)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        fake_quantize(torch.ones(3, dtype=torch.int64), 0.1, 0)
    with pytest.raises(ValueError, match="q must hold integers"):
        dequantize(torch.tensor([0.5]), 0.1, 0)
    with pytest.raises(TypeError, match="signed"):
        qrange(8, 1)
    with pytest.raises(TypeError, match="symmetric"):
        calc_qparams(-1.0, 1.0, symmetric=1)
    with pytest.raises(ValueError, match="same shape"):
        calc_qparams(torch.zeros(2), torch.ones(3))
    with pytest.raises(ValueError, match="x_hat"):
        quantization_error(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="x must be non-empty"):
        quantization_error(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="averaging_constant"):
        MovingAverageMinMaxObserver(averaging_constant=0.0)
    with pytest.raises(ValueError, match="max_samples"):
        MSEObserver(max_samples=10)
    with pytest.raises(ValueError, match="grid"):
        MSEObserver(grid=1)
    with pytest.raises(TypeError, match="acc"):
        requantize(torch.ones(2), torch.tensor(2**30), torch.tensor(0), 0, 0, 255)
    with pytest.raises(ValueError, match="m0"):
        requantize(
            torch.ones(1, 2, dtype=torch.int32), torch.tensor(2**31), torch.tensor(0), 0, 0, 9
        )
    with pytest.raises(ValueError, match="acc.shape"):
        requantize(
            torch.ones(1, 3, dtype=torch.int32),
            torch.tensor([2**30, 2**30]),
            torch.tensor([0, 0]),
            0,
            0,
            255,
        )
    with pytest.raises(ValueError, match="qmax"):
        requantize(torch.ones(1, dtype=torch.int32), torch.tensor(2**30), torch.tensor(0), 0, 5, 4)
    with pytest.raises(ValueError, match="multiplier"):
        requantize(torch.ones(1, dtype=torch.int32), torch.tensor(2**30), torch.tensor(40), 0, 0, 9)
    with pytest.raises(ValueError, match="in_qparams zero point"):
        IntegerLinear(nn.Linear(2, 2), (0.1, 300), (0.1, 0))
    with pytest.raises(ValueError, match="out_qparams scale"):
        IntegerLinear(nn.Linear(2, 2), (0.1, 0), (0.0, 0))
    with pytest.raises(TypeError, match="layer"):
        IntegerLinear(nn.ReLU(), (0.1, 0), (0.1, 0))
    with pytest.raises(ValueError, match="groups"):
        IntegerLinear(nn.Conv2d(2, 2, 3, groups=2), (0.1, 0), (0.1, 0))
    with pytest.raises(ValueError, match="tol"):
        kmeans_quantize(torch.randn(10), tol=-1.0)
    with pytest.raises(ValueError, match="w must be a non-empty"):
        kmeans_quantize(torch.zeros(0))
    with pytest.raises(ValueError, match="m must be finite"):
        quantize_multiplier(float("nan"))
    with pytest.raises(ValueError, match="batches"):
        convert_integer_only(LeNet300100(), [], 1)
    with pytest.raises(ValueError, match="mode"):
        prepare_fake_quant(LeNet300100(), mode="sometimes")
    with pytest.raises(ValueError, match="observer"):
        prepare_fake_quant(LeNet300100(), observer="median")
    with pytest.raises(TypeError, match="per_channel"):
        prepare_fake_quant(LeNet300100(), per_channel=1)
    with pytest.raises(ValueError, match="weight_bits|bits"):
        prepare_fake_quant(LeNet300100(), weight_bits=1)


# ---------------------------------------------------------------- exact values that mutants change


def test_ste_gradient_boundaries_match_torch():
    # scale 1, Z = 0, 8-bit signed: round(x) in [-128, 127] passes the gradient, else 0
    x = torch.tensor([-129.0, -128.6, -128.5, -128.0, 0.0, 127.0, 127.4, 127.5, 128.0])
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    fake_quantize(x1, 1.0, 0).sum().backward()
    torch.fake_quantize_per_tensor_affine(x2, 1.0, 0, -128, 127).sum().backward()
    # -128.5 rounds to -128 (even), 127.5 to 128 (even)
    assert x1.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert torch.equal(x1.grad, x2.grad)


def test_fold_bn_uses_eps_and_handles_affine_false():
    conv = nn.Conv2d(2, 3, 1, bias=True).eval()
    bn = nn.BatchNorm2d(3, eps=0.5, affine=False).eval()
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
        bn.running_mean.copy_(torch.tensor([0.0, 1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([0.5, 1.5, 3.5]))  # var + eps = 1, 2, 4
    folded = fold_bn(conv, bn)
    factor = torch.tensor([1.0, 2**-0.5, 0.5])
    assert torch.allclose(folded.weight.flatten(), factor.repeat_interleave(2))
    assert torch.allclose(folded.bias, torch.tensor([1.0, 2**-0.5, 0.5]))  # (b - mu) * factor
    x = torch.randn(2, 2, 4, 4)
    assert torch.allclose(folded(x), bn(conv(x)), atol=1e-6)
    bn2 = nn.BatchNorm2d(3, eps=0.5).eval()
    with torch.no_grad():
        bn2.running_var.copy_(torch.tensor([0.5, 1.5, 3.5]))
        bn2.weight.copy_(torch.tensor([2.0, 1.0, -1.0]))
        bn2.bias.copy_(torch.tensor([0.5, 0.0, -0.5]))
    assert torch.allclose(fold_bn(conv, bn2).bias, torch.tensor([2.5, 2 * 2**-0.5, -2.0]))


def test_mse_observer_picks_the_best_grid_point():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3000, generator=g).abs() * torch.tensor([1.0, 3.0]).repeat(1500)
    x[0] = 25.0  # one outlier
    obs = MSEObserver(4, grid=20)
    obs.update(x)
    lo, hi = obs.range()
    errors = []
    for alpha in torch.linspace(1 / 20, 1.0, 20):
        s, z = calc_qparams(0.0, float(x.max()) * float(alpha), 4, False)
        errors.append(float((fake_quantize(x, s, z, 4, False) - x).pow(2).mean()))
    best = int(torch.tensor(errors).argmin())
    assert float(lo) == 0.0
    assert float(hi) == pytest.approx(float(x.max()) * (best + 1) / 20, rel=1e-5)
    assert 0 < best < 19  # an interior optimum: clipping the outlier pays at 4 bits


def test_percentile_observer_by_hand():
    obs = PercentileObserver(8, percentile=75.0)
    obs.update(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))
    lo, hi = obs.range()  # torch.quantile, linear interpolation: 25% -> 1.0, 75% -> 3.0
    assert float(lo) == 1.0 and float(hi) == 3.0


def test_integer_linear_weights_and_bias_by_reference():
    torch.manual_seed(1)
    layer = nn.Linear(6, 3)
    in_q = (torch.tensor(0.02), torch.tensor(100))
    int_layer = IntegerLinear(layer, in_q, (torch.tensor(0.05), torch.tensor(7)))
    w, b = layer.weight.detach(), layer.bias.detach()
    s_w = w.abs().amax(1) / 127.5  # symmetric per output channel
    assert torch.allclose(int_layer.s_w, s_w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q_w = torch.quantize_per_channel(
            w, s_w.double(), torch.zeros(3, dtype=torch.int64), 0, torch.qint8
        )
    assert torch.equal(int_layer.q_w, q_w.int_repr())
    assert torch.equal(int_layer.q_b, torch.round(b / (0.02 * s_w)).to(torch.int32))
    m0, n = quantize_multiplier(in_q[0].double() * s_w.double() / torch.tensor(0.05).double())
    assert torch.equal(int_layer.m0, m0) and torch.equal(int_layer.shift, n)
    # hand-checked accumulator on one input: sum (q_x - Z_x) q_w + q_b
    q_x = torch.tensor([[100, 101, 99, 110, 90, 100]], dtype=torch.int32)
    want = ((q_x - 100) * int_layer.q_w.int()).sum(1) + int_layer.q_b
    assert torch.equal(int_layer.accumulate(q_x), want.reshape(1, 3))
    relu = IntegerLinear(layer, in_q, (torch.tensor(0.05), torch.tensor(7)), relu=True)
    assert relu.qmin == 7 and int_layer.qmin == 0


# ---------------------------------------------------------------- properties (hypothesis)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 16),
    signed=st.booleans(),
    scale=st.floats(1e-4, 10.0),
    zp_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_fake_quantize_equals_torch_for_random_parameters(bits, signed, scale, zp_frac, seed):
    qmin, qmax = qrange(bits, signed)
    zp = qmin + int(round(zp_frac * (qmax - qmin)))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, generator=g) * scale * 2 ** (bits - 1)
    x[:20] = (torch.arange(20) - 10 + 0.5) * scale  # ties
    ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    out = fake_quantize(x, scale, zp, bits, signed)
    assert torch.equal(out, ref)
    assert torch.equal(fake_quantize(out, scale, zp, bits, signed), out)  # idempotent
    q = quantize(x, scale, zp, bits, signed)
    assert torch.equal(dequantize(q, scale, zp, bits=bits, signed=signed), out)
    xs, _ = x.sort()
    qs = quantize(xs, scale, zp, bits, signed)
    assert bool((qs[1:] >= qs[:-1]).all())  # monotone
    assert int(qs.min()) >= qmin and int(qs.max()) <= qmax


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 12),
    signed=st.booleans(),
    scale=st.floats(1e-3, 10.0),
    data=st.data(),
)
def test_quantize_recovers_every_grid_point(bits, signed, scale, data):
    qmin, qmax = qrange(bits, signed)
    zp = data.draw(st.integers(qmin, qmax))
    q = torch.arange(qmin, qmax + 1, dtype=torch.int32)
    grid = dequantize(q, scale, zp, bits=bits, signed=signed)
    assert torch.equal(quantize(grid, scale, zp, bits, signed), q)


def test_quantize_multiplier_rounds_to_nearest_and_renormalises():
    # 0.3 = 0.6 * 2^-1 = M0 * 2^(-31-1): 0.6 * 2^31 = 1288490188.8 -> 1288490189 (nearest)
    m0, n = quantize_multiplier(0.3)
    assert (int(m0), int(n)) == (1288490189, 1)
    # a mantissa that rounds up to 2^31 is renormalised to 2^30 with one more power of two
    m0, n = quantize_multiplier(1.0 - 2.0**-40)
    assert (int(m0), int(n)) == (2**30, -1)
    m0, n = quantize_multiplier(torch.tensor([1.0, 6.0]))  # 1 = 0.5 * 2, 6 = 0.75 * 8
    assert m0.tolist() == [2**30, 3 * 2**29] and n.tolist() == [-1, -3]


def test_per_channel_observer_on_axis_1_matches_torch():
    x = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.ao.quantization.PerChannelMinMaxObserver(
            ch_axis=1, dtype=torch.quint8, qscheme=torch.per_channel_affine
        )
        ref(x)
        rs, rz = ref.calculate_qparams()
    obs = MinMaxObserver(8, signed=False, axis=1)
    obs.update(x)
    s, z = obs.qparams()
    assert torch.allclose(s, rs) and torch.equal(z, rz.to(torch.int64))
    assert torch.equal(obs.min_val, x.amin(dim=(0, 2)))


def test_fake_quant_layer_weights_and_static_activations_exactly():
    torch.manual_seed(2)
    layer = nn.Linear(5, 3)
    fq = prepare_fake_quant(nn.Sequential(layer), weight_bits=4, act_bits=8)
    w = layer.weight.detach()
    s_c, z_c = calc_qparams(w.min(1).values, w.max(1).values, 4, True, symmetric=True)
    assert torch.equal(fq[0].quantized_weight(), fake_quantize(w, s_c, z_c, 4, True, axis=0))
    per_tensor = prepare_fake_quant(nn.Sequential(layer), weight_bits=4, per_channel=False)
    s_t, z_t = calc_qparams(w.min(), w.max(), 4, True, symmetric=True)
    assert torch.equal(per_tensor[0].quantized_weight(), fake_quantize(w, s_t, z_t, 4, True))
    # static: calibrated on [0, 1] -> S = 1/255, Z = 0; later inputs are clipped to that range
    calib = torch.linspace(0, 1, 50).reshape(10, 5)
    calibrate(fq, [(calib, None)], 1)
    assert float(fq[0].act_scale) == pytest.approx(1 / 255) and int(fq[0].act_zero_point) == 0
    x = torch.linspace(-2, 3, 20).reshape(4, 5)
    x_q = fake_quantize(x, fq[0].act_scale, fq[0].act_zero_point, 8, False)
    with torch.no_grad():
        want = torch.nn.functional.linear(x_q, fq[0].quantized_weight(), layer.bias)
        assert torch.equal(fq(x), want) and float(x_q.max()) == 1.0
    # dynamic: each batch's own range
    dyn = prepare_fake_quant(nn.Sequential(layer), weight_bits=4, act_bits=8, mode="dynamic")
    s_d, z_d = calc_qparams(x.min(), x.max(), 8, False)
    with torch.no_grad():
        want = torch.nn.functional.linear(
            fake_quantize(x, s_d, z_d, 8, False), dyn[0].quantized_weight(), layer.bias
        )
        assert torch.equal(dyn(x), want)


def test_kmeans_run_to_convergence_equals_sklearn():
    # tol = 0: iterate until the assignment is stable; this start needs ~100 Lloyd steps
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(0)
    w = torch.sign(torch.randn(4000, generator=g)) * -torch.log(torch.rand(4000, generator=g))
    init = torch.linspace(float(w.min()), float(w.max()), 32).double().numpy()
    km = KMeans(32, init=init.reshape(-1, 1), n_init=1, max_iter=1000, tol=0.0)
    km.fit(w.double().numpy().reshape(-1, 1))
    assert km.n_iter_ > 30
    cb, idx = kmeans_quantize(w, 5, iters=1000, tol=0.0)
    ours = float(((cb[idx] - w).double() ** 2).mean())
    assert ours == pytest.approx(km.inertia_ / len(w), rel=1e-6)
    theirs = torch.from_numpy(km.cluster_centers_.flatten()).sort().values.float()
    assert torch.allclose(cb, theirs, atol=1e-5)


def test_entropy_observer_keeps_zero_as_the_lower_bound_of_non_negative_data():
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(7)).abs()
    obs = EntropyObserver(8, signed=False)
    obs.update(x)
    lo, hi = obs.range()
    assert float(lo) == 0.0 and float(hi) == pytest.approx(kl_threshold(x, 8))
    obs.update(-x[:10])  # one negative value makes the range symmetric
    assert float(obs.range()[0]) == -float(obs.range()[1])
