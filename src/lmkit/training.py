"""`lmkit train`: preflight → data → tokenizer → model → Trainer → train → evaluate → save → publish.

`preflight` runs every check that needs no data (also all of `lmkit validate`). The transformers `Trainer` owns the
loop; this module only wires the phases together. The `Trainer` methods lmkit overrides are `evaluate`, to add BLEU on
generated continuations and bits per byte to every evaluation, and `prediction_step`, which sums the loss and the
bytes those bits are over (`lmkit.evaluation.loss_sums`, as `lmkit eval` does).
"""

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, set_seed

from lmkit import adapters, chat, deadline, loading, optimizers, sizing, tokenization
from lmkit import budget as budget_lib
from lmkit import data as data_lib
from lmkit import hub as hub_lib
from lmkit import resume as resume_lib
from lmkit.atomic import atomic_write_json, atomic_write_text, check_writable_dir, follow_umask
from lmkit.callbacks import CheckpointCallback, MetricsFileCallback, plot_training_curves
from lmkit.configuration import LmkitConfig
from lmkit.data.corpus import resolve_files
from lmkit.errors import UserError
from lmkit.evaluation import (
    loss_sums,
    make_bleu_pairs,
    make_completion_task,
    make_conversation_task,
    needs_bleu,
    samples_markdown,
    score_bleu,
    score_completions,
)
from lmkit.generation import preserved_rng_state
from lmkit.metrics import bits_per_byte, evaluation_at, perplexity
from lmkit.modeling import LmkitForCausalLM
from lmkit.recipe import Recipe, check_fits_positions
from lmkit.run_dir import RunDir
from lmkit.settings import plain, read_yaml_mapping

logger = logging.getLogger(__name__)


class LmkitTrainer(Trainer):
    """A `Trainer` whose evaluation also generates held-out continuations and scores them with BLEU and chrF, and
    reports bits per byte; a budgeted run's learning rate follows its `lmkit.deadline.Schedule`."""

    def __init__(self, *args, bleu_pairs=(), completion_task=None, eval_args=None, schedule=None,
                 optimizer_args=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.schedule = schedule
        self.optimizer_args = optimizer_args  # lmkit.optimizers.OptimizerArgs; None: the Trainer's own
        self.bleu_pairs = list(bleu_pairs)
        self.completion_task = completion_task  # prompt→completion runs: held-out pairs instead of bleu_pairs
        self.eval_args = eval_args
        self.baseline_scores = None  # the baselines' scores: logged at the first evaluation only
        self.token_bytes = torch.tensor(tokenization.token_byte_lengths(self.processing_class), dtype=torch.float64)
        self.eval_totals = torch.zeros(2, dtype=torch.float64)  # nats and bytes of the evaluation under way

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.optimizer_args is not None and self.optimizer_args.name == "muon":
            model = self.model if model is None else model
            self.optimizer = optimizers.build(model, self.optimizer_args, self.args,
                                              set(self.get_decay_parameter_names(model)))
        return super().create_optimizer(model)

    def create_scheduler(self, num_training_steps, optimizer=None):
        args = self.args
        wsd = plain(args.lr_scheduler_type) == "warmup_stable_decay"
        if self.schedule is None and wsd and "num_decay_steps" not in (args.lr_scheduler_kwargs or {}):
            # transformers needs the decay's length; without a budget lmkit gives it its share of the run
            self.schedule = deadline.over_steps(num_training_steps, args.get_warmup_steps(num_training_steps),
                                                deadline.decay_shape(args.lr_scheduler_type, args.lr_scheduler_kwargs),
                                                deadline.decay_share(args.lr_scheduler_type, args.lr_scheduler_kwargs))
        if self.schedule is None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:  # the schedule's state (the clock's) is saved with the scheduler's
            self.lr_scheduler = LambdaLR(optimizer if optimizer is not None else self.optimizer, self.schedule)
        return self.lr_scheduler

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The Trainer's loss-only evaluation step, with the batch's summed loss and predicted bytes added to
        `eval_totals` (bits per byte needs sums; the Trainer keeps only per-batch means)."""
        if not prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            nats, tokens, n_bytes = loss_sums(model, inputs, self.token_bytes)
        self.eval_totals += torch.stack([nats.double().cpu(), n_bytes])
        return nats / max(tokens, 1), None, None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        # Evaluation must not move any random state, or a run with evaluations would train different weights.
        with preserved_rng_state(), self.data_collator.no_augmentation():
            self.eval_totals.zero_()
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            totals = self.eval_totals.to(self.args.device)
            if self.args.world_size > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            extra = {f"{metric_key_prefix}_perplexity": perplexity(metrics[f"{metric_key_prefix}_loss"])}
            bpb = bits_per_byte(float(totals[0]), float(totals[1]))
            if bpb is not None:
                extra[f"{metric_key_prefix}_bits_per_byte"] = bpb
            if self.bleu_pairs or self.completion_task:
                # Under FSDP every forward pass is a collective: all ranks generate through the sharded model in
                # lockstep (synced_gpus). Under DDP the unwrapped module generates alone, with no collective.
                model = self.model if self.is_fsdp_enabled else self.accelerator.unwrap_model(self.model)
                shared = (self.eval_args, self.args.process_index, self.args.world_size)
                if self.completion_task:
                    scores, rows = score_completions(model, self.processing_class, self.completion_task, *shared,
                                                     synced=self.is_fsdp_enabled)
                else:
                    scores, rows = score_bleu(model, self.processing_class, self.bleu_pairs, *shared,
                                              synced=self.is_fsdp_enabled)
                extra.update({f"{metric_key_prefix}_{k}": v for k, v in scores.items()
                              if not k.startswith("baseline_")})
                if self.baseline_scores is None:
                    self.baseline_scores = {f"{metric_key_prefix}_{k}": v for k, v in scores.items()
                                            if k.startswith("baseline_")}
                    extra.update(self.baseline_scores)
                if self.args.should_save:
                    step = self.state.global_step
                    table = samples_markdown(rows, f"Generations at step {step}")
                    atomic_write_text(RunDir(self.args.output_dir).samples_at(step), table)
        self.log(extra)  # a second log entry: the Trainer has already logged eval_loss before we could add to it
        metrics.update(extra)
        return metrics


def final_evaluation(trainer: LmkitTrainer) -> dict:
    """The evaluation of the final weights: reused from the log when training just evaluated them, else run now."""
    if trainer.args.load_best_model_at_end:
        return trainer.evaluate()  # the saved weights are the best checkpoint's, not the last step's
    logged = evaluation_at(trainer.state.log_history, trainer.state.global_step, exact=True)
    logged.pop("step", None)
    return logged if "eval_loss" in logged else trainer.evaluate()


def save_final_model(trainer: LmkitTrainer, run_dir: RunDir) -> None:
    """`save_model` into a temporary dir, then each file renamed into the run dir: no half-written weights.

    A LoRA run saves its adapter into the run's adapter dir first, then the merged model like any other.
    """
    staging = run_dir.final_model_staging
    if adapters.is_lora(trainer.model):
        if trainer.args.should_save:
            adapters.save_adapter(trainer.model, run_dir.adapter_dir)
        trainer.model = adapters.merge(trainer.model)  # the end of the run: the adapter model is not used again
    trainer.save_model(str(staging))
    if trainer.args.should_save:  # the process that wrote the staging dir (one per node with save_on_each_node)
        follow_umask(staging)  # save_pretrained writes the weights 0600 whatever the umask
        for path in staging.iterdir():
            os.replace(path, run_dir.path / path.name)
        staging.rmdir()


def find_resume_checkpoint(run_dir: RunDir) -> str | None:
    """The latest completely written checkpoint; half-written ones (the process died mid-save) are removed."""
    for partial in run_dir.incomplete_checkpoints():
        logger.warning("removing %s: it was being written when the run stopped", partial)
        shutil.rmtree(partial, ignore_errors=True)
    complete = run_dir.complete_checkpoints()
    return str(complete[-1]) if complete else None


def check_distributed(training_args) -> None:
    """Refuse the silent failure where several processes each train their own copy on the same data."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and training_args.world_size != world:
        raise UserError(
            f"{world} processes were launched but the Trainer is not distributed (world size "
            f"{training_args.world_size}); every rank would train its own copy on the same data. "
            "Launch with `accelerate launch` / `torchrun` without training.use_cpu overrides that disable it"
        )


def preflight(recipe: Recipe, resume: bool = False) -> None:
    """Every check `train` runs before it reads any data (and all `lmkit validate` runs): the launch, the output,
    cache and hub dirs, the corpus paths, the tokenizer and the model to start from.

    Raises:
        UserError: naming the recipe key and what is wrong with its value.
    """
    args, source = recipe.training, recipe.source
    check_distributed(args)
    sharded = bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")
    if recipe.optimizer.name == "muon" and sharded:
        raise UserError(f"{source}: optimizer.name muon orthogonalises whole weight matrices, which FSDP shards; "
                        "launch with DDP (recipes/accelerate_configs/multi-gpu-ddp.yaml) or set optimizer.name=adamw")
    run_dir = RunDir(args.output_dir)
    hub_lib.refuse_inside_hub(run_dir.path, "training.output_dir", recipe.hub.dir)
    check_writable_dir(run_dir.path, "training.output_dir")
    if not resume and (run_dir.complete_checkpoints() or run_dir.is_finished):
        raise UserError(f"training.output_dir {run_dir.path} already holds a run; pass --resume to continue it, or "
                        "choose another")
    try:
        resolve_files(recipe.data.files)
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None
    if recipe.data.cache_dir is not None:
        check_writable_dir(Path(recipe.data.cache_dir), "data.cache_dir")
    hub_path = hub_lib.hub_dir(recipe.hub.dir)
    if hub_path.exists() and not hub_path.is_dir():
        raise UserError(f"hub.dir {hub_path} is a file, expected a directory")
    if recipe.hub.push != "never":
        check_writable_dir(hub_path, "hub.dir")
    if recipe.tokenizer.path:
        located = _resolve_key(recipe, "tokenizer.path", recipe.tokenizer.path)
        if not (located / "tokenizer.json").is_file():
            raise UserError(f"{source}: tokenizer.path {recipe.tokenizer.path} has no tokenizer.json ({located})")
    if recipe.data.format == "messages":
        _check_chat_template(recipe)
    if "init_from" in recipe.model:
        located = _resolve_key(recipe, "model.init_from", recipe.model["init_from"])
        config = located / "config.json"
        if not config.is_file():
            raise UserError(f"{source}: model.init_from {recipe.model['init_from']} has no config.json ({located})")
        config_values = json.loads(config.read_text(encoding="utf-8"))
        n_positions = config_values.get("n_positions")
        if recipe.finetune.method == "lora" and isinstance(config_values, dict):
            adapters.check_lora(config_values, recipe.finetune)
        if isinstance(n_positions, int):
            check_fits_positions(recipe.data, recipe.eval, n_positions, source,
                                 f"the n_positions of model.init_from {recipe.model['init_from']}")


def _check_chat_template(recipe: Recipe) -> None:
    """The chat template parses, opens an assistant turn and ends replies with a special token: on the tokenizer of
    tokenizer.path, or on a stand-in for one the run will train."""
    tokenizer = loading.load_tokenizer(recipe.tokenizer.path, recipe.hub.dir) if recipe.tokenizer.path else None
    try:
        if recipe.tokenizer.chat_template is None:
            if not chat.has_template(tokenizer):
                raise UserError(f"data.format messages needs a chat template and tokenizer.path "
                                f"{recipe.tokenizer.path} has none: set tokenizer.chat_template (chatml or a .jinja "
                                f"file)")
            chat.end_of_turn(tokenizer, "the chat template of tokenizer.path")
        else:
            chat.check_template(chat.read_template(recipe.tokenizer.chat_template), tokenizer)
    except UserError as exc:
        raise UserError(f"{recipe.source}: {exc}") from None


def _resolve_key(recipe: Recipe, key: str, value) -> Path:
    if not isinstance(value, str) or not value:
        raise UserError(f"{recipe.source}: {key} must be a directory or a hub name org/name[@rev], got {value!r}")
    try:
        return hub_lib.resolve(value, recipe.hub.dir)
    except UserError as exc:
        raise UserError(f"{recipe.source}: {key}: {exc}") from None


def load_or_train_tokenizer(recipe: Recipe, splits, run_dir: RunDir, resume: bool):
    """The run's tokenizer: from `tokenizer.path`, or trained on the train split into the run's tokenizer dir; with
    `tokenizer.chat_template`, given that template (its markers added as special tokens)."""
    if recipe.tokenizer.path:
        tokenizer = loading.load_tokenizer(recipe.tokenizer.path, recipe.hub.dir)
        if tokenizer.pad_token is None:
            # GPT-2's own tokenizer has no pad token, and padding with EOS would teach the model never to stop:
            # add a dedicated one (build_model grows the embeddings by that one row).
            tokenizer.add_special_tokens({"pad_token": tokenization.PAD_TOKEN})
            logger.warning("tokenizer %s has no pad token: added %s", recipe.tokenizer.path, tokenization.PAD_TOKEN)
    else:
        target = run_dir.tokenizer_dir
        template = chat.read_template(recipe.tokenizer.chat_template) if recipe.tokenizer.chat_template else None
        if not (resume and (target / "tokenizer.json").is_file()):  # a resumed run reuses the tokenizer it trained
            if recipe.tokenizer.train.is_auto:
                recipe.fix_tokenizer(sizing.choose_tokenizer(recipe.tokenizer.train,
                                                             lambda: _texts(splits["train"], template)))
            tokenization.train_tokenizer(recipe.tokenizer.train, _texts(splits["train"], template), target,
                                         heldout_texts=_texts(splits["test"], template))
        tokenizer = tokenization.load_trained_tokenizer(target)
    if recipe.tokenizer.chat_template is not None:
        added = chat.add_template(tokenizer, chat.read_template(recipe.tokenizer.chat_template))
        if added:
            logger.info("chat template %s: added the special tokens %s (ids %s)", recipe.tokenizer.chat_template,
                        ", ".join(added), ", ".join(str(tokenizer.convert_tokens_to_ids(t)) for t in added))
    return tokenizer


def _texts(split, template: str | None = None):
    """The texts of a split: its documents, each pair's prompt and completion, or each conversation through the chat
    `template` without its markers (so role names and the template's text are in the vocabulary too)."""
    if "messages" in split.column_names:
        yield from (chat.plain_text(template, messages) for messages in split["messages"])
        return
    columns = ["text"] if "text" in split.column_names else ["prompt", "completion"]
    for batch in split.select_columns(columns).iter(batch_size=1024):
        for values in zip(*(batch[c] for c in columns)):
            yield from values


def build_model(recipe: Recipe, tokenizer):
    """A fresh `LmkitForCausalLM` sized by the tokenizer, or one initialised from `model.init_from` (with LoRA
    adapters when `finetune.method` is lora)."""
    settings = {k: v for k, v in recipe.model.items() if k != "init_from"}
    if "init_from" not in recipe.model:
        # The one place where vocabulary size and special ids enter the model: from the tokenizer.
        config = LmkitConfig(
            **settings, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        model = LmkitForCausalLM(config)
        _stop_at_end_of_turn(model, tokenizer)
        return model
    source = hub_lib.resolve(recipe.model["init_from"], recipe.hub.dir)
    model = loading.load_model(str(source))
    if settings:
        logger.warning("model.init_from is set: ignoring model.%s (the architecture comes from %s)",
                       list(settings), source)
    new_ids = list(range(model.config.vocab_size, len(tokenizer)))
    if new_ids and all(i in tokenizer.added_tokens_decoder for i in new_ids):
        grow_embeddings(model, tokenizer, new_ids)  # the pad token or chat markers added to the tokenizer
    if model.config.vocab_size < len(tokenizer):
        raise UserError(
            f"model.init_from {recipe.model['init_from']} has {model.config.vocab_size} embeddings but the tokenizer "
            f"has {len(tokenizer)} tokens; fine-tune with the tokenizer it was trained with (tokenizer.path)"
        )
    _stop_at_end_of_turn(model, tokenizer)
    if recipe.finetune.method == "lora":
        init_from = recipe.model["init_from"]
        from_hub = source != Path(init_from).expanduser()  # a hub snapshot: its directory name is the revision
        base = init_from.split("@")[0] if from_hub else str(source.resolve())
        model = adapters.apply_lora(model, recipe.finetune, base, source.name if from_hub else None,
                                    trainable_tokens=new_ids)
    return model


def grow_embeddings(model, tokenizer, new_ids: list[int]) -> None:
    """Embedding rows for tokens added to the tokenizer of a trained model, each the mean of the existing rows: a
    token the model has never seen starts as the average token, not as noise of another scale."""
    old = model.get_input_embeddings().weight.detach()
    mean = old.mean(dim=0)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[new_ids] = mean
        output = model.get_output_embeddings()
        if output is not None and output.weight is not model.get_input_embeddings().weight:
            output.weight[new_ids] = output.weight[: old.shape[0]].mean(dim=0)
    if tokenizer.pad_token_id in new_ids:
        model.config.pad_token_id = tokenizer.pad_token_id  # padding is never a label
    logger.info("model.init_from: %d embedding rows added for %s, each the mean of the %d existing rows",
                len(new_ids), ", ".join(tokenizer.convert_ids_to_tokens(new_ids)), old.shape[0])


def _stop_at_end_of_turn(model, tokenizer) -> None:
    """A chat model's generation stops at the end of a reply (the template's end-of-turn token) as well as at EOS."""
    if chat.has_template(tokenizer):
        model.generation_config.eos_token_id = chat.stop_token_ids(tokenizer)


def _reuse_choices(recipe: Recipe, run_dir: RunDir) -> None:
    """A resumed run keeps what it chose when it started (the step count of its budget, an automatic tokenizer and
    model size), not a new measurement."""
    earlier = read_yaml_mapping(run_dir.recipe)
    recorded = earlier.get("budget") or {}
    steps = recorded.get("steps")
    if recipe.budget.time is not None and recipe.budget.steps is None and isinstance(steps, int) and steps > 0:
        logger.info("budget %s: resuming a run that trained it in %d steps", recipe.budget.time, steps)
        recipe.fix_steps(steps, {key: recorded.get(key)
                                 for key in ("warmup_steps", "decay_start", "decay_end", "decay_replans",
                                             "threads")})
    spec = (earlier.get("tokenizer") or {}).get("train")
    if recipe.tokenizer.train is not None and recipe.tokenizer.train.is_auto and isinstance(spec, dict):
        recipe.fix_tokenizer(dataclasses.replace(recipe.tokenizer.train, kind=spec.get("kind"),
                                                 vocab_size=spec.get("vocab_size")))
    shape = {key: (earlier.get("model") or {}).get(key) for key in ("n_layer", "n_head", "n_embd")}
    if recipe.auto_model and all(isinstance(value, int) for value in shape.values()):
        earlier_training = earlier.get("training") or {}
        recipe.fix_model(sizing.Shape(**shape), bool(earlier_training.get("bf16")),
                         (earlier.get("optimizer") or {}).get("name"), earlier_training.get("weight_decay"))
        logger.info("model.size auto: resuming a run that chose n_layer %(n_layer)d, n_head %(n_head)d, "
                    "n_embd %(n_embd)d", shape)


def _choose_model(recipe: Recipe, started: float, tokenizer, train_blocks, collator) -> None:
    """Decide `model.size: auto`: the rung the time left allows, timed on this machine with the run's batches."""
    args = recipe.training
    rows = args.per_device_train_batch_size
    batches = [collator([train_blocks[i] for i in range(start, min(start + rows, len(train_blocks)))])
               for start in range(0, min(2 * rows, len(train_blocks)), rows)]
    config = {**{k: v for k, v in recipe.model.items() if k != "init_from"}, "vocab_size": len(tokenizer),
              "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id}
    seconds = max(recipe.budget.seconds - (time.time() - started), 1.0)
    tokens_per_step = rows * recipe.data.block_size * args.world_size
    timer = sizing.StepTimer(config, batches, args.device, try_bf16=recipe.auto_precision, bf16=bool(args.bf16))
    corpus_tokens = len(train_blocks) * recipe.data.block_size  # what one epoch trains on, padding included
    shape, why = sizing.choose_shape(timer, seconds, tokens_per_step, corpus_tokens)
    bf16 = timer.bf16[shape]
    epochs = seconds * sizing.TRAINING_SHARE / timer.seconds[shape] * tokens_per_step / corpus_tokens
    epochs = min(epochs, sizing.MAX_EPOCHS)
    optimizer, weight_decay = sizing.optimizer_for(epochs), sizing.weight_decay_for(epochs)
    if dist.is_available() and dist.is_initialized():  # every process trains what rank 0 chose
        shared = [(shape, bf16, optimizer, weight_decay)]
        dist.broadcast_object_list(shared, src=0)
        shape, bf16, optimizer, weight_decay = shared[0]
    logger.info("model.size auto: %s", why)
    if recipe.auto_optimizer:
        logger.info("optimizer.name: %s (the run will see its data about %.1f times; AdamW past %d)", optimizer,
                    epochs, sizing.MUON_MAX_EPOCHS)
    if recipe.auto_weight_decay:
        logger.info("training.weight_decay: %g (the run will see its data about %.1f times; %g past %d)",
                    weight_decay, epochs, sizing.REPEATED_WEIGHT_DECAY, sizing.REPEATS_WARNING)
    chooses_learning_rate, chooses_precision = recipe.auto_learning_rate, recipe.auto_precision
    recipe.fix_model(shape, bf16, optimizer, weight_decay)
    if chooses_learning_rate:
        muon = recipe.optimizer.name == "muon"
        logger.info("training.learning_rate: %g, %g / n_embd (at most %g)%s", recipe.training.learning_rate,
                    sizing.LR_WIDTH, sizing.LR_MAX, f" x{sizing.MUON_LR_SCALE:g} for Muon" if muon else "")
    if chooses_precision:
        logger.info("training.bf16: %s, measured (%s; bf16 from x%.1f faster)", bf16, ", ".join(timer.notes),
                    sizing.BF16_SPEEDUP)


def _budget_clock(recipe: Recipe, started: float, model, blocks, collator, tokenizer, eval_prompts: list[list[int]],
                  restored: deadline.Schedule | None) -> tuple[deadline.Schedule, deadline.DeadlineCallback]:
    """The schedule of a budgeted run (`restored` from its checkpoint, else measured on this run's model and data)
    and the callback that keeps its deadline; the training arguments are set for a run whose length the clock
    decides: `max_steps` is the epoch cap, and evaluations and saves at fractions of the run are the clock's."""
    args = recipe.training
    micro_batches = -(-len(blocks["train"]) // (args.per_device_train_batch_size * args.world_size))
    steps_per_epoch = max(micro_batches // args.gradient_accumulation_steps, 1)
    if restored is None:
        def measure(limit):  # every process measures (a distributed step includes its all-reduce); rank 0's wins
            return budget_lib.measure_costs(model, blocks["train"], blocks["eval"], collator, args, eval_prompts,
                                            recipe.eval, tokenizer.pad_token_id, limit, recipe.optimizer)

        planned = budget_lib.plan_schedule(recipe.budget, started, measure, args, steps_per_epoch)
        if dist.is_available() and dist.is_initialized():
            shared = [planned]
            dist.broadcast_object_list(shared, src=0)
            planned = shared[0]
        schedule, steps, cap = planned
        schedule.training_seconds = recipe.budget.seconds - (time.time() - started)
    else:
        schedule, cap = restored, sizing.MAX_EPOCHS * steps_per_epoch
        steps = schedule.decay_end or int(schedule.training_seconds / max(schedule.step_seconds, 1e-9))
    args.max_steps = cap
    logger.info("budget: the progress bar counts to %d steps (%d epochs, the most this run may train); the clock "
                "ends training before, when its time is up", cap, sizing.MAX_EPOCHS)

    def at_fractions(strategy, interval):
        if plain(strategy) != "steps" or not interval or interval >= 1:
            return []
        return deadline.fractions(interval)

    eval_at = at_fractions(args.eval_strategy, args.eval_steps or args.logging_steps)
    save_at = at_fractions(args.save_strategy, args.save_steps)
    if eval_at:
        args.eval_steps = cap + 1  # never by step count: the clock evaluates
    if save_at:
        args.save_steps = cap + 1
    if plain(args.logging_strategy) == "steps" and args.logging_steps < 1:
        args.logging_steps = max(1, math.ceil(args.logging_steps * steps))
    return schedule, deadline.DeadlineCallback(schedule, cap, eval_at, save_at)


def _recorded_schedule(recipe: Recipe) -> deadline.Schedule | None:
    """The schedule a finished budgeted run recorded in its recipe (a re-run trains the same learning rates)."""
    budget = recipe.budget
    if budget.steps is None or budget.warmup_steps is None:
        return None
    args = recipe.training
    return deadline.Schedule(warmup=budget.warmup_steps,
                             shape=deadline.decay_shape(args.lr_scheduler_type, args.lr_scheduler_kwargs),
                             decay_start=budget.decay_start, decay_end=budget.decay_end,
                             replans=budget.decay_replans or [], threads=budget.threads or [])


def prepare_trainer(recipe: Recipe, run_dir: RunDir, resume: bool, started: float | None = None,
                    resume_from: str | None = None) -> tuple[LmkitTrainer, object]:
    """Data, tokenizer, model and Trainer of a run, with the run dir's recipe, held-out split and data statistics
    written; returns the Trainer and the tokenizer. With a time budget (`budget.time`, clock started at `started`),
    the schedule is measured here, after everything that precedes training is done (or taken from the checkpoint
    `resume_from`)."""
    args = recipe.training
    # ---- Data (documents, pairs or conversations) and tokenizer --------------------------------------------------
    fmt = recipe.data.format
    prepare = {"text": data_lib.prepare_splits, "prompt_completion": data_lib.prepare_pair_splits,
               "messages": data_lib.prepare_conversation_splits}[fmt]
    with args.main_process_first(desc="reading and splitting the corpus"):
        splits, doc_stats = prepare(recipe.data, seed=args.seed)
    # local=False: on several nodes sharing the run dir, one process in all trains the tokenizer.
    with args.main_process_first(local=False, desc="tokenizer"):
        tokenizer = load_or_train_tokenizer(recipe, splits, run_dir, resume)

    # ---- Tokenized blocks ----------------------------------------------------------------------------------------
    build = {"text": data_lib.build_lm_datasets, "prompt_completion": data_lib.build_pair_datasets,
             "messages": data_lib.build_conversation_datasets}[fmt]
    with args.main_process_first(desc="tokenizing"):
        blocks, token_stats = build(splits, tokenizer, recipe.data, vocab_size=len(tokenizer))
    eval_split = "validation" if "validation" in blocks else "test"
    bleu_pairs, completion_task = [], None
    if fmt != "text":
        make_task = make_completion_task if fmt == "prompt_completion" else make_conversation_task
        completion_task = make_task(
            splits[eval_split], doc_stats["most_frequent_train_completion"]["text"], tokenizer, recipe.eval,
            n_positions=recipe.data.block_size,
        )
    else:
        bleu_pairs = make_bleu_pairs(splits[eval_split]["text"], tokenizer, recipe.eval)
    if recipe.eval.bleu_samples and fmt == "text" and not bleu_pairs:
        message = f"no {eval_split} document is longer than eval.prompt_tokens ({recipe.eval.prompt_tokens} tokens)"
        if needs_bleu(args):
            raise UserError(f"{message}, so there is no BLEU for training.metric_for_best_model; "
                            "lower eval.prompt_tokens")
        logger.warning("%s: BLEU is skipped", message)

    # ---- Model ---------------------------------------------------------------------------------------------------
    words = data_lib.word_tables(tokenizer) if recipe.data.mask_unit == "word" else None
    collator = data_lib.LMDataCollator(tokenizer.pad_token_id, tokenizer.unk_token_id, recipe.data.mask_prob, words)
    if recipe.auto_model:
        _choose_model(recipe, started if started is not None else time.time(), tokenizer, blocks["train"], collator)
        args = recipe.training  # rebuilt when the choice includes bf16
    model = build_model(recipe, tokenizer)
    tokenizer.model_max_length = model.config.n_positions  # saved with the model: the length it can actually take
    logger.info("model: %.2fM parameters, %s positions", model.num_parameters() / 1e6,
                model.config.position_embedding_type)
    trainable = adapters.parameter_counts(model)
    logger.info("trainable: %d of %d parameters (%.2f%%)", trainable["trainable_parameters"],
                trainable["total_parameters"], 100 * trainable["trainable_share"])

    # ---- Trainer -------------------------------------------------------------------------------------------------
    push_every_save = recipe.hub.name if recipe.hub.push == "every_save" else None
    callbacks = [CheckpointCallback(push_every_save, recipe.hub.dir), MetricsFileCallback(run_dir)]
    schedule = _recorded_schedule(recipe)
    if schedule is not None and schedule.threads:
        callbacks.append(deadline.ThreadReplay(schedule.threads))
    if recipe.budget.time is not None and recipe.budget.steps is None:
        schedule, clock = _budget_clock(
            recipe, started if started is not None else time.time(), model,
            {"train": blocks["train"], "eval": blocks[eval_split]}, collator, tokenizer,
            completion_task.prompt_ids if completion_task else [p.prompt_ids for p in bleu_pairs],
            deadline.restore(resume_from) if resume_from else None,
        )
        callbacks.append(clock)
    trainer = LmkitTrainer(
        model=model, args=args, train_dataset=blocks["train"], eval_dataset=blocks[eval_split],
        data_collator=collator, processing_class=tokenizer, callbacks=callbacks,
        bleu_pairs=bleu_pairs, completion_task=completion_task, eval_args=recipe.eval, schedule=schedule,
        optimizer_args=recipe.optimizer,
    )
    if trainer.is_world_process_zero():
        run_dir.path.mkdir(parents=True, exist_ok=True)
        recipe.dump(run_dir.recipe)
        data_lib.save_heldout(splits, run_dir)
        stats = {**doc_stats, **token_stats}
        if fmt != "text":  # per split: what reading and splitting counted (records, groups), then what tokenizing did
            stats["splits"] = {name: {**doc_stats["splits"][name], **counts}
                               for name, counts in token_stats["splits"].items()}
        atomic_write_json(run_dir.data_stats, stats)
    return trainer, tokenizer


def end_processes() -> None:
    """Let every process of a distributed run leave together and close the process group.

    Without this, a rank that finishes first (the others are still publishing) exits with gloo's threads alive and
    dies with SIGABRT ("terminate called without an active exception"), failing the whole launch.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def train(recipe: Recipe, resume: bool = False, started: float | None = None) -> dict:
    """Run a recipe end to end; returns the final evaluation metrics.

    Args:
        started: when the command started (time.time()), the start of a `budget.time`; default: now.
    """
    started = time.time() if started is None else started
    args = recipe.training
    run_dir = RunDir(args.output_dir)
    preflight(recipe, resume)
    set_seed(args.seed)

    # ---- Resume --------------------------------------------------------------------------------------------------
    if resume and run_dir.recipe.is_file():
        _reuse_choices(recipe, run_dir)
    changes = {}
    if resume and (run_dir.complete_checkpoints() or run_dir.is_finished):
        changes = resume_lib.check_resume(recipe, run_dir)  # before anything is written: immutable changes stop here
        finished = resume_lib.already_finished(recipe, run_dir)
        if finished is not None:
            logger.warning("%s: the run already finished; nothing trained, nothing published", run_dir.path)
            return {**finished, "already_finished": True}
    resume_from = find_resume_checkpoint(run_dir) if resume and run_dir.path.is_dir() else None
    if resume and resume_from is None:
        logger.warning("--resume: no complete checkpoint in %s, starting from scratch", run_dir.path)

    created = not run_dir.path.exists()
    try:
        trainer, tokenizer = prepare_trainer(recipe, run_dir, resume, started, resume_from)
    except (UserError, OSError):
        # A bad corpus is found only once it is read, a disk fills up: leave no half-made run behind (only what this
        # call created).
        if created and args.process_index == 0:
            shutil.rmtree(run_dir.path, ignore_errors=True)
        raise

    if trainer.is_world_process_zero():
        if resume_from is None:
            resume_lib.remember(recipe, run_dir)
        else:
            resume_lib.append_history(run_dir, {
                "event": "resume", "checkpoint": Path(resume_from).name,
                "changed": {k: {"was": v[0], "now": v[1]} for k, v in changes.items()},
            })

    # ---- Train, evaluate, save -----------------------------------------------------------------------------------
    train_result = trainer.train(resume_from_checkpoint=resume_from)
    if recipe.budget.time is not None and recipe.budget.steps is None:  # what the clock decided, for a re-run
        recipe.fix_steps(trainer.state.global_step, trainer.schedule.recorded())
        if trainer.is_world_process_zero():
            recipe.dump(run_dir.recipe)
    train_result.metrics.update(adapters.parameter_counts(trainer.model))  # what the method trained: all, or adapters
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    metrics = {**final_evaluation(trainer), **(trainer.baseline_scores or {})}
    save_final_model(trainer, run_dir)
    trainer.save_state()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)  # the Trainer names it RunDir.eval_results; written last: a finished run

    # ---- Publish -------------------------------------------------------------------------------------------------
    if trainer.is_world_process_zero():
        trained_stats = run_dir.tokenizer_dir / tokenization.STATS_FILE
        if trained_stats.is_file():
            shutil.copyfile(trained_stats, run_dir.tokenizer_stats)
        final_samples = run_dir.latest_samples()
        if final_samples:
            shutil.copyfile(final_samples, run_dir.eval_samples)
        plot_training_curves(trainer.state.log_history, run_dir.training_curves)
        if recipe.hub.push in ("end", "every_save"):
            metrics["hub_ref"] = hub_lib.push(run_dir.path, recipe.hub.name, recipe.hub.dir, message="end of training")
        resume_lib.append_history(run_dir, {"event": "finished", "step": trainer.state.global_step,
                                            "hub_ref": metrics.get("hub_ref")})
    return metrics
