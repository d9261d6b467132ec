"""A time budget for `lmkit train`: what the run can do in the time given, measured on this machine.

The recipe's `budget:` section (or `lmkit train --time 5m`) holds the budget. Once the data, the tokenizer and the
model are ready, the real step is measured on a throwaway copy of the real model with real batches, and so are the
costs that come with steps (an evaluation: loss pass and BLEU generation; a checkpoint save). From them
`plan_schedule` makes the run's `lmkit.deadline.Schedule`: the warm-up, the step count the measured speed allows (a
cosine or linear schedule is laid over it), the epoch cap, and the costs the clock keeps out of the training time.
From there the clock decides (`lmkit.deadline`): a slower or faster machine changes the steps, not the deadline.

Timings are medians of repeated samples after warm-up (`robust_seconds`): a sample an order of magnitude off the
others is dropped and logged, and a probe whose samples spread widely takes more of them.

Measurement runs a throwaway `Trainer` on a copy of the model under preserved random state: it changes nothing the
run trains. Under several processes every process measures (a step includes its gradient all-reduce) and rank 0's
plan is the one all take.
"""

import copy
import dataclasses
import logging
import math
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from lmkit import deadline, optimizers
from lmkit.errors import UserError
from lmkit.generation import generate_ids, preserved_rng_state
from lmkit.settings import SettingError, check_fields, plain, setting
from lmkit.sizing import MAX_EPOCHS, REPEATS_WARNING

logger = logging.getLogger(__name__)

_NUMBER = r"\d+(?:\.\d+)?"
_DURATION = re.compile(rf"^(?:(?P<h>{_NUMBER})\s*h)?\s*(?:(?P<m>{_NUMBER})\s*m)?\s*(?:(?P<s>{_NUMBER})\s*s)?\s*"
                       rf"(?P<bare>{_NUMBER})?$")
MAX_DURATION = 30 * 86400  # a budget past a month is a typo (an extra zero), not a plan
# Steps run before a step is timed (allocator, kernels, lazy initialisation, the optimizer's state), by the budget's
# throwaway Trainer and by `lmkit.sizing`'s rung timing alike; then the steps the budget's probe times (twice as many
# when their spread is wide).
WARMUP_STEPS, PROBE_STEPS = 3, 12
# Samples spread widely when the slower quartile is this much slower than the faster one; a sample this far from the
# median (either way) is not a measurement of the step but of something else on the machine.
WIDE_SPREAD, OUTLIER = 1.5, 10.0
# The step probe stops once it has spent this share of what is left of the budget (after two timed steps).
PROBE_SHARE = 0.04
# Measured times are scaled by this much: logging, which the probe leaves out, and a machine's jitter.
STEP_MARGIN = 1.05
# Seconds kept for what follows training and cannot be measured beforehand: plotting, the trainer state, interpreter
# exit.
END_SECONDS = 2.0


def parse_duration(value) -> float:
    """Seconds in a duration: a number of seconds (300, 2.5), or hours, minutes and seconds with units ('90s', '5m',
    '2.5m', '1h30m'). A bare number after a unit counts in the next smaller one, as on a clock: '1h30' is 90 minutes,
    '5m30' is 330 seconds. Raises ValueError ('must be ...') saying what is wrong: not a duration, not positive, not
    finite, or longer than `MAX_DURATION`."""
    if isinstance(value, bool):
        raise ValueError(f"must be a duration such as 300, 90s, 5m or 1h30, got {value!r}")
    text = str(value).strip().lower()
    try:  # a plain number, written any way Python or YAML write one (-1, 1e9, inf, .inf)
        number = float(value) if isinstance(value, (int, float)) else float(text.replace(".inf", "inf"))
    except ValueError:
        number = None
    if number is not None:
        seconds = number
    else:
        match = _DURATION.match(text)
        if not match or not any(match.groups()):
            raise ValueError(f"must be a duration such as 300, 90s, 5m or 1h30, got {value!r}")
        hours, minutes, secs, bare = (float(g) if g else 0.0 for g in match.groups())
        if match["bare"]:  # the unit after the last one given: minutes after hours, seconds after minutes or alone
            if match["s"]:
                raise ValueError(f"must be a duration such as 300, 90s, 5m or 1h30, got {value!r} (a number after "
                                 "the seconds)")
            if match["h"] and not match["m"]:
                minutes = bare
            else:
                secs = bare
        seconds = hours * 3600 + minutes * 60 + secs
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"must be a finite number of seconds, got {value!r}")
    if seconds <= 0:
        raise ValueError(f"must be a positive duration, got {value!r}")
    if seconds > MAX_DURATION:
        raise ValueError(f"must be at most {MAX_DURATION // 86400} days, got {value!r} ({seconds:.0f} s)")
    return seconds


@dataclass
class BudgetArgs:
    """The recipe's `budget:` section: a wall-time budget for the whole `lmkit train` command."""

    time: str | float | None = setting(
        None, "Wall time for the whole command (data, tokenizer, training, final evaluation, save), e.g. 90s, 5m, "
              "1h30m; it fixes training.max_steps from a measured step time. null = no budget."
    )
    steps: int | None = setting(
        None, "The steps a budgeted run trained (written into the run's recipe.yaml): with it, a re-run trains "
              "exactly these steps without measuring.", minimum=1
    )
    warmup_steps: int | None = setting(
        None, "Written with steps: the warm-up steps the run took (null: training.warmup_steps).", minimum=0
    )
    decay_start: int | None = setting(None, "Written with steps: the step the learning rate's decay started at.",
                                      minimum=0)
    decay_end: int | None = setting(None, "Written with steps: the step the decay reached zero at (or would have).",
                                    minimum=1)
    decay_replans: list[list[int]] | None = setting(
        None, "Written with steps: [step, end] where the clock moved the decay's end as the machine's speed changed "
              "(`end`: the step the decay was planned to end at until then; decay_end: the last plan's)."
    )
    threads: list[list[int]] | None = setting(
        None, "Written with steps: [step, threads] where the run changed torch's thread count under load; a re-run "
              "does the same, for the same sums."
    )

    def __post_init__(self):
        check_fields(self, "budget")
        if self.time is not None:
            try:
                parse_duration(self.time)
            except ValueError as exc:
                raise SettingError("time", str(exc), "budget") from None

    @property
    def seconds(self) -> float | None:
        return parse_duration(self.time) if self.time is not None else None


@dataclass
class StepCosts:
    """Measured seconds of one optimizer step, one evaluation and one checkpoint save."""

    step: float
    evaluation: float
    save: float
    final_save: float


def robust_seconds(samples: list[float], what: str = "a step") -> float:
    """The median of `samples` (seconds), leaving out (and logging) those more than `OUTLIER` times off it."""
    median = statistics.median(samples)
    kept = [s for s in samples if median / OUTLIER <= s <= median * OUTLIER]
    if len(kept) < len(samples):
        logger.info("timing %s: %d of %d samples left out, an order of magnitude off the median %.4f s (%s)", what,
                    len(samples) - len(kept), len(samples), median,
                    ", ".join(f"{s:.4f}" for s in samples if s not in kept))
    return statistics.median(kept)


def spread(samples: list[float]) -> float:
    """How widely `samples` spread: the upper quartile over the lower one (1.0: all equal)."""
    ordered = sorted(samples)
    lower, upper = ordered[len(ordered) // 4], ordered[(3 * len(ordered)) // 4]
    return upper / lower if lower > 0 else math.inf


def step_intervals(ends: list[float]) -> list[float]:
    """Seconds of each step, from the `time.perf_counter()` at which each step ended, the first `WARMUP_STEPS`
    steps left out (at least `WARMUP_STEPS` + 1 ends)."""
    return [b - a for a, b in zip(ends[WARMUP_STEPS - 1:], ends[WARMUP_STEPS:])]


def median_step(ends: list[float]) -> float:
    """The robust seconds of a step (`robust_seconds`) from the times at which steps ended (`step_intervals`)."""
    return robust_seconds(step_intervals(ends))


class _StepTimer(TrainerCallback):
    """Records when each optimizer step ends. In one process it stops the probe after `PROBE_STEPS` timed steps
    unless they spread widely (`WIDE_SPREAD`), and once it has two timed steps and has used `limit` seconds (several
    processes must stop at the same step, so they run every probe step)."""

    def __init__(self, limit: float):
        self.ends, self.limit, self.started = [], limit, time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())
        timed = len(self.ends) - WARMUP_STEPS
        if args.world_size > 1 or timed < 2:
            return
        settled = timed >= PROBE_STEPS and spread(step_intervals(self.ends)) < WIDE_SPREAD
        if settled or self.ends[-1] - self.started > self.limit:
            control.should_training_stop = True


def measure_costs(model, train_dataset, eval_dataset, collator, args, bleu_prompts: list[list[int]], eval_args,
                  pad_token_id: int, limit: float, optimizer_args=None) -> StepCosts:
    """Time the run's step, evaluation and checkpoint save on a copy of `model`.

    The step is the Trainer's own (data loader, forward and backward over the accumulated micro-batches, clipping,
    optimizer and scheduler, callbacks), run `PROBE_STEPS` times by a throwaway `Trainer` with the run's arguments
    and optimizer (`optimizer_args`) but no evaluation, saving or logging (up to twice as many when their times
    spread widely, fewer when they take over `limit` seconds): the robust median interval after `WARMUP_STEPS`
    (`median_step`). Every process takes part, so a distributed step includes its gradient all-reduce.
    The evaluation is the loss pass over `eval_dataset` (one batch timed, scaled) plus BLEU generation of
    `bleu_prompts` (one batch timed, scaled); the save is the weights written as safetensors (times 3 for a
    checkpoint, which also holds the optimizer's two moments).
    """
    from transformers import Trainer  # the module's import stays light for the recipe schema

    device = args.device
    with preserved_rng_state(), tempfile.TemporaryDirectory() as scratch:
        probe = copy.deepcopy(model)
        probe_args = dataclasses.replace(
            args, output_dir=scratch, max_steps=WARMUP_STEPS + 2 * PROBE_STEPS, eval_strategy="no", save_strategy="no",
            logging_strategy="no", report_to=[], disable_tqdm=True, load_best_model_at_end=False,
            # the same step whatever the schedule; the run's own is the clock's (lmkit.deadline)
            lr_scheduler_type="constant", lr_scheduler_kwargs={},
        )
        timer = _StepTimer(limit)
        trainer = Trainer(model=probe, args=probe_args, train_dataset=train_dataset, data_collator=collator,
                          callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # its summary line would read like the run's own
        if optimizer_args is not None and optimizer_args.name == "muon":  # its step costs more than AdamW's
            trainer.optimizer = optimizers.build(probe, optimizer_args, probe_args,
                                                 set(trainer.get_decay_parameter_names(probe)))
        trainer.train()
        step_seconds = median_step(timer.ends)

        probe.eval()
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(args.bf16))
        eval_batch = args.per_device_eval_batch_size
        rows = [eval_dataset[i] for i in range(min(eval_batch, len(eval_dataset)))]
        batch = {k: v.to(device) for k, v in collator(rows).items()}
        with torch.no_grad(), autocast:
            passes = []
            for _ in range(3):  # the first pass warms up; the median of the three is robust to one slow one
                started = time.perf_counter()
                probe(**batch)
                passes.append(time.perf_counter() - started)
            evaluation = robust_seconds(passes, "an evaluation batch") * math.ceil(len(eval_dataset) / eval_batch)
        if bleu_prompts:
            started = time.perf_counter()
            generate_ids(probe, bleu_prompts[: eval_args.batch_size], pad_token_id=pad_token_id,
                         max_new_tokens=eval_args.max_new_tokens, batch_size=eval_args.batch_size, seed=eval_args.seed,
                         eos_token_id=None)  # never stopping early: the longest an evaluation can take
            evaluation += (time.perf_counter() - started) * math.ceil(len(bleu_prompts) / eval_args.batch_size)

        started = time.perf_counter()
        save_model(probe, str(Path(scratch) / "model.safetensors"))  # tied weights once, as save_pretrained
        weights = time.perf_counter() - started
    return StepCosts(step=step_seconds * STEP_MARGIN, evaluation=evaluation * STEP_MARGIN, save=3 * weights + 0.05,
                     final_save=weights + 0.05)


def _interval(steps: int, strategy, interval: float | None, steps_per_epoch: int) -> int | None:
    """Steps between evaluations (or saves) under `strategy`; None when there are none."""
    strategy = plain(strategy)
    if strategy == "epoch":
        return max(steps_per_epoch, 1)
    if strategy != "steps" or not interval:
        return None
    return max(math.ceil(interval * steps) if interval < 1 else int(interval), 1)  # a fraction < 1: of the run


def planned_seconds(steps: int, costs: StepCosts, args, steps_per_epoch: int) -> float:
    """Seconds `steps` steps take with their evaluations and checkpoint saves, the final evaluation (unless the last
    step just evaluated) and the final save."""
    eval_every = _interval(steps, args.eval_strategy, args.eval_steps or args.logging_steps, steps_per_epoch)
    save_every = _interval(steps, args.save_strategy, args.save_steps, steps_per_epoch)
    evaluations = steps // eval_every if eval_every else 0
    if not evaluations or steps % eval_every or args.load_best_model_at_end:
        evaluations += 1
    saves = steps // save_every if save_every else 0
    return steps * costs.step + evaluations * costs.evaluation + saves * costs.save + costs.final_save + END_SECONDS


def steps_for_budget(remaining: float, costs: StepCosts, args, steps_per_epoch: int) -> int:
    """The most steps whose planned time fits `remaining` seconds (0 when not even one does)."""
    steps = max(int(remaining / costs.step), 0)
    while steps > 0 and planned_seconds(steps, costs, args, steps_per_epoch) > remaining:
        over = planned_seconds(steps, costs, args, steps_per_epoch) - remaining
        steps -= max(1, int(over / costs.step / 2))
    while planned_seconds(steps + 1, costs, args, steps_per_epoch) <= remaining:  # the halving may overshoot
        steps += 1
    return max(steps, 0)


def plan_schedule(budget: BudgetArgs, started: float, measure, args,
                  steps_per_epoch: int) -> tuple[deadline.Schedule, int, int]:
    """The schedule of a budget whose clock started at `started` (time.time() of the command's start), the steps the
    measured speed allows and the most the run may train (`MAX_EPOCHS` epochs).

    Args:
        measure: a callable(limit) -> StepCosts that times the run's step, evaluation and save, its step probe
            spending about `limit` seconds.

    Raises:
        UserError: the data stage alone used up the budget, or what is left cannot fit one step and the evaluation.
    """
    shape = deadline.decay_shape(args.lr_scheduler_type, args.lr_scheduler_kwargs)
    total = budget.seconds
    elapsed = time.time() - started
    if elapsed >= total:
        raise UserError(f"budget.time {budget.time}: the data stage alone (reading, tokenizer, tokenizing) took "
                        f"{elapsed:.0f} s of the {total:.0f} s budget; give more time or less data")
    costs = measure(max((total - elapsed) * PROBE_SHARE, 0.5))
    remaining = total - (time.time() - started)
    steps = steps_for_budget(remaining, costs, args, steps_per_epoch)
    if steps < 1:
        raise UserError(
            f"budget.time {budget.time}: after the data stage ({elapsed:.0f} s) {max(remaining, 0):.0f} s are left, "
            f"and one step ({costs.step:.2f} s) with the final evaluation ({costs.evaluation:.1f} s) and save "
            "does not fit; give more time"
        )
    cap = MAX_EPOCHS * steps_per_epoch
    epochs = steps / steps_per_epoch
    if epochs > MAX_EPOCHS:
        logger.warning("budget %s: %d steps would fit, %.0f passes over a corpus this small; training stops after "
                       "%d epochs (%d steps), as more would overfit: the run ends before its budget. Give it more "
                       "data to use the time", budget.time, steps, epochs, MAX_EPOCHS, cap)
    elif epochs > REPEATS_WARNING:
        logger.warning("budget %s: the run will see its training data %.0f times; more data would train a better "
                       "model in the same time", budget.time, epochs)
    steps = min(steps, cap)
    warmup = args.get_warmup_steps(steps)
    clock_decay = plain(args.lr_scheduler_type) == "warmup_stable_decay"
    schedule = deadline.Schedule(
        warmup=warmup, shape=shape, clock_decay=clock_decay, step_seconds=costs.step,
        decay_share=deadline.decay_share(args.lr_scheduler_type, args.lr_scheduler_kwargs),
        evaluation_seconds=costs.evaluation, save_seconds=costs.save,
        final_seconds=costs.evaluation + costs.final_save + END_SECONDS,
    )
    if shape is not None and not clock_decay:  # cosine, linear: decaying from the warm-up's end
        schedule.decay_start, schedule.decay_end = warmup, steps
    logger.info(
        "budget %s: %.1f s used by the data stage and measuring; a step takes %.3f s, an evaluation %.1f s, a "
        "checkpoint save %.2f s: about %d steps fit the %.0f s left (planned %.0f s); %s",
        budget.time, total - remaining, costs.step, costs.evaluation, costs.save, steps, remaining,
        planned_seconds(steps, costs, args, steps_per_epoch),
        "the decay starts by the clock" if clock_decay else "the clock ends training if the machine slows",
    )
    return schedule, steps, cap
