"""Tests of utils.distillation: hand-checked values, the definitions, torch's own losses, bad inputs."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import utils.distillation as distillation
from utils.data import make_loader
from utils.distillation import (
    DEFAULT_LAYERS,
    DEFAULT_WEIGHTS,
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
    on_device,
    rkd_angle_loss,
    rkd_distance_loss,
    soft_targets,
    synthesize,
    train_generator,
)
from utils.models import LeNet5
from utils.training import fit

PROPERTY = settings(max_examples=30, deadline=None)


def _logits(rows: int = 3, cols: int = 5, bound: float = 6.0):
    """Hypothesis strategy: a ``(rows, cols)`` float64 tensor of bounded logits."""
    return st.lists(
        st.floats(-bound, bound, allow_nan=False, width=32),
        min_size=rows * cols,
        max_size=rows * cols,
    ).map(lambda v: torch.tensor(v, dtype=torch.float64).view(rows, cols))


pytestmark = pytest.mark.usefixtures("one_thread")


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
        (
            {"student_logits": torch.zeros(0, 4), "teacher_logits": torch.zeros(0, 4)},
            ValueError,
            "at least one row",
        ),
        (
            {"student_logits": torch.tensor([[0.0, float("nan"), 0, 0]] * 3)},
            ValueError,
            "student_logits must contain only finite",
        ),
        (
            {"teacher_logits": torch.tensor([[float("inf"), 0, 0, 0]] * 3)},
            ValueError,
            "teacher_logits must contain only finite",
        ),
        ({"labels": torch.tensor([0, 1, 4])}, ValueError, r"labels must lie in \[0, 3\]"),
        ({"labels": torch.tensor([0, -1, 2])}, ValueError, r"labels must lie in \[0, 3\]"),
        ({"labels": torch.tensor([0, 1, 4]), "alpha": 1.0}, ValueError, "labels must lie"),
        ({"labels": torch.tensor([0.0, 1.0, 2.0])}, TypeError, "labels must be integer"),
        ({"student_logits": torch.zeros(3, 4, dtype=torch.long)}, TypeError, "floating-point"),
        (
            {"student_logits": torch.zeros(3, 1), "teacher_logits": torch.zeros(3, 1)},
            ValueError,
            "at least 2 classes",
        ),
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
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        soft_targets(torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="logits must contain only finite"):
        soft_targets(torch.tensor([[0.0, float("nan")]]), 1.0)


@PROPERTY
@given(s=_logits(), t=_logits(), temp=st.floats(0.5, 50.0))
def test_kd_loss_is_nonnegative_and_zero_only_for_equal_distributions(s, t, temp):
    """KL ≥ 0 (Gibbs), = 0 iff the softened distributions agree, i.e. logits equal up to a row shift."""
    assert kd_loss(s, t, temp).item() >= 0.0
    shift = torch.arange(len(s), dtype=s.dtype).unsqueeze(1) * 3.0
    assert kd_loss(s, s + shift, temp).item() == pytest.approx(0.0, abs=1e-9)
    p, q = soft_targets(t, temp), soft_targets(s, temp)
    assume((p - q).abs().max().item() > 1e-3)
    assert kd_loss(s, t, temp).item() > 0.0


@PROPERTY
@given(z=_logits(1, 6, 5.0), v=_logits(1, 6, 5.0))
def test_t_squared_makes_the_soft_gradient_scale_independent_of_t(z, v):
    """With T² the gradient norm stays within 2.5× over T ∈ {8, 32, 128}; without it, it falls 256×."""
    d = z - v
    assume((d - d.mean()).norm().item() > 0.5)
    norms = []
    for temp in (8.0, 32.0, 128.0):
        s = z.clone().requires_grad_()
        kd_loss(s, v, temp).backward()
        norms.append(s.grad.norm().item())
    assert max(norms) / min(norms) < 2.5


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
    with pytest.raises(TypeError, match="names must be list or tuple"):
        with capture_features(net, "conv1"):
            pass
    with pytest.raises(TypeError, match=r"names\[i\] must be str"):
        with capture_features(net, [1]):
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
    with pytest.raises(TypeError, match="conv must be bool"):
        HintRegressor(3, 3, conv="yes")
    with pytest.raises(ValueError, match="student_feature must contain only finite"):
        hint_loss(torch.full((2, 4, 5, 5), float("nan")), t, reg)


def test_attention_map_hand_value():
    # two channels, 1×2 positions: mean of squares = [(1+9)/2, (4+0)/2] = [5, 2]
    f = torch.tensor([[[[1.0, 2.0]], [[-3.0, 0.0]]]])
    expected = torch.tensor([[5.0, 2.0]]) / math.sqrt(29.0)
    assert torch.allclose(attention_map(f), expected)
    assert torch.allclose(attention_map(torch.randn(3, 5, 4, 4)).norm(dim=1), torch.ones(3))
    # p = 1: mean of |A| = [(1+3)/2, (2+0)/2] = [2, 1]; p = 3: [(1+27)/2, (8+0)/2] = [14, 4]
    assert torch.allclose(attention_map(f, p=1), torch.tensor([[2.0, 1.0]]) / math.sqrt(5.0))
    assert torch.allclose(attention_map(f, p=3), torch.tensor([[14.0, 4.0]]) / math.sqrt(212.0))
    with pytest.raises(ValueError, match="p must be >= 1"):
        attention_map(f, p=0)
    with pytest.raises(ValueError, match="feature must have 4 dimensions"):
        attention_map(f[0], p=2)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_attention_transfer_loss_hand_value(p):
    # student map ∝ [1, 0] → Q_s = [1, 0]; teacher |A|^p = [3, 4] → Q_t = [0.6, 0.8]
    # loss = mean((1 − 0.6)², (0 − 0.8)²) = (0.16 + 0.64) / 2 = 0.4, at every p
    student = torch.tensor([[[[1.0, 0.0]]]])
    teacher = torch.tensor([[[[3.0, 4.0]]]]).pow(1.0 / p)
    loss = attention_transfer_loss([student], [teacher], p=p)
    assert loss.item() == pytest.approx(0.4, rel=1e-5)
    # two layers add up (a sum over layers, not a mean)
    two = attention_transfer_loss([student, student], [teacher, teacher], p=p)
    assert two.item() == pytest.approx(0.8, rel=1e-5)


def test_attention_transfer_loss_matches_reference_formula():
    g = torch.Generator().manual_seed(5)
    s = [torch.randn(4, 3, 6, 6, generator=g), torch.randn(4, 5, 3, 3, generator=g)]
    t = [torch.randn(4, 8, 6, 6, generator=g), torch.randn(4, 2, 3, 3, generator=g)]

    def at(x):  # the authors' code: F.normalize(x.pow(2).mean(1).view(x.size(0), -1))
        return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))

    ref = sum((at(a) - at(b)).pow(2).mean() for a, b in zip(s, t, strict=True))
    assert attention_transfer_loss(s, t).item() == pytest.approx(ref.item(), rel=1e-6)

    def at_p(x, p):  # the same with |x|^p, as in the paper's family of maps
        return F.normalize(x.abs().pow(p).mean(1).view(x.size(0), -1))

    for p in (1, 3):
        ref_p = sum((at_p(a, p) - at_p(b, p)).pow(2).mean() for a, b in zip(s, t, strict=True))
        assert attention_transfer_loss(s, t, p=p).item() == pytest.approx(ref_p.item(), rel=1e-6)
        assert abs(ref_p.item() - ref.item()) > 1e-4  # p matters
    assert attention_transfer_loss(t, t).item() == pytest.approx(0.0, abs=1e-8)
    # AT is blind to the feature scale: the map is normalised
    assert attention_transfer_loss([3 * t[0]], [t[0]]).item() == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="spatial"):
        attention_transfer_loss([s[0]], [t[1]])
    with pytest.raises(ValueError, match="equal length"):
        attention_transfer_loss(s, t[:1])
    with pytest.raises(ValueError, match="p must be >= 1"):
        attention_transfer_loss(s, t, p=0)
    with pytest.raises(TypeError, match="student_features must be list or tuple"):
        attention_transfer_loss(s[0], t[0])


@PROPERTY
@given(
    seed=st.integers(0, 10_000),
    p=st.integers(1, 4),
    scale_s=st.floats(0.01, 100.0),
    scale_t=st.floats(0.01, 100.0),
)
def test_attention_transfer_invariances(seed, p, scale_s, scale_t):
    """The map is a channel mean of |A|^p, L2-normalised: blind to scale and channel order;
    moving the positions of both maps the same way only reorders the squared differences."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    t = torch.randn(2, 6, 4, 5, generator=g, dtype=torch.float64)
    base = attention_transfer_loss([s], [t], p=p).item()
    assert 0.0 < base <= 2.0 / 20  # two unit vectors differ by at most √2; mean over 20 positions
    perm_c = torch.randperm(6, generator=g)
    perm_hw = torch.randperm(20, generator=g)

    def move(x):
        return x.flatten(2)[:, :, perm_hw].view_as(x)

    assert attention_transfer_loss([scale_s * s], [scale_t * t[:, perm_c]], p=p).item() == (
        pytest.approx(base, rel=1e-9)
    )
    assert attention_transfer_loss([move(s)], [move(t)], p=p).item() == pytest.approx(
        base, rel=1e-9
    )
    assert attention_transfer_loss([s], [-t], p=p).item() == pytest.approx(base, rel=1e-9)


def test_rkd_distance_loss_hand_value():
    # teacher: points at 0, 1, 3 on a line → distances 1, 3, 2, mean μ = 2 → ψ = 0.5, 1.5, 1
    # student: points at 0, 1, 2 → distances 1, 2, 1, mean 4/3 → ψ = 0.75, 1.5, 0.75
    # each pair appears twice in the 3×3 matrix; differences 0.25, 0, 0.25 (Huber: 0.5·d²)
    teacher = torch.tensor([[0.0], [1.0], [3.0]])
    student = torch.tensor([[0.0], [1.0], [2.0]])
    expected = 2 * (0.5 * 0.25**2 + 0.0 + 0.5 * 0.25**2) / 9
    assert rkd_distance_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    # a difference above 1 is in Huber's linear part: |d| − 0.5
    far = torch.tensor([[0.0], [1.0], [10.0]])  # distances 1, 10, 9 (mean 20/3) → ψ 0.15, 1.5, 1.35
    near = torch.tensor(
        [[0.0], [5.0], [10.0]]
    )  # distances 5, 10, 5 (mean 20/3) → ψ 0.75, 1.5, 0.75
    expected = 2 * (0.5 * 0.6**2 + 0.0 + 0.5 * 0.6**2) / 9
    assert rkd_distance_loss(near, far).item() == pytest.approx(expected, rel=1e-5)
    big = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [9.0, 9.0]])
    small = torch.tensor([[0.0], [0.1], [0.2], [0.3]])
    ref = F.smooth_l1_loss(
        torch.cdist(small, small) / torch.pdist(small).mean(),
        torch.cdist(big, big) / torch.pdist(big).mean(),
    )
    assert ref.item() > 0.05  # some differences exceed 1: both Huber branches are exercised
    assert rkd_distance_loss(small, big).item() == pytest.approx(ref.item(), rel=1e-5)


def _rkd_distance_float64(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Reference in float64 from explicit differences (no matrix-product shortcut)."""

    def psi(e):
        d = (e.unsqueeze(0) - e.unsqueeze(1)).pow(2).sum(-1).add(1e-300).sqrt()
        return d / (d.sum() / (len(e) * (len(e) - 1)))

    return F.smooth_l1_loss(psi(student), psi(teacher).detach())


def test_rkd_distance_is_exact_for_large_batches_with_a_shared_offset():
    """Issue 9.8: cdist's ‖a‖²+‖b‖²−2ab formula (batches > 25) cancels when features share an offset."""
    g = torch.Generator().manual_seed(8)
    student = torch.randn(64, 32, generator=g) + 100.0
    teacher = torch.randn(64, 48, generator=g) * 2 + 300.0
    s32 = student.clone().requires_grad_()
    loss = rkd_distance_loss(s32, teacher)
    loss.backward()
    s64 = student.double().requires_grad_()
    ref = _rkd_distance_float64(s64, teacher.double())
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)
    assert torch.allclose(s32.grad.double(), s64.grad, rtol=1e-3, atol=1e-3 * s64.grad.abs().max())


def test_rkd_losses_pass_gradcheck():
    g = torch.Generator().manual_seed(9)
    s = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 4, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: rkd_distance_loss(x, t), (s,))
    assert torch.autograd.gradcheck(lambda x: rkd_angle_loss(x, t), (s,))


def test_rkd_angle_loss_hand_value():
    """Equilateral student (every angle 60°) vs right isosceles teacher (90°, 45°, 45°).

    Of the 27 triplets (i, j, k) with vertex j: 6 with i = k ≠ j have cos 1 in both,
    15 with i = j or k = j are 0 in both, and the 6 with distinct i, j, k differ:
    0.5 vs 0 at the right angle (twice), 0.5 vs 1/√2 at the 45° vertices (four times).
    """
    student = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    teacher = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    expected = (2 * 0.5 * 0.5**2 + 4 * 0.5 * (1 / math.sqrt(2) - 0.5) ** 2) / 27
    assert rkd_angle_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    assert rkd_angle_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    # a 1-D student: every angle is 0° or 180° (cos ±1); the teacher's 60° triangle has cos 0.5
    line = torch.tensor([[0.0], [1.0], [2.0]])
    # vertex 1 (middle): 180°, cos −1 vs 0.5 (diff 1.5, linear Huber part: 1.0) twice;
    # vertices 0 and 2: 0°, cos 1 vs 0.5 (diff 0.5: 0.125) four times
    expected = (2 * (1.5 - 0.5) + 4 * 0.5 * 0.5**2) / 27
    assert rkd_angle_loss(line, student).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="at least 3"):
        rkd_angle_loss(line[:2], student[:2])
    with pytest.raises(ValueError, match="teacher_embedding must contain only finite"):
        rkd_angle_loss(line, torch.full((3, 2), float("nan")))


def _random_rotation(dim: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed)))
    return (q * torch.sign(torch.diagonal(r))).double()


@PROPERTY
@given(
    seed=st.integers(0, 10_000),
    scale=st.floats(0.1, 10.0),
    offset=st.floats(-50.0, 50.0),
)
def test_rkd_losses_are_invariant_to_rotation_translation_and_scale(seed, scale, offset):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(7, 3, generator=g, dtype=torch.float64)
    t = torch.randn(7, 5, generator=g, dtype=torch.float64)
    moved_s = scale * s @ _random_rotation(3, seed) + offset
    moved_t = t @ _random_rotation(5, seed + 1) - offset
    for loss in (rkd_distance_loss, rkd_angle_loss):
        base = loss(s, t).item()
        assert base > 1e-4  # a real, non-degenerate loss
        assert loss(moved_s, moved_t).item() == pytest.approx(base, rel=1e-6, abs=1e-9)


def test_rkd_distance_loss_matches_pdist_and_rejects_bad_input():
    g = torch.Generator().manual_seed(6)
    t = torch.randn(6, 8, generator=g)
    assert rkd_distance_loss(2.5 * t, t).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(6, 3, generator=g, requires_grad=True)
    d_s = torch.pdist(s)
    d_t = torch.pdist(t)
    # pdist holds each pair once, the full matrix twice plus a zero diagonal: smooth-L1 mean rescales
    ref = F.smooth_l1_loss(d_s / d_s.mean(), d_t / d_t.mean(), reduction="sum") * 2 / 36
    loss = rkd_distance_loss(s, t)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ValueError, match="same batch size, at least 2"):
        rkd_distance_loss(s[:1], t[:1])
    with pytest.raises(ValueError, match="same batch size"):
        rkd_distance_loss(s, t[:4])
    with pytest.raises(ValueError, match="student_embedding must have 2 dimensions"):
        rkd_distance_loss(s.view(6, 3, 1), t)


# ---------------------------------------------------------------- adversarial, trainer


def _tiny_loader(n: int = 32) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(
        torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    )
    return make_loader(ds, 16, shuffle=True)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.allclose(x, y, rtol=1e-5, atol=1e-6)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_adversarial_loss_is_one_discriminator_step_then_the_student_loss():
    """Replay the call by hand: BCE(D(z_t), 1) + BCE(D(z_s), 0) → one Adam step of D → CE + β·BCE(D'(z_s), 1)."""
    torch.manual_seed(0)
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    disc = LogitDiscriminator(3, hidden=5)
    replay = copy.deepcopy(disc)
    before_t = copy.deepcopy(teacher.state_dict())
    adv = AdversarialLoss(teacher, disc, weight=0.7, lr=0.01)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 2, 1, 0])
    loss = adv(student, x, y)
    assert student.weight.grad is None  # D's update never reaches the student
    z_t, z_s = teacher(x).detach(), student(x)
    opt = torch.optim.Adam(replay.parameters(), lr=0.01, betas=(0.5, 0.999))
    d_real, d_fake = replay(z_t), replay(z_s.detach())
    d_loss = F.binary_cross_entropy_with_logits(
        d_real, torch.ones(6)
    ) + F.binary_cross_entropy_with_logits(d_fake, torch.zeros(6))
    opt.zero_grad()
    d_loss.backward()
    opt.step()
    assert adv.d_losses == [pytest.approx(d_loss.item(), rel=1e-6)]
    assert _same_weights(disc, replay)
    expected = F.cross_entropy(z_s, y) + 0.7 * F.binary_cross_entropy_with_logits(
        replay(z_s), torch.ones(6)
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert student.weight.grad is not None and teacher.weight.grad is None
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before_t.items())
    with pytest.raises(ValueError, match="weight"):
        AdversarialLoss(teacher, disc, weight=-1.0)
    with pytest.raises(TypeError, match="discriminator"):
        AdversarialLoss(teacher, "D")


def _recording(monkeypatch, name: str) -> list[tuple[nn.Module, dict]]:
    """Patch ``utils.distillation.<name>`` so that every instance and its initial weights are recorded."""
    made: list[tuple[nn.Module, dict]] = []
    base = getattr(distillation, name)

    class Recorded(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append((self, copy.deepcopy(self.state_dict())))

    monkeypatch.setattr(distillation, name, Recorded)
    return made


def _features_loss(teacher, pairs, transfer):
    """``CE + transfer(student features, teacher features)`` written out with capture_features."""

    def compute_loss(student, x, y):
        with capture_features(teacher, [t for _, t in pairs]) as tf, torch.no_grad():
            teacher(x)
        with capture_features(student, [s for s, _ in pairs]) as sf:
            logits = student(x)
        s_list, t_list = [sf[s] for s, _ in pairs], [tf[t] for _, t in pairs]
        return F.cross_entropy(logits, y) + transfer(s_list, t_list)

    return compute_loss


@pytest.mark.parametrize("weight", [None, 7.0])
@pytest.mark.parametrize("method", ["fitnets", "at", "rkd", "adversarial"])
def test_distill_is_fit_with_the_method_loss(monkeypatch, method, weight):
    """distill(...) trains exactly as fit() with the loss written out by hand (default or given β)."""
    beta = DEFAULT_WEIGHTS[method] if weight is None else weight
    pairs = DEFAULT_LAYERS.get(method, [])
    regressors = _recording(monkeypatch, "HintRegressor")
    discriminators = _recording(monkeypatch, "LogitDiscriminator")
    torch.manual_seed(0)
    teacher, student = LeNet5(), StudentLeNet()
    replay = copy.deepcopy(student)
    history = distill(
        student, teacher, _tiny_loader(), method=method, epochs=1, lr=2e-3, weight=weight
    )
    params = list(replay.parameters())
    if method == "fitnets":
        assert len(regressors) == len(pairs) == 1
        reg = HintRegressor(8, 50)  # StudentLeNet conv2 has 8 channels, LeNet-5's 50
        reg.load_state_dict(regressors[0][1])
        assert not _same_weights(reg, regressors[0][0])  # the regressor was trained too
        params += list(reg.parameters())
        loss = _features_loss(
            teacher,
            pairs,
            lambda s, t: beta * sum(hint_loss(a, b, reg) for a, b in zip(s, t, strict=True)),
        )
    elif method == "at":
        loss = _features_loss(teacher, pairs, lambda s, t: beta * attention_transfer_loss(s, t))
    elif method == "rkd":
        loss = _features_loss(
            teacher,
            pairs,
            lambda s, t: beta * sum(rkd_distance_loss(a, b) for a, b in zip(s, t, strict=True)),
        )
    else:
        assert len(discriminators) == 1
        disc = LogitDiscriminator(10)
        disc.load_state_dict(discriminators[0][1])
        loss = AdversarialLoss(teacher, disc, weight=beta)
    with frozen(teacher):
        expected = fit(replay, _tiny_loader(), epochs=1, lr=2e-3, compute_loss=loss, params=params)
    assert history[0]["train_loss"] == pytest.approx(expected[0]["train_loss"], rel=1e-5)
    assert _same_weights(student, replay)
    assert all(p.requires_grad for p in teacher.parameters()) and teacher.training


def test_distill_kd_and_scratch_are_fit_with_kd_loss_and_ce():
    """The teacher has dropout: distillation must run it in eval mode (a fixed target)."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(784, 10))
    t_state = copy.deepcopy(teacher.state_dict())
    student = StudentLeNet()
    replay, scratch, scratch_replay = (copy.deepcopy(student) for _ in range(3))
    history = distill(
        student, teacher, _tiny_loader(), method="kd", epochs=2, temperature=2.5, alpha=0.7
    )
    with frozen(teacher):
        expected = fit(
            replay,
            _tiny_loader(),
            epochs=2,
            lr=3e-3,
            compute_loss=make_kd_loss(teacher, 2.5, 0.7),
            progress=False,
        )
    assert [r["train_loss"] for r in history] == pytest.approx(
        [r["train_loss"] for r in expected], rel=1e-5
    )
    assert _same_weights(student, replay)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_state.items())
    assert teacher.training  # the mode it came in
    distill(scratch, None, _tiny_loader(), method="scratch", epochs=1)
    fit(scratch_replay, _tiny_loader(), epochs=1, lr=3e-3, progress=False)
    assert _same_weights(scratch, scratch_replay)


def test_distill_rejects_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        distill(StudentLeNet(), LeNet5(), _tiny_loader(), method="magic", epochs=1)
    with pytest.raises(TypeError, match="teacher"):
        distill(StudentLeNet(), None, _tiny_loader(), method="kd", epochs=1)
    with pytest.raises(ValueError, match="weight"):
        distill(StudentLeNet(), LeNet5(), _tiny_loader(), method="at", epochs=1, weight=-1.0)
    with pytest.raises(TypeError, match="student"):
        distill("net", LeNet5(), _tiny_loader(), epochs=1)
    with pytest.raises(ValueError, match="layers pair"):
        distill(
            StudentLeNet(),
            LeNet5(),
            _tiny_loader(),
            method="at",
            epochs=1,
            layers=[("conv1", "conv9")],
        )
    with pytest.raises(ValueError, match="pairs"):
        distill(StudentLeNet(), LeNet5(), _tiny_loader(), method="at", epochs=1, layers=["conv1"])
    with pytest.raises(TypeError, match="train_loader"):
        distill(StudentLeNet(), LeNet5(), [(torch.zeros(1), 0)], method="kd", epochs=1)


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


def test_train_generator_is_fit_with_the_dafl_loss():
    torch.manual_seed(0)
    teacher, gen = LeNet5(), Generator(latent_dim=8, channels=8)
    replay = copy.deepcopy(gen)
    h = train_generator(gen, teacher, noise_loader(2, 8, 8), epochs=1, lr=5e-3)

    def dafl(g, z, _y):
        with capture_features(teacher, ["relu"]) as feats:
            logits = teacher(g(z))
        return dafl_generator_loss(logits, feats["relu"])

    with frozen(teacher):
        expected = fit(replay, noise_loader(2, 8, 8), epochs=1, lr=5e-3, compute_loss=dafl)
    assert h[0]["train_loss"] == pytest.approx(expected[0]["train_loss"], rel=1e-5)
    assert _same_weights(gen, replay)
    assert teacher.conv1.weight.grad is None and teacher.training
    with pytest.raises(ValueError, match="feature_layer"):
        train_generator(gen, teacher, noise_loader(1, 4, 8), epochs=1, feature_layer="fc9")


def test_synthesize_labels_generated_images_with_the_teacher():
    torch.manual_seed(0)
    teacher, gen = LeNet5(), Generator(latent_dim=8, channels=8)
    gen.train()
    transfer = synthesize(gen, teacher, 10, batch_size=4, seed=3)
    x, t = transfer.tensors
    z = torch.randn(10, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(x, gen.eval()(z), atol=1e-6)  # eval mode: BN running statistics
        assert torch.allclose(t, teacher(x), atol=1e-5)  # the labels are the teacher's logits
    assert x.shape == (10, 1, 28, 28) and t.shape == (10, 10)
    with pytest.raises(ValueError, match="num_images"):
        synthesize(gen, teacher, 0)
    with pytest.raises(TypeError, match="latent_dim"):
        synthesize(nn.Linear(8, 784), teacher, 4)


def test_data_free_distill_is_kd_on_the_synthetic_set():
    torch.manual_seed(0)
    teacher, gen, student = LeNet5(), Generator(latent_dim=8, channels=8), StudentLeNet()
    g_state = copy.deepcopy(gen.state_dict())
    replay = copy.deepcopy(student)
    h = data_free_distill(
        student, teacher, gen, num_images=16, epochs=1, batch_size=8, temperature=3.0, seed=2
    )
    assert all(torch.equal(v, gen.state_dict()[k]) for k, v in g_state.items())
    assert all(p.requires_grad for p in gen.parameters())
    transfer = synthesize(gen, teacher, 16, seed=2)
    loader = DataLoader(
        transfer, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(2)
    )
    expected = fit(
        replay,
        loader,
        epochs=1,
        lr=3e-3,
        compute_loss=lambda m, x, t: kd_loss(m(x), t, 3.0),
        progress=False,
    )
    assert h[0]["train_loss"] == pytest.approx(expected[0]["train_loss"], rel=1e-5)
    assert _same_weights(student, replay)
    with pytest.raises(ValueError, match="temperature"):
        data_free_distill(student, teacher, gen, epochs=1, temperature=0.0)


def test_on_device_moves_and_returns():
    net = nn.Linear(2, 2)
    with on_device(net, "cpu") as moved:
        assert moved is net and net.weight.device.type == "cpu"
    assert net.weight.device.type == "cpu"
    with pytest.raises(TypeError, match="model"):
        with on_device("net", "cpu"):
            pass


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
