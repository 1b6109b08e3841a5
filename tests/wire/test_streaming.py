"""wire/streaming.py's unless_disconnected: work a gone client waited for is cancelled, and a
result that arrives anyway is discarded, never left running."""

from __future__ import annotations

import asyncio

from wire.streaming import unless_disconnected


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
