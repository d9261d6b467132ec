"""Prompt→completion pairs (`data.format: prompt_completion`): read, cleaned, deduplicated, split and tokenized.

Pairs come from the records of structured files (data.prompt_field / data.completion_field) or from the lines of
text documents (data.pairs_from: lines). They go through the same cleaning (on both fields), dedup and seeded hash
split as documents; the split is by group (data.group_field, the document for `lines`, else the prompt), so no group
straddles it. Each example is `prompt ids + completion ids + EOS`, the two pieces tokenized apart so the boundary is
where the data says (tokenizing the joined text could merge the prompt's last characters with the completion's
first), with labels -100 on the prompt: the loss is on the completion and its EOS only. Padding is the collator's
(labels -100 there too, by position, so an EOS is labelled even with a tokenizer whose pad id equals its EOS id).
"""

import dataclasses
import hashlib
import logging

import numpy as np
from datasets import Dataset, DatasetDict

from lmkit.data.args import DataArgs
from lmkit.data.blocks import LM_FEATURES, check_special_tokens, check_vocabulary, plain_backend, tokenizer_fingerprint
from lmkit.data.corpus import document_hashes, iter_records, record_field, resolve_files, split_keys
from lmkit.data.documents import (
    KEEP,
    SPLIT_CODES,
    assign_splits,
    clean_batch,
    cleaning_options,
    describe_sources,
    drop_counts,
    drop_duplicates,
    first_occurrences,
    load_eval_documents,
    prepare_splits,
    split_names,
)
from lmkit.errors import UserError

logger = logging.getLogger(__name__)

_PAIR_FIELDS = (("prompt", "prompt_field"), ("completion", "completion_field"))


def _read_pair_records(args: DataArgs) -> dict[str, list[str]]:
    """prompt, completion and group columns of every record of `args.files`, checked field by field."""
    columns: dict[str, list[str]] = {"prompt": [], "completion": [], "group": []}
    sources = resolve_files(args.files)
    for path in sources:
        for where, record in iter_records(path, args.encoding_errors):
            values = {}
            for column, key in _PAIR_FIELDS:
                field = getattr(args, key)
                values[column] = record_field(record, path, where, field, key)
                if not values[column].strip():
                    raise UserError(f"{path}{where}: field {field!r} (data.{key}) is empty; every pair needs a "
                                    f"non-empty prompt and completion")
            group = values["prompt"]
            if args.group_field is not None:
                group = record_field(record, path, where, args.group_field, "group_field", allow_int=True)
            columns["prompt"].append(values["prompt"])
            columns["completion"].append(values["completion"])
            columns["group"].append(group)
    if not columns["prompt"]:
        raise UserError(f"data.files: no records in {describe_sources(sources)}: nothing to train on")
    return columns


def _clean_pairs(columns: dict[str, list[str]], args: DataArgs) -> tuple[dict[str, list[str]], np.ndarray]:
    """Both fields cleaned as documents are; a pair's drop code is its prompt's, else its completion's."""
    cleaning = cleaning_options(args)
    prompts = clean_batch({"text": columns["prompt"]}, **cleaning)
    completions = clean_batch({"text": columns["completion"]}, **cleaning)
    drop = np.where(prompts["drop"] != KEEP, prompts["drop"], completions["drop"])
    return {"prompt": prompts["text"], "completion": completions["text"], "group": columns["group"]}, drop


def _pair_hashes(columns: dict[str, list[str]]) -> np.ndarray:
    """The content hash of each (prompt, completion) pair: two uint64 columns, as `document_hashes` gives."""
    return document_hashes([f"{p}\x00{c}" for p, c in zip(columns["prompt"], columns["completion"])])


def _unique_pairs(columns: dict[str, list[str]], candidates: np.ndarray) -> np.ndarray:
    """Of the pair indices `candidates`, those whose (prompt, completion) is seen for the first time, in order."""
    hashes = _pair_hashes(columns)
    return first_occurrences(candidates, hashes[:, 0], hashes[:, 1])


def _select(columns: dict[str, list[str]], indices) -> dict[str, list[str]]:
    return {column: [values[i] for i in indices] for column, values in columns.items()}


def _pairs_of_lines(text: str, skip: int) -> list[tuple[str, str]]:
    lines = [line.strip() for line in text.split("\n") if line.strip()][skip:]
    return list(zip(lines, lines[1:]))


def most_frequent(completions: list[str]) -> dict:
    """The training completion (or assistant reply) seen most often, the first seen among ties: the "frequent"
    baseline's answer."""
    counts: dict[str, int] = {}
    for text in completions:
        counts[text] = counts.get(text, 0) + 1
    best = max(counts, key=counts.__getitem__) if counts else ""
    return {"text": best, "count": counts.get(best, 0)}


def _line_pairs(texts, skip: int) -> dict[str, list[str]]:
    """Each line paired with the next line of its document; a pair's group is its document (a hash of its text)."""
    columns: dict[str, list[str]] = {"prompt": [], "completion": [], "group": []}
    for text in texts:
        group = hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()
        for prompt, completion in _pairs_of_lines(text, skip):
            columns["prompt"].append(prompt)
            columns["completion"].append(completion)
            columns["group"].append(group)
    return columns


def _pairs_from_lines(args: DataArgs, seed: int) -> tuple[DatasetDict, dict]:
    splits, stats = prepare_splits(args, seed)
    pair_splits, duplicates = DatasetDict(), 0
    for name, documents in splits.items():
        columns = _line_pairs(documents["text"], args.pairs_skip_lines)
        if args.dedup:
            unique = _unique_pairs(columns, np.arange(len(columns["prompt"])))
            duplicates += len(columns["prompt"]) - len(unique)
            columns = _select(columns, unique)
        if not columns["prompt"]:
            raise UserError(f"data.files: the {name} split of {describe_sources(args.files)} gives no pairs of lines "
                            f"({len(documents)} documents, data.pairs_skip_lines = {args.pairs_skip_lines}): a "
                            f"document needs two lines after the skipped ones")
        pair_splits[name] = Dataset.from_dict(columns)
        stats["splits"][name]["pairs"] = len(columns["prompt"])
    stats["pairs"] = {"from": "lines", "skip_lines": args.pairs_skip_lines, "duplicate": duplicates}
    stats["most_frequent_train_completion"] = most_frequent(list(pair_splits["train"]["completion"]))
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
    stats = {"records_read": len(drop), "dropped": drop_counts(drop)}
    kept = np.flatnonzero(drop == KEEP)
    if args.dedup:
        hashes = _pair_hashes(columns)
        kept = drop_duplicates(kept, hashes[:, 0], hashes[:, 1], stats)
    splits = split_by_group(columns, kept, args, seed, stats, "pairs", "prompt")
    stats["most_frequent_train_completion"] = most_frequent(list(splits["train"]["completion"]))
    return splits, stats


def split_by_group(columns: dict[str, list], kept: np.ndarray, args: DataArgs, seed: int, stats: dict, unit: str,
                   default_group: str) -> DatasetDict:
    """The records `kept` of `columns` split by a seeded hash of their "group" column, counted into `stats`.

    Args:
        unit: what a record is ("pairs", "conversations"), for the counts and messages.
        default_group: what the group is when `data.group_field` is unset, for `split_method`.

    Raises:
        UserError: fewer groups than splits.
    """
    stats[f"{unit}_kept"] = len(kept)
    names = split_names(args)
    group_hashes = document_hashes([columns["group"][i] for i in kept])[:, 0]
    groups, group_of_record = np.unique(group_hashes, return_inverse=True)
    if len(groups) < len(names):
        raise UserError(f"data.files: {len(kept)} {unit} in {len(groups)} group(s) left after cleaning "
                        f"{describe_sources(args.files)} ({stats['records_read']} read); {len(names)} groups "
                        f"are needed for the {'/'.join(names)} splits")
    codes = assign_splits(split_keys(groups, seed), args.test_size, args.validation_size)[group_of_record]
    splits, stats["splits"] = DatasetDict(), {}
    for name in names:
        chosen = kept[codes == SPLIT_CODES[name]]
        splits[name] = Dataset.from_dict(_select(columns, chosen))
        stats["splits"][name] = {unit: len(chosen), "groups": len(set(splits[name]["group"]))}
    stats["split_method"] = ("hash of (seed, " + (f"field {args.group_field!r}" if args.group_field else default_group)
                             + "): a group never straddles the split")
    logger.info("data: %d %s read, %d kept; %s", stats["records_read"], unit, len(kept),
                ", ".join(f"{k}={v[unit]}" for k, v in stats["splits"].items()))
    return splits


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
        columns = _line_pairs(load_eval_documents(path, args)["text"], args.pairs_skip_lines)
        kept = np.arange(len(columns["prompt"]))
    else:
        columns, drop = _clean_pairs(_read_pair_records(args), args)
        kept = np.flatnonzero(drop == KEEP)
    pairs = _select(columns, _unique_pairs(columns, kept))
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
    check_special_tokens(tokenizer)
    backend = plain_backend(tokenizer.backend_tokenizer.to_str())
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
        check_vocabulary(tokenizer, max(max(ids) for ids in rows["input_ids"]), vocab_size)
        datasets[name] = Dataset.from_dict(rows, features=LM_FEATURES)
        stats["splits"][name] = {
            "pairs": len(pairs), "examples": len(rows["input_ids"]),
            "tokens": sum(len(ids) for ids in rows["input_ids"]),
            "completion_tokens": sum(sum(label != -100 for label in labels) for labels in rows["labels"]),
            "prompt_truncated": truncated, "prompt_tokens_cut": tokens_cut, "dropped_completion_too_long": dropped,
        }
    stats["dropped_completion_too_long"] = sum(s["dropped_completion_too_long"] for s in stats["splits"].values())
    stats["prompt_truncated"] = sum(s["prompt_truncated"] for s in stats["splits"].values())
    return datasets, stats
