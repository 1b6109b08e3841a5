"""Tandem against its CPU peer `transformers serve --continuous-batching`, rounds alternating.

    .venv/bin/python scripts/bench_peer.py [--dtype auto] [--concurrency 1,16] [--rounds 3]
        [--targets peer-cb,tandem-colocated,tandem-1p1d] [--requests-per-slot 3]
        [--max-tokens 64] [--ttft [--ttft-words 2850]] [--serve-flag=--torch-threads=1]
        [--env KEY=VALUE] [--baseline DIR --targets ...,base-colocated,base-1p1d]

All targets start once (free loopback ports, scripts/serving_targets.py), are warmed up and stay
up; then for each round and concurrency level every target runs the same closed loop in turn,
the order rotating each round, so a noisy machine hits all targets alike. A level sends
concurrency x --requests-per-slot (at least 4) streamed chats, temperature 0, no ignore_eos (the
peer rejects it), distinct per request and round. Rate = completion tokens (usage, else content
chunks) over wall time. Prints a line per measurement, then medians over rounds; raw figures
(every request) go to --out (JSON).

--baseline DIR serves the base-* targets from another checkout of tandem (e.g. `git worktree add
DIR <commit>`): the same run then measures a change against the code before it, which is the
only comparison this noisy machine supports.

--ttft adds issue 13's TTFT measurements to each round, after its levels (details in
scripts/bench_peer_ttft.py): each target in the round's order gets a cold chat with a
~2,900-token document new to it (--ttft-words, one document per round), then the same document
with another question (cached); then tandem-1p1d is stopped, started again on the same KV dir,
warmed up and asked a third question on the document (after restart: from the disk tier). The
restarted server is the tandem-1p1d target from then on. A TTFT table follows the throughput one:
median TTFT and cached tokens per kind and target, and tandem/peer ratios (lower is better;
after restart against the peer's cached TTFT of the same round).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.loader import materialize  # noqa: E402
from engine.registry import DEFAULT_MODEL, resolve_model  # noqa: E402
from scripts import bench_peer_ttft  # noqa: E402
from scripts.bench_peer_ttft import PEER, RESTARTED, TTFT_WORDS, fmt, med  # noqa: E402
from scripts.serving_targets import (  # noqa: E402
    Server,
    cpu_flags,
    default_dtype,
    peer_serve,
    tandem_serve,
)
from tandem.bench.client import make_client, request_body, send  # noqa: E402
from tandem.bench.config import BenchConfig  # noqa: E402
from tandem.bench.records import RequestRecord  # noqa: E402
from tandem.bench.workloads import count_words, words  # noqa: E402

TARGETS = (PEER, "tandem-colocated", RESTARTED)
BASE_TARGETS = ("base-colocated", "base-1p1d")  # with --baseline: the same, from its checkout


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def story(tag: str) -> list[dict]:
    """A short distinct prompt; the tag comes right after the chat template, so two requests
    share no prefix beyond it."""
    return chat(f"Story {tag}: write a short story about "
                f"{', '.join(words(random.Random(tag), 3))}.")


def run(server: Server, conc: int, prompts: list[list[dict]], max_tokens: int,
        ignore_eos: bool = False) -> dict:
    """`conc` clients in flight until the prompts run out: rate, TTFT and every request."""
    cfg = BenchConfig(base_url=server.url, model=server.model, concurrency=[conc],
                      temperature=0.0, timeout_s=600.0, ignore_eos=ignore_eos)
    records = [RequestRecord(index=i, session=i, turn=0, prompt_words=count_words(m),
                             max_tokens=max_tokens) for i, m in enumerate(prompts)]
    todo = iter(zip(prompts, records, strict=True))

    async def loop() -> float:
        async with make_client(cfg) as client:
            async def worker() -> None:
                for messages, record in todo:
                    record.start_s = time.perf_counter() - t0
                    body = request_body(cfg, server.model, messages, max_tokens)
                    await send(client, cfg, body, record)
            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(conc)))
            return time.perf_counter() - t0
    wall = asyncio.run(loop())
    ok = [r for r in records if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    return {"tok_s": tokens / wall, "wall_s": wall, "completion_tokens": tokens,
            "ttft_s": med(r.ttft_s for r in ok), "errors": [r.error for r in records if not r.ok],
            "usage_reported": all(r.usage_reported for r in ok),
            "requests": [r.to_json() for r in records]}


def make_server(args: argparse.Namespace, workdir: Path, name: str) -> Server:
    """A target, not started; a tandem one keeps its KV dir (WORKDIR/NAME-kv) across restarts."""
    if name == PEER:  # the peer takes the model folder path as `model` (Server.model)
        folder = Path(materialize(resolve_model(DEFAULT_MODEL)))
        return peer_serve(name, workdir, folder, continuous=True, dtype=args.dtype)
    flags = ["--colocated"] if name.endswith("-colocated") else []
    s = tandem_serve(name, workdir, workdir / f"{name}-kv", *flags, *args.serve_flag,
                     dtype=args.dtype)
    s.env.update(kv.split("=", 1) for kv in args.env)
    if name in BASE_TARGETS:  # `python -m` puts the cwd first on sys.path: its code runs
        s.cwd = s.env["PYTHONPATH"] = str(args.baseline.resolve())
    return s


def warm_up(server: Server) -> None:
    """One request alone (the peer's first --continuous-batching one sets its cache up: tens of
    seconds), then two at once."""
    t0 = time.monotonic()
    errors = [e for n in (1, 2) for e in run(server, n, [chat(f"Hi {n}.{i}!") for i in range(n)],
                                              4)["errors"]]
    if errors:
        raise RuntimeError(f"{server.name} warm-up failed: {errors[0]}")
    print(f"{server.name}: warmed up in {time.monotonic() - t0:.1f} s", flush=True)


def restart(stack: contextlib.ExitStack, servers: list[Server], args: argparse.Namespace,
            workdir: Path) -> Server:
    """Stop tandem-1p1d, start a new one on its KV dir (the stack stops it at the end), warm it
    up, and make it the target from now on."""
    i = [s.name for s in servers].index(RESTARTED)
    t0 = time.monotonic()
    servers[i].stop()
    servers[i] = stack.enter_context(make_server(args, workdir, RESTARTED))
    print(f"{RESTARTED}: restarted in {time.monotonic() - t0:.1f} s", flush=True)
    warm_up(servers[i])
    return servers[i]


def table(rows: list[dict], names: list[str]) -> list[str]:
    """Per level and target: the median over rounds of tok/s (and of the level's median TTFT),
    and tandem/peer as the ratio of medians and as the median of per-round ratios."""
    out = ["", "| concurrency | target | tok/s (median) | TTFT s (median) "
           "| tandem/peer (ratio of medians) | tandem/peer (median of ratios) |",
           "|---|---|---:|---:|---:|---:|"]
    for c in dict.fromkeys(r["concurrency"] for r in rows):
        at = {n: {r["round"]: r for r in rows if r["concurrency"] == c and r["target"] == n}
              for n in names}
        peer = {rd: r["tok_s"] for rd, r in at.get(PEER, {}).items() if r["tok_s"]}
        for n in names:
            m = med(r["tok_s"] for r in at[n].values())
            ratios = [None, None]
            if n != PEER and peer and m is not None:
                ratios = [m / med(peer.values()), med(r["tok_s"] / peer[rd]
                                                      for rd, r in at[n].items() if rd in peer)]
            cells = [fmt(m, ".1f"), fmt(med(r["ttft_s"] for r in at[n].values()), ".3f"),
                     *(fmt(x, ".2f", "x") for x in ratios)]
            out.append(f"| {c} | {n} | {' | '.join(cells)} |")
    return out


def measure(rows: list[dict], server: Server, r: int, conc: int, prompts: list[list[dict]],
            max_tokens: int) -> None:
    m = run(server, conc, prompts, max_tokens)
    rows.append({"round": r, "concurrency": conc, "target": server.name, **m})
    print(f"round {r + 1} c={conc} {server.name}: {m['tok_s']:.1f} tok/s, "
          f"{m['completion_tokens']} tokens in {m['wall_s']:.1f} s, TTFT "
          f"{fmt(m['ttft_s'], '.3f')} s, {len(m['errors'])} errors", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: auto)")
    ap.add_argument("--concurrency", action="append", default=None,
                    help="levels, repeatable or comma-separated (default 1,16)")
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"subset of {','.join(TARGETS)}")
    for flag, default in (("--rounds", 3), ("--requests-per-slot", 3), ("--max-tokens", 64)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--workdir", type=Path, default=None, help="logs, KV dirs (default: temp)")
    ap.add_argument("--out", type=Path, default=None, help="default WORKDIR/bench_peer.json")
    ap.add_argument("--serve-flag", action="append", default=[],
                    help="extra `tandem serve` flag (repeatable): --serve-flag=--torch-threads=1")
    ap.add_argument("--env", action="append", default=[],
                    help="KEY=VALUE for the tandem targets (repeatable)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a checkout of tandem that the base-* targets run (see above)")
    ap.add_argument("--ttft", action="store_true", help="also cold, cached and (tandem-1p1d) "
                    "after-restart TTFT per target and round (scripts/bench_peer_ttft.py)")
    ap.add_argument("--ttft-words", type=int, default=TTFT_WORDS,
                    help="words in the --ttft document (default %(default)s: ~2,900 tokens)")
    args = ap.parse_args(argv)
    args.concurrency = [int(c) for part in args.concurrency or ["1,16"]
                        for c in part.split(",") if c.strip()]
    args.targets = [t for t in args.targets.split(",") if t]
    known = TARGETS + (BASE_TARGETS if args.baseline else ())
    if set(args.targets) - set(known) or not args.targets or min(args.concurrency) < 1:
        ap.error(f"--targets: a subset of {','.join(known)} (base-* with --baseline); "
                 "--concurrency: levels >= 1")
    args.dtype = args.dtype or default_dtype()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-peer-"))
    out_path = args.out or workdir / "bench_peer.json"
    rows, ttft_rows = [], []
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(make_server(args, workdir, n)) for n in args.targets]
        for s in servers:
            warm_up(s)
        for r in range(args.rounds):
            order = servers[r % len(servers):] + servers[:r % len(servers)]
            for c in args.concurrency:
                prompts = [story(f"{r}.{c}.{i}") for i in range(max(4, c * args.requests_per_slot))]
                for s in order:
                    measure(rows, s, r, c, prompts, args.max_tokens)
            if args.ttft:
                again = (partial(restart, stack, servers, args, workdir)
                         if RESTARTED in args.targets else None)
                bench_peer_ttft.ttft_round(ttft_rows, order, r, args.ttft_words, again)
    names = [s.name for s in servers]
    flags = cpu_flags()
    ttft_note = f"TTFT document {args.ttft_words} words; " if args.ttft else ""
    header = (f"{DEFAULT_MODEL}, {args.dtype}, torch {torch.__version__}, transformers "
              f"{transformers.__version__}, {platform.machine()} ({', '.join(flags)}), nproc "
              f"{len(os.sched_getaffinity(0))}; {args.rounds} rounds, "
              f"{args.requests_per_slot} requests/slot, max_tokens {args.max_tokens}; "
              f"{ttft_note}tandem "
              f"with {' '.join(args.serve_flag + args.env) or 'defaults'}")
    lines = ["", header, *table(rows, names)]
    ttft_summary = bench_peer_ttft.summary(ttft_rows, names)
    if ttft_rows:
        lines += bench_peer_ttft.table(ttft_summary, args.ttft_words)
    print("\n".join(lines), flush=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"header": header, "workdir": str(workdir), "flags": flags, "argv": sys.argv,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    out_path.write_text(json.dumps({"meta": meta, "measurements": rows, "ttft": ttft_rows,
                                   "ttft_summary": ttft_summary}, indent=2) + "\n")
    print(f"\nwrote {out_path}")
    return 0 if all(not r["errors"] for r in rows + ttft_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
