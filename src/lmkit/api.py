"""The Python API: what the `lmkit` commands do, as functions that return their results and print nothing.

    recipe = lmkit.load_recipe("recipes/en-bpe/config.yaml", training={"max_steps": 200})
    result = lmkit.train(recipe)                    # TrainResult(run_dir, metrics, pushed)
    report = lmkit.evaluate(result.run_dir)         # the eval report (also written as eval_report.json)
    ref = lmkit.push(result.run_dir, name="me/en")  # "me/en@<revision>"
    lmkit.export(ref, "exports/en")                 # a stock transformers model directory
    text = lmkit.generate(ref, "The best way to")

Each is exposed at the top level (`lmkit.train`, ...) and imported on first use, so `import lmkit` stays cheap; this
module itself imports torch only inside the functions that need it. A bad value raises `lmkit.errors.UserError` (a
ValueError) naming the key, as the CLI's `error:` lines do. Logging is left to the caller (the CLI sets it up).
"""

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lmkit import hub as hub_lib

if TYPE_CHECKING:  # imports torch
    from transformers.generation.streamers import BaseStreamer


@dataclass(frozen=True)
class TrainResult:
    """What `train` produced: the run directory, its final evaluation and the hub revision it was published as."""

    run_dir: Path
    metrics: dict  # the final evaluation: eval_loss, eval_perplexity, eval_bits_per_byte, eval_bleu, ...
    pushed: str | None = None  # "org/name@<revision>" when the recipe's hub.push published the run
    already_finished: bool = False  # resumed a run that had reached its max_steps: nothing trained or published


def _dotted(values: dict, prefix: str = "") -> list[str]:
    """`{"training": {"max_steps": 10}}` (or `{"training.max_steps": 10}`) as `["training.max_steps=10"]`.

    JSON is YAML, so each value reaches the recipe typed exactly as the Python value was; paths become strings.
    """
    items = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            items += _dotted(value, path + ".")
        else:
            items.append(f"{path}={json.dumps(value, default=os.fspath, ensure_ascii=False)}")
    return items


def load_recipe(path: str | os.PathLike, **overrides):
    """Read a recipe YAML, apply overrides, and check every value (`lmkit validate`'s checks on values).

    Overrides are keyed by section, as in the YAML, and merge into it; a dotted key says the same:

        lmkit.load_recipe("r.yaml", training={"max_steps": 10, "output_dir": "runs/r"}, data={"files": ["a.txt"]})
        lmkit.load_recipe("r.yaml", **{"training.max_steps": 10})

    Returns:
        a `lmkit.recipe.Recipe`.

    Raises:
        UserError: a missing file, invalid YAML, an unknown key (with a suggestion) or a bad value.
    """
    from lmkit import recipe

    return recipe.load_recipe(path, _dotted(overrides))


def train(recipe, resume: bool = False) -> TrainResult:
    """Train a recipe (a `Recipe` from `load_recipe`, or a recipe file's path) end to end, as `lmkit train` does.

    Args:
        resume: continue from the run's latest complete checkpoint (`lmkit train --resume`).
    """
    from lmkit import training

    if isinstance(recipe, (str, os.PathLike)):
        recipe = load_recipe(recipe)
    metrics = dict(training.train(recipe, resume=resume))
    training.end_processes()
    pushed, finished = metrics.pop("hub_ref", None), bool(metrics.pop("already_finished", False))
    return TrainResult(Path(recipe.training.output_dir), metrics, pushed, finished)


def evaluate(model: str | os.PathLike, data: str | os.PathLike | None = None, num_samples: int | None = None,
             output: str | os.PathLike | None = None, hub: str | os.PathLike | None = None) -> dict:
    """BLEU, chrF, perplexity and bits per byte of a run dir, checkpoint, export or hub name (`lmkit eval`).

    Args:
        data: a corpus to score instead of the run's saved held-out split.
        num_samples: documents scored by BLEU (default: the recipe's eval.bleu_samples).
        output: where eval_report.json goes (default: a run or checkpoint dir itself; for a hub model
            ./runs/eval/ORG--NAME-REV).

    Returns:
        the report, with `output_dir` added.
    """
    from lmkit.evaluation import evaluate_model

    return evaluate_model(os.fspath(model), data=None if data is None else os.fspath(data), num_samples=num_samples,
                          output=None if output is None else os.fspath(output), hub=hub)


def push(run_dir: str | os.PathLike, name: str, hub: str | os.PathLike | None = None,
         message: str | None = None) -> str:
    """Publish a run, checkpoint or tokenizer dir as a new revision of `name` (org/name); returns "org/name@rev"."""
    return hub_lib.push(run_dir, name, hub, message=message)


def export(model: str | os.PathLike, output_dir: str | os.PathLike, format: str = "auto",
           hub: str | os.PathLike | None = None, *, output_key: str = "output_dir") -> Path:
    """Write `model` (a run dir, checkpoint or hub name) as a stock transformers model that loads without lmkit.

    Args:
        format: `gpt2`, `gpt-neox`, or `auto` (learned and sinusoidal positions -> gpt2, rope -> gpt-neox).
        output_key: what errors about `output_dir` call it (the CLI's `--output`).

    Returns:
        `output_dir`, which `transformers.pipeline("text-generation", model=...)` and `from_pretrained` load.
    """
    from lmkit.atomic import check_writable_dir
    from lmkit.exporting import export_model

    hub_lib.refuse_inside_hub(output_dir, output_key, hub)
    check_writable_dir(output_dir, output_key)
    return export_model(hub_lib.resolve(os.fspath(model), hub), output_dir, format=format)


def generate(model: str | os.PathLike, prompt: str, stream: "Callable[[str], None] | BaseStreamer | None" = None,
             hub: str | os.PathLike | None = None, **settings) -> str:
    """Continue `prompt` with a run dir, checkpoint, export or hub name; returns the generated text (`lmkit generate`).

    Args:
        stream: a callback that gets each new piece of text as it is decoded, or a transformers streamer.
        settings: `max_new_tokens` (64), `temperature` (0.8; 0 = greedy), `top_k` (50; 0 = off), `top_p` (0.95;
            1 = off), `seed` (0): see `lmkit.generation.GenerateSettings`.
    """
    from lmkit import loading
    from lmkit.generation import GenerateSettings, stream_generate

    checked = GenerateSettings(**settings)  # before loading: a bad value fails in the first second
    path = str(hub_lib.resolve(os.fspath(model), hub))  # resolve (and verify) a hub revision once
    return stream_generate(loading.load_model(path), loading.load_tokenizer(path), prompt, stream, checked)
