"""LMCache-style multi-round QA on a tandem server it starts: what the device prefix cache saves.

    .venv/bin/python scripts/bench_multiround.py [--users 8] [--questions 4] [--doc-words 1950]
        [--max-tokens 16] [--dtype auto] [--mode colocated|1p1d] [--seed 0]
        [--serve-flag=--torch-threads=1] [--workdir DIR] [--out FILE]

Each user has a document of its own (~2,000 tokens, distinct per user and seed) and asks
--questions questions, round-robin, the conversation growing as in a chat:

    round 1   users 0..N-1: [document, q1]                          cold: the document is new
    round 2   users 0..N-1: [document, q1, a1, q2]                  a1: the server's answer 1
    round r   users 0..N-1: [document, q1, a1, ..., q(r-1), a(r-1), qr]

Requests go one at a time, so TTFT measures prefill and the prefix cache, not queueing; between
two turns of a user the other N-1 conversations pass through the KV pool, so a later round hits
only if the pool kept the user's prefix (or the store tier gives it back). Each request is a
streamed chat, temperature 0, --max-tokens output tokens; one short unrelated chat warms up first.

Prints a line per request, a table per user (cold TTFT; each later round's TTFT, its ratio to the
user's cold TTFT and usage's cached/prompt tokens), the max and median over users of round-2
TTFT / cold TTFT (goal: <= 0.3 for every user), and the prefix hit rates: the run's delta of each
worker's tandem:prefix_cache_{device,store}_tokens_total (worker URLs from the router's GET
/workers) over the run's prompt tokens. Every request goes to --out (JSON). Exit code 1 if any
request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.registry import DEFAULT_MODEL  # noqa: E402
from scripts.serving_targets import Server, cpu_flags, default_dtype, tandem_serve  # noqa: E402
from tandem.bench.client import make_client, request_body, send  # noqa: E402
from tandem.bench.config import BenchConfig  # noqa: E402
from tandem.bench.records import RequestRecord  # noqa: E402
from tandem.bench.workloads import Conversation, count_words, words  # noqa: E402

DOC_WORDS = 1950  # + "Document u:" and the chat template: ~2,000 prompt tokens (SmolLM2)
QUESTION_WORDS = 12
WARM_UP_TOKENS = 4
GOAL = 0.3  # round-2 TTFT at most this times the user's cold TTFT, for every user
COUNTERS = {"device": "tandem:prefix_cache_device_tokens_total",
            "store": "tandem:prefix_cache_store_tokens_total"}


def fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def document(seed: int, user: int, n_words: int) -> str:
    """The user's number comes right after the chat template, so no two users share a KV block."""
    return f"Document {user}: {words(random.Random(f'multiround-doc-{seed}-{user}'), n_words)}"


def question(seed: int, user: int, q: int) -> str:
    text = words(random.Random(f"multiround-question-{seed}-{user}-{q}"), QUESTION_WORDS)
    return f"Question {q + 1}: {text}?"


def bench_config(server: Server) -> BenchConfig:
    # A cold ~2,000-token prefill on a small CPU takes seconds; a request may take minutes.
    return BenchConfig(base_url=server.url, model=server.model, temperature=0.0, timeout_s=600.0)


async def ask(client: httpx.AsyncClient, cfg: BenchConfig, conv: Conversation, text: str,
              record: RequestRecord) -> None:
    """One streamed turn; the answer joins the conversation, as a chat client's would."""
    messages = conv.with_question(text)
    record.prompt_words = count_words(messages)
    answer = await send(client, cfg, request_body(cfg, cfg.model, messages, record.max_tokens),
                        record)
    conv.record_turn(text, answer)


def row(record: RequestRecord, user: int, rnd: int) -> dict:
    return {"user": user, "round": rnd, "ttft_s": record.ttft_s,
            "prompt_tokens": record.prompt_tokens, "cached_tokens": record.cached_tokens,
            "error": None if record.ok else record.error, "request": record.to_json()}


def print_row(r: dict) -> None:
    print(f"round {r['round']} user {r['user']}: TTFT {fmt(r['ttft_s'], '.3f')} s, "
          f"{r['prompt_tokens']} prompt tokens, {fmt(r['cached_tokens'], 'd')} cached"
          + (f", error: {r['error']}" if r["error"] else ""), flush=True)


async def workload(server: Server, args: argparse.Namespace) -> list[dict]:
    """Round-major, one request at a time: every user's question q before anyone's q + 1."""
    cfg = bench_config(server)
    convs = [Conversation([{"role": "system", "content": document(args.seed, u, args.doc_words)}])
             for u in range(args.users)]
    rows = []
    async with make_client(cfg) as client:
        for q in range(args.questions):
            for u, conv in enumerate(convs):
                record = RequestRecord(index=len(rows), session=u, turn=q, prompt_words=0,
                                       max_tokens=args.max_tokens)
                await ask(client, cfg, conv, question(args.seed, u, q), record)
                rows.append(row(record, u, q + 1))
                print_row(rows[-1])
    return rows


async def warm_up(server: Server, n_words: int) -> None:
    """One chat as long as a document that shares no block with any: a short one would leave the
    first long prefill cold (its kernels and buffers: 7.8 s instead of 0.5 s for user 0's cold
    TTFT in a 300-word run), which would flatter user 0's ratios."""
    cfg = bench_config(server)
    record = RequestRecord(index=0, session=0, turn=0, prompt_words=0, max_tokens=WARM_UP_TOKENS)
    text = f"Warm-up: {words(random.Random('multiround-warm-up'), n_words)}. Tell me a joke."
    async with make_client(cfg) as client:
        await ask(client, cfg, Conversation([]), text, record)
    if not record.ok:
        raise RuntimeError(f"{server.name} warm-up failed: {record.error}")


def worker_counters(url: str) -> dict[str, float]:
    """A worker's prefix-cache counters by tier; a tier it does not export is left out."""
    resp = httpx.get(f"{url}/metrics", timeout=10)
    resp.raise_for_status()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            for tier, name in COUNTERS.items():
                if sample.name == name:  # summed over label sets (one per model)
                    found[tier] = found.get(tier, 0.0) + sample.value
    return found


def scrape(server: Server) -> dict[str, dict[str, float]] | str:
    """{"role url": counters} of every worker the router knows, or why they could not be read.
    Counters live in the workers' registries; the router's /metrics has only its own."""
    try:
        resp = httpx.get(f"{server.url}/workers", timeout=10)
        resp.raise_for_status()
        return {f"{w['role']} {w['url']}": worker_counters(w["url"])
                for w in resp.json()["workers"]}
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"


def hit_tokens(before: dict | str, after: dict | str) -> dict:
    """The run's tokens per worker and tier (None: not exported), or {"error": why}."""
    if isinstance(before, str) or isinstance(after, str):
        return {"error": before if isinstance(before, str) else after}
    return {w: {tier: now[tier] - before.get(w, {}).get(tier, 0.0) if tier in now else None
                for tier in COUNTERS} for w, now in after.items()}


def share(tokens: float | None, total: int) -> str:
    if tokens is None:
        return "n/a"
    return f"{tokens:.0f} tokens ({fmt(tokens / total if total else None, '.1%')})"


def hit_lines(hits: dict, rows: list[dict]) -> list[str]:
    prompt = sum(r["prompt_tokens"] for r in rows)
    cached = sum(r["cached_tokens"] or 0 for r in rows)
    usage = f"usage: {share(cached, prompt)} of {prompt} prompt tokens reported cached"
    if "error" in hits:
        return [f"prefix hit rate: n/a, worker metrics unreachable ({hits['error']}); "
                f"falling back to {usage}"]
    out = [f"prefix hit rate over the run's {prompt} prompt tokens (worker /metrics deltas):"]
    for worker, tiers in hits.items():
        out.append(f"  {worker}: " + ", ".join(f"{t} {share(v, prompt)}" for t, v in tiers.items()))
    return [*out, f"  {usage}"]


def round2_ratios(rows: list[dict]) -> list[float]:
    """Per user with both TTFTs: round-2 TTFT / cold (round-1) TTFT."""
    ttft = {(r["user"], r["round"]): r["ttft_s"] for r in rows if r["ttft_s"]}
    return [ttft[u, 2] / ttft[u, 1] for u in sorted({u for u, _ in ttft})
            if (u, 1) in ttft and (u, 2) in ttft]


def summary_line(ratios: list[float], users: int) -> str:
    if not ratios:
        return "round 2 / cold TTFT: n/a (needs --questions >= 2 and successful requests)"
    met = max(ratios) <= GOAL and len(ratios) == users
    return (f"round 2 / cold TTFT: max {max(ratios):.2f}x, median "
            f"{statistics.median(ratios):.2f}x over {len(ratios)} of {users} users "
            f"(goal <= {GOAL}x for every user: {'met' if met else 'missed'})")


def cell(r: dict, cold: float | None) -> str:
    tokens = f"{fmt(r['cached_tokens'], 'd')}/{r['prompt_tokens']}"
    if r["round"] == 1:
        return f"{fmt(r['ttft_s'], '.3f')} s, {tokens}"
    ratio = r["ttft_s"] / cold if r["ttft_s"] and cold else None
    return f"{fmt(r['ttft_s'], '.3f')} s, {fmt(ratio, '.2f', 'x')}, {tokens}"


def user_table(rows: list[dict], args: argparse.Namespace) -> list[str]:
    by = {(r["user"], r["round"]): r for r in rows}
    rounds = range(1, args.questions + 1)
    out = ["", "Per user: TTFT, x the user's cold TTFT, cached/prompt tokens (usage)",
           "| user | round 1 (cold) |" + "".join(f" round {q} |" for q in rounds[1:]),
           "|---:|" + "---:|" * len(rounds)]
    for u in range(args.users):
        cold = by[u, 1]["ttft_s"]
        out.append(f"| {u} | " + " | ".join(cell(by[u, q], cold) for q in rounds) + " |")
    return out


def header(args: argparse.Namespace) -> tuple[str, list[str]]:
    flags = cpu_flags()
    return (f"{DEFAULT_MODEL}, {args.dtype}, torch {torch.__version__}, {platform.machine()} "
            f"({', '.join(flags)}), nproc {len(os.sched_getaffinity(0))}; tandem {args.mode} "
            f"with {' '.join(args.serve_flag) or 'defaults'}; {args.users} users x "
            f"{args.questions} questions, {args.doc_words}-word documents, max_tokens "
            f"{args.max_tokens}, seed {args.seed}"), flags


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in (("--users", 8), ("--questions", 4), ("--doc-words", DOC_WORDS),
                          ("--max-tokens", 16), ("--seed", 0)):
        ap.add_argument(flag, type=int, default=default, help="default %(default)s")
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: auto)")
    ap.add_argument("--mode", choices=("colocated", "1p1d"), default="colocated")
    ap.add_argument("--workdir", type=Path, default=None, help="logs, KV dir (default: temp)")
    ap.add_argument("--out", type=Path, default=None, help="default WORKDIR/bench_multiround.json")
    ap.add_argument("--serve-flag", action="append", default=[],
                    help="extra `tandem serve` flag (repeatable): --serve-flag=--torch-threads=1")
    args = ap.parse_args(argv)
    if min(args.users, args.questions, args.doc_words, args.max_tokens) < 1:
        ap.error("--users, --questions, --doc-words and --max-tokens must be >= 1")
    args.dtype = args.dtype or default_dtype()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-multiround-"))
    out_path = args.out or workdir / "bench_multiround.json"
    name = f"tandem-{args.mode}"
    flags = ["--colocated"] if args.mode == "colocated" else []
    with tandem_serve(name, workdir, workdir / f"{name}-kv", *flags, *args.serve_flag,
                      dtype=args.dtype) as server:
        asyncio.run(warm_up(server, args.doc_words))
        before = scrape(server)  # after the warm-up: only the workload's tokens count
        rows = asyncio.run(workload(server, args))
        hits = hit_tokens(before, scrape(server))
    head, cpu_flags = header(args)
    ratios = round2_ratios(rows)
    print("\n".join(["", head, *user_table(rows, args), "", summary_line(ratios, args.users),
                     *hit_lines(hits, rows)]), flush=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"header": head, "workdir": str(workdir), "flags": cpu_flags, "argv": sys.argv,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    out_path.write_text(json.dumps({"meta": meta, "records": rows, "round2_ratios": ratios,
                                    "prefix_hit_tokens": hits}, indent=2) + "\n")
    print(f"\nwrote {out_path}")
    return 0 if all(r["error"] is None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
