"""Conversations (`data.format: messages`): read, cleaned, deduplicated, split and tokenized through the chat template.

A record holds a list of messages (data.messages_field) of {"role": "system"|"user"|"assistant", "content": text},
from jsonl/json/parquet files or a saved dataset. Each content is cleaned as a document is (a conversation with a
message cleaning drops is dropped, counted by the reason), exact duplicate conversations are removed, and the seeded
split is by group (data.group_field, else the conversation itself): the stages of `lmkit.data.pairs`, reused.

An example is the conversation rendered by the tokenizer's chat template (`lmkit.chat`), tokenized piece by piece:
template text, each assistant reply, its end-of-turn token. Only the replies and their end-of-turn tokens are labelled,
in every assistant turn; the pieces' ids joined equal the whole rendered text tokenized at once (what
`apply_chat_template` gives), which is checked, so the label boundary is exactly where the data says. A conversation
longer than `data.block_size` loses whole turns from its start (the system message kept) until it fits; one whose
last user→assistant exchange alone does not fit is dropped. Conversations are padded, never packed together.
"""

import dataclasses
import hashlib
import logging

import numpy as np
from datasets import Dataset, DatasetDict

from lmkit import chat
from lmkit.data.args import DataArgs
from lmkit.data.blocks import LM_FEATURES, check_special_tokens, check_vocabulary, plain_backend, tokenizer_fingerprint
from lmkit.data.corpus import document_hashes, iter_records, record_field, resolve_files
from lmkit.data.documents import (
    KEEP,
    TOO_LONG,
    clean_batch,
    cleaning_options,
    describe_sources,
    drop_counts,
    drop_duplicates,
    first_occurrences,
)
from lmkit.data.pairs import most_frequent, split_by_group
from lmkit.errors import UserError

logger = logging.getLogger(__name__)

_TEXT_FILE = "has no messages field; give jsonl, json or parquet records, or a saved dataset"


def _messages(record: dict, path, where: str, field: str) -> list[dict]:
    """The checked messages of one record: a list of {role, content} with known roles, string contents that are
    not blank, and at least one assistant turn."""
    if field not in record:
        raise UserError(f"{path}{where}: no field {field!r} (data.messages_field); fields present: "
                        f"{', '.join(map(str, record)) or 'none'}")
    value = record[field]
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else f"a {type(value).__name__} ({str(value)[:40]!r})"
        raise UserError(f"{path}{where}: field {field!r} (data.messages_field) holds {got}, expected a list of "
                        f"messages {{role, content}}")
    messages = []
    for n, message in enumerate(value, start=1):
        at = f"{path}{where}: message {n} of {field!r}"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError(f"{at} is {str(message)[:60]!r}, expected an object with role and content")
        role, content = message["role"], message["content"]
        if role not in chat.ROLES:
            raise UserError(f"{at} has role {str(role)[:40]!r}, expected one of {', '.join(chat.ROLES)}")
        if not isinstance(content, str):
            got = "null" if content is None else f"a {type(content).__name__} ({str(content)[:40]!r})"
            raise UserError(f"{at} ({role}) has content {got}, expected a string")
        if not content.strip():
            raise UserError(f"{at} ({role}) has empty content; every message needs text")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{path}{where}: the conversation in {field!r} has no assistant turn: nothing to learn from")
    return messages


def _read_conversations(args: DataArgs) -> dict[str, list]:
    """messages and group columns of every record of `args.files`, checked record by record."""
    columns: dict[str, list] = {"messages": [], "group": []}
    sources = resolve_files(args.files)
    for path in sources:
        for where, record in iter_records(path, args.encoding_errors, _TEXT_FILE):
            messages = _messages(record, path, where, args.messages_field)
            group = None
            if args.group_field is not None:
                group = record_field(record, path, where, args.group_field, "group_field", allow_int=True)
            columns["messages"].append(messages)
            columns["group"].append(group)
    if not columns["messages"]:
        raise UserError(f"data.files: no records in {describe_sources(sources)}: nothing to train on")
    return columns


def _key(messages: list[dict]) -> str:
    """A conversation as one string: what its content hash, and its group without data.group_field, are of."""
    return "\x00".join(f"{m['role']}\x01{m['content']}" for m in messages)


def _clean_conversations(columns: dict[str, list], args: DataArgs) -> tuple[dict[str, list], np.ndarray]:
    """Every content cleaned as a document is; a conversation's drop code is that of its first dropped message.

    A message longer than `corpus.MAX_DOCUMENT_CHARS` counts as too long: a document that long would be cut in pieces,
    and a reply cannot be.
    """
    contents = [m["content"] for messages in columns["messages"] for m in messages]
    cleaned = clean_batch({"text": contents}, **cleaning_options(args))
    whole = cleaned["piece"] <= 0  # the first piece of a cut message stands for it
    texts = [text for text, keep in zip(cleaned["text"], whole) if keep]
    codes = np.where(cleaned["piece"][whole] == 0, TOO_LONG, cleaned["drop"][whole])
    messages, drop, at = [], np.full(len(columns["messages"]), KEEP, dtype=np.int8), 0
    for n, conversation in enumerate(columns["messages"]):
        own = codes[at:at + len(conversation)]
        messages.append([{"role": m["role"], "content": text}
                         for m, text in zip(conversation, texts[at:at + len(conversation)])])
        dropped = own[own != KEEP]
        drop[n] = dropped[0] if len(dropped) else KEEP
        at += len(conversation)
    groups = [group if group is not None else _key(m) for group, m in zip(columns["group"], messages)]
    return {"messages": messages, "group": groups}, drop


def _hashes(columns: dict[str, list]) -> np.ndarray:
    return document_hashes([_key(messages) for messages in columns["messages"]])


def _replies(messages_column) -> list[str]:
    return [m["content"] for messages in messages_column for m in messages if m["role"] == "assistant"]


def prepare_conversation_splits(args: DataArgs, seed: int) -> tuple[DatasetDict, dict]:
    """Read, clean, deduplicate and split conversations (`data.format: messages`).

    Returns:
        (splits, stats): "train", "test" (and "validation") with columns messages and group; and counts (records
        read, dropped by reason, conversations and groups per split, the most frequent training assistant reply, under
        the key pairs use, `most_frequent_train_completion`).

    Raises:
        UserError: a record that is not a conversation (see `_messages`; file, record and message named), or too few
            conversations or groups left for the splits.
    """
    columns, drop = _clean_conversations(_read_conversations(args), args)
    stats = {"records_read": len(drop), "dropped": drop_counts(drop)}
    kept = np.flatnonzero(drop == KEEP)
    if args.dedup:
        hashes = _hashes(columns)
        kept = drop_duplicates(kept, hashes[:, 0], hashes[:, 1], stats)
    splits = split_by_group(columns, kept, args, seed, stats, "conversations", "conversation")
    stats["most_frequent_train_completion"] = most_frequent(_replies(splits["train"]["messages"]))
    return splits, stats


def load_eval_conversations(path: str, args: DataArgs, heldout: bool = False) -> Dataset:
    """Conversations of `path` for `lmkit eval`, read and cleaned as training read them (deduplicated, not split).

    Args:
        args: the run's data settings. Its `files` are replaced by `path`.
        heldout: `path` is a run's saved held-out file (fields messages and group, already cleaned).
    """
    args = dataclasses.replace(args, files=[path], format="messages")
    if heldout:
        args = dataclasses.replace(args, messages_field="messages", group_field="group")
    columns, drop = _clean_conversations(_read_conversations(args), args)
    hashes = _hashes(columns)
    kept = first_occurrences(np.flatnonzero(drop == KEEP), hashes[:, 0], hashes[:, 1])
    if not len(kept):
        raise UserError(f"{path}: no conversations left after cleaning")
    return Dataset.from_dict({name: [values[i] for i in kept] for name, values in columns.items()})


def looks_like_conversations(path: str, args: DataArgs) -> bool:
    """Whether the first record of a structured file holds a list in the messages field."""
    try:
        _, record = next(iter_records(resolve_files([path])[0], args.encoding_errors))
    except (UserError, StopIteration):
        return False
    return isinstance(record.get(args.messages_field), list)


def cut_points(messages: list[dict]) -> list[int]:
    """Where a conversation may start when earlier turns must go: its first turn after the system message, then each
    later user turn; only those that leave an assistant turn."""
    head = 1 if messages[0]["role"] == "system" else 0
    starts = [head] + [i for i in range(head + 1, len(messages)) if messages[i]["role"] == "user"]
    last_reply = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return [start for start in starts if start <= last_reply]


def without_turns_before(messages: list[dict], start: int) -> list[dict]:
    """`messages` from `start` on, the system message (if any) kept."""
    head = 1 if messages[0]["role"] == "system" else 0
    return messages[:head] + messages[start:]


def conversation_example(tokenizer, encode, messages: list[dict], block_size: int):
    """(input_ids, labels, messages cut) of one conversation, or None when its last exchange alone does not fit.

    Args:
        encode: a function from a list of texts to their lists of ids (no special tokens added).

    Returns:
        None, or the ids and labels (-100 off the assistant replies and their end-of-turn tokens) of the conversation
        without as many leading turns as `block_size` requires, and how many messages went. The ids equal the
        rendered text tokenized at once; where the tokenizer would join a reply with the text around it they would
        not, and the example is returned with labels None.
    """
    for start in cut_points(messages):
        kept = without_turns_before(messages, start)
        pieces = chat.turn_pieces(tokenizer, kept)
        piece_ids = encode([text for text, _ in pieces])
        if sum(map(len, piece_ids)) > block_size:
            continue
        input_ids = [i for ids in piece_ids for i in ids]
        labels = [i if labelled else -100 for (_, labelled), ids in zip(pieces, piece_ids) for i in ids]
        if encode(["".join(text for text, _ in pieces)])[0] != input_ids:
            return input_ids, None, len(messages) - len(kept)
        return input_ids, labels, len(messages) - len(kept)
    return None


def build_conversation_datasets(splits: DatasetDict, tokenizer, args: DataArgs,
                                vocab_size: int) -> tuple[DatasetDict, dict]:
    """Render, tokenize and label each conversation; see the module docstring.

    Returns:
        (datasets, stats): per split columns input_ids, attention_mask and labels (unpadded: `LMDataCollator` pads),
        and counts: conversations, examples, tokens, assistant (labelled) tokens, conversations that lost leading
        turns and the messages they lost, conversations dropped because the last exchange does not fit, and those
        dropped because the tokenizer joins a reply with its surroundings.

    Raises:
        UserError: a tokenizer without a chat template or a special token lmkit needs, ids beyond the model's
            vocabulary, or every conversation of a split dropped.
    """
    check_special_tokens(tokenizer)
    if not chat.has_template(tokenizer):
        raise UserError(f"tokenizer {tokenizer.name_or_path or '(in memory)'} has no chat template; data.format "
                        f"messages needs one: set tokenizer.chat_template (chatml or a .jinja file)")
    backend = plain_backend(tokenizer.backend_tokenizer.to_str())

    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]

    template_sha256 = hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()
    datasets, stats = DatasetDict(), {"tokenizer_sha256": tokenizer_fingerprint(tokenizer),
                                      "chat_template_sha256": template_sha256, "block_size": args.block_size,
                                      "packing": False, "splits": {}}
    for name, conversations in splits.items():
        rows: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        counts = {"conversations": len(conversations), "truncated": 0, "messages_cut": 0, "dropped_too_long": 0,
                  "dropped_token_boundary": 0}
        for messages in conversations["messages"]:
            example = conversation_example(tokenizer, encode, messages, args.block_size)
            if example is None or example[1] is None:
                counts["dropped_too_long" if example is None else "dropped_token_boundary"] += 1
                continue
            input_ids, labels, cut = example
            counts["truncated"] += cut > 0
            counts["messages_cut"] += cut
            rows["input_ids"].append(input_ids)
            rows["attention_mask"].append([1] * len(input_ids))
            rows["labels"].append(labels)
        if not rows["input_ids"]:
            raise UserError(f"data.block_size ({args.block_size}): none of the {len(conversations)} {name} "
                            f"conversations fits, not even its last user and assistant turns; raise data.block_size")
        if counts["dropped_token_boundary"]:
            logger.warning("data: %d %s conversations dropped: the tokenizer joins a reply with the template text "
                           "around it, so its labels would not be where the reply is",
                           counts["dropped_token_boundary"], name)
        check_vocabulary(tokenizer, max(max(ids) for ids in rows["input_ids"]), vocab_size)
        datasets[name] = Dataset.from_dict(rows, features=LM_FEATURES)
        stats["splits"][name] = {
            **counts, "examples": len(rows["input_ids"]), "tokens": sum(len(ids) for ids in rows["input_ids"]),
            "assistant_tokens": sum(sum(label != -100 for label in labels) for labels in rows["labels"]),
        }
    for key in ("truncated", "dropped_too_long", "dropped_token_boundary"):
        stats[key] = sum(s[key] for s in stats["splits"].values())
    return datasets, stats


def conversation_text(messages: list[dict]) -> str:
    """A conversation for people to read (the samples table): one `role: content` line per message."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
