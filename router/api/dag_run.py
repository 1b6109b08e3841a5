"""Runs a validated DAG against the backend: the schedule (workflow/schedule.py) says which
nodes may start; each runs as the completion or chat request it stands for; events come out
in the order things happen.

    DagRun.events():  node.started(a) node.started(b) node.delta(a) ... node.done(a)
                      node.started(c, rendered with a's text) ... node.error(b) ...

Nodes whose parents are done run concurrently, up to the DAG's bound. A node's own failure
(its rendered prompt is too long, a backend error) is that node's `node.error`; with
`fail_fast` the nodes still running are cancelled and the rest skipped, with `continue` only
its descendants are skipped. Closing the event iterator (the client left) cancels every node.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from router.api.chat import build_chat_job
from router.api.completions import build_job
from router.api.respond import choice_updates, merged_updates
from router.deps import RouterState
from router.errors import api_error_from, bad_request
from router.output.collect import UsageCounter
from router.protocol.chat import ChatCompletionRequest
from router.protocol.common import ErrorDetail
from router.protocol.dag import DagEvent, DagNode, DagNodeResult, DagTimings
from workflow.dag import Node, OnError
from workflow.schedule import Schedule
from workflow.template import TemplateError


@dataclass(slots=True)
class DagRun:
    state: RouterState
    dag_id: str  # ours (dag-<uuid>): node request ids are `<dag_id>-<node id>`
    specs: dict[str, DagNode]
    order: Sequence[Node]  # DAG.validate's topological order
    on_error: OnError
    concurrency: int
    tenant: str | None
    cache_salt: str | None
    ended: dict[str, DagNodeResult] = field(default_factory=dict)  # node id -> how it ended

    async def events(self) -> AsyncIterator[DagEvent]:
        """Every event, in order; each node's last one is also kept in `ended`."""
        async with aclosing(self._events()) as events:
            async for ev in events:
                if ev.node is not None:
                    self.ended[ev.id] = ev.node
                yield ev

    async def _events(self) -> AsyncIterator[DagEvent]:
        schedule = Schedule(self.order, self.on_error)
        # Bounded: a client that reads slowly slows the nodes down rather than growing this.
        queue: asyncio.Queue[DagEvent] = asyncio.Queue(maxsize=64)
        tasks: dict[str, asyncio.Task] = {}
        start = time.perf_counter()
        try:
            while not schedule.finished:
                for node in schedule.start(self.concurrency - len(schedule.running)):
                    yield DagEvent(type="node.started", id=node.id)
                    tasks[node.id] = asyncio.create_task(
                        self._run(node, schedule.outputs, start, queue))
                ev = await queue.get()
                yield ev
                if ev.type == "node.done":
                    tasks.pop(ev.id)
                    schedule.succeed(ev.id, ev.node.text)
                elif ev.type == "node.error":
                    tasks.pop(ev.id)
                    for skipped in schedule.fail(ev.id):
                        yield self._ended(skipped, "skipped", f"not run: node {ev.id!r} failed")
                    if schedule.stopped:
                        for nid in list(tasks):
                            tasks[nid].cancel()
                            schedule.cancel(nid)
                            yield self._ended(nid, "cancelled", f"cancelled: node {ev.id!r} "
                                              "failed (on_error is fail_fast)")
                        # Their backend streams are closed before the response ends.
                        await asyncio.gather(*tasks.values(), return_exceptions=True)
                        tasks.clear()
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)

    def _ended(self, node_id: str, status: str, message: str) -> DagEvent:
        error = ErrorDetail(message=message, type="invalid_request_error", code=status)
        return DagEvent(type="node.error", id=node_id, node=DagNodeResult(
            id=node_id, model=self._model(node_id), status=status, error=error))

    def _model(self, node_id: str) -> str:
        return self.state.model(self.specs[node_id].model).name

    async def _run(self, node: Node, outputs: dict[str, str], dag_start: float,
                   queue: asyncio.Queue) -> None:
        """One node, start to end; every outcome but cancellation is an event on `queue`."""
        started, first = time.perf_counter(), None
        try:
            result, first = await self._generate(self._render(node, outputs), queue)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the node's failure, reported as its event
            err = api_error_from(exc)
            result = DagNodeResult(id=node.id, model=self._model(node.id), status="failed",
                                   error=ErrorDetail(**err.body()["error"]))
        result.timings = DagTimings(
            started_s=started - dag_start, total_s=time.perf_counter() - started,
            ttft_s=None if first is None else first - started)
        kind = "node.done" if result.status == "done" else "node.error"
        await queue.put(DagEvent(type=kind, id=node.id, node=result))

    def _render(self, node: Node, outputs: dict[str, str]) -> Node:
        """Its parents' text filled in, within the router's text limit (checked before the
        text is built: see workflow/template.py)."""
        try:
            return node.rendered(outputs, self.state.settings.max_text_chars)
        except TemplateError as e:
            param = "messages" if node.messages is not None else "prompt"
            raise bad_request(str(e), param, "string_above_max_length") from None

    async def _generate(self, node: Node, queue: asyncio.Queue
                        ) -> tuple[DagNodeResult, float | None]:
        """The node's result and when its first update came (perf_counter; None: none)."""
        spec, state = self.specs[node.id], self.state
        model = self._model(node.id)
        body = spec.request(node, model, self.cache_salt)
        request_id = f"{self.dag_id}-{node.id}"
        if isinstance(body, ChatCompletionRequest):
            job = await asyncio.to_thread(build_chat_job, body, state, request_id, self.tenant)
            prompt_lens = [job.prompt_len]
        else:
            job = await asyncio.to_thread(build_job, body, state, request_id, self.tenant)
            prompt_lens = [len(p.token_ids) for p in job.prompts]
        usage = UsageCounter(prompt_lens, state.settings.report_cached_tokens)
        updates = merged_updates(state, choice_updates(state, job.model.tokenizer, job.plans))
        parts: list[str] = []
        finish = None
        async with aclosing(updates):
            async for u in updates:
                usage.add(u)
                finish = u.finish_reason or finish
                if u.text:
                    parts.append(u.text)
                    await queue.put(DagEvent(type="node.delta", id=node.id, delta=u.text))
        told = usage.usage()
        return DagNodeResult(
            id=node.id, model=model, status="done", text="".join(parts), finish_reason=finish,
            usage=told, cached_tokens=told.prompt_tokens_details.cached_tokens,
        ), usage.first_update_at
