"""Settings of a worker process (prefill or decode): model, engine sizing, KV store tiers."""

from __future__ import annotations

import ipaddress
import socket
from typing import Literal

from pydantic import Field

from engine.config import DEFAULT_PAGE_SIZE
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
    stream_keepalive_s: float = Field(
        10.0, gt=0, description="a reply stream with nothing to send for this long sends a "
        "blank line, so a request queued behind long ones is not taken for a silent worker "
        "(keep it well under the router's worker_timeout_s)"
    )
    max_model_len: int | None = Field(None, description="default: the model's, capped at 8192")
    prefill_chunk: int = Field(512, description="prompt tokens per prefill chunk")
    page_size: int = Field(
        DEFAULT_PAGE_SIZE, ge=1, description="tokens per KV page; must divide block_size"
    )
    kv_cache_bytes: int | None = Field(
        None, ge=1, description="KV pool budget in bytes (default: kv_cache_fraction of free "
        "memory, else CUDA 0.9 of free / CPU min(4 GiB, half of available RAM))"
    )
    kv_cache_fraction: float | None = Field(
        None, gt=0, le=1, description="KV pool budget as a fraction of the device's free "
        "memory after the weights (ignored when kv_cache_bytes is set)"
    )
    kv_dtype: Literal["auto", "int8", "uint4"] = Field(
        "auto", description="how KV is stored in the pool, the store and the handoff: the "
        "model's dtype, or int8 / uint4 with a scale per token and head (lossy: "
        "docs/BENCHMARKS.md measures it); every worker of a stack must use the same"
    )
    cold_kv: bool = Field(
        True, description="--no-cold-kv: a sequence's KV must fit the pool. With it, a sequence "
        "longer than its window keeps its first and latest pages resident and streams the rest "
        "from a private memory tier that spills to disk (docs/ARCHITECTURE.md, 'Context beyond "
        "the KV budget')"
    )
    kv_window: int | None = Field(
        None, ge=1, description="tokens of KV one sequence keeps in the pool before its older "
        "ones go cold (default: three quarters of the pool)"
    )
    cold_memory_bytes: int = Field(
        1 << 30, ge=1, description="memory for cold KV, beyond which it is read back from disk"
    )
    cold_disk_bytes: int = Field(
        16 << 30, ge=0, description="disk for cold KV, under disk_cache_dir (0: memory only)"
    )
    cold_prefetch: bool | None = Field(
        None, description="load the next cold KV segment on a thread while one is attended "
        "over (default: on CUDA only; on CPU the loads compete with the forward for cores)"
    )
    quantization: Literal["none", "int8", "int4"] = Field(
        "none", description="weight-only quantization on CPU: int8 per output row, or int4 in "
        "groups of 32 (a GGUF's own Q4_1 blocks when the model is one); lossy, measured in "
        "docs/BENCHMARKS.md. The KV namespace includes it"
    )
    compile_decode: bool = Field(
        False, description="run decode-only steps through torch.compile: faster at small "
        "batches, compiled as the worker starts (~1.5 min on 2 cores); not bit-exact (vLLM's "
        "top-5 rule, measured in docs/BENCHMARKS.md)"
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads for the forward (default: torch's, one "
        "per core; fewer leaves cores to the router and other workers on a shared host)"
    )
    # Each pending write holds its blocks' tensors (a decode block ~1.5-3 MB for SmolLM2, a
    # prefill up to a whole prompt), so an unbounded backlog behind a slow store grows without
    # limit. 64 batches ride out a store hiccup of a few steps; past that a write is dropped,
    # which only costs a recompute later (a missing block is a miss).
    max_pending_writes: int = Field(
        64, ge=1, description="KV store writes queued at once; past that a write is dropped "
        "(counted in blocks_write_dropped_total)"
    )

    def check_exposure(self) -> None:
        """Raise ValueError when bound beyond loopback without `internal_token`: whoever can
        reach the worker APIs could run the model and make the worker read the KV store."""
        if not self.internal_token and not is_loopback(self.host):
            raise ValueError(
                f"refusing to serve the {self.role} worker on {self.host!r} without an internal "
                "token: set TANDEM_INTERNAL_TOKEN (--internal-token), the same on the router, "
                "or bind to 127.0.0.1"
            )

    def advertised_url(self) -> str:
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = self.host
        if host in ("0.0.0.0", "::", ""):  # bound everywhere: other hosts know us by name
            host = socket.gethostname()
        elif ":" in host:
            host = f"[{host}]"  # an IPv6 literal
        return f"http://{host}:{self.port}"


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (not 0.0.0.0 or "": those bind every interface)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another hostname: it may resolve anywhere
        return False
