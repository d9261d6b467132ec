"""Documents: a corpus read, cleaned, deduplicated and split into train/test(/validation), each document accounted for.

Each phase is cached by `datasets` fingerprints (Arrow files, memory-mapped, so corpora larger than RAM work):

1. **read** (`lmkit.data.corpus`): documents out of files, folders and globs in any supported format, into an Arrow
   table. Standalone tokenizer specs read their files with the same reader; a recipe's inline tokenizer trains on the
   train split this stage produces, so it sees exactly the cleaned training documents.
2. **clean** (one batched map): ANSI escapes and control characters out (keeping `\\n` and `\\t`), NFKC, whitespace
   normalised (newlines kept: poems and code need them), min/max length. Every step is switchable and counted in
   columns that are summed with Arrow afterwards, which stays correct under `num_proc > 1`.
3. **dedup + split** (numpy over two uint64 hash columns, in the main process): exact duplicates removed by a 128-bit
   hash of the cleaned text, then each document is assigned to a split by a seeded hash of its text. A hash split, not
   a seeded permutation: a document's side depends only on (seed, its own text), so adding documents to the corpus
   never moves an existing one across the split, and identical texts always land on the same side even with
   `dedup: false`.

The held-out splits are saved into the run directory (`save_heldout`) so that evaluation reads exactly them again.
`prepare_splits` returns its statistics as a dict; the caller writes `data_stats.json`. Prompt→completion pairs
(`lmkit.data.pairs`) reuse the cleaning, dedup and split helpers of this module.
"""

import dataclasses
import json
import logging
import os
import re
import time
import unicodedata

import numpy as np
from datasets import Dataset, DatasetDict, Features, Value
from datasets.exceptions import DatasetGenerationError
from datasets.fingerprint import Hasher

from lmkit.atomic import atomic_directory
from lmkit.data.args import DataArgs
from lmkit.data.corpus import (
    MAX_DOCUMENT_CHARS,
    document_hashes,
    generate_records,
    resolve_files,
    source_identity,
    split_keys,
    split_long_document,
)
from lmkit.errors import UserError
from lmkit.run_dir import RunDir

logger = logging.getLogger(__name__)

# Bump when a change alters what any cached phase produces (here or in `blocks`): the explicit fingerprints do not hash
# the code.
CACHE_VERSION = 1


# Drop reasons, stored as int8 codes in the cleaned table and counted with numpy.
KEEP, EMPTY, TOO_SHORT, TOO_LONG = 0, 1, 2, 3
SPLIT_CODES = {"train": 0, "test": 1, "validation": 2}

# CSI sequences (colours, cursor moves), OSC sequences (window titles, hyperlinks) and two-character escapes.
_ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
# C0 and C1 control characters except \t (\x09) and \n (\x0a); \r is turned into \n before this runs.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_EXTRA_NEWLINES = re.compile(r"\n{3,}")
# A plain literal pattern lets `re` scan fast; _collapse_space_run keeps leading indentation (code, verse) intact.
_SPACE_RUN = re.compile(r"  +")

_MIN_ROWS_FOR_PROCESSES = 50_000
_PARALLEL_READ_BYTES = 64 * 2**20


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def _unwrap_user_error(error: BaseException) -> BaseException:
    """datasets wraps generator exceptions in DatasetGenerationError; surface our UserError line instead."""
    seen = error
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return error


def _read_corpus(args: DataArgs) -> Dataset:
    sources = resolve_files(args.files)
    fingerprint = Hasher.hash(["read", CACHE_VERSION, [source_identity(s) for s in sources], args.text_field,
                               args.doc_separator, args.encoding_errors])
    total_bytes = sum(s.stat().st_size for s in sources if s.is_file())
    # Reading shards by source file, so processes only help with several big files.
    num_proc = args.num_proc or min(2, os.cpu_count() or 1)
    num_proc = min(num_proc, len(sources)) if total_bytes >= _PARALLEL_READ_BYTES or args.num_proc else 1
    gen_kwargs = {"sources": [str(s) for s in sources], "text_field": args.text_field,
                  "doc_separator": args.doc_separator, "encoding_errors": args.encoding_errors}
    try:
        return Dataset.from_generator(
            generate_records,
            features=Features({"text": Value("string")}),
            cache_dir=args.cache_dir,
            gen_kwargs=gen_kwargs,
            num_proc=num_proc if num_proc > 1 else None,
            fingerprint=fingerprint,
        )
    except DatasetGenerationError as e:
        cause = _unwrap_user_error(e)
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        # From worker processes only a traceback text comes back; re-reading in this process raises the same
        # UserError (the readers are deterministic), or nothing, in which case the original error is a bug.
        for _ in generate_records(**gen_kwargs):
            pass
        raise
    except ValueError as e:
        if "corresponds to no data" not in str(e):  # datasets' way of saying the generator yielded nothing
            raise
        raise UserError(f"data.files: no documents in {describe_sources(sources)} (blank lines, empty records and "
                        f"null texts are skipped): nothing to train on") from None


def describe_sources(sources: list) -> str:
    """'a.txt, b.txt' or 'a.txt, b.txt, c.txt and 7 more files'."""
    names = ", ".join(str(s) for s in sources[:3])
    return names + (f" and {len(sources) - 3} more files" if len(sources) > 3 else "")


# ---------------------------------------------------------------------------------------------------------------------
# Cleaning, dedup and split
# ---------------------------------------------------------------------------------------------------------------------


def _strip_control(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\x1b" in text:
        text = _ANSI_ESCAPE.sub("", text)
    return _CONTROL_CHARS.sub("", text)


def _collapse_space_run(match: re.Match) -> str:
    start = match.start()
    is_indentation = start == 0 or match.string[start - 1] in "\n\t"
    return match.group() if is_indentation else " "


def _normalize_whitespace(text: str) -> str:
    """Strip trailing whitespace of every line, collapse 3+ newlines to 2 and inner runs of spaces to one, strip.

    Runs of U+0020 only: with NFKC on (the default) the other Unicode spaces have already become U+0020. The `in`
    checks skip the regex scans for the many documents that do not need them (they dominate cleaning time).
    """
    text = "\n".join([line.rstrip() for line in text.split("\n")])
    if "\n\n\n" in text:
        text = _EXTRA_NEWLINES.sub("\n\n", text)
    if "  " in text:
        text = _SPACE_RUN.sub(_collapse_space_run, text)
    return text.strip()


def clean_batch(batch: dict, *, strip_control: bool, nfkc: bool, normalize_whitespace: bool, min_chars: int,
                 max_chars: int | None) -> dict:
    """Clean one batch; returns per-document flags and hashes so counts can be summed over any number of processes.

    A kept document longer than `corpus.MAX_DOCUMENT_CHARS` becomes several rows (its pieces, numbered in `piece`; -1
    for every other row), so a giant line costs what the same text in ordinary lines costs.
    """
    texts, drop, n_chars, control_changed, nfkc_changed, whitespace_changed = [], [], [], [], [], []
    piece = []
    for text in batch["text"]:
        before = text
        if strip_control:
            text = _strip_control(text)
        control_changed.append(text != before)
        before = text
        if nfkc and not unicodedata.is_normalized("NFKC", text):
            text = unicodedata.normalize("NFKC", text)
        nfkc_changed.append(text != before)
        before = text
        if normalize_whitespace:
            text = _normalize_whitespace(text)
        whitespace_changed.append(text != before)
        length = len(text)
        if length == 0 or not text.strip():
            drop.append(EMPTY)
        elif length < min_chars:
            drop.append(TOO_SHORT)
        elif max_chars is not None and length > max_chars:
            drop.append(TOO_LONG)
        else:
            drop.append(KEEP)
        pieces = split_long_document(text) if drop[-1] == KEEP and length > MAX_DOCUMENT_CHARS else [text]
        texts.extend(pieces)
        n_chars.extend(len(p) for p in pieces) if len(pieces) > 1 else n_chars.append(length)
        piece.extend(range(len(pieces)) if len(pieces) > 1 else [-1])
        for column in (drop, control_changed, nfkc_changed, whitespace_changed):
            column.extend([column[-1]] * (len(pieces) - 1))
    hashes = document_hashes(texts)  # two uint64 columns: vectorised exact dedup and split later
    return {"text": texts, "drop": np.asarray(drop, dtype=np.int8), "n_chars": np.asarray(n_chars, dtype=np.int64),
            "control_changed": control_changed, "nfkc_changed": nfkc_changed,
            "whitespace_changed": whitespace_changed, "hash_hi": hashes[:, 0].copy(), "hash_lo": hashes[:, 1].copy(),
            "piece": np.asarray(piece, dtype=np.int32)}


_CLEAN_FEATURES = Features({
    "text": Value("string"), "drop": Value("int8"), "n_chars": Value("int64"), "control_changed": Value("bool"),
    "nfkc_changed": Value("bool"), "whitespace_changed": Value("bool"), "hash_hi": Value("uint64"),
    "hash_lo": Value("uint64"), "piece": Value("int32"),
})


def cleaning_options(args: DataArgs) -> dict:
    """`clean_batch`'s keyword arguments from the data settings."""
    return {k: getattr(args, k) for k in ("strip_control", "nfkc", "normalize_whitespace", "min_chars", "max_chars")}


def drop_counts(drop: np.ndarray) -> dict:
    """`data_stats.json`'s "dropped" counts from `clean_batch`'s drop codes (duplicates are counted later)."""
    counts = np.bincount(drop, minlength=4)
    return {"empty": int(counts[EMPTY]), "too_short": int(counts[TOO_SHORT]), "too_long": int(counts[TOO_LONG]),
            "duplicate": 0}


def split_names(args: DataArgs) -> list[str]:
    """The splits a run has: train and test, and validation when `data.validation_size` > 0."""
    return ["train", "test"] + (["validation"] if args.validation_size > 0 else [])


def map_processes(args: DataArgs, n_rows: int) -> int | None:
    """Processes for a map: worker start-up costs ~1 s, so small corpora stay in the main process."""
    if args.num_proc is not None:
        return args.num_proc if args.num_proc > 1 else None
    return min(2, os.cpu_count() or 1) if n_rows >= _MIN_ROWS_FOR_PROCESSES else None


def was_cached(dataset: Dataset, started: float) -> bool:
    """True when every Arrow file behind `dataset` predates `started`, i.e. it came from the cache."""
    files = [f["filename"] for f in dataset.cache_files]
    return bool(files) and all(os.path.getmtime(f) < started for f in files)


def _column(dataset: Dataset, name: str) -> np.ndarray:
    """One column of the underlying table (ignoring any indices mapping) as numpy, without touching other columns."""
    return dataset.data.column(name).to_numpy()


def _read_and_clean(args: DataArgs) -> tuple[Dataset, dict]:
    started = time.time()
    raw = _read_corpus(args)
    cleaning = cleaning_options(args)
    cleaned = raw.map(
        clean_batch,
        batched=True,
        fn_kwargs=cleaning,
        features=_CLEAN_FEATURES,
        num_proc=map_processes(args, len(raw)),
        new_fingerprint=Hasher.hash(["clean", CACHE_VERSION, raw._fingerprint, cleaning, MAX_DOCUMENT_CHARS]),
        desc="Cleaning documents",
    )
    drop, piece = _column(cleaned, "drop"), _column(cleaned, "piece")
    # Counted per source document: the pieces of a split one share its flags.
    long_documents = int((piece == 0).sum())
    if long_documents:
        logger.warning("data: %d documents longer than %d characters (giant lines) were split into %d pieces, each a "
                       "document from here on", long_documents, MAX_DOCUMENT_CHARS, int((piece >= 0).sum()))
    stats = {
        "documents_read": len(raw),
        "long_documents_split": {"documents": long_documents, "pieces": int((piece >= 0).sum()),
                                 "max_document_chars": MAX_DOCUMENT_CHARS},
        "changed_by": {step: int(_column(cleaned, f"{step}_changed")[piece <= 0].sum())
                       for step in ("control", "nfkc", "whitespace")},
        "dropped": drop_counts(drop[piece <= 0]),
        "read_clean_cache_hit": was_cached(raw, started) and was_cached(cleaned, started),
    }
    return cleaned, stats


def first_occurrences(candidates: np.ndarray, hash_hi: np.ndarray, hash_lo: np.ndarray) -> np.ndarray:
    """Of the row indices `candidates`, those whose (hash_hi, hash_lo) is seen for the first time, in order."""
    hi, lo = hash_hi[candidates], hash_lo[candidates]
    order = np.lexsort((candidates, lo, hi))  # by hash, ties by position: the first copy of each text comes first
    hi, lo = hi[order], lo[order]
    is_first = np.ones(len(order), dtype=bool)
    is_first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    return np.sort(candidates[order[is_first]])


def drop_duplicates(kept: np.ndarray, hash_hi: np.ndarray, hash_lo: np.ndarray, stats: dict) -> np.ndarray:
    """`first_occurrences` of the rows `kept`, the others counted in `stats["dropped"]["duplicate"]`."""
    unique = first_occurrences(kept, hash_hi, hash_lo)
    stats["dropped"]["duplicate"] = int(len(kept) - len(unique))
    return unique


def assign_splits(keys: np.ndarray, test_size: float, validation_size: float) -> np.ndarray:
    """Split codes from keys; a split that would be empty (tiny corpora) takes the lowest-key train document."""
    codes = np.full(len(keys), SPLIT_CODES["train"], dtype=np.int8)
    codes[keys < test_size] = SPLIT_CODES["test"]
    if validation_size > 0:
        codes[(keys >= test_size) & (keys < test_size + validation_size)] = SPLIT_CODES["validation"]
    wanted = ["test"] + (["validation"] if validation_size > 0 else [])
    for name in wanted:
        if not (codes == SPLIT_CODES[name]).any():
            train = np.flatnonzero(codes == SPLIT_CODES["train"])
            codes[train[np.argmin(keys[train])]] = SPLIT_CODES[name]
    if not (codes == SPLIT_CODES["train"]).any():
        codes[np.argmax(keys)] = SPLIT_CODES["train"]
    return codes


def prepare_splits(args: DataArgs, seed: int) -> tuple[DatasetDict, dict]:
    """Read, clean, deduplicate and split the corpus of `args.files`.

    Args:
        args: the data settings.
        seed: the run seed (`training.seed`); the split is a deterministic function of (seed, document text).

    Returns:
        (splits, stats): a DatasetDict with "train", "test" and, when `args.validation_size > 0`, "validation", each
        with one column "text"; and a JSON-ready dict of counts (documents read, changed and dropped by each cleaning
        step, duplicates, documents and characters per split).

    Raises:
        UserError: for unreadable input or a corpus too small after cleaning.
    """
    cleaned, stats = _read_and_clean(args)
    drop, hash_hi, hash_lo = _column(cleaned, "drop"), _column(cleaned, "hash_hi"), _column(cleaned, "hash_lo")
    kept = np.flatnonzero(drop == KEEP)
    if args.dedup:
        kept = drop_duplicates(kept, hash_hi, hash_lo, stats)
    stats["documents_kept"] = len(kept)
    names = split_names(args)
    if len(kept) < len(names):
        dropped = ", ".join(
            f"{count} {reason.replace('_', ' ')}" for reason, count in stats["dropped"].items() if count
        )
        raise UserError(f"data.files: {len(kept)} document(s) left after cleaning {describe_sources(args.files)} "
                        f"({stats['documents_read']} read, dropped: {dropped or 'none'}); {len(names)} are needed "
                        f"for the {'/'.join(names)} splits")
    codes = assign_splits(split_keys(hash_hi[kept], seed), args.test_size, args.validation_size)
    n_chars = _column(cleaned, "n_chars")
    base = Hasher.hash(["split", CACHE_VERSION, cleaned._fingerprint, seed, args.test_size, args.validation_size,
                        args.dedup])
    splits, stats["splits"] = DatasetDict(), {}
    for name in names:
        indices = kept[codes == SPLIT_CODES[name]]
        splits[name] = cleaned.select(indices, new_fingerprint=Hasher.hash([base, name])).select_columns(
            ["text"], new_fingerprint=Hasher.hash([base, name, "text"]))
        stats["splits"][name] = {"documents": len(indices), "chars": int(n_chars[indices].sum())}
    stats["split_method"] = "hash of (seed, document text): stable when the corpus grows"
    logger.info("data: %d documents read, %d kept; %s", stats["documents_read"], stats["documents_kept"],
                ", ".join(f"{k}={v['documents']}" for k, v in stats["splits"].items()))
    return splits, stats


def load_eval_documents(path: str, args: DataArgs | None = None) -> Dataset:
    """Documents of `path` (any `data.files` form), cleaned and deduplicated, for `lmkit eval --data PATH`.

    Args:
        args: the run's data settings (text_field, doc_separator, cleaning switches), so that a corpus is read the way
            training read it; None uses the defaults. Its `files` are replaced by `path`.

    Returns:
        A Dataset with one column "text", in reading order.
    """
    args = dataclasses.replace(args, files=[path]) if args is not None else DataArgs(files=[path])
    cleaned, _ = _read_and_clean(args)
    drop, hash_hi, hash_lo = _column(cleaned, "drop"), _column(cleaned, "hash_hi"), _column(cleaned, "hash_lo")
    kept = first_occurrences(np.flatnonzero(drop == KEEP), hash_hi, hash_lo)
    if len(kept) == 0:
        raise UserError(f"{path}: no documents left after cleaning")
    return cleaned.select(kept).select_columns(["text"])


# ---------------------------------------------------------------------------------------------------------------------
# Held-out documents
# ---------------------------------------------------------------------------------------------------------------------


def save_heldout(splits: DatasetDict, run_dir: RunDir) -> None:
    """Write the test and validation splits into the run's held-out folder (one JSON record per line: {"text": ...},
    or {"prompt": ..., "completion": ..., "group": ...} for pairs), atomically."""
    with atomic_directory(run_dir.heldout_dir, replace=True) as tmp:
        for name in ("test", "validation"):
            if name not in splits:
                continue
            columns = splits[name].column_names  # "text", or prompt/completion/group for pairs
            with open(tmp / run_dir.heldout(name).name, "w", encoding="utf-8") as f:
                for batch in splits[name].iter(batch_size=1024):
                    f.writelines(json.dumps(dict(zip(columns, values)), ensure_ascii=False) + "\n"
                                 for values in zip(*(batch[c] for c in columns)))


def load_heldout(run_dir: RunDir, split: str = "test") -> Dataset:
    """The held-out documents saved by `save_heldout`, exactly as they were (column "text").

    Raises:
        UserError: when the run directory has no such held-out file.
    """
    path = run_dir.heldout(split)
    if not path.is_file():
        raise UserError(f"{path} not found: {run_dir.path} holds no held-out {split!r} documents (is it an lmkit run "
                        f"directory?)")
    fingerprint = Hasher.hash(["heldout", CACHE_VERSION, source_identity(path)])
    # The text passes through untouched (no cleaning): it was cleaned before it was saved.
    return Dataset.from_generator(generate_records, features=Features({"text": Value("string")}),
                                  gen_kwargs={"sources": [str(path)], "text_field": "text", "doc_separator": "line",
                                              "encoding_errors": "strict"},
                                  fingerprint=fingerprint)


