"""Small builders that keep the bench tests short."""

from __future__ import annotations

from tandem.bench.config import BenchConfig
from tandem.bench.records import RequestRecord


def make_record(index: int = 0, *, ttft: float | None = 0.1, e2e: float | None = 1.0,
                out: int = 10, prompt: int = 100, cached: int | None = None,
                ok: bool = True, itl: list[float] | None = None) -> RequestRecord:
    """A finished record with server usage; TPOT follows from ttft, e2e and out."""
    return RequestRecord(
        index=index, session=index, turn=0, prompt_words=prompt, max_tokens=out, ok=ok,
        error=None if ok else "boom", ttft_s=ttft, e2e_s=e2e, itl_s=list(itl or []),
        usage_reported=True, prompt_tokens=prompt, completion_tokens=out, cached_tokens=cached,
    )


def make_config(**overrides) -> BenchConfig:
    """A tiny bounded config; tests override what they exercise."""
    base = dict(model="m", num_requests=8, input_len=16, output_len=4, prefix_len=32,
                num_users=2, turns=3, timeout_s=10.0)
    return BenchConfig(**(base | overrides))
