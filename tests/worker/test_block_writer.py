"""The decode worker stores a sequence's completed blocks after delivering the token that
completed them, not before: a prompt's blocks are tens of MB, and copying them inside the
event hook held back the first token of every request in that step."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from decode_worker.service import BlockWriter
from engine.sequence import TokenEvent
from kvstore import KeyChain, KeyNamespace

B = 4  # tokens per block


@dataclass
class FakeEngine:
    kv: dict[str, int]  # seq_id -> kv_len
    exports: list[tuple[int, int]] = field(default_factory=list)
    layout: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(block_size=B))

    def kv_len(self, seq_id: str) -> int:
        return self.kv[seq_id]

    def has(self, seq_id: str) -> bool:
        return seq_id in self.kv

    def export_blocks(self, seq_id: str, first: int, count: int) -> torch.Tensor:
        self.exports.append((first, count))
        return torch.zeros(count, 1, 2, 1, B, 2)  # [n, L, 2, H, B, D]


@dataclass
class FakeWorker:
    """Collects what the writer asks of the runner (deferred calls) and the store."""

    calls: list = field(default_factory=list)
    written: list[str] = field(default_factory=list)

    @property
    def runner(self) -> FakeWorker:
        return self

    def call(self, fn) -> Future:
        fut: Future = Future()
        self.calls.append((fn, fut))
        return fut

    def write_blocks(self, items: dict) -> None:
        self.written.extend(items)

    def run_calls(self, engine: FakeEngine) -> None:
        for fn, fut in self.calls:
            fut.set_result(fn(engine))
        self.calls.clear()


def _writer(worker: FakeWorker, prompt: list[int]) -> BlockWriter:
    return BlockWriter(worker, KeyChain(KeyNamespace("f", "float32", B)), list(prompt), 0)


def test_a_prompts_blocks_are_copied_after_its_first_token_is_handed_on():
    worker, prompt = FakeWorker(), list(range(10))  # 2 full blocks
    engine = FakeEngine({"s": 10})
    w = _writer(worker, prompt)
    ev = TokenEvent(99, seq_id="s")
    assert w.on_event(engine, ev) is ev
    assert engine.exports == [] and worker.written == []  # nothing copied before delivery
    assert len(worker.calls) == 1
    worker.run_calls(engine)  # the runner: between this step and the next
    assert engine.exports == [(0, 2)]
    assert len(worker.written) == 2 and w.written == 2


def test_no_copy_is_queued_until_another_block_completes():
    worker = FakeWorker()
    engine = FakeEngine({"s": 8})
    w = _writer(worker, list(range(8)))
    queued = []
    for i in range(1, 6):  # the i-th token is sampled with 7 + i tokens of KV
        engine.kv["s"] = 7 + i
        w.on_event(engine, TokenEvent(100 + i, seq_id="s"))
        queued.append(len(worker.calls))
        worker.run_calls(engine)
    assert queued == [1, 0, 0, 0, 1]
    assert engine.exports == [(0, 2), (2, 1)]


def test_a_sequence_gone_before_its_copy_stores_nothing():
    worker = FakeWorker()
    engine = FakeEngine({"s": 8})
    w = _writer(worker, list(range(8)))
    w.on_event(engine, TokenEvent(1, seq_id="s"))
    del engine.kv["s"]  # aborted (the client left) before the runner got to it
    worker.run_calls(engine)
    assert engine.exports == [] and worker.written == []


def test_the_last_event_copies_nothing():
    worker = FakeWorker()
    engine = FakeEngine({"s": 8})
    w = _writer(worker, list(range(8)))
    w.on_event(engine, TokenEvent(1, finish_reason="length", seq_id="s"))
    assert worker.calls == []
