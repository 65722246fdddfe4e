"""Tests of utils.dynamic: slimmable layers, BN recalibration, early-exit policy and accounting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from utils import dynamic as d
from utils.benchmark import count_macs
from utils.data import make_loader


def _net(seed: int = 0) -> d.SlimmableCNN:
    torch.manual_seed(seed)
    net = d.SlimmableCNN()
    # non-trivial BN parameters and statistics, so that a wrong slice shows
    for bn in (net.bn1, net.bn2, net.bn3):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _loader(n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g) * 2 + 0.5
    return make_loader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), 16)


# ---------------------------------------------------------------- slimmable network


def test_active_channels_rounds_and_keeps_one():
    assert d.active_channels(16, 1.0) == 16
    assert d.active_channels(16, 0.25) == 4
    assert d.active_channels(32, 0.3) == 10  # 9.6 → 10
    assert d.active_channels(64, 0.5) == 32
    assert d.active_channels(3, 0.1) == 1  # never zero channels
    with pytest.raises(ValueError, match="width must be > 0"):
        d.active_channels(16, 0.0)
    with pytest.raises(ValueError, match="width must be <= 1"):
        d.active_channels(16, 1.5)


@pytest.mark.parametrize("width", [0.25, 0.5, 0.75, 1.0, (0.25, 1.0, 0.5)])
def test_width_slicing_equals_a_separately_built_narrow_net(width):
    net = _net()
    x = torch.randn(5, 1, 28, 28)
    out = net.set_width(width)(x)
    c1, c2, c3 = net.active()
    widths = width if isinstance(width, tuple) else (width,) * 3
    assert (c1, c2, c3) == tuple(
        d.active_channels(c, w) for c, w in zip(d.SlimmableCNN.CHANNELS, widths, strict=True)
    )
    assert out.shape == (5, 10)
    # an ordinary narrow network, its weights copied by hand from the leading channels
    ref = d.plain_cnn(1, 10, (c1, c2, c3)).eval()
    with torch.no_grad():
        for i, (conv, bn, cin, cout) in enumerate(
            zip(
                (net.conv1, net.conv2, net.conv3),
                (net.bn1, net.bn2, net.bn3),
                (1, c1, c2),
                (c1, c2, c3),
                strict=False,
            )
        ):
            ref[4 * i].weight.copy_(conv.weight[:cout, :cin])
            ref[4 * i + 1].weight.copy_(bn.weight[:cout])
            ref[4 * i + 1].bias.copy_(bn.bias[:cout])
            ref[4 * i + 1].running_mean.copy_(bn.running_mean[:cout])
            ref[4 * i + 1].running_var.copy_(bn.running_var[:cout])
        ref[-1].weight.copy_(net.fc.weight[:, :c3])
        ref[-1].bias.copy_(net.fc.bias)
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)
    # extract_subnet builds the same network
    sub = d.extract_subnet(net, width)
    torch.testing.assert_close(sub(x), ref(x), rtol=1e-5, atol=1e-5)
    assert [m.out_channels for m in sub if isinstance(m, nn.Conv2d)] == [c1, c2, c3]
    assert net.width == (tuple(float(w) for w in widths)), "set_width keeps the chosen width"


def test_extract_subnet_restores_width_and_counts_macs():
    net = _net().set_width(0.5)
    sub = d.extract_subnet(net, 0.25)
    assert net.active() == (8, 16, 32), "extract_subnet must not change the net's width"
    c1, c2, c3 = 4, 8, 16
    expected = 28 * 28 * c1 * 9 + 14 * 14 * c2 * c1 * 9 + 7 * 7 * c3 * c2 * 9 + c3 * 10
    assert count_macs(sub, torch.zeros(1, 1, 28, 28)) == expected


def test_full_width_macs_shrink_quadratically():
    net = _net()
    x = torch.zeros(1, 1, 28, 28)
    full = count_macs(d.extract_subnet(net, 1.0), x)
    half = count_macs(d.extract_subnet(net, 0.5), x)
    assert 0.24 < half / full < 0.30  # ~w² for the inner layers, ~w for the first and the last


def test_set_width_rejects_bad_widths():
    net = _net()
    with pytest.raises(ValueError, match="width must be > 0"):
        net.set_width(0)
    with pytest.raises(ValueError, match="three numbers"):
        net.set_width((0.5, 0.5))
    with pytest.raises(TypeError, match="width must be a number"):
        net.set_width("half")
    with pytest.raises(ValueError, match="channels must be three ints"):
        d.SlimmableCNN(channels=(8, 16))
    with pytest.raises(TypeError, match="net must be SlimmableCNN"):
        d.extract_subnet(nn.Linear(2, 2), 0.5)


def test_training_mode_uses_batch_statistics_and_updates_shared_stats_only_at_full_width():
    net = _net().train()
    x = torch.randn(8, 1, 28, 28)
    before = net.bn1.running_mean.clone()
    net.set_width(0.5)(x)
    torch.testing.assert_close(net.bn1.running_mean, before)  # narrow width: shared stats untouched
    net.set_width(1.0)(x)
    assert not torch.equal(net.bn1.running_mean, before)  # largest width: updated
    # batch statistics: the BN output of the first stage has zero mean per channel
    net.set_width(0.5)
    h = net.bn1(net.conv1(x))
    torch.testing.assert_close(
        h.mean((0, 2, 3)), net.bn1.bias[: h.shape[1]].detach(), atol=1e-5, rtol=0
    )


def test_recalibration_changes_only_bn_statistics():
    net = _net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    loader = _loader()
    x = torch.randn(3, 1, 28, 28)
    y_full = net.set_width(1.0)(x)
    d.recalibrate_bn(net, loader, 0.5, batches=2)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed: recalibration may change BN statistics only"
    assert set(net.bn1.calibrated) == {8} and set(net.bn3.calibrated) == {32}
    assert net.active() == (8, 16, 32) and not net.training
    torch.testing.assert_close(net.set_width(1.0)(x), y_full)  # other widths untouched


def test_recalibrated_statistics_are_the_mean_of_batch_statistics():
    net = _net()
    loader = _loader(48)
    d.recalibrate_bn(net, loader, 0.25, batches=2)
    c1 = net.active()[0]
    xs = [x for x, _ in loader][:2]
    with torch.no_grad():
        hs = [F.conv2d(x, net.conv1.weight[:c1], None, 1, 1) for x in xs]
    mean = sum(h.mean((0, 2, 3)) for h in hs) / 2
    var = sum(h.var((0, 2, 3), unbiased=True) for h in hs) / 2
    got_mean, got_var = net.bn1.calibrated[c1]
    torch.testing.assert_close(got_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_var, var, rtol=1e-5, atol=1e-5)
    # the second BN sees the first one's output normalised with the *batch* statistics, as in training
    c2 = net.active()[1]
    with torch.no_grad():
        h2 = []
        for h in hs:
            z = F.batch_norm(h, None, None, net.bn1.weight[:c1], net.bn1.bias[:c1], True, 0.0, 1e-5)
            h2.append(F.conv2d(F.max_pool2d(F.relu(z), 2), net.conv2.weight[:c2, :c1], None, 1, 1))
    torch.testing.assert_close(
        net.bn2.calibrated[c2][0], sum(h.mean((0, 2, 3)) for h in h2) / 2, rtol=1e-4, atol=1e-5
    )
    # eval mode now normalises with them
    with torch.no_grad():
        h = net.bn1(hs[0])
        ref = F.batch_norm(
            hs[0], mean, var, net.bn1.weight[:c1], net.bn1.bias[:c1], False, 0.0, 1e-5
        )
    torch.testing.assert_close(h, ref, rtol=1e-4, atol=1e-4)
    # the extracted subnet carries them too
    sub = d.extract_subnet(net, 0.25)
    torch.testing.assert_close(sub[1].running_mean, mean, rtol=1e-5, atol=1e-5)
    d.clear_calibration(net)
    assert not net.bn1.calibrated
    with pytest.raises(ValueError, match="no batch"):
        d.recalibrate_bn(
            net, make_loader(TensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0)), 4), 0.5
        )


def test_sandwich_widths_and_loss():
    g = torch.Generator().manual_seed(0)
    ws = d.sandwich_widths(4, g)
    assert ws[0] == 1.0 and ws[1] == 0.25 and len(ws) == 4
    assert all(0.25 <= w <= 1.0 for w in ws[2:]) and ws[2] != ws[3]
    with pytest.raises(ValueError, match="n must be >= 2"):
        d.sandwich_widths(1)
    net = _net().train()
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    loss = d.make_sandwich_loss(4, seed=0)(net, x, y)
    assert net.width == (1.0, 1.0, 1.0), "the loss leaves the net at full width"
    # the same widths by hand: CE at 1.0, in-place distillation at the others
    torch.manual_seed(0)
    widths = d.sandwich_widths(4, torch.Generator().manual_seed(0))
    teacher = net.set_width(1.0)(x)
    want = F.cross_entropy(teacher, y)
    for w in widths[1:]:
        z = net.set_width(w)(x)
        want = want + (-(F.softmax(teacher.detach(), 1) * F.log_softmax(z, 1)).sum(1).mean())
    torch.testing.assert_close(loss, want)
    loss_ce = d.make_sandwich_loss(2, seed=0, inplace_distill=False)(net, x, y)
    want_ce = F.cross_entropy(net.set_width(1.0)(x), y) + F.cross_entropy(net.set_width(0.25)(x), y)
    torch.testing.assert_close(loss_ce, want_ce)


def test_inplace_distillation_loss_hand_case_and_no_teacher_gradient():
    s = torch.zeros(1, 2, requires_grad=True)
    t = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)
    loss = d.inplace_distillation_loss(s, t)  # CE([3/4, 1/4], [1/2, 1/2]) = log 2
    assert abs(loss.item() - math.log(2)) < 1e-6
    loss.backward()
    assert t.grad is None
    torch.testing.assert_close(s.grad, torch.tensor([[0.5 - 0.75, 0.5 - 0.25]]))
    with pytest.raises(ValueError, match="same shape"):
        d.inplace_distillation_loss(torch.zeros(1, 2), torch.zeros(1, 3))


# ---------------------------------------------------------------- early-exit policy


def test_exit_points_first_confident_exit_and_ties_exit():
    scores = torch.tensor(
        [
            [0.9, 0.5, 0.5, 0.8, 0.1],
            [0.1, 0.9, 0.5, 0.9, 0.7],
            [0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    assert d.exit_points(scores, 0.8).tolist() == [0, 1, 2, 0, 2]  # 0.8 ≥ 0.8 exits (≥, not >)
    assert d.exit_points(scores, [0.95, 0.6]).tolist() == [2, 1, 2, 1, 1]
    assert d.exit_points(scores, 0.0).tolist() == [0, 0, 0, 0, 0]
    assert d.exit_points(scores, 1.01).tolist() == [2, 2, 2, 2, 2]  # the last exit takes the rest
    assert d.exit_points(scores[:1], []).tolist() == [0] * 5
    with pytest.raises(ValueError, match="one value per early exit"):
        d.exit_points(scores, [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="2 dimensions"):
        d.exit_points(scores[0], 0.5)


def test_average_cost_uses_cumulative_costs():
    exits = torch.tensor([0, 0, 1, 2])
    assert d.average_cost(exits, [10, 30, 100]) == pytest.approx((10 + 10 + 30 + 100) / 4)
    assert d.average_cost(torch.tensor([2]), [1.0, 2.0, 3.0]) == 3.0
    with pytest.raises(ValueError, match=r"exit indices in \[0, 2\]"):
        d.average_cost(torch.tensor([3]), [1, 2, 3])
    with pytest.raises(ValueError, match="must not be empty"):
        d.average_cost(torch.tensor([], dtype=torch.long), [1, 2])


def test_exit_accuracy_and_sweep_and_choice():
    correct = torch.tensor(
        [[True, False, False, True], [True, True, False, True], [True, True, True, False]]
    )
    scores = torch.tensor([[0.9, 0.9, 0.2, 0.6], [0.9, 0.9, 0.2, 0.9], [1.0, 1.0, 1.0, 1.0]])
    exits = torch.tensor([0, 1, 2, 2])
    assert d.exit_accuracy(correct, exits) == pytest.approx(75.0)
    table = d.threshold_sweep(scores, correct, [1, 2, 4], [0.5, 0.95])
    # t = 0.5: exits [0, 0, 2, 0] → correct [T, F, T, T]; cost (1 + 1 + 4 + 1) / 4
    assert table.loc[0, "accuracy"] == pytest.approx(75.0)
    assert table.loc[0, "avg_cost"] == pytest.approx(7 / 4)
    assert table.loc[0, ["exit_1", "exit_2", "exit_3"]].tolist() == [0.75, 0.0, 0.25]
    # t = 0.95: everyone at the last exit → [T, T, T, F], cost 4
    assert table.loc[1, "accuracy"] == pytest.approx(75.0) and table.loc[1, "avg_cost"] == 4.0
    # the budget decides; ties of accuracy go to the cheaper threshold
    assert d.choose_threshold(scores, correct, [1, 2, 4], 4.0, [0.5, 0.95]) == 0.5
    assert d.choose_threshold(scores, correct, [1, 2, 4], 4.0, [0.7, 0.95]) == 0.7
    # t = 0.7: exits [0, 0, 2, 1] → [T, F, T, T] 75 %, cost 8/4 = 2
    assert d.choose_threshold(scores, correct, [1, 2, 4], 2.0, [0.7, 0.95]) == 0.7
    with pytest.raises(ValueError, match="no threshold in grid meets budget"):
        d.choose_threshold(scores, correct, [1, 2, 4], 1.0, [0.7, 0.95])


def test_exit_scores_max_prob_and_entropy():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [100.0, 0.0]])
    torch.testing.assert_close(d.exit_scores(logits), torch.tensor([0.5, 0.75, 1.0]))
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    torch.testing.assert_close(
        d.exit_scores(logits, "entropy"), torch.tensor([0.0, 1 - h / math.log(2), 1.0])
    )
    with pytest.raises(ValueError, match="criterion must be one of"):
        d.exit_scores(logits, "margin")


def test_early_exit_cnn_prefixes_costs_and_dynamic_forward():
    torch.manual_seed(0)
    model = d.EarlyExitCNN().eval()
    x = torch.randn(4, 1, 28, 28)
    outs = model(x)
    assert len(outs) == 3 and all(o.shape == (4, 10) for o in outs)
    for k in range(3):
        torch.testing.assert_close(model.forward_until(x, k), outs[k])
    costs = d.exit_costs(model, x)
    assert not model.training, "counting MACs must not switch the model to training mode"
    assert costs == sorted(costs) and len(set(costs)) == 3
    # exit 1: conv 1→8 at 28×28 + the head's Linear(128, 10)
    assert costs[0] == 28 * 28 * 8 * 9 + 128 * 10
    assert costs[2] == count_macs(model, x[:1])  # the last exit runs everything
    with torch.no_grad():
        logits, k = model.dynamic_forward(x[:1], 0.0)
        assert k == 0
        torch.testing.assert_close(logits, outs[0][:1])
        logits, k = model.dynamic_forward(x[:1], [1.01, 1.01])
        assert k == 2
        torch.testing.assert_close(logits, outs[2][:1])
    assert list(d.exit_prefixes(model)) == ["exit 1", "exit 2", "exit 3"]
    with pytest.raises(ValueError, match="k must be <= 2"):
        model.forward_until(x, 3)


def test_exit_loss_sums_the_exits():
    torch.manual_seed(0)
    model = d.EarlyExitCNN()
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    outs = model(x)
    want = (
        F.cross_entropy(outs[0], y)
        + 0.5 * F.cross_entropy(outs[1], y)
        + 2 * F.cross_entropy(outs[2], y)
    )
    torch.testing.assert_close(d.exit_loss((1.0, 0.5, 2.0))(model, x, y), want)
    with pytest.raises(ValueError, match="3 exits but 2 weights"):
        d.exit_loss((1.0, 1.0))(model, x, y)


# ---------------------------------------------------------------- MiniLM exits and data


def test_intent_splits_carve_a_stratified_validation_set():
    from utils.nlp import intent_names, load_classification

    splits = d.intent_splits()
    train, _ = load_classification("train")
    assert len(splits["train"][0]) + len(splits["val"][0]) == len(train)
    assert not set(splits["train"][0]) & set(splits["val"][0])
    assert splits["test"][0] == load_classification("test")[0]
    counts = torch.bincount(splits["val"][1], minlength=len(intent_names()))
    full = torch.bincount(torch.tensor(load_classification("train")[1]))
    assert torch.equal(counts, full // 4), "every 4th sentence of each intent"
    with pytest.raises(ValueError, match="val_every must be >= 2"):
        d.intent_splits(1)


@pytest.fixture(scope="module")
def minilm_exits():
    from utils.minilm import load_minilm

    torch.manual_seed(0)
    return d.MiniLMExits(load_minilm(), 4).eval()


def test_minilm_exits_prefix_equals_full_pass(minilm_exits):
    from utils.minilm import tokenize

    batch = tokenize(["The storm hit the coast last night.", "A new phone was released."])
    outs = minilm_exits(batch)
    assert len(outs) == 3 and outs[0].shape == (2, 4)
    one = tokenize(["The storm hit the coast last night."])
    for k in range(3):
        with torch.no_grad():
            alone = minilm_exits.forward_until(one["input_ids"], k)
        torch.testing.assert_close(alone, outs[k][:1], rtol=1e-4, atol=1e-4)


def test_minilm_exit_costs_are_linear_in_length(minilm_exits):
    costs = d.text_exit_costs(minilm_exits, torch.tensor([1, 5, 12]))
    assert costs.shape == (3, 3)
    d_model, heads = 384, 4
    per_layer_per_token = 12 * d_model * d_model  # Q, K, V, O (4·d²) + FFN (2·d·4d)
    for k, layer in enumerate(d.EXIT_LAYERS):
        for j, n in enumerate((1, 5, 12)):
            want = layer * n * per_layer_per_token + (k + 1) * d_model * heads
            assert costs[k, j].item() == want
        ids = torch.ones(1, 7, dtype=torch.long)
        assert (
            count_macs(d._Prefix(minilm_exits, k), ids)
            == d.text_exit_costs(minilm_exits, torch.tensor([7]))[k, 0].item()
        )


def test_minilm_exits_rejects_bad_layers(minilm_exits):
    with pytest.raises(ValueError, match="exit_layers must increase"):
        d.MiniLMExits(minilm_exits.encoder, 4, (2, 4))
    with pytest.raises(ValueError, match="exit_layers must increase"):
        d.MiniLMExits(minilm_exits.encoder, 4, (4, 2, 6))


def test_fit_exit_heads_learns_separable_classes(minilm_exits):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    centers = torch.randn(4, 384, generator=g)
    pooled = torch.stack([centers[labels] + 0.1 * torch.randn(40, 384, generator=g)] * 3)
    d.fit_exit_heads(minilm_exits, pooled, labels, steps=50)
    for head, p in zip(minilm_exits.heads, pooled, strict=True):
        assert (head(p).argmax(1) == labels).all()
    with pytest.raises(ValueError, match="pooled must be"):
        d.fit_exit_heads(minilm_exits, pooled[:2], labels)


# ---------------------------------------------------------------- search


def test_random_search_respects_budget_and_sorts(one_thread):
    net = _net()
    loader = _loader(32)
    labelled = make_loader(
        TensorDataset(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))), 16
    )
    full = count_macs(d.extract_subnet(net, 1.0), torch.zeros(1, 1, 28, 28))
    table = d.random_search(net, loader, labelled, full // 3, candidates=8, seed=0)
    assert len(table) == 8 and len(set(table["widths"])) == 8
    evaluated = table.dropna()
    assert (evaluated["macs"] <= full // 3).all() and not evaluated.empty
    assert (table[table["accuracy"].isna()]["macs"] > full // 3).all()
    assert list(evaluated["accuracy"]) == sorted(evaluated["accuracy"], reverse=True)
    assert net.width == (1.0, 1.0, 1.0)


def test_cached_trainers_keep_their_cache_configs(monkeypatch):
    """What names the cache file of each trainer is pinned: a refactor must not retrain
    (``utils.cache.config_key`` hashes exactly these dicts), and no trainer may share a file."""
    import utils.cache

    class Stop(Exception):
        pass

    seen = {}

    def record(name, config, build, train):
        seen[name] = config
        model = build()  # the architecture the cached weights must load into
        assert isinstance(model, nn.Module) and callable(train)
        raise Stop

    monkeypatch.setattr(utils.cache, "cached_state", record)
    for load in (
        lambda: d.load_slimmable(epochs=3),
        lambda: d.load_early_exit(epochs=3, seed=2),
        lambda: d.load_fixed_width(0.5, epochs=3, lr=1e-3),
    ):
        with pytest.raises(Stop):
            load()
    common = {"epochs": 3, "version": d.VERSION}
    assert seen == {
        "ch10-us-cnn": {"model": "us-cnn", "seed": 0, "lr": 3e-3, **common},
        "ch10-exit-cnn": {"model": "exit-cnn", "seed": 2, "lr": 3e-3, **common},
        "ch10-fixed-cnn": {
            "model": "fixed-cnn",
            "channels": [8, 16, 32],
            "seed": 0,
            "lr": 1e-3,
            **common,
        },
    }
