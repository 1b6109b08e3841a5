"""/v1/chat/completions bodies and stream chunks from choice updates."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from router.collect import ChoiceResult, UsageCounter
from router.generation import ChoicePlan, ChoiceUpdate
from router.logprobs import chat_logprobs
from router.model_info import ServedModel
from router.protocol import ChatCompletionRequest
from router.protocol_responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    Usage,
)


@dataclass(slots=True)
class ChatJob:
    request_id: str
    created: int
    model: ServedModel
    body: ChatCompletionRequest
    prompt_len: int
    plans: list[ChoicePlan]

    def chunk(self, choices: list[ChatChunkChoice], usage: Usage | None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model.name, choices=choices,
            usage=usage,
        )


def chat_body(job: ChatJob, results: Sequence[ChoiceResult], usage: UsageCounter) -> dict:
    choices = [
        ChatChoice(
            index=r.index,
            message=AssistantMessage(content=r.text),
            logprobs=chat_logprobs(job.model, r.logprobs) if job.body.logprobs else None,
            finish_reason=r.finish_reason,  # type: ignore[arg-type]
        )
        for r in results
    ]
    response = ChatCompletionResponse(
        id=job.request_id, created=job.created, model=job.model.name, choices=choices,
        usage=usage.usage(),
    )
    return response.model_dump(mode="json")


def _chunk_choice(job: ChatJob, u: ChoiceUpdate) -> ChatChunkChoice | None:
    """None when the update carries nothing a client could see."""
    logprobs = chat_logprobs(job.model, u.logprobs) if u.logprobs else None
    if not u.text and logprobs is None and u.finish_reason is None:
        return None
    return ChatChunkChoice(
        index=u.index,
        delta=ChatDelta(content=u.text or None),
        logprobs=logprobs,
        finish_reason=u.finish_reason,  # type: ignore[arg-type]
    )


async def chat_chunks(
    job: ChatJob, updates: AsyncIterator[ChoiceUpdate], usage: UsageCounter
) -> AsyncIterator[list[dict[str, Any]]]:
    opts = job.body.stream_options
    include_usage = bool(opts and opts.include_usage)
    continuous = include_usage and bool(opts and opts.continuous_usage_stats)
    # OpenAI: with include_usage every chunk has "usage" (null until the last one).
    exclude = None if include_usage else {"usage"}

    def dump(choice: ChatChunkChoice) -> dict[str, Any]:
        chunk = job.chunk([choice], usage.usage() if continuous else None)
        return chunk.model_dump(mode="json", exclude=exclude)

    try:
        # Every choice opens with the assistant role (and empty content), as OpenAI's do.
        yield [dump(ChatChunkChoice(index=p.index, delta=ChatDelta(role="assistant", content="")))
               for p in job.plans]
        async for u in updates:
            usage.add(u)
            choice = _chunk_choice(job, u)
            if choice is not None:
                yield [dump(choice)]
        if include_usage:
            yield [job.chunk([], usage.usage()).model_dump(mode="json")]
    finally:
        await updates.aclose()  # type: ignore[attr-defined]
