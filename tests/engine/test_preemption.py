"""A pool smaller than the load: admission by free pages, preemption instead of failure, and
forks that share their prompt's pages. Output equals a run with memory to spare."""

from __future__ import annotations

import pytest

from engine.engine import Engine, EngineConfig
from engine.intake import InvalidRequest
from engine.sampling_params import SamplingParams
from tests.engine.helpers import greedy, make_request, page_bytes, run

P = 16


def seeded(seed: int, n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.8, top_k=40, seed=seed, ignore_eos=True)


def _requests(prompt_ids, params_for) -> list:
    long = max(prompt_ids, key=len)
    return [make_request(str(i), ids + long[: 40 * i], params_for(i))
            for i, ids in enumerate(prompt_ids[:6])]


@pytest.mark.parametrize("params_for", [lambda i: greedy(24, ignore_eos=True),
                                        lambda i: seeded(100 + i, 24)], ids=["greedy", "seeded"])
def test_preempted_sequences_resume_to_the_same_text(smollm_fp32, prompt_ids, params_for):
    roomy = run(Engine(smollm_fp32, EngineConfig(max_slots=8)), _requests(prompt_ids, params_for))
    # ~600 tokens of KV for six sequences that need ~1,100 together
    tight = Engine(smollm_fp32, EngineConfig(max_slots=8, kv_cache_bytes=38 * page_bytes(
        smollm_fp32)))
    out = run(tight, _requests(prompt_ids, params_for))
    assert tight.stats.preemptions > 0
    assert {k: r.tokens for k, r in out.items()} == {k: r.tokens for k, r in roomy.items()}
    assert tight.step() == [] and tight.pool.num_referenced == 0


def test_a_burst_of_four_budgets_all_succeeds_under_the_budget(tiny_fp32):
    budget = 160 * page_bytes(tiny_fp32)
    # Each starts at its own token: no two share a prefix, so none waits to reuse another's.
    reqs = [make_request(str(i), list(range(7 + i, 7 + i + 20 + (37 * i) % 200)),
                         greedy(16 + i % 48, ignore_eos=True)) for i in range(64)]
    need = sum(-(-(len(r.token_ids) + r.params.max_tokens) // P) for r in reqs)
    assert need * page_bytes(tiny_fp32) >= 4 * budget
    roomy = run(Engine(tiny_fp32, EngineConfig(max_slots=64)), reqs)
    engine = Engine(tiny_fp32, EngineConfig(max_slots=64, kv_cache_bytes=budget))
    reqs = [make_request(r.seq_id, r.token_ids, r.params) for r in reqs]
    out = run(engine, reqs)
    assert engine.pool.kv.nbytes <= budget
    assert engine.stats.preemptions > 0 and engine.take_failed() == []
    assert {k: r.tokens for k, r in out.items()} == {k: r.tokens for k, r in roomy.items()}


def test_a_request_that_can_never_fit_is_refused(tiny_fp32):
    engine = Engine(tiny_fp32, EngineConfig(kv_cache_bytes=9 * page_bytes(tiny_fp32)))
    with pytest.raises(InvalidRequest) as e:
        engine.add(make_request("big", list(range(100)), greedy(40)))  # 140 > 8 pages x 16
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    assert run(engine, [make_request("ok", list(range(100)), greedy(28))])["ok"].tokens


def test_forks_share_the_prompts_pages(smollm_fp32, prompt_ids):
    long = max(prompt_ids, key=len)
    engine = Engine(smollm_fp32, EngineConfig(max_slots=8))
    engine.add(make_request("p", long, seeded(1, 8)))
    for k in range(3):
        engine.fork("p", f"c{k}", seeded(2 + k, 8))
    engine.step()  # the prompt's forward: four sequences sample from it
    prompt_pages = -(-len(long) // P)
    assert engine.pool.num_referenced <= prompt_pages + 4  # not 4x the prompt
    out = run(engine, [])
    alone = {f"c{k}": run(Engine(smollm_fp32), [make_request(f"c{k}", long, seeded(2 + k, 8))])
             for k in range(3)}
    for k in range(3):  # a fork's text is its own seed's, as if it had run alone (first token
        # from the step above, the rest here)
        assert out[f"c{k}"].tokens == alone[f"c{k}"][f"c{k}"].tokens[1:]


def test_prompts_that_fill_the_pool_between_them_still_finish(tiny_fp32):
    # Two 120-token prompts, a pool of 10 pages (160 tokens): neither fits beside the other.
    engine = Engine(tiny_fp32, EngineConfig(kv_cache_bytes=11 * page_bytes(tiny_fp32),
                                            prefill_chunk=32))
    reqs = [make_request(str(i), list(range(10 + i, 130 + i)), greedy(8, ignore_eos=True))
            for i in range(2)]
    out = run(engine, reqs, max_steps=500)
    roomy = run(Engine(tiny_fp32), [make_request(r.seq_id, r.token_ids, r.params) for r in reqs])
    assert {k: r.tokens for k, r in out.items()} == {k: r.tokens for k, r in roomy.items()}
