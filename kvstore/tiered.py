"""The store the workers use: tensors in, tensors out, over ordered tiers of encoded blobs.

    put_many ──encode once──> memory ──> disk ──> redis          (write-through, in order)
    get_many <──decode────── memory <── disk <── redis            (read-through, first hit wins;
                                 ^^^^ promote the hit blob ^^^^    no re-encode, no re-checksum)

With a mac_key (StoreConfig.mac_key) every blob carries a keyed MAC and blobs read from a tier
that verifies (disk, Redis) must carry a valid one: a block forged by whoever can write those
tiers is a corrupt block (codec.py).

A tier fault, a corrupt or expired block, or an observer bug is a miss, logged and counted;
none of them reaches the caller. Only caller errors (a tensor dtype the codec cannot carry)
raise, at the boundary. Safe to share between threads: tiers lock their own state, and the
counters here are under one lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TypeVar

import torch

from kvstore.codec import Blob, CorruptBlock, ExpiredBlock, decode, encode, read_expiry
from kvstore.keys import is_tail_key
from kvstore.observer import NullObserver, StoreObserver, TierCounters
from kvstore.tier import Tier

log = logging.getLogger(__name__)
T = TypeVar("T")


class TieredStore:
    def __init__(self, tiers: Sequence[Tier], observer: StoreObserver | None = None,
                 tail_ttl_s: float = 300.0, mac_key: bytes | None = None) -> None:
        assert tiers and len({t.name for t in tiers}) == len(tiers), "tier names must be unique"
        self.tiers = tuple(tiers)
        self._observer = observer if observer is not None else NullObserver()
        self._tail_ttl_s = tail_ttl_s
        self._mac_key = mac_key
        self._lock = threading.Lock()
        self._counters = {t.name: TierCounters() for t in self.tiers}
        self._blocks_hit = 0
        self._blocks_missed = 0
        # Hash blocks only if some tier will verify them (a memory-only store never does).
        self._checksum = any(t.verify for t in self.tiers)
        for tier in self.tiers:
            breaker = getattr(tier, "breaker", None)
            if breaker is not None:
                breaker.set_listener(partial(self._emit, "on_tier_state", tier.name))
            self._emit("on_tier_state", tier.name, tier.up)

    # --- plumbing ----------------------------------------------------------------------------

    def _emit(self, method: str, *args) -> None:
        try:
            getattr(self._observer, method)(*args)
        except Exception:
            log.exception("kvstore observer %s failed", method)

    def _safe(self, tier: Tier, fn: Callable[[], T], default: T) -> T:
        """Tiers do not raise by contract; this keeps a tier bug from reaching a request."""
        try:
            return fn()
        except Exception:
            log.exception("kvstore tier %s raised", tier.name)
            return default

    # --- reads -------------------------------------------------------------------------------

    def lookup_prefix(self, keys: Sequence[str]) -> int:
        """How many leading blocks of `keys` some tier holds; stops at the first miss.

        A hint, not a reservation: a block may be evicted before get_many, which is then a miss.
        """
        found = [False] * len(keys)
        for tier in self.tiers:
            todo = [i for i, hit in enumerate(found) if not hit]
            if not todo:
                break
            want = [keys[i] for i in todo]
            present = self._safe(tier, lambda t=tier, w=want: t.contains(w), [False] * len(want))
            for i, hit in zip(todo, present, strict=True):
                found[i] = hit
        return found.index(False) if False in found else len(found)

    def get_many(self, keys: Sequence[str], borrow: bool = False,
                 retain: bool = True) -> list[torch.Tensor | None]:
        """The block per key (a tensor the caller owns), None where no tier has a good copy.

        borrow=True: the caller only reads the tensors and drops them soon (the engine copies
        them into its cache), so a memory-tier hit may view the tier's buffer instead of
        copying it: one memcpy of the whole prefix less per request.
        retain=False: a hit from a lower tier is not promoted into the memory tier, because the
        caller keeps it (the engine's pool, whose prefix cache finds it again). On a CPU worker
        that copy would be a second one in the same RAM, made on the request's TTFT path, in
        fresh memory (docs/BENCHMARKS.md, "Store block size and the after-restart TTFT").
        Promotion into other tiers (a Redis hit into the disk tier) still happens.
        """
        out: list[torch.Tensor | None] = [None] * len(keys)
        missing = list(range(len(keys)))
        for depth, tier in enumerate(self.tiers):
            if not missing:
                break
            upper = [t for t in self.tiers[:depth] if retain or not t.retains]
            missing = self._read_tier(tier, upper, keys, missing, out, borrow)
        with self._lock:
            self._blocks_hit += len(keys) - len(missing)
            self._blocks_missed += len(missing)
        return out

    def _read_tier(self, tier: Tier, upper: Sequence[Tier], keys: Sequence[str],
                   missing: list[int], out: list[torch.Tensor | None], borrow: bool
                   ) -> list[int]:
        """Fill `out` from one tier, promoting its hits into `upper`; returns the indices
        still missing."""
        want = [keys[i] for i in missing]
        start = time.perf_counter()
        blobs = self._safe(tier, lambda: tier.get_many(want), [None] * len(want))
        seconds = time.perf_counter() - start
        # The returned tensor must not alias a buffer a tier keeps (memory, or a promotion).
        copy = not borrow and (tier.retains or any(t.retains for t in upper))
        still, promote, nbytes = [], {}, 0
        for i, blob in zip(missing, blobs, strict=True):
            tensor = None if blob is None else self._decode(tier, keys[i], blob, copy)
            if tensor is None:
                still.append(i)
                continue
            out[i] = tensor
            nbytes += memoryview(blob).nbytes
            promote[keys[i]] = blob
        self._record_get(tier.name, seconds, nbytes, len(missing) - len(still), len(still))
        if upper and promote:
            self._promote(upper, promote, mapped=tier.maps)
        return still

    def _decode(self, tier: Tier, key: str, blob: Blob, copy: bool) -> torch.Tensor | None:
        try:
            return decode(blob, key, verify=tier.verify, copy=copy, mac_key=self._mac_key)
        except ExpiredBlock:
            with self._lock:
                self._counters[tier.name].expired += 1
        except Exception as exc:  # CorruptBlock, or a decoder bug: either way not servable
            reason = exc.args[0] if isinstance(exc, CorruptBlock) else repr(exc)
            log.warning("kvstore: corrupt block %s in %s (%s); treated as a miss",
                        key, tier.name, reason)
            with self._lock:
                self._counters[tier.name].corrupt += 1
            self._emit("on_corrupt", tier.name)
        self._safe(tier, lambda: tier.delete([key]), None)  # clean up for every reader
        return None

    def _promote(self, upper: Sequence[Tier], blobs: dict[str, Blob], mapped: bool) -> None:
        """Copy hit blobs into the faster tiers, keeping what is left of their TTL. A tier
        that retains blobs gets its own copy of mapped ones (disk.map_file: not kept)."""
        now = time.time()
        groups: dict[float | None, dict[str, Blob]] = {}
        for key, blob in blobs.items():
            expires = read_expiry(blob)
            ttl = max(expires - now, 0.001) if expires else None
            groups.setdefault(ttl, {})[key] = blob
        for tier in upper:
            for ttl, group in groups.items():
                if mapped and tier.retains:
                    group = {key: bytearray(blob) for key, blob in group.items()}
                self._write_tier(tier, group, ttl)

    # --- writes ------------------------------------------------------------------------------

    def put_many(self, blocks: dict[str, torch.Tensor], ttl_s: float | None = None) -> None:
        """Store blocks in every tier. ttl_s=None: tail keys get tail_ttl_s, blocks the tiers'
        defaults. Encoded once; a tier that fails to store is skipped (and logged)."""
        groups: dict[float | None, dict[str, Blob]] = {}
        now = time.time()
        for key, tensor in blocks.items():
            ttl = ttl_s if ttl_s is not None else (
                self._tail_ttl_s if is_tail_key(key) else None)
            expires_at = now + ttl if ttl else 0.0
            groups.setdefault(ttl, {})[key] = encode(key, tensor, expires_at, self._checksum,
                                                     self._mac_key)
        for tier in self.tiers:
            for ttl, group in groups.items():
                self._write_tier(tier, group, ttl)

    def _write_tier(self, tier: Tier, blobs: dict[str, Blob], ttl_s: float | None) -> None:
        start = time.perf_counter()
        stored = self._safe(tier, lambda: tier.put_many(blobs, ttl_s), 0)
        seconds = time.perf_counter() - start
        with self._lock:
            counters = self._counters[tier.name]
            counters.put_calls += 1
            counters.put_bytes += stored
            counters.put_seconds += seconds
        self._emit("on_put", tier.name, seconds, stored)

    def delete(self, keys: Sequence[str]) -> None:
        keys = list(keys)
        for tier in self.tiers:
            self._safe(tier, lambda t=tier: t.delete(keys), None)

    # --- bookkeeping -------------------------------------------------------------------------

    def _record_get(self, tier: str, seconds: float, nbytes: int, hits: int,
                    misses: int) -> None:
        with self._lock:
            counters = self._counters[tier]
            counters.get_calls += 1
            counters.get_bytes += nbytes
            counters.get_seconds += seconds
            counters.hits += hits
            counters.misses += misses
        self._emit("on_get", tier, seconds, nbytes, hits, misses)

    def stats(self) -> dict:
        """{"tiers": {name: counters + tier state}, "hits"/"misses": blocks over all tiers,
        "corrupt_blocks": total}."""
        tier_stats = {t.name: self._safe(t, t.stats, {"up": False}) for t in self.tiers}
        with self._lock:
            for name, counters in self._counters.items():
                tier_stats[name] = {**counters.as_dict(), **tier_stats[name]}
            return {"tiers": tier_stats, "hits": self._blocks_hit,
                    "misses": self._blocks_missed,
                    "corrupt_blocks": sum(c.corrupt for c in self._counters.values())}

    def close(self) -> None:
        for tier in self.tiers:
            self._safe(tier, tier.close, None)

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
