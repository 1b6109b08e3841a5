"""One token's own bytes and display string, for logprobs (`token`, `bytes`, dict keys).

`tokenizer.decode([id])` cannot show half a character (it gives U+FFFD), so we read the bytes
from the vocabulary entry instead:

    byte-level BPE (GPT-2, Llama 3, SmolLM2): 'ĠðŁĺ' --byte table--> b' \\xf0\\x9f\\x98'
    sentencepiece (Llama 2, Mistral):         '<0xF0>' -> b'\\xf0',  '▁the' -> b' the'

A token that is not valid UTF-8 on its own displays as OpenAI does: 'bytes:\\xf0\\x9f\\x98'.
"""

from __future__ import annotations

from tokenizers import decoders
from transformers import PreTrainedTokenizerBase

_SPIECE_SPACE = "\u2581"  # '▁', sentencepiece's marker for a leading space


def _build_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable stand-in char -> byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_DECODER = _build_byte_decoder()  # read-only after import


def _is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and isinstance(backend.decoder, decoders.ByteLevel)


class TokenText:
    """Owns the per-token bytes cache for one tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self._tok = tokenizer
        self._byte_level = _is_byte_level(tokenizer)
        self._special = set(tokenizer.all_special_ids) | {
            i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special
        }
        self._cache: dict[int, bytes] = {}

    def token_bytes(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._compute(token_id)
        return cached

    def display(self, token_id: int) -> str:
        raw = self.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def _compute(self, token_id: int) -> bytes:
        piece = self._tok.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if token_id in self._special:
            return piece.encode()
        if self._byte_level:
            if all(c in _BYTE_DECODER for c in piece):
                return bytes(_BYTE_DECODER[c] for c in piece)
            return piece.encode()
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace(_SPIECE_SPACE, " ").encode()
