"""The worker's cold tier: the engine's cold KV segments in a private memory tier that spills to
a private directory, removed with the worker (and reaped when a worker died)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from worker.cold_tier import StoreColdTier, reap_dead


def segment(seed: int) -> torch.Tensor:
    return torch.randn(2, 1024, 3, 64, generator=torch.Generator().manual_seed(seed))


def test_segments_round_trip_bit_exact_from_memory_and_from_disk(tmp_path):
    tier = StoreColdTier.under(tmp_path, memory_bytes=3 << 20, disk_bytes=1 << 30)
    segs = {f"cold/x/{i}/0": segment(i) for i in range(4)}  # 6 MB: more than memory holds
    tier.put(segs)
    got = tier.get(list(segs))
    for (key, want), have in zip(segs.items(), got, strict=True):
        assert have is not None and torch.equal(have, want), key
    stats = tier.stats()
    assert stats["tiers"]["disk"]["hits"] > 0  # the ones memory evicted came back from disk
    tier.delete(list(segs))
    assert tier.get(list(segs)) == [None] * 4
    tier.close()
    assert not tier.directory.exists()


def test_a_tampered_segment_on_disk_is_a_miss_not_wrong_kv(tmp_path):
    tier = StoreColdTier.under(tmp_path, memory_bytes=1, disk_bytes=1 << 30)  # disk only
    tier.put({"cold/x/0/0": segment(0)})
    [path] = list(tier.directory.iterdir())
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF
    path.write_bytes(raw)
    assert tier.get(["cold/x/0/0"]) == [None]
    tier.close()


def test_directories_of_dead_workers_are_reaped_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / f"cold-{dead}-abc").mkdir()
    (tmp_path / f"cold-{os.getpid()}-def").mkdir()
    (tmp_path / "cold-notapid-x").mkdir()
    reap_dead(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f"cold-{os.getpid()}-def", "cold-notapid-x"])
