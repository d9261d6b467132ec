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
# The real corpora beside the checkout (../shared/data); tests that need them use the `shared_data` fixture.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "zh-poetry.jsonl").exists():
        pytest.fail(f"the shared corpora are expected in {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """Each test gets its own datasets cache and hub dir, so tests can run in parallel and leave nothing behind."""
    base = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(base / "datasets"))
    monkeypatch.setenv("HF_HOME", str(base / "hf_home"))
    monkeypatch.setenv("LMKIT_HUB", str(base / "hub"))
