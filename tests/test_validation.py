"""Every bad value is caught before any work starts: one `error:` line naming the key, exit 2, nothing written.

A test per class of bad value (types, ranges, choices, paths, TrainingArguments values the Trainer would only reject
mid-run, combinations, duplicate YAML keys, corpora that hold nothing to train on), and a property test that feeds
wrong-typed overrides to every key `lmkit validate` knows.
"""

import dataclasses
import subprocess
import types
import typing
from pathlib import Path

import pytest
from conftest import LMKIT, make_read_only, one_error_line, tiny_recipe  # tests/ is on sys.path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import TrainingArguments

from lmkit.cli import main
from lmkit.configuration import LmkitConfig
from lmkit.data import DataArgs
from lmkit.evaluation import EvalArgs
from lmkit.hub import HubArgs
from lmkit.recipe import model_config_keys
from lmkit.settings import annotation_of
from lmkit.tokenization import TokenizerSpec

RECIPE = """
data: {{files: [{corpus}], block_size: 16}}
tokenizer: {{train: {{kind: char, vocab_size: 100}}}}
model: {{n_layer: 1, n_head: 1, n_embd: 16, n_positions: 64}}
training: {{output_dir: {out}, max_steps: 3, report_to: none}}
eval: {{bleu_samples: 4, prompt_tokens: 8, max_new_tokens: 8}}
"""


@pytest.fixture
def recipe(tmp_path) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i} of a small corpus, long enough for a block\n" for i in range(60)))
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(corpus=corpus, out=tmp_path / "run"))
    return path


@pytest.mark.parametrize("override, fragment", [
    # types
    ("data.block_size=abc", "data.block_size must be an integer, got 'abc'"),
    ("data.packing=maybe", "data.packing must be true or false, got 'maybe'"),
    ("data.files=5", "data.files must be a list of strings, got 5"),
    ("data.text_field=[a]", "data.text_field must be a string"),
    ("model.n_embd=1.5", "model.n_embd must be an integer, got 1.5"),
    ("eval.temperature=hot", "eval.temperature must be a number"),
    ("hub.name=[a]", "hub.name must be a string or null"),
    ("tokenizer.train.vocab_size=big", "tokenizer.train.vocab_size must be an integer"),
    ("training.learning_rate=fast", "training.learning_rate must be a number, got 'fast'"),
    ("training.bf16=1", "training.bf16 must be true or false, got 1"),
    # ranges
    ("data.test_size=1.5", "data.test_size must be in (0, 1), got 1.5"),
    ("data.mask_prob=-0.1", "data.mask_prob must be in [0, 1)"),
    ("eval.top_k=-1", "eval.top_k must be >= 0, got -1"),
    ("eval.top_p=0", "eval.top_p must be in (0, 1]"),
    ("model.attn_pdrop=1", "model.attn_pdrop must be in [0, 1)"),
    ("tokenizer.train.min_frequency=0", "tokenizer.train.min_frequency must be >= 1"),
    # choices
    ("eval.bleu_tokenize=klingon", "eval.bleu_tokenize must be one of 13a, zh, intl, char, none"),
    ("data.mask_unit=sentence", "data.mask_unit must be one of token, word"),
    ("model.activation_function=tanh", "model.activation_function must be one of"),
    ("hub.push=sometimes", "hub.push must be one of never, end, every_save"),
    ("training.lr_scheduler_type=sideways", "training"),
    # TrainingArguments values the Trainer accepts at construction and rejects mid-run
    ("training.per_device_train_batch_size=0", "training.per_device_train_batch_size must be >= 1, got 0"),
    ("training.per_device_eval_batch_size=0", "training.per_device_eval_batch_size must be >= 1"),
    ("training.gradient_accumulation_steps=0", "training.gradient_accumulation_steps must be >= 1"),
    ("training.max_steps=0", "training.max_steps must be >= 1, or -1"),
    ("training.learning_rate=-1e-3", "training.learning_rate must be > 0"),
    ("training.logging_steps=0", "training.logging_steps must be > 0"),
    ("training.eval_steps=0", "training.eval_steps must be > 0"),
    ("training.save_steps=0", "training.save_steps must be > 0"),
    ("training.weight_decay=-1", "training.weight_decay must be >= 0"),
    ("training.save_total_limit=0", "training.save_total_limit must be >= 1"),
    ("training.output_dir=", "training.output_dir is required"),
    # combinations that cannot work
    ("data.block_size=128", "data.block_size (128) exceeds model.n_positions (64)"),
    ("eval.prompt_tokens=60", "eval.prompt_tokens + eval.max_new_tokens (68) exceeds model.n_positions (64)"),
    ("training.metric_for_best_model=eval_bleu eval.bleu_samples=0", "no BLEU is computed"),
    ("model.n_head=3", "model.n_embd must be divisible by model.n_head"),
    ("hub.push=end", "hub.name is required when hub.push is 'end'"),
    ("data.test_size=0.6 data.validation_size=0.5", "must be below 1 to leave training data"),
    ("tokenizer.train.coverage=0.9 tokenizer.train.kind=bpe tokenizer.train.vocab_size=300", "coverage applies"),
])
def test_bad_values_are_one_line_naming_the_key(recipe, capsys, override, fragment):
    err = one_error_line(capsys, ["validate", str(recipe), *override.split()])
    assert fragment in err
    assert not (recipe.parent / "run").exists()


def test_paths_are_checked_before_any_work(recipe, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    cases = [
        ("data.files=[missing.txt]", "missing.txt does not exist"),
        (f"training.output_dir={tmp_path / 'a-file'}", "training.output_dir"),
        (f"training.output_dir={tmp_path / 'a-file' / 'run'}", "which is a file"),
        (f"hub.dir={tmp_path / 'a-file'}", "hub.dir"),
        (f"data.cache_dir={tmp_path / 'a-file'}", "data.cache_dir"),
        (f"tokenizer.path={tmp_path / 'no-tokenizer'} tokenizer.train=null", "tokenizer.path"),
        (f"model.init_from={tmp_path}", "model.init_from"),
    ]
    for override, fragment in cases:
        assert fragment in one_error_line(capsys, ["validate", str(recipe), *override.split()]), override


def test_duplicate_yaml_keys_are_an_error(tmp_path, capsys):
    path = tmp_path / "twice.yaml"
    path.write_text("data: {files: [a.txt]}\ntraining: {output_dir: x}\ndata: {files: [b.txt]}\n")
    err = one_error_line(capsys, ["validate", str(path)])
    assert "duplicate key 'data'" in err and "line 3" in err


def test_validate_takes_overrides_like_train(recipe, capsys):
    assert main(["validate", str(recipe), "training.max_steps=7", "data.packing=false"]) == 0
    assert capsys.readouterr().out == f"ok: {recipe}\n"
    assert "data.block_size" in one_error_line(capsys, ["validate", str(recipe), "data.block_size=1"])


def test_an_existing_run_needs_resume(recipe, capsys):
    run = recipe.parent / "run"
    run.mkdir()
    (run / "eval_results.json").write_text("{}")
    assert "already holds a run" in one_error_line(capsys, ["validate", str(recipe)])
    assert main(["validate", str(recipe), "--resume"]) == 0


@pytest.mark.parametrize("corpus, fragment", [
    ("", "no documents in"),
    ('{"text": "   "}\n{"text": "\\u0007"}\n', "0 document(s) left after cleaning"),
    ('{"text": "ab"}\n{"text": "cd"}\n{"text": "ef"}\n', "less than one training block (data.block_size = 16)"),
], ids=["empty", "empty-after-cleaning", "shorter-than-a-block"])
def test_corpora_with_nothing_to_train_on(tmp_path, corpus, fragment):
    path = tmp_path / "corpus.jsonl"
    path.write_text(corpus)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(corpus=path, out=tmp_path / "run"))
    done = subprocess.run([LMKIT, "train", str(recipe)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0] and str(path) in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists(), "nothing is left behind"


def test_tokenizer_spec_values_name_the_key(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"kind: char\nfiles: [{tmp_path / 'c.txt'}]\noutput_dir: {tmp_path / 'tok'}\n")
    err = one_error_line(capsys, ["tokenizer", "train", str(spec), "heldout_fraction=abc"])
    assert "heldout_fraction must be a number, got 'abc'" in err and str(spec) in err


# ---- property: any wrong-typed value of any key is one error line ------------------------------------------------

def _keys() -> list[tuple[str, object]]:
    """(dotted key, annotation) of every key `lmkit validate` accepts, but the free-form ones."""
    keys = []
    for section, cls in (("data", DataArgs), ("eval", EvalArgs), ("hub", HubArgs),
                         ("tokenizer.train", TokenizerSpec)):
        keys += [(f"{section}.{f.name}", annotation_of(cls, f.name)) for f in dataclasses.fields(cls) if f.init]
    keys += [(f"model.{name}", annotation_of(LmkitConfig, name))
             for name in model_config_keys() if name != "init_from"]
    keys += [(f"training.{f.name}", annotation_of(TrainingArguments, f.name))
             for f in dataclasses.fields(TrainingArguments) if f.init]
    return keys


def _accepts(annotation, value) -> bool:
    """Whether `value` has a Python type the annotation allows (an independent, deliberately coarse reading)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in typing.get_args(annotation))
    origin = typing.get_origin(annotation) or annotation
    if annotation is typing.Any or not isinstance(origin, type):
        return True  # Literal and the like: not judged here
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is type(None):
        return value is None
    return isinstance(value, origin) or (isinstance(value, str) and issubclass(origin, str))


WRONG = {"'abc'": "abc", "1.5": 1.5, "true": True, "[1, 2]": [1, 2], "{a: 1}": {"a": 1}, "-3": -3}


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(_keys()), raw=st.sampled_from(sorted(WRONG)))
def test_any_wrong_typed_override_is_one_error_line(tmp_path_factory, capsys, key, raw):
    name, annotation = key
    if _accepts(annotation, WRONG[raw]) or name in ("training.output_dir", "data.files", "tokenizer.train.files"):
        return  # a value of an allowed type (or a path, where one string is taken as a list): not this property
    directory = tmp_path_factory.mktemp("property")
    corpus = directory / "corpus.txt"
    corpus.write_text("a line of text\n" * 30)
    recipe = directory / "recipe.yaml"
    recipe.write_text(RECIPE.format(corpus=corpus, out=directory / "run"))
    err = one_error_line(capsys, ["validate", str(recipe), f"{name}={raw}"])
    assert name.split(".")[-1] in err or "section 'training'" in err, err


# ---- command flags: checked settings dataclasses, reported as the flag ----------------------------------------------

GENERATE = ["generate", "./no-such-dir", "--prompt", "x"]  # no model there: flags are checked first


@pytest.mark.parametrize("argv, line", [
    ([*GENERATE, "--temperature", "nan"], "--temperature must be a number, got nan"),
    ([*GENERATE, "--temperature", "inf"], "--temperature must be a number, got inf"),
    ([*GENERATE, "--top-p", "2"], "--top-p must be in (0, 1], got 2.0"),
    ([*GENERATE, "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    ([*GENERATE, "--top-k", "-3"], "--top-k must be >= 0, got -3"),
    ([*GENERATE, "--seed", "-1"], "--seed must be in [0, 18446744073709551615]"),
    ([*GENERATE, "--seed", str(1 << 64)], "--seed must be in [0, 1844674407370955"),
    (["eval", "no/such-model", "--num-samples", "-1"], "--num-samples must be >= 0, got -1"),
    (["serve", "no/such-model", "--port", "70000"], "--port must be in [0, 65535], got 70000"),
    (["serve", "no/such-model", "--max-queue", "0"], "--max-queue must be >= 1, got 0"),
    (["serve", "no/such-model", "--drain-seconds", "nan"], "--drain-seconds must be a number, got nan"),
    (["hub", "gc", "--grace-minutes", "nan"], "--grace-minutes must be a number, got nan"),
    (["hub", "gc", "--grace-minutes", "-5"], "--grace-minutes must be >= 0, got -5.0"),
])
def test_bad_flag_values_are_one_line_naming_the_flag(capsys, argv, line):
    # none of the models exists: the flags are checked first, before anything is loaded
    err = one_error_line(capsys, argv)
    assert err.startswith(f"error: {line}"), err


def test_a_bad_flag_value_is_no_traceback_from_the_console_script():
    done = subprocess.run([LMKIT, "generate", "./no-such-dir", "--prompt", "x", "--top-p", "nan"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr == "error: --top-p must be a number, got nan\n", done.stderr


# ---- 8. OS errors: one error line naming the path and the cause, exit 2 (item 8 of issue 11) ------------------------


def test_unwritable_or_file_output_dirs_fail_before_the_data_stage(tmp_path, fixtures, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    recipe = tiny_recipe(tmp_path, fixtures, "r", training={"output_dir": str(blocker / "run")})
    line = one_error_line(capsys, ["validate", recipe])
    assert f"training.output_dir {blocker / 'run'} is under {blocker}, which is a file" in line
    read_only = tmp_path / "ro"
    read_only.mkdir()
    make_read_only(monkeypatch, read_only)
    recipe = tiny_recipe(tmp_path, fixtures, "r", training={"output_dir": str(read_only / "run")})
    line = one_error_line(capsys, ["train", recipe])
    assert f"{read_only} is not writable" in line and not (read_only / "run").exists()
    read_only.chmod(0o755)
    line = one_error_line(capsys, ["export", tmp_path, "--output", blocker / "export"])
    assert f"--output {blocker / 'export'} is under {blocker}, which is a file" in line
