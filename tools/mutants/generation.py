"""Mutants of utils/generation.py: the KV cache, greedy and speculative decoding, the data.

Last run (2026-11-27, tests as below): 35/35 killed; "accept on u <= ratio" survives as
marked equivalent (a probability-zero difference). The draft-temperature mutant is a real bug:
the draft samples from one q and the acceptance ratio divides by another (TV to the target
0.10 against a sampling noise of 0.02).
"""

from mutate import Mutant

TESTS = ["tests/test_generation.py"]
F = "utils/generation.py"
MUTANTS = [
    # the model and its KV cache
    Mutant(
        "cache not grown: past keys dropped",
        F,
        "        if past is not None:\n",
        "        if False:\n",
    ),
    Mutant(
        "greedy forgets to keep the returned cache",
        F,
        "logits, cache = model.step(memory, seq[:, -1:], cache)",
        "logits, _ = model.step(memory, seq[:, -1:], cache)",
    ),
    Mutant(
        "new positions start at 0 instead of after the cache",
        F,
        "pos = torch.arange(past, past + t, device=tokens.device)",
        "pos = torch.arange(0, t, device=tokens.device)",
    ),
    Mutant(
        "causal mask hides the token itself",
        F,
        "keys[None, :] <= pos[:, None]",
        "keys[None, :] < pos[:, None]",
    ),
    Mutant(
        "no causal mask in a multi-token step",
        F,
        "        if t > 1:  # query i",
        "        if False:  # query i",
    ),
    Mutant(
        "cross-attention ignores source padding",
        F,
        "x, kv = block(x, mask, p, cache.cross_kv[i], memory.key_mask)",
        "x, kv = block(x, mask, p, cache.cross_kv[i], None)",
    ),
    Mutant("encoder attends to padding", F, "x, _ = block(x, mask)", "x, _ = block(x, None)"),
    Mutant(
        "padding mask dropped whenever any row is unpadded",
        F,
        "if bool(mask.all()):",
        "if bool(mask.any()):",
    ),
    Mutant(
        "truncate keeps one position too many",
        F,
        "kept = [(k[:, :, :length], v[:, :, :length])",
        "kept = [(k[:, :, : length + 1], v[:, :, : length + 1])",
    ),
    # greedy speculative decoding
    Mutant(
        "accepted prefix off by one (rejected draft token kept)",
        F,
        "new = (proposal[:n] + [best[n]])[:budget]",
        "new = (proposal[: n + 1] + [best[n]])[:budget]",
    ),
    Mutant(
        "bonus token forgotten when all k are accepted",
        F,
        "new = (proposal[:n] + [best[n]])[:budget]",
        "new = (proposal[:n] + ([best[n]] if n < len(proposal) else []))[:budget]",
    ),
    Mutant(
        "draft token compared with the target's next prediction",
        F,
        "proposal[n] == best[n]:",
        "proposal[n] == best[n + 1]:",
    ),
    Mutant(
        "target cache not rolled back after a rejection",
        F,
        "        self.t_cache = self.t_cache.truncate(min(keep, self.t_cache.length))\n",
        "",
    ),
    Mutant(
        "draft cache not rolled back after a rejection",
        F,
        "        self.d_cache = self.d_cache.truncate(min(keep, self.d_cache.length))\n",
        "",
    ),
    Mutant(
        "cache rollback keeps the rejected position",
        F,
        "keep = len(self.seq) + n_accepted  #",
        "keep = len(self.seq) + n_accepted + 1  #",
    ),
    Mutant(
        "proposal ignores the max_new_tokens budget",
        F,
        "proposal, _ = _propose(spec, min(k, budget), argmax)",
        "proposal, _ = _propose(spec, k, argmax)",
    ),
    Mutant(
        "acceptance counted per round",
        F,
        "self.stats.accepted += n_accepted",
        "self.stats.accepted += int(n_accepted > 0)",
    ),
    # speculative sampling
    Mutant(
        "acceptance ratio inverted (q/p)",
        F,
        "if u >= float(p[n, x]) / float(q[x]):",
        "if u >= float(q[x]) / float(p[n, x]):",
    ),
    Mutant(
        "accept deterministically when p >= q",
        F,
        "if u >= float(p[n, x]) / float(q[x]):",
        "if float(p[n, x]) < float(q[x]):",
    ),
    Mutant(
        "accept on u <= ratio instead of u < ratio (probability-zero difference)",
        F,
        "if u >= float(p[n, x]) / float(q[x]):",
        "if u > float(p[n, x]) / float(q[x]):",
        equivalent=True,
    ),
    Mutant(
        "residual max(0, q - p)",
        F,
        "r = torch.clamp(p - q, min=0)",
        "r = torch.clamp(q - p, min=0)",
    ),
    Mutant("residual not clamped at 0", F, "r = torch.clamp(p - q, min=0)", "r = p - q"),
    Mutant(
        "residual not normalised",
        F,
        "return r / total if total > 0 else p",
        "return r if total > 0 else p",
    ),
    Mutant(
        "rejection resampled from p instead of the residual",
        F,
        "correction = sample(residual_distribution(p[n], q))",
        "correction = sample(p[n])",
    ),
    Mutant(
        "target distribution without the temperature",
        F,
        "p = F.softmax(spec.target_logits(proposal) / temperature, dim=-1).cpu()",
        "p = F.softmax(spec.target_logits(proposal), dim=-1).cpu()",
    ),
    Mutant(
        "draft sampled at T = 1 while its q in the ratio uses T (sampled q != ratio q)",
        F,
        "return sample(F.softmax(z / temperature, dim=-1))",
        "return sample(F.softmax(z, dim=-1))",
    ),
    Mutant(
        "q of the first position used for every draft token",
        F,
        "q = F.softmax(d_logits[n] / temperature, dim=-1).cpu()",
        "q = F.softmax(d_logits[0] / temperature, dim=-1).cpu()",
    ),
    Mutant(
        "bonus token drawn from the draft",
        F,
        "correction = sample(p[n])  # all k accepted",
        "correction = sample(F.softmax(d_logits[-1] / temperature, dim=-1).cpu())  # all k accepted",
    ),
    # data, vocabulary, metrics and checks
    Mutant(
        "decode does not stop at eos",
        F,
        "            if i == self.eos:\n                break",
        "            if i == self.eos:\n                continue",
    ),
    Mutant(
        "exact match ignores surrounding spaces",
        F,
        "sum(p == r for p, r in",
        "sum(p.strip() == r.strip() for p, r in",
    ),
    Mutant("empty source accepted", F, "    if len(src_ids) == 0:\n", "    if False:\n"),
    Mutant(
        "vocabularies not compared", F, "    if target.vocab != draft.vocab:\n", "    if False:\n"
    ),
    Mutant("k = 0 accepted", F, 'check_int("k", k, minimum=1)', 'check_int("k", k, minimum=0)'),
    Mutant(
        "max_new_tokens may exceed the positions",
        F,
        "minimum=1, maximum=model.max_tgt_len - 1)",
        "minimum=1, maximum=model.max_tgt_len)",
    ),
    Mutant(
        "acceptance rate over tokens instead of proposals",
        F,
        "return self.accepted / self.proposed if self.proposed else 0.0",
        "return self.accepted / self.tokens if self.tokens else 0.0",
    ),
    Mutant(
        "cache key ignores the training data",
        F,
        '            "data": _data_fingerprint(),\n',
        "",
    ),
]
