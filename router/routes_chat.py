"""POST /v1/chat/completions."""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from router.auth import require_api_key
from router.chat import chat_prompt_ids
from router.collect import UsageCounter
from router.deps import ChatId, JsonBody, RouterState, State
from router.errors import bad_request
from router.format_chat import ChatJob, chat_body, chat_chunks
from router.openapi_docs import generation_responses
from router.planning import (
    PromptInput,
    base_seed,
    check_fan_out,
    check_sampling_tokens,
    output_options,
    plan_choices,
    resolve_max_tokens,
)
from router.protocol import ChatCompletionRequest
from router.protocol_responses import ChatCompletionResponse
from router.respond import respond

log = logging.getLogger(__name__)
router = APIRouter(tags=["openai"])


def build_chat_job(body: ChatCompletionRequest, state: RouterState, request_id: str) -> ChatJob:
    """Everything that can fail on the request's own terms fails here, before any backend call."""
    body.check()
    body.log_unknown_fields()
    model = state.model(body.model)
    ids = chat_prompt_ids(
        model.tokenizer, body.messages, body.add_generation_prompt, body.continue_final_message
    )
    if not ids:
        raise bad_request("The messages render to an empty prompt.", "messages")
    n = body.n or 1
    check_fan_out(1, n)
    check_sampling_tokens(body, model)
    # Omitted max tokens: whatever the context window has left after the prompt.
    budget = resolve_max_tokens(model, len(ids), body.requested_max_tokens(), "messages",
                                "messages")
    params = body.to_sampling_params(budget, base_seed(body.seed), model.vocab_size)
    options = output_options(
        body, model, params.logprobs, drop_output=False,
    )
    plans = plan_choices(
        request_id, model, [PromptInput(ids)], lambda _: params, n, options,
        body.cache_salt or "",
    )
    log.debug("%s: chat prompt of %d tokens", request_id, len(ids))
    return ChatJob(request_id, int(time.time()), model, body, len(ids), plans)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses=generation_responses(),
    dependencies=[Depends(require_api_key), JsonBody],
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, state: State, request_id: ChatId
) -> Response:
    job = build_chat_job(body, state, request_id)
    return await respond(
        request, state, job.model.tokenizer, job.plans, UsageCounter([job.prompt_len]),
        stream=bool(body.stream),
        chunks=lambda updates, usage: chat_chunks(job, updates, usage),
        body=lambda results, usage: chat_body(job, results, usage),
    )
