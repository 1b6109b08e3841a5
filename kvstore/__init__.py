"""Tiered, content-addressed KV block store (memory, disk, Redis). No HTTP.

    ns = KeyNamespace(model_fingerprint, dtype="float32", block_size=64, cache_salt="")
    keys = block_keys(token_ids, ns)          # one per full block, chained blake2b
    chain = KeyChain(ns); chain.extend(ids)   # the same keys, incrementally as ids grow
    store = build_store(StoreConfig(tiers="memory+disk+redis", redis_url=...))
    n = store.lookup_prefix(keys)             # leading blocks present
    blocks = store.get_many(keys[:n])         # list[Tensor | None]
    store.put_many({key: block}, ttl_s=None)  # block: [L, 2, H, B, D]
    StoreConfig(mac_key=derive_mac_key(token))  # blobs MAC'd: a store writer cannot forge KV

Names load on first use (PEP 562), so `from kvstore import block_keys` costs numpy, not torch
and redis: key computation stays cheap for processes that never touch a store.
"""

from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and editors
    from kvstore.codec import CorruptBlock, ExpiredBlock, decode, derive_mac_key, encode
    from kvstore.config import TIER_CHOICES, StoreConfig, build_store
    from kvstore.keys import KeyChain, KeyInfo, KeyNamespace, block_keys, parse_key, tail_key
    from kvstore.observer import NullObserver, StoreObserver
    from kvstore.tiered import TieredStore

__all__ = [
    "TIER_CHOICES", "CorruptBlock", "ExpiredBlock", "KeyChain", "KeyInfo", "KeyNamespace",
    "NullObserver", "StoreConfig", "StoreObserver", "TieredStore", "block_keys", "build_store",
    "decode", "derive_mac_key", "encode", "parse_key", "tail_key",
]
_HOMES = MappingProxyType({  # lazy name -> the module that defines it
    "CorruptBlock": "kvstore.codec", "ExpiredBlock": "kvstore.codec",
    "decode": "kvstore.codec", "encode": "kvstore.codec", "derive_mac_key": "kvstore.codec",
    "TIER_CHOICES": "kvstore.config", "StoreConfig": "kvstore.config",
    "build_store": "kvstore.config",
    "KeyChain": "kvstore.keys", "KeyInfo": "kvstore.keys", "KeyNamespace": "kvstore.keys",
    "block_keys": "kvstore.keys",
    "parse_key": "kvstore.keys", "tail_key": "kvstore.keys",
    "NullObserver": "kvstore.observer", "StoreObserver": "kvstore.observer",
    "TieredStore": "kvstore.tiered",
})


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'kvstore' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)


def __dir__() -> list[str]:
    return __all__
