"""Serving overhead: the same closed-loop workload on the engine alone (in process) and served
by `tandem serve --colocated` (router + one worker, HTTP, SSE), in one run, rounds alternating.

    .venv/bin/python scripts/bench_overhead.py [--dtype auto] [--concurrency 16]
        [--requests 48] [--prompt-tokens 32] [--max-tokens 64] [--rounds 3]

Workload: `--requests` prompts of `--prompt-tokens` token ids, `--max-tokens` each (ignore_eos,
greedy), at most `--concurrency` in flight (a new one starts as one ends). Rate = output tokens
over wall time, prefill included on both sides, so the ratio served / engine is what serving
costs on top of the engine. Also printed: the engine's decode-only batch rate at the same
concurrency (what issue 13's target compares against). Each figure is the median of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.device import dtype_name  # noqa: E402
from engine.engine import Engine, EngineConfig  # noqa: E402
from engine.loader import load_model  # noqa: E402
from engine.registry import DEFAULT_MODEL, resolve_model  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.sequence import SeqRequest  # noqa: E402
from scripts.serving_targets import cpu_flags, tandem_serve  # noqa: E402


def workload(vocab: int, n: int, length: int) -> list[list[int]]:
    """Distinct prompts (no shared prefix: the first token differs), ids away from specials."""
    return [[1000 + i] + [(7919 * (i * length + j)) % (vocab - 2000) + 1000
                          for j in range(1, length)] for i in range(n)]


def engine_rate(engine: Engine, prompts: list[list[int]], conc: int, new: int
                ) -> tuple[float, float]:
    """(output tok/s over the whole closed loop, decode-only tok/s over full-batch steps)."""
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    todo, running, out = list(enumerate(prompts)), 0, 0
    full_s = full_tokens = 0.0
    t0 = time.perf_counter()
    while todo or running:
        while todo and running < conc:
            i, ids = todo.pop(0)
            engine.add(SeqRequest(f"s{i}-{t0}", ids, len(ids), params))
            running += 1
        before = engine.stats.prefill_tokens
        t = time.perf_counter()
        events = engine.step()
        if engine.stats.prefill_tokens == before and len(events) == conc:
            full_s += time.perf_counter() - t
            full_tokens += len(events)
        out += len(events)
        running -= sum(ev.finish_reason is not None for ev in events)
    return out / (time.perf_counter() - t0), full_tokens / full_s if full_s else 0.0


async def served_rate(url: str, model: str, prompts: list[list[int]], conc: int, new: int
                      ) -> float:
    todo = list(prompts)
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while todo:
            ids = todo.pop(0)
            body = {"model": model, "prompt": ids, "max_tokens": new, "temperature": 0,
                    "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        usage = json.loads(line[6:]).get("usage")
                        tokens += usage["completion_tokens"] if usage else 0
    limits = httpx.Limits(max_connections=conc)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(conc)))
        return tokens / (time.perf_counter() - t0)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--serve-flag", action="append", default=[],
                    help="extra `tandem serve` flag (repeatable): --serve-flag=--torch-threads=1")
    ap.add_argument("--env", action="append", default=[],
                    help="KEY=VALUE for the served processes (repeatable)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level="WARNING")
    loaded = load_model(resolve_model(DEFAULT_MODEL), dtype=args.dtype)
    dtype = dtype_name(loaded.dtype)
    engine = Engine(loaded, EngineConfig(max_slots=args.concurrency, prefix_caching=False))
    prompts = workload(loaded.config.vocab_size, args.requests, args.prompt_tokens)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    server = tandem_serve("tandem-colocated", workdir, workdir / "kv", "--colocated",
                          "--no-prefix-cache", *args.serve_flag, dtype=dtype)
    server.env.update(kv.split("=", 1) for kv in args.env)
    rows = []
    with server:
        asyncio.run(served_rate(server.url, server.model, prompts[:2], 2, 4))  # warm up
        engine_rate(engine, prompts[:2], 2, 4)
        for r in range(args.rounds):
            eng, decode = engine_rate(engine, prompts, args.concurrency, args.max_tokens)
            served = asyncio.run(served_rate(server.url, server.model, prompts,
                                             args.concurrency, args.max_tokens))
            rows.append((eng, decode, served))
            print(f"round {r + 1}: engine {eng:.1f} tok/s (decode-only {decode:.1f}), "
                  f"served {served:.1f} tok/s: {served / eng:.2f}x, "
                  f"{served / decode:.2f}x decode-only", flush=True)
    flags = cpu_flags()
    eng, decode, served = (statistics.median(c) for c in zip(*rows, strict=True))
    print(f"\n{DEFAULT_MODEL}, {dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.machine()} ({', '.join(flags)}); "
          f"c={args.concurrency}, {args.requests} requests of {args.prompt_tokens} prompt + "
          f"{args.max_tokens} output tokens; median of {args.rounds} rounds; served with "
          f"{' '.join(args.serve_flag + args.env) or 'defaults'}")
    print("| engine alone tok/s | engine decode-only tok/s | served (colocated) tok/s "
          "| served / engine | served / decode-only |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {eng:.1f} | {decode:.1f} | {served:.1f} | {served / eng:.2f}x | "
          f"{served / decode:.2f}x |")


if __name__ == "__main__":
    main()
