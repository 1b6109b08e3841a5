"""Summary statistics of a level's records: latency percentiles, throughput, goodput.

Definitions (all times in seconds):
    TTFT  first content chunk - request sent
    TPOT  (E2E - TTFT) / (output tokens - 1), 0 for one-token answers
    ITL   every gap between consecutive content chunks, pooled over requests
    E2E   stream end - request sent
    goodput  requests/s that met every given SLO (DistServe), over the level's wall time
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from tandem.bench.records import RequestRecord

PERCENTILES = (50, 90, 99)
TOP_ERRORS = 10  # distinct failure messages kept in a summary; the records keep all


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between ranks (numpy's default)."""
    assert values, "percentile of an empty sequence"
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def distribution(values: Sequence[float]) -> dict[str, float] | None:
    """{'mean', 'p50', 'p90', 'p99', 'count'}, or None when nothing was measured."""
    if not values:
        return None
    out = {"mean": sum(values) / len(values)}
    out |= {f"p{q}": percentile(values, q) for q in PERCENTILES}
    return out | {"count": len(values)}


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    """True if the request succeeded and every given target holds (a missing value fails)."""
    measured = {"ttft": record.ttft_s, "tpot": record.tpot_s, "e2e": record.e2e_s}
    return record.ok and all(
        measured[name] is not None and measured[name] <= target for name, target in slo.items())


def _per_second(count: float, duration_s: float) -> float:
    return count / duration_s if duration_s > 0 else 0.0


def usage_source(records: Sequence[RequestRecord]) -> str:
    """'server' if every record had usage, 'chunk-count' if none did, else 'mixed'."""
    reported = sum(r.usage_reported for r in records)
    if not records:
        return "none"
    if reported == len(records):
        return "server"
    return "chunk-count" if reported == 0 else "mixed"


@dataclass(slots=True)
class Summary:
    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    output_token_throughput: float
    total_token_throughput: float
    prompt_tokens: int
    completion_tokens: int
    usage_source: str
    cached_token_share: float | None
    goodput: float | None
    ttft_s: dict | None
    tpot_s: dict | None
    itl_s: dict | None
    e2e_s: dict | None
    slo: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _cached_share(ok: Sequence[RequestRecord]) -> float | None:
    """Cached prompt tokens / prompt tokens over the requests whose server reported both."""
    told = [r for r in ok if r.usage_reported and r.cached_tokens is not None]
    prompt = sum(r.prompt_tokens for r in told)
    return sum(r.cached_tokens for r in told) / prompt if told and prompt else None


def _tpots(ok: Sequence[RequestRecord]) -> list[float]:
    # One-token answers have no decode phase: they pass a TPOT SLO but give no TPOT sample.
    return [r.tpot_s for r in ok if r.completion_tokens > 1 and r.tpot_s is not None]


def summarize(records: Sequence[RequestRecord], duration_s: float,
              slo: dict[str, float]) -> Summary:
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    prompt = sum(r.prompt_tokens for r in ok)
    completion = sum(r.completion_tokens for r in ok)
    errors = Counter((r.error or "unknown")[:160] for r in failed)
    return Summary(
        completed=len(ok),
        failed=len(failed),
        duration_s=duration_s,
        request_throughput=_per_second(len(ok), duration_s),
        output_token_throughput=_per_second(completion, duration_s),
        total_token_throughput=_per_second(prompt + completion, duration_s),
        prompt_tokens=prompt,
        completion_tokens=completion,
        usage_source=usage_source(ok),
        cached_token_share=_cached_share(ok),
        goodput=_per_second(sum(meets_slo(r, slo) for r in ok), duration_s) if slo else None,
        ttft_s=distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_s=distribution(_tpots(ok)),
        itl_s=distribution([gap for r in ok for gap in r.itl_s]),
        e2e_s=distribution([r.e2e_s for r in ok if r.e2e_s is not None]),
        slo=dict(slo),
        errors=dict(errors.most_common(TOP_ERRORS)),
    )
