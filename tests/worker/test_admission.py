"""A worker's bounded admission: 429 past capacity (except resumes), 503 while draining, and
tickets that come back exactly once."""

from __future__ import annotations

import asyncio

from worker.admission import Admission


def test_capacity_then_429_with_retry_after():
    adm = Admission(capacity=2)
    tickets = [adm.admit(), adm.admit()]
    refused = adm.refusal()
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert adm.refusal(resume=True) is None  # a half-delivered stream is never refused
    tickets[0].release()
    tickets[0].release()  # idempotent: every exit path may release
    assert adm.active == 1 and adm.refusal() is None


def test_draining_refuses_everything_with_503_and_waits_for_idle():
    adm = Admission(capacity=8)
    ticket = adm.admit()
    adm.draining = True
    assert adm.refusal().status_code == 503
    assert adm.refusal(resume=True).status_code == 503

    async def main() -> tuple[bool, bool]:
        early = await adm.wait_idle(0.05)
        asyncio.get_running_loop().call_later(0.05, ticket.release)
        return early, await adm.wait_idle(5)

    assert asyncio.run(main()) == (False, True)
