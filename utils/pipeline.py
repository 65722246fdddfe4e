"""An acceleration pipeline: a model that is faster, not only smaller.

Deep Compression (``utils.compression``) shrinks the *file*; the dense kernels still
multiply every zero. This module chains the techniques that remove *work* on a
plain CPU, each one taught in an earlier chapter and reused here unchanged:

1. **structured channel pruning** — :func:`utils.pruning.prune_channels` removes whole
   filters and every dependent slice (L1 filter norm, Li et al., ICLR 2017, or the
   first-order Taylor criterion, Molchanov et al., CVPR 2019), so the network is
   really thinner (chapter 3);
2. **distillation** — the thin network is the student and the unpruned model the
   teacher: :func:`utils.distillation.distill` with Hinton et al.'s (2015) loss
   ``α T² KL(p_T ‖ q_T) + (1 − α) CE`` recovers the accuracy pruning lost (chapter 4);
3. **static INT8** — :func:`utils.production.quantize_static_int8`, PyTorch's x86
   backend (FBGEMM/oneDNN kernels with int32 accumulation, Jacob et al., CVPR 2018)
   (chapter 2). It runs on the CPU only, so this stage always works on a CPU copy.

Chapter 5 runs it on LeNet-5 next to Deep Compression; chapter 11 reuses
:func:`accelerate` for its end-to-end run (and appends chapter 6's runtime). The
trained stage is cached with :func:`utils.cache.cached_state`, so a lesson re-run only
loads it. Every stage comes back as a :class:`Stage`: the model and one row of
accuracy, size, parameters and MACs; latency is measured by the caller with
``utils.benchmark`` (one measurement policy for the whole course).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from utils.benchmark import count_macs, count_parameters, state_dict_bytes
from utils.cache import baseline_config, cached_state, load_baseline
from utils.compression import PipelineConfig, prune_quantize_distill
from utils.config import get_device, seed_everything
from utils.data import load_splits, make_loader
from utils.distillation import distill
from utils.production import quantize_static_int8
from utils.pruning import prune_channels
from utils.training import evaluate
from utils.validation import check_choice, check_float, check_int, check_module, check_type

STAGES = ("baseline", "pruned", "distilled", "int8")
"""Stage names of :func:`accelerate`, in order."""

CRITERIA = ("l1", "taylor")


@dataclass(frozen=True)
class AccelerationConfig:
    """Settings of :func:`accelerate` (JSON-serialisable, so they key the cache).

    Attributes:
        amount: fraction of the channels removed in every prunable group
            (``⌊C(1 − amount)⌋`` kept), in ``[0, 1)``.
        criterion: channel importance, ``"l1"`` or ``"taylor"``.
        epochs: distillation epochs of the pruned student.
        lr: Adam learning rate of the distillation.
        temperature, alpha: the KD loss's ``T`` and weight ``α`` of the soft term.
        calibration_batches: batches of the training loader that calibrate INT8.
        seed: seed of the distillation run (initial order of the data, dropout).
    """

    amount: float = 0.5
    criterion: str = "l1"
    epochs: int = 4
    lr: float = 3e-3
    temperature: float = 4.0
    alpha: float = 0.9
    calibration_batches: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        check_float("amount", self.amount, 0.0, 1.0, max_inclusive=False)
        check_choice("criterion", self.criterion, CRITERIA)
        check_int("epochs", self.epochs, minimum=0)
        check_float("lr", self.lr, 0.0, min_inclusive=False)
        check_float("temperature", self.temperature, 0.0, min_inclusive=False)
        check_float("alpha", self.alpha, 0.0, 1.0)
        check_int("calibration_batches", self.calibration_batches, minimum=1)
        check_int("seed", self.seed, minimum=0)


@dataclass
class Stage:
    """One stage of the pipeline: its model (on the CPU) and its row of measurements."""

    name: str
    model: nn.Module
    row: dict[str, Any]


def _input_shape(loader: DataLoader) -> tuple[int, ...]:
    return tuple(loader.dataset[0][0].shape)


def stage_row(name: str, model: nn.Module, loader: DataLoader) -> dict[str, Any]:
    """``{stage, accuracy, size_kb, params, macs}`` of ``model``: test accuracy (%) on ``loader``,
    ``torch.save`` size of the state dict (KB = 1024 bytes), parameter count and MACs of one sample.
    """
    check_type("name", name, str)
    check_module("model", model)
    check_type("loader", loader, DataLoader)
    device = next(model.parameters(), torch.empty(0)).device
    example = torch.zeros(1, *_input_shape(loader), device=device)
    return {
        "stage": name,
        "accuracy": evaluate(model, loader)["accuracy"],
        "size_kb": state_dict_bytes(model) / 1024,
        "params": count_parameters(model),
        "macs": count_macs(model, example),
    }


def prune_stage(
    model: nn.Module, config: AccelerationConfig, loader: DataLoader | None = None
) -> nn.Module:
    """A thinner CPU copy of ``model``: :func:`utils.pruning.prune_channels` with ``config.amount``.

    Pruning works on a CPU copy (the index tensors it builds live on the CPU), so a
    model trained on a GPU is pruned the same way; ``loader`` feeds the Taylor criterion.
    """
    check_module("model", model)
    check_type("config", config, AccelerationConfig)
    cpu_model = copy.deepcopy(model).cpu().eval()
    return prune_channels(
        cpu_model, config.amount, criterion=config.criterion, loader=loader, seed=config.seed
    ).eval()


def distill_stage(
    student: nn.Module, teacher: nn.Module, train_loader: DataLoader, config: AccelerationConfig
) -> nn.Module:
    """Train ``student`` in place by KD from a frozen copy of ``teacher``; return it on the CPU.

    The loss is :func:`utils.distillation.kd_loss` through :func:`utils.distillation.distill`
    (the course's one loop, on ``get_device()``); the caller's teacher is neither
    trained nor moved to another device.
    """
    check_module("student", student)
    check_module("teacher", teacher)
    check_type("train_loader", train_loader, DataLoader)
    check_type("config", config, AccelerationConfig)
    seed_everything(config.seed)
    distill(
        student,
        copy.deepcopy(teacher),
        train_loader,
        method="kd",
        epochs=config.epochs,
        lr=config.lr,
        temperature=config.temperature,
        alpha=config.alpha,
    )
    return student.cpu().eval()


def int8_stage(model: nn.Module, calibration: DataLoader, config: AccelerationConfig) -> nn.Module:
    """Static INT8 (x86 backend) of a CPU copy of ``model``, calibrated on ``config.calibration_batches``."""
    check_module("model", model)
    check_type("calibration", calibration, DataLoader)
    check_type("config", config, AccelerationConfig)
    return quantize_static_int8(
        copy.deepcopy(model).cpu(), calibration, num_batches=config.calibration_batches
    )


def accelerate(
    model: nn.Module,
    train_loader: DataLoader,
    test_loader: DataLoader,
    config: AccelerationConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    cache: dict[str, Any] | None = None,
    name: str = "accelerate",
) -> dict[str, Stage]:
    """baseline → structured pruning → distillation → static INT8, one :class:`Stage` each.

    Args:
        model: the trained float model to accelerate (untouched; it may be on any device).
        train_loader: data of the distillation and of the INT8 calibration.
        test_loader: data of each stage's accuracy.
        config: the pipeline's settings (default :class:`AccelerationConfig`).
        teacher: teacher of the distillation (default: ``model`` itself, unpruned).
        cache: when given, everything that determines ``model``, ``teacher`` and the
            data (e.g. their ``utils.cache.baseline_config``); the distilled stage is then
            cached under it and the pipeline's settings, and a re-run only loads it.
        name: readable prefix of the cache file.

    Returns:
        ``{"baseline", "pruned", "distilled", "int8"}`` → :class:`Stage`, in that order;
        every model is in eval mode on the CPU (INT8 kernels exist only there: move a
        copy of a float stage to a GPU to time it there).
    """
    check_module("model", model)
    check_type("train_loader", train_loader, DataLoader)
    check_type("test_loader", test_loader, DataLoader)
    config = AccelerationConfig() if config is None else config
    check_type("config", config, AccelerationConfig)
    if teacher is not None:
        check_module("teacher", teacher)
    if cache is not None:
        check_type("cache", cache, dict)
    check_type("name", name, str)
    baseline = copy.deepcopy(model).cpu().eval()
    teacher = baseline if teacher is None else teacher
    pruned = prune_stage(baseline, config, train_loader)

    def build() -> nn.Module:
        return copy.deepcopy(pruned)

    def train(student: nn.Module) -> None:
        distill_stage(student, teacher, train_loader, config)

    if cache is None:
        distilled = build()
        train(distilled)
    else:
        key = {"model": cache, "pipeline": asdict(config), "pipeline_version": 1}
        distilled, _, _ = cached_state(name, key, build, train)
    distilled = distilled.cpu().eval()
    quantized = int8_stage(distilled, train_loader, config)
    models = {"baseline": baseline, "pruned": pruned, "distilled": distilled, "int8": quantized}
    return {k: Stage(k, m, stage_row(k, m, test_loader)) for k, m in models.items()}


def compress_with_teacher(
    model: str,
    dataset: str,
    config: PipelineConfig,
    teacher: str,
    *,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, nn.Module]:
    """Deep Compression of a cached baseline whose fine-tuning distils from *another* baseline.

    :func:`utils.compression.compress_baseline` distils from the dense model itself
    (same architecture, same accuracy: little to learn). Here the teacher is the
    cached baseline ``teacher`` (e.g. LeNet-5 for LeNet-300-100), through
    :func:`utils.compression.prune_quantize_distill`. The stages
    ``{"dense", "pruned", "quantized"}`` are cached by both baselines' configurations
    and ``config``; they come back on the CPU in eval mode.
    """
    check_type("model", model, str)
    check_type("teacher", teacher, str)
    check_type("config", config, PipelineConfig)
    if config.low_rank_energy is not None:
        raise ValueError("config.low_rank_energy must be None here (use compress_baseline)")
    check_int("batch_size", batch_size, minimum=1)
    dense = load_baseline(model, dataset, seed=seed)
    key = {
        "baseline": baseline_config(model, dataset, seed=seed),
        "teacher": baseline_config(teacher, dataset, seed=seed),
        "pipeline": config.as_dict(),
        "batch_size": batch_size,
    }

    def build() -> nn.Module:
        return nn.ModuleDict({k: copy.deepcopy(dense) for k in ("dense", "pruned", "quantized")})

    def train(holder: nn.Module) -> None:
        # the teacher and the student train on one device (get_device(), like fit)
        big = load_baseline(teacher, dataset, seed=seed).to(get_device())
        seed_everything(seed)
        loader = make_loader(
            load_splits(dataset, seed=seed).train, batch_size, shuffle=True, seed=seed
        )
        for name, stage in prune_quantize_distill(dense, big, loader, config).items():
            holder[name].load_state_dict(stage.state_dict())

    holder, _, _ = cached_state(f"dc-{model}-from-{teacher}-{dataset}", key, build, train)
    return {name: stage.cpu().eval() for name, stage in holder.items()}


def stage_table(stages: dict[str, Stage]):
    """The stages' rows as a DataFrame indexed by stage (``params`` and ``macs`` as integers)."""
    import pandas as pd

    check_type("stages", stages, dict)
    if not stages or not all(isinstance(s, Stage) for s in stages.values()):
        raise ValueError("stages must be a non-empty dict of Stage (the result of accelerate)")
    df = pd.DataFrame([s.row for s in stages.values()]).set_index("stage")
    return df.astype({"params": "int64", "macs": "int64"})


__all__ = [
    "STAGES",
    "AccelerationConfig",
    "Stage",
    "stage_row",
    "prune_stage",
    "distill_stage",
    "int8_stage",
    "accelerate",
    "compress_with_teacher",
    "stage_table",
]
