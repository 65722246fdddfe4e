"""Knowledge distillation: a small student learns from a large teacher.

* Response-based: :func:`soft_targets` and :func:`kd_loss`, the soft-target loss of
  Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015):
  KL divergence of temperature-softened distributions, scaled by ``T²``, mixed
  with the hard-label cross-entropy.
* Feature-based: :func:`hint_loss` with a learned :class:`HintRegressor` (FitNets,
  Romero et al., ICLR 2015) and :func:`attention_transfer_loss` (Zagoruyko &
  Komodakis, ICLR 2017).
* Relation-based: :func:`rkd_distance_loss` and :func:`rkd_angle_loss` (relational KD,
  Park et al., CVPR 2019).
* Adversarial: a :class:`LogitDiscriminator` tells teacher from student logits and
  the student learns to fool it (:class:`AdversarialLoss`; Xu, Hsu & Huang,
  ICLR-W 2018).
* Data-free: a :class:`Generator` synthesises inputs from the teacher alone
  (:func:`dafl_generator_loss`, DAFL, Chen et al., ICCV 2019), then the student is
  distilled on them (:func:`data_free_distill`).

Every trainer here is a ``compute_loss`` closure handed to the course's one loop,
:func:`utils.training.fit`; nothing re-implements the loop. Devices: a frozen teacher
(or discriminator) runs on the device of its own parameters and its outputs are moved
to the student's, so a CPU teacher and a CUDA student (or the reverse) work together;
:func:`distill` and :func:`train_generator` give the teacher back on the device it came on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from utils.config import get_device
from utils.training import LossFn, device_of, fit
from utils.validation import (
    check_choice,
    check_float,
    check_int,
    check_module,
    check_tensor,
    check_type,
)

VERSION = 2
"""Put this in the cache key of any model trained with these losses: it is bumped when a fix
changes what a student learns (2: RKD distances computed exactly, no longer by ``cdist``'s
matrix-product formula, which cancelled for batches over 25)."""

METHODS = ("scratch", "kd", "fitnets", "at", "rkd", "adversarial")
"""Methods of :func:`distill` (``"scratch"``: hard labels only, no teacher)."""

DEFAULT_WEIGHTS = {"fitnets": 1.0, "at": 1000.0, "rkd": 25.0, "adversarial": 0.5}
"""Weight β of each method's transfer term (AT and RKD as in their papers)."""


# ---------------------------------------------------------------- response-based


def _check_temperature(temperature: float) -> None:
    check_float("temperature", temperature, 0.0, min_inclusive=False)


def _check_logits(name: str, logits: Tensor) -> None:
    """``logits`` must be a finite floating-point ``(N, K)`` tensor with ``N ≥ 1``, ``K ≥ 2``."""
    check_tensor(name, logits, ndim=2, finite=True)
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one row (an empty batch has no mean loss)")
    if logits.shape[1] < 2:
        raise ValueError(f"{name} must have at least 2 classes, got shape {tuple(logits.shape)}")


def _check_labels(labels: Tensor, rows: int, classes: int) -> None:
    """``labels`` must be ``rows`` integer class indices in ``[0, classes)``."""
    check_tensor("labels", labels, ndim=1)
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.shape[0] != rows:
        raise ValueError(f"labels must have {rows} entries, got {labels.shape[0]}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(
            f"labels must lie in [0, {classes - 1}] (one index per class), "
            f"got values in [{int(labels.min())}, {int(labels.max())}]"
        )


def soft_targets(logits: Tensor, temperature: float) -> Tensor:
    """Temperature-softened probabilities ``p_i = exp(z_i/T) / Σ_j exp(z_j/T)`` (Hinton et al. 2015, eq. 1).

    ``T = 1`` is the ordinary softmax; a higher ``T`` gives a softer distribution
    that shows which wrong classes the model finds similar ("dark knowledge").
    """
    _check_logits("logits", logits)
    _check_temperature(temperature)
    return F.softmax(logits / temperature, dim=1)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    labels: Tensor | None = None,
    alpha: float = 1.0,
) -> Tensor:
    """Hinton et al. (2015) distillation loss, averaged over the batch.

    ``L = α · T² · KL(p^T ‖ q^T) + (1 − α) · CE(softmax(z_s), y)``, where
    ``p^T = softmax(z_t/T)`` (teacher), ``q^T = softmax(z_s/T)`` (student). The
    gradient of the soft term w.r.t. a student logit is ``T·(q_i − p_i)``: the ``T²``
    keeps it on the scale of the hard-label gradient ``q_i − y_i`` as ``T`` changes.
    The teacher's logits are detached: they never receive gradients.

    Args:
        student_logits, teacher_logits: ``(N, K)`` logits of the same shape.
        temperature: ``T > 0``.
        labels: ``(N,)`` class indices; required when ``alpha < 1``.
        alpha: weight of the soft term, in ``[0, 1]``.
    """
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    _check_temperature(temperature)
    check_float("alpha", alpha, 0.0, 1.0)
    if alpha < 1.0 and labels is None:
        raise ValueError(
            "labels are required when alpha < 1 (the hard-label term has weight 1 - alpha)"
        )
    if labels is not None:
        _check_labels(labels, student_logits.shape[0], student_logits.shape[1])
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    soft = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * temperature**2
    if alpha == 1.0:
        return soft
    hard = F.cross_entropy(student_logits, labels.to(student_logits.device))
    return alpha * soft + (1.0 - alpha) * hard


# ---------------------------------------------------------------- features


@contextmanager
def capture_features(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Inside the ``with`` block, ``features[name]`` holds the output of ``model.<name>`` of the last forward.

    Forward hooks record the outputs (with their autograd history, so a loss on a
    student feature trains the student); they are removed on exit.
    """
    check_module("model", model)
    check_type("names", names, (list, tuple))
    for name in names:
        check_type("names[i]", name, str)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(
            f"names {missing} are not submodules of the model; available: {list(modules)[1:]}"
        )
    features: dict[str, Tensor] = {}
    handles = [
        modules[n].register_forward_hook(lambda _m, _i, out, n=n: features.__setitem__(n, out))
        for n in names
    ]
    try:
        yield features
    finally:
        for h in handles:
            h.remove()


class HintRegressor(nn.Module):
    """FitNets regressor: a 1×1 convolution (or a linear map for vectors) from student to teacher width."""

    def __init__(self, student_channels: int, teacher_channels: int, conv: bool = True) -> None:
        super().__init__()
        check_int("student_channels", student_channels, minimum=1)
        check_int("teacher_channels", teacher_channels, minimum=1)
        check_type("conv", conv, bool)
        if conv:
            self.proj: nn.Module = nn.Conv2d(student_channels, teacher_channels, 1)
        else:
            self.proj = nn.Linear(student_channels, teacher_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def hint_loss(student_feature: Tensor, teacher_feature: Tensor, regressor: nn.Module) -> Tensor:
    """FitNets hint loss ``mean((r(F_s) − F_t)²)`` (Romero et al. 2015, eq. 3, averaged not halved).

    ``r`` is the learned ``regressor`` that maps the thinner student feature to the
    teacher's width; the teacher feature is detached.
    """
    check_tensor("student_feature", student_feature, finite=True)
    check_tensor("teacher_feature", teacher_feature, finite=True)
    check_module("regressor", regressor)
    mapped = regressor(student_feature.to(device_of(regressor)))
    if mapped.shape != teacher_feature.shape:
        raise ValueError(
            f"regressor(student_feature) has shape {tuple(mapped.shape)} but teacher_feature has "
            f"{tuple(teacher_feature.shape)}; choose the regressor's output width and the layers to match"
        )
    return F.mse_loss(mapped, teacher_feature.detach().to(mapped.device))


def attention_map(feature: Tensor, p: int = 2) -> Tensor:
    """Spatial attention ``Q = vec(Σ_c |A_c|^p / C) / ‖vec(Σ_c |A_c|^p / C)‖₂`` (Zagoruyko & Komodakis 2017).

    ``feature`` is ``(N, C, H, W)``; the result is ``(N, H·W)`` with unit L2 norm per row.
    """
    check_tensor("feature", feature, ndim=4, finite=True)
    check_int("p", p, minimum=1)
    return F.normalize(feature.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def attention_transfer_loss(
    student_features: Sequence[Tensor], teacher_features: Sequence[Tensor], p: int = 2
) -> Tensor:
    """Attention transfer ``Σ_j mean((Q_s^j − Q_t^j)²)`` over pairs of layers of equal spatial size.

    As in the authors' reference code the squared difference is averaged over the
    batch and the ``H·W`` positions; multiply by β (1000 in the paper's code).
    Channel counts may differ: the maps average over channels.
    """
    check_type("student_features", student_features, (list, tuple))
    check_type("teacher_features", teacher_features, (list, tuple))
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError(
            "student_features and teacher_features must be non-empty and of equal length"
        )
    check_int("p", p, minimum=1)
    total = student_features[0].new_zeros(())
    for s, t in zip(student_features, teacher_features, strict=True):
        check_tensor("student_features[i]", s, ndim=4)
        check_tensor("teacher_features[i]", t, ndim=4)
        if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
            raise ValueError(
                f"feature maps must share batch and spatial size, got {tuple(s.shape)} and {tuple(t.shape)}"
            )
        q_t = attention_map(t.detach(), p).to(s.device)
        total = total + (attention_map(s, p) - q_t).pow(2).mean()
    return total


def _normalized_distances(embedding: Tensor) -> Tensor:
    """``‖e_i − e_j‖₂ / μ`` for every pair, ``μ`` the mean over ``i ≠ j``.

    The distances are computed from the differences ``e_i − e_j``: ``torch.cdist``'s
    default switches to ``‖a‖² + ‖b‖² − 2ab`` for batches over 25, which cancels
    catastrophically when the embeddings share a large offset (e.g. post-ReLU features).
    """
    d = torch.cdist(embedding, embedding, compute_mode="donot_use_mm_for_euclid_dist")
    off_diagonal = d[~torch.eye(len(d), dtype=torch.bool, device=d.device)]
    return d / off_diagonal.mean().clamp_min(1e-12)


def _check_embeddings(student_embedding: Tensor, teacher_embedding: Tensor, minimum: int) -> None:
    check_tensor("student_embedding", student_embedding, ndim=2, finite=True)
    check_tensor("teacher_embedding", teacher_embedding, ndim=2, finite=True)
    n_s, n_t = student_embedding.shape[0], teacher_embedding.shape[0]
    if n_s != n_t or n_s < minimum:
        raise ValueError(
            f"student_embedding and teacher_embedding need the same batch size, at least "
            f"{minimum}; got {n_s} and {n_t}"
        )


def rkd_distance_loss(student_embedding: Tensor, teacher_embedding: Tensor) -> Tensor:
    """Relational KD, distance-wise (Park et al. 2019, eq. 4–5).

    ``ψ_D(t_i, t_j) = ‖t_i − t_j‖₂ / μ`` with ``μ`` the mean distance over pairs
    ``i ≠ j`` of the batch; the loss is the Huber (smooth-L1) distance between the
    student's and the teacher's ``ψ_D`` matrices. Embedding widths may differ.
    """
    _check_embeddings(student_embedding, teacher_embedding, 2)
    with torch.no_grad():
        target = _normalized_distances(teacher_embedding.detach()).to(student_embedding.device)
    return F.smooth_l1_loss(_normalized_distances(student_embedding), target)


def _triplet_cosines(embedding: Tensor) -> Tensor:
    """``cos ∠t_i t_j t_k = ⟨e_ij, e_kj⟩`` with ``e_ij = (t_i − t_j)/‖t_i − t_j‖₂``, as ``(N, N, N)`` indexed ``[j, i, k]``.

    A zero difference (``i = j`` or ``k = j``) gives a zero vector, so those entries are 0.
    """
    diff = embedding.unsqueeze(0) - embedding.unsqueeze(1)  # diff[j, i] = t_i − t_j
    unit = F.normalize(diff, p=2, dim=2)
    return torch.bmm(unit, unit.transpose(1, 2))


def rkd_angle_loss(student_embedding: Tensor, teacher_embedding: Tensor) -> Tensor:
    """Relational KD, angle-wise (Park et al. 2019, eq. 6–7).

    ``ψ_A(t_i, t_j, t_k) = cos ∠t_i t_j t_k = ⟨e_ij, e_kj⟩``, ``e_ij = (t_i − t_j) / ‖t_i − t_j‖₂``;
    the loss is the Huber (smooth-L1) distance between the student's and the teacher's
    ``ψ_A`` over all ``N³`` triplets (mean, as in the authors' code). Angles need no
    normalisation: they are already invariant to scale, rotation and translation.
    """
    _check_embeddings(student_embedding, teacher_embedding, 3)
    with torch.no_grad():
        target = _triplet_cosines(teacher_embedding.detach()).to(student_embedding.device)
    return F.smooth_l1_loss(_triplet_cosines(student_embedding), target)


# ---------------------------------------------------------------- adversarial


@torch.no_grad()
def _teacher_logits(teacher: nn.Module, x: Tensor) -> Tensor:
    """The teacher's output on ``x``, computed on the teacher's device, returned on ``x``'s."""
    return teacher(x.to(device_of(teacher))).to(x.device)


class LogitDiscriminator(nn.Module):
    """A small MLP that scores logits: high for the teacher's, low for the student's."""

    def __init__(self, num_classes: int = 10, hidden: int = 64) -> None:
        super().__init__()
        check_int("num_classes", num_classes, minimum=2)
        check_int("hidden", hidden, minimum=1)
        self.net = nn.Sequential(
            nn.Linear(num_classes, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )

    def forward(self, logits: Tensor) -> Tensor:
        return self.net(logits).squeeze(1)


class AdversarialLoss:
    """Adversarial distillation (Xu, Hsu & Huang 2018) as a ``compute_loss`` for :func:`fit`.

    Each call first updates the discriminator ``D`` on the batch with
    ``BCE(D(z_t), 1) + BCE(D(z_s.detach()), 0)``, then returns the student's loss
    ``CE(z_s, y) + β · BCE(D(z_s), 1)``: fit the labels and make ``D`` take the
    student's logits for the teacher's.
    """

    def __init__(
        self, teacher: nn.Module, discriminator: nn.Module, *, weight: float = 0.5, lr: float = 1e-3
    ) -> None:
        check_module("teacher", teacher)
        check_module("discriminator", discriminator)
        check_float("weight", weight, 0.0)
        check_float("lr", lr, 0.0, min_inclusive=False)
        self.teacher, self.discriminator, self.weight = teacher, discriminator, weight
        self.optimizer = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
        self.d_losses: list[float] = []

    def __call__(self, student: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        check_module("student", student)
        student_logits = student(x.to(device_of(student)))
        teacher_logits = _teacher_logits(self.teacher, x)
        d_device = device_of(self.discriminator)
        d_real = self.discriminator(teacher_logits.to(d_device))
        d_fake = self.discriminator(student_logits.detach().to(d_device))
        d_loss = F.binary_cross_entropy_with_logits(
            d_real, torch.ones_like(d_real)
        ) + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
        self.optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        self.optimizer.step()
        self.d_losses.append(d_loss.item())
        fool = self.discriminator(student_logits.to(d_device)).to(student_logits.device)
        adv = F.binary_cross_entropy_with_logits(fool, torch.ones_like(fool))
        hard = F.cross_entropy(student_logits, y.to(student_logits.device))
        return hard + self.weight * adv


# ---------------------------------------------------------------- trainer


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``requires_grad=False`` for every parameter inside the block; restored on exit."""
    check_module("model", model)
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)


def make_kd_loss(teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9) -> LossFn:
    """``compute_loss`` for :func:`fit`: the teacher's logits on the batch, then :func:`kd_loss`."""
    check_module("teacher", teacher)
    _check_temperature(temperature)
    check_float("alpha", alpha, 0.0, 1.0)

    def compute_loss(student: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x = x.to(device_of(student))
        return kd_loss(student(x), _teacher_logits(teacher, x), temperature, y, alpha)

    return compute_loss


@contextmanager
def on_device(model: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """Inside the block ``model`` lives on ``device``; on exit it goes back to where it was."""
    check_module("model", model)
    home = device_of(model)
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


def _check_layers(pairs: list, student: nn.Module, teacher: nn.Module) -> None:
    """``pairs`` must be ``(student layer, teacher layer)`` names of submodules of each model."""
    s_names, t_names = dict(student.named_modules()), dict(teacher.named_modules())
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"layers must be (student layer, teacher layer) pairs, got {pair!r}")
        if pair[0] not in s_names or pair[1] not in t_names:
            raise ValueError(
                f"layers pair {tuple(pair)} must name a student and a teacher submodule; "
                f"student has {list(s_names)[1:]}, teacher has {list(t_names)[1:]}"
            )


def _example(loader: DataLoader, device: torch.device) -> Tensor:
    """One input of the loader's data set as a batch of one (does not touch the shuffling RNG)."""
    return loader.dataset[0][0].unsqueeze(0).to(device)


def _feature_width(model: nn.Module, name: str, example: Tensor) -> int:
    with capture_features(model, [name]) as feats, torch.no_grad():
        was_training = model.training
        model.eval()
        model(example)
        model.train(was_training)
    return feats[name].shape[1]


def _feature_loss(
    method: str,
    teacher: nn.Module,
    layers: Sequence[tuple[str, str]],
    weight: float,
    regressors: nn.ModuleList,
) -> LossFn:
    """``CE + β · transfer`` where the transfer term compares the named (student, teacher) features."""
    s_names = [s for s, _ in layers]
    t_names = [t for _, t in layers]

    def compute_loss(student: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x = x.to(device_of(student))
        with capture_features(teacher, t_names) as t_feats, torch.no_grad():
            teacher(x.to(device_of(teacher)))
        with capture_features(student, s_names) as s_feats:
            logits = student(x)
        s_list = [s_feats[n] for n in s_names]
        t_list = [t_feats[n].to(x.device) for n in t_names]
        if method == "fitnets":
            transfer = sum(
                hint_loss(s, t, r) for s, t, r in zip(s_list, t_list, regressors, strict=True)
            )
        elif method == "at":
            transfer = attention_transfer_loss(s_list, t_list)
        else:
            transfer = sum(
                rkd_distance_loss(s.flatten(1), t.flatten(1))
                for s, t in zip(s_list, t_list, strict=True)
            )
        return F.cross_entropy(logits, y.to(x.device)) + weight * transfer

    return compute_loss


DEFAULT_LAYERS = {
    "fitnets": [("conv2", "conv2")],
    "at": [("conv1", "conv1"), ("conv2", "conv2")],
    "rkd": [("relu", "relu")],
}
"""(student layer, teacher layer) pairs for the feature methods; they fit ``LeNet5`` and :class:`StudentLeNet`."""


def distill(
    student: nn.Module,
    teacher: nn.Module | None,
    train_loader: DataLoader,
    *,
    method: str = "kd",
    epochs: int,
    lr: float = 3e-3,
    temperature: float = 4.0,
    alpha: float = 0.9,
    weight: float | None = None,
    layers: Sequence[tuple[str, str]] | None = None,
    val_loader: DataLoader | None = None,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Train ``student`` in place by ``method`` through :func:`utils.training.fit`; return its history.

    Methods (see :data:`METHODS`): ``"scratch"`` cross-entropy only (``teacher`` may be
    ``None``); ``"kd"`` :func:`kd_loss` with ``temperature``/``alpha``; ``"fitnets"``,
    ``"at"``, ``"rkd"``: ``CE + weight · transfer`` on the ``layers`` pairs
    (:data:`DEFAULT_LAYERS`); ``"adversarial"``: :class:`AdversarialLoss`. ``weight``
    defaults to :data:`DEFAULT_WEIGHTS`. Extra trainable parts (FitNets regressors,
    the discriminator) exist only during training. The teacher is frozen throughout.
    """
    check_module("student", student)
    check_choice("method", method, METHODS)
    check_int("epochs", epochs, minimum=0)
    if method == "scratch":
        return fit(
            student,
            train_loader,
            epochs=epochs,
            lr=lr,
            val_loader=val_loader,
            progress=progress,
            desc=method,
        )
    check_module("teacher", teacher)
    check_type("train_loader", train_loader, DataLoader)
    weight = DEFAULT_WEIGHTS.get(method, 0.0) if weight is None else weight
    check_float("weight", weight, 0.0)
    pairs = list(layers) if layers is not None else DEFAULT_LAYERS.get(method, [])
    _check_layers(pairs, student, teacher)
    device = get_device()
    params = list(student.parameters())
    with frozen(teacher), on_device(teacher, device), on_device(student, device):
        if method == "kd":
            compute_loss = make_kd_loss(teacher, temperature, alpha)
        elif method == "adversarial":
            num_classes = teacher(_example(train_loader, device)).shape[1]
            compute_loss = AdversarialLoss(
                teacher, LogitDiscriminator(num_classes).to(device), weight=weight
            )
        else:
            regressors = nn.ModuleList()
            if method == "fitnets":
                example = _example(train_loader, device)
                for s_name, t_name in pairs:
                    regressors.append(
                        HintRegressor(
                            _feature_width(student, s_name, example),
                            _feature_width(teacher, t_name, example),
                        )
                    )
                regressors.to(device)
                params += list(regressors.parameters())
            compute_loss = _feature_loss(method, teacher, pairs, weight, regressors)
        return fit(
            student,
            train_loader,
            epochs=epochs,
            lr=lr,
            compute_loss=compute_loss,
            params=params,
            val_loader=val_loader,
            progress=progress,
            desc=method,
        )


# ---------------------------------------------------------------- data-free


class Generator(nn.Module):
    """DAFL-style generator (Chen et al. 2019), scaled down: ``z → 28×28`` image.

    ``Linear → BN → ×2 upsample → conv → BN → LeakyReLU → ×2 → conv → BN → LeakyReLU →
    conv → tanh → BN(affine=False)``; the last BN gives zero-mean, unit-variance
    images, the scale of the normalised real digits.
    """

    def __init__(
        self, latent_dim: int = 64, channels: int = 32, out_channels: int = 1, size: int = 28
    ) -> None:
        super().__init__()
        check_int("latent_dim", latent_dim, minimum=1)
        check_int("channels", channels, minimum=2)
        check_int("out_channels", out_channels, minimum=1)
        check_int("size", size, minimum=4)
        if size % 4:
            raise ValueError(f"size must be a multiple of 4, got {size}")
        self.latent_dim, self.channels, self.init = latent_dim, channels, size // 4
        self.fc = nn.Linear(latent_dim, channels * self.init**2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(channels, channels // 2, 3, padding=1),
            nn.BatchNorm2d(channels // 2),
            nn.LeakyReLU(0.2),
            nn.Conv2d(channels // 2, out_channels, 3, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(out_channels, affine=False),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.fc(z).view(len(z), self.channels, self.init, self.init))


def dafl_generator_loss(
    teacher_logits: Tensor,
    teacher_features: Tensor,
    *,
    activation_weight: float = 0.1,
    entropy_weight: float = 5.0,
) -> Tensor:
    """DAFL objective of the generator (Chen et al. 2019, eq. 6), to minimise.

    ``L = L_oh + a·L_a + b·L_ie``: ``L_oh = CE(z_t, argmax z_t)`` (the teacher is
    confident), ``L_a = −mean|f_t|`` (strong teacher features),
    ``L_ie = −H(mean_i softmax(z_t^i))`` (all classes equally often).
    """
    _check_logits("teacher_logits", teacher_logits)
    check_tensor("teacher_features", teacher_features)
    check_float("activation_weight", activation_weight, 0.0)
    check_float("entropy_weight", entropy_weight, 0.0)
    one_hot = F.cross_entropy(teacher_logits, teacher_logits.argmax(1))
    activation = -teacher_features.abs().mean()
    mean_p = F.softmax(teacher_logits, dim=1).mean(0)
    neg_entropy = (mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()
    return one_hot + activation_weight * activation + entropy_weight * neg_entropy


def noise_loader(
    num_batches: int, batch_size: int, latent_dim: int, *, seed: int = 0
) -> DataLoader:
    """A loader of ``num_batches`` batches of Gaussian codes ``z`` (labels are dummy zeros)."""
    check_int("num_batches", num_batches, minimum=1)
    check_int("batch_size", batch_size, minimum=2)
    check_int("latent_dim", latent_dim, minimum=1)
    check_int("seed", seed, minimum=0)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(num_batches * batch_size, latent_dim, generator=gen)
    return DataLoader(
        TensorDataset(z, torch.zeros(len(z), dtype=torch.long)),
        batch_size=batch_size,
        shuffle=True,
        generator=gen,
    )


def train_generator(
    generator: Generator,
    teacher: nn.Module,
    noise: DataLoader,
    *,
    epochs: int,
    lr: float = 1e-2,
    feature_layer: str = "relu",
    progress: bool = False,
) -> list[dict[str, float]]:
    """Train ``generator`` with :func:`dafl_generator_loss` against the frozen teacher (no real data)."""
    check_module("generator", generator)
    check_module("teacher", teacher)
    check_type("noise", noise, DataLoader)
    check_type("feature_layer", feature_layer, str)
    if feature_layer not in dict(teacher.named_modules()):
        raise ValueError(f"feature_layer {feature_layer!r} is not a submodule of the teacher")

    def compute_loss(gen: nn.Module, z: Tensor, _y: Tensor) -> Tensor:
        images = gen(z.to(device_of(gen)))
        with capture_features(teacher, [feature_layer]) as feats:
            logits = teacher(images.to(device_of(teacher)))
        return dafl_generator_loss(logits, feats[feature_layer])

    with frozen(teacher), on_device(teacher, get_device()):
        return fit(
            generator,
            noise,
            epochs=epochs,
            lr=lr,
            compute_loss=compute_loss,
            progress=progress,
            desc="generator",
        )


def cached_generator(
    teacher: nn.Module,
    teacher_config: dict,
    *,
    epochs: int,
    num_batches: int = 10,
    batch_size: int = 64,
    latent_dim: int = 64,
    channels: int = 16,
    seed: int = 0,
) -> Generator:
    """A :class:`Generator` trained by :func:`train_generator` once and cached (``utils.cache.cached_state``).

    ``teacher_config`` identifies the teacher (e.g. ``utils.cache.baseline_config(...)``)
    and is part of the cache key with every other argument.
    """
    from utils.cache import cached_state
    from utils.config import seed_everything

    check_module("teacher", teacher)
    check_type("teacher_config", teacher_config, dict)
    check_int("epochs", epochs, minimum=0)
    check_int("num_batches", num_batches, minimum=1)
    check_int("batch_size", batch_size, minimum=2)
    check_int("latent_dim", latent_dim, minimum=1)
    check_int("channels", channels, minimum=2)
    check_int("seed", seed, minimum=0)
    config = {
        "teacher": teacher_config,
        "epochs": epochs,
        "num_batches": num_batches,
        "batch_size": batch_size,
        "latent_dim": latent_dim,
        "channels": channels,
        "seed": seed,
    }

    def build() -> Generator:
        seed_everything(seed)
        return Generator(latent_dim, channels)

    def train(gen: nn.Module) -> None:
        seed_everything(seed)
        noise = noise_loader(num_batches, batch_size, latent_dim, seed=seed)
        train_generator(gen, teacher, noise, epochs=epochs)

    generator, _, _ = cached_state("dafl-generator", config, build, train)
    return generator


@torch.no_grad()
def synthesize(
    generator: nn.Module,
    teacher: nn.Module,
    num_images: int,
    *,
    batch_size: int = 256,
    seed: int = 0,
) -> TensorDataset:
    """A synthetic transfer set: ``x = G(z)``, ``z ~ N(0, I)``, each labelled with the teacher's logits ``T(x)``.

    The generator runs in eval mode (BN running statistics); everything is on the CPU.
    """
    check_module("generator", generator)
    check_module("teacher", teacher)
    check_int("num_images", num_images, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    check_int("seed", seed, minimum=0)
    latent_dim = getattr(generator, "latent_dim", None)
    if not isinstance(latent_dim, int):
        raise TypeError("generator must have an int attribute latent_dim (e.g. a Generator)")
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same codes on every device
    z = torch.randn(num_images, latent_dim, generator=gen)
    images, logits = [], []
    with frozen(teacher), frozen(generator):
        for chunk in z.split(batch_size):
            x = generator(chunk.to(device_of(generator)))
            images.append(x.cpu())
            logits.append(teacher(x.to(device_of(teacher))).cpu())
    return TensorDataset(torch.cat(images), torch.cat(logits))


def data_free_distill(
    student: nn.Module,
    teacher: nn.Module,
    generator: nn.Module,
    *,
    num_images: int = 2560,
    epochs: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    temperature: float = 4.0,
    val_loader: DataLoader | None = None,
    seed: int = 0,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Distil ``teacher`` into ``student`` on images made by the trained ``generator`` only.

    :func:`synthesize` makes ``num_images`` images and the teacher's logits for them;
    the student then minimises :func:`kd_loss` (``α = 1``: there are no labels)
    through :func:`fit`, the loader's "labels" being the teacher's logits.
    ``val_loader`` (real data) is only evaluated, never trained on.
    """
    check_module("student", student)
    _check_temperature(temperature)
    check_int("batch_size", batch_size, minimum=1)
    transfer = synthesize(generator, teacher, num_images, seed=seed)
    loader = DataLoader(
        transfer, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )

    def compute_loss(model: nn.Module, x: Tensor, teacher_logits: Tensor) -> Tensor:
        return kd_loss(model(x), teacher_logits, temperature)

    return fit(
        student,
        loader,
        epochs=epochs,
        lr=lr,
        compute_loss=compute_loss,
        val_loader=val_loader,
        progress=progress,
        desc="data-free",
    )


# ---------------------------------------------------------------- student model


class StudentLeNet(nn.Module):
    """A thin LeNet-5 (same layer names as :class:`utils.models.LeNet5`): conv c1@5×5, conv c2@5×5, fc h, fc K."""

    def __init__(
        self,
        channels: tuple[int, int] = (4, 8),
        hidden: int = 32,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 28,
    ) -> None:
        super().__init__()
        check_type("channels", channels, tuple)
        if len(channels) != 2:
            raise ValueError(f"channels must be two ints, got {channels}")
        for c in channels:
            check_int("channels[i]", c, minimum=1)
        check_int("hidden", hidden, minimum=1)
        check_int("in_channels", in_channels, minimum=1)
        check_int("num_classes", num_classes, minimum=2)
        check_int("input_size", input_size, minimum=16)
        side = ((input_size - 4) // 2 - 4) // 2
        self.conv1, self.pool1 = nn.Conv2d(in_channels, channels[0], 5), nn.MaxPool2d(2)
        self.conv2, self.pool2 = nn.Conv2d(channels[0], channels[1], 5), nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1, self.relu = nn.Linear(channels[1] * side * side, hidden), nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        return self.fc2(self.relu(self.fc1(self.flatten(x))))

    def fuse_groups(self) -> list[list[str]]:
        return [["fc1", "relu"]]


def gap_recovered(scratch: float, distilled: float, teacher: float) -> float:
    """Share of the teacher–student gap closed by distillation: ``(d − s) / (t − s)`` (any metric)."""
    for name, v in (("scratch", scratch), ("distilled", distilled), ("teacher", teacher)):
        check_float(name, v)
    if teacher == scratch:
        raise ValueError("teacher and scratch must differ (no gap to recover)")
    return (distilled - scratch) / (teacher - scratch)


__all__ = [
    "VERSION",
    "METHODS",
    "DEFAULT_WEIGHTS",
    "DEFAULT_LAYERS",
    "soft_targets",
    "kd_loss",
    "capture_features",
    "HintRegressor",
    "hint_loss",
    "attention_map",
    "attention_transfer_loss",
    "rkd_distance_loss",
    "rkd_angle_loss",
    "on_device",
    "LogitDiscriminator",
    "AdversarialLoss",
    "frozen",
    "make_kd_loss",
    "distill",
    "Generator",
    "dafl_generator_loss",
    "noise_loader",
    "train_generator",
    "synthesize",
    "data_free_distill",
    "cached_generator",
    "StudentLeNet",
    "gap_recovered",
]
