"""Lab 07 mutants: plausible wrong answers to mean pooling, the INT8 Linear and the FP32-layer choice."""

from __future__ import annotations

from lab_mutants import LabMutant

LAB = "07_nlp"

_POOL = "    return (token_states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)"

MUTANTS = [
    LabMutant(
        "averages padding too",
        "def my_mean_pool(",
        _POOL,
        "    return token_states.mean(1)",
    ),
    LabMutant(
        "divides by the padded length",
        "def my_mean_pool(",
        _POOL,
        "    return (token_states * mask).sum(1) / token_states.shape[1]",
    ),
    LabMutant(
        "takes the [CLS] token",
        "def my_mean_pool(",
        _POOL,
        "    return token_states[:, 0]",
    ),
    LabMutant(
        "calls the reference mean_pool",
        "def my_mean_pool(",
        _POOL,
        "    return minilm.mean_pool(token_states, attention_mask)",
    ),
    LabMutant(
        "one weight scale for the whole tensor",
        "def quantize_weight_per_channel(",
        "scales = weight.abs().amax(dim=1) / 127.5",
        "scales = (weight.abs().amax() / 127.5).expand(weight.shape[0])",
    ),
    LabMutant(
        "scale max/127 instead of fbgemm's max/127.5",
        "def quantize_weight_per_channel(",
        "scales = weight.abs().amax(dim=1) / 127.5",
        "scales = weight.abs().amax(dim=1) / 127",
    ),
    LabMutant(
        "truncates instead of rounding the weights",
        "def quantize_weight_per_channel(",
        "torch.round(weight / scales[:, None])",
        "torch.trunc(weight / scales[:, None])",
    ),
    LabMutant(
        "forgets the clamp of the weights",
        "def quantize_weight_per_channel(",
        "q = torch.clamp(torch.round(weight / scales[:, None]), -128, 127)",
        "q = torch.round(weight / scales[:, None])",
    ),
    LabMutant(
        "8-bit activations (no reduce range)",
        "def quantize_weight_per_channel(",
        "    scale = (hi - lo) / 127\n",
        "    scale = (hi - lo) / 255\n",
    ),
    LabMutant(
        "activation range not widened to include 0",
        "def quantize_weight_per_channel(",
        "lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)",
        "lo, hi = float(x.min()), float(x.max())",
    ),
    LabMutant(
        "zero point not subtracted",
        "def quantize_weight_per_channel(",
        "acc = (q_x - z) @ q_weight.T",
        "acc = q_x @ q_weight.T",
    ),
    LabMutant(
        "forgets the bias",
        "def quantize_weight_per_channel(",
        "    return y + bias",
        "    return y",
    ),
    LabMutant(
        "calls the reference quantizer",
        "def quantize_weight_per_channel(",
        "    return y + bias",
        "    return nlp.quantize_dynamic_int8(torch.nn.Sequential(torch.nn.Linear(1, 1)))[0](x) * 0 + y + bias",
    ),
    LabMutant(
        "keeps every layer in FP32",
        "def choose_keep_float(",
        "    for keep in range(len(order) + 1):",
        "    for keep in range(len(order), len(order) + 1):",
        until="the end metric",
    ),
    LabMutant(
        "keeps no layer in FP32",
        "def choose_keep_float(",
        "        if nlp.cosine_to_reference(nlp.embed_batch(int8, batch), reference)[0] >= target:",
        "        if True:",
        until="the end metric",
    ),
    LabMutant(
        "calls the reference layer choice",
        "def choose_keep_float(",
        "    order = sorted(sensitivity, key=sensitivity.get, reverse=True)",
        "    return nlp.keep_float_for_target(model, batch, sensitivity, target=target)",
        until="the end metric",
    ),
]

_SPEC = "def my_speculative_decode("
MUTANTS += [
    LabMutant(
        "accepts the whole proposal without checking",
        _SPEC,
        "        while n < len(proposal) and proposal[n] == best[n]:\n            n += 1\n",
        "        n = len(proposal)\n",
    ),
    LabMutant(
        "drops the target's own token after the accepted prefix",
        _SPEC,
        "new = (proposal[:n] + [best[n]])[:budget]",
        "new = (proposal[:n] or [best[n]])[:budget]",
    ),
    LabMutant(
        "reads the target's logits one position late",
        _SPEC,
        "best = logits[0, -(len(proposal) + 1) :].argmax(-1).tolist()",
        "best = logits[0, -len(proposal) :].argmax(-1).tolist() + [int(logits[0, -1].argmax())]",
    ),
    LabMutant(
        "one target call per draft token",
        _SPEC,
        "        target_calls += 1\n",
        "        target_calls += len(proposal) + 1\n",
    ),
    LabMutant(
        "ignores the token budget",
        _SPEC,
        "new = (proposal[:n] + [best[n]])[:budget]",
        "new = proposal[:n] + [best[n]]",
    ),
    LabMutant(
        "calls the reference speculative_decode",
        _SPEC,
        "        seq += new\n",
        "        seq = [BOS] + gen.speculative_decode(target, draft, src_ids, k=k, max_new_tokens=max_new_tokens)[0] + [EOS]\n",
    ),
]
