"""A time budget kept: `lmkit train --time` wall time against the budget, and a re-run of the resolved recipe.

    python benchmarks/bench_budget.py [--recipe recipes/quickstart-zh/config.yaml] [--time 2m] [--runs 2] [key=value]
    python benchmarks/bench_budget.py --smoke   # one 90 s run on tests/fixtures/zh-poetry.jsonl and its re-run

The corpus is the recipe's own (the default recipe reads Debian's fortune files: `make corpora` installs them).
Extra `key=value` overrides go to every run.

1. Runs `lmkit train RECIPE --time T` `--runs` times, each in a fresh output dir, datasets cache and hub (the
   data stage and the publishing are part of the budget), and prints each command's wall time as a ratio to the
   budget, with the step count the budget resolved to.
2. Re-runs the first run's resolved `recipe.yaml` (no budget measuring: `budget.steps` fixes the count) and prints
   the largest difference between its weights and the first run's (0 means bit-identical).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file
from smoke import FIXTURES, add_smoke

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "src"))

from lmkit.budget import parse_duration  # noqa: E402


def timed_train(argv: list[str], scratch: Path, name: str, budget: float) -> float:
    env_cache = scratch / f"cache-{name}"
    started = time.perf_counter()
    env = {**os.environ, "HF_DATASETS_CACHE": str(env_cache), "LMKIT_HUB": str(scratch / "hub"), "HF_HUB_OFFLINE": "1"}
    # bounded: a run that overshoots its budget several times over is a finding, not something to wait on for ever
    done = subprocess.run([str(BIN / "lmkit"), "train", *argv], capture_output=True, text=True, env=env,
                          timeout=3 * budget + 300)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"lmkit train {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return wall


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO / "recipes/quickstart-zh/config.yaml"))
    parser.add_argument("--time", default="2m")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    # the budget includes the data stage and start-up, tens of seconds on 2 cores shared with a test run
    add_smoke(parser, time="90s", runs=1,
              overrides=[f"data.files=[{FIXTURES / 'zh-poetry.jsonl'}]", "eval.bleu_samples=8"])
    args = parser.parse_args()
    budget = parse_duration(args.time)

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        print("| run | budget | wall | wall / budget | steps |\n|---|---|---|---|---|")
        runs = []
        for index in range(args.runs):
            out = scratch / f"run{index}"
            wall = timed_train([args.recipe, *args.overrides, f"training.output_dir={out}", "--time", args.time],
                               scratch, f"run{index}", budget)
            steps = yaml.safe_load((out / "recipe.yaml").read_text())["budget"]["steps"]
            runs.append(out)
            print(f"| {index + 1} | {budget:.0f} s | {wall:.1f} s | {wall / budget:.3f} | {steps} |", flush=True)

        rerun = scratch / "rerun"
        wall = timed_train([str(runs[0] / "recipe.yaml"), f"training.output_dir={rerun}"], scratch, "rerun", budget)
        first, second = load_file(runs[0] / "model.safetensors"), load_file(rerun / "model.safetensors")
        diff = max((first[k].float() - second[k].float()).abs().max().item() for k in first)
        print(f"\nre-run of run 1's recipe.yaml: {wall:.1f} s, max |weight difference| = {diff:g}")


if __name__ == "__main__":
    main()
