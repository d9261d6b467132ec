"""The served model's tokenizer, as the server uses it: prompts to token ids (refusing, before any work, what cannot
fit the window), and token ids back to what a response shows: text, each token's own string and bytes, and where
each token starts in the text.

All of it is plain blocking work; the app runs it in a worker thread, never on the event loop, so that one client's
megabyte prompt does not stall every other client's stream.
"""

from functools import lru_cache

from tokenizers.decoders import DecodeStream


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the others are shifted
    to the characters from U+0100 on (the mapping every byte-level BPE, `tokenizers`' included, uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {byte: chr(byte) for byte in printable}, 0
    for byte in range(256):
        if byte not in chars:
            chars[byte], shifted = chr(256 + shifted), shifted + 1
    return {char: byte for byte, char in chars.items()}


_BYTE_OF_CHAR = _byte_level_alphabet()


class PromptTooLong(ValueError):
    """A text prompt that cannot fit the window whatever its tokenization."""


class ServedTokenizer:
    """Wraps a transformers tokenizer with the server's conversions; `n_positions` is the model's window."""

    def __init__(self, tokenizer, n_positions: int):
        self.tokenizer = tokenizer
        self.n_positions = n_positions
        self.backend = tokenizer.backend_tokenizer
        self.vocab_size = len(tokenizer)
        vocab = tokenizer.get_vocab()
        self._byte_level = _is_byte_level(self.backend)
        # no token, special ones included, covers more UTF-8 bytes than this; a text longer than the window times it
        # cannot fit, so it is refused without tokenizing it
        self._max_token_bytes = max(len(self._token_bytes(token)) for token in vocab) or 1
        self.token_string = lru_cache(maxsize=None)(self._token_string)

    # ---- text to ids ----

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """The ids of `text`; raises `PromptTooLong` without tokenizing when it surely exceeds the window."""
        size = len(text.encode("utf-8"))
        if size > self.n_positions * self._max_token_bytes:
            raise PromptTooLong(f"the prompt is {size} bytes, more than any {self.n_positions}-token window holds "
                                f"with this tokenizer (at most {self._max_token_bytes} bytes a token)")
        return self.tokenizer(text, add_special_tokens=add_special_tokens, verbose=False).input_ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    # ---- ids to what logprobs show ----

    def _token_bytes(self, token: str) -> bytes:
        """The UTF-8 bytes a vocabulary entry stands for (a byte-level BPE token's characters map to bytes)."""
        if self._byte_level and all(char in _BYTE_OF_CHAR for char in token):
            return bytes(_BYTE_OF_CHAR[char] for char in token)
        return token.encode("utf-8")

    def token_bytes(self, token_id: int) -> list[int]:
        return list(self._token_bytes(self.backend.id_to_token(token_id) or ""))

    def _token_string(self, token_id: int) -> str:
        """One token's text; a byte-level fragment of a character is written `bytes:\\xe5\\x8c` as OpenAI does."""
        text = self.backend.decode([token_id], skip_special_tokens=False)
        if "\ufffd" in text and self._byte_level:
            return "bytes:" + "".join(f"\\x{byte:02x}" for byte in self.token_bytes(token_id))
        return text

    def text_offsets(self, ids: list[int], start: int = 0) -> list[int]:
        """Where each token starts in the decoded text of `ids`, counted from `start`: the characters decoded before
        it (a token that only completes a character starts where that character does)."""
        offsets, position = [], start
        stream = DecodeStream(skip_special_tokens=False)
        for token_id in ids:
            offsets.append(position)
            piece = stream.step(self.backend, token_id)
            position += len(piece or "")
        return offsets


def _is_byte_level(backend) -> bool:
    return "ByteLevel" in type(backend.decoder).__name__ if backend.decoder is not None else False
