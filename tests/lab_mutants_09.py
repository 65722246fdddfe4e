"""Mutation suite of lab 09 (diagnose and fix a broken quantized model): plausible wrong answers,
each a text replacement inside a solution region of ``solutions/09_challenges.ipynb``."""

from lab_mutants import LabMutant

LAB = "09_challenges"

_OUT = "def find_outlier_channels("
_S = "def smooth_scales("
_FOLD = "def fold_into_layernorm("
_CLE = "def equalize_convs("

MUTANTS = [
    # exercise 1: outlier channels
    LabMutant(
        "threshold from the mean instead of the median",
        _OUT,
        "act_absmax.median()",
        "act_absmax.mean()",
    ),
    LabMutant(
        "returns the ranges instead of the indices",
        _OUT,
        "return torch.nonzero(act_absmax > threshold).flatten().tolist()",
        "return act_absmax[act_absmax > threshold].tolist()",
    ),
    LabMutant(
        "threshold ignores factor",
        _OUT,
        "threshold = factor * act_absmax.median()",
        "threshold = 5.0 * act_absmax.median()",
    ),
    # exercise 2: SmoothQuant scales
    LabMutant(
        "alpha on the weights, 1 - alpha on the activations",
        _S,
        "act_absmax.pow(alpha) / weight_absmax.pow(1.0 - alpha)",
        "act_absmax.pow(1.0 - alpha) / weight_absmax.pow(alpha)",
    ),
    LabMutant(
        "weights raised to alpha too",
        _S,
        "weight_absmax.pow(1.0 - alpha)",
        "weight_absmax.pow(alpha)",
    ),
    LabMutant(
        "scales inverted (w / a)",
        _S,
        "return act_absmax.pow(alpha) / weight_absmax.pow(1.0 - alpha)",
        "return weight_absmax.pow(1.0 - alpha) / act_absmax.pow(alpha)",
    ),
    LabMutant(
        "calls the reference implementation",
        _S,
        "return act_absmax.pow(alpha) / weight_absmax.pow(1.0 - alpha)",
        "return equalization.smoothing_scales(act_absmax, weight_absmax, alpha)",
    ),
    # exercise 3: folding
    LabMutant("forgets the LayerNorm bias", _FOLD, "    norm.bias.div_(s)\n", ""),
    LabMutant("multiplies gamma by s", _FOLD, "norm.weight.div_(s)", "norm.weight.mul_(s)"),
    LabMutant(
        "scales the Linear's output rows instead of its input columns",
        _FOLD,
        "linear.weight.mul_(s.reshape(1, -1))",
        "linear.weight.mul_(s[: linear.out_features].reshape(-1, 1))",
    ),
    LabMutant(
        "divides the weights by s",
        _FOLD,
        "linear.weight.mul_(s.reshape(1, -1))",
        "linear.weight.div_(s.reshape(1, -1))",
    ),
    LabMutant(
        "calls the reference fold",
        _FOLD,
        "    norm.weight.div_(s)\n    norm.bias.div_(s)\n",
        "    equalization.fold_smoothing(norm, [linear], s)\n    return\n",
    ),
    # exercise 4: cross-layer equalization
    LabMutant("no square root", _CLE, "s = torch.sqrt(r1 / r2)", "s = r1 / r2"),
    LabMutant("scales inverted", _CLE, "s = torch.sqrt(r1 / r2)", "s = torch.sqrt(r2 / r1)"),
    LabMutant("bias not rescaled", _CLE, "    conv1.bias.div_(s)\n", ""),
    LabMutant(
        "conv2 ranges over its output channels",
        _CLE,
        "r2 = conv2.weight.abs().amax(dim=(0, 2, 3))",
        "r2 = conv2.weight.abs().amax(dim=(1, 2, 3)).repeat(2)[: r1.numel()]",
    ),
    LabMutant(
        "conv2 multiplied on the wrong axis",
        _CLE,
        "conv2.weight.mul_(s.reshape(1, -1, 1, 1))",
        "conv2.weight.mul_(s[: conv2.out_channels].reshape(-1, 1, 1, 1))",
    ),
    LabMutant(
        "calls the reference equalize_pair",
        _CLE,
        "    r1 = conv1.weight.abs().amax(dim=(1, 2, 3))\n",
        "    return equalization.equalize_pair(conv1, conv2)\n",
    ),
]
