"""Tests of utils.generation: the data, the seq2seq model, the KV cache and speculative decoding.

Exactness tests use tiny untrained models (no cache, no training): speculative
decoding must reproduce the target's greedy output whatever the weights are.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import utils.generation as G
from utils.generation import (
    CharVocab,
    KVCache,
    SpecStats,
    TinySeq2Seq,
    exact_match,
    greedy_decode,
    greedy_decode_batch,
    load_translation_pairs,
    residual_distribution,
    speculative_decode,
    speculative_sample,
    translate,
)

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def vocab() -> CharVocab:
    return G.translation_vocab()


def tiny(vocab: CharVocab, seed: int, **arch) -> TinySeq2Seq:
    torch.manual_seed(seed)
    arch = {"d_model": 16, "heads": 2, "enc_layers": 1, "dec_layers": 2, **arch}
    return TinySeq2Seq(vocab, **arch).eval()


def forced(vocab: CharVocab, token: int) -> TinySeq2Seq:
    """A model whose every next-token argmax is ``token`` (output layer = a constant bias)."""
    model = tiny(vocab, 0, dec_layers=1)
    with torch.no_grad():
        model.out.weight.zero_()
        model.out.bias.fill_(-5.0)
        model.out.bias[token] = 5.0
    return model


@pytest.fixture(scope="module")
def sources(vocab) -> list[list[int]]:
    return [vocab.encode(s) for s, _ in load_translation_pairs("test")[:6]]


# ----------------------------------------------------------------------------- data


def test_splits_sizes_disjoint_and_well_formed():
    splits = {s: load_translation_pairs(s) for s in G.SPLITS}
    assert {s: len(p) for s, p in splits.items()} == {"train": 4000, "valid": 500, "test": 500}
    targets = {s: {t for _, t in p} for s, p in splits.items()}
    assert not targets["train"] & targets["test"]
    assert not targets["train"] & targets["valid"]
    assert not targets["valid"] & targets["test"]
    src, tgt = splits["test"][0]
    assert len(tgt) == 10 and tgt[4] == tgt[7] == "-" and src and "\t" not in src


def test_data_files_equal_the_generator_output():
    spec = importlib.util.spec_from_file_location(
        "make_translation_data", ROOT / "tools" / "make_translation_data.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--check"]) == 0
    assert mod.make_pairs()["test"][:3] == load_translation_pairs("test")[:3]
    # hand-checked phrasings
    assert mod.ordinal(21) == "twenty-first" and mod.ordinal(30) == "thirtieth"
    assert mod.ordinal(12) == "twelfth" and mod.cardinal(45) == "forty-five"


def test_load_translation_pairs_rejects_unknown_split():
    with pytest.raises(ValueError, match="split must be one of"):
        load_translation_pairs("dev")


# ---------------------------------------------------------------------------- vocab


def test_vocab_round_trip_and_specials(vocab):
    text = "the twenty-first of march, two thousand and five"
    ids = vocab.encode(text)
    assert min(ids) >= 3 and vocab.decode(ids) == text
    assert (vocab.pad, vocab.bos, vocab.eos) == (0, 1, 2)
    assert vocab.decode([vocab.bos, *vocab.encode("20"), vocab.eos, *vocab.encode("x")]) == "20"
    small = CharVocab("ba")
    assert len(small) == 5 and small.encode("ab") == [3, 4] and small.decode([4, 0, 3]) == "ba"
    assert small == CharVocab("ab") and small != CharVocab("abc")


def test_vocab_names_unknown_characters(vocab):
    with pytest.raises(ValueError, match=r"not in the vocabulary: \['!', 'Q'\]"):
        vocab.encode("Q march!")
    with pytest.raises(TypeError, match="text must be str"):
        vocab.encode(5)
    with pytest.raises(ValueError, match="single characters"):
        CharVocab(["ab"])


def test_exact_match():
    assert exact_match(["2005-03-21", "1999-01-01"], ["2005-03-21", "1999-01-02"]) == 0.5
    assert exact_match(["a"], ["a"]) == 1.0 and exact_match(["a "], ["a"]) == 0.0
    with pytest.raises(ValueError, match="same length"):
        exact_match(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="must not be empty"):
        exact_match([], [])


# ---------------------------------------------------------------------------- model


def _copy_attention(mine: G.Attention, ref: nn.MultiheadAttention) -> None:
    ref.in_proj_weight.copy_(mine.in_proj.weight)
    ref.in_proj_bias.copy_(mine.in_proj.bias)
    ref.out_proj.weight.copy_(mine.out_proj.weight)
    ref.out_proj.bias.copy_(mine.out_proj.bias)


@torch.no_grad()
def test_decoder_block_equals_torch_transformer_decoder_layer():
    torch.manual_seed(0)
    d, heads, ffn = 16, 4, 24
    block = G.Block(d, heads, ffn, cross=True).eval()
    ref = nn.TransformerDecoderLayer(
        d, heads, ffn, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    ).eval()
    _copy_attention(block.self_attn, ref.self_attn)
    _copy_attention(block.cross_attn, ref.multihead_attn)
    for name in ("norm1", "norm2", "norm3", "linear1", "linear2"):
        getattr(ref, name).load_state_dict(getattr(block, name).state_dict())
    x, mem = torch.randn(3, 5, d), torch.randn(3, 7, d)
    mem_pad = torch.zeros(3, 7, dtype=torch.bool)
    mem_pad[1, 4:] = True
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    expected = ref(
        x,
        mem,
        tgt_mask=nn.Transformer.generate_square_subsequent_mask(5),
        memory_key_padding_mask=mem_pad,
    )
    got, (k, v) = block(x, causal, None, block.cross_attn.project_kv(mem), ~mem_pad[:, None, None])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert k.shape == v.shape == (3, heads, 5, d // heads)


@torch.no_grad()
def test_encoder_block_equals_torch_transformer_encoder_layer():
    torch.manual_seed(1)
    d, heads, ffn = 16, 2, 32
    block = G.Block(d, heads, ffn, cross=False).eval()
    ref = nn.TransformerEncoderLayer(
        d, heads, ffn, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    ).eval()
    _copy_attention(block.self_attn, ref.self_attn)
    ref.norm1.load_state_dict(block.norm1.state_dict())
    ref.norm2.load_state_dict(block.norm3.state_dict())
    ref.linear1.load_state_dict(block.linear1.state_dict())
    ref.linear2.load_state_dict(block.linear2.state_dict())
    x = torch.randn(2, 6, d)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 3:] = True
    got, _ = block(x, ~pad[:, None, None])
    expected = ref(x, src_key_padding_mask=pad)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0, :3], expected[0, :3], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cached_steps_equal_the_full_forward(vocab, sources):
    model = tiny(vocab, 3)
    src = torch.tensor([sources[0]])
    tgt = torch.tensor([[vocab.bos, *vocab.encode("2005-03-21")]])
    full = model(src, tgt)
    memory = model.encode(src)
    # one token at a time
    cache, steps = None, []
    for i in range(tgt.shape[1]):
        logits, cache = model.step(memory, tgt[:, i : i + 1], cache)
        steps.append(logits)
        assert cache.length == i + 1
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    # 4 tokens, then the other 7 in one multi-token step (speculative verification)
    logits_a, cache = model.step(memory, tgt[:, :4], None)
    logits_b, cache = model.step(memory, tgt[:, 4:], cache)
    torch.testing.assert_close(torch.cat([logits_a, logits_b], 1), full, atol=1e-5, rtol=1e-5)
    # rolled back to 6 positions, then refed
    logits_c, _ = model.step(memory, tgt[:, 6:], cache.truncate(6))
    torch.testing.assert_close(logits_c, full[:, 6:], atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_the_encoding(vocab, sources):
    model = tiny(vocab, 4)
    short, long = sources[0][:20], sources[1]
    src = nn.utils.rnn.pad_sequence([torch.tensor(short), torch.tensor(long)], batch_first=True)
    with torch.no_grad():
        tgt = torch.tensor([[vocab.bos, 5, 6]] * 2)
        batched = model(src, tgt)
        alone = model(torch.tensor([short]), tgt[:1])
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=1e-5)


def test_kv_cache_truncate():
    k = torch.randn(1, 2, 5, 4)
    cache = KVCache([(k, k + 1)], [])
    cut = cache.truncate(3)
    assert cut.length == 3 and cache.length == 5 and KVCache().length == 0
    torch.testing.assert_close(cut.self_kv[0][1], k[:, :, :3] + 1)
    with pytest.raises(ValueError, match="length must be <= 5"):
        cache.truncate(6)


def test_model_rejects_bad_configuration_and_lengths(vocab):
    with pytest.raises(ValueError, match="divisible by heads"):
        TinySeq2Seq(vocab, d_model=10, heads=3)
    with pytest.raises(TypeError, match="vocab must be CharVocab"):
        TinySeq2Seq(["a"])
    model = tiny(vocab, 0, max_src_len=8, max_tgt_len=4)
    with pytest.raises(ValueError, match="max_src_len=8"):
        model.encode(torch.full((1, 9), 5))
    with pytest.raises(ValueError, match="max_tgt_len=4"):
        model.step(model.encode(torch.full((1, 3), 5)), torch.ones(1, 5, dtype=torch.long))


# ----------------------------------------------------------------------- greedy


def test_greedy_with_and_without_cache_identical(vocab, sources):
    for seed in (0, 1):
        model = tiny(vocab, seed)
        for ids in sources:
            cached = greedy_decode(model, ids, max_new_tokens=12)
            assert cached == greedy_decode(model, ids, max_new_tokens=12, use_cache=False)
            assert len(cached) <= 12


def test_greedy_hand_checked_with_forced_models(vocab):
    a = vocab.encode("a")[0]
    assert greedy_decode(forced(vocab, a), [5, 6], max_new_tokens=5) == [a] * 5
    assert greedy_decode(forced(vocab, vocab.eos), [5, 6]) == []
    assert greedy_decode_batch(forced(vocab, a), [[5], [6, 7]], max_new_tokens=3) == [[a] * 3] * 2


def test_greedy_batch_equals_one_by_one(vocab, sources):
    model = tiny(vocab, 2)
    batch = [s[: 10 + 7 * i] for i, s in enumerate(sources)]  # different lengths: padding
    assert greedy_decode_batch(model, batch) == [greedy_decode(model, s) for s in batch]
    texts = ["march the third nineteen oh five", "the first of may two thousand"]
    assert translate(model, texts) == [
        vocab.decode(greedy_decode(model, vocab.encode(t))) for t in texts
    ]


def test_greedy_rejects_bad_input(vocab):
    model = tiny(vocab, 0)
    with pytest.raises(ValueError, match="src_ids must not be empty"):
        greedy_decode(model, [])
    with pytest.raises(ValueError, match=r"not characters of the vocabulary: \[0, 99\]"):
        greedy_decode(model, [5, 0, 99])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        greedy_decode(model, [5], max_new_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens must be <= 31"):
        greedy_decode(model, [5], max_new_tokens=32)
    with pytest.raises(TypeError, match="model must be TinySeq2Seq"):
        greedy_decode(nn.Linear(2, 2), [5])
    with pytest.raises(ValueError, match=r"sources\[1\] must not be empty"):
        greedy_decode_batch(model, [[5], []])
    with pytest.raises(ValueError, match="src_ids must be 1-D"):
        greedy_decode(model, torch.ones(1, 3, dtype=torch.long))


# ------------------------------------------------------------------ speculative


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_speculative_equals_target_greedy(vocab, sources, k):
    target, draft = tiny(vocab, 10, dec_layers=3), tiny(vocab, 11, d_model=8, dec_layers=1)
    for ids in sources:
        out, stats = speculative_decode(target, draft, ids, k=k, max_new_tokens=12)
        assert out == greedy_decode(target, ids, max_new_tokens=12)
        assert stats.tokens == len(out) + (1 if len(out) < 12 else 0)  # + eos
        assert 0 <= stats.accepted <= stats.proposed == stats.draft_calls
        # each target call adds its accepted tokens + 1; the last one may be cut by the budget
        assert 0 <= stats.target_calls - (stats.tokens - stats.accepted) <= 1


def test_speculative_equals_greedy_when_draft_often_agrees(vocab, sources):
    """A draft that is a slightly perturbed copy of the target: long accepted runs, rejections too."""
    target = tiny(vocab, 5)
    draft = tiny(vocab, 5)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in draft.decoder[-1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    rates = []
    for ids in sources:
        out, stats = speculative_decode(target, draft, ids, k=4, max_new_tokens=20)
        assert out == greedy_decode(target, ids, max_new_tokens=20)
        rates.append(stats.acceptance_rate)
    assert 0.3 < min(rates) and max(rates) < 1.0  # both paths taken


def test_speculative_draft_equal_to_target_accepts_everything(vocab, sources):
    model = tiny(vocab, 7)
    a = vocab.encode("a")[0]
    for k in (1, 3, 4):
        out, stats = speculative_decode(model, model, sources[0], k=k, max_new_tokens=10)
        assert out == greedy_decode(model, sources[0], max_new_tokens=10)
        assert stats.acceptance_rate == 1.0
    same = forced(vocab, a)
    # each call of the target yields k accepted tokens + 1 bonus token: 10 tokens in 10/(k+1) calls
    for k in (1, 4, 9):
        const, s = speculative_decode(same, same, [5], k=k, max_new_tokens=10)
        assert const == [a] * 10 and s.tokens == 10 and s.target_calls == 10 // (k + 1)
        assert s.accepted == s.proposed == s.draft_calls == 10 - s.target_calls
    # k = 3: 3 + bonus, 3 + bonus, then 2 accepted and the bonus cut by max_new_tokens
    const, s = speculative_decode(same, same, [5], k=3, max_new_tokens=10)
    assert (s.target_calls, s.accepted, s.proposed, s.tokens) == (3, 8, 8, 10)


def test_speculative_hand_checked_counts_with_a_wrong_draft(vocab):
    a, b = vocab.encode("ab")
    target, wrong = forced(vocab, a), forced(vocab, b)
    out, stats = speculative_decode(target, wrong, [5], k=3, max_new_tokens=7)
    assert out == [a] * 7
    # every round: min(3, tokens left) proposed, 0 accepted, the target's correction is the
    # only new token: 3 + 3 + 3 + 3 + 3 + 2 + 1 = 18 proposed
    assert (stats.target_calls, stats.accepted, stats.proposed, stats.tokens) == (7, 0, 18, 7)
    assert stats.acceptance_rate == 0.0
    # a draft that says eos at once proposes one token per round
    out, stats = speculative_decode(target, forced(vocab, vocab.eos), [5], k=3, max_new_tokens=4)
    assert out == [a] * 4 and stats.proposed == 4 and stats.draft_calls == 4
    # a target that stops at once
    out, stats = speculative_decode(forced(vocab, vocab.eos), target, [5], k=3)
    assert out == [] and stats.tokens == 1 and stats.target_calls == 1 and stats.proposed == 3


def test_spec_stats():
    s = SpecStats(proposed=8, accepted=6, target_calls=3, draft_calls=8, tokens=9)
    assert s.acceptance_rate == 0.75 and SpecStats().acceptance_rate == 0.0
    total = s + SpecStats(2, 1, 1, 2, 2)
    assert (total.proposed, total.accepted, total.target_calls, total.tokens) == (10, 7, 4, 11)


def test_speculative_rejects_bad_input(vocab):
    target, draft = tiny(vocab, 0), tiny(vocab, 1)
    other = TinySeq2Seq(CharVocab("abc!"), d_model=8, heads=2, enc_layers=1, dec_layers=1)
    with pytest.raises(ValueError, match=r"share one vocabulary; only in target: \[.*'0'"):
        speculative_decode(target, other, [5])
    with pytest.raises(ValueError, match="k must be >= 1"):
        speculative_decode(target, draft, [5], k=0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        speculative_decode(target, draft, [5], max_new_tokens=0)
    with pytest.raises(ValueError, match="src_ids must not be empty"):
        speculative_decode(target, draft, [])
    with pytest.raises(ValueError, match="share one vocabulary"):
        speculative_sample(target, other, [5])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        speculative_sample(target, draft, [5], temperature=0.0)
    with pytest.raises(ValueError, match="k must be >= 1"):
        speculative_sample(target, draft, [5], k=0)
    with pytest.raises(TypeError, match="generator must be Generator"):
        speculative_sample(target, draft, [5], generator=0)


# --------------------------------------------------------------------- sampling


def test_residual_distribution_hand_checked():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.6, 0.2])
    torch.testing.assert_close(residual_distribution(p, q), torch.tensor([1.0, 0.0, 0.0]))
    p = torch.tensor([0.4, 0.4, 0.2])
    q = torch.tensor([0.1, 0.3, 0.6])
    torch.testing.assert_close(residual_distribution(p, q), torch.tensor([0.75, 0.25, 0.0]))
    torch.testing.assert_close(residual_distribution(p, p), p)


class TableModel(TinySeq2Seq):
    """A toy "model" whose logits are a table ``logits[position, previous token]``.

    Its distributions are known exactly and a step costs a few tensor ops, so the
    sampling test can draw thousands of sequences in a second.
    """

    def __init__(self, vocab: CharVocab, table: torch.Tensor) -> None:
        super().__init__(vocab, d_model=2, heads=1, enc_layers=1, dec_layers=1, max_tgt_len=4)
        self.table = table  # (max_tgt_len, V, V)

    def encode(self, src):
        return G.Memory(torch.zeros(1, 1, 1), torch.zeros(1, 1, dtype=torch.bool))

    def step(self, memory, tokens, cache=None):
        past = 0 if cache is None else cache.length
        t = tokens.shape[1]
        logits = self.table[torch.arange(past, past + t), tokens[0]][None]
        kept = cache.self_kv[0][0] if cache is not None else torch.zeros(1, 1, 0, 1)
        grown = torch.cat([kept, torch.zeros(1, 1, t, 1)], dim=2)
        return logits, KVCache([(grown, grown)], [])


def _toy_pair() -> tuple[TableModel, TableModel]:
    """Target and draft over {a, b} (+ pad, bos, eos) with clearly different distributions."""
    vocab = CharVocab("ab")
    gen = torch.Generator().manual_seed(0)
    target = TableModel(vocab, 2.0 * torch.randn(4, 5, 5, generator=gen))
    draft = TableModel(vocab, 2.0 * torch.randn(4, 5, 5, generator=gen))
    return target, draft


def _two_token_distribution(model: TableModel, temperature: float) -> torch.Tensor:
    """Exact P(y1, y2); a sequence that ends at y1 = eos counts as (eos, eos)."""
    eos, bos = model.vocab.eos, model.vocab.bos
    first = F.softmax(model.table[0, bos] / temperature, -1)
    joint = first[:, None] * F.softmax(model.table[1] / temperature, -1)
    joint[eos] = 0.0
    joint[eos, eos] = first[eos]
    return joint


@pytest.mark.parametrize(("k", "temperature"), [(1, 1.0), (2, 0.7), (3, 1.5)])
def test_speculative_sample_keeps_the_target_distribution(k, temperature):
    target, draft = _toy_pair()
    p = _two_token_distribution(target, temperature)
    q = _two_token_distribution(draft, temperature)
    assert 0.5 * (p - q).abs().sum() > 0.3, "the toy draft must differ from the target"
    n = 4000
    gen = torch.Generator().manual_seed(k)
    counts = torch.zeros_like(p)
    eos = target.vocab.eos
    for _ in range(n):
        out = speculative_sample(
            target, draft, [3], k=k, temperature=temperature, generator=gen, max_new_tokens=2
        )
        y = (out + [eos, eos])[:2]
        counts[y[0], y[1]] += 1
    tv = float(0.5 * (counts / n - p).abs().sum())
    # sampling noise alone: E[TV] <= 0.5 * sum sqrt(p (1 - p) / n)
    noise = float(0.5 * (p * (1 - p) / n).sqrt().sum())
    assert tv < 2 * noise, f"TV to the target {tv:.3f}, sampling noise about {noise:.3f}"
    assert 0.5 * float((counts / n - q).abs().sum()) > 0.2  # control: far from the draft


def test_speculative_sample_is_reproducible_and_respects_budget(vocab, sources):
    target, draft = tiny(vocab, 3), tiny(vocab, 4, d_model=8, dec_layers=1)
    runs = [
        speculative_sample(
            target,
            draft,
            sources[0],
            k=3,
            generator=torch.Generator().manual_seed(5),
            max_new_tokens=9,
        )
        for _ in range(2)
    ]
    assert runs[0] == runs[1] and len(runs[0]) <= 9
    assert vocab.eos not in runs[0]


# ---------------------------------------------------------------- trained models


def test_get_translation_models_trains_once_then_loads(tmp_cache, monkeypatch, capsys):
    monkeypatch.setitem(G.TRAIN_STEPS, "fast", 2)
    monkeypatch.setattr(
        G, "TARGET_ARCH", {"d_model": 16, "heads": 2, "enc_layers": 1, "dec_layers": 1}
    )
    target, draft, vocab = G.get_translation_models()
    assert "training translation-target" in capsys.readouterr().out
    assert vocab == G.translation_vocab() and target.vocab == draft.vocab == vocab
    again, _, _ = G.get_translation_models()
    assert "training" not in capsys.readouterr().out
    for a, b in zip(target.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not target.training and len(list(tmp_cache.glob("translation-*.pt"))) == 2
    monkeypatch.setattr(G, "_data_fingerprint", lambda: "other data")
    G.get_translation_models()  # new data: a new cache key, trained again
    assert "training translation-target" in capsys.readouterr().out


def test_training_lowers_the_loss(vocab):
    model = tiny(vocab, 0)
    pairs = load_translation_pairs("train")[:64]
    losses = G.train_seq2seq(model, pairs, steps=30, batch_size=16, lr=1e-2)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert not model.training
    assert len(G.train_seq2seq(model, pairs[:3], steps=2, batch_size=8)) == 2  # batch > data
    with pytest.raises(ValueError, match="pairs must not be empty"):
        G.train_seq2seq(model, [], steps=1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        G.train_seq2seq(model, pairs, steps=0)
