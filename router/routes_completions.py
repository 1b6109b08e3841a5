"""POST /v1/completions."""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from router.auth import require_api_key
from router.collect import UsageCounter
from router.deps import CompletionId, JsonBody, RouterState, State
from router.format_completions import CompletionJob, completion_body, completion_chunks
from router.openapi_docs import generation_responses
from router.planning import (
    PromptInput,
    base_seed,
    check_fan_out,
    check_sampling_tokens,
    completion_prompts,
    output_options,
    plan_choices,
    resolve_max_tokens,
)
from router.protocol import CompletionRequest
from router.protocol_responses import CompletionResponse
from router.respond import respond

log = logging.getLogger(__name__)
router = APIRouter(tags=["openai"])


def build_job(body: CompletionRequest, state: RouterState, request_id: str) -> CompletionJob:
    """Everything that can fail on the request's own terms fails here, before any backend call."""
    body.check()
    body.log_unknown_fields()
    model = state.model(body.model)
    prompts = completion_prompts(model, body.prompt)
    n = body.n or 1
    check_fan_out(len(prompts), n)
    check_sampling_tokens(body, model)
    seed = base_seed(body.seed)

    def params_for(prompt: PromptInput):
        budget = resolve_max_tokens(model, len(prompt.token_ids), body.max_tokens, "prompt",
                                    "prompt")
        return body.to_sampling_params(budget, seed, model.vocab_size)

    options = output_options(
        body, model, body.logprobs, drop_output=body.max_tokens == 0,
    )
    plans = plan_choices(request_id, model, prompts, params_for, n, options, body.cache_salt or "")
    log.debug("%s: %d prompt(s) %s", request_id, len(prompts),
              [p.text[: state.settings.max_log_len] if p.text else len(p.token_ids)
               for p in prompts])
    return CompletionJob(request_id, int(time.time()), model, body, prompts, plans)


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses=generation_responses(),
    dependencies=[Depends(require_api_key), JsonBody],
)
async def create_completion(
    body: CompletionRequest, request: Request, state: State, request_id: CompletionId
) -> Response:
    job = build_job(body, state, request_id)
    usage = UsageCounter([len(p.token_ids) for p in job.prompts])
    return await respond(
        request, state, job.model.tokenizer, job.plans, usage,
        stream=bool(body.stream),
        chunks=lambda updates, usage: completion_chunks(job, updates, usage),
        body=lambda results, usage: completion_body(job, results, usage),
    )
