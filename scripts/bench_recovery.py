"""Recovery after a decode worker dies: stored KV reused versus full recompute (issue 18; the
comparison Hy-DAC makes for a device that goes offline).

    .venv/bin/python scripts/bench_recovery.py [--rounds 2] [--prompt-len 2000]
        [--max-tokens 600] [--kill-at 400] [--dtype auto] [--workdir DIR] [--out FILE]

Runs its own redis-server, 2 `tandem decode` workers (each prefills its own prompts) and a
`tandem router` over them, as separate processes on loopback. One request at a time streams a
`--prompt-len`-token prompt (token ids, so the length is exact) for `--max-tokens` tokens with
`ignore_eos`; once the client has `--kill-at` tokens (continuous usage stats count them) the
serving worker gets SIGKILL. The router re-sends the request with every token so far to the
other worker. Measured: the time from the kill to the next token the client receives.

Two modes, the same processes and flags but for the workers' store tiers:
- reuse: `--store-tiers memory+redis`. The survivor can read the dead worker's blocks only from
  Redis, as a worker on another host would: the prompt's blocks and each block of generated
  tokens, stored as it filled. It recomputes the tail (less than one block).
- recompute: `--store-tiers memory`. Each worker's tier is private and dies with it, so the
  survivor recomputes the prompt and every generated token.

Each kill runs greedy and seeded (temperature 0.8, seed 1234); its text must equal a no-fault
run of the same request, else the script fails. Every request has a fresh cache_salt, so no
round reuses an earlier round's KV. The killed worker is restarted (and the router sees it
healthy) before the next round. Prints a markdown table: median seconds from kill to next
token per mode and sampling, the survivor's tokens loaded and computed, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import torch

from engine.registry import DEFAULT_MODEL

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bench_routing import router, start_redis  # noqa: E402
from scripts.serving_targets import Server, cpu_flags, default_dtype, free_port  # noqa: E402

MODES = {"reuse": "memory+redis", "recompute": "memory"}
SAMPLING = {"greedy": {"temperature": 0}, "seeded": {"temperature": 0.8, "seed": 1234}}
GOAL = 3.0  # reuse at least 3x faster than recompute


def decode_worker(args: argparse.Namespace, workdir: Path, redis_url: str, tiers: str,
                  name: str) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "tandem.cli", "decode", "--port", str(port), "--dtype",
            args.dtype, "--redis-url", redis_url, "--store-tiers", tiers,
            "--cluster-id", "bench"]  # bench_routing.router's
    return Server(name, argv, port, "", "/health", workdir / f"{name}.log")


def prompt_ids(base: str, n: int) -> list[int]:
    """Exactly n token ids of an ordinary document: numbered notes, tokenized by the router."""
    text = " ".join(f"Note {i}: the shipment of item {i} left warehouse {i % 7} on day "
                    f"{i % 28 + 1} and carried {3 * i + 1} boxes." for i in range(n // 10))
    ids = httpx.post(f"{base}/tokenize", json={"model": DEFAULT_MODEL, "prompt": text},
                     timeout=60).json()["tokens"]
    if len(ids) < n:
        raise RuntimeError(f"the document has {len(ids)} tokens, fewer than {n}")
    return ids[:n]


def stream(base: str, body: dict, on_tokens=None) -> tuple[str, list[tuple[float, int]]]:
    """Streams a completion; returns its text and (arrival time, tokens so far) per chunk.
    on_tokens(n) runs as each chunk arrives, n = completion tokens so far."""
    parts, arrivals = [], []
    body = {"model": DEFAULT_MODEL, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "cache_salt": uuid.uuid4().hex, **body}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=900) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            parts.append("".join(c.get("text") or "" for c in chunk["choices"]))
            n = chunk["usage"]["completion_tokens"]
            arrivals.append((time.monotonic(), n))
            if on_tokens is not None:
                on_tokens(n)
    return "".join(parts), arrivals


def serving(workers: list[Server]) -> Server:
    busy = [w for w in workers if httpx.get(f"{w.url}/health", timeout=5).json()["running"]]
    if len(busy) != 1:
        raise RuntimeError(f"expected one busy worker, found {len(busy)}")
    return busy[0]


def wait_pool(base: str, n: int, timeout: float = 120.0) -> None:
    """Until the router lists n healthy decode workers (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ws = httpx.get(f"{base}/workers", timeout=5).json()["workers"]
        if sum(1 for w in ws if w["role"] == "decode" and w["healthy"]) >= n:
            return
        time.sleep(0.2)
    raise RuntimeError(f"the router never saw {n} healthy decode workers")


def kill_run(args: argparse.Namespace, base: str, workers: list[Server], body: dict) -> dict:
    """One request whose serving worker dies at --kill-at tokens. Returns the timings, the
    text, and the survivor's admission counters for the resumed request."""
    killed: list[tuple[Server, float]] = []
    before = {w.name: httpx.get(f"{w.url}/health", timeout=5).json()["counters"]
              for w in workers}

    def on_tokens(n: int) -> None:
        if not killed and n >= args.kill_at:
            victim = serving(workers)
            os.kill(victim.proc.pid, signal.SIGKILL)
            killed.append((victim, time.monotonic()))

    text, arrivals = stream(base, body, on_tokens)
    if not killed:
        raise RuntimeError("the stream ended before the kill")
    victim, t_kill = killed[0]
    victim.proc.wait()
    [survivor] = [w for w in workers if w is not victim]
    after = httpx.get(f"{survivor.url}/health", timeout=5).json()["counters"]
    got = {k: after[k] - before[survivor.name].get(k, 0) for k in after}
    loaded = got.get("prefix_tokens_loaded_total", 0)
    computed = got.get("admit_tokens_computed_total", 0)
    # The survivor admitted the prompt plus the `resent` tokens the router had from the dead
    # worker; chunks up to `resent` may still reach the client after the kill (they were in
    # its socket buffer), so the first chunk past them is the survivor's first token.
    resent = loaded + computed - len(body["prompt"])
    t_next, n_next = next((t, n) for t, n in arrivals if n > resent)
    victim.start()  # back to two workers before the next round
    wait_pool(base, len(workers))
    return {"seconds": t_next - t_kill, "next_token": n_next, "text": text,
            "loaded": loaded, "computed": computed}


def one_mode(args: argparse.Namespace, workdir: Path, redis_url: str, mode: str) -> dict:
    ws = [decode_worker(args, workdir, redis_url, MODES[mode], f"{mode}-decode-{i}")
          for i in range(2)]
    results: dict[str, list[dict]] = {s: [] for s in SAMPLING}
    try:
        for w in ws:
            w.start(wait=False)
        for w in ws:
            w.wait_ready()
        with router(args, workdir, redis_url, "kv", [w.url for w in ws], mode) as r:
            wait_pool(r.url, len(ws))
            ids = prompt_ids(r.url, args.prompt_len)
            for name, sampling in SAMPLING.items():
                body = {"prompt": ids, "max_tokens": args.max_tokens, **sampling}
                want, _ = stream(r.url, body)
                for _ in range(args.rounds):
                    got = kill_run(args, r.url, ws, body)
                    if got.pop("text") != want:
                        raise RuntimeError(f"{mode}/{name}: the text after the kill differs "
                                           "from a no-fault run")
                    results[name].append(got)
                    print(f"{mode} {name}: {got}", file=sys.stderr)
    finally:
        for w in ws:
            w.stop()
    return results


def report(args: argparse.Namespace, runs: dict[str, dict]) -> list[str]:
    head = (f"{DEFAULT_MODEL.split('/')[-1]}, {args.dtype}, torch {torch.__version__}, "
            f"{platform.machine()} ({', '.join(cpu_flags())}), nproc "
            f"{len(os.sched_getaffinity(0))}; {args.prompt_len}-token prompt, "
            f"{args.max_tokens}-token answer, SIGKILL at token {args.kill_at}, "
            f"median of {args.rounds}")
    lines = [head, "", "| sampling | mode | kill to next token, s | survivor loaded / computed "
             "tokens | recompute / reuse |", "|---|---|---:|---|---:|"]
    for name in SAMPLING:
        med = {m: statistics.median(r["seconds"] for r in runs[m][name]) for m in MODES}
        for m in MODES:
            last = runs[m][name][-1]
            ratio = f"{med['recompute'] / med['reuse']:.1f}x" if m == "reuse" else ""
            each = ", ".join(f"{r['seconds']:.2f}" for r in runs[m][name])
            lines.append(f"| {name} | {m} | {med[m]:.2f} ({each}) | "
                         f"{last['loaded']} / {last['computed']} | {ratio} |")
    lines.append("")
    lines.append("Every text after a kill equalled a no-fault run of the same request. "
                 f"Goal: reuse >= {GOAL:g}x faster.")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for flag, default in (("--rounds", 2), ("--prompt-len", 2000), ("--max-tokens", 600),
                          ("--kill-at", 400)):
        ap.add_argument(flag, type=int, default=default, help="default %(default)s")
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: auto)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    args.dtype = args.dtype or default_dtype()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    workdir.mkdir(parents=True, exist_ok=True)
    redis_proc, redis_url = start_redis(workdir)
    try:
        runs = {m: one_mode(args, workdir, redis_url, m) for m in MODES}
    finally:
        redis_proc.terminate()
        redis_proc.wait()
    text = "\n".join(report(args, runs))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
