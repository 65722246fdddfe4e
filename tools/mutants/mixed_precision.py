"""Mutants of ``utils/mixed_precision.py`` and ``utils/calibration_free.py``. Not yet measured
end to end.

Last run (2026-11-27): 7/11 end to end; the two ordering mutants were then killed by a new test
(run with ``-k``); the two BN-loss mutants have a new hand-checked test, not yet rerun. The three ``bounds``
mutants (added with ``distill_inputs(bounds=...)``) were each killed by
``test_distill_inputs_stay_inside_bounds`` (run with ``-k bounds``, 2026-11-27)."""

from mutate import Mutant

F = "utils/mixed_precision.py"
Z = "utils/calibration_free.py"
TESTS = ["tests/test_mixed_precision.py"]

MUTANTS = [
    Mutant("layers not restored", F, "            _swap(model, name, old)", "            pass"),
    Mutant(
        "sensitivity sign flipped",
        F,
        "out[name] = base - float(metric(q))",
        "out[name] = float(metric(q)) - base",
    ),
    Mutant(
        "bytes counted in bits", F, "for n, m in layers.items()) / 8", "for n, m in layers.items())"
    ),
    Mutant(
        "order ignores size",
        F,
        "return sensitivity[name] / layers[name].weight.numel()",
        "return sensitivity[name]",
    ),
    Mutant(
        "least sensitive first",
        F,
        "for name in sorted(sensitivity, key=gain, reverse=True):",
        "for name in sorted(sensitivity, key=gain):",
    ),
    Mutant(
        "budget exceeded by one layer",
        F,
        "if weight_bytes(model, trial) <= budget_bytes:",
        "if weight_bytes(model, bits) <= budget_bytes:",
    ),
    Mutant(
        "curve upgrades one layer too many",
        F,
        "bits = {n: (high if i < k else low)",
        "bits = {n: (high if i <= k else low)",
    ),
    Mutant(
        "BN loss without the std term",
        Z,
        "            + torch.linalg.vector_norm(std - torch.sqrt(bn.running_var + bn.eps))\n",
        "",
    ),
    Mutant(
        "BN loss std vs variance",
        Z,
        "torch.sqrt(bn.running_var + bn.eps))\n        )",
        "bn.running_var)\n        )",
    ),
    Mutant("distilled inputs never updated", Z, "            opt.step()", "            pass"),
    Mutant(
        "bounds ignored during the steps",
        Z,
        "                    x.clamp_(*bounds)",
        "                    pass",
    ),
    Mutant("start not clamped into bounds", Z, "        x = x.clamp(*bounds)", "        pass"),
    Mutant(
        "bounds order not checked", Z, "        if not bounds[0] < bounds[1]:", "        if False:"
    ),
    Mutant(
        "model left in train mode",
        Z,
        "        model.train(was_training)",
        "        model.train(True)",
    ),
]
