"""StoreConfig (one dataclass the services fill from their TANDEM_* settings) and build_store.

    tiers = "memory"               one process, nothing shared
            "memory+disk"          embedded default: one host, survives restarts
            "memory+disk+redis"    disaggregated: Redis carries blocks across hosts and deaths
            "memory+redis"         disaggregated without local disk
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvstore.breaker import Breaker
from kvstore.disk import DiskTier
from kvstore.memory import MemoryTier
from kvstore.observer import StoreObserver
from kvstore.redis_tier import RedisTier
from kvstore.tier import Tier
from kvstore.tiered import TieredStore

# Without "memory": the router's prefix lookups, which only consult tiers other processes share.
TIER_CHOICES = ("memory", "memory+disk", "memory+disk+redis", "memory+redis",
                "disk", "disk+redis", "redis")
GiB = 1 << 30


@dataclass(frozen=True, slots=True)
class StoreConfig:
    tiers: str = "memory+disk"
    memory_bytes: int = 1 * GiB  # ~2,900 SmolLM2 blocks of 16 tokens in bf16 (368 KB each)
    disk_path: str = "~/.cache/tandem/kvstore"
    disk_bytes: int = 16 * GiB
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_ttl_s: float = 3600.0  # blocks live an hour in Redis unless used (0 = no TTL)
    redis_timeout_s: float = 0.5  # per socket operation: a dead server costs at most this
    tail_ttl_s: float = 300.0  # a request's partial tail: long enough to resume after failover
    backoff_s: float = 0.5  # first wait before probing a down tier; doubles per failure
    max_backoff_s: float = 30.0
    disk_rescan_s: float = 30.0  # how often to re-read a shared directory's state
    cluster_id: str = "default"  # every Redis key lives under it: stacks sharing a Redis never meet
    # derive_mac_key(secret): blobs carry a keyed MAC that reads demand; None = xxh3 only.
    # repr=False: the key must not reach a log line that prints the config.
    mac_key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.tiers not in TIER_CHOICES:
            raise ValueError(f"tiers must be one of {TIER_CHOICES}, got {self.tiers!r}")
        for name in ("memory_bytes", "disk_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.redis_timeout_s <= 0 or self.backoff_s <= 0:
            raise ValueError("redis_timeout_s and backoff_s must be positive")
        if self.redis_ttl_s < 0 or self.tail_ttl_s < 0:
            raise ValueError("TTLs must be >= 0")
        if self.mac_key is not None and not 16 <= len(self.mac_key) <= 64:  # BLAKE2b's key limit
            raise ValueError("mac_key must be 16..64 bytes (use derive_mac_key)")

    @property
    def tier_names(self) -> tuple[str, ...]:
        return tuple(self.tiers.split("+"))


def build_store(config: StoreConfig, observer: StoreObserver | None = None,
                clock: Callable[[], float] = time.monotonic) -> TieredStore:
    """The configured store. Never fails because Redis or the disk is unavailable right now
    (the tier starts down and is probed later); a malformed redis_url raises ValueError."""
    tiers: list[Tier] = []
    for name in config.tier_names:
        breaker = Breaker(f"kvstore tier {name}", config.backoff_s, config.max_backoff_s, clock)
        if name == "memory":
            tiers.append(MemoryTier(config.memory_bytes, clock))
        elif name == "disk":
            tiers.append(DiskTier(config.disk_path, config.disk_bytes, breaker,
                                  config.disk_rescan_s, clock))
        else:
            tiers.append(RedisTier(config.redis_url, breaker, config.redis_ttl_s,
                                   config.redis_timeout_s, cluster_id=config.cluster_id))
    return TieredStore(tiers, observer, config.tail_ttl_s, config.mac_key)
