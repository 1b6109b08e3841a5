"""Seeded output is independent of batch composition; chunked prefill changes nothing and does
not stall running decodes."""

from __future__ import annotations

from engine.engine import Engine, EngineConfig
from engine.sampling_params import SamplingParams
from tests.engine.helpers import greedy, make_request, run, run_one


def seeded(seed: int, n: int = 8) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.8, top_k=40, top_p=0.9, seed=seed,
                          ignore_eos=True)


def test_seeded_text_independent_of_batch(smollm_fp32, prompt_ids):
    target = prompt_ids[3]
    alone = run_one(Engine(smollm_fp32), target, seeded(42)).tokens
    others = [
        make_request("a", prompt_ids[1], seeded(7, 12)),
        make_request("b", prompt_ids[5], greedy(6)),
        make_request("c", prompt_ids[2], SamplingParams(max_tokens=8, temperature=1.2)),
    ]
    engine = Engine(smollm_fp32, EngineConfig(max_slots=4))
    out = run(engine, others[:2], joins={2: [make_request("t", target, seeded(42))],
                                         4: others[2:]})
    assert out["t"].tokens == alone
    # and another seed really changes the text
    assert run_one(engine, target, seeded(43)).tokens != alone


def test_chunked_prefill_matches_unchunked(smollm_fp32, prompt_ids):
    long, short = prompt_ids[-1], prompt_ids[4]  # 299 and 18 tokens

    def go(engine: Engine) -> dict:
        # The long prompt joins while the short one decodes: only then is prefill chunked.
        short_req = make_request("short", short, seeded(5, 12))
        return run(engine, [short_req], joins={1: [make_request("long", long, greedy(8))]})

    whole = go(Engine(smollm_fp32, EngineConfig(prefill_chunk=512)))
    chunked_engine = Engine(smollm_fp32, EngineConfig(prefill_chunk=48))
    chunked = go(chunked_engine)
    assert chunked["long"].tokens == whole["long"].tokens
    assert chunked["short"].tokens == whole["short"].tokens
    assert chunked_engine.stats.prefill_tokens == len(long) + len(short)


def test_long_prefill_does_not_stall_decoding(smollm_fp32, prompt_ids):
    engine = Engine(smollm_fp32, EngineConfig(prefill_chunk=64))
    engine.add(make_request("short", prompt_ids[1], greedy(12, ignore_eos=True)))
    engine.step()  # short prefilled, first token out
    engine.add(make_request("long", prompt_ids[-1], greedy(2, ignore_eos=True)))
    emitted = []
    while engine.kv_len("long") < len(prompt_ids[-1]):
        emitted.append(sum(e.seq_id == "short" for e in engine.step()))
    assert len(emitted) >= 4  # the long prompt took several chunked steps...
    assert all(n == 1 for n in emitted)  # ...and the short one decoded in every one of them


def test_prompt_prefills_in_one_pass_when_nothing_decodes(smollm_fp32, prompt_ids):
    # No decode to protect (e.g. a prefill worker): one maskless pass, whatever the chunk size.
    engine = Engine(smollm_fp32, EngineConfig(prefill_chunk=48))
    engine.add(make_request("long", prompt_ids[-1], greedy(1)))
    events = engine.step()
    assert [e.seq_id for e in events] == ["long"]
    assert engine.stats.prefill_tokens == len(prompt_ids[-1])
