"""KV store throughput and latency per tier, beside redis-benchmark and a plain memcpy.

    .venv/bin/python scripts/bench_kvstore.py [--rounds 3] [--iters 200] [--batch 8] [--blocks 32]
        [--block-tokens 16]

Blocks are SmolLM2-135M KV blocks of --block-tokens tokens (default TANDEM_BLOCK_SIZE's):
[30, 2, 3, 16, 64] bf16, 368 KB (64 tokens: 1.47 MB). Each tier is
measured alone (a TieredStore over that one tier), one block per call, cycling over --blocks
distinct keys; then --batch blocks per call. The references run in the same process and the
same minute, so the ratios are what to read on a noisy machine:

    redis-benchmark -c 1 -r <blocks> GET/SET at the blob's size, against a redis-server it starts
    on a free loopback port (never 6379); memcpy = torch copy_ of the same block, one
    thread (the store copies on one thread, to stay off the engine's OpenMP pool).

Disk reads come from the page cache (the files were just written), so they measure the tier's
overhead over the kernel, not the device.
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.kv_layout import DEFAULT_BLOCK_SIZE  # noqa: E402
from kvstore.breaker import Breaker  # noqa: E402
from kvstore.codec import encode  # noqa: E402
from kvstore.config import StoreConfig, build_store  # noqa: E402
from kvstore.disk import DiskTier  # noqa: E402
from kvstore.keys import KeyNamespace, block_keys  # noqa: E402
from kvstore.memory import MemoryTier  # noqa: E402
from kvstore.redis_tier import RedisTier  # noqa: E402
from kvstore.tiered import TieredStore  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

SHAPE = (30, 2, 3, 64)  # SmolLM2-135M's block less its token axis: layers, K/V, KV heads, head_dim
MB = 1e6
MEMCPY = "memcpy: torch copy_, 1 thread"
REDIS_BENCHMARK = "redis-benchmark -c 1"


@dataclass(slots=True)
class Row:
    name: str
    op: str
    mb_s: float  # bytes / mean seconds per call
    p50_ms: float
    p99_ms: float
    nbytes: int = 0  # per call

    @property
    def p50_mb_s(self) -> float:
        """Throughput of the median call: robust to the box's scheduling hiccups."""
        return self.nbytes / (self.p50_ms / 1e3) / MB


def timed(fn: Callable[[int], object], iters: int) -> list[float]:
    """Seconds per call of fn(i), after a few warm-up calls."""
    for i in range(3):
        fn(i)
    out = []
    for i in range(iters):
        start = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - start)
    return out


def row(name: str, op: str, seconds: list[float], nbytes: int) -> Row:
    q = statistics.quantiles(seconds, n=100)
    mean_rate = nbytes * len(seconds) / sum(seconds) / MB
    return Row(name, op, mean_rate, q[49] * 1e3, q[98] * 1e3, nbytes)


def bench_store(name: str, store: TieredStore, blocks: dict[str, torch.Tensor], iters: int,
                batch: int) -> list[Row]:
    keys = list(blocks)
    n, size = len(keys), blocks[keys[0]].numel() * blocks[keys[0]].element_size()

    def put1(i: int) -> None:
        store.put_many({keys[i % n]: blocks[keys[i % n]]})

    def get1(i: int) -> None:
        assert store.get_many([keys[i % n]])[0] is not None

    def pick(i: int) -> list[str]:
        return [keys[(i * batch + j) % n] for j in range(batch)]

    def put_b(i: int) -> None:
        store.put_many({k: blocks[k] for k in pick(i)})

    def get_b(i: int) -> None:
        assert all(t is not None for t in store.get_many(pick(i)))

    rows = [row(name, "put", timed(put1, iters), size), row(name, "get", timed(get1, iters), size)]
    rounds = max(iters // batch, 10)
    rows.append(row(name, f"put x{batch}", timed(put_b, rounds), size * batch))
    rows.append(row(name, f"get x{batch}", timed(get_b, rounds), size * batch))
    return rows


def memcpy_rows(blocks: dict[str, torch.Tensor], iters: int) -> list[Row]:
    """torch copy_ of the same blocks the tiers moved: cycling over them like the tiers do
    (a 47 MB working set, out of cache), and one block over and over (in cache). On one thread,
    like the store's own copies; and with torch's default OpenMP threads for reference, which
    on a loaded 2-vCPU box swings from 45 GB/s to 0.2 GB/s (threads spinning at a barrier)."""
    srcs = [b.reshape(-1).view(torch.uint8) for b in blocks.values()]
    dst = torch.empty_like(srcs[0])
    nbytes, n = dst.numel(), len(srcs)
    threads = torch.get_num_threads()
    omp = timed(lambda i: dst.copy_(srcs[0]), iters)
    torch.set_num_threads(1)
    try:
        cold = timed(lambda i: dst.copy_(srcs[i % n]), iters)
        hot = timed(lambda i: dst.copy_(srcs[0]), iters)
    finally:
        torch.set_num_threads(threads)
    return [row(f"{MEMCPY}, cycling the {n} blocks", "copy", cold, nbytes),
            row(f"{MEMCPY}, same block (in cache)", "copy", hot, nbytes),
            row(f"memcpy: torch copy_, {threads} threads, same block", "copy", omp, nbytes)]


def redis_benchmark_rows(port: int, nbytes: int, requests: int, keys: int) -> list[Row]:
    """-c 1: one connection, one request in flight, like a store call. -r: random keys over
    as many keys as the tiers cycle over, so neither side reads one value from cache."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        print("redis-benchmark not on PATH: reference skipped", file=sys.stderr)
        return []
    out = subprocess.run([exe, "-h", "127.0.0.1", "-p", str(port), "-c", "1", "-n",
                          str(requests), "-r", str(keys), "-d", str(nbytes), "-t", "set,get",
                          "--csv"],
                         capture_output=True, text=True, check=True).stdout
    rows = []
    for rec in csv.DictReader(io.StringIO(out)):
        rps = float(rec["rps"])
        rows.append(Row(f"{REDIS_BENCHMARK} -r {keys}", rec["test"].lower(), rps * nbytes / MB,
                        float(rec["p50_latency_ms"]), float(rec["p99_latency_ms"]), nbytes))
    return rows


def make_blocks(n: int, tokens: int) -> dict[str, torch.Tensor]:
    shape = (*SHAPE[:3], tokens, SHAPE[3])
    ns = KeyNamespace("bench0123456789abcdef", torch.bfloat16, tokens)
    keys = block_keys(range(n * tokens), ns)
    return {k: torch.randn(shape).to(torch.bfloat16) for k in keys}


def one_round(blocks: dict[str, torch.Tensor], server: RedisServer, tmp: Path,
              args: argparse.Namespace) -> list[Row]:
    """Each tier right after its reference, so the two see the same load."""
    key, block = next(iter(blocks.items()))
    blob_bytes = memoryview(encode(key, block)).nbytes

    def redis_reference() -> list[Row]:
        rows = redis_benchmark_rows(server.port, blob_bytes, args.iters * 5, len(blocks))
        with server.client() as client:
            client.flushall()
        return rows

    references = {"memory tier": lambda: memcpy_rows(blocks, args.iters),
                  "redis tier": redis_reference}
    stores = {
        "memory tier": lambda: TieredStore([MemoryTier(4 << 30)]),
        "disk tier": lambda: TieredStore([DiskTier(tmp / "disk", 4 << 30, Breaker("disk"))]),
        "redis tier": lambda: TieredStore([RedisTier(server.url, Breaker("redis"),
                                                     timeout_s=5.0)]),
        "memory+disk+redis": lambda: build_store(StoreConfig(
            tiers="memory+disk+redis", disk_path=str(tmp / "tiered"), redis_url=server.url,
            memory_bytes=4 << 30, redis_timeout_s=5.0)),
    }
    rows: list[Row] = []
    for name, make in stores.items():
        rows += references.get(name, list)()
        store = make()
        rows += bench_store(name, store, blocks, args.iters, args.batch)
        store.close()
    return rows


def run(args: argparse.Namespace) -> list[list[Row]]:
    """Whole rounds, back to back: references and tiers share each round's load."""
    blocks = make_blocks(args.blocks, args.block_tokens)
    with RedisServer() as server, tempfile.TemporaryDirectory() as tmp:
        return [one_round(blocks, server, Path(tmp) / f"round{i}", args)
                for i in range(args.rounds)]


def median_rows(rounds: list[list[Row]]) -> list[Row]:
    """Field-wise median over rounds, per (what, op)."""
    out = []
    for first in rounds[0]:
        same = [r for rows in rounds for r in rows if (r.name, r.op) == (first.name, first.op)]
        out.append(Row(first.name, first.op, statistics.median(r.mb_s for r in same),
                       statistics.median(r.p50_ms for r in same),
                       statistics.median(r.p99_ms for r in same), first.nbytes))
    return out


CHECKS = [("redis tier", "get", REDIS_BENCHMARK, "get", 0.5),
          ("redis tier", "put", REDIS_BENCHMARK, "set", 0.5),
          ("memory tier", "get", f"{MEMCPY}, cycling", "copy", 0.25),
          ("memory tier", "put", f"{MEMCPY}, cycling", "copy", 0.25),
          ("memory tier", "get", f"{MEMCPY}, same block", "copy", 0.25),
          ("memory tier", "put", f"{MEMCPY}, same block", "copy", 0.25)]


def report(rounds: list[list[Row]]) -> None:
    print(f"medians over {len(rounds)} rounds\n")
    print("| what | op | MB/s (mean) | MB/s (p50) | p50 ms | p99 ms |")
    print("|---|---|---:|---:|---:|---:|")
    for r in median_rows(rounds):
        print(f"| {r.name} | {r.op} | {r.mb_s:,.0f} | {r.p50_mb_s:,.0f} | {r.p50_ms:.3f} "
              f"| {r.p99_ms:.3f} |")
    print()
    for name, op, ref_name, ref_op, target in CHECKS:
        by_mean, by_p50 = [], []
        for rows in rounds:  # a ratio within each round, then the median of those
            ours = next((r for r in rows if (r.name, r.op) == (name, op)), None)
            ref = next((r for r in rows if r.name.startswith(ref_name) and r.op == ref_op), None)
            if ours and ref:
                by_mean.append(ours.mb_s / ref.mb_s)
                by_p50.append(ours.p50_mb_s / ref.p50_mb_s)
        if by_mean:
            print(f"{name} {op} / {ref_name} {ref_op} (target >= {target:.0%}): "
                  f"{statistics.median(by_mean):.0%} by bytes/s [{_pcts(by_mean)}], "
                  f"{statistics.median(by_p50):.0%} by median call [{_pcts(by_p50)}]")


def _pcts(values: list[float]) -> str:
    return ", ".join(f"{v:.0%}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=200, help="single-block calls per op")
    parser.add_argument("--batch", type=int, default=8, help="blocks per batched call")
    parser.add_argument("--blocks", type=int, default=32, help="distinct blocks cycled over")
    parser.add_argument("--block-tokens", type=int, default=DEFAULT_BLOCK_SIZE,
                        help="tokens per block (TANDEM_BLOCK_SIZE)")
    parser.add_argument("--rounds", type=int, default=3, help="whole repeats; medians reported")
    report(run(parser.parse_args()))


if __name__ == "__main__":
    main()
