"""POST /v1/chat/completions: messages through the chat template to a plan of choices, then
the response body or its stream chunks."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from router.api.body import ThreadParsedRoute
from router.api.chat_prompt import chat_prompt_ids
from router.api.openapi_docs import generation_responses
from router.api.planning import (
    PromptInput,
    base_seed,
    check_min_tokens,
    check_sampling_tokens,
    checked_guide,
    output_options,
    plan_choices,
    resolve_max_tokens,
)
from router.api.request_limits import at_most, check_request_tokens, check_shape, check_text
from router.api.respond import respond
from router.auth import Tenant, require_api_key, tenant_salt
from router.deps import ChatId, JsonBody, RouterState, State
from router.errors import bad_request
from router.model_info import ServedModel
from router.output.collect import ChoiceResult, UsageCounter
from router.output.generation import ChoicePlan, ChoiceUpdate
from router.output.logprobs import chat_logprobs
from router.output.tool_calls import ToolCallStream, parse_answer
from router.protocol.chat import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessage,
)
from router.protocol.common import Usage
from router.settings import RouterSettings

log = logging.getLogger(__name__)
router = APIRouter(route_class=ThreadParsedRoute, tags=["openai"])


def build_chat_job(
    body: ChatCompletionRequest, state: RouterState, request_id: str, tenant: str | None = None
) -> ChatJob:
    """Everything that can fail on the request's own terms fails here, before any backend call.
    Renders the template and tokenizes: call it off the event loop."""
    body.check()
    body.log_unknown_fields()
    model, settings = state.model(body.model), state.settings
    check_messages(body.messages, settings)
    top = (body.top_logprobs or 0) if body.logprobs else None
    check_shape(body, settings, 1, top, "top_logprobs")
    mode = body.tool_mode()
    guide = checked_guide(model, body.output_guide())  # a 400 before templating
    ids = chat_prompt_ids(
        model.tokenizer, body.messages, body.add_generation_prompt, body.continue_final_message,
        tools=None if mode == "none" else body.tools,
    )
    if not ids:
        raise bad_request("The messages render to an empty prompt.", "messages")
    check_sampling_tokens(body, model)
    # Omitted max tokens: whatever the context window has left after the prompt.
    budget = resolve_max_tokens(model, len(ids), body.requested_max_tokens(), "messages",
                                "messages")
    check_min_tokens(body.min_tokens, budget)
    n = body.n or 1
    check_request_tokens(settings, [len(ids)], [budget], n, "max_completion_tokens")
    params = body.to_sampling_params(budget, base_seed(body.seed), model.vocab_size, guide)
    options = output_options(body, model, params.logprobs, drop_output=False)
    plans = plan_choices(
        request_id, model, [PromptInput(ids)], [params], n, options,
        tenant_salt(tenant, body.cache_salt),
    )
    log.debug("%s: chat prompt of %d tokens", request_id, len(ids))
    return ChatJob(request_id, int(time.time()), model, body, len(ids), plans, mode)


def check_messages(messages: Sequence[ChatMessage], settings: RouterSettings) -> None:
    """How many, and how much text to template and tokenize (/tokenize's too)."""
    at_most(len(messages), settings.max_messages, "messages", "messages")
    check_text((m.text() for m in messages), settings, "messages")


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses=generation_responses(),
    dependencies=[Depends(require_api_key), JsonBody],  # auth first: 401 before 415
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, state: State, request_id: ChatId,
    tenant: Tenant,
) -> Response:
    # Templating and tokenizing a long conversation takes a while: a thread keeps the event
    # loop (and /health) answering meanwhile.
    job = await asyncio.to_thread(build_chat_job, body, state, request_id, tenant)
    return await respond(
        request, state, job.model.tokenizer, job.plans,
        UsageCounter([job.prompt_len], state.settings.report_cached_tokens),
        stream=bool(body.stream),
        chunks=lambda updates, usage: chat_chunks(job, updates, usage),
        body=lambda results, usage: chat_body(job, results, usage),
    )


@dataclass(slots=True)
class ChatJob:
    request_id: str
    created: int
    model: ServedModel
    body: ChatCompletionRequest
    prompt_len: int
    plans: list[ChoicePlan]
    tool_mode: str = "none"  # "none", "auto", "required" or the forced function's name

    def chunk(self, choices: list[ChatChunkChoice], usage: Usage | None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model.name, choices=choices,
            usage=usage,
        )


def chat_body(job: ChatJob, results: Sequence[ChoiceResult], usage: UsageCounter) -> dict:
    choices = [_choice(job, r) for r in results]
    response = ChatCompletionResponse(
        id=job.request_id, created=job.created, model=job.model.name, choices=choices,
        usage=usage.usage(),
    )
    return response.model_dump(mode="json")


def _choice(job: ChatJob, r: ChoiceResult) -> ChatChoice:
    message, calls = AssistantMessage(content=r.text), 0
    if job.tool_mode != "none":
        parsed = parse_answer(job.tool_mode, r.text)
        message = AssistantMessage(content=parsed.content, tool_calls=parsed.calls or None)
        calls = len(parsed.calls)
    return ChatChoice(
        index=r.index,
        message=message,
        logprobs=chat_logprobs(job.model, r.logprobs) if job.body.logprobs else None,
        finish_reason=_finish_reason(job, r.finish_reason, calls),  # type: ignore[arg-type]
    )


def _finish_reason(job: ChatJob, reason: str | None, calls: int) -> str | None:
    """"tool_calls" when the model chose to call ("auto", "required"); a forced function's
    call ends with "stop", as OpenAI's does."""
    if reason == "stop" and calls and job.tool_mode in ("auto", "required"):
        return "tool_calls"
    return reason


def _chunk_choice(job: ChatJob, u: ChoiceUpdate, tools: ToolCallStream | None
                  ) -> ChatChunkChoice | None:
    """None when the update carries nothing a client could see."""
    logprobs = chat_logprobs(job.model, u.logprobs) if u.logprobs else None
    text, calls = u.text, []
    if tools is not None:
        text, calls = tools.feed(u.text)
        if u.finish_reason is not None:
            more_text, more_calls = tools.finish()
            text, calls = text + more_text, calls + more_calls
    if not text and not calls and logprobs is None and u.finish_reason is None:
        return None
    reason = _finish_reason(job, u.finish_reason, tools.num_calls if tools else 0)
    return ChatChunkChoice(
        index=u.index,
        delta=ChatDelta(content=text or None, tool_calls=calls or None),
        logprobs=logprobs,
        finish_reason=reason,  # type: ignore[arg-type]
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

    tools = {p.index: ToolCallStream(job.tool_mode) for p in job.plans
             if job.tool_mode != "none"}
    try:
        # Every choice opens with the assistant role (and empty content), as OpenAI's do.
        yield [dump(ChatChunkChoice(index=p.index, delta=ChatDelta(role="assistant", content="")))
               for p in job.plans]
        async for u in updates:
            usage.add(u)
            choice = _chunk_choice(job, u, tools.get(u.index))
            if choice is not None:
                yield [dump(choice)]
        if include_usage:
            yield [job.chunk([], usage.usage()).model_dump(mode="json")]
    finally:
        await updates.aclose()  # type: ignore[attr-defined]
