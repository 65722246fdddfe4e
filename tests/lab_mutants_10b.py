"""Mutants of lab 10_b (dynamic inference): wrong exit rules, cost accounting and threshold choices."""

from __future__ import annotations

from lab_mutants import LabMutant

LAB = "10_b_dynamic"

_RULE = "def my_exit_points("
_COSTS = "def my_exit_costs("
_CHOOSE = "def my_choose_threshold("
_LATENCY = "threshold = my_choose_threshold(val_scores"
_RECAL = "def my_recalibrate("

MUTANTS = [
    # exercise 1: the exit rule
    LabMutant(
        "> instead of >= (a score equal to the threshold stays)",
        _RULE,
        "exits[scores[e] >= thresholds[e]]",
        "exits[scores[e] > thresholds[e]]",
    ),
    LabMutant(
        "the last confident exit wins, not the first",
        _RULE,
        "for e in reversed(range(num_exits - 1)):",
        "for e in range(num_exits - 1):",
    ),
    LabMutant(
        "unconfident samples leave at the first exit",
        _RULE,
        "torch.full((n,), num_exits - 1, dtype=torch.long)",
        "torch.full((n,), 0, dtype=torch.long)",
    ),
    LabMutant(
        "the first exit's threshold used for every exit",
        _RULE,
        "scores[e] >= thresholds[e]",
        "scores[e] >= thresholds[0]",
    ),
    LabMutant(
        "exits compared with the confidence of the first exit only",
        _RULE,
        "exits[scores[e] >= thresholds[e]] = e",
        "exits[scores[0] >= thresholds[e]] = e",
    ),
    LabMutant(
        "calls the reference exit_points",
        _RULE,
        "    exits = torch.full((n,), num_exits - 1, dtype=torch.long)\n",
        "    return dynamic.exit_points(scores, thresholds)\n",
    ),
    # exercise 2: costs
    LabMutant(
        "cost of one stage, not cumulative",
        _COSTS,
        "        total += stage + head\n        costs.append(total)",
        "        costs.append(stage + head)",
    ),
    LabMutant(
        "heads of earlier exits not counted",
        _COSTS,
        "        total += stage + head\n        costs.append(total)",
        "        total += stage\n        costs.append(total + head)",
    ),
    LabMutant(
        "heads left out",
        _COSTS,
        "        total += stage + head\n",
        "        total += stage\n",
    ),
    LabMutant(
        "average over the exits, not over the samples",
        _COSTS,
        "return float(torch.tensor(costs, dtype=torch.float64)[exits].mean())",
        "return float(torch.tensor(costs, dtype=torch.float64)[exits.unique()].mean())",
    ),
    LabMutant(
        "median instead of mean",
        _COSTS,
        "return float(torch.tensor(costs, dtype=torch.float64)[exits].mean())",
        "return float(torch.tensor(costs, dtype=torch.float64)[exits].median())",
    ),
    LabMutant(
        "calls the reference average_cost",
        _COSTS,
        "return float(torch.tensor(costs, dtype=torch.float64)[exits].mean())",
        "return dynamic.average_cost(exits, costs)",
    ),
    # exercise 3: choosing the threshold
    LabMutant(
        "a cost equal to the budget rejected", _CHOOSE, "if cost > budget:", "if cost >= budget:"
    ),
    LabMutant("budget ignored", _CHOOSE, "        if cost > budget:\n            continue\n", ""),
    LabMutant(
        "ties go to the more expensive threshold",
        _CHOOSE,
        "key = (accuracy, -cost)",
        "key = (accuracy, cost)",
    ),
    LabMutant(
        "the cheapest threshold, whatever its accuracy",
        _CHOOSE,
        "key = (accuracy, -cost)",
        "key = (-cost, accuracy)",
    ),
    LabMutant(
        "accuracy of the last exit instead of each sample's exit",
        _CHOOSE,
        "accuracy = correct[exits, torch.arange(len(exits))].float().mean().item()",
        "accuracy = correct[-1].float().mean().item()",
    ),
    LabMutant(
        "calls the reference choose_threshold",
        _CHOOSE,
        "        exits = my_exit_points(scores, [t] * (len(costs) - 1))\n",
        "        return dynamic.choose_threshold(scores, correct, costs, budget, grid)\n",
    ),
    # exercise 4: the latency budget (ignoring the budget is exercise 3's mutant: whether the most
    # accurate threshold fits a measured latency budget depends on the machine, so it is not repeated here)
    LabMutant(
        "threshold applied to the validation scores",
        _LATENCY,
        "test_exits = my_exit_points(test_scores,",
        "test_exits = my_exit_points(val_scores,",
    ),
    # exercise 5: BN recalibration of the US-Net
    LabMutant(
        "biased variance",
        _RECAL,
        "captured[i].var((0, 2, 3), unbiased=True)",
        "captured[i].var((0, 2, 3), unbiased=False)",
    ),
    LabMutant(
        "statistics gathered in eval mode (BN normalised with stale statistics)",
        _RECAL,
        "    net.train()\n    with torch.no_grad():",
        "    net.eval()\n    with torch.no_grad():",
    ),
    LabMutant(
        "last batch only",
        _RECAL,
        "                means[i] += captured[i].mean((0, 2, 3))",
        "                means[i] = captured[i].mean((0, 2, 3)) * (seen + 1)",
    ),
    LabMutant(
        "the first BN's input used for every BN",
        _RECAL,
        "                means[i] += captured[i].mean((0, 2, 3))",
        "                means[i] += captured[0].mean((0, 2, 3))",
    ),
    LabMutant(
        "one batch more than asked",
        _RECAL,
        "            if b == batches:",
        "            if b == batches + 1:",
    ),
    LabMutant(
        "calls the reference recalibrate_bn",
        _RECAL,
        "    net.train()\n",
        "    return dynamic.recalibrate_bn(net, loader, width, batches)\n",
    ),
]
