"""POST /v1/completions: prompts to a plan of choices, then the response body or its stream
chunks (echo and logprobs included)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from router.api.body import ThreadParsedRoute
from router.api.openapi_docs import generation_responses
from router.api.planning import (
    PromptInput,
    base_seed,
    check_min_tokens,
    check_prompt_ids,
    check_sampling_tokens,
    checked_guide,
    completion_prompts,
    output_options,
    plan_choices,
    resolve_max_tokens,
)
from router.api.request_limits import (
    at_most,
    check_request_tokens,
    check_shape,
    check_text,
    prompt_count,
)
from router.api.respond import respond
from router.auth import Tenant, require_api_key, tenant_salt
from router.deps import CompletionId, JsonBody, RouterState, State
from router.model_info import ServedModel
from router.output.collect import ChoiceResult, UsageCounter
from router.output.detokenizer import decode_prompt
from router.output.generation import ChoicePlan, ChoiceUpdate, PromptLogprobs, TokenLogprob
from router.output.logprobs import completion_logprobs, echo_logprobs, join_completion_logprobs
from router.protocol.common import Usage
from router.protocol.completions import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)

log = logging.getLogger(__name__)
router = APIRouter(route_class=ThreadParsedRoute, tags=["openai"])


def build_job(
    body: CompletionRequest, state: RouterState, request_id: str, tenant: str | None = None
) -> CompletionJob:
    """Everything that can fail on the request's own terms fails here, before any backend call.
    Tokenizes: call it off the event loop."""
    body.check()
    body.log_unknown_fields()
    model, settings = state.model(body.model), state.settings
    guide = checked_guide(model, body.guide())  # a 400 before anything is tokenized
    num_prompts = prompt_count(body.prompt)
    at_most(num_prompts, settings.max_prompts, "prompt", "prompts")
    check_text(_texts(body.prompt), settings, "prompt")
    check_shape(body, settings, num_prompts, body.logprobs, "logprobs")
    prompts = completion_prompts(model, body.prompt)
    check_sampling_tokens(body, model)
    budgets = [resolve_max_tokens(model, len(p.token_ids), body.max_tokens, "prompt", "prompt")
               for p in prompts]
    check_prompt_ids(model, prompts)  # after the context check: each holds < max_model_len
    check_min_tokens(body.min_tokens, min(budgets))
    n = body.n or 1
    check_request_tokens(settings, [len(p.token_ids) for p in prompts], budgets, n,
                         "max_tokens")
    seed = base_seed(body.seed)
    params = [body.to_sampling_params(b, seed, model.vocab_size, guide) for b in budgets]
    options = output_options(body, model, body.logprobs, drop_output=body.max_tokens == 0)
    plans = plan_choices(request_id, model, prompts, params, n, options,
                         tenant_salt(tenant, body.cache_salt))
    log.debug("%s: %d prompt(s) %s", request_id, len(prompts),
              [p.text[: settings.max_log_len] if p.text else len(p.token_ids) for p in prompts])
    return CompletionJob(request_id, int(time.time()), model, body, prompts, plans)


def _texts(prompt: str | list) -> list[str]:
    """The prompt strings to be tokenized (token-id prompts have none)."""
    if isinstance(prompt, str):
        return [prompt]
    return [p for p in prompt if isinstance(p, str)]


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses=generation_responses(),
    dependencies=[Depends(require_api_key), JsonBody],  # auth first: 401 before 415
)
async def create_completion(
    body: CompletionRequest, request: Request, state: State, request_id: CompletionId,
    tenant: Tenant,
) -> Response:
    # Tokenizing a long prompt takes a while: a thread keeps the event loop (and /health)
    # answering meanwhile.
    job = await asyncio.to_thread(build_job, body, state, request_id, tenant)
    usage = UsageCounter([len(p.token_ids) for p in job.prompts],
                         report_cached=state.settings.report_cached_tokens)
    return await respond(
        request, state, job.model.tokenizer, job.plans, usage,
        stream=bool(body.stream),
        chunks=lambda updates, usage: completion_chunks(job, updates, usage),
        body=lambda results, usage: completion_body(job, results, usage),
    )


@dataclass(slots=True)
class CompletionJob:
    request_id: str
    created: int
    model: ServedModel
    body: CompletionRequest
    prompts: list[PromptInput]
    plans: list[ChoicePlan]
    _echo: dict[int, str] = field(default_factory=dict)  # prompt index -> echoed text

    def echo_text(self, prompt_index: int) -> str:
        """The prompt as written; token-id prompts are decoded (once)."""
        if not self.body.echo:
            return ""
        if prompt_index not in self._echo:
            prompt = self.prompts[prompt_index]
            self._echo[prompt_index] = prompt.text if prompt.text is not None else decode_prompt(
                self.model.tokenizer, prompt.token_ids, self.body.skip_special_tokens is not False
            )
        return self._echo[prompt_index]

    def logprobs(
        self,
        prompt_index: int,
        entries: Sequence[TokenLogprob],
        prompt_logprobs: PromptLogprobs | None,
        with_echo: bool,
        base_offset: int,
    ) -> CompletionLogprobs | None:
        k = self.body.logprobs
        if k is None:
            return None
        parts = []
        if with_echo and self.body.echo:
            skip = self.body.skip_special_tokens is not False
            ids = self.prompts[prompt_index].token_ids
            parts.append(echo_logprobs(self.model, ids, prompt_logprobs, k, skip))
        parts.append(completion_logprobs(self.model, entries, k, base_offset))
        return join_completion_logprobs(parts)

    def envelope(self, choices: list[CompletionChoice], usage: Usage | None) -> CompletionResponse:
        return CompletionResponse(
            id=self.request_id, created=self.created, model=self.model.name, choices=choices,
            usage=usage,
        )


def completion_body(
    job: CompletionJob, results: Sequence[ChoiceResult], usage: UsageCounter
) -> dict[str, Any]:
    choices = []
    for r in results:
        echo = job.echo_text(r.prompt_index)
        choices.append(CompletionChoice(
            index=r.index,
            text=echo + r.text,
            logprobs=job.logprobs(r.prompt_index, r.logprobs, r.prompt_logprobs, True, len(echo)),
            finish_reason=r.finish_reason,  # type: ignore[arg-type]
        ))
    return job.envelope(choices, usage.usage()).model_dump(mode="json")


def _chunk_choice(job: CompletionJob, u: ChoiceUpdate, echo: str) -> CompletionChoice | None:
    """None when the update carries nothing a client could see."""
    with_echo = u.first and bool(job.body.echo)
    text = (echo if with_echo else "") + u.text
    # Offsets count from the start of the choice's text, echo included.
    logprobs = job.logprobs(u.prompt_index, u.logprobs, u.prompt_logprobs, with_echo, len(echo))
    has_logprobs = logprobs is not None and bool(logprobs.tokens)
    if not text and not has_logprobs and u.finish_reason is None:
        return None
    return CompletionChoice(
        index=u.index, text=text, logprobs=logprobs if has_logprobs else None,
        finish_reason=u.finish_reason,  # type: ignore[arg-type]
    )


async def completion_chunks(
    job: CompletionJob, updates: AsyncIterator[ChoiceUpdate], usage: UsageCounter
) -> AsyncIterator[list[dict[str, Any]]]:
    opts = job.body.stream_options
    include_usage = bool(opts and opts.include_usage)
    continuous = include_usage and bool(opts and opts.continuous_usage_stats)
    # OpenAI: with include_usage every chunk has "usage" (null until the last one).
    exclude = None if include_usage else {"usage"}
    try:
        async for u in updates:
            usage.add(u)
            choice = _chunk_choice(job, u, job.echo_text(u.prompt_index))
            if choice is None:
                continue
            chunk = job.envelope([choice], usage.usage() if continuous else None)
            yield [chunk.model_dump(mode="json", exclude=exclude)]
        if include_usage:
            yield [job.envelope([], usage.usage()).model_dump(mode="json")]
    finally:
        await updates.aclose()  # type: ignore[attr-defined]
