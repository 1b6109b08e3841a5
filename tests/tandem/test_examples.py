"""The examples run as the README shows them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cascade_example_runs_in_process():
    done = subprocess.run([sys.executable, "examples/cascade.py"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sections = [s for s in done.stdout.split("--- ")[1:]]
    assert [s.split(" ", 1)[0] for s in sections] == ["draft", "refine", "summary"]
    assert "(SmolLM2-135M-Instruct-int8r," in sections[0]
    assert "(HuggingFaceTB/SmolLM2-135M-Instruct," in sections[1]
    assert all(s.split("\n", 1)[1].strip() for s in sections), done.stdout
