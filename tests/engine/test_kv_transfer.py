"""KV export/import between engine instances: a prefill handoff and a failover resume continue
exactly as an uninterrupted run, greedy and seeded; forks share the prompt without recompute.

The real model runs the greedy handoff; the other cases use the tiny random Llama (same code
path, 2 layers, GQA), whose near-flat distributions make seeded draws a sharp test."""

from __future__ import annotations

import pytest
import torch

from engine.engine import Engine, EngineConfig
from engine.sampling_params import SamplingParams
from engine.sequence import SeqRequest
from tests.engine.helpers import greedy, make_request, run, run_one

B = 64
PARAMS = {
    "greedy": greedy(10),
    "seeded": SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=1234),
}


def _engine(loaded) -> Engine:
    return Engine(loaded, EngineConfig(max_slots=4, block_size=B))


@pytest.fixture(scope="module")
def prompt(prompt_ids) -> list[int]:
    return prompt_ids[-1][:150]  # two full blocks and a 22-token tail


def _handoff(loaded, prompt: list[int], params: SamplingParams) -> None:
    want = run_one(_engine(loaded), prompt, params).tokens

    prefill = _engine(loaded)
    prefill.add(make_request("r", prompt, params, prefill_only=True))
    (first,) = prefill.step()
    assert prefill.kv_len("r") == len(prompt)
    blocks = prefill.export_blocks("r", 0, 2)  # [2, L, 2, H, B, D] on CPU
    tail = prefill.export_kv("r", 2 * B, len(prompt))  # [L, 2, H, 22, D]
    prefill.release("r")
    assert blocks.shape == (2, *prefill.layout.block_shape) and blocks.device.type == "cpu"

    decode = _engine(loaded)
    req = SeqRequest("r", prompt + [first.token_id], len(prompt), params, prefix_kv=blocks,
                     prefix_len=len(prompt), prefix_tail=tail)
    got = run(decode, [req])["r"].tokens
    assert [first.token_id] + got == want
    assert decode.stats.prefill_tokens == 0  # nothing recomputed
    # the imported blocks came through lossless
    assert torch.equal(decode.export_blocks("r", 0, 2), blocks)


def test_prefill_handoff_continues_exactly_real_model(smollm_fp32, prompt):
    _handoff(smollm_fp32, prompt, PARAMS["greedy"])


@pytest.mark.parametrize("kind", list(PARAMS))
def test_prefill_handoff_continues_exactly(tiny_fp32, prompt, kind):
    _handoff(tiny_fp32, prompt, PARAMS[kind])


@pytest.mark.parametrize("kind", list(PARAMS))
def test_failover_resume_from_stored_blocks(tiny_fp32, prompt, kind):
    params = PARAMS[kind]
    ids = prompt[:100]
    want = run_one(_engine(tiny_fp32), ids, params).tokens

    first = _engine(tiny_fp32)
    first.add(make_request("r", ids, params))
    generated = []
    while len(generated) < 4:
        generated += [e.token_id for e in first.step()]
    assert first.kv_len("r") == len(ids) + 3
    stored = first.export_blocks("r", 0, 1)  # only full blocks reach the store

    second = _engine(tiny_fp32)
    req = SeqRequest("r", ids + generated, len(ids), params, prefix_kv=stored, prefix_len=B)
    got = run(second, [req])["r"].tokens
    assert generated + got == want
    # prefilled only the tokens after the stored block, over the cached prefix
    assert second.stats.prefill_tokens == len(ids) + len(generated) - B


def test_forks_share_the_prompt_and_follow_their_seeds(tiny_fp32, prompt_ids):
    ids = prompt_ids[4]
    engine = _engine(tiny_fp32)

    def sampled(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=8, temperature=1.0, seed=seed)

    engine.add(make_request("p", ids, sampled(1)))
    engine.fork("p", "same", sampled(1))
    engine.fork("p", "other", sampled(2))
    out = run(engine, [])
    assert engine.stats.prefill_tokens == len(ids)  # the prompt ran once
    assert out["same"].tokens == out["p"].tokens
    assert out["other"].tokens != out["p"].tokens
    assert [out[k].finish_reason for k in ("p", "same", "other")] == ["length"] * 3


def test_fork_mid_generation_copies_the_state(smollm_fp32, prompt_ids):
    ids = prompt_ids[3]
    engine = Engine(smollm_fp32, EngineConfig(max_slots=1))  # child must wait for a slot
    engine.add(make_request("p", ids, greedy(6)))
    head = [e.token_id for e in engine.step() + engine.step()]
    engine.fork("p", "c", greedy(6))
    out = run(engine, [])
    assert len(head) == 2
    # continues where the parent stood: 4 more tokens each, the same ones (greedy)
    assert out["c"].tokens == out["p"].tokens and len(out["p"].tokens) == 4
    assert engine.stats.prefill_tokens == len(ids)


@pytest.mark.parametrize("evicted", [False, True], ids=["pool-then-import", "pool-lost"])
def test_an_import_after_the_pools_own_prefix(tiny_fp32, prompt, evicted):
    """prefix_start: the pool held block 0 when the worker looked, so only block 1 and the tail
    are imported. Should block 0's pages be gone by admission, the import is dropped and the
    prompt recomputed: slower, never wrong."""
    params = PARAMS["greedy"]
    want = run_one(_engine(tiny_fp32), prompt, params).tokens
    prefill = _engine(tiny_fp32)
    prefill.add(make_request("r", prompt, params, prefill_only=True))
    (first,) = prefill.step()
    blocks, tail = prefill.export_blocks("r", 1, 1), prefill.export_kv("r", 2 * B, len(prompt))

    decode = _engine(tiny_fp32)
    run(decode, [make_request("warm", prompt[:B + 5], greedy(1))])  # pages of block 0
    assert decode.cached_prefix_tokens(prompt) >= B
    if evicted:
        decode = _engine(tiny_fp32)  # a fresh pool: the pages the caller saw are gone
    req = SeqRequest("r", prompt + [first.token_id], len(prompt), params, prefix_kv=blocks,
                     prefix_len=len(prompt), prefix_tail=tail, prefix_start=B)
    got = run(decode, [req])["r"]
    assert [first.token_id] + got.tokens == want
    assert got.events[0].num_cached_tokens == (0 if evicted else len(prompt))
    assert decode.stats.prefix_store_tokens == (0 if evicted else len(prompt) - B)
