"""Tests of utils.pruning: hand-checked cases, torch.nn.utils.prune and torch-pruning as references."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch_pruning as tp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import TensorDataset

from utils.benchmark import count_parameters
from utils.data import make_loader
from utils.models import build_model
from utils.pruning import (
    ChannelGroup,
    GradualPruning,
    apply_masks,
    cached_finetune,
    channel_groups,
    cubic_sparsity,
    get_masks,
    global_magnitude_masks,
    global_threshold,
    iterative_taylor_prune,
    kept_channels,
    l1_channel_importance,
    magnitude_mask,
    magnitude_prune,
    make_permanent,
    model_storage_bytes,
    nm_mask,
    nm_prune,
    prunable_layers,
    prune_bn,
    prune_channels,
    prune_conv_out,
    prune_depthwise,
    prune_group,
    prune_in,
    sensitivity_scan,
    sparse_storage_bytes,
    taylor_activation_importance,
    taylor_channel_importance,
    weight_sparsity,
)
from utils.training import fit

MODELS = ("lenet300", "lenet5", "resnet", "mobilenet")


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Give every BN non-trivial statistics so that channel bookkeeping errors show up."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def _tiny_loader(n: int = 32) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return make_loader(TensorDataset(x, y), 16)


# ------------------------------------------------------------------ unstructured


def test_magnitude_mask_hand_checked():
    w = torch.tensor([[0.5, -0.1, 0.3], [-0.9, 0.05, 0.2]])
    mask = magnitude_mask(w, 0.5)  # round(0.5 * 6) = 3 smallest: 0.05, 0.1, 0.2
    assert torch.equal(mask, torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    assert torch.equal(magnitude_mask(w, 0.0), torch.ones_like(w))


@pytest.mark.parametrize("amount", [0.0, 0.1, 0.37, 0.5, 0.9, 0.99])
def test_magnitude_mask_equals_torch_prune_and_exact_sparsity(amount):
    layer = nn.Linear(37, 23)
    mask = magnitude_mask(layer.weight, amount)
    prune.l1_unstructured(layer, "weight", amount)
    assert torch.equal(mask, layer.weight_mask)
    assert int((mask == 0).sum()) == round(amount * layer.weight.numel())


@pytest.mark.parametrize("amount", [0.2, 0.8, 0.95])
def test_global_masks_equal_torch_global_unstructured(amount):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    weights = [model[0].weight, model[2].weight]
    masks = global_magnitude_masks(weights, amount)
    ref = copy.deepcopy(model)
    prune.global_unstructured(
        [(ref[0], "weight"), (ref[2], "weight")], pruning_method=prune.L1Unstructured, amount=amount
    )
    assert torch.equal(masks[0], ref[0].weight_mask)
    assert torch.equal(masks[1], ref[2].weight_mask)
    total = sum(w.numel() for w in weights)
    assert sum(int((m == 0).sum()) for m in masks) == round(amount * total)


def test_global_threshold_hand_checked():
    a, b = torch.tensor([0.1, -0.4, 0.9]), torch.tensor([[0.2, -0.05], [0.7, 0.3]])
    assert global_threshold([a, b], 3 / 7) == pytest.approx(0.2)
    masks = global_magnitude_masks([a, b], 3 / 7)
    assert torch.equal(masks[0], torch.tensor([0.0, 1.0, 1.0]))
    assert torch.equal(masks[1], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    assert global_threshold([a], 0.0) == 0.0


def test_masks_compose_with_training_and_make_permanent_like_prune_remove():
    torch.manual_seed(0)
    model = build_model("lenet300")
    ref = copy.deepcopy(model)
    masks = magnitude_prune(model, 0.7, scope="global")
    prune.global_unstructured(
        [(m, "weight") for m in prunable_layers(ref).values()],
        pruning_method=prune.L1Unstructured,
        amount=0.7,
    )
    for name, layer in prunable_layers(ref).items():
        assert torch.equal(masks[name], layer.weight_mask)
    assert weight_sparsity(model) == pytest.approx(0.7, abs=1e-6)
    fit(model, _tiny_loader(), epochs=1, lr=1e-2, progress=False)
    assert weight_sparsity(model) == pytest.approx(0.7, abs=1e-6)  # training keeps the zeros
    assert set(get_masks(model)) == set(masks)
    make_permanent(model)
    assert get_masks(model) == {}
    assert "weight" in dict(model.fc1.named_parameters())  # a plain parameter again
    assert weight_sparsity(model) == pytest.approx(0.7, abs=1e-6)
    for layer in prunable_layers(ref).values():
        prune.remove(layer, "weight")
    assert set(model.state_dict()) == set(ref.state_dict())


def test_apply_masks_replaces_an_existing_mask_and_layer_scope():
    model = build_model("lenet300")
    magnitude_prune(model, 0.5)
    for layer in prunable_layers(model).values():
        assert float((layer.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    magnitude_prune(model, 0.8, layers=["fc1"])
    assert float((model.fc1.weight == 0).float().mean()) == pytest.approx(0.8, abs=1e-3)
    assert len(model.fc1.parametrizations.weight) == 1


def test_nm_mask_hand_checked_and_exact():
    w = torch.tensor([[0.1, -0.5, 0.3, 0.2, 4.0, 3.0, -2.0, 1.0]])
    assert torch.equal(nm_mask(w, 2, 4), torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]]))
    assert torch.equal(nm_mask(w, 1, 4), torch.tensor([[0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]]))
    model = build_model("lenet5")
    masks = nm_prune(model, 2, 4)
    assert set(masks) == {"conv2", "fc1", "fc2"}  # conv1 has 1 input channel
    assert float((model.fc1.weight == 0).float().mean()) == 0.5


def test_nm_mask_groups_input_channels_of_a_conv_like_asp():
    # weight [K=1, C=4, R=1, S=2]: at s=0 the 4 channels hold 0.1 -0.5 0.3 0.2, at s=1 4 3 -2 1
    w = torch.tensor([[0.1, 4.0], [-0.5, 3.0], [0.3, -2.0], [0.2, 1.0]]).reshape(1, 4, 1, 2)
    expected = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]).reshape(1, 4, 1, 2)
    assert torch.equal(nm_mask(w, 2, 4), expected)
    # C·R·S = 8 is a multiple of 4 but C = 2 is not: the hardware cannot group it
    with pytest.raises(ValueError, match=r"shape\[1\] = 2\) must be a multiple of m=4"):
        nm_mask(torch.randn(3, 2, 2, 2), 2, 4)
    net = nn.Sequential(nn.Conv2d(2, 8, 2), nn.Conv2d(8, 4, 3))
    assert set(nm_prune(net, 2, 4)) == {"1"}


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 3),
    st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (2, 8)]),
    st.integers(0, 2**16),
)
def test_nm_mask_property_every_input_channel_group_keeps_n_largest(k, groups, r, s, nm, seed):
    n, m = nm
    w = torch.randn(k, groups * m, r, s, generator=torch.Generator().manual_seed(seed))
    mask = nm_mask(w, n, m)
    assert mask.shape == w.shape and mask.dtype == w.dtype
    by_channel = mask.movedim(1, -1).reshape(-1, m)  # groups of m consecutive input channels
    assert torch.equal(by_channel.sum(1), torch.full((by_channel.shape[0],), float(n)))
    mags = w.abs().movedim(1, -1).reshape(-1, m)
    kept_min = torch.where(by_channel == 1, mags, torch.inf).min(1).values
    dropped_max = torch.where(by_channel == 0, mags, -torch.inf).max(1).values
    assert bool((kept_min >= dropped_max).all())


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=60),
    st.floats(0.0, 0.99),
)
def test_magnitude_mask_property_exact_sparsity_and_order(values, amount):
    w = torch.tensor(values, dtype=torch.float64)
    mask = magnitude_mask(w, amount)
    assert mask.dtype == torch.float64 and mask.device == w.device
    assert int((mask == 0).sum()) == round(amount * w.numel())
    if 0 < int((mask == 0).sum()) < w.numel():
        assert float(w.abs()[mask == 1].min()) >= float(w.abs()[mask == 0].max())


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=1, max_size=20),
        min_size=1,
        max_size=4,
    ),
    st.floats(0.0, 0.99),
)
def test_global_masks_property_exact_total_sparsity_one_threshold(tensors, amount):
    weights = [torch.tensor(t) for t in tensors]
    masks = global_magnitude_masks(weights, amount)
    assert [m.shape for m in masks] == [w.shape for w in weights]
    total = sum(w.numel() for w in weights)
    assert sum(int((m == 0).sum()) for m in masks) == round(amount * total)
    kept = torch.cat([w.abs()[m == 1] for w, m in zip(weights, masks, strict=True)])
    dropped = torch.cat([w.abs()[m == 0] for w, m in zip(weights, masks, strict=True)])
    if kept.numel() and dropped.numel():
        assert float(kept.min()) >= float(dropped.max())
        assert float(dropped.max()) == global_threshold(weights, amount)


@pytest.mark.filterwarnings("ignore:Sparse CSR")
def test_storage_bytes_hand_checked_and_csr_matches_torch():
    w = torch.tensor([[0.0, 2.0, 0.0, 0.0], [1.0, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    assert sparse_storage_bytes(w, "dense") == 48
    assert sparse_storage_bytes(w, "csr") == 3 * 8 + 4 * 4
    assert sparse_storage_bytes(w, "bitmask") == 3 * 4 + 2
    assert sparse_storage_bytes(w, "nm", m=4) == 3 * 4 + 1  # 3 values × 2-bit positions
    csr = w.to_sparse_csr()
    csr_bytes = sum(t.numel() * 4 for t in (csr.values(), csr.col_indices(), csr.crow_indices()))
    assert sparse_storage_bytes(w, "csr") == csr_bytes  # same count with int32 indices
    model = build_model("lenet300")
    dense = model_storage_bytes(model, "dense")
    assert dense == 4 * count_parameters(model)
    magnitude_prune(model, 0.9, scope="global")
    assert model_storage_bytes(model, "dense") == dense  # zeros still cost bytes
    assert model_storage_bytes(model, "csr") < 0.25 * dense


# ------------------------------------------------------------ schedule and scan


def test_cubic_schedule():
    assert cubic_sparsity(0, 10, 0.8) == 0.0
    assert cubic_sparsity(10, 10, 0.8) == pytest.approx(0.8)
    assert cubic_sparsity(20, 10, 0.8) == pytest.approx(0.8)
    assert cubic_sparsity(5, 10, 0.8) == pytest.approx(0.8 - 0.8 * 0.5**3)
    values = [cubic_sparsity(t, 10, 0.9, 0.1) for t in range(11)]
    assert values == sorted(values) and values[0] == pytest.approx(0.1)


def test_gradual_pruning_reaches_final_sparsity_during_fit():
    model = build_model("lenet300")
    loader = _tiny_loader(64)  # 4 steps per epoch
    hook = GradualPruning(0.8, total_steps=6, every=2)
    fit(model, loader, epochs=2, lr=1e-3, after_step=hook, progress=False)
    assert [s for s, _ in hook.history] == [2, 4, 6]
    assert hook.history[-1][1] == pytest.approx(0.8)
    assert weight_sparsity(model) == pytest.approx(0.8, abs=1e-6)


def test_gradual_pruning_updates_every_k_steps_and_at_the_last_step():
    model = nn.Sequential(nn.Linear(10, 10, bias=False))
    hook = GradualPruning(0.8, total_steps=5, every=2, scope="layer")
    for _ in range(8):
        hook(model)
    # steps 2 and 4 (multiples of every), 5 (the last step); 6 and 8 change nothing
    assert [s for s, _ in hook.history] == [2, 4, 5]
    assert [t for _, t in hook.history] == pytest.approx(
        [0.8 - 0.8 * (1 - 2 / 5) ** 3, 0.8 - 0.8 * (1 - 4 / 5) ** 3, 0.8]
    )
    assert int((model[0].weight == 0).sum()) == 80


def test_sensitivity_scan_on_a_masked_model_prunes_the_effective_weights():
    torch.manual_seed(0)
    model = build_model("lenet300")
    masks = magnitude_prune(model, 0.5)  # every layer carries a 50% mask
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = sensitivity_scan(model, weight_sparsity, [0.5, 0.9], layers=["fc1", "fc2"])
    sizes = {n: m.weight.numel() for n, m in prunable_layers(model).items()}
    total = sum(sizes.values())
    others = {n: sum(round(0.5 * v) for k, v in sizes.items() if k != n) for n in sizes}
    assert [r["metric"] for r in rows] == pytest.approx(
        [
            0.5,  # the layer is already 50% sparse
            (others["fc1"] + round(0.9 * sizes["fc1"])) / total,
            0.5,
            (others["fc2"] + round(0.9 * sizes["fc2"])) / total,
        ]
    )
    assert set(get_masks(model)) == set(masks)  # the model keeps its masks, unchanged
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_sensitivity_scan_restores_weights():
    model = build_model("lenet300")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = sensitivity_scan(model, lambda m: weight_sparsity(m), [0.5, 0.9], layers=["fc1", "fc3"])
    assert [(r["layer"], r["sparsity"]) for r in rows] == [
        ("fc1", 0.5),
        ("fc1", 0.9),
        ("fc3", 0.5),
        ("fc3", 0.9),
    ]
    n1, n3 = model.fc1.weight.numel(), model.fc3.weight.numel()
    total = sum(m.weight.numel() for m in prunable_layers(model).values())
    assert rows[1]["metric"] == pytest.approx(round(0.9 * n1) / total)
    assert rows[2]["metric"] == pytest.approx(round(0.5 * n3) / total)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# -------------------------------------------------------------------- structured


def test_prune_group_hand_checked_conv_bn_conv():
    conv1, bn, conv2 = (
        nn.Conv2d(1, 3, 1, bias=False),
        nn.BatchNorm2d(3),
        nn.Conv2d(3, 2, 1, bias=False),
    )
    conv1.weight.data = torch.tensor([1.0, -3.0, 2.0]).view(3, 1, 1, 1)
    conv2.weight.data = torch.arange(6.0).view(2, 3, 1, 1)
    group = ChannelGroup("conv1", [conv1], [bn], [], [(conv2, 1)])
    assert torch.equal(l1_channel_importance(group), torch.tensor([1.0, 3.0, 2.0]))
    prune_group(group, [2, 1])
    assert conv1.out_channels == bn.num_features == conv2.in_channels == 2
    assert torch.equal(conv1.weight.view(-1), torch.tensor([-3.0, 2.0]))  # kept in order 1, 2
    assert torch.equal(conv2.weight.view(2, 2), torch.tensor([[1.0, 2.0], [4.0, 5.0]]))


def test_l1_channel_importance_is_the_l1_norm_not_l2():
    conv = nn.Conv2d(2, 2, 1, bias=False)
    conv.weight.data = torch.tensor([[3.0, 0.0], [-2.0, 2.0]]).view(2, 2, 1, 1)
    # L1: 3 < 4 keeps filter 1; L2 would be 3 > 2.83 and keep filter 0
    assert torch.equal(l1_channel_importance(ChannelGroup("c", [conv])), torch.tensor([3.0, 4.0]))
    net = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(2, 1, 1))
    assert torch.equal(prune_channels(net, 0.5)[0].weight.view(-1), torch.tensor([-2.0, 2.0]))


def test_kept_channels_is_the_floor_of_the_kept_fraction():
    assert kept_channels(6, 0.75) == 1  # 1.5 -> 1
    assert kept_channels(10, 0.9) == 1  # 10 * (1 - 0.9) = 0.9999999999999998 in floating point
    assert kept_channels(7, 0.5) == 3
    assert kept_channels(8, 0.0) == 8


def test_prune_group_linear_after_flatten_keeps_channel_blocks():
    conv, fc = nn.Conv2d(1, 3, 1), nn.Linear(3 * 4, 2)
    fc.weight.data = torch.arange(24.0).view(2, 12)
    prune_group(ChannelGroup("conv", [conv], [], [], [(fc, 4)]), [0, 2])
    assert fc.in_features == 8
    assert torch.equal(fc.weight[0], torch.tensor([0.0, 1, 2, 3, 8, 9, 10, 11]))


@pytest.mark.parametrize("name", MODELS)
def test_outputs_unchanged_when_removed_channels_are_zero(name):
    torch.manual_seed(0)
    model = _randomise_bn(build_model(name))
    pruned_ref = prune_channels(model, 0.5, criterion="random", seed=5)
    # zero exactly the channels the random criterion removes, then prune again by L1 norm
    zeroed = copy.deepcopy(model)
    groups = channel_groups(zeroed)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for g in groups:
            score = torch.rand(g.channels, generator=gen)
            drop = torch.ones(g.channels, dtype=torch.bool)
            drop[torch.topk(score, kept_channels(g.channels, 0.5)).indices] = False
            for layer in [*g.producers, *g.norms, *g.depthwise]:
                layer.weight[drop] = 0
                if layer.bias is not None:
                    layer.bias[drop] = 0
    pruned = prune_channels(zeroed, 0.5, criterion="l1")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed(x), rtol=1e-5, atol=1e-5)
    assert {k: v.shape for k, v in pruned.state_dict().items()} == {
        k: v.shape for k, v in pruned_ref.state_dict().items()
    }
    assert count_parameters(pruned) < 0.5 * count_parameters(model)
    assert get_masks(pruned) == {} and type(pruned) is type(model)


@pytest.mark.parametrize("name", MODELS)
def test_same_shapes_and_parameters_as_torch_pruning(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    ours = prune_channels(model, 0.5)
    theirs = copy.deepcopy(model)
    last = [m for m in theirs.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MagnitudePruner(
        theirs,
        torch.randn(1, 1, 28, 28),
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=[last],
    )
    pruner.step()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    assert count_parameters(ours) == count_parameters(theirs)


def test_same_model_as_torch_pruning_given_the_same_channels():
    torch.manual_seed(0)
    model = _randomise_bn(build_model("resnet"))
    ours = copy.deepcopy(model)
    theirs = copy.deepcopy(model)
    dg = tp.DependencyGraph().build_dependency(theirs, example_inputs=torch.randn(1, 1, 28, 28))
    their_modules = dict(theirs.named_modules())
    names = {m: n for n, m in ours.named_modules()}
    for g in channel_groups(ours):
        keep = torch.topk(l1_channel_importance(g), kept_channels(g.channels, 0.5)).indices
        drop = sorted(set(range(g.channels)) - set(keep.tolist()))
        root = their_modules[names[g.producers[0]]]
        dg.get_pruning_group(root, tp.prune_conv_out_channels, idxs=drop).prune()
        prune_group(g, keep)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs.state_dict()[k]), k
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_resnet_groups_couple_residual_widths():
    model = build_model("resnet")
    groups = channel_groups(model)
    stem = next(g for g in groups if g.name == "stem")
    assert model.layers[0].conv2 in stem.producers  # identity shortcut: same channels
    pruned = prune_channels(model, 0.5)
    widths = [b.conv2.out_channels for b in pruned.layers]
    assert widths == [8, 16, 32] and pruned.stem[0].out_channels == 8
    assert [b.conv1.out_channels for b in pruned.layers] == [8, 16, 32]


def test_taylor_importance_hand_checked_on_a_linear_chain():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    loader = make_loader(TensorDataset(x, y), 4)
    (score,) = taylor_channel_importance(model, channel_groups(model), loader)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    w, b = model[0].weight, model[0].bias
    expected = ((w.grad * w).sum(1) + b.grad * b) ** 2
    torch.testing.assert_close(score, expected.detach())
    pruned = prune_channels(model, 0.5, criterion="taylor", loader=loader)
    assert pruned[0].out_features == 1
    kept = int(torch.argmax(expected))
    assert torch.equal(pruned[0].weight[0], model[0].weight[kept].detach())


def test_cached_finetune_keeps_zeros_and_reuses_the_cache(tmp_cache):
    base = build_model("lenet300")
    loader = _tiny_loader()
    calls = []

    def build():
        calls.append(1)
        m = copy.deepcopy(base)
        magnitude_prune(m, 0.6)
        return m

    m1 = cached_finetune("t", {"what": "test"}, build, loader, epochs=1, lr=1e-2)
    assert get_masks(m1) == {} and weight_sparsity(m1) == pytest.approx(0.6, abs=1e-3)
    m2 = cached_finetune("t", {"what": "test"}, build, loader, epochs=1, lr=1e-2)
    assert len(list(tmp_cache.glob("t-*.pt"))) == 1
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in m1.state_dict().items())


# -------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clear_errors():
    w = torch.randn(4, 8)
    for amount in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="amount"):
            magnitude_mask(w, amount)
        with pytest.raises(ValueError, match="amount"):
            global_magnitude_masks([w], amount)
    with pytest.raises(TypeError, match="amount"):
        magnitude_mask(w, "half")
    with pytest.raises(TypeError, match="weight"):
        magnitude_mask([1.0, 2.0], 0.5)
    with pytest.raises(ValueError, match="weights"):
        global_threshold([], 0.5)
    with pytest.raises(ValueError, match="n must be <= m"):
        nm_mask(w, 5, 4)
    with pytest.raises(ValueError, match="multiple of m"):
        nm_mask(torch.randn(4, 6), 2, 4)
    with pytest.raises(ValueError, match="fmt"):
        sparse_storage_bytes(w, "coo")
    with pytest.raises(ValueError, match="scope"):
        magnitude_prune(build_model("lenet300"), 0.5, scope="model")
    model = build_model("lenet5")
    with pytest.raises(TypeError, match="only Conv2d and Linear"):
        magnitude_prune(model, 0.5, layers=["pool1"])
    with pytest.raises(ValueError, match="not a module"):
        magnitude_prune(model, 0.5, layers=["nope"])
    with pytest.raises(ValueError, match="shape"):
        apply_masks(model, {"fc2": torch.ones(3)})
    with pytest.raises(TypeError, match="unknown layer type"):
        channel_groups(nn.Sequential(nn.Conv2d(1, 4, 3), nn.LayerNorm(4), nn.Conv2d(4, 2, 3)))
    with pytest.raises(TypeError, match="does not know the structure"):
        prune_channels(nn.Transformer(d_model=8, nhead=2), 0.5)
    with pytest.raises(ValueError, match="width 0"):
        prune_channels(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3)), 0.6)
    with pytest.raises(ValueError, match="width of 0"):
        prune_group(channel_groups(model)[0], [])
    with pytest.raises(ValueError, match="needs a loader"):
        prune_channels(model, 0.5, criterion="taylor")
    with pytest.raises(ValueError, match="criterion"):
        prune_channels(model, 0.5, criterion="l2")
    masked = build_model("lenet5")
    magnitude_prune(masked, 0.5)
    with pytest.raises(ValueError, match="make_permanent"):
        prune_channels(masked, 0.5)
    with pytest.raises(TypeError, match="conv must be"):
        prune_conv_out(nn.ReLU(), [0])
    with pytest.raises(ValueError, match="keep indices must be in"):
        prune_conv_out(nn.Conv2d(1, 2, 3), [0, 2])
    with pytest.raises(ValueError, match="distinct"):
        prune_bn(nn.BatchNorm2d(3), [1, 1])
    with pytest.raises(TypeError, match="depthwise"):
        prune_depthwise(nn.Conv2d(2, 2, 3), [0])
    with pytest.raises(ValueError, match="not a multiple"):
        prune_in(nn.Linear(10, 2), [0], per_channel=3)
    with pytest.raises(TypeError, match="ungrouped"):
        prune_in(nn.Conv2d(4, 4, 3, groups=2), [0])
    with pytest.raises(ValueError, match="initial"):
        cubic_sparsity(1, 10, 0.5, initial=0.7)
    with pytest.raises(TypeError, match="evaluate_fn"):
        sensitivity_scan(model, 3, [0.5])
    with pytest.raises(ValueError, match="sparsities"):
        sensitivity_scan(model, weight_sparsity, [0.5, 1.0])


def test_bad_keep_indices_and_arguments_are_named():
    conv = nn.Conv2d(1, 3, 3)
    with pytest.raises(TypeError, match="integer channel indices"):
        prune_conv_out(conv, [0.5, 1.7])
    with pytest.raises(TypeError, match="integer channel indices"):
        prune_conv_out(conv, torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="integer channel indices"):
        prune_conv_out(conv, [True, False])
    with pytest.raises(ValueError, match=r"keep indices must be in \[0, 3\)"):
        prune_conv_out(conv, [-1, 0])
    with pytest.raises(ValueError, match="distinct"):
        prune_conv_out(conv, torch.tensor([2, 2]))
    with pytest.raises(TypeError, match="keep"):
        prune_conv_out(conv, "01")
    assert conv.out_channels == 3 and conv.weight.shape[0] == 3  # untouched by the failures
    with pytest.raises(TypeError, match="integer channel indices"):
        prune_conv_out(conv, np.array([0.0, 2.0]))
    prune_conv_out(conv, np.array([2, 0]))
    assert conv.out_channels == 2
    with pytest.raises(ValueError, match="final"):
        GradualPruning(final=1.0, total_steps=10)
    with pytest.raises(ValueError, match="final"):
        cubic_sparsity(1, 10, final=1.0)
    with pytest.raises(TypeError, match="layers must be a list"):
        magnitude_prune(build_model("lenet300"), 0.5, layers="fc1")
    with pytest.raises(ValueError, match="only 0 and 1"):
        apply_masks(build_model("lenet300"), {"fc3": torch.full((10, 100), 0.5)})
    with pytest.raises(ValueError, match="m must be >= 1"):
        nm_prune(build_model("lenet300"), 2, 0)
    with pytest.raises(ValueError, match="n must be <= m"):
        nm_prune(build_model("lenet300"), 4, 2)
    with pytest.raises(TypeError, match="seed"):
        prune_channels(build_model("lenet5"), 0.5, criterion="random", seed=0.5)
    with pytest.raises(TypeError, match="loss_fn"):
        taylor_channel_importance(
            build_model("lenet5"), [], _tiny_loader(), loss_fn="cross_entropy"
        )


# ------------------------------------------------- iterative Taylor pruning (2017)


def _taylor_net() -> nn.Module:
    """A conv chain where conv1's channel 2 and conv2's channel 4 feed nothing downstream."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )
    with torch.no_grad():
        net[2].weight[:, 2] = 0
        net[7].weight[:, 4] = 0
    net = _randomise_bn(net)
    net[3].running_mean.zero_()  # no channel is dead after the ReLU
    net[3].bias.data.fill_(0.5)
    return net


def _taylor_loader(shuffle: bool = True) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    return make_loader(TensorDataset(x, y), 16, shuffle=shuffle)


def test_taylor_activation_importance_hand_checked():
    net, loader = _taylor_net(), _taylor_loader(shuffle=False)
    scores = taylor_activation_importance(net, channel_groups(net), loader, num_batches=2)
    expected = [torch.zeros(4), torch.zeros(6)]
    for x, y in list(loader)[:2]:
        a1 = net[0](x)
        a2 = net[3](net[2](net[1](a1)))
        a1.retain_grad()
        a2.retain_grad()
        nn.functional.cross_entropy(net[5:](net[4](a2)), y).backward()
        for e, a in zip(expected, (a1, a2), strict=True):
            # per example: |mean over positions of a * dL/da|, then the mean over examples
            e += (a * a.grad).mean((2, 3)).abs().mean(0).detach() / 2
    for got, e in zip(scores, expected, strict=True):
        torch.testing.assert_close(got, e / e.norm())  # L2-normalised per layer
        assert got.device == e.device
    assert scores[0][2] == 0 and scores[1][4] == 0  # channels that feed nothing
    assert net.training is False


def test_iterative_taylor_prune_removes_the_useless_channels_one_by_one():
    net = _taylor_net()
    reference = copy.deepcopy(net)
    pruned, history = iterative_taylor_prune(
        net, _taylor_loader(), 0.2, channels_per_step=1, finetune_steps=0
    )
    # 10 channels, 20% = 2 removed in two rounds; the useless ones go, conv1's channel 2 first
    assert [(h["step"], h["layer"], h["channel"]) for h in history] == [(1, "0", 2), (2, "2", 4)]
    assert all(h["score"] == 0.0 for h in history)
    assert (pruned[0].out_channels, pruned[2].in_channels) == (3, 3)
    assert (pruned[2].out_channels, pruned[3].num_features, pruned[7].in_features) == (5, 5, 5)
    # without fine-tuning the kept weights are the original ones
    assert torch.equal(pruned[0].weight, reference[0].weight[[0, 1, 3]])
    assert torch.equal(pruned[2].weight, reference[2].weight[[0, 1, 2, 3, 5]][:, [0, 1, 3]])
    assert torch.equal(pruned[3].running_var, reference[3].running_var[[0, 1, 2, 3, 5]])
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():  # removing channels that feed nothing does not change the output
        torch.testing.assert_close(pruned(x), reference.eval()(x))
    assert all(
        torch.equal(a, b) for a, b in zip(net.parameters(), reference.parameters(), strict=True)
    )


def test_iterative_taylor_prune_fine_tunes_between_rounds_and_is_deterministic():
    runs = [
        iterative_taylor_prune(
            _taylor_net(),
            _taylor_loader(),
            0.5,
            channels_per_step=2,
            finetune_steps=3,
            lr=1e-2,
            seed=3,
        )
        for _ in range(2)
    ]
    (pruned, history), (again, history2) = runs
    assert history == history2
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in pruned.state_dict().items())
    assert len(history) == 5 and [h["step"] for h in history] == [1, 1, 2, 2, 3]
    assert pruned[0].out_channels + pruned[2].out_channels == 5
    kept = [c for c in range(4) if ("0", c) not in {(h["layer"], h["channel"]) for h in history}]
    # fine-tuning moved the kept weights away from the original ones
    assert not torch.equal(pruned[0].weight, _taylor_net()[0].weight[kept])
    assert get_masks(pruned) == {} and not pruned.training


def test_iterative_taylor_prune_bad_inputs():
    loader = _taylor_loader()
    with pytest.raises(ValueError, match="amount"):
        iterative_taylor_prune(_taylor_net(), loader, 1.0)
    with pytest.raises(ValueError, match="channels_per_step"):
        iterative_taylor_prune(_taylor_net(), loader, 0.5, channels_per_step=0)
    with pytest.raises(TypeError, match="loader"):
        iterative_taylor_prune(_taylor_net(), [1, 2], 0.5)
    with pytest.raises(ValueError, match="no channel"):
        iterative_taylor_prune(_taylor_net(), loader, 0.9, finetune_steps=0)
    with pytest.raises(ValueError, match="residual"):
        iterative_taylor_prune(build_model("resnet"), _tiny_loader(), 0.1)
    with pytest.raises(TypeError, match="groups"):
        taylor_activation_importance(_taylor_net(), "groups", loader)


# ------------------------------------------------------- devices and dtypes


def test_created_tensors_follow_the_inputs_device_and_dtype():
    w = torch.randn(4, 8, 3, 3, dtype=torch.float64)
    for mask in (magnitude_mask(w, 0.5), nm_mask(w, 2, 4), *global_magnitude_masks([w], 0.3)):
        assert (mask.device, mask.dtype) == (w.device, torch.float64)
    net = _taylor_net().double()
    groups = channel_groups(net)
    loader = make_loader(TensorDataset(torch.randn(8, 1, 8, 8).double(), torch.zeros(8).long()), 4)
    for scores in (
        taylor_activation_importance(net, groups, loader),
        taylor_channel_importance(net, groups, loader),
    ):
        assert all(s.device == w.device for s in scores)
    pruned = prune_channels(net, 0.5, criterion="random")
    assert {p.dtype for p in pruned.parameters()} == {torch.float64}
    assert all(p.device == w.device for p in pruned.parameters())
