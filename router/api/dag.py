"""POST /v1/dag: run a DAG of prompts over the served models in one request.

    validate (400 naming the node) -> admit its concurrency (429) -> run (router/api/dag_run.py)
    -> one JSON body, or SSE events per node

Everything the DAG's shape can get wrong (a cycle, a self-dependency, an unknown reference or
model, too many nodes, a template that is not a plain `{{id}}`) is a 400 before any node runs.
What only a rendered prompt can show (it no longer fits the context) is that node's error.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from router.api.dag_run import DagRun
from router.api.openapi_docs import error_responses
from router.api.respond import admit
from router.auth import Tenant, require_api_key
from router.deps import DagId, JsonBody, RouterState, State
from router.errors import APIError
from router.output.streaming import SSE_HEADERS, SSEResponse, sse_body
from router.protocol.common import PromptTokensDetails, Usage
from router.protocol.dag import DagEvent, DagNode, DagNodeResult, DagRequest, DagResponse
from wire.streaming import unless_disconnected
from workflow.dag import DAG, DAGError

router = APIRouter(tags=["workflows"])


def plan_dag(body: DagRequest, state: RouterState, dag_id: str, tenant: str | None) -> DagRun:
    settings = state.settings
    specs = {n.id: n for n in body.nodes}
    try:
        order = DAG([n.node() for n in body.nodes]).validate(settings.dag_max_nodes,
                                                             set(state.models))
    except DAGError as e:
        raise APIError(400, str(e), param=_param(body.nodes, e), code=e.code) from None
    bound = min(body.max_concurrency or settings.dag_max_concurrency,
                settings.dag_max_concurrency, len(order), state.inflight.limit)
    return DagRun(state, dag_id, specs, order, body.on_error, bound, tenant, body.cache_salt)


def _param(nodes: Sequence[DagNode], e: DAGError) -> str:
    """`nodes.<i>` of the offending node (the later one of two with the same id)."""
    index = [i for i, n in enumerate(nodes) if n.id == e.node]
    return f"nodes.{index[-1]}" if index else "nodes"


@router.post(
    "/v1/dag",
    response_model=DagResponse,
    responses=error_responses(400, 401, 413, 415, 429),
    dependencies=[Depends(require_api_key), JsonBody],
)
async def create_dag(body: DagRequest, request: Request, state: State, dag_id: DagId,
                     tenant: Tenant) -> Response:
    """Nodes run in a topological order, independent ones concurrently; `{{id}}` in a node's
    prompt or message is that parent's output. With `stream: true` the body is server-sent
    events, `data: <DagEvent JSON>` each, then `data: [DONE]`."""
    run = plan_dag(body, state, dag_id, tenant)
    admission = admit(state, run.concurrency)
    created = int(time.time())
    headers = {"X-Request-Id": request.state.echo_request_id}
    if body.stream:
        return SSEResponse(sse_body(_stream(run, body, created)), headers=headers | SSE_HEADERS,
                           on_close=admission.release_all,
                           send_timeout_s=state.settings.stream_send_timeout_s)
    try:
        ended = await unless_disconnected(request, _collect(run))
    finally:
        admission.release_all()
    if ended is None:
        return Response(status_code=499)
    return JSONResponse(_response(dag_id, created, body, ended).model_dump(exclude_none=True),
                        headers=headers)


async def _collect(run: DagRun) -> dict[str, DagNodeResult]:
    async with aclosing(run.events()) as events:
        async for _ in events:
            pass
    return run.ended


async def _stream(run: DagRun, body: DagRequest, created: int) -> AsyncIterator[list[dict]]:
    # aclosing: a client that leaves closes this stream, which cancels every running node now.
    async with aclosing(run.events()) as events:
        async for ev in events:
            yield [ev.model_dump(exclude_none=True)]
    done = DagEvent(type="dag.done", dag=_response(run.dag_id, created, body, run.ended))
    yield [done.model_dump(exclude_none=True)]


def _response(dag_id: str, created: int, body: DagRequest,
              ended: dict[str, DagNodeResult]) -> DagResponse:
    nodes = [ended[n.id] for n in body.nodes]
    ran = [n.usage for n in nodes if n.usage is not None]
    prompt = sum(u.prompt_tokens for u in ran)
    completion = sum(u.completion_tokens for u in ran)
    cached = sum(n.cached_tokens for n in nodes)
    usage = Usage(prompt_tokens=prompt, completion_tokens=completion,
                  total_tokens=prompt + completion,
                  prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))
    return DagResponse(id=dag_id, created=created, nodes=nodes, usage=usage)
