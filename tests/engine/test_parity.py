"""Greedy output equals HF generate() token for token (fp32), and within vLLM's criterion (bf16)."""

from __future__ import annotations

import math

from engine.engine import Engine, EngineConfig
from tests.engine.helpers import close_by_top5, greedy, hf_greedy, make_request, run, run_one

NEW = 64


def test_prompts_cover_several_blocks(prompt_ids):
    assert len(prompt_ids) >= 8
    assert max(len(ids) for ids in prompt_ids) >= 4 * 64  # the long prompt spans 4+ blocks
    assert len({len(ids) for ids in prompt_ids}) == len(prompt_ids)


def test_fp32_one_at_a_time_matches_generate(smollm_fp32, prompt_ids, hf_refs_fp32):
    engine = Engine(smollm_fp32, EngineConfig(max_slots=4))
    for ids, (ref, ref_top, ref_lps) in zip(prompt_ids, hf_refs_fp32, strict=True):
        got = run_one(engine, ids, greedy(NEW, logprobs=2))
        assert got.tokens == ref
        # Ends where HF ends: EOS -> "stop", 64 tokens -> "length".
        assert got.finish_reason == ("stop" if len(ref) < NEW else "length")
        # Logprobs come from the raw distribution: compare with HF's logits.
        for j, ev in enumerate(got.events):
            assert math.isclose(ev.logprob, ref_lps[j][ref[j]].item(), abs_tol=1e-3)
            assert [t for t, _ in ev.top_logprobs] == ref_top[j][1][:2]
    assert engine.stats.decode_tokens > 0 and not engine.has_work()


def test_fp32_batched_with_joins_matches_generate(smollm_fp32, prompt_ids, hf_refs_fp32):
    # A small prefill budget makes the long prompt prefill in chunks over its cached prefix
    # while the others decode, and late joiners land in holes left by finished sequences.
    engine = Engine(smollm_fp32, EngineConfig(max_slots=8, prefill_chunk=96))
    reqs = [make_request(str(i), ids, greedy(NEW)) for i, ids in enumerate(prompt_ids)]
    joins = {3: [reqs[4]], 9: [reqs[5], reqs[6]], 20: [reqs[7]]}
    out = run(engine, reqs[:4], joins)
    for i, (ref, _, _) in enumerate(hf_refs_fp32):
        assert out[str(i)].tokens == ref, f"prompt {i}"
    assert engine.stats.steps < 8 * NEW / 2  # really batched


def test_bf16_alone_and_batched_close(smollm_bf16):
    # bf16 decode attention packs query heads (engine/step_plan.py): not bit-identical to
    # generate()'s call even for a lone row, so both keep vLLM's top-5 rule.
    tok = smollm_bf16.tokenizer
    prompts = ["The capital of France is", "def add(a, b):", "My favourite colour is"]
    ids = [tok(p).input_ids for p in prompts]
    refs = [hf_greedy(smollm_bf16, x, 8) for x in ids]
    engine = Engine(smollm_bf16, EngineConfig(max_slots=4))
    for x, (ref, _, lps) in zip(ids, refs, strict=True):
        close_by_top5(run_one(engine, x, greedy(8, logprobs=5)).events, ref, lps)
    reqs = [make_request(str(i), x, greedy(8, logprobs=5)) for i, x in enumerate(ids)]
    out = run(engine, reqs[:2], joins={2: reqs[2:]})
    for i, (ref, _, lps) in enumerate(refs):
        close_by_top5(out[str(i)].events, ref, lps)
