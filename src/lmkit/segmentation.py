"""The `word` tokenizer's vocabulary: words found by a segmenter, stored as a Unigram model.

Chinese and Japanese are written without spaces, so finding their words takes a segmenter: jieba (the segmenter the
Chinese NLP field uses) cuts every run of Han and kana characters. Its words, the space-separated words of other
scripts, and every character seen often enough are counted over the training text; the vocabulary keeps the
characters first (so any text made of them encodes) and then the most frequent words, and each piece scores the log of
its share of the segmented text (add-one smoothed). Stored as a `tokenizers` Unigram model, encoding takes the most
probable segmentation into those pieces — the same maximum-probability path over a word lattice that jieba takes over
its own dictionary — so plain `AutoTokenizer` loads `tokenizer.json` and segments without jieba or lmkit. Words are
whole tokens, so word masking masks whole Chinese words.

This module imports no lmkit module; `lmkit.tokenization` hands it the pipeline's normalizer and pre-tokenizer.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable

from tokenizers import normalizers, pre_tokenizers

from lmkit.cjk import is_cjk

logger = logging.getLogger(__name__)


class WordCounter:
    """Counts the words of normalized, pre-tokenized text: a CJK run as jieba cuts it (a leading space stays with the
    first word), any other pre-token as it is; and every character, for the vocabulary's fallback."""

    def __init__(self, normalizer: normalizers.Normalizer | None, pre_tokenizer: pre_tokenizers.PreTokenizer):
        import jieba  # imported here: only a word tokenizer needs it, and it takes a while

        jieba.setLogLevel(logging.WARNING)  # it logs its dictionary loading to stderr at DEBUG otherwise
        self._jieba = jieba.Tokenizer()
        self._normalizer, self._pre_tokenizer = normalizer, pre_tokenizer
        self.words: Counter = Counter()
        self.chars: Counter = Counter()

    def add(self, texts: Iterable[str]) -> None:
        for text in texts:
            if self._normalizer is not None:
                text = self._normalizer.normalize_str(text)
            self.chars.update(text)
            for piece, _ in self._pre_tokenizer.pre_tokenize_str(text):
                run = piece.lstrip(" ")
                if run and is_cjk(run[0]):
                    words = self._jieba.lcut(run, HMM=True)  # HMM: also words its dictionary lacks (names)
                    words[0] = piece[: len(piece) - len(run)] + words[0]
                    self.words.update(words)
                else:
                    self.words[piece] += 1


def unigram_vocab(counter: WordCounter, chars: list[str], vocab_size: int, special_tokens: list[str],
                  min_frequency: int) -> tuple[list[tuple[str, float]], dict]:
    """The Unigram model's `(piece, log probability)` list, special tokens first, and what was kept (for the stats).

    The characters `chars` (chosen from `counter.chars` as a char vocabulary would be) come first, so a word left out
    of the vocabulary is spelled from smaller words or characters rather than lost; then words seen at least
    `min_frequency` times fill the rest, most frequent first (ties by the text itself, so the same corpus gives the
    same ids).
    """
    room = vocab_size - len(special_tokens)
    excluded = {*special_tokens, *chars}
    ranked = sorted(counter.words.items(), key=lambda item: (-item[1], item[0]))
    words = [word for word, count in ranked if count >= min_frequency and word not in excluded][: room - len(chars)]
    pieces = chars + words
    # Add-one smoothing: a character seen only inside words still gets a (small) probability.
    total = sum(counter.words[piece] + 1 for piece in pieces)
    scored = [(piece, math.log((counter.words[piece] + 1) / total)) for piece in pieces]
    multi = sum(len(word.strip()) > 1 and is_cjk(word.strip()[0]) for word in words)
    logger.info("word vocabulary: %d characters and %d words (%d of them CJK words of 2+ characters)", len(chars),
                len(words), multi)
    stats = {"vocab_chars": len(chars), "vocab_words": len(words), "vocab_cjk_words": multi,
             "corpus_words_distinct": len(counter.words)}
    return [(token, 0.0) for token in special_tokens] + scored, stats
