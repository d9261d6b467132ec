"""A time budget kept: `lmkit train --time` wall time against the budget, and a re-run of the resolved recipe.

    python benchmarks/bench_budget.py [--recipe recipes/quickstart-zh/config.yaml] [--time 2m] [--runs 2]

The corpus is the recipe's own (the default recipe reads Debian's fortune files: `make corpora` installs them).

1. Runs `lmkit train RECIPE --time T` `--runs` times, each in a fresh output dir, datasets cache and hub (the
   data stage and the publishing are part of the budget), and prints each command's wall time as a ratio to the budget, with the step
   count the budget resolved to.
2. Re-runs the first run's resolved `recipe.yaml` (no budget measuring: `budget.steps` fixes the count) and prints
   the largest difference between its weights and the first run's (0 means bit-identical).
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "src"))

from lmkit.budget import parse_duration  # noqa: E402


def timed_train(argv: list[str], scratch: Path, name: str) -> float:
    env_cache = scratch / f"cache-{name}"
    started = time.perf_counter()
    done = subprocess.run([str(BIN / "lmkit"), "train", *argv], capture_output=True, text=True,
                          env={"HF_DATASETS_CACHE": str(env_cache), "LMKIT_HUB": str(scratch / "hub"),
                               "PATH": str(BIN) + ":/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"lmkit train {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return wall


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO / "recipes/quickstart-zh/config.yaml"))
    parser.add_argument("--time", default="2m")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    budget = parse_duration(args.time)

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        print("| run | budget | wall | wall / budget | steps |\n|---|---|---|---|---|")
        runs = []
        for index in range(args.runs):
            out = scratch / f"run{index}"
            wall = timed_train([args.recipe, f"training.output_dir={out}", "--time", args.time],
                               scratch, f"run{index}")
            steps = yaml.safe_load((out / "recipe.yaml").read_text())["budget"]["steps"]
            runs.append(out)
            print(f"| {index + 1} | {budget:.0f} s | {wall:.1f} s | {wall / budget:.3f} | {steps} |", flush=True)

        rerun = scratch / "rerun"
        wall = timed_train([str(runs[0] / "recipe.yaml"), f"training.output_dir={rerun}"], scratch, "rerun")
        first, second = load_file(runs[0] / "model.safetensors"), load_file(rerun / "model.safetensors")
        diff = max((first[k].float() - second[k].float()).abs().max().item() for k in first)
        print(f"\nre-run of run 1's recipe.yaml: {wall:.1f} s, max |weight difference| = {diff:g}")


if __name__ == "__main__":
    main()
