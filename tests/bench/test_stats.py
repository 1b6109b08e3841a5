"""Percentiles, throughput, goodput and cached share on hand-built records."""

from __future__ import annotations

import pytest

from tandem.bench.stats import distribution, meets_slo, percentile, summarize
from tests.bench.helpers import make_record


def test_percentile_interpolates_linearly():
    values = [float(v) for v in range(10, 0, -1)]  # order must not matter
    assert percentile(values, 50) == pytest.approx(5.5)
    assert percentile(values, 90) == pytest.approx(9.1)
    assert percentile(values, 99) == pytest.approx(9.91)
    assert percentile([3.0], 99) == 3.0
    assert distribution([]) is None
    assert distribution([1.0, 3.0]) == pytest.approx(
        {"mean": 2.0, "p50": 2.0, "p90": 2.8, "p99": 2.98, "count": 2})


def test_tpot_excludes_first_token_and_one_token_answers():
    assert make_record(ttft=0.2, e2e=1.1, out=10).tpot_s == pytest.approx(0.1)
    assert make_record(ttft=0.2, e2e=0.2, out=1).tpot_s == 0.0


def test_summary_throughput_and_latency_from_ok_records_only():
    records = [
        make_record(0, ttft=0.1, e2e=1.0, out=10, prompt=100, itl=[0.1] * 9),
        make_record(1, ttft=0.3, e2e=2.1, out=10, prompt=300, itl=[0.2] * 9),
        make_record(2, ok=False, out=99, prompt=999),
    ]
    s = summarize(records, duration_s=4.0, slo={})
    assert (s.completed, s.failed) == (2, 1)
    assert s.request_throughput == pytest.approx(0.5)
    assert s.output_token_throughput == pytest.approx(20 / 4)
    assert s.total_token_throughput == pytest.approx(420 / 4)
    assert s.ttft_s["mean"] == pytest.approx(0.2)
    assert s.tpot_s["p50"] == pytest.approx(0.15)
    assert s.itl_s["count"] == 18 and s.itl_s["p50"] == pytest.approx(0.15)
    assert s.e2e_s["p99"] == pytest.approx(1.0 + 1.1 * 0.99)
    assert s.errors == {"boom": 1} and s.goodput is None
    assert s.cached_token_share is None and s.usage_source == "server"


def test_goodput_counts_requests_meeting_all_slos():
    records = [
        make_record(0, ttft=0.4, e2e=0.4 + 9 * 0.04, out=10),  # meets both
        make_record(1, ttft=0.6, e2e=0.6 + 9 * 0.01, out=10),  # ttft too slow
        make_record(2, ttft=0.1, e2e=0.1 + 9 * 0.09, out=10),  # tpot too slow
        make_record(3, ttft=0.2, e2e=0.2, out=1),              # one token: no decode, meets
        make_record(4, ttft=None, e2e=0.3, out=0),             # no token at all: misses ttft
    ]
    slo = {"ttft": 0.5, "tpot": 0.05}
    assert [meets_slo(r, slo) for r in records] == [True, False, False, True, False]
    assert summarize(records, duration_s=2.0, slo=slo).goodput == pytest.approx(1.0)
    assert summarize(records, duration_s=2.0, slo={"e2e": 0.7}).goodput == pytest.approx(1.5)


def test_cached_share_counts_only_records_that_report_it():
    records = [make_record(0, prompt=100, cached=0), make_record(1, prompt=100, cached=64),
               make_record(2, prompt=1000, cached=None)]
    assert summarize(records, 1.0, {}).cached_token_share == pytest.approx(64 / 200)
