"""Tests of utils.quantization: against PyTorch's production kernels and hand-worked cases."""

from __future__ import annotations

import warnings

import hypothesis.strategies as st
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


def test_all_zero_range_gives_valid_scale():
    s, z = calc_qparams(0.0, 0.0)
    assert float(s) > 0
    q = quantize(torch.zeros(3), s, z)
    assert q.tolist() == [-128, -128, -128] and dequantize(q, s, z).tolist() == [0.0, 0.0, 0.0]


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


def test_moving_average_observer_by_hand():
    obs = MovingAverageMinMaxObserver(8, averaging_constant=0.5)
    obs.update(torch.tensor([-2.0, 2.0]))
    obs.update(torch.tensor([0.0, 4.0]))
    lo, hi = obs.range()
    assert float(lo) == -1.0 and float(hi) == 3.0


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
    acc = torch.tensor([[10, 6, -6, 2000]], dtype=torch.int32)
    # 2.5 -> 3 (half up), 1.5 -> 2, -1.5 -> -1, 500 -> clamp 255 ; + Z = 0
    assert requantize(acc, m0, n, 0, -128, 255).tolist() == [[3, 2, -1, 255]]
    assert requantize(acc, m0, n, 10, 0, 255).tolist() == [[13, 12, 9, 255]]


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
    q_ref = ref / float(out_q[0]) + int(out_q[1])
    assert (q_y.float() - q_ref.clamp(0, 255)).abs().max() <= 1.0
    # and the dequantized output is within one output step of the float layer
    assert (dequantize(q_y, *out_q) - y).abs().max() <= float(out_q[0]) * 1.0 + 0.05


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


def test_kmeans_by_hand_and_codebook_size():
    w = torch.tensor([0.0, 0.1, 0.9, 1.0, 5.0, 5.2])
    codebook, idx = kmeans_quantize(w, bits=2)
    # init 0, 1.733, 3.467, 5.2 -> clusters {0, 0.1}, {0.9, 1.0}, {}, {5.0, 5.2}; the empty one is dropped
    assert torch.allclose(codebook, torch.tensor([0.05, 0.95, 5.1]))
    assert idx.tolist() == [0, 0, 1, 1, 2, 2]
    for bits in (1, 2, 3, 5):
        cb, ix = kmeans_quantize(torch.randn(40, 30), bits)
        assert len(cb) <= 2**bits and ix.shape == (40, 30) and int(ix.max()) < len(cb)


def test_kmeans_as_good_as_sklearn():
    from sklearn.cluster import KMeans

    w = torch.randn(4000)
    cb, idx = kmeans_quantize(w, bits=3, iters=100)
    ours = float(((cb[idx] - w) ** 2).sum())
    km = KMeans(8, n_init=4, random_state=0).fit(w.numpy().reshape(-1, 1))
    assert ours <= km.inertia_ * 1.02


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
