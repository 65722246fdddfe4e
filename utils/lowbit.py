"""Low-bit quantization (chapter 10.1): learned quantizers, 1-2 bit weights, weight-only INT4.

The chapter-2 module (:mod:`utils.quantization`) quantizes to 8 bits with a scale
chosen from statistics. Below 4 bits that is not enough; this module collects the
methods that make 4/3/2/1-bit weights work, each a short function on tensors:

* **LSQ** (Esser et al. 2020, *Learned Step Size Quantization*): the step size
  ``s`` is a parameter learned by gradient descent, with the gradient of
  ``v̂ = round(clip(v/s, -Q_N, Q_P))·s`` with respect to ``s`` scaled by
  ``g = 1/sqrt(N·Q_P)`` (:func:`lsq_fake_quant`, :class:`LSQQuantizer`).
* **LQ-Nets** (Zhang et al. 2018): non-uniform levels ``vᵀb, b ∈ {-1, 1}^K`` from a
  learned basis ``v``, fitted by the alternating quantization-error-minimisation
  (QEM) update (:func:`lq_encode`, :func:`lq_qem_step`, :class:`LQQuantizer`).
* **Binary** weights (BinaryConnect, Courbariaux et al. 2015; XNOR-Net scaling
  ``α = mean|W|`` per output channel, Rastegari et al. 2016) and **ternary**
  weights (TWN, Li et al. 2016: threshold ``Δ = 0.7·mean|W|``) (:func:`binarize`,
  :func:`ternarize`).
* **Group-wise weight-only INT4** round-to-nearest (:func:`quantize_groupwise`)
  and **GPTQ** (Frantar et al. 2023), which quantizes one column at a time and
  corrects the not-yet-quantized columns with the inverse Hessian
  (:func:`gptq_quantize`); :class:`PackedLinear` stores the codes packed into real
  bytes (:func:`pack_bits`), so a model's size is counted from the bytes it holds.

Lesson 10 (``lessons/10_a_lowbit_hardware.ipynb``) teaches them; the lab
(``solutions/10_a_lowbit_hardware.ipynb``, exercise 1) asks for the LSQ forward and
gradient.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from utils.validation import check_choice, check_float, check_int, check_module, check_tensor

EPS = torch.finfo(torch.float32).eps
GPTQ_BLOCK = 128  # columns per lazy-batch block of GPTQ (Frantar et al. 2023, §4)
TWN_DELTA = 0.7  # TWN's threshold factor: Δ = 0.7 · mean|W| (Li et al. 2016, eq. 9)


def lsq_range(bits: int, signed: bool = True) -> tuple[int, int]:
    """``(Q_N, Q_P)`` of LSQ: ``(2^(b-1), 2^(b-1) - 1)`` signed, ``(0, 2^b - 1)`` unsigned.

    Codes lie in ``[-Q_N, Q_P]``; a signed 1-bit quantizer has ``Q_N = 1, Q_P = 0``,
    which LSQ does not define (use :func:`binarize`), so ``bits ≥ 2`` when signed.
    """
    check_int("bits", bits, minimum=1, maximum=16)
    if signed:
        if bits < 2:
            raise ValueError(
                "bits must be >= 2 for a signed LSQ quantizer (use binarize for 1 bit)"
            )
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def lsq_init_step(x: Tensor, bits: int, signed: bool = True) -> Tensor:
    """LSQ's initial step size ``s₀ = 2·mean|x| / sqrt(Q_P)`` (Esser et al. 2020, §2.1)."""
    check_tensor("x", x, finite=True)
    _, qp = lsq_range(bits, signed)
    return (2 * x.detach().abs().mean() / math.sqrt(qp)).clamp(min=EPS)


def lsq_grad_scale(numel: int, bits: int, signed: bool = True) -> float:
    """LSQ's gradient scale ``g = 1 / sqrt(N · Q_P)`` (``N``: weights of the layer, or features)."""
    check_int("numel", numel, minimum=1)
    _, qp = lsq_range(bits, signed)
    return 1.0 / math.sqrt(numel * qp)


class _LSQ(torch.autograd.Function):
    """LSQ's forward and its hand-derived gradients (Esser et al. 2020, eq. 3)."""

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, qn: int, qp: int, g: float) -> Tensor:
        ratio = x / step
        ctx.save_for_backward(ratio)
        ctx.qn, ctx.qp, ctx.g = qn, qp, g
        return torch.round(ratio.clamp(-qn, qp)) * step

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (ratio,) = ctx.saved_tensors
        low, high = ratio <= -ctx.qn, ratio >= ctx.qp
        inside = ~(low | high)
        # ∂v̂/∂s: -v/s + round(v/s) inside, -Q_N below, Q_P above
        dstep = torch.where(inside, torch.round(ratio) - ratio, torch.zeros_like(ratio))
        dstep = dstep - ctx.qn * low.to(ratio.dtype) + ctx.qp * high.to(ratio.dtype)
        grad_step = (grad_out * dstep).sum().reshape(1) * ctx.g
        grad_x = grad_out * inside.to(grad_out.dtype)  # straight-through inside the range
        return grad_x, grad_step, None, None, None


def lsq_fake_quant(
    x: Tensor, step: Tensor, bits: int, signed: bool = True, grad_scale: float | None = None
) -> Tensor:
    """LSQ fake quantization ``v̂ = round(clip(v/s, -Q_N, Q_P)) · s`` (Esser et al. 2020, eq. 1-2).

    Gradients (eq. 3, with the straight-through estimator for ``round``):
    ``∂v̂/∂v = 1`` for ``-Q_N < v/s < Q_P`` else 0, and ``∂v̂/∂s = -v/s + round(v/s)``
    inside the range, ``-Q_N`` at or below it, ``Q_P`` at or above it; the step's
    gradient is multiplied by ``g`` (default :func:`lsq_grad_scale` of ``x.numel()``).
    ``step`` is a one-element tensor.
    """
    check_tensor("x", x)
    check_tensor("step", step)
    if step.numel() != 1:
        raise ValueError(f"step must have one element, got shape {tuple(step.shape)}")
    if float(step.detach()) <= 0:
        raise ValueError(f"step must be > 0, got {float(step.detach())}")
    qn, qp = lsq_range(bits, signed)
    g = lsq_grad_scale(x.numel(), bits, signed) if grad_scale is None else grad_scale
    check_float("grad_scale", g, 0.0, min_inclusive=False)
    return _LSQ.apply(x, step.reshape(1), qn, qp, g)


def lsq_fake_quant_autograd(
    x: Tensor, step: Tensor, bits: int, signed: bool = True, grad_scale: float | None = None
) -> Tensor:
    """The same quantizer written as in the paper's listing: autograd derives the gradients.

    ``grad_scale(s, g) = (s - s·g).detach() + s·g`` and ``round_pass(x) = (round(x) - x).detach() + x``;
    used to check :func:`lsq_fake_quant`'s hand-written gradients.
    """
    qn, qp = lsq_range(bits, signed)
    g = lsq_grad_scale(x.numel(), bits, signed) if grad_scale is None else grad_scale
    s = (step - step * g).detach() + step * g
    v = (x / s).clamp(-qn, qp)
    return ((torch.round(v) - v).detach() + v) * s


class LSQQuantizer(nn.Module):
    """A learned-step quantizer (one step per tensor), usable as a weight parametrization.

    The step is initialised by :func:`lsq_init_step` on the first tensor it sees.
    """

    def __init__(self, bits: int, signed: bool = True) -> None:
        super().__init__()
        lsq_range(bits, signed)
        self.bits, self.signed = bits, signed
        self.step = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        if float(self.step.detach()) == 0.0:  # not yet initialised
            with torch.no_grad():
                self.step.copy_(lsq_init_step(x, self.bits, self.signed))
        return lsq_fake_quant(x, self.step, self.bits, self.signed)

    def codes(self, x: Tensor) -> Tensor:
        """Unsigned integer codes ``round(clip(v/s)) + Q_N`` in ``[0, 2^b - 1]``."""
        qn, qp = lsq_range(self.bits, self.signed)
        return (torch.round((x / self.step).clamp(-qn, qp)) + qn).to(torch.int64)


# ----------------------------------------------------------------- LQ-Nets
def lq_levels(basis: Tensor) -> Tensor:
    """All ``2^K`` levels ``vᵀb, b ∈ {-1, 1}^K`` of a basis ``v`` (Zhang et al. 2018, eq. 4), sorted."""
    check_tensor("basis", basis, ndim=1)
    return torch.sort(_sign_patterns(basis.numel(), basis.dtype, basis.device) @ basis).values


def _sign_patterns(k: int, dtype=torch.float32, device=None) -> Tensor:
    """The ``2^K × K`` matrix of all sign vectors ``b ∈ {-1, 1}^K`` (row ``j``: bits of ``j``)."""
    j = torch.arange(2**k, device=device).unsqueeze(1)
    bits = (j >> torch.arange(k, device=device)) & 1
    return (2 * bits - 1).to(dtype)


def lq_encode(x: Tensor, basis: Tensor) -> Tensor:
    """The sign vector ``b ∈ {-1, 1}^K`` of the level nearest to each element: shape ``(numel, K)``."""
    check_tensor("x", x)
    check_tensor("basis", basis, ndim=1)
    patterns = _sign_patterns(basis.numel(), x.dtype, x.device)
    levels = patterns @ basis.to(x.dtype)
    nearest = (x.reshape(-1, 1) - levels).abs().argmin(dim=1)
    return patterns[nearest]


def lq_qem_step(x: Tensor, basis: Tensor) -> Tensor:
    """One QEM update (Zhang et al. 2018, Alg. 1): encode with ``v``, then ``v* = (BᵀB)⁻¹ Bᵀ x``.

    Step 1 fixes the basis and picks each element's nearest level (its sign vector,
    a row of ``B``); step 2 fixes ``B`` and solves the least-squares problem
    ``min_v ‖Bv - x‖²``. Neither step can increase the quantization error.
    """
    b = lq_encode(x, basis).double()
    gram = b.T @ b + 1e-9 * torch.eye(b.shape[1], dtype=b.dtype, device=b.device)
    sol = torch.linalg.solve(gram, b.T @ x.reshape(-1, 1).double())  # normal equations, K × K
    return sol.reshape(-1).to(basis.dtype)


def lq_init_basis(x: Tensor, bits: int) -> Tensor:
    """A starting basis ``v_i = c · 2^i`` (uniform levels) with ``c`` scaled to ``mean|x|``."""
    check_int("bits", bits, minimum=1, maximum=8)
    c = x.detach().abs().mean().clamp(min=EPS) / (2 ** (bits - 1))
    return c * 2.0 ** torch.arange(bits, dtype=torch.float32, device=x.device)


def lq_fit_basis(x: Tensor, bits: int, iters: int = 10) -> Tensor:
    """Basis after ``iters`` QEM updates from :func:`lq_init_basis`."""
    check_int("iters", iters, minimum=0)
    basis = lq_init_basis(x, bits)
    for _ in range(iters):
        basis = lq_qem_step(x.detach(), basis)
    return basis


class _Nearest(torch.autograd.Function):
    """Forward: the quantized value; backward: straight-through (identity)."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor) -> Tensor:
        return q

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class LQQuantizer(nn.Module):
    """LQ-Nets weight quantizer: levels from a basis ``v`` kept up to date by QEM.

    In training mode every forward pass runs one QEM step on the current weights and
    moves the basis there with a moving average, ``v ← (1-γ)·v + γ·v*`` (γ =
    ``momentum``, the paper's running update); gradients pass straight through.
    One basis per tensor here; the paper learns one per output channel of a weight.
    """

    def __init__(self, bits: int, momentum: float = 0.1) -> None:
        super().__init__()
        check_int("bits", bits, minimum=1, maximum=8)
        check_float("momentum", momentum, 0.0, 1.0, min_inclusive=False)
        self.bits, self.momentum = bits, momentum
        self.register_buffer("basis", torch.zeros(bits))

    def forward(self, w: Tensor) -> Tensor:
        with torch.no_grad():
            if not bool(self.basis.any()):
                self.basis.copy_(lq_fit_basis(w, self.bits))
            elif self.training:
                target = lq_qem_step(w, self.basis)
                self.basis.mul_(1 - self.momentum).add_(self.momentum * target)
            q = (lq_encode(w, self.basis) @ self.basis).reshape(w.shape)
        return _Nearest.apply(w, q)

    def codes(self, w: Tensor) -> Tensor:
        """``K``-bit codes (bit ``i`` set where ``b_i = +1``) of each weight."""
        b = lq_encode(w, self.basis) > 0
        return (b.long() << torch.arange(self.bits, device=w.device)).sum(1).reshape(w.shape)


# ----------------------------------------------------------------- binary and ternary
class _SignSTE(torch.autograd.Function):
    """``sign`` (0 ↦ +1) forward; BinaryConnect's clipped straight-through gradient ``1_{|w|≤1}``."""

    @staticmethod
    def forward(ctx, w: Tensor) -> Tensor:
        ctx.save_for_backward(w)
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= 1).to(grad.dtype)


def _per_channel_mean(t: Tensor) -> Tensor:
    """Mean over all but the first dimension, shaped to broadcast against ``t``."""
    return t.reshape(t.shape[0], -1).mean(1).reshape(-1, *([1] * (t.dim() - 1)))


def binarize(w: Tensor) -> Tensor:
    """Binary weights ``α · sign(W)``, ``α = mean|W|`` per output channel (XNOR-Net, eq. 4).

    ``sign(0) = +1``; the gradient is BinaryConnect's straight-through estimator,
    zero where ``|w| > 1``.
    """
    check_tensor("w", w)
    if w.dim() < 2:
        raise ValueError(
            f"w must be a weight with an output-channel dimension, got shape {tuple(w.shape)}"
        )
    alpha = _per_channel_mean(w.detach().abs())
    return alpha * _SignSTE.apply(w)


def ternarize(w: Tensor, delta_factor: float = TWN_DELTA) -> Tensor:
    """Ternary weights ``α · sign(W) · 1_{|W| > Δ}`` of TWN (Li et al. 2016), per output channel.

    ``Δ = 0.7 · mean|W|`` and ``α = mean of |W| over |W| > Δ`` (eq. 9-10); gradients
    pass straight through.
    """
    check_tensor("w", w)
    check_float("delta_factor", delta_factor, 0.0)
    if w.dim() < 2:
        raise ValueError(
            f"w must be a weight with an output-channel dimension, got shape {tuple(w.shape)}"
        )
    a = w.detach().abs()
    delta = delta_factor * _per_channel_mean(a)
    mask = (a > delta).to(w.dtype)
    count = _per_channel_mean(mask).clamp(min=EPS)
    alpha = _per_channel_mean(a * mask) / count
    q = alpha * torch.sign(w.detach()) * mask
    return _Nearest.apply(w, q)


class Binarizer(nn.Module):
    """:func:`binarize` as a weight parametrization."""

    bits = 1

    def forward(self, w: Tensor) -> Tensor:
        return binarize(w)

    def codes(self, w: Tensor) -> Tensor:
        return (w >= 0).long()


class Ternarizer(nn.Module):
    """:func:`ternarize` as a weight parametrization (2-bit codes: 0, 1, 2 for -α, 0, +α)."""

    bits = 2

    def forward(self, w: Tensor) -> Tensor:
        return ternarize(w)

    def codes(self, w: Tensor) -> Tensor:
        return (torch.sign(ternarize(w.detach())) + 1).long()


# ----------------------------------------------------------------- model-level QAT
QUANTIZERS: dict[str, Callable[[int], nn.Module]] = {
    "lsq": lambda bits: LSQQuantizer(bits),
    "lqnet": lambda bits: LQQuantizer(bits),
    "binary": lambda bits: Binarizer(),
    "ternary": lambda bits: Ternarizer(),
}


def _weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def quantize_weights_(model: nn.Module, method: str, bits: int) -> nn.Module:
    """Register a weight quantizer on every ``Conv2d``/``Linear`` of ``model`` (in place).

    ``method``: ``"lsq"``, ``"lqnet"`` (``bits``-bit), ``"binary"`` (1 bit) or
    ``"ternary"`` (2-bit codes). The weights stay FP32 underneath
    (``torch.nn.utils.parametrize``), so the model trains as usual (QAT).
    """
    check_module("model", model)
    check_choice("method", method, QUANTIZERS)
    check_int("bits", bits, minimum=1, maximum=8)
    for _, m in _weighted_layers(model):
        parametrize.register_parametrization(m, "weight", QUANTIZERS[method](bits))
    return model


def _quantizer_of(m: nn.Module) -> nn.Module | None:
    if parametrize.is_parametrized(m, "weight"):
        return m.parametrizations.weight[0]
    return None


def packed_state(model: nn.Module) -> dict[str, Tensor]:
    """What a low-bit model stores: packed weight codes and their scales, other tensors as they are.

    For a quantized layer: its codes packed at ``bits`` bits per weight
    (:func:`pack_bits`) and what turns them back into values (per-channel ``α``, the
    LSQ step, the LQ-Nets basis); everything else (biases, unquantized layers) FP32.
    """
    check_module("model", model)
    out: dict[str, Tensor] = {}
    for name, m in _weighted_layers(model):
        q = _quantizer_of(m)
        if q is None:
            out[f"{name}.weight"] = m.weight.detach()
            continue
        w = m.parametrizations.weight.original.detach()
        out[f"{name}.codes"] = pack_bits(q.codes(w).reshape(-1), q.bits)
        if isinstance(q, (Binarizer, Ternarizer)):
            wq = m.weight.detach()
            out[f"{name}.alpha"] = wq.abs().reshape(wq.shape[0], -1).amax(1)
        elif isinstance(q, LSQQuantizer):
            out[f"{name}.step"] = q.step.detach()
        else:
            out[f"{name}.basis"] = q.basis.detach()
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias.detach()
    return out


def serialized_bytes(tensors: dict[str, Tensor]) -> int:
    """Bytes of ``torch.save(tensors)``: the size of the file that stores them."""
    buffer = io.BytesIO()
    torch.save({k: v.contiguous().clone() for k, v in tensors.items()}, buffer)
    return buffer.getbuffer().nbytes


# ----------------------------------------------------------------- bit packing
def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned integer codes of ``bits`` bits each into a ``uint8`` tensor, LSB first.

    ``n`` codes take ``ceil(n·bits/8)`` bytes: two 4-bit codes or eight 1-bit codes
    per byte (code ``i`` occupies bits ``i·bits … i·bits + bits - 1`` of the stream).
    """
    check_tensor("codes", codes)
    check_int("bits", bits, minimum=1, maximum=8)
    if codes.is_floating_point():
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for bits={bits}")
    shifts = torch.arange(8, device=flat.device)
    if 8 % bits == 0:  # whole codes per byte: shift each into place (same layout, faster)
        per = 8 // bits
        flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % per)]).reshape(-1, per)
        return (flat << (shifts[:per] * bits)).sum(1).to(torch.uint8)
    stream = ((flat.unsqueeze(1) >> shifts[:bits]) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)
    return (stream << shifts).sum(1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` codes as ``int64``."""
    check_tensor("packed", packed)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got {packed.dtype}")
    check_int("bits", bits, minimum=1, maximum=8)
    check_int("numel", numel, minimum=0, maximum=packed.numel() * 8 // bits)
    shifts = torch.arange(8, device=packed.device)
    if 8 % bits == 0:  # whole codes per byte
        per = 8 // bits
        codes = (packed.to(torch.int64).unsqueeze(1) >> (shifts[:per] * bits)) & (2**bits - 1)
        return codes.reshape(-1)[:numel]
    stream = ((packed.to(torch.int64).unsqueeze(1) >> shifts) & 1).reshape(-1)
    stream = stream[: numel * bits].reshape(numel, bits)
    return (stream << shifts[:bits]).sum(1)


# ----------------------------------------------------------------- group-wise weight-only
@dataclass
class GroupQuant:
    """A weight quantized group-wise: codes ``(out, in)``, per-group ``scale``/``zero`` ``(out, in/g)``."""

    codes: Tensor
    scale: Tensor
    zero: Tensor
    bits: int
    group_size: int

    def dequantize(self) -> Tensor:
        """``Ŵ = scale · (q - zero)``, each group with its own scale and zero point."""
        g = self.group_size
        scale = self.scale.float().repeat_interleave(g, dim=1)
        zero = self.zero.float().repeat_interleave(g, dim=1)
        return scale * (self.codes.float() - zero)


def group_params(w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Asymmetric min-max ``(scale, zero)`` per row of ``w``: ``S = (max-min)/(2^b-1)``, ``Z = round(-min/S)``.

    The range is widened to contain 0; ``S ≥ EPS``.
    """
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=EPS)
    zero = torch.round(-lo / scale).clamp(0, 2**bits - 1)
    return scale, zero


def _round_to_grid(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def _check_groups(w: Tensor, bits: int, group_size: int) -> None:
    check_tensor("w", w, finite=True, ndim=2)
    check_int("bits", bits, minimum=1, maximum=8)
    check_int("group_size", group_size, minimum=1)
    if w.shape[1] % group_size:
        raise ValueError(
            f"group_size must divide the input features ({w.shape[1]}), got {group_size}"
        )


def quantize_groupwise(w: Tensor, bits: int = 4, group_size: int = 64) -> GroupQuant:
    """Round-to-nearest weight-only quantization with one ``(scale, zero)`` per group of inputs.

    Each row of ``w`` (``out × in``) is cut into groups of ``group_size`` consecutive
    input weights; each group gets :func:`group_params` and ``q = clamp(round(w/S) + Z, 0, 2^b - 1)``.
    """
    _check_groups(w, bits, group_size)
    out_f, in_f = w.shape
    groups = w.detach().float().reshape(out_f, in_f // group_size, group_size)
    scale, zero = group_params(groups.reshape(-1, group_size), bits)
    scale, zero = scale.reshape(out_f, -1), zero.reshape(out_f, -1)
    codes = _round_to_grid(groups, scale.unsqueeze(2), zero.unsqueeze(2), bits)
    return GroupQuant(codes.reshape(out_f, in_f).long(), scale, zero.long(), bits, group_size)


def gptq_quantize(
    w: Tensor, hessian: Tensor, bits: int = 4, group_size: int = 64, damp: float = 0.01
) -> GroupQuant:
    """GPTQ (Frantar et al. 2023, Alg. 1): quantize column by column, pushing each error onward.

    Minimises ``‖W X - Ŵ X‖²`` with ``H = X Xᵀ`` (``in × in``). With ``U`` the upper
    Cholesky factor of ``H⁻¹`` (``H`` damped by ``damp · mean diag(H)``), column ``i``
    is rounded to its group's grid, and its error ``e = (w_i - ŵ_i) / U_ii`` is
    subtracted from the later columns, ``W[:, j] -= e · U_ij`` (the OBQ update
    restricted to a fixed order). A group's scale and zero point are chosen from the
    already-updated weights when the loop reaches its first column.
    """
    _check_groups(w, bits, group_size)
    check_tensor("hessian", hessian, finite=True, ndim=2)
    if hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"hessian must be {w.shape[1]}×{w.shape[1]}, got {tuple(hessian.shape)}")
    check_float("damp", damp, 0.0)
    W = w.detach().double().cpu().clone()
    H = hessian.detach().double().cpu().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    out_f, in_f = W.shape
    codes = torch.zeros_like(W, dtype=torch.long)
    scales, zeros = [], []
    block = group_size * max(1, GPTQ_BLOCK // group_size)
    for start in range(0, in_f, block):  # lazy batch updates (§4, step 2): one matmul per block
        end = min(start + block, in_f)
        W1, U1 = W[:, start:end].clone(), U[start:end, start:end]
        err = torch.zeros_like(W1)
        for j in range(end - start):
            if j % group_size == 0:
                scale, zero = group_params(W1[:, j : j + group_size], bits)
                scales.append(scale)
                zeros.append(zero)
            q = _round_to_grid(W1[:, j], scale, zero, bits)
            codes[:, start + j] = q.long()
            err[:, j] = (W1[:, j] - scale * (q - zero)) / U1[j, j]
            W1[:, j + 1 :] -= err[:, j : j + 1] * U1[j : j + 1, j + 1 :]
        W[:, end:] -= err @ U[start:end, end:]
    return GroupQuant(
        codes,
        torch.stack(scales, 1).float(),
        torch.stack(zeros, 1).long(),
        bits,
        group_size,
    )


def layer_output_error(w: Tensor, w_hat: Tensor, x: Tensor) -> float:
    """``‖x Wᵀ - x Ŵᵀ‖² / ‖x Wᵀ‖²``: the relative error of a linear layer's output on inputs ``x``."""
    ref = x @ w.T
    return float(((ref - x @ w_hat.T) ** 2).sum() / (ref**2).sum().clamp(min=EPS))


class PackedLinear(nn.Module):
    """A ``Linear`` whose weight is stored as packed ``bits``-bit codes with FP16 group scales.

    Buffers: ``qweight`` (the codes, :func:`pack_bits`), ``qzeros`` (zero points,
    packed the same way), ``scales`` (FP16), ``bias`` (FP32). The weight is
    dequantized on the fly in ``forward`` (as weight-only INT4 kernels do), so
    :func:`utils.benchmark.state_dict_bytes` of a model counts the real bytes.
    """

    def __init__(self, gq: GroupQuant, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = gq.codes.shape
        self.bits, self.group_size = gq.bits, gq.group_size
        self.register_buffer("qweight", pack_bits(gq.codes, gq.bits))
        self.register_buffer("qzeros", pack_bits(gq.zero, gq.bits))
        self.register_buffer("scales", gq.scale.half())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def group_quant(self) -> GroupQuant:
        """The stored weight unpacked back into a :class:`GroupQuant`."""
        n_groups = self.in_features // self.group_size
        codes = unpack_bits(self.qweight, self.bits, self.out_features * self.in_features)
        zeros = unpack_bits(self.qzeros, self.bits, self.out_features * n_groups)
        return GroupQuant(
            codes.reshape(self.out_features, self.in_features),
            self.scales,
            zeros.reshape(self.out_features, n_groups),
            self.bits,
            self.group_size,
        )

    def forward(self, x: Tensor) -> Tensor:
        w = self.group_quant().dequantize().to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def linear_hessians(
    model: nn.Module, batches: Iterable[dict[str, Tensor]], names: list[str] | None = None
) -> dict[str, Tensor]:
    """``H = Σ x xᵀ`` over the tokens entering each ``nn.Linear`` (by name), from forward hooks.

    ``batches`` are keyword-argument dicts for ``model`` (e.g. tokenized sentences);
    ``names`` restricts the layers (default: every ``nn.Linear``).
    """
    check_module("model", model)
    wanted = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if names is not None:
        wanted = {n: wanted[n] for n in names}
    hess = {
        n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in wanted.items()
    }

    def hook(name):
        def fn(_mod, inputs, _out):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            hess[name] += (x.T @ x).double().cpu()  # FP32 product per batch, FP64 sum

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in wanted.items()]
    try:
        with torch.inference_mode():
            for batch in batches:
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return hess


def quantize_linears_(
    model: nn.Module,
    *,
    method: str = "rtn",
    bits: int = 4,
    group_size: int = 64,
    hessians: dict[str, Tensor] | None = None,
    names: list[str] | None = None,
    damp: float = 0.01,
) -> nn.Module:
    """Replace ``nn.Linear`` layers by :class:`PackedLinear` (in place): ``"rtn"`` or ``"gptq"``.

    GPTQ needs ``hessians`` from :func:`linear_hessians` for every replaced layer
    (``damp``: see :func:`gptq_quantize`).
    ``names`` restricts the layers (default: every ``nn.Linear`` whose input
    features ``group_size`` divides).
    """
    check_module("model", model)
    check_choice("method", method, ("rtn", "gptq"))
    if method == "gptq" and hessians is None:
        raise ValueError("method='gptq' needs hessians (see linear_hessians)")
    layers = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.in_features % group_size == 0
    }
    if names is not None:
        layers = {n: layers[n] for n in names}
    for name, lin in layers.items():
        if method == "gptq":
            gq = gptq_quantize(lin.weight, hessians[name], bits, group_size, damp)
        else:
            gq = quantize_groupwise(lin.weight, bits, group_size)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear(gq, lin.bias).to(lin.weight.device))
    return model


def quantize_linears_cached_(
    model: nn.Module,
    names: list[str],
    *,
    method: str,
    bits: int,
    group_size: int,
    calibration: Callable[[], Iterable[dict[str, Tensor]]],
    cache_name: str,
    config: dict,
) -> nn.Module:
    """:func:`quantize_linears_` on ``names`` (in place), the packed layers cached on disk.

    GPTQ on every layer of a transformer takes a while on a small CPU, so its result
    (the :class:`PackedLinear` buffers) is computed once and kept by
    :func:`utils.cache.cached_state` under ``cache_name`` and ``config`` (which must
    name everything that changes the result, e.g. the model and the calibration
    text); ``calibration()`` returns the batches for :func:`linear_hessians`.
    """
    from utils.cache import cached_state

    check_module("model", model)
    check_choice("method", method, ("rtn", "gptq"))
    keys = {n: n.replace(".", "__") for n in names}

    def build() -> nn.Module:  # the structure to load into: round-to-nearest layers
        store = nn.ModuleDict()
        for n in names:
            lin = model.get_submodule(n)
            store[keys[n]] = PackedLinear(
                quantize_groupwise(lin.weight, bits, group_size), lin.bias
            )
        return store

    def train(store: nn.Module) -> None:
        hess = linear_hessians(model, calibration(), names) if method == "gptq" else None
        for n in names:
            lin = model.get_submodule(n)
            gq = (
                gptq_quantize(lin.weight, hess[n], bits, group_size)
                if method == "gptq"
                else quantize_groupwise(lin.weight, bits, group_size)
            )
            store[keys[n]] = PackedLinear(gq, lin.bias)

    full = {"method": method, "bits": bits, "group_size": group_size, **config}
    store, _, _ = cached_state(cache_name, full, build, train)
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, store[keys[n]].to(model.get_submodule(n).weight.device))
    return model
