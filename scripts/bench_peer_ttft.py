"""--ttft of scripts/bench_peer.py: issue 13's TTFT goals at ~2,900 prompt tokens, every round.

    cold           a chat with a ~2,850-word system document new to the target (one per round)
                   and a question; 4 output tokens
    cached         right after, the same document with another question (the prefix is cached)
    after restart  tandem-1p1d only: its whole stack stopped and started again on the same KV dir
                   (the disk tier survives, the memory tiers do not), warmed up on short prompts
                   that share no block with the document, then the document with a third question

Goals (issue 13), tandem against the peer (peer-cb): cold TTFT <= 0.85x the peer's, cached
<= 1.0x, after restart <= 1.0x the peer's cached TTFT of the same round (its in-process cache).
"""

from __future__ import annotations

import asyncio
import random
import statistics
from collections.abc import Callable

from scripts.serving_targets import Server
from tandem.bench.client import make_client, request_body, send
from tandem.bench.config import BenchConfig
from tandem.bench.records import RequestRecord
from tandem.bench.workloads import count_words, words

PEER = "peer-cb"
RESTARTED = "tandem-1p1d"  # the target restarted for "after restart"
TTFT_WORDS = 2850  # + chat template and question: ~2,900 prompt tokens
KINDS = ("cold", "cached", "after restart")
GOALS = {"cold": 0.85, "cached": 1.0, "after restart": 1.0}  # at most, x the peer's reference
REFERENCE = {"cold": "cold", "cached": "cached", "after restart": "cached"}  # the peer's kind


def med(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def prompt(r: int, kind: str, n_words: int) -> list[dict]:
    """Round r's document (the same for every target and kind) and a question of its own."""
    document = words(random.Random(f"ttft-document-{r}"), n_words)
    question = words(random.Random(f"ttft-question-{r}-{kind}"), 12)
    return [{"role": "system", "content": f"Document {r}: {document}"},
            {"role": "user", "content": f"Question ({kind}): {question}?"}]


async def _one(server: Server, messages: list[dict]) -> RequestRecord:
    cfg = BenchConfig(base_url=server.url, model=server.model, temperature=0.0, timeout_s=600.0)
    record = RequestRecord(index=0, session=0, turn=0, prompt_words=count_words(messages),
                           max_tokens=4)
    async with make_client(cfg) as client:
        await send(client, cfg, request_body(cfg, server.model, messages, 4), record)
    return record


def measure(rows: list[dict], server: Server, r: int, kind: str, n_words: int) -> None:
    """One streamed request with 4 output tokens: TTFT and what the server said it cached."""
    rec = asyncio.run(_one(server, prompt(r, kind, n_words)))
    rows.append({"round": r, "kind": kind, "target": server.name, "ttft_s": rec.ttft_s,
                 "prompt_tokens": rec.prompt_tokens, "cached_tokens": rec.cached_tokens,
                 "errors": [] if rec.ok else [rec.error], "request": rec.to_json()})
    print(f"round {r + 1} {kind} {server.name}: TTFT {fmt(rec.ttft_s, '.3f')} s, "
          f"{rec.prompt_tokens} prompt tokens, {fmt(rec.cached_tokens, 'd')} cached, "
          f"{0 if rec.ok else 1} errors", flush=True)


def ttft_round(rows: list[dict], order: list[Server], r: int, n_words: int,
               restart: Callable[[], Server] | None) -> None:
    """Cold then cached on each target in the round's order; then, given `restart` (stops
    tandem-1p1d, starts and warms up a new one on the same KV dir), after restart."""
    for s in order:
        measure(rows, s, r, "cold", n_words)
        measure(rows, s, r, "cached", n_words)
    if restart is not None:
        measure(rows, restart(), r, "after restart", n_words)


def summary(rows: list[dict], names: list[str]) -> list[dict]:
    """Per kind and target: median TTFT and cached tokens over rounds, and tandem/peer as the
    ratio of medians and the median of per-round ratios (against the peer's REFERENCE kind)."""
    out = []
    for kind in KINDS:
        peer = {r["round"]: r["ttft_s"] for r in rows
                if r["target"] == PEER and r["kind"] == REFERENCE[kind] and r["ttft_s"]}
        for n in names:
            mine = {r["round"]: r for r in rows if r["target"] == n and r["kind"] == kind}
            if not mine:
                continue
            m = med(r["ttft_s"] for r in mine.values())
            ratios = {}
            if n != PEER and peer and m is not None:
                ratios = {"ratio_of_medians": m / med(peer.values()),
                          "median_of_ratios": med(r["ttft_s"] / peer[rd] for rd, r in mine.items()
                                                  if rd in peer and r["ttft_s"] is not None)}
            out.append({"kind": kind, "target": n, "ttft_s": m, "rounds": len(mine),
                        "cached_tokens": med(r["cached_tokens"] for r in mine.values()),
                        "goal": GOALS[kind], "reference": f"{PEER} {REFERENCE[kind]}", **ratios})
    return out


def table(rows: list[dict], n_words: int) -> list[str]:
    out = ["", f"TTFT of a ~{n_words:,}-word document, 4 output tokens, medians over rounds; "
           "lower is better (a tandem/peer ratio under 1 favours tandem).",
           f"Goals (issue 13): cold <= 0.85x and cached <= 1.0x the peer's; after restart "
           f"({RESTARTED} restarted, from its disk tier) <= 1.0x the peer's cached TTFT of the "
           "same round.",
           "| kind | target | TTFT s (median) | cached tokens (median) "
           "| tandem/peer (ratio of medians) | tandem/peer (median of ratios) |",
           "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        cells = [fmt(row["ttft_s"], ".3f"), fmt(row["cached_tokens"], ".0f"),
                 *(fmt(row.get(k), ".2f", "x") for k in ("ratio_of_medians", "median_of_ratios"))]
        out.append(f"| {row['kind']} | {row['target']} | {' | '.join(cells)} |")
    return out
