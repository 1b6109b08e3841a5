"""The benchmark scripts run to the end on the real model at toy sizes: a benchmark that crashes
is a bug (`make bench` once died of ZeroDivisionError on its second repeat)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_script(*argv: str) -> str:
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bench_engine_repeats(tmp_path):
    """--repeat 2: the second prefill of the same prompt is computed again, not adopted."""
    out = run_script("scripts/bench_engine.py", "--dtype", "float32", "--batches", "1,2",
                     "--repeat", "2", "--prefill-tokens", "32", "--new-tokens", "3",
                     "--prompt-tokens", "8")
    assert "| prefill 32 tok, batch 1 |" in out and "| decode, batch 2 |" in out


def test_bench_step_times_every_context():
    out = run_script("scripts/bench_step.py", "--dtype", "float32", "--contexts", "8,40",
                     "--steps", "2")
    assert "float32 none, 1 rows: 8: " in out and ", 40: " in out


def test_bench_reload_loads_the_shared_blocks_and_computes_the_rest():
    out = run_script("scripts/bench_reload.py", "--dtype", "float32", "--block-tokens", "16,32",
                     "--prompt", "80", "--shared", "70", "--repeat", "1")
    assert "B=16: 64 of 80 tokens loaded, 16 computed" in out, out
    assert "B=32: 64 of 80 tokens loaded, 16 computed" in out, out


def test_bench_top5_holds_fp32_to_generate():
    """fp32 is the exact path: every prompt's greedy text equals generate()'s, alone and
    batched."""
    out = run_script("scripts/bench_top5.py", "--dtype", "float32", "--prompts", "3",
                     "--tokens", "6", "--batch", "3")
    assert "| batch 1 | 100% | 100.0% | 100% |" in out
    assert "| batch 3 | 100% | 100.0% | 100% |" in out


def test_bench_overhead_compares_engine_and_served(tmp_path):
    out = run_script("scripts/bench_overhead.py", "--dtype", "float32", "--concurrency", "2",
                     "--requests", "2", "--prompt-tokens", "8", "--max-tokens", "3",
                     "--rounds", "1", "--workdir", str(tmp_path))
    assert "served / engine" in out and "round 1: engine" in out


def test_bench_peer_throughput_and_ttft(tmp_path):
    """Only tandem-1p1d (the peer takes minutes to start) and a 300-word TTFT document (over the
    router's 256 uncached tokens, so the cold prompt takes the prefill hop, as ~2,900 tokens do):
    a measurement line, both tables, and the JSON with one measurement per round, level and
    target; the cached and after-restart requests (the latter on a new server over the same KV
    dir) hit the cache."""
    out_json = tmp_path / "peer.json"
    out = run_script("scripts/bench_peer.py", "--targets", "tandem-1p1d", "--concurrency", "2",
                     "--rounds", "1", "--max-tokens", "4", "--requests-per-slot", "1", "--ttft",
                     "--ttft-words", "300", "--dtype", "float32", "--workdir", str(tmp_path),
                     "--out", str(out_json))
    assert "round 1 c=2 tandem-1p1d:" in out and "| 2 | tandem-1p1d |" in out
    for kind in ("cold", "cached", "after restart"):
        assert f"round 1 {kind} tandem-1p1d: TTFT" in out and f"| {kind} | tandem-1p1d |" in out
    doc = json.loads(out_json.read_text())
    [m] = doc["measurements"]
    assert (m["round"], m["concurrency"], m["target"]) == (0, 2, "tandem-1p1d")
    assert m["errors"] == [] and m["ttft_s"] > 0
    assert len(m["requests"]) == 4 and m["completion_tokens"] > 0 and m["tok_s"] > 0
    ttft = {t["kind"]: t for t in doc["ttft"]}
    assert [t["kind"] for t in doc["ttft"]] == ["cold", "cached", "after restart"]
    assert all(t["target"] == "tandem-1p1d" and t["errors"] == [] and t["ttft_s"] > 0
               for t in ttft.values())
    assert ttft["cold"]["prompt_tokens"] > 300
    assert ttft["cached"]["cached_tokens"] > 0 and ttft["after restart"]["cached_tokens"] > 0
    assert [(t["kind"], t["target"]) for t in doc["ttft_summary"]] == [
        ("cold", "tandem-1p1d"), ("cached", "tandem-1p1d"), ("after restart", "tandem-1p1d")]


def test_bench_multiround_hits_the_prefix_cache(tmp_path):
    """2 users x 2 questions on 300-word documents: the per-user table, the summary line, and a
    JSON record per request, round 2 (the conversation so far) finding its prefix cached."""
    out_json = tmp_path / "multiround.json"
    out = run_script("scripts/bench_multiround.py", "--users", "2", "--questions", "2",
                     "--doc-words", "300", "--max-tokens", "4", "--dtype", "float32",
                     "--workdir", str(tmp_path), "--out", str(out_json))
    assert "| user | round 1 (cold) | round 2 |" in out and "| 1 | " in out
    assert "round 2 / cold TTFT: max " in out and "prefix hit rate" in out
    records = json.loads(out_json.read_text())["records"]
    assert [(r["round"], r["user"]) for r in records] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(r["error"] is None and r["ttft_s"] > 0 for r in records)
    assert all(r["prompt_tokens"] > 300 for r in records)
    assert all(r["cached_tokens"] > 0 for r in records if r["round"] == 2)


def test_bench_long_context_streams_exactly():
    """A 600-token context at a quarter of its KV: the table's rows for every engine and load
    mode, and the script's own check that every engine's greedy tokens equal the resident's."""
    out = run_script("scripts/bench_long_context.py", "--context", "600", "--budgets", "4",
                     "--rounds", "1", "--steps", "2", "--disk-memory-mb", "1")
    for row in ("| resident | resident | all |", "| 1/4 memory | memory | serial |",
                "| 1/4 disk | disk | prefetch |"):
        assert row in out
    assert "greedy tokens of every engine equal the resident engine's" in out


def test_bench_kv_quant_reports_every_format():
    out = run_script("scripts/bench_kv_quant.py", "--prompts", "2", "--tokens", "4",
                     "--ttft-prompt", "200", "--repeat", "1")
    for row in ("| exact (float32) | 46,080 |", "| int8 | 12,240 |", "| uint4 | 6,480 |"):
        assert row in out


def test_bench_dag_runs_both_modes(tmp_path):
    out = run_script("scripts/bench_dag.py", "--rounds", "1", "--max-tokens", "2",
                     "--dtype", "float32", "--colocated")
    assert "| serial |" in out and "| dag |" in out and "DAG / serial:" in out
    assert "same text: True" in out


def test_bench_recovery_reuses_blocks_or_recomputes(tmp_path):
    """Both modes at toy size: the script itself fails if a text after a kill differs from a
    no-fault run; the survivor loads stored blocks with reuse and none without."""
    out = run_script("scripts/bench_recovery.py", "--rounds", "1", "--prompt-len", "140",
                     "--max-tokens", "40", "--kill-at", "20", "--dtype", "float32",
                     "--workdir", str(tmp_path))
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line.split("|")[4]
            for line in out.splitlines() if line.startswith(("| greedy", "| seeded"))}
    assert set(rows) == {(s, m) for s in ("greedy", "seeded") for m in ("reuse", "recompute")}
    for (_, mode), counts in rows.items():
        loaded, computed = (int(x) for x in counts.split("/"))
        assert (loaded > 0) == (mode == "reuse") and computed > 0, (mode, counts)
