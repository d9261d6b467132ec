"""The recipe's `data:` section (`DataArgs`): where the corpus is, its format, and how it becomes training blocks."""

import os
from dataclasses import dataclass

from lmkit.data.corpus import SUPPORTED
from lmkit.settings import SettingError, check_fields, setting


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
        "by whitespace, each CJK character a word, or each Chinese word with the word tokenizer).",
        choices=("token", "word"),
    )
    format: str = setting(
        "text", "'text': documents to continue; 'prompt_completion': (prompt, completion) pairs, the loss on the "
        "completion only; 'messages': conversations through tokenizer.chat_template, the loss on the assistant turns "
        "only. Pairs and conversations are always padded (packing would let attention cross them).",
        choices=("text", "prompt_completion", "messages"),
    )
    prompt_field: str = setting("prompt", "prompt_completion: the field holding the prompt (jsonl/json/csv/parquet).")
    completion_field: str = setting("completion", "prompt_completion: the field holding the expected completion.")
    messages_field: str = setting(
        "messages", "messages: the field holding each conversation, a list of {role: system|user|assistant, content: "
        "text} (jsonl/json/parquet).",
    )
    group_field: str | None = setting(
        None, "prompt_completion and messages: a field naming each record's group (a poem, a document); a group never "
        "straddles the split. null = pairs are split by their prompt, conversations by their content.",
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
        if self.format != "prompt_completion" and self.pairs_from is not None:
            raise SettingError("pairs_from", f"needs data.format: prompt_completion, got data.format: {self.format}",
                               "data")
        if self.format == "text" and self.group_field is not None:
            raise SettingError("group_field", "needs data.format: prompt_completion or messages, got data.format: "
                                              "text", "data")
        if self.format == "messages":
            for key in ("messages_field", "group_field"):
                if getattr(self, key) == "":
                    raise SettingError(key, "must be a non-empty field name, got ''", "data")
            self.packing = False  # conversations are padded: a packed block would let one attend to another
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


