"""The clock a budgeted run trains by: its learning-rate schedule and its step count follow the wall clock.

`lmkit.budget` measures the step before training, but a machine's speed changes under a run (another job starts, or
the one that slowed the measurement ends), so a budgeted run is not laid over a step count fixed in advance. Its
schedule (`Schedule`) has three phases:

- warm-up: a step count fixed from the measurement (`training.warmup_steps`, a fraction of the measured count);
- stable, at the peak learning rate, for as long as the clock allows;
- decay to zero, started when the time left for training reaches its share of the training time
  (`training.lr_scheduler_kwargs.decay_share`, default `DECAY_SHARE`), over the steps that the recent step time says
  fit in it, its end moved later or earlier as the step time changes (`Schedule.replan`: the learning rate goes on
  from where it was) (`training.lr_scheduler_type: warmup_stable_decay`, the automatic recipe's schedule). A `cosine`
  or `linear` schedule has no stable phase: it decays over the measured count from the start.

Whatever the schedule, `DeadlineCallback` ends training when the next step would not fit before the deadline (or when
the decay is complete), and the evaluations and saves the recipe asks for at fractions of the run happen at those
fractions of the training time; their cost, the final evaluation's and the final save's are kept out of the training
time as they were measured, then as they actually cost. What the run did (its steps, warm-up, where the decay started,
was re-planned and ended) is written into the run's `recipe.yaml` (`budget:`), so that a re-run trains the same steps
with the same learning rates (`Schedule` is the scheduler of both), and the schedule is part of every checkpoint (it is
the `LambdaLR`'s state), so `--resume` continues the same plan with the training time that was left.
"""

import dataclasses
import logging
import math
import statistics
import time
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer import SCHEDULER_NAME

from lmkit.errors import UserError
from lmkit.settings import plain

logger = logging.getLogger(__name__)

# The decay's share of the training time by default (warm-up/stable/decay schedules decay over 10-20% of a run; on
# the automatic run at 5 minutes 0.4 was 0.4-0.8% worse, and the 1-sqrt shape instead of linear 0.5-1.2% worse).
DECAY_SHARE = 0.2
# The decay's steps are planned at this much the recent step time: a decay cut short by the deadline ends above zero,
# one that ends early leaves a few seconds unused.
DECAY_MARGIN = 1.1
# During the decay the clock re-plans its end when the plan's end is out of reach at the current step time (the
# machine got slower), and, at most once every RECENT_STEPS steps, when the steps that now fit the time left at
# DECAY_MARGIN exceed the plan by this share of the decay (it got faster, or the margin is no longer needed).
REPLAN_GAIN = 0.02
# The most the final evaluation and save are reckoned slower than measured, when the steps have become slower.
MAX_SLOWER = 4.0
# The schedules a budget can drive: their decay shape, or None for none.
SCHEDULES = {"warmup_stable_decay": "linear", "cosine": "cosine", "linear": "linear", "constant": None,
             "constant_with_warmup": None}
DECAY_TYPES = ("linear", "cosine", "1-sqrt")
# The step time the clock plans with: the median of the latest this many steps.
RECENT_STEPS = 16
# A run whose step time changes by more than this factor says so (once), comparing the step measured before training,
# windows of at least RECENT_STEPS steps and this many seconds, and at its end the steps since the last full window
# (all of a short run's) when there are at least this many.
SPEED_CHANGE_WARNING, SPEED_WINDOW, SHORT_WINDOW = 2.0, 2.0, 8


def decay_shape(lr_scheduler_type, lr_scheduler_kwargs, source: str = "training") -> str | None:
    """The decay shape of a budgeted run's schedule (None: no decay), or a UserError naming the key."""
    name = plain(lr_scheduler_type)
    if name not in SCHEDULES:
        raise UserError(f"{source}: training.lr_scheduler_type must be one of {', '.join(SCHEDULES)} under a time "
                        f"budget (the clock decides the step count), got {name}")
    shape = SCHEDULES[name]
    if name == "warmup_stable_decay":
        shape = (lr_scheduler_kwargs or {}).get("decay_type", shape)
        if shape not in DECAY_TYPES:
            raise UserError(f"{source}: training.lr_scheduler_kwargs.decay_type must be one of "
                            f"{', '.join(DECAY_TYPES)}, got {shape!r}")
    return shape


def decay_share(lr_scheduler_type, lr_scheduler_kwargs, source: str = "training") -> float:
    """The share of the training time (or steps) a warm-up/stable/decay schedule decays over
    (`training.lr_scheduler_kwargs.decay_share`), or a UserError naming the key."""
    kwargs = lr_scheduler_kwargs or {}
    if "decay_share" not in kwargs:
        return DECAY_SHARE
    share = kwargs["decay_share"]
    key = f"{source}: training.lr_scheduler_kwargs.decay_share"
    if plain(lr_scheduler_type) != "warmup_stable_decay":
        raise UserError(f"{key} is for lr_scheduler_type warmup_stable_decay, got {plain(lr_scheduler_type)}")
    if "num_decay_steps" in kwargs:
        raise UserError(f"{key} and num_decay_steps both set the decay's length: give one")
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
        raise UserError(f"{key} must be a number between 0 and 1 (exclusive), got {share!r}")
    return float(share)


@dataclasses.dataclass
class Schedule:
    """The learning-rate factor of each step (a `LambdaLR` lambda), and the clock's state of a budgeted run.

    Warm-up from 0 over `warmup` steps (as transformers' schedules), 1 until `decay_start`, then `shape` down to 0 at
    `decay_end` (a decay placed inside the warm-up caps it); no decay while either is None. The rest is the clock's
    (`DeadlineCallback`): `LambdaLR` saves a callable object's attributes with its own state, so a checkpoint holds
    them all, plain numbers.
    """

    warmup: int
    shape: str | None
    decay_start: int | None = None
    decay_end: int | None = None
    clock_decay: bool = False  # warm-up/stable/decay: the decay starts by the clock
    training_seconds: float = 0.0  # the training loop's share of the budget
    elapsed: float = 0.0  # training seconds spent so far (a resumed run continues from here)
    step_seconds: float = 0.0  # the measured step, then the recent median
    evaluation_seconds: float = 0.0
    save_seconds: float = 0.0
    final_seconds: float = 0.0  # the final evaluation and save, and what follows them
    threads: list = dataclasses.field(default_factory=list)  # [step, threads]: ThreadTuner's changes
    decay_share: float = DECAY_SHARE  # of the training time: the clock's decay starts when this much is left
    # [step, end]: at `step` the clock moved the decay's end from `end` (the one planned until then) to the next
    # pair's end, the last to decay_end; the decay's progress carries on from where it was (`replan`)
    replans: list = dataclasses.field(default_factory=list)

    def __call__(self, step: int) -> float:
        rise = min(step / max(1, self.warmup), 1.0)
        if self.decay_start is None or self.decay_end is None or step < self.decay_start:
            return rise
        progress = self._progress(step)
        if self.shape == "cosine":
            fall = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.shape == "1-sqrt":
            fall = 1.0 - math.sqrt(progress)
        else:
            fall = 1.0 - progress
        # A machine that slowed so far that the clock starts the decay during the warm-up: the decay wins, so the
        # run still ends at a low learning rate.
        return min(rise, fall)

    def _progress(self, step: int) -> float:
        """How far the decay is at `step` (0 at its start, 1 at its end), through the plans before `step`: each goes
        linearly from the progress it took over to 1 at its own end."""
        def along(done: float, start: int, end: int, at: int) -> float:
            return min(done + (1.0 - done) * (at - start) / max(end - start, 1), 1.0)

        start, done = self.decay_start, 0.0
        for moved_at, end in self.replans:  # an earlier plan: from `start` towards `end`, until `moved_at`
            if step < moved_at:
                return along(done, start, end, step)
            start, done = moved_at, along(done, start, end, moved_at)
        return along(done, start, self.decay_end, step)

    def replan(self, step: int, end: int) -> None:
        """From `step` on, the decay reaches zero at `end` instead: the learning rate at `step` stays what it was, so a
        faster machine gets a longer decay and a slower one a shorter, without a jump."""
        self.replans.append([step, self.decay_end])
        self.decay_end = end

    def recorded(self) -> dict:
        """The `budget:` keys a re-run needs to train the same learning rates."""
        return {"warmup_steps": self.warmup, "decay_start": self.decay_start, "decay_end": self.decay_end,
                "decay_replans": [list(move) for move in self.replans] or None,
                "threads": [list(change) for change in self.threads] or None}


def over_steps(steps: int, warmup: int, shape: str, share: float = DECAY_SHARE) -> Schedule:
    """A warm-up/stable/decay schedule over a known step count (a run without a budget): the decay takes the last
    `share` of the steps."""
    return Schedule(warmup=warmup, shape=shape, decay_start=steps - round(share * steps), decay_end=steps,
                    decay_share=share)


def restore(checkpoint: str | Path) -> Schedule | None:
    """The `Schedule` a checkpoint of a budgeted run holds in its scheduler's state; None when it holds none."""
    path = Path(checkpoint) / SCHEDULER_NAME
    if not path.is_file():
        return None
    lambdas = torch.load(path, weights_only=True).get("lr_lambdas") or [None]
    values = lambdas[0]
    names = {field.name for field in dataclasses.fields(Schedule)}
    # decay_share and replans came later than the rest: a checkpoint without them decayed over the default share,
    # as first planned
    if not isinstance(values, dict) or not names - {"decay_share", "replans"} <= set(values):
        return None
    return Schedule(**{name: values[name] for name in names if name in values})


def fractions(interval) -> list[float]:
    """The fractions of a run at which an interval given as a fraction (< 1) falls: 0.5 → [0.5]."""
    if not interval or interval >= 1:
        return []
    return [k * interval for k in range(1, math.ceil(1 / interval)) if k * interval < 1 - 1e-9]


class ThreadTuner:
    """On CPU, the intra-op thread count that makes steps fastest now. A process busy on one core makes torch's
    threads wait for each other: on 2 cores one busy process made a step 3.2x slower with 2 threads, and with 1
    thread no slower than quiet. So when steps get `SLOWDOWN` times slower than the fastest seen at the current
    count, one thread fewer is tried for a window of steps, and kept if faster; while below the machine's count, one
    more is tried now and then (every `UP_EVERY` seconds, doubling after each failed try) in case the load has gone.
    A changed thread count sums in another order (weights ~1e-7 apart), so every change is appended to `changes` as
    [step, threads] (the schedule's `threads`, written into the run's recipe) and a re-run makes the same ones at the
    same steps (`ThreadReplay`)."""

    WINDOW, SLOWDOWN, GAIN, UP_EVERY = 6, 1.5, 0.95, 20.0

    def __init__(self, most: int, changes: list[list[int]]):
        self.most = self.current = most
        self.changes, self.step = changes, 0
        self.fastest: dict[int, float] = {}
        self.window: list[float] = []
        self.trial: tuple[int, float] | None = None  # (threads before the trial, their window median)
        self.settling = False
        self.up_every, self.last_up = self.UP_EVERY, time.perf_counter()

    def observe(self, seconds: float, step: int) -> None:
        """Step `step` took `seconds`; may change torch's thread count for the steps after it."""
        self.step = step
        if self.settling:  # the first step after a change warms the new threads up
            self.settling = False
            return
        self.window.append(seconds)
        if len(self.window) < self.WINDOW:
            return
        median, self.window = statistics.median(self.window), []
        self.fastest[self.current] = min(self.fastest.get(self.current, median), median)
        if self.trial is not None:
            self._judge(median)
        elif self.current > 1 and median > self.SLOWDOWN * self.fastest[self.current]:
            self._try(self.current - 1, median)
        elif self.current < self.most and time.perf_counter() - self.last_up > self.up_every:
            self.last_up = time.perf_counter()
            self._try(self.current + 1, median)

    def _try(self, threads: int, median: float) -> None:
        self.trial, self.settling = (self.current, median), True
        self._set(threads)

    def _set(self, threads: int) -> None:
        if not self.changes:  # the count it started from: the process may hold another one when a re-run starts
            self.changes.append([0, self.most])
        self.current = threads
        self.changes.append([self.step, threads])
        torch.set_num_threads(threads)

    def _judge(self, median: float) -> None:
        before, before_median = self.trial
        self.trial = None
        if median < self.GAIN * before_median:
            logger.info("budget: %d threads take %.3f s a step, %d took %.3f s (other work on this machine, or a "
                        "model too small for them): training goes on with %d", self.current, median, before,
                        before_median, self.current)
            if self.current > before:
                self.up_every = self.UP_EVERY
            return
        if self.current > before:
            self.up_every *= 2
        self.settling = True
        self._set(before)


class ThreadReplay(TrainerCallback):
    """A re-run of a budgeted run: torch's thread count changed after the same steps as the run's (`ThreadTuner`),
    so that the re-run sums in the same order and trains bit-identical weights."""

    def __init__(self, changes: list[list[int]]):
        self.at = {step: threads for step, threads in changes}

    def on_train_begin(self, args, state, control, **kwargs):
        if 0 in self.at:
            torch.set_num_threads(self.at[0])

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.at:
            torch.set_num_threads(self.at[state.global_step])


class DeadlineCallback(TrainerCallback):
    """Keeps a budgeted run's deadline: starts the decay, ends training, and places the evaluations and saves that
    `eval_at` and `save_at` give as fractions of the training time (`fractions`).

    Rank 0's clock decides for every process (a decision is broadcast each step), so all stop at the same step.
    """

    def __init__(self, schedule: Schedule, max_steps: int, eval_at: list[float], save_at: list[float]):
        self.schedule, self.max_steps = schedule, max_steps
        self.eval_at, self.save_at = eval_at, save_at
        self.recent: deque[float] = deque(maxlen=RECENT_STEPS)
        self.last = self.deadline = self.measured = 0.0
        self.skip_next = True  # the first interval holds the loop's start
        self.speeds: list[float] = []  # the fastest and the slowest step time seen, in the order they were seen
        self.window: list[float] = []
        self.warned = False
        self.threads: ThreadTuner | None = None
        self.planned_at = 0  # the step the decay was last planned at

    # ---- the clock -------------------------------------------------------------------------------------------------

    def on_train_end(self, args, state, control, **kwargs):
        if len(self.window) >= SHORT_WINDOW:  # the steps since the last full window (all of a short run's)
            self._compare_speed(statistics.median(self.window))
        if self.threads is not None:  # the process's own count again (a Python caller may train once more)
            torch.set_num_threads(self.threads.most)

    def on_train_begin(self, args, state, control, **kwargs):
        plan = self.schedule
        cpu = getattr(args.device, "type", None) == "cpu"
        self.threads = ThreadTuner(torch.get_num_threads(), plan.threads) if cpu and args.world_size == 1 else None
        self.last = time.perf_counter()
        self.measured = plan.step_seconds  # the step as measured before training (or when the checkpoint was saved)
        if self.measured:
            self._compare_speed(self.measured)
        self.deadline = self.last + plan.training_seconds - plan.elapsed
        if plan.elapsed:
            logger.info("budget: resuming the plan at step %d with %.0f s of training time left", state.global_step,
                        plan.training_seconds - plan.elapsed)

    def _left(self, now: float) -> float:
        """Seconds left for steps: to the deadline, less the evaluations and saves still planned."""
        plan = self.schedule
        done = plan.elapsed / plan.training_seconds if plan.training_seconds else 1.0
        pending = (sum(f > done for f in self.eval_at) * plan.evaluation_seconds
                   + sum(f > done for f in self.save_at) * plan.save_seconds)
        return self.deadline - now - pending

    def on_evaluate(self, args, state, control, **kwargs):
        self._charge("evaluation_seconds")

    def on_save(self, args, state, control, **kwargs):
        self._charge("save_seconds")

    def _charge(self, cost: str) -> None:
        """An evaluation or a save just ended: what it took replaces its estimate (the final evaluation's too)."""
        now = time.perf_counter()
        plan = self.schedule
        took = now - self.last
        if cost == "evaluation_seconds":
            plan.final_seconds += took - plan.evaluation_seconds
        setattr(plan, cost, took)
        self.last, self.skip_next = now, True

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        plan = self.schedule
        if not self.skip_next:
            self.recent.append(now - self.last)
            self._watch_speed()
            if self.threads is not None:
                self.threads.observe(now - self.last, state.global_step)
        self.last, self.skip_next = now, False
        before = plan.elapsed
        plan.elapsed = plan.training_seconds - (self.deadline - now)
        decision = self._decide(state.global_step, now, before) if state.is_world_process_zero else None
        if dist.is_available() and dist.is_initialized() and args.world_size > 1:
            shared = [decision]
            dist.broadcast_object_list(shared, src=0)
            decision = shared[0]
        stop, evaluate, save, decay = decision
        if decay is not None:
            plan.decay_start, plan.decay_end, plan.replans = decay[0], decay[1], [list(move) for move in decay[2]]
        control.should_training_stop |= stop
        control.should_evaluate |= evaluate and not stop  # the final evaluation follows training anyway
        control.should_save |= save and not stop

    def _decide(self, step: int, now: float, before: float) -> tuple[bool, bool, bool, tuple | None]:
        """(stop, evaluate, save, (decay_start, decay_end, replans) when the decay is planned now), `before` the
        training seconds spent at the previous step."""
        plan = self.schedule
        if self.recent:
            plan.step_seconds = statistics.median(self.recent)
        # The final evaluation and save run on the machine as it is then: as much slower as the steps are now.
        slower = min(max(plan.step_seconds / self.measured, 1.0), MAX_SLOWER) if self.measured else 1.0
        left = self._left(now) - plan.final_seconds * slower
        decay = None
        fit = min(step + max(int(left / (plan.step_seconds * DECAY_MARGIN)), 1), self.max_steps)
        if plan.clock_decay and plan.decay_start is None:
            cap_near = self.max_steps - step <= plan.decay_share * self.max_steps
            if left <= plan.decay_share * plan.training_seconds or cap_near:
                plan.decay_start, plan.decay_end, self.planned_at = step, fit, step
                decay = (step, fit, [])
                logger.info("budget: the decay starts at step %d, %.0f s before the deadline: %d steps of %.3f s "
                            "to step %d", step, max(left, 0.0), fit - step, plan.step_seconds, fit)
        elif plan.clock_decay and step < plan.decay_end:
            longer = (fit - plan.decay_end > REPLAN_GAIN * (plan.decay_end - plan.decay_start)
                      and step - self.planned_at >= RECENT_STEPS)
            out_of_reach = step + int(left / plan.step_seconds) < plan.decay_end
            if longer or out_of_reach:
                logger.info("budget: the decay re-planned at step %d, %.0f s before the deadline: %d steps of %.3f s "
                            "to step %d (was %d)", step, max(left, 0.0), fit - step, plan.step_seconds, fit,
                            plan.decay_end)
                plan.replan(step, fit)
                self.planned_at = step
                decay = (plan.decay_start, plan.decay_end, [list(move) for move in plan.replans])
        end = plan.decay_end if plan.decay_end is not None else self.max_steps
        stop = step >= min(end, self.max_steps)
        if not stop and left < plan.step_seconds:
            stop = True
            logger.warning("budget: the deadline ends training at step %d, before the %d the plan reached for (the "
                           "machine got slower: a step now takes %.3f s)", step, end, plan.step_seconds)
        before, done = before / plan.training_seconds, plan.elapsed / plan.training_seconds
        crossed = [f for f in self.eval_at if before < f <= done], [f for f in self.save_at if before < f <= done]
        return stop, bool(crossed[0]), bool(crossed[1]), decay

    def _watch_speed(self) -> None:
        """Adds the latest step to the current window of steps (at least `RECENT_STEPS` steps and `SPEED_WINDOW`
        seconds, so that a hiccup of a few steps is not a change of speed) and compares a full window's median."""
        self.window.append(self.recent[-1])
        if len(self.window) < RECENT_STEPS or sum(self.window) < SPEED_WINDOW:
            return
        median, self.window = statistics.median(self.window), []
        self._compare_speed(median)

    def _compare_speed(self, seconds: float) -> None:
        """Warns once when the step time has changed by more than `SPEED_CHANGE_WARNING` times since the measurement
        before training or between windows: the user then knows why the run trained fewer (or more) steps."""
        if not self.speeds:
            self.speeds = [seconds]
        elif seconds < min(self.speeds):
            self.speeds = [max(self.speeds), seconds]
        elif seconds > max(self.speeds):
            self.speeds = [min(self.speeds), seconds]
        if not self.warned and max(self.speeds) > SPEED_CHANGE_WARNING * min(self.speeds):
            self.warned = True
            logger.warning("budget: the step time changed from %.3f s to %.3f s during the run (other work on this "
                           "machine?); the schedule follows the clock, so the run still ends on time", *self.speeds)
