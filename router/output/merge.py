"""Run several async iterators concurrently and yield their items as they come.

Each source runs in its own task. The first error cancels the rest and is raised; closing the
merged iterator (client gone, stream done) cancels every source, whose own cleanup (closing a
backend iterator) then runs in its task. The cancel is fire-and-forget on purpose: a cancelled
ASGI scope would interrupt any await here, but never the sources' own tasks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


async def _pump(source: AsyncIterator[T], queue: asyncio.Queue) -> None:
    try:
        # aclosing: cancelled while parked in put(), the source is closed now, not at GC.
        async with aclosing(source):  # type: ignore[type-var]
            async for item in source:
                await queue.put((item, None))
    except Exception as exc:  # handed to the consumer, which raises it
        await queue.put((None, exc))
    else:
        await queue.put((_DONE, None))


async def merge(
    sources: Sequence[AsyncIterator[T]],
    idle_timeout_s: float | None = None,
    on_idle: Callable[[], Exception] = TimeoutError,
) -> AsyncIterator[T]:
    """`on_idle()` is raised when no source yields anything for `idle_timeout_s`. The wait is
    on the queue, never inside a source: a source is only ever resumed by its own task."""
    # A bounded queue keeps backpressure: a slow client slows the sources down.
    queue: asyncio.Queue = asyncio.Queue(maxsize=max(1, len(sources)))
    tasks = [asyncio.ensure_future(_pump(s, queue)) for s in sources]
    remaining = len(tasks)
    try:
        while remaining:
            try:
                # Not wait_for: on 3.11 it can swallow a cancel that lands as get() completes,
                # and a cancelled request would then run on.
                async with asyncio.timeout(idle_timeout_s):
                    item, exc = await queue.get()
            except TimeoutError:
                raise on_idle() from None
            if exc is not None:
                raise exc
            if item is _DONE:
                remaining -= 1
                continue
            yield item
    finally:
        for task in tasks:
            task.cancel()
