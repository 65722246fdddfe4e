"""Dynamic inference: one trained model that spends less computation where less is enough.

* **Universally slimmable network** (Yu & Huang, "Universally Slimmable Networks and Improved
  Training Techniques", ICCV 2019): :class:`SlimmableCNN` runs at any width multiplier in
  ``[0.25, 1]`` by using the first ``round(w·C)`` channels of every layer. It is trained with the
  *sandwich rule* (each step the largest, the smallest and two random widths) and *in-place
  distillation* (the smaller widths learn the largest width's soft predictions), and its BN
  statistics are *recalibrated* per width after training (:func:`recalibrate_bn`), because the
  mean and variance of a channel depend on how many channels feed it. :func:`extract_subnet`
  copies one width out as an ordinary narrow network. Lesson 10_b, section 10.7.
* **Early exit** (Teerapittayanon, McDanel & Kung, "BranchyNet: Fast Inference via Early Exiting
  from Deep Neural Networks", ICPR 2016): :class:`EarlyExitCNN` has classifier heads after each
  stage; a sample leaves at the first exit whose confidence reaches its threshold
  (:func:`exit_points`), so easy inputs pay for the first stages only (:func:`average_cost`).
  :class:`MiniLMExits` does the same on the layers of the course's MiniLM encoder (heads after
  layers 2, 4, 6; as DeeBERT, Xin et al. 2020). Lesson 10_b, sections 10.8–10.9; lab 10_b.
* **Latency-constrained architecture search**: :func:`random_search` samples per-layer widths of
  the slimmable supernet, evaluates each with the shared weights (after BN recalibration) and keeps
  the most accurate one under a MACs budget (the weight-sharing one-shot NAS of e.g. Once-for-All,
  Cai et al. 2020, in miniature). Lesson 10_b, section 10.11.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from utils.benchmark import count_macs
from utils.validation import (
    check_choice,
    check_float,
    check_int,
    check_module,
    check_tensor,
    check_type,
)

VERSION = 1
"""Put this in the cache key of every model trained here; bump it when a recipe changes."""

MIN_WIDTH, MAX_WIDTH = 0.25, 1.0
"""The range of width multipliers a :class:`SlimmableCNN` is trained for (US-Nets: 0.25×–1.0×)."""

CRITERIA = ("max_prob", "entropy")
"""Confidence measures of :func:`exit_scores`."""


# ---------------------------------------------------------------- slimmable layers


def active_channels(channels: int, width: float) -> int:
    """Channels kept at width multiplier ``width``: ``max(1, ⌊w·C + 0.5⌋)`` (the first ones)."""
    check_int("channels", channels, minimum=1)
    check_float("width", width, 0.0, 1.0, min_inclusive=False)
    return max(1, int(width * channels + 0.5))


class SlimmableConv2d(nn.Conv2d):
    """A convolution that uses its first ``out_active`` filters and as many input channels as it is given.

    US-Nets share one weight tensor among all widths: width ``w`` is the slice
    ``weight[:round(w·C_out), :C_in_active]``.
    """

    def __init__(self, cin: int, cout: int, kernel: int = 3, padding: int = 1) -> None:
        super().__init__(cin, cout, kernel, padding=padding, bias=False)
        self.out_active = cout

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight[: self.out_active, : x.shape[1]]
        return F.conv2d(x, weight, None, self.stride, self.padding)


class SlimmableLinear(nn.Linear):
    """A linear layer whose input width follows its input (the classifier of a slimmable net)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight[:, : x.shape[1]], self.bias)


class SlimmableBatchNorm2d(nn.BatchNorm2d):
    """Batch norm with shared affine parameters (sliced) and private statistics per width.

    Training uses the batch's statistics; the shared running statistics are updated only when
    all channels are active (the largest width). In eval mode a width uses the statistics that
    :func:`recalibrate_bn` stored for its channel count, else the largest width's, sliced — the
    naive sharing that Yu et al. (2019) show to fail for narrow widths.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.calibrated: dict[int, tuple[Tensor, Tensor]] = {}
        self._sums: list[Tensor] | None = None  # [Σ mean, Σ var, batches] while calibrating

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        weight, bias = self.weight[:c], self.bias[:c]
        if (
            self._sums is not None
        ):  # recalibration: accumulate batch statistics, normalise with them
            dims = (0, 2, 3)
            self._sums[0] += x.mean(dims).detach()
            self._sums[1] += x.var(dims, unbiased=True).detach()
            self._sums[2] += 1
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        if self.training:
            full = c == self.num_features
            mean = self.running_mean if full else None
            var = self.running_var if full else None
            return F.batch_norm(x, mean, var, weight, bias, True, self.momentum, self.eps)
        mean, var = self.calibrated.get(c, (self.running_mean[:c], self.running_var[:c]))
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)


class SlimmableCNN(nn.Module):
    """Three 3×3 conv–BN–ReLU stages (max-pool after the first two), global pooling, a classifier.

    ``set_width(w)`` selects a width multiplier for all stages (or a tuple, one per stage, for
    :func:`random_search`); every width shares the same weights.
    """

    CHANNELS = (16, 32, 64)

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, channels: Sequence[int] = CHANNELS
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels, minimum=1)
        check_int("num_classes", num_classes, minimum=2)
        channels = _check_channels(channels)
        c1, c2, c3 = channels
        self.channels = channels
        self.conv1, self.bn1 = SlimmableConv2d(in_channels, c1), SlimmableBatchNorm2d(c1)
        self.conv2, self.bn2 = SlimmableConv2d(c1, c2), SlimmableBatchNorm2d(c2)
        self.conv3, self.bn3 = SlimmableConv2d(c2, c3), SlimmableBatchNorm2d(c3)
        self.fc = SlimmableLinear(c3, num_classes)
        self.width: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def set_width(self, width: float | Sequence[float]) -> SlimmableCNN:
        """Use ``width`` (a multiplier in ``(0, 1]``, or one per stage) from now on; returns ``self``."""
        widths = _check_widths(width)
        for conv, w in zip((self.conv1, self.conv2, self.conv3), widths, strict=True):
            conv.out_active = active_channels(conv.out_channels, w)
        self.width = widths
        return self

    def active(self) -> tuple[int, int, int]:
        """Channels of the three stages at the current width."""
        return (self.conv1.out_active, self.conv2.out_active, self.conv3.out_active)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _check_channels(channels: Sequence[int]) -> tuple[int, int, int]:
    check_type("channels", channels, (tuple, list))
    if len(channels) != 3 or any(isinstance(c, bool) or not isinstance(c, int) for c in channels):
        raise ValueError(f"channels must be three ints, one per stage, got {channels!r}")
    if min(channels) < 1:
        raise ValueError(f"channels must be positive, got {channels!r}")
    return tuple(channels)  # type: ignore[return-value]


def _check_widths(width: float | Sequence[float]) -> tuple[float, float, float]:
    if isinstance(width, (tuple, list)):
        if len(width) != 3:
            raise ValueError(
                f"width must be a number or three numbers (one per stage), got {width!r}"
            )
        for w in width:
            check_float("width", w, 0.0, 1.0, min_inclusive=False)
        return tuple(float(w) for w in width)  # type: ignore[return-value]
    check_float("width", width, 0.0, 1.0, min_inclusive=False)
    return (float(width),) * 3


def plain_cnn(in_channels: int, num_classes: int, channels: Sequence[int]) -> nn.Sequential:
    """The same architecture as :class:`SlimmableCNN` with fixed ``channels``, from ordinary layers."""
    check_int("in_channels", in_channels, minimum=1)
    check_int("num_classes", num_classes, minimum=2)
    c1, c2, c3 = _check_channels(channels)
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 3, padding=1, bias=False),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1, bias=False),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1, bias=False),
        nn.BatchNorm2d(c3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c3, num_classes),
    )


@torch.no_grad()
def extract_subnet(net: SlimmableCNN, width: float | Sequence[float]) -> nn.Sequential:
    """The width-``width`` slice of ``net`` as an ordinary :func:`plain_cnn` (eval mode, same device).

    Weights are copied from the leading channels; each BN gets the statistics ``net`` uses at
    that width (recalibrated if :func:`recalibrate_bn` ran for it). Its outputs equal
    ``net.set_width(width)(x)`` in eval mode.
    """
    check_type("net", net, SlimmableCNN)
    old = net.width
    net.set_width(width)
    c1, c2, c3 = net.active()
    net.set_width(old)
    sub = plain_cnn(net.conv1.in_channels, net.fc.out_features, (c1, c2, c3))
    cins = (net.conv1.in_channels, c1, c2)
    for i, (conv, bn, cin, cout) in enumerate(
        zip(
            (net.conv1, net.conv2, net.conv3),
            (net.bn1, net.bn2, net.bn3),
            cins,
            (c1, c2, c3),
            strict=True,
        )
    ):
        sub[4 * i].weight.copy_(conv.weight[:cout, :cin])
        mean, var = bn.calibrated.get(cout, (bn.running_mean[:cout], bn.running_var[:cout]))
        sub[4 * i + 1].weight.copy_(bn.weight[:cout])
        sub[4 * i + 1].bias.copy_(bn.bias[:cout])
        sub[4 * i + 1].running_mean.copy_(mean)
        sub[4 * i + 1].running_var.copy_(var)
    sub[-1].weight.copy_(net.fc.weight[:, :c3])
    sub[-1].bias.copy_(net.fc.bias)
    return sub.to(net.fc.weight.device).eval()


# ---------------------------------------------------------------- US-Nets training


def sandwich_widths(
    n: int = 4, generator: torch.Generator | None = None, low: float = MIN_WIDTH
) -> list[float]:
    """The sandwich rule (Yu & Huang 2019, §3.1): ``[1.0, low, n − 2 widths uniform in (low, 1)]``.

    Training the largest and the smallest width every step bounds the performance of every
    width in between; the random ones cover the rest of the range.
    """
    check_int("n", n, minimum=2)
    check_float("low", low, 0.0, MAX_WIDTH, min_inclusive=False)
    rand = torch.rand(n - 2, generator=generator).tolist()
    return [MAX_WIDTH, low, *(low + (MAX_WIDTH - low) * r for r in rand)]


def inplace_distillation_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """In-place distillation (Yu & Huang 2019, §3.2): ``CE(softmax(z_largest), z_w)``, batch mean.

    The soft target is the largest width's prediction on the same batch, detached: no extra
    teacher, no extra forward pass.
    """
    check_tensor("student_logits", student_logits, ndim=2)
    check_tensor("teacher_logits", teacher_logits, ndim=2)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    target = F.softmax(teacher_logits.detach(), dim=1)
    return -(target * F.log_softmax(student_logits, dim=1)).sum(1).mean()


def make_sandwich_loss(n_widths: int = 4, seed: int = 0, inplace_distill: bool = True):
    """``compute_loss(net, x, y)`` for :func:`utils.training.fit`: the US-Nets step.

    ``L = CE(z_1.0, y) + Σ_{w in smallest and n − 2 random} L_w``, where ``L_w`` is
    :func:`inplace_distillation_loss` against the largest width (or ``CE(z_w, y)`` with
    ``inplace_distill=False``). Summing the losses accumulates the gradients of all widths
    before the one optimiser step, as in the paper. The net is left at width 1.0.
    """
    check_int("n_widths", n_widths, minimum=2)
    check_int("seed", seed, minimum=0)
    check_type("inplace_distill", inplace_distill, bool)
    generator = torch.Generator().manual_seed(seed)

    def compute_loss(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        widths = sandwich_widths(n_widths, generator)
        teacher = net.set_width(widths[0])(x)
        loss = F.cross_entropy(teacher, y)
        for w in widths[1:]:
            logits = net.set_width(w)(x)
            if inplace_distill:
                loss = loss + inplace_distillation_loss(logits, teacher)
            else:
                loss = loss + F.cross_entropy(logits, y)
        net.set_width(MAX_WIDTH)
        return loss

    return compute_loss


@torch.no_grad()
def recalibrate_bn(
    net: SlimmableCNN, loader: DataLoader, width: float | Sequence[float], batches: int = 8
) -> SlimmableCNN:
    """Store BN statistics for ``width``: the mean of per-batch means and variances over ``batches``.

    US-Nets (Yu & Huang 2019, §3.3) compute each width's BN statistics after training, on a few
    training batches (a cumulative average, PyTorch's ``momentum=None``). Only BN statistics
    change: weights, biases and the other widths' statistics stay as they were. ``net`` is
    left at ``width`` in eval mode.
    """
    check_type("net", net, SlimmableCNN)
    check_type("loader", loader, DataLoader)
    check_int("batches", batches, minimum=1)
    net.set_width(width)
    bns = [net.bn1, net.bn2, net.bn3]
    device = net.fc.weight.device
    for bn in bns:
        bn._sums = [0.0, 0.0, 0]
    try:
        for i, (x, _) in enumerate(loader):
            if i == batches:
                break
            net(x.to(device))
    finally:
        sums = [bn._sums for bn in bns]
        for bn in bns:
            bn._sums = None
    if sums[0][2] == 0:
        raise ValueError("loader yielded no batch: recalibration needs data")
    for bn, (mean, var, n), c in zip(bns, sums, net.active(), strict=True):
        bn.calibrated[c] = (mean / n, var / n)
    return net.eval()


def clear_calibration(net: SlimmableCNN) -> SlimmableCNN:
    """Forget every recalibrated width: eval mode uses the largest width's statistics again."""
    check_type("net", net, SlimmableCNN)
    for bn in (net.bn1, net.bn2, net.bn3):
        bn.calibrated.clear()
    return net


# ---------------------------------------------------------------- early exit


class EarlyExitCNN(nn.Module):
    """A CNN of three stages with a classifier head after each (BranchyNet, Teerapittayanon et al. 2016).

    ``forward`` returns the logits of every exit (a list, cheapest first); ``forward_until(x, k)``
    runs stages ``0..k`` and their heads only — the cost of reaching exit ``k``, with every
    earlier exit's confidence computed on the way.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        check_int("in_channels", in_channels, minimum=1)
        check_int("num_classes", num_classes, minimum=2)

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
            )

        self.stages = nn.ModuleList(
            [
                nn.Sequential(block(in_channels, 8), nn.MaxPool2d(2)),  # 14×14
                nn.Sequential(block(8, 32), nn.MaxPool2d(2)),  # 7×7
                nn.Sequential(block(32, 64), block(64, 64)),  # 7×7
            ]
        )
        self.heads = nn.ModuleList(
            [
                nn.Sequential(
                    nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(8 * 16, num_classes)
                ),
                nn.Sequential(
                    nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32 * 4, num_classes)
                ),
                nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)),
            ]
        )

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for stage, head in zip(self.stages, self.heads, strict=True):
            x = stage(x)
            outs.append(head(x))
        return outs

    def forward_until(self, x: Tensor, k: int) -> Tensor:
        """Logits of exit ``k``, computing the heads of exits ``0..k−1`` as a dynamic run must."""
        check_int("k", k, minimum=0, maximum=self.num_exits - 1)
        out = x
        for i in range(k + 1):
            x = self.stages[i](x)
            out = self.heads[i](x)
        return out

    @torch.no_grad()
    def dynamic_forward(self, x: Tensor, thresholds: Sequence[float] | float) -> tuple[Tensor, int]:
        """Early-exit inference of one batch: stop at the first exit where *every* sample is confident.

        Returns ``(logits, exit index)``. With batch size 1 this is BranchyNet's per-input exit.
        """
        ths = _check_thresholds(thresholds, self.num_exits)
        for i in range(self.num_exits):
            x = self.stages[i](x)
            logits = self.heads[i](x)
            if i == self.num_exits - 1 or bool((exit_scores(logits) >= ths[i]).all()):
                return logits, i
        raise AssertionError("unreachable")  # pragma: no cover


class _Prefix(nn.Module):
    """``model.forward_until(x, k)`` as a module, for :func:`utils.benchmark.count_macs`."""

    def __init__(self, model: nn.Module, k: int) -> None:
        super().__init__()
        self.model, self.k = model, k
        self.train(model.training)  # count_macs restores this mode on the wrapped model too

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_until(x, self.k)


def exit_costs(model: EarlyExitCNN, example: Tensor) -> list[int]:
    """MACs (per sample) of reaching each exit: the stages up to it and every head on the way.

    Counted by :func:`utils.benchmark.count_macs` on ``forward_until``; nondecreasing.
    """
    check_type("model", model, EarlyExitCNN)
    check_tensor("example", example, ndim=4)
    return [count_macs(_Prefix(model, k), example[:1]) for k in range(model.num_exits)]


def exit_prefixes(model: nn.Module) -> dict[str, nn.Module]:
    """``{"exit 1": …, …}``: modules that run the model up to each exit, for latency tables."""
    check_module("model", model)
    return {f"exit {k + 1}": _Prefix(model, k) for k in range(model.num_exits)}


def exit_scores(logits: Tensor, criterion: str = "max_prob") -> Tensor:
    """Confidence of each row of ``logits`` (higher = more confident), in ``[0, 1]``.

    ``"max_prob"``: the largest softmax probability. ``"entropy"``: ``1 − H(p)/log K``, where
    ``H(p) = −Σ p_i log p_i`` — BranchyNet's criterion (exit when the entropy is low), rescaled
    so that a larger score means more confident for both.
    """
    check_tensor("logits", logits, ndim=2, finite=True)
    check_choice("criterion", criterion, CRITERIA)
    if criterion == "max_prob":
        return F.softmax(logits, dim=1).amax(dim=1)
    logp = F.log_softmax(logits, dim=1)
    entropy = -(logp.exp() * logp).sum(dim=1)
    return 1.0 - entropy / math.log(logits.shape[1])


def _check_thresholds(thresholds: Sequence[float] | float, num_exits: int) -> list[float]:
    """One threshold per early exit (``num_exits − 1``); a single number applies to all of them."""
    if isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
        check_float("thresholds", thresholds)
        return [float(thresholds)] * (num_exits - 1)
    check_type("thresholds", thresholds, (list, tuple))
    if len(thresholds) != num_exits - 1:
        raise ValueError(
            f"thresholds must hold one value per early exit ({num_exits - 1}; the last exit "
            f"takes every remaining sample), got {len(thresholds)}"
        )
    for t in thresholds:
        check_float("thresholds[i]", t)
    return [float(t) for t in thresholds]


def exit_points(scores: Tensor, thresholds: Sequence[float] | float) -> Tensor:
    """Exit taken by each sample: the first ``e`` with ``scores[e, n] ≥ thresholds[e]``, else the last.

    ``scores`` is ``(E, N)`` (exit × sample). A score equal to its threshold exits. The last exit
    has no threshold: every sample that reaches it leaves there.
    """
    check_tensor("scores", scores, ndim=2)
    num_exits = scores.shape[0]
    if num_exits < 1:
        raise ValueError("scores must have at least one exit (row)")
    ths = _check_thresholds(thresholds, num_exits)
    exits = torch.full((scores.shape[1],), num_exits - 1, dtype=torch.long, device=scores.device)
    undecided = torch.ones(scores.shape[1], dtype=torch.bool, device=scores.device)
    for e, t in enumerate(ths):
        leave = undecided & (scores[e] >= t)
        exits[leave] = e
        undecided &= ~leave
    return exits


def average_cost(exits: Tensor, costs: Sequence[float]) -> float:
    """Mean cost per sample: ``(1/N) Σ_n costs[exit_n]``, where ``costs[e]`` is the cost of reaching exit ``e``.

    ``costs`` are cumulative (MACs or latency of running the model up to that exit, see
    :func:`exit_costs`), not the cost of one stage.
    """
    check_tensor("exits", exits, ndim=1)
    check_type("costs", costs, (list, tuple))
    if exits.numel() == 0:
        raise ValueError("exits must not be empty")
    if exits.is_floating_point() or int(exits.min()) < 0 or int(exits.max()) >= len(costs):
        raise ValueError(f"exits must be integer exit indices in [0, {len(costs) - 1}]")
    table = torch.tensor([float(c) for c in costs], dtype=torch.float64)
    return float(table[exits.cpu()].mean())


def exit_accuracy(correct: Tensor, exits: Tensor) -> float:
    """Accuracy (%) when sample ``n`` is answered by exit ``exits[n]``; ``correct`` is ``(E, N)`` bool."""
    check_tensor("correct", correct, ndim=2)
    check_tensor("exits", exits, ndim=1)
    if correct.shape[1] != exits.shape[0]:
        raise ValueError(
            f"correct has {correct.shape[1]} samples but exits has {exits.shape[0]}; they must match"
        )
    picked = correct.gather(0, exits.to(correct.device).unsqueeze(0)).squeeze(0)
    return 100.0 * float(picked.float().mean())


def threshold_sweep(scores: Tensor, correct: Tensor, costs: Sequence[float], grid: Sequence[float]):
    """Accuracy, average cost and exit fractions for a shared threshold at each value of ``grid``.

    A DataFrame with columns ``threshold, accuracy, avg_cost, exit_1 … exit_E`` (fractions).
    """
    import pandas as pd

    check_tensor("scores", scores, ndim=2)
    if correct.shape != scores.shape:
        raise ValueError(
            f"correct must have the shape of scores {tuple(scores.shape)}, got {tuple(correct.shape)}"
        )
    if len(costs) != scores.shape[0]:
        raise ValueError(
            f"costs must hold one value per exit ({scores.shape[0]}), got {len(costs)}"
        )
    rows = []
    for t in grid:
        exits = exit_points(scores, float(t))
        counts = torch.bincount(exits.cpu(), minlength=scores.shape[0]).double() / exits.numel()
        rows.append(
            {
                "threshold": float(t),
                "accuracy": exit_accuracy(correct, exits),
                "avg_cost": average_cost(exits, list(costs)),
                **{f"exit_{e + 1}": float(counts[e]) for e in range(scores.shape[0])},
            }
        )
    return pd.DataFrame(rows)


def choose_threshold(
    scores: Tensor,
    correct: Tensor,
    costs: Sequence[float],
    budget: float,
    grid: Sequence[float],
) -> float:
    """The shared threshold of ``grid`` with the best accuracy whose average cost is ``≤ budget``.

    Chosen on a validation set (never on the test set); ties go to the cheaper threshold.
    Raises ``ValueError`` when no threshold meets the budget.
    """
    check_float("budget", budget, 0.0, min_inclusive=False)
    table = threshold_sweep(scores, correct, costs, grid)
    ok = table[table["avg_cost"] <= budget]
    if ok.empty:
        raise ValueError(
            f"no threshold in grid meets budget={budget:g}; the cheapest costs "
            f"{table['avg_cost'].min():g} on average"
        )
    best = ok.sort_values(["accuracy", "avg_cost"], ascending=[False, True]).iloc[0]
    return float(best["threshold"])


@torch.no_grad()
def exit_outputs(model: nn.Module, loader: DataLoader) -> tuple[Tensor, Tensor]:
    """``(logits (E, N, K), labels (N,))`` of every exit of ``model`` on ``loader``, on the CPU."""
    check_module("model", model)
    check_type("loader", loader, DataLoader)
    model.eval()
    device = next(model.parameters()).device
    outs, labels = [], []
    for x, y in loader:
        outs.append(torch.stack(model(x.to(device))).cpu())
        labels.append(y)
    return torch.cat(outs, dim=1), torch.cat(labels)


def exit_loss(weights: Sequence[float] = (1.0, 1.0, 1.0)):
    """``compute_loss`` for :func:`utils.training.fit`: BranchyNet's joint loss ``Σ_e w_e · CE(z_e, y)``."""
    check_type("weights", weights, (list, tuple))
    for w in weights:
        check_float("weights[i]", w, 0.0)

    def compute_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        outs = model(x)
        if len(outs) != len(weights):
            raise ValueError(f"model has {len(outs)} exits but {len(weights)} weights were given")
        return sum(w * F.cross_entropy(z, y) for w, z in zip(weights, outs, strict=True))

    return compute_loss


# ---------------------------------------------------------------- early exit on MiniLM

EXIT_LAYERS = (2, 4, 6)
"""Encoder layers of all-MiniLM-L6-v2 after which :class:`MiniLMExits` has a head."""


class MiniLMExits(nn.Module):
    """Linear heads on the mean-pooled token states after layers 2, 4 and 6 of the MiniLM encoder.

    The encoder stays frozen (pretrained, as in :mod:`utils.minilm`); only the heads are trained
    (:func:`fit_exit_heads`). As DeeBERT (Xin et al. 2020) does for BERT, a sentence whose
    early head is confident skips the remaining layers.
    """

    def __init__(
        self, encoder: nn.Module, num_classes: int, exit_layers: Sequence[int] = EXIT_LAYERS
    ) -> None:
        super().__init__()
        check_module("encoder", encoder)
        check_int("num_classes", num_classes, minimum=2)
        depth = len(encoder.encoder.layer)
        check_type("exit_layers", exit_layers, (tuple, list))
        if (
            not exit_layers
            or list(exit_layers) != sorted(set(exit_layers))
            or not (1 <= exit_layers[0] and exit_layers[-1] == depth)
        ):
            raise ValueError(
                f"exit_layers must increase from >= 1 to the last layer ({depth}), got {exit_layers!r}"
            )
        self.encoder = encoder
        self.exit_layers = tuple(exit_layers)
        hidden = encoder.config.hidden_size
        self.heads = nn.ModuleList(nn.Linear(hidden, num_classes) for _ in exit_layers)

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    @torch.no_grad()
    def pooled_states(self, batch: dict[str, Tensor]) -> Tensor:
        """``(E, N, hidden)``: mean-pooled token states after each exit layer (padding masked out)."""
        from utils.minilm import mean_pool

        states = self.encoder(**batch, output_hidden_states=True).hidden_states
        mask = batch["attention_mask"]
        return torch.stack([mean_pool(states[layer], mask) for layer in self.exit_layers])

    def forward(self, batch: dict[str, Tensor]) -> list[Tensor]:
        """Logits of every exit for a tokenized batch (a dict from :func:`utils.minilm.tokenize`)."""
        pooled = self.pooled_states(batch)
        return [head(p) for head, p in zip(self.heads, pooled, strict=True)]

    def forward_until(self, input_ids: Tensor, k: int) -> Tensor:
        """Logits of exit ``k`` for unpadded ``input_ids`` (one sentence, ``(1, L)``), heads on the way included.

        The layers after exit ``k`` never run: this is what an early exit saves.
        """
        check_int("k", k, minimum=0, maximum=self.num_exits - 1)
        h = self.encoder.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
        done, logits = 0, None
        for i in range(k + 1):
            for layer in self.encoder.encoder.layer[done : self.exit_layers[i]]:
                h = layer(h)
                h = h[0] if isinstance(h, tuple) else h
            done = self.exit_layers[i]
            logits = self.heads[i](h.mean(dim=1))
        return logits


def text_exit_costs(model: MiniLMExits, lengths: Tensor) -> Tensor:
    """``(E, N)`` MACs of reaching each exit for sentences of ``lengths`` tokens.

    The Linear layers of an encoder cost the same for every token, so the MACs of reaching
    exit ``k`` are ``a_k · L + b_k``; :func:`utils.benchmark.count_macs` counts them at
    ``L = 1`` and ``L = 2`` to get ``a_k`` and ``b_k`` exactly. Like ``count_macs``, this counts
    Linear layers only: the attention products (``≈ 2·L²·d`` per layer) are left out.
    """
    check_type("model", model, MiniLMExits)
    check_tensor("lengths", lengths, ndim=1)
    device = next(model.parameters()).device
    rows = []
    for k in range(model.num_exits):
        one = count_macs(_Prefix(model, k), torch.ones(1, 1, dtype=torch.long, device=device))
        two = count_macs(_Prefix(model, k), torch.ones(1, 2, dtype=torch.long, device=device))
        rows.append((two - one) * lengths.double().cpu() + (2 * one - two))
    return torch.stack(rows)


def fit_exit_heads(
    model: MiniLMExits,
    pooled: Tensor,
    labels: Tensor,
    *,
    steps: int = 300,
    lr: float = 1e-2,
    seed: int = 0,
) -> MiniLMExits:
    """Train each exit head on precomputed pooled states ``(E, N, hidden)`` (full-batch Adam, CE loss).

    The encoder is frozen, so its states are computed once (:meth:`MiniLMExits.pooled_states`)
    and the heads train in a second; each head minimises its own cross-entropy (BranchyNet's
    joint loss with the shared trunk fixed).
    """
    check_type("model", model, MiniLMExits)
    check_tensor("pooled", pooled, ndim=3)
    check_tensor("labels", labels, ndim=1)
    check_int("steps", steps, minimum=1)
    check_float("lr", lr, 0.0, min_inclusive=False)
    if pooled.shape[0] != model.num_exits or pooled.shape[1] != labels.shape[0]:
        raise ValueError(
            f"pooled must be ({model.num_exits}, {labels.shape[0]}, hidden), got {tuple(pooled.shape)}"
        )
    torch.manual_seed(seed)
    device = model.heads[0].weight.device
    pooled, labels = pooled.to(device), labels.to(device)
    for head in model.heads:
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    opt = torch.optim.Adam(model.heads.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = sum(
                F.cross_entropy(h(p), labels) for h, p in zip(model.heads, pooled, strict=True)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


# ---------------------------------------------------------------- the intent set of chapter 7


def intent_splits(val_every: int = 4) -> dict[str, tuple[list[str], Tensor]]:
    """Chapter 7's intent set (``data/nlp``, :func:`utils.nlp.load_classification`) as train/val/test.

    The set has a training and a test split only; thresholds must be chosen on data the
    heads were not trained on, so every ``val_every``-th sentence of each intent in the
    training split becomes the validation split (stratified, deterministic). Returns
    ``{"train" | "val" | "test": (sentences, labels)}``.
    """
    from utils.nlp import load_classification

    check_int("val_every", val_every, minimum=2)
    texts, labels = load_classification("train")
    seen: dict[int, int] = {}
    parts: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "val": ([], [])}
    for text, label in zip(texts, labels, strict=True):
        seen[label] = seen.get(label, 0) + 1
        part = parts["val" if seen[label] % val_every == 0 else "train"]
        part[0].append(text)
        part[1].append(label)
    test_texts, test_labels = load_classification("test")
    out = {name: (t, torch.tensor(y)) for name, (t, y) in parts.items()}
    out["test"] = (test_texts, torch.tensor(test_labels))
    return out


# ---------------------------------------------------------------- trained once, cached


def _profile_epochs(epochs: int | None) -> int:
    """``epochs``, or the profile's when ``None``; checked."""
    from utils.config import get_profile

    epochs = get_profile().epochs if epochs is None else epochs
    check_int("epochs", epochs, minimum=1)
    return epochs


def _cached_mnist_model(
    name: str,
    config: dict,
    make: Callable[[int, int], nn.Module],
    *,
    desc: str,
    progress: bool,
    compute_loss: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None,
) -> nn.Module:
    """``make(in_channels, num_classes)`` trained on MNIST-5k by :func:`utils.training.fit`, cached.

    ``config`` is the cache key (:func:`utils.cache.cached_state`) and must hold ``seed``,
    ``epochs`` and ``lr``: the seed of the split, the loader's shuffle and the initial weights.
    """
    from utils.cache import cached_state
    from utils.config import seed_everything
    from utils.data import load_splits, make_loader
    from utils.training import fit

    seed, epochs, lr = config["seed"], config["epochs"], config["lr"]
    splits = load_splits("mnist5k", seed=seed)
    loader = make_loader(splits.train, 64, shuffle=True, seed=seed)

    def build() -> nn.Module:
        seed_everything(seed)
        return make(splits.input_shape[0], splits.num_classes)

    def train(net: nn.Module) -> None:
        fit(
            net,
            loader,
            epochs=epochs,
            lr=lr,
            compute_loss=compute_loss,
            progress=progress,
            desc=desc,
        )

    net, _, _ = cached_state(name, config, build, train)
    return net


def load_slimmable(
    *, seed: int = 0, epochs: int | None = None, lr: float = 3e-3, progress: bool = False
) -> SlimmableCNN:
    """A :class:`SlimmableCNN` trained on MNIST-5k by the US-Nets recipe (sandwich rule with 4
    widths, in-place distillation), trained once and cached; at width 1.0, without recalibration.
    ``epochs`` defaults to the profile's."""
    epochs = _profile_epochs(epochs)
    config = {"model": "us-cnn", "seed": seed, "epochs": epochs, "lr": lr, "version": VERSION}
    net = _cached_mnist_model(
        "ch10-us-cnn",
        config,
        SlimmableCNN,
        desc="US-Net",
        progress=progress,
        compute_loss=make_sandwich_loss(4, seed),
    )
    return net.set_width(MAX_WIDTH)


def load_fixed_width(
    width: float,
    *,
    seed: int = 0,
    epochs: int | None = None,
    lr: float = 3e-3,
    progress: bool = False,
) -> nn.Sequential:
    """A :func:`plain_cnn` with the channels of width ``width``, trained alone (cross-entropy), cached.

    The control of US-Nets: the same architecture at one width, with the same data, epochs and
    learning rate as :func:`load_slimmable`.
    """
    check_float("width", width, 0.0, 1.0, min_inclusive=False)
    epochs = _profile_epochs(epochs)
    channels = [active_channels(c, width) for c in SlimmableCNN.CHANNELS]
    config = {
        "model": "fixed-cnn",
        "channels": channels,
        "seed": seed,
        "epochs": epochs,
        "lr": lr,
        "version": VERSION,
    }
    return _cached_mnist_model(
        "ch10-fixed-cnn",
        config,
        lambda c_in, n_classes: plain_cnn(c_in, n_classes, channels),
        desc=f"width {width}",
        progress=progress,
    )


def load_early_exit(
    *, seed: int = 0, epochs: int | None = None, lr: float = 3e-3, progress: bool = False
) -> EarlyExitCNN:
    """An :class:`EarlyExitCNN` trained on MNIST-5k with the joint loss of all exits, cached."""
    epochs = _profile_epochs(epochs)
    config = {"model": "exit-cnn", "seed": seed, "epochs": epochs, "lr": lr, "version": VERSION}
    return _cached_mnist_model(
        "ch10-exit-cnn",
        config,
        EarlyExitCNN,
        desc="early-exit CNN",
        progress=progress,
        compute_loss=exit_loss(),
    )


# ---------------------------------------------------------------- architecture search


def random_search(
    net: SlimmableCNN,
    calib_loader: DataLoader,
    val_loader: DataLoader,
    budget_macs: int,
    *,
    candidates: int = 20,
    choices: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    seed: int = 0,
):
    """Random search over per-stage widths of a slimmable supernet under a MACs budget.

    Each candidate (one width per stage, drawn from ``choices``) within ``budget_macs`` is
    evaluated with the supernet's shared weights after BN recalibration — no training per
    candidate (weight-sharing NAS, as Once-for-All, Cai et al. 2020, at a tiny scale).
    Returns a DataFrame (``widths, channels, macs, accuracy``), sorted by accuracy, best first;
    over-budget candidates are drawn but not evaluated (``accuracy`` NaN).
    """
    import pandas as pd

    from utils.training import evaluate

    check_type("net", net, SlimmableCNN)
    check_int("budget_macs", budget_macs, minimum=1)
    check_int("candidates", candidates, minimum=1)
    check_type("choices", choices, (list, tuple))
    for c in choices:
        check_float("choices[i]", c, 0.0, 1.0, min_inclusive=False)
    rng = torch.Generator().manual_seed(seed)
    example = next(iter(val_loader))[0][:1].to(net.fc.weight.device)
    seen, rows = set(), []
    while len(seen) < min(candidates, len(choices) ** 3):
        idx = torch.randint(len(choices), (3,), generator=rng).tolist()
        widths = tuple(float(choices[i]) for i in idx)
        if widths in seen:
            continue
        seen.add(widths)
        sub = extract_subnet(net, widths)
        macs = count_macs(sub, example)
        acc = float("nan")
        if macs <= budget_macs:
            recalibrate_bn(net, calib_loader, widths)
            acc = evaluate(extract_subnet(net, widths), val_loader)["accuracy"]
        channels = tuple(sub[4 * i].out_channels for i in range(3))
        rows.append({"widths": widths, "channels": channels, "macs": macs, "accuracy": acc})
    net.set_width(MAX_WIDTH)
    df = pd.DataFrame(rows)
    return df.sort_values("accuracy", ascending=False, na_position="last").reset_index(drop=True)
