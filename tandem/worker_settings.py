"""Settings of a worker process (prefill or decode): model, engine sizing, KV store tiers."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import Field

from engine.kv_layout import DEFAULT_BLOCK_SIZE
from kvstore import StoreConfig
from tandem.settings import TandemSettings

GiB = 1 << 30


class StoreSettings(TandemSettings):
    """KV store fields, shared by workers (read/write) and the router (prefix lookups)."""

    store_tiers: Literal["auto", "memory", "memory+disk", "memory+disk+redis", "memory+redis"] = (
        Field("auto", description="auto = memory+disk, plus redis when --redis-url is set")
    )
    redis_url: str | None = Field(None, description="redis://[:password@]host:port/db; adds a tier")
    redis_ttl_s: int = 3600
    redis_timeout_s: float = 0.5
    memory_cache_bytes: int = 2 * GiB
    disk_cache_dir: Path = Path.home() / ".cache" / "tandem" / "kv"
    disk_cache_bytes: int = 20 * GiB
    tail_ttl_s: int = 300
    block_size: int = DEFAULT_BLOCK_SIZE
    prefix_cache: bool = Field(
        True, description="--no-prefix-cache: no request reuses another's KV (the router salts "
        "keys per request; the store still carries the handoff)"
    )

    def resolved_tiers(self) -> str:
        if self.store_tiers != "auto":
            return self.store_tiers
        return "memory+disk+redis" if self.redis_url else "memory+disk"

    def store_config(self, lookup: bool = False) -> StoreConfig | None:
        """The store for this process. `lookup=True` (the router) keeps only the tiers other
        processes can see, since a private memory tier would always miss; None if none are."""
        tiers = self.resolved_tiers()
        if lookup:
            tiers = "+".join(t for t in tiers.split("+") if t != "memory")
            if not tiers:
                return None
        extra = {"redis_url": self.redis_url} if self.redis_url else {}
        return StoreConfig(
            tiers=tiers,
            memory_bytes=self.memory_cache_bytes,
            disk_path=str(self.disk_cache_dir),
            disk_bytes=self.disk_cache_bytes,
            redis_ttl_s=self.redis_ttl_s,
            redis_timeout_s=self.redis_timeout_s,
            tail_ttl_s=self.tail_ttl_s,
            **extra,
        )


class WorkerSettings(StoreSettings):
    role: Literal["prefill", "decode"] = "decode"
    host: str = "127.0.0.1"
    port: int = 8100
    advertise_url: str | None = Field(
        None, description="the URL routers reach this worker at, published in Redis "
        "(default http://<host>:<port>; the machine's hostname when bound to 0.0.0.0)"
    )
    max_slots: int = Field(32, description="sequences in the running batch")
    max_queue: int = Field(
        64, ge=0, description="requests admitted beyond max_slots (they wait for a slot); "
        "past that the worker answers 429"
    )
    heartbeat_interval_s: float = Field(
        1.0, gt=0, description="seconds between membership heartbeats in Redis"
    )
    heartbeat_ttl_s: float = Field(
        3.0, gt=0, description="a worker whose heartbeat is this old drops out of membership"
    )
    drain_grace_s: float = Field(
        10.0, ge=0, description="on SIGTERM: refuse new requests and let in-flight ones finish "
        "for up to this long, then shut down"
    )
    max_model_len: int | None = Field(None, description="default: the model's, capped at 8192")
    prefill_chunk: int = Field(512, description="prompt tokens per prefill chunk")
    internal_token: str | None = Field(None, description="shared secret for worker APIs")

    def advertised_url(self) -> str:
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = self.host
        if host in ("0.0.0.0", "::", ""):  # bound everywhere: other hosts know us by name
            host = socket.gethostname()
        elif ":" in host:
            host = f"[{host}]"  # an IPv6 literal
        return f"http://{host}:{self.port}"
