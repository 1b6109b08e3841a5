"""Settings fields the services share: one pydantic-settings object per process, from env,
`.env` and CLI flags (tandem/flags.py).

Every field `foo_bar` of a settings class is the env var `TANDEM_FOO_BAR` and the flag
`--foo-bar`. Precedence: flag > env > `.env` > default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.kv_layout import DEFAULT_BLOCK_SIZE
from engine.registry import DEFAULT_MODEL
from kvstore import StoreConfig, derive_mac_key
from kvstore.redis_tier import CLUSTER_ID_PATTERN


class TandemSettings(BaseSettings):
    """Fields every model-loading process shares."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_", env_file=".env", extra="ignore")

    model: str = DEFAULT_MODEL
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: str = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"


GiB = 1 << 30


class StoreSettings(TandemSettings):
    """KV store fields, shared by workers (read/write) and the router (prefix lookups)."""

    store_tiers: Literal["auto", "memory", "memory+disk", "memory+disk+redis", "memory+redis"] = (
        Field("auto", description="auto = memory+disk, plus redis when --redis-url is set")
    )
    redis_url: str | None = Field(
        None, description="adds a tier: redis://[:password@]host:port/db, rediss://... (TLS), "
        "redis+cluster://host:port[,host:port...] (seeds), or "
        "redis+sentinel://[:password@]host:port[,host:port...]/<service>[/db]")
    cluster_id: str = Field(
        "default", pattern=CLUSTER_ID_PATTERN,
        description="names this stack in Redis (1-32 of A-Z a-z 0-9 _ -): stacks with "
        "different ids share one Redis without seeing each other's blocks or workers",
    )
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
    # One secret per stack, the same on the router and every worker (docs/OPERATIONS.md, "Trust
    # boundary"): it authenticates calls to the worker APIs, signs worker ads in Redis, and keys
    # the MAC on every stored KV block, so whoever can write Redis or the disk tier cannot forge
    # a block a worker would load.
    internal_token: str | None = Field(
        None, description="shared secret for worker APIs, worker ads and KV block MACs; "
        "required for workers bound beyond loopback"
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
            cluster_id=self.cluster_id,
            mac_key=derive_mac_key(self.internal_token) if self.internal_token else None,
            **extra,
        )
