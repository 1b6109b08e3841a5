"""Every tier returns bf16, fp16 and fp32 blocks bit for bit, small and SmolLM2-sized."""

from __future__ import annotations

import pytest
import torch

from tests.kvstore.helpers import (
    SMALL_SHAPE,
    SMOL_SHAPE,
    all_bit_equal,
    make_blocks,
    one_tier_store,
)


@pytest.mark.parametrize("tier", ["memory", "disk", "redis"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [SMALL_SHAPE, SMOL_SHAPE], ids=["small", "smollm2"])
def test_round_trip(tier, dtype, shape, disk_dir, redis_url):
    blocks = make_blocks(2, shape, dtype, seed=5)
    keys = list(blocks)
    writer = one_tier_store(tier, path=disk_dir, url=redis_url)
    writer.put_many(blocks)
    # disk and redis: read through a second store, as another process would
    reader = writer if tier == "memory" else one_tier_store(tier, path=disk_dir, url=redis_url)
    assert reader.lookup_prefix(keys) == 2
    out = reader.get_many(keys)
    assert all_bit_equal(out, blocks)
    assert reader.stats()["tiers"][tier]["hits"] == 2
