"""Benchmark giant lines: the same text as one single-line file vs ordinary lines, through lmkit's data stage.

Each case runs in its own process: read + clean + split (`data.prepare_splits`), BPE tokenizer training on the train
split (`tokenization.train_tokenizer`) and tokenization + packing (`data.build_lm_datasets`), as `lmkit train` does
before its model exists. The reference is the ordinary-lines file; the ratio is single-line / ordinary lines.

The text is Debian's English fortune files (`make corpora`), shuffled and repeated to the size asked, with a running
number in each entry so that no two lines are equal (dedup is off in both cases anyway, so both keep every character).

Usage:
    python benchmarks/bench_giant_lines.py --size-mb 50     # the issue's case; about 10 minutes on 2 shared cores
    python benchmarks/bench_giant_lines.py --size-mb 10     # quick
    python benchmarks/bench_giant_lines.py --smoke          # 0.5 MB, BPE 1024: does it still run

Target: the single-line corpus within 2x the wall time and 2x the peak memory of the same text in ordinary lines
(documents longer than `corpus.MAX_DOCUMENT_CHARS` are split, so the single line costs what ordinary lines cost).
"""

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_data import AnonymousMemorySampler
from corpora import ENGLISH, documents
from smoke import add_smoke


def write_cases(folder: Path, size_mb: float) -> dict[str, Path]:
    texts = [" ".join(t.split()) for t in documents(ENGLISH)]
    rng = random.Random(0)
    lines, size, n = [], 0, 0
    while size < size_mb * 2**20:
        rng.shuffle(texts)
        for text in texts:
            line = f"{n}: {text}"
            lines.append(line)
            size += len(line.encode("utf-8")) + 1
            n += 1
            if size >= size_mb * 2**20:
                break
    cases = {"ordinary lines": folder / "lines.txt", "one line": folder / "one-line.txt"}
    cases["ordinary lines"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    cases["one line"].write_text(" ".join(lines) + "\n", encoding="utf-8")
    return cases


def child(corpus: str, work: str, vocab_size: int) -> None:
    """One case: the data stage of `lmkit train`, timed, in this process."""
    from datasets import DatasetDict

    from lmkit.data import DataArgs, build_lm_datasets, prepare_splits
    from lmkit.tokenization import TokenizerSpec, train_tokenizer

    started = time.perf_counter()
    with AnonymousMemorySampler() as memory:
        args = DataArgs(files=[corpus], dedup=False, test_size=0.01, block_size=256, cache_dir=f"{work}/cache")
        splits, doc_stats = prepare_splits(args, seed=0)
        spec = TokenizerSpec(kind="bpe", vocab_size=vocab_size)
        tokenizer = train_tokenizer(spec, iter(splits["train"]["text"]), f"{work}/tokenizer",
                                    heldout_texts=iter(splits["test"]["text"]))
        blocks, token_stats = build_lm_datasets(DatasetDict(splits), tokenizer, args, vocab_size=len(tokenizer))
    print(json.dumps({
        "seconds": time.perf_counter() - started,
        "peak_anon_mb": memory.peak_mb,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "documents": doc_stats["documents_kept"], "split": doc_stats["long_documents_split"],
        "train_tokens": token_stats["splits"]["train"]["tokens"],
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=50)
    parser.add_argument("--vocab-size", type=int, default=4096, help="of the BPE tokenizer trained in each case")
    add_smoke(parser, size_mb=0.5, vocab_size=1024)
    parser.add_argument("--child", nargs=2, metavar=("CORPUS", "WORK"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        child(*options.child, options.vocab_size)
        return
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name, path in write_cases(Path(tmp), options.size_mb).items():
            work = Path(tmp) / path.stem
            done = subprocess.run([sys.executable, __file__, "--child", str(path), str(work), "--vocab-size",
                                   str(options.vocab_size)], capture_output=True, text=True, check=True)
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{name:>15}: {results[name]}", flush=True)
    ref, giant = results["ordinary lines"], results["one line"]
    print(f"\n{options.size_mb:g} MB corpus   {'ordinary lines':>15}  {'one line':>10}  ratio (target <= 2)")
    labels = {"seconds": "wall time (s)", "peak_anon_mb": "peak anon (MB)", "max_rss_mb": "max RSS (MB)"}
    for key, label in labels.items():
        print(f"{label:<16} {ref[key]:>15.1f}  {giant[key]:>10.1f}  {giant[key] / ref[key]:.2f}")


if __name__ == "__main__":
    main()
