"""Mutants of utils/dynamic.py: slimmable layers, BN recalibration, the US-Nets step, early exit.

Last run (2026-11-27, tests/test_dynamic.py): 29/29 killed, none marked equivalent (the full run
killed 28; 'recalibration normalises with stored stats' survived it and is killed since the test of
the second BN's recalibrated mean; 'validation split not stratified' was run alone after intent_splits).
"""

from mutate import Mutant

TESTS = ["tests/test_dynamic.py"]
F = "utils/dynamic.py"
MUTANTS = [
    # slimmable layers and widths
    Mutant(
        "channels truncated, not rounded", F, "int(width * channels + 0.5)", "int(width * channels)"
    ),
    Mutant(
        "zero channels allowed",
        F,
        "return max(1, int(width * channels + 0.5))",
        "return int(width * channels + 0.5)",
    ),
    Mutant(
        "conv slices the last filters",
        F,
        "weight = self.weight[: self.out_active, : x.shape[1]]",
        "weight = self.weight[-self.out_active :, : x.shape[1]]",
    ),
    Mutant(
        "classifier slices its outputs, not its inputs",
        F,
        "F.linear(x, self.weight[:, : x.shape[1]], self.bias)",
        "F.linear(x[:, : self.weight.shape[1]], self.weight, self.bias)",
    ),
    Mutant(
        "BN affine not sliced",
        F,
        "weight, bias = self.weight[:c], self.bias[:c]",
        "weight, bias = self.weight, self.bias",
    ),
    Mutant(
        "narrow widths update the shared running stats",
        F,
        "full = c == self.num_features",
        "full = True",
    ),
    Mutant(
        "eval ignores the recalibrated stats",
        F,
        "mean, var = self.calibrated.get(c, (self.running_mean[:c], self.running_var[:c]))\n        return",
        "mean, var = self.running_mean[:c], self.running_var[:c]\n        return",
    ),
    Mutant(
        "per-stage widths ignored",
        F,
        "return (float(width),) * 3",
        "return (float(width), 1.0, 1.0)",
    ),
    # recalibration
    Mutant(
        "biased variance in recalibration",
        F,
        "x.var(dims, unbiased=True)",
        "x.var(dims, unbiased=False)",
    ),
    Mutant(
        "recalibration sums, never divides",
        F,
        "bn.calibrated[c] = (mean / n, var / n)",
        "bn.calibrated[c] = (mean, var)",
    ),
    Mutant(
        "recalibration normalises with stored stats",
        F,
        "return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)",
        "return F.batch_norm(x, self.running_mean[:c], self.running_var[:c], weight, bias, False, 0.0, self.eps)",
    ),
    Mutant(
        "recalibration uses one batch", F, "            if i == batches:", "            if i == 1:"
    ),
    Mutant(
        "extracted subnet ignores recalibration",
        F,
        "mean, var = bn.calibrated.get(cout, (bn.running_mean[:cout], bn.running_var[:cout]))",
        "mean, var = bn.running_mean[:cout], bn.running_var[:cout]",
    ),
    # US-Nets training
    Mutant(
        "sandwich without the smallest width",
        F,
        "return [MAX_WIDTH, low, *(",
        "return [MAX_WIDTH, MAX_WIDTH, *(",
    ),
    Mutant(
        "in-place distillation teacher not detached",
        F,
        "target = F.softmax(teacher_logits.detach(), dim=1)",
        "target = F.softmax(teacher_logits, dim=1)",
    ),
    Mutant(
        "distillation direction reversed",
        F,
        "return -(target * F.log_softmax(student_logits, dim=1)).sum(1).mean()",
        "return -(F.softmax(student_logits, dim=1) * F.log_softmax(teacher_logits.detach(), dim=1)).sum(1).mean()",
    ),
    Mutant(
        "net left at the last random width",
        F,
        "        net.set_width(MAX_WIDTH)\n        return loss",
        "        return loss",
    ),
    # early exit
    Mutant(
        "> instead of >=",
        F,
        "leave = undecided & (scores[e] >= t)",
        "leave = undecided & (scores[e] > t)",
    ),
    Mutant(
        "the last confident exit wins",
        F,
        "leave = undecided & (scores[e] >= t)",
        "leave = scores[e] >= t",
    ),
    Mutant(
        "unconfident samples leave first",
        F,
        "exits = torch.full((scores.shape[1],), num_exits - 1,",
        "exits = torch.full((scores.shape[1],), 0,",
    ),
    Mutant(
        "per-stage costs, not cumulative",
        F,
        "return float(table[exits.cpu()].mean())",
        "return float(table.diff(prepend=table.new_zeros(1))[exits.cpu()].mean())",
    ),
    Mutant(
        "entropy not normalised",
        F,
        "return 1.0 - entropy / math.log(logits.shape[1])",
        "return 1.0 - entropy",
    ),
    Mutant(
        "choice ties go to the expensive threshold",
        F,
        "ascending=[False, True]",
        "ascending=[False, False]",
    ),
    Mutant(
        "budget is strict",
        F,
        'ok = table[table["avg_cost"] <= budget]',
        'ok = table[table["avg_cost"] < budget]',
    ),
    Mutant(
        "forward_until skips the earlier heads' cost",
        F,
        "        for i in range(k + 1):\n            x = self.stages[i](x)\n            out = self.heads[i](x)",
        "        for i in range(k + 1):\n            x = self.stages[i](x)\n        out = self.heads[k](x)",
    ),
    Mutant(
        "exit loss weights ignored",
        F,
        "return sum(w * F.cross_entropy(z, y) for",
        "return sum(F.cross_entropy(z, y) + 0 * w for",
    ),
    Mutant(
        "MiniLM costs without the intercept",
        F,
        "rows.append((two - one) * lengths.double().cpu() + (2 * one - two))",
        "rows.append((two - one) * lengths.double().cpu())",
    ),
    Mutant(
        "validation split not stratified",
        F,
        "seen[label] % val_every == 0",
        "len(parts['train'][0]) % val_every == 0",
    ),
    # search
    Mutant(
        "over-budget candidates evaluated", F, "        if macs <= budget_macs:", "        if True:"
    ),
]
