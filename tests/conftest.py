"""Shared test setup: everything offline, small and on CPU."""

import os
from pathlib import Path

import pytest

# No test may reach a hub: these make transformers/datasets/evaluate fail fast instead of trying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
# Small real corpora committed with the tests (made from Debian's fortune files by tests/fixtures/make_fixtures.py):
# en-fortunes.jsonl, zh-poetry.jsonl, zh-quotes.jsonl, one JSON object per line with the field `text`.
FIXTURES = REPO_ROOT / "tests" / "fixtures"


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """Each test gets its own datasets cache and hub dir, so tests can run in parallel and leave nothing behind."""
    base = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(base / "datasets"))
    monkeypatch.setenv("HF_HOME", str(base / "hf_home"))
    monkeypatch.setenv("LMKIT_HUB", str(base / "hub"))
