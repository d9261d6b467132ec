"""A time budget kept on a busy machine: `lmkit train --time` wall time and bits per byte, quiet and under load, and a
re-run of the resolved recipe.

    python benchmarks/bench_budget.py [--recipe recipes/quickstart-zh/config.yaml] [--time 2m] [key=value ...]
    python benchmarks/bench_budget.py --data FILES [--time 2m]   # the automatic path: lmkit train --data FILES
    python benchmarks/bench_budget.py --smoke   # 60 s runs on tests/fixtures/zh-poetry.jsonl, quiet and loaded

1. Runs the same `lmkit train ... --time T` once per load pattern (`--loads`), each in a fresh output dir, datasets
   cache and hub (the data stage and the publishing are part of the budget):
   - `quiet`: nothing else runs;
   - `start`: a competing CPU-bound process (a Python busy loop, a core's worth) during the first 30 s (a quarter
     of the budget in smoke mode), so the measuring before training happens on a busy machine;
   - `half`: the same process started halfway through the budget and left running to the end.
   It prints each command's wall time as a ratio to the budget, the steps it trained, where its decay started, and
   its held-out bits per byte against the quiet run's. Targets: wall within +5% of the budget, bits per byte within
   5% of quiet.
2. Re-runs the first run's resolved `recipe.yaml` (no measuring: `budget:` holds the steps and the schedule) and
   prints the largest difference between its weights and the first run's (0 means bit-identical).
"""

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file
from smoke import FIXTURES, add_smoke

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "src"))

from lmkit.budget import parse_duration  # noqa: E402

LOADS = ("quiet", "start", "half")


def _busy() -> None:
    while True:
        pass


class Competitor:
    """A CPU-bound process from `start` seconds after `begin()` until `stop` seconds after it (None: to the end)."""

    def __init__(self, start: float, stop: float | None):
        self.start, self.stop = start, stop
        self.process, self.timer, self.ended = None, None, threading.Event()

    def begin(self) -> None:
        self.timer = threading.Thread(target=self._run, daemon=True)
        self.timer.start()

    def _run(self) -> None:
        if self.ended.wait(self.start):
            return
        self.process = multiprocessing.Process(target=_busy, daemon=True)
        self.process.start()
        if self.stop is not None:
            self.ended.wait(self.stop - self.start)
            self.process.terminate()

    def end(self) -> None:
        self.ended.set()
        self.timer.join()
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
        if self.process is not None:
            self.process.join()


def timed_train(argv: list[str], scratch: Path, name: str, budget: float, competitor: Competitor | None) -> float:
    env_cache = scratch / f"cache-{name}"
    env = {**os.environ, "HF_DATASETS_CACHE": str(env_cache), "LMKIT_HUB": str(scratch / "hub"), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    if competitor:
        competitor.begin()
    try:
        # bounded: a run that overshoots its budget several times over is a finding, not something to wait on
        done = subprocess.run([str(BIN / "lmkit"), "train", *argv], capture_output=True, text=True, env=env,
                              timeout=3 * budget + 300)
    finally:
        if competitor:
            competitor.end()
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"lmkit train {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return wall


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO / "recipes/quickstart-zh/config.yaml"))
    parser.add_argument("--data", nargs="+", help="the automatic path on these files instead of --recipe")
    parser.add_argument("--time", default="2m")
    parser.add_argument("--loads", default=",".join(LOADS), help=f"comma-separated, of {', '.join(LOADS)}")
    parser.add_argument("--load-seconds", type=float, default=30.0, help="how long the `start` load lasts")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    # the budget includes the data stage and start-up, tens of seconds on 2 cores shared with a test run
    add_smoke(parser, time="60s", loads="quiet,start", load_seconds=15.0,
              overrides=[f"data.files=[{FIXTURES / 'zh-poetry.jsonl'}]", "eval.bleu_samples=8"])
    args = parser.parse_args()
    budget = parse_duration(args.time)
    loads = args.loads.split(",")
    unknown = set(loads) - set(LOADS)
    if unknown or not loads:
        parser.error(f"--loads: expected a comma-separated list of {', '.join(LOADS)}, got {args.loads!r}")
    competitors = {"quiet": None, "start": (0.0, args.load_seconds), "half": (budget / 2, None)}

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        print("| load | budget | wall | wall / budget | steps | decay from | re-planned | bits/byte | vs first |\n"
              "|---|---|---|---|---|---|---|---|---|")
        runs, first_bpb = [], None
        for load in loads:
            out = scratch / f"run-{load}"
            command = (["--data", *args.data, "--output", str(out)] if args.data
                       else [args.recipe, f"training.output_dir={out}"])
            competitor = Competitor(*competitors[load]) if competitors[load] else None
            wall = timed_train([*command, *args.overrides, "--time", args.time], scratch, load, budget, competitor)
            recorded = yaml.safe_load((out / "recipe.yaml").read_text())["budget"]
            bpb = json.loads((out / "eval_results.json").read_text())["eval_bits_per_byte"]
            first_bpb = first_bpb or bpb
            runs.append(out)
            print(f"| {load} | {budget:.0f} s | {wall:.1f} s | {wall / budget:.3f} | {recorded['steps']} | "
                  f"{recorded['decay_start']} | {len(recorded.get('decay_replans') or [])} | {bpb:.3f} | "
                  f"{bpb / first_bpb:.3f} |", flush=True)

        rerun = scratch / "rerun"
        wall = timed_train([str(runs[0] / "recipe.yaml"), f"training.output_dir={rerun}"], scratch, "rerun", budget,
                           None)
        first, second = load_file(runs[0] / "model.safetensors"), load_file(rerun / "model.safetensors")
        diff = max((first[k].float() - second[k].float()).abs().max().item() for k in first)
        print(f"\nre-run of run 1's recipe.yaml: {wall:.1f} s, max |weight difference| = {diff:g}")


if __name__ == "__main__":
    main()
