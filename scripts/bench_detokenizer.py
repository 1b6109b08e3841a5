"""Incremental detokenization cost: µs per push() for the fast (DecodeStream) and fallback paths.

    .venv/bin/python scripts/bench_detokenizer.py [--tokens 2000] [--rounds 5] [--clock wall|cpu]

The stream is a real paragraph (mostly English, a little CJK and emoji) tokenized with the
default model's tokenizer and repeated to --tokens ids; the last prompt tokens give the first
push its left context, as in serving. Each figure is the best of --rounds passes, and the two
paths alternate, so drift on a shared machine hits both alike. `--clock cpu` times this
process's CPU time instead of the wall clock.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoTokenizer  # noqa: E402

from engine.loader import materialize  # noqa: E402
from engine.registry import DEFAULT_MODEL, resolve_model  # noqa: E402
from router.output.detokenizer import (  # noqa: E402
    FastIncrementalDetokenizer,
    IncrementalDetokenizer,
)

PARAGRAPH = (
    "The river left its banks in early spring, as it did most years, and the town moved its "
    "market up the hill to the old church square. Traders sold bread, cheese, wool and iron "
    "tools; children chased the geese between the stalls. By June the water had gone down, the "
    "fields were green again, and nobody remembered that the bridge had been closed for weeks. "
    "Le marché a rouvert, 市场重新开放了, and the mayor posted a note: \"See you next year 🌊🙂\"."
)
PROMPT = "Write a short story about a town by a river."


def stream_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(PARAGRAPH, add_special_tokens=False)
    return (ids * (n // len(ids) + 1))[:n]


def us_per_token(make: Callable, prompt: Sequence[int], ids: Sequence[int], clock) -> float:
    detok = make(prompt)
    start = clock()
    for i in ids:
        detok.push(i)
    detok.flush()
    return (clock() - start) / len(ids) * 1e6


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    tokenizer = AutoTokenizer.from_pretrained(materialize(resolve_model(DEFAULT_MODEL)))
    prompt = tokenizer.encode(PROMPT, add_special_tokens=False)
    ids = stream_ids(tokenizer, args.tokens)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    paths = {
        "fast (DecodeStream)": lambda p: FastIncrementalDetokenizer(tokenizer, p),
        "fallback (decode window)": lambda p: IncrementalDetokenizer(tokenizer, p),
    }
    best = {name: float("inf") for name in paths}
    for _ in range(args.rounds):
        for name, make in paths.items():
            best[name] = min(best[name], us_per_token(make, prompt, ids, clock))
    print(f"{len(ids)} tokens, best of {args.rounds} ({args.clock} clock)")
    for name, us in best.items():
        print(f"  {name:26s} {us:8.2f} µs/token")


if __name__ == "__main__":
    main()
