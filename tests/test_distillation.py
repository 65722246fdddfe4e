"""Tests of utils.distillation: hand-checked values, the definitions, torch's own losses, bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from utils.data import make_loader
from utils.distillation import (
    METHODS,
    AdversarialLoss,
    Generator,
    HintRegressor,
    LogitDiscriminator,
    StudentLeNet,
    attention_map,
    attention_transfer_loss,
    cached_generator,
    capture_features,
    dafl_generator_loss,
    data_free_distill,
    distill,
    frozen,
    gap_recovered,
    hint_loss,
    kd_loss,
    make_kd_loss,
    noise_loader,
    rkd_distance_loss,
    soft_targets,
    synthesize,
    train_generator,
)
from utils.models import LeNet5

# ---------------------------------------------------------------- response-based


def _kd_by_definition(s: np.ndarray, t: np.ndarray, temp: float) -> float:
    """T² · mean_n Σ_i p_i (log p_i − log q_i), in float64 NumPy."""

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z / temp - (z / temp).max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p, q = softmax(t), softmax(s)
    return float(temp**2 * (p * (np.log(p) - np.log(q))).sum(1).mean())


def test_soft_targets_hand_values():
    z = torch.tensor([[math.log(3.0), 0.0]])
    assert torch.allclose(soft_targets(z, 1.0), torch.tensor([[0.75, 0.25]]))
    # T = 2 halves the logits: p = [√3, 1] / (√3 + 1)
    r3 = math.sqrt(3.0)
    assert torch.allclose(soft_targets(z, 2.0), torch.tensor([[r3 / (r3 + 1), 1 / (r3 + 1)]]))
    assert torch.allclose(
        soft_targets(torch.randn(4, 10), 1e6), torch.full((4, 10), 0.1), atol=1e-5
    )


def test_kd_loss_hand_value():
    s = torch.zeros(1, 2)
    t = torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # KL([.75,.25] ‖ [.5,.5]) = 0.130812
    assert kd_loss(s, t, 1.0).item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0, 20.0])
def test_kd_loss_matches_definition_and_torch_kldiv(temp):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 10, generator=g) * 3, torch.randn(8, 10, generator=g) * 3
    ours = kd_loss(s, t, temp).item()
    assert ours == pytest.approx(
        _kd_by_definition(s.double().numpy(), t.double().numpy(), temp), rel=1e-5
    )
    torch_ref = (
        nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / temp, 1), F.softmax(t / temp, 1))
        * temp**2
    )
    assert ours == pytest.approx(torch_ref.item(), rel=1e-5)


@pytest.mark.parametrize("temp", [1.0, 3.0, 10.0])
def test_kd_gradient_is_t_times_q_minus_p(temp):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(5, 7, generator=g).requires_grad_()
    t = torch.randn(5, 7, generator=g)
    kd_loss(s, t, temp).backward()
    q, p = F.softmax(s.detach() / temp, 1), F.softmax(t / temp, 1)
    assert torch.allclose(s.grad, temp * (q - p) / len(s), atol=1e-6)


def test_t_squared_keeps_gradient_scale_at_high_temperature():
    """Hinton et al. §2.1: for zero-mean logits and large T, T²·KL's gradient → (z − v)/K per sample."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 10, generator=g)
    v = torch.randn(4, 10, generator=g)
    z, v = z - z.mean(1, keepdim=True), v - v.mean(1, keepdim=True)
    grads = []
    for temp in (50.0, 500.0):
        s = z.clone().double().requires_grad_()
        kd_loss(s, v.double(), temp).backward()
        grads.append(s.grad * len(z))
        assert torch.allclose(
            s.grad * len(z), (z - v).double() / 10, atol=2e-2 * (50 / temp) + 1e-4
        )
    assert torch.allclose(grads[0], grads[1], atol=5e-3)  # the same scale whatever T


def test_teacher_logits_never_receive_gradients():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    kd_loss(s, t, 2.0, torch.tensor([0, 1, 2]), alpha=0.5).backward()
    assert s.grad is not None and t.grad is None


def test_kd_loss_mixes_soft_and_hard_terms():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    soft, hard = kd_loss(s, t, 4.0), F.cross_entropy(s, y)
    assert kd_loss(s, t, 4.0, y, alpha=0.3).item() == pytest.approx(
        0.3 * soft.item() + 0.7 * hard.item(), rel=1e-6
    )
    assert kd_loss(s, t, 4.0, y, alpha=0.0).item() == pytest.approx(hard.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"temperature": "4"}, TypeError, "temperature"),
        ({"alpha": 1.5}, ValueError, "alpha"),
        ({"alpha": -0.1}, ValueError, "alpha"),
        ({"alpha": 0.5, "labels": None}, ValueError, "labels"),
        ({"alpha": 0.5, "labels": torch.tensor([0, 1])}, ValueError, "labels"),
        ({"teacher_logits": torch.zeros(3, 5)}, ValueError, "same shape"),
        ({"teacher_logits": torch.zeros(3)}, ValueError, "teacher_logits"),
        ({"student_logits": [[0.0] * 4] * 3}, TypeError, "student_logits"),
    ],
)
def test_kd_loss_rejects_bad_input(kwargs, error, match):
    args = {
        "student_logits": torch.zeros(3, 4),
        "teacher_logits": torch.zeros(3, 4),
        "temperature": 2.0,
        "labels": torch.tensor([0, 1, 2]),
        "alpha": 0.9,
    }
    args.update(kwargs)
    with pytest.raises(error, match=match):
        kd_loss(**args)


def test_soft_targets_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        soft_targets(torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="logits"):
        soft_targets(torch.zeros(3), 1.0)


def test_make_kd_loss_uses_the_teacher():
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    loss = make_kd_loss(teacher, 3.0, 0.8)(student, x, y)
    assert loss.item() == pytest.approx(
        kd_loss(student(x), teacher(x), 3.0, y, 0.8).item(), rel=1e-6
    )
    loss.backward()
    assert teacher.weight.grad is None and student.weight.grad is not None


# ---------------------------------------------------------------- features and relations


def test_capture_features_records_outputs_and_removes_hooks():
    net = LeNet5()
    x = torch.randn(2, 1, 28, 28)
    with capture_features(net, ["conv1", "relu"]) as feats:
        net(x)
    assert torch.equal(feats["conv1"], net.conv1(x))
    assert feats["relu"].shape == (2, 500)
    assert all(len(m._forward_hooks) == 0 for m in net.modules())
    with pytest.raises(ValueError, match="not submodules"):
        with capture_features(net, ["conv9"]):
            pass


def test_hint_loss_is_mse_of_regressed_features():
    reg = HintRegressor(4, 6)
    s, t = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5, requires_grad=True)
    loss = hint_loss(s, t, reg)
    assert loss.item() == pytest.approx(F.mse_loss(reg(s), t).item(), rel=1e-6)
    loss.backward()
    assert reg.proj.weight.grad is not None and t.grad is None
    with torch.no_grad():  # a regressor that copies channels makes the loss the plain MSE
        ident = HintRegressor(3, 3, conv=False)
        ident.proj.weight.copy_(torch.eye(3))
        ident.proj.bias.zero_()
    v = torch.tensor([[1.0, 2.0, 3.0]])
    assert hint_loss(v, torch.tensor([[1.0, 2.0, 5.0]]), ident).item() == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match="shape"):
        hint_loss(s, torch.randn(2, 5, 5, 5), reg)
    with pytest.raises(TypeError, match="regressor"):
        hint_loss(s, t, "conv")


def test_attention_map_hand_value():
    # two channels, 1×2 positions: mean of squares = [(1+9)/2, (4+0)/2] = [5, 2]
    f = torch.tensor([[[[1.0, 2.0]], [[-3.0, 0.0]]]])
    expected = torch.tensor([[5.0, 2.0]]) / math.sqrt(29.0)
    assert torch.allclose(attention_map(f), expected)
    assert torch.allclose(attention_map(torch.randn(3, 5, 4, 4)).norm(dim=1), torch.ones(3))


def test_attention_transfer_loss_matches_reference_formula():
    g = torch.Generator().manual_seed(5)
    s = [torch.randn(4, 3, 6, 6, generator=g), torch.randn(4, 5, 3, 3, generator=g)]
    t = [torch.randn(4, 8, 6, 6, generator=g), torch.randn(4, 2, 3, 3, generator=g)]

    def at(x):  # the authors' code: F.normalize(x.pow(2).mean(1).view(x.size(0), -1))
        return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))

    ref = sum((at(a) - at(b)).pow(2).mean() for a, b in zip(s, t, strict=True))
    assert attention_transfer_loss(s, t).item() == pytest.approx(ref.item(), rel=1e-6)
    assert attention_transfer_loss(t, t).item() == pytest.approx(0.0, abs=1e-8)
    # AT is blind to the feature scale: the map is normalised
    assert attention_transfer_loss([3 * t[0]], [t[0]]).item() == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="spatial"):
        attention_transfer_loss([s[0]], [t[1]])
    with pytest.raises(ValueError, match="equal length"):
        attention_transfer_loss(s, t[:1])


def test_rkd_distance_loss():
    g = torch.Generator().manual_seed(6)
    t = torch.randn(6, 8, generator=g)
    # hand case: three points on a line at 0, 1, 3 → distances 1, 3, 2 (mean 2)
    pts = torch.tensor([[0.0], [1.0], [3.0]])
    assert torch.allclose(
        torch.cdist(pts, pts) / 2, torch.tensor([[0, 0.5, 1.5], [0.5, 0, 1], [1.5, 1, 0]])
    )
    assert rkd_distance_loss(2.5 * t, t).item() == pytest.approx(0.0, abs=1e-6)  # scale invariant
    rot = torch.linalg.qr(torch.randn(8, 8, generator=g))[0]
    assert rkd_distance_loss(t @ rot, t).item() == pytest.approx(
        0.0, abs=1e-6
    )  # rotation invariant
    s = torch.randn(6, 3, generator=g, requires_grad=True)
    d_s = torch.pdist(s)
    d_t = torch.pdist(t)
    # pdist holds each pair once, the full matrix twice plus a zero diagonal: smooth-L1 mean rescales
    ref = F.smooth_l1_loss(d_s / d_s.mean(), d_t / d_t.mean(), reduction="sum") * 2 / 36
    loss = rkd_distance_loss(s, t)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    assert s.grad is not None
    with pytest.raises(ValueError, match="batch"):
        rkd_distance_loss(s[:1], t[:1])


# ---------------------------------------------------------------- adversarial, trainer


def _tiny_loader(n: int = 32) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(
        torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    )
    return make_loader(ds, 16, shuffle=True)


def test_adversarial_loss_updates_discriminator_not_teacher():
    teacher, student = LeNet5(), StudentLeNet()
    disc = LogitDiscriminator(10)
    before_d = [p.clone() for p in disc.parameters()]
    before_t = [p.clone() for p in teacher.parameters()]
    adv = AdversarialLoss(teacher, disc, weight=0.5)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    loss = adv(student, x, y)
    loss.backward()
    assert loss.dim() == 0 and len(adv.d_losses) == 1
    assert any(not torch.equal(a, b) for a, b in zip(before_d, disc.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(before_t, teacher.parameters(), strict=True))
    assert student.fc2.weight.grad is not None
    with pytest.raises(ValueError, match="weight"):
        AdversarialLoss(teacher, disc, weight=-1.0)


@pytest.mark.parametrize("method", METHODS)
def test_distill_trains_student_and_leaves_teacher_alone(method):
    torch.manual_seed(0)
    teacher, student = LeNet5(), StudentLeNet()
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_before = student.fc2.weight.clone()
    history = distill(student, teacher, _tiny_loader(), method=method, epochs=1)
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"])
    assert not torch.equal(s_before, student.fc2.weight)
    assert all(torch.equal(t_state[k], v) for k, v in teacher.state_dict().items())
    assert all(p.requires_grad for p in teacher.parameters())  # restored after training


def test_distill_rejects_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        distill(StudentLeNet(), LeNet5(), _tiny_loader(), method="magic", epochs=1)
    with pytest.raises(TypeError, match="teacher"):
        distill(StudentLeNet(), None, _tiny_loader(), method="kd", epochs=1)
    with pytest.raises(ValueError, match="weight"):
        distill(StudentLeNet(), LeNet5(), _tiny_loader(), method="at", epochs=1, weight=-1.0)
    with pytest.raises(TypeError, match="student"):
        distill("net", LeNet5(), _tiny_loader(), epochs=1)


def test_frozen_restores_state():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    net[1].weight.requires_grad_(False)
    net.train()
    with frozen(net):
        assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.training and net[0].weight.requires_grad and not net[1].weight.requires_grad


# ---------------------------------------------------------------- data-free


def test_generator_output_and_bad_args():
    g = Generator(latent_dim=8, channels=8)
    x = g(torch.randn(5, 8))
    assert x.shape == (5, 1, 28, 28)
    assert abs(x.mean().item()) < 1e-4 and x.std().item() == pytest.approx(1.0, abs=0.15)
    with pytest.raises(ValueError, match="multiple of 4"):
        Generator(size=30)
    with pytest.raises(TypeError, match="latent_dim"):
        Generator(latent_dim=2.5)


def test_dafl_generator_loss_hand_value():
    # uniform logits: one-hot CE = ln K, the mean prediction's entropy = ln K
    k = 10
    logits = torch.zeros(4, k)
    feats = torch.full((4, 3), -2.0)
    loss = dafl_generator_loss(logits, feats, activation_weight=0.1, entropy_weight=5.0)
    assert loss.item() == pytest.approx(math.log(k) + 0.1 * (-2.0) + 5.0 * (-math.log(k)), rel=1e-6)
    with pytest.raises(ValueError, match="activation_weight"):
        dafl_generator_loss(logits, feats, activation_weight=-1.0)


def test_noise_loader():
    loader = noise_loader(3, 4, 5, seed=1)
    batches = list(loader)
    assert len(batches) == 3 and batches[0][0].shape == (4, 5)
    with pytest.raises(ValueError, match="batch_size"):
        noise_loader(3, 1, 5)


def test_data_free_pipeline_runs_and_freezes_teacher():
    torch.manual_seed(0)
    teacher, gen, student = LeNet5(), Generator(latent_dim=8, channels=8), StudentLeNet()
    g_before = gen.fc.weight.clone()
    h = train_generator(gen, teacher, noise_loader(2, 8, 8), epochs=1)
    assert len(h) == 1 and not torch.equal(g_before, gen.fc.weight)
    assert teacher.conv1.weight.grad is None
    g_after = gen.fc.weight.clone()
    transfer = synthesize(gen, teacher, 10, batch_size=4)
    x, t = transfer.tensors
    assert x.shape == (10, 1, 28, 28) and t.shape == (10, 10)
    assert torch.allclose(teacher(x), t, atol=1e-5)  # the labels are the teacher's logits
    s_before = student.fc2.weight.clone()
    h = data_free_distill(student, teacher, gen, num_images=16, epochs=1, batch_size=8)
    assert len(h) == 1 and torch.equal(g_after, gen.fc.weight)
    assert not torch.equal(s_before, student.fc2.weight)
    assert all(p.requires_grad for p in gen.parameters())
    with pytest.raises(ValueError, match="num_images"):
        synthesize(gen, teacher, 0)


def test_cached_generator_trains_once(tmp_cache):
    teacher = LeNet5()
    kwargs = {"epochs": 1, "num_batches": 1, "batch_size": 4, "latent_dim": 8, "channels": 4}
    g1 = cached_generator(teacher, {"teacher": "untrained"}, **kwargs)
    assert len(list(tmp_cache.glob("dafl-generator-*.pt"))) == 1
    g2 = cached_generator(teacher, {"teacher": "untrained"}, **kwargs)
    assert all(
        torch.equal(a, b)
        for a, b in zip(g1.state_dict().values(), g2.state_dict().values(), strict=True)
    )
    with pytest.raises(TypeError, match="teacher_config"):
        cached_generator(teacher, "lenet5", **kwargs)


# ---------------------------------------------------------------- helpers


def test_student_lenet_size_and_args():
    s = StudentLeNet()
    assert sum(p.numel() for p in s.parameters()) == (4 * 25 + 4) + (8 * 4 * 25 + 8) + (
        128 * 32 + 32
    ) + (32 * 10 + 10)
    assert s(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="channels"):
        StudentLeNet(channels=(4,))
    with pytest.raises(ValueError, match="channels"):
        StudentLeNet(channels=(4, 0))


def test_gap_recovered_hinton_mnist_errors():
    # Hinton et al. 2015: 146 errors alone, 74 distilled, 67 teacher → 91% of the gap
    assert gap_recovered(146, 74, 67) == pytest.approx(72 / 79)
    with pytest.raises(ValueError, match="differ"):
        gap_recovered(90.0, 91.0, 90.0)
    with pytest.raises(TypeError, match="teacher"):
        gap_recovered(90.0, 91.0, "97")
