"""KV-aware routing against least-loaded, on a simulated cluster of this machine's processes.

    .venv/bin/python scripts/bench_routing.py [--rounds 2] [--workers 4] [--users 16]
        [--turns 4] [--prefix-len 400] [--input-len 24] [--output-len 32] [--range-ratio 0.5]
        [--concurrency 8]
        [--kv-cache-mib 128 (bf16) / 256 (fp32)] [--dtype auto] [--torch-threads 1]
        [--workdir DIR] [--out FILE]

Per round and policy (least_loaded, then kv, alternating so drift hits both alike):

    redis-server (its own, on a free port, flushed)
    N x `tandem decode` (colocated: each computes its own prompts), each with its own memory
        and disk tier, sharing only that Redis, and a KV pool that holds a few users'
        conversations but not all of them (as on a GPU, where the pool is the scarce part)
    `tandem router --route-policy P` over them
    `tandem bench --workload multi-turn --num-users U --turns T --concurrency C`

With C < U a user's next turn queues behind other users' turns, as when people pause between
turns, and is sent whenever a slot frees up, on whichever worker that was. Lengths vary
(--range-ratio): with identical requests in a closed loop, requests finish in the order they
started, so each slot keeps handing a user's next turn to the worker that just served the user
before it in the queue, which is often the user's own: least-loaded gets affinity by accident
(measured: 46-65% device hits in fp32 with fixed lengths), which real traffic does not have.

then reads each worker's prefix counters (tandem:prefix_cache_{device,store}_tokens_total).
Reported per policy, median over rounds: the device prefix hit rate (device tokens / prompt
tokens), TTFT p50 of turns >= 2 (turn 1 is cold under both), output tok/s; and kv / least
loaded ratios of each, taken within a round. Goals (issue 18): hit rate >= 2x, TTFT p50 of
turns >= 2 <= 0.6x, throughput not lower. Where TTFT goes, from the workers' own metrics: the
mean wait from submission to the first engine step that feeds a request, the store loads
(count and mean seconds), and the prompt tokens computed per request.

The defaults are a small chat (short questions) that runs in minutes; `tandem bench`'s own
multi-turn defaults (`--prefix-len 1024 --input-len 256 --output-len 64`) need a pool to
match, e.g. `--kv-cache-mib 1024` in fp32 (~23,000 tokens a worker).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis
import torch
from prometheus_client.parser import text_string_to_metric_families

from engine.registry import DEFAULT_MODEL

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bench_multiround import worker_counters  # noqa: E402
from scripts.serving_targets import (  # noqa: E402
    Server,
    cpu_flags,
    default_dtype,
    free_port,
)

POLICIES = ("least_loaded", "kv")
PAGE_SIZE = 16  # the workers' default --page-size
GOALS = {"hit": 2.0, "ttft": 0.6, "tput": 1.0}


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server not on PATH")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return proc, url
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


def workers(args: argparse.Namespace, workdir: Path, redis_url: str, tag: str) -> list[Server]:
    out = []
    for i in range(args.workers):
        port = free_port()
        argv = [sys.executable, "-m", "tandem.cli", "decode", "--port", str(port), "--dtype",
                args.dtype, "--redis-url", redis_url, "--store-tiers", "memory+disk+redis",
                "--disk-cache-dir", str(workdir / f"{tag}-kv-{i}"),
                "--torch-threads", str(args.torch_threads), "--cluster-id", "bench",
                "--kv-cache-bytes", str(args.kv_cache_mib * 2**20)]
        out.append(Server(f"decode-{i}", argv, port, "", "/health",
                          workdir / f"{tag}-decode-{i}.log"))
    return out


def router(args: argparse.Namespace, workdir: Path, redis_url: str, policy: str,
           urls: list[str], tag: str) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "tandem.cli", "router", "--port", str(port),
            "--redis-url", redis_url, "--cluster-id", "bench", "--store-tiers", "memory+redis",
            "--decode-urls", ",".join(urls), "--prefill-urls", "", "--route-policy", policy]
    return Server("router", argv, port, DEFAULT_MODEL, "/ready", workdir / f"{tag}-router.log")


def bench(args: argparse.Namespace, server: Server, out: Path) -> dict:
    argv = [sys.executable, "-m", "tandem.cli", "bench", "--base-url", server.url,
            "--workload", "multi-turn", "--num-users", str(args.users), "--turns",
            str(args.turns), "--prefix-len", str(args.prefix_len), "--input-len",
            str(args.input_len), "--output-len", str(args.output_len), "--ignore-eos",
            "--concurrency", str(args.concurrency), "--num-requests", str(args.users * args.turns),
            "--temperature", "0", "--timeout-s", "600", "--seed", str(args.seed),
            "--range-ratio", str(args.range_ratio),
            "--output-json", str(out), "--log-level", "warning"]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["runs"][0]


def device_tokens(urls: list[str]) -> float:
    return sum(worker_counters(u).get("device", 0.0) for u in urls)


# Where a warm turn's TTFT goes, summed over the workers: the wait from submission to the
# first engine step that feeds it, the store reads, and the tokens computed at admission.
WHERE = {"queue": ("tandem:request_queue_time_seconds", {}),
         "load": ("tandem:kv_handoff_seconds", {"op": "load"})}


def where_time(urls: list[str]) -> dict[str, float]:
    """Histogram sums and counts of WHERE, and admission counters, over the workers."""
    out = dict.fromkeys(("queue_sum", "queue_count", "load_sum", "load_count", "computed",
                         "requests"), 0.0)
    for url in urls:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        for sample in (s for f in text_string_to_metric_families(text) for s in f.samples):
            for k, (name, labels) in WHERE.items():
                part = sample.name.removeprefix(f"{name}_")
                if part in ("sum", "count") and labels.items() <= sample.labels.items():
                    out[f"{k}_{part}"] += sample.value
        counters = httpx.get(f"{url}/health", timeout=10).json()["counters"]
        out["computed"] += counters["admit_tokens_computed_total"]
        out["requests"] += counters["requests_total"]
    return out


def pool_tokens(url: str) -> int:
    """A worker's KV pool capacity in tokens, as its /metrics reports it."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("tandem:kv_pages_capacity"):
            return int(float(line.rsplit(" ", 1)[1])) * PAGE_SIZE
    return 0


def one_run(args: argparse.Namespace, workdir: Path, redis_url: str, policy: str,
            tag: str) -> dict:
    redis.Redis.from_url(redis_url).flushall()
    ws = workers(args, workdir, redis_url, tag)
    try:
        for w in ws:
            w.start(wait=False)
        for w in ws:
            w.wait_ready()
        urls = [w.url for w in ws]
        capacity = pool_tokens(urls[0])
        with router(args, workdir, redis_url, policy, urls, tag) as r:
            before, where_before = device_tokens(urls), where_time(urls)
            run = bench(args, r, workdir / f"{tag}-bench.json")
            device = device_tokens(urls) - before
            where = {k: v - where_before[k] for k, v in where_time(urls).items()}
            routes = httpx.get(f"{r.url}/metrics", timeout=10).text
    finally:
        for w in reversed(ws):
            w.stop()
    return summarize(run, device, routes, where) | {"pool_tokens": capacity}


def summarize(run: dict, device: float, router_metrics: str, where: dict) -> dict:
    ok = [q for q in run["requests"] if q["ok"]]
    later = sorted(q["ttft_s"] for q in ok if q["turn"] >= 1)
    prompt = sum(q["prompt_tokens"] for q in ok)
    s = run["summary"]
    return {"ok": len(ok), "failed": len(run["requests"]) - len(ok), "prompt_tokens": prompt,
            "device_tokens": device, "hit": device / prompt if prompt else 0.0,
            "ttft_later_p50": statistics.median(later) if later else None,
            "tput": s["output_token_throughput"],
            "queue_mean": where["queue_sum"] / max(1, where["queue_count"]),
            "load_mean": where["load_sum"] / max(1, where["load_count"]),
            "loads": where["load_count"],
            "computed_mean": where["computed"] / max(1, where["requests"]),
            "route_lines": [ln for ln in router_metrics.splitlines()
                            if ln.startswith("tandem:router_route")]}


def report(rounds: list[dict], args: argparse.Namespace) -> list[str]:
    head = (f"SmolLM2-135M-Instruct, {args.dtype}, torch {torch.__version__}, "
            f"{platform.machine()} ({', '.join(cpu_flags())}), nproc "
            f"{len(os.sched_getaffinity(0))}; {args.workers} decode workers "
            f"(--torch-threads {args.torch_threads}, --kv-cache-bytes {args.kv_cache_mib} MiB: "
            f"{rounds[0]['kv']['pool_tokens']} tokens each), own disk tiers, one Redis; multi-turn "
            f"{args.users} users x {args.turns} turns, prefix {args.prefix_len} words, "
            f"question {args.input_len} words, {args.output_len} tokens out, lengths +-"
            f"{args.range_ratio:.0%}, c={args.concurrency}")
    lines = [head, "", "| round | policy | ok | device hit rate | TTFT p50 turns >= 2 | "
             "output tok/s | queue wait, mean | store loads: n, mean | tokens computed "
             "per request |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    ratios = {"hit": [], "ttft": [], "tput": []}
    for i, rnd in enumerate(rounds):
        for p in POLICIES:
            r = rnd[p]
            lines.append(f"| {i + 1} | {p} | {r['ok']}/{r['ok'] + r['failed']} | "
                         f"{r['hit']:.1%} | {r['ttft_later_p50']:.3f} s | {r['tput']:.1f} | "
                         f"{r['queue_mean'] * 1e3:.0f} ms | {r['loads']:.0f}, "
                         f"{r['load_mean'] * 1e3:.0f} ms | {r['computed_mean']:.0f} |")
        kv, ll = rnd["kv"], rnd["least_loaded"]
        ratios["hit"].append(kv["hit"] / ll["hit"] if ll["hit"] else float("inf"))
        ratios["ttft"].append(kv["ttft_later_p50"] / ll["ttft_later_p50"])
        ratios["tput"].append(kv["tput"] / ll["tput"])
    lines.append("")
    for k, label, better in (("hit", "device hit rate", ">="), ("ttft", "TTFT p50 turns >= 2",
                                                                 "<="), ("tput", "throughput",
                                                                         ">=")):
        med = statistics.median(ratios[k])
        met = med >= GOALS[k] if better == ">=" else med <= GOALS[k]
        lines.append(f"kv / least_loaded {label}: median {med:.2f}x over {len(rounds)} rounds "
                     f"({', '.join(f'{x:.2f}' for x in ratios[k])}); goal {better} "
                     f"{GOALS[k]}x: {'met' if met else 'missed'}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in (("--rounds", 2), ("--workers", 4), ("--users", 16), ("--turns", 4),
                          ("--prefix-len", 400), ("--input-len", 24), ("--output-len", 32),
                          ("--concurrency", 8), ("--torch-threads", 1), ("--seed", 0),
                          ("--kv-cache-mib", 0)):
        ap.add_argument(flag, type=int, default=default, help="default %(default)s")
    ap.add_argument("--range-ratio", type=float, default=0.5,
                    help="question and answer lengths vary by this share (default %(default)s)")
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: auto)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    args.dtype = args.dtype or default_dtype()
    # ~5,800 tokens a worker (SmolLM2: 23 KB a token in bf16, 46 KB in fp32): four users'
    # conversations fit, sixteen do not.
    args.kv_cache_mib = args.kv_cache_mib or (256 if args.dtype == "float32" else 128)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-routing-"))
    workdir.mkdir(parents=True, exist_ok=True)
    proc, redis_url = start_redis(workdir)
    rounds = []
    try:
        for i in range(args.rounds):
            rounds.append({p: one_run(args, workdir, redis_url, p, f"r{i}-{p}")
                           for p in POLICIES})
            print(json.dumps(rounds[-1], indent=1), flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
    lines = report(rounds, args)
    print("\n".join(lines))
    out = args.out or workdir / "bench_routing.json"
    out.write_text(json.dumps({"argv": sys.argv, "rounds": rounds, "report": lines}, indent=1))
    print(f"wrote {out}")
    return 0 if all(r[p]["failed"] == 0 for r in rounds for p in POLICIES) else 1


if __name__ == "__main__":
    sys.exit(main())
