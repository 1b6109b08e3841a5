"""Keying cost per block as a sequence grows: the incremental chain (kvstore.KeyChain) against
rekeying from the root (what a decode worker did for each new block before the chain).

    .venv/bin/python scripts/bench_keys.py [--blocks 200] [--block-size 64] [--repeat 200]

Prints the median time to key block 1 and block N of one sequence, both ways. The chain's cost
is one blake2b over one block's int32 bytes, whatever the position.
"""

from __future__ import annotations

import argparse
import statistics
import time

from kvstore import KeyChain, KeyNamespace, block_keys


def _median_us(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def key_of_block(
    tokens: list[int], ns: KeyNamespace, block: int, repeat: int
) -> tuple[float, float]:
    """(chain, from the root) microseconds to key block `block` (1-based) once the blocks before
    it are keyed."""
    B = ns.block_size
    head, upto = tokens[: (block - 1) * B], tokens[: block * B]
    chains = []
    for _ in range(repeat):  # a chain already holding blocks 1 .. block-1, one per timed call
        c = KeyChain(ns)
        c.extend(head)
        chains.append(c)
    it = iter(chains)
    chain_us = _median_us(lambda: next(it).extend(upto), repeat)
    root_us = _median_us(lambda: block_keys(upto, ns)[block - 1], repeat)
    return chain_us, root_us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=200)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()
    ns = KeyNamespace("bench-fingerprint", "bfloat16", args.block_size)
    tokens = [(i * 7919) % 49152 for i in range(args.blocks * args.block_size)]
    print("| block | chain (us) | from the root (us) |\n|---:|---:|---:|")
    for block in (1, args.blocks):
        chain_us, root_us = key_of_block(tokens, ns, block, args.repeat)
        print(f"| {block} | {chain_us:.1f} | {root_us:.1f} |")


if __name__ == "__main__":
    main()
