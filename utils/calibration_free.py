"""Calibration without real data: synthetic inputs from the BatchNorm statistics (ZeroQ).

Chapter 9 (推理加速技术的挑战与解决方案), section 9.3. Static quantization needs activation
ranges, normally observed on real calibration data. When none may be used, ZeroQ
(Cai et al., CVPR 2020) "distills" inputs from the trained network itself: starting from
noise, it minimises the distance between each BatchNorm layer's batch statistics and the
running statistics it stored during training,

    L(x) = Σ_l ‖μ_l(x) − μ_l‖₂ + ‖σ_l(x) − σ_l‖₂        (ZeroQ eq. 3)

so the synthetic batch produces activations of the same ranges as real data.

The BN statistics do not bound the *input*: unconstrained, the optimisation drifts to
pixel values no image can have (on MNIST, −4 to 9 where real normalised pixels lie in
[−0.42, 2.82]), and a 4-bit quantizer of the network's input calibrated on them is four
times too coarse. The valid input range is known without any data (it is fixed by the
preprocessing: pixels in [0, 1], then normalised), so :func:`distill_inputs` can project
the inputs onto it after every step (``bounds``), as image-synthesis methods clip their
images to the valid range.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from utils.validation import check_float, check_int, check_module


def bn_statistics_loss(model: nn.Module, x: Tensor) -> Tensor:
    """ZeroQ's loss ``Σ_l ‖μ_l(x) − μ_l‖₂ + ‖σ_l(x) − σ_l‖₂`` over every ``BatchNorm2d`` of ``model``
    (the batch mean/std of each BN's input per channel against its running statistics)."""
    check_module("model", model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        raise ValueError("model has no BatchNorm2d: ZeroQ needs the statistics BN layers store")
    terms: list[Tensor] = []

    def record(bn: nn.BatchNorm2d, inputs: tuple) -> None:
        z = inputs[0]
        mean = z.mean(dim=(0, 2, 3))
        std = torch.sqrt(z.var(dim=(0, 2, 3), unbiased=False) + bn.eps)
        terms.append(
            torch.linalg.vector_norm(mean - bn.running_mean)
            + torch.linalg.vector_norm(std - torch.sqrt(bn.running_var + bn.eps))
        )

    handles = [bn.register_forward_pre_hook(record) for bn in bns]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(terms).sum()


def distill_inputs(
    model: nn.Module,
    shape: tuple[int, ...],
    *,
    num: int = 32,
    steps: int = 200,
    lr: float = 0.1,
    seed: int = 0,
    bounds: tuple[float, float] | None = None,
) -> Tensor:
    """``num`` synthetic inputs of ``shape`` (without the batch) that minimise
    :func:`bn_statistics_loss` (Adam, ``steps`` steps, from a standard normal start).

    ``bounds=(lo, hi)``: the valid input range (e.g. the normalised values of pixels 0
    and 1); the start and every step are clamped into it (projected gradient descent).
    The model is used in eval mode and is not changed; the result is on the model's device.
    """
    check_module("model", model)
    if (
        not isinstance(shape, tuple)
        or not shape
        or any(not isinstance(d, int) or d < 1 for d in shape)
    ):
        raise ValueError(f"shape must be a tuple of positive ints (C, H, W), got {shape!r}")
    check_int("num", num, minimum=2)
    check_int("steps", steps, minimum=0)
    check_float("lr", lr, 0.0, min_inclusive=False)
    check_int("seed", seed, minimum=0)
    if bounds is not None:
        if not isinstance(bounds, tuple) or len(bounds) != 2:
            raise ValueError(f"bounds must be None or a tuple (lo, hi), got {bounds!r}")
        check_float("bounds[0]", bounds[0])
        check_float("bounds[1]", bounds[1])
        if not bounds[0] < bounds[1]:
            raise ValueError(f"bounds must satisfy lo < hi, got {bounds!r}")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((num, *shape), generator=gen)
    if bounds is not None:
        x = x.clamp(*bounds)
    x = x.to(device).requires_grad_(True)
    was_training = model.training
    model.eval()
    params = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        opt = torch.optim.Adam([x], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            bn_statistics_loss(model, x).backward()
            opt.step()
            if bounds is not None:
                with torch.no_grad():
                    x.clamp_(*bounds)
    finally:
        for p, flag in zip(model.parameters(), params, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    return x.detach()
