"""Chaos run: `tandem serve` with 2 prefill + 2 decode workers under steady streaming load,
while a loop SIGKILLs a random worker every few seconds (the supervisor restarts it).

    python scripts/chaos.py                       # ~4 minutes on a 2-vCPU box
    python scripts/chaos.py --before 20 --chaos 60 --after 20 --kill-every 5 --clients 4

Prints a markdown table per phase (before / during / after the kills): requests sent, succeeded,
failed, wrong (a greedy text that differs from the first answer to the same prompt) and p50/p99
end-to-end latency. The killer never takes down the last healthy worker of a role: the claim
under test is "no request fails while some worker of each role is up", not "a stack with no
decode worker still answers". Not part of CI: it is slow and wants the machine to itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.e2e.stack import Stack  # noqa: E402  (a script run from anywhere)

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
FILLER = " ".join(f"Note {i}: the value of item {i} is {3 * i + 1}." for i in range(12))
PROMPTS = [  # short ones skip the prefill hop; long ones (> 1 block) go through it
    "Count from 1 to 20:",
    "Name three colours of the rainbow.",
    FILLER + " Which item has the value 10?",
    FILLER + " Summarise the notes in one sentence.",
]
PHASES = ("before", "during", "after")


@dataclass(slots=True)
class Result:
    phase: str
    ok: bool
    wrong: bool
    seconds: float
    error: str = ""


@dataclass
class Run:
    phase: str = "before"
    results: list[Result] = field(default_factory=list)
    expected: dict[str, str] = field(default_factory=dict)  # prompt -> first greedy answer
    kills: dict[str, list[str]] = field(default_factory=lambda: {p: [] for p in PHASES})
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


def stream_once(url: str, prompt: str, max_tokens: int) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    parts, done = [], False
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
        if r.status_code != 200:
            raise RuntimeError(f"status {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            parts.append("".join(c.get("text") or "" for c in chunk["choices"]))
    if not done:
        raise RuntimeError("stream ended without [DONE]")
    return "".join(parts)


def client_loop(run: Run, url: str, max_tokens: int, seed: int) -> None:
    rng = random.Random(seed)
    while not run.stop.is_set():
        prompt, phase, start = rng.choice(PROMPTS), run.phase, time.monotonic()
        try:
            text = stream_once(url, prompt, max_tokens)
            ok, error = True, ""
        except Exception as e:  # noqa: BLE001 - every failure is a data point
            text, ok, error = "", False, repr(e)[:200]
        with run.lock:
            want = run.expected.setdefault(prompt, text) if ok else None
            run.results.append(Result(phase, ok, ok and text != want,
                                      time.monotonic() - start, error))


def killer_loop(run: Run, stack: Stack, every_s: float, seed: int) -> None:
    """Every `every_s` during the chaos phase, SIGKILL a random healthy worker whose role has
    another healthy one; a victim counts as back once its restart passes health probes."""
    rng = random.Random(seed)
    while not run.stop.wait(every_s):
        if run.phase != "during":
            continue
        workers = [w for w in stack.workers() if w["healthy"] and w["pid"]]
        roles = [w["role"] for w in workers]
        victims = [w for w in workers if roles.count(w["role"]) >= 2]
        if not victims:
            continue
        w = rng.choice(victims)
        try:
            os.kill(w["pid"], signal.SIGKILL)
        except ProcessLookupError:
            continue
        run.kills["during"].append(f"{w['role']}:{w['pid']}")
        print(f"  t={time.strftime('%H:%M:%S')} killed {w['role']} pid {w['pid']}", flush=True)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def table(run: Run, durations: dict[str, float]) -> str:
    rows = ["| phase | seconds | kills | sent | succeeded | failed | wrong | p50 s | p99 s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for phase in PHASES:
        rs = [r for r in run.results if r.phase == phase]
        lat = [r.seconds for r in rs if r.ok]
        rows.append(f"| {phase} | {durations[phase]:.0f} | {len(run.kills[phase])} | {len(rs)} "
                    f"| {sum(r.ok for r in rs)} | {sum(not r.ok for r in rs)} "
                    f"| {sum(r.wrong for r in rs)} | {pct(lat, 50):.2f} | {pct(lat, 99):.2f} |")
    return "\n".join(rows)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=float, default=30, help="seconds of load before the kills")
    ap.add_argument("--chaos", type=float, default=90, help="seconds of load with kills")
    ap.add_argument("--after", type=float, default=30, help="seconds of load after the kills")
    ap.add_argument("--kill-every", type=float, default=5.0, help="seconds between kills")
    ap.add_argument("--clients", type=int, default=4, help="concurrent streaming clients")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def drive(run: Run, stack: Stack, args: argparse.Namespace) -> dict[str, float]:
    """Load through all three phases, kills in the middle one; returns each phase's length."""
    threads = [threading.Thread(target=client_loop, daemon=True,
                                args=(run, stack.url, args.max_tokens, args.seed + i))
               for i in range(args.clients)]
    threads.append(threading.Thread(target=killer_loop, daemon=True,
                                    args=(run, stack, args.kill_every, args.seed)))
    for t in threads:
        t.start()
    durations = {}
    for phase, seconds in zip(PHASES, (args.before, args.chaos, args.after), strict=True):
        run.phase = phase
        print(f"phase {phase}: {seconds:.0f}s", flush=True)
        start = time.monotonic()
        time.sleep(seconds)  # the load runs meanwhile: this is the phase's length
        durations[phase] = time.monotonic() - start
    run.stop.set()
    for t in threads:
        t.join(timeout=300)  # requests in flight finish and count in the phase they began
    return durations


def main() -> int:
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tandem-chaos-"))
    print(f"starting 2P+2D stack in {workdir} ...", flush=True)
    run = Run()
    with Stack(workdir, "--prefill-workers", "2", "--decode-workers", "2") as stack:
        durations = drive(run, stack, args)
        metrics = httpx.get(f"{stack.url}/metrics", timeout=10).text
    print()
    print(table(run, durations))
    print()
    print(next((ln for ln in metrics.splitlines()
                if ln.startswith("tandem:worker_failovers_total")), "no failover counter"))
    for r in run.results:
        if not r.ok:
            print(f"failed ({r.phase}): {r.error}")
    return 0 if all(r.ok and not r.wrong for r in run.results) else 1


if __name__ == "__main__":
    sys.exit(main())
