"""Load for fault tests: threads that put and get known blocks through one store until stopped,
checking every block read back: the exact bits, or a miss, never other bytes.

    with Churn(store, blocks) as churn:
        churn.wait_rounds(5)        # loaded
        server.kill()               # the fault under test
        churn.wait_rounds(20)       # and more load after it
    assert churn.wrong == 0
"""

from __future__ import annotations

import random
import threading
import time

import torch

from tests.kvstore.helpers import bit_equal
from tests.redis_topology import poll

BATCH = 8  # keys per get; half as many per put


class Churn:
    def __init__(self, store, blocks: dict[str, torch.Tensor], threads: int = 2) -> None:
        self._store = store
        self._blocks = blocks
        self._keys = list(blocks)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(seed,), daemon=True)
                         for seed in range(threads)]
        self.rounds = self.hits = self.misses = self.wrong = 0
        self.errors: list[BaseException] = []

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not self._stop.is_set():
                self._round(rng)
        except BaseException as exc:  # a raise is a failure too: the store must never raise
            with self._lock:
                self.errors.append(exc)

    def _round(self, rng: random.Random) -> None:
        put = rng.sample(self._keys, BATCH // 2)
        self._store.put_many({k: self._blocks[k] for k in put})
        want = rng.sample(self._keys, BATCH)
        got = self._store.get_many(want)
        hits = sum(g is not None for g in got)
        wrong = sum(g is not None and not bit_equal(g, self._blocks[k])
                    for k, g in zip(want, got, strict=True))
        with self._lock:
            self.rounds += 1
            self.hits += hits
            self.misses += len(want) - hits
            self.wrong += wrong

    def wait_rounds(self, more: int, timeout_s: float = 60.0) -> None:
        """Until `more` further rounds have finished (the load is moving)."""
        target = self.rounds + more
        poll(lambda: self.rounds >= target or self.errors, timeout_s, f"{more} rounds of load")
        assert not self.errors, self.errors

    def __enter__(self) -> Churn:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        deadline = time.monotonic() + 30
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), "a load thread hung"
        assert not self.errors, self.errors
