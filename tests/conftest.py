"""Shared test settings: a private model cache, fast profile, deterministic CPU runs."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic(monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "fast")
    torch.manual_seed(0)
    yield


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """Point the trained-model cache at an empty temporary folder."""
    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread (no sync cost on a busy 2-core machine); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
