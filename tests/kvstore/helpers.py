"""Small builders shared by the kvstore tests: blocks with random bits, a fake clock, a
recording observer and one-tier stores."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvstore.breaker import Breaker
from kvstore.disk import DiskTier
from kvstore.keys import KeyNamespace, block_keys
from kvstore.memory import MemoryTier
from kvstore.redis_tier import RedisTier
from kvstore.redis_url import sync_client
from kvstore.tiered import TieredStore

SMOL_SHAPE = (30, 2, 3, 64, 64)  # SmolLM2-135M, 64 tokens: [L, 2, H, B, D]
SMALL_SHAPE = (2, 2, 1, 4, 8)  # block_size 4
FINGERPRINT = "0123456789abcdef0123456789abcdef"
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}  # integer view per element size


def make_block(shape=SMALL_SHAPE, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """A block of uniformly random *bits* (NaNs, infs, denormals included), so equality below
    is bit equality, not float equality."""
    gen = torch.Generator().manual_seed(seed)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).view(shape)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_BITS[t.element_size()])


def bit_equal(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return (a is not None and a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(bits(a), bits(b)))


def all_bit_equal(outs: list, blocks: dict[str, torch.Tensor]) -> bool:
    """get_many's answer holds every block of `blocks`, in order, bit for bit."""
    return len(outs) == len(blocks) and all(
        bit_equal(o, b) for o, b in zip(outs, blocks.values(), strict=True))


def make_ns(dtype=torch.float32, block_size: int = 4, salt: str = "",
            fingerprint: str = FINGERPRINT) -> KeyNamespace:
    return KeyNamespace(fingerprint, dtype, block_size, salt)


def make_blocks(n: int, shape=SMALL_SHAPE, dtype=torch.float32, seed: int = 0,
                salt: str = "") -> dict[str, torch.Tensor]:
    """n consecutive blocks of one sequence, keyed by block_keys."""
    ns = make_ns(dtype, shape[3], salt)
    tokens = list(range(seed * 100_000, seed * 100_000 + n * shape[3]))
    keys = block_keys(tokens, ns)
    return {k: make_block(shape, dtype, seed * 1000 + i) for i, k in enumerate(keys)}


class FakeClock:
    """A monotonic clock the test advances by hand (backoff windows, TTLs)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RecordingObserver:
    gets: list = field(default_factory=list)
    puts: list = field(default_factory=list)
    corrupt: list = field(default_factory=list)
    states: list = field(default_factory=list)

    def on_get(self, tier, seconds, nbytes, hits, misses):
        self.gets.append((tier, nbytes, hits, misses))

    def on_put(self, tier, seconds, nbytes):
        self.puts.append((tier, nbytes))

    def on_corrupt(self, tier):
        self.corrupt.append(tier)

    def on_tier_state(self, tier, up):
        self.states.append((tier, up))


def disk_tier(path, capacity: int = 1 << 30, clock=None) -> DiskTier:
    clock = clock or FakeClock()
    return DiskTier(path, capacity, Breaker("disk", 0.5, 30.0, clock), clock=clock)


def redis_tier(url: str, clock=None, timeout_s: float = 0.5, ttl_s: float = 3600.0) -> RedisTier:
    clock = clock or FakeClock()
    return RedisTier(url, Breaker("redis", 0.5, 30.0, clock), ttl_s=ttl_s, timeout_s=timeout_s)


def raw_client(url: str):
    """A plain redis-py client for any tandem Redis URL (a RedisCluster for a cluster), to look
    at or tamper with what the tier stored."""
    return sync_client(url, 5.0)


def one_tier_store(kind: str, *, path=None, url: str = "", observer=None) -> TieredStore:
    """A store over a single tier, so a read is known to come from that tier."""
    tier = {"memory": lambda: MemoryTier(1 << 30),
            "disk": lambda: disk_tier(path),
            "redis": lambda: redis_tier(url)}[kind]()
    return TieredStore([tier], observer)
