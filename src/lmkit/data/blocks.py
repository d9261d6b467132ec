"""Blocks: documents tokenized and packed (or padded) into causal-LM examples, without dropping a token.

1. **tokenize** (batched map, `num_proc`): one row per document, its token ids followed by EOS. Cached separately from
   packing, so changing `block_size` or `packing` does not re-tokenize.
2. **pack** (default) or **pad**: packing cuts the global token stream (documents joined by EOS) into `block_size`
   blocks. Each map batch owns the blocks that *start* inside its documents and reads ahead in the memory-mapped token
   table to finish its last block, so only the very last block of a split is partial (padded, mask 0, labels -100) and
   no token is dropped; a per-batch partial block would waste padding in every batch and make the block count depend
   on the batch size. Padding mode keeps each document (with EOS) as pieces of at most `block_size` tokens, padded per
   batch by `LMDataCollator`.

`build_lm_datasets` returns its statistics as a dict; the caller writes `data_stats.json`.
"""

import hashlib
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Features, List, Value
from datasets.fingerprint import Hasher
from tokenizers import Tokenizer

from lmkit.data.args import DataArgs
from lmkit.data.documents import CACHE_VERSION, describe_sources, map_processes, was_cached
from lmkit.errors import UserError

# Documents per packing map batch; each batch emits the blocks that start inside it. Module-level so tests can
# shrink it.
_PACK_BATCH_DOCS = 4096
# Batch budgets for long documents (see `_batch_rows`); ordinary documents keep the row counts above.
_PACK_BATCH_TOKENS = 4_000_000
_TOKENIZE_BATCH_CHARS = 2_000_000


# ---------------------------------------------------------------------------------------------------------------------
# Tokenization, packing and padding
# ---------------------------------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition and the special-token ids the data stage uses."""
    definition = tokenizer.backend_tokenizer.to_str()
    ids = (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    return hashlib.sha256(f"{definition}\n{ids}".encode()).hexdigest()


_BACKENDS: dict[str, Any] = {}


def plain_backend(definition: str):
    """A private, truncation- and padding-free copy of the tokenizer, built once per process."""
    key = hashlib.sha256(definition.encode()).hexdigest()
    if key not in _BACKENDS:
        backend = Tokenizer.from_str(definition)
        # A truncating tokenizer would silently drop tokens; padding would add fake ones.
        backend.no_truncation()
        backend.no_padding()
        _BACKENDS[key] = backend
    return _BACKENDS[key]


def check_special_tokens(tokenizer) -> None:
    """A UserError unless the tokenizer has the eos, pad and unk tokens the data stage relies on."""
    for role in ("eos", "pad", "unk"):
        if getattr(tokenizer, f"{role}_token_id") is None:
            raise UserError(f"tokenizer {tokenizer.name_or_path or '(in memory)'} has no {role} token; "
                            f"lmkit tokenizers define <|endoftext|>, <|pad|> and <|unk|>")


def check_vocabulary(tokenizer, max_id: int, vocab_size: int) -> None:
    """A UserError when the largest id the data holds (or a special token's) does not fit the model's vocabulary."""
    max_id = max(max_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    if max_id >= vocab_size:
        raise UserError(f"tokenizer {tokenizer.name_or_path or '(in memory)'} ({len(tokenizer)} tokens) produces "
                        f"id {max_id} but the model config has vocab_size={vocab_size}: use the tokenizer the "
                        f"model was built with, or a model config whose vocab_size covers it")


_DOC_FEATURES = Features({"input_ids": List(Value("int32"))})
LM_FEATURES = Features({"input_ids": List(Value("int32")), "attention_mask": List(Value("int8")),
                         "labels": List(Value("int32"))})


def _tokenize_batch(texts: list[str], *, definition: str, eos_id: int) -> pa.Table:
    """One row per document: its ids (no special tokens added by the tokenizer) followed by one EOS."""
    encodings = plain_backend(definition).encode_batch_fast(texts, add_special_tokens=False)
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
    return {"batched": True, "num_proc": map_processes(args, n_rows)}


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
    check_special_tokens(tokenizer)
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
            new_fingerprint=Hasher.hash(["tokenize", CACHE_VERSION, texts._fingerprint, tok_hash]),
            desc=f"Tokenizing {name}", batch_size=_batch_rows(texts.data.column("text"), _TOKENIZE_BATCH_CHARS, 1000),
            **_map_kwargs(args, len(texts)),
        )
        flat_ids = pc.list_flatten(documents.data.column("input_ids"))
        check_vocabulary(tokenizer, pc.max(flat_ids).as_py(), vocab_size)
        doc_lengths = pc.list_value_length(documents.data.column("input_ids")).to_numpy().astype(np.int64)
        step_fingerprint = Hasher.hash([args.packing and "pack" or "pieces", CACHE_VERSION, documents._fingerprint,
                                        args.block_size, tokenizer.pad_token_id])
        if args.packing:
            doc_offsets = np.concatenate([[0], np.cumsum(doc_lengths)])
            blocks = documents.with_format("arrow").map(
                _pack_batch, with_indices=True, input_columns=["input_ids"], remove_columns=["input_ids"],
                features=LM_FEATURES, batch_size=max(1, min(_PACK_BATCH_DOCS, _PACK_BATCH_TOKENS // max(
                    1, int(doc_lengths.max(initial=1))))),
                fn_kwargs={"documents": documents, "doc_offsets": doc_offsets, "block_size": args.block_size,
                           "pad_id": tokenizer.pad_token_id},
                new_fingerprint=step_fingerprint, desc=f"Packing {name}", **_map_kwargs(args, len(documents)),
            ).with_format(None)
        else:
            blocks = documents.with_format("arrow").map(
                _piece_batch, input_columns=["input_ids"], remove_columns=["input_ids"], features=LM_FEATURES,
                fn_kwargs={"block_size": args.block_size}, new_fingerprint=step_fingerprint,
                desc=f"Cutting {name}", **_map_kwargs(args, len(documents)),
            ).with_format(None)
        cached = cached and was_cached(documents, started) and was_cached(blocks, started)
        lm_splits[name] = blocks
        stats["splits"][name] = _block_stats(documents, doc_lengths, blocks, args.block_size)
    stats["tokens_dropped"] = sum(s["tokens_dropped"] for s in stats["splits"].values())
    stats["cache_hit"] = cached
    if stats["tokens_dropped"]:
        raise AssertionError(f"the data stage dropped {stats['tokens_dropped']} tokens: {stats['splits']}")
    train = stats["splits"].get("train")
    if args.packing and train is not None and train["tokens"] < args.block_size:
        raise UserError(f"data.files: the train split of {describe_sources(args.files)} holds "
                        f"{train['tokens']} tokens ({train['documents']} documents), "
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


