"""Decode step time of the engine alone (batch 1 unless --rows), at several context lengths.

    .venv/bin/python scripts/bench_step.py [--dtype bfloat16] [--quantization none]
        [--contexts 300,1000,3000] [--steps 40] [--rows 1] [--compile-decode] [--checkout DIR]

For each context: a fresh engine, --rows sequences of that many prompt tokens, 10 warm-up decode
steps, then the median wall time of --steps `engine.step()` calls. --checkout DIR imports the
engine from another checkout of tandem (`git worktree add DIR REV`), so a before/after pair is
two runs of this script on one machine, alternated; a checkout older than --quantization
(before issue 19) takes the default. --compile-decode: EngineConfig.compile_decode (its compile
runs once, as the first engine starts; not timed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def median_step_ms(engine, steps: int, warmup: int = 10) -> float:
    """One step (the prefill of what was added), `warmup` untimed steps, then the median
    milliseconds of `steps` timed ones."""
    for _ in range(1 + warmup):
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--quantization", default="none", choices=["none", "int8", "int4"])
    ap.add_argument("--contexts", default="300,1000,3000")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rows", type=int, default=1, help="sequences decoding together")
    ap.add_argument("--compile-decode", action="store_true",
                    help="EngineConfig.compile_decode (engine/compiled_step.py)")
    ap.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parents[1])
    args = ap.parse_args()
    sys.path.insert(0, str(args.checkout.resolve()))
    from engine.engine import Engine, EngineConfig  # noqa: PLC0415 (from --checkout)
    from engine.loader import load_model  # noqa: PLC0415
    from engine.registry import DEFAULT_MODEL, resolve_model  # noqa: PLC0415
    from engine.sampling_params import SamplingParams  # noqa: PLC0415
    from engine.sequence import SeqRequest  # noqa: PLC0415

    quant = {} if args.quantization == "none" else {"quantization": args.quantization}
    lm = load_model(resolve_model(DEFAULT_MODEL), dtype=args.dtype, device="cpu", **quant)
    params = SamplingParams(max_tokens=args.steps + 12, temperature=0.0, ignore_eos=True)
    cells = []
    for context in map(int, args.contexts.split(",")):
        compiled = {"compile_decode": True} if args.compile_decode else {}
        engine = Engine(lm, EngineConfig(max_slots=args.rows, **compiled))
        for row in range(args.rows):
            ids = [100 + (i * 37 + row) % 20000 for i in range(context)]
            engine.add(SeqRequest(f"r{row}", ids, len(ids), params))
        cells.append(f"{context}: {median_step_ms(engine, args.steps):.1f} ms")
    mode = " compiled" if args.compile_decode else ""
    print(f"{args.checkout.resolve().name} {args.dtype} {args.quantization}{mode}, "
          f"{args.rows} rows: " + ", ".join(cells),
          flush=True)


if __name__ == "__main__":
    main()
