"""The data stage: a folder of text in, tokenized train/test(/validation) examples out, every document accounted for.

    corpus.py     reading files, folders and globs in every supported format; content hashes and split keys
    args.py       the recipe's `data:` section (`DataArgs`)
    documents.py  read → clean → dedup → split, and the held-out files a run keeps
    blocks.py     tokenize, then pack (or pad) into `block_size` examples
    collator.py   batching, padding, token and word masking
    pairs.py      prompt→completion pairs: the same stages, with the loss on the completion only
    conversations.py  conversations through the chat template: the stages of pairs, the loss on assistant replies
"""

from lmkit.data.args import DataArgs
from lmkit.data.blocks import build_lm_datasets, tokenizer_fingerprint
from lmkit.data.collator import LMDataCollator, WordTables, word_tables
from lmkit.data.conversations import (
    build_conversation_datasets,
    load_eval_conversations,
    looks_like_conversations,
    prepare_conversation_splits,
)
from lmkit.data.documents import load_eval_documents, load_heldout, prepare_splits, save_heldout
from lmkit.data.pairs import build_pair_datasets, load_eval_pairs, looks_like_pairs, pair_example, prepare_pair_splits

__all__ = [
    "DataArgs", "LMDataCollator", "WordTables", "build_conversation_datasets", "build_lm_datasets",
    "build_pair_datasets", "load_eval_conversations", "load_eval_documents", "load_eval_pairs", "load_heldout",
    "looks_like_conversations", "looks_like_pairs", "pair_example", "prepare_conversation_splits",
    "prepare_pair_splits", "prepare_splits", "save_heldout", "tokenizer_fingerprint", "word_tables",
]
