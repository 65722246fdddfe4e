"""Fast autoregressive generation: a KV cache and speculative decoding (lesson 7, generation task).

A sequence-to-sequence transformer generates one token per call of its decoder.
Two ideas make that cheaper without changing the output:

* **KV cache.** At step ``t`` the decoder's self-attention needs the keys and
  values of tokens ``0..t``; those of ``0..t-1`` were computed at earlier steps.
  Keeping them (:class:`KVCache`) turns each step from a pass over the whole
  prefix into a pass over one new token: ``O(t)`` instead of ``O(t²)`` work per
  step, and the cross-attention keys/values of the source are computed once.
* **Speculative decoding** (Leviathan, Kalman & Matias, ICML 2023; Chen et al.,
  2023). A small *draft* model proposes ``k`` tokens one by one; the large
  *target* model scores all of them in **one** call (a ``k + 1``-token step with
  its cache). With greedy decoding the longest prefix on which the draft agrees
  with the target's argmax is kept, plus the target's own next token, so the
  output is identical to the target's greedy output while the target runs about
  ``tokens / (accepted + 1)`` times. :func:`speculative_sample` is the sampling
  version: draft token ``x`` is accepted with probability ``min(1, p(x)/q(x))``
  and a rejection is resampled from ``norm(max(0, p − q))``, which leaves the
  output distributed exactly as the target's ``p``.

The task (``data/translation``, made by ``tools/make_translation_data.py``)
translates English dates in words into ISO 8601 (``"the twenty-first of march,
two thousand and five"`` → ``"2005-03-21"``), character by character.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.validation import check_choice, check_float, check_int, check_type

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "translation"
SPLITS = ("train", "valid", "test")
GENERATION_VERSION = 1  # bump when the recipe of get_translation_models changes


# --------------------------------------------------------------------------- data


def load_translation_pairs(split: str) -> list[tuple[str, str]]:
    """The ``(source, target)`` pairs of ``split`` (``"train"``, ``"valid"`` or ``"test"``).

    English dates in words → ISO 8601, e.g. ``("may the second two thousand
    eighty-nine", "2089-05-02")``; 4000 / 500 / 500 pairs, disjoint by date.
    """
    check_choice("split", split, SPLITS)
    path = DATA_DIR / f"{split}.tsv"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run python tools/make_translation_data.py")
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or rows[0] != ["source", "target"]:
        raise ValueError(f"{path} must start with the header 'source<TAB>target'")
    return [(s, t) for s, t in rows[1:]]


def _data_fingerprint() -> str:
    """Hash of the training data, part of the cache key (new data → new models)."""
    digest = hashlib.sha256()
    for split in ("train", "valid"):
        digest.update((DATA_DIR / f"{split}.tsv").read_bytes())
    return digest.hexdigest()[:12]


class CharVocab:
    """Characters ↔ ids, with ``pad`` = 0, ``bos`` = 1, ``eos`` = 2 and one id per character."""

    SPECIALS = ("<pad>", "<bos>", "<eos>")

    def __init__(self, chars: Iterable[str]) -> None:
        chars = sorted(set(chars))
        if not chars or any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("chars must be a non-empty collection of single characters")
        self.chars = "".join(chars)
        self.pad, self.bos, self.eos = 0, 1, 2
        self._index = {c: i + len(self.SPECIALS) for i, c in enumerate(self.chars)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharVocab:
        """The vocabulary of every character in ``texts``."""
        return cls("".join(texts))

    def __len__(self) -> int:
        return len(self.SPECIALS) + len(self.chars)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharVocab) and other.chars == self.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    def __repr__(self) -> str:
        return f"CharVocab({self.chars!r})"

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of ``text`` (no ``bos``/``eos``); unknown characters raise."""
        check_type("text", text, str)
        unknown = sorted({c for c in text if c not in self._index})
        if unknown:
            raise ValueError(
                f"text contains characters not in the vocabulary: {unknown} "
                f"(allowed: {self.chars!r})"
            )
        return [self._index[c] for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``: stops at the first ``eos``, skips ``pad`` and ``bos``."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos:
                break
            if i >= len(self.SPECIALS):
                out.append(self.chars[i - len(self.SPECIALS)])
        return "".join(out)


def translation_vocab() -> CharVocab:
    """The vocabulary of the translation task (every character of the three splits)."""
    return CharVocab.from_texts(s + t for split in SPLITS for s, t in load_translation_pairs(split))


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference (strings compared exactly), in [0, 1]."""
    check_type("predictions", predictions, (list, tuple))
    check_type("references", references, (list, tuple))
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must have the same length, "
            f"got {len(predictions)} and {len(references)}"
        )
    if not references:
        raise ValueError("references must not be empty")
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


# -------------------------------------------------------------------------- model


class Memory(NamedTuple):
    """The encoded source: ``states`` (B, S, d) and ``key_mask`` (B, 1, 1, S).

    ``key_mask`` is True at real tokens (attention may look there), or ``None``
    when no source is padded (then attention needs no mask at all).
    """

    states: Tensor
    key_mask: Tensor | None


@dataclass
class KVCache:
    """Per decoder layer: self-attention keys/values (B, H, t, d_head) and the source's K/V.

    ``length`` is the number of target positions cached. :meth:`truncate` drops the
    positions after ``length`` (speculative decoding rolls back rejected tokens).
    """

    self_kv: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    cross_kv: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.self_kv[0][0].shape[2] if self.self_kv else 0

    def truncate(self, length: int) -> KVCache:
        """A cache holding the first ``length`` positions (views, no copy)."""
        check_int("length", length, minimum=0, maximum=self.length)
        kept = [(k[:, :, :length], v[:, :, :length]) for k, v in self.self_kv]
        return KVCache(kept, self.cross_kv)


def _heads(x: Tensor, heads: int) -> Tensor:
    """(B, T, d) → (B, H, T, d/H)."""
    b, t, d = x.shape
    return x.view(b, t, heads, d // heads).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """(B, H, T, d/H) → (B, T, d)."""
    b, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(b, t, h * dh)


class Attention(nn.Module):
    """Multi-head attention ``softmax(QKᵀ/√d_h)V`` (Vaswani et al., 2017).

    Parameters are laid out as in ``nn.MultiheadAttention`` (one ``in_proj`` for
    Q, K, V and an ``out_proj``), so the two can be checked against each other.
    """

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of ``x`` (B, T, d), each (B, H, T, d_h), in one matmul."""
        q, k, v = self.in_proj(x).chunk(3, dim=-1)
        return _heads(q, self.heads), _heads(k, self.heads), _heads(v, self.heads)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of ``x`` (B, S, d), each (B, H, S, d_h)."""
        d = x.shape[-1]
        k, v = F.linear(x, self.in_proj.weight[d:], self.in_proj.bias[d:]).chunk(2, dim=-1)
        return _heads(k, self.heads), _heads(v, self.heads)

    def project_q(self, x: Tensor) -> Tensor:
        """Queries of ``x`` (B, T, d) as (B, H, T, d_h)."""
        d = x.shape[-1]
        return _heads(F.linear(x, self.in_proj.weight[:d], self.in_proj.bias[:d]), self.heads)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """``out_proj(softmax(QKᵀ/√d_h) V)``; ``mask`` is True where attention is allowed."""
        return self.out_proj(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))


class Block(nn.Module):
    """Pre-LN transformer layer: self-attention, optional cross-attention, feed-forward.

    ``x + SA(LN(x))``, then ``x + CA(LN(x), memory)``, then
    ``x + W₂ GELU(W₁ LN(x))`` — the same computation as
    ``nn.TransformerDecoderLayer(norm_first=True, activation="gelu", dropout=0)``
    (and as the encoder layer without cross-attention).
    """

    def __init__(self, d_model: int, heads: int, ffn: int, *, cross: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = Attention(d_model, heads)
        self.norm2 = nn.LayerNorm(d_model) if cross else None
        self.cross_attn = Attention(d_model, heads) if cross else None
        self.norm3 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn)
        self.linear2 = nn.Linear(ffn, d_model)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        past: tuple[Tensor, Tensor] | None = None,
        cross_kv: tuple[Tensor, Tensor] | None = None,
        cross_mask: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Returns the new states and this layer's self-attention keys/values (past + new)."""
        q, k, v = self.self_attn.project_qkv(self.norm1(x))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        x = x + self.self_attn.attend(q, k, v, mask)
        if self.cross_attn is not None:
            q = self.cross_attn.project_q(self.norm2(x))
            x = x + self.cross_attn.attend(q, *cross_kv, cross_mask)
        x = x + self.linear2(F.gelu(self.linear1(self.norm3(x))))
        return x, (k, v)


class TinySeq2Seq(nn.Module):
    """A small encoder–decoder transformer over a :class:`CharVocab`, with a KV-cached ``step``.

    ``forward(src, tgt_in)`` gives teacher-forced logits for training;
    ``encode(src)`` then repeated ``step(memory, tokens, cache)`` generate. ``step``
    takes one or several new target tokens (several: speculative verification) and
    returns their logits and the grown cache; ``cache=None`` starts a sequence.
    """

    def __init__(
        self,
        vocab: CharVocab,
        *,
        d_model: int = 128,
        heads: int = 4,
        enc_layers: int = 2,
        dec_layers: int = 4,
        ffn: int | None = None,
        max_src_len: int = 80,
        max_tgt_len: int = 32,
    ) -> None:
        super().__init__()
        check_type("vocab", vocab, CharVocab)
        check_int("d_model", d_model, minimum=1)
        check_int("heads", heads, minimum=1)
        if d_model % heads:
            raise ValueError(f"d_model must be divisible by heads, got {d_model} and {heads}")
        check_int("enc_layers", enc_layers, minimum=1)
        check_int("dec_layers", dec_layers, minimum=1)
        ffn = 4 * d_model if ffn is None else ffn
        check_int("ffn", ffn, minimum=1)
        check_int("max_src_len", max_src_len, minimum=1)
        check_int("max_tgt_len", max_tgt_len, minimum=2)
        self.vocab = vocab
        self.max_src_len, self.max_tgt_len = max_src_len, max_tgt_len
        self.embed = nn.Embedding(len(vocab), d_model)
        self.src_pos = nn.Embedding(max_src_len, d_model)
        self.tgt_pos = nn.Embedding(max_tgt_len, d_model)
        self.encoder = nn.ModuleList(
            Block(d_model, heads, ffn, cross=False) for _ in range(enc_layers)
        )
        self.enc_norm = nn.LayerNorm(d_model)
        self.decoder = nn.ModuleList(
            Block(d_model, heads, ffn, cross=True) for _ in range(dec_layers)
        )
        self.dec_norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, len(vocab))

    def encode(self, src: Tensor) -> Memory:
        """Encode ``src`` (B, S) of character ids, right-padded with ``vocab.pad``."""
        if src.dim() != 2 or src.shape[1] == 0:
            raise ValueError(f"src must have shape (batch, length > 0), got {tuple(src.shape)}")
        if src.shape[1] > self.max_src_len:
            raise ValueError(
                f"src has {src.shape[1]} tokens; this model takes at most "
                f"max_src_len={self.max_src_len}"
            )
        pos = torch.arange(src.shape[1], device=src.device)
        x = self.embed(src) + self.src_pos(pos)
        mask = (src != self.vocab.pad)[:, None, None, :]  # every query sees every non-pad key
        if bool(mask.all()):
            mask = None
        for block in self.encoder:
            x, _ = block(x, mask)
        return Memory(self.enc_norm(x), mask)

    def step(
        self, memory: Memory, tokens: Tensor, cache: KVCache | None = None
    ) -> tuple[Tensor, KVCache]:
        """Logits (B, T, V) for the ``T`` new ``tokens`` (B, T) after the cached prefix.

        New token ``i`` sits at position ``cache.length + i`` and attends to every
        cached position and to new tokens ``0..i`` (causal mask).
        """
        past = 0 if cache is None else cache.length
        t = tokens.shape[1]
        if past + t > self.max_tgt_len:
            raise ValueError(
                f"target sequence of {past + t} tokens exceeds max_tgt_len={self.max_tgt_len}"
            )
        if cache is None:
            cache = KVCache([], [blk.cross_attn.project_kv(memory.states) for blk in self.decoder])
        pos = torch.arange(past, past + t, device=tokens.device)
        x = self.embed(tokens) + self.tgt_pos(pos)
        mask = None
        if t > 1:  # query i (position past+i) sees keys 0..past+i
            keys = torch.arange(past + t, device=tokens.device)
            mask = keys[None, :] <= pos[:, None]
        new = []
        for i, block in enumerate(self.decoder):
            p = cache.self_kv[i] if cache.self_kv else None
            x, kv = block(x, mask, p, cache.cross_kv[i], memory.key_mask)
            new.append(kv)
        return self.out(self.dec_norm(x)), KVCache(new, cache.cross_kv)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits (B, T, V) of the next token after each of ``tgt_in`` (B, T)."""
        logits, _ = self.step(self.encode(src), tgt_in, None)
        return logits


# ---------------------------------------------------------------------- decoding


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_source(model: TinySeq2Seq, src_ids: Sequence[int] | Tensor, name: str = "src_ids"):
    """``src_ids`` as a (1, S) tensor on the model's device, after checking it."""
    if isinstance(src_ids, Tensor):
        if src_ids.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(src_ids.shape)}")
        src_ids = src_ids.tolist()
    check_type(name, src_ids, (list, tuple))
    if len(src_ids) == 0:
        raise ValueError(f"{name} must not be empty (encode a non-empty source text)")
    bad = sorted({i for i in src_ids if not isinstance(i, int) or not 3 <= i < len(model.vocab)})
    if bad:
        raise ValueError(
            f"{name} holds ids that are not characters of the vocabulary: {bad} "
            f"(allowed: 3..{len(model.vocab) - 1})"
        )
    return torch.tensor([list(src_ids)], device=_device(model))


def _check_max_new(model: TinySeq2Seq, max_new_tokens: int) -> None:
    check_int("max_new_tokens", max_new_tokens, minimum=1, maximum=model.max_tgt_len - 1)


def _finish(tokens: list[int], eos: int) -> list[int]:
    """Generated tokens up to (not including) the first ``eos``."""
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


@torch.inference_mode()
def greedy_decode(
    model: TinySeq2Seq,
    src_ids: Sequence[int] | Tensor,
    *,
    max_new_tokens: int = 16,
    use_cache: bool = True,
) -> list[int]:
    """Greedy decoding ``y_t = argmax p(y | y_<t, x)``, with or without the KV cache.

    Returns the generated ids without ``bos`` and ``eos`` (``eos`` ends the output).
    ``use_cache=False`` re-runs the decoder over the whole prefix at every step —
    the same output, ``O(t²)`` work instead of ``O(t)``.
    """
    check_type("model", model, TinySeq2Seq)
    src = _check_source(model, src_ids)
    _check_max_new(model, max_new_tokens)
    check_type("use_cache", use_cache, bool)
    memory = model.encode(src)
    eos = model.vocab.eos
    seq = torch.tensor([[model.vocab.bos]], device=src.device)
    out: list[int] = []
    cache = None
    for _ in range(max_new_tokens):
        if use_cache:
            logits, cache = model.step(memory, seq[:, -1:], cache)
        else:
            logits, _ = model.step(memory, seq, None)
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token == eos:
            break
        seq = torch.cat([seq, seq.new_tensor([[token]])], dim=1)
    return _finish(out, eos)


@torch.inference_mode()
def greedy_decode_batch(
    model: TinySeq2Seq,
    sources: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 16,
) -> list[list[int]]:
    """:func:`greedy_decode` of many sources at once (padded, KV-cached); same outputs."""
    check_type("model", model, TinySeq2Seq)
    check_type("sources", sources, (list, tuple))
    if not sources:
        raise ValueError("sources must not be empty")
    rows = [_check_source(model, s, f"sources[{i}]")[0] for i, s in enumerate(sources)]
    _check_max_new(model, max_new_tokens)
    src = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=model.vocab.pad)
    memory = model.encode(src)
    tokens = torch.full((len(rows), 1), model.vocab.bos, device=src.device)
    done = torch.zeros(len(rows), dtype=torch.bool, device=src.device)
    steps, cache = [], None
    for _ in range(max_new_tokens):
        logits, cache = model.step(memory, tokens, cache)
        tokens = logits[:, -1].argmax(-1, keepdim=True)
        steps.append(tokens)
        done |= tokens[:, 0] == model.vocab.eos
        if bool(done.all()):
            break
    generated = torch.cat(steps, dim=1).tolist()
    return [_finish(row, model.vocab.eos) for row in generated]


def translate(model: TinySeq2Seq, texts: Sequence[str], *, max_new_tokens: int = 16) -> list[str]:
    """Greedy translations of ``texts`` (batched)."""
    sources = [model.vocab.encode(t) for t in texts]
    return [
        model.vocab.decode(ids)
        for ids in greedy_decode_batch(model, sources, max_new_tokens=max_new_tokens)
    ]


@dataclass
class SpecStats:
    """Counters of one speculative decoding run.

    ``proposed``/``accepted``: draft tokens proposed and kept; ``target_calls``/
    ``draft_calls``: decoder steps of each model; ``tokens``: tokens generated (the
    ``eos`` included).
    """

    proposed: int = 0
    accepted: int = 0
    target_calls: int = 0
    draft_calls: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """``accepted / proposed`` (0 when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    def __add__(self, other: SpecStats) -> SpecStats:
        return SpecStats(
            self.proposed + other.proposed,
            self.accepted + other.accepted,
            self.target_calls + other.target_calls,
            self.draft_calls + other.draft_calls,
            self.tokens + other.tokens,
        )


def _check_pair(target: TinySeq2Seq, draft: TinySeq2Seq, k: int) -> None:
    check_type("target", target, TinySeq2Seq)
    check_type("draft", draft, TinySeq2Seq)
    if target.vocab != draft.vocab:
        only_t = sorted(set(target.vocab.chars) - set(draft.vocab.chars))
        only_d = sorted(set(draft.vocab.chars) - set(target.vocab.chars))
        raise ValueError(
            "target and draft must share one vocabulary; only in target: "
            f"{only_t}, only in draft: {only_d}"
        )
    check_int("k", k, minimum=1)


class _Speculation:
    """Shared state of a speculative run: both models' memories, caches and the sequence."""

    def __init__(self, target: TinySeq2Seq, draft: TinySeq2Seq, src: Tensor) -> None:
        self.target, self.draft = target, draft
        self.t_memory = target.encode(src)
        self.d_memory = draft.encode(src.to(_device(draft)))
        self.t_cache: KVCache | None = None
        self.d_cache: KVCache | None = None
        self.seq = [target.vocab.bos]  # bos + generated tokens
        self.stats = SpecStats()

    def draft_logits(self, token_ids: list[int]) -> Tensor:
        """The draft's next-token logits after feeding the tokens it has not seen yet."""
        seen = 0 if self.d_cache is None else self.d_cache.length
        new = self.seq[seen:] + token_ids
        feed = torch.tensor([new], device=_device(self.draft))
        logits, self.d_cache = self.draft.step(self.d_memory, feed, self.d_cache)
        self.stats.draft_calls += 1
        return logits[0, -1].float()

    def target_logits(self, proposal: list[int]) -> Tensor:
        """The target's logits (len(proposal) + 1, V) predicting each proposed token and one more."""
        seen = 0 if self.t_cache is None else self.t_cache.length
        feed = torch.tensor([self.seq[seen:] + proposal], device=_device(self.target))
        logits, self.t_cache = self.target.step(self.t_memory, feed, self.t_cache)
        self.stats.target_calls += 1
        return logits[0, -(len(proposal) + 1) :].float()

    def accept(self, tokens: list[int], n_accepted: int, proposed: int) -> None:
        """Append ``tokens`` (accepted draft tokens + one target token); roll caches back."""
        self.stats.proposed += proposed
        self.stats.accepted += n_accepted
        keep = len(self.seq) + n_accepted  # positions whose inputs are now final
        self.seq += tokens
        self.t_cache = self.t_cache.truncate(min(keep, self.t_cache.length))
        self.d_cache = self.d_cache.truncate(min(keep, self.d_cache.length))


def _propose(spec: _Speculation, k: int, pick) -> tuple[list[int], list[Tensor]]:
    """Up to ``k`` draft tokens (stopping after ``eos``) and the draft logits each came from."""
    proposal: list[int] = []
    logits: list[Tensor] = []
    for _ in range(k):
        z = spec.draft_logits(proposal[-1:])
        token = pick(z)
        proposal.append(token)
        logits.append(z)
        if token == spec.target.vocab.eos:
            break
    return proposal, logits


@torch.inference_mode()
def speculative_decode(
    target: TinySeq2Seq,
    draft: TinySeq2Seq,
    src_ids: Sequence[int] | Tensor,
    *,
    k: int = 4,
    max_new_tokens: int = 16,
) -> tuple[list[int], SpecStats]:
    """Greedy speculative decoding (Leviathan et al., 2023; Chen et al., 2023).

    Each round the draft proposes ``d_1..d_k`` greedily; the target scores
    ``[last, d_1..d_k]`` in one call, giving its argmax ``g_1..g_{k+1}``. The
    longest prefix with ``d_i = g_i`` is accepted (``n`` tokens) and ``g_{n+1}``
    is appended — the target's correction, or a bonus token when all ``k`` agree.
    Every appended token is the target's argmax given the exact prefix, so the
    output equals ``greedy_decode(target, src_ids)``; the target runs once per
    ``n + 1`` tokens instead of once per token.
    """
    _check_pair(target, draft, k)
    src = _check_source(target, src_ids)
    _check_max_new(target, max_new_tokens)
    spec = _Speculation(target, draft, src)
    eos = target.vocab.eos

    def argmax(z: Tensor) -> int:
        return int(z.argmax())

    while len(spec.seq) - 1 < max_new_tokens and spec.seq[-1] != eos:
        budget = max_new_tokens - (len(spec.seq) - 1)
        proposal, _ = _propose(spec, min(k, budget), argmax)
        best = spec.target_logits(proposal).argmax(-1).tolist()
        n = 0
        while n < len(proposal) and proposal[n] == best[n]:
            n += 1
        new = (proposal[:n] + [best[n]])[:budget]
        if eos in new:
            new = new[: new.index(eos) + 1]
        spec.accept(new, n, len(proposal))
    spec.stats.tokens = len(spec.seq) - 1
    return _finish(spec.seq[1:], eos), spec.stats


def residual_distribution(p: Tensor, q: Tensor) -> Tensor:
    """``norm(max(0, p − q))``: where the target ``p`` exceeds the draft ``q``, renormalised.

    Sampling a rejected position from it makes speculative sampling exact
    (Leviathan et al., 2023, Theorem 3.5; Chen et al., 2023, Theorem 1). When
    ``p = q`` nothing is ever rejected; ``p`` is returned so the result is defined.
    """
    r = torch.clamp(p - q, min=0)
    total = r.sum()
    return r / total if total > 0 else p


@torch.inference_mode()
def speculative_sample(
    target: TinySeq2Seq,
    draft: TinySeq2Seq,
    src_ids: Sequence[int] | Tensor,
    *,
    k: int = 4,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    max_new_tokens: int = 16,
) -> list[int]:
    """Speculative sampling that keeps the target's distribution exactly (Leviathan et al., 2023).

    With ``p = softmax(z_target / T)`` and ``q = softmax(z_draft / T)``: the draft
    samples ``x_i ~ q_i``; the target scores all of them in one call; ``x_i`` is
    accepted with probability ``min(1, p_i(x_i) / q_i(x_i))``; at the first
    rejection a token is drawn from ``norm(max(0, p_i − q_i))`` and the round ends;
    if all are accepted a bonus token is drawn from ``p_{k+1}``. Each output token
    is then distributed exactly as under ``p`` (Chen et al., 2023, Theorem 1).
    ``generator`` (a CPU ``torch.Generator``) makes the run reproducible.
    """
    _check_pair(target, draft, k)
    src = _check_source(target, src_ids)
    _check_max_new(target, max_new_tokens)
    check_float("temperature", temperature, 0.0, min_inclusive=False)
    if generator is not None:
        check_type("generator", generator, torch.Generator)
    spec = _Speculation(target, draft, src)
    eos = target.vocab.eos

    def sample(probs: Tensor) -> int:
        return int(torch.multinomial(probs.cpu(), 1, generator=generator))

    def draft_pick(z: Tensor) -> int:
        return sample(F.softmax(z / temperature, dim=-1))

    while len(spec.seq) - 1 < max_new_tokens and spec.seq[-1] != eos:
        budget = max_new_tokens - (len(spec.seq) - 1)
        proposal, d_logits = _propose(spec, min(k, budget), draft_pick)
        p = F.softmax(spec.target_logits(proposal) / temperature, dim=-1).cpu()
        n = 0
        while n < len(proposal):
            x = proposal[n]
            q = F.softmax(d_logits[n] / temperature, dim=-1).cpu()
            u = float(torch.rand((), generator=generator))
            if u >= float(p[n, x]) / float(q[x]):  # rejected: resample from the residual
                correction = sample(residual_distribution(p[n], q))
                break
            n += 1
        else:
            correction = sample(p[n])  # all k accepted: the bonus token from p_{k+1}
        new = (proposal[:n] + [correction])[:budget]
        if eos in new:
            new = new[: new.index(eos) + 1]
        spec.accept(new, n, len(proposal))
    return _finish(spec.seq[1:], eos)


# ----------------------------------------------------------------- trained models

TARGET_ARCH = {"d_model": 64, "heads": 4, "enc_layers": 2, "dec_layers": 4}
DRAFT_ARCH = {"d_model": 32, "heads": 2, "enc_layers": 1, "dec_layers": 1}
TRAIN_STEPS = {"fast": 1000, "full": 3000}


def _batches(pairs: list[tuple[str, str]], vocab: CharVocab, batch_size: int, gen):
    """Endless shuffled batches ``(src, tgt_in, tgt_out)`` of padded id tensors."""
    batch_size = min(batch_size, len(pairs))
    src_all = [torch.tensor(vocab.encode(s)) for s, _ in pairs]
    tgt_all = [torch.tensor([vocab.bos, *vocab.encode(t), vocab.eos]) for _, t in pairs]
    while True:
        order = torch.randperm(len(pairs), generator=gen).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            src = nn.utils.rnn.pad_sequence([src_all[i] for i in idx], batch_first=True)
            tgt = nn.utils.rnn.pad_sequence([tgt_all[i] for i in idx], batch_first=True)
            yield src, tgt[:, :-1], tgt[:, 1:]


def train_seq2seq(
    model: TinySeq2Seq,
    pairs: list[tuple[str, str]],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Teacher-forced cross-entropy training with AdamW and a warm-up + cosine schedule.

    Returns the loss of every step. Runs on the model's device.
    """
    check_type("model", model, TinySeq2Seq)
    check_type("pairs", pairs, list)
    if not pairs:
        raise ValueError("pairs must not be empty")
    check_int("steps", steps, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    check_float("lr", lr, 0.0, min_inclusive=False)
    device = _device(model)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)

    def schedule(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    losses = []
    model.train()
    batches = _batches(pairs, model.vocab, batch_size, gen)
    for _ in range(steps):
        src, tgt_in, tgt_out = (t.to(device) for t in next(batches))
        logits = model(src, tgt_in)
        loss = F.cross_entropy(
            logits.flatten(0, 1), tgt_out.flatten(), ignore_index=model.vocab.pad
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def get_translation_models(*, seed: int = 0) -> tuple[TinySeq2Seq, TinySeq2Seq, CharVocab]:
    """``(target, draft, vocab)`` trained on the date translation task, once, then cached.

    Target: 2 encoder + 4 decoder layers, d = 64; draft: 1 + 1 layers, d = 32
    (several times cheaper per step). Trained on the CPU (deterministic) for the
    profile's number of steps; returned in eval mode on the CPU.
    """
    from utils.cache import cached_state
    from utils.config import get_profile, seed_everything

    check_int("seed", seed, minimum=0)
    vocab = translation_vocab()
    pairs = load_translation_pairs("train")
    steps = TRAIN_STEPS[get_profile().name]
    models = []
    for name, arch in (("target", TARGET_ARCH), ("draft", DRAFT_ARCH)):
        config = {
            "task": "dates-to-iso",
            "version": GENERATION_VERSION,
            "data": _data_fingerprint(),
            "vocab": vocab.chars,
            "arch": arch,
            "steps": steps,
            "seed": seed,
        }

        def build(arch=arch) -> TinySeq2Seq:
            seed_everything(seed)
            return TinySeq2Seq(vocab, **arch)

        def train(model: TinySeq2Seq) -> None:
            model.cpu()
            train_seq2seq(model, pairs, steps=steps, seed=seed)

        model, _, _ = cached_state(f"translation-{name}", config, build, train)
        models.append(model)
    return models[0], models[1], vocab
