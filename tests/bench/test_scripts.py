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


def test_bench_overhead_compares_engine_and_served(tmp_path):
    out = run_script("scripts/bench_overhead.py", "--dtype", "float32", "--concurrency", "2",
                     "--requests", "2", "--prompt-tokens", "8", "--max-tokens", "3",
                     "--rounds", "1", "--workdir", str(tmp_path))
    assert "served / engine" in out and "round 1: engine" in out


def test_bench_peer_alternates_targets(tmp_path):
    """Only tandem-colocated (the peer takes minutes to start): a measurement line, the table and
    the JSON with one measurement per round, level and target."""
    out_json = tmp_path / "peer.json"
    out = run_script("scripts/bench_peer.py", "--targets", "tandem-colocated", "--concurrency",
                     "2", "--rounds", "1", "--max-tokens", "4", "--requests-per-slot", "1",
                     "--dtype", "float32", "--workdir", str(tmp_path), "--out", str(out_json))
    assert "round 1 c=2 tandem-colocated:" in out and "| 2 | tandem-colocated |" in out
    doc = json.loads(out_json.read_text())
    [m] = doc["measurements"]
    assert (m["round"], m["concurrency"], m["target"]) == (0, 2, "tandem-colocated")
    assert m["errors"] == [] and m["ttft_s"] > 0
    assert len(m["requests"]) == 4 and m["completion_tokens"] > 0 and m["tok_s"] > 0
