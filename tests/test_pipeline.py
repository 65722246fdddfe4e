"""Tests of utils.pipeline on tiny synthetic data: hand-counted MACs, the stages, the cache, bad inputs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import utils.pipeline as P
from utils.benchmark import count_parameters
from utils.data import make_loader
from utils.models import LeNet5
from utils.pipeline import (
    STAGES,
    AccelerationConfig,
    Stage,
    accelerate,
    int8_stage,
    prune_stage,
    stage_row,
    stage_table,
)
from utils.training import evaluate, fit

CLASSES, SIDE = 4, 16


def _data(n: int, seed: int) -> TensorDataset:
    """Four classes, each a fixed random 16×16 prototype plus noise: easy for LeNet-5."""
    protos = torch.randn(CLASSES, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    x = protos[y] + 0.5 * torch.randn(n, 1, SIDE, SIDE, generator=g)
    return TensorDataset(x, y)


@pytest.fixture(scope="module")
def setup():
    train = make_loader(_data(192, 1), 48, shuffle=True, seed=0)
    test = make_loader(_data(128, 2), 64)
    torch.manual_seed(0)
    model = LeNet5(num_classes=CLASSES, input_size=SIDE)
    fit(model, train, epochs=4, lr=3e-3, progress=False, device=torch.device("cpu"))
    return model.eval(), train, test


CONFIG = AccelerationConfig(amount=0.5, epochs=2, calibration_batches=2)
# LeNet-5 on 1×16×16, hand-counted: conv1 20·12²·25 + conv2 50·2²·(20·25) + fc1 500·50 + fc2 4·500
BASE_MACS = 20 * 12 * 12 * 25 + 50 * 2 * 2 * 20 * 25 + 500 * 50 + 4 * 500
# half the channels of each group: conv1 10, conv2 25, fc1 250 (the classifier keeps its 4)
HALF_MACS = 10 * 12 * 12 * 25 + 25 * 2 * 2 * 10 * 25 + 250 * 25 + 4 * 250


def test_accelerate_stages_rows_and_macs(setup):
    model, train, test = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stages = accelerate(model, train, test, CONFIG)
    assert list(stages) == list(STAGES)
    assert all(isinstance(s, Stage) and s.name == k for k, s in stages.items())
    rows = {k: s.row for k, s in stages.items()}
    assert rows["baseline"]["macs"] == BASE_MACS == 199_000
    assert rows["pruned"]["macs"] == rows["distilled"]["macs"] == HALF_MACS == 68_250
    assert rows["int8"]["macs"] == HALF_MACS  # the quantized layers are counted too
    assert rows["baseline"]["params"] == count_parameters(model)
    assert rows["pruned"]["params"] == rows["distilled"]["params"] < rows["baseline"]["params"] / 2
    # INT8 packs 1-byte weights: the file is well under half the float one
    assert rows["int8"]["size_kb"] < 0.5 * rows["distilled"]["size_kb"]
    for k, s in stages.items():  # each row's accuracy is the stage model's own
        assert rows[k]["accuracy"] == pytest.approx(evaluate(s.model, test)["accuracy"])
    assert rows["baseline"]["accuracy"] >= 95
    assert rows["distilled"]["accuracy"] >= rows["baseline"]["accuracy"] - 5
    assert abs(rows["int8"]["accuracy"] - rows["distilled"]["accuracy"]) <= 5
    # the pruned and distilled stages differ (distillation trained), the baseline is a copy
    assert not torch.equal(stages["pruned"].model.fc1.weight, stages["distilled"].model.fc1.weight)
    assert stages["baseline"].model is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(".quantized" in type(m).__module__ for m in stages["int8"].model.modules())
    assert all(p.device.type == "cpu" for s in stages.values() for p in s.model.parameters())
    df = stage_table(stages)
    assert list(df.index) == list(STAGES) and str(df["params"].dtype) == "int64"


def test_distillation_learns_from_the_teacher_with_kd(setup, monkeypatch):
    model, train, test = setup
    calls = []

    def spy(student, teacher, loader, **kwargs):
        calls.append((student, teacher, kwargs))

    monkeypatch.setattr(P, "distill", spy)
    other = LeNet5(num_classes=CLASSES, input_size=SIDE)
    accelerate(model, train, test, CONFIG, teacher=other)
    (student, teacher, kwargs) = calls[0]
    assert kwargs["method"] == "kd" and kwargs["epochs"] == CONFIG.epochs
    assert kwargs["temperature"] == CONFIG.temperature and kwargs["alpha"] == CONFIG.alpha
    assert teacher is not other  # a frozen copy: the caller's teacher is never moved
    assert torch.equal(teacher.fc1.weight, other.fc1.weight)
    assert student.fc1.out_features == 250  # the pruned network is the student
    calls.clear()
    accelerate(model, train, test, CONFIG)  # default teacher: the unpruned model
    assert torch.equal(calls[0][1].fc1.weight, model.fc1.weight)


def test_cache_trains_once(setup, tmp_cache, monkeypatch):
    model, train, test = setup
    config = AccelerationConfig(amount=0.5, epochs=1, calibration_batches=2)
    first = accelerate(model, train, test, config, cache={"model": "tiny"}, name="t")
    assert len(list(tmp_cache.glob("t-*.pt"))) == 1

    def boom(*args, **kwargs):
        raise AssertionError("a cached stage must not be trained again")

    monkeypatch.setattr(P, "distill", boom)
    again = accelerate(model, train, test, config, cache={"model": "tiny"}, name="t")
    a, b = first["distilled"].model.state_dict(), again["distilled"].model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(AssertionError, match="trained again"):  # another config trains anew
        accelerate(model, train, test, AccelerationConfig(epochs=2), cache={"model": "tiny"})


def test_prune_and_int8_stages_leave_the_input_alone(setup):
    model, train, test = setup
    pruned = prune_stage(model, CONFIG)
    assert pruned.conv1.out_channels == 10 and model.conv1.out_channels == 20
    q = int8_stage(pruned, train, CONFIG)
    assert not any(".quantized" in type(m).__module__ for m in pruned.modules())
    x = next(iter(test))[0]
    with torch.no_grad():
        agree = (q(x).argmax(1) == pruned(x).argmax(1)).float().mean().item()
    assert agree >= 0.9


def test_stage_row_hand_checked():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    data = TensorDataset(torch.eye(4).reshape(4, 1, 2, 2), torch.tensor([0, 1, 2, 0]))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(3, 4))
        model[1].bias.zero_()
    row = stage_row("toy", model, make_loader(data, 4))
    # logits are the first three inputs: samples 0-2 correct, sample 3 (all zeros) → class 0, correct
    assert row == {**row, "stage": "toy", "accuracy": 100.0, "params": 15, "macs": 12}


def test_bad_inputs(setup):
    model, train, test = setup
    with pytest.raises(ValueError, match="amount"):
        AccelerationConfig(amount=1.0)
    with pytest.raises(ValueError, match="criterion"):
        AccelerationConfig(criterion="random")
    with pytest.raises(ValueError, match="epochs"):
        AccelerationConfig(epochs=-1)
    with pytest.raises(ValueError, match="alpha"):
        AccelerationConfig(alpha=1.5)
    with pytest.raises(TypeError, match="model"):
        accelerate("lenet5", train, test)
    with pytest.raises(TypeError, match="train_loader"):
        accelerate(model, list(train), test)
    with pytest.raises(TypeError, match="config"):
        accelerate(model, train, test, {"amount": 0.5})
    with pytest.raises(TypeError, match="teacher"):
        accelerate(model, train, test, CONFIG, teacher="lenet5")
    with pytest.raises(TypeError, match="cache"):
        accelerate(model, train, test, CONFIG, cache="key")
    with pytest.raises(ValueError, match="width 0"):  # 4 classes are not pruned, but 20·0.04 → 0
        prune_stage(model, AccelerationConfig(amount=0.99))
    with pytest.raises(ValueError, match="stages"):
        stage_table({})


def test_compress_with_teacher_distils_from_the_other_baseline(setup, tmp_cache, monkeypatch):
    from types import SimpleNamespace

    from utils.compression import PipelineConfig
    from utils.pipeline import compress_with_teacher

    model, train, _ = setup
    teacher = LeNet5(num_classes=CLASSES, input_size=SIDE)
    zoo = {"lenet300": model, "lenet5": teacher}  # names a baseline config accepts
    monkeypatch.setattr(P, "load_baseline", lambda name, dataset, seed=0: zoo[name])
    monkeypatch.setattr(
        P, "load_splits", lambda dataset, seed=0: SimpleNamespace(train=train.dataset)
    )
    calls = []

    def spy(student, big, loader, config):
        calls.append(big)
        return {k: student for k in ("dense", "pruned", "quantized")}

    monkeypatch.setattr(P, "prune_quantize_distill", spy)
    config = PipelineConfig(sparsity=0.5, bits=3, prune_steps=1, prune_epochs=0, quant_epochs=0)
    out = compress_with_teacher("lenet300", "digits", config, "lenet5")
    assert calls == [teacher] and set(out) == {"dense", "pruned", "quantized"}
    compress_with_teacher("lenet300", "digits", config, "lenet5")  # cached: no second training
    assert len(calls) == 1
    with pytest.raises(ValueError, match="low_rank_energy"):
        compress_with_teacher("lenet300", "digits", PipelineConfig(low_rank_energy=0.8), "lenet5")
    with pytest.raises(TypeError, match="teacher"):
        compress_with_teacher("lenet300", "digits", config, teacher)
    with pytest.raises(TypeError, match="config"):
        compress_with_teacher("lenet300", "digits", {"bits": 4}, "lenet5")
