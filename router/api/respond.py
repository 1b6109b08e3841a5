"""Run a request's choices and answer: one JSON body, or an SSE stream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from transformers import PreTrainedTokenizerBase

from router.deps import RouterState
from router.dispatch.backend import Admission
from router.errors import RequestTimedOut, bad_request
from router.output.collect import ChoiceResult, UsageCounter, collect
from router.output.generation import ChoicePlan, ChoiceUpdate, choice_events, run_choice
from router.output.merge import merge
from router.output.streaming import SSE_HEADERS, SSEResponse, prime, sse_body
from wire.streaming import unless_disconnected

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
    settings = state.settings
    admission = admit(state, len(plans))
    updates = merged_updates(state, [admission.hold(u) for u in choice_updates(
        state, tokenizer, plans)])
    if stream:
        try:
            # The first update can take a whole prefill: a client that leaves meanwhile
            # cancels it (the server would not notice before the first send).
            primed = await unless_disconnected(request, prime(updates),
                                               discard=lambda stream: stream.aclose())
        except BaseException:
            admission.release_all()
            raise
        if primed is None:
            admission.release_all()
            return Response(status_code=499)
        return SSEResponse(sse_body(chunks(primed, usage)), headers=headers | SSE_HEADERS,
                           on_close=admission.release_all,
                           send_timeout_s=settings.stream_send_timeout_s)
    try:
        results = await unless_disconnected(request, collect(updates, len(plans), usage))
    finally:
        admission.release_all()  # a choice never started gives its unit back here
    if results is None:
        return Response(status_code=499)  # nobody is listening; nginx's "client closed"
    return JSONResponse(body(results, usage), headers=headers)


def choice_updates(state: RouterState, tokenizer: PreTrainedTokenizerBase,
                   plans: Sequence[ChoicePlan]) -> list[AsyncIterator[ChoiceUpdate]]:
    """Each choice's text updates, its backend calls not started until iterated."""
    events = choice_events(state.backend, plans, state.settings.choices_per_call)
    return [run_choice(ev, plan, tokenizer) for ev, plan in zip(events, plans, strict=True)]


def merged_updates(state: RouterState, sources: Sequence[AsyncIterator[ChoiceUpdate]]
                   ) -> AsyncIterator[ChoiceUpdate]:
    """All choices at once, as they come; 504 when every one is silent too long."""
    timeout = state.settings.request_timeout_s
    return merge(sources, idle_timeout_s=timeout, on_idle=lambda: RequestTimedOut(timeout))


def admit(state: RouterState, choices: int) -> Admission:
    """The request's choices against the app's in-flight bound: all of them, or 429 before
    any backend call. One that could never fit is the client's error (400), not a retry."""
    limit = state.inflight.limit
    if choices > limit:
        raise bad_request(f"this request runs {choices} choices at once; the server runs at "
                          f"most {limit}", "n", "integer_above_max_value")
    return state.inflight.admit(choices)
