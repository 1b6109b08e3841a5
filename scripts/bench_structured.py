"""Issue 17's figures, in one run: what a guide costs per generated token, what compiling one
costs, and how many corpus answers parse and validate, on `tandem serve`.

    .venv/bin/python scripts/bench_structured.py [--rounds 3] [--dtype auto] [--colocated]
                                                 [--schemas 200]

1. Compile: each corpus schema compiled cold (a fresh cache; the tokenizer's token trie,
   built once per process, is timed apart), then again (cache hits).
2. Per token: one streamed chat, guided by PEOPLE (a JSON array of 60 objects, longer than
   TOKENS: the mask works on every token, and every answer is cut at exactly TOKENS) and free
   (ignore_eos, TOKENS), at c=1 and c=16, sampled. A stream's decode rate is its tokens after
   the first over the time after the first; the figure is the mean over streams, median over
   rounds. Modes alternate which goes first.
With --engine instead: the engine in process, no server, the same guided and free workloads:
the median decode step at batch 1 and 16, guide masks computed in line and on the helper
thread that overlaps them with the forward (engine/guide_masks.py), rounds alternating.

3. Validity: every corpus schema, greedy and seeded, over HTTP: answers that parse and
   validate with jsonschema. With --kill-every S (two decode workers), a decode worker that is
   streaming is SIGKILLed every S seconds while they run: answers resumed on the other worker
   must validate too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.grammar import Grammars  # noqa: E402
from engine.sampling_params import Guide  # noqa: E402
from router.model_info import load_served_model  # noqa: E402
from scripts.serving_targets import cpu_flags, default_dtype, tandem_serve  # noqa: E402
from tests.structured_corpus import MAX_TOKENS, corpus  # noqa: E402

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TOKENS = 128
PEOPLE = {"type": "array", "minItems": 60, "maxItems": 60, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                     "age": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["name", "age"]}}
ASK = [{"role": "user", "content": "List sixty people with their ages as JSON."}]


def compile_figures(schemas: list[dict]) -> dict[str, float]:
    served = load_served_model(MODEL)
    g = Grammars(served.tokenizer, served.vocab_size, served.eos_token_ids)
    start = time.perf_counter()
    g.warm()
    trie = time.perf_counter() - start
    guides = [Guide("json", json.dumps(s)) for s in schemas]
    cold, warm = [], []
    for times in (cold, warm):
        for guide in guides:
            start = time.perf_counter()
            g.compile(guide)
            times.append(time.perf_counter() - start)
    q = statistics.quantiles
    return {"trie_s": trie, "cold_median_ms": statistics.median(cold) * 1e3,
            "cold_p90_ms": q(cold, n=10)[-1] * 1e3, "warm_median_us": statistics.median(warm) * 1e6,
            "hits": g.stats.hits, "compiles": g.stats.compiles}


async def stream_rate(http: httpx.AsyncClient, url: str, body: dict) -> tuple[float, int]:
    """(decode tokens/s after the first token, completion tokens) of one streamed chat."""
    first = last = None
    tokens = 0
    async with http.stream("POST", f"{url}/v1/chat/completions", json={
            "model": MODEL, "messages": ASK, "stream": True,
            "stream_options": {"include_usage": True}, **body}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    return (tokens - 1) / max(last - first, 1e-9), tokens


async def wave(url: str, c: int, body: dict) -> tuple[float, int]:
    async with httpx.AsyncClient(timeout=600) as http:
        out = await asyncio.gather(*[stream_rate(http, url, {**body, "seed": i})
                                     for i in range(c)])
    return statistics.mean(r for r, _ in out), min(n for _, n in out)


def validity(url: str, schemas: list[dict]) -> tuple[int, int]:
    async def one(http, i: int, schema: dict, temperature: float) -> bool:
        r = await http.post(f"{url}/v1/chat/completions", json={
            "model": MODEL, "max_tokens": MAX_TOKENS, "temperature": temperature, "seed": i,
            "messages": [{"role": "user", "content": "Fill in this JSON object."}],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": f"s{i}", "schema": schema}}})
        try:
            jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]),
                                schema)
            return True
        except (ValueError, KeyError, jsonschema.ValidationError):
            return False

    async def run() -> list[bool]:
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(timeout=600) as http:
            async def bounded(*job):
                async with limit:
                    return await one(http, *job)
            return await asyncio.gather(*[bounded(i, s, t) for i, s in enumerate(schemas)
                                          for t in (0.0, 1.0)])

    ok = asyncio.run(run())
    return sum(ok), len(ok)


def killer(url: str, every: float, stop: threading.Event, kills: list[int]) -> None:
    """SIGKILL a streaming decode worker every `every` seconds until `stop`."""
    while not stop.wait(every):
        workers = httpx.get(f"{url}/workers", timeout=10).json()["workers"]
        busy = [w for w in workers if w["role"] == "decode" and w["inflight"] and w["pid"]]
        healthy = [w for w in workers if w["role"] == "decode" and w["healthy"]]
        if busy and len(healthy) >= 2:  # keep one alive to fail over to
            os.kill(busy[0]["pid"], signal.SIGKILL)
            kills.append(busy[0]["pid"])


def failovers(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("tandem:worker_failovers_total"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--colocated", action="store_true")
    ap.add_argument("--schemas", type=int, default=200)
    ap.add_argument("--kill-every", type=float, default=0.0,
                    help="validity only, with two decode workers killed in turn")
    ap.add_argument("--engine", action="store_true", help="the engine in process, no server")
    args = ap.parse_args()
    if args.engine:
        return engine_run(args)
    if args.kill_every:
        return kill_run(args)
    dtype = default_dtype() if args.dtype == "auto" else args.dtype
    schemas = corpus()[: args.schemas]
    comp = compile_figures(schemas)
    guided = {"temperature": 1.0, "max_tokens": TOKENS,
              "response_format": {"type": "json_schema",
                                  "json_schema": {"name": "people", "schema": PEOPLE}}}
    free = {"temperature": 1.0, "max_tokens": TOKENS, "ignore_eos": True}
    rates: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        flags = ["--colocated"] if args.colocated else []
        with tandem_serve("tandem-structured", work, work / "kv", *flags, dtype=dtype) as server:
            asyncio.run(wave(server.url, 2, guided))  # warm-up, unmeasured
            for r in range(args.rounds):
                for c in (1, 16):
                    modes = [("guided", guided), ("free", free)]
                    for mode, body in modes if r % 2 == 0 else modes[::-1]:
                        rate, length = asyncio.run(wave(server.url, c, body))
                        assert length == TOKENS, (mode, length)
                        rates.setdefault((mode, c), []).append(rate)
                print(f"round {r + 1} done", flush=True)
            valid, total = validity(server.url, schemas)
    topology = "colocated" if args.colocated else "1P+1D"
    print(f"\nCPU flags: {' '.join(cpu_flags()) or 'none'}; dtype {dtype}; {topology}; "
          f"median of {args.rounds} rounds\n")
    print(f"compile: token trie {comp['trie_s']:.2f} s once; a corpus schema cold "
          f"{comp['cold_median_ms']:.1f} ms median, p90 {comp['cold_p90_ms']:.1f} ms; cached "
          f"{comp['warm_median_us']:.0f} us ({comp['hits']} hits, {comp['compiles']} compiles)\n")
    print("| c | free tok/s per stream | guided tok/s per stream | overhead |")
    print("|---|---|---|---|")
    for c in (1, 16):
        free, guided_rate = (statistics.median(rates[(m, c)]) for m in ("free", "guided"))
        print(f"| {c} | {free:.1f} | {guided_rate:.1f} | {1 - guided_rate / free:+.1%} |")
    print(f"\nvalidity: {valid} / {total} corpus answers parse and validate (greedy + seeded)")
    return 0


def engine_run(args: argparse.Namespace) -> int:
    from engine.engine import Engine, EngineConfig, SeqRequest
    from engine.loader import load_model
    from engine.registry import resolve_model
    from engine.sampling_params import SamplingParams

    dtype = default_dtype() if args.dtype == "auto" else args.dtype
    lm = load_model(resolve_model(MODEL), dtype=dtype, device="cpu")
    engine = Engine(lm, EngineConfig(max_slots=32))
    engine.grammars.warm()
    ids = lm.tokenizer.apply_chat_template(ASK, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    guide = Guide("json", json.dumps(PEOPLE))

    def median_step(c: int, guided: bool, r: int) -> float:
        for i in range(c):
            p = SamplingParams(max_tokens=TOKENS, temperature=1.0, seed=r * 100 + i,
                               ignore_eos=not guided, guide=guide if guided else None)
            engine.add(SeqRequest(f"{r}-{guided}-{i}", list(ids), len(ids), p))
        steps = []
        while engine.has_work():
            start = time.perf_counter()
            if len(engine.step()) == c:
                steps.append(time.perf_counter() - start)
        return statistics.median(steps)

    times: dict[tuple[int, str], list[float]] = {}
    median_step(2, True, -1)  # warm-up
    for r in range(args.rounds):
        for c in (1, 16):
            for mode in ("free", "overlap", "inline") if r % 2 == 0 else ("inline", "overlap",
                                                                           "free"):
                engine._masks.overlap = mode == "overlap"
                times.setdefault((c, mode), []).append(median_step(c, mode != "free", r))
    print(f"\nCPU flags: {' '.join(cpu_flags()) or 'none'}; dtype {dtype}; engine in process; "
          f"median decode step, median of {args.rounds} rounds\n")
    print("| batch | free | masks in line | masks during the forward |")
    print("|---|---|---|---|")
    for c in (1, 16):
        free, inline, overlap = (statistics.median(times[(c, m)]) * 1e3
                                 for m in ("free", "inline", "overlap"))
        print(f"| {c} | {free:.2f} ms | {inline:.2f} ms ({inline / free - 1:+.1%}) | "
              f"{overlap:.2f} ms ({overlap / free - 1:+.1%}) |")
    return 0


def kill_run(args: argparse.Namespace) -> int:
    dtype = default_dtype() if args.dtype == "auto" else args.dtype
    schemas = corpus()[: args.schemas]
    kills: list[int] = []
    stop = threading.Event()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with tandem_serve("tandem-structured-kill", work, work / "kv", "--decode-workers", "2",
                          dtype=dtype) as server:
            before = failovers(server.url)
            thread = threading.Thread(target=killer,
                                      args=(server.url, args.kill_every, stop, kills))
            thread.start()
            try:
                valid, total = validity(server.url, schemas)
            finally:
                stop.set()
                thread.join()
            retried = failovers(server.url) - before
    print(f"\nCPU flags: {' '.join(cpu_flags()) or 'none'}; dtype {dtype}; 1P+2D, a streaming "
          f"decode worker SIGKILLed every {args.kill_every:g} s: {len(kills)} kills, "
          f"{retried:.0f} worker calls failed over")
    print(f"validity: {valid} / {total} corpus answers parse and validate (greedy + seeded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
