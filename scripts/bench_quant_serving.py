"""Quantized serving speed against llama.cpp on the same GGUF (issue 19), in one run.

    .venv/bin/python scripts/bench_quant_serving.py [--rounds 2] [--dtypes bfloat16,float32]
        [--quants none,int8,int4,int4+compile] [--out quant_serving.json]

Targets, started one at a time (never two at once) on free loopback ports:

    llamacpp                 llama-cpp-python's server on the model's Q4_1 GGUF (--threads)
    tandem-DTYPE-QUANT       tandem serve --colocated --dtype DTYPE --quantization QUANT,
                             QUANT in --quants (none, int8, int4), for each of --dtypes;
                             QUANT+compile adds --compile-decode (engine/compiled_step.py)

Each target is warmed up, then driven by `tandem bench`'s own runner and client (chat,
streaming, temperature 0, --max-tokens answers) at concurrency 1 and 16. The prompts ask for
long answers and are the same for every target. tandem gets ignore_eos; llama.cpp's server
ignores that field, so its completion-token counts are reported as measured. Rounds alternate
the target order, so slow drift of a shared host does not favour one target.

Per target (medians over rounds):

    c=1 decode tok/s    per stream: (tokens - 1) / (E2E - TTFT), median over requests
    c=1 TTFT p50
    c=16 out tok/s      aggregate: completion tokens / the level's wall time
    tokens/answer       mean completion tokens (llama.cpp may stop at EOS)

and the ratios the issue names. Prints a markdown table; writes every request to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine.loader import gguf_source  # noqa: E402
from engine.registry import DEFAULT_MODEL, resolve_model  # noqa: E402
from scripts.serving_targets import Server, cpu_flags, llamacpp_serve, tandem_serve  # noqa: E402
from tandem.bench import report  # noqa: E402
from tandem.bench.client import make_client  # noqa: E402
from tandem.bench.config import BenchConfig  # noqa: E402
from tandem.bench.runner import BenchResult, LevelResult, LevelRun  # noqa: E402
from tandem.bench.workloads import Session, Turn  # noqa: E402

log = logging.getLogger("bench_quant_serving")
QUANTS = ("none", "int8", "int4")
LEVELS = (1, 16)
LLAMACPP = "llamacpp"
TOPICS = (
    "a dragon who learns to bake bread", "a lighthouse keeper on a stormy night",
    "a robot that wants to paint", "two friends lost in a desert", "a city under the sea",
    "a child who can talk to birds", "the last train of the winter", "a detective cat",
    "a garden that grows overnight", "a ship made of glass", "a mountain village festival",
    "a clockmaker and a broken clock", "a library that never closes", "a fox and a crow",
    "a girl who builds a rocket", "a king who lost his crown", "an old map and a treasure",
    "a snowman in summer", "a river that flows uphill", "a musician with no instrument",
    "a bakery on the moon", "a dog who guards a castle", "a storm that sings",
    "a forest of silver trees", "a boy and a lost kite", "a painter who paints the wind",
    "a market in the clouds", "an island of giant turtles", "a quiet ghost in a school",
    "a bridge between two worlds", "a farmer and a talking horse", "a star that fell to earth",
)


def prompts(n: int, offset: int) -> list[str]:
    """n chat prompts whose greedy answers run well past 64 tokens (a story, in detail)."""
    return [f"Write a long, detailed story about {TOPICS[(offset + i) % len(TOPICS)]}."
            for i in range(n)]


def plan(texts: list[str], max_tokens: int) -> tuple[Session, ...]:
    """One single-turn session per prompt, in the runner's plan format."""
    return tuple(Session(index=i, prefix=None, carry_history=False,
                         turns=(Turn(index=i, text=t, max_tokens=max_tokens),))
                 for i, t in enumerate(texts))


async def run_levels(cfg: BenchConfig, plans: dict[int, tuple[Session, ...]]) -> BenchResult:
    """The runner's level loop over fixed plans (run_benchmark draws random-word prompts)."""
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    async with make_client(cfg) as client:
        levels = [await LevelRun(client, cfg, c).run(p) for c, p in plans.items()]
    return BenchResult(config=cfg, started_at=started, levels=levels)


def decode_rate(level: LevelResult) -> float | None:
    """Median per-stream decode tok/s: tokens after the first over time after the first."""
    rates = [(r.completion_tokens - 1) / (r.e2e_s - r.ttft_s) for r in level.records
             if r.ok and r.completion_tokens > 1 and r.e2e_s > r.ttft_s]
    return statistics.median(rates) if rates else None


def measure(server: Server, args: argparse.Namespace) -> dict:
    """Warm-up (one request, then one full c=16 wave), then the measured levels."""
    cfg = BenchConfig(base_url=server.url, model=server.model, endpoint="chat",
                      temperature=0.0, timeout_s=600.0, concurrency=list(LEVELS),
                      ignore_eos=server.name != LLAMACPP, max_duration_s=args.level_s)
    warm = {1: plan(prompts(1, 7), 8), 16: plan(prompts(16, 11), 8)}
    asyncio.run(run_levels(cfg, warm))
    sizes = {1: args.requests_c1, 16: args.requests_c16}
    plans = {c: plan(prompts(n, 3 * c), args.max_tokens) for c, n in sizes.items()}
    result = asyncio.run(run_levels(cfg, plans))
    summaries = [report.summarize_level(level, {}) for level in result.levels]
    c1, c16 = summaries
    row = {"decode_c1": decode_rate(result.levels[0]), "ttft_p50_c1": (c1.ttft_s or {}).get("p50"),
           "out_c16": c16.output_token_throughput, "ttft_p50_c16": (c16.ttft_s or {}).get("p50"),
           "tokens_per_answer": _mean_tokens(result.levels),
           "usage": sorted({s.usage_source for s in summaries}),
           "failed": c1.failed + c16.failed, "empty": _empty(result.levels),
           "not_sent": sum(lv.planned - len(lv.records) for lv in result.levels)}
    log.info("%s: %s", server.name, {k: v for k, v in row.items() if k != "usage"})
    return {"row": row, "doc": report.document(result, summaries)}


def _empty(levels: list[LevelResult]) -> int:
    """Streams that ended cleanly with no token (llama.cpp's interrupted requests do)."""
    return sum(r.ok and r.completion_tokens == 0 for lv in levels for r in lv.records)


def _mean_tokens(levels: list[LevelResult]) -> float | None:
    counts = [r.completion_tokens for lv in levels for r in lv.records if r.ok]
    return statistics.mean(counts) if counts else None


def make_server(name: str, workdir: Path, args: argparse.Namespace, rnd: int) -> Server:
    if name == LLAMACPP:
        return llamacpp_serve(name, workdir, gguf_source(resolve_model(DEFAULT_MODEL)),
                              threads=args.threads, python=args.llamacpp_python)
    _, dtype, quant = name.split("-")
    quant, _, compiled = quant.partition("+")
    # A fresh KV folder each time: no target may find another's (or an earlier round's) blocks.
    return tandem_serve(name, workdir, workdir / f"{name}-r{rnd}-kv", "--colocated",
                        "--quantization", quant, *(["--compile-decode"] if compiled else []),
                        dtype=dtype)


def run_target(name: str, workdir: Path, args: argparse.Namespace, rnd: int) -> dict:
    t0 = time.monotonic()
    log.info("=== round %d: %s (logs in %s)", rnd, name, workdir)
    try:
        with make_server(name, workdir, args, rnd) as server:
            out = measure(server, args)
    except Exception as exc:  # one broken target must not lose the others' results
        log.exception("%s failed", name)
        out = {"error": f"{type(exc).__name__}: {exc}"}
    log.info("=== round %d: %s done in %.0f s", rnd, name, time.monotonic() - t0)
    return out


def _med(runs: list[dict], key: str) -> float | None:
    values = [r["row"][key] for r in runs if "row" in r and r["row"][key] is not None]
    return statistics.median(values) if values else None


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ms(seconds: float | None) -> str:
    return _fmt(None if seconds is None else seconds * 1000, ".0f")


def table(targets: list[str], results: dict[str, list[dict]]) -> list[str]:
    lines = ["| target | c=1 decode tok/s/stream | c=1 TTFT p50 (ms) | c=16 out tok/s | "
             "c=16 TTFT p50 (ms) | tokens/answer | failed or empty | per round (c=1 / c=16) |",
             "|" + "---|" * 8]
    for name in targets:
        runs = results[name]
        per_round = ", ".join(f"{_fmt(r['row']['decode_c1'], '.1f')} / "
                              f"{_fmt(r['row']['out_c16'], '.1f')}" if "row" in r else "error"
                              for r in runs)
        failed = sum(r["row"]["failed"] + r["row"]["empty"] + r["row"]["not_sent"]
                     if "row" in r else 1
                     for r in runs)
        lines.append(f"| {name} | {_fmt(_med(runs, 'decode_c1'), '.1f')} | "
                     f"{_ms(_med(runs, 'ttft_p50_c1'))} | {_fmt(_med(runs, 'out_c16'), '.1f')} | "
                     f"{_ms(_med(runs, 'ttft_p50_c16'))} | "
                     f"{_fmt(_med(runs, 'tokens_per_answer'), '.1f')} | {failed} | "
                     f"{per_round} |")
    return lines


def ratios(targets: list[str], results: dict[str, list[dict]]) -> list[str]:
    def ratio(a: str, ka: str, b: str, kb: str) -> str:
        x, y = _med(results[a], ka), _med(results.get(b, []), kb)
        return "-" if x is None or not y else f"{x / y:.2f}x"

    lines = ["| tandem int4 target | int4 c=1 / llama.cpp c=1 (goal >= 0.7) | "
             "int4 c=16 / none c=16 (goal >= 1.5) | int4 c=16 / llama.cpp c=16 |",
             "|---|---|---|---|"]
    for int4 in (t for t in targets if t.split("-")[-1].startswith("int4")):
        none = int4.rsplit("-", 1)[0] + "-none"
        lines.append(f"| {int4} | {ratio(int4, 'decode_c1', LLAMACPP, 'decode_c1')} | "
                     f"{ratio(int4, 'out_c16', none, 'out_c16')} | "
                     f"{ratio(int4, 'out_c16', LLAMACPP, 'out_c16')} |")
    return lines


def _usage(runs: list[dict]) -> set[str]:
    return {u for r in runs if "row" in r for u in r["row"]["usage"]}


def render(meta: dict, targets: list[str], results: dict[str, list[dict]]) -> str:
    head = [f"## Quantized serving vs llama.cpp ({meta['rounds']} rounds, medians)", "",
            f"model `{meta['model']}`, {meta['cpus']} CPUs, flags {' '.join(meta['cpu_flags'])}, "
            f"torch {meta['torch']}, {meta['max_tokens']}-token answers, temperature 0, "
            f"llama.cpp {meta['threads']} threads; load {meta['load_before']} -> "
            f"{meta['load_after']}", ""]
    errors = [f"- {n} round {i}: {r['error']}" for n in targets
              for i, r in enumerate(results[n]) if "error" in r]
    errors += [f"- {n}: token counts are streamed content chunks (usage: {', '.join(usage)})"
               for n in targets if (usage := _usage(results[n])) - {"server"}]
    return "\n".join(head + table(targets, results) + [""] + ratios(targets, results)
                     + ([""] + errors if errors else [])) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds; odd ones reverse the order")
    p.add_argument("--dtypes", default="bfloat16", help="comma-separated tandem dtypes")
    p.add_argument("--quants", default=",".join(QUANTS),
                   help="comma-separated: none, int8, int4, each optionally +compile")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per answer")
    p.add_argument("--requests-c1", type=int, default=8, help="requests at concurrency 1")
    p.add_argument("--requests-c16", type=int, default=32, help="requests at concurrency 16")
    p.add_argument("--level-s", type=float, default=300.0,
                   help="no new request starts after this many seconds of a level")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    p.add_argument("--llamacpp-python", default=None,
                   help="llama-cpp-python's interpreter (default: $LLAMACPP_PYTHON, else "
                   "/work/llama-venv/bin/python)")
    p.add_argument("--out", type=Path, default=Path("quant_serving.json"),
                   help="JSON of every request")
    p.add_argument("--workdir", type=Path, help="logs and KV dirs (default: a temp dir)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    dtypes = args.dtypes.split(",")
    targets = [LLAMACPP] + [f"tandem-{d}-{q}" for d in dtypes for q in args.quants.split(",")]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-quant-serving-"))
    meta = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": DEFAULT_MODEL, "dtypes": dtypes, "rounds": args.rounds,
            "max_tokens": args.max_tokens, "threads": args.threads, "cpus": os.cpu_count(),
            "cpu_flags": cpu_flags(), "torch": torch.__version__,
            "load_before": [round(x, 2) for x in os.getloadavg()],
            "command": " ".join([sys.executable, *sys.argv]), "workdir": str(workdir)}
    results: dict[str, list[dict]] = {name: [] for name in targets}
    for rnd in range(args.rounds):
        for name in targets if rnd % 2 == 0 else targets[::-1]:
            results[name].append(run_target(name, workdir, args, rnd) | {"round": rnd})
    meta["load_after"] = [round(x, 2) for x in os.getloadavg()]
    text = render(meta, targets, results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "markdown": text, "targets": results},
                                   indent=2) + "\n")
    print(text)
    log.info("wrote %s", args.out)
    return 0 if all("row" in r for runs in results.values() for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
