"""One choice: backend token events in, text updates out (detokenize, stop strings, finish).

    backend.generate() --TokenEvent--> ChoiceState.consume() --ChoiceUpdate--> formatter
    (or one of generate_group()'s iterators)
                                            |- IncrementalDetokenizer (whole characters)
                                            '- StopMatcher (cut at stop strings)

Closing the update stream closes the backend iterator, which cancels the work downstream;
a stop string does exactly that.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from engine.sequence import TokenEvent
from router.dispatch.backend import Backend, BackendUnavailable, GenerateRequest
from router.output.detokenizer import make_detokenizer
from router.output.stops import StopMatcher

PromptLogprobs = list[tuple[float, list[tuple[int, float]]] | None]


@dataclass(slots=True)
class OutputOptions:
    """What the router does with a choice's tokens; the backend never sees these."""

    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stop_token_ids: frozenset[int] = frozenset()  # EOS (unless ignore_eos) + stop_token_ids
    min_tokens: int = 0  # stop strings apply from this many tokens on (as in vLLM)
    drop_output: bool = False  # max_tokens 0: the one token the backend made is discarded
    top_logprobs: int | None = None  # None: no logprobs; k: chosen token + k alternatives


@dataclass(slots=True)
class ChoicePlan:
    index: int  # prompt_index * n + j
    prompt_index: int
    request: GenerateRequest
    options: OutputOptions


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    offset: int  # character offset of the token's text in the generated text


@dataclass(slots=True)
class ChoiceUpdate:
    index: int
    prompt_index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_generated: int = 0  # completion tokens so far (includes a stop string's last token)
    first: bool = False  # the first update of its choice: prompt-level facts below are set
    cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None


class ChoiceState:
    """Owns one choice's detokenizer, stop matcher and counters."""

    def __init__(self, plan: ChoicePlan, tokenizer: PreTrainedTokenizerBase):
        self.plan = plan
        self.opts = plan.options
        self.detok = make_detokenizer(
            tokenizer, plan.request.token_ids, self.opts.skip_special_tokens
        )
        self.stops = StopMatcher(self.opts.stop, self.opts.include_stop_str_in_output)
        self.count = 0

    def _finish_reason(self, ev: TokenEvent, is_stop_token: bool) -> str | None:
        if is_stop_token:
            return "stop"  # EOS on the last allowed token is still a stop, never "length"
        if ev.finish_reason in ("stop", "length"):
            return ev.finish_reason
        if self.count >= self.plan.request.params.max_tokens:
            return "length"  # the backend should have said so; we stop regardless
        return None

    def _text(self, ev: TokenEvent, hide: bool, finishing: bool) -> str:
        text = "" if hide else self.detok.push(ev.token_id)
        if finishing:
            text += self.detok.flush()
        if self.count < self.opts.min_tokens:
            return text
        released = self.stops.feed(text)
        if finishing and self.stops.matched is None:
            released += self.stops.flush()
        return released

    def _logprob(self, ev: TokenEvent, offset: int) -> TokenLogprob:
        k = self.opts.top_logprobs or 0
        top = list(ev.top_logprobs or [])[:k]
        return TokenLogprob(ev.token_id, finite_logprob(ev.logprob), top, offset)

    def consume(self, ev: TokenEvent) -> ChoiceUpdate:
        update = ChoiceUpdate(self.plan.index, self.plan.prompt_index)
        if self.opts.drop_output:
            update.finish_reason = "length"
            return update
        self.count += 1
        # A stop token ends the choice even if the backend did not say so (it should have);
        # before min_tokens the engine masks them, so one there is plain text.
        is_stop_token = ev.token_id in self.opts.stop_token_ids and (
            ev.finish_reason is not None or self.count > self.opts.min_tokens
        )
        finish = self._finish_reason(ev, is_stop_token)
        offset = self.detok.text_len
        hide = is_stop_token and not self.opts.include_stop_str_in_output
        update.text = self._text(ev, hide, finishing=finish is not None)
        if self.stops.matched is not None:
            finish = "stop"
        if self.opts.top_logprobs is not None:
            update.logprobs.append(self._logprob(ev, offset))
        update.finish_reason = finish
        update.num_generated = self.count
        return update


def finite_logprob(value: float | None) -> float:
    """JSON has no -inf; OpenAI clamps to -9999.0, and so do we (also for a missing value)."""
    if value is None or not math.isfinite(value):
        return -9999.0
    return max(float(value), -9999.0)


async def _aclose(iterator: Any) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


def choice_events(
    backend: Backend, plans: Sequence[ChoicePlan], per_call: int
) -> list[AsyncIterator[TokenEvent]]:
    """Each plan's backend events, in plan order. The choices of one prompt go to the backend
    together, `per_call` at a time, so that its prompt is computed once per call, not once
    per choice (n > 1)."""
    by_prompt: dict[int, list[int]] = {}
    for i, plan in enumerate(plans):
        by_prompt.setdefault(plan.prompt_index, []).append(i)
    events: list[AsyncIterator[TokenEvent] | None] = [None] * len(plans)
    for indices in by_prompt.values():
        for k in range(0, len(indices), per_call):
            part = indices[k : k + per_call]
            streams = backend.generate_group([plans[i].request for i in part])
            for i, stream in zip(part, streams, strict=True):
                events[i] = stream
    return events  # type: ignore[return-value]  # every slot is filled


async def run_choice(
    events: AsyncIterator[TokenEvent], plan: ChoicePlan, tokenizer: PreTrainedTokenizerBase
) -> AsyncIterator[ChoiceUpdate]:
    """Updates from the choice's backend `events` until one has a finish_reason; the backend
    iterator is closed on every exit."""
    state = ChoiceState(plan, tokenizer)
    first = True
    try:
        async for ev in events:
            update = state.consume(ev)
            if first:
                update.first, first = True, False
                update.cached_tokens = ev.num_cached_tokens or 0
                update.prompt_logprobs = ev.prompt_logprobs
            yield update
            if update.finish_reason is not None:
                return
        raise BackendUnavailable("the backend ended a stream without finishing it")
    finally:
        await _aclose(events)
