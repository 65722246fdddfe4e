"""Mutants of ``utils/equalization.py``: SmoothQuant scales and folding, cross-layer
equalization and bias correction.

Last run (2026-11-27): 18/20 killed end to end; the two survivors (group scales, pairs with a
second activation) were killed after tests were added, run with ``-k``: 20/20."""

from mutate import Mutant

F = "utils/equalization.py"
TESTS = ["tests/test_equalization.py"]

MUTANTS = [
    Mutant(
        "absmax without abs",
        F,
        "return x.detach().abs().movedim(dim, 0)",
        "return x.detach().movedim(dim, 0)",
    ),
    Mutant(
        "weight ranges over output channels",
        F,
        "return channel_absmax(weight, dim=1)",
        "return channel_absmax(weight, dim=0)",
    ),
    Mutant(
        "conv ranges on the last dim",
        F,
        "dim = 1 if isinstance(layer, nn.Conv2d) else -1\n            r =",
        "dim = -1\n            r =",
    ),
    Mutant(
        "ranges not accumulated",
        F,
        "ranges[name] = torch.maximum(ranges[name], r) if name in ranges else r",
        "ranges[name] = r",
    ),
    Mutant(
        "alpha exponents swapped",
        F,
        "return a.pow(alpha) / w.pow(1.0 - alpha)",
        "return a.pow(1.0 - alpha) / w.pow(alpha)",
    ),
    Mutant(
        "scales inverted",
        F,
        "return a.pow(alpha) / w.pow(1.0 - alpha)",
        "return w.pow(1.0 - alpha) / a.pow(alpha)",
    ),
    Mutant("fold forgets beta", F, "        norm.bias.div_(s)\n", "        pass\n"),
    Mutant("fold multiplies gamma", F, "norm.weight.div_(s)", "norm.weight.mul_(s)"),
    Mutant(
        "fold divides the Linear",
        F,
        "lin.weight.mul_(s.to(lin.weight))",
        "lin.weight.div_(s.to(lin.weight))",
    ),
    Mutant(
        "wrapper does not rescale its input",
        F,
        "return self.linear(x * self.inv_scale.to(x.dtype))",
        "return self.linear(x)",
    ),
    Mutant(
        "group scales from the first layer only",
        F,
        "for lin in layers]).amax(0)",
        "for lin in layers[:1]]).amax(0)",
    ),
    Mutant(
        "CLE without the square root",
        F,
        "return torch.sqrt(r1.clamp(min=_MIN_RANGE) / r2.clamp(min=_MIN_RANGE))",
        "return r1.clamp(min=_MIN_RANGE) / r2.clamp(min=_MIN_RANGE)",
    ),
    Mutant(
        "CLE scales inverted",
        F,
        "return torch.sqrt(r1.clamp(min=_MIN_RANGE) / r2.clamp(min=_MIN_RANGE))",
        "return torch.sqrt(r2.clamp(min=_MIN_RANGE) / r1.clamp(min=_MIN_RANGE))",
    ),
    Mutant("CLE forgets bias", F, "        conv1.bias.div_(s)\n", "        pass\n"),
    Mutant(
        "CLE depthwise scaled on the input axis",
        F,
        "        conv2.weight.mul_(s.reshape(-1, 1, 1, 1))",
        "        conv2.weight.mul_(s.reshape(1, -1, 1, 1))",
    ),
    Mutant(
        "pairs accept any activation",
        F,
        'between.count("relu") == 1 and "other" not in between',
        'between.count("relu") == 1',
    ),
    Mutant(
        "bias shift ignores the kernel taps",
        F,
        "field = mean_input.reshape(1, -1, 1, 1).expand(1, -1, *k)",
        "field = mean_input.reshape(1, -1, 1, 1).expand(1, -1, *k) / (k[0] * k[1])",
    ),
    Mutant(
        "bias correction adds the shift",
        F,
        "lin.bias.sub_(bias_shift(",
        "lin.bias.add_(bias_shift(",
    ),
    Mutant(
        "bias correction from the float weight",
        F,
        "error = fq.quantized_weight() - lin.weight",
        "error = lin.weight - fq.quantized_weight()",
    ),
    Mutant("negative scales accepted", F, "    if (scales <= 0).any():\n", "    if False:\n"),
]
