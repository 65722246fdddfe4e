"""Tests of utils.vision: the adapted torchvision models, block MACs by hand / count_macs / FlopCounterMode,
resolution scaling, the cached classifier, the course's pruning and INT8 on ResNet18, bad inputs."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import utils.vision as V
from utils.benchmark import count_macs, count_parameters, state_dict_bytes
from utils.data import make_loader
from utils.production import quantize_static_int8
from utils.pruning import prune_channels


def _torchvision_resnet18() -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR-style stem: 3×3 stride 1 on one channel, no max-pool."""
    tv = torchvision.models.resnet18(num_classes=10)
    tv.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    tv.maxpool = nn.Identity()
    return tv


def _flops_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of the convolutions and matmuls as FlopCounterMode counts them (FLOPs / 2)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(x)
    return counter.get_total_flops() // 2


def test_resnet18_equals_adapted_torchvision_resnet18():
    ours, tv = V.ResNet18(1.0), _torchvision_resnet18()
    x = torch.zeros(1, 1, 28, 28)
    assert count_parameters(ours) == count_parameters(tv) == 11_172_810
    assert count_macs(ours, x) == count_macs(tv, x) == _flops_macs(tv, x)
    assert ours(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    # the same layers in the same order: every conv/linear weight has the same shape
    shapes = [p.shape for n, p in ours.named_parameters() if p.dim() > 1]
    tv_shapes = [p.shape for n, p in tv.named_parameters() if p.dim() > 1]
    assert shapes == tv_shapes


def test_resnet18_width_multiplier_scales_every_stage():
    m = V.ResNet18(0.25)
    convs = [mod.out_channels for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert convs[0] == 16 and max(convs) == 128
    assert m.fc.in_features == 128
    assert V.scale_channels(64, 0.25) == 16 and V.scale_channels(10, 0.1) == 4
    assert V.scale_channels(100, 0.555) == 56


def test_mobilenet_v2_is_torchvision_with_a_small_input_stem():
    m = V.mobilenet_v2(1.0)
    assert isinstance(m, torchvision.models.MobileNetV2)
    stem = m.features[0][0]
    assert (stem.in_channels, stem.stride, stem.kernel_size) == (1, (1, 1), (3, 3))
    x = torch.zeros(1, 1, 28, 28)
    assert m.features(x).shape[-2:] == (4, 4), "total stride 8: 28×28 → 4×4"
    assert count_macs(m, x) == _flops_macs(m, x)
    # width 1.0 keeps torchvision's block parameters: only the stem (1 input channel) differs
    tv = torchvision.models.MobileNetV2(num_classes=10)
    diff = count_parameters(tv) - count_parameters(m)
    assert diff == 32 * 3 * 9 - 32 * 1 * 9
    assert count_parameters(V.mobilenet_v2(0.5)) < count_parameters(m) / 2


def test_conv_macs_by_hand():
    assert V.conv_macs(3, 8, 3, 4, 4) == 4 * 4 * 8 * 3 * 9
    assert V.conv_macs(8, 8, 3, 2, 5, groups=8) == 2 * 5 * 8 * 9
    assert V.conv_macs(4, 6, 1, 1, 1, groups=2) == 6 * 2


@pytest.mark.parametrize("cin,cout,k,stride", [(8, 16, 3, 1), (16, 32, 3, 2), (6, 4, 5, 1)])
def test_separable_block_macs_three_ways(cin, cout, k, stride):
    block = V.DepthwiseSeparableConv(cin, cout, k, stride)
    x = torch.zeros(1, cin, 12, 12)
    side = (12 + 2 * (k // 2) - k) // stride + 1
    by_hand = side * side * cin * k * k + side * side * cin * cout
    assert V.separable_macs(cin, cout, k, side, side) == by_hand
    assert count_macs(block, x) == by_hand == _flops_macs(block, x)
    standard = V.conv_macs(cin, cout, k, side, side)
    assert by_hand / standard == pytest.approx(1 / cout + 1 / k**2)
    params = sum(p.numel() for n, p in block.named_parameters() if p.dim() == 4)
    assert params == cin * k * k + cin * cout


@pytest.mark.parametrize("cin,cout,stride,t", [(16, 16, 1, 6), (16, 24, 2, 6), (8, 16, 1, 1)])
def test_inverted_residual_macs_three_ways(cin, cout, stride, t):
    block = V.InvertedResidual(cin, cout, stride, t)
    x = torch.zeros(1, cin, 9, 9)
    expected = V.inverted_residual_macs(cin, cout, stride, t, 9, 9)
    assert count_macs(block, x) == expected == _flops_macs(block, x)
    hidden, side = cin * t, -(-9 // stride)
    by_hand = (81 * cin * hidden if t != 1 else 0) + side * side * hidden * (9 + cout)
    assert expected == by_hand


def test_resize_images_and_at_resolution():
    x = torch.rand(3, 1, 28, 28)
    small = V.resize_images(x, 14)
    assert small.shape == (3, 1, 14, 14)
    # anti-aliased bilinear halving of a constant image keeps the constant
    assert torch.allclose(V.resize_images(torch.full((1, 1, 28, 28), 0.3), 14), torch.tensor(0.3))
    # a linear ramp stays a ramp sampled at the new pixel centres: column i of 14 sits at 2i + 0.5
    ramp = torch.arange(28.0).expand(1, 1, 28, 28)
    centres = 2 * torch.arange(14.0) + 0.5
    assert torch.allclose(V.resize_images(ramp, 14)[0, 0, 5, 2:-2], centres[2:-2], atol=1e-4)
    # anti-aliasing: one bright column in four averages to 1/4 (plain bilinear would sample the zeros)
    stripes = (torch.arange(28) % 4 == 0).float().expand(1, 1, 28, 28)
    assert torch.allclose(V.resize_images(stripes, 7)[0, 0, 3, 1:-1], torch.tensor(0.25), atol=0.02)
    assert V.resize_images(x, 28) is x
    assert V.resize_images(x, 40).shape[-1] == 40
    model = V.ResNet18(0.25)
    wrapped = V.at_resolution(model, 20)
    assert count_macs(wrapped, x[:1]) == count_macs(model, torch.zeros(1, 1, 20, 20))
    assert count_macs(model, torch.zeros(1, 1, 20, 20)) < count_macs(model, x[:1]) * 0.6


def test_course_pruning_and_int8_apply_to_resnet18():
    torch.manual_seed(0)
    model = V.ResNet18(0.25).eval()
    x = torch.randn(1, 1, 28, 28)
    pruned = prune_channels(model, 0.5)
    assert count_macs(pruned, x) < count_macs(model, x) / 3.5
    assert pruned(x).shape == (1, 10)
    loader = make_loader(
        torch.utils.data.TensorDataset(torch.randn(16, 1, 28, 28), torch.zeros(16).long()), 8
    )
    q = quantize_static_int8(pruned, loader, num_batches=2)
    assert (q(x) - pruned(x)).abs().max() < 0.5 * pruned(x).abs().max() + 0.1
    assert any("quantized" in type(m).__module__ for m in q.modules())


def test_classifier_config_is_the_cache_key():
    a = V.classifier_config("resnet18", 0.25)
    assert a["epochs"] == V.EPOCHS["fast"] and a["version"] == V.VISION_VERSION
    assert V.classifier_config("resnet18", 0.5) != a
    assert V.classifier_config("mobilenet_v2", 0.25) != a


def test_get_classifier_trains_once_and_caches(tmp_cache, one_thread):
    model = V.get_classifier("resnet18", 0.1, epochs=1)
    files = list(tmp_cache.glob("vision-resnet18-*.pt"))
    assert len(files) == 1
    again = V.get_classifier("resnet18", 0.1, epochs=1)
    for p, q in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    from utils.data import load_splits

    test = load_splits("mnist5k").test
    x, y = test.tensors
    acc = (V.predict(model, x[:500]) == y[:500]).float().mean()
    assert acc > 0.5, "one epoch of a narrow ResNet-18 on MNIST-5k must beat chance by far"


def test_predict_returns_labels():
    model = V.ResNet18(0.25)
    out = V.predict(model, torch.randn(4, 1, 28, 28))
    assert out.shape == (4,) and out.dtype == torch.long


def test_bad_inputs():
    with pytest.raises(ValueError, match="name must be one of"):
        V.build_vision_model("vgg16")
    with pytest.raises(ValueError, match="width must be > 0"):
        V.ResNet18(0.0)
    with pytest.raises(ValueError, match="width must be > 0"):
        V.mobilenet_v2(-1.0)
    with pytest.raises(ValueError, match="width must be > 0"):
        V.get_classifier("resnet18", 0)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 1, H, W\)"):
        V.ResNet18(0.25)(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"x must have shape \(N, 1, H, W\)"):
        V.ResNet18(0.25)(torch.randn(1, 28, 28))
    with pytest.raises(ValueError, match=r"images must be a batch of shape \(N, C, H, W\)"):
        V.resize_images(torch.randn(28, 28), 14)
    with pytest.raises(ValueError, match="images must have 1 channel"):
        V.check_images(torch.randn(2, 3, 8, 8), channels=1)
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        V.predict(V.ResNet18(0.25), [[0.0]])
    with pytest.raises(ValueError, match="size must be >= 4"):
        V.Resize(2)
    with pytest.raises(ValueError, match="groups=3 must divide"):
        V.conv_macs(4, 6, 3, 2, 2, groups=3)
    with pytest.raises(ValueError, match="stride must be <= 2"):
        V.inverted_residual_macs(8, 8, 3, 6, 4, 4)
    with pytest.raises(ValueError, match="cout must be >= 1"):
        V.DepthwiseSeparableConv(4, 0)


def test_compress_scene_model_bad_input():
    pytest.importorskip("utils.detection")
    with pytest.raises(ValueError, match="name must be one of"):
        V.compress_scene_model("classifier")
    with pytest.raises(ValueError, match="amount must be < 1"):
        V.compress_scene_model("detector", amount=1.0)
    with pytest.raises(ValueError, match="epochs must be >= 0"):
        V.compress_scene_model("segmenter", epochs=-1)


def test_latency_grid_rows_and_bad_input():
    grid = V.latency_grid(("resnet18",), (0.25,), (16, 24), rounds=1, repeats=1)
    assert list(grid["size"]) == [16, 24] and (grid.latency_ms > 0).all()
    assert grid.macs[1] > grid.macs[0]
    assert grid.macs[0] == count_macs(V.ResNet18(0.25), torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="names\\[i\\] must be one of"):
        V.latency_grid(("vgg",))
    with pytest.raises(ValueError, match="must not be empty"):
        V.latency_grid(widths=())


@pytest.mark.parametrize("name", ["detector", "segmenter"])
def test_compress_scene_model_stages_and_cache_key(name, monkeypatch):
    """Without training: the distillation is keyed by the teacher's recipe, the amount and the
    profile's distillation epochs; the stages are the teacher, its INT8 copy, the pruned and the
    distilled student and the student's INT8 copy."""
    D = pytest.importorskip("utils.detection")
    from utils.scenes import make_scenes

    torch.manual_seed(0)
    teacher = D.build_scene_model(name).eval()
    scenes = make_scenes(8, seed=0, split="train")
    seen = {}

    def fake_cache(prefix, key, build, train):
        seen.update(prefix=prefix, key=key)
        return build(), None, False

    monkeypatch.setattr(D, "get_scene_model", lambda n, seed=0: teacher)
    monkeypatch.setattr(D, "training_scenes", lambda n=None: scenes)
    monkeypatch.setattr(V, "cached_state", fake_cache)
    stages = V.compress_scene_model(name, amount=0.5)
    recipe = D.RECIPES["fast"]
    assert seen["prefix"] == f"ch08-{name}-distilled"
    assert seen["key"]["teacher"] == D.scene_model_config(name)
    assert (
        seen["key"]["amount"] == 0.5 and seen["key"]["epochs"] == recipe[f"{name}_distill_epochs"]
    )
    assert V.compress_scene_model(name, amount=0.25, epochs=3) and seen["key"]["epochs"] == 3
    assert seen["key"]["amount"] == 0.25
    assert list(stages) == ["fp32", "int8", "pruned", "distilled", "combined"]
    assert stages["fp32"] is teacher
    assert count_parameters(stages["pruned"]) < count_parameters(teacher)
    assert count_parameters(stages["distilled"]) == count_parameters(stages["pruned"])
    for stage in ("int8", "combined"):  # quantized: no float conv weights left
        assert not any(isinstance(m, nn.Conv2d) for m in stages[stage].modules()), stage
    # "int8" is the whole teacher in INT8, "combined" the half-width student: a larger file
    assert state_dict_bytes(stages["int8"]) > 1.5 * state_dict_bytes(stages["combined"])
