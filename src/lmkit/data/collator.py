"""The collator: causal-LM rows batched into tensors, padded, and optionally masked (per token or per word)."""

import contextlib
import json
from collections.abc import Iterator
from typing import NamedTuple

import torch

from lmkit.cjk import CJK_RANGES


# For word masking each Han, Hiragana, Katakana and Hangul character is a word of its own (Chinese and Japanese have
# no spaces to find words by), unless one token holds several: the word tokenizer's tokens are whole Chinese words.
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

    Words are whitespace-separated, and each CJK character (Han, Hiragana, Katakana, Hangul) is a word of its own; a
    token holding several CJK characters (a word of lmkit's word tokenizer, segmented by jieba) is one word.
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
