"""Shared test setup: everything offline, small and on CPU."""

import errno
import json
import multiprocessing
import os
import socket
import string
import subprocess
import sys
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


# ---- the CLI --------------------------------------------------------------------------------------------------------

# The console script, which is what users run; as an argv it is [LMKIT, ...].
LMKIT = str(Path(sys.executable).parent / "lmkit")
IS_ROOT = os.geteuid() == 0


def run_cli(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    """`lmkit ARGS` in a subprocess (paths may be given as Path), bounded to 300 s."""
    return subprocess.run([LMKIT, *map(str, args)], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def one_error_line(capsys, argv) -> str:
    """Run the CLI in process; assert exit 2 and exactly one `error:` line on stderr, and return it."""
    from lmkit.cli import main

    capsys.readouterr()  # what came before (progress bars of a test's setup) is not the command's output
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_read_only(monkeypatch, directory: Path) -> None:
    """Make `directory` read-only; as root (CI containers) permissions do not stop writes, so the refusal the kernel
    would give is simulated where lmkit asks for it."""
    directory.chmod(0o555)
    if IS_ROOT:
        import tempfile

        from lmkit import atomic

        real_access, real_mkdtemp = os.access, tempfile.mkdtemp
        monkeypatch.setattr(atomic.os, "access", lambda p, mode: False if Path(p) == directory else
                            real_access(p, mode))

        def mkdtemp(*args, dir=None, **kwargs):
            if dir is not None and directory in [Path(dir), *Path(dir).parents]:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
            return real_mkdtemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)


# ---- processes killed at random points ------------------------------------------------------------------------------

# Children that get killed start as fresh interpreters: fork() would copy the parent's locks (tqdm's cross-process
# write lock, OpenMP's pool) in whatever state its threads left them, and a child killed while holding tqdm's lock
# deadlocks the test process at its next progress bar (seen in CI), while forked torch ops segfaulted.
SPAWN = multiprocessing.get_context("spawn")
KILLS = 6  # random kill points per operation (seeded: a failure names its delay)


def _when_ready(target, args, ready):
    ready.set()  # unpickling this call imported the test module, lmkit, torch: the time to the kill starts now
    target(*args)


def kill_after(target, args, delay: float) -> None:
    """Run `target(*args)` in a spawned child and SIGKILL it `delay` seconds after it is ready (if still running)."""
    ready = SPAWN.Event()
    process = SPAWN.Process(target=_when_ready, args=(target, args, ready))
    process.start()
    assert ready.wait(120), "the child process did not start"
    process.join(delay)
    if process.is_alive():
        process.kill()
    process.join(30)


def max_abs_diff(a: dict, b: dict) -> float:
    """The largest difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ---- tiny models and tokenizers -------------------------------------------------------------------------------------

PAD, EOS = 1, 0  # the special-token ids of tiny_config and of char_tokenizer
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|unk|>"]


def char_tokenizer(alphabet: str = string.printable):
    """One token per character (unknown characters -> <|unk|>), with lmkit's special tokens, built inline (no
    download, no training), so token counts equal character counts."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", unk_token="<|unk|>")


def tiny_config(**overrides):
    """A 2-layer LmkitConfig without dropout (so train mode is deterministic); `overrides` replace any value."""
    from lmkit.configuration import LmkitConfig

    settings = {
        "vocab_size": 97, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "resid_pdrop": 0.0,
        "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": EOS, "eos_token_id": EOS, "pad_token_id": PAD,
    }  # fmt: skip
    return LmkitConfig(**{**settings, **overrides})


def tiny_model(kind: str = "learned", seed: int = 0, **overrides):
    """A random LmkitForCausalLM of tiny_config in eval mode; the same `kind`, `seed` and overrides give the same
    weights."""
    import torch

    from lmkit.modeling import LmkitForCausalLM

    torch.manual_seed(seed)
    return LmkitForCausalLM(tiny_config(position_embedding_type=kind, **overrides)).eval()


EVAL_RESULTS = {
    "eval_loss": 2.25, "eval_perplexity": 9.4877, "eval_bits_per_byte": 1.625, "eval_bleu": 12.5, "eval_chrf": 31.25,
    "baseline_bleu": 1.5,
}


def source_tokenizer():
    """The tokenizer of make_source's runs: lowercase letters, space and full stop."""
    return char_tokenizer("abcdefghijklmnopqrstuvwxyz .")


def make_source(directory: Path, kind: str = "gpt2", eval_results: dict | None = EVAL_RESULTS, seed: int = 0,
                **lmkit_config) -> Path:
    """A run dir as training.py leaves it: weights, tokenizer and run artefacts.

    kind: gpt2 | learned | sinusoidal | rope."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = source_tokenizer()
    sizes = {"vocab_size": len(tokenizer), "n_positions": 32, "n_embd": 16, "n_layer": 1, "n_head": 2,
             "bos_token_id": EOS, "eos_token_id": EOS, "pad_token_id": PAD}
    if kind == "gpt2":
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(**sizes))
    else:
        model = tiny_model(kind, seed, **sizes, **lmkit_config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if eval_results is not None:
        (directory / "eval_results.json").write_text(json.dumps(eval_results))
    (directory / "recipe.yaml").write_text("# resolved\ndata:\n  test_size: 0.1\ntraining:\n  learning_rate: 0.001\n")
    (directory / "data_stats.json").write_text(json.dumps({"train": {"documents": 90}, "test": {"documents": 10}}))
    samples = "| prompt | reference | generation |\n|---|---|---|\n| the | fox | fox |\n"
    (directory / "eval_samples.md").write_text(samples)
    return directory


@pytest.fixture
def hub_path(tmp_path) -> Path:
    return tmp_path / "hub"


# ---- a tiny training recipe -----------------------------------------------------------------------------------------

TINY = """
data:
  files: [{corpus}]
  block_size: 32
tokenizer:
  train: {{kind: char, vocab_size: 3000, min_frequency: 1}}
model: {{n_layer: 2, n_head: 2, n_embd: 32, n_positions: 64, position_embedding_type: learned}}
eval: {{bleu_samples: 8, prompt_tokens: 8, max_new_tokens: 8}}
hub: {{dir: {hub}}}
training:
  output_dir: {out}
  max_steps: 12
  per_device_train_batch_size: 8
  per_device_eval_batch_size: 16
  learning_rate: 3.0e-3
  eval_strategy: steps
  eval_steps: 6
  save_steps: 6
  logging_steps: 2
  report_to: none
  seed: 7
  disable_tqdm: true
"""


def tiny_recipe(tmp_path: Path, fixtures: Path, name: str = "run", corpus="zh-poetry.jsonl", **sections) -> Path:
    """Write TINY as tmp_path/NAME.yaml, training into tmp_path/NAME and publishing to tmp_path/hub; `corpus` is a
    fixture's name or any path. Each keyword `sections` (model={...}, training={...}) is merged into that section."""
    import yaml

    path = tmp_path / f"{name}.yaml"
    text = TINY.format(corpus=fixtures / corpus, hub=tmp_path / "hub", out=tmp_path / name)
    if sections:
        tree = yaml.safe_load(text)
        for section, values in sections.items():
            tree[section] = {**tree.get(section, {}), **values}
        text = yaml.safe_dump(tree, sort_keys=False)
    path.write_text(text)
    return path
