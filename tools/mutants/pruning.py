"""Mutants of utils/pruning.py: plausible pruning bugs that tests/test_pruning.py must catch."""

from mutate import Mutant

TESTS = ["tests/test_pruning.py"]
P = "utils/pruning.py"

MUTANTS = [
    # --- unstructured masks
    Mutant(
        "magnitude mask ranks signed values instead of magnitudes",
        P,
        "torch.topk(weight.detach().abs().reshape(-1), k, largest=False)",
        "torch.topk(weight.detach().reshape(-1), k, largest=False)",
    ),
    Mutant(
        "magnitude mask drops the largest weights",
        P,
        "torch.topk(weight.detach().abs().reshape(-1), k, largest=False)",
        "torch.topk(weight.detach().abs().reshape(-1), k, largest=True)",
    ),
    Mutant(
        "pruned count truncated instead of rounded",
        P,
        "return int(round(amount * numel))",
        "return int(amount * numel)",
    ),
    Mutant(
        "global pruning ranks signed values",
        P,
        "torch.cat([w.detach().abs().reshape(-1) for w in weights])",
        "torch.cat([w.detach().reshape(-1) for w in weights])",
    ),
    Mutant(
        "global threshold one past the k-th smallest",
        P,
        "float(torch.kthvalue(flat, k).values)",
        "float(torch.kthvalue(flat, min(k + 1, flat.numel())).values)",
    ),
    Mutant(
        "scope='global' prunes layer by layer",
        P,
        "new = global_magnitude_masks(weights, amount)",
        "new = [magnitude_mask(w, amount) for w in weights]",
    ),
    Mutant(
        "scope='layer' uses one global threshold",
        P,
        "new = [magnitude_mask(w, amount) for w in weights]",
        "new = global_magnitude_masks(weights, amount)",
    ),
    # --- N:M
    Mutant(
        "N:M groups along the flattened (C, kh, kw) row, not the input channels",
        P,
        "channels_last = weight.detach().movedim(1, -1)  # [K, R, S, C]: groups of m along C",
        "channels_last = weight.detach().reshape(weight.shape[0], -1)",
    ),
    Mutant(
        "N:M keeps the smallest of each group",
        P,
        "keep = torch.topk(groups, n, dim=1).indices",
        "keep = torch.topk(groups, n, dim=1, largest=False).indices",
    ),
    Mutant(
        "nm_prune selects layers by the flattened input size",
        P,
        "if module.weight.shape[1] % m == 0:",
        "if module.weight[0].numel() % m == 0:",
    ),
    # --- masks on a model
    Mutant(
        "the mask parametrisation does not multiply",
        P,
        "return weight * self.mask",
        "return weight",
    ),
    Mutant(
        "a second pruning stacks a second parametrisation",
        P,
        "if existing is not None:",
        "if False:",
    ),
    Mutant(
        "make_permanent drops the mask instead of folding it in",
        P,
        'parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)',
        'parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)',
    ),
    Mutant(
        "storage counts a masked layer's original weight too",
        P,
        "and not _is_mask_original(model, p):",
        ":",
    ),
    # --- schedule and scan
    Mutant(
        "quadratic instead of cubic schedule",
        P,
        "return final + (initial - final) * (1.0 - frac) ** 3",
        "return final + (initial - final) * (1.0 - frac) ** 2",
    ),
    Mutant(
        "schedule exponent on t/T instead of 1 - t/T",
        P,
        "return final + (initial - final) * (1.0 - frac) ** 3",
        "return initial + (final - initial) * frac**3",
    ),
    Mutant(
        "gradual pruning skips the last step when it is not a multiple of every",
        P,
        "if self.step % self.every and self.step != self.total_steps:",
        "if self.step % self.every:",
    ),
    Mutant(
        "sensitivity scan writes into the computed (parametrised) weight",
        P,
        "target = masked.mask if masked is not None else module.weight",
        "target = module.weight",
    ),
    Mutant(
        "sensitivity scan does not restore the layer",
        P,
        "                target.copy_(saved)",
        "                pass",
    ),
    # --- storage
    Mutant(
        "CSR without the extra row pointer",
        P,
        "return nnz * (value_bytes + index_bytes) + (rows + 1) * index_bytes",
        "return nnz * (value_bytes + index_bytes) + rows * index_bytes",
    ),
    Mutant(
        "bitmask rounds the bit count down",
        P,
        "return nnz * value_bytes + math.ceil(n / 8)",
        "return nnz * value_bytes + n // 8",
    ),
    # --- structured
    Mutant(
        "L2 instead of L1 filter norm",
        P,
        "p.weight.detach().abs().reshape(group.channels, -1).sum(1)",
        "p.weight.detach().pow(2).reshape(group.channels, -1).sum(1).sqrt()",
    ),
    Mutant(
        "prune_channels keeps the least important channels",
        P,
        "torch.topk(s, kept_channels(g.channels, amount)).indices",
        "torch.topk(s, kept_channels(g.channels, amount), largest=False).indices",
    ),
    Mutant(
        "kept channels rounded instead of floored",
        P,
        "n = int(channels * (1.0 - amount) + 1e-9)",
        "n = round(channels * (1.0 - amount))",
    ),
    Mutant(
        "kept channels floored without the float guard",
        P,
        "n = int(channels * (1.0 - amount) + 1e-9)",
        "n = int(channels * (1.0 - amount))",
    ),
    Mutant(
        "Linear after Flatten: columns of channel c not spread by per_channel",
        P,
        "keep[:, None] * per_channel + torch.arange(per_channel, device=keep.device)",
        "keep[:, None] + torch.arange(per_channel, device=keep.device)",
    ),
    Mutant(
        "duplicate keep indices accepted",
        P,
        "if keep.unique().numel() != keep.numel():",
        "if False:",
    ),
    Mutant(
        "non-integer keep indices truncated",
        P,
        "if isinstance(k, bool) or not isinstance(k, (int, np.integer)):",
        "if False:",
    ),
    Mutant(
        "negative keep indices accepted (< vs <=)",
        P,
        "if keep.min() < 0 or keep.max() >= channels:",
        "if keep.min() < -1 or keep.max() >= channels:",
    ),
    Mutant(
        "keep index == channels accepted (>= vs >)",
        P,
        "if keep.min() < 0 or keep.max() >= channels:",
        "if keep.min() < 0 or keep.max() > channels:",
    ),
    # --- Taylor criteria
    Mutant(
        "Taylor (2019): |g·w| summed instead of squared",
        P,
        "score += contrib**2",
        "score += contrib.abs()",
    ),
    Mutant(
        "Taylor (2017): abs of the batch mean instead of the mean of per-example abs",
        P,
        "score += per_map.abs().mean(0)",
        "score += per_map.mean(0).abs()",
    ),
    Mutant(
        "Taylor (2017): no per-layer L2 normalisation",
        P,
        "out.append(score / norm if norm > 0 else score)",
        "out.append(score)",
    ),
    Mutant(
        "Taylor (2017): squared instead of absolute criterion",
        P,
        "score += per_map.abs().mean(0)",
        "score += per_map.pow(2).mean(0)",
    ),
    Mutant(
        "iterative Taylor removes the highest scores",
        P,
        "(float(s[c]), gi, c)",
        "(-float(s[c]), gi, c)",
    ),
    Mutant(
        "iterative Taylor removes everything in one shot",
        P,
        "sum(len(v) for v in drop.values()) == channels_per_step",
        "sum(len(v) for v in drop.values()) == goal",
    ),
    Mutant(
        "iterative Taylor never fine-tunes",
        P,
        "        if finetune_steps:",
        "        if False:",
    ),
    Mutant(
        "iterative Taylor may empty a layer (>= vs >)",
        P,
        "if len(drop.get(gi, [])) + 1 >= groups[gi].channels:",
        "if len(drop.get(gi, [])) + 1 > groups[gi].channels:",
    ),
]
