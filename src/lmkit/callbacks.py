"""Trainer callbacks: they observe the run and write what a person wants to read; they never change training.

- `CheckpointCallback`: marks each checkpoint complete once the Trainer has fully written it (resume only trusts
  marked ones), and pushes it to the hub when `hub.push: every_save`.
- `MetricsFileCallback`: every logged value to the run's metrics.csv as it happens (`plot_training_curves` draws the
  PNG at the end).
"""

import csv
import io
import logging
from pathlib import Path

import torch.distributed as dist
from transformers import TrainerCallback

from lmkit import hub
from lmkit.atomic import atomic_write_bytes, atomic_write_text
from lmkit.run_dir import RunDir

logger = logging.getLogger(__name__)


class CheckpointCallback(TrainerCallback):
    """Marks checkpoints complete and optionally pushes each to the hub (main process only)."""

    def __init__(self, push_name: str | None = None, hub_dir: str | None = None):
        self.push_name = push_name
        self.hub_dir = hub_dir

    def on_save(self, args, state, control, **kwargs):
        # on_save runs once Trainer._save_checkpoint has written weights, optimizer, RNG and trainer_state.json on
        # this rank; wait for every rank (each writes its own rng_state_<rank>.pth) before calling the checkpoint done.
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        writer = state.is_local_process_zero if args.save_on_each_node else state.is_world_process_zero
        if not writer:
            return
        run_dir = RunDir(args.output_dir)
        if not run_dir.checkpoint(state.global_step).is_dir():
            return
        checkpoint = run_dir.mark_complete(state.global_step)
        if self.push_name and state.is_world_process_zero:
            ref = hub.push(checkpoint, self.push_name, self.hub_dir, message=f"checkpoint at step {state.global_step}")
            logger.info("pushed %s", ref)


class MetricsFileCallback(TrainerCallback):
    """Appends each log entry to the run's metrics.csv as rows of (step, epoch, name, value)."""

    def __init__(self, run_dir: RunDir):
        self.path = run_dir.metrics_csv

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run starts at its checkpoint's step: drop rows logged after it by the run that died, and any
        # rows of an earlier run in this directory.
        path = self.path
        if not state.is_world_process_zero or not path.exists():
            return
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        kept = [row for row in rows[1:] if row and int(row[0]) <= state.global_step] if state.global_step else []
        text = io.StringIO()
        csv.writer(text).writerows(rows[:1] + kept)
        atomic_write_text(path, text.getvalue())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        path = self.path
        new = not path.exists()
        with path.open("a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "epoch", "name", "value"])
            for name, value in logs.items():
                if isinstance(value, (int, float)) and name != "epoch":
                    writer.writerow([state.global_step, logs.get("epoch", state.epoch), name, value])


def plot_training_curves(log_history: list[dict], path: str | Path) -> None:
    """Train/eval loss and BLEU/chrF over steps, as one PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
        return [p[0] for p in points], [p[1] for p in points]

    fig, (loss_ax, bleu_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        steps, values = series(key)
        if steps:
            loss_ax.plot(steps, values, marker="o" if key == "eval_loss" else None, label=label)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("cross-entropy (nats/token)")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    for key, label in (("eval_bleu", "BLEU"), ("eval_chrf", "chrF")):
        steps, values = series(key)
        if steps:
            bleu_ax.plot(steps, values, marker="o", label=label)
    baseline = [e["eval_baseline_bleu"] for e in log_history if "eval_baseline_bleu" in e]
    if baseline:
        bleu_ax.axhline(baseline[0], linestyle="--", color="gray", label="baseline BLEU")
    bleu_ax.set_xlabel("step")
    bleu_ax.set_ylabel("score (0-100)")
    if bleu_ax.lines:
        bleu_ax.legend()
    bleu_ax.grid(alpha=0.3)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, image.getvalue())
