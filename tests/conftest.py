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


@pytest.fixture()
def gpt2_dir(tmp_path) -> Path:
    """A tiny transformers GPT2LMHeadModel saved with a GPT-2-style tokenizer: byte-level BPE, no pad token."""
    import json

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    lines = [json.loads(line)["text"] for line in (FIXTURES / "zh-poetry.jsonl").read_text().splitlines()[:100]]
    backend.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=eos, eos_token_id=eos))
    path = tmp_path / "gpt2"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def kill_at_checkpoint(argv: list[str], run_dir: Path, step: int) -> None:
    """Start the training command `argv` and SIGKILL it once checkpoint-`step` of `run_dir` is complete (bounded: it
    fails if the run ends first or takes over 300 s to get there)."""
    import signal
    import subprocess
    import time

    from lmkit.run_dir import RunDir

    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while run_dir / f"checkpoint-{step}" not in RunDir(run_dir).complete_checkpoints():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
