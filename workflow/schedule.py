"""Which nodes of a validated DAG may start now, given which have ended.

Both executors drive this one state machine: the router's (`POST /v1/dag`, async, nodes as
backend calls) and the in-process `LLM` (one engine, nodes as sequences of one batch). Neither
decides on its own what runs next, so both run the same nodes in the same order.

    pending --start()--> running --succeed()--> done
                                 \\-fail()-----> failed
    pending --(a parent failed, or fail_fast)--> skipped
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from workflow.dag import Node, OnError


@dataclass(slots=True)
class Schedule:
    order: Sequence[Node]  # topological (DAG.validate)
    on_error: OnError = "fail_fast"
    outputs: dict[str, str] = field(default_factory=dict)  # done node -> its text
    failed: set[str] = field(default_factory=set)
    skipped: set[str] = field(default_factory=set)
    running: set[str] = field(default_factory=set)
    _pending: list[Node] = field(init=False)

    def __post_init__(self) -> None:
        self._pending = list(self.order)

    def start(self, limit: int) -> list[Node]:
        """Up to `limit` nodes whose parents have all succeeded (topological order); they count
        as running until succeed() or fail(). The executor fills in each one's references
        (`node.rendered(schedule.outputs, ...)`), where a failure is that node's."""
        ready = [n for n in self._pending if all(p in self.outputs for p in n.parents)]
        ready = ready[:max(0, limit)]
        for node in ready:
            self._pending.remove(node)
            self.running.add(node.id)
        return ready

    def succeed(self, node_id: str, text: str) -> None:
        self.running.discard(node_id)
        self.outputs[node_id] = text

    def fail(self, node_id: str) -> list[str]:
        """Record a failure; returns the pending nodes it skips: its descendants, or with
        fail_fast every pending node (running ones are the executor's to cancel)."""
        self.running.discard(node_id)
        self.failed.add(node_id)
        bad = self.failed | self.skipped
        dropped = []
        for node in self._pending:  # topological: a parent is decided before its children
            if self.on_error == "fail_fast" or any(p in bad for p in node.parents):
                dropped.append(node)
                bad.add(node.id)
        for node in dropped:
            self._pending.remove(node)
            self.skipped.add(node.id)
        return [n.id for n in dropped]

    def cancel(self, node_id: str) -> None:
        """A running node the executor stopped (fail_fast): it counts as skipped."""
        self.running.discard(node_id)
        self.skipped.add(node_id)

    @property
    def stopped(self) -> bool:
        """fail_fast and something failed: the executor cancels what still runs."""
        return self.on_error == "fail_fast" and bool(self.failed)

    @property
    def finished(self) -> bool:
        return not self._pending and not self.running
