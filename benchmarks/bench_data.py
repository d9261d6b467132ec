"""Benchmark the data stage on a large generated corpus: wall time, tokens/s and peak memory vs bare `tokenizers`.

The corpus is made from Debian's fortune files (English and Chinese; `make corpora` installs them): each generated
document joins 1-3 random source entries, so the text is real but the documents are (almost all) distinct and dedup
has little to remove, like a real corpus.
It is written as several .jsonl shards so that reading can use two processes.

Usage:
    python benchmarks/bench_data.py --size-mb 1000            # ~1 GB; allow 10+ minutes on 2 cores
    python benchmarks/bench_data.py --size-mb 50 --keep /tmp/b  # quick run, keep the corpus and cache
    python benchmarks/bench_data.py --smoke   # 1 MiB from 2,000 source entries: does it still run

Targets (2-core machine): peak RSS (self + children) under 2 GB for 1 GB of text, and data-stage throughput at least
0.8x the bare tokenizer's `encode_batch` throughput on the same text.
"""

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from corpora import CHINESE_POEMS, CHINESE_QUOTES, ENGLISH, documents
from smoke import add_smoke

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|unk|>"]


def peak_rss_mb() -> tuple[float, float]:
    """(this process, largest finished child) peak resident set size in MiB; ru_maxrss is in KiB on Linux."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


class AnonymousMemorySampler:
    """Peak of Pss_Anon summed over this process and all its descendants, sampled every 0.2 s.

    ru_maxrss counts file-backed pages too, and `datasets` reads memory-mapped Arrow files, so every page a process has
    read shows up in its RSS although the kernel can drop it at any time. Anonymous memory cannot be dropped; the
    proportional figure (PSS) splits the copy-on-write pages that forked map workers share with their parent, so the
    sum does not count them twice.
    """

    def __init__(self):
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _anon_kb(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                return next((int(line.split()[1]) for line in f if line.startswith("Pss_Anon:")), 0)
        except OSError:
            return 0

    @staticmethod
    def _descendants(root: int) -> list[int]:
        parents = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    pass
        found, frontier = [root], [root]
        while frontier:
            frontier = [pid for pid, parent in parents.items() if parent in frontier]
            found += frontier
        return found

    def _run(self):
        while not self._stop.wait(0.2):
            total_kb = sum(self._anon_kb(pid) for pid in self._descendants(os.getpid()))
            self.peak_mb = max(self.peak_mb, total_kb / 1024)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def source_documents(count: int | None = None) -> list[str]:
    """The source entries, or every k-th of them, `count` in all (the files come one after another: this keeps both
    languages)."""
    texts = documents(ENGLISH + CHINESE_QUOTES + CHINESE_POEMS)
    return texts if count is None or count >= len(texts) else texts[:: len(texts) // count][:count]


def write_corpus(folder: Path, size_mb: int, shards: int, texts: list[str], seed: int = 0) -> list[Path]:
    """Write about `size_mb` MiB of JSON lines made of `texts` over `shards` files; returns their paths."""
    rng = np.random.default_rng(seed)
    target = size_mb * 2**20 // shards
    paths = []
    for shard in range(shards):
        path = folder / f"corpus-{shard:02d}.jsonl"
        written = 0
        with open(path, "w", encoding="utf-8") as f:
            while written < target:
                picks = rng.integers(0, len(texts), size=(4096, 3))
                parts = rng.integers(1, 4, size=4096)
                lines = "".join(
                    json.dumps({"text": "\n".join(texts[i] for i in row[:k])}, ensure_ascii=False) + "\n"
                    for row, k in zip(picks, parts)
                )
                f.write(lines)
                written += len(lines.encode("utf-8"))
        paths.append(path)
    return paths


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", unk_token="<|unk|>")


def bare_tokenization(paths: list[Path], backend) -> tuple[int, float, float]:
    """Read the same files and `encode_batch` them (both cores via rayon); returns (tokens, total s, encode-only s)."""
    tokens, encode_seconds = 0, 0.0
    started = time.perf_counter()
    for path in paths:
        with open(path, encoding="utf-8") as f:
            batch = []
            for line in f:
                batch.append(json.loads(line)["text"])
                if len(batch) == 4096:
                    t = time.perf_counter()
                    tokens += sum(len(e.ids) for e in backend.encode_batch(batch, add_special_tokens=False))
                    encode_seconds += time.perf_counter() - t
                    batch = []
            if batch:
                t = time.perf_counter()
                tokens += sum(len(e.ids) for e in backend.encode_batch(batch, add_special_tokens=False))
                encode_seconds += time.perf_counter() - t
    return tokens, time.perf_counter() - started, encode_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1000, help="corpus size in MiB (default 1000)")
    parser.add_argument("--shards", type=int, default=4, help="number of .jsonl files (default 4)")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--keep", type=Path, default=None,
                        help="work in this folder and keep it (default: a temp dir)")
    parser.add_argument("--skip-bare", action="store_true", help="skip the bare-tokenizer comparison")
    parser.add_argument("--source-docs", type=int, default=None,
                        help="make the corpus and train the tokenizer from this many source entries (default: all)")
    add_smoke(parser, size_mb=1, shards=2, source_docs=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    work = args.keep or Path(tempfile.mkdtemp(prefix="lmkit-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        corpus = work / "corpus"
        if not corpus.is_dir():
            corpus.mkdir()
            t = time.perf_counter()
            write_corpus(corpus, args.size_mb, args.shards, source_documents(args.source_docs))
            print(f"corpus: wrote {args.size_mb} MiB in {time.perf_counter() - t:.1f} s to {corpus}", flush=True)
        paths = sorted(corpus.glob("*.jsonl"))
        size_mb = sum(p.stat().st_size for p in paths) / 2**20

        t = time.perf_counter()
        tokenizer = train_tokenizer(source_documents(args.source_docs))
        print(f"tokenizer: BPE vocab {len(tokenizer)} trained on the source corpora in "
              f"{time.perf_counter() - t:.1f} s")

        # Imported after the corpus is written so the figures cover only the data stage.
        from lmkit.data import DataArgs, build_lm_datasets, prepare_splits

        data_args = DataArgs(files=[str(corpus)], num_proc=args.num_proc, block_size=args.block_size,
                             cache_dir=str(work / "cache"))
        for attempt in ("cold", "warm"):
            with AnonymousMemorySampler() as anon:
                t = time.perf_counter()
                splits, split_stats = prepare_splits(data_args, seed=42)
                t_split = time.perf_counter() - t
                _, lm_stats = build_lm_datasets(splits, tokenizer, data_args, vocab_size=len(tokenizer))
                t_total = time.perf_counter() - t
            tokens = sum(s["tokens"] for s in lm_stats["splits"].values())
            own, children = peak_rss_mb()
            print(f"data stage ({attempt}): {size_mb:.0f} MiB, {split_stats['documents_read']} docs read, "
                  f"{split_stats['documents_kept']} kept, {tokens} tokens, "
                  f"{sum(s['blocks'] for s in lm_stats['splits'].values())} blocks, "
                  f"tokens dropped {lm_stats['tokens_dropped']}")
            print(f"  wall {t_total:.1f} s (read+clean+dedup+split {t_split:.1f} s, tokenize+pack "
                  f"{t_total - t_split:.1f} s); {tokens / t_total:,.0f} tokens/s; "
                  f"tokenize+pack alone {tokens / (t_total - t_split):,.0f} tokens/s; "
                  f"cache_hit {lm_stats['cache_hit']}")
            print(f"  peak RSS (ru_maxrss, includes memory-mapped Arrow pages): self {own:.0f} MiB, largest child "
                  f"{children:.0f} MiB, sum {own + children:.0f} MiB; peak anonymous PSS of self + children at one "
                  f"time {anon.peak_mb:.0f} MiB", flush=True)
            if attempt == "cold":
                stage_tokens_per_s, stage_split_s, stage_total_s = tokens / t_total, t_split, t_total

        if not args.skip_bare:
            bare_tokens, bare_s, encode_s = bare_tokenization(paths, tokenizer.backend_tokenizer)
            print(f"bare tokenizers encode_batch: {bare_tokens} tokens (raw docs, no EOS) in {bare_s:.1f} s "
                  f"({bare_tokens / bare_s:,.0f} tokens/s incl. reading, {bare_tokens / encode_s:,.0f} tokens/s "
                  f"encode only)")
            print(f"ratio data stage / bare (tokens/s, incl. reading): "
                  f"{stage_tokens_per_s / (bare_tokens / bare_s):.2f}; tokenize+pack only vs bare: "
                  f"{(tokens / (stage_total_s - stage_split_s)) / (bare_tokens / bare_s):.2f}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
