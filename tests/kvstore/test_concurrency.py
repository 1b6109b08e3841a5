"""Writers and readers racing on the same keys never produce a torn block.

Every write fills a whole block with one value, so a read that mixes two writes (a torn read)
shows up as a block whose min and max differ.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kvstore import StoreConfig, build_store
from kvstore.tiered import TieredStore
from tests.kvstore.helpers import disk_tier, redis_tier

REPO = Path(__file__).resolve().parents[2]
SHAPE = (4, 2, 2, 16, 64)  # 64 KiB of fp32: large enough that a torn copy would be seen
NBYTES = 4 * 2 * 2 * 16 * 64 * 4
KEYS = [f"hot-{i}" for i in range(6)]
ROUNDS = 40


def _fill(value: int) -> torch.Tensor:
    return torch.full(SHAPE, float(value))


def _check(blocks, valid: set[int]) -> int:
    """Asserts every block returned is whole and was written by someone; returns hits."""
    hits = 0
    for block in blocks:
        if block is None:
            continue
        assert block.shape == SHAPE
        low, high = block.min().item(), block.max().item()
        assert low == high, f"torn read: {low} != {high}"
        assert int(low) in valid
        hits += 1
    return hits


def _read_until(stop: threading.Event, store: TieredStore, valid: set[int]) -> int:
    hits = 0
    while not stop.is_set():
        hits += _check(store.get_many(KEYS), valid)
    return hits + _check(store.get_many(KEYS), valid)  # once more after the last write


def test_threads(disk_dir, redis_url):
    config = StoreConfig(tiers="memory+disk+redis", disk_path=str(disk_dir), redis_url=redis_url,
                         memory_bytes=3 * (NBYTES + 128), disk_bytes=4 * (NBYTES + 128))
    shared = build_store(config)  # the engine thread and the asyncio threads share one store
    readers = [shared, TieredStore([disk_tier(disk_dir)]), TieredStore([redis_tier(redis_url)])]
    valid = {w * 10_000 + i for w in range(2) for i in range(ROUNDS)}
    stop = threading.Event()

    def write(w: int) -> None:
        for i in range(ROUNDS):
            shared.put_many({k: _fill(w * 10_000 + i) for k in KEYS})

    with ThreadPoolExecutor(5) as pool:
        reads = [pool.submit(_read_until, stop, store, valid) for store in readers]
        writes = [pool.submit(write, w) for w in range(2)]
        for future in writes:
            future.result()
        stop.set()
        assert all(future.result() > 0 for future in reads)
    assert shared.stats()["corrupt_blocks"] == 0


_WRITER = """
import sys, torch
from kvstore import StoreConfig, build_store
w, disk, url = int(sys.argv[1]), sys.argv[2], sys.argv[3]
keys = [f"hot-{i}" for i in range(6)]
nbytes = 4 * 2 * 2 * 16 * 64 * 4 + 128
store = build_store(StoreConfig(tiers="memory+disk+redis", disk_path=disk, redis_url=url,
                                disk_bytes=4 * nbytes))
print("ready", flush=True)
sys.stdin.readline()  # start together, once both writers have imported torch
for i in range(int(sys.argv[4])):
    store.put_many({k: torch.full((4, 2, 2, 16, 64), float(w * 10_000 + i)) for k in keys})
"""


def test_processes(disk_dir, redis_url):
    """A writer process and a writer thread here share the directory (evicting each other's
    files) and Redis, while this process reads through disk-only and redis-only stores."""
    child = subprocess.Popen([sys.executable, "-c", _WRITER, "1", str(disk_dir), redis_url,
                              str(ROUNDS)], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"  # imported torch; no spinning meanwhile
    here = build_store(StoreConfig(tiers="memory+disk+redis", disk_path=str(disk_dir),
                                   redis_url=redis_url, disk_bytes=4 * (NBYTES + 128)))
    valid = {w * 10_000 + i for w in (1, 2) for i in range(ROUNDS)}
    disk, red = TieredStore([disk_tier(disk_dir)]), TieredStore([redis_tier(redis_url)])
    hits = 0
    with ThreadPoolExecutor(1) as pool:
        child.stdin.write("go\n")
        child.stdin.close()
        writer = pool.submit(lambda: [here.put_many({k: _fill(20_000 + i) for k in KEYS})
                                      for i in range(ROUNDS)])
        while child.poll() is None or not writer.done():  # read while anyone writes
            hits += _check(disk.get_many(KEYS), valid) + _check(red.get_many(KEYS), valid)
        writer.result()
    assert child.returncode == 0
    hits += _check(disk.get_many(KEYS), valid) + _check(red.get_many(KEYS), valid)
    assert hits > 0
    assert disk.stats()["corrupt_blocks"] == red.stats()["corrupt_blocks"] == 0
