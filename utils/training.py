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
from utils.validation import check_float, check_int, check_module, check_type

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


def cross_entropy_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Default loss: ``CE(model(x), y)``."""
    return F.cross_entropy(model(x), y)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


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
        params: parameters to optimise (default: all of ``model``'s).
        device: where to train (default: CUDA if present, else CPU).
        progress: show a tqdm progress bar.

    Returns:
        ``[{"epoch", "train_loss", "train_acc"?, "val_acc"?}, ...]``.
    """
    check_module("model", model)
    check_type("train_loader", train_loader, DataLoader)
    check_int("epochs", epochs, minimum=0)
    check_float("lr", lr, 0.0, min_inclusive=False)
    check_float("weight_decay", weight_decay, 0.0)
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    device = device or get_device()
    model.to(device)
    loss_fn = compute_loss or cross_entropy_loss
    trainable = params if params is not None else [p for p in model.parameters() if p.requires_grad]
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
    model.eval()
    return history


@torch.inference_mode()
def predict_logits(
    model: nn.Module, loader: DataLoader, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """Return ``(logits, labels)`` of the whole loader, on the CPU, with the model in eval mode."""
    check_module("model", model)
    check_type("loader", loader, DataLoader)
    device = device or _device_of(model)
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        logits.append(model(x.to(device)).float().cpu())
        labels.append(y)
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device | None = None
) -> dict[str, float]:
    """Accuracy (in %) and mean cross-entropy of ``model`` on ``loader``."""
    logits, labels = predict_logits(model, loader, device)
    return {
        "accuracy": 100.0 * (logits.argmax(1) == labels).float().mean().item(),
        "loss": F.cross_entropy(logits, labels).item(),
        "errors": int((logits.argmax(1) != labels).sum().item()),
    }
