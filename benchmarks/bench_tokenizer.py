"""Tokenizer training benchmark: lmkit's overhead over the bare `tokenizers` trainer, encoding speed, chars/token.

    .venv/bin/python benchmarks/bench_tokenizer.py [--repeats 3] [--stream-mb 100] [--docs N] [--smoke]

Corpora: Debian's fortune files (`make corpora` installs them): en-fortunes is every English file of the packages
fortunes and fortunes-min (~3.1 MB), zh-quotes the `chinese` file of fortunes-zh (~2 MB), entries split on `%` lines
(`--docs N`: every k-th entry, N of them; `--smoke` reads 1,000 of each, streams 1 MB, once).

1. The same byte-level BPE (8192, NFKC) trained on en-fortunes through `lmkit.tokenization.train_tokenizer` and
   through a bare `tokenizers` pipeline + `BpeTrainer`, alternating, best of `--repeats`. lmkit's time includes
   what it adds: counting and capping the stream, stats on a text sample, `save_pretrained` and the reload; the bare
   one saves `tokenizer.json`. Target: lmkit / bare < 1.15.
2. Encoding throughput of the trained BPE (`encode_batch`, and through the transformers wrapper).
3. Held-out chars/token and unknown rate of each kind on the English and the Chinese corpus (via standalone specs).
4. Peak memory of streaming `--stream-mb` of generated text with a large vocabulary of distinct words through the
   same BPE training, bare and through lmkit, each in a fresh process (the 1 GB → ~2 GB RAM bound, scaled down): the
   Rust trainer's word counts grow with the distinct words; lmkit must add nothing that grows with the corpus.
"""

import argparse
import json
import logging
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from corpora import CHINESE_QUOTES, ENGLISH, documents
from smoke import add_smoke
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from lmkit.tokenization import TokenizerSpec, train_tokenizer, train_tokenizer_from_spec

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|unk|>"]


def sample(texts: list[str], count: int | None) -> list[str]:
    """Every k-th text, `count` of them (all when None): spread over the corpus, whose files come one after another."""
    return texts if count is None or count >= len(texts) else texts[:: len(texts) // count][:count]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    """The entries as JSON lines, so that a standalone spec reads whole entries (plain text files it reads by line)."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts)
    return path


def bare_bpe(texts: list[str], vocab_size: int, out: Path) -> Tokenizer:
    """The tokenizers-docs way to train the same byte-level BPE."""
    tokenizer = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(str(out))
    return tokenizer


def bench_overhead(texts: list[str], repeats: int, workdir: Path):
    spec = TokenizerSpec(kind="bpe", vocab_size=8192)
    lmkit_times, bare_times = [], []
    for i in range(repeats):
        start = time.perf_counter()
        bare_bpe(texts, spec.vocab_size, workdir / f"bare-{i}.json")
        bare_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        tokenizer = train_tokenizer(spec, texts, workdir / f"lmkit-{i}")
        lmkit_times.append(time.perf_counter() - start)
    chars = sum(map(len, texts))
    print(f"[1] BPE 8192 on en-fortunes ({len(texts)} docs, {chars / 1e6:.2f} M chars), best of {repeats}:")
    print(f"    bare tokenizers: {min(bare_times):.3f} s   lmkit: {min(lmkit_times):.3f} s")
    print(f"    lmkit / bare time ratio: {min(lmkit_times) / min(bare_times):.3f}  (target < 1.15)")
    return tokenizer


def bench_encoding(tokenizer, texts: list[str]):
    chars = sum(map(len, texts))
    backend = tokenizer.backend_tokenizer
    backend.encode_batch(texts[:100])  # warm-up
    start = time.perf_counter()
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    backend_s = time.perf_counter() - start
    tokens = sum(len(e.ids) for e in encodings)
    start = time.perf_counter()
    tokenizer(texts, add_special_tokens=False)
    wrapper_s = time.perf_counter() - start
    print(f"[2] encoding en-fortunes with the lmkit BPE ({tokens} tokens):")
    print(f"    tokenizers encode_batch: {tokens / backend_s / 1e6:.2f} M tokens/s "
          f"({chars / backend_s / 1e6:.1f} M chars/s)")
    print(f"    transformers tokenizer(list): {tokens / wrapper_s / 1e6:.2f} M tokens/s")


def bench_kinds(corpora: dict[str, list[str]], workdir: Path):
    print("[3] held-out chars/token and unknown rate per kind (heldout_fraction 0.05):")
    print(f"    {'corpus':<12} {'kind':<5} {'vocab':>6} {'train s':>8} {'chars/token':>12} {'unk rate':>9}")
    configs = [("bpe", 8192, None), ("char", 8192, 0.9999), ("word", 16384, None)]
    for corpus, texts in corpora.items():
        path = write_jsonl(workdir / f"{corpus}.jsonl", texts)
        for kind, vocab_size, coverage in configs:
            out = workdir / f"{corpus}-{kind}"
            spec = TokenizerSpec(
                kind=kind,
                vocab_size=vocab_size,
                coverage=coverage,
                files=[str(path)],
                output_dir=str(out),
                heldout_fraction=0.05,
            )
            train_tokenizer_from_spec(spec)
            stats = json.loads((out / "tokenizer_stats.json").read_text())
            print(
                f"    {corpus:<12} {kind:<5} {stats['vocab_size']:>6} {stats['training_time_s']:>8.2f} "
                f"{stats['chars_per_token']:>12.3f} {stats['unk_rate']:>9.4f}"
            )


def _generated_documents(megabytes: int):
    """Prose-shaped text with ~1 M distinct made-up words (Zipf-like), so BPE's word counts grow like a real corpus."""
    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"] + ["th", "sh", "qu", "ng"]
    vocabulary = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(1_000_000)]
    budget = megabytes * 1_000_000
    while budget > 0:
        words = [vocabulary[min(int(rng.paretovariate(0.8)) - 1, len(vocabulary) - 1)] for _ in range(200)]
        doc = " ".join(words) + ".\n"
        budget -= len(doc)
        yield doc


def stream_child(megabytes: int, workdir: str, mode: str):
    logging.disable(logging.WARNING)
    # Current RSS, not the peak so far: importing transformers peaks higher than it settles.
    before_kib = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 1024
    start = time.perf_counter()
    documents = _generated_documents(megabytes)
    if mode == "lmkit":
        train_tokenizer(TokenizerSpec(kind="bpe", vocab_size=8192), documents, Path(workdir) / "lmkit-stream")
    else:
        bare_bpe(documents, 8192, Path(workdir) / "bare-stream.json")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"seconds": seconds, "rss_before_mib": before_kib / 1024, "peak_rss_mib": peak / 1024}))


def bench_stream(megabytes: int, workdir: Path):
    print(f"[4] streaming {megabytes} MB of generated text (~1 M distinct words) through BPE 8192, each in a fresh "
          "process:")
    for mode in ("bare", "lmkit"):
        command = [
            sys.executable,
            __file__,
            "--stream-child",
            str(megabytes),
            "--workdir",
            str(workdir),
            "--mode",
            mode,
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        print(
            f"    {mode:<5}: {figures['seconds']:.1f} s, peak RSS {figures['peak_rss_mib']:.0f} MiB "
            f"(after imports: {figures['rss_before_mib']:.0f} MiB)"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stream-mb", type=int, default=100, help="0 skips the streaming memory figure")
    parser.add_argument("--docs", type=int, default=None,
                        help="at most this many entries of each corpus (default: all)")
    add_smoke(parser, repeats=1, stream_mb=1, docs=1000)
    parser.add_argument("--stream-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("bare", "lmkit"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stream_child:
        stream_child(args.stream_child, args.workdir, args.mode)
        return
    logging.basicConfig(level=logging.WARNING)
    english, chinese = sample(documents(ENGLISH), args.docs), sample(documents(CHINESE_QUOTES), args.docs)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        tokenizer = bench_overhead(english, args.repeats, workdir)
        bench_encoding(tokenizer, english)
        bench_kinds({"en-fortunes": english, "zh-quotes": chinese}, workdir)
        if args.stream_mb:
            bench_stream(args.stream_mb, workdir)


if __name__ == "__main__":
    main()
