"""--resume: the run's identity is compared (the corpus by content), the recipe changes it allows are recorded, a
finished run is not re-published, and training killed at random points keeps only complete checkpoints. Each test
names the item of issue 11 it covers."""

import json
import os
import random
import stat
import subprocess
import time
from pathlib import Path

import pytest
from conftest import LMKIT, run_cli, tiny_recipe  # tests/ is on sys.path under pytest

from lmkit import hub

# ---- 3 and 9. --resume compares the run's identity; a finished run is not re-published ------------------------------

# The runs here: one layer of width 16, 4 steps with a checkpoint every 2 and no evaluation in between, published once
# at the end as org/tiny. The assertions count on these numbers.
SHORT_RUN = {
    "model": {"n_layer": 1, "n_embd": 16}, "eval": {"bleu_samples": 4}, "hub": {"name": "org/tiny", "push": "end"},
    "training": {"max_steps": 4, "save_steps": 2, "eval_strategy": "no"},
}  # fmt: skip


def _tree(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(directory.rglob("*"))}


@pytest.mark.slow
def test_resume_refuses_immutable_changes_records_mutable_ones_and_does_not_republish(tmp_path, fixtures, hub_path):
    from lmkit.recipe import load_recipe
    from lmkit.training import train

    recipe = tiny_recipe(tmp_path, fixtures, **SHORT_RUN)  # publishes to hub_path, tmp_path/hub
    train(load_recipe(recipe))
    run = tmp_path / "run"
    assert (run / "lmkit_run.json").is_file() and len(hub.list_models(hub_path)) == 1
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (run, run / "heldout", run / "tokenizer", run / "checkpoint-4"):  # 6. the umask, not 0700/0600
        assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask, path
    for path in (run / "model.safetensors", run / "recipe.yaml", run / "heldout" / "test.jsonl",
                 run / "checkpoint-4" / "model.safetensors", run / "lmkit_run.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    before = _tree(run)

    other = tmp_path / "other.jsonl"
    other.write_text((fixtures / "zh-quotes.jsonl").read_text())
    refused = run_cli("train", recipe, f"data.files=[{other}]", "training.seed=8", "model.n_embd=32", "--resume")
    assert refused.returncode == 2, refused.stderr[-3000:]
    (line,) = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert "data.files: the corpus content differs" in line and "training.seed: 7 -> 8" in line
    assert "model.n_embd: 16 -> 32" in line and "Traceback" not in refused.stderr
    assert _tree(run) == before, "nothing in the run dir may change before the error"

    # The corpus is compared by content, whatever its path.
    corpus_copy = tmp_path / "copy.jsonl"
    corpus_copy.write_text((fixtures / "zh-poetry.jsonl").read_text())
    moved = run_cli("train", recipe, f"data.files=[{corpus_copy}]", "--resume")
    assert moved.returncode == 0 and "already finished" in moved.stdout, moved.stderr[-3000:]  # same content: fine

    finished = run_cli("train", recipe, "--resume")
    assert finished.returncode == 0 and "already finished" in finished.stdout, finished.stderr[-3000:]
    assert len(hub.show("org/tiny", hub_path)["history"]) == 1  # not re-published
    assert _tree(run) == before

    more = run_cli("train", recipe, "training.max_steps=6", "training.logging_steps=1", "--resume")
    assert more.returncode == 0, more.stderr[-3000:]
    history = [json.loads(line) for line in (run / "run_history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in history] == ["start", "finished", "resume", "finished"]
    assert history[2]["changed"] == {"training.max_steps": {"was": 4, "now": 6},
                                     "training.logging_steps": {"was": 2, "now": 1}}
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 6
    assert len(hub.show("org/tiny", hub_path)["history"]) == 2  # a longer run is a new model: published once


def test_which_recipe_changes_resume_allows():
    from lmkit import resume

    before = {"data": {"files": ["a.txt"], "num_proc": None, "block_size": 64}, "model": {"n_embd": 16},
              "training": {"output_dir": "runs/x", "max_steps": 10, "seed": 1}, "hub": {"push": "never"}}
    after = {"data": {"files": ["moved/a.txt"], "num_proc": 4, "block_size": 64},
             "model": {"n_embd": 16, "n_layer": 2}, "training": {"output_dir": "/abs/runs/x", "max_steps": 20,
                                                                 "seed": 1, "logging_steps": 500},
             "hub": {"push": "end"}}
    changes = resume.recipe_changes(before, after)
    # Keys absent from one side mean their defaults: logging_steps 500 is TrainingArguments' default.
    assert set(changes) == {"data.files", "data.num_proc", "model.n_layer", "training.max_steps", "hub.push"}
    assert [key for key in changes if resume._is_immutable(key)] == ["model.n_layer"]
    assert resume._is_immutable("training.seed") and resume._is_immutable("data.block_size")
    assert not resume._is_immutable("training.eval_steps") and not resume._is_immutable("eval.bleu_samples")


# ---- fault injection: SIGKILL at random points of checkpoint saves --------------------------------------------------


@pytest.mark.slow
def test_training_killed_at_random_points_keeps_only_complete_checkpoints(tmp_path, fixtures, hub_path):
    from safetensors.torch import load_file

    from lmkit.run_dir import RunDir

    recipe = tiny_recipe(tmp_path, fixtures, **{**SHORT_RUN, "training": {**SHORT_RUN["training"], "save_steps": 1},
                                                "hub": {**SHORT_RUN["hub"], "push": "never"}})
    rng = random.Random(13)
    run = RunDir(tmp_path / "run")
    for attempt in range(2):
        process = subprocess.Popen([LMKIT, "train", str(recipe), *(["--resume"] if attempt else [])],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not any(run.path.glob("checkpoint-*")):  # killed somewhere among the checkpoint saves
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.5))
        process.kill()
        process.wait()
        for checkpoint in run.complete_checkpoints():
            load_file(str(checkpoint / "model.safetensors"))
            json.loads((checkpoint / "trainer_state.json").read_text())
    finished = run_cli("train", recipe, "--resume")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert run.is_finished and not run.incomplete_checkpoints()
    load_file(str(run.path / "model.safetensors"))
