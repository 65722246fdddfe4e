"""Argument checks shared by every public function of ``utils``.

Each check raises ``TypeError`` (wrong type) or ``ValueError`` (wrong value) with a
message that names the argument and says what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterable
from typing import Any

import torch
from torch import nn


def check_type(name: str, value: Any, types: type | tuple[type, ...]) -> None:
    """Raise ``TypeError`` unless ``isinstance(value, types)``."""
    if not isinstance(value, types):
        allowed = types if isinstance(types, tuple) else (types,)
        names = " or ".join(t.__name__ for t in allowed)
        raise TypeError(f"{name} must be {names}, got {type(value).__name__}")


def check_int(
    name: str, value: Any, minimum: int | None = None, maximum: int | None = None
) -> None:
    """Raise unless ``value`` is an ``int`` (not ``bool``) in ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def check_float(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> None:
    """Raise unless ``value`` is a finite real number inside the given bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None:
        bad = value < minimum if min_inclusive else value <= minimum
        if bad:
            op = ">=" if min_inclusive else ">"
            raise ValueError(f"{name} must be {op} {minimum}, got {value}")
    if maximum is not None:
        bad = value > maximum if max_inclusive else value >= maximum
        if bad:
            op = "<=" if max_inclusive else "<"
            raise ValueError(f"{name} must be {op} {maximum}, got {value}")


def check_choice(name: str, value: Any, choices: Iterable[Any] | Container[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    options = list(choices)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def check_module(name: str, value: Any) -> None:
    """Raise ``TypeError`` unless ``value`` is a ``torch.nn.Module``."""
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")


def check_tensor(name: str, value: Any, *, finite: bool = False, ndim: int | None = None) -> None:
    """Raise unless ``value`` is a tensor (optionally finite, optionally of ``ndim`` dims)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if finite and value.is_floating_point() and not torch.isfinite(value).all():
        raise ValueError(f"{name} must contain only finite values (no NaN or inf)")
