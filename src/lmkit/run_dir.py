"""The run directory (`training.output_dir`): the name and place of everything a run writes or reads, in one place.

    <run>/
        recipe.yaml                     the resolved recipe (as of the latest start or resume)
        lmkit_run.json                  what the run is: its first resolved recipe, corpus and tokenizer SHA-256s
        run_history.jsonl               one line per start, resume (and the settings it changed) and end
        data_stats.json                 what the data stage read, cleaned, split and tokenized
        heldout/<split>.jsonl           the held-out documents, exactly as split (what `lmkit eval` scores)
        tokenizer/                      the tokenizer trained in the run (and its tokenizer_stats.json)
        tokenizer_stats.json            a copy of it at the top, for the hub and the model card
        samples/eval-step-<step>.md     the generations of each evaluation (the step zero-padded to 6 digits, e.g.
                                        eval-step-000500.md); eval_samples.md: a copy of the last one
        metrics.csv, training_curves.png, runs/ (tensorboard)
        checkpoint-<step>/              Trainer checkpoints; `.lmkit-complete` inside marks a completely written one
        .final-model.tmp/               the final weights while they are being written
        model.safetensors, config.json, tokenizer files, trainer_state.json, train_results.json
        adapter/                        a LoRA run's adapter (adapter_config.json, adapter_model.safetensors); the
                                        model files above are then the merged model
        eval_results.json               the final metrics, written last: its presence marks a finished run
        eval_report.json, eval_report_samples.md   what `lmkit eval` wrote

A checkpoint dir belongs to its run: run-level files (recipe, data statistics, held-out split) are looked up in the
checkpoint's parent (`RunDir.of_model`).
"""

import re
from pathlib import Path

from lmkit.atomic import atomic_write_text, follow_umask

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
_COMPLETE_MARKER = ".lmkit-complete"
_TRAINER_STATE = "trainer_state.json"  # written by the Trainer into the run dir and into every checkpoint

# What a hub revision takes from a run besides the model and tokenizer files. Run-level files describe the whole run,
# so a checkpoint borrows them from its run dir; results describe one set of weights, so they only ever come from the
# pushed directory itself.
RUN_FILES = ("recipe.yaml", "data_stats.json", "tokenizer_stats.json", "training_curves.png")
RESULT_FILES = ("eval_results.json", "eval_samples.md")
# A LoRA run's adapter, beside the merged model (a subfolder: see lmkit.adapters). Paths relative to the run dir.
ADAPTER_DIR = "adapter"
ADAPTER_FILES = (f"{ADAPTER_DIR}/adapter_config.json", f"{ADAPTER_DIR}/adapter_model.safetensors")


def missing_model(path: Path) -> str | None:
    """Why `path` cannot be loaded as a model, in words that say what it holds instead; None when it holds one (a
    config.json). A LoRA run's checkpoint holds its adapter only: the model is the finished run dir."""
    if (path / "config.json").is_file():
        return None
    if (path / "adapter_config.json").is_file():
        return (f"{path}: a LoRA checkpoint holds the adapter only, not a model; use the finished run dir (the "
                "merged model, with the adapter beside it), or resume the run to finish it")
    if (path / "tokenizer.json").is_file():
        return f"{path}: no config.json here: a tokenizer directory, not a model"
    return f"{path}: not a model directory (no config.json)"


class RunDir:
    """Paths inside one run directory; nothing is created or read here except where a method says so."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @classmethod
    def of_model(cls, model_dir: str | Path) -> "RunDir":
        """The run a model dir belongs to: the dir itself, or its parent when it is a checkpoint of a run."""
        model_dir = Path(model_dir)
        return cls(model_dir.parent if is_checkpoint(model_dir) else model_dir)

    # ---- run-level artefacts ----

    @property
    def recipe(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def identity(self) -> Path:
        """What the run is (resolved recipe, corpus and tokenizer hashes): what `--resume` compares against."""
        return self.path / "lmkit_run.json"

    @property
    def history(self) -> Path:
        """One JSON line per start, resume (with the settings it changed) and end of the run."""
        return self.path / "run_history.jsonl"

    @property
    def data_stats(self) -> Path:
        return self.path / "data_stats.json"

    def heldout(self, split: str = "test") -> Path:
        return self.heldout_dir / f"{split}.jsonl"

    @property
    def heldout_dir(self) -> Path:
        return self.path / "heldout"

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @property
    def tokenizer_stats(self) -> Path:
        return self.path / "tokenizer_stats.json"

    @property
    def metrics_csv(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def training_curves(self) -> Path:
        return self.path / "training_curves.png"

    def samples_at(self, step: int) -> Path:
        """samples/eval-step-<step>.md, the step zero-padded to 6 digits: the names sort by step (`latest_samples`)."""
        return self.path / "samples" / f"eval-step-{step:06d}.md"

    def latest_samples(self) -> Path | None:
        found = sorted((self.path / "samples").glob("eval-step-*.md"))
        return found[-1] if found else None

    @property
    def eval_samples(self) -> Path:
        return self.path / "eval_samples.md"

    @property
    def eval_results(self) -> Path:
        """The final metrics; written last, so its presence marks a finished run."""
        return self.path / "eval_results.json"

    @property
    def is_finished(self) -> bool:
        return self.eval_results.is_file()

    @property
    def adapter_dir(self) -> Path:
        """A LoRA run's adapter files (the run dir's model is the merged one)."""
        return self.path / ADAPTER_DIR

    @property
    def final_model_staging(self) -> Path:
        return self.path / ".final-model.tmp"

    def eval_report(self) -> tuple[Path, Path]:
        """Where `lmkit eval` writes its report and samples table when it writes them here."""
        return self.path / "eval_report.json", self.path / "eval_report_samples.md"

    # ---- checkpoints ----

    def checkpoint(self, step: int) -> Path:
        return self.path / f"checkpoint-{step}"

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoint dirs that were completely written, oldest step first."""
        found = []
        for path in self.path.glob("checkpoint-*"):
            match = CHECKPOINT_PATTERN.match(path.name)
            if match and (path / _COMPLETE_MARKER).is_file():
                found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found)]

    def incomplete_checkpoints(self) -> list[Path]:
        """Checkpoint dirs without the completion marker: a process died while writing them."""
        return [path for path in self.path.glob("checkpoint-*")
                if CHECKPOINT_PATTERN.match(path.name) and not (path / _COMPLETE_MARKER).is_file()]

    def mark_complete(self, step: int) -> Path:
        """Mark `checkpoint-<step>` completely written (call once every process has saved its part)."""
        checkpoint = self.checkpoint(step)
        follow_umask(checkpoint)  # the Trainer's save_pretrained writes the weights 0600 whatever the umask
        atomic_write_text(checkpoint / _COMPLETE_MARKER, f"{step}\n")
        return checkpoint

    @property
    def trainer_state(self) -> Path:
        """The Trainer's state and log history (in a run dir and in each of its checkpoints)."""
        return self.path / _TRAINER_STATE


def is_checkpoint(directory: str | Path) -> bool:
    """A Trainer checkpoint dir (`checkpoint-<step>` holding trainer_state.json) inside its run dir."""
    directory = Path(directory)
    return bool(CHECKPOINT_PATTERN.match(directory.name)) and (directory / _TRAINER_STATE).is_file()

