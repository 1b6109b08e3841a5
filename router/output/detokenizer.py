"""Incremental detokenization: token ids in, finished text out, never half a character.

A character can span tokens (byte-level BPE splits an emoji's 4 UTF-8 bytes over 2-3 tokens),
and some tokenizers change a token's text depending on its neighbour (sentencepiece drops the
leading space of the first token it decodes). So we decode a small sliding window, vLLM-style:

    ids:   ... p p p p p | g g g | g
                 prefix_offset   read_offset   (newest token last)

    prefix = decode(ids[prefix_offset:read_offset])   text already emitted (for context)
    full   = decode(ids[prefix_offset:])
    emit full[len(prefix):] unless it ends in U+FFFD (an incomplete character: wait for more)

The window starts on the last few prompt tokens so the first generated token decodes in context.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"
# Prompt tokens kept as left context: enough for any tokenizer's neighbour-dependent decoding
# (vLLM uses the same 5).
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text_len = 0  # characters emitted so far

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def _advance(self, force: bool) -> str:
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) <= len(prefix) or (full.endswith(REPLACEMENT) and not force):
            return ""
        delta = full[len(prefix):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.text_len += len(delta)
        return delta

    def push(self, token_id: int) -> str:
        """Text completed by this token ('' while a character is still incomplete)."""
        self._ids.append(token_id)
        return self._advance(force=False)

    def flush(self) -> str:
        """At the end: whatever is held back, invalid bytes shown as U+FFFD."""
        return self._advance(force=True)


def decode_prompt(
    tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], skip_special_tokens: bool = True
) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
