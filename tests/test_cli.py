"""The CLI: help everywhere, one clear error line (exit 2, no traceback) for user mistakes."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LMKIT  # tests/ is on sys.path under pytest

from lmkit.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]

SUBCOMMANDS = [
    [], ["tokenizer"], ["tokenizer", "train"], ["train"], ["validate"], ["eval"], ["generate"], ["push"], ["hub"],
    ["hub", "list"], ["hub", "show"], ["hub", "delete"], ["export"],
]


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=lambda c: " ".join(c) or "lmkit")
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(command + ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lmkit")


def test_parser_lists_every_command():
    help_text = build_parser().format_help()
    for name in ("tokenizer", "train", "validate", "eval", "generate", "push", "hub", "export"):
        assert name in help_text


def test_console_script_and_module_entry_points():
    for command in ([LMKIT, "--help"], [sys.executable, "-m", "lmkit", "--help"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "usage: lmkit" in done.stdout


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved model with its tokenizer: what a recipe's tokenizer.path and model.init_from may point at."""
    from lmkit.configuration import LmkitConfig
    from lmkit.modeling import LmkitForCausalLM
    from lmkit.tokenization import TokenizerSpec, save_portable, train_tokenizer

    directory = tmp_path_factory.mktemp("model")
    tokenizer = train_tokenizer(TokenizerSpec(kind="char", vocab_size=64), ["床前明月光", "疑是地上霜"] * 3,
                                directory / "tok")
    config = LmkitConfig(n_layer=1, n_head=1, n_embd=16, n_positions=256, vocab_size=len(tokenizer))
    LmkitForCausalLM(config).save_pretrained(directory / "model")
    save_portable(tokenizer, directory / "model")
    return directory / "model"


def test_validate_passes_on_shipped_recipes(capsys, tmp_path, tiny_model_dir):
    # Every check train runs before its data stage, with the paths a user would have: a corpus, and for the recipes
    # that start from a trained tokenizer or model, one that exists.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("一行文字\n" * 20, encoding="utf-8")
    for recipe in sorted((REPO / "recipes").glob("*/config.yaml")):
        overrides = [f"data.files=[{corpus}]", f"training.output_dir={tmp_path / recipe.parent.name}"]
        text = recipe.read_text()
        if "\n  path:" in text:
            overrides.append(f"tokenizer.path={tiny_model_dir}")
        if "init_from:" in text:
            overrides.append(f"model.init_from={tiny_model_dir}")
        assert main(["validate", str(recipe), *overrides]) == 0, capsys.readouterr().err
        assert capsys.readouterr().out == f"ok: {recipe}\n"


def test_validate_checks_paths_as_train_does(capsys, tmp_path):
    recipe = REPO / "recipes" / "en-bpe" / "config.yaml"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("text\n")
    assert main(["validate", str(recipe), f"data.files=[{corpus}]", f"training.output_dir={tmp_path}/run",
                 f"tokenizer.path={tmp_path}/no-tokenizer"]) == 2
    assert "tokenizer.path" in capsys.readouterr().err


def test_misspelt_key_is_one_line_exit_2_without_traceback(tmp_path):
    recipe = (REPO / "recipes" / "quickstart-zh" / "config.yaml").read_text().replace("block_size:", "blok_size:")
    path = tmp_path / "typo.yaml"
    path.write_text(recipe)
    done = subprocess.run([LMKIT, "validate", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    assert "data.blok_size" in lines[0] and "did you mean 'block_size'" in lines[0]
    assert "Traceback" not in done.stderr


def test_debug_shows_the_traceback(tmp_path):
    done = subprocess.run(
        [LMKIT, "--debug", "validate", str(tmp_path / "missing.yaml")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "UserError" in done.stderr


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "nope.yaml"], "nope.yaml: recipe file not found"),
        (["tokenizer", "train", "nope.yaml"], "nope.yaml: tokenizer spec file not found"),
        (["eval", "no/such-model"], "no/such-model"),
        (["generate", "./no-such-dir", "--prompt", "x"], "no-such-dir"),
        (["push", "./no-such-run", "--name", "org/model"], "no-such-run"),
        (["hub", "show", "../escape"], "../escape"),
        (["hub", "delete", "org/model"], "--yes"),
        (["generate", str(REPO / "tests"), "--prompt", "x"], "not a model dir"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ")
    assert fragment in err


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=lambda c: " ".join(c) or "lmkit")
def test_help_imports_neither_torch_nor_transformers(command):
    # What makes `lmkit --help` slow is importing torch (seconds); benchmarks/bench_cli.py times it.
    probe = ("import sys\nfrom lmkit.cli import main\ntry:\n    main(sys.argv[1:] + ['--help'])\nexcept SystemExit:\n"
             "    pass\nprint(sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("first", ["import lmkit", "from lmkit.configuration import LmkitConfig",
                                   "import lmkit.tokenization", "import transformers; import lmkit"])
def test_import_lmkit_registers_the_auto_classes(tmp_path, first):
    # Whatever imports transformers first, AutoModelForCausalLM then reads an lmkit directory.
    script = f"""
import sys
{first}
assert "transformers" in sys.modules or "torch" not in sys.modules
from lmkit.configuration import LmkitConfig
from lmkit.modeling import LmkitForCausalLM
config = LmkitConfig(n_layer=1, n_head=1, n_embd=8, n_positions=8, vocab_size=10)
LmkitForCausalLM(config).save_pretrained({str(tmp_path)!r})
from transformers import AutoModelForCausalLM
print(type(AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})).__name__)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "LmkitForCausalLM"


def test_hub_show_prints_statistics_as_a_table_and_json(tmp_path, capsys, monkeypatch):
    import json

    from lmkit import hub
    from lmkit.hub import publish

    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.json").write_text("{}")  # a tokenizer-only revision: enough to push
    (run / "data_stats.json").write_text(json.dumps({
        "documents_read": 120, "documents_kept": 110, "dropped": {"empty": 4, "duplicate": 6, "too_long": 0},
        "splits": {"train": {"documents": 99, "tokens": 12345, "blocks": 97},
                   "test": {"documents": 11, "tokens": 999}},
    }))
    (run / "tokenizer_stats.json").write_text(json.dumps(
        {"kind": "char", "vocab_size": 1234, "chars_per_token": 1.0, "unk_rate": 0.0021,
         "stats_measured_on": "heldout"}))
    monkeypatch.setattr(publish, "_add_transformers_companion", lambda staging: "")
    ref = hub.push(run, "org/stats", hub=tmp_path / "hub")
    assert main(["hub", "show", ref, "--hub", str(tmp_path / "hub")]) == 0
    text = capsys.readouterr().out
    assert "120 read, 110 kept (dropped: empty 4, duplicate 6)" in text
    assert "train    99 documents, 12,345 tokens, 97 blocks" in text
    assert "char, 1,234 tokens, 1.00 chars/token, unknown 0.21% of tokens" in text
    assert max(len(line) for line in text.splitlines()) < 200, "a short table, not one long line of keys"
    assert main(["hub", "show", ref, "--hub", str(tmp_path / "hub"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["data"]["splits"]["train"]["tokens"] == 12345 and info["tokenizer"]["unk_rate"] == 0.0021


@pytest.mark.parametrize("command, settings", [("generate", "lmkit.generation.GenerateSettings"),
                                               ("serve", "lmkit.serve.ServeSettings")])
def test_flag_defaults_are_the_settings_defaults(command, settings):
    # The parser states them again (building it must not import torch): the two may not drift apart.
    import dataclasses
    import importlib

    module, name = settings.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    parser = build_parser()
    subparser = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == command)[1]
    defaults = {a.dest: a.default for a in subparser._actions}
    fields = [f for f in dataclasses.fields(cls) if f.init]
    assert {f.name: defaults[f.name] for f in fields} == {f.name: f.default for f in fields}


def test_generate_prints_the_prompt_then_the_continuation_lmkit_generate_returns(tiny_model_dir, capsys):
    import lmkit

    # an untrained model may end at once (EOS): take the first seed whose sample says something
    settings = {"max_new_tokens": 6, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    seed, text = next((seed, text) for seed in range(20)
                      if (text := lmkit.generate(tiny_model_dir, "床前", seed=seed, **settings)))
    capsys.readouterr()
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in {**settings, "seed": seed}.items()]
    assert main(["generate", str(tiny_model_dir), "--prompt", "床前", *flags]) == 0
    assert capsys.readouterr().out == "床前" + text + "\n"


def test_a_prompt_too_long_for_the_model_names_max_new_tokens(tiny_model_dir, capsys):
    assert main(["generate", str(tiny_model_dir), "--prompt", "床" * 250, "--max-new-tokens", "10"]) == 2
    out, err = capsys.readouterr()
    # the last line: transformers' progress bar of loading the weights may come before it
    assert out == "" and err.splitlines()[-1] == ("error: --max-new-tokens must be at most 6 here: the prompt is 250 "
                                                 "tokens and the model takes 256 in all, got 10")


def test_a_temperature_too_small_to_divide_by_is_greedy(tiny_model_dir, capsys):
    """1e-300 divides float32 logits into inf, which made the draw raise; so close to 0 it is the greedy answer."""
    import lmkit

    greedy = lmkit.generate(tiny_model_dir, "床前", max_new_tokens=8, temperature=0)
    for temperature in (1e-300, 5e-324, 1e-7):
        assert lmkit.generate(tiny_model_dir, "床前", max_new_tokens=8, temperature=temperature, seed=3) == greedy
    capsys.readouterr()
    assert main(["generate", str(tiny_model_dir), "--prompt", "床前", "--max-new-tokens", "8",
                 "--temperature", "1e-300"]) == 0
    assert capsys.readouterr().out == "床前" + greedy + "\n"
