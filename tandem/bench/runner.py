"""Drives a plan against a server: sessions, concurrency limit, arrivals, and both bounds.

    session 0: turn 0 ──> turn 1 ──> turn 2        (a session's turns are sequential)
    session 1:    turn 0 ──> turn 1 ──> turn 2     (sessions run concurrently)
                  └── at most `concurrency` requests in flight across all sessions

Bounds: the plan holds at most --num-requests turns; after --max-duration-s no new request
starts, and the ones in flight finish (each capped by --timeout-s) so their latencies are whole.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass

import httpx

from tandem.bench.client import fetch_model, make_client, request_body, send
from tandem.bench.config import BenchConfig, BenchError
from tandem.bench.records import RequestRecord
from tandem.bench.workloads import (
    Conversation,
    Session,
    Turn,
    arrival_delays,
    build_plan,
    count_words,
    plan_size,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LevelResult:
    """One concurrency level: its records (sorted by plan index) and wall time."""

    concurrency: int
    planned: int
    duration_s: float
    records: list[RequestRecord]


@dataclass(slots=True)
class BenchResult:
    config: BenchConfig
    started_at: str
    levels: list[LevelResult]


class LevelRun:
    """Owns the mutable state of one level: the in-flight limit, deadline and records."""

    def __init__(self, client: httpx.AsyncClient, cfg: BenchConfig, concurrency: int):
        self.client, self.cfg, self.concurrency = client, cfg, concurrency
        self.slots = asyncio.Semaphore(concurrency)
        self.records: list[RequestRecord] = []
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + cfg.max_duration_s
        self.last_end = self.t0

    def expired(self) -> bool:
        return time.perf_counter() >= self.deadline

    async def run(self, plan: tuple[Session, ...]) -> LevelResult:
        delays = arrival_delays(len(plan), self.cfg.request_rate, self.cfg.seed)
        await asyncio.gather(*(self._session(s, d) for s, d in zip(plan, delays, strict=True)))
        self.records.sort(key=lambda r: r.index)
        return LevelResult(concurrency=self.concurrency, planned=plan_size(plan),
                           duration_s=self.last_end - self.t0, records=self.records)

    async def _session(self, session: Session, delay_s: float) -> None:
        if delay_s >= self.cfg.max_duration_s:
            return
        # The Poisson arrival schedule itself, not a stand-in for synchronisation.
        await asyncio.sleep(delay_s)
        conversation = Conversation.start(session)
        for position, turn in enumerate(session.turns):
            answer = await self._turn(session, position, turn, conversation)
            if answer is None:
                return  # out of time, or a failed turn: the conversation cannot go on
            if session.carry_history:
                conversation.record_turn(turn.text, answer)

    async def _turn(self, session: Session, position: int, turn: Turn,
                    conversation: Conversation) -> str | None:
        async with self.slots:
            if self.expired():
                return None
            messages = conversation.with_question(turn.text)
            record = RequestRecord(index=turn.index, session=session.index,
                                   turn=position,
                                   prompt_words=count_words(messages), max_tokens=turn.max_tokens)
            record.start_s = time.perf_counter() - self.t0
            body = request_body(self.cfg, self.cfg.model, messages, turn.max_tokens)
            answer = await send(self.client, self.cfg, body, record)
        self.last_end = max(self.last_end, time.perf_counter())
        self.records.append(record)
        if not record.ok:
            log.warning("request %d failed: %s", record.index, record.error)
            return None
        return answer


async def run_benchmark(cfg: BenchConfig) -> BenchResult:
    """Runs one seeded plan per concurrency level, over one HTTP client. Level i draws its
    prompts with seed + i, so a server's prefix cache cannot carry one level's prompts into
    the next (a sweep measures fresh prompts at every level, and reruns stay identical)."""
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    async with make_client(cfg) as client:
        if cfg.model is None:
            model = await fetch_model(client)
            if model is None:
                raise BenchError(f"could not list models at {cfg.base_url}/v1/models; "
                                 "pass --model")
            cfg = dataclasses.replace(cfg, model=model)
        levels = []
        for i, concurrency in enumerate(cfg.concurrency):
            plan = build_plan(dataclasses.replace(cfg, seed=cfg.seed + i))
            log.info("concurrency %d: %d planned requests", concurrency, plan_size(plan))
            level = await LevelRun(client, cfg, concurrency).run(plan)
            log.info("concurrency %d: %d sent in %.2f s", concurrency, len(level.records),
                     level.duration_s)
            levels.append(level)
    return BenchResult(config=cfg, started_at=started_at, levels=levels)
