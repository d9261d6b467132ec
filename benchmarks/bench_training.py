"""Training-side costs: one BLEU evaluation against one training step, and 2-process vs 1-process throughput.

    python benchmarks/bench_training.py [--recipe recipes/quickstart-zh/config.yaml] [--data corpus.jsonl] [--steps 40]

The corpus is the recipe's own (the default recipe reads Debian's fortune files: `make corpora` installs them) or
`--data`. `--smoke`: 4 steps of 4 sequences on the committed tests/fixtures/zh-poetry.jsonl.

1. In one process: trains `--steps` steps of the recipe (no evaluation), then times one evaluation (eval loss over the
   held-out blocks) and one BLEU scoring (generation of `eval.bleu_samples` continuations), and prints each as a
   multiple of the mean training step.
2. Runs the same steps with the same global batch as 1 process and as 2 processes (`accelerate launch` with
   recipes/accelerate_configs/cpu-2proc.yaml) and prints tokens/s of each and their ratio.

On a 2-core machine two processes share the same cores, so the 2-process figure measures the overhead of the
process group (gradient all-reduce over gloo, duplicated data loading), not a speed-up.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from smoke import FIXTURES, add_smoke

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tokens_per_second(run_dir: Path, block_size: int) -> float:
    metrics = json.loads((run_dir / "train_results.json").read_text())
    return metrics["train_samples_per_second"] * block_size


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO / "recipes/quickstart-zh/config.yaml"))
    parser.add_argument("--data", default=None,
                        help="corpus files instead of the recipe's (one document per line for plain text files)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences per optimizer step)")
    add_smoke(parser, data=str(FIXTURES / "zh-poetry.jsonl"), steps=4, batch=4)
    args = parser.parse_args()

    from lmkit.data.corpus import resolve_files
    from lmkit.errors import UserError
    from lmkit.recipe import load_recipe
    from lmkit.training import train

    data = [f"data.files=[{args.data}]", "data.doc_separator=line"] if args.data else []
    try:
        files = load_recipe(args.recipe, data).data.files
    except UserError as error:
        sys.exit(str(error))
    try:
        resolve_files(files)
    except UserError as error:
        hint = "" if args.data else ("\n  the shipped recipes read Debian's fortune files: run `make corpora` "
                                     "(as root; otherwise: sudo apt-get install fortunes fortunes-zh), or pass --data")
        print(f"{error}{hint}", file=sys.stderr)
        sys.exit(2)
    work = Path(tempfile.mkdtemp(prefix="lmkit-bench-"))
    common = [*data, f"training.max_steps={args.steps}", "budget.time=null",
              "training.eval_strategy=no", "training.save_strategy=no", "training.report_to=none", "hub.push=never",
              "training.logging_steps=10", "training.disable_tqdm=true"]

    # ---- 1. BLEU evaluation vs a training step --------------------------------------------------------------------
    recipe = load_recipe(args.recipe, common + [f"training.output_dir={work / 'one'}",
                                                f"training.per_device_train_batch_size={args.batch}"])
    start = time.perf_counter()
    train(recipe)
    one_run = work / "one"
    state = json.loads((one_run / "train_results.json").read_text())
    step_s = state["train_runtime"] / args.steps

    from lmkit import data as data_lib
    from lmkit import hub
    from lmkit.evaluation import make_bleu_pairs, score_bleu
    from lmkit.run_dir import RunDir

    model, tokenizer = hub.load_model(str(one_run)), hub.load_tokenizer(str(one_run))
    documents = data_lib.load_heldout(RunDir(one_run), "test")
    pairs = make_bleu_pairs(documents["text"], tokenizer, recipe.eval)
    score_bleu(model, tokenizer, pairs[:2], recipe.eval)  # warm-up
    start = time.perf_counter()
    score_bleu(model, tokenizer, pairs, recipe.eval)
    bleu_s = time.perf_counter() - start
    print(f"[1] training step (global batch {args.batch} x {recipe.data.block_size} tokens): {step_s * 1000:.0f} ms")
    print(f"    one BLEU evaluation ({len(pairs)} prompts x {recipe.eval.max_new_tokens} new tokens, "
          f"batch {recipe.eval.batch_size}, KV cache): {bleu_s:.2f} s = {bleu_s / step_s:.1f} training steps")

    # ---- 2. 2 processes vs 1 --------------------------------------------------------------------------------------
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single_tps = tokens_per_second(one_run, recipe.data.block_size)
    two_run = work / "two"
    subprocess.run(
        [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "recipes/accelerate_configs/cpu-2proc.yaml"),
         "-m", "lmkit", "train", args.recipe, *common, f"training.output_dir={two_run}",
         f"training.per_device_train_batch_size={args.batch // 2}"],
        check=True, env=env, capture_output=True,
    )
    two_tps = tokens_per_second(two_run, recipe.data.block_size)
    print(f"[2] tokens/s, global batch {args.batch}: 1 process (2 threads) {single_tps:,.0f}; "
          f"2 processes (1 thread each, gloo) {two_tps:,.0f}; ratio 2p/1p {two_tps / single_tps:.2f}")
    print(f"(runs kept in {work})")


if __name__ == "__main__":
    main()
