"""Run a request's choices and answer: one JSON body, or an SSE stream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from transformers import PreTrainedTokenizerBase

from router.deps import RouterState
from router.errors import RequestTimedOut
from router.output.collect import ChoiceResult, UsageCounter, collect
from router.output.generation import ChoicePlan, ChoiceUpdate, run_choice
from router.output.merge import merge
from router.output.streaming import SSE_HEADERS, SSEResponse, prime, sse_body, unless_disconnected

ChunkFormatter = Callable[
    [AsyncIterator[ChoiceUpdate], UsageCounter], AsyncIterator[list[dict[str, Any]]]
]
BodyFormatter = Callable[[Sequence[ChoiceResult], UsageCounter], dict[str, Any]]


async def respond(
    request: Request,
    state: RouterState,
    tokenizer: PreTrainedTokenizerBase,
    plans: Sequence[ChoicePlan],
    usage: UsageCounter,
    *,
    stream: bool,
    chunks: ChunkFormatter,
    body: BodyFormatter,
) -> Response:
    """All choices run concurrently. A stream waits for its first update before the 200, so a
    backend refusal (429/503) is still an HTTP status."""
    headers = {"X-Request-Id": request.state.echo_request_id}  # router/deps.py
    # The metrics middleware reads these once the response is sent (router/metrics.py).
    request.state.usage, request.state.plans = usage, plans
    timeout = state.settings.request_timeout_s
    updates = merge(
        [run_choice(state.backend, plan, tokenizer) for plan in plans],
        idle_timeout_s=timeout, on_idle=lambda: RequestTimedOut(timeout),
    )
    if stream:
        primed = await prime(updates)
        return SSEResponse(sse_body(chunks(primed, usage)), headers=headers | SSE_HEADERS)
    results = await unless_disconnected(request, collect(updates, len(plans), usage))
    if results is None:
        return Response(status_code=499)  # nobody is listening; nginx's "client closed"
    return JSONResponse(body(results, usage), headers=headers)
