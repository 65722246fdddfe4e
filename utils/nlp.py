"""Chapter 7: accelerating a pretrained transformer (all-MiniLM-L6-v2) on NLP tasks.

Lesson 07 and lab 07 teach it. The module has four parts:

* **Data and task heads.** The course's English sets (``data/nlp``, see ``data/README.md``),
  a linear intent classifier on frozen sentence embeddings, a linear NER tagger on frozen
  token states with word-piece alignment (first sub-token of each word), and cosine top-k
  retrieval. The heads are trained once on the FP32 encoder and cached; every faster
  variant of the encoder is judged with the same heads, as it would be deployed.
* **Metrics**, implemented once: accuracy and macro-F1, entity span F1 (exact BIO spans,
  CoNLL style), recall@k, top-1 agreement, mean and worst cosine to FP32.
* **Acceleration**: dynamic INT8 with per-channel weights (PyTorch ``torch.ao`` and ONNX
  Runtime), a per-layer sensitivity scan that decides which Linear layers stay FP32;
  attention-head importance (Michel et al. 2019) and head pruning that slices the weights;
  a 3-layer student initialised from the teacher's layers and distilled on its token
  states and embeddings (Sanh et al. 2019; Jiao et al. 2020).
* **Measurement inputs**: real text packed to a fixed number of tokens, so that latency
  and quality at batch 32 × 128 tokens are measured on the same inputs.
"""

from __future__ import annotations

import copy
import csv
import warnings
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.cache import cached_state
from utils.config import cache_dir, seed_everything
from utils.minilm import load_minilm, load_tokenizer, mean_pool, tokenize
from utils.validation import check_choice, check_float, check_int, check_module, check_type

DATA = Path(__file__).resolve().parent.parent / "data" / "nlp"
NER_TYPES = ("PER", "LOC", "ORG", "DATE")
NER_LABELS = ("O",) + tuple(f"{p}-{t}" for t in NER_TYPES for p in ("B", "I"))
TASKS = ("classification", "ner", "retrieval")
HEADS_VERSION = 1  # bump when a head's training recipe changes
STUDENT_VERSION = 1  # bump when the student's training recipe changes


# ============================================================== data
def _rows(name: str) -> list[dict[str, str]]:
    with open(DATA / name, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


@cache
def data_fingerprint() -> str:
    """SHA-256 (12 hex digits) of the three data files: part of every cache key trained on them."""
    import hashlib

    digest = hashlib.sha256()
    for name in ("classification.tsv", "ner.tsv", "retrieval.tsv"):
        digest.update((DATA / name).read_bytes())
    return digest.hexdigest()[:12]


@cache
def intent_names() -> tuple[str, ...]:
    """The intents of ``classification.tsv`` in order of first appearance (label ``i`` is ``[i]``)."""
    return tuple(dict.fromkeys(r["label"] for r in _rows("classification.tsv")))


def load_classification(split: str) -> tuple[list[str], list[int]]:
    """``(texts, labels)`` of the intent set's ``split`` (``"train"`` or ``"test"``)."""
    check_choice("split", split, ("train", "test"))
    names = intent_names()
    rows = [r for r in _rows("classification.tsv") if r["split"] == split]
    return [r["text"] for r in rows], [names.index(r["label"]) for r in rows]


def load_ner(split: str) -> list[tuple[list[str], list[str]]]:
    """``[(words, BIO tags), …]`` of the NER set's ``split`` (``"train"`` or ``"test"``)."""
    check_choice("split", split, ("train", "test"))
    out = []
    for r in _rows("ner.tsv"):
        if r["split"] == split:
            words, tags = r["tokens"].split(), r["tags"].split()
            assert len(words) == len(tags), (
                f"data/nlp/ner.tsv: tag count differs in {r['tokens']!r}"
            )
            out.append((words, tags))
    return out


def load_retrieval() -> tuple[list[str], list[str]]:
    """``(queries, passages)``: passage ``i`` answers query ``i``; the others are distractors."""
    rows = _rows("retrieval.tsv")
    return [r["query"] for r in rows], [r["passage"] for r in rows]


def corpus() -> list[str]:
    """Every training sentence of the three sets (the student's transfer set; no test text)."""
    texts, _ = load_classification("train")
    queries, passages = load_retrieval()
    half = len(queries) // 2
    return texts + [" ".join(w) for w, _ in load_ner("train")] + queries[:half] + passages[:half]


def packed_batch(batch_size: int = 32, tokens: int = 128) -> dict[str, Tensor]:
    """A batch of real text, ``batch_size`` rows of exactly ``tokens`` tokens (no padding).

    Row ``i`` concatenates passages starting at passage ``i`` until it is long enough, then
    is truncated to ``tokens`` ([CLS] … [SEP]); used for latency and quality at a fixed shape.
    """
    check_int("batch_size", batch_size, minimum=1)
    check_int("tokens", tokens, minimum=4, maximum=512)
    _, passages = load_retrieval()
    tok = load_tokenizer()
    body = tokens - 2
    rows = []
    for i in range(batch_size):
        ids: list[int] = []
        j = i
        while len(ids) < body:
            ids += tok(passages[j % len(passages)], add_special_tokens=False)["input_ids"]
            j += 7
        rows.append([tok.cls_token_id, *ids[:body], tok.sep_token_id])
    input_ids = torch.tensor(rows)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "token_type_ids": torch.zeros_like(input_ids),
    }


# ============================================================== metrics
def _check_pair(predictions: Sequence, references: Sequence) -> None:
    check_type("predictions", predictions, (list, tuple, np.ndarray, Tensor))
    check_type("references", references, (list, tuple, np.ndarray, Tensor))
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must have the same length, got {len(predictions)} "
            f"and {len(references)}"
        )
    if len(references) == 0:
        raise ValueError("references must not be empty")


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Fraction of exact matches: ``mean(pred_i == ref_i)``."""
    _check_pair(predictions, references)
    return float(np.mean(np.asarray(predictions) == np.asarray(references)))


def macro_f1(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Unweighted mean over the classes present in either list of ``F1_c = 2TP/(2TP+FP+FN)``."""
    _check_pair(predictions, references)
    p, r = np.asarray(predictions), np.asarray(references)
    scores = []
    for c in np.union1d(p, r):
        tp = np.sum((p == c) & (r == c))
        fp = np.sum((p == c) & (r != c))
        fn = np.sum((p != c) & (r == c))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def bio_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Entity spans ``(type, start, end_exclusive)`` of one BIO sequence (CoNLL rules).

    A span starts at ``B-X`` or at an ``I-X`` that does not continue an ``X`` span, and
    ends before the first tag that is not ``I-X``.
    """
    spans, kind, start = set(), None, 0
    for i, tag in enumerate([*tags, "O"]):
        if tag != "O" and tag[:2] not in ("B-", "I-"):
            raise ValueError(f"tags[{i}] must be 'O', 'B-<type>' or 'I-<type>', got {tag!r}")
        continues = tag.startswith("I-") and tag[2:] == kind
        if kind is not None and not continues:
            spans.add((kind, start, i))
            kind = None
        if tag != "O" and not continues:
            kind, start = tag[2:], i
    return spans


def entity_f1(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> float:
    """Micro span F1 over sentences: a predicted entity counts only if type and boundaries match.

    ``F1 = 2·|P∩R| / (|P| + |R|)`` over all spans (Tjong Kim Sang & De Meulder 2003, CoNLL).
    """
    _check_pair(predictions, references)
    hit = n_pred = n_ref = 0
    for i, (p, r) in enumerate(zip(predictions, references, strict=True)):
        if len(p) != len(r):
            raise ValueError(f"predictions[{i}] has {len(p)} tags but references[{i}] has {len(r)}")
        ps, rs = bio_spans(p), bio_spans(r)
        hit, n_pred, n_ref = hit + len(ps & rs), n_pred + len(ps), n_ref + len(rs)
    return 2 * hit / (n_pred + n_ref) if n_pred + n_ref else 1.0


def _check_embeddings(name: str, x: Tensor) -> None:
    check_type(name, x, Tensor)
    if x.dim() != 2 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty (n, dim) tensor, got {tuple(x.shape)}")


def retrieve(queries: Tensor, passages: Tensor, k: int = 1) -> Tensor:
    """Indices (n_queries, k) of the ``k`` passages of highest cosine similarity, best first."""
    _check_embeddings("queries", queries)
    _check_embeddings("passages", passages)
    check_int("k", k, minimum=1, maximum=len(passages))
    sims = F.normalize(queries.float(), dim=1) @ F.normalize(passages.float(), dim=1).T
    return sims.topk(k, dim=1).indices


def recall_at_k(queries: Tensor, passages: Tensor, k: int = 1) -> float:
    """Fraction of queries whose own passage (``passages[i]`` for ``queries[i]``) is in the top ``k``."""
    top = retrieve(queries, passages, k)
    gold = torch.arange(len(queries)).unsqueeze(1)
    return float((top == gold).any(1).float().mean())


def top1_agreement(
    queries: Tensor, passages: Tensor, ref_queries: Tensor, ref_passages: Tensor
) -> float:
    """Fraction of queries for which a variant retrieves the same top-1 passage as the reference."""
    return float(
        (retrieve(queries, passages)[:, 0] == retrieve(ref_queries, ref_passages)[:, 0])
        .float()
        .mean()
    )


def cosine_to_reference(embeddings: Tensor, reference: Tensor) -> tuple[float, float]:
    """``(mean, worst)`` row-wise cosine similarity of a variant's embeddings to FP32's."""
    _check_embeddings("embeddings", embeddings)
    _check_embeddings("reference", reference)
    if embeddings.shape != reference.shape:
        raise ValueError(
            f"embeddings and reference must have the same shape, got {tuple(embeddings.shape)} "
            f"and {tuple(reference.shape)}"
        )
    cos = F.cosine_similarity(embeddings.float(), reference.float(), dim=1)
    return float(cos.mean()), float(cos.min())


# ============================================================== encoder outputs
def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


Encoder = Callable[..., object]


def _states(model: Encoder, batch: dict[str, Tensor]) -> Tensor:
    out = model(**batch)
    return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]).float()


@torch.inference_mode()
def token_states(
    model: Encoder, words: Sequence[Sequence[str]], *, batch_size: int = 32
) -> list[Tensor]:
    """Per sentence, the last-layer state of the first word-piece of each word: (words, hidden).

    Word-piece alignment: a word the tokenizer splits into several pieces is represented
    by its first piece, as in BERT's NER recipe (Devlin et al. 2019, §5.3).
    """
    tok = load_tokenizer()
    device = _device(model) if isinstance(model, nn.Module) else torch.device("cpu")
    out = []
    for s in range(0, len(words), batch_size):
        chunk = [list(w) for w in words[s : s + batch_size]]
        batch = tok(chunk, is_split_into_words=True, padding=True, return_tensors="pt")
        states = _states(model, {k: v.to(device) for k, v in batch.items()}).cpu()
        for i in range(len(chunk)):
            ids = batch.word_ids(i)
            first = [t for t, w in enumerate(ids) if w is not None and (t == 0 or ids[t - 1] != w)]
            if len(first) != len(chunk[i]):
                raise ValueError(f"words[{s + i}] lost words in tokenization (too long?)")
            out.append(states[i, first])
    return out


@torch.inference_mode()
def embed(model: Encoder, sentences: Sequence[str], *, batch_size: int = 64) -> Tensor:
    """L2-normalised mean-pooled sentence embeddings (n, hidden) on the CPU, for any encoder variant.

    ``model`` is called as ``model(input_ids=…, attention_mask=…, token_type_ids=…)`` and
    returns ``last_hidden_state`` (a module) or the states first (an ONNX Runtime wrapper).
    """
    device = _device(model) if isinstance(model, nn.Module) else torch.device("cpu")
    out = []
    for s in range(0, len(sentences), batch_size):
        batch = tokenize(list(sentences[s : s + batch_size]), device=device)
        pooled = mean_pool(_states(model, batch), batch["attention_mask"])
        out.append(F.normalize(pooled, dim=1).cpu())
    if not out:
        raise ValueError("sentences must not be empty")
    return torch.cat(out)


@torch.inference_mode()
def embed_batch(model: Encoder, batch: dict[str, Tensor]) -> Tensor:
    """Normalised mean-pooled embeddings of one tokenized ``batch`` (e.g. :func:`packed_batch`)."""
    device = _device(model) if isinstance(model, nn.Module) else torch.device("cpu")
    batch = {k: v.to(device) for k, v in batch.items()}
    return F.normalize(mean_pool(_states(model, batch), batch["attention_mask"]), dim=1).cpu()


# ============================================================== task heads
def _fit_linear(x: Tensor, y: Tensor, classes: int, *, steps: int = 300) -> nn.Linear:
    """Multinomial logistic regression (cross-entropy + small L2) by full-batch Adam."""
    seed_everything(0)
    with torch.inference_mode(False), torch.enable_grad():
        x, y = x.clone(), y.clone()  # plain tensors even if made under inference_mode
        head = nn.Linear(x.shape[1], classes)
        opt = torch.optim.Adam(head.parameters(), lr=0.05, weight_decay=1e-4)
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(head(x), y).backward()
            opt.step()
    return head.eval()


def weights_key(model: nn.Module) -> str:
    """SHA-256 (12 hex digits) of a model's state dict: a cache key for what is trained on its features."""
    import hashlib

    check_module("model", model)
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        if isinstance(value, Tensor):
            digest.update(key.encode() + value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def _encoder_config(encoder: nn.Module | None) -> tuple[Encoder, str]:
    if encoder is None:
        return load_minilm(), "all-MiniLM-L6-v2 FP32"
    check_module("encoder", encoder)
    return encoder, weights_key(encoder)


def classification_head(encoder: nn.Module | None = None) -> nn.Linear:
    """The intent classifier: a linear layer on ``encoder``'s sentence embeddings (cached).

    ``encoder`` defaults to the FP32 MiniLM; every compressed variant of it is judged
    with that head. A distilled student gets a head fitted on its own embeddings.
    """
    model, key = _encoder_config(encoder)

    def train(head: nn.Linear) -> None:
        texts, labels = load_classification("train")
        fitted = _fit_linear(embed(model, texts), torch.tensor(labels), len(intent_names()))
        head.load_state_dict(fitted.state_dict())

    config = {
        "task": "classification",
        "v": HEADS_VERSION,
        "classes": intent_names(),
        "data": data_fingerprint(),
        "encoder": key,
    }
    head, _, _ = cached_state(
        "minilm-intent-head", config, lambda: nn.Linear(384, len(intent_names())), train
    )
    return head.eval()


def ner_head(encoder: nn.Module | None = None) -> nn.Linear:
    """The NER tagger: a linear layer on ``encoder``'s first-word-piece token states (cached)."""
    model, key = _encoder_config(encoder)

    def train(head: nn.Linear) -> None:
        data = load_ner("train")
        states = torch.cat(token_states(model, [w for w, _ in data]))
        labels = torch.tensor([NER_LABELS.index(t) for _, tags in data for t in tags])
        head.load_state_dict(_fit_linear(states, labels, len(NER_LABELS)).state_dict())

    config = {
        "task": "ner",
        "v": HEADS_VERSION,
        "labels": NER_LABELS,
        "data": data_fingerprint(),
        "encoder": key,
    }
    head, _, _ = cached_state(
        "minilm-ner-head", config, lambda: nn.Linear(384, len(NER_LABELS)), train
    )
    return head.eval()


@torch.no_grad()
def evaluate_task(
    model: Encoder, task: str, *, n_test: int | None = None, heads_from: nn.Module | None = None
) -> dict[str, object]:
    """Quality of one encoder variant on one task, with cached linear heads.

    The heads are fitted on the features of ``heads_from`` (default: the FP32 MiniLM, so a
    quantized or pruned copy is judged as it would be deployed, with the FP32 heads).

    ``classification``: ``accuracy``, ``macro_f1`` (%); ``ner``: ``entity_f1`` (%);
    ``retrieval``: ``recall@1``, ``recall@5`` (%). The embeddings used are returned under
    ``"_emb"`` for agreement and cosine with FP32. ``n_test`` keeps the first ``n_test``
    test items of classification and NER (the lesson's fast path).
    """
    check_choice("task", task, TASKS)
    if n_test is not None:
        check_int("n_test", n_test, minimum=1)
    if task == "classification":
        texts, labels = load_classification("test")
        texts, labels = texts[:n_test], labels[:n_test]
        emb = embed(model, texts)
        pred = classification_head(heads_from)(emb).argmax(1).tolist()
        return {
            "accuracy": 100 * accuracy(pred, labels),
            "macro_f1": 100 * macro_f1(pred, labels),
            "_emb": {"intents": emb},
        }
    if task == "ner":
        ner = load_ner("test")[:n_test]
        head = ner_head(heads_from)
        tags = [
            [NER_LABELS[i] for i in head(s).argmax(1).tolist()]
            for s in token_states(model, [w for w, _ in ner])
        ]
        return {"entity_f1": 100 * entity_f1(tags, [t for _, t in ner]), "_emb": {}}
    queries, passages = load_retrieval()
    e_q, e_p = embed(model, queries), embed(model, passages)
    return {
        "recall@1": 100 * recall_at_k(e_q, e_p, 1),
        "recall@5": 100 * recall_at_k(e_q, e_p, 5),
        "_emb": {"queries": e_q, "passages": e_p},
    }


def evaluate_tasks(
    model: Encoder, *, n_test: int | None = None, heads_from: nn.Module | None = None
) -> dict[str, object]:
    """:func:`evaluate_task` on every task of :data:`TASKS`, merged into one dict."""
    out: dict[str, object] = {"_emb": {}}
    for task in TASKS:
        result = evaluate_task(model, task, n_test=n_test, heads_from=heads_from)
        out["_emb"].update(result.pop("_emb"))
        out.update(result)
    return out


# ============================================================== dynamic INT8 (PyTorch)
def linear_names(model: nn.Module) -> list[str]:
    """Names of the encoder's Linear layers (the ones dynamic INT8 quantizes), in order."""
    check_module("model", model)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def quantize_dynamic_int8(
    model: nn.Module, *, keep_float: Sequence[str] = (), only: Sequence[str] | None = None
) -> nn.Module:
    """A copy of ``model`` with dynamic INT8 Linear layers (``torch.ao`` ``quantize_dynamic``).

    Weights: per output channel, symmetric, ``s_c = max|W_c| / 127`` (``per_channel_dynamic_qconfig``).
    Activations: per tensor, asymmetric, scale and zero point computed from each batch at run
    time (Jacob et al. 2018). Layers named in ``keep_float`` stay FP32; ``only`` quantizes just
    those layers (the sensitivity scan). Runs on the CPU.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    check_module("model", model)
    names = linear_names(model)
    for arg, value in (("keep_float", keep_float), ("only", only or ())):
        unknown = [n for n in value if n not in names]
        if unknown:
            raise ValueError(f"{arg} must name Linear layers of the model, unknown: {unknown[:3]}")
    chosen = [n for n in (only if only is not None else names) if n not in set(keep_float)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        return quantize_dynamic(
            copy.deepcopy(model).cpu().eval(),
            {n: per_channel_dynamic_qconfig for n in chosen},
            dtype=torch.qint8,
        )


def _swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at submodule ``name`` of ``model``; return the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def _dynamic_int8_linear(layer: nn.Linear) -> nn.Module:
    """One Linear as ``quantize_dynamic`` makes it (per-channel weights), without copying the model."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    float_layer = copy.deepcopy(layer).cpu()
    float_layer.qconfig = per_channel_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DynamicLinear.from_float(float_layer)


@torch.inference_mode()
def int8_sensitivity(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, float]:
    """Per Linear layer, ``1 − mean cosine`` to FP32 when only that layer is INT8 (on ``batch``).

    Each layer is swapped for its dynamic INT8 version in place and swapped back (the
    model is unchanged afterwards). The layers whose error is largest are the ones to keep
    in float.
    """
    check_module("model", model)
    base = model if _device(model).type == "cpu" else copy.deepcopy(model).cpu()
    ref = embed_batch(base, batch)
    out = {}
    for name in linear_names(base):
        layer = _swap(base, name, _dynamic_int8_linear(base.get_submodule(name)))
        try:
            out[name] = 1.0 - cosine_to_reference(embed_batch(base, batch), ref)[0]
        finally:
            _swap(base, name, layer)
    return out


def keep_float_for_target(
    model: nn.Module,
    batch: dict[str, Tensor],
    sensitivity: dict[str, float],
    *,
    target: float = 0.99,
    quantize: Callable[[list[str]], Encoder] | None = None,
) -> list[str]:
    """The fewest most-sensitive layers to keep FP32 so that INT8's mean cosine on ``batch`` ≥ ``target``.

    Walks down the sensitivity ranking of :func:`int8_sensitivity`, keeping one more layer
    in float each step (at most all of them). ``quantize(keep)`` builds the INT8 encoder
    with the layers ``keep`` in float; the default is PyTorch's
    ``quantize_dynamic_int8(model, keep_float=keep)``, walked on one quantized copy
    that gets one float layer back per step (dynamic INT8 quantizes each layer on its
    own, so it is the same model). Another backend passes its own, e.g. ONNX Runtime.
    """
    check_module("model", model)
    check_float("target", target, 0.0, 1.0)
    if quantize is not None and not callable(quantize):
        raise TypeError(f"quantize must be a callable of the kept layer names, got {quantize!r}")
    ref = embed_batch(model, batch)
    order = sorted(sensitivity, key=sensitivity.get, reverse=True)
    unknown = [n for n in order if n not in linear_names(model)]
    if unknown:
        raise ValueError(
            f"sensitivity must name Linear layers of the model, unknown: {unknown[:3]}"
        )
    q = quantize_dynamic_int8(model) if quantize is None else None
    for keep in range(len(order) + 1):
        if quantize is None:
            if keep:  # the next most sensitive layer back to float
                _swap(q, order[keep - 1], copy.deepcopy(model.get_submodule(order[keep - 1])).cpu())
            encoder = q
        else:
            encoder = quantize(order[:keep])
        if cosine_to_reference(embed_batch(encoder, batch), ref)[0] >= target:
            return order[:keep]
    return order


def keep_float_from_scan(sensitivity: dict[str, float], *, keep: int = 2) -> list[str]:
    """The ``keep`` most sensitive layer names of :func:`int8_sensitivity` (they stay FP32)."""
    check_type("sensitivity", sensitivity, dict)
    check_int("keep", keep, minimum=0, maximum=len(sensitivity))
    return sorted(sensitivity, key=sensitivity.get, reverse=True)[:keep]


# ============================================================== ONNX Runtime
class OrtEncoder:
    """An ONNX Runtime session called like the encoder: ``(input_ids, attention_mask, …) → (states,)``."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        from utils.benchmark import default_threads

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        self.path = path
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids=None, **_
    ) -> tuple:
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        feed["token_type_ids"] = (
            torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        )
        arrays = {k: feed[k].cpu().numpy().astype(np.int64) for k in self.inputs}
        return (torch.from_numpy(self.session.run(None, arrays)[0]),)


class _StatesOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state


def export_onnx(model: nn.Module, name: str) -> Path:
    """Export an FP32 encoder to ``<cache>/<name>-<hash of weights>.onnx`` (dynamic batch and length), once."""
    check_type("name", name, str)
    path = cache_dir() / f"{name}-{weights_key(model)}.onnx"  # a new file for new weights
    if not path.exists():
        example = packed_batch(2, 16)
        tmp = path.with_suffix(".tmp.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _StatesOnly(copy.deepcopy(model).cpu().eval()),
                (example["input_ids"], example["attention_mask"], example["token_type_ids"]),
                str(tmp),
                input_names=["input_ids", "attention_mask", "token_type_ids"],
                output_names=["last_hidden_state"],
                dynamic_axes={
                    k: {0: "batch", 1: "tokens"}
                    for k in ("input_ids", "attention_mask", "token_type_ids")
                },
                opset_version=17,
                dynamo=False,
            )
        tmp.replace(path)
    return path


def _holds_weight(init: np.ndarray, w_t: np.ndarray) -> bool:
    """Whether initializer ``init`` is ``w_t`` or holds it as a column block (a fused QKV weight)."""
    rows, cols = w_t.shape
    if init.shape[0] != rows or init.shape[1] % cols:
        return False
    return any(np.array_equal(init[:, c : c + cols], w_t) for c in range(0, init.shape[1], cols))


def onnx_nodes_for(path: Path, model: nn.Module, names: Sequence[str]) -> list[str]:
    """The node of the exported encoder at ``path`` that computes each named Linear layer.

    Matched by value, so it does not depend on the exporter's names: a ``MatMul`` whose
    weight initializer equals the layer's ``W^T``, or in a fused graph (:func:`ort_fuse`)
    the ``Attention`` node whose packed ``[W_q^T | W_k^T | W_v^T]`` holds it. Q, K and V of
    one layer share that node, so it is listed once. Used to keep sensitive layers float.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer if len(i.dims) == 2}
    modules = dict(model.named_modules())
    out: list[str] = []
    for name in names:
        if name not in modules or not isinstance(modules[name], nn.Linear):
            raise ValueError(f"names must be Linear layers of the model, got {name!r}")
        w_t = modules[name].weight.detach().cpu().numpy().T
        inits = {k for k, v in weights.items() if _holds_weight(v, w_t)}
        nodes = [
            n.name
            for n in graph.node
            if n.op_type in ("MatMul", "Attention") and set(n.input[:2]) & inits
        ]
        if len(nodes) != 1:
            raise ValueError(
                f"found {len(nodes)} MatMul/Attention nodes for {name!r} in {path.name}"
            )
        if nodes[0] not in out:
            out.append(nodes[0])
    return out


def ort_fuse(fp32_path: Path, name: str, *, num_heads: int = 12, hidden_size: int = 384) -> Path:
    """ONNX Runtime's transformer graph optimizer on an exported BERT-style encoder, once.

    ``onnxruntime.transformers.optimizer.optimize_model(model_type="bert")`` fuses each
    layer's Q/K/V projections, scaled dot product, softmax and context into one
    ``Attention`` node, ``Add + LayerNorm`` into ``SkipLayerNormalization``, the FFN's
    bias + GELU into ``BiasGelu`` and the embeddings into ``EmbedLayerNormalization``:
    the same function in fewer, larger kernels (and a fused QKV weight that
    :func:`ort_int8` can quantize as ``QAttention``).
    """
    import hashlib

    from onnxruntime.transformers import optimizer

    check_type("name", name, str)
    check_int("num_heads", num_heads, minimum=1)
    check_int("hidden_size", hidden_size, minimum=1)
    if hidden_size % num_heads:
        raise ValueError(
            f"hidden_size must be a multiple of num_heads, got {hidden_size} and {num_heads}"
        )
    key = hashlib.sha256(f"{fp32_path.name}|{num_heads}|{hidden_size}".encode())
    path = cache_dir() / f"{name}-{key.hexdigest()[:12]}.onnx"
    if not path.exists():
        tmp = path.with_suffix(".tmp.onnx")
        fused = optimizer.optimize_model(
            str(fp32_path),
            model_type="bert",
            num_heads=num_heads,
            hidden_size=hidden_size,
            opt_level=0,  # only the transformer fusions; the session applies its own at load
        )
        if not fused.get_fused_operator_statistics().get("Attention"):
            raise ValueError(
                f"no attention was fused in {fp32_path.name}: is it a BERT-style encoder "
                f"with num_heads={num_heads}, hidden_size={hidden_size}?"
            )
        fused.save_model_to_file(str(tmp))
        tmp.replace(path)
    return path


def ort_int8(fp32_path: Path, name: str, *, exclude_nodes: Sequence[str] = ()) -> Path:
    """ONNX Runtime dynamic INT8 (``quantize_dynamic``, per-channel weights), once per input and exclusions.

    Quantizes every ``MatMul`` (→ ``MatMulInteger``) and, in a graph fused by
    :func:`ort_fuse`, every ``Attention`` (→ ``QAttention``, its packed QKV weight per
    column). ``exclude_nodes`` are node names kept in float (the sensitive layers,
    :func:`onnx_nodes_for`).
    """
    import hashlib

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    key = hashlib.sha256(("|".join([fp32_path.name, *sorted(exclude_nodes)])).encode())
    path = cache_dir() / f"{name}-{key.hexdigest()[:12]}.onnx"
    if not path.exists():
        tmp = path.with_suffix(".tmp.onnx")
        quantize_dynamic(
            str(fp32_path),
            str(tmp),
            per_channel=True,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Attention"],
            nodes_to_exclude=list(exclude_nodes),
            # fused contrib ops (SkipLayerNormalization …) defeat ONNX shape inference
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        tmp.replace(path)
    return path


# ============================================================== head importance and pruning
def _attention_outputs(model: nn.Module) -> list[nn.Linear]:
    return [layer.attention.output.dense for layer in model.encoder.layer]


def head_importance(model: nn.Module, texts: Sequence[str], *, batch_size: int = 32) -> Tensor:
    """Michel et al. (2019) importance ``I_h = E_x |∂L/∂ξ_h|`` of every head, (layers, heads).

    A gate ``ξ_h = 1`` multiplies each head's context vector before the output projection;
    ``L`` is the cross-entropy of the cached intent head on ``texts`` labelled by the FP32
    model's own predictions (a proxy loss that needs no labels). Scores are normalised per
    layer by their L2 norm, as in the paper.
    """
    check_module("model", model)
    cfg = model.config
    heads, size = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    gates = torch.ones(cfg.num_hidden_layers, heads, requires_grad=True)
    hooks = []
    for i, dense in enumerate(_attention_outputs(model)):

        def pre(mod, args, i=i):
            x = args[0]
            g = gates[i].to(x.device).repeat_interleave(size)
            return (x * g,)

        hooks.append(dense.register_forward_pre_hook(pre))
    clf = classification_head().to(_device(model))
    total = torch.zeros_like(gates)
    try:
        for s in range(0, len(texts), batch_size):
            batch = tokenize(list(texts[s : s + batch_size]), device=_device(model))
            logits = clf(
                F.normalize(mean_pool(_states(model, batch), batch["attention_mask"]), dim=1)
            )
            loss = F.cross_entropy(logits, logits.argmax(1).detach())
            (grad,) = torch.autograd.grad(loss, gates)
            total += grad.abs()
    finally:
        for h in hooks:
            h.remove()
    return total / total.norm(dim=1, keepdim=True).clamp(min=1e-12)


def prune_heads(model: nn.Module, heads: dict[int, Sequence[int]]) -> nn.Module:
    """A copy of ``model`` with the given heads removed: their rows of Q, K, V and columns of O are sliced out.

    ``heads`` maps a layer index to the head indices to drop in it (at least one head stays).
    """
    check_module("model", model)
    check_type("heads", heads, dict)
    model = copy.deepcopy(model)
    n_heads = model.config.num_attention_heads
    size = model.config.hidden_size // n_heads
    for layer_idx, drop in heads.items():
        check_int("layer index", layer_idx, minimum=0, maximum=len(model.encoder.layer) - 1)
        drop = sorted(set(drop))
        if any(not 0 <= h < n_heads for h in drop):
            raise ValueError(
                f"heads[{layer_idx}] must be head indices in [0, {n_heads}), got {drop}"
            )
        attn = model.encoder.layer[layer_idx].attention
        keep_heads = [h for h in range(attn.self.query.out_features // size) if h not in drop]
        if not keep_heads:
            raise ValueError(f"heads[{layer_idx}] would remove every head of layer {layer_idx}")
        rows = torch.cat([torch.arange(h * size, (h + 1) * size) for h in keep_heads])
        for proj in ("query", "key", "value"):
            old = getattr(attn.self, proj)
            new = nn.Linear(old.in_features, len(rows)).to(old.weight.device)
            new.weight.data, new.bias.data = (
                old.weight.data[rows].clone(),
                old.bias.data[rows].clone(),
            )
            setattr(attn.self, proj, new)
        old = attn.output.dense
        new = nn.Linear(len(rows), old.out_features).to(old.weight.device)
        new.weight.data, new.bias.data = old.weight.data[:, rows].clone(), old.bias.data.clone()
        attn.output.dense = new
        attn.self.num_attention_heads = len(keep_heads)
        attn.self.all_head_size = len(rows)
    return model.eval()


def least_important(importance: Tensor, fraction: float) -> dict[int, list[int]]:
    """The globally least important ``fraction`` of heads as ``{layer: [heads]}`` (one head kept per layer)."""
    check_type("importance", importance, Tensor)
    check_float("fraction", fraction, 0.0, 1.0, max_inclusive=False)
    layers, heads = importance.shape
    order = importance.flatten().argsort().tolist()
    out: dict[int, list[int]] = {}
    for flat in order[: int(round(fraction * layers * heads))]:
        layer, head = divmod(flat, heads)
        if len(out.get(layer, [])) < heads - 1:
            out.setdefault(layer, []).append(head)
    return out


# ============================================================== distilled student
def make_student(teacher: nn.Module, layers: Sequence[int] = (1, 3, 5)) -> nn.Module:
    """A shallower copy of ``teacher`` keeping only the encoder layers ``layers`` (initialised from them)."""
    check_module("teacher", teacher)
    n = len(teacher.encoder.layer)
    if not layers or any(not 0 <= i < n for i in layers):
        raise ValueError(
            f"layers must be a non-empty list of layer indices in [0, {n}), got {layers}"
        )
    student = copy.deepcopy(teacher)
    student.encoder.layer = nn.ModuleList([copy.deepcopy(teacher.encoder.layer[i]) for i in layers])
    student.config.num_hidden_layers = len(layers)
    return student.eval()


def distill_loss(student_states: Tensor, teacher_states: Tensor, attention_mask: Tensor) -> Tensor:
    """``MSE(h_s, h_t)`` over real tokens plus ``1 − cos(e_s, e_t)`` of the mean-pooled embeddings.

    Token states as in TinyBERT's hidden-state loss (Jiao et al. 2020); the cosine term as in
    DistilBERT's cosine embedding loss (Sanh et al. 2019).
    """
    mask = attention_mask.unsqueeze(-1).to(student_states.dtype)
    mse = ((student_states - teacher_states) ** 2 * mask).sum() / (
        mask.sum() * student_states.shape[-1]
    )
    cos = F.cosine_similarity(
        mean_pool(student_states, attention_mask), mean_pool(teacher_states, attention_mask)
    )
    return mse + (1 - cos).mean()


def load_student(
    layers: Sequence[int] = (1, 3, 5), *, epochs: int = 6, device: str | torch.device = "cpu"
) -> nn.Module:
    """The 3-layer student distilled from FP32 MiniLM on :func:`corpus` (trained once, cached)."""
    check_int("epochs", epochs, minimum=1)
    layers = list(layers)

    def train(student: nn.Module) -> None:
        teacher = load_minilm(device)
        student.to(device).train()
        texts = corpus()
        opt = torch.optim.AdamW(student.parameters(), lr=5e-5)
        gen = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            for idx in torch.randperm(len(texts), generator=gen).split(32):
                batch = tokenize([texts[i] for i in idx], device=device)
                with torch.no_grad():
                    target = teacher(**batch).last_hidden_state
                loss = distill_loss(
                    student(**batch).last_hidden_state, target, batch["attention_mask"]
                )
                opt.zero_grad()
                loss.backward()
                opt.step()

    config = {
        "v": STUDENT_VERSION,
        "layers": layers,
        "epochs": epochs,
        "lr": 5e-5,
        "batch": 32,
        "data": data_fingerprint(),
    }
    model, _, _ = cached_state(
        "minilm-student", config, lambda: make_student(load_minilm(), layers), train
    )
    return model.to(device).eval()
