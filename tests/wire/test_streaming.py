"""wire/streaming.py's unless_disconnected: work a gone client waited for is cancelled, and a
result that arrives anyway is discarded, never left running. with_keepalive: a stream with
nothing to say sends blank lines, and closing it closes what it wraps."""

from __future__ import annotations

import asyncio

import pytest

from wire.streaming import unless_disconnected, with_keepalive


class FakeRequest:
    """A request whose next receive() is the disconnect once `gone` is set."""

    def __init__(self):
        self.gone = asyncio.Event()
        self.url = type("U", (), {"path": "/x"})()

    async def receive(self) -> dict:
        await self.gone.wait()
        return {"type": "http.disconnect"}


def test_work_that_ends_first_gives_its_result():
    async def go():
        return await unless_disconnected(FakeRequest(), asyncio.sleep(0, result=7))
    assert asyncio.run(go()) == 7


def test_a_disconnect_cancels_the_work():
    cancelled = []

    async def work():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def go():
        req = FakeRequest()
        asyncio.get_running_loop().call_later(0.01, req.gone.set)
        return await unless_disconnected(req, work())
    assert asyncio.run(go()) is None and cancelled == [True]


def test_a_result_that_beats_the_cancel_is_discarded():
    """The race asyncio.wait_for loses on 3.11: the work finishes despite the cancel."""
    discarded = []

    async def stubborn():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            return "primed stream"  # finished anyway

    async def discard(result):
        discarded.append(result)

    async def go():
        req = FakeRequest()
        asyncio.get_running_loop().call_later(0.01, req.gone.set)
        return await unless_disconnected(req, stubborn(), discard=discard)
    assert asyncio.run(go()) is None and discarded == ["primed stream"]


def test_keepalive_fills_silence_and_passes_every_line():
    async def go():
        gate, seen = asyncio.Event(), []

        async def source():
            yield "a\n"
            await gate.wait()  # silent until the reader has had a keepalive
            yield "b\n"

        lines = with_keepalive(source(), every_s=0.01)
        seen.append(await anext(lines))
        seen.append(await anext(lines))  # the source is blocked: only a keepalive can come
        gate.set()
        seen.extend([line async for line in lines])
        return seen
    seen = asyncio.run(go())
    assert seen[:2] == ["a\n", "\n"]
    assert [line for line in seen if line.strip()] == ["a\n", "b\n"]


def test_closing_keepalive_stops_the_source_it_was_waiting_on():
    """The engine stream behind a worker reply aborts its sequence in its finally: closing the
    reply mid-wait must reach it, not leave it blocked forever."""
    async def go():
        ended = []

        async def source():
            try:
                yield "a\n"
                await asyncio.Event().wait()  # never
                yield "never\n"
            finally:
                ended.append(True)

        lines = with_keepalive(source(), every_s=0.01)
        assert await anext(lines) == "a\n"
        assert await anext(lines) == "\n"  # the source is now parked in its wait
        await lines.aclose()
        return ended
    assert asyncio.run(go()) == [True]


def test_keepalive_raises_the_sources_error():
    async def go():
        async def source():
            yield "a\n"
            raise RuntimeError("engine failed")

        return [line async for line in with_keepalive(source(), every_s=10)]
    with pytest.raises(RuntimeError, match="engine failed"):
        asyncio.run(go())


def test_no_keepalive_while_the_work_makes_no_progress():
    """A worker's keepalive asks its engine: a hung engine sends nothing, so the router's read
    timeout still fails the call over."""
    async def go():
        calls = []

        def alive() -> bool:
            calls.append(True)
            return len(calls) >= 3  # stalled for two intervals, then progressing

        async def source():
            await asyncio.Event().wait()  # never
            yield "never\n"

        lines = with_keepalive(source(), every_s=0.01, alive=alive)
        try:
            return await anext(lines), len(calls)
        finally:
            await lines.aclose()
    assert asyncio.run(go()) == ("\n", 3)
