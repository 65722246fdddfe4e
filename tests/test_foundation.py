"""Unit tests of the foundation modules: config, validation, data, models, training, cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from utils import cache, config, data, models, training, validation


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
    assert config.get_device().type in ("cpu", "cuda")
    assert config.get_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="prefer"):
        config.get_device("tpu")
    g1, g2 = config.seed_everything(3), config.seed_everything(3)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
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
    assert s.input_shape == (1, 8, 8)
    full = data.load_splits("digits")
    assert abs(len(s.train) - 0.2 * len(full.train)) <= 10
    assert len(s.test) == len(full.test)


def test_loaders_are_reproducible():
    a, _, _ = data.load_loaders("digits", batch_size=16, seed=5)
    b, _, _ = data.load_loaders("digits", batch_size=16, seed=5)
    assert torch.equal(next(iter(a))[1], next(iter(b))[1])


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"name": "imagenet"}, ValueError),
        ({"fractions": (0.5, 0.5)}, ValueError),
        ({"train_fraction": 0.0}, ValueError),
        ({"seed": "0"}, TypeError),
    ],
)
def test_load_splits_bad_input(kwargs, exc):
    with pytest.raises(exc):
        data.load_splits(**kwargs)


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
            epochs=3,
            val_loader=data.make_loader(s.val, 256),
            progress=False,
        )
        return m, hist

    m1, h1 = run()
    m2, h2 = run()
    assert h1 == h2
    assert h1[-1]["train_loss"] < h1[0]["train_loss"]
    assert training.evaluate(m1, data.make_loader(s.test, 256))["accuracy"] > 85


def test_fit_hooks_are_called():
    s = data.load_splits("digits")
    calls = {"loss": 0, "step": 0}

    def loss(model, x, y):
        calls["loss"] += 1
        return nn.functional.cross_entropy(model(x), y)

    def step(model):
        calls["step"] += 1

    loader = data.make_loader(s.train, 128)
    training.fit(
        models.LeNet300100(64), loader, epochs=1, compute_loss=loss, after_step=step, progress=False
    )
    assert calls["loss"] == calls["step"] == len(loader)


def test_fit_bad_input():
    loader = data.make_loader(data.load_splits("digits").test, 64)
    with pytest.raises(ValueError, match="epochs"):
        training.fit(models.LeNet300100(64), loader, epochs=-1)
    with pytest.raises(ValueError, match="lr"):
        training.fit(models.LeNet300100(64), loader, epochs=1, lr=0)
    with pytest.raises(ValueError, match="optimizer"):
        training.fit(models.LeNet300100(64), loader, epochs=1, optimizer="lbfgs")
    with pytest.raises(TypeError, match="model"):
        training.evaluate("net", loader)


# --- cache ------------------------------------------------------------------
def test_config_key_is_stable_and_sensitive():
    assert cache.config_key({"a": 1, "b": 2}) == cache.config_key({"b": 2, "a": 1})
    assert cache.config_key({"a": 1}) != cache.config_key({"a": 2})


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
    m2, _, now2 = cache.cached_state("toy", {"k": 1}, build, train)
    assert (now1, now2) == (True, False) and len(trained) == 1
    assert torch.equal(m1.weight, m2.weight) and torch.all(m2.weight == 0.5)
    path.write_bytes(path.read_bytes()[:20])  # truncate: must retrain, not crash
    _, _, now3 = cache.cached_state("toy", {"k": 1}, build, train)
    assert now3 and len(trained) == 2
    _, _, now4 = cache.cached_state("toy", {"k": 2}, build, train)  # new config, new model
    assert now4 and len(trained) == 3


def test_load_baseline_is_cached(tmp_cache):
    m1 = cache.load_baseline("lenet300", "digits", epochs=2)
    files = list(tmp_cache.glob("*.pt"))
    assert len(files) == 1
    m2 = cache.load_baseline("lenet300", "digits", epochs=2)
    assert all(
        torch.equal(a, b)
        for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True)
    )
    assert cache.baseline_accuracy(m2, "digits") > 80
    with pytest.raises(ValueError, match="model must be one of"):
        cache.load_baseline("alexnet")


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
