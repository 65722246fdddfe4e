"""Mutants of utils/nlp.py: metrics, alignment, INT8 choice, head importance and pruning, student.

Not yet run as a whole through `make mutate MODULES=nlp`: the shared 2-core machine was
saturated when this was written. The eight mutants of the sensitivity scan, the keep-float
walk and the fused ONNX graph were run one by one (`tools/mutate.py nlp -k …`): 8/8 killed.
"""

from mutate import Mutant

TESTS = ["tests/test_nlp.py"]
F = "utils/nlp.py"
MUTANTS = [
    # metrics
    Mutant(
        "macro-F1 counts only predicted classes",
        F,
        "for c in np.union1d(p, r):",
        "for c in np.unique(p):",
    ),
    Mutant(
        "F1 without the factor 2",
        F,
        "scores.append(2 * tp / (2 * tp + fp + fn))",
        "scores.append(tp / (tp + fp + fn))",
    ),
    Mutant(
        "I- of another type continues a span",
        F,
        'continues = tag.startswith("I-") and tag[2:] == kind',
        'continues = tag.startswith("I-") and kind is not None',
    ),
    Mutant(
        "last span dropped",
        F,
        'for i, tag in enumerate([*tags, "O"]):',
        "for i, tag in enumerate(tags):",
    ),
    Mutant(
        "entity F1 as precision",
        F,
        "return 2 * hit / (n_pred + n_ref) if n_pred + n_ref else 1.0",
        "return hit / n_pred if n_pred else 1.0",
    ),
    Mutant(
        "retrieval by dot product",
        F,
        "sims = F.normalize(queries.float(), dim=1) @ F.normalize(passages.float(), dim=1).T",
        "sims = queries.float() @ passages.float().T",
    ),
    Mutant(
        "recall@k checks only the first hit",
        F,
        "return float((top == gold).any(1).float().mean())",
        "return float((top[:, :1] == gold).any(1).float().mean())",
    ),
    Mutant(
        "worst cosine is the max",
        F,
        "return float(cos.mean()), float(cos.min())",
        "return float(cos.mean()), float(cos.max())",
    ),
    # alignment
    Mutant(
        "last word-piece instead of first",
        F,
        "(t == 0 or ids[t - 1] != w)",
        "(t == len(ids) - 1 or ids[t + 1] != w)",
    ),
    # INT8
    Mutant("keep_float ignored", F, "if n not in set(keep_float)]", "]"),
    Mutant(
        "keeps the least sensitive layers",
        F,
        "return sorted(sensitivity, key=sensitivity.get, reverse=True)[:keep]",
        "return sorted(sensitivity, key=sensitivity.get)[:keep]",
    ),
    # heads
    Mutant(
        "gate repeated per head wrongly",
        F,
        "g = gates[i].to(x.device).repeat_interleave(size)",
        "g = gates[i].to(x.device).repeat(size)",
    ),
    Mutant("signed gradients", F, "total += grad.abs()", "total += grad"),
    Mutant(
        "importance not normalised per layer",
        F,
        "return total / total.norm(dim=1, keepdim=True).clamp(min=1e-12)",
        "return total",
    ),
    Mutant("pruning drops the kept heads", F, "if h not in drop]", "if h in drop]"),
    Mutant(
        "O keeps every input column",
        F,
        "old.weight.data[:, rows].clone()",
        "old.weight.data[:, : len(rows)].clone()",
    ),
    Mutant("a layer may lose every head", F, "if len(out.get(layer, [])) < heads - 1:", "if True:"),
    # student
    Mutant(
        "student shares the teacher's layers",
        F,
        "[copy.deepcopy(teacher.encoder.layer[i]) for i in layers]",
        "[teacher.encoder.layer[i] for i in layers]",
    ),
    Mutant(
        "distill loss counts padding",
        F,
        "mse = ((student_states - teacher_states) ** 2 * mask).sum()",
        "mse = ((student_states - teacher_states) ** 2).sum()",
    ),
    # sensitivity scan, keep-float walk, fused ONNX graph
    Mutant(
        "scan leaves each layer quantized",
        F,
        "        finally:\n            _swap(base, name, layer)",
        "        finally:\n            pass",
    ),
    Mutant(
        "scan quantizes per tensor",
        F,
        "    float_layer.qconfig = per_channel_dynamic_qconfig",
        "    float_layer.qconfig = torch.ao.quantization.default_dynamic_qconfig",
    ),
    Mutant(
        "walk restores the wrong layer",
        F,
        "_swap(q, order[keep - 1], copy.deepcopy(model.get_submodule(order[keep - 1])).cpu())",
        "_swap(q, order[-keep], copy.deepcopy(model.get_submodule(order[-keep])).cpu())",
    ),
    Mutant(
        "walk stops one layer late",
        F,
        "            return order[:keep]\n    return order",
        "            return order[: keep + 1]\n    return order",
    ),
    Mutant(
        "fused QKV weight not searched",
        F,
        "return any(np.array_equal(init[:, c : c + cols], w_t) for c in range(0, init.shape[1], cols))",
        "return np.array_equal(init, w_t)",
    ),
    Mutant(
        "Q, K and V listed three times",
        F,
        "        if nodes[0] not in out:\n            out.append(nodes[0])",
        "        out.append(nodes[0])",
    ),
    Mutant(
        "attention left in float",
        F,
        'op_types_to_quantize=["MatMul", "Attention"],',
        'op_types_to_quantize=["MatMul"],',
    ),
    Mutant(
        "heads not checked against hidden size",
        F,
        "    if hidden_size % num_heads:",
        "    if False:",
    ),
    # measurement input
    Mutant(
        "packed rows lose [SEP]",
        F,
        "rows.append([tok.cls_token_id, *ids[:body], tok.sep_token_id])",
        "rows.append([tok.cls_token_id, *ids[: body + 1]])",
    ),
]
