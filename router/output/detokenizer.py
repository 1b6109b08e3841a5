"""Incremental detokenization: token ids in, finished text out, never half a character.

A character can span tokens (byte-level BPE splits an emoji's 4 UTF-8 bytes over 2-3 tokens),
and some tokenizers change a token's text depending on its neighbour (sentencepiece drops the
leading space of the first token it decodes). So text is decoded over a short window that starts
on a few tokens already emitted (at first: the prompt's last tokens), vLLM-style:

    ids:   c c c | h h h h        c: context, already emitted   h: held, not yet emitted
                 read

    prefix = decode(c...)   full = decode(c... h...)
    emit full[len(prefix):] unless it ends in U+FFFD (an incomplete character: wait for more)

Bytes that never form a character would be held (and re-decoded) forever; see _PARTIAL_TOKENS.

Two implementations, picked by make_detokenizer():
  FastIncrementalDetokenizer  fast (Rust) tokenizers: tokenizers' DecodeStream, one decode per token
  IncrementalDetokenizer      anything else: the window above, two decodes per token
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"
# Tokens kept as left context (prompt tokens at first): enough for any tokenizer's
# neighbour-dependent decoding (vLLM uses the same 5).
_CONTEXT_TOKENS = 5
# A UTF-8 character is at most 4 bytes and a byte-level (or byte-fallback) token carries at least
# one byte, so a character still incomplete at the end started within the last 3 tokens. Tokens
# held back before those can complete nothing more; committing them keeps the window short when
# a model emits bytes that never form a character (otherwise every token re-decodes them all).
_PARTIAL_TOKENS = 3
# DecodeStreamError::InvalidPrefix: decode() of a longer window no longer starts with the text
# already emitted (byte-fallback decoders can turn earlier bytes into U+FFFD).
_INVALID_PREFIX = "Invalid prefix"

Decode = Callable[[list[int]], str]


def _clean_context(decode: Decode, ids: Sequence[int]) -> list[int]:
    """The last few ids, minus trailing ones that leave a character incomplete.

    A context ending mid-character would be completed by the next token, so emitted text would
    start with context text (DecodeStream then re-emits the whole context).
    """
    context = list(ids[-_CONTEXT_TOKENS:])
    while context and decode(context).endswith(REPLACEMENT):
        context.pop()
    return context


def _skipped_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids decode(skip_special_tokens=True) drops: the named special tokens and added ones."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return frozenset(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}


class _Window:
    """Owns the context and held ids (diagram above) and decides what to emit from them."""

    def __init__(
        self, decode: Decode, context: Sequence[int], skips: PreTrainedTokenizerBase | None
    ):
        self._decode = decode
        self.ids = list(context)
        self.read = len(self.ids)  # ids[:read] emitted (context), ids[read:] held
        self._skips = skips  # the tokenizer when decode() skips special tokens, else None
        self._skipped: frozenset[int] | None = None  # built on first need

    @property
    def held(self) -> int:
        return len(self.ids) - self.read

    def step(self, force: bool = False) -> str | None:
        """Text the held ids complete, or None to keep holding them. force: U+FFFD and all."""
        prefix = self._text(self.read)
        full = self._text(len(self.ids))
        if len(full) > len(prefix) and (force or not full.endswith(REPLACEMENT)):
            return self._commit(len(self.ids), full[len(prefix):])
        if self.held > _PARTIAL_TOKENS and not force:
            self._drop_skipped()
            if self.held > _PARTIAL_TOKENS:
                return self._commit_older(prefix, full)
        return None

    def mark_emitted(self) -> None:
        """Everything pushed so far was emitted elsewhere; keep the tail as context."""
        del self.ids[:-_CONTEXT_TOKENS]
        self.read = len(self.ids)

    def _drop_skipped(self) -> None:
        """decode() drops skipped special tokens and joins the bytes around them, so leaving
        them out changes no text and makes every id in the window carry at least one byte."""
        if self._skips is None:
            return
        if self._skipped is None:
            self._skipped = _skipped_ids(self._skips)
        context = [i for i in self.ids[:self.read] if i not in self._skipped]
        held = [i for i in self.ids[self.read:] if i not in self._skipped]
        self.ids, self.read = context + held, len(context)

    def _commit_older(self, prefix: str, full: str) -> str | None:
        end = len(self.ids) - _PARTIAL_TOKENS
        head = self._text(end)
        if len(head) < len(prefix) or not full.startswith(head):
            return None  # a character spans the cut after all: hold on
        # An invalid byte run (at most 3 bytes) may span the cut, so it starts within the last
        # 2 ids before it; 3 ids of context make the next window decode that run as full did.
        return self._commit(end, head[len(prefix):], context=_PARTIAL_TOKENS)

    def _commit(self, end: int, delta: str, context: int = 0) -> str:
        """ids[:end] are emitted; the next context starts at the old read offset (the ids just
        emitted, as in vLLM), or earlier to keep `context` ids before end."""
        start = min(self.read, max(0, end - context))
        del self.ids[:start]
        self.read = end - start
        return delta

    def _text(self, end: int) -> str:
        return self._decode(self.ids[:end]) if end else ""


class IncrementalDetokenizer:
    """Fallback for tokenizers without a Rust backend: the window, two decodes per token."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        context = _clean_context(self._decode, prompt_ids)
        self._window = _Window(self._decode, context, tokenizer if skip_special_tokens else None)
        self.text_len = 0  # characters emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Text completed by this token ('' while a character is still incomplete)."""
        self._window.ids.append(token_id)
        return self._emit(self._window.step())

    def flush(self) -> str:
        """At the end: whatever is held back, invalid bytes shown as U+FFFD."""
        return self._emit(self._window.step(force=True))

    def _emit(self, text: str | None) -> str:
        self.text_len += len(text or "")
        return text or ""


class FastIncrementalDetokenizer:
    """tokenizers' DecodeStream: one Rust decode per token, same contract as the fallback.

    DecodeStream never gives up on held tokens, so each token re-decodes all of them; while it
    holds more than a partial character could need, the window takes over (bounded as above)
    until nothing is held, then a fresh stream resumes. The window mirrors the stream's ids.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ):
        self._backend: Tokenizer = tokenizer.backend_tokenizer
        self._skip = skip_special_tokens
        context = _clean_context(self._decode, prompt_ids)
        self._window = _Window(self._decode, context, tokenizer if skip_special_tokens else None)
        self._stream: DecodeStream | None = DecodeStream(context, skip_special_tokens)
        self.text_len = 0  # characters emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Text completed by this token ('' while a character is still incomplete)."""
        self._window.ids.append(token_id)
        text = self._stream_step(token_id)
        if text is not None:
            self._window.mark_emitted()
        elif self._stream is None or self._window.held > _PARTIAL_TOKENS:
            text = self._window_step()
        return self._emit(text)

    def flush(self) -> str:
        """At the end: whatever is held back, invalid bytes shown as U+FFFD."""
        return self._emit(self._window_step(force=True) if self._window.held else None)

    def _stream_step(self, token_id: int) -> str | None:
        if self._stream is None:
            return None
        try:
            return self._stream.step(self._backend, token_id)
        except Exception as e:  # tokenizers raises a bare Exception
            if not str(e).startswith(_INVALID_PREFIX):
                raise
            self._stream = None  # its state is broken; the window decodes these ids
            return None

    def _window_step(self, force: bool = False) -> str | None:
        self._stream = None
        text = self._window.step(force)
        if self._window.held == 0:
            context = _clean_context(self._decode, self._window.ids)
            self._stream = DecodeStream(context, self._skip)
        return text

    def _emit(self, text: str | None) -> str:
        self.text_len += len(text or "")
        return text or ""


def make_detokenizer(
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[int] = (),
    skip_special_tokens: bool = True,
) -> FastIncrementalDetokenizer | IncrementalDetokenizer:
    """DecodeStream when the tokenizer has a Rust backend whose decode() is all there is.

    clean_up_tokenization_spaces rewrites decode()'s text in Python, which DecodeStream cannot
    reproduce, so those tokenizers take the fallback.
    """
    fast = isinstance(getattr(tokenizer, "backend_tokenizer", None), Tokenizer)
    if fast and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return FastIncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    return IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)


def decode_prompt(
    tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], skip_special_tokens: bool = True
) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
