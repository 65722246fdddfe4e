"""Mutants of ``utils/lowbit.py``: plausible bugs that ``tests/test_lowbit.py`` must catch —
LSQ's range, gradients and gradient scale, LQ-Nets' encoding and QEM solve, binary/ternary
scaling and thresholds, bit packing, group-wise min-max parameters, GPTQ's error feedback.

Last measured 2026-11-27: 29/29 killed. 25 through ``tools/mutate.py lowbit`` itself (two GPTQ
mutants, no feedback to later blocks and group parameters from the original weights, survived it
and led to ``test_gptq_lazy_blocks_equal_the_unblocked_algorithm``); those two, PackedLinear's
scales and the Hessian summed over batches were then checked on a mutated copy of the repository
with ``pytest -x tests/test_lowbit.py`` (the runner's method; the machine was overloaded)."""

from mutate import Mutant

F = "utils/lowbit.py"
TESTS = ["tests/test_lowbit.py"]

MUTANTS = [
    Mutant(
        "LSQ signed Q_P = 2^(b-1)",
        F,
        "return 2 ** (bits - 1), 2 ** (bits - 1) - 1",
        "return 2 ** (bits - 1), 2 ** (bits - 1)",
    ),
    Mutant(
        "LSQ init step without the 2",
        F,
        "(2 * x.detach().abs().mean() / math.sqrt(qp))",
        "(x.detach().abs().mean() / math.sqrt(qp))",
    ),
    Mutant(
        "gradient scale 1/sqrt(N)",
        F,
        "return 1.0 / math.sqrt(numel * qp)",
        "return 1.0 / math.sqrt(numel)",
    ),
    Mutant(
        "LSQ step gradient sign flipped inside",
        F,
        "torch.where(inside, torch.round(ratio) - ratio, torch.zeros_like(ratio))",
        "torch.where(inside, ratio - torch.round(ratio), torch.zeros_like(ratio))",
    ),
    Mutant(
        "LSQ clipped terms dropped",
        F,
        "dstep = dstep - ctx.qn * low.to(ratio.dtype) + ctx.qp * high.to(ratio.dtype)",
        "dstep = dstep",
    ),
    Mutant(
        "LSQ gradient scale not applied",
        F,
        "grad_step = (grad_out * dstep).sum().reshape(1) * ctx.g",
        "grad_step = (grad_out * dstep).sum().reshape(1)",
    ),
    Mutant(
        "LSQ x gradient not masked",
        F,
        "grad_x = grad_out * inside.to(grad_out.dtype)",
        "grad_x = grad_out",
    ),
    Mutant(
        "LSQ forward without clamp",
        F,
        "return torch.round(ratio.clamp(-qn, qp)) * step",
        "return torch.round(ratio) * step",
    ),
    Mutant(
        "LQ encode picks the farthest level",
        F,
        "nearest = (x.reshape(-1, 1) - levels).abs().argmin(dim=1)",
        "nearest = (x.reshape(-1, 1) - levels).abs().argmax(dim=1)",
    ),
    Mutant(
        "QEM solves with B instead of BᵀB", F, "gram = b.T @ b + 1e-9", "gram = 2 * b.T @ b + 1e-9"
    ),
    Mutant(
        "LQ quantizer updates in eval mode too",
        F,
        "            elif self.training:\n",
        "            elif True:\n",
    ),
    Mutant(
        "binary sign(0) = -1",
        F,
        "return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)",
        "return torch.where(w > 0, 1.0, -1.0).to(w.dtype)",
    ),
    Mutant(
        "BinaryConnect STE not clipped",
        F,
        "return grad * (w.abs() <= 1).to(grad.dtype)",
        "return grad",
    ),
    Mutant(
        "binary alpha = max|W|",
        F,
        "alpha = _per_channel_mean(w.detach().abs())",
        "alpha = w.detach().abs().amax()",
    ),
    Mutant("TWN threshold 0.5", F, "TWN_DELTA = 0.7", "TWN_DELTA = 0.5"),
    Mutant(
        "TWN alpha over all weights",
        F,
        "alpha = _per_channel_mean(a * mask) / count",
        "alpha = _per_channel_mean(a)",
    ),
    Mutant(
        "pack MSB first",
        F,
        "stream = ((flat.unsqueeze(1) >> shifts[:bits]) & 1).reshape(-1)",
        "stream = ((flat.unsqueeze(1) >> shifts[:bits].flip(0)) & 1).reshape(-1)",
    ),
    Mutant(
        "pack range check off by one", F, "int(flat.max()) >= 2**bits", "int(flat.max()) > 2**bits"
    ),
    Mutant(
        "group scale over 2^b levels",
        F,
        "scale = ((hi - lo) / (2**bits - 1)).clamp(min=EPS)",
        "scale = ((hi - lo) / (2**bits)).clamp(min=EPS)",
    ),
    Mutant(
        "group range not widened to 0", F, "lo = w.amin(dim=1).clamp(max=0)", "lo = w.amin(dim=1)"
    ),
    Mutant(
        "zero point sign flipped",
        F,
        "zero = torch.round(-lo / scale).clamp(0, 2**bits - 1)",
        "zero = torch.round(lo / scale).clamp(0, 2**bits - 1)",
    ),
    Mutant(
        "GPTQ without error feedback inside a block",
        F,
        "W1[:, j + 1 :] -= err[:, j : j + 1] * U1[j : j + 1, j + 1 :]",
        "pass",
    ),
    Mutant(
        "GPTQ without feedback to later blocks", F, "W[:, end:] -= err @ U[start:end, end:]", "pass"
    ),
    Mutant(
        "GPTQ error not divided by U_ii",
        F,
        "err[:, j] = (W1[:, j] - scale * (q - zero)) / U1[j, j]",
        "err[:, j] = W1[:, j] - scale * (q - zero)",
    ),
    Mutant(
        "GPTQ group params from the original weights",
        F,
        "scale, zero = group_params(W1[:, j : j + group_size], bits)",
        "scale, zero = group_params(w.detach().double().cpu()[:, start + j : start + j + group_size], bits)",
    ),
    Mutant(
        "PackedLinear scales not stored",
        F,
        'self.register_buffer("scales", gq.scale.half())',
        'self.register_buffer("scales", torch.ones_like(gq.scale).half())',
    ),
    Mutant(
        "hessian hook forgets earlier batches",
        F,
        "hess[name] += (x.T @ x).double().cpu()",
        "hess[name] = (x.T @ x).double().cpu()",
    ),
]

MUTANTS += [
    Mutant(
        "fast pack shifts by one bit per code",
        F,
        "return (flat << (shifts[:per] * bits)).sum(1).to(torch.uint8)",
        "return (flat << shifts[:per]).sum(1).to(torch.uint8)",
    ),
    Mutant("fast unpack mask one bit short", F, "& (2**bits - 1)", "& (2 ** (bits - 1) - 1)"),
]
