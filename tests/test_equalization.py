"""Tests of utils.equalization: SmoothQuant scales and folding, cross-layer equalization,
bias correction — each leaves the float function unchanged and makes quantization better."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from utils.equalization import (
    InputScaledLinear,
    bias_shift,
    channel_absmax,
    correct_bias,
    equalization_scales,
    equalize_model,
    equalize_pair,
    fold_smoothing,
    input_ranges,
    relu_conv_pairs,
    smooth_linears,
    smoothing_scales,
    weight_input_absmax,
)
from utils.quantization import (
    calc_qparams,
    calibrate,
    fake_quantize,
    fold_model_bn,
    prepare_fake_quant,
)


def fq(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    s, z = calc_qparams(x.min(), x.max(), bits, True, True)
    return fake_quantize(x, s, z, bits, True)


def outlier_block(seed: int = 0) -> tuple[nn.Sequential, torch.Tensor]:
    torch.manual_seed(seed)
    block = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 8)).eval()
    with torch.no_grad():
        block[0].weight.fill_(1.0)
        block[0].weight[[3, 11]] = 100.0
        block[0].bias.copy_(torch.linspace(-0.5, 0.5, 64))
    return block, torch.randn(256, 64) * 2 + 1


def w8a8_error(block: nn.Sequential, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = block(x)
        out = nn.functional.linear(fq(block[0](x)), fq(block[1].weight), block[1].bias)
    return float((out - ref).norm() / ref.norm())


# ------------------------------------------------------------------ ranges
def test_channel_absmax_hand_checked():
    x = torch.tensor([[1.0, -5.0], [-3.0, 2.0]])
    assert channel_absmax(x).tolist() == [3.0, 5.0]
    assert channel_absmax(x, dim=0).tolist() == [5.0, 3.0]
    w = torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    assert weight_input_absmax(w).tolist() == [2.0, 4.0]


def test_channel_absmax_bad_input():
    with pytest.raises(ValueError, match="dim must be"):
        channel_absmax(torch.ones(2, 3), dim=2)
    with pytest.raises(ValueError, match="at least one dimension"):
        channel_absmax(torch.tensor(1.0))
    with pytest.raises(ValueError, match="weight must be"):
        weight_input_absmax(torch.ones(3))


def test_input_ranges_records_the_max_per_input_channel():
    lin = nn.Linear(3, 2)
    model = nn.Sequential(lin)
    xs = [torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[-4.0, 1.0, 0.25]])]
    r = input_ranges(model, lambda m: [m(x) for x in xs])
    assert r["0"].tolist() == [4.0, 2.0, 0.5]
    conv = nn.Sequential(nn.Conv2d(2, 1, 1))
    rc = input_ranges(conv, lambda m: m(torch.tensor([[[[1.0]], [[-3.0]]]])), (nn.Conv2d,))
    assert rc["0"].tolist() == [1.0, 3.0]
    assert not lin._forward_pre_hooks  # hooks removed
    with pytest.raises(TypeError, match="run must be"):
        input_ranges(model, 3)
    with pytest.raises(ValueError, match="reached no layer"):
        input_ranges(model, lambda m: None)


# ------------------------------------------------------------------ SmoothQuant
def test_smoothing_scales_hand_checked():
    a, w = torch.tensor([4.0, 1.0, 9.0]), torch.tensor([1.0, 4.0, 1.0])
    assert torch.allclose(smoothing_scales(a, w, 0.5), torch.tensor([2.0, 0.5, 3.0]))
    assert torch.allclose(smoothing_scales(a, w, 1.0), a)
    assert torch.allclose(smoothing_scales(a, w, 0.0), 1.0 / w)
    assert torch.allclose(
        smoothing_scales(a, w, 0.75), a**0.75 / w**0.25
    )  # their eq. 4 at another alpha
    assert smoothing_scales(torch.tensor([0.0]), torch.tensor([1.0]), 0.5).item() > 0


def test_smoothing_scales_bad_input():
    with pytest.raises(ValueError, match="alpha"):
        smoothing_scales(torch.ones(3), torch.ones(3), 1.5)
    with pytest.raises(ValueError, match="one entry per input channel"):
        smoothing_scales(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match=">= 0"):
        smoothing_scales(-torch.ones(3), torch.ones(3))


def test_fold_smoothing_is_exact_and_fixes_per_tensor_w8a8():
    block, x = outlier_block()
    fixed = copy.deepcopy(block)
    with torch.no_grad():
        a = block[0](x).abs().amax(0)
    s = smoothing_scales(a, weight_input_absmax(fixed[1].weight), 0.5)
    fold_smoothing(fixed[0], [fixed[1]], s)
    with torch.no_grad():
        assert (fixed(x) - block(x)).abs().max() <= 1e-4
        assert torch.allclose(fixed[0](x) * s, block[0](x), atol=1e-4)  # LN now outputs X / s
    assert w8a8_error(fixed, x) <= w8a8_error(block, x) / 3


def test_fold_smoothing_bad_input():
    norm, lin = nn.LayerNorm(4), nn.Linear(4, 2)
    with pytest.raises(ValueError, match="scales must be > 0"):
        fold_smoothing(norm, [lin], torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="input features"):
        fold_smoothing(norm, [nn.Linear(3, 2)], torch.ones(4))
    with pytest.raises(ValueError, match="at least one"):
        fold_smoothing(norm, [], torch.ones(4))
    with pytest.raises(TypeError, match="norm must be"):
        fold_smoothing(nn.Linear(4, 4), [lin], torch.ones(4))


def test_input_scaled_linear_equals_the_layer():
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    ref = copy.deepcopy(lin)
    s = torch.rand(6) + 0.5
    wrapped = InputScaledLinear(lin, s)
    x = torch.randn(5, 6)
    assert torch.allclose(wrapped(x), ref(x), atol=1e-6)
    assert torch.allclose(wrapped.linear.weight, ref.weight * s)


def test_smooth_linears_keeps_float_and_helps_an_outlier_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].weight[[1, 7]] = 60.0
    x = torch.randn(128, 32)
    ranges = input_ranges(model, lambda m: m(x))
    smoothed = smooth_linears(model, [["1"]], ranges, alpha=0.5)
    assert isinstance(smoothed[1], InputScaledLinear) and isinstance(model[1], nn.Linear)
    with torch.no_grad():
        ref = model(x)
        assert (smoothed(x) - ref).abs().max() <= 1e-4

        def err(m: nn.Module) -> float:
            q = prepare_fake_quant(m, per_channel=True, mode="dynamic")
            return float((q(x) - ref).norm() / ref.norm())

        assert err(smoothed) < err(model) * 0.7
    with pytest.raises(ValueError, match="no range"):
        smooth_linears(model, [["3x"]], ranges)
    with pytest.raises(TypeError, match="non-empty list"):
        smooth_linears(model, ["1"], ranges)
    with pytest.raises(ValueError, match="at least one group"):
        smooth_linears(model, [], ranges)


# ------------------------------------------------------------------ CLE
def test_equalization_scales_hand_checked():
    s = equalization_scales(torch.tensor([4.0, 1.0]), torch.tensor([1.0, 9.0]))
    assert torch.allclose(s, torch.tensor([2.0, 1.0 / 3.0]))
    with pytest.raises(ValueError, match="must match"):
        equalization_scales(torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match=">= 0"):
        equalization_scales(-torch.ones(2), torch.ones(2))


def _unbalanced_pair(depthwise: bool) -> nn.Sequential:
    torch.manual_seed(0)
    c2 = nn.Conv2d(6, 6, 3, padding=1, groups=6) if depthwise else nn.Conv2d(6, 4, 3, padding=1)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), c2).eval()
    f = torch.tensor([0.02, 0.05, 1.0, 8.0, 0.1, 20.0])
    with torch.no_grad():
        net[0].weight.mul_(f.reshape(-1, 1, 1, 1))
        net[0].bias.mul_(f)
        net[2].weight.div_(f.reshape(-1, 1, 1, 1) if depthwise else f.reshape(1, -1, 1, 1))
    return net


@pytest.mark.parametrize("depthwise", [False, True])
def test_equalize_pair_is_exact_and_balances_ranges(depthwise):
    net = _unbalanced_pair(depthwise)
    eq = copy.deepcopy(net)
    s = equalize_pair(eq[0], eq[2])
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        assert (eq(x) - net(x)).abs().max() / net(x).abs().max() <= 1e-5
    r1 = channel_absmax(eq[0].weight, 0)
    r2 = channel_absmax(eq[2].weight, 0 if depthwise else 1)
    assert torch.allclose(r1, r2, rtol=1e-4)
    r1_0 = channel_absmax(net[0].weight, 0)
    r2_0 = channel_absmax(net[2].weight, 0 if depthwise else 1)
    assert torch.allclose(
        r1, torch.sqrt(r1_0 * r2_0), rtol=1e-4
    )  # Nagel et al.: both become sqrt(r1 r2)
    assert s.shape == (6,)

    def w4_error(m: nn.Sequential) -> float:
        q = copy.deepcopy(m)
        with torch.no_grad():
            for i in (0, 2):
                q[i].weight.copy_(fq(q[i].weight, 4))
            return float((q(x) - net(x)).norm() / net(x).norm())

    assert w4_error(eq) <= w4_error(net) / 2


def test_equalize_pair_bad_input():
    with pytest.raises(ValueError, match="must equal"):
        equalize_pair(nn.Conv2d(3, 4, 1), nn.Conv2d(5, 2, 1))
    with pytest.raises(ValueError, match="grouped convolutions"):
        equalize_pair(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1, groups=2))
    with pytest.raises(TypeError, match="conv1 must be"):
        equalize_pair(nn.Linear(3, 3), nn.Conv2d(3, 3, 1))


def test_equalize_model_on_mobilenet_keeps_float():
    from utils.models import SmallMobileNet

    torch.manual_seed(0)
    net = SmallMobileNet(width_mult=0.25).eval()
    with torch.no_grad():  # diverse BN scales, as training leaves them
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features) * 4 + 0.05)
                m.running_var.copy_(torch.rand(m.num_features) + 0.5)
    folded = fold_model_bn(net)
    pairs = relu_conv_pairs(folded)
    assert len(pairs) == 10 and pairs[0] == ("features.0.0", "features.1.0")
    eq = equalize_model(folded, iterations=2)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert (eq(x) - folded(x)).abs().max() / folded(x).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="BatchNorm2d"):
        equalize_model(net)
    with pytest.raises(ValueError, match="iterations"):
        equalize_model(folded, iterations=0)
    with pytest.raises(ValueError, match="no Conv2d"):
        equalize_model(nn.Sequential(nn.Linear(2, 2)))


def test_relu_conv_pairs_skips_pairs_without_a_single_relu():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Conv2d(2, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1))
    assert relu_conv_pairs(net) == [("1", "3")]
    net2 = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Sigmoid(), nn.Conv2d(2, 2, 1))
    assert relu_conv_pairs(net2) == []


# ------------------------------------------------------------------ bias correction
def test_bias_shift_hand_checked():
    lin = nn.Linear(2, 2)
    err = torch.tensor([[0.1, -0.2], [0.0, 0.3]])
    assert torch.allclose(bias_shift(lin, err, torch.tensor([1.0, 2.0])), torch.tensor([-0.3, 0.6]))
    conv = nn.Conv2d(2, 1, 2)
    e = torch.ones(1, 2, 2, 2) * 0.1
    # 4 taps × (0.1 · 1 + 0.1 · 3) = 1.6
    assert torch.allclose(bias_shift(conv, e, torch.tensor([1.0, 3.0])), torch.tensor([1.6]))
    dw = nn.Conv2d(2, 2, 1, groups=2)
    e = torch.tensor([0.5, -1.0]).reshape(2, 1, 1, 1)
    assert torch.allclose(bias_shift(dw, e, torch.tensor([2.0, 3.0])), torch.tensor([1.0, -3.0]))
    with pytest.raises(ValueError, match="must match the weight"):
        bias_shift(lin, torch.ones(3, 2), torch.ones(2))


def test_bias_shift_equals_the_mean_output_shift():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=0)
    x = torch.rand(64, 3, 10, 10) + 0.5
    err = torch.randn_like(conv.weight) * 0.01
    shifted = copy.deepcopy(conv)
    with torch.no_grad():
        shifted.weight.add_(err)
        want = (shifted(x) - conv(x)).mean(dim=(0, 2, 3))
        got = bias_shift(conv, err, x.mean(dim=(0, 2, 3)))
    assert torch.allclose(got, want, atol=1e-3)


def test_correct_bias_removes_the_mean_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.rand(256, 16) + 1.0  # a non-zero input mean makes the weight error biased
    batches = [(x[i : i + 64],) for i in range(0, 256, 64)]
    q = calibrate(prepare_fake_quant(model, weight_bits=3, per_channel=False), batches, 4)
    with torch.no_grad():
        ref = model(x)
        before = (q(x) - ref).mean(0).abs().mean()
        correct_bias(q, batches, 4)
        after = (q(x) - ref).mean(0).abs().mean()
    assert after < before / 2
    with pytest.raises(ValueError, match="no FakeQuantLayer"):
        correct_bias(model, batches)
    with pytest.raises(ValueError, match="no batch"):
        correct_bias(q, [], 4)


def test_relu_conv_pairs_rejects_a_relu_plus_another_activation():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Sigmoid(), nn.Conv2d(2, 2, 1))
    assert relu_conv_pairs(net) == []


def test_smooth_linears_group_uses_the_largest_weight_of_the_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Linear(4, 2), nn.Linear(4, 2))
    with torch.no_grad():
        model[2].weight.mul_(10.0)
    ranges = {"1": torch.ones(4) * 4.0, "2": torch.ones(4) * 4.0}
    smoothed = smooth_linears(model, [["1", "2"]], ranges, alpha=0.5)
    w = torch.maximum(weight_input_absmax(model[1].weight), weight_input_absmax(model[2].weight))
    want = smoothing_scales(ranges["1"], w, 0.5)
    assert torch.allclose(1.0 / smoothed[1].inv_scale, want)
    assert torch.allclose(1.0 / smoothed[2].inv_scale, want)
