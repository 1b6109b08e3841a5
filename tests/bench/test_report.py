"""Markdown and JSON output from hand-built results: notes, failures, exact config."""

from __future__ import annotations

import json

from tandem.bench import report
from tandem.bench.runner import BenchResult, LevelResult
from tests.bench.helpers import make_config, make_record


def make_result(records, **cfg) -> BenchResult:
    level = LevelResult(concurrency=2, planned=len(records) + 1, duration_s=2.0, records=records)
    return BenchResult(config=make_config(**cfg), started_at="2025-01-01T00:00:00Z",
                       levels=[level])


def test_markdown_flags_missing_usage_and_lists_failures():
    no_usage = make_record(0)
    no_usage.usage_reported = False
    failed = make_record(1, ok=False)
    result = make_result([no_usage, failed])
    summaries = [report.summarize_level(level, {}) for level in result.levels]
    text = report.markdown(result, summaries)
    assert "| requests ok / failed / not sent | 1 / 1 / 1 |" in text
    assert "the server sent no `usage`" in text
    assert "- 1 x boom" in text
    assert summaries[0].usage_source == "chunk-count"


def test_json_document_keeps_config_seed_and_every_request(tmp_path):
    result = make_result([make_record(0, cached=32), make_record(1)], seed=42, api_key="sk-x",
                         slo={"ttft": 0.5})
    summaries = [report.summarize_level(level, result.config.slo) for level in result.levels]
    path = tmp_path / "out" / "bench.json"
    report.write_json(path, report.document(result, summaries))
    doc = json.loads(path.read_text())
    assert doc["config"]["seed"] == 42 and doc["config"]["slo"] == {"ttft": 0.5}
    assert doc["config"]["api_key"] == "<redacted>" and "sk-x" not in path.read_text()
    (run,) = doc["runs"]
    assert (run["concurrency"], run["planned"], run["sent"]) == (2, 3, 2)
    assert [r["cached_tokens"] for r in run["requests"]] == [32, None]
    assert run["requests"][0]["tpot_s"] == (1.0 - 0.1) / 9
    assert run["summary"]["goodput"] == 1.0
