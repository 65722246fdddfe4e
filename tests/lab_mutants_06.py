"""Mutants of lab 06 (deployment): wrong BN folds, a fusion pass that leaves the graph wrong,
agreement checks that cannot fail, and a benchmark that times the compile or does not interleave."""

from __future__ import annotations

from lab_mutants import LabMutant

LAB = "06_deployment"

_FOLD = "def fold_bn("
_FUSE = "def fuse_fx("
_AGREE = "def agrees("
_BENCH = "def benchmark("

MUTANTS = [
    LabMutant(
        "BN formula without eps",
        _FOLD,
        "torch.sqrt(bn.running_var + bn.eps)",
        "torch.sqrt(bn.running_var)",
    ),
    LabMutant(
        "variance instead of standard deviation",
        _FOLD,
        "torch.sqrt(bn.running_var + bn.eps)",
        "(bn.running_var + bn.eps)",
    ),
    LabMutant(
        "forgot the conv's bias term",
        _FOLD,
        "bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)",
        "bias = torch.zeros_like(bn.running_mean)",
    ),
    LabMutant(
        "forgot beta",
        _FOLD,
        "new_bias = (bias - bn.running_mean) * scale + bn.bias.detach()",
        "new_bias = (bias - bn.running_mean) * scale",
    ),
    LabMutant(
        "bias not scaled",
        _FOLD,
        "new_bias = (bias - bn.running_mean) * scale + bn.bias.detach()",
        "new_bias = bias - bn.running_mean + bn.bias.detach()",
    ),
    LabMutant(
        "weight scaled along the input channels",
        _FOLD,
        "scale.reshape(-1, 1, 1, 1)",
        "scale.reshape(1, -1, 1, 1)",
    ),
    LabMutant(
        "calls torch's fuse_conv_bn_eval",
        _FOLD,
        "    weight = conv.weight.detach() * scale.reshape(-1, 1, 1, 1)\n"
        "    new_bias = (bias - bn.running_mean) * scale + bn.bias.detach()\n",
        "    ref = torch.nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), bn)\n"
        "    weight, new_bias = ref.weight.detach(), ref.bias.detach()\n",
    ),
    LabMutant(
        "fused but the BN node not removed",
        _FUSE,
        "        node.replace_all_uses_with(conv_node)\n        gm.graph.erase_node(node)\n",
        "",
    ),
    LabMutant(
        "BN node removed but the conv not folded",
        _FUSE,
        "        set_module(gm, conv_node.target, folded)\n",
        "",
    ),
    LabMutant(
        "folds a BN whose conv feeds other nodes too",
        _FUSE,
        "if not isinstance(modules[conv_node.target], nn.Conv2d) or len(conv_node.users) != 1:",
        "if not isinstance(modules[conv_node.target], nn.Conv2d):",
    ),
    LabMutant(
        "Identity nodes left in the graph",
        _FUSE,
        '        if node.op == "call_module" and isinstance(modules[node.target], nn.Identity):\n'
        "            node.replace_all_uses_with(node.args[0])\n"
        "            gm.graph.erase_node(node)\n",
        "        pass\n",
    ),
    LabMutant(
        "calls the reference fuse_conv_bn_fx",
        _FUSE,
        "        folded = fold_bn(modules[conv_node.target], modules[node.target])\n",
        "        return D.fuse_conv_bn_fx(model)\n"
        "        folded = fold_bn(modules[conv_node.target], modules[node.target])\n",
    ),
    LabMutant(
        "agreement with a tolerance of 0",
        _AGREE,
        "return diff, diff <= atol",
        "return diff, diff <= 0.0",
    ),
    LabMutant(
        "agreement with a tolerance of 1e3",
        _AGREE,
        "return diff, diff <= atol",
        "return diff, diff <= 1e3",
    ),
    LabMutant(
        "agreement on the mean difference",
        _AGREE,
        "diff = (got - want).abs().max().item()",
        "diff = (got - want).abs().mean().item()",
    ),
    LabMutant(
        "agreement with a strict <",
        _AGREE,
        "return diff, diff <= atol",
        "return diff, diff < atol",
    ),
    LabMutant(
        "calls the reference check_agreement",
        _AGREE,
        "    diff = (got - want).abs().max().item()\n",
        "    res = D.check_agreement(D.Runner('x', run, tuple(x.shape[1:])), reference, x)\n"
        "    diff = res['max_abs_diff']\n",
    ),
    LabMutant(
        "timing without warm-up",
        _BENCH,
        "        for fn in fns.values():\n            for _ in range(warmup):\n                fn(x)\n",
        "",
    ),
    LabMutant(
        "not interleaved: each backend timed fully in turn",
        _BENCH,
        "        for _ in range(rounds):\n            for name, fn in fns.items():\n",
        "        for name, fn in fns.items():\n            for _ in range(rounds):\n",
    ),
    LabMutant(
        "seconds instead of milliseconds",
        _BENCH,
        "times[name].append(1000.0 * (time.perf_counter() - start))",
        "times[name].append(time.perf_counter() - start)",
    ),
    LabMutant(
        "one start for all repeats (cumulative times)",
        _BENCH,
        "                for _ in range(repeats):\n                    start = time.perf_counter()\n",
        "                start = time.perf_counter()\n                for _ in range(repeats):\n",
    ),
]
