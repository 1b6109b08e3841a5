"""Gather a request's choice updates: whole choices (non-streaming) and exact usage."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from router.output.generation import ChoiceUpdate, PromptLogprobs, TokenLogprob
from router.protocol.common import PromptTokensDetails, Usage


@dataclass(slots=True)
class ChoiceResult:
    index: int
    prompt_index: int
    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


class UsageCounter:
    """prompt_tokens counts each prompt once, however many choices it has (as OpenAI and vLLM
    bill). cached_tokens is per prompt too: the fewest any of its choices found in the cache,
    so it never claims more reuse than every copy of the prompt got."""

    def __init__(self, prompt_lens: Sequence[int], report_cached: bool = True):
        self._prompt_lens = list(prompt_lens)
        self._report_cached = report_cached  # False: the client sees cached_tokens 0
        self._generated: dict[int, int] = {}  # choice index -> tokens so far
        self._cached: dict[int, int] = {}  # prompt index -> min cached tokens
        # For the metrics middleware, which reads this counter once the response is sent.
        self.finish_reasons: dict[int, str] = {}  # choice index -> finish reason
        self.first_update_at: float | None = None  # perf_counter() of the first update

    def add(self, update: ChoiceUpdate) -> None:
        if self.first_update_at is None:
            self.first_update_at = time.perf_counter()
        if update.finish_reason is not None:
            self.finish_reasons[update.index] = update.finish_reason
        self._generated[update.index] = update.num_generated
        if update.first:
            seen = self._cached.get(update.prompt_index)
            cached = min(update.cached_tokens, self._prompt_lens[update.prompt_index])
            self._cached[update.prompt_index] = cached if seen is None else min(seen, cached)

    @property
    def cached_tokens(self) -> int:
        """The true count, for metrics, whatever the client is told."""
        return sum(self._cached.values())

    def usage(self) -> Usage:
        """What the client is told."""
        prompt = sum(self._prompt_lens)
        completion = sum(self._generated.values())
        cached = self.cached_tokens if self._report_cached else 0
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )


async def collect(
    updates: AsyncIterator[ChoiceUpdate], num_choices: int, usage: UsageCounter
) -> list[ChoiceResult]:
    results = [ChoiceResult(i, -1) for i in range(num_choices)]
    async with aclosing(updates):  # type: ignore[type-var]
        async for update in updates:
            usage.add(update)
            result = results[update.index]
            result.prompt_index = update.prompt_index
            result.parts.append(update.text)
            result.logprobs += update.logprobs
            if update.first:
                result.prompt_logprobs = update.prompt_logprobs
            if update.finish_reason is not None:
                result.finish_reason = update.finish_reason
    return results
