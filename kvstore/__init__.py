"""Tiered, content-addressed KV block store (memory, disk, Redis). No HTTP.

    ns = KeyNamespace(model_fingerprint, dtype="float32", block_size=64, cache_salt="")
    keys = block_keys(token_ids, ns)          # one per full block, chained blake2b
    store = build_store(StoreConfig(tiers="memory+disk+redis", redis_url=...))
    n = store.lookup_prefix(keys)             # leading blocks present
    blocks = store.get_many(keys[:n])         # list[Tensor | None]
    store.put_many({key: block}, ttl_s=None)  # block: [L, 2, H, B, D]
"""

from kvstore.codec import CorruptBlock, ExpiredBlock, decode, encode
from kvstore.config import TIER_CHOICES, StoreConfig, build_store
from kvstore.keys import KeyInfo, KeyNamespace, block_keys, parse_key, tail_key
from kvstore.observer import NullObserver, StoreObserver
from kvstore.tiered import TieredStore

__all__ = [
    "TIER_CHOICES",
    "CorruptBlock",
    "ExpiredBlock",
    "KeyInfo",
    "KeyNamespace",
    "NullObserver",
    "StoreConfig",
    "StoreObserver",
    "TieredStore",
    "block_keys",
    "build_store",
    "decode",
    "encode",
    "parse_key",
    "tail_key",
]
