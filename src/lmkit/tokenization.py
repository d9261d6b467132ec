"""Train, save and load lmkit tokenizers: byte-level BPE, character-level, word-level and Unigram.

Every kind is one `tokenizers` pipeline (normalizer → pre-tokenizer → model → decoder) serialized to a single
`tokenizer.json`, wrapped as a `PreTrainedTokenizerFast`, so a trained directory loads with plain
`AutoTokenizer.from_pretrained(dir)` and never needs lmkit. The four kinds:

- `bpe`: byte-level BPE as in GPT-2. Every byte sequence encodes, so nothing is ever unknown, and the ByteLevel
  decoder gives the text back exactly (no `Ġ` left over).
- `char`: one token per Unicode character seen often enough (`min_frequency`, `coverage`, at most `vocab_size`),
  `<|unk|>` for the rest. Decoding concatenates, so covered text, spaces and newlines included, round-trips exactly.
- `word`: words, single digits, single punctuation marks and single whitespace characters, GPT-2 style: one plain space
  is kept *inside* the next word (" world"), so a sentence costs one token per word, not two. Chinese and Japanese
  runs are cut into words by jieba (`lmkit.segmentation`); every character seen often enough is in the vocabulary
  too, so a word out of the vocabulary is spelled from smaller words or characters, and only a rare character becomes
  `<|unk|>`. Stored as a Unigram model (the most probable segmentation into the vocabulary's words). Covered text
  decodes exactly, whitespace included.
- `unigram`: subword pieces learned by the Unigram algorithm (SentencePiece's) inside the same words, CJK runs
  whole; covered text decodes exactly, a character out of the vocabulary becomes `<|unk|>`. The `tokenizers` trainer
  is not deterministic (the same pieces, scores ~0.02 apart from run to run), so a re-run that must be exact loads the
  trained tokenizer (`tokenizer.path`) instead of training it again.

Special tokens are fixed (`<|endoftext|>` = bos = eos = document separator, `<|pad|>`, `<|unk|>`, then
`extra_special_tokens`) and take the first ids in that order; everything else reads the ids from the tokenizer.
Encoding adds no BOS/EOS: the data pipeline places the separators itself.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from lmkit import chat, segmentation
from lmkit.atomic import atomic_directory
from lmkit.data.corpus import (
    MAX_DOCUMENT_CHARS,
    MAX_WORD_CHARS,
    cut_long_words,
    document_hashes,
    iter_documents,
    split_keys,
    split_long_document,
)
from lmkit.errors import UserError
from lmkit.settings import SettingError, check_fields, setting

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"  # also bos and the document separator, as in GPT-2
PAD_TOKEN = "<|pad|>"  # separate from eos, so padding never hides a real document end from the loss mask
UNK_TOKEN = "<|unk|>"  # char/word: out-of-vocabulary; bpe: never produced, kept for input-masking augmentation
FIXED_SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, UNK_TOKEN)
KINDS = ("bpe", "char", "word", "unigram")

# GPT-2's n_positions, a placeholder: a training run sets the real maximum (the model's n_positions) on its copy.
DEFAULT_MODEL_MAX_LENGTH = 1024
# Held-out text beyond this many characters makes the stats no more precise, only slower and bigger in memory.
MAX_HELDOUT_CHARS = 2_000_000
# When no held-out text is given, the stats are measured on this much of the training text instead.
MAX_TRAIN_SAMPLE_CHARS = 100_000
# Documents per batch handed to the Rust trainer: batches amortize the Python→Rust crossing.
BATCH_DOCS = 1000
# Written next to tokenizer.json: what the tokenizer was trained on, how it measures.
STATS_FILE = "tokenizer_stats.json"
# Files a previous training leaves in its output directory: only such a directory may be replaced by a new one.
_OUTPUT_FILES = {"tokenizer.json", "tokenizer_config.json", STATS_FILE, "special_tokens_map.json"}

# `word` and `unigram` pre-tokenizer: runs of CJK ideographs and kana whole (no spaces to find words by: the model
# segments them), runs of other letters (with combining marks) as words, digits and punctuation/symbols one at a
# time so numbers and rare marks stay covered, every whitespace character alone. " ?" keeps one plain space inside the
# following token, as GPT-2 does.
_CJK_RUN = r"\p{Han}\p{Hiragana}\p{Katakana}ー"
_WORD_PATTERN = rf" ?[{_CJK_RUN}]+| ?[[\p{{L}}\p{{M}}]&&[^{_CJK_RUN}]]+| ?\p{{N}}| ?[^\s\p{{L}}\p{{M}}\p{{N}}]|\s"
# `char` pre-tokenizer: every code point on its own (Oniguruma has no dotall flag, hence [\s\S]).
_CHAR_PATTERN = r"[\s\S]"


@dataclass
class TokenizerSpec:
    """How to train one tokenizer: a `tokenizer_training/*.yaml` file, or a recipe's `tokenizer.train` section.

    In a recipe, `files` and `output_dir` stay unset: the run passes its train split and writes `<run>/tokenizer/`.
    A standalone spec reads its `files` with the same reader, and the same reading settings, as a recipe's `data:`.
    """

    kind: str = setting(
        "bpe", "bpe (byte-level BPE), char (one token per character), word (words; Chinese and Japanese segmented "
               "by jieba), unigram (Unigram subwords), or auto (word for mostly-CJK text, otherwise bpe).",
        choices=(*KINDS, "auto"),
    )
    vocab_size: int | str = setting(
        8192, "Vocabulary size including special tokens; for char and word a maximum; auto = from the corpus."
    )
    min_frequency: int = setting(
        2, "Minimum count for a merge (bpe), a character (char) or a word and a character (word); unigram: unused.",
        minimum=1,
    )
    coverage: float | None = setting(
        None, "char only: keep the most frequent characters until they cover this fraction, e.g. 0.9999.",
        above=0, maximum=1,
    )
    nfkc: bool = setting(True, "Apply Unicode NFKC normalization before tokenizing.")
    lowercase: bool = setting(False, "Lowercase the text before tokenizing.")
    extra_special_tokens: list[str] = setting(
        default_factory=list, help="Special tokens added after <|endoftext|>, <|pad|>, <|unk|>."
    )
    max_chars: int | None = setting(
        None, "Train on at most this many characters of the corpus (a sampling cap).", minimum=1
    )
    files: list[str] | None = setting(
        None, "Standalone specs: corpus files, globs or directories (read as a recipe's data.files)."
    )
    text_field: str = setting("text", "The text column of jsonl/csv/parquet files.")
    doc_separator: str = setting(
        "line", "Standalone specs: how .txt files split into documents, as a recipe's data.doc_separator."
    )
    encoding_errors: str = setting(
        "strict", "Standalone specs: invalid UTF-8 stops ('strict') or becomes U+FFFD ('replace').",
        choices=("strict", "replace"),
    )
    output_dir: str | None = setting(None, "Standalone specs: where the tokenizer goes.")
    heldout_fraction: float = setting(
        0.02, "Standalone specs: fraction of documents held out (by content hash) to measure the stats.",
        minimum=0, below=1,
    )

    def __post_init__(self):
        if isinstance(self.files, str):  # a single path is an easy YAML slip; accept it as a one-item list
            self.files = [self.files]
        if self.extra_special_tokens is None:
            self.extra_special_tokens = []
        check_fields(self)
        if not all(self.extra_special_tokens):
            raise SettingError("extra_special_tokens", f"must be non-empty strings, got {self.extra_special_tokens!r}")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise SettingError(
                "extra_special_tokens", f"must not repeat each other or {', '.join(FIXED_SPECIAL_TOKENS)}, got "
                                        f"{self.extra_special_tokens!r}"
            )
        if isinstance(self.vocab_size, str) and self.vocab_size != "auto":
            raise SettingError("vocab_size", f"must be an integer or auto, got {self.vocab_size!r}")
        if not self.is_auto and self.vocab_size < self.min_vocab_size:
            alphabet = "256 byte symbols + " if self.kind == "bpe" else "1 symbol + "
            raise SettingError(
                "vocab_size", f"must be at least {self.min_vocab_size} for kind {self.kind!r} "
                              f"({alphabet}{len(self.special_tokens)} special tokens), got {self.vocab_size!r}"
            )
        if self.coverage is not None and self.kind not in ("char", "auto"):
            raise SettingError("coverage", f"applies to kind 'char' only, got kind {self.kind!r}")

    @property
    def is_auto(self) -> bool:
        """Whether the kind or the vocabulary size is still to be chosen from the corpus (`lmkit.sizing`)."""
        return "auto" in (self.kind, self.vocab_size)

    @property
    def special_tokens(self) -> list[str]:
        """The special tokens in id order: the fixed three, then the extra ones."""
        return [*FIXED_SPECIAL_TOKENS, *self.extra_special_tokens]

    @property
    def min_vocab_size(self) -> int:
        """The smallest vocabulary that can hold the kind's alphabet plus the special tokens."""
        alphabet = len(pre_tokenizers.ByteLevel.alphabet()) if self.kind == "bpe" else 1
        return alphabet + len(self.special_tokens)


# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------


def train_tokenizer(
    spec: TokenizerSpec, texts: Iterable[str], output_dir: str | Path, heldout_texts: Iterable[str] = ()
) -> PreTrainedTokenizerFast:
    """Train a tokenizer on `texts` and write it, with `tokenizer_stats.json`, to `output_dir` atomically.

    Args:
        spec: what to train (`files` and `output_dir` of the spec are ignored here).
        texts: the training documents, streamed once (`spec.max_chars` caps how much is read).
        output_dir: the directory to create. It may exist if it is empty or holds a previous tokenizer (replaced).
        heldout_texts: documents to measure chars/token and the unknown rate on; iterated only after `texts` is
            consumed. When empty, the stats are measured on the start of the training text and say so.

    Returns:
        The trained tokenizer, as `load_trained_tokenizer(output_dir)` would give it.

    Raises:
        UserError: the texts hold no non-whitespace character, or `output_dir` holds something other than a tokenizer.
    """
    return _train_and_save(spec, texts, Path(output_dir), heldout_texts, source="the training texts")


def train_tokenizer_from_spec(spec: TokenizerSpec) -> Path:
    """Train the tokenizer a standalone spec describes: read `spec.files`, hold out documents, train, save.

    About `spec.heldout_fraction` of the documents (chosen by a hash of their text, so the choice is reproducible and
    duplicates stay on one side) are kept out of training and used for the stats in `tokenizer_stats.json`.

    Returns:
        The output directory.

    Raises:
        UserError: `files` or `output_dir` missing, unreadable corpus files, an empty corpus, a taken output directory.
    """
    if not spec.files:
        raise UserError("tokenizer spec: files is required for a standalone spec (a list of paths or globs)")
    if not spec.output_dir:
        raise UserError("tokenizer spec: output_dir is required for a standalone spec")
    output_dir = Path(spec.output_dir)
    _check_output_dir(output_dir)  # fail before reading a possibly large corpus

    heldout: list[str] = []  # filled while training reads the corpus; bounded by MAX_HELDOUT_CHARS
    heldout_chars = 0

    def training_documents() -> Iterator[str]:
        nonlocal heldout_chars
        for text in iter_documents(spec.files, spec.text_field, spec.doc_separator, spec.encoding_errors):
            if spec.heldout_fraction and _heldout_key(text) < spec.heldout_fraction:
                if heldout_chars < MAX_HELDOUT_CHARS:
                    heldout.append(text)
                    heldout_chars += len(text)
                continue
            yield text

    source = f"the files {spec.files} (text_field {spec.text_field!r})"
    _train_and_save(spec, training_documents(), output_dir, heldout, source=source)
    return output_dir


def load_trained_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a directory written by lmkit's tokenizer training, checking it declares the special tokens lmkit needs.

    Unlike `lmkit.loading.load_tokenizer` (any run dir, checkpoint or hub name, whatever tokens it has), this takes a
    tokenizer directory only and refuses one without bos, eos, pad or unk.

    Raises:
        UserError: the directory or its `tokenizer.json` is missing or unreadable, or it lacks bos/eos/pad/unk tokens.
    """
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise UserError(f"{path}: not a tokenizer directory (expected {path / 'tokenizer.json'})")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # a broken file fails in json, in transformers or in Rust, each with its own type
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: cannot load the tokenizer ({first_line})") from err
    missing = [
        name for name in ("bos_token", "eos_token", "pad_token", "unk_token") if getattr(tokenizer, name) is None
    ]
    if missing:
        raise UserError(f"{path}: the tokenizer declares no {', '.join(missing)} (lmkit needs bos, eos, pad and unk)")
    return tokenizer


def tokenizer_stats(tokenizer: PreTrainedTokenizerFast, texts: Iterable[str]) -> dict:
    """Measure a tokenizer on `texts`, streamed in batches.

    Returns:
        `docs`, `chars`, `tokens`, `chars_per_token`, `unk_tokens`, `unk_rate` (unknown tokens / tokens) and
        `roundtrip_exact_fraction` (documents whose decoding equals their normalized text). Rates are None without
        text.
    """
    backend: Tokenizer = tokenizer.backend_tokenizer
    unk_id = tokenizer.unk_token_id
    docs = chars = tokens = unk_tokens = exact = 0
    for batch in _batched(texts, BATCH_DOCS):
        encodings = backend.encode_batch(batch, add_special_tokens=False)
        ids = [encoding.ids for encoding in encodings]
        decoded = backend.decode_batch(ids, skip_special_tokens=False)
        for text, token_ids, back in zip(batch, ids, decoded):
            docs += 1
            chars += len(text)
            tokens += len(token_ids)
            unk_tokens += token_ids.count(unk_id) if unk_id is not None else 0
            expected = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
            exact += back == expected
    return {
        "docs": docs,
        "chars": chars,
        "tokens": tokens,
        "chars_per_token": chars / tokens if tokens else None,
        "unk_tokens": unk_tokens,
        "unk_rate": unk_tokens / tokens if tokens else None,
        "roundtrip_exact_fraction": exact / docs if docs else None,
    }


def token_byte_lengths(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """The UTF-8 bytes of text each token id stands for, the denominator of bits per byte.

    Every lmkit tokenizer decodes by concatenation, so a document's bytes are the sum over its tokens: a byte-level
    BPE token is one byte per character of its vocabulary string (GPT-2's byte alphabet), a char or word token the
    UTF-8 of its string. Special tokens: the end-of-text token separating documents, and a chat template's end of
    turn, count as 1 byte (the newline a plain-text corpus separates them by); an unknown token as the median length
    of the regular tokens (its text is gone; lmkit's byte-level BPE never produces one); padding and other special
    tokens as 0 (never predicted).
    """
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    decoder = definition.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    byte_level = any(part.get("type") == "ByteLevel" for part in parts)
    special = set(tokenizer.all_special_ids) | {int(i) for i in tokenizer.added_tokens_decoder}
    lengths = [0] * len(tokenizer)
    for token, index in tokenizer.get_vocab().items():
        if index not in special and index < len(lengths):
            lengths[index] = len(token) if byte_level else len(token.encode("utf-8"))
    regular = sorted(length for index, length in enumerate(lengths) if index not in special)
    if tokenizer.unk_token_id is not None and regular:
        lengths[tokenizer.unk_token_id] = regular[len(regular) // 2]
    if tokenizer.eos_token_id is not None:
        lengths[tokenizer.eos_token_id] = 1
    if chat.has_template(tokenizer):  # a chat model's end of turn separates replies as EOS separates documents
        lengths[chat.end_of_turn(tokenizer)[1]] = 1
    return lengths


# ---------------------------------------------------------------------------------------------------------------------
# Building and training the pipelines
# ---------------------------------------------------------------------------------------------------------------------


def _normalizer(spec: TokenizerSpec) -> normalizers.Normalizer | None:
    steps = ([normalizers.NFKC()] if spec.nfkc else []) + ([normalizers.Lowercase()] if spec.lowercase else [])
    return normalizers.Sequence(steps) if steps else None


def _bpe_tokenizer(spec: TokenizerSpec) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    # add_prefix_space=False: a prefix space would change the text and break the exact round trip.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; adds no tokens
    return tokenizer


def _bpe_trainer(spec: TokenizerSpec) -> trainers.Trainer:
    return trainers.BpeTrainer(
        vocab_size=spec.vocab_size, min_frequency=spec.min_frequency, special_tokens=spec.special_tokens,
        show_progress=_show_progress(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not: nothing is unknown
    )


def _word_tokenizer(model: models.Model) -> Tokenizer:
    """The `word` and `unigram` pipeline around `model`: words and CJK runs split out, decoded by concatenation."""
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # tokens carry their own spaces, so decoding is plain concatenation
    return tokenizer


def _unigram_trainer(spec: TokenizerSpec) -> trainers.Trainer:
    return trainers.UnigramTrainer(vocab_size=spec.vocab_size, special_tokens=spec.special_tokens,
                                   unk_token=UNK_TOKEN, show_progress=_show_progress())


def _char_tokenizer(spec: TokenizerSpec, vocab: dict[str, int]) -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(_CHAR_PATTERN), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return tokenizer


def _choose_chars(spec: TokenizerSpec, counts: Counter) -> list[str]:
    """The characters a char vocabulary (or a word vocabulary's fallback) keeps: frequent enough, most frequent first,
    until coverage or the cap."""
    total = sum(counts.values())
    room = spec.vocab_size - len(spec.special_tokens)
    special = set(spec.special_tokens)
    kept, covered = [], 0
    # Ties broken by the character itself so the same corpus always gives the same ids.
    for char, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if count < spec.min_frequency or len(kept) == room:
            break
        if spec.coverage is not None and covered >= spec.coverage * total:
            break
        if char in special:
            continue
        kept.append(char)
        covered += count
    return kept


class _CorpusReader:
    """Streams training documents in batches while counting them, honouring `max_chars`, with a progress bar.

    With `cut_giants` (bpe and word), documents longer than `corpus.MAX_DOCUMENT_CHARS` go to the trainer in pieces and
    runs of non-whitespace longer than `corpus.MAX_WORD_CHARS` are cut, so training time stays linear in the input
    (BPE training on one 1 MB "word" ran for minutes); both are counted and warned about.
    """

    def __init__(self, texts: Iterable[str], max_chars: int | None, cut_giants: bool = True):
        self.texts, self.max_chars, self.cut_giants = texts, max_chars, cut_giants
        self.documents_split = self.words_cut = 0
        self.docs = self.chars = 0
        self.has_text = False  # any non-whitespace character at all
        self.sample: list[str] = []  # the first MAX_TRAIN_SAMPLE_CHARS, for stats when nothing is held out
        self._sample_chars = 0

    def batches(self) -> Iterator[list[str]]:
        progress = tqdm(desc="reading corpus", unit=" docs", disable=None, mininterval=1.0)
        batch: list[str] = []
        with progress:
            for text in self.texts:
                if self.max_chars is not None and self.chars + len(text) > self.max_chars:
                    text = text[: self.max_chars - self.chars]
                self.docs += 1
                self.chars += len(text)
                self.has_text = self.has_text or (bool(text) and not text.isspace())
                if self._sample_chars < MAX_TRAIN_SAMPLE_CHARS:
                    self.sample.append(text)
                    self._sample_chars += len(text)
                for part in self._parts(text):
                    batch.append(part)
                    if len(batch) == BATCH_DOCS:
                        progress.update(len(batch))
                        yield batch
                        batch = []
                if self.max_chars is not None and self.chars >= self.max_chars:
                    break
            if batch:
                progress.update(len(batch))
                yield batch


    def _parts(self, text: str) -> list[str]:
        if not self.cut_giants or len(text) <= MAX_WORD_CHARS:
            return [text]
        pieces = split_long_document(text)
        self.documents_split += len(pieces) > 1
        parts = []
        for piece in pieces:
            cut, count = cut_long_words(piece)
            parts += cut
            self.words_cut += count
        return parts


def _train_backend(spec: TokenizerSpec, reader: _CorpusReader) -> tuple[Tokenizer, dict]:
    """Train the `tokenizers` pipeline for `spec.kind` from the reader; returns it and kind-specific stats."""
    normalizer = _normalizer(spec)
    if spec.kind == "char":
        counts: Counter = Counter()
        for batch in reader.batches():
            if normalizer is not None:
                batch = [normalizer.normalize_str(text) for text in batch]
            counts.update("".join(batch))
        kept = _choose_chars(spec, counts)
        vocab = {token: i for i, token in enumerate(spec.special_tokens + kept)}
        tokenizer = _char_tokenizer(spec, vocab)
        total = sum(counts.values())
        extra = {
            "alphabet_size": len(counts),
            "training_char_coverage": sum(counts[c] for c in kept) / total if total else None,
        }
    elif spec.kind == "word":
        tokenizer = _word_tokenizer(models.Unigram())
        counter = segmentation.WordCounter(normalizer, tokenizer.pre_tokenizer)
        for batch in reader.batches():
            counter.add(batch)
        chars = _choose_chars(spec, counter.chars)
        vocab, extra = segmentation.unigram_vocab(counter, chars, spec.vocab_size, spec.special_tokens,
                                                  spec.min_frequency)
        tokenizer.model = models.Unigram(vocab, unk_id=spec.special_tokens.index(UNK_TOKEN), byte_fallback=False)
    else:
        if spec.kind == "bpe":
            tokenizer, trainer = _bpe_tokenizer(spec), _bpe_trainer(spec)
        else:
            tokenizer, trainer = _word_tokenizer(models.Unigram()), _unigram_trainer(spec)
        tokenizer.normalizer = normalizer  # before training: the trainer learns from normalized text
        try:
            tokenizer.train_from_iterator(reader.batches(), trainer=trainer)
        except Exception as err:  # the Unigram trainer keeps every character it sees, and says so only in Rust
            if "not large enough to contain all chars" not in str(err):
                raise
            raise UserError(f"tokenizer vocab_size {spec.vocab_size} is too small for kind unigram, which keeps "
                            "every character of the training text: raise it, or take kind bpe or word") from err
        extra = {}
    tokenizer.normalizer = normalizer
    # Registers the specials as added tokens (never split, never normalized); they already hold ids 0, 1, 2, ...
    tokenizer.add_special_tokens(spec.special_tokens)
    return tokenizer, extra


def _wrap(spec: TokenizerSpec, backend: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=list(spec.extra_special_tokens),
        model_max_length=DEFAULT_MODEL_MAX_LENGTH,
        # The v4 default was True, which turns "a ." into "a." and would break the exact round trip there.
        clean_up_tokenization_spaces=False,
    )


def _train_and_save(
    spec: TokenizerSpec, texts: Iterable[str], output_dir: Path, heldout_texts: Iterable[str], source: str
) -> PreTrainedTokenizerFast:
    if spec.is_auto:  # a programming error: callers decide auto values first (lmkit.sizing.choose_tokenizer)
        raise ValueError(f"tokenizer spec with auto values: kind {spec.kind!r}, vocab_size {spec.vocab_size!r}")
    replace = _check_output_dir(output_dir)
    reader = _CorpusReader(texts, spec.max_chars, cut_giants=spec.kind != "char")
    logger.info("training a %s tokenizer (vocab_size %d) on %s", spec.kind, spec.vocab_size, source)
    start = time.perf_counter()
    backend, kind_stats = _train_backend(spec, reader)
    training_time = time.perf_counter() - start
    if not reader.has_text:
        raise UserError(f"no text to train the tokenizer on: {source} are empty or whitespace only")
    if reader.documents_split or reader.words_cut:
        logger.warning("tokenizer training: %d documents longer than %d characters were split and %d runs of "
                       "non-whitespace longer than %d characters cut (giant lines)", reader.documents_split,
                       MAX_DOCUMENT_CHARS, reader.words_cut, MAX_WORD_CHARS)
    tokenizer = _wrap(spec, backend)

    measured = tokenizer_stats(tokenizer, heldout_texts)
    measured_on = "heldout"
    if not measured["docs"]:
        measured = tokenizer_stats(tokenizer, reader.sample)
        measured_on = "training text (no held-out text given)"
    stats = {
        "kind": spec.kind,
        "vocab_size": len(tokenizer),
        "requested_vocab_size": spec.vocab_size,
        "training_time_s": round(training_time, 3),
        "corpus_docs": reader.docs,
        "corpus_chars": reader.chars,
        "corpus_documents_split": reader.documents_split,
        "corpus_words_cut": reader.words_cut,
        "stats_measured_on": measured_on,
        **{
            f"heldout_{key}" if key in ("docs", "chars", "tokens", "unk_tokens") else key: value
            for key, value in measured.items()
        },
        **kind_stats,
        "special_tokens": {token: tokenizer.convert_tokens_to_ids(token) for token in spec.special_tokens},
        "spec": {key: value for key, value in asdict(spec).items() if key not in ("files", "output_dir")},
    }
    _save(tokenizer, stats, output_dir, replace)
    logger.info(
        "saved the %s tokenizer (%d tokens, %.2f chars/token, unk rate %.4f) to %s",
        spec.kind,
        stats["vocab_size"],
        stats["chars_per_token"] or 0,
        stats["unk_rate"] or 0,
        output_dir,
    )
    return load_trained_tokenizer(output_dir)


def save_portable(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """`save_pretrained` into `directory`, declaring the tokenizer class every transformers version can load.

    v5 writes "TokenizersBackend", which transformers v4 cannot resolve; "PreTrainedTokenizerFast" loads as the same
    class in v5 (an alias) and in v4, so the directory stays usable by older consumers too.
    """
    tokenizer.save_pretrained(str(directory))
    config_path = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", "utf-8")


def _save(tokenizer: PreTrainedTokenizerFast, stats: dict, output_dir: Path, replace: bool) -> None:
    with atomic_directory(output_dir, replace=replace) as tmp:
        save_portable(tokenizer, tmp)
        (tmp / STATS_FILE).write_text(
            json.dumps(stats, indent=2, sort_keys=True, ensure_ascii=False) + "\n", "utf-8"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------------------


def _check_output_dir(output_dir: Path) -> bool:
    """Whether `output_dir` holds a previous tokenizer to replace; UserError if it holds anything else."""
    if not output_dir.exists():
        return False
    if not output_dir.is_dir():
        raise UserError(f"tokenizer output_dir {output_dir} exists and is not a directory")
    names = {entry.name for entry in output_dir.iterdir()}
    if not names:
        return False
    if "tokenizer.json" in names and names <= _OUTPUT_FILES:
        logger.warning("replacing the tokenizer in %s", output_dir)
        return True
    raise UserError(
        f"tokenizer output_dir {output_dir} already holds other files ({', '.join(sorted(names)[:3])}, ...); "
        f"choose a new or empty directory"
    )


def _heldout_key(text: str) -> float:
    """The document's key in [0, 1) for the held-out sample: the data stage's split key, so identical texts always
    land on the same side and the choice does not change between processes or runs."""
    return float(split_keys(document_hashes([text])[:, 0], seed=0)[0])


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _show_progress() -> bool:
    # The Rust trainer's bars (counting pairs, computing merges) are the useful ones, but only on a terminal.
    return sys.stderr.isatty()
