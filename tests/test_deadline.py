"""A budgeted run follows the clock (lmkit.deadline): its schedule is transformers' own shapes, its decay starts by the
clock and ends by the deadline whatever the machine does, its timings are robust to a busy machine, and `--resume`
keeps its plan."""

import logging
import subprocess
import time
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import LMKIT, run_cli, tiny_recipe  # tests/ is on sys.path under pytest
from transformers import TrainerControl
from transformers.optimization import (
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
    get_wsd_schedule,
)

from lmkit import deadline
from lmkit.budget import robust_seconds, spread
from lmkit.run_dir import RunDir


def _factors(make_scheduler, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer)
    factors = []
    for _ in range(steps):
        factors.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return factors


@pytest.mark.parametrize("shape, reference", [
    ("cosine", lambda o: get_cosine_schedule_with_warmup(o, 10, 100)),
    ("linear", lambda o: get_linear_schedule_with_warmup(o, 10, 100)),
])
def test_a_schedule_decaying_from_the_warm_up_is_transformers_own(shape, reference):
    ours = deadline.Schedule(warmup=10, shape=shape, decay_start=10, decay_end=100)
    expected = _factors(reference, 100)
    got = _factors(lambda o: torch.optim.lr_scheduler.LambdaLR(o, ours), 100)
    assert got == pytest.approx(expected, abs=1e-12)


def test_a_warm_up_stable_decay_schedule_is_transformers_own_once_its_decay_is_placed():
    ours = deadline.Schedule(warmup=5, shape="linear", decay_start=70, decay_end=100, clock_decay=True)
    expected = _factors(lambda o: get_wsd_schedule(o, 5, num_decay_steps=30, num_training_steps=100,
                                                   decay_type="linear"), 100)
    assert _factors(lambda o: torch.optim.lr_scheduler.LambdaLR(o, ours), 100) == pytest.approx(expected, abs=1e-12)
    undecided = deadline.Schedule(warmup=5, shape="linear", clock_decay=True)
    assert [undecided(step) for step in (0, 5, 10_000)] == [0.0, 1.0, 1.0], "no decay until the clock places it"


def test_a_decay_the_clock_starts_during_the_warm_up_takes_over():
    """A machine so slow that the time for the decay comes before the warm-up's end: the run still ends at zero."""
    schedule = deadline.Schedule(warmup=10, shape="linear", decay_start=5, decay_end=8, clock_decay=True)
    assert [schedule(step) for step in range(9)] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 1 / 3, 0])


def test_fractions_of_a_run():
    assert deadline.fractions(0.5) == [0.5]
    assert deadline.fractions(0.25) == [0.25, 0.5, 0.75]
    assert deadline.fractions(1) == [] and deadline.fractions(None) == []


def test_a_timing_an_order_of_magnitude_off_is_left_out_and_logged(caplog):
    samples = [0.030, 0.45, 0.031, 0.52, 0.029]  # two samples under a burst of load: the plain median is 0.031
    with caplog.at_level(logging.INFO, logger="lmkit.budget"):
        assert robust_seconds(samples) == 0.030
    assert "2 of 5 samples left out" in caplog.text
    assert spread([1.0, 1.0, 1.0, 1.0]) == 1.0 and spread([1.0, 1.0, 3.0, 3.0]) == 3.0


# ---- the clock, on a simulated machine ------------------------------------------------------------------------------

TRAINING_SECONDS, FINAL_SECONDS, EVALUATION_SECONDS = 100.0, 5.0, 2.0


def _simulate(monkeypatch, step_seconds, max_steps: int = 100_000, decay_share: float = deadline.DECAY_SHARE) -> dict:
    """A budgeted warm-up/stable/decay run on a fake clock whose step takes `step_seconds(elapsed)` seconds, with an
    evaluation (2 s) at half the training time; returns what happened."""
    now = [1000.0]
    monkeypatch.setattr(deadline.time, "perf_counter", lambda: now[0])
    schedule = deadline.Schedule(warmup=10, shape="linear", clock_decay=True, training_seconds=TRAINING_SECONDS,
                                 step_seconds=0.1, evaluation_seconds=EVALUATION_SECONDS, save_seconds=0.5,
                                 final_seconds=FINAL_SECONDS, decay_share=decay_share)
    callback = deadline.DeadlineCallback(schedule, max_steps, eval_at=[0.5], save_at=[])
    args = SimpleNamespace(world_size=1, device=None)  # not a CPU: the thread count is ThreadTuner's test
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    callback.on_train_begin(args, state, None)
    started, evaluations, factors = now[0], [], []
    while True:
        now[0] += step_seconds(now[0] - started)
        state.global_step += 1
        # the Trainer steps the scheduler (the next step's learning rate) before the callbacks see the step
        factors.append(schedule(state.global_step))
        control = TrainerControl()
        callback.on_step_end(args, state, control)
        if control.should_evaluate:
            evaluations.append(now[0] - started)
            now[0] += EVALUATION_SECONDS
            callback.on_evaluate(args, state, control)
        if control.should_training_stop:
            break
    callback.on_train_end(args, state, control)
    return {"ended": now[0] - started, "steps": state.global_step, "schedule": schedule, "evaluations": evaluations,
            "final_factor": schedule(state.global_step), "factors": factors}


@pytest.mark.parametrize("name, step_seconds", [
    ("quiet", lambda t: 0.1),
    ("busy for the first 30 s", lambda t: 1.0 if t < 30 else 0.1),
    ("busy from halfway", lambda t: 0.1 if t < 50 else 0.25),
    ("quiet from halfway", lambda t: 0.25 if t < 50 else 0.1),
])
def test_the_clock_ends_training_by_its_deadline_with_the_decay_complete(monkeypatch, caplog, name, step_seconds):
    with caplog.at_level(logging.INFO, logger="lmkit.deadline"):
        run = _simulate(monkeypatch, step_seconds)
    # the final evaluation and save follow, reckoned as much slower as the steps are at the end (measured: 0.1 s)
    slower = min(max(step_seconds(run["ended"]) / 0.1, 1.0), deadline.MAX_SLOWER)
    training_end = TRAINING_SECONDS - FINAL_SECONDS * slower
    assert training_end * 0.97 <= run["ended"] <= training_end, name
    schedule = run["schedule"]
    assert schedule.decay_start is not None and run["steps"] == schedule.decay_end, "the decay ran to its end"
    assert run["final_factor"] == 0.0
    assert run["evaluations"] and abs(run["evaluations"][0] - TRAINING_SECONDS / 2) < 1.0, "evaluated at half time"
    if name != "quiet":
        assert "the step time changed" in caplog.text
    else:
        assert "the step time changed" not in caplog.text


@pytest.mark.parametrize("decay_share", [deadline.DECAY_SHARE, 0.5])
def test_the_decay_starts_with_its_share_of_the_time_left(monkeypatch, decay_share):
    run = _simulate(monkeypatch, lambda t: 0.1, decay_share=decay_share)
    schedule = run["schedule"]
    decay_seconds = (schedule.decay_end - schedule.decay_start) * 0.1
    share = decay_share * TRAINING_SECONDS
    assert share / deadline.DECAY_MARGIN * 0.95 <= decay_seconds <= share


def _replayed(schedule: deadline.Schedule, steps: int) -> list[float]:
    """The factors of steps 1..`steps` as a re-run has them: a schedule built from the run's `budget:` keys."""
    budget = schedule.recorded()
    replay = deadline.Schedule(warmup=budget["warmup_steps"], shape=schedule.shape, decay_start=budget["decay_start"],
                               decay_end=budget["decay_end"], replans=budget["decay_replans"] or [])
    return [replay(step) for step in range(1, steps + 1)]


@pytest.mark.parametrize("name, step_seconds", [
    ("faster during the decay", lambda t: 0.2 if t < 85 else 0.1),
    ("slower during the decay", lambda t: 0.1 if t < 85 else 0.15),
    ("quiet", lambda t: 0.1),
])
def test_the_clock_replans_the_decay_to_the_deadline_without_a_jump(monkeypatch, caplog, name, step_seconds):
    with caplog.at_level(logging.INFO, logger="lmkit.deadline"):
        run = _simulate(monkeypatch, step_seconds)
    schedule = run["schedule"]
    slower = min(max(step_seconds(run["ended"]) / 0.1, 1.0), deadline.MAX_SLOWER)
    training_end = TRAINING_SECONDS - FINAL_SECONDS * slower
    assert training_end * 0.99 <= run["ended"] <= training_end, f"{name}: the decay's end follows the machine"
    assert schedule.replans and "the decay re-planned at step" in caplog.text
    assert run["steps"] == schedule.decay_end and run["final_factor"] == 0.0, "the decay ran to its end"
    decay = run["factors"][schedule.decay_start - 1:]
    assert all(later <= earlier for earlier, later in zip(decay, decay[1:])), "down all the way"
    assert max(earlier - later for earlier, later in zip(decay, decay[1:])) < 0.02, "no jump at a re-plan"
    assert _replayed(schedule, run["steps"]) == run["factors"], "a re-run of the recorded plan has the same rates"
    assert "the deadline ends training" not in caplog.text


def test_a_machine_slowing_sharply_during_the_decay_ends_training_at_the_deadline(monkeypatch, caplog):
    """Three times slower: the final evaluation and save are reckoned three times slower too (15 s, not 5), so the
    time left for steps drops at once and no plan reaches zero."""
    with caplog.at_level(logging.WARNING, logger="lmkit.deadline"):
        run = _simulate(monkeypatch, lambda t: 0.1 if t < 85 else 0.3)
    assert run["ended"] <= TRAINING_SECONDS - FINAL_SECONDS
    assert run["steps"] < run["schedule"].decay_end and run["final_factor"] > 0
    assert "the deadline ends training at step" in caplog.text


@pytest.mark.parametrize("name, step_seconds, max_steps, warned", [
    ("8x slower from the start", 0.8, 100_000, "from 0.100 s to 0.800 s"),
    ("60x slower from the start: a dozen steps", 6.0, 100_000, "from 0.100 s to 6.000 s"),
    ("2.5x faster from the start", 0.04, 100_000, "from 0.100 s to 0.040 s"),
    ("1.5x slower, a short run", 0.15, 12, None),
])
def test_a_run_whose_steps_are_not_what_was_measured_says_so_however_short(monkeypatch, caplog, name, step_seconds,
                                                                           max_steps, warned):
    """The measurement before training is the first speed the run compares with: a run that trains far fewer steps
    than planned because the machine is busy from the start, too short for a full window of steps, still warns."""
    with caplog.at_level(logging.WARNING, logger="lmkit.deadline"):
        run = _simulate(monkeypatch, lambda t: step_seconds, max_steps=max_steps)
    assert run["steps"] >= 10, "even the shortest has a window's worth at its end"
    if warned:
        assert caplog.text.count("the step time changed") == 1 and warned in caplog.text, name
    else:
        assert "the step time changed" not in caplog.text, name
    assert run["ended"] <= TRAINING_SECONDS - FINAL_SECONDS


def test_a_replanned_decay_goes_on_from_where_it_was():
    schedule = deadline.Schedule(warmup=0, shape="linear", decay_start=10, decay_end=20)
    before = [schedule(step) for step in range(16)]
    schedule.replan(15, 30)  # halfway down (0.5 at step 15): the rest, 0.5, over 15 steps instead of 5
    schedule.replan(24, 26)  # 0.2 at step 24: down to 0 at 26
    assert [schedule(step) for step in range(16)] == before
    assert [schedule(step) for step in (15, 18, 24, 25, 26, 40)] == pytest.approx([0.5, 0.4, 0.2, 0.1, 0.0, 0.0])
    assert schedule.recorded()["decay_replans"] == [[15, 20], [24, 30]] and schedule.decay_end == 26


def test_the_epoch_cap_ends_the_decay_at_the_cap(monkeypatch):
    run = _simulate(monkeypatch, lambda t: 0.1, max_steps=400)  # 950 steps would fit
    schedule = run["schedule"]
    assert run["steps"] == schedule.decay_end == 400 and schedule.decay_start == 320
    assert run["ended"] < 50


# ---- a real budgeted run: recorded, re-run exactly, resumed on its plan ---------------------------------------------


@pytest.mark.slow
def test_a_budgeted_run_killed_after_its_checkpoint_resumes_on_its_plan(tmp_path, fixtures):
    # The first save at a tenth of the training time and no evaluation before the final one: on a loaded CI machine
    # (steps 3x slower than measured, an evaluation 6 s) a save at half time was never reached, as the final
    # evaluation, reckoned 3x slower, and a pending one took the rest of the 45 s; at a tenth it still is at 4x.
    # A model larger than TINY's: on a quiet machine TINY ran into the 16-epoch cap (whose decay starts by steps).
    recipe = tiny_recipe(tmp_path, fixtures, training={"lr_scheduler_type": "warmup_stable_decay",
                                                       "save_strategy": "steps", "save_steps": 0.1,
                                                       "eval_strategy": "no", "logging_steps": 5},
                         model={"n_layer": 4, "n_embd": 128, "n_head": 4})
    argv = [LMKIT, "train", str(recipe), "--time", "45s"]
    run = RunDir(tmp_path / "run")
    log = tmp_path / "first.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr)
    limit = time.monotonic() + 150
    while not run.complete_checkpoints():
        assert process.poll() is None and time.monotonic() < limit, \
            f"the run ended before its checkpoint: {log.read_text()[-2000:]}"
        time.sleep(0.05)
    process.kill()
    process.wait()
    checkpoint = run.complete_checkpoints()[0]
    restored = deadline.restore(checkpoint)
    assert restored is not None and restored.decay_start is None, "killed in the stable phase, plan in the checkpoint"
    assert restored.training_seconds > 0 and 0.09 < restored.elapsed / restored.training_seconds < 0.5

    started = time.monotonic()
    resumed = run_cli("train", recipe, "--time", "45s", "--resume")
    wall = time.monotonic() - started
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step = int(checkpoint.name.split("-")[1])
    assert f"resuming the plan at step {step}" in resumed.stderr
    left = restored.training_seconds - restored.elapsed
    assert wall < left + 25, "the resumed run has the training time that was left, not a new budget"
    budget = yaml.safe_load(run.recipe.read_text())["budget"]
    assert budget["steps"] > step and budget["decay_start"] > step and budget["decay_end"] >= budget["steps"]


def test_a_schedule_the_clock_cannot_drive_is_refused_before_anything_runs(tmp_path, fixtures):
    from lmkit.errors import UserError
    from lmkit.recipe import load_recipe

    recipe = tiny_recipe(tmp_path, fixtures)
    with pytest.raises(UserError, match=r"training.lr_scheduler_type must be one of warmup_stable_decay, .* under a "
                                        r"time budget .* got cosine_with_restarts"):
        load_recipe(recipe, ["budget.time=1m", "training.lr_scheduler_type=cosine_with_restarts"])
    with pytest.raises(UserError, match=r"training.lr_scheduler_kwargs.decay_type must be one of linear, cosine, "
                                        r"1-sqrt, got 'exp'"):
        load_recipe(recipe, ["budget.time=1m", "training.lr_scheduler_type=warmup_stable_decay",
                             "training.lr_scheduler_kwargs={decay_type: exp}"])
    assert load_recipe(recipe, ["training.lr_scheduler_type=cosine_with_restarts"]).budget.time is None


@pytest.mark.parametrize("kwargs, error", [
    ("{decay_share: 1.5}", r"training.lr_scheduler_kwargs.decay_share must be a number between 0 and 1 \(exclusive\), "
                           r"got 1.5"),
    ("{decay_share: half}", r"decay_share must be a number between 0 and 1 \(exclusive\), got 'half'"),
    ("{decay_share: 0.3, num_decay_steps: 10}", r"decay_share and num_decay_steps both set the decay's length"),
])
def test_a_decay_share_out_of_range_is_refused_with_its_key(tmp_path, fixtures, kwargs, error):
    from lmkit.errors import UserError
    from lmkit.recipe import load_recipe

    recipe = tiny_recipe(tmp_path, fixtures)
    with pytest.raises(UserError, match=error):
        load_recipe(recipe, ["training.lr_scheduler_type=warmup_stable_decay",
                             f"training.lr_scheduler_kwargs={kwargs}"])
    with pytest.raises(UserError, match=r"decay_share is for lr_scheduler_type warmup_stable_decay, got cosine"):
        load_recipe(recipe, ["training.lr_scheduler_type=cosine", "training.lr_scheduler_kwargs={decay_share: 0.3}"])


def test_a_run_without_a_budget_decays_over_its_decay_share(tmp_path, fixtures):
    """training.lr_scheduler_kwargs.decay_share without a budget: the last share of the fixed step count."""
    from lmkit.recipe import load_recipe
    from lmkit.training import LmkitTrainer

    recipe = load_recipe(tiny_recipe(tmp_path, fixtures), ["training.lr_scheduler_type=warmup_stable_decay",
                                                           "training.lr_scheduler_kwargs={decay_share: 0.5}"])
    trainer = SimpleNamespace(schedule=None, args=recipe.training, lr_scheduler=None,
                              optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
    LmkitTrainer.create_scheduler(trainer, 100)
    assert (trainer.schedule.decay_start, trainer.schedule.decay_end) == (50, 100)


def test_under_load_the_thread_count_drops_and_comes_back_when_the_load_goes(monkeypatch, caplog):
    """A simulated 2-core machine: a busy process from t=10 s to t=60 s makes 2 threads 3.2x slower and 1 thread as
    fast as it is quiet (as measured on this machine)."""
    now, threads = [0.0], [2]
    monkeypatch.setattr(deadline.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(deadline.torch, "set_num_threads", lambda n: threads.__setitem__(0, n))

    def step_seconds():
        busy = 10 <= now[0] < 60
        return {(2, False): 0.18, (1, False): 0.28, (2, True): 0.57, (1, True): 0.28}[(threads[0], busy)]

    changes = []
    tuner = deadline.ThreadTuner(2, changes)
    history = []
    with caplog.at_level(logging.INFO, logger="lmkit.deadline"):
        for step in range(1, 100_000):
            if now[0] >= 120:
                break
            seconds = step_seconds()
            now[0] += seconds
            tuner.observe(seconds, step)
            history.append((now[0], threads[0]))
    during = [n for t, n in history if 20 <= t < 60]
    after = [n for t, n in history if t >= 100]
    before = [n for t, n in history if t < 10]
    assert set(before) == {2}, "a quiet machine tries nothing"
    assert during.count(1) > 0.8 * len(during), "under load: one thread"
    assert set(after) == {2}, "the load gone: both threads again"
    assert "1 threads take" in caplog.text and "2 threads take" in caplog.text
    # every change is recorded with the step after which it took effect, for a re-run to replay
    replayed, at = [], dict(map(tuple, changes))
    current = 2
    for step in range(1, len(history) + 1):
        replayed.append(current)
        current = at.get(step, current)
    assert replayed == [n for _, n in history][:1] + [n for _, n in history][:-1]
