"""The benchmark's outputs: a JSON document (config, summaries, every request) and markdown."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tandem.bench.runner import BenchResult, LevelResult
from tandem.bench.stats import PERCENTILES, Summary, summarize

FORMAT_VERSION = 1  # bump when a field of the JSON document changes meaning
LATENCIES = (("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("ITL", "itl_s"), ("E2E", "e2e_s"))


def summarize_level(level: LevelResult, slo: dict[str, float]) -> Summary:
    return summarize(level.records, level.duration_s, slo)


def document(result: BenchResult, summaries: list[Summary]) -> dict:
    """Everything needed to reproduce and re-analyse the run, JSON-ready."""
    return {
        "format_version": FORMAT_VERSION,
        "started_at": result.started_at,
        # The key is a credential: record that one was used, never its value.
        "config": dataclasses.asdict(result.config) | {
            "api_key": "<redacted>" if result.config.api_key else None},
        "runs": [
            {
                "concurrency": level.concurrency,
                "planned": level.planned,
                "sent": len(level.records),
                "summary": summary.to_json(),
                "requests": [r.to_json() for r in level.records],
            }
            for level, summary in zip(result.levels, summaries, strict=True)
        ],
    }


def write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _level_section(level: LevelResult, s: Summary) -> list[str]:
    share = None if s.cached_token_share is None else f"{s.cached_token_share:.1%}"
    slo = ",".join(f"{k}={v:g}" for k, v in s.slo.items())
    rows = [
        ["requests ok / failed / not sent",
         f"{s.completed} / {s.failed} / {level.planned - len(level.records)}"],
        ["duration (s)", _num(s.duration_s)],
        ["request throughput (req/s)", _num(s.request_throughput)],
        ["output token throughput (tok/s)", _num(s.output_token_throughput)],
        ["total token throughput (tok/s)", _num(s.total_token_throughput)],
        ["prompt / output tokens", f"{s.prompt_tokens} / {s.completion_tokens}"],
        ["cached-token share", share or "not reported"],
        [f"goodput (req/s, {slo})" if slo else "goodput", _num(s.goodput) if slo else "no --slo"],
    ]
    lines = [f"### concurrency {level.concurrency}", ""]
    lines += _table(["metric", "value"], rows) + [""]
    lat_rows = [
        [name] + [_ms((getattr(s, key) or {}).get(stat)) for stat in
                  ("mean", *(f"p{q}" for q in PERCENTILES))]
        for name, key in LATENCIES
    ]
    lines += _table(["latency (ms)", "mean", *(f"p{q}" for q in PERCENTILES)], lat_rows)
    return lines + _notes(s)


def _notes(s: Summary) -> list[str]:
    notes = []
    if s.usage_source in ("chunk-count", "mixed"):
        notes.append("Note: the server sent no `usage` for some or all requests; their output "
                     "tokens are counted as streamed chunks and their prompt tokens as 0.")
    if s.errors:
        notes.append(f"Failures ({s.failed}):")
        notes += [f"- {count} x {message}" for message, count in s.errors.items()]
    return ["", *notes] if notes else []


def _sweep_table(levels: list[LevelResult], summaries: list[Summary]) -> list[str]:
    header = ["concurrency", "req/s", "out tok/s", "total tok/s", "goodput",
              "TTFT p50 (ms)", "TTFT p99 (ms)", "TPOT p50 (ms)", "TPOT p99 (ms)", "failed"]
    rows = [
        [str(level.concurrency), _num(s.request_throughput), _num(s.output_token_throughput),
         _num(s.total_token_throughput), _num(s.goodput),
         _ms((s.ttft_s or {}).get("p50")), _ms((s.ttft_s or {}).get("p99")),
         _ms((s.tpot_s or {}).get("p50")), _ms((s.tpot_s or {}).get("p99")), str(s.failed)]
        for level, s in zip(levels, summaries, strict=True)
    ]
    return ["### sweep", ""] + _table(header, rows)


def markdown(result: BenchResult, summaries: list[Summary]) -> str:
    cfg = result.config
    lines = [f"## tandem bench: {cfg.workload} on {cfg.base_url}{cfg.path}",
             "", f"model `{cfg.model}`, seed {cfg.seed}, started {result.started_at}", ""]
    for level, summary in zip(result.levels, summaries, strict=True):
        lines += _level_section(level, summary) + [""]
    if len(result.levels) > 1:
        lines += _sweep_table(result.levels, summaries) + [""]
    return "\n".join(lines)
