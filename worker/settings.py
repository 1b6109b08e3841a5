"""Settings of a worker process (prefill or decode): model, engine sizing, KV store tiers."""

from __future__ import annotations

import socket
from typing import Literal

from pydantic import Field

from wire.settings import StoreSettings


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
