"""The Python API (`lmkit.load_recipe`, `train`, `evaluate`, `push`, `export`, `generate`): one tiny model through all
of it, results returned and nothing printed, and `import lmkit` still without torch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import TextIteratorStreamer

import lmkit
from lmkit.errors import UserError

RECIPE = """
data: {{files: [{corpus}], block_size: 32}}
tokenizer: {{train: {{kind: char, vocab_size: 3000, min_frequency: 1}}}}
model: {{n_layer: 1, n_head: 2, n_embd: 32, n_positions: 64, position_embedding_type: learned}}
eval: {{bleu_samples: 4, prompt_tokens: 8, max_new_tokens: 8}}
training: {{output_dir: {out}, max_steps: 40, report_to: none, disable_tqdm: true}}
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run trained through `lmkit.train`, with what it printed."""
    fixtures = Path(__file__).parent / "fixtures"
    tmp_path = tmp_path_factory.mktemp("api")
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(corpus=fixtures / "zh-poetry.jsonl", out=tmp_path / "unused"))
    # both spellings of an override, and a Path where the YAML holds a string
    recipe = lmkit.load_recipe(path, training={"output_dir": tmp_path / "run", "eval_steps": 2, "save_steps": 2},
                               **{"training.max_steps": 2, "hub.dir": str(tmp_path / "hub")})
    assert (recipe.training.max_steps, recipe.training.output_dir) == (2, str(tmp_path / "run"))
    result = lmkit.train(recipe)
    return result, tmp_path


def test_train_returns_the_run_dir_and_its_final_metrics(trained):
    result, tmp_path = trained
    assert result.run_dir == tmp_path / "run" and result.pushed is None and not result.already_finished
    assert result.metrics == pytest.approx(json.loads((tmp_path / "run" / "eval_results.json").read_text()))
    assert result.metrics["eval_loss"] > 0 and "eval_bleu" in result.metrics


def test_evaluate_push_export_and_generate_return_their_results_and_print_nothing(trained, capsys):
    result, tmp_path = trained
    capsys.readouterr()
    report = lmkit.evaluate(result.run_dir, num_samples=2, output=tmp_path / "eval")
    assert report["output_dir"] == str(tmp_path / "eval") and report["bleu_samples"] == 2
    assert json.loads((tmp_path / "eval" / "eval_report.json").read_text())["bleu_samples"] == 2

    ref = lmkit.push(result.run_dir, name="api/tiny", hub=tmp_path / "hub", message="from python")
    assert ref.startswith("api/tiny@")

    exported = lmkit.export(ref, tmp_path / "export", hub=tmp_path / "hub")
    assert exported == tmp_path / "export"
    assert json.loads((exported / "config.json").read_text())["model_type"] == "gpt2"

    pieces = []
    text = lmkit.generate(ref, "床前", pieces.append, hub=tmp_path / "hub", max_new_tokens=8, temperature=0)
    assert text and "".join(pieces) == text
    assert lmkit.generate(exported, "床前", max_new_tokens=8, temperature=0) == text, "the export generates the same"
    assert capsys.readouterr().out == "", "the API prints nothing"


def test_generate_feeds_a_transformers_streamer_and_keeps_the_random_state(trained):
    import threading

    import torch

    from lmkit import loading
    from lmkit.generation import GenerateSettings, stream_generate

    result, _ = trained
    model, tokenizer = loading.load_model(str(result.run_dir)), loading.load_tokenizer(str(result.run_dir))
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    settings = GenerateSettings(max_new_tokens=8, seed=3)
    state = torch.random.get_rng_state()
    results = []
    thread = threading.Thread(target=lambda: results.append(stream_generate(model, tokenizer, "床前", streamer,
                                                                             settings)))
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == results[0] and results[0]
    assert torch.equal(torch.random.get_rng_state(), state), "sampling draws from its own seeded state"
    assert stream_generate(model, tokenizer, "床前", None, settings) == results[0], "the same seed, the same text"


@pytest.mark.parametrize("keywords, fragment", [
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
    ({"top_p": 2.0}, "top_p must be in (0, 1], got 2.0"),
    ({"temperature": float("nan")}, "temperature must be a number, got nan"),
])
def test_generate_refuses_bad_settings_before_loading_anything(keywords, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        lmkit.generate("no/such-model", "x", **keywords)


def test_load_recipe_reports_a_bad_override_against_its_key(trained):
    _, tmp_path = trained
    with pytest.raises(UserError, match="training.max_steps"):
        lmkit.load_recipe(tmp_path / "recipe.yaml", training={"max_steps": "many"})


def test_import_lmkit_imports_no_torch_and_names_the_api():
    probe = ("import sys, lmkit, lmkit.api\n"
             "assert all(getattr(lmkit, n) is getattr(lmkit.api, n) for n in "
             "('load_recipe', 'train', 'evaluate', 'push', 'export', 'generate', 'TrainResult'))\n"
             "assert callable(lmkit.load_model) and lmkit.__version__\n"
             "print(sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_no_module_shadows_an_api_function():
    # `import lmkit.export` (a module of that name) would replace the function lmkit.export for everyone after it
    package = Path(lmkit.__file__).parent
    names = ("load_recipe", "train", "evaluate", "push", "export", "generate")
    assert [n for n in names if (package / f"{n}.py").exists() or (package / n).is_dir()] == []
