"""What the keyed MAC costs: encode and decode of one SmolLM2 block, xxh3 vs keyed BLAKE2b.

    .venv/bin/python scripts/bench_codec.py [--iters 200] [--rounds 3]

The block is SmolLM2-135M's 64-token KV block, [30, 2, 3, 64, 64] bf16: 1.47 MB. Rows:

    encode            copy the tensor into a fresh blob + checksum or MAC (every put)
    decode verify     check the checksum or MAC, then copy out (a disk/Redis hit, copy=True)
    decode view       check, then view the blob in place (copy=False: a borrowed read)
    hash only         the checksum or MAC alone over the blob, for reference

Medians over --rounds rounds of --iters calls each; MB/s is the block's bytes per median call.
Wall time and this thread's CPU time per call: on a shared, loaded box the wall time of a
multi-millisecond call includes waiting for a core, and the CPU time does not.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvstore.codec import MAC_BYTES, decode, derive_mac_key, encode  # noqa: E402
from kvstore.keys import KeyNamespace, block_keys  # noqa: E402

SHAPE = (30, 2, 3, 64, 64)  # SmolLM2-135M: 30 layers, K/V, 3 KV heads, 64 tokens, head_dim 64
MB = 1e6


def median_us(fn: Callable[[], object], iters: int, rounds: int) -> tuple[float, float]:
    """Median (wall, thread CPU) µs per call over rounds x iters calls, after a warm-up."""
    for _ in range(3):
        fn()
    wall, cpu = [], []
    for _ in range(rounds):
        walls, cpus = [], []
        for _ in range(iters):
            start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
            fn()
            cpus.append(time.thread_time_ns() - start_cpu)
            walls.append(time.perf_counter_ns() - start)
        wall.append(statistics.median(walls))
        cpu.append(statistics.median(cpus))
    return statistics.median(wall) / 1e3, statistics.median(cpu) / 1e3


def cases(key: str, block: torch.Tensor, mac_key: bytes) -> dict[str, Callable[[], object]]:
    plain, keyed = encode(key, block), encode(key, block, mac_key=mac_key)
    plain_rw, keyed_rw = bytearray(plain), bytearray(keyed)  # what a disk/Redis read returns
    return {
        "encode, xxh3": lambda: encode(key, block),
        "encode, BLAKE2b MAC": lambda: encode(key, block, mac_key=mac_key),
        "decode verify, xxh3": lambda: decode(plain, key),
        "decode verify, BLAKE2b MAC": lambda: decode(keyed, key, mac_key=mac_key),
        "decode view, xxh3": lambda: decode(plain_rw, key, copy=False),
        "decode view, BLAKE2b MAC": lambda: decode(keyed_rw, key, copy=False, mac_key=mac_key),
        "hash only, xxh3_64": lambda: xxhash.xxh3_64(plain).intdigest(),
        "hash only, BLAKE2b keyed": lambda: hashlib.blake2b(
            keyed, key=mac_key, digest_size=MAC_BYTES).digest(),
        "hash only, SHA-256 (reference)": lambda: hashlib.sha256(keyed).digest(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=200, help="calls per round")
    parser.add_argument("--rounds", type=int, default=3, help="medians over rounds")
    args = parser.parse_args()
    torch.manual_seed(0)
    block = torch.randn(SHAPE).to(torch.bfloat16)
    key = block_keys(range(SHAPE[3]), KeyNamespace("bench0123456789abcdef", torch.bfloat16,
                                                    SHAPE[3]))[0]
    nbytes = block.numel() * block.element_size()
    print(f"block {list(SHAPE)} bf16, {nbytes / MB:.2f} MB; medians of {args.rounds} x "
          f"{args.iters} calls\n")
    print("| op | wall µs | MB/s (wall) | CPU µs | MB/s (CPU) |")
    print("|---|---:|---:|---:|---:|")
    for name, fn in cases(key, block, derive_mac_key("bench secret")).items():
        wall, cpu = median_us(fn, args.iters, args.rounds)
        print(f"| {name} | {wall:,.0f} | {nbytes / wall:,.0f} | {cpu:,.0f} "
              f"| {nbytes / cpu:,.0f} |")


if __name__ == "__main__":
    main()
