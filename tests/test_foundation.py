"""Unit tests of the foundation modules: config, validation, data, models, training, cache."""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from utils import cache, config, data, models, training, validation

pytestmark = pytest.mark.usefixtures("one_thread")


# --- config -----------------------------------------------------------------
def test_profile_switch(monkeypatch):
    assert config.get_profile().name == "fast"
    monkeypatch.setenv("COURSE_PROFILE", "full")
    full = config.get_profile()
    assert full.name == "full" and full.epochs > config.get_profile("fast").epochs
    monkeypatch.setenv("COURSE_PROFILE", "huge")
    with pytest.raises(ValueError, match="profile must be one of"):
        config.get_profile()


def test_device_and_seed():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert config.get_device() == torch.device(expected)
    assert config.get_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="prefer"):
        config.get_device("tpu")
    g = config.seed_everything(3)  # seeds Python, NumPy and torch with 3, returns a generator
    assert random.random() == random.Random(3).random()
    assert np.random.rand() == np.random.RandomState(3).rand()
    reference = torch.rand(3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.rand(3), reference)
    assert torch.equal(torch.rand(3, generator=g), reference)
    with pytest.raises(ValueError, match="seed"):
        config.seed_everything(-1)


# --- validation -------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "exc", "msg"),
    [
        (lambda: validation.check_int("n", 1.5), TypeError, "n must be an int"),
        (lambda: validation.check_int("n", True), TypeError, "n must be an int"),
        (lambda: validation.check_int("n", 0, minimum=1), ValueError, "n must be >= 1"),
        (lambda: validation.check_int("n", 9, maximum=8), ValueError, "n must be <= 8"),
        (lambda: validation.check_float("t", float("nan")), ValueError, "t must be finite"),
        (
            lambda: validation.check_float("t", 0.0, 0.0, min_inclusive=False),
            ValueError,
            "t must be > 0",
        ),
        (lambda: validation.check_float("t", "1"), TypeError, "t must be a number"),
        (
            lambda: validation.check_choice("c", "x", ("a", "b")),
            ValueError,
            r"c must be one of \['a', 'b'\]",
        ),
        (lambda: validation.check_module("m", 3), TypeError, "m must be a torch.nn.Module"),
        (lambda: validation.check_tensor("x", [1]), TypeError, "x must be a torch.Tensor"),
        (lambda: validation.check_tensor("x", torch.ones(2), ndim=2), ValueError, "2 dimensions"),
        (
            lambda: validation.check_tensor("x", torch.tensor([float("inf")]), finite=True),
            ValueError,
            "finite",
        ),
        (lambda: validation.check_type("s", 1, str), TypeError, "s must be str"),
    ],
)
def test_validation_errors_name_the_argument(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


# --- data -------------------------------------------------------------------
def _rows(*datasets: TensorDataset) -> Counter:
    """Multiset of (image bytes, label) over the data sets."""
    rows: Counter = Counter()
    for ds in datasets:
        x, y = ds.tensors
        images = x.numpy().reshape(len(x), -1)
        rows.update(zip((r.tobytes() for r in images), y.tolist(), strict=True))
    return rows


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_splits_partition_the_data_set_by_class(name):
    """train ∪ val ∪ test is the data set, each example exactly once, each class split 70/10/20."""
    s = data.load_splits(name, seed=0)
    x, y, _ = data._raw_arrays(name)
    whole = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    assert _rows(s.train, s.val, s.test) == _rows(whole)  # disjoint and complete
    per_class = np.bincount(y)
    n_train = [round(0.7 * n) for n in per_class]
    n_val = [round(0.1 * n) for n in per_class]
    n_test = [n - a - b for n, a, b in zip(per_class, n_train, n_val, strict=True)]
    for split, expected in ((s.train, n_train), (s.val, n_val), (s.test, n_test)):
        assert torch.bincount(split.tensors[1], minlength=len(per_class)).tolist() == expected


def test_digits_split_depends_on_the_seed_only():
    a, b = data.load_splits("digits", seed=3), data.load_splits("digits", seed=3)
    c = data.load_splits("digits", seed=4)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert torch.equal(a.val.tensors[0], b.val.tensors[0])
    assert _rows(a.val) != _rows(c.val) and _rows(a.test) != _rows(c.test)


def test_mnist5k_splits_are_stratified_seeded_and_disjoint():
    s = data.load_splits("mnist5k", seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (3500, 500, 1000)
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    counts = torch.bincount(s.test.tensors[1], minlength=10)
    assert torch.all(counts == 100)
    again = data.load_splits("mnist5k", seed=0)
    assert torch.equal(s.train.tensors[0], again.train.tensors[0])
    other = data.load_splits("mnist5k", seed=1)
    assert not torch.equal(s.train.tensors[1], other.train.tensors[1])
    x = s.train.tensors[0]
    assert abs(x.mean().item()) < 0.2 and 0.8 < x.std().item() < 1.2  # normalised


def test_digits_and_train_fraction():
    s = data.load_splits("digits", train_fraction=0.2)
    assert s.input_shape == (1, 8, 8) and s.num_classes == 10
    full = data.load_splits("digits")
    # a stratified subset of the same training split: round(0.2 · n_c) of each class c
    assert Counter(_rows(s.train)) <= Counter(_rows(full.train))
    full_counts = torch.bincount(full.train.tensors[1], minlength=10).tolist()
    assert torch.bincount(s.train.tensors[1], minlength=10).tolist() == [
        round(0.2 * n) for n in full_counts
    ]
    assert _rows(s.test) == _rows(full.test) and _rows(s.val) == _rows(full.val)


def _order(loader: DataLoader) -> list[int]:
    return torch.cat([x[:, 0] for (x,) in loader]).long().tolist()


def test_make_loader_order_is_fixed_by_the_seed():
    ds = TensorDataset(torch.arange(50.0).unsqueeze(1))
    plain = data.make_loader(ds, 8)
    assert _order(plain) == list(range(50)) and plain.batch_size == 8
    a, b = (
        data.make_loader(ds, 8, shuffle=True, seed=5),
        data.make_loader(ds, 8, shuffle=True, seed=5),
    )
    c = data.make_loader(ds, 8, shuffle=True, seed=6)
    first, again, other = _order(a), _order(b), _order(c)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert first == again and first != other
    second = _order(a)  # the next epoch: a new order, the same one for the same seed
    assert second != first and second == _order(b)


def _order_of_labels(loader: DataLoader) -> list[int]:
    return torch.cat([y for _, y in loader]).tolist()


def test_loaders_are_reproducible():
    a, val, test = data.load_loaders("digits", batch_size=16, seed=5)
    b, _, _ = data.load_loaders("digits", batch_size=16, seed=5)
    c, _, _ = data.load_loaders("digits", batch_size=16, seed=6)
    assert torch.equal(next(iter(a))[1], next(iter(b))[1])
    assert not torch.equal(next(iter(a))[1], next(iter(c))[1])
    s = data.load_splits("digits", seed=5)
    assert a.batch_size == val.batch_size == test.batch_size == 16
    assert torch.equal(torch.cat([y for _, y in val]), s.val.tensors[1])  # not shuffled
    assert torch.equal(torch.cat([y for _, y in test]), s.test.tensors[1])
    assert _rows(a.dataset) == _rows(s.train)
    fresh, _, _ = data.load_loaders("digits", batch_size=16, seed=5)
    assert _order_of_labels(fresh) == _order_of_labels(
        data.make_loader(s.train, 16, shuffle=True, seed=5)
    )
    half, _, _ = data.load_loaders("digits", batch_size=16, seed=5, train_fraction=0.5)
    assert _rows(half.dataset) == _rows(
        data.load_splits("digits", seed=5, train_fraction=0.5).train
    )
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        data.load_loaders("digits", batch_size=0)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"name": "imagenet"}, ValueError, r"name must be one of \['mnist5k', 'digits'\]"),
        ({"fractions": (0.5, 0.5)}, ValueError, "fractions must be three positive numbers"),
        ({"fractions": (0.8, 0.3, -0.1)}, ValueError, "fractions must be three positive numbers"),
        ({"fractions": [0.7, 0.1, 0.2]}, TypeError, "fractions must be tuple"),
        ({"fractions": (0.7, "0.1", 0.2)}, TypeError, r"fractions\[i\] must be a number"),
        ({"train_fraction": 0.0}, ValueError, "train_fraction must be > 0"),
        ({"train_fraction": 1.5}, ValueError, "train_fraction must be <= 1"),
        ({"train_fraction": 1e-4}, ValueError, "leave a split"),
        ({"seed": "0"}, TypeError, "seed must be an int"),
        ({"seed": -1}, ValueError, "seed must be >= 0"),
    ],
)
def test_load_splits_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        data.load_splits(**{"name": "digits", **kwargs})


def test_online_loader_fails_offline_with_advice(tmp_path):
    with pytest.raises(RuntimeError, match="offline data sets"):
        data.load_online("mnist", tmp_path, download=False)
    with pytest.raises(ValueError, match="name must be one of"):
        data.load_online("svhn", tmp_path)


def test_make_loader_bad_input():
    with pytest.raises(TypeError, match="dataset"):
        data.make_loader([1, 2, 3])
    with pytest.raises(ValueError, match="batch_size"):
        data.make_loader(data.load_splits("digits").test, 0)
    with pytest.raises(TypeError, match="shuffle must be bool"):
        data.make_loader(TensorDataset(torch.zeros(2)), 1, shuffle="yes")
    with pytest.raises(ValueError, match="seed must be >= 0"):
        data.make_loader(TensorDataset(torch.zeros(2)), 1, seed=-1)


# --- models -----------------------------------------------------------------
def test_deep_compression_parameter_counts():
    """Han et al. (2016), Table 2/3: LeNet-300-100 has 267K and LeNet-5 431K weights."""
    assert sum(p.numel() for p in models.LeNet300100().parameters()) == 266_610
    assert sum(p.numel() for p in models.LeNet5().parameters()) == 431_080


@pytest.mark.parametrize("name", models.MODEL_NAMES)
@pytest.mark.parametrize("size", [28, 8])
def test_models_forward_shapes(name, size):
    if name == "lenet5" and size == 8:
        with pytest.raises(ValueError, match="input_size"):
            models.build_model(name, input_size=size)
        return
    m = models.build_model(name, input_size=size).eval()
    assert m(torch.randn(3, 1, size, size)).shape == (3, 10)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_fuse_groups_name_real_modules(name):
    m = models.build_model(name)
    names = dict(m.named_modules())
    for group in m.fuse_groups():
        assert all(g in names for g in group), group


def test_model_bad_input():
    with pytest.raises(ValueError, match="name must be one of"):
        models.build_model("vgg")
    with pytest.raises(ValueError, match="widths"):
        models.SmallResNet(widths=(8, 8))
    with pytest.raises(ValueError, match="width_mult"):
        models.SmallMobileNet(width_mult=0)


# --- training ---------------------------------------------------------------
def test_fit_learns_and_is_deterministic():
    s = data.load_splits("digits")

    def run():
        config.seed_everything(0)
        m = models.LeNet300100(64)
        hist = training.fit(
            m,
            data.make_loader(s.train, 64, shuffle=True),
            epochs=2,
            val_loader=data.make_loader(s.val, 256),
            progress=False,
        )
        return m, hist

    m1, h1 = run()
    m2, h2 = run()
    assert h1 == h2
    assert h1[-1]["train_loss"] < h1[0]["train_loss"]
    assert training.evaluate(m1, data.make_loader(s.test, 256))["accuracy"] > 85


class TwoWeights(nn.Module):
    """``f(x) = x ⊙ w`` with two weights: the loss ``mean_n Σ_i f(x_n)_i`` has the gradient ``mean_n x_n``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def _linear_loss(model, x, y):
    return model(x).sum(1).mean()


X3 = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 4.0]], dtype=torch.float64)


def _sgd_by_hand(lr, momentum, weight_decay, epochs, batches):
    """SGD with momentum and decoupled-free L2 (torch's SGD) under a per-step cosine schedule.

    ``lr_t = lr·(1 + cos(π t / T))/2``, ``g_t = ∇ + λ w``, ``v_t = μ v_{t−1} + g_t``, ``w ← w − lr_t v_t``.
    Returns the weights after every step and the per-example mean loss of each epoch.
    """
    w = [1.0, -2.0]
    v = [0.0, 0.0]
    total = epochs * len(batches)
    trajectory, losses, t = [], [], 0
    for _ in range(epochs):
        weighted, seen = 0.0, 0
        for rows in batches:
            loss = sum(r[0] * w[0] + r[1] * w[1] for r in rows) / len(rows)
            weighted, seen = weighted + loss * len(rows), seen + len(rows)
            grad = [sum(r[i] for r in rows) / len(rows) + weight_decay * w[i] for i in range(2)]
            v = [momentum * v[i] + grad[i] if t else grad[i] for i in range(2)]
            lr_t = lr * (1 + math.cos(math.pi * t / total)) / 2
            w = [w[i] - lr_t * v[i] for i in range(2)]
            trajectory.append(list(w))
            t += 1
        losses.append(weighted / seen)
    return trajectory, losses


def test_fit_sgd_is_momentum_sgd_under_a_cosine_schedule():
    """Batches of 2 and 1 rows over two epochs: every step and every epoch loss checked by hand."""
    model = TwoWeights()
    loader = DataLoader(TensorDataset(X3, torch.zeros(3)), batch_size=2)
    seen = []
    history = training.fit(
        model,
        loader,
        epochs=2,
        lr=0.1,
        weight_decay=0.05,
        optimizer="sgd",
        compute_loss=_linear_loss,
        after_step=lambda m: seen.append(m.w.detach().tolist()),
        progress=False,
        device=torch.device("cpu"),
    )
    rows = X3.tolist()
    trajectory, losses = _sgd_by_hand(0.1, 0.9, 0.05, 2, [rows[:2], rows[2:]])
    assert len(seen) == 4
    for got, want in zip(seen, trajectory, strict=True):
        assert got == pytest.approx(want, rel=1e-12)
    assert [r["epoch"] for r in history] == [1, 2]
    assert [r["train_loss"] for r in history] == pytest.approx(losses, rel=1e-12)
    assert not model.training  # fit leaves the model in eval mode


def test_fit_adam_first_step_moves_each_weight_by_lr():
    """Adam's first bias-corrected step is ``lr · g/(|g| + ε)`` ≈ ``lr · sign(g)`` (Kingma & Ba 2015)."""
    model = TwoWeights()
    loader = DataLoader(TensorDataset(X3[:2], torch.zeros(2)), batch_size=2)
    training.fit(model, loader, epochs=1, lr=0.01, compute_loss=_linear_loss, progress=False)
    # gradient = mean of the two rows = [2.0, 0.5]: both weights fall by lr
    assert model.w.detach().tolist() == pytest.approx([1.0 - 0.01, -2.0 - 0.01], rel=1e-6)


def test_fit_trains_only_params_and_uses_the_default_cross_entropy():
    torch.manual_seed(0)
    model = nn.Linear(2, 3)
    frozen_bias = model.bias.detach().clone()
    x, y = torch.randn(4, 2), torch.tensor([0, 2, 1, 2])
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    w0 = model.weight.detach().clone()
    expected_loss = nn.functional.cross_entropy(model(x), y).item()
    history = training.fit(
        model, loader, epochs=1, lr=0.5, optimizer="sgd", params=[model.weight], progress=False
    )
    assert torch.equal(model.bias, frozen_bias) and not torch.equal(model.weight, w0)
    assert history[0]["train_loss"] == pytest.approx(expected_loss, rel=1e-6)
    w_ref = w0.clone().requires_grad_()
    loss = nn.functional.cross_entropy(x @ w_ref.T + frozen_bias, y)
    grad = torch.autograd.grad(loss, w_ref)[0]  # one SGD step, lr 0.5 (the schedule starts at lr)
    assert torch.allclose(model.weight, w0.detach() - 0.5 * grad, atol=1e-6)


def test_fit_records_validation_accuracy_and_hooks():
    s = data.load_splits("digits")
    calls = {"loss": 0, "step": 0}

    def loss(model, x, y):
        calls["loss"] += 1
        return nn.functional.cross_entropy(model(x), y)

    def step(model):
        calls["step"] += 1
        assert model.training  # hooks run inside the training step

    loader, val = data.make_loader(s.train, 256), data.make_loader(s.val, 256)
    model = models.LeNet300100(64)
    history = training.fit(
        model, loader, epochs=1, compute_loss=loss, after_step=step, val_loader=val, progress=False
    )
    assert calls["loss"] == calls["step"] == len(loader)
    assert history[0]["val_acc"] == training.evaluate(model, val)["accuracy"]
    assert training.fit(model, loader, epochs=0, progress=False) == []


def test_evaluate_hand_values_and_restores_the_mode():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0, 1, 1, 1])
    result = training.evaluate(model, DataLoader(TensorDataset(x, y), batch_size=3))
    # logits = x: predictions 0, 1, 0, 1 → 3 of 4 right; CE(z, y) = log(1 + e^(z_other − z_y))
    ce = [
        math.log1p(math.exp(-2)),
        math.log1p(math.exp(-1)),
        math.log1p(math.e),
        math.log1p(math.exp(-3)),
    ]
    assert result["accuracy"] == pytest.approx(75.0)
    assert result["errors"] == 1
    assert result["loss"] == pytest.approx(sum(ce) / 4, rel=1e-6)
    dropout = nn.Sequential(nn.Dropout(0.9), nn.Linear(2, 2)).train()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    logits, labels = training.predict_logits(dropout, loader)
    assert dropout.training  # the mode it came in
    assert torch.equal(logits, dropout[1](x).detach()) and torch.equal(labels, y)
    with pytest.raises(ValueError, match="no batches"):
        training.evaluate(model, DataLoader(TensorDataset(x[:0], y[:0]), batch_size=2))


def test_fit_leaves_the_model_on_its_device_in_eval_mode():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    loader = DataLoader(TensorDataset(torch.randn(4, 2), torch.tensor([0, 1, 0, 1])), batch_size=2)
    training.fit(model, loader, epochs=1, progress=False)
    assert not model.training and training.device_of(model) == torch.device("cpu")
    assert training.device_of(nn.ReLU()) == torch.device("cpu")


def test_fit_bad_input():
    loader = data.make_loader(data.load_splits("digits").test, 64)
    net = models.LeNet300100(64)
    with pytest.raises(ValueError, match="epochs must be >= 0"):
        training.fit(net, loader, epochs=-1)
    with pytest.raises(ValueError, match="lr must be > 0"):
        training.fit(net, loader, epochs=1, lr=0)
    with pytest.raises(ValueError, match=r"optimizer must be one of \['adam', 'sgd'\]"):
        training.fit(net, loader, epochs=1, optimizer="lbfgs")
    with pytest.raises(TypeError, match="train_loader must be DataLoader"):
        training.fit(net, [(torch.zeros(1, 64), torch.zeros(1))], epochs=1)
    with pytest.raises(TypeError, match="compute_loss must be a callable"):
        training.fit(net, loader, epochs=1, compute_loss="ce")
    with pytest.raises(TypeError, match="after_step must be a callable"):
        training.fit(net, loader, epochs=1, after_step=1)
    with pytest.raises(ValueError, match="params must be a non-empty list"):
        training.fit(net, loader, epochs=1, params=[])
    with pytest.raises(ValueError, match="nothing to train"):
        training.fit(nn.ReLU(), loader, epochs=1)
    with pytest.raises(ValueError, match="scalar"):
        training.fit(net, loader, epochs=1, compute_loss=lambda m, x, y: m(x).sum(0))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        training.evaluate("net", loader)
    with pytest.raises(TypeError, match="loader must be DataLoader"):
        training.evaluate(net, [1])


# --- cache ------------------------------------------------------------------
def test_config_key_is_stable_and_sensitive(monkeypatch):
    key = cache.config_key({"a": 1, "b": 2})
    assert len(key) == 12 and int(key, 16) >= 0
    assert key == cache.config_key({"b": 2, "a": 1})
    assert cache.config_key({"a": 1}) != cache.config_key({"a": 2})
    assert cache.config_key({"a": {"x": 1}}) != cache.config_key({"a": {"x": 2}})
    monkeypatch.setattr(cache, "CACHE_VERSION", cache.CACHE_VERSION + 1)
    assert cache.config_key({"a": 1, "b": 2}) != key  # a version bump retrains everything
    with pytest.raises(TypeError, match="config must be dict"):
        cache.config_key([("a", 1)])


@pytest.mark.parametrize(
    "change",
    [
        {"model": "lenet300"},
        {"dataset": "digits"},
        {"seed": 1},
        {"epochs": 3},
        {"train_fraction": 0.5},
        {"lr": 2e-3},
        {"width_mult": 0.5},
    ],
)
def test_baseline_config_keys_every_field(change):
    """Two baselines that would train differently never share a cache file."""
    base = {
        "model": "lenet5",
        "dataset": "mnist5k",
        "seed": 0,
        "epochs": 2,
        "train_fraction": 1.0,
        "lr": 1e-3,
    }
    a = cache.baseline_config(**base)
    b = cache.baseline_config(**{**base, **change})
    assert cache.config_key(a) != cache.config_key(b)
    assert cache.baseline_config("lenet5", epochs=None)["epochs"] == config.get_profile().epochs


def test_cached_generator_keys_every_argument(monkeypatch):
    """Every argument of cached_generator reaches the cache key (recorded, not trained)."""
    from utils import distillation

    keys = []

    def record(name, cfg, build, train):
        keys.append(cache.config_key(cfg))
        return build(), None, False

    monkeypatch.setattr(cache, "cached_state", record)
    base = {
        "epochs": 1,
        "num_batches": 1,
        "batch_size": 4,
        "latent_dim": 8,
        "channels": 4,
        "seed": 0,
    }
    teacher = models.LeNet5()
    distillation.cached_generator(teacher, {"teacher": "a"}, **base)
    distillation.cached_generator(teacher, {"teacher": "b"}, **base)
    for field, value in (
        ("epochs", 2),
        ("num_batches", 2),
        ("batch_size", 8),
        ("latent_dim", 4),
        ("channels", 8),
        ("seed", 1),
    ):
        distillation.cached_generator(teacher, {"teacher": "a"}, **{**base, field: value})
    assert len(set(keys)) == len(keys) == 8


def test_load_baseline_trains_like_fit_with_its_config(tmp_cache):
    """The cached baseline is fit() with the given seed, epochs, lr and train_fraction, and nothing else."""
    m = cache.load_baseline("lenet300", "digits", epochs=1, lr=2e-3, train_fraction=0.5, seed=2)
    assert not m.training and training.device_of(m) == torch.device("cpu")
    splits = data.load_splits("digits", seed=2, train_fraction=0.5)
    config.seed_everything(2)
    replay = models.build_model("lenet300", 1, 10, 8)
    training.fit(
        replay,
        data.make_loader(splits.train, 64, shuffle=True, seed=2),
        epochs=1,
        lr=2e-3,
        progress=False,
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(m.state_dict().values(), replay.state_dict().values(), strict=True)
    )


def test_cached_state_trains_once_and_retrains_corrupt_files(tmp_cache):
    trained = []

    def build():
        torch.manual_seed(0)
        return nn.Linear(3, 2)

    def train(m):
        trained.append(1)
        with torch.no_grad():
            m.weight.fill_(0.5)

    m1, path, now1 = cache.cached_state("toy", {"k": 1}, build, train)
    m2, path2, now2 = cache.cached_state("toy", {"k": 1}, build, train)
    assert (now1, now2) == (True, False) and len(trained) == 1
    assert path == path2 == tmp_cache / f"toy-{cache.config_key({'k': 1})}.pt"
    assert not m1.training and not m2.training  # trained or loaded: eval mode
    assert torch.equal(m1.weight, m2.weight) and torch.all(m2.weight == 0.5)
    assert not list(tmp_cache.glob("*.tmp"))  # written atomically, no leftovers
    path.write_bytes(path.read_bytes()[:20])  # truncate: must retrain, not crash
    _, _, now3 = cache.cached_state("toy", {"k": 1}, build, train)
    assert now3 and len(trained) == 2
    _, _, now4 = cache.cached_state("toy", {"k": 2}, build, train)  # new config, new model
    assert now4 and len(trained) == 3
    # a file of another architecture under the same key: retrained, not loaded
    _, _, now5 = cache.cached_state("toy", {"k": 2}, lambda: nn.Linear(4, 2), train)
    assert now5 and len(trained) == 4
    with pytest.raises(ValueError, match="name must be a non-empty file-name prefix"):
        cache.cached_state("../toy", {"k": 1}, build, train)
    with pytest.raises(TypeError, match="build must be a callable"):
        cache.cached_state("toy", {"k": 1}, nn.Linear(3, 2).state_dict(), train)
    with pytest.raises(TypeError, match="train must be a callable"):
        cache.cached_state("toy", {"k": 1}, build, None)
    with pytest.raises(TypeError, match="config must be dict"):
        cache.cached_state("toy", "k=1", build, train)


def test_load_baseline_is_cached(tmp_cache):
    m1 = cache.load_baseline("lenet300", "digits", epochs=2)
    files = list(tmp_cache.glob("*.pt"))
    assert len(files) == 1
    m2 = cache.load_baseline("lenet300", "digits", epochs=2)
    assert all(
        torch.equal(a, b)
        for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True)
    )
    test_acc = cache.baseline_accuracy(m2, "digits")
    s = data.load_splits("digits")
    assert test_acc == training.evaluate(m2, data.make_loader(s.test, 256))["accuracy"] > 80
    val_acc = cache.baseline_accuracy(m2, "digits", split="val")
    assert val_acc == training.evaluate(m2, data.make_loader(s.val, 256))["accuracy"]
    with pytest.raises(ValueError, match="model must be one of"):
        cache.load_baseline("alexnet")
    with pytest.raises(ValueError, match="dataset must be one of"):
        cache.load_baseline("lenet300", "cifar")
    with pytest.raises(ValueError, match="lr must be > 0"):
        cache.load_baseline("lenet300", "digits", lr=0.0)
    with pytest.raises(ValueError, match="split must be one of"):
        cache.baseline_accuracy(m2, "digits", split="train")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        cache.baseline_accuracy("lenet300", "digits")


def test_show_source_shows_the_code_and_rejects_non_functions(capsys):
    from utils.plotting import show_source, show_table

    show_source(show_table, max_lines=3)
    out = capsys.readouterr().out
    assert "utils.plotting.show_table" in out and "def show_table" in out
    assert "more lines" in out
    with pytest.raises(TypeError, match="obj must be a function"):
        show_source(42)
    with pytest.raises(ValueError, match="max_lines"):
        show_source(show_table, max_lines=0)


def test_cached_state_says_what_it_trains_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(config.CACHE_ENV, str(tmp_path))
    calls = []

    def train(m):
        calls.append(1)

    cache.cached_state("probe", {"a": 1}, lambda: nn.Linear(2, 2), train)
    first = capsys.readouterr().out
    assert "training probe (first run only" in first and "later runs load it" in first
    cache.cached_state("probe", {"a": 1}, lambda: nn.Linear(2, 2), train)
    assert capsys.readouterr().out == "" and calls == [1]
