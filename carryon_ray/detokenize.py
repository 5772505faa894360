"""Token ids to text, one token at a time, in linear time.

A fast tokenizer decodes through the `tokenizers` library's `DecodeStream`, which keeps a few
tokens of context and returns only the new text (None while a multi-byte character is still
incomplete). Any other tokenizer, or one whose `decode` also cleans up spaces (which
`DecodeStream` does not), falls back to decoding every id so far at each token: quadratic, but
the text it gives is `decode`'s own. Either way the text grows only by appending, and
`final()` is `tokenizer.decode(ids)`, so streamed pieces join to the non-streamed answer.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class Detokenizer:
    """Accumulates `text` as ids arrive (`add`); `stable` is how much of it can no longer
    change (the fallback's text may end in U+FFFD for a character still being spelled)."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, *, skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        backend = getattr(tokenizer, "backend_tokenizer", None)
        cleans = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self._backend: Tokenizer | None = (
            backend if isinstance(backend, Tokenizer) and not cleans else None
        )
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.ids: list[int] = []
        self.text = ""

    @property
    def incremental(self) -> bool:
        return self._backend is not None

    def add(self, token: int) -> str:
        """Take one id; returns the text it appended (possibly "")."""
        self.ids.append(int(token))
        before = len(self.text)
        if self._backend is not None:
            piece = self._stream.step(self._backend, int(token))
            if piece:
                self.text += piece
        else:
            self.text = self._decode()
        return self.text[before:]

    @property
    def stable(self) -> int:
        """Characters of `text` that later ids cannot change."""
        if self._backend is not None:
            return len(self.text)
        return len(self.text.rstrip("\ufffd"))

    def final(self) -> str:
        """The whole text once no more ids come: `decode` of every id (one pass), which also
        spells bytes left incomplete at the end as U+FFFD."""
        return self._decode() if self._backend is not None else self.text

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)


def offsets(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> tuple[str, list[int]]:
    """The text of `ids` (special tokens spelled out) and where each id's text starts in it."""
    detokenizer = Detokenizer(tokenizer, skip_special_tokens=False)
    starts = []
    for token in ids:
        starts.append(len(detokenizer.text))
        detokenizer.add(token)
    return detokenizer.final(), starts


def token_bytes(tokenizer: PreTrainedTokenizerBase, token: int) -> bytes:
    """One token's own bytes: a byte-level BPE token mapped back through its byte alphabet,
    a byte-fallback token (`<0xE6>`) as its byte, any other token as its decoded text."""
    piece = tokenizer.convert_ids_to_tokens(int(token))
    if isinstance(piece, str):
        if _is_byte_level(tokenizer) and all(char in _UNICODE_TO_BYTE for char in piece):
            return bytes(_UNICODE_TO_BYTE[char] for char in piece)
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            return bytes([int(piece[3:5], 16)])
    return tokenizer.decode([int(token)], skip_special_tokens=False).encode("utf-8")


def token_text(tokenizer: PreTrainedTokenizerBase, token: int) -> str:
    """One token's text as OpenAI's logprobs name it: the text, or `bytes:\\xe6\\x97` for
    part of a multi-byte character."""
    raw = token_bytes(tokenizer, token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)


def _is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in type(backend.decoder).__name__ + repr(
        backend.decoder
    )


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each
    byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    codes, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            codes[chr(byte)] = byte
        else:
            codes[chr(256 + extra)] = byte
            extra += 1
    return codes


_UNICODE_TO_BYTE = _byte_alphabet()
