"""Tests of utils.pruning: hand-checked cases, torch.nn.utils.prune and torch-pruning as references."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
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
    big = torch.randn(16, 8, 3, 4)
    mask = nm_mask(big, 2, 4)
    assert torch.equal(mask.reshape(-1, 4).sum(1), torch.full((big.numel() // 4,), 2.0))
    model = build_model("lenet5")
    masks = nm_prune(model, 2, 4)
    assert "conv1" not in masks and {"conv2", "fc1", "fc2"} <= set(masks)  # conv1 has 25 inputs
    assert float((model.fc1.weight == 0).float().mean()) == 0.5


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
