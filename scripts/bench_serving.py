"""Serving benchmark: tandem against the `transformers serve` peer, in one run.

    .venv/bin/python scripts/bench_serving.py            # full: ~30 min on 2 quiet vCPUs
    .venv/bin/python scripts/bench_serving.py --quick    # smoke: ~6 min, into docs/bench/quick

Targets, started one at a time on free loopback ports (scripts/serving_targets.py), all in one
dtype (--dtype; default auto: bf16 on a CPU with native bf16, else float32):

    tandem-1p1d        tandem serve (1 prefill + 1 decode worker, memory+disk KV store)
    tandem-colocated   tandem serve --colocated (one worker, no handoff)
    tandem-no-cache    tandem serve --no-prefix-cache (shared-prefix and TTFT only)
    peer               transformers serve (the `peer` extra)
    peer-cb            transformers serve --continuous-batching

Each is measured with `tandem bench`'s own code (chat, streaming, temperature 0, no
ignore_eos, which the peer rejects, so answers may end early at EOS):

    sweep    output tok/s and latency at concurrency 1, 4, 16, 32 (64 output tokens)
    ttft     a cold ~2,900-token chat prompt, then a second prompt sharing its prefix;
             tandem-1p1d also through a second router process and after a restart
    shared   the shared-prefix workload (per-user documents, several questions each)

Writes serving.json (every request), serving.md (the tables, also printed) and PNG charts
(`tandem bench --plot`'s, per target and workload, plus a comparison) into --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.loader import materialize  # noqa: E402
from engine.registry import DEFAULT_MODEL, resolve_model  # noqa: E402
from scripts.serving_report import render_markdown, write_comparison_plot  # noqa: E402
from scripts.serving_targets import (  # noqa: E402
    Server,
    default_dtype,
    peer_serve,
    tandem_router,
    tandem_serve,
)
from tandem.bench import report  # noqa: E402
from tandem.bench.client import make_client, request_body, send  # noqa: E402
from tandem.bench.config import BenchConfig  # noqa: E402
from tandem.bench.plot import write_plots  # noqa: E402
from tandem.bench.records import RequestRecord  # noqa: E402
from tandem.bench.runner import run_benchmark  # noqa: E402
from tandem.bench.workloads import count_words, words  # noqa: E402

log = logging.getLogger("bench_serving")
TARGETS = ("tandem-1p1d", "tandem-colocated", "tandem-no-cache", "peer", "peer-cb")


@dataclass(frozen=True, slots=True)
class Sizes:
    concurrency: tuple[int, ...] = (1, 4, 16, 32)
    num_requests: int = 64  # per level; a level also stops starting requests after level_s
    input_len: int = 256  # words (~tokens) per sweep prompt
    max_tokens: int = 64
    level_s: float = 60.0
    prefix_words: int = 2850  # + chat template and question: ~2,900 prompt tokens
    shared_prefix_words: int = 1024
    shared_users: int = 4
    shared_turns: int = 4
    shared_concurrency: int = 4


QUICK = Sizes(concurrency=(1, 4), num_requests=6, input_len=64, max_tokens=16, level_s=15.0,
              prefix_words=900, shared_prefix_words=256, shared_users=2, shared_turns=2,
              shared_concurrency=2)


def run_bench(server: Server, **fields) -> dict:
    """One `tandem bench` run against a server: its JSON document (summaries, every request)
    and, for the charts, the raw result."""
    cfg = BenchConfig(base_url=server.url, model=server.model, endpoint="chat",
                      temperature=0.0, timeout_s=600.0, **fields)
    cfg.validate()
    result = asyncio.run(run_benchmark(cfg))
    summaries = [report.summarize_level(level, {}) for level in result.levels]
    return {"doc": report.document(result, summaries), "result": result, "summaries": summaries}


def sweep(server: Server, sizes: Sizes) -> dict:
    return run_bench(server, workload="random", concurrency=list(sizes.concurrency),
                     num_requests=sizes.num_requests, input_len=sizes.input_len,
                     max_tokens=sizes.max_tokens, max_duration_s=sizes.level_s)


def shared_prefix(server: Server, sizes: Sizes) -> dict:
    return run_bench(server, workload="shared-prefix", concurrency=[sizes.shared_concurrency],
                     prefix_len=sizes.shared_prefix_words, num_users=sizes.shared_users,
                     turns=sizes.shared_turns, input_len=16, max_tokens=sizes.max_tokens,
                     num_requests=sizes.shared_users * sizes.shared_turns,
                     max_duration_s=10 * sizes.level_s)


async def _one(server: Server, messages: list[dict], max_tokens: int) -> RequestRecord:
    cfg = BenchConfig(base_url=server.url, model=server.model, temperature=0.0, timeout_s=600.0)
    record = RequestRecord(index=0, session=0, turn=0, prompt_words=count_words(messages),
                           max_tokens=max_tokens)
    async with make_client(cfg) as client:
        await send(client, cfg, request_body(cfg, cfg.model, messages, max_tokens), record)
    return record


def ttft(server: Server, messages: list[dict]) -> dict:
    """One streamed request with 4 output tokens: TTFT and what the server said it cached."""
    r = asyncio.run(_one(server, messages, 4))
    log.info("%s: ttft %s s, prompt %d, cached %s", server.name,
             f"{r.ttft_s:.3f}" if r.ttft_s else "-", r.prompt_tokens, r.cached_tokens)
    return {"ok": r.ok, "error": r.error, "ttft_s": r.ttft_s, "prompt_tokens": r.prompt_tokens,
            "cached_tokens": r.cached_tokens}


def warm_up(server: Server) -> None:
    """First requests pay one-off costs (the peer's continuous-batching set-up: ~40 s, the
    first long prefill). The long one goes through tandem's prefill worker (over a block) and
    shares no block with the measured prompts."""
    rng = random.Random("bench-serving-warm-up")
    for text in ("Hello!", words(rng, 300)):
        record = asyncio.run(_one(server, [{"role": "user", "content": text}], 4))
        if not record.ok:
            raise RuntimeError(f"{server.name} warm-up failed: {record.error}")


def prefix_prompts(sizes: Sizes) -> list[list[dict]]:
    """Four chats sharing one long system document; the same for every target."""
    rng = random.Random("bench-serving-prefix")
    document = words(rng, sizes.prefix_words)
    return [[{"role": "system", "content": document},
             {"role": "user", "content": f"Question {i}: {words(rng, 12)}?"}] for i in range(4)]


def measure(server: Server, sizes: Sizes, prompts: list[list[dict]], parts: set[str]) -> dict:
    warm_up(server)
    out: dict = {}
    if "sweep" in parts:
        out["sweep"] = sweep(server, sizes)
    out["ttft"] = {"cold": ttft(server, prompts[0]), "shared prefix": ttft(server, prompts[1])}
    if "shared" in parts:
        out["shared"] = shared_prefix(server, sizes)
    return out


def run_tandem_1p1d(workdir: Path, sizes: Sizes, prompts: list[list[dict]], dtype: str) -> dict:
    """Also: the cached prefix through another router process, and after a restart (the
    memory tiers are gone then; the disk tier still holds the blocks)."""
    kv = workdir / "tandem-1p1d-kv"
    with tandem_serve("tandem-1p1d", workdir, kv, dtype=dtype) as s:
        out = measure(s, sizes, prompts, {"sweep"})
        workers = httpx.get(f"{s.url}/workers", timeout=10).json()["workers"]
        with tandem_router("tandem-router2", workdir, kv, workers) as r2:
            out["ttft"]["other router"] = ttft(r2, prompts[2])
        out["shared"] = shared_prefix(s, sizes)
    with tandem_serve("tandem-1p1d-restarted", workdir, kv, dtype=dtype) as s:
        warm_up(s)
        out["ttft"]["after restart"] = ttft(s, prompts[3])
    return out


def run_target(name: str, workdir: Path, sizes: Sizes, prompts: list[list[dict]],
               folder: Path, dtype: str) -> dict:
    if name == "tandem-1p1d":
        return run_tandem_1p1d(workdir, sizes, prompts, dtype)
    if name.startswith("peer"):
        server = peer_serve(name, workdir, folder, continuous=name == "peer-cb", dtype=dtype)
    else:
        flags = {"tandem-colocated": ["--colocated"], "tandem-no-cache": ["--no-prefix-cache"]}
        server = tandem_serve(name, workdir, workdir / f"{name}-kv", *flags[name], dtype=dtype)
    parts = {"shared"} if name == "tandem-no-cache" else {"sweep", "shared"}
    with server:
        return measure(server, sizes, prompts, parts)


def write_outputs(out_dir: Path, meta: dict, results: dict) -> str:
    """serving.json, serving.md and the charts; returns the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, res in results.items():
        for part in ("sweep", "shared"):
            if part in res:
                write_plots(res[part]["result"], res[part]["summaries"], out_dir / name / part)
    write_comparison_plot(results, out_dir / "throughput_vs_concurrency.png")
    doc = {"meta": meta, "targets": {
        name: {k: (v["doc"] if isinstance(v, dict) and "doc" in v else v)
               for k, v in res.items()} for name, res in results.items()}}
    (out_dir / "serving.json").write_text(json.dumps(doc, indent=2) + "\n")
    text = render_markdown(meta, results)
    (out_dir / "serving.md").write_text(text)
    return text


def _rel(path: str, root: Path) -> str:
    p = Path(path)
    return str(p.relative_to(root)) if p.is_relative_to(root) else path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of minutes")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help=f"comma-separated subset of {','.join(TARGETS)}")
    p.add_argument("--out", type=Path, help="default docs/bench (docs/bench/quick with --quick)")
    p.add_argument("--level-s", type=float, help="seconds per concurrency level (bounds time)")
    p.add_argument("--workdir", type=Path, help="logs and KV dirs (default: a temp dir)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: auto, "
                   "bf16 only on a CPU with native bf16)")
    args = p.parse_args(argv)
    unknown = set(args.targets.split(",")) - set(TARGETS)
    if unknown:
        p.error(f"unknown targets: {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    sizes = QUICK if args.quick else Sizes()
    sizes = replace(sizes, level_s=args.level_s) if args.level_s else sizes
    root = Path(__file__).resolve().parents[1]
    out_dir = args.out or root / ("docs/bench/quick" if args.quick else "docs/bench")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-serving-"))
    folder = Path(materialize(resolve_model(DEFAULT_MODEL)))
    prompts = prefix_prompts(sizes)
    dtype = args.dtype or default_dtype()
    meta = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": DEFAULT_MODEL, "dtype": dtype, "quick": args.quick,
            "sizes": asdict(sizes), "cpus": os.cpu_count(), "load_before": os.getloadavg(),
            "command": " ".join([_rel(sys.executable, root), *sys.argv]),
            "workdir": str(workdir)}
    results: dict = {}
    for name in args.targets.split(","):
        t0 = time.monotonic()
        log.info("=== %s (logs in %s)", name, workdir)
        try:
            results[name] = run_target(name, workdir, sizes, prompts, folder, dtype)
        except Exception as exc:  # one broken target must not lose the others' results
            log.exception("%s failed", name)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        log.info("=== %s done in %.0f s", name, time.monotonic() - t0)
    meta["load_after"] = os.getloadavg()
    print(write_outputs(out_dir, meta, results))
    log.info("wrote %s", out_dir)
    return 0 if any("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
