"""`tandem bench` end to end against the fake server on a loopback port."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
from collections.abc import Iterator
from itertools import pairwise

import pytest

from tandem.cli import main

# matplotlib is the optional `bench` extra. With it installed the sweep test also draws the
# charts; without it, test_plot_without_matplotlib_fails_before_running covers --plot.
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture
def closed_url() -> Iterator[str]:
    """A loopback port that is bound but not listening: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def bench(server_url: str, tmp_path, *args: str) -> tuple[int, dict | None]:
    out = tmp_path / "bench.json"
    rc = main(["bench", "--base-url", server_url, "--output-json", str(out),
               "--max-duration-s", "30", "--timeout-s", "10", *args])
    return rc, json.loads(out.read_text()) if out.exists() else None


def assert_usage_matches(doc: dict, log) -> None:
    """Every request's token counts are exactly what the server put in its usage chunk."""
    for run in doc["runs"]:
        for r in run["requests"]:
            usage = log.usage[r["response_id"]]
            assert r["ok"] and r["usage_reported"]
            assert r["prompt_tokens"] == usage["prompt_tokens"]
            assert r["completion_tokens"] == usage["completion_tokens"]
            assert r["cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]


def test_random_sweep_writes_json_markdown_and_plots(fake_server, tmp_path, capsys):
    plot = ["--plot", str(tmp_path / "png")] if HAVE_MATPLOTLIB else []
    rc, doc = bench(fake_server.url, tmp_path, "--num-requests", "6", "--input-len", "20",
                    "--output-len", "5", "--range-ratio", "0.5", "--concurrency", "1,3",
                    "--seed", "11", "--slo", "ttft=5,tpot=1", *plot)
    assert rc == 0
    assert doc["config"]["seed"] == 11 and doc["config"]["model"] == "fake-model"
    assert [run["concurrency"] for run in doc["runs"]] == [1, 3]
    assert_usage_matches(doc, fake_server.log)
    for run in doc["runs"]:
        s, reqs = run["summary"], run["requests"]
        assert [r["index"] for r in reqs] == list(range(6)) and s["failed"] == 0
        assert s["completion_tokens"] == sum(r["max_tokens"] for r in reqs)
        assert s["prompt_tokens"] == sum(r["prompt_words"] for r in reqs)
        assert s["goodput"] == s["request_throughput"]  # generous SLOs: every request meets
        assert all(len(r["itl_s"]) == r["completion_tokens"] - 1 for r in reqs)
    # Each level draws fresh prompts (seed + level index): a prefix cache cannot carry them over.
    assert [r["prompt_words"] for r in doc["runs"][0]["requests"]] != \
           [r["prompt_words"] for r in doc["runs"][1]["requests"]]
    stdout = capsys.readouterr().out
    assert "| latency (ms) | mean | p50 | p90 | p99 |" in stdout and "### sweep" in stdout
    assert "| TTFT |" in stdout and "no `usage`" not in stdout
    if plot:
        for name in ("ttft_vs_prompt", "throughput_vs_concurrency", "latency_vs_concurrency"):
            assert (tmp_path / "png" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shared_prefix_turns_hit_the_cache(fake_server, tmp_path):
    rc, doc = bench(fake_server.url, tmp_path, "--workload", "shared-prefix", "--endpoint",
                    "completions", "--num-users", "2", "--turns", "3", "--prefix-len", "40",
                    "--input-len", "8", "--max-tokens", "3", "--concurrency", "2")
    assert rc == 0
    (run,) = doc["runs"]
    assert_usage_matches(doc, fake_server.log)
    reqs = run["requests"]
    assert len(reqs) == 6 and {r["session"] for r in reqs} == {0, 1}
    for r in reqs:
        if r["turn"] > 0:  # the user's own document prefix was seen on an earlier turn
            assert r["cached_tokens"] >= 40
    assert 0 < run["summary"]["cached_token_share"] < 1
    for session in (0, 1):  # a user's turns are sequential
        turns = sorted((r for r in reqs if r["session"] == session), key=lambda r: r["turn"])
        for before, after in pairwise(turns):
            assert after["start_s"] >= before["start_s"] + before["e2e_s"]


def test_multi_turn_sends_previous_answers(fake_server, tmp_path):
    rc, doc = bench(fake_server.url, tmp_path, "--workload", "multi-turn", "--num-users", "1",
                    "--turns", "3", "--prefix-len", "0", "--input-len", "4", "--max-tokens", "2")
    assert rc == 0
    reqs = doc["runs"][0]["requests"]
    assert_usage_matches(doc, fake_server.log)
    # Turn t's prompt is every earlier question (6 words each: "Question t:" + 4) and answer.
    assert [r["prompt_tokens"] for r in reqs] == [6, 6 + 2 + 6, 6 + 2 + 6 + 2 + 6]
    last = fake_server.log.prompt_words[reqs[-1]["response_id"]]
    assert last[6:8] == ["w0", "w1"] and last[14:16] == ["w0", "w1"]


def test_time_bound_stops_new_requests(fake_server, tmp_path, capsys):
    rc, doc = bench(fake_server.url, tmp_path, "--num-requests", "5", "--max-duration-s", "1e-9")
    assert rc == 1  # nothing could start within the bound
    assert doc["runs"][0]["sent"] == 0 and doc["runs"][0]["planned"] == 5
    assert "0 / 0 / 5" in capsys.readouterr().out


def test_unlistable_models_require_model_flag(closed_url, tmp_path, capsys):
    rc, doc = bench(closed_url, tmp_path, "--num-requests", "1")
    assert rc == 2 and doc is None
    assert "pass --model" in capsys.readouterr().err


def test_plot_without_matplotlib_fails_before_running(monkeypatch, closed_url, tmp_path,
                                                      capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    rc, doc = bench(closed_url, tmp_path, "--model", "m", "--plot", str(tmp_path))
    assert rc == 2 and doc is None
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_bad_flags_are_reported(closed_url, tmp_path, capsys):
    rc, _ = bench(closed_url, tmp_path, "--model", "m", "--slo", "ttft=fast")
    assert rc == 2 and "--slo" in capsys.readouterr().err
