"""utils.nlp: data, metrics (vs scikit-learn and hand cases), INT8, head pruning, student."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils import nlp
from utils.minilm import load_minilm


@pytest.fixture(scope="module")
def model():
    return load_minilm()


@pytest.fixture(scope="module")
def short_batch():
    return nlp.packed_batch(4, 24)


# ------------------------------------------------------------------ data
def test_data_sets_have_the_promised_shape():
    train, labels = nlp.load_classification("train")
    test, test_labels = nlp.load_classification("test")
    assert len(nlp.intent_names()) >= 6
    assert len(train) + len(test) >= 300 and set(labels) == set(test_labels)
    assert not set(train) & set(test), "a sentence is in both splits"
    ner = nlp.load_ner("train") + nlp.load_ner("test")
    assert len(ner) >= 300
    tags = {t for _, ts in ner for t in ts}
    assert tags == set(nlp.NER_LABELS)
    queries, passages = nlp.load_retrieval()
    assert len(queries) == len(passages) >= 100 and len(set(queries)) == len(queries)
    with pytest.raises(ValueError, match="split"):
        nlp.load_classification("validation")


def test_packed_batch_is_real_text_of_exact_length():
    batch = nlp.packed_batch(3, 20)
    assert batch["input_ids"].shape == (3, 20)
    assert batch["attention_mask"].all()
    assert (batch["input_ids"][:, 0] == 101).all() and (batch["input_ids"][:, -1] == 102).all()
    assert not torch.equal(batch["input_ids"][0], batch["input_ids"][1])
    with pytest.raises(ValueError, match="tokens"):
        nlp.packed_batch(2, 1000)


# ------------------------------------------------------------------ metrics
def test_accuracy_and_macro_f1_match_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(0)
    for _ in range(5):
        ref = rng.integers(0, 5, 60)
        pred = np.where(rng.random(60) < 0.6, ref, rng.integers(0, 6, 60))
        assert nlp.accuracy(pred, ref) == pytest.approx(accuracy_score(ref, pred))
        assert nlp.macro_f1(pred, ref) == pytest.approx(f1_score(ref, pred, average="macro"))
    assert nlp.macro_f1([0, 0, 1], [0, 1, 1]) == pytest.approx((2 / 3 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="same length"):
        nlp.accuracy([1, 2], [1])
    with pytest.raises(ValueError, match="empty"):
        nlp.macro_f1([], [])


def test_bio_spans_hand_cases():
    assert nlp.bio_spans(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}
    # an I- that does not continue a span of its type starts one (CoNLL rule)
    assert nlp.bio_spans(["O", "I-ORG", "I-ORG"]) == {("ORG", 1, 3)}
    assert nlp.bio_spans(["B-PER", "I-LOC"]) == {("PER", 0, 1), ("LOC", 1, 2)}
    assert nlp.bio_spans(["B-DATE", "B-DATE"]) == {("DATE", 0, 1), ("DATE", 1, 2)}
    assert nlp.bio_spans(["O", "O"]) == set()
    with pytest.raises(ValueError, match="tags\\[1\\]"):
        nlp.bio_spans(["O", "PER"])


def test_entity_f1_hand_cases():
    ref = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    assert nlp.entity_f1(ref, ref) == 1.0
    # wrong boundary: PER span 0-1 instead of 0-2 counts as a miss and a false positive
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "O"]]
    assert nlp.entity_f1(pred, ref) == pytest.approx(2 * 2 / (3 + 3))
    # wrong type
    pred = [["B-LOC", "I-LOC", "O", "B-LOC"], ["O", "O"]]
    assert nlp.entity_f1(pred, ref) == pytest.approx(2 * 1 / (2 + 3))
    with pytest.raises(ValueError, match="predictions\\[0\\]"):
        nlp.entity_f1([["O"]], [["O", "O"]])


def test_retrieval_metrics_hand_cases():
    passages = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    queries = torch.tensor([[1.0, 0.1], [1.0, 0.0], [0.7, 0.7]])
    assert nlp.retrieve(queries, passages, 2).tolist() == [[0, 2], [0, 2], [2, 0]]
    assert nlp.recall_at_k(queries, passages, 1) == pytest.approx(2 / 3)
    assert nlp.recall_at_k(queries, passages, 2) == pytest.approx(2 / 3)
    assert nlp.recall_at_k(queries, passages, 3) == 1.0
    # scale does not change cosine retrieval
    assert nlp.recall_at_k(5 * queries, passages, 1) == pytest.approx(2 / 3)
    other = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.7, 0.7]])
    assert nlp.top1_agreement(other, passages, queries, passages) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="k"):
        nlp.retrieve(queries, passages, 4)


def test_cosine_to_reference():
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    emb = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    mean, worst = nlp.cosine_to_reference(emb, ref)
    assert worst == pytest.approx(2**-0.5) and mean == pytest.approx((1 + 2**-0.5) / 2)
    with pytest.raises(ValueError, match="same shape"):
        nlp.cosine_to_reference(emb[:1], ref)


# ------------------------------------------------------------------ encoder helpers
def test_embed_matches_minilm_encode(model):
    from utils.minilm import encode

    texts = nlp.load_retrieval()[0][:5]
    assert torch.allclose(nlp.embed(model, texts), encode(model, texts), atol=1e-6)


def test_token_states_take_the_first_word_piece(model):
    words = [["Grace", "Okafor", "visited", "Kuala", "Lumpur"]]
    (states,) = nlp.token_states(model, words)
    from utils.minilm import load_tokenizer

    batch = load_tokenizer()(words, is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        full = model(**batch).last_hidden_state[0]
    ids = batch.word_ids(0)
    first = [ids.index(w) for w in range(5)]
    assert states.shape == (5, 384)
    assert torch.allclose(states, full[first], atol=1e-5)
    assert len(ids) > 7, ids  # some word is split into pieces, so alignment matters


# ------------------------------------------------------------------ INT8
def test_int8_per_channel_matches_definition_and_keeps_layers_float(model):
    names = nlp.linear_names(model)
    keep = names[:2]
    q = nlp.quantize_dynamic_int8(model, keep_float=keep)
    mods = dict(q.named_modules())
    assert type(mods[keep[0]]) is torch.nn.Linear
    qlin = mods[names[3]]
    assert isinstance(qlin, torch.ao.nn.quantized.dynamic.Linear)
    w = qlin.weight()
    assert w.qscheme() in (torch.per_channel_symmetric, torch.per_channel_affine)
    assert (w.q_per_channel_zero_points() == 0).all()  # symmetric
    ref_w = dict(model.named_modules())[names[3]].weight.detach()
    scales = w.q_per_channel_scales().float()
    assert torch.allclose(scales, ref_w.abs().amax(1) / 127.5, rtol=1e-5)  # fbgemm: max / 127.5
    assert (w.dequantize() - ref_w).abs().amax(1).le(scales / 2 + 1e-7).all()
    with pytest.raises(ValueError, match="keep_float"):
        nlp.quantize_dynamic_int8(model, keep_float=["nope"])


def test_int8_is_close_and_sensitivity_finds_a_layer(model, short_batch):
    ref = nlp.embed_batch(model, short_batch)
    q = nlp.quantize_dynamic_int8(model)
    mean, worst = nlp.cosine_to_reference(nlp.embed_batch(q, short_batch), ref)
    assert mean > 0.95 and worst <= mean
    only_one = nlp.quantize_dynamic_int8(model, only=[nlp.linear_names(model)[0]])
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert sum(isinstance(m, dynamic) for m in only_one.modules()) == 1
    fake = {"a": 0.1, "b": 0.3, "c": 0.2}
    assert nlp.keep_float_from_scan(fake, keep=2) == ["b", "c"]
    with pytest.raises(ValueError, match="keep"):
        nlp.keep_float_from_scan(fake, keep=4)


def test_onnx_runtime_int8_matches_fp32(model, short_batch, tmp_cache):
    pytest.importorskip("onnxruntime")
    path = nlp.export_onnx(model, "test-minilm")
    ort = nlp.OrtEncoder(path, threads=1)
    ref = nlp.embed_batch(model, short_batch)
    mean, _ = nlp.cosine_to_reference(nlp.embed_batch(ort, short_batch), ref)
    assert mean > 0.99999
    names = nlp.linear_names(model)[:7]
    nodes = nlp.onnx_nodes_for(path, model, names)
    assert len(set(nodes)) == 7
    q = nlp.OrtEncoder(nlp.ort_int8(path, "test-minilm-int8"), threads=1)
    mean8, _ = nlp.cosine_to_reference(nlp.embed_batch(q, short_batch), ref)
    assert 0.95 < mean8 < 0.99999
    import onnx

    def integer_matmuls(p):
        return sum(n.op_type == "MatMulInteger" for n in onnx.load(str(p)).graph.node)

    kept = nlp.ort_int8(path, "test-minilm-int8", exclude_nodes=nodes)
    assert integer_matmuls(kept) == integer_matmuls(q.path) - 7


@pytest.fixture(scope="module")
def scan(model, short_batch):
    key = nlp.weights_key(model)
    sens = nlp.int8_sensitivity(model, short_batch)
    assert nlp.weights_key(model) == key, "the scan left a layer quantized"
    return sens


def test_sensitivity_scan_swaps_in_place_and_restores(model, short_batch, scan):
    sens = scan
    assert list(sens) == nlp.linear_names(model)
    assert not any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())
    ref = nlp.embed_batch(model, short_batch)
    for name in nlp.linear_names(model)[::13]:  # the definition: a copy with only that layer INT8
        q = nlp.quantize_dynamic_int8(model, only=[name])
        expected = 1.0 - nlp.cosine_to_reference(nlp.embed_batch(q, short_batch), ref)[0]
        assert sens[name] == pytest.approx(expected, abs=1e-6)
    assert max(sens.values()) > 10 * min(sens.values()), "no layer stands out"


def test_keep_float_walk_matches_quantizing_from_scratch(model, short_batch, scan):
    sens = scan
    order = sorted(sens, key=sens.get, reverse=True)
    ref = nlp.embed_batch(model, short_batch)
    # a target reached with the two most sensitive layers kept, not with one
    one, two = (
        nlp.cosine_to_reference(
            nlp.embed_batch(nlp.quantize_dynamic_int8(model, keep_float=order[:n]), short_batch),
            ref,
        )[0]
        for n in (1, 2)
    )
    assert two > one
    target = (one + two) / 2
    walked = nlp.keep_float_for_target(model, short_batch, sens, target=target)
    calls = []

    def from_scratch(keep):
        calls.append(list(keep))
        return nlp.quantize_dynamic_int8(model, keep_float=keep)

    generic = nlp.keep_float_for_target(
        model, short_batch, sens, target=target, quantize=from_scratch
    )
    assert walked == generic == order[:2]
    assert calls == [[], order[:1], order[:2]]
    assert nlp.keep_float_for_target(model, short_batch, sens, target=0.0) == []
    with pytest.raises(TypeError, match="quantize"):
        nlp.keep_float_for_target(model, short_batch, sens, quantize="ort")
    with pytest.raises(ValueError, match="sensitivity"):
        nlp.keep_float_for_target(model, short_batch, {"nope": 1.0})


@pytest.fixture(scope="module")
def onnx_export(model, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COURSE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield nlp.export_onnx(model, "test-minilm")


def test_fused_graph_matches_and_quantizes_attention(model, short_batch, onnx_export):
    import onnx

    def ops(path):
        return [n.op_type for n in onnx.load(str(path)).graph.node]

    fused = nlp.ort_fuse(onnx_export, "test-minilm-fused")
    assert ops(fused).count("Attention") == 6 and "Softmax" not in ops(fused)
    assert ops(fused).count("MatMul") == 18  # attention output and the two FFN layers
    ref = nlp.embed_batch(model, short_batch)
    plain = nlp.embed_batch(nlp.OrtEncoder(onnx_export, threads=1), short_batch)
    same = nlp.embed_batch(nlp.OrtEncoder(fused, threads=1), short_batch)
    assert (same - plain).abs().max() < 1e-4, "fusion changed the function"
    q = nlp.ort_int8(fused, "test-minilm-fused-int8")
    assert ops(q).count("QAttention") == 6 and ops(q).count("MatMulInteger") == 18
    mean8, _ = nlp.cosine_to_reference(
        nlp.embed_batch(nlp.OrtEncoder(q, threads=1), short_batch), ref
    )
    assert 0.95 < mean8 < 0.99999
    names = nlp.linear_names(model)
    qkv = [n for n in names if n.startswith("encoder.layer.0.attention.self.")]
    ffn = "encoder.layer.2.output.dense"
    nodes = nlp.onnx_nodes_for(fused, model, [*qkv, ffn])
    assert len(qkv) == 3 and len(nodes) == 2, "Q, K and V of a layer share one Attention node"
    kept = nlp.ort_int8(fused, "test-minilm-fused-int8", exclude_nodes=nodes)
    assert ops(kept).count("QAttention") == 5 and ops(kept).count("MatMulInteger") == 17
    with pytest.raises(ValueError, match="hidden_size"):
        nlp.ort_fuse(onnx_export, "bad", num_heads=5)
    with pytest.raises(ValueError, match="num_heads"):
        nlp.ort_fuse(onnx_export, "bad", num_heads=0)


# ------------------------------------------------------------------ heads and pruning
def test_prune_heads_removes_weights_and_equals_zeroed_heads(model, short_batch):
    drop = {0: [1, 5], 3: [0]}
    pruned = nlp.prune_heads(model, drop)
    n = sum(p.numel() for p in model.parameters())
    removed = 3 * (3 * 32 * 384 + 3 * 32 + 32 * 384)
    assert sum(p.numel() for p in pruned.parameters()) == n - removed
    assert pruned.encoder.layer[0].attention.self.query.out_features == 10 * 32

    # same as running the full model with those heads' context vectors set to zero
    hooks = []
    for layer, heads in drop.items():
        gate = torch.ones(384)
        for h in heads:
            gate[h * 32 : (h + 1) * 32] = 0
        dense = model.encoder.layer[layer].attention.output.dense
        hooks.append(dense.register_forward_pre_hook(lambda m, a, g=gate: (a[0] * g,)))
    try:
        expected = nlp.embed_batch(model, short_batch)
    finally:
        for h in hooks:
            h.remove()
    assert torch.allclose(nlp.embed_batch(pruned, short_batch), expected, atol=1e-5)
    with pytest.raises(ValueError, match="every head"):
        nlp.prune_heads(model, {0: list(range(12))})
    with pytest.raises(ValueError, match="heads\\[0\\]"):
        nlp.prune_heads(model, {0: [12]})


def test_head_importance_matches_finite_difference(model):
    texts = nlp.load_classification("train")[0][:8]
    imp = nlp.head_importance(model, texts, batch_size=8)
    assert imp.shape == (6, 12)
    assert torch.allclose(imp.norm(dim=1), torch.ones(6), atol=1e-5)
    assert (imp >= 0).all()
    # the raw gradient of one gate, by central differences on the same proxy loss
    from utils.minilm import mean_pool, tokenize

    clf = nlp.classification_head()
    batch = tokenize(texts)
    with torch.no_grad():
        target = clf(
            F.normalize(mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]), dim=1)
        ).argmax(1)

    def loss_at(g: float, layer: int, head: int) -> float:
        gate = torch.ones(384)
        gate[head * 32 : (head + 1) * 32] = g
        dense = model.encoder.layer[layer].attention.output.dense
        hook = dense.register_forward_pre_hook(lambda m, a: (a[0] * gate,))
        try:
            with torch.no_grad():
                states = model(**batch).last_hidden_state
            logits = clf(F.normalize(mean_pool(states, batch["attention_mask"]), dim=1))
            return float(F.cross_entropy(logits, target))
        finally:
            hook.remove()

    grads = torch.tensor([abs(loss_at(1.01, 2, h) - loss_at(0.99, 2, h)) / 0.02 for h in (0, 1, 2)])
    raw = grads / grads.norm()
    ours = imp[2, :3] / imp[2, :3].norm()
    assert torch.allclose(ours, raw, atol=0.05), (ours, raw)


def test_least_important_picks_lowest_and_keeps_a_head():
    imp = torch.tensor([[0.1, 0.9, 0.5], [0.2, 0.05, 0.3]])
    assert nlp.least_important(imp, 0.5) == {1: [1, 0], 0: [0]}
    imp = torch.tensor([[0.01, 0.02], [0.9, 0.8]])
    assert nlp.least_important(imp, 0.75) == {0: [0], 1: [1]}
    with pytest.raises(ValueError, match="fraction"):
        nlp.least_important(imp, 1.0)


# ------------------------------------------------------------------ student
def test_make_student_copies_the_chosen_layers(model):
    student = nlp.make_student(model, (1, 3, 5))
    assert len(student.encoder.layer) == 3
    for s, t in zip(student.encoder.layer, (1, 3, 5), strict=True):
        a = s.intermediate.dense.weight
        b = model.encoder.layer[t].intermediate.dense.weight
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert len(model.encoder.layer) == 6
    with pytest.raises(ValueError, match="layers"):
        nlp.make_student(model, (0, 6))


def test_distill_loss_is_zero_on_the_teacher_and_ignores_padding():
    h = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert float(nlp.distill_loss(h, h, mask)) == pytest.approx(0.0, abs=1e-6)
    other = h.clone()
    other[0, 3:] += 10  # padding positions only
    assert float(nlp.distill_loss(other, h, mask)) == pytest.approx(0.0, abs=1e-6)
    other[0, 0] += 1.0
    expected_mse = 8 / (8 * 8)  # one token, eight features each off by 1, over 8 real tokens
    assert float(nlp.distill_loss(other, h, mask)) > expected_mse - 1e-6


def test_bad_inputs_get_clear_errors(model):
    with pytest.raises(ValueError, match="empty"):
        nlp.embed(model, [])
    with pytest.raises(TypeError, match="sentences\\[1\\]"):
        nlp.embed(model, ["fine", 3])
    with pytest.raises(ValueError, match="empty string"):
        nlp.embed(model, ["fine", "  "])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nlp.embed(model, ["word " * 300])
    assert any("truncated" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="task"):
        nlp.evaluate_task(model, "translation")


def test_weights_key_tracks_the_weights(model):
    key = nlp.weights_key(model)
    assert key == nlp.weights_key(model) and len(key) == 12
    student = nlp.make_student(model, (0, 1))
    assert nlp.weights_key(student) != key
    with torch.no_grad():
        student.encoder.layer[0].output.dense.bias[0] += 1e-3
    assert nlp.weights_key(student) != nlp.weights_key(nlp.make_student(model, (0, 1)))
