"""What counts as CJK text: the characters of Han, Hiragana, Katakana and Hangul, and their share of a text.

One definition for every choice that depends on it: the automatic tokenizer (`lmkit.sizing`: words for mostly CJK
text), word segmentation (`lmkit.segmentation`: jieba cuts the CJK runs), word masking (`lmkit.data.collator`: each
CJK character a word) and the BLEU tokenizer (`lmkit.metrics`).
A module of its own that imports nothing, because `lmkit.metrics` must stay light (`lmkit hub` imports it) and
anything under `lmkit.data` imports datasets and torch with the package.
"""

import bisect
from collections.abc import Iterable

# The scripts written without spaces between words: Han, Hiragana, Katakana and Hangul (Korean syllables are treated
# alike). Their blocks, as sorted (first, last) code points.
CJK_RANGES = (
    (0x1100, 0x11FF),  # Hangul Jamo
    (0x2E80, 0x2FDF),  # CJK and Kangxi radicals
    (0x3005, 0x3007), (0x3021, 0x3029), (0x3038, 0x303B),  # the Han characters among the CJK symbols (々, 〇, ...)
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3130, 0x318F),  # Hangul compatibility Jamo
    (0x31F0, 0x31FF),  # Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xA960, 0xA97F),  # Hangul Jamo extended A
    (0xAC00, 0xD7FF),  # Hangul syllables, Jamo extended B
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFFDC),  # halfwidth Katakana and Hangul
    (0x1B000, 0x1B16F),  # Kana supplement and extensions
    (0x20000, 0x323AF),  # CJK extensions B to H, compatibility supplement
)
_STARTS = [first for first, _ in CJK_RANGES]


def is_cjk(char: str) -> bool:
    """Whether the character `char` is in one of `CJK_RANGES`."""
    point = ord(char)
    index = bisect.bisect_right(_STARTS, point) - 1
    return index >= 0 and point <= CJK_RANGES[index][1]


def cjk_share(texts: Iterable[str], max_chars: int = 1_000_000, letters_only: bool = False) -> float:
    """The share of CJK characters among the non-whitespace characters of `texts` (about the first `max_chars`), or
    among their letters only (`str.isalpha`: punctuation, digits and symbols left out) when `letters_only`."""
    cjk = seen = 0
    for text in texts:
        for char in text:
            if char.isspace() or (letters_only and not char.isalpha()):
                continue
            cjk += is_cjk(char)
            seen += 1
        if seen >= max_chars:
            break
    return cjk / seen if seen else 0.0
