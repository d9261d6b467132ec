"""The sizing study behind `lmkit.sizing`: which tokenizer, model size and learning rate give the lowest held-out bits
per byte for a given corpus and time budget on this machine, and how close the automatic choice comes.

    python benchmarks/bench_sizing.py [--budgets 2m,5m] [--corpora en,zh,ru] [--workers 2] [--results FILE]
    python benchmarks/bench_sizing.py --table          # the table of what FILE holds so far
    python benchmarks/bench_sizing.py --smoke          # one grid point (en, 0.1M, 90 s) in a temporary study dir

Corpora (Debian packages; `make corpora` installs them), three languages and sizes:
    en   English fortunes (the en-bpe recipe's files), 1.3 MB, byte-level BPE
    zh   fortunes-zh (quotes, Tang and Song poems), 2.2 MB, char-level
    ru   fortunes-ru, 3.6 MB (Cyrillic: 2 bytes a letter), byte-level BPE

Every run is a real `lmkit train ... --time B` (data stage, tokenizer training, measuring, training, final evaluation
and save all inside B), in a fresh datasets cache, with 1 torch thread; `--workers` runs go side by side, one per
core, started in pairs of equal budget so that every run shares the machine the same way. The score is
`eval_bits_per_byte` of the final evaluation on the corpus's held-out 10% (the same documents for every run of a
corpus, whatever its tokenizer). Grids:

    size     every corpus x budget: the rungs 0.1M..4.7M of lmkit.sizing.LADDER (rope, the rung's learning rate,
             the automatic run's recipe: Muon, relu2, untied head, warm-up/stable/decay); 4.7M at the shortest
             budget only; with `--weight-decays 0.1,0.3`, every rung at each (the automatic run chooses by the
             epochs it will see), the table taking each rung's best
    side     en and ru at the smallest budget, rung 0.8M: BPE vocabulary 512/2048/4096 (the grid uses 1024), and on
             en: learning rate x0.5 and x2, learned positions, char-level
    auto     every corpus x budget: `lmkit train --data FILES --time B`, nothing else chosen; with
             `--auto-variants`, beside each the same run with one setting given (`AUTO_VARIANTS`: the decay's
             share and shape, the learning rate)
    epochs   small corpora (the slices below), rungs 0.1M and 0.3M: a fixed number of epochs (training.
             num_train_epochs, no budget), the cosine schedule laid over them: where repeating the data stops paying
    recipe   the training recipe around one rung (`--recipe-rung`, default the 2-minute winner) at every corpus x
             budget: the size grid's settings (AdamW, cosine, tanh GELU, tied head) against one change each
             (`RECIPE_VARIANTS`: warm-up/stable/decay, Muon at x0.5/x1/x2 the rung's learning rate, squared ReLU,
             an untied head, zero-initialised output projections, torch.compile)

    tokenizer
             zh at every budget: the automatic run with the tokenizer fixed (`TOKENIZER_VARIANTS`: characters,
             byte-level BPE 1024-8192, Unigram, jieba-segmented words), the model sized around each by the
             automatic path: which tokenizer `tokenizer.kind: auto` should take for CJK text; `--tokenizers
             bpe:1024,bpe:2048` (with `--corpora en`, say) for other tokenizers and corpora

Small corpora, for how automatic sizing treats them (`--corpora en-25k,en-250k,ru-2.5m --only auto` or `--only
epochs`): seeded slices of en and ru, whole documents taken in a shuffled order until the slice has its size.

Results are appended to --results as JSON lines as runs finish; a run already there is skipped, so an interrupted
study continues where it stopped. `--smoke` writes into a fresh temporary study dir, so that its run neither joins the
study's results nor is skipped as already there.
"""

import argparse
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "src"))

from smoke import add_smoke  # noqa: E402

from lmkit import sizing  # noqa: E402
from lmkit.budget import parse_duration  # noqa: E402
from lmkit.run_dir import RunDir  # noqa: E402

FORTUNES = Path("/usr/share/games/fortunes")
CORPORA = {
    "en": ("bpe", [FORTUNES / name for name in (
        "fortunes", "literature", "wisdom", "people", "humorists", "science", "computers", "work", "education",
        "definitions", "cookie")]),
    "zh": ("char", [FORTUNES / name for name in ("chinese", "tang300", "song100")]),
    "ru": ("bpe", sorted(p for p in (FORTUNES / "ru").iterdir() if p.suffix not in (".dat", ".u8") and p.is_file())),
}
# Small corpora: a slice of a corpus above, of about this many UTF-8 bytes.
SLICES = {"en-25k": ("en", 25_000), "en-250k": ("en", 250_000), "ru-2.5m": ("ru", 2_500_000)}
GRID_RUNGS = ["0.1M", "0.3M", "0.8M", "1.8M", "4.7M"]
EPOCH_RUNGS, EPOCHS = ["0.1M", "0.3M"], [1, 2, 4, 8, 16, 32, 64]
SIDE_RUNG = "0.8M"
# The recipe grid: one change each against "base", the recipe of the study before it (AdamW, tanh GELU, cosine,
# tied head); "lr_scale" scales AdamW's rate (lmkit.sizing.learning_rate).
RECIPE_BASE = {"optimizer": {"name": "adamw"}, "model": {"activation_function": "gelu_new"},
               "training": {"lr_scheduler_type": "cosine"}}
RECIPE_VARIANTS = {
    "base": {},
    "wsd": {"training": {"lr_scheduler_type": "warmup_stable_decay"}},
    "muon": {"optimizer": {"name": "muon"}},
    "muon-lr0.5": {"optimizer": {"name": "muon"}, "lr_scale": 0.5},
    "muon-lr2": {"optimizer": {"name": "muon"}, "lr_scale": 2.0},
    "relu2": {"model": {"activation_function": "relu2"}},
    "untied": {"model": {"tie_word_embeddings": False}},
    "zero-init": {"model": {"zero_init_projections": True}},
    # torch.compile (inductor, CPU): its compile time is spent inside the budget, as a user's run would spend it.
    "compile": {"training": {"torch_compile": True}},
}
# The automatic run with one setting given (`--auto-variants`), as `lmkit train` overrides: the clock's decay over
# 40% of the training time or in the 1-sqrt shape; the peak learning rate (absolute: the rungs up to 0.8M all get the
# capped rate, 3e-3 under AdamW and 2 x 3e-3 under Muon); dropout (the automatic run has none) and Muon whatever
# the epochs (the automatic run takes AdamW past 4), for corpora the run repeats; half the batch (twice the steps).
AUTO_VARIANTS = {
    "decay0.4": ["training.lr_scheduler_kwargs={decay_share: 0.4}"],
    "1-sqrt": ["training.lr_scheduler_kwargs={decay_type: 1-sqrt}"],
    "lr1.5e-3": ["training.learning_rate=0.0015"],
    "lr3e-3": ["training.learning_rate=0.003"],
    "lr6e-3": ["training.learning_rate=0.006"],
    "lr1.2e-2": ["training.learning_rate=0.012"],
    "dropout0.1": [f"model.{key}=0.1" for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop")],
    "muon": ["optimizer.name=muon"],
    "muon-lr1.2e-2": ["optimizer.name=muon", "training.learning_rate=0.012"],
    "batch8": ["training.per_device_train_batch_size=8"],
    "wd0.3": ["training.weight_decay=0.3"],
    "wd0.5": ["training.weight_decay=0.5"],
    "wd1.0": ["training.weight_decay=1.0"],
    "block256": ["data.block_size=256"],
}
# The tokenizer grid, as (kind, vocab_size) pairs: an even count, so every run has a partner of the same budget.
TOKENIZER_VARIANTS = [("char", 8192), ("bpe", 1024), ("bpe", 2048), ("bpe", 4096), ("bpe", 8192),
                      ("unigram", 8192), ("word", 8192), ("word", 16384)]
BPE_VOCAB, CHAR_VOCAB = 1024, 8192  # char: a maximum; characters seen fewer than twice are <|unk|>
BLOCK_SIZE = 128
TOKENS_PER_STEP = sizing.TRAINING["per_device_train_batch_size"] * BLOCK_SIZE
STUDY_DIR = REPO / "runs/sizing"


def kind_of(corpus: str) -> str:
    return CORPORA[SLICES[corpus][0] if corpus in SLICES else corpus][0]


def files_of(corpus: str) -> list[Path]:
    if corpus in SLICES:
        return [slice_of(corpus)]
    paths = CORPORA[corpus][1]
    missing = [p for p in paths if not p.is_file()]
    if missing or not paths:
        sys.exit(f"{missing[0] if missing else corpus}: missing; the study reads Debian's fortunes, fortunes-zh and "
                 "fortunes-ru (run: make corpora)")
    if corpus == "ru":  # named like 2001.03, which lmkit does not read as text: one .txt of all its entries
        joined = STUDY_DIR / "fortunes-ru.txt"
        if not joined.is_file():
            joined.parent.mkdir(parents=True, exist_ok=True)
            joined.write_text("\n%\n".join(p.read_text(encoding="utf-8").strip("\n%") for p in paths) + "\n")
        return [joined]
    return paths


def slice_of(corpus: str) -> Path:
    """The slice `corpus` of SLICES as one %-separated text file in the study dir (made once, the same every time)."""
    path = STUDY_DIR / f"{corpus}.txt"
    if not path.is_file():
        parent, size = SLICES[corpus]
        documents = [doc.strip("\n") for file in files_of(parent)
                     for doc in file.read_text(encoding="utf-8").split("\n%\n") if doc.strip()]
        random.Random(0).shuffle(documents)
        taken, used = [], 0
        for doc in documents:
            if used >= size:
                break
            taken.append(doc)
            used += len(doc.encode("utf-8")) + 3
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n%\n".join(taken) + "\n", encoding="utf-8")
    return path


def grid_recipe(corpus: str, rung: str, output: Path, kind: str | None = None, vocab: int | None = None,
                lr_scale: float = 1.0, positions: str = "rope", weight_decay: float | None = None) -> dict:
    """A recipe for one grid point: the automatic path's own settings with the size (and one side setting) fixed."""
    kind = kind or kind_of(corpus)
    model, training, optimizer = sizing.expand_size({"size": rung}, {}, {}, BLOCK_SIZE, has_budget=True,
                                                    source="bench_sizing")
    model["position_embedding_type"] = positions
    training["learning_rate"] = round(training["learning_rate"] * lr_scale, 6)
    training["lr_scheduler_type"] = sizing.AUTO_SCHEDULE  # the automatic run's, which a rung alone does not set
    if weight_decay is not None:  # else the rung's own (the automatic run chooses by its epochs: `--weight-decays`)
        training["weight_decay"] = weight_decay
    return {
        "data": {"files": [str(p) for p in files_of(corpus)], "doc_separator": "%", "block_size": BLOCK_SIZE},
        "tokenizer": {"train": {"kind": kind, "vocab_size": vocab or (CHAR_VOCAB if kind == "char" else BPE_VOCAB),
                                "min_frequency": 2}},
        "model": model,
        "eval": {"bleu_samples": 64, "prompt_tokens": 16, "max_new_tokens": 16},
        "hub": {"push": "never"},
        "training": {**training, "output_dir": str(output)},
        "optimizer": optimizer,
    }


def jobs(corpora: list[str], budgets: list[str], rungs: list[str], side: bool = True,
         weight_decays: list[float | None] = (None,)) -> list[dict]:
    """Every grid run of the study, in the order they run: the size grid by budget (each rung at every one of
    `weight_decays`, None for the rung's own), then the side grid (which varies one setting around SIDE_RUNG, so it
    runs only when that rung is in `rungs`)."""
    # The largest rung only at the shortest budget: it came last there on every corpus, 38-44% behind the best.
    out = [{"grid": "size", "corpus": corpus, "budget": budget, "rung": rung, **({"wd": wd} if wd is not None else {})}
           for budget in budgets for corpus, rung in itertools.product(corpora, rungs) for wd in weight_decays
           if budget == budgets[0] or rung != GRID_RUNGS[-1]]
    if SIDE_RUNG not in rungs or not side:
        return out
    budget = budgets[0]
    for corpus in [c for c in corpora if CORPORA[c][0] == "bpe"]:
        out += [{"grid": "side", "corpus": corpus, "budget": budget, "rung": SIDE_RUNG, "vocab": v}
                for v in (512, 2048, 4096)]
    if "en" in corpora:
        out += [{"grid": "side", "corpus": "en", "budget": budget, "rung": SIDE_RUNG, "lr_scale": s}
                for s in (0.5, 2.0)]
        out.append({"grid": "side", "corpus": "en", "budget": budget, "rung": SIDE_RUNG, "positions": "learned"})
        out.append({"grid": "side", "corpus": "en", "budget": budget, "rung": SIDE_RUNG, "kind": "char"})
    return out


def recipe_jobs(corpora: list[str], budgets: list[str], rung: str, variants: list[str]) -> list[dict]:
    return [{"grid": "recipe", "corpus": c, "budget": b, "rung": rung, "variant": v}
            for b in budgets for c in corpora for v in variants]


def auto_jobs(corpora: list[str], budgets: list[str], variants: list[str] = ()) -> list[dict]:
    """The automatic runs, and beside each the same run with every one of `variants` (AUTO_VARIANTS)."""
    return [{"grid": "auto", "corpus": c, "budget": b, **({"variant": v} if v else {})}
            for b in budgets for c in corpora for v in [None, *variants]]


def tokenizer_jobs(corpora: list[str], budgets: list[str], variants: list[tuple[str, int]]) -> list[dict]:
    return [{"grid": "tokenizer", "corpus": c, "budget": b, "kind": kind, "vocab": vocab}
            for b in budgets for c in corpora for kind, vocab in variants]


def epoch_jobs(corpora: list[str], epochs: list[int]) -> list[dict]:
    """Fixed-epoch runs (no budget) of the small corpora, from the fewest epochs up."""
    return [{"grid": "epochs", "corpus": c, "rung": r, "epochs": e}
            for e in epochs for c in corpora if c in SLICES for r in EPOCH_RUNGS]


def key_of(job: dict) -> str:
    return json.dumps(job, sort_keys=True)


def run(job: dict, scratch: Path) -> dict:
    name = "-".join(f"{v}" for v in job.values()).replace("/", "_")
    output = scratch / name
    # One thread per run everywhere: torch (OMP, MKL) and the tokenizers library (rayon) would take every core.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1",
           "RAYON_RS_NUM_CPUS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(scratch / f"cache-{name}"), "LMKIT_HUB": str(scratch / "hub")}
    if job["grid"] in ("auto", "tokenizer"):
        argv = ["--data", *map(str, files_of(job["corpus"])), "data.doc_separator=%", "--time", job["budget"],
                "--output", str(output)]
        if job["grid"] == "tokenizer":
            argv += [f"tokenizer.train.kind={job['kind']}", f"tokenizer.train.vocab_size={job['vocab']}"]
        argv += AUTO_VARIANTS.get(job.get("variant"), []) if job["grid"] == "auto" else []
    else:
        recipe = grid_recipe(job["corpus"], job["rung"], output, kind=job.get("kind"), vocab=job.get("vocab"),
                             lr_scale=job.get("lr_scale", 1.0), positions=job.get("positions", "rope"),
                             weight_decay=job.get("wd"))
        if job["grid"] == "recipe":
            variant = RECIPE_VARIANTS[job["variant"]]
            for section in ("model", "training", "optimizer"):
                recipe[section].update({**RECIPE_BASE.get(section, {}), **variant.get(section, {})})
            rate = sizing.learning_rate(sizing.RUNGS[job["rung"]].n_embd) * variant.get("lr_scale", 1.0)
            recipe["training"]["learning_rate"] = round(rate, 6)
        if job["grid"] == "epochs":
            recipe["training"].update(num_train_epochs=job["epochs"], max_steps=-1)
        path = scratch / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        argv = [str(path)] + (["--time", job["budget"]] if "budget" in job else [])
    started = time.perf_counter()
    done = subprocess.run([str(BIN / "lmkit"), "train", *argv], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    (STUDY_DIR / "logs").mkdir(parents=True, exist_ok=True)
    (STUDY_DIR / "logs" / f"{name}.log").write_text(done.stderr)
    if done.returncode:
        return {**job, "error": done.stderr.strip().splitlines()[-1:] or ["?"], "wall": wall}
    results = json.loads((output / "eval_results.json").read_text())
    resolved = yaml.safe_load((output / "recipe.yaml").read_text())
    stats = json.loads((output / "data_stats.json").read_text())
    return {
        **job, "wall": round(wall, 1), "budget_s": parse_duration(job["budget"]) if "budget" in job else None,
        "bits_per_byte": results.get("eval_bits_per_byte"), "perplexity": results.get("eval_perplexity"),
        "epochs_trained": results.get("epoch"), "bleu": results.get("eval_bleu"),
        "chrf": results.get("eval_chrf"),
        "baseline_bleu": results.get("baseline_bleu", results.get("eval_baseline_bleu")),
        "baseline_chrf": results.get("baseline_chrf", results.get("eval_baseline_chrf")),
        "steps": resolved["budget"]["steps"] or resolved["training"].get("max_steps"),
        "model": {k: resolved["model"].get(k) for k in ("n_layer", "n_head", "n_embd", "n_positions")},
        "learning_rate": resolved["training"].get("learning_rate"),
        "weight_decay": resolved["training"].get("weight_decay"), "optimizer": resolved["optimizer"].get("name"),
        "tokenizer": resolved["tokenizer"].get("train"), "train_tokens": stats.get("splits", {}).get("train", {}),
        "chars_per_token": json.loads(RunDir(output).tokenizer_stats.read_text()).get("chars_per_token"),
    }


def table(results: list[dict]) -> str:
    """Markdown: bits per byte per corpus and budget for every rung (the best of its weight decays, when the grid
    ran several), the best marked, and the automatic choice."""
    lines = []
    done = [r for r in results if "error" not in r]
    corpora = sorted({r["corpus"] for r in done if r["corpus"] in CORPORA}, key=list(CORPORA).index)
    budgets = sorted({r["budget"] for r in done if "budget" in r}, key=parse_duration)
    lines.append("| corpus | budget | " + " | ".join(GRID_RUNGS) + " | auto (its rung) | auto / best |")
    lines.append("|---|---|" + "---|" * len(GRID_RUNGS) + "---|---|")
    for corpus, budget in itertools.product(corpora, budgets):
        size = best_of_rungs(done, corpus, budget)
        if not size:
            continue
        best = min(size.values(), key=lambda r: r["bits_per_byte"])
        cells = []
        for rung in GRID_RUNGS:
            r = size.get(rung)
            cell = f"{r['bits_per_byte']:.3f} ({r['steps']} steps{wd_note(r)})" if r else "-"
            cells.append(f"**{cell}**" if r is best else cell)
        auto = [r for r in done if r["grid"] == "auto" and r["corpus"] == corpus and r["budget"] == budget
                and "variant" not in r]
        if auto:
            shape = sizing.Shape(auto[0]["model"]["n_layer"], auto[0]["model"]["n_head"], auto[0]["model"]["n_embd"])
            auto_cell = f"{auto[0]['bits_per_byte']:.3f} ({shape.name})"
            ratio = f"{auto[0]['bits_per_byte'] / best['bits_per_byte']:.3f}"
        else:
            auto_cell = ratio = "-"
        lines.append(f"| {corpus} | {budget} | " + " | ".join(cells) + f" | {auto_cell} | {ratio} |")
    lines += ["",
              "Training tokens per (non-embedding) parameter of each grid run (steps x batch x block / parameters):",
              "",
              "| corpus | budget | " + " | ".join(GRID_RUNGS) + " |", "|---|---|" + "---|" * len(GRID_RUNGS)]
    for corpus, budget in itertools.product(corpora, budgets):
        size = best_of_rungs(done, corpus, budget)
        if size:
            cells = [f"{size[rung]['steps'] * TOKENS_PER_STEP / sizing.RUNGS[rung].parameters:.2g}" if rung in size
                     else "-" for rung in GRID_RUNGS]
            lines.append(f"| {corpus} | {budget} | " + " | ".join(cells) + " |")
    side = [r for r in done if r["grid"] == "side"]
    if side:
        lines += ["", "| corpus | budget | rung | changed | bits/byte | BLEU (baseline) | chrF (baseline) |",
                  "|---|---|---|---|---|---|---|"]
        for r in side:
            changed = ", ".join(f"{k}={r[k]}" for k in ("vocab", "lr_scale", "positions", "kind") if k in r)
            lines.append(f"| {r['corpus']} | {r['budget']} | {r['rung']} | {changed} | {r['bits_per_byte']:.3f} | "
                         f"{r['bleu']:.2f} ({r['baseline_bleu']:.2f}) | {r['chrf']:.2f} ({r['baseline_chrf']:.2f}) |")
    lines += recipe_table(done)
    lines += auto_variant_table(done)
    lines += tokenizer_table(done)
    lines += small_table(done)
    failed = [r for r in results if "error" in r]
    lines += [f"\nfailed: {r['corpus']} {r.get('budget', '')} {r.get('rung', 'auto')}: {r['error']}" for r in failed]
    return "\n".join(lines)


def best_of_rungs(done: list[dict], corpus: str, budget: str) -> dict[str, dict]:
    """The size grid's run of each rung at `corpus` and `budget`: the lowest bits per byte of its weight decays."""
    best = {}
    for r in done:
        if r["grid"] == "size" and r["corpus"] == corpus and r["budget"] == budget:
            if r["rung"] not in best or r["bits_per_byte"] < best[r["rung"]]["bits_per_byte"]:
                best[r["rung"]] = r
    return best


def wd_note(r: dict) -> str:
    """A grid cell's weight decay, where the grid set one and others beside it."""
    return f", wd {r['wd']:g}" if "wd" in r else ""


def recipe_table(done: list[dict]) -> list[str]:
    """Markdown: bits per byte of each recipe variant (its steps), and its ratio to the base recipe's."""
    grid = [r for r in done if r["grid"] == "recipe"]
    if not grid:
        return []
    variants = [v for v in RECIPE_VARIANTS if any(r["variant"] == v for r in grid)]
    lines = ["", "| corpus | budget | rung | " + " | ".join(variants) + " |", "|---|---|---|" + "---|" * len(variants)]
    for corpus, budget, rung in sorted({(r["corpus"], r["budget"], r["rung"]) for r in grid}):
        row = {r["variant"]: r for r in grid if (r["corpus"], r["budget"], r["rung"]) == (corpus, budget, rung)}
        cells = [variant_cell(row.get(variant), row.get("base")) for variant in variants]
        lines.append(f"| {corpus} | {budget} | {rung} | " + " | ".join(cells) + " |")
    return lines


def variant_cell(r: dict | None, base: dict | None, rung: bool = False) -> str:
    """A table cell: a run's bits per byte (its rung, its steps, its ratio to `base`'s bits per byte), or '-'."""
    if r is None:
        return "-"
    shape = sizing.Shape(r["model"]["n_layer"], r["model"]["n_head"], r["model"]["n_embd"]).name + ", " if rung else ""
    ratio = f", x{r['bits_per_byte'] / base['bits_per_byte']:.3f}" if base and r is not base else ""
    return f"{r['bits_per_byte']:.3f} ({shape}{r['steps']} steps{ratio})"


def auto_variant_table(done: list[dict]) -> list[str]:
    """Markdown: bits per byte of the automatic run and of each of its variants (rung, steps), with their ratio."""
    varied = {(r["corpus"], r["budget"]) for r in done if r["grid"] == "auto" and "variant" in r}
    if not varied:
        return []
    variants = [v for v in AUTO_VARIANTS if any(r.get("variant") == v for r in done if r["grid"] == "auto")]
    lines = ["", "| corpus | budget | auto | " + " | ".join(variants) + " |", "|---|---|---|" + "---|" * len(variants)]
    for corpus, budget in sorted(varied, key=lambda cb: (cb[0], parse_duration(cb[1]))):
        row = {r.get("variant"): r for r in done if r["grid"] == "auto" and (r["corpus"], r["budget"]) == (corpus,
                                                                                                        budget)}
        cells = [variant_cell(row.get(variant), row.get(None), rung=True) for variant in [None, *variants]]
        lines.append(f"| {corpus} | {budget} | " + " | ".join(cells) + " |")
    return lines


def tokenizer_table(done: list[dict]) -> list[str]:
    """Markdown: bits per byte of the automatic run with each tokenizer (its rung, steps, characters per token)."""
    grid = [r for r in done if r["grid"] == "tokenizer"]
    if not grid:
        return []
    lines = ["", "| corpus | budget | tokenizer | bits/byte | rung | steps | chars/token |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(grid, key=lambda r: (r["corpus"], parse_duration(r["budget"]), r["bits_per_byte"])):
        shape = sizing.Shape(r["model"]["n_layer"], r["model"]["n_head"], r["model"]["n_embd"])
        lines.append(f"| {r['corpus']} | {r['budget']} | {r['kind']} {r['vocab']} | {r['bits_per_byte']:.3f} | "
                     f"{shape.name} | {r['steps']} | {r.get('chars_per_token') or 0:.2f} |")
    return lines


def epochs_of(r: dict) -> float:
    """Times a run saw its training tokens: steps x batch x block / the slice's training tokens."""
    return r["steps"] * TOKENS_PER_STEP / r["train_tokens"]["tokens"]


def small_table(done: list[dict]) -> list[str]:
    """Markdown: the small corpora's automatic runs (with the run at half the budget beside each) and epoch grid."""
    lines = []
    auto = sorted((r for r in done if r["corpus"] in SLICES and r["grid"] == "auto"),
                  key=lambda r: (list(SLICES).index(r["corpus"]), r["budget_s"]))
    if auto:
        lines += ["", "| corpus | budget | rung | steps | epochs | perplexity (vocabulary) | bits/byte | "
                      "bits/byte at half the budget |", "|---|---|---|---|---|---|---|---|"]
        for r in auto:
            shape = sizing.Shape(r["model"]["n_layer"], r["model"]["n_head"], r["model"]["n_embd"])
            half = [h for h in auto if h["corpus"] == r["corpus"] and h["budget_s"] == r["budget_s"] / 2]
            lines.append(f"| {r['corpus']} | {r['budget']} | {shape.name} | {r['steps']} | {epochs_of(r):.1f} | "
                         f"{r['perplexity']:,.0f} ({r['tokenizer']['vocab_size']}) | {r['bits_per_byte']:.3f} | "
                         + (f"{half[0]['bits_per_byte']:.3f} |" if half else "- |"))
    grid = [r for r in done if r["grid"] == "epochs"]
    if grid:
        epochs = sorted({r["epochs"] for r in grid})
        lines += ["", "Bits per byte (perplexity) after a fixed number of epochs:", "",
                  "| corpus | rung | " + " | ".join(f"{e} ep" for e in epochs) + " |",
                  "|---|---|" + "---|" * len(epochs)]
        for corpus, rung in itertools.product(SLICES, EPOCH_RUNGS):
            row = {r["epochs"]: r for r in grid if r["corpus"] == corpus and r["rung"] == rung}
            if row:
                best = min(row.values(), key=lambda r: r["bits_per_byte"])
                cells = [f"{row[e]['bits_per_byte']:.3f} ({row[e]['perplexity']:,.0f})" if e in row else "-"
                         for e in epochs]
                cells = [f"**{c}**" if e in row and row[e] is best else c for e, c in zip(epochs, cells)]
                lines.append(f"| {corpus} | {rung} | " + " | ".join(cells) + " |")
    return lines


def main():
    global STUDY_DIR  # files_of and run write there: --study-dir sets it, one study per process
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="2m,5m")
    parser.add_argument("--corpora", default="en,zh,ru")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", choices=["grid", "auto", "epochs", "recipe", "tokenizer"],
                        help="run only the grids, only the automatic runs, only the small corpora's epoch grid, only "
                             "the recipe grid, or only the tokenizer grid")
    parser.add_argument("--recipe-rung", default=GRID_RUNGS[0], help="the recipe grid's rung")
    parser.add_argument("--variants", default=",".join(RECIPE_VARIANTS), help="the recipe grid's variants")
    parser.add_argument("--auto-variants", default="",
                        help="with --only auto: also run each automatic run with these AUTO_VARIANTS, comma-separated")
    parser.add_argument("--tokenizers", default=",".join(f"{k}:{v}" for k, v in TOKENIZER_VARIANTS),
                        help="the tokenizer grid's tokenizers, as kind:vocab_size")
    parser.add_argument("--epochs", default=",".join(map(str, EPOCHS)), help="the epoch grid's epoch counts")
    parser.add_argument("--rungs", default=",".join(GRID_RUNGS), help="the size grid's rungs (default: all)")
    parser.add_argument("--no-side", action="store_true", help="the size grid without its side grid")
    parser.add_argument("--weight-decays", default="",
                        help="the size grid's rungs at each of these weight decays, comma-separated (the table takes "
                             "each rung's best); default: the rung's own")
    parser.add_argument("--study-dir", default=str(STUDY_DIR),
                        help="where the results, the run logs and the joined ru corpus go (default: runs/sizing)")
    parser.add_argument("--results", help="the results file (default: results.jsonl in --study-dir)")
    parser.add_argument("--table", action="store_true", help="print the table of --results and stop")
    add_smoke(parser, corpora="en", budgets="90s", rungs="0.1M", only="grid", workers=1,
              study_dir=tempfile.mkdtemp(prefix="bench-sizing-") if "--smoke" in sys.argv[1:] else None)
    args = parser.parse_args()
    STUDY_DIR = Path(args.study_dir)
    results_path = Path(args.results or STUDY_DIR / "results.jsonl")
    results = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    if args.table:
        print(table(results))
        return
    corpora, budgets = args.corpora.split(","), args.budgets.split(",")
    if args.only == "epochs":
        todo = epoch_jobs(corpora, [int(e) for e in args.epochs.split(",")])
    elif args.only == "tokenizer":
        variants = [(kind, int(vocab)) for kind, vocab in (t.split(":") for t in args.tokenizers.split(","))]
        todo = tokenizer_jobs(corpora, budgets, variants)
    elif args.only == "recipe":
        todo = recipe_jobs(corpora, budgets, args.recipe_rung, args.variants.split(","))
    else:
        weight_decays = [float(v) for v in args.weight_decays.split(",") if v] or [None]
        todo = [] if args.only == "auto" else jobs([c for c in corpora if c in CORPORA], budgets,
                                                   args.rungs.split(","), side=not args.no_side,
                                                   weight_decays=weight_decays)
        unknown = set(filter(None, args.auto_variants.split(","))) - set(AUTO_VARIANTS)  # before hours of runs
        if unknown:
            parser.error(f"--auto-variants: unknown {', '.join(sorted(unknown))}; known: {', '.join(AUTO_VARIANTS)}")
        variants = list(filter(None, args.auto_variants.split(",")))
        todo += [] if args.only == "grid" else auto_jobs(corpora, budgets, variants)
    job_keys = ("grid", "corpus", "budget", "rung", "vocab", "lr_scale", "positions", "kind", "epochs", "variant",
                "wd")
    finished = {key_of({k: v for k, v in r.items() if k in job_keys}) for r in results if "error" not in r}
    todo = [job for job in todo if key_of(job) not in finished]
    results_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"{len(todo)} runs to go", flush=True)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.workers) as pool:
        for start in range(0, len(todo), args.workers):  # in lockstep, so every run shares the machine alike
            for result in pool.map(lambda job: run(job, Path(tmp)), todo[start:start + args.workers]):
                with results_path.open("a") as out:
                    out.write(json.dumps(result) + "\n")
                print(json.dumps(result), flush=True)
    print(table([json.loads(line) for line in results_path.read_text().splitlines()]))


if __name__ == "__main__":
    main()
