"""Quantization from scratch: uniform affine/symmetric quantizers, observers, BN folding,
fake quantization for PTQ/QAT, integer-only inference and k-means (non-uniform) quantization.

Notation (Jacob et al., CVPR 2018; Krishnamoorthi, arXiv:1806.08342, 2018): a real
value ``r`` is represented by an integer ``q`` with

    r ≈ S · (q − Z),    q = clamp(round(r / S) + Z, q_min, q_max)

where ``S > 0`` is the *scale* and ``Z`` the integer *zero point*. ``b`` bits give
``[q_min, q_max] = [−2^(b−1), 2^(b−1) − 1]`` (signed) or ``[0, 2^b − 1]`` (unsigned).
Rounding is half to even and the division is computed as ``r · (1/S)`` in float32,
exactly as PyTorch's kernels do, so the results agree bit for bit with
``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine``.

Computation in float16/bfloat16 is done in float32 and cast back, as PyTorch's kernels
would on a float32 copy. A zero point must lie in ``[q_min, q_max]`` (PyTorch rejects it too).

Conventions: Jacob et al. 2018 quantize weights *and* activations to uint8 with a zero
point each (their eq. 7 has four terms). Symmetric int8 weights (``Z_w = 0``, per output
channel) with uint8 activations is the later convention of TFLite's int8 spec and of
PyTorch's x86 backend; :class:`IntegerLinear` follows that later convention.

Every public function checks its arguments and raises ``TypeError``/``ValueError``
naming the argument. Model-level helpers are built from the small tensor functions.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.validation import check_choice, check_float, check_int, check_module, check_tensor

MIN_BITS, MAX_BITS = 2, 16
OBSERVERS = ("minmax", "moving_average", "percentile", "mse", "entropy")
_EPS = torch.finfo(torch.float32).eps
_SAMPLE_SEED = 20_171_107  # the sample observers' own random stream


# --------------------------------------------------------------------------------------
# Tensor-level quantizers
# --------------------------------------------------------------------------------------


def qrange(bits: int = 8, signed: bool = True) -> tuple[int, int]:
    """Integer range ``(q_min, q_max)``: ``[−2^(b−1), 2^(b−1)−1]`` if signed else ``[0, 2^b−1]``."""
    check_int("bits", bits, MIN_BITS, MAX_BITS)
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool, got {type(signed).__name__}")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _as_tensor(name: str, value: Tensor | float | int) -> Tensor:
    if isinstance(value, bool) or not isinstance(value, (Tensor, float, int)):
        raise TypeError(f"{name} must be a tensor or a number, got {type(value).__name__}")
    t = torch.as_tensor(value, dtype=torch.float32)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return t


def calc_qparams(
    min_val: Tensor | float,
    max_val: Tensor | float,
    bits: int = 8,
    signed: bool = True,
    symmetric: bool = False,
) -> tuple[Tensor, Tensor]:
    """Scale and zero point that map ``[min_val, max_val]`` (widened to contain 0) onto the grid.

    Affine: ``S = (max − min) / (q_max − q_min)``, ``Z = clamp(q_min − round(min / S))``.
    Symmetric: ``S = max(|min|, |max|) / ((q_max − q_min) / 2)``, ``Z = 0`` (signed) or
    ``2^(b−1)`` (unsigned), as PyTorch's observers compute them. A non-zero range gets
    ``S`` at least float32 eps, as in PyTorch. A zero range (only zeros seen, e.g. a
    pruned output channel) gets ``S = 1``: every scale represents 0 exactly, and unlike
    PyTorch's eps it keeps quantities divided by ``S`` — such as the int32 bias
    ``b / (S_x · S_w)`` of :class:`IntegerLinear` — representable.
    Tensors give per-channel parameters (one per element).

    Returns:
        ``(scale, zero_point)``: float32 and int64 tensors of the shape of ``min_val``.
    """
    lo, hi = _as_tensor("min_val", min_val), _as_tensor("max_val", max_val)
    if lo.shape != hi.shape:
        raise ValueError(
            f"min_val and max_val must have the same shape, got {tuple(lo.shape)} and {tuple(hi.shape)}"
        )
    if (lo > hi).any():
        raise ValueError("min_val must be <= max_val")
    qmin, qmax = qrange(bits, signed)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    empty = hi == lo  # only zeros: any scale is exact, 1 keeps b / S representable
    if symmetric:
        amax = torch.maximum(-lo, hi)
        scale = torch.clamp(amax / ((qmax - qmin) / 2), min=_EPS)
        scale = torch.where(empty, torch.ones_like(scale), scale)
        zp = torch.full_like(scale, 0 if signed else (qmin + qmax + 1) // 2, dtype=torch.int64)
        return scale, zp
    scale = torch.clamp((hi - lo) / float(qmax - qmin), min=_EPS)
    scale = torch.where(empty, torch.ones_like(scale), scale)
    zp = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int64)
    return scale, zp


def _check_params(
    x: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | int,
    axis: int | None,
    qmin: int | None = None,
    qmax: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Validate qparams against ``x`` (and ``Z`` against ``[qmin, qmax]`` when given)
    and reshape them to broadcast along ``axis``."""
    s = _as_tensor("scale", scale)
    if (s <= 0).any():
        raise ValueError("scale must be > 0")
    if isinstance(zero_point, bool) or not isinstance(zero_point, (Tensor, int)):
        raise TypeError(
            f"zero_point must be an int or an integer tensor, got {type(zero_point).__name__}"
        )
    z = torch.as_tensor(zero_point)
    if z.is_floating_point():
        if not torch.equal(z, z.round()):
            raise ValueError("zero_point must hold integers")
    z = z.to(torch.int64)
    if qmin is not None and qmax is not None and ((z < qmin) | (z > qmax)).any():
        raise ValueError(
            f"zero_point must lie in [q_min, q_max] = [{qmin}, {qmax}], "
            f"got values in [{int(z.min())}, {int(z.max())}]"
        )
    if axis is None:
        if s.numel() != 1 or z.numel() != 1:
            raise ValueError(
                "per-tensor quantization (axis=None) needs one scale and one zero_point; pass axis for per-channel"
            )
        return s.reshape(()), z.reshape(())
    check_int("axis", axis, -x.dim(), x.dim() - 1)
    axis = axis % x.dim()
    n = x.shape[axis]
    if s.dim() != 1 or s.numel() != n or z.dim() != 1 or z.numel() != n:
        raise ValueError(
            f"per-channel (axis={axis}) scale and zero_point must be 1-D with x.shape[{axis}] = {n} values, "
            f"got {tuple(s.shape)} and {tuple(z.shape)}"
        )
    shape = [1] * x.dim()
    shape[axis] = n
    return s.reshape(shape), z.reshape(shape)


def quantize(
    x: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | int,
    bits: int = 8,
    signed: bool = True,
    axis: int | None = None,
) -> Tensor:
    """``q = clamp(round(x / S) + Z, q_min, q_max)`` as an int32 tensor (round half to even).

    ``axis`` selects per-channel parameters: ``scale``/``zero_point`` are 1-D with
    ``x.shape[axis]`` entries. The division is ``x · (1/S)`` in float32, as in PyTorch.
    ``Z`` must lie in ``[q_min, q_max]``.
    """
    check_tensor("x", x, finite=True)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    qmin, qmax = qrange(bits, signed)
    s, z = _check_params(x, scale, zero_point, axis, qmin, qmax)
    inv = 1.0 / s
    q = torch.round(x.float() * inv) + z
    return q.clamp(qmin, qmax).to(torch.int32)


def dequantize(
    q: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | int,
    axis: int | None = None,
    *,
    bits: int | None = None,
    signed: bool = True,
) -> Tensor:
    """``r = S · (q − Z)`` as a float32 tensor (per channel along ``axis`` when given).

    With ``bits`` (and ``signed``) given, ``q`` and ``Z`` must lie in ``[q_min, q_max]``;
    without, ``Z`` must lie in the widest supported range ``[−2^15, 2^16 − 1]``.
    """
    check_tensor("q", q, finite=True)
    if q.is_floating_point() and not torch.equal(q, q.round()):
        raise ValueError("q must hold integers")
    if bits is None:
        if not isinstance(signed, bool):
            raise TypeError(f"signed must be a bool, got {type(signed).__name__}")
        qmin, qmax = qrange(MAX_BITS, True)[0], qrange(MAX_BITS, False)[1]
    else:
        qmin, qmax = qrange(bits, signed)
        if q.numel() and (q.min() < qmin or q.max() > qmax):
            raise ValueError(f"q must lie in [q_min, q_max] = [{qmin}, {qmax}] for {bits} bits")
    s, z = _check_params(q, scale, zero_point, axis, qmin, qmax)
    return (q.to(torch.int64) - z).float() * s


class _FakeQuantSTE(torch.autograd.Function):
    """Quantize-dequantize forward; straight-through gradient inside the range, 0 outside."""

    @staticmethod
    def forward(ctx, x: Tensor, s: Tensor, z: Tensor, qmin: int, qmax: int) -> Tensor:  # type: ignore[override]
        q = torch.round(x * (1.0 / s)) + z
        ctx.save_for_backward((q >= qmin) & (q <= qmax))
        return (q.clamp(qmin, qmax) - z) * s

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quantize(
    x: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | int,
    bits: int = 8,
    signed: bool = True,
    axis: int | None = None,
) -> Tensor:
    """``S · (clamp(round(x/S) + Z, q_min, q_max) − Z)`` with the straight-through estimator.

    The gradient w.r.t. ``x`` is 1 where ``round(x/S) + Z`` falls inside the integer
    range and 0 where it is clipped (Bengio et al. 2013; Jacob et al. 2018), the
    same as ``torch.fake_quantize_per_tensor_affine``. Use it for QAT. The arithmetic
    is float32 whatever the dtype of ``x`` (float16/bfloat16 would round ``x · (1/S)``
    differently); the result has the dtype of ``x``.
    """
    check_tensor("x", x, finite=True)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    qmin, qmax = qrange(bits, signed)
    s, z = _check_params(x, scale, zero_point, axis, qmin, qmax)
    s, z = s.to(x.device), z.to(x.device).float()
    return _FakeQuantSTE.apply(x.float(), s, z, qmin, qmax).to(x.dtype)


def quantization_error(x: Tensor, x_hat: Tensor) -> float:
    """Relative error ``‖x − x̂‖₂ / ‖x‖₂`` (0 for a perfect copy)."""
    check_tensor("x", x, finite=True)
    check_tensor("x_hat", x_hat, finite=True)
    if x.shape != x_hat.shape:
        raise ValueError(
            f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}"
        )
    if x.numel() == 0:
        raise ValueError("x must be non-empty")
    return float((x - x_hat).float().norm() / x.float().norm().clamp_min(1e-12))


# --------------------------------------------------------------------------------------
# Observers (calibration)
# --------------------------------------------------------------------------------------


def _channel_view(x: Tensor, axis: int | None) -> Tensor:
    """``x`` as (channels, values) for per-channel statistics, or (1, values) per tensor."""
    if axis is None:
        return x.detach().reshape(1, -1).float()
    check_int("axis", axis, -x.dim(), x.dim() - 1)
    return x.detach().movedim(axis, 0).reshape(x.shape[axis], -1).float()


class Observer:
    """Collects statistics of a tensor stream and turns them into ``(scale, zero_point)``.

    Subclasses define :meth:`update` and :meth:`range`; :meth:`qparams` applies
    :func:`calc_qparams`. ``axis`` chooses per-channel statistics.
    """

    def __init__(
        self, bits: int = 8, signed: bool = False, symmetric: bool = False, axis: int | None = None
    ) -> None:
        qrange(bits, signed)
        if not isinstance(symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
        if axis is not None:
            check_int("axis", axis)
        self.bits, self.signed, self.symmetric, self.axis = bits, signed, symmetric, axis
        self._channels: int | None = None

    def __call__(self, x: Tensor) -> Tensor:
        """Observe ``x`` and return it unchanged (so an observer can sit in a forward pass)."""
        self.update(x)
        return x

    def update(self, x: Tensor) -> None:
        raise NotImplementedError

    def range(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def qparams(self) -> tuple[Tensor, Tensor]:
        """``calc_qparams(*self.range(), bits, signed, symmetric)``; per-tensor results are scalars."""
        lo, hi = self.range()
        scale, zp = calc_qparams(lo, hi, self.bits, self.signed, self.symmetric)
        if self.axis is None:
            return scale.reshape(()), zp.reshape(())
        return scale, zp

    def _check(self, x: Tensor) -> Tensor:
        """``x`` as (channels, values) after checking it is a finite, non-empty tensor whose
        channel count matches what the observer saw before."""
        check_tensor("x", x, finite=True)
        if x.numel() == 0:
            raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
        v = _channel_view(x, self.axis)
        if self._channels is not None and v.shape[0] != self._channels:
            raise ValueError(
                f"x has {v.shape[0]} channels along axis {self.axis}, "
                f"but the observer saw {self._channels} before"
            )
        self._channels = v.shape[0]
        return v


class MinMaxObserver(Observer):
    """Running minimum and maximum over everything seen (PyTorch's ``MinMaxObserver``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.min_val: Tensor | None = None
        self.max_val: Tensor | None = None

    def update(self, x: Tensor) -> None:
        v = self._check(x)
        lo, hi = v.min(dim=1).values, v.max(dim=1).values
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val, self.max_val = (
                torch.minimum(self.min_val, lo),
                torch.maximum(self.max_val, hi),
            )

    def range(self) -> tuple[Tensor, Tensor]:
        if self.min_val is None or self.max_val is None:
            raise RuntimeError("observer has seen no data: call update() first")
        return self.min_val, self.max_val


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of per-batch min/max: ``m ← m + c · (batch_min − m)``."""

    def __init__(self, *args, averaging_constant: float = 0.01, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        check_float("averaging_constant", averaging_constant, 0.0, 1.0, min_inclusive=False)
        self.c = averaging_constant

    def update(self, x: Tensor) -> None:
        v = self._check(x)
        lo, hi = v.min(dim=1).values, v.max(dim=1).values
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = self.min_val + self.c * (lo - self.min_val)
            self.max_val = self.max_val + self.c * (hi - self.max_val)


class _SampleObserver(Observer):
    """Keeps a uniform random sample of at most ``max_samples`` positions of the whole stream.

    Each observed position gets a random key ``u ~ U(0, 1)``; the observer keeps the
    positions with the ``max_samples`` smallest keys seen so far. That is a uniform
    sample without replacement of everything observed, however many batches came and
    in whatever order (bottom-k sampling, equivalent to reservoir sampling, Vitter 1985).
    Per channel, all channels of one position are kept together.
    """

    def __init__(self, *args, max_samples: int = 200_000, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        check_int("max_samples", max_samples, minimum=100)
        self.max_samples = max_samples
        self.samples: Tensor | None = None
        self._keys: Tensor | None = None
        # a seed of its own: keys must not correlate with data drawn from a seed-0 stream
        self._gen = torch.Generator().manual_seed(_SAMPLE_SEED)

    def update(self, x: Tensor) -> None:
        v = self._check(x)
        keys = torch.rand(v.shape[1], generator=self._gen)
        if self.samples is not None and self._keys is not None:
            v, keys = torch.cat([self.samples, v], dim=1), torch.cat([self._keys, keys])
        if v.shape[1] > self.max_samples:
            keep = torch.topk(keys, self.max_samples, largest=False).indices
            v, keys = v[:, keep], keys[keep]
        self.samples, self._keys = v, keys

    def _data(self) -> Tensor:
        if self.samples is None:
            raise RuntimeError("observer has seen no data: call update() first")
        return self.samples


class PercentileObserver(_SampleObserver):
    """Clips to the ``percentile`` and ``100 − percentile`` quantiles (outliers saturate)."""

    def __init__(self, *args, percentile: float = 99.99, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        check_float("percentile", percentile, 50.0, 100.0)
        self.percentile = percentile

    def range(self) -> tuple[Tensor, Tensor]:
        v = self._data()
        p = self.percentile / 100.0
        return torch.quantile(v, 1.0 - p, dim=1), torch.quantile(v, p, dim=1)


class MSEObserver(_SampleObserver):
    """Range ``α · [min, max]`` with ``α`` on a grid minimising ``E[(x − fq(x))²]``.

    A grid search over shrink factors (cf. Banner et al. 2019, "ACIQ"; Nagel et al.
    2021 white paper, §3.4): clipping a few outliers buys a finer step for the rest.
    """

    def __init__(self, *args, grid: int = 80, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        check_int("grid", grid, minimum=2)
        self.grid = grid

    def range(self) -> tuple[Tensor, Tensor]:
        v = self._data()
        lo, hi = v.min(dim=1).values.clamp(max=0), v.max(dim=1).values.clamp(min=0)
        qmin, qmax = qrange(self.bits, self.signed)
        best = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for alpha in torch.linspace(1.0 / self.grid, 1.0, self.grid):
            s, z = calc_qparams(lo * alpha, hi * alpha, self.bits, self.signed, self.symmetric)
            s, z = s[:, None], z[:, None].float()
            err = ((((v * (1.0 / s)).round() + z).clamp(qmin, qmax) - z) * s - v).pow(2).mean(dim=1)
            better = err < best
            best = torch.where(better, err, best)
            best_lo = torch.where(better, lo * alpha, best_lo)
            best_hi = torch.where(better, hi * alpha, best_hi)
        return best_lo, best_hi


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """Move ``eps`` of mass onto every empty bin, taken evenly from the non-empty ones
    (MXNet's ``_smooth_distribution``), so that ``KL`` stays finite; ``None`` if impossible."""
    zero = p == 0
    n_zero, n_nonzero = int(zero.sum()), int((~zero).sum())
    if n_nonzero == 0:
        return None
    out = p + np.where(zero, eps, -eps * n_zero / n_nonzero)
    return out if (out > 0).all() else None


def _kl_candidate(hist: np.ndarray, i: int, levels: int) -> float:
    """``KL(P ‖ Q)`` for the threshold at bin ``i`` (TensorRT / MXNet reference algorithm)."""
    p = hist[:i].astype(np.float64)
    p[-1] += hist[i:].sum()  # outliers folded into the last kept bin
    nonzero = p != 0  # after folding, as TensorRT and MXNet do
    width = i // levels  # bins merged per level; the remainder goes to the last level
    merged = hist[: levels * width].reshape(levels, width).sum(axis=1).astype(np.float64)
    merged[-1] += hist[levels * width : i].sum()
    group = np.minimum(np.arange(i) // width, levels - 1)
    norm = np.bincount(group, weights=nonzero, minlength=levels)
    q = np.where(nonzero, merged[group] / np.maximum(norm[group], 1), 0.0)
    ps, qs = _smooth(p), _smooth(q)
    if ps is None or qs is None:
        return math.inf
    ps, qs = ps / ps.sum(), qs / qs.sum()
    return float(np.sum(ps * np.log(ps / qs)))


def kl_threshold(values: Tensor, bits: int = 8, bins: int = 2048, stride: int = 1) -> float:
    """Clipping threshold ``T`` for ``|x|`` minimising ``KL(P ‖ Q)`` (TensorRT calibration).

    For each candidate ``i`` (``2^(b−1) ≤ i ≤ bins``): ``P`` is the histogram of ``|x|``
    (``bins`` bins over ``[0, max|x|]``) cut after bin ``i`` with the outliers added to
    its last bin; ``Q`` merges the first ``i`` bins of the histogram into ``2^(b−1)``
    levels and spreads each level's count evenly over the bins that are non-empty in
    ``P``. Both are smoothed (``ε = 10⁻⁴``) and ``T`` is the upper edge of bin ``i``
    with the smallest ``KL(P ‖ Q)`` (Migacz, "8-bit inference with TensorRT", GTC 2017;
    MXNet's ``_get_optimal_threshold``). ``stride > 1`` tries every ``stride``-th
    candidate only (and always the full range), trading accuracy for speed.
    """
    check_tensor("values", values, finite=True)
    check_int("bits", bits, MIN_BITS, MAX_BITS)
    check_int("bins", bins, minimum=16)
    check_int("stride", stride, minimum=1)
    if values.numel() == 0:
        raise ValueError("values must be non-empty")
    a = values.detach().abs().flatten().double().cpu().numpy()
    amax = float(a.max())
    levels = 2 ** (bits - 1)
    if amax == 0.0 or levels >= bins:
        return amax  # nothing to clip, or too few bins to clip at this bit width
    hist, edges = np.histogram(a, bins=bins, range=(0.0, amax))
    candidates = list(range(levels, bins + 1, stride))
    if candidates[-1] != bins:
        candidates.append(bins)
    kls = [_kl_candidate(hist, i, levels) for i in candidates]
    best = candidates[int(np.argmin(kls))]
    return float(edges[best])


class EntropyObserver(_SampleObserver):
    """KL-divergence (entropy) calibration: a symmetric clip at :func:`kl_threshold`.

    For non-negative data (e.g. after ReLU) the range is ``[0, T]``; otherwise ``[−T, T]``.
    """

    def range(self) -> tuple[Tensor, Tensor]:
        v = self._data()
        lo, hi = [], []
        for row in v:
            t = kl_threshold(row, self.bits)
            nonneg = bool((row >= 0).all())
            lo.append(0.0 if nonneg else -t)
            hi.append(t)
        return torch.tensor(lo), torch.tensor(hi)


def make_observer(
    name: str = "minmax",
    bits: int = 8,
    signed: bool = False,
    symmetric: bool = False,
    axis: int | None = None,
) -> Observer:
    """Build an observer by name: one of ``OBSERVERS``."""
    check_choice("name", name, OBSERVERS)
    cls = {
        "minmax": MinMaxObserver,
        "moving_average": MovingAverageMinMaxObserver,
        "percentile": PercentileObserver,
        "mse": MSEObserver,
        "entropy": EntropyObserver,
    }[name]
    return cls(bits, signed, symmetric, axis)


# --------------------------------------------------------------------------------------
# BN folding
# --------------------------------------------------------------------------------------


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new ``Conv2d`` equal to ``bn(conv(x))`` in eval mode (Jacob et al. 2018, §3.2).

    ``W' = W · γ / √(σ² + ε)`` (per output channel) and
    ``b' = (b − μ) · γ / √(σ² + ε) + β``, with the running statistics ``μ, σ²``.
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
    if bn.num_features != conv.out_channels:
        raise ValueError(
            f"bn.num_features ({bn.num_features}) must equal conv.out_channels ({conv.out_channels})"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn must track running statistics to be folded")
    fused = copy.deepcopy(conv).eval()
    with torch.no_grad():
        factor = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(
            bn.running_var + bn.eps
        )
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.weight = nn.Parameter(conv.weight * factor.reshape(-1, 1, 1, 1))
        fused.bias = nn.Parameter((bias - bn.running_mean) * factor + beta)
    return fused


# --------------------------------------------------------------------------------------
# Fake-quantized (simulated) models: PTQ and QAT
# --------------------------------------------------------------------------------------


class FakeQuantLayer(nn.Module):
    """A ``Conv2d``/``Linear`` whose weight and input are fake-quantized.

    * weights: symmetric or affine, per output channel or per tensor, ``weight_bits``,
      qparams from the current weight (min-max) at every call, so QAT trains through them;
    * input activations (``act_bits`` not ``None``): unsigned affine, ``"static"``
      qparams from an observer during :func:`calibrate` (buffers ``act_scale``,
      ``act_zero_point``), or ``"dynamic"`` qparams from each batch's min/max.
    """

    def __init__(
        self,
        layer: nn.Module,
        weight_bits: int = 8,
        act_bits: int | None = 8,
        per_channel: bool = True,
        symmetric: bool = True,
        observer: str = "minmax",
        mode: str = "static",
    ) -> None:
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"layer must be an nn.Conv2d or nn.Linear, got {type(layer).__name__}")
        qrange(weight_bits, True)
        if act_bits is not None:
            qrange(act_bits, False)
        check_choice("observer", observer, OBSERVERS)
        check_choice("mode", mode, ("static", "dynamic"))
        for name, flag in (("per_channel", per_channel), ("symmetric", symmetric)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        self.layer = layer
        self.weight_bits, self.act_bits = weight_bits, act_bits
        self.per_channel, self.symmetric, self.mode = per_channel, symmetric, mode
        self.observer_name = observer
        self.observer: Observer | None = None
        self.register_buffer("act_scale", torch.tensor(1.0))
        self.register_buffer("act_zero_point", torch.tensor(0, dtype=torch.int64))

    def quantized_weight(self) -> Tensor:
        """The fake-quantized weight (gradient flows straight through)."""
        w = self.layer.weight
        axis = 0 if self.per_channel else None
        v = _channel_view(w, axis)
        scale, zp = calc_qparams(
            v.min(1).values, v.max(1).values, self.weight_bits, True, self.symmetric
        )
        if axis is None:
            scale, zp = scale.reshape(()), zp.reshape(())
        return fake_quantize(w, scale.to(w.device), zp.to(w.device), self.weight_bits, True, axis)

    def start_calibration(self) -> None:
        if self.act_bits is not None:
            self.observer = make_observer(self.observer_name, self.act_bits, signed=False)

    def finish_calibration(self) -> None:
        if self.observer is not None:
            s, z = self.observer.qparams()
            self.act_scale.copy_(s)
            self.act_zero_point.copy_(z)
            self.observer = None

    def forward(self, x: Tensor) -> Tensor:
        if self.act_bits is not None:
            if self.observer is not None:
                self.observer.update(x)
            else:
                if self.mode == "dynamic":
                    s, z = calc_qparams(x.detach().min(), x.detach().max(), self.act_bits, False)
                else:
                    s, z = self.act_scale, self.act_zero_point
                x = fake_quantize(x, s, z, self.act_bits, False)
        w = self.quantized_weight()
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, self.layer.bias)
        return F.linear(x, w, self.layer.bias)


def _check_no_pruning_masks(model: nn.Module) -> None:
    """``torch.nn.utils.prune`` keeps ``weight_orig`` and a mask (its ``weight`` is not a leaf,
    so the model cannot be copied): ask for ``prune.remove`` instead of failing in deepcopy."""
    masked = sorted(
        f"{name or 'model'}.{p}"
        for name, m in model.named_modules()
        for p, _ in m.named_parameters(recurse=False)
        if p.endswith("_orig")
    )
    if masked:
        raise ValueError(
            f"model has pruning re-parametrisations ({', '.join(masked)}): "
            "call torch.nn.utils.prune.remove(module, name) on them first"
        )


def fold_model_bn(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every ``Conv2d`` directly followed by a ``BatchNorm2d``
    (consecutive children of one parent) replaced by :func:`fold_bn` and the BN by ``Identity``."""
    check_module("model", model)
    _check_no_pruning_masks(model)
    model = copy.deepcopy(model).eval()
    for parent in model.modules():
        names = list(parent._modules)
        for a, b in zip(names, names[1:], strict=False):
            conv, bn = parent._modules[a], parent._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                parent._modules[a] = fold_bn(conv, bn)
                parent._modules[b] = nn.Identity()
    return model


def prepare_fake_quant(
    model: nn.Module,
    *,
    weight_bits: int = 8,
    act_bits: int | None = 8,
    per_channel: bool = True,
    symmetric: bool = True,
    observer: str = "minmax",
    mode: str = "static",
) -> nn.Module:
    """A copy of ``model`` with every ``Conv2d``/``Linear`` wrapped in :class:`FakeQuantLayer`.

    Simulates INT-``b`` inference in float (Jacob et al. 2018, §3): use it for PTQ
    studies (after :func:`calibrate`) and for QAT (train it with ``utils.training.fit``).
    """
    check_module("model", model)
    _check_no_pruning_masks(model)
    model = copy.deepcopy(model)
    kwargs = dict(
        weight_bits=weight_bits,
        act_bits=act_bits,
        per_channel=per_channel,
        symmetric=symmetric,
        observer=observer,
        mode=mode,
    )
    for parent in list(model.modules()):
        if isinstance(parent, FakeQuantLayer):
            continue
        for name, child in list(parent._modules.items()):
            if isinstance(child, (nn.Conv2d, nn.Linear)):
                parent._modules[name] = FakeQuantLayer(child, **kwargs)
    return model


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, num_batches: int = 8) -> nn.Module:
    """Run ``num_batches`` of ``(x, y)`` through a :func:`prepare_fake_quant` model, observing
    every layer's input, then freeze the static activation qparams. Returns the model."""
    check_module("model", model)
    check_int("num_batches", num_batches, minimum=1)
    layers = [m for m in model.modules() if isinstance(m, FakeQuantLayer)]
    if not layers:
        raise ValueError("model has no FakeQuantLayer: call prepare_fake_quant first")
    was_training = model.training
    model.eval()
    for m in layers:
        m.start_calibration()
    device = next(model.parameters()).device
    for i, (x, *_rest) in enumerate(batches):
        if i >= num_batches:
            break
        model(x.to(device))
    for m in layers:
        m.finish_calibration()
    model.train(was_training)
    return model


# --------------------------------------------------------------------------------------
# Integer-only inference (Jacob et al. 2018)
# --------------------------------------------------------------------------------------


def quantize_multiplier(m: Tensor | float) -> tuple[Tensor, Tensor]:
    """Write a real multiplier ``M > 0`` as ``M ≈ M₀ · 2^(−31−n)`` with int32 ``M₀ ∈ [2^30, 2^31)``.

    Jacob et al. 2018, eq. (6): ``M = 2^(−n) · M₀'`` with ``M₀' ∈ [0.5, 1)`` stored as a
    Q31 fixed-point integer; ``M₀`` is ``M₀' · 2^31`` rounded to nearest. Returns int64
    tensors ``(M₀, n)``, element-wise for per-channel multipliers. The paper assumes
    ``M < 1``; larger ``M`` give ``n < 0``.
    """
    _as_tensor("m", m)  # type and finiteness checks
    t = torch.as_tensor(m, dtype=torch.float64)  # keep full precision: M0 has 31 significant bits
    if (t <= 0).any():
        raise ValueError("m must be > 0")
    mant, exp = torch.frexp(t)  # t = mant · 2^exp, mant ∈ [0.5, 1)
    m0 = torch.round(mant * 2**31).to(torch.int64)
    carry = m0 == 2**31  # rounding up to 1.0: renormalise
    m0 = torch.where(carry, m0 // 2, m0)
    n = -exp.to(torch.int64) - carry.to(torch.int64)
    return m0, n


def requantize(
    acc: Tensor, m0: Tensor, shift: Tensor, zero_point: int, qmin: int, qmax: int
) -> Tensor:
    """``clamp(round(acc · M₀ · 2^(−31−n)) + Z, q_min, q_max)`` in integer arithmetic only.

    ``acc`` is the int32 accumulator; the product is formed exactly in int64 and
    divided by ``2^(31+n)`` with one rounding, half away from zero (``2.5 → 3``,
    ``−2.5 → −3``), the rounding of gemmlowp's ``RoundingDivideByPOT`` and TFLite's
    ``MultiplyByQuantizedMultiplier``. (gemmlowp rounds twice, first in
    ``SaturatingRoundingDoublingHighMul``; the single rounding here is the exact one,
    and the two can differ by one step in rare cases.) Per-channel ``m0``/``shift``
    (one per ``acc.shape[1]``) broadcast along dimension 1.
    """
    check_tensor("acc", acc)
    if acc.is_floating_point():
        raise TypeError(f"acc must be an integer tensor, got {acc.dtype}")
    for name, t in (("m0", m0), ("shift", shift)):
        check_tensor(name, t)
        if t.is_floating_point():
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if m0.shape != shift.shape:
        raise ValueError(
            f"m0 and shift must have the same shape, got {tuple(m0.shape)} and {tuple(shift.shape)}"
        )
    if ((m0 < 0) | (m0 >= 2**31)).any():
        raise ValueError(
            "m0 must lie in [0, 2^31) (a Q31 fixed-point value from quantize_multiplier)"
        )
    check_int("zero_point", zero_point)
    check_int("qmin", qmin)
    check_int("qmax", qmax, minimum=qmin)
    if m0.numel() > 1:
        if acc.dim() < 2 or acc.shape[1] != m0.numel():
            raise ValueError(
                f"per-channel m0 has {m0.numel()} values but acc.shape[1] is "
                f"{acc.shape[1] if acc.dim() >= 2 else 'missing'}"
            )
        shape = [1, -1] + [1] * (acc.dim() - 2)
    else:
        shape = [1] * acc.dim()
    m0, total = m0.to(torch.int64).reshape(shape), (31 + shift.to(torch.int64)).reshape(shape)
    if (total < 1).any() or (total > 62).any():
        raise ValueError("multiplier out of the supported range (2^-62, 2^30)")
    prod = acc.to(torch.int64) * m0
    half = torch.ones_like(total) << (total - 1)
    magnitude = (prod.abs() + half) >> total  # half away from zero
    rounded = torch.where(prod < 0, -magnitude, magnitude)
    return (rounded + zero_point).clamp(qmin, qmax).to(torch.int32)


_BIAS_LIMIT = 2**30  # |q_b| bound: leaves 2^30 of int32 headroom for the accumulated products


class IntegerLinear(nn.Module):
    """Integer-only ``Linear``/``Conv2d``: int32 accumulation and fixed-point
    requantization as in Jacob et al. 2018 (§2.2–2.4).

    Input ``q_x`` (uint8 values, zero point ``Z_x``), weight ``q_w`` (int8, symmetric,
    per output channel, ``Z_w = 0``), bias ``q_b = round(b / (S_x S_w))`` in int32::

        acc = Σ (q_x − Z_x) · q_w + q_b                (int32 accumulation)
        q_y = clamp(round(acc · M) + Z_y, lo, 255),    M = S_x S_w / S_y   (fixed point)

    The weights follow the later TFLite-int8 / PyTorch-x86 convention (symmetric int8
    per channel), not the paper's uint8 weights with a zero point ``Z_w`` (its eq. 7
    has four terms; with ``Z_w = 0`` two of them vanish). An all-zero weight row (a
    pruned channel) gets ``S_w = 1`` (see :func:`calc_qparams`), and ``S_w`` is raised
    where needed so that ``|q_b| ≤ 2^30`` (as TFLite's ``AdjustWeightsForBiasScale``).
    ``relu=True`` fuses a ReLU by clamping at ``Z_y`` (``lo = Z_y``).
    """

    def __init__(
        self,
        layer: nn.Module,
        in_qparams: tuple[Tensor, Tensor],
        out_qparams: tuple[Tensor, Tensor],
        relu: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"layer must be an nn.Conv2d or nn.Linear, got {type(layer).__name__}")
        if isinstance(layer, nn.Conv2d) and (
            layer.groups != 1
            or layer.padding_mode != "zeros"
            or layer.dilation != (1, 1)
            or isinstance(layer.padding, str)
        ):
            raise ValueError(
                "only groups=1, dilation=1 convolutions with numeric zero padding are supported"
            )
        # only the geometry of a convolution is kept (no float weights in the integer layer)
        self.conv: dict[str, tuple[int, ...]] | None = None
        if isinstance(layer, nn.Conv2d):
            self.conv = {
                "kernel": layer.kernel_size,
                "stride": layer.stride,
                "padding": layer.padding,
            }
        if not isinstance(relu, bool):
            raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
        s_x, z_x = _uint8_qparams("in_qparams", in_qparams)
        s_y, z_y = _uint8_qparams("out_qparams", out_qparams)
        w = layer.weight.detach().float().cpu()
        v = _channel_view(w, 0)
        s_w, _ = calc_qparams(v.min(1).values, v.max(1).values, 8, True, symmetric=True)
        bias = layer.bias.detach().float().cpu() if layer.bias is not None else torch.zeros(len(v))
        s_w = torch.maximum(s_w, bias.abs() / (s_x * _BIAS_LIMIT))  # keep q_b within int32
        q_w = quantize(w, s_w, torch.zeros_like(s_w, dtype=torch.int64), 8, True, axis=0)
        self.register_buffer("q_w", q_w.to(torch.int8))  # stored in one byte per weight
        self.register_buffer("q_b", torch.round(bias / (s_x * s_w)).to(torch.int32))
        m0, n = quantize_multiplier((s_x.double() * s_w.double()) / s_y.double())
        self.register_buffer("m0", m0)
        self.register_buffer("shift", n)
        self.z_x, self.z_y = int(z_x), int(z_y)
        self.s_w, self.s_x, self.s_y = s_w, float(s_x), float(s_y)
        self.qmin = self.z_y if relu else 0
        self.qmax = 255

    def accumulate(self, q_x: Tensor) -> Tensor:
        """The int32 accumulator ``Σ (q_x − Z_x) · q_w + q_b`` (no float arithmetic)."""
        x = q_x.to(torch.int32) - self.z_x
        w = self.q_w.to(torch.int32)
        if self.conv is None:
            return x @ w.t() + self.q_b
        (kh, kw), (sh, sw), (ph, pw) = (
            self.conv["kernel"],
            self.conv["stride"],
            self.conv["padding"],
        )
        # im2col: the padded integer input is unfolded into patches (values stay integers)
        xp = F.pad(x, [pw, pw, ph, ph])
        cols = xp.unfold(2, kh, sh).unfold(3, kw, sw)
        n, cin, oh, ow, kh, kw = cols.shape
        cols = cols.permute(0, 2, 3, 1, 4, 5).reshape(n, oh * ow, cin * kh * kw)
        acc = cols @ w.reshape(w.shape[0], -1).t()  # (n, oh*ow, cout), int32
        acc = acc + self.q_b
        return acc.permute(0, 2, 1).reshape(n, -1, oh, ow)

    def forward(self, q_x: Tensor) -> Tensor:
        if q_x.is_floating_point():
            raise TypeError("IntegerLinear takes integer input; quantize the input first")
        return requantize(self.accumulate(q_x), self.m0, self.shift, self.z_y, self.qmin, self.qmax)


def _uint8_qparams(name: str, qparams: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Check a per-tensor uint8 ``(scale, zero_point)`` pair; return them as scalars."""
    if not isinstance(qparams, (tuple, list)) or len(qparams) != 2:
        raise TypeError(f"{name} must be a (scale, zero_point) pair")
    s, z = _as_tensor(f"{name} scale", qparams[0]), torch.as_tensor(qparams[1])
    if s.numel() != 1 or z.numel() != 1:
        raise ValueError(f"{name} must hold one scale and one zero point (per tensor)")
    if float(s) <= 0:
        raise ValueError(f"{name} scale must be > 0, got {float(s)}")
    if z.is_floating_point() or not 0 <= int(z) <= 255:
        raise ValueError(f"{name} zero point must be an integer in [0, 255], got {z.item()}")
    return s.reshape(()), z.reshape(()).to(torch.int64)


class IntegerModel(nn.Module):
    """A chain of integer-only layers: quantize the input once, run integers, dequantize the logits."""

    def __init__(
        self,
        layers: list[nn.Module],
        in_qparams: tuple[Tensor, Tensor],
        out_qparams: tuple[Tensor, Tensor],
    ):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.register_buffer("in_scale", torch.as_tensor(in_qparams[0]).reshape(()))
        self.register_buffer("in_zero_point", torch.as_tensor(in_qparams[1]).reshape(()))
        self.register_buffer("out_scale", torch.as_tensor(out_qparams[0]).reshape(()))
        self.register_buffer("out_zero_point", torch.as_tensor(out_qparams[1]).reshape(()))

    def forward_int(self, q: Tensor) -> Tensor:
        """Run the integer layers on a uint8-valued int32 tensor; returns the integer logits."""
        for layer in self.layers:  # MaxPool2d and Flatten work on integers: max commutes with q
            q = layer(q)
        return q

    def forward(self, x: Tensor) -> Tensor:
        q = quantize(x, self.in_scale, self.in_zero_point, 8, False)
        q_y = self.forward_int(q)
        return dequantize(q_y, self.out_scale, self.out_zero_point, bits=8, signed=False)


class _IntReLU(nn.Module):
    """A standalone ReLU on integers: ``max(q, Z)``."""

    def __init__(self, zero_point: int) -> None:
        super().__init__()
        self.z = zero_point

    def forward(self, q: Tensor) -> Tensor:
        return q.clamp_min(self.z)


def _flatten_chain(model: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = []
    for child in model.children():
        if isinstance(child, nn.Sequential):
            out += _flatten_chain(child)
        else:
            out.append(child)
    return out


_CHAIN_TYPES = (nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)


@torch.no_grad()
def convert_integer_only(model: nn.Module, batches: Iterable, num_batches: int = 8) -> IntegerModel:
    """Convert a float chain model (children run in order: Conv2d, BatchNorm2d, Linear, ReLU,
    MaxPool2d, Flatten) into an :class:`IntegerModel` (uint8 activations, int8 weights,
    int32 accumulation, fixed-point requantization).

    BN is folded into the preceding convolution and a ReLU into the preceding layer;
    activation ranges come from min-max observers over ``num_batches`` calibration
    batches. Raises ``ValueError`` when the model is not such a chain (its children
    in order must reproduce its forward pass).
    """
    check_module("model", model)
    check_int("num_batches", num_batches, minimum=1)
    chain = _flatten_chain(fold_model_bn(model))
    chain = [m for m in chain if not isinstance(m, (nn.Identity, nn.Dropout))]
    bad = [type(m).__name__ for m in chain if not isinstance(m, _CHAIN_TYPES)]
    if bad:
        raise ValueError(
            f"convert_integer_only supports {[t.__name__ for t in _CHAIN_TYPES]}, found {bad}"
        )
    xs = []
    for i, (x, *_rest) in enumerate(batches):
        if i >= num_batches:
            break
        xs.append(x.float().cpu())
    if not xs:
        raise ValueError("batches must yield at least one (x, y) batch")
    x = torch.cat(xs)
    ref = model.eval()(x)
    # group layers: each Conv/Linear absorbs a following ReLU; observe every group output
    in_obs = MinMaxObserver(8, signed=False)
    in_obs.update(x)
    h, prev_q = x, in_obs.qparams()
    layers: list[nn.Module] = []
    i = 0
    while i < len(chain):
        m = chain[i]
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            relu = i + 1 < len(chain) and isinstance(chain[i + 1], nn.ReLU)
            h = m(h)
            if relu:
                h = F.relu(h)
                i += 1
            obs = MinMaxObserver(8, signed=False)
            obs.update(h)
            out_q = obs.qparams()
            layers.append(IntegerLinear(m, prev_q, out_q, relu=relu))
            prev_q = out_q
        elif isinstance(m, nn.ReLU):
            h = F.relu(h)
            layers.append(_IntReLU(int(prev_q[1])))
        else:
            h = m(h)
            layers.append(m)
        i += 1
    if not torch.allclose(h, ref, atol=1e-4, rtol=1e-4):
        raise ValueError(
            "model is not a chain: running its children in order does not reproduce model(x)"
        )
    return IntegerModel(layers, in_obs.qparams(), prev_q)


# --------------------------------------------------------------------------------------
# Non-uniform quantization: k-means weight sharing
# --------------------------------------------------------------------------------------


def _nearest(flat: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest of the sorted ``centroids`` for each value (1-D assignment)."""
    return torch.bucketize(flat, (centroids[1:] + centroids[:-1]) / 2)


def kmeans_quantize(
    w: Tensor, bits: int = 4, iters: int = 300, tol: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Non-uniform quantization by 1-D k-means (Han, Mao & Dally, ICLR 2016, §3).

    ``k = 2^bits`` centroids start linearly spaced over ``[min w, max w]`` (the paper's
    best initialisation) and follow Lloyd's iterations: assign each weight to the
    nearest centroid, move each centroid to the mean of its weights,
    ``c_j ← mean{w : nearest(w) = j}``. A cluster left empty is re-seeded with the
    weight farthest from its centroid (as scikit-learn's ``KMeans`` does). Iterations
    stop when the centroids move by ``Σ Δc² ≤ tol · Var(w)`` (scikit-learn's criterion;
    the default ``tol = 0`` runs Lloyd to its fixed point) or after ``iters`` steps. Centroids still unused at the end (fewer
    distinct weights than ``k``) are dropped, so the codebook has at most ``2^bits`` values.

    Returns:
        ``(codebook, indices)``: float32 ``(k',)`` and int64 of ``w``'s shape, with
        ``codebook[indices]`` the quantized weights.
    """
    check_tensor("w", w, finite=True)
    if not w.is_floating_point() or w.numel() == 0:
        raise ValueError("w must be a non-empty floating-point tensor")
    check_int("bits", bits, 1, MAX_BITS)
    check_int("iters", iters, minimum=1)
    check_float("tol", tol, 0.0)
    flat = w.detach().flatten().float().cpu()
    k = min(2**bits, flat.numel())
    centroids = torch.linspace(float(flat.min()), float(flat.max()), k)
    threshold = tol * float(flat.double().var(unbiased=False))
    for _ in range(iters):
        idx = _nearest(flat, centroids)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, flat.double())
        counts = torch.bincount(idx, minlength=k).double()
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):  # move the farthest weights into the empty clusters
            far = torch.topk((flat - centroids[idx]).abs(), len(empty)).indices
            for j, i in zip(empty.tolist(), far.tolist(), strict=True):
                sums[idx[i]] -= flat[i].double()
                counts[idx[i]] -= 1
                sums[j], counts[j] = flat[i].double(), 1.0
        new = torch.where(counts > 0, sums / counts.clamp_min(1), centroids.double()).float()
        new = new.sort().values
        shift = float((new - centroids).double().pow(2).sum())
        centroids = new
        if shift <= threshold:
            break
    idx = _nearest(flat, centroids)
    used = torch.unique(idx)
    remap = torch.full((k,), -1, dtype=torch.int64)
    remap[used] = torch.arange(len(used))
    return centroids[used].clone(), remap[idx].reshape(w.shape)
