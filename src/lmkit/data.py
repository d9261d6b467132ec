"""The data stage: a folder of text in, tokenized train/test(/validation) blocks out, with every document accounted for.

The pipeline, each phase cached by `datasets` fingerprints (Arrow files, memory-mapped, so corpora larger than RAM work):

1. **read** (`lmkit.corpus`): documents out of files, folders and globs in any supported format, into an Arrow table.
   Standalone tokenizer specs read their files with the same reader; a recipe's inline tokenizer trains on the train
   split this stage produces, so it sees exactly the cleaned training documents.
2. **clean** (one batched map): ANSI escapes and control characters out (keeping `\\n` and `\\t`), NFKC, whitespace
   normalised (newlines kept: poems and code need them), min/max length. Every step is switchable and counted in
   columns that are summed with Arrow afterwards, which stays correct under `num_proc > 1`.
3. **dedup + split** (numpy over two uint64 hash columns, in the main process): exact duplicates removed by a 128-bit
   hash of the cleaned text, then each document is assigned to a split by a seeded hash of its text. A hash split, not a
   seeded permutation: a document's side depends only on (seed, its own text), so adding documents to the corpus never
   moves an existing one across the split, and identical texts always land on the same side even with `dedup: false`.
4. **tokenize** (batched map, `num_proc`): one row per document, its token ids followed by EOS. Cached separately from
   packing, so changing `block_size` or `packing` does not re-tokenize.
5. **pack** (default) or **pad**: packing cuts the global token stream (documents joined by EOS) into `block_size`
   blocks. Each map batch owns the blocks that *start* inside its documents and reads ahead in the memory-mapped token
   table to finish its last block, so only the very last block of a split is partial (padded, mask 0, labels -100) and
   no token is dropped; a per-batch partial block would waste padding in every batch and make the block count depend
   on the batch size. Padding mode keeps each document (with EOS) as pieces of at most `block_size` tokens, padded per
   batch by `LMDataCollator`.

`prepare_splits` and `build_lm_datasets` return their statistics as dicts; the caller writes `data_stats.json`.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict, Features, List, Value
from datasets.exceptions import DatasetGenerationError
from datasets.fingerprint import Hasher
from tokenizers import Tokenizer

from lmkit.atomic import atomic_directory
from lmkit.corpus import (
    CJK_RANGES,
    MAX_DOCUMENT_CHARS,
    SUPPORTED,
    document_hashes,
    generate_records,
    iter_records,
    resolve_files,
    source_identity,
    split_keys,
    split_long_document,
)
from lmkit.errors import UserError
from lmkit.run_dir import RunDir
from lmkit.settings import SettingError, check_fields, setting

logger = logging.getLogger(__name__)

# Bump when a change alters what any cached phase produces: the explicit fingerprints below do not hash the code.
_CACHE_VERSION = 1


# Drop reasons, stored as int8 codes in the cleaned table and counted with numpy.
_KEEP, _EMPTY, _TOO_SHORT, _TOO_LONG = 0, 1, 2, 3
_SPLIT_CODES = {"train": 0, "test": 1, "validation": 2}

# CSI sequences (colours, cursor moves), OSC sequences (window titles, hyperlinks) and two-character escapes.
_ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
# C0 and C1 control characters except \t (\x09) and \n (\x0a); \r is turned into \n before this runs.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_EXTRA_NEWLINES = re.compile(r"\n{3,}")
# A plain literal pattern lets `re` scan fast; _collapse_space_run keeps leading indentation (code, verse) intact.
_SPACE_RUN = re.compile(r"  +")

_MIN_ROWS_FOR_PROCESSES = 50_000
# Documents per packing map batch; each batch emits the blocks that start inside it (module-level so tests can shrink it).
_PACK_BATCH_DOCS = 4096
# Batch budgets for long documents (see `_batch_rows`); ordinary documents keep the row counts above.
_PACK_BATCH_TOKENS = 4_000_000
_TOKENIZE_BATCH_CHARS = 2_000_000
_PARALLEL_READ_BYTES = 64 * 2**20


@dataclass
class DataArgs:
    """The recipe's `data:` section: where the corpus is and how it becomes training blocks."""

    files: list[str] = setting(default_factory=list, help=f"Files, folders or globs to read: {SUPPORTED}.")
    text_field: str = setting("text", "Field holding the text in .jsonl/.json/.csv/.parquet.")
    doc_separator: str = setting(
        "line",
        "How .txt files split into documents: 'line' (one per line), 'blank_line', or any other string: documents are "
        "separated by lines equal to it (e.g. '%' for fortune files).",
    )
    encoding_errors: str = setting(
        "strict", "Invalid UTF-8: 'strict' stops with file and byte offset, 'replace' uses U+FFFD.",
        choices=("strict", "replace"),
    )
    test_size: float = setting(0.1, "Fraction of documents held out for testing.", above=0, below=1)
    validation_size: float = setting(
        0.0, "Fraction of documents held out for validation (0 = no validation split).", minimum=0, below=1
    )
    block_size: int = setting(128, "Tokens per training example (<= model.n_positions).", minimum=2)
    packing: bool = setting(
        True, "Pack documents (EOS between them) into full blocks; false = one padded row per document piece."
    )
    mask_prob: float = setting(
        0.0, "Training-time probability of replacing an input token (or word, see mask_unit) by <|unk|> (labels keep "
        "the original).", minimum=0, below=1,
    )
    mask_unit: str = setting(
        "token", "What mask_prob chooses: 'token' (each token alone) or 'word' (all tokens of a word together; words "
        "by whitespace, each CJK character a word).", choices=("token", "word"),
    )
    format: str = setting(
        "text", "'text': documents to continue; 'prompt_completion': (prompt, completion) pairs, the loss on the "
        "completion only, always padded (packing would let attention cross pairs).",
        choices=("text", "prompt_completion"),
    )
    prompt_field: str = setting("prompt", "prompt_completion: the field holding the prompt (jsonl/json/csv/parquet).")
    completion_field: str = setting("completion", "prompt_completion: the field holding the expected completion.")
    group_field: str | None = setting(
        None, "prompt_completion: a field naming each pair's group (a poem, a document); a group never straddles the "
        "split. null = pairs are split by their prompt.",
    )
    pairs_from: str | None = setting(
        None, "prompt_completion from text documents instead of fields: 'lines' pairs each line with the next line "
        "of the same document; documents are cleaned, deduplicated and split as in 'text', so no document straddles "
        "the split.", choices=("lines",),
    )
    pairs_skip_lines: int = setting(
        0, "pairs_from lines: leading lines of each document left out of the pairs (a poem's title and author).",
        minimum=0,
    )
    nfkc: bool = setting(True, "Apply Unicode NFKC normalisation.")
    strip_control: bool = setting(True, "Remove ANSI escape codes and control characters (\\n and \\t are kept).")
    normalize_whitespace: bool = setting(
        True, "Strip trailing spaces, collapse inner space runs and 3+ newlines, strip each document."
    )
    min_chars: int = setting(1, "Drop documents shorter than this (characters, after cleaning).", minimum=0)
    max_chars: int | None = setting(
        None, "Drop documents longer than this (characters, after cleaning); null = no limit.", minimum=1
    )
    dedup: bool = setting(True, "Remove exact duplicate documents (before the split).")
    num_proc: int | None = setting(
        None, "Processes for the maps; null = min(2, CPUs) for large corpora, 1 for small.", minimum=1
    )
    cache_dir: str | None = setting(None, "Where datasets caches the Arrow files; null = datasets' default.")

    def __post_init__(self):
        if isinstance(self.files, (str, os.PathLike)):
            self.files = [self.files]
        if isinstance(self.files, tuple):
            self.files = list(self.files)
        if isinstance(self.files, list):
            self.files = [os.fspath(f) if isinstance(f, os.PathLike) else f for f in self.files]
        if isinstance(self.cache_dir, os.PathLike):
            self.cache_dir = os.fspath(self.cache_dir)
        check_fields(self, "data")
        if not self.files:
            raise SettingError("files", "must list at least one file, folder or glob, got []", "data")
        if not self.text_field:
            raise SettingError("text_field", "must be a non-empty field name, got ''", "data")
        if not self.doc_separator.strip() or "\n" in self.doc_separator:
            raise SettingError("doc_separator", "must be 'line', 'blank_line' or a one-line marker such as '%', "
                                                f"got {self.doc_separator!r}", "data")
        if self.test_size + self.validation_size >= 1.0:
            raise SettingError("test_size", f"+ data.validation_size must be below 1 to leave training data, got "
                                            f"{self.test_size} + {self.validation_size}", "data")
        if self.format == "text" and (self.pairs_from is not None or self.group_field is not None):
            key = "pairs_from" if self.pairs_from is not None else "group_field"
            raise SettingError(key, f"needs data.format: prompt_completion, got data.format: {self.format}", "data")
        if self.format == "prompt_completion":
            for key in ("prompt_field", "completion_field", "group_field"):
                if getattr(self, key) == "":
                    raise SettingError(key, "must be a non-empty field name, got ''", "data")
            if self.prompt_field == self.completion_field:
                raise SettingError("completion_field", f"must differ from data.prompt_field, both are "
                                                       f"{self.prompt_field!r}", "data")
            self.packing = False  # pairs are padded: a packed block would let one pair attend to another
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise SettingError("max_chars", f"must be >= data.min_chars ({self.min_chars}), got {self.max_chars}",
                               "data")


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------


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
    fingerprint = Hasher.hash(["read", _CACHE_VERSION, [source_identity(s) for s in sources], args.text_field,
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
        raise UserError(f"data.files: no documents in {_describe_sources(sources)} (blank lines, empty records and "
                        f"null texts are skipped): nothing to train on") from None


def _describe_sources(sources: list) -> str:
    """'a.txt, b.txt' or 'a.txt, b.txt, c.txt and 7 more files'."""
    names = ", ".join(str(s) for s in sources[:3])
    return names + (f" and {len(sources) - 3} more files" if len(sources) > 3 else "")


# ----------------------------------------------------------------------------------------------------------------------
# Cleaning, dedup and split
# ----------------------------------------------------------------------------------------------------------------------


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


def _clean_batch(batch: dict, *, strip_control: bool, nfkc: bool, normalize_whitespace: bool, min_chars: int,
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
            drop.append(_EMPTY)
        elif length < min_chars:
            drop.append(_TOO_SHORT)
        elif max_chars is not None and length > max_chars:
            drop.append(_TOO_LONG)
        else:
            drop.append(_KEEP)
        pieces = split_long_document(text) if drop[-1] == _KEEP and length > MAX_DOCUMENT_CHARS else [text]
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


def _default_num_proc(args: DataArgs, n_rows: int) -> int | None:
    """Processes for a map: worker start-up costs ~1 s, so small corpora stay in the main process."""
    if args.num_proc is not None:
        return args.num_proc if args.num_proc > 1 else None
    return min(2, os.cpu_count() or 1) if n_rows >= _MIN_ROWS_FOR_PROCESSES else None


def _was_cached(dataset: Dataset, started: float) -> bool:
    """True when every Arrow file behind `dataset` predates `started`, i.e. it came from the cache."""
    files = [f["filename"] for f in dataset.cache_files]
    return bool(files) and all(os.path.getmtime(f) < started for f in files)


def _column(dataset: Dataset, name: str) -> np.ndarray:
    """One column of the underlying table (ignoring any indices mapping) as numpy, without touching other columns."""
    return dataset.data.column(name).to_numpy()


def _read_and_clean(args: DataArgs) -> tuple[Dataset, dict]:
    started = time.time()
    raw = _read_corpus(args)
    cleaning = {k: getattr(args, k) for k in ("strip_control", "nfkc", "normalize_whitespace", "min_chars", "max_chars")}
    cleaned = raw.map(
        _clean_batch,
        batched=True,
        fn_kwargs=cleaning,
        features=_CLEAN_FEATURES,
        num_proc=_default_num_proc(args, len(raw)),
        new_fingerprint=Hasher.hash(["clean", _CACHE_VERSION, raw._fingerprint, cleaning, MAX_DOCUMENT_CHARS]),
        desc="Cleaning documents",
    )
    drop, piece = _column(cleaned, "drop"), _column(cleaned, "piece")
    # Counted per source document: the pieces of a split one share its flags.
    counts = np.bincount(drop[piece <= 0], minlength=4)
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
        "dropped": {"empty": int(counts[_EMPTY]), "too_short": int(counts[_TOO_SHORT]),
                    "too_long": int(counts[_TOO_LONG]), "duplicate": 0},
        "read_clean_cache_hit": _was_cached(raw, started) and _was_cached(cleaned, started),
    }
    return cleaned, stats


def _first_occurrences(candidates: np.ndarray, hash_hi: np.ndarray, hash_lo: np.ndarray) -> np.ndarray:
    """Of the row indices `candidates`, those whose (hash_hi, hash_lo) is seen for the first time, in order."""
    hi, lo = hash_hi[candidates], hash_lo[candidates]
    order = np.lexsort((candidates, lo, hi))  # by hash, ties by position: the first copy of each text comes first
    hi, lo = hi[order], lo[order]
    is_first = np.ones(len(order), dtype=bool)
    is_first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    return np.sort(candidates[order[is_first]])


def _assign_splits(keys: np.ndarray, test_size: float, validation_size: float) -> np.ndarray:
    """Split codes from keys; if a split would be empty (tiny corpora), it takes the train document with the lowest key."""
    codes = np.full(len(keys), _SPLIT_CODES["train"], dtype=np.int8)
    codes[keys < test_size] = _SPLIT_CODES["test"]
    if validation_size > 0:
        codes[(keys >= test_size) & (keys < test_size + validation_size)] = _SPLIT_CODES["validation"]
    wanted = ["test"] + (["validation"] if validation_size > 0 else [])
    for name in wanted:
        if not (codes == _SPLIT_CODES[name]).any():
            train = np.flatnonzero(codes == _SPLIT_CODES["train"])
            codes[train[np.argmin(keys[train])]] = _SPLIT_CODES[name]
    if not (codes == _SPLIT_CODES["train"]).any():
        codes[np.argmax(keys)] = _SPLIT_CODES["train"]
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
    kept = np.flatnonzero(drop == _KEEP)
    if args.dedup:
        unique = _first_occurrences(kept, hash_hi, hash_lo)
        stats["dropped"]["duplicate"] = int(len(kept) - len(unique))
        kept = unique
    stats["documents_kept"] = len(kept)
    split_names = ["train", "test"] + (["validation"] if args.validation_size > 0 else [])
    if len(kept) < len(split_names):
        dropped = ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in stats["dropped"].items() if count)
        raise UserError(f"data.files: {len(kept)} document(s) left after cleaning {_describe_sources(args.files)} "
                        f"({stats['documents_read']} read, dropped: {dropped or 'none'}); {len(split_names)} are needed "
                        f"for the {'/'.join(split_names)} splits")
    codes = _assign_splits(split_keys(hash_hi[kept], seed), args.test_size, args.validation_size)
    n_chars = _column(cleaned, "n_chars")
    base = Hasher.hash(["split", _CACHE_VERSION, cleaned._fingerprint, seed, args.test_size, args.validation_size,
                        args.dedup])
    splits, stats["splits"] = DatasetDict(), {}
    for name in split_names:
        indices = kept[codes == _SPLIT_CODES[name]]
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
    kept = _first_occurrences(np.flatnonzero(drop == _KEEP), hash_hi, hash_lo)
    if len(kept) == 0:
        raise UserError(f"{path}: no documents left after cleaning")
    return cleaned.select(kept).select_columns(["text"])


# ----------------------------------------------------------------------------------------------------------------------
# Held-out documents
# ----------------------------------------------------------------------------------------------------------------------


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
    fingerprint = Hasher.hash(["heldout", _CACHE_VERSION, source_identity(path)])
    # The text passes through untouched (no cleaning): it was cleaned before it was saved.
    return Dataset.from_generator(generate_records, features=Features({"text": Value("string")}),
                                  gen_kwargs={"sources": [str(path)], "text_field": "text", "doc_separator": "line",
                                              "encoding_errors": "strict"},
                                  fingerprint=fingerprint)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenization, packing and padding
# ----------------------------------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition and the special-token ids the data stage uses."""
    definition = tokenizer.backend_tokenizer.to_str()
    ids = (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    return hashlib.sha256(f"{definition}\n{ids}".encode()).hexdigest()


_BACKENDS: dict[str, Any] = {}


def _backend(definition: str):
    """A private, truncation- and padding-free copy of the tokenizer, built once per process."""
    key = hashlib.sha256(definition.encode()).hexdigest()
    if key not in _BACKENDS:
        backend = Tokenizer.from_str(definition)
        # A truncating tokenizer would silently drop tokens; padding would add fake ones.
        backend.no_truncation()
        backend.no_padding()
        _BACKENDS[key] = backend
    return _BACKENDS[key]


_DOC_FEATURES = Features({"input_ids": List(Value("int32"))})
_LM_FEATURES = Features({"input_ids": List(Value("int32")), "attention_mask": List(Value("int8")),
                         "labels": List(Value("int32"))})


def _tokenize_batch(texts: list[str], *, definition: str, eos_id: int) -> pa.Table:
    """One row per document: its ids (no special tokens added by the tokenizer) followed by one EOS."""
    encodings = _backend(definition).encode_batch_fast(texts, add_special_tokens=False)
    ids = [e.ids for e in encodings]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((i for x in ids for i in x), dtype=np.int32, count=int(lengths.sum()))
    flat = np.insert(flat, np.cumsum(lengths), np.int32(eos_id))  # EOS after each document
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths + 1, out=offsets[1:])
    return pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))})


def _list_table(values: np.ndarray, offsets: np.ndarray, attention: np.ndarray, labels: np.ndarray) -> pa.Table:
    offsets = pa.array(offsets.astype(np.int32))
    return pa.table({
        "input_ids": pa.ListArray.from_arrays(offsets, pa.array(values.astype(np.int32))),
        "attention_mask": pa.ListArray.from_arrays(offsets, pa.array(attention.astype(np.int8))),
        "labels": pa.ListArray.from_arrays(offsets, pa.array(labels.astype(np.int32))),
    })


def _pack_batch(_ids, indices: list[int], *, documents: Dataset, doc_offsets: np.ndarray, block_size: int,
                pad_id: int) -> pa.Table:
    """Blocks whose first token lies in this batch's documents; reads ahead in `documents` to finish the last one."""
    first_doc, end_doc = indices[0], indices[-1] + 1
    total = int(doc_offsets[-1])
    first_block = -(-int(doc_offsets[first_doc]) // block_size)
    end_block = -(-int(doc_offsets[end_doc]) // block_size)
    if first_block >= end_block:
        empty = np.zeros(0, np.int64)
        return _list_table(empty, np.zeros(1, np.int64), empty, empty)
    start, stop = first_block * block_size, min(end_block * block_size, total)
    doc_lo = int(np.searchsorted(doc_offsets, start, side="right")) - 1
    doc_hi = int(np.searchsorted(doc_offsets, stop, side="left"))
    column = documents.data.slice(doc_lo, doc_hi - doc_lo).column("input_ids")
    tokens = pc.list_flatten(column).to_numpy()[start - doc_offsets[doc_lo]:stop - doc_offsets[doc_lo]]
    n_blocks = end_block - first_block
    padding = n_blocks * block_size - len(tokens)  # non-zero only for the very last block of the split
    values = np.concatenate([tokens, np.full(padding, pad_id, dtype=tokens.dtype)])
    attention = np.concatenate([np.ones(len(tokens), np.int8), np.zeros(padding, np.int8)])
    labels = np.concatenate([tokens, np.full(padding, -100, dtype=tokens.dtype)])
    return _list_table(values, np.arange(n_blocks + 1) * block_size, attention, labels)


def _piece_batch(ids: pa.ChunkedArray, *, block_size: int) -> pa.Table:
    """Padding mode: each document (with its EOS) as consecutive pieces of at most `block_size` tokens, unpadded."""
    column = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    lengths = pc.list_value_length(column).to_numpy().astype(np.int64)
    values = pc.list_flatten(column).to_numpy()
    doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pieces = -(-lengths // block_size)
    # Start of piece k of document d = doc_starts[d] + k * block_size.
    piece_doc = np.repeat(np.arange(len(lengths)), pieces)
    piece_rank = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    starts = doc_starts[piece_doc] + piece_rank * block_size
    offsets = np.append(starts, values.size)
    return _list_table(values, offsets, np.ones(values.size, np.int8), values)


def _batch_rows(texts: pa.ChunkedArray, budget_chars: int, most: int) -> int:
    """Rows per map batch so that a batch of the longest documents holds about `budget_chars` characters: a batch of
    giant documents must not hold far more text than a batch of ordinary ones."""
    longest = pc.max(pc.utf8_length(texts)).as_py() or 1
    return max(1, min(most, budget_chars // longest))


def _map_kwargs(args: DataArgs, n_rows: int) -> dict:
    return {"batched": True, "num_proc": _default_num_proc(args, n_rows)}


def build_lm_datasets(splits: DatasetDict, tokenizer, args: DataArgs, vocab_size: int) -> tuple[DatasetDict, dict]:
    """Tokenize each split and pack (or cut) it into causal-LM examples.

    Args:
        splits: the output of `prepare_splits` (column "text").
        tokenizer: a `PreTrainedTokenizerFast` with eos, pad and unk tokens.
        args: the data settings (`block_size`, `packing`, `num_proc`).
        vocab_size: the model config's vocabulary size; every id produced must be below it.

    Returns:
        (datasets, stats): the same split names with columns input_ids, attention_mask and labels (-100 on padding),
        and per-split counts: documents, tokens (EOS included), blocks, padding tokens and fraction, tokens dropped.

    Raises:
        UserError: when the tokenizer lacks a special token, or produces ids the model's vocabulary cannot hold.
    """
    for role in ("eos", "pad", "unk"):
        if getattr(tokenizer, f"{role}_token_id") is None:
            raise UserError(f"tokenizer {tokenizer.name_or_path or '(in memory)'} has no {role} token; lmkit tokenizers "
                            f"define <|endoftext|>, <|pad|> and <|unk|>")
    definition = tokenizer.backend_tokenizer.to_str()
    tok_hash = tokenizer_fingerprint(tokenizer)
    started = time.time()
    lm_splits, stats = DatasetDict(), {"tokenizer_sha256": tok_hash, "block_size": args.block_size,
                                       "packing": args.packing, "splits": {}}
    cached = True
    for name, texts in splits.items():
        documents = texts.map(
            _tokenize_batch, input_columns=["text"], remove_columns=texts.column_names, features=_DOC_FEATURES,
            fn_kwargs={"definition": definition, "eos_id": tokenizer.eos_token_id},
            new_fingerprint=Hasher.hash(["tokenize", _CACHE_VERSION, texts._fingerprint, tok_hash]),
            desc=f"Tokenizing {name}", batch_size=_batch_rows(texts.data.column("text"), _TOKENIZE_BATCH_CHARS, 1000),
            **_map_kwargs(args, len(texts)),
        )
        flat_ids = pc.list_flatten(documents.data.column("input_ids"))
        max_id = max(pc.max(flat_ids).as_py(), tokenizer.pad_token_id, tokenizer.unk_token_id)
        if max_id >= vocab_size:
            raise UserError(f"tokenizer {tokenizer.name_or_path or '(in memory)'} ({len(tokenizer)} tokens) produces "
                            f"id {max_id} but the model config has vocab_size={vocab_size}: use the tokenizer the "
                            f"model was built with, or a model config whose vocab_size covers it")
        doc_lengths = pc.list_value_length(documents.data.column("input_ids")).to_numpy().astype(np.int64)
        step_fingerprint = Hasher.hash([args.packing and "pack" or "pieces", _CACHE_VERSION, documents._fingerprint,
                                        args.block_size, tokenizer.pad_token_id])
        if args.packing:
            doc_offsets = np.concatenate([[0], np.cumsum(doc_lengths)])
            blocks = documents.with_format("arrow").map(
                _pack_batch, with_indices=True, input_columns=["input_ids"], remove_columns=["input_ids"],
                features=_LM_FEATURES, batch_size=max(1, min(_PACK_BATCH_DOCS, _PACK_BATCH_TOKENS // max(
                    1, int(doc_lengths.max(initial=1))))),
                fn_kwargs={"documents": documents, "doc_offsets": doc_offsets, "block_size": args.block_size,
                           "pad_id": tokenizer.pad_token_id},
                new_fingerprint=step_fingerprint, desc=f"Packing {name}", **_map_kwargs(args, len(documents)),
            ).with_format(None)
        else:
            blocks = documents.with_format("arrow").map(
                _piece_batch, input_columns=["input_ids"], remove_columns=["input_ids"], features=_LM_FEATURES,
                fn_kwargs={"block_size": args.block_size}, new_fingerprint=step_fingerprint,
                desc=f"Cutting {name}", **_map_kwargs(args, len(documents)),
            ).with_format(None)
        cached = cached and _was_cached(documents, started) and _was_cached(blocks, started)
        lm_splits[name] = blocks
        stats["splits"][name] = _block_stats(documents, doc_lengths, blocks, args.block_size)
    stats["tokens_dropped"] = sum(s["tokens_dropped"] for s in stats["splits"].values())
    stats["cache_hit"] = cached
    if stats["tokens_dropped"]:
        raise AssertionError(f"the data stage dropped {stats['tokens_dropped']} tokens: {stats['splits']}")
    train = stats["splits"].get("train")
    if args.packing and train is not None and train["tokens"] < args.block_size:
        raise UserError(f"data.files: the train split of {_describe_sources(args.files)} holds {train['tokens']} tokens "
                        f"({train['documents']} documents), "
                        f"less than one training block (data.block_size = {args.block_size}); add text or lower "
                        "data.block_size")
    return lm_splits, stats


def _block_stats(documents: Dataset, doc_lengths: np.ndarray, blocks: Dataset, block_size: int) -> dict:
    tokens = int(doc_lengths.sum())
    attended = int(pc.sum(pc.list_flatten(blocks.data.column("attention_mask"))).as_py() or 0)
    # Rows are padded to block_size: in the table (packing) or by the collator, at most to block_size (padding mode).
    slots = len(blocks) * block_size
    return {"documents": len(documents), "tokens": tokens, "blocks": len(blocks), "padding_tokens": slots - attended,
            "padding_fraction": round((slots - attended) / slots, 6) if slots else 0.0,
            "tokens_dropped": tokens - attended}


# ----------------------------------------------------------------------------------------------------------------------
# Collator
# ----------------------------------------------------------------------------------------------------------------------


# For word masking each Han, Hiragana, Katakana and Hangul character is a word of its own (Chinese and Japanese have
# no spaces to find words by).
def _mostly_cjk(low: int, high: int) -> bool:
    """Whether at least half the code points in [low, high] are CJK."""
    cjk = sum(max(0, min(high, last) - max(low, first) + 1) for first, last in CJK_RANGES)
    return 2 * cjk >= high - low + 1


def _byte_level_alphabet() -> dict[str, int]:
    """The byte each character of a byte-level BPE vocabulary stands for (GPT-2's bytes_to_unicode, inverted)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    alphabet, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(256 + extra)] = byte
            extra += 1
    return alphabet


def _utf8_length(lead: int) -> int:
    """Bytes in the character a UTF-8 byte starts; 0 for a continuation byte or a byte UTF-8 never uses."""
    if lead < 0x80:
        return 1
    return 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 0


def _char_kind(piece: bytes) -> str:
    """'space', 'cjk' or 'other' for the UTF-8 bytes of one character, or of its first bytes when a token cuts it.

    Which character a cut one is cannot be seen: it is 'cjk' when most characters that begin with those bytes are
    (E3 81 begins Hiragana; E3 80 CJK punctuation such as 。 and 、, which are 'other').
    """
    length = _utf8_length(piece[0])
    if length == 0 or len(piece) > length:
        return "other"
    if len(piece) == length:
        try:
            char = piece.decode("utf-8")
        except UnicodeDecodeError:  # overlong forms and surrogates
            return "other"
        return "space" if char.isspace() else "cjk" if _mostly_cjk(ord(char), ord(char)) else "other"
    value = piece[0] & (0xFF >> (length + 1))
    for byte in piece[1:]:
        value = value << 6 | (byte & 0x3F)
    missing = 6 * (length - len(piece))
    return "cjk" if _mostly_cjk(value << missing, (value << missing) | ((1 << missing) - 1)) else "other"


class WordTables(NamedTuple):
    """Per vocabulary id, what word masking needs to know about a token (bool tensors of the vocabulary's length).

    Words are whitespace-separated, and each CJK character (Han, Hiragana, Katakana, Hangul) is a word of its own.
    A new word begins at a token that `starts` one, or after a token that `ends` one, unless the token is `inside` a
    character (byte-level BPE can cut a character's UTF-8 bytes over several tokens, which then stay together). A token
    that `begins` no character (continuation bytes only) ends a word when the token that began its character does.
    Special tokens are words of their own; they and whitespace-only tokens are not `maskable`.
    """

    starts: torch.Tensor  # its first character is whitespace or CJK
    ends: torch.Tensor  # the last character that begins in it is whitespace or CJK (or it is a special token)
    inside: torch.Tensor  # it begins with UTF-8 continuation bytes: the middle or end of a character
    begins: torch.Tensor  # at least one character begins in it
    maskable: torch.Tensor  # neither special nor whitespace only

    def word_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """For a (rows, width) batch of ids, the index of each position's word in its row (0, 1, 2, ...)."""
        if input_ids.numel() == 0:
            return torch.zeros_like(input_ids)
        positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        # Each position's last token (itself or earlier) in which a character begins decides whether a word ends.
        beginner = torch.where(self.begins[input_ids], positions, 0).cummax(dim=1).values
        ends = self.ends[input_ids.gather(1, beginner)]
        boundary = self.starts[input_ids].clone()
        boundary[:, 1:] |= ends[:, :-1]
        boundary &= ~self.inside[input_ids]
        boundary[:, 0] = True  # a row starts a word even when a block cut it out of the middle of one
        return boundary.long().cumsum(dim=1) - 1


def word_tables(tokenizer) -> WordTables:
    """Derive `WordTables` from a `PreTrainedTokenizerFast` once, for `LMDataCollator`'s word masking.

    A byte-level BPE token is read as the bytes it stands for ('Ġworld' is b' world'), which may begin or end in the
    middle of a character's UTF-8 bytes; any other token (lmkit's char and word kinds) is read as its own text.
    """
    backend = tokenizer.backend_tokenizer
    vocab = backend.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    byte_level = any(part.get("type") == "ByteLevel" for part in decoder.get("decoders", [decoder]))
    alphabet = _byte_level_alphabet() if byte_level else {}
    added = tokenizer.added_tokens_decoder
    special = set(tokenizer.all_special_ids) | {index for index, token in added.items() if token.special}
    # Ids no token holds are left as special tokens would be: a word of their own, never masked.
    flags = {name: [True] * size for name in ("starts", "ends", "begins")}
    flags |= {"inside": [False] * size, "maskable": [False] * size}
    for token, index in vocab.items():
        if index in special or not token:
            continue
        if byte_level and index not in added and all(char in alphabet for char in token):
            data = bytes(alphabet[char] for char in token)
        else:
            data = token.encode("utf-8")
        pieces = [bytearray()]  # continuation bytes the token begins with, then each character that begins in it
        for byte in data:
            if not 0x80 <= byte <= 0xBF:
                pieces.append(bytearray())
            pieces[-1].append(byte)
        inside, pieces = bool(pieces[0]), pieces[1:]
        kinds = [_char_kind(bytes(piece)) for piece in pieces]
        flags["inside"][index] = inside
        flags["begins"][index] = bool(pieces)
        flags["starts"][index] = not inside and kinds[0] != "other"
        flags["ends"][index] = bool(pieces) and kinds[-1] != "other"
        flags["maskable"][index] = inside or not all(kind == "space" for kind in kinds)
    return WordTables(**{name: torch.tensor(values, dtype=torch.bool) for name, values in flags.items()})


class LMDataCollator:
    """Batch causal-LM rows into tensors: pads to the longest row, and optionally masks inputs for augmentation.

    Input masking replaces attended input tokens by `mask_token_id` while `labels` keep the original tokens, per token
    or per word. Per token (the default), each attended token is masked with probability `mask_prob`. Per word (when
    `words` is given, see `word_tables`), each word is chosen with probability `mask_prob` and all its tokens are
    masked together; a word is a whitespace-separated run of text or one CJK character, and a word cut by a block
    boundary counts as two. Word masking never masks special tokens (EOS between documents, padding, unk) or
    whitespace-only tokens. Both draw from torch's global RNG, which the Trainer seeds and saves in its checkpoints, so
    a resumed run masks exactly as the uninterrupted one would. Evaluation runs inside `no_augmentation()`.

    Args:
        pad_token_id: id used to pad `input_ids` (attention_mask 0, labels -100 there).
        mask_token_id: id that replaces masked inputs (the tokenizer's unk id); required when mask_prob > 0.
        mask_prob: masking probability in [0, 1).
        words: the tokenizer's `word_tables` to mask whole words; None masks single tokens.
    """

    def __init__(self, pad_token_id: int, mask_token_id: int | None = None, mask_prob: float = 0.0,
                 words: WordTables | None = None):
        if mask_prob > 0 and mask_token_id is None:
            raise ValueError("LMDataCollator: mask_prob > 0 needs a mask_token_id")
        if not 0.0 <= mask_prob < 1.0:
            raise ValueError(f"LMDataCollator: mask_prob must be in [0, 1), got {mask_prob}")
        if words is not None and not all(isinstance(t, torch.Tensor) and t.dtype == torch.bool and t.dim() == 1
                                         and len(t) == len(words.starts) for t in words):
            raise ValueError("LMDataCollator: words must be WordTables of 1-D bool tensors of one length")
        self.pad_token_id = pad_token_id
        self.mask_token_id = mask_token_id
        self.mask_prob = mask_prob
        self.words = words
        self.augment = True

    @contextlib.contextmanager
    def no_augmentation(self) -> Iterator[None]:
        """Turn masking off inside the block (evaluation), restoring the previous setting afterwards."""
        previous, self.augment = self.augment, False
        try:
            yield
        finally:
            self.augment = previous

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        for row, feature in enumerate(features):
            ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            n = len(ids)
            input_ids[row, :n] = ids
            mask = feature.get("attention_mask")
            attention_mask[row, :n] = torch.as_tensor(mask, dtype=torch.long) if mask is not None else 1
            row_labels = feature.get("labels")
            labels[row, :n] = torch.as_tensor(row_labels, dtype=torch.long) if row_labels is not None else ids
            if row_labels is None:
                labels[row, :n][attention_mask[row, :n] == 0] = -100
        if self.augment and self.mask_prob > 0:
            chosen = torch.rand(input_ids.shape) < self.mask_prob  # a row holds at most `width` words
            if self.words is None:
                masked = chosen & attention_mask.bool()
            else:
                masked = chosen.gather(1, self.words.word_ids(input_ids))
                masked &= self.words.maskable[input_ids] & attention_mask.bool()
            input_ids = input_ids.masked_fill(masked, self.mask_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ----------------------------------------------------------------------------------------------------------------------
# Prompt→completion pairs (data.format: prompt_completion)
# ----------------------------------------------------------------------------------------------------------------------
#
# Pairs come from the records of structured files (data.prompt_field / data.completion_field) or from the lines of
# text documents (data.pairs_from: lines). They go through the same cleaning (on both fields), dedup and seeded hash
# split as documents; the split is by group (data.group_field, the document for `lines`, else the prompt), so no group
# straddles it. Each example is `prompt ids + completion ids + EOS`, the two pieces tokenized apart so the boundary is
# where the data says (tokenizing the joined text could merge the prompt's last characters with the completion's
# first), with labels -100 on the prompt: the loss is on the completion and its EOS only. Padding is the collator's
# (labels -100 there too, by position, so an EOS is labelled even with a tokenizer whose pad id equals its EOS id).

_PAIR_FIELDS = (("prompt", "prompt_field"), ("completion", "completion_field"))


def _field_value(record: dict, path, where: str, field: str, key: str, allow_int: bool = False) -> str:
    if field not in record:
        raise UserError(f"{path}{where}: no field {field!r} (data.{key}); fields present: "
                        f"{', '.join(map(str, record)) or 'none'}")
    value = record[field]
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        got = "null" if value is None else f"a {type(value).__name__} ({str(value)[:40]!r})"
        raise UserError(f"{path}{where}: field {field!r} (data.{key}) holds {got}, expected a string")
    return value


def _read_pair_records(args: DataArgs) -> dict[str, list[str]]:
    """prompt, completion and group columns of every record of `args.files`, checked field by field."""
    columns: dict[str, list[str]] = {"prompt": [], "completion": [], "group": []}
    sources = resolve_files(args.files)
    for path in sources:
        for where, record in iter_records(path, args.encoding_errors):
            values = {}
            for column, key in _PAIR_FIELDS:
                field = getattr(args, key)
                values[column] = _field_value(record, path, where, field, key)
                if not values[column].strip():
                    raise UserError(f"{path}{where}: field {field!r} (data.{key}) is empty; every pair needs a "
                                    f"non-empty prompt and completion")
            group = values["prompt"]
            if args.group_field is not None:
                group = _field_value(record, path, where, args.group_field, "group_field", allow_int=True)
            columns["prompt"].append(values["prompt"])
            columns["completion"].append(values["completion"])
            columns["group"].append(group)
    if not columns["prompt"]:
        raise UserError(f"data.files: no records in {_describe_sources(sources)}: nothing to train on")
    return columns


def _clean_pairs(columns: dict[str, list[str]], args: DataArgs) -> tuple[dict[str, list[str]], np.ndarray]:
    """Both fields cleaned as documents are; a pair's drop code is its prompt's, else its completion's."""
    cleaning = {k: getattr(args, k) for k in ("strip_control", "nfkc", "normalize_whitespace", "min_chars", "max_chars")}
    prompts = _clean_batch({"text": columns["prompt"]}, **cleaning)
    completions = _clean_batch({"text": columns["completion"]}, **cleaning)
    drop = np.where(prompts["drop"] != _KEEP, prompts["drop"], completions["drop"])
    return {"prompt": prompts["text"], "completion": completions["text"], "group": columns["group"]}, drop


def _pairs_of_lines(text: str, skip: int) -> list[tuple[str, str]]:
    lines = [line.strip() for line in text.split("\n") if line.strip()][skip:]
    return list(zip(lines, lines[1:]))


def _most_frequent(completions: list[str]) -> dict:
    """The training completion seen most often (the first seen among ties): the "frequent" baseline's answer."""
    counts: dict[str, int] = {}
    for text in completions:
        counts[text] = counts.get(text, 0) + 1
    best = max(counts, key=counts.__getitem__) if counts else ""
    return {"text": best, "count": counts.get(best, 0)}


def _pairs_from_lines(args: DataArgs, seed: int) -> tuple[DatasetDict, dict]:
    splits, stats = prepare_splits(args, seed)
    pair_splits, duplicates = DatasetDict(), 0
    for name, documents in splits.items():
        columns: dict[str, list[str]] = {"prompt": [], "completion": [], "group": []}
        seen = set()
        for text in documents["text"]:
            group = hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()
            for prompt, completion in _pairs_of_lines(text, args.pairs_skip_lines):
                if args.dedup and (prompt, completion) in seen:
                    duplicates += 1
                    continue
                seen.add((prompt, completion))
                columns["prompt"].append(prompt)
                columns["completion"].append(completion)
                columns["group"].append(group)
        if not columns["prompt"]:
            raise UserError(f"data.files: the {name} split of {_describe_sources(args.files)} gives no pairs of lines "
                            f"({len(documents)} documents, data.pairs_skip_lines = {args.pairs_skip_lines}): a "
                            f"document needs two lines after the skipped ones")
        pair_splits[name] = Dataset.from_dict(columns)
        stats["splits"][name]["pairs"] = len(columns["prompt"])
    stats["pairs"] = {"from": "lines", "skip_lines": args.pairs_skip_lines, "duplicate": duplicates}
    stats["most_frequent_train_completion"] = _most_frequent(list(pair_splits["train"]["completion"]))
    return pair_splits, stats


def prepare_pair_splits(args: DataArgs, seed: int) -> tuple[DatasetDict, dict]:
    """Read, clean, deduplicate and split prompt→completion pairs (`data.format: prompt_completion`).

    Args:
        args: the data settings; `pairs_from: lines` makes the pairs from text documents (split by document).
        seed: the run seed; a pair's side is a function of (seed, its group) only.

    Returns:
        (splits, stats): "train", "test" (and "validation") with columns prompt, completion and group; and counts
        (records read, dropped by reason, pairs and groups per split, the most frequent training completion).

    Raises:
        UserError: a missing field, a value that is not a string, an empty prompt or completion (file and record
            named), or too few pairs or groups left for the splits.
    """
    if args.pairs_from == "lines":
        return _pairs_from_lines(args, seed)
    raw = _read_pair_records(args)
    columns, drop = _clean_pairs(raw, args)
    counts = np.bincount(drop, minlength=4)
    stats = {"records_read": len(drop),
             "dropped": {"empty": int(counts[_EMPTY]), "too_short": int(counts[_TOO_SHORT]),
                         "too_long": int(counts[_TOO_LONG]), "duplicate": 0}}
    kept = np.flatnonzero(drop == _KEEP)
    if args.dedup:
        joined = [f"{columns['prompt'][i]}\x00{columns['completion'][i]}" for i in range(len(drop))]
        hashes = document_hashes(joined)
        unique = _first_occurrences(kept, hashes[:, 0], hashes[:, 1])
        stats["dropped"]["duplicate"] = int(len(kept) - len(unique))
        kept = unique
    stats["pairs_kept"] = len(kept)
    split_names = ["train", "test"] + (["validation"] if args.validation_size > 0 else [])
    group_hashes = document_hashes([columns["group"][i] for i in kept])[:, 0]
    groups, group_of_pair = np.unique(group_hashes, return_inverse=True)
    if len(groups) < len(split_names):
        raise UserError(f"data.files: {len(kept)} pair(s) in {len(groups)} group(s) left after cleaning "
                        f"{_describe_sources(args.files)} ({stats['records_read']} read); {len(split_names)} groups "
                        f"are needed for the {'/'.join(split_names)} splits")
    codes = _assign_splits(split_keys(groups, seed), args.test_size, args.validation_size)[group_of_pair]
    splits, stats["splits"] = DatasetDict(), {}
    for name in split_names:
        chosen = kept[codes == _SPLIT_CODES[name]]
        splits[name] = Dataset.from_dict({column: [values[i] for i in chosen] for column, values in columns.items()})
        stats["splits"][name] = {"pairs": len(chosen), "groups": len(set(splits[name]["group"]))}
    stats["split_method"] = ("hash of (seed, " + (f"field {args.group_field!r}" if args.group_field else "prompt")
                             + "): a group never straddles the split")
    stats["most_frequent_train_completion"] = _most_frequent(list(splits["train"]["completion"]))
    logger.info("data: %d pairs read, %d kept; %s", stats["records_read"], stats["pairs_kept"],
                ", ".join(f"{k}={v['pairs']}" for k, v in stats["splits"].items()))
    return splits, stats


def load_eval_pairs(path: str, args: DataArgs, heldout: bool = False) -> Dataset:
    """Pairs of `path` for `lmkit eval`, read and cleaned as training read them (deduplicated, not split).

    Args:
        args: the run's data settings (fields, pairs_from, cleaning). Its `files` are replaced by `path`.
        heldout: `path` is a run's saved held-out file (fields prompt/completion/group, already cleaned).
    """
    args = dataclasses.replace(args, files=[path], test_size=0.1, validation_size=0.0)
    if heldout:
        args = dataclasses.replace(args, prompt_field="prompt", completion_field="completion", group_field="group",
                                   pairs_from=None)
    if args.pairs_from == "lines":
        pairs = {"prompt": [], "completion": [], "group": []}
        for text in load_eval_documents(path, args)["text"]:
            for prompt, completion in _pairs_of_lines(text, args.pairs_skip_lines):
                pairs["prompt"].append(prompt)
                pairs["completion"].append(completion)
                pairs["group"].append("")
    else:
        columns, drop = _clean_pairs(_read_pair_records(args), args)
        unique, seen = [], set()
        for i in np.flatnonzero(drop == _KEEP):
            key = (columns["prompt"][i], columns["completion"][i])
            if key not in seen:
                seen.add(key)
                unique.append(i)
        pairs = {column: [values[i] for i in unique] for column, values in columns.items()}
    if not pairs["prompt"]:
        raise UserError(f"{path}: no prompt/completion pairs left after cleaning")
    return Dataset.from_dict(pairs)


def looks_like_pairs(path: str, args: DataArgs) -> bool:
    """Whether the first record of a structured file holds both the prompt and the completion field."""
    try:
        first_source = resolve_files([path])[0]
        _, record = next(iter_records(first_source, args.encoding_errors))
    except (UserError, StopIteration):
        return False
    return args.prompt_field in record and args.completion_field in record


def _special_ids(tokenizer) -> None:
    for role in ("eos", "pad", "unk"):
        if getattr(tokenizer, f"{role}_token_id") is None:
            raise UserError(f"tokenizer {tokenizer.name_or_path or '(in memory)'} has no {role} token; lmkit tokenizers "
                            f"define <|endoftext|>, <|pad|> and <|unk|>")


def pair_example(prompt_ids: list[int], completion_ids: list[int], eos_id: int, block_size: int):
    """(input_ids, labels, prompt tokens cut) of one pair, or None when the completion alone does not fit.

    The prompt is cut from the left to fit `block_size` and keeps at least one token: the first completion token is
    predicted from the position before it.
    """
    room = block_size - len(completion_ids) - 1
    if room < 1:
        return None
    cut = max(0, len(prompt_ids) - room)
    prompt_ids = prompt_ids[cut:]
    return prompt_ids + completion_ids + [eos_id], [-100] * len(prompt_ids) + completion_ids + [eos_id], cut


def build_pair_datasets(splits: DatasetDict, tokenizer, args: DataArgs, vocab_size: int) -> tuple[DatasetDict, dict]:
    """Tokenize prompt and completion apart and join them into examples with labels on the completion and EOS only.

    Returns:
        (datasets, stats): per split columns input_ids, attention_mask and labels (unpadded: `LMDataCollator` pads),
        and counts: pairs, examples, tokens, completion tokens, prompts cut from the left (and tokens cut), pairs
        dropped because the completion alone does not fit `data.block_size`.

    Raises:
        UserError: a missing special token, ids beyond the model's vocabulary, or every pair of a split dropped.
    """
    _special_ids(tokenizer)
    backend = _backend(tokenizer.backend_tokenizer.to_str())
    eos_id = tokenizer.eos_token_id
    datasets, stats = DatasetDict(), {"tokenizer_sha256": tokenizer_fingerprint(tokenizer),
                                      "block_size": args.block_size, "packing": False, "splits": {}}
    for name, pairs in splits.items():
        prompts = [e.ids for e in backend.encode_batch_fast(list(pairs["prompt"]), add_special_tokens=False)]
        completions = [e.ids for e in backend.encode_batch_fast(list(pairs["completion"]), add_special_tokens=False)]
        rows: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        truncated = tokens_cut = dropped = 0
        for prompt_ids, completion_ids in zip(prompts, completions):
            example = pair_example(prompt_ids, completion_ids, eos_id, args.block_size)
            if example is None:
                dropped += 1
                continue
            input_ids, labels, cut = example
            truncated += cut > 0
            tokens_cut += cut
            rows["input_ids"].append(input_ids)
            rows["attention_mask"].append([1] * len(input_ids))
            rows["labels"].append(labels)
        if not rows["input_ids"]:
            raise UserError(f"data.block_size ({args.block_size}): every one of the {len(pairs)} {name} pairs has a "
                            f"completion too long to fit with its EOS and one prompt token; raise data.block_size")
        max_id = max(max(max(ids) for ids in rows["input_ids"]), tokenizer.pad_token_id)
        if max_id >= vocab_size:
            raise UserError(f"tokenizer {tokenizer.name_or_path or '(in memory)'} ({len(tokenizer)} tokens) produces "
                            f"id {max_id} but the model config has vocab_size={vocab_size}: use the tokenizer the "
                            f"model was built with")
        datasets[name] = Dataset.from_dict(rows, features=_LM_FEATURES)
        stats["splits"][name] = {
            "pairs": len(pairs), "examples": len(rows["input_ids"]),
            "tokens": sum(len(ids) for ids in rows["input_ids"]),
            "completion_tokens": sum(sum(label != -100 for label in labels) for labels in rows["labels"]),
            "prompt_truncated": truncated, "prompt_tokens_cut": tokens_cut, "dropped_completion_too_long": dropped,
        }
    stats["dropped_completion_too_long"] = sum(s["dropped_completion_too_long"] for s in stats["splits"].values())
    stats["prompt_truncated"] = sum(s["prompt_truncated"] for s in stats["splits"].values())
    return datasets, stats


__all__ = [
    "DataArgs", "LMDataCollator", "WordTables", "build_lm_datasets", "build_pair_datasets", "load_eval_documents",
    "load_eval_pairs", "load_heldout", "looks_like_pairs", "pair_example", "prepare_pair_splits", "prepare_splits",
    "save_heldout", "tokenizer_fingerprint", "word_tables",
]
