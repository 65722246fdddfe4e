"""utils.minilm: offline loading and sentence embeddings equal to sentence-transformers'."""

from __future__ import annotations

import pytest
import torch

from utils import minilm

SENTENCES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog near the river bank.",
    "Quantization maps floats to integers.",
]


@pytest.fixture(scope="module")
def model():
    return minilm.load_minilm()


def test_encode_matches_sentence_transformers(model):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm.model_dir()), device="cpu")
    expected = torch.as_tensor(reference.encode(SENTENCES, normalize_embeddings=True))
    ours = minilm.encode(model, SENTENCES)
    assert ours.shape == (3, 384)
    cos = torch.nn.functional.cosine_similarity(ours, expected, dim=1)
    assert cos.min() >= 0.9999, cos


def test_mean_pool_ignores_padding():
    states = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(minilm.mean_pool(states, mask), torch.tensor([[2.0, 3.0]]))
    with pytest.raises(ValueError, match="attention_mask"):
        minilm.mean_pool(states, torch.ones(1, 2))


def test_padding_does_not_change_an_embedding(model):
    alone = minilm.encode(model, SENTENCES[:1])
    batched = minilm.encode(model, SENTENCES)[:1]
    assert torch.allclose(alone, batched, atol=1e-5)


@pytest.mark.parametrize(
    ("bad", "err", "match"),
    [
        ([], ValueError, "must not be empty"),
        ("one string", TypeError, "list of str"),
        (["ok", 3], TypeError, r"sentences\[1\]"),
        (["ok", "  "], ValueError, "empty string"),
    ],
)
def test_bad_input(bad, err, match):
    with pytest.raises(err, match=match):
        minilm.tokenize(bad)


def test_overlong_sentence_warns_and_truncates():
    long = " ".join(["word"] * 300)
    with pytest.warns(UserWarning, match="truncated"):
        batch = minilm.tokenize([long], max_length=32)
    assert batch["input_ids"].shape == (1, 32)


def test_model_dir_override(monkeypatch, tmp_path):
    """$COURSE_MINILM_DIR replaces the package's folder, and a folder without config.json is refused."""
    monkeypatch.setenv(minilm.MODEL_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="COURSE_MINILM_DIR"):
        minilm.model_dir()
    (tmp_path / "config.json").write_text("{}")
    assert minilm.model_dir() == tmp_path
    monkeypatch.delenv(minilm.MODEL_DIR_ENV)
    assert (minilm.model_dir() / "config.json").is_file()
