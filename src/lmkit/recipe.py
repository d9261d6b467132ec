"""The recipe's schema: the sections of a run, the checks across them, and the resolved form saved with a run.

A recipe has nine sections (`data`, `tokenizer` and `training` required, the rest optional), each owned by the
module that uses it:

    data:       lmkit.data.DataArgs
    tokenizer:  TokenizerArgs (below): `path` to a trained tokenizer, or `train:` an inline
                lmkit.tokenization.TokenizerSpec
    model:      keyword arguments of lmkit.configuration.LmkitConfig, plus `init_from`, or `size` (lmkit.sizing)
    training:   transformers.TrainingArguments, verbatim: every field works and lmkit re-declares none
    eval:       lmkit.evaluation.EvalArgs
    hub:        lmkit.hub.HubArgs
    finetune:   lmkit.adapters.FinetuneArgs (full fine-tuning, or LoRA adapters on `model.init_from`)
    optimizer:  lmkit.optimizers.OptimizerArgs (the Trainer's AdamW, or Muon on the hidden matrices)
    budget:     lmkit.budget.BudgetArgs (a wall-time budget; the clock decides the steps: lmkit.deadline)

Reading the YAML, the dotted `key=value` overrides and the per-field checks are `lmkit.settings`'. The `training:`
values are checked against TrainingArguments' own annotations plus the ranges the Trainer only enforces mid-run.
Loading has no side effects; the checks that touch the filesystem are `lmkit.training.preflight`.
"""

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from transformers import TrainingArguments

from lmkit import deadline, sizing
from lmkit.adapters import FinetuneArgs
from lmkit.atomic import atomic_write_text
from lmkit.budget import BudgetArgs
from lmkit.configuration import LmkitConfig
from lmkit.data import DataArgs
from lmkit.errors import UserError
from lmkit.evaluation import EvalArgs, needs_bleu
from lmkit.hub import HubArgs
from lmkit.optimizers import OptimizerArgs
from lmkit.settings import (
    SettingError,
    annotation_of,
    apply_overrides,
    as_mapping,
    build_section,
    check_fields,
    check_keys,
    check_value,
    read_yaml_mapping,
    setting,
)
from lmkit.tokenization import TokenizerSpec

SECTIONS = ("data", "tokenizer", "model", "training", "eval", "hub", "finetune", "optimizer", "budget")


@dataclass
class TokenizerArgs:
    """How a run gets its tokenizer: exactly one of `path` and `train`."""

    path: str | None = setting(None, "A trained tokenizer dir, run dir or hub name org/name[@rev].")
    train: Any = setting(None, "An inline tokenizer spec (see tokenizer_training/); trained on the train split only.")
    chat_template: str | None = setting(
        None, "data.format messages: the chat template, 'chatml' (built in) or a .jinja file; its <|...|> markers "
        "become special tokens. null = the template the tokenizer of tokenizer.path already has.",
    )

    def __post_init__(self):
        check_fields(self, "tokenizer")
        if (self.path is None) == (self.train is None):
            raise UserError("tokenizer: give exactly one of tokenizer.path (a trained tokenizer) "
                            "or tokenizer.train (a spec)")
        if self.chat_template == "":
            raise SettingError("chat_template", "must be chatml or the path of a .jinja file, got ''", "tokenizer")


@dataclass
class Recipe:
    """A loaded, validated recipe. `resolved` is the plain-dict form saved as recipe.yaml in the run dir."""

    data: Any
    tokenizer: TokenizerArgs
    model: dict
    training: Any
    eval: Any
    hub: Any
    source: str
    resolved: dict
    finetune: FinetuneArgs = dataclasses.field(default_factory=FinetuneArgs)
    budget: BudgetArgs = dataclasses.field(default_factory=BudgetArgs)
    optimizer: OptimizerArgs = dataclasses.field(default_factory=OptimizerArgs)
    # model.size auto: the shape, and unless the recipe gives them the learning rate and the precision (bf16 or not),
    # are chosen at run time
    auto_model: bool = False
    auto_learning_rate: bool = False
    auto_precision: bool = False
    auto_optimizer: bool = False
    auto_weight_decay: bool = False

    def fix_tokenizer(self, spec: TokenizerSpec) -> None:
        """Train the tokenizer `spec` describes (automatic values decided), here and in the resolved recipe."""
        self.tokenizer.train = spec
        self.resolved["tokenizer"]["train"] = dataclasses.asdict(spec)

    def fix_model(self, shape: "sizing.Shape", bf16: bool = False, optimizer: str | None = None,
                  weight_decay: float | None = None) -> None:
        """Train the rung `shape` (what model.size auto chose) and, unless the recipe gave them, the `optimizer`
        (`optimizer.name`), its learning rate, the `weight_decay` and the precision `bf16` (the training arguments are
        rebuilt, as their derived settings follow bf16)."""
        self.model.update(shape.model_settings())
        self.resolved["model"].update(shape.model_settings())
        if self.auto_optimizer and optimizer is not None:
            self.optimizer.name = self.resolved["optimizer"]["name"] = optimizer
        changes = {}
        if self.auto_learning_rate:
            changes["learning_rate"] = sizing.learning_rate(shape.n_embd, self.optimizer.name)
        if self.auto_precision:
            changes["bf16"] = bf16
        if self.auto_weight_decay and weight_decay is not None:
            changes["weight_decay"] = weight_decay
        if changes:
            self.resolved["training"].update(changes)
            self.training = dataclasses.replace(self.training, **changes)
        self.auto_model = self.auto_learning_rate = self.auto_precision = self.auto_optimizer = False
        self.auto_weight_decay = False

    def fix_steps(self, steps: int, schedule: dict | None = None) -> None:
        """Train exactly `steps` steps (what a time budget came to), and the learning rates of `schedule` (the
        `budget:` keys of `lmkit.deadline.Schedule.recorded`), here and in the resolved recipe."""
        self.budget.steps = self.training.max_steps = steps
        self.resolved["budget"]["steps"] = self.resolved["training"]["max_steps"] = steps
        for key, value in (schedule or {}).items():
            setattr(self.budget, key, value)
            self.resolved["budget"][key] = value

    def dump(self, path: str | os.PathLike) -> None:
        """Save the resolved recipe (overrides applied, lmkit defaults filled in) atomically."""
        header = f"# Resolved recipe, from {self.source}. Re-run with: lmkit train <this file>\n"
        atomic_write_text(path, header + yaml.safe_dump(self.resolved, sort_keys=False, allow_unicode=True))


def model_config_keys() -> list[str]:
    """The keys `model:` accepts: LmkitConfig's architecture fields, except what the tokenizer derives, plus init_from
    and size (`lmkit.sizing`)."""
    derived = {"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"}
    return [name for name in LmkitConfig.architecture_keys() if name not in derived] + ["init_from", "size"]


# Ranges of the TrainingArguments fields that the Trainer accepts at construction and only rejects mid-run (a zero
# batch size fails in the DataLoader after the data stage, zero logging/eval/save steps divide by zero).
TRAINING_RANGES = {
    "per_device_train_batch_size": {"minimum": 1}, "per_device_eval_batch_size": {"minimum": 1},
    "gradient_accumulation_steps": {"minimum": 1}, "eval_accumulation_steps": {"minimum": 1},
    "num_train_epochs": {"above": 0}, "learning_rate": {"above": 0}, "weight_decay": {"minimum": 0},
    "adam_beta1": {"minimum": 0, "below": 1}, "adam_beta2": {"minimum": 0, "below": 1}, "adam_epsilon": {"above": 0},
    "max_grad_norm": {"minimum": 0}, "warmup_steps": {"minimum": 0},
    "logging_steps": {"above": 0}, "eval_steps": {"above": 0}, "save_steps": {"above": 0},
    "save_total_limit": {"minimum": 1}, "seed": {"minimum": 0}, "data_seed": {"minimum": 0},
    "dataloader_num_workers": {"minimum": 0}, "dataloader_prefetch_factor": {"minimum": 1},
    "label_smoothing_factor": {"minimum": 0, "below": 1}, "eval_delay": {"minimum": 0},
}


def check_training_values(given: dict, source: str) -> None:
    """Type and range checks of the given `training:` values, from TrainingArguments' own annotations plus
    `TRAINING_RANGES`, so a bad value stops here and not in the middle of a run."""
    for key, value in given.items():
        try:
            check_value(key, value, annotation_of(TrainingArguments, key), TRAINING_RANGES.get(key, {}))
        except SettingError as exc:
            raise exc.located("training", source) from None
    if not given.get("output_dir"):
        raise UserError(f"{source}: training.output_dir is required (the run directory), got "
                        f"{given.get('output_dir')!r}")
    max_steps = given.get("max_steps", -1)
    if max_steps == 0 or max_steps < -1:
        raise UserError(f"{source}: training.max_steps must be >= 1, or -1 to train num_train_epochs, got {max_steps}")


def build_training_args(values: dict | None, source: str, derived: dict | None = None):
    """`TrainingArguments(**training)` verbatim; on a machine without CUDA, `use_cpu` is set unless the recipe says.

    `derived` holds defaults that other sections imply (a recipe value wins over them).
    """
    given = as_mapping(values, "training", source)
    check_keys(given, [f.name for f in dataclasses.fields(TrainingArguments) if f.init], "training", source)
    check_training_values(given, source)
    # Derived defaults stay out of the resolved recipe, so the same recipe still uses a GPU on a machine that has one.
    # lmkit's model uses every parameter in every step, so DDP's search for unused ones is wasted work.
    values = {"report_to": ["tensorboard"], "ddp_find_unused_parameters": False, **(derived or {}), **given}
    if "use_cpu" not in given and not torch.cuda.is_available():
        values["use_cpu"] = True
    try:
        return TrainingArguments(**values), given
    except (TypeError, ValueError) as exc:
        message = " ".join(str(exc).split())
        raise UserError(f"{source}: section 'training': {message}") from None


def check_fits_positions(data, eval_args, n_positions: int, source: str, what: str) -> None:
    """Training blocks and BLEU prompt + continuation must fit the model's positions."""
    if data.block_size > n_positions:
        raise UserError(f"{source}: data.block_size ({data.block_size}) exceeds {what} ({n_positions})")
    if data.format != "text":  # the prompt (or conversation) is cut from the left to leave room for the reply
        if eval_args.bleu_samples and eval_args.max_new_tokens >= n_positions:
            raise UserError(f"{source}: eval.max_new_tokens ({eval_args.max_new_tokens}) leaves no room for a prompt "
                            f"in {what} ({n_positions})")
        return
    window = eval_args.prompt_tokens + eval_args.max_new_tokens
    if eval_args.bleu_samples and window > n_positions:
        raise UserError(f"{source}: eval.prompt_tokens + eval.max_new_tokens ({window}) "
                        f"exceeds {what} ({n_positions})")


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """Load a recipe YAML, apply dotted overrides, build and cross-check every section.

    Raises:
        UserError: for a missing file, invalid YAML, an unknown key (with a suggestion) or an invalid value.
    """
    return recipe_from_tree(read_yaml_mapping(path), overrides, str(path))


def recipe_from_tree(tree: dict, overrides: list[str] = (), source: str = "<recipe>") -> Recipe:
    """`load_recipe` of a recipe already in memory (e.g. `lmkit.sizing.auto_recipe`), named `source` in errors."""
    tree = apply_overrides(tree, list(overrides), source)
    if tree.get("tokenizer") == sizing.AUTO:  # the short form of tokenizer.train: {kind: auto, vocab_size: auto}
        tree["tokenizer"] = {"train": {"kind": sizing.AUTO, "vocab_size": sizing.AUTO}}
    check_keys(tree, list(SECTIONS), "<top level>", source)
    for name in ("data", "training"):
        if name not in tree:
            raise UserError(f"{source}: section '{name}' is required")

    data = build_section(DataArgs, tree.get("data"), "data", source)
    tokenizer = build_section(TokenizerArgs, tree.get("tokenizer"), "tokenizer", source)
    if tokenizer.train is not None:
        tokenizer.train = build_section(TokenizerSpec, tokenizer.train, "tokenizer.train", source)
    model = as_mapping(tree.get("model"), "model", source)
    check_keys(model, model_config_keys(), "model", source)
    budget = build_section(BudgetArgs, tree.get("budget"), "budget", source)
    training_tree = tree.get("training")
    auto_model = model.get("size") == sizing.AUTO
    given_training = training_tree if isinstance(training_tree, dict) else {}
    auto_learning_rate = auto_model and "learning_rate" not in given_training
    auto_weight_decay = auto_model and "weight_decay" not in given_training
    # On a CUDA GPU with bf16 it is the rule (sizing.expand_size); elsewhere it is measured.
    auto_precision = (auto_model and not {"bf16", "fp16"} & set(given_training)
                      and not sizing.bf16_is_faster())
    if "size" in model and "init_from" in model:
        raise UserError(f"{source}: model.size sizes a new model, but model.init_from starts from an existing one; "
                        "give one of them")
    optimizer_tree = as_mapping(tree.get("optimizer"), "optimizer", source)
    auto_optimizer = auto_model and "name" not in optimizer_tree
    if "size" in model:
        model, training_tree, optimizer_tree = sizing.expand_size(
            model, as_mapping(training_tree, "training", source), optimizer_tree, data.block_size,
            budget.time is not None, source)
    if budget.steps is not None and isinstance(training_tree, dict):
        training_tree = {**training_tree, "max_steps": budget.steps}  # what a budget resolved to, exactly
    if tokenizer.chat_template is not None and data.format != "messages":
        raise UserError(f"{source}: tokenizer.chat_template is for conversations: it needs data.format: messages, got "
                        f"data.format: {data.format}")
    if data.format == "messages" and tokenizer.train is not None and tokenizer.chat_template is None:
        raise UserError(f"{source}: data.format messages needs a chat template: set tokenizer.chat_template (chatml "
                        "or a .jinja file); a tokenizer trained in the run has none")
    # Pairs and conversations are padded, so batches of similar lengths waste the least padding.
    derived = {"train_sampling_strategy": "group_by_length"} if data.format != "text" else {}
    training, training_values = build_training_args(training_tree, source, derived)
    if budget.time is not None or budget.warmup_steps is not None:  # the schedules the clock can drive
        deadline.decay_shape(training.lr_scheduler_type, training.lr_scheduler_kwargs, source)
    deadline.decay_share(training.lr_scheduler_type, training.lr_scheduler_kwargs, source)
    eval_args = build_section(EvalArgs, tree.get("eval"), "eval", source)
    hub = build_section(HubArgs, tree.get("hub"), "hub", source)
    finetune = build_section(FinetuneArgs, tree.get("finetune"), "finetune", source)
    optimizer = build_section(OptimizerArgs, optimizer_tree, "optimizer", source)
    if optimizer.name == "muon" and finetune.method == "lora":
        raise UserError(f"{source}: optimizer.name muon trains full weight matrices; a LoRA run (finetune.method "
                        "lora) trains low-rank adapters: use optimizer.name adamw")
    if finetune.method == "lora" and "init_from" not in model:
        raise UserError(f"{source}: finetune.method lora adapts an existing model: "
                        "set model.init_from (a run dir, hub name or GPT-2 directory)")
    if finetune.method == "lora" and hub.push == "every_save":
        raise UserError(f"{source}: hub.push every_save cannot publish a LoRA run's checkpoints "
                        "(they hold the adapter only); use hub.push: end, which publishes the merged model "
                        "with the adapter")

    # Cross-section checks. The model config is built once with a placeholder vocabulary so that its own validation
    # (n_embd % n_head, position type, ...) runs here, before any data is read.
    if "init_from" not in model:
        # Until model.size auto is decided, the smallest rung stands in for the shape (all rungs pass the same checks).
        placeholder = sizing.LADDER[0].model_settings() if auto_model else {}
        try:
            config = LmkitConfig(**{**model, **placeholder}, vocab_size=8)
        except UserError as exc:
            raise UserError(f"{source}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise UserError(f"{source}: section 'model': {exc}") from None
        check_fits_positions(data, eval_args, config.n_positions, source, "model.n_positions")
    if needs_bleu(training) and not eval_args.bleu_samples:
        raise UserError(f"{source}: training.metric_for_best_model is {training.metric_for_best_model} but "
                        "eval.bleu_samples is 0, so no BLEU is computed")

    resolved = {
        "data": dataclasses.asdict(data),
        "tokenizer": ({"path": tokenizer.path} if tokenizer.path else {"train": dataclasses.asdict(tokenizer.train)})
        | ({"chat_template": tokenizer.chat_template} if tokenizer.chat_template is not None else {}),
        "model": model,
        "training": training_values,
        "eval": dataclasses.asdict(eval_args),
        "hub": dataclasses.asdict(hub),
        "finetune": dataclasses.asdict(finetune),
        "optimizer": dataclasses.asdict(optimizer),
        "budget": dataclasses.asdict(budget),
    }
    return Recipe(
        data=data, tokenizer=tokenizer, model=model, training=training, eval=eval_args, hub=hub,
        source=source, resolved=resolved, finetune=finetune, budget=budget, optimizer=optimizer, auto_model=auto_model,
        auto_learning_rate=auto_learning_rate, auto_precision=auto_precision, auto_optimizer=auto_optimizer,
        auto_weight_decay=auto_weight_decay,
    )
