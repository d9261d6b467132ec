"""The recipe schema: every shipped YAML validates, overrides are typed, unknown keys are named with a suggestion."""

import dataclasses
from pathlib import Path

import pytest
import yaml
from transformers import TrainingArguments

from lmkit.errors import UserError
from lmkit.recipe import load_recipe
from lmkit.settings import apply_overrides, build_section, read_yaml_mapping
from lmkit.tokenization import TokenizerSpec

REPO = Path(__file__).resolve().parents[1]
# accelerate_configs: launch topologies; lm-eval: an lm-evaluation-harness task (README step 9), not lmkit recipes
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if not {"accelerate_configs", "lm-eval"} & set(p.parts))
ACCELERATE_CONFIGS = sorted((REPO / "recipes" / "accelerate_configs").glob("*.yaml"))
TOKENIZER_SPECS = sorted((REPO / "tokenizer_training").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


MINIMAL = """
data: {files: [corpus.jsonl], block_size: 32}
tokenizer: {train: {kind: char, vocab_size: 100}}
model: {n_layer: 2, n_head: 2, n_embd: 32, n_positions: 64}
training: {output_dir: OUT, max_steps: 3}
"""


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.training.output_dir
    assert recipe.data.block_size > 0


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_every_accelerate_config_parses(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes >= 1
    assert config.mixed_precision == "no", "precision has one owner: the recipe's training.bf16/fp16"


@pytest.mark.parametrize("path", TOKENIZER_SPECS, ids=lambda p: p.name)
def test_every_tokenizer_spec_validates(path):
    spec = build_section(TokenizerSpec, read_yaml_mapping(path), "tokenizer spec", str(path))
    assert spec.kind in ("bpe", "char", "word")
    assert spec.output_dir


def test_shipped_yaml_exists():
    assert RECIPES and ACCELERATE_CONFIGS and TOKENIZER_SPECS


def test_overrides_are_typed_by_yaml_rules(tmp_path):
    path = write(tmp_path, MINIMAL.replace("OUT", str(tmp_path / "run")))
    recipe = load_recipe(
        path,
        ["training.learning_rate=3e-4", "data.packing=false", "data.files=[a.txt, b.txt]",
         "training.lr_scheduler_type=cosine", "model.position_embedding_type=sinusoidal", "eval.bleu_samples=7",
         "training.eval_strategy=no"],
    )
    # YAML 1.2 scalars: `no` stays a string (YAML 1.1 would make it False), `3e-4` is a float (1.1: a string)
    assert recipe.training.eval_strategy.value == "no"
    assert recipe.training.learning_rate == pytest.approx(3e-4)
    assert recipe.data.packing is False
    assert recipe.data.files == ["a.txt", "b.txt"]
    assert recipe.training.lr_scheduler_type.value == "cosine"
    assert recipe.model["position_embedding_type"] == "sinusoidal"
    assert recipe.eval.bleu_samples == 7
    assert recipe.resolved["training"]["learning_rate"] == pytest.approx(3e-4)


def test_training_section_accepts_every_trainingarguments_field():
    # `training:` is TrainingArguments verbatim: the schema must not hide or re-declare any field.
    from lmkit.settings import check_keys

    fields = [f.name for f in dataclasses.fields(TrainingArguments) if f.init]
    check_keys({name: None for name in fields}, fields, "training", "x")  # all accepted
    with pytest.raises(UserError, match="did you mean 'learning_rate'"):
        check_keys({"learning_rte": 1}, fields, "training", "x")


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.learning_rte=1e-3", "unknown key 'training.learning_rte' (did you mean 'learning_rate'?)"),
        ("data.blocksize=64", "unknown key 'data.blocksize' (did you mean 'block_size'?)"),
        ("model.n_embed=64", "unknown key 'model.n_embed' (did you mean 'n_embd'?)"),
        ("eval.bleu_sample=3", "unknown key 'eval.bleu_sample' (did you mean 'bleu_samples'?)"),
        ("hub.nme=a/b", "unknown key 'hub.nme' (did you mean 'name'?)"),
        ("tokenizer.train.vocabsize=10", "unknown key 'tokenizer.train.vocabsize' (did you mean 'vocab_size'?)"),
        ("trainig.seed=1", "unknown key '<top level>.trainig' (did you mean 'training'?)"),
    ],
)
def test_unknown_keys_are_named_with_a_suggestion(tmp_path, override, message):
    path = write(tmp_path, MINIMAL.replace("OUT", str(tmp_path / "run")))
    with pytest.raises(UserError) as info:
        load_recipe(path, [override])
    assert message in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.n_head=3", "n_head"),
        ("model.position_embedding_type=spiral", "position_embedding_type"),
        ("data.block_size=128", "exceeds model.n_positions"),
        ("training.lr_scheduler_type=sideways", "training"),
        ("hub.push=end", "hub.name"),
        ("eval.max_new_tokens=0", "eval.max_new_tokens"),
        ("data.test_size=1.5", "test_size"),
        ("tokenizer.train.kind=morse", "kind"),
        ("tokenizer=runs/tokenizers/bpe-en", "section 'tokenizer' must be a mapping"),
        ("eval=5", "section 'eval' must be a mapping"),
        ("eval.prompt_tokens=60", r"eval.prompt_tokens \+ eval.max_new_tokens \(92\) exceeds model.n_positions"),
        ("training.metric_for_best_model=eval_bleu eval.bleu_samples=0", "no BLEU is computed"),
    ],
)
def test_bad_values_are_user_errors(tmp_path, override, fragment):
    path = write(tmp_path, MINIMAL.replace("OUT", str(tmp_path / "run")))
    with pytest.raises(UserError, match=fragment):
        load_recipe(path, override.split())


def test_tokenizer_needs_exactly_one_source(tmp_path):
    path = write(tmp_path, MINIMAL.replace("OUT", str(tmp_path / "run")))
    with pytest.raises(UserError, match="exactly one of tokenizer.path"):
        load_recipe(path, ["tokenizer.path=some/tokenizer"])


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml: not valid YAML \(line"):
        load_recipe(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_recipe(listing)


def test_malformed_override():
    with pytest.raises(UserError, match="expected key.path=value"):
        apply_overrides({}, ["training.seed"], "x")
    with pytest.raises(UserError, match="is not a section"):
        apply_overrides({"training": 3}, ["training.seed=1"], "x")


def test_resolved_recipe_round_trips(tmp_path):
    path = write(tmp_path, MINIMAL.replace("OUT", str(tmp_path / "run")))
    recipe = load_recipe(path, ["training.seed=7"])
    saved = tmp_path / "resolved.yaml"
    recipe.dump(saved)
    again = load_recipe(saved)
    assert again.resolved == recipe.resolved
    assert yaml.safe_load(saved.read_text())["training"]["seed"] == 7
    # derived values (use_cpu on a machine without CUDA) are not frozen into the saved recipe
    assert "use_cpu" not in again.resolved["training"]
