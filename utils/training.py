"""One training loop and one evaluation loop for the whole course.

Every chapter trains through :func:`fit`: distillation, quantization-aware training
and fine-tuning after pruning plug in their own ``compute_loss`` (and, where
needed, an ``after_step`` hook that e.g. re-applies a pruning mask) instead of
copying the loop. Metrics are returned, never printed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from utils.config import get_device
from utils.validation import check_choice, check_float, check_int, check_module, check_type

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
OPTIMIZERS = ("adam", "sgd")


def cross_entropy_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Default loss: ``CE(model(x), y)``."""
    return F.cross_entropy(model(x), y)


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); the CPU for a model with neither."""
    check_module("model", model)
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _check_callable(name: str, value: object) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable or None, got {type(value).__name__}")


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    *,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    compute_loss: LossFn | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    val_loader: DataLoader | None = None,
    params: list[nn.Parameter] | None = None,
    device: torch.device | None = None,
    progress: bool = True,
    desc: str = "train",
) -> list[dict[str, float]]:
    """Train ``model`` in place and return one dict of metrics per epoch.

    Args:
        epochs: passes over ``train_loader``.
        lr, weight_decay: optimiser settings; ``optimizer`` is ``"adam"`` or ``"sgd"``
            (SGD with momentum 0.9). A cosine schedule decays ``lr`` to 0.
        compute_loss: ``(model, x, y) -> loss``; cross-entropy by default.
        after_step: called with the model after every optimiser step (e.g. to
            re-apply pruning masks or clamp values).
        val_loader: when given, validation accuracy is recorded after each epoch.
        params: parameters to optimise (default: all of ``model``'s that require grad).
        device: where to train (default: CUDA if present, else CPU). Each batch is
            moved there; afterwards the model goes back to the device it came on,
            so code that feeds it CPU tensors keeps working after training on CUDA.
        progress: show a tqdm progress bar.

    Returns:
        ``[{"epoch", "train_loss", "val_acc"?}, ...]``; ``train_loss`` is the mean
        loss per example (batches weighted by their size). The model is left in eval mode.
    """
    check_module("model", model)
    check_type("train_loader", train_loader, DataLoader)
    check_int("epochs", epochs, minimum=0)
    check_float("lr", lr, 0.0, min_inclusive=False)
    check_float("weight_decay", weight_decay, 0.0)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_callable("compute_loss", compute_loss)
    _check_callable("after_step", after_step)
    if val_loader is not None:
        check_type("val_loader", val_loader, DataLoader)
    if params is not None:
        check_type("params", params, (list, tuple))
        if not params or not all(isinstance(p, torch.Tensor) for p in params):
            raise ValueError("params must be a non-empty list of tensors (nn.Parameter)")
    device = torch.device(device) if device is not None else get_device()
    home = device_of(model)
    model.to(device)
    loss_fn = compute_loss or cross_entropy_loss
    trainable = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model has no parameter that requires grad: nothing to train")
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(trainable, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(trainable, lr=lr, momentum=0.9, weight_decay=weight_decay)
    total = max(1, epochs * len(train_loader))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    history: list[dict[str, float]] = []
    for epoch in range(epochs):
        model.train()
        loss_sum, seen = 0.0, 0
        bar = tqdm(
            train_loader, desc=f"{desc} {epoch + 1}/{epochs}", disable=not progress, leave=False
        )
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            loss = loss_fn(model, x, y)
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise ValueError("compute_loss must return a scalar tensor (0-dim), e.g. a mean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step(model)
            loss_sum += loss.item() * len(y)
            seen += len(y)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1)}
        if val_loader is not None:
            row["val_acc"] = evaluate(model, val_loader, device=device)["accuracy"]
        history.append(row)
    model.eval().to(home)
    return history


@torch.inference_mode()
def predict_logits(
    model: nn.Module, loader: DataLoader, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """Return ``(logits, labels)`` of the whole loader, on the CPU, with the model in eval mode."""
    check_module("model", model)
    check_type("loader", loader, DataLoader)
    device = torch.device(device) if device is not None else device_of(model)
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for x, y in loader:
            logits.append(model(x.to(device)).float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    if not logits:
        raise ValueError("loader yields no batches: nothing to predict")
    return torch.cat(logits), torch.cat(labels)


def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device | None = None
) -> dict[str, float]:
    """Accuracy (in %), mean cross-entropy and error count of ``model`` on ``loader`` (in eval mode; the mode is restored)."""
    logits, labels = predict_logits(model, loader, device)
    return {
        "accuracy": 100.0 * (logits.argmax(1) == labels).float().mean().item(),
        "loss": F.cross_entropy(logits, labels).item(),
        "errors": int((logits.argmax(1) != labels).sum().item()),
    }
