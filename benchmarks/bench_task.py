"""The task fine-tunes side by side: the base model (no fine-tuning), full fine-tuning and LoRA, on the same held-out
pairs.

    python benchmarks/bench_task.py [--base demo/zh-char] [--hub DIR] [--out DIR] [key=value ...]
    python benchmarks/bench_task.py --smoke   # its own base (the demo recipe, 4 steps), 4 steps of each fine-tune

Trains recipes/next-line-full and recipes/next-line-lora (both start from `--base`, the model `make demo` publishes,
and read Debian's fortunes-zh poems: `make corpora`), each in its own process without evaluations or checkpoints during
training (so the mean step time is training only), timed: wall time, and the peak resident memory of the process.
Extra `key=value` overrides go to both recipes. Then scores the base model with the fine-tunes' evaluation settings on
their held-out pairs (the same fixed sample), and prints one table: BLEU, chrF, exact match, EOS stop rate, trainable
parameters, mean step time, peak memory and wall time; the baselines (the most frequent training completion; the
prompt copied); and the BLEU of each fine-tune as a multiple of the base model's and of the stronger baseline's.
`--smoke` does not need `make demo`: it trains its base first, the demo's recipe for 4 steps on the committed
tests/fixtures/zh-poetry.jsonl, and fine-tunes it for 4 steps.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from smoke import FIXTURES, add_smoke

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Runs a command and prints the peak resident memory (KiB) of its process tree's largest process.
_PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


def train_base(out: Path, steps: int) -> str:
    """A base model of the demo's kind made here: recipes/quickstart-zh, `steps` steps on a committed corpus."""
    run = out / "base"
    argv = [str(BIN / "lmkit"), "train", str(REPO / "recipes/quickstart-zh/config.yaml"), f"training.output_dir={run}",
            f"data.files=[{FIXTURES / 'zh-poetry.jsonl'}]", "budget.time=null", f"training.max_steps={steps}",
            "hub.push=never", "training.eval_strategy=no", "training.save_strategy=no", "training.report_to=none",
            "training.disable_tqdm=true"]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"training the base model failed:\n{done.stderr[-3000:]}")
    return str(run)


def train(method: str, out: Path, base: str, hub: str | None, overrides: list[str]) -> dict:
    run = out / method
    argv = [str(BIN / "lmkit"), "train", str(REPO / "recipes" / f"next-line-{method}" / "config.yaml"),
            f"training.output_dir={run}", f"model.init_from={base}", f"tokenizer.path={base}", "hub.push=never",
            "training.eval_strategy=no", "training.save_strategy=no", "training.report_to=none",
            "training.disable_tqdm=true", *([f"hub.dir={hub}"] if hub else []), *overrides]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, *argv], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{method} fine-tune failed:\n{done.stderr[-3000:]}")
    peak_kib = int(done.stderr.strip().splitlines()[-1])
    results = json.loads((run / "eval_results.json").read_text())
    trained = json.loads((run / "train_results.json").read_text())
    steps = json.loads((run / "trainer_state.json").read_text())["global_step"]
    return {**results, "trainable_parameters": trained["trainable_parameters"],
            "trainable_share": trained["trainable_share"], "step_s": trained["train_runtime"] / steps,
            "peak_mib": peak_kib / 1024, "wall_s": wall, "run": run}


def score_base(base: str, hub: str | None, run: Path) -> dict:
    """The base model on the fine-tune's held-out pairs, with its evaluation settings and baseline completion."""
    import dataclasses

    from lmkit import hub as hub_lib
    from lmkit.data import DataArgs, load_eval_pairs
    from lmkit.evaluation import EvalArgs, make_completion_task, score_completions
    from lmkit.run_dir import RunDir
    from lmkit.settings import build_section, read_yaml_mapping

    run_dir = RunDir(run)
    recipe = read_yaml_mapping(run_dir.recipe)
    eval_args = build_section(EvalArgs, recipe["eval"], "eval", str(run_dir.recipe))
    data_args = dataclasses.replace(build_section(DataArgs, recipe["data"], "data", str(run_dir.recipe)))
    pairs = load_eval_pairs(str(run_dir.heldout("test")), data_args, heldout=True)
    frequent = json.loads(run_dir.data_stats.read_text())["most_frequent_train_completion"]["text"]
    model, tokenizer = hub_lib.load_model(base, hub), hub_lib.load_tokenizer(base, hub)
    task = make_completion_task(pairs, frequent, tokenizer, eval_args, data_args.block_size)
    scores, _ = score_completions(model, tokenizer, task, eval_args)
    return {f"eval_{k}" if not k.startswith("baseline_") else f"eval_{k}": v for k, v in scores.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="demo/zh-char", help="the model both recipes start from (hub name or dir)")
    parser.add_argument("--base-steps", type=int, default=0,
                        help="train the base here first: the demo's recipe, this many steps (default 0: use --base)")
    parser.add_argument("--hub", default=None, help="the hub directory (default: $LMKIT_HUB or ./hub)")
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary directory)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for both recipes")
    add_smoke(parser, base_steps=4, overrides=["training.max_steps=4", "training.warmup_steps=1",
                                                "training.logging_steps=1", "eval.bleu_samples=8"])
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-task-"))
    if args.base_steps:
        args.base = train_base(out, args.base_steps)
    rows = {method: train(method, out, args.base, args.hub, args.overrides) for method in ("full", "lora")}
    rows = {"base (no fine-tuning)": score_base(args.base, args.hub, rows["full"]["run"]), **rows}

    def cell(row, key, fmt):
        return format(row[key], fmt) if key in row else "-"

    header = ["model", "BLEU", "chrF", "exact match", "EOS stop rate", "trainable params", "step (s)",
              "peak RSS (MiB)", "wall (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in rows.items():
        trainable = (f"{row['trainable_parameters']:,} ({100 * row['trainable_share']:.2f}%)"
                     if "trainable_parameters" in row else "-")
        lines.append(f"| {name} | {cell(row, 'eval_bleu', '.2f')} | {cell(row, 'eval_chrf', '.2f')} | "
                     f"{cell(row, 'eval_exact_match', '.3f')} | {cell(row, 'eval_stop_rate', '.2f')} | {trainable} | "
                     f"{cell(row, 'step_s', '.3f')} | {cell(row, 'peak_mib', '.0f')} | {cell(row, 'wall_s', '.0f')} |")
    base = rows["base (no fine-tuning)"]
    for name in ("frequent", "copy"):
        lines.append(f"| baseline: {name} | {base[f'eval_baseline_{name}_bleu']:.2f} | "
                     f"{base[f'eval_baseline_{name}_chrf']:.2f} | {base[f'eval_baseline_{name}_exact_match']:.3f} "
                     "| - | - | - | - | - |")
    print("\n".join(lines))
    print()
    stronger = base["eval_baseline_bleu"]
    for method in ("full", "lora"):
        bleu = rows[method]["eval_bleu"]
        print(f"{method}: BLEU {bleu:.2f} = {bleu / max(base['eval_bleu'], 1e-9):.1f} x the base model's "
              f"({base['eval_bleu']:.2f}), {bleu / max(stronger, 1e-9):.1f} x the stronger baseline's "
              f"({stronger:.2f})")
    print(f"\nruns in {out}")


if __name__ == "__main__":
    main()
