"""Automatic sizing (`lmkit.sizing`): the tokenizer from the script and size of the corpus, the model rung from the
measured step time and the budget, `model.size` in recipes, and `lmkit train --data FILES --time T --output DIR`.

The end-to-end run reads German jokes (tests/fixtures/de-jokes.jsonl): a language and a package the sizing study
(benchmarks/bench_sizing.py) does not read, so the rules are not checked on the text they were fitted to.
"""

import json
from pathlib import Path

import pytest
import yaml

from lmkit import sizing
from lmkit.cjk import cjk_share
from lmkit.cli import main
from lmkit.errors import UserError
from lmkit.recipe import recipe_from_tree
from lmkit.tokenization import TokenizerSpec


def test_cjk_share_counts_cjk_among_the_non_space_characters():
    assert cjk_share(["床前明月光"]) == 1.0
    assert cjk_share(["Привет, мир", "hello world"]) == 0.0
    assert cjk_share(["ひらがな abcd"]) == 0.5  # 4 kana, 4 latin letters; the space does not count
    assert cjk_share(["   "]) == 0.0


def test_auto_tokenizer_is_word_level_for_cjk_text_and_bpe_otherwise():
    auto = TokenizerSpec(kind="auto", vocab_size="auto")
    chinese = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。"] * 20
    spec = sizing.choose_tokenizer(auto, lambda: iter(chinese))
    assert (spec.kind, spec.vocab_size) == ("word", sizing.CHAR_VOCAB_SIZE) and not spec.is_auto

    english = ["The quick brown fox jumps over the lazy dog."] * 20
    spec = sizing.choose_tokenizer(auto, lambda: iter(english))
    train_bytes = sum(len(t.encode()) for t in english)
    assert (spec.kind, spec.vocab_size) == ("bpe", sizing.bpe_vocab_size(train_bytes))

    # a given value stays: only what is auto is chosen
    spec = sizing.choose_tokenizer(TokenizerSpec(kind="auto", vocab_size=600), lambda: iter(english))
    assert (spec.kind, spec.vocab_size) == ("bpe", 600)
    spec = sizing.choose_tokenizer(TokenizerSpec(kind="word", vocab_size="auto"), lambda: iter(english))
    assert spec.kind == "word" and isinstance(spec.vocab_size, int)


def test_tokenizer_spec_accepts_auto_and_refuses_other_words():
    assert TokenizerSpec(kind="auto").is_auto and TokenizerSpec(vocab_size="auto").is_auto
    assert not TokenizerSpec().is_auto
    with pytest.raises(UserError, match="vocab_size must be an integer or auto, got 'big'"):
        TokenizerSpec(vocab_size="big")
    with pytest.raises(UserError, match="kind must be one of"):
        TokenizerSpec(kind="sentencepiece")


def test_choose_shape_takes_the_largest_rung_with_enough_tokens_per_parameter():
    timed = []

    def time_step(shape):  # a machine doing 6e10 parameter-tokens per second
        timed.append(shape)
        return shape.parameters * 2048 * 6 / 6e10

    shape, why = sizing.choose_shape(time_step, seconds=600, tokens_per_step=2048)
    tokens = {s: 600 * sizing.TRAINING_SHARE / (s.parameters * 2048 * 6 / 6e10) * 2048 for s in sizing.LADDER}
    enough = [s for s in sizing.LADDER if tokens[s] / s.parameters >= sizing.TOKENS_PER_PARAMETER]
    assert 1 < len(enough) < len(sizing.LADDER)
    assert shape == enough[-1], why
    assert shape.name in why and "tokens per parameter" in why
    assert timed == list(sizing.LADDER[: len(enough) + 1]), "timing stops at the first rung that falls short"

    slow, _ = sizing.choose_shape(lambda s: 1e6, seconds=60, tokens_per_step=2048)
    assert slow == sizing.LADDER[0], "with no rung fitting, the smallest one trains"


def test_learning_rate_shrinks_with_width_and_is_capped():
    assert sizing.learning_rate(64) == sizing.LR_MAX
    assert sizing.learning_rate(768) == pytest.approx(sizing.LR_WIDTH / 768, rel=1e-3)
    rates = [sizing.learning_rate(s.n_embd) for s in sizing.LADDER]
    assert rates == sorted(rates, reverse=True)


def _tree(tmp_path: Path, fixtures: Path, **sections) -> dict:
    tree = {"data": {"files": [str(fixtures / "de-jokes.jsonl")], "block_size": 64},
            "tokenizer": {"train": {"kind": "bpe", "vocab_size": 400}},
            "training": {"output_dir": str(tmp_path / "run")}}
    tree.update(sections)
    return tree


def test_model_size_rung_sets_the_shape_its_learning_rate_and_the_automatic_defaults(tmp_path, fixtures):
    recipe = recipe_from_tree(_tree(tmp_path, fixtures, model={"size": "0.8M"}))
    rung = sizing.RUNGS["0.8M"]
    assert {k: recipe.model[k] for k in ("n_layer", "n_head", "n_embd")} == rung.model_settings()
    assert recipe.model["n_positions"] == 64 and recipe.model["position_embedding_type"] == "rope"
    assert "size" not in recipe.resolved["model"], "the resolved recipe holds plain values"
    rate = sizing.learning_rate(128, "muon")
    assert recipe.training.learning_rate == recipe.resolved["training"]["learning_rate"] == rate
    assert rate == 2 * sizing.learning_rate(128) == sizing.MUON_LR_SCALE * sizing.LR_MAX
    assert recipe.training.lr_scheduler_type == "cosine" and recipe.resolved["training"]["warmup_steps"] == 0.05
    assert recipe.optimizer.name == "muon" and recipe.resolved["optimizer"]["name"] == "muon"
    assert recipe.model["activation_function"] == "relu2" and recipe.model["tie_word_embeddings"] is False
    assert not recipe.auto_model

    # the recipe's own optimizer wins, and the rung's rate is AdamW's then
    adamw = recipe_from_tree(_tree(tmp_path, fixtures, model={"size": "0.8M"}, optimizer={"name": "adamw"}))
    assert adamw.optimizer.name == "adamw" and adamw.training.learning_rate == sizing.learning_rate(128)

    # the recipe's own values win over the rung's defaults
    recipe = recipe_from_tree(_tree(tmp_path, fixtures, model={"size": "0.8M", "position_embedding_type": "learned"},
                                    training={"output_dir": str(tmp_path / "run"), "learning_rate": 1e-4}))
    assert recipe.model["position_embedding_type"] == "learned" and recipe.training.learning_rate == 1e-4


def test_model_size_auto_waits_for_the_run_and_fix_model_records_the_choice(tmp_path, fixtures):
    recipe = recipe_from_tree(_tree(tmp_path, fixtures, model={"size": "auto"}, budget={"time": "1m"}))
    assert recipe.auto_model and recipe.auto_learning_rate and "n_layer" not in recipe.model
    recipe.fix_model(sizing.RUNGS["1.8M"], weight_decay=0.3)
    assert recipe.resolved["model"]["n_embd"] == 192 and recipe.model["n_layer"] == 4
    rate = sizing.learning_rate(192, "muon")
    assert recipe.resolved["training"]["learning_rate"] == recipe.training.learning_rate == rate
    assert recipe.resolved["training"]["weight_decay"] == recipe.training.weight_decay == 0.3

    given = recipe_from_tree(_tree(tmp_path, fixtures, model={"size": "auto"}, budget={"time": "1m"},
                                   training={"output_dir": str(tmp_path / "run"), "learning_rate": 1e-4,
                                             "weight_decay": 0.05}))
    given.fix_model(sizing.RUNGS["1.8M"], weight_decay=0.3)
    assert given.training.learning_rate == 1e-4, "a learning rate the recipe gives is kept"
    assert given.training.weight_decay == given.resolved["training"]["weight_decay"] == 0.05, "and its weight decay"


@pytest.mark.parametrize("model, budget, message", [
    ({"size": "huge"}, None, "model.size must be auto or one of 0.1M, 0.3M, 0.8M"),
    ({"size": "0.8M", "n_layer": 2}, None, "model.size (0.8M) sets n_layer, n_head and n_embd; remove model.n_layer"),
    ({"size": "auto"}, None, "model.size auto sizes the model to a time budget: give --time"),
    ({"size": "auto", "init_from": "some/model"}, {"time": "1m"}, "model.size sizes a new model, but model.init_from"),
])
def test_bad_model_size_is_one_clear_error(tmp_path, fixtures, model, budget, message):
    tree = _tree(tmp_path, fixtures, model=model, **({"budget": budget} if budget else {}))
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        recipe_from_tree(tree)


def test_train_without_a_recipe_names_what_is_missing(tmp_path, fixtures, capsys):
    assert main(["train", "--data", str(fixtures / "de-jokes.jsonl"), "--output", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == ("error: train: give a recipe file, or --data FILES --time DURATION --output DIR to size "
                     "everything automatically (missing: --time)")
    assert not (tmp_path / "run").exists()


def test_overrides_after_the_data_files_are_overrides(tmp_path, fixtures, capsys):
    argv = ["train", "--data", str(fixtures / "de-jokes.jsonl"), "data.no_such_key=1", "--time", "1m",
            "--output", str(tmp_path / "run")]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "no_such_key" in error and "de-jokes" not in error.split("no_such_key")[0].split("error:")[-1]
    assert not (tmp_path / "run").exists()


def test_standalone_tokenizer_spec_with_auto_values(tmp_path, fixtures):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"kind": "auto", "vocab_size": "auto", "files": [str(fixtures / "zh-poetry.jsonl")],
                                    "output_dir": str(tmp_path / "tok")}))
    assert main(["tokenizer", "train", str(spec)]) == 0
    stats = json.loads((tmp_path / "tok" / "tokenizer_stats.json").read_text())
    assert stats["kind"] == "word" and stats["spec"]["vocab_size"] == sizing.CHAR_VOCAB_SIZE
    assert stats["vocab_cjk_words"] > 100  # the poems' words, not just their characters


@pytest.mark.slow
def test_train_with_data_and_time_only_sizes_trains_evaluates_and_records_every_choice(tmp_path, fixtures, caplog):
    """The automatic path in a fast form: no recipe, a budget of seconds."""
    run = tmp_path / "run"
    argv = ["train", "--data", str(fixtures / "de-jokes.jsonl"), "--time", "30s", "--output", str(run)]
    with caplog.at_level("INFO", logger="lmkit"):
        assert main(argv) == 0
    log = caplog.text
    for reason in ("tokenizer.kind auto: bpe", "tokenizer.vocab_size auto:", "model.size auto:",
                   "training.learning_rate:", "training.bf16:", "steps fit", "the decay starts at step",
                   "optimizer.name:", "training.weight_decay:"):
        assert reason in log, f"the log says why: {reason!r} missing"

    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    spec = resolved["tokenizer"]["train"]
    assert spec["kind"] == "bpe" and isinstance(spec["vocab_size"], int)
    shape = sizing.Shape(resolved["model"]["n_layer"], resolved["model"]["n_head"], resolved["model"]["n_embd"])
    assert shape in sizing.LADDER and "size" not in resolved["model"]
    # the optimizer follows how often the run will see its data (this small corpus: many times, so AdamW)
    optimizer = resolved["optimizer"]["name"]
    assert f"optimizer.name: {optimizer} (the run will see its data about" in log
    assert resolved["training"]["learning_rate"] == sizing.learning_rate(shape.n_embd, optimizer)
    assert resolved["model"]["activation_function"] == "relu2"
    budget = resolved["budget"]
    assert budget["steps"] == resolved["training"]["max_steps"] >= 1
    assert 0 <= budget["warmup_steps"] < budget["decay_start"] < budget["steps"] <= budget["decay_end"], budget
    assert isinstance(resolved["training"]["bf16"], bool), "the measured precision is recorded"
    weight_decay = resolved["training"]["weight_decay"]
    assert f"training.weight_decay: {weight_decay:g} (the run will see its data about" in log
    assert weight_decay == sizing.REPEATED_WEIGHT_DECAY or optimizer == "muon", "AdamW: past 12 epochs, so past 4"
    for key, value in {**sizing.TRAINING, "lr_scheduler_type": sizing.AUTO_SCHEDULE}.items():
        assert resolved["training"][key] == value or key == "weight_decay"

    results = json.loads((run / "eval_results.json").read_text())
    assert results["eval_bits_per_byte"] > 0 and "eval_bleu" in results
    config = json.loads((run / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"]) == (shape.n_layer, shape.n_embd)

    # the same command with --resume: the choices are the run's own, so nothing differs and nothing trains again
    caplog.clear()
    with caplog.at_level("INFO", logger="lmkit"):
        assert main([*argv, "--resume"]) == 0
    assert "already finished" in caplog.text


def test_median_step_leaves_the_warm_up_steps_out():
    from lmkit.budget import WARMUP_STEPS, median_step

    ends = [10.0 * index for index in range(WARMUP_STEPS)]  # slow warm-up steps
    for seconds in (1.0, 3.0, 2.0):
        ends.append(ends[-1] + seconds)
    assert median_step(ends) == 2.0


def test_a_small_corpus_gets_the_rung_its_tokens_allow_not_the_clocks():
    """The tokens-per-parameter rule counts what the run will see: at most MAX_EPOCHS passes over the corpus. 24 KB
    for an hour and a half once picked the 4.7M rung; its 7.5k tokens support the smallest."""

    def time_step(shape):  # a fast machine: 6e10 parameter-tokens per second
        return shape.parameters * 2048 * 6 / 6e10

    roomy, _ = sizing.choose_shape(time_step, seconds=5400, tokens_per_step=2048)
    small, why = sizing.choose_shape(time_step, seconds=5400, tokens_per_step=2048, corpus_tokens=7_500)
    assert roomy.parameters > 1e6 and small == sizing.LADDER[0], why
    assert f"({sizing.MAX_EPOCHS} epochs)" in why
    enough = 200_000_000 // sizing.MAX_EPOCHS  # a corpus big enough that the clock, not its size, decides
    assert sizing.choose_shape(time_step, seconds=5400, tokens_per_step=2048, corpus_tokens=enough)[0] == roomy


def test_a_budget_ends_after_max_epochs_and_says_so(caplog):
    import time

    from transformers import TrainingArguments

    from lmkit.budget import BudgetArgs, StepCosts, plan_schedule

    args = TrainingArguments(output_dir="unused", eval_strategy="no", logging_steps=10, save_strategy="no",
                             lr_scheduler_type="warmup_stable_decay", warmup_steps=0.05, report_to=[])
    costs = StepCosts(step=0.01, evaluation=0.1, save=0.1, final_save=0.1)
    budget = BudgetArgs(time="60s")
    schedule, steps, cap = plan_schedule(budget, time.time(), lambda limit: costs, args, steps_per_epoch=5)
    assert steps == cap == sizing.MAX_EPOCHS * 5 and schedule.warmup == 4 and schedule.clock_decay
    assert any("training stops after" in r.message and "overfit" in r.message for r in caplog.records)
    caplog.clear()
    _, few, cap = plan_schedule(budget, time.time(), lambda limit: costs, args, steps_per_epoch=1000)  # ~5.9 epochs
    assert sizing.REPEATS_WARNING < few / 1000 < sizing.MAX_EPOCHS and cap == sizing.MAX_EPOCHS * 1000
    assert any("will see its training data" in r.message for r in caplog.records)


@pytest.mark.parametrize("bf16_rounds, chosen", [
    ([0.80, 0.85, 0.88], True),  # every round at least 1.1x faster
    ([0.70, 0.70, 0.95], False),  # two lucky rounds on a busy machine do not decide
])
def test_bf16_needs_its_margin_in_every_round(monkeypatch, bf16_rounds, chosen):
    timer = sizing.StepTimer({}, [], None, try_bf16=True)
    monkeypatch.setattr(timer, "_time", lambda shape: {False: [1.0, 1.0, 1.0], True: bf16_rounds})
    seconds = timer(sizing.LADDER[0])
    assert timer.bf16[sizing.LADDER[0]] is chosen
    assert seconds == (sorted(bf16_rounds)[1] if chosen else 1.0)


def test_a_rung_timed_an_order_of_magnitude_off_its_neighbour_is_timed_again(caplog):
    timings = {sizing.LADDER[0]: [0.02], sizing.LADDER[1]: [0.5, 0.04]}  # a burst of load, then the real time

    def time_step(shape):
        return timings[shape].pop(0) if timings.get(shape) else 1e3

    with caplog.at_level("INFO", logger="lmkit.sizing"):
        shape, why = sizing.choose_shape(time_step, seconds=600, tokens_per_step=2048)
    assert "0.3M timed 500 ms/step, over 10x the rung below it: timed again, 40 ms" in caplog.text
    assert shape == sizing.LADDER[1] and "0.3M 40 ms/step" in why


def test_the_optimizer_follows_how_often_the_data_is_seen():
    assert sizing.optimizer_for(1.3) == "muon"
    assert sizing.optimizer_for(sizing.MUON_MAX_EPOCHS) == "muon"
    assert sizing.optimizer_for(sizing.MUON_MAX_EPOCHS + 0.5) == "adamw"
    assert sizing.optimizer_for(sizing.MAX_EPOCHS) == "adamw", "the epoch cap, where the 250 KB slice was measured"


def test_the_weight_decay_grows_with_how_often_the_data_is_seen():
    assert sizing.weight_decay_for(2.0) == sizing.weight_decay_for(sizing.REPEATS_WARNING) == 0.1
    assert sizing.weight_decay_for(sizing.REPEATS_WARNING + 0.5) == sizing.REPEATED_WEIGHT_DECAY == 0.3
    assert sizing.weight_decay_for(sizing.MAX_EPOCHS) == 0.3
