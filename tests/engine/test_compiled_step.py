"""The compiled decode step (EngineConfig.compile_decode, engine/compiled_step.py): it really
runs, alone and batched, its tokens keep vLLM's top-5 rule against generate(), and steps it
cannot take (prompt chunks) still run eager beside it. One compile, ~1.5 min on 2 cores."""

from __future__ import annotations

import torch

from engine.compiled_step import DecodeBatch
from engine.engine import Engine, EngineConfig
from tests.engine.helpers import close_by_top5, greedy, make_request, run

NEW = 16


def test_compiled_decode_keeps_top5_alone_and_batched(smollm_fp32, prompt_ids, hf_refs_fp32):
    engine = Engine(smollm_fp32, EngineConfig(max_slots=4, compile_decode=True))
    compiled = engine._fwd.compiled
    assert compiled is not None and compiled.steps == 0  # warmed up, counter reset
    reqs = [make_request(str(i), ids, greedy(NEW, logprobs=5))
            for i, ids in enumerate(prompt_ids[:4])]
    out = run(engine, reqs[:1], joins={3: reqs[1:]})  # alone for 3 steps, then prefill beside
    for i, (ref, _, lps) in enumerate(hf_refs_fp32[:4]):
        close_by_top5(out[str(i)].events, ref, lps)
        assert len(out[str(i)].tokens) == min(NEW, len(ref))
    # Decode-only steps went compiled (lone and batched); the joins' prefills did not.
    assert 2 + NEW <= compiled.steps < engine.stats.steps
    assert engine.pool.kv[:, :, 0].abs().sum() == 0  # the null page stayed zeros


def test_decode_batch_masks_each_row_to_its_own_length():
    """Two rows over one padded width: each attends over its own keys only (tiny pool)."""
    L, N, P, H, D, Hq = 1, 4, 2, 1, 4, 2
    kv = torch.randn(L, 2, N, P, H, D)
    kv[:, :, 0] = 0
    tables, positions = [[1, 2], [3]], [2, 0]  # row 0: 3 keys on pages 1-2; row 1: 1 key

    class Pool:
        page_size = P
        layout = type("Layout", (), {"dtype": torch.float32})

    Pool.kv = kv
    batch = DecodeBatch.build(Pool, tables, positions)
    module = type("Attn", (), {"layer_idx": 0})
    query = torch.randn(1, Hq, 2, D)
    out = batch.attend(module, query, None)  # [1, 2, Hq, D]
    for row, (table, pos) in enumerate(zip(tables, positions, strict=True)):
        keys, vals = (torch.cat([kv[0, j, i, :, 0] for i in table])[: pos + 1]  # [pos + 1, D]
                      for j in (0, 1))
        weights = torch.softmax(query[0, :, row] @ keys.T / D**0.5, dim=-1)  # [Hq, pos + 1]
        want = weights @ vals
        torch.testing.assert_close(out[0, row], want)
